//! [`Db`]: the store. Every operation is atomic per key: it runs under the key's shard lock,
//! reads "now" once, computes the key's next state, appends that after-image to the WAL and
//! installs it in memory before the lock is released. It then waits, with no lock held, until
//! the record reaches the durability the caller asked for.
//!
//! This module holds the types and the store's shared state (`Core`); the operations and the
//! write path are in `ops.rs`, opening and recovery in `recovery.rs`, and the maintenance
//! thread, snapshots, eviction and the clean-close marker in `maintenance.rs`.

mod maintenance;
mod ops;
mod recovery;

pub use ops::Writable;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, bounded};
use parking_lot::Mutex;

use crate::clock::MonotonicClock;
use crate::error::{Error, Result};
use crate::index::{Index, Loader, Replay, Shard, Slot, TOUCH_UNIT_MS, entry_bytes};
use crate::int::parse_i64;
use crate::marker::{self, CleanClose};
use crate::options::{Durability, EvictionPolicy, Limits, Options, TTL_MAX};
use crate::record::{self, Entry};
use crate::snapshot::{self, SnapshotHeader, SnapshotWriter};
use crate::storage::{DirLock, LockError, Storage, join};
use crate::wal::{self, Wal, WalScan, WalShared, WalStart};

/// How far past `snapshot_after_wal_bytes` the WAL may grow before writers take the snapshot
/// themselves.
const WAL_OVERDUE_FACTOR: u64 = 4;

/// The longest an observed expiry waits before the maintenance thread makes the clock floor
/// covering it durable (see `Core::persist_floor`).
pub(crate) const FLOOR_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Name of the lock file inside a store directory.
pub const LOCK_FILE: &str = "LOCK";

/// What happens to a key's TTL on a successful [`Db::compare_and_swap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlPolicy {
    /// Keep the current expiry (none if the key was absent).
    Keep,
    /// Replace it: the key expires this long after the swap.
    Set(Duration),
    /// Remove it: the key no longer expires.
    Clear,
}

/// A key's remaining time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// The key does not exist (or has expired).
    Missing,
    /// The key exists and does not expire.
    NoExpiry,
    /// The key expires after this long (at least 1 ms).
    Remaining(Duration),
}

/// An opaque position in a scan: pass it back to get the next page.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScanCursor(Vec<u8>);

impl ScanCursor {
    /// The cursor's bytes, to carry it outside the process.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Rebuilds a cursor from [`ScanCursor::as_bytes`].
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        ScanCursor(bytes.into())
    }
}

/// One scanned key (and its value, if asked for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEntry {
    /// The key.
    pub key: Vec<u8>,
    /// The value, when the scan asked for values.
    pub value: Option<Vec<u8>>,
    /// Absolute expiry (Unix ms), when the scan asked for values.
    pub expires_at_ms: Option<u64>,
}

/// A page of a prefix scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// Live keys in ascending byte order.
    pub entries: Vec<ScanEntry>,
    /// Where the next page starts; `None` when the scan is complete.
    pub next: Option<ScanCursor>,
}

/// The most keys one scan page returns, whatever `limit` asks.
pub const SCAN_LIMIT_MAX: usize = 10_000;

#[derive(Debug, Clone)]
enum BatchOp {
    Set {
        key: Vec<u8>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    },
    SetAt {
        key: Vec<u8>,
        value: Vec<u8>,
        expires_at_ms: Option<u64>,
    },
    Delete {
        key: Vec<u8>,
    },
}

