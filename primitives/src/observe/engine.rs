//! [`EngineGauges`]: the embedded engine's figures ([`Db::stats`]) as metrics, without any hook
//! inside the engine. A scrape (or a timer) reads one `Stats` and publishes it: gauges for
//! sizes and positions, counters set to their absolute values for what the engine counts
//! since open.
//!
//! What happens per event is recorded by the engine itself, through the same facade:
//! `keel_engine_wal_fsync_seconds` (each WAL fdatasync), `keel_engine_group_commit_records`
//! (each group commit) and `keel_engine_snapshot_seconds` (each snapshot).

use std::time::Duration;

use keel_engine::{Db, Stats};
use metrics::{Label, counter, gauge};

/// Entries in memory (live, plus expired ones not yet reclaimed).
pub const ENGINE_KEYS: &str = "keel_engine_keys";
/// Accounted memory: keys, values and per-entry overhead, in bytes.
pub const ENGINE_MEMORY_BYTES: &str = "keel_engine_memory_bytes";
/// The configured memory limit in bytes (absent when there is none).
pub const ENGINE_MEMORY_LIMIT_BYTES: &str = "keel_engine_memory_limit_bytes";
/// Bytes in WAL segments.
pub const ENGINE_WAL_BYTES: &str = "keel_engine_wal_bytes";
/// WAL segments on disk.
pub const ENGINE_WAL_SEGMENTS: &str = "keel_engine_wal_segments";
/// fdatasync calls on the WAL since open.
pub const ENGINE_WAL_FSYNCS_TOTAL: &str = "keel_engine_wal_fsyncs_total";
/// The newest durable log sequence number.
pub const ENGINE_DURABLE_LSN: &str = "keel_engine_durable_lsn";
/// Keys reclaimed by the active expirer since open.
pub const ENGINE_EXPIRED_RECLAIMED_TOTAL: &str = "keel_engine_expired_reclaimed_total";
/// Keys evicted to stay under the memory limit since open.
pub const ENGINE_EVICTIONS_TOTAL: &str = "keel_engine_evictions_total";
/// Snapshots taken since open.
pub const ENGINE_SNAPSHOTS_TOTAL: &str = "keel_engine_snapshots_total";
/// Wall time of the most recent snapshot since open, in seconds (absent before the first).
pub const ENGINE_LAST_SNAPSHOT_SECONDS: &str = "keel_engine_last_snapshot_seconds";
/// Wall time of recovery at open, in seconds (absent for a memory-only store).
pub const ENGINE_RECOVERY_SECONDS: &str = "keel_engine_recovery_seconds";
/// 1 once an I/O failure poisoned the store (reopen it), else 0.
pub const ENGINE_POISONED: &str = "keel_engine_poisoned";

pub(super) fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(ENGINE_KEYS, "Entries in the engine's memory");
    describe_gauge!(ENGINE_MEMORY_BYTES, Unit::Bytes, "Accounted engine memory");
    describe_gauge!(
        ENGINE_MEMORY_LIMIT_BYTES,
        Unit::Bytes,
        "Configured memory limit"
    );
    describe_gauge!(ENGINE_WAL_BYTES, Unit::Bytes, "Bytes in WAL segments");
    describe_gauge!(ENGINE_WAL_SEGMENTS, "WAL segments on disk");
    describe_counter!(ENGINE_WAL_FSYNCS_TOTAL, "WAL fdatasync calls since open");
    describe_gauge!(ENGINE_DURABLE_LSN, "Newest durable log sequence number");
    describe_counter!(
        ENGINE_EXPIRED_RECLAIMED_TOTAL,
        "Keys reclaimed by the active expirer since open"
    );
    describe_counter!(
        ENGINE_EVICTIONS_TOTAL,
        "Keys evicted under the memory limit"
    );
    describe_counter!(ENGINE_SNAPSHOTS_TOTAL, "Snapshots taken since open");
    describe_gauge!(
        ENGINE_LAST_SNAPSHOT_SECONDS,
        Unit::Seconds,
        "Duration of the most recent snapshot"
    );
    describe_gauge!(
        ENGINE_RECOVERY_SECONDS,
        Unit::Seconds,
        "Duration of recovery at open"
    );
    describe_gauge!(ENGINE_POISONED, "1 if an I/O failure poisoned the store");
}

