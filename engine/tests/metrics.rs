//! The engine's per-commit figures reach the `metrics` facade: each WAL fdatasync's latency,
//! each group commit's size and each snapshot's duration, recorded on the engine's own threads
//! (so the recorder is installed process-wide; this file holds one test).

use keel_engine::{
    Db, Durability, METRIC_GROUP_COMMIT_RECORDS, METRIC_SNAPSHOT_SECONDS, METRIC_WAL_FSYNC_SECONDS,
    Options,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};

#[test]
fn fsyncs_group_commits_and_snapshots_are_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this process");

    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(
        dir.path(),
        Options::default().durability(Durability::Immediate),
    )
    .unwrap();
    for i in 0..20 {
        db.set(format!("k{i}"), "value", None).unwrap();
    }
    db.compact().unwrap();
    let stats = db.stats();
    db.close().unwrap();

    // A snapshot of the recorder drains its histograms: take one and search it.
    let recorded: Vec<(CompositeKey, DebugValue)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| (key, value))
        .collect();
    let samples = |name: &str| -> Vec<f64> {
        recorded
            .iter()
            .filter(|(key, _)| key.kind() == MetricKind::Histogram && key.key().name() == name)
            .flat_map(|(_, value)| match value {
                DebugValue::Histogram(v) => v.iter().map(|x| x.into_inner()).collect(),
                _ => Vec::new(),
            })
            .collect()
    };
    let fsyncs = samples(METRIC_WAL_FSYNC_SECONDS);
    // Immediate durability: every one of the 20 writes waited for an fdatasync (one each, as
    // they were sequential), and close may add one more.
    assert!(fsyncs.len() >= 20, "{} fsync samples", fsyncs.len());
    assert!(fsyncs.len() as u64 >= stats.wal_fsyncs.min(20));
    assert!(fsyncs.iter().all(|s| *s >= 0.0 && *s < 60.0), "{fsyncs:?}");
    let commits = samples(METRIC_GROUP_COMMIT_RECORDS);
    assert!(commits.len() >= 20, "{} commit samples", commits.len());
    assert_eq!(
        commits.iter().sum::<f64>() as u64,
        20,
        "every record counted once"
    );
    let snapshots = samples(METRIC_SNAPSHOT_SECONDS);
    assert_eq!(snapshots.len(), 1, "one compaction, one snapshot");
}