/// Sets and deletes applied all together or not at all, in memory and on disk (one WAL
/// record). Later operations on the same key win.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    ops: Vec<BatchOp>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }
    /// Adds a set of `key` to `value`, expiring after `ttl` if given.
    pub fn set(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> &mut Self {
        self.ops.push(BatchOp::Set {
            key: key.into(),
            value: value.into(),
            ttl,
        });
        self
    }
    /// Adds a set of `key` to `value` expiring at the absolute Unix time `expires_at_ms` (as
    /// `keel dump` prints it). An expiry at or before the store's "now" when the batch is
    /// applied writes nothing for this key and deletes any existing value.
    pub fn set_expiring_at(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        expires_at_ms: Option<u64>,
    ) -> &mut Self {
        self.ops.push(BatchOp::SetAt {
            key: key.into(),
            value: value.into(),
            expires_at_ms,
        });
        self
    }

    /// Adds a delete of `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(BatchOp::Delete { key: key.into() });
        self
    }
    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    /// True if the batch has no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A write operation, for [`Db::submit`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Op<'a> {
    /// See [`Db::set`]; outcome `Unit`.
    Set {
        /// Key.
        key: &'a [u8],
        /// Value.
        value: &'a [u8],
        /// Time to live.
        ttl: Option<Duration>,
    },
    /// See [`Db::set_nx`]; outcome `Bool`.
    SetNx {
        /// Key.
        key: &'a [u8],
        /// Value.
        value: &'a [u8],
        /// Time to live.
        ttl: Option<Duration>,
    },
    /// See [`Db::compare_and_swap`]; outcome `Bool`.
    CompareAndSwap {
        /// Key.
        key: &'a [u8],
        /// Required current value (`None`: the key must be absent).
        expected: Option<&'a [u8]>,
        /// New value.
        new: &'a [u8],
        /// What happens to the TTL.
        ttl: TtlPolicy,
    },
    /// See [`Db::compare_and_delete`]; outcome `Bool`.
    CompareAndDelete {
        /// Key.
        key: &'a [u8],
        /// Required current value.
        expected: &'a [u8],
    },
    /// See [`Db::delete`]; outcome `Bool`.
    Delete {
        /// Key.
        key: &'a [u8],
    },
    /// See [`Db::incr`]; outcome `Int`.
    Incr {
        /// Key.
        key: &'a [u8],
        /// Amount to add (may be negative).
        delta: i64,
        /// TTL stamped only if this creates the key.
        ttl_on_create: Option<Duration>,
    },
    /// See [`Db::expire`]; outcome `Bool`.
    Expire {
        /// Key.
        key: &'a [u8],
        /// New time to live.
        ttl: Duration,
    },
    /// See [`Db::persist`]; outcome `Bool`.
    Persist {
        /// Key.
        key: &'a [u8],
    },
    /// See [`Db::write_batch`]; outcome `Unit`.
    Batch(&'a Batch),
}

/// The result of a submitted [`Op`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The operation has no result beyond success.
    Unit,
    /// Whether the operation took effect.
    Bool(bool),
    /// The integer result (of `incr`).
    Int(i64),
}

/// A write that has been applied in memory and is on its way to the durability it asked for.
/// `wait()` blocks the thread; `.await` does not (it is a `Future` that the WAL writer wakes).
#[must_use = "a write is acknowledged only once its Pending is waited on"]
pub struct Pending<T> {
    value: Option<T>,
    wait: Option<(crate::sync::Arc<WalShared>, u64, Durability)>,
}

impl<T> Pending<T> {
    fn ready(value: T) -> Self {
        Pending {
            value: Some(value),
            wait: None,
        }
    }

    /// Blocks until the write is durable as requested, then returns its result.
    pub fn wait(mut self) -> Result<T> {
        if let Some((wal, lsn, durability)) = self.wait.take() {
            wal.wait(lsn, durability)?;
        }
        Ok(self.value.take().expect("a Pending yields its value once"))
    }
}

impl<T: Unpin> Future for Pending<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = &mut *self;
        if let Some((wal, lsn, durability)) = &this.wait {
            match wal.poll(*lsn, *durability, cx.waker()) {
                Ok(true) => this.wait = None,
                Ok(false) => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(this
            .value
            .take()
            .expect("Pending polled after completion")))
    }
}

/// What recovery did when the store was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// LSN of the snapshot loaded (0 if none).
    pub snapshot_lsn: u64,
    /// WAL segments read.
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Bytes cut from a torn last record.
    pub bytes_truncated: u64,
    /// Whole records after the torn tail's damage, discarded with it (a batch that was never
    /// fdatasynced and reached the disk with a hole; see `TornTail::records_discarded`).
    pub records_discarded: u64,
    /// Live keys after recovery.
    pub keys: u64,
    /// LSN of the last record replayed.
    pub last_lsn: u64,
    /// Wall time spent.
    pub duration: Duration,
}

