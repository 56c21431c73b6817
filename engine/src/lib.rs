//! keel's embedded engine: a TTL-aware key-value store whose values live in memory and whose
//! write-ahead log makes them durable on local disk.
//!
//! One entry point: [`Db`], opened on a directory with [`Options`] ([`Db::open`]) or kept
//! purely in memory ([`Db::memory`]). Every operation is atomic per key; writes are
//! acknowledged according to [`Durability`] (by default only once their WAL record is
//! fdatasynced, with concurrent writers sharing one fdatasync). Expiry is an absolute Unix time
//! in milliseconds that survives restarts. The byte formats, the write path and the recovery
//! algorithm are in `engine/DESIGN.md`.
//!
//! ```
//! use std::time::Duration;
//! use keel_engine::{Db, Options};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let db = Db::open(dir.path(), Options::default()).unwrap();
//! db.set("greeting", "hello", Some(Duration::from_secs(60))).unwrap();
//! assert_eq!(db.get("greeting").as_deref(), Some(&b"hello"[..]));
//! assert_eq!(db.incr("visits", 1, None).unwrap(), 1);
//! ```
//!
//! This crate never starts an async runtime and never touches the network: a `Pending` write
//! can be `.await`ed from any executor because the WAL writer thread wakes it.

mod clock;
mod db;
mod error;
mod index;
mod int;
mod marker;
mod options;
pub mod record;
pub mod snapshot;
pub mod storage;
mod sync;
mod wal;

pub use clock::{Clock, ManualClock, SystemClock};
pub use db::{
    Batch, Db, LOCK_FILE, Op, Outcome, Pending, RecoveryReport, SCAN_LIMIT_MAX, ScanCursor,
    ScanEntry, ScanPage, SnapshotReport, Stats, Ttl, TtlPolicy, VerifyReport, Writable, lock_path,
};
pub use error::{Error, Result};
pub use int::parse_i64;
pub use options::{
    BATCH_BYTES_CEILING, BATCH_BYTES_MAX_DEFAULT, BATCH_OPS_MAX_DEFAULT, Durability,
    EXPIRE_INTERVAL_DEFAULT, EXPIRE_SCAN_PER_SHARD_DEFAULT, EvictionPolicy, KEY_BYTES_CEILING,
    KEY_BYTES_MAX_DEFAULT, Limits, Options, SHARDS_DEFAULT, SNAPSHOT_AFTER_WAL_BYTES_DEFAULT,
    TTL_MAX, VALUE_BYTES_CEILING, VALUE_BYTES_MAX_DEFAULT, WAL_QUEUE_BYTES_DEFAULT,
    WAL_SEGMENT_BYTES_DEFAULT,
};
pub use wal::{TornTail, WalScan};

/// Histogram (seconds) of each WAL fdatasync, emitted through the `metrics` facade.
pub const METRIC_WAL_FSYNC_SECONDS: &str = "keel_engine_wal_fsync_seconds";
/// Histogram of the records in each group commit written to the WAL.
pub const METRIC_GROUP_COMMIT_RECORDS: &str = "keel_engine_group_commit_records";
/// Histogram (seconds) of each snapshot, from the copy to the truncated log.
pub const METRIC_SNAPSHOT_SECONDS: &str = "keel_engine_snapshot_seconds";