/// Publishes an embedded store's [`Stats`] as `keel_engine_*` metrics, on demand
/// ([`publish`](Self::publish), e.g. from a `/metrics` handler just before rendering) or on
/// an interval ([`spawn`](Self::spawn)).
///
/// Holds a clone of the [`Db`]: a store closes when its last clone is dropped, so drop this
/// (or the task handle of `spawn`) before expecting the store to close, or close it with
/// [`Db::close`].
#[derive(Debug, Clone)]
pub struct EngineGauges {
    db: Db,
    labels: Vec<Label>,
}

impl EngineGauges {
    /// Publishes `db`'s figures without labels.
    pub fn new(db: Db) -> Self {
        EngineGauges {
            db,
            labels: Vec::new(),
        }
    }

    /// Publishes `db`'s figures with the label `store = name` (for a process with more than
    /// one store).
    pub fn with_label(db: Db, name: impl Into<String>) -> Self {
        EngineGauges {
            db,
            labels: vec![Label::new("store", name.into())],
        }
    }

    /// Reads the store's figures once, publishes them and returns them.
    pub fn publish(&self) -> Stats {
        let s = self.db.stats();
        let l = || self.labels.clone();
        gauge!(ENGINE_KEYS, l()).set(s.keys as f64);
        gauge!(ENGINE_MEMORY_BYTES, l()).set(s.memory_bytes as f64);
        if let Some(limit) = s.max_memory {
            gauge!(ENGINE_MEMORY_LIMIT_BYTES, l()).set(limit as f64);
        }
        gauge!(ENGINE_WAL_BYTES, l()).set(s.wal_bytes as f64);
        gauge!(ENGINE_WAL_SEGMENTS, l()).set(s.wal_segments as f64);
        counter!(ENGINE_WAL_FSYNCS_TOTAL, l()).absolute(s.wal_fsyncs);
        gauge!(ENGINE_DURABLE_LSN, l()).set(s.durable_lsn as f64);
        counter!(ENGINE_EXPIRED_RECLAIMED_TOTAL, l()).absolute(s.expired_reclaimed);
        counter!(ENGINE_EVICTIONS_TOTAL, l()).absolute(s.evictions);
        counter!(ENGINE_SNAPSHOTS_TOTAL, l()).absolute(s.snapshots);
        if let Some(snapshot) = &s.last_snapshot {
            gauge!(ENGINE_LAST_SNAPSHOT_SECONDS, l()).set(snapshot.duration.as_secs_f64());
        }
        if let Some(recovery) = &s.recovery {
            gauge!(ENGINE_RECOVERY_SECONDS, l()).set(recovery.duration.as_secs_f64());
        }
        gauge!(ENGINE_POISONED, l()).set(if s.poisoned { 1.0 } else { 0.0 });
        s
    }

    /// Publishes now and then every `every` on the current Tokio runtime until the returned
    /// handle is dropped (or [`EngineGaugesTask::stop`]ped).
    ///
    /// # Panics
    /// Outside a Tokio runtime (as `tokio::spawn`).
    pub fn spawn(self, every: Duration) -> EngineGaugesTask {
        let every = every.max(Duration::from_millis(1));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                self.publish();
            }
        });
        EngineGaugesTask { task }
    }
}

/// The publishing task of [`EngineGauges::spawn`]; dropping it stops the task (and releases
/// its clone of the store).
#[derive(Debug)]
pub struct EngineGaugesTask {
    task: tokio::task::JoinHandle<()>,
}

impl EngineGaugesTask {
    /// Stops publishing.
    pub fn stop(self) {}
}

impl Drop for EngineGaugesTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}