/// A point-in-time view of the store's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Entries in memory (live, plus expired ones not yet reclaimed).
    pub keys: u64,
    /// Accounted bytes: keys, values and per-entry overhead.
    pub memory_bytes: u64,
    /// Bytes in WAL segments.
    pub wal_bytes: u64,
    /// Number of WAL segments.
    pub wal_segments: u64,
    /// fdatasync calls on the WAL since open.
    pub wal_fsyncs: u64,
    /// Newest durable LSN.
    pub durable_lsn: u64,
    /// Keys reclaimed by the active expirer since open.
    pub expired_reclaimed: u64,
    /// The configured memory limit, if any.
    pub max_memory: Option<u64>,
    /// Keys evicted to stay under the memory limit since open.
    pub evictions: u64,
    /// What recovery did (`None` for memory-only stores).
    pub recovery: Option<RecoveryReport>,
    /// Snapshots taken since open.
    pub snapshots: u64,
    /// The most recent snapshot taken since open.
    pub last_snapshot: Option<SnapshotReport>,
    /// True if an I/O failure poisoned the store.
    pub poisoned: bool,
    /// Times a write found the WAL queue over its 64 MiB budget and waited (a blocking
    /// writer on a condvar, an async one in `Db::writable`) since open.
    pub backpressure_waits: u64,
}

/// Result of [`Db::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Every snapshot checked, newest first.
    pub snapshots: Vec<(PathBuf, SnapshotHeader)>,
    /// What the WAL scan (from the newest snapshot on) found; a torn tail is reported, not an
    /// error.
    pub wal: WalScan,
}

struct Core {
    index: Index,
    wal: Option<Wal>,
    clock: MonotonicClock,
    limits: Limits,
    memory_bytes: AtomicU64,
    expired_reclaimed: AtomicU64,
    recovery: Option<RecoveryReport>,
    expire_scan_per_shard: usize,
    disk: Option<Disk>,
    max_memory: Option<u64>,
    eviction: EvictionPolicy,
    evictions: AtomicU64,
    /// Next shard eviction looks at after the writer's own.
    evict_shard_cursor: AtomicU64,
    /// The clock reading (ms) that `Slot::touched` counts from.
    touch_base_ms: u64,
    /// Rings the maintenance thread (a snapshot is overdue and an async writer waits for it).
    maintenance_kick: Sender<()>,
    /// Async writers waiting for an overdue snapshot (`Writable`), woken after every
    /// snapshot attempt of the maintenance thread and at close.
    snapshot_wakers: Mutex<Vec<Waker>>,
    /// Snapshot attempts the maintenance thread finished since open.
    snapshot_attempts: AtomicU64,
    /// Set when the store starts closing (`Writable` then fails with `Closed`).
    closing: std::sync::atomic::AtomicBool,
    /// The latest expiry (Unix ms) that a read, a write or the expirer found passed: the clock
    /// floor must reach the disk at least this far so the key cannot come back after a restart
    /// with the clock behind.
    expired_seen_ms: AtomicU64,
    /// Test hook: runs in every single-key write after its input checks, before it takes the
    /// key's shard lock (where a preempted writer would be).
    #[cfg(test)]
    before_shard_lock: Mutex<Option<WriteHook>>,
}

/// A test hook called with the key of a write (see `Core::before_shard_lock`).
#[cfg(test)]
type WriteHook = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// What only an on-disk store has.
struct Disk {
    dir: PathBuf,
    storage: Arc<dyn Storage>,
    snapshot_after_bytes: u64,
    /// Held while a snapshot is taken: one at a time.
    compaction: Mutex<()>,
    /// WAL bytes appended (since open) when the last snapshot started.
    appended_at_last: AtomicU64,
    /// (snapshots taken since open, the latest report), apart so `stats` never waits for a
    /// running compaction.
    reports: Mutex<(u64, Option<SnapshotReport>)>,
    /// The clock floor known to be on disk (Unix ms): the newest record time, snapshot time or
    /// clean-close floor recovered, raised by `Core::persist_floor`.
    durable_floor_ms: AtomicU64,
    _lock: Box<dyn DirLock>,
}

/// What one snapshot (compaction) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The snapshot holds every record up to this LSN.
    pub lsn: u64,
    /// Entries written.
    pub entries: u64,
    /// WAL segments deleted because the snapshot covers them.
    pub segments_deleted: u64,
    /// Wall time spent.
    pub duration: Duration,
}

