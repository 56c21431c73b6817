//! Snapshots: taken on demand and automatically, covering the WAL they replace, consistent
//! while writes continue, installed atomically, and verified.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_engine::storage::FsStorage;
use keel_engine::{Batch, Db, Error, ManualClock, Options, Ttl};

fn files(dir: &std::path::Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn compact_replaces_covered_wal_and_reopen_replays_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let opts = Options::default()
        .clock(Arc::new(clock.clone()))
        .wal_segment_bytes(64 * 1024);
    let db = Db::open(dir.path(), opts.clone()).unwrap();
    for i in 0..5000u32 {
        db.set(format!("k{i}"), format!("v{i}"), None).unwrap();
    }
    db.set("ttl", "v", Some(Duration::from_secs(10))).unwrap();
    db.set("dies", "v", Some(Duration::from_millis(5))).unwrap();
    clock.advance(Duration::from_millis(5));
    let segments_before = db.stats().wal_segments;
    let report = db.compact().unwrap().unwrap();
    assert_eq!(report.entries, 5001, "expired keys are not written");
    assert!(report.segments_deleted >= segments_before - 1, "{report:?}");
    for i in 0..100u32 {
        db.set(format!("tail{i}"), "t", None).unwrap();
    }
    db.delete("k0").unwrap();
    db.close().unwrap();
    assert_eq!(files(dir.path(), "snapshot-").len(), 1);
    assert!(
        files(dir.path(), "wal-").len() <= 2,
        "{:?}",
        files(dir.path(), "wal-")
    );

    clock.advance(Duration::from_secs(1));
    let db = Db::open(dir.path(), opts).unwrap();
    let r = db.stats().recovery.unwrap();
    assert_eq!(r.snapshot_lsn, report.lsn);
    // The 101 tail writes, plus at most one logged deletion of "dies" by the active expirer if
    // it ticked after the snapshot: never the 5,000 records the snapshot covers.
    assert!(
        (101..=102).contains(&r.records),
        "replayed {} records",
        r.records
    );
    assert_eq!(db.stats().keys, 5000 - 1 + 1 + 100);
    assert_eq!(db.get("k4999"), Some(b"v4999".to_vec()));
    assert_eq!(db.get("k0"), None);
    assert_eq!(
        db.ttl("ttl"),
        Ttl::Remaining(Duration::from_millis(8_995)),
        "absolute expiry kept"
    );
    let v = Db::verify(dir.path(), &FsStorage);
    drop(db);
    let v = v.unwrap();
    assert_eq!(v.snapshots.len(), 1);
}

#[test]
fn automatic_snapshots_keep_the_wal_bounded_under_sustained_writes() {
    let dir = tempfile::tempdir().unwrap();
    // Buffered: this test is about WAL growth, not fsync latency.
    let opts = Options::default()
        .durability(keel_engine::Durability::Buffered)
        .wal_segment_bytes(32 * 1024)
        .snapshot_after_wal_bytes(128 * 1024)
        .active_expiry(Duration::from_millis(1), 256);
    let db = Db::open(dir.path(), opts.clone()).unwrap();
    let mut max_wal = 0;
    let mut appended = 0u64;
    for i in 0..200_000u32 {
        db.set(format!("k{}", i % 500), [b'x'; 64], None).unwrap();
        appended += 28 + 4 + 1 + 2 + 8 + 4 + 64 + format!("k{}", i % 500).len() as u64;
        if i % 100 == 0 {
            max_wal = max_wal.max(db.stats().wal_bytes);
        }
    }
    // ~21 MiB of records were appended. Snapshots (by the maintenance thread, or by writers
    // once it falls 4x behind) bound the WAL, whatever the scheduling: after a snapshot the WAL
    // holds at most what was appended since the previous one started (<= 4x the threshold),
    // and it grows by at most another 4x before the next, plus partly filled segments.
    let stats = db.stats();
    assert!(appended > 20 * 1024 * 1024);
    assert!(stats.snapshots >= 20, "{stats:?}");
    let bound = 2 * 4 * 128 * 1024 + 3 * 32 * 1024;
    assert!(
        max_wal <= bound,
        "WAL grew to {max_wal} bytes (bound {bound}) of {appended} appended"
    );
    db.close().unwrap();
    let db = Db::open(dir.path(), opts).unwrap();
    assert_eq!(db.stats().keys, 500);
}

#[test]
fn writes_during_compaction_are_kept_and_batches_stay_whole() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Options::default()).unwrap();
    for chunk in 0..20u32 {
        let mut base = Batch::new();
        for i in chunk * 1000..(chunk + 1) * 1000 {
            base.set(format!("base{i}"), "b", None);
        }
        db.write_batch(&base).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) || i < 100 {
                let mut b = Batch::new();
                b.set(format!("w{i}-a"), i.to_string(), None);
                b.set(format!("w{i}-b"), i.to_string(), None);
                db.write_batch(&b).unwrap();
                i += 1;
            }
            i
        })
    };
    for _ in 0..3 {
        db.compact().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    db.close().unwrap();
    let db = Db::open(dir.path(), Options::default()).unwrap();
    for i in 0..written {
        assert_eq!(
            db.get(format!("w{i}-a")),
            Some(i.to_string().into_bytes()),
            "w{i}-a"
        );
        assert_eq!(
            db.get(format!("w{i}-b")),
            Some(i.to_string().into_bytes()),
            "w{i}-b"
        );
    }
    assert_eq!(db.stats().keys, 20_000 + 2 * u64::from(written));
}

#[test]
fn an_interrupted_snapshot_leaves_the_store_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Options::default()).unwrap();
    db.set("a", "1", None).unwrap();
    db.close().unwrap();
    // A crash after writing part of a snapshot's temporary file, before its rename.
    std::fs::write(
        dir.path().join("snapshot-00000000000000000001.snap.tmp"),
        b"KEELSNAP partial",
    )
    .unwrap();
    let db = Db::open(dir.path(), Options::default()).unwrap();
    assert_eq!(db.get("a"), Some(b"1".to_vec()));
    assert!(
        files(dir.path(), "snapshot-").is_empty(),
        "the temporary file is removed"
    );
}

#[test]
fn a_damaged_snapshot_is_corruption_not_silence() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), Options::default()).unwrap();
    for i in 0..100u32 {
        db.set(format!("k{i}"), "v", None).unwrap();
    }
    db.compact().unwrap();
    db.close().unwrap();
    let snap = dir.path().join(&files(dir.path(), "snapshot-")[0]);
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&snap, &bytes).unwrap();
    assert!(matches!(
        Db::open(dir.path(), Options::default()),
        Err(Error::Corruption { .. })
    ));
    assert!(matches!(
        Db::verify(dir.path(), &FsStorage),
        Err(Error::Corruption { .. })
    ));
}

#[test]
fn memory_stores_do_not_snapshot() {
    let db = Db::memory(Options::default());
    db.set("a", "1", None).unwrap();
    assert_eq!(db.compact().unwrap(), None);
}