struct Inner {
    core: Arc<Core>,
    expirer: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    /// Set by the first shutdown that closed the WAL cleanly (it writes the marker once).
    marked_clean: std::sync::atomic::AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) -> Result<()> {
        self.core.closing.store(true, Ordering::Release);
        self.core.wake_snapshot_waiters();
        if let Some((stop, handle)) = self.expirer.lock().take() {
            drop(stop);
            let _ = handle.join();
        }
        match &self.core.wal {
            Some(wal) => {
                wal.shutdown()?;
                if !self.marked_clean.swap(true, Ordering::AcqRel) {
                    self.core.mark_clean_close();
                }
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// The embedded store. Cheap to clone: clones share one store. The store closes (flushing and
/// syncing the WAL) when the last clone is dropped, or explicitly with [`Db::close`].
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
    durability: Durability,
    /// Writes through this handle never wait in backpressure (see `Db::for_async`).
    nonblocking: bool,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("durability", &self.durability)
            .field("disk", &self.inner.core.wal.is_some())
            .finish_non_exhaustive()
    }
}

fn ttl_ms(ttl: Duration) -> Result<u64> {
    // Sub-millisecond TTLs round up, so any positive TTL is at least 1 ms.
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    if ms == 0 || ttl > TTL_MAX {
        return Err(Error::InvalidTtl {
            ttl_ms: ms,
            max_ms: TTL_MAX.as_millis() as u64,
        });
    }
    Ok(ms as u64)
}

/// The state change an operation makes to its key.
enum Change {
    None,
    Put {
        value: Box<[u8]>,
        expires_at_ms: u64,
    },
    Delete,
    Expire {
        expires_at_ms: u64,
    },
}

impl Db {
    /// A store with no files at all: everything lives in memory and is gone when the last
    /// clone is dropped. Durability settings do not apply.
    ///
    /// # Panics
    /// If the operating system refuses to start the store's maintenance thread (it cannot run
    /// without one; `Db::open` returns that as an error instead).
    pub fn memory(options: Options) -> Db {
        let index = Index::new(
            options.shards,
            options.eviction == EvictionPolicy::AllKeysLru,
        );
        let clock = MonotonicClock::new(Arc::clone(&options.clock));
        Db::assemble(index, None, clock, &options, (0, 0), None, None)
            .expect("the OS refused to start keel's maintenance thread")
    }

    fn assemble(
        index: Index,
        wal: Option<Wal>,
        clock: MonotonicClock,
        options: &Options,
        (memory, expired_seen_ms): (u64, u64),
        recovery: Option<RecoveryReport>,
        disk: Option<Disk>,
    ) -> Result<Db> {
        let touch_base_ms = clock.now_ms();
        let (kick_tx, kick_rx) = bounded::<()>(1);
        let core = Arc::new(Core {
            index,
            wal,
            clock,
            limits: options.limits,
            memory_bytes: AtomicU64::new(memory),
            expired_reclaimed: AtomicU64::new(0),
            recovery,
            expire_scan_per_shard: options.expire_scan_per_shard,
            disk,
            max_memory: options.max_memory,
            eviction: options.eviction,
            evictions: AtomicU64::new(0),
            evict_shard_cursor: AtomicU64::new(0),
            touch_base_ms,
            expired_seen_ms: AtomicU64::new(expired_seen_ms),
            maintenance_kick: kick_tx,
            snapshot_wakers: Mutex::new(Vec::new()),
            snapshot_attempts: AtomicU64::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            before_shard_lock: Mutex::new(None),
        });
        let (stop_tx, stop_rx) = bounded::<()>(0);
        let expirer_core = Arc::clone(&core);
        let interval = options.expire_interval;
        let handle = std::thread::Builder::new()
            .name("keel-maintenance".into())
            .spawn(move || maintenance::run(&expirer_core, &stop_rx, &kick_rx, interval))?;
        Ok(Db {
            inner: Arc::new(Inner {
                core,
                expirer: Mutex::new(Some((stop_tx, handle))),
                marked_clean: std::sync::atomic::AtomicBool::new(false),
            }),
            durability: options.durability,
            nonblocking: false,
        })
    }

    /// Writes a snapshot of every live entry now and deletes the WAL segments and older
    /// snapshots it covers. Reads and writes continue while it runs (each shard is held for
    /// the time it takes to copy it). Memory-only stores return `Ok(None)`.
    ///
    /// # Errors
    /// I/O errors writing the snapshot (the store stays usable and the WAL keeps everything);
    /// `Poisoned` if the WAL cannot be made durable.
    pub fn compact(&self) -> Result<Option<SnapshotReport>> {
        self.core().compact_when(|_| true)
    }

    /// A handle to the same store whose writes use `durability` instead of the store default:
    /// e.g. a fencing counter that must be durable even when the store runs `Periodic`.
    pub fn with_durability(&self, durability: Durability) -> Db {
        Db {
            inner: Arc::clone(&self.inner),
            durability,
            nonblocking: self.nonblocking,
        }
    }

    /// A handle to the same store for async callers: its writes never block the calling
    /// thread. They skip the two waits a write may otherwise do before it is applied (for the
    /// WAL queue to drain under its 64 MiB budget, and for an overdue snapshot, which a
    /// blocking writer takes itself); instead, await [`Db::writable`] before each write, which
    /// waits for both without blocking (the overdue snapshot is taken by the maintenance
    /// thread). What is left on the calling thread are short shard-lock and queue-mutex holds.
    pub fn for_async(&self) -> Db {
        Db {
            inner: Arc::clone(&self.inner),
            durability: self.durability,
            nonblocking: true,
        }
    }

    /// Resolves once a write can be submitted without exceeding the store's backpressure
    /// bounds: the WAL queue is under its byte budget, and no snapshot is overdue (or the
    /// maintenance thread has finished an attempt at it since this future was first polled).
    /// A `Future` woken by the WAL writer and the maintenance thread: it never blocks.
    ///
    /// # Errors
    /// `Poisoned` if an I/O failure poisoned the store, `Closed` once it is closing.
    pub fn writable(&self) -> Writable {
        Writable {
            db: self.clone(),
            attempts_at_start: None,
        }
    }

    /// The durability this handle's writes use.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// True if this store keeps no files.
    pub fn is_memory(&self) -> bool {
        self.inner.core.wal.is_none()
    }

    /// Flushes and fsyncs the WAL and stops the background threads. Other clones of this
    /// handle see [`Error::Closed`] on writes afterwards.
    ///
    /// # Errors
    /// [`Error::Poisoned`] if an earlier I/O failure means some writes may not be on disk.
    pub fn close(self) -> Result<()> {
        self.inner.shutdown()
    }

    fn core(&self) -> &Core {
        &self.inner.core
    }

    /// The store's current time in Unix milliseconds (never decreasing).
    pub fn now_ms(&self) -> u64 {
        self.core().clock.now_ms()
    }

    // ----- reads -------------------------------------------------------------------------

    /// Counters and sizes.
    pub fn stats(&self) -> Stats {
        let core = self.core();
        let keys = (0..core.index.shard_count())
            .map(|i| core.index.shard(i).read().map.len() as u64)
            .sum();
        let (wal_bytes, wal_segments, wal_fsyncs, durable_lsn, poisoned) = match &core.wal {
            Some(w) => {
                let (b, s, f, d) = w.shared().stats();
                (b, s, f, d, w.shared().is_poisoned())
            }
            None => (0, 0, 0, 0, false),
        };
        Stats {
            keys,
            memory_bytes: core.memory_bytes.load(Ordering::Relaxed),
            wal_bytes,
            wal_segments,
            wal_fsyncs,
            durable_lsn,
            expired_reclaimed: core.expired_reclaimed.load(Ordering::Relaxed),
            max_memory: core.max_memory,
            evictions: core.evictions.load(Ordering::Relaxed),
            recovery: core.recovery.clone(),
            snapshots: core.disk.as_ref().map_or(0, |d| d.reports.lock().0),
            last_snapshot: core.disk.as_ref().and_then(|d| d.reports.lock().1.clone()),
            poisoned,
            backpressure_waits: core
                .wal
                .as_ref()
                .map_or(0, |w| w.shared().backpressure_waits()),
        }
    }

    // ----- writes ------------------------------------------------------------------------
}

/// The on-disk path of a store's lock file.
pub fn lock_path(dir: &Path) -> PathBuf {
    join(dir, LOCK_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Barrier;

    const T0: u64 = 1_700_000_000_000;

    /// A store on a manual clock whose active expirer never ticks during a test (so only the
    /// operations under test touch the keys).
    fn open_manual(dir: &Path, clock: &ManualClock) -> Db {
        let options = Options::default()
            .clock(Arc::new(clock.clone()))
            .active_expiry(Duration::from_secs(3600), 256);
        Db::open(dir, options).unwrap()
    }

    /// Arms the hook: the first write to `key` stops before its shard lock, signals `reached`
    /// and waits for `release`.
    fn park_first_write_to(db: &Db, key: &'static [u8]) -> (Arc<Barrier>, Arc<Barrier>) {
        let reached = Arc::new(Barrier::new(2));
        let release = Arc::new(Barrier::new(2));
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (r, l) = (Arc::clone(&reached), Arc::clone(&release));
        *db.core().before_shard_lock.lock() = Some(Arc::new(move |k: &[u8]| {
            if k == key && armed.swap(false, Ordering::SeqCst) {
                r.wait();
                l.wait();
            }
        }));
        (reached, release)
    }

    /// Issue 16, item 1: a `persist` that started before the key expired, and reaches the
    /// key's shard only after a snapshot left the (by then expired) key out, must not be
    /// acknowledged as having persisted it: after a restart the key would be gone.
    #[test]
    fn a_persist_racing_a_snapshot_is_never_acknowledged_and_then_lost() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let db = open_manual(dir.path(), &clock);
        db.set("session", "v", Some(Duration::from_secs(10)))
            .unwrap();
        clock.advance(Duration::from_secs(5));
        let (reached, release) = park_first_write_to(&db, b"session");
        let writer = {
            let db = db.clone();
            std::thread::spawn(move || db.persist("session").unwrap())
        };
        reached.wait();
        // The key expires while the persist is on its way to the shard lock, and a snapshot
        // taken now leaves it out.
        clock.advance(Duration::from_secs(10));
        let report = db.compact().unwrap().unwrap();
        assert_eq!(report.entries, 0, "the expired key is not in the snapshot");
        release.wait();
        let persisted = writer.join().unwrap();
        db.close().unwrap();
        let db = open_manual(dir.path(), &clock);
        let present = db.get("session").is_some();
        assert_eq!(
            (persisted, present),
            (false, false),
            "persist acknowledged {persisted}, key present after reopen: {present}"
        );
    }

    /// Issue 16, item 1: an `expire` that reaches the shard after a reader saw the key expired
    /// must not bring it back with a new TTL.
    #[test]
    fn an_expire_decided_on_a_stale_now_does_not_revive_an_expired_key() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let db = open_manual(dir.path(), &clock);
        db.set("k", "v", Some(Duration::from_secs(10))).unwrap();
        clock.advance(Duration::from_secs(5));
        let (reached, release) = park_first_write_to(&db, b"k");
        let writer = {
            let db = db.clone();
            std::thread::spawn(move || db.expire("k", Duration::from_secs(20)).unwrap())
        };
        reached.wait();
        clock.advance(Duration::from_secs(10));
        assert_eq!(db.get("k"), None, "the key has expired");
        release.wait();
        let extended = writer.join().unwrap();
        assert!(
            !extended,
            "expire acknowledged on a key already observed expired"
        );
        assert_eq!(db.get("k"), None);
        assert_eq!(db.ttl("k"), Ttl::Missing);
    }

    #[test]
    fn ttl_rounds_up_and_rejects_zero_and_huge() {
        assert_eq!(ttl_ms(Duration::from_micros(1)).unwrap(), 1);
        assert_eq!(ttl_ms(Duration::from_millis(1500)).unwrap(), 1500);
        assert!(matches!(
            ttl_ms(Duration::ZERO),
            Err(Error::InvalidTtl { .. })
        ));
        assert!(matches!(
            ttl_ms(TTL_MAX + Duration::from_millis(1)),
            Err(Error::InvalidTtl { .. })
        ));
        assert!(ttl_ms(TTL_MAX).is_ok());
    }
}
