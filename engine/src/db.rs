//! [`Db`]: the store. Every operation is atomic per key: it runs under the key's shard lock,
//! reads "now" once, computes the key's next state, appends that after-image to the WAL and
//! installs it in memory before the lock is released. It then waits, with no lock held, until
//! the record reaches the durability the caller asked for.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use parking_lot::Mutex;

use crate::clock::MonotonicClock;
use crate::error::{Error, Result};
use crate::index::{Index, Shard, Slot, TOUCH_UNIT_MS, entry_bytes};
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
    /// Opens (creating if needed) the store in `dir`, recovering from its WAL.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] if `options` fail [`Options::validate`] (nothing is touched);
    /// [`Error::Locked`] if another `Db` has `dir` open; [`Error::Corruption`] if the WAL is
    /// damaged other than by a torn last write (nothing is modified then); [`Error::Io`].
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Db> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let storage = Arc::clone(&options.storage);
        if !options.create_if_missing && !is_store(&*storage, &dir) {
            return Err(Error::NotAStore { path: dir });
        }
        let existed = storage.list(&dir).is_ok();
        storage.create_dir_all(&dir)?;
        if !existed && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // fsync the parent so a brand-new store directory survives power loss.
            storage.sync_dir(parent)?;
        }
        let lock_path = join(&dir, LOCK_FILE);
        let deadline = Instant::now() + options.lock_wait;
        let lock = loop {
            match storage.lock(&lock_path) {
                Ok(lock) => break lock,
                Err(LockError::Held { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(LockError::Held { pid }) => {
                    return Err(Error::Locked {
                        path: dir.clone(),
                        pid,
                    });
                }
                Err(LockError::Io(e)) => return Err(Error::Io(e)),
            }
        };
        let started = Instant::now();
        let index = Index::new(options.shards);
        let clock = MonotonicClock::new(Arc::clone(&options.clock));
        let mut memory = 0u64;
        for tmp in snapshot::list_tmp(&*storage, &dir)? {
            // A snapshot interrupted before its rename: never installed, never needed.
            storage.remove(&tmp)?;
        }
        for name in storage.list(&dir)? {
            if name.ends_with(wal::REWRITE_SUFFIX) || name == marker::MARKER_TMP_FILE {
                // A segment rewrite (or a clean-close marker) interrupted before its rename:
                // the original is intact.
                storage.remove(&join(&dir, &name))?;
            }
        }
        // The earliest expiry replayed: if it has passed by the end of replay, expired entries
        // must be dropped (one pass over the index); otherwise that pass is skipped.
        let mut earliest_expiry = u64::MAX;
        // A clean close recorded the clock then: a clock now behind it must not revive keys.
        let clean = marker::read(&*storage, &dir);
        if let Some(m) = &clean {
            clock.raise_floor(m.floor_ms);
        }
        let snap = snapshot::load_newest(&*storage, &dir, |key, value, expires_at_ms| {
            let entry = Entry::Put {
                key,
                value,
                expires_at_ms: (expires_at_ms != 0).then_some(expires_at_ms),
            };
            if expires_at_ms != 0 {
                earliest_expiry = earliest_expiry.min(expires_at_ms);
            }
            memory = apply_replayed(&index, &entry, memory);
        })?;
        let snapshot_lsn = snap.as_ref().map_or(0, |(h, _)| h.lsn);
        if let Some((h, _)) = &snap {
            clock.raise_floor(h.time_ms);
        }
        let scan = wal::scan(&*storage, &dir, snapshot_lsn + 1, |_lsn, _time, entries| {
            for entry in entries {
                if let Entry::Put {
                    expires_at_ms: Some(at),
                    ..
                }
                | Entry::Expire {
                    expires_at_ms: Some(at),
                    ..
                } = entry
                {
                    earliest_expiry = earliest_expiry.min(*at);
                }
                memory = apply_replayed(&index, entry, memory);
            }
        })?;
        clock.raise_floor(scan.max_time_ms);
        let durable_floor_ms = [
            clean.map_or(0, |m| m.floor_ms),
            snap.as_ref().map_or(0, |(h, _)| h.time_ms),
            scan.max_time_ms,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let now = clock.now_ms();
        let mut expired_seen_ms = 0;
        if earliest_expiry <= now {
            memory = purge_expired(&index, now, memory);
            // Dropped as expired at `now`: the floor must reach the disk past their expiry.
            expired_seen_ms = now;
        }
        let mut bytes_truncated = 0;
        let mut segments = wal::list_segments(&*storage, &dir)?;
        if let Some(torn) = &scan.torn_tail {
            bytes_truncated = torn.torn_bytes;
            if torn.header_torn {
                // The crash hit while the segment was being created: it holds no record.
                storage.remove(&torn.file)?;
                storage.sync_dir(&dir)?;
                segments.pop();
            } else {
                let mut file = storage.open_append(&torn.file)?;
                file.truncate(torn.valid_len)?;
                file.sync_data()?;
            }
        }
        let next_lsn = scan.last_lsn + 1;
        // Fast path: the log is exactly what a clean close left (same last record, same last
        // segment and length, nothing torn), so every byte read was fdatasynced by a store
        // that saw no failure, and the rewrite below has nothing to make durable.
        let closed_cleanly = match (&clean, segments.last()) {
            (Some(m), Some((first, path))) => {
                scan.torn_tail.is_none()
                    && m.last_lsn == scan.last_lsn
                    && m.segment_first_lsn == *first
                    && storage.len(path)? == m.segment_bytes
            }
            _ => false,
        };
        if let Some((_, path)) = segments.last()
            && !closed_cleanly
        {
            rewrite_segment(&*storage, path)?;
        }
        let (file, file_bytes, active_first) = match segments.last() {
            Some((first, path)) => (storage.open_append(path)?, storage.len(path)?, *first),
            None => {
                let path = join(&dir, &wal::segment_name(next_lsn));
                let mut file = storage.create(&path)?;
                let header = record::encode_segment_header(next_lsn);
                file.write_all(&header)?;
                file.sync_data()?;
                // fsync the directory so the new segment's name survives power loss.
                storage.sync_dir(&dir)?;
                segments.push((next_lsn, path));
                (file, header.len() as u64, next_lsn)
            }
        };
        // fsync the directory: the segment this store appends to may have been created (or
        // rewritten) by an earlier open whose directory fsync never happened or failed; its
        // name must be durable before any write in it is acknowledged.
        storage.sync_dir(&dir)?;
        let mut wal_bytes = 0;
        for (_, path) in &segments {
            wal_bytes += storage.len(path)?;
        }
        let periodic = match options.durability {
            Durability::Periodic(iv) => Some(iv),
            _ => None,
        };
        let wal = Wal::start(WalStart {
            storage: Arc::clone(&storage),
            dir: dir.clone(),
            file,
            file_bytes,
            next_lsn,
            wal_bytes,
            segments: segments.len() as u64,
            segment_bytes: options.wal_segment_bytes,
            periodic,
            active_first_lsn: active_first,
            queue_bytes_max: options.wal_queue_bytes,
        })?;
        let keys = (0..index.shard_count())
            .map(|i| index.shard(i).read().map.len() as u64)
            .sum();
        let recovery = RecoveryReport {
            snapshot_lsn,
            segments: scan.segments,
            records: scan.records,
            bytes_truncated,
            keys,
            last_lsn: scan.last_lsn,
            duration: started.elapsed(),
        };
        tracing::debug!(
            snapshot_lsn,
            segments = recovery.segments,
            records = recovery.records,
            bytes_truncated,
            keys,
            closed_cleanly,
            duration_ms = recovery.duration.as_millis() as u64,
            "keel-engine: recovered"
        );
        let disk = Disk {
            dir,
            storage,
            snapshot_after_bytes: options.snapshot_after_wal_bytes,
            compaction: Mutex::new(()),
            appended_at_last: AtomicU64::new(0),
            reports: Mutex::new((0, None)),
            durable_floor_ms: AtomicU64::new(durable_floor_ms),
            _lock: lock,
        };
        let db = Db::assemble(
            index,
            Some(wal),
            clock,
            &options,
            (memory, expired_seen_ms),
            Some(recovery),
            Some(disk),
        )?;
        // Delete what an interrupted compaction may have left: older snapshots and covered
        // segments.
        db.core().truncate_covered(snapshot_lsn)?;
        Ok(db)
    }

    /// A store with no files at all: everything lives in memory and is gone when the last
    /// clone is dropped. Durability settings do not apply.
    ///
    /// # Panics
    /// If the operating system refuses to start the store's maintenance thread (it cannot run
    /// without one; `Db::open` returns that as an error instead).
    pub fn memory(options: Options) -> Db {
        let index = Index::new(options.shards);
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
            .spawn(move || {
                let core = expirer_core;
                let mut floor_synced: Option<Instant> = None;
                let mut next_tick = Instant::now() + interval;
                loop {
                    let wait = next_tick.saturating_duration_since(Instant::now());
                    // Runs until the stop sender is dropped (store closing). A kick (an async
                    // writer waiting for an overdue snapshot) only runs the snapshot check.
                    crossbeam_channel::select! {
                        recv(stop_rx) -> _ => break,
                        recv(kick_rx) -> _ => {}
                        default(wait) => {}
                    }
                    if Instant::now() >= next_tick {
                        core.expire_tick();
                        core.persist_floor(&mut floor_synced);
                        next_tick = Instant::now() + interval;
                    }
                    if core.snapshot_due() {
                        // A failure poisons nothing: the WAL still holds everything, and the
                        // next tick tries again. Callers see errors through `Db::compact`.
                        let _ = core.compact_when(Core::snapshot_due);
                        core.snapshot_attempts.fetch_add(1, Ordering::AcqRel);
                    }
                    core.wake_snapshot_waiters();
                }
                core.wake_snapshot_waiters();
            })?;
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

    /// Checks every WAL segment's checksums in `dir` without modifying anything and without
    /// taking the lock. A torn last record is reported in the result; real damage is an error.
    ///
    /// # Errors
    /// [`Error::NotAStore`] if `dir` holds no WAL segment or snapshot; [`Error::Corruption`]
    /// naming the file and offset; [`Error::Io`].
    pub fn verify(dir: impl AsRef<Path>, storage: &dyn Storage) -> Result<VerifyReport> {
        let dir = dir.as_ref();
        if !is_store(storage, dir) {
            return Err(Error::NotAStore {
                path: dir.to_path_buf(),
            });
        }
        let mut snapshots = Vec::new();
        for (_, path) in snapshot::list(storage, dir)? {
            let bytes = storage.read(&path)?;
            let header = snapshot::decode(&bytes, |_, _, _| {})
                .map_err(|e| Error::corruption(&path, 0, format!("snapshot is damaged: {e:?}")))?;
            snapshots.push((path, header));
        }
        let from = snapshots.first().map_or(0, |(_, h)| h.lsn) + 1;
        let wal = wal::scan(storage, dir, from, |_, _, _| {})?;
        Ok(VerifyReport { snapshots, wal })
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

    /// The value of `key`, if it exists and has not expired.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        self.get_with_ttl(key).map(|(v, _)| v)
    }

    /// The value of `key` with its remaining TTL (`None`: no expiry).
    pub fn get_with_ttl(&self, key: impl AsRef<[u8]>) -> Option<(Vec<u8>, Option<Duration>)> {
        let key = key.as_ref();
        let core = self.core();
        let now = core.clock.now_ms();
        let shard = core.index.shard(core.index.shard_of(key)).read();
        let slot = shard.map.get(key)?;
        if !slot.is_live(now) {
            core.saw_expired(slot.expires_at_ms);
            return None;
        }
        if core.eviction == EvictionPolicy::AllKeysLru {
            slot.touch(core.touch_at(now));
        }
        let ttl = slot.expiry().map(|at| Duration::from_millis(at - now));
        Some((slot.value.to_vec(), ttl))
    }

    /// Whether `key` exists, and if so its remaining time to live.
    pub fn ttl(&self, key: impl AsRef<[u8]>) -> Ttl {
        let key = key.as_ref();
        let core = self.core();
        let now = core.clock.now_ms();
        let shard = core.index.shard(core.index.shard_of(key)).read();
        let slot = shard.map.get(key);
        if let Some(expired) = slot.filter(|s| !s.is_live(now)) {
            core.saw_expired(expired.expires_at_ms);
        }
        match slot.filter(|s| s.is_live(now)) {
            None => Ttl::Missing,
            Some(slot) => match slot.expiry() {
                None => Ttl::NoExpiry,
                Some(at) => Ttl::Remaining(Duration::from_millis(at - now)),
            },
        }
    }

    /// One page of the live keys starting with `prefix`, in ascending byte order, after
    /// `cursor` (start with `None`). `limit` is capped at [`SCAN_LIMIT_MAX`] (and at least 1).
    ///
    /// Guarantee: a key that exists for the whole scan is returned exactly once; a key created
    /// or deleted during the scan may or may not be returned.
    pub fn scan(
        &self,
        prefix: impl AsRef<[u8]>,
        cursor: Option<&ScanCursor>,
        limit: usize,
        with_values: bool,
    ) -> ScanPage {
        let limit = limit.clamp(1, SCAN_LIMIT_MAX);
        let core = self.core();
        let now = core.clock.now_ms();
        let found = core.index.scan(
            prefix.as_ref(),
            cursor.map(|c| c.0.as_slice()),
            limit,
            now,
            with_values,
        );
        let next = (found.len() == limit).then(|| ScanCursor(found[limit - 1].0.clone()));
        ScanPage {
            entries: found
                .into_iter()
                .map(|(key, value, expires_at_ms)| ScanEntry {
                    key,
                    value,
                    expires_at_ms,
                })
                .collect(),
            next,
        }
    }

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

    /// Sets `key` to `value`, replacing any value and TTL; expires after `ttl` if given.
    ///
    /// # Errors
    /// `KeyTooLarge`, `ValueTooLarge`, `InvalidTtl` (nothing written); `Poisoned`, `Closed`,
    /// `Io` from the WAL.
    pub fn set(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.submit(Op::Set {
            key: key.as_ref(),
            value: value.as_ref(),
            ttl,
        })?
        .wait()
        .map(|_| ())
    }

    /// Sets `key` only if it is absent or expired. Returns whether it was set.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn set_nx(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        self.submit(Op::SetNx {
            key: key.as_ref(),
            value: value.as_ref(),
            ttl,
        })?
        .wait()
        .map(outcome_bool)
    }

    /// Replaces the value of `key` with `new` only if it currently equals `expected`
    /// (`None`: only if the key is absent or expired). Returns whether it swapped. The TTL
    /// follows `ttl`.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expected: Option<&[u8]>,
        new: impl AsRef<[u8]>,
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.submit(Op::CompareAndSwap {
            key: key.as_ref(),
            expected,
            new: new.as_ref(),
            ttl,
        })?
        .wait()
        .map(outcome_bool)
    }

    /// Deletes `key` only if its value equals `expected`. Returns whether it deleted.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn compare_and_delete(
        &self,
        key: impl AsRef<[u8]>,
        expected: impl AsRef<[u8]>,
    ) -> Result<bool> {
        self.submit(Op::CompareAndDelete {
            key: key.as_ref(),
            expected: expected.as_ref(),
        })?
        .wait()
        .map(outcome_bool)
    }

    /// Deletes `key`. Returns whether a live key was deleted.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.submit(Op::Delete { key: key.as_ref() })?
            .wait()
            .map(outcome_bool)
    }

    /// Adds `delta` to the integer at `key` (a missing key counts as 0) and returns the new
    /// value. `ttl_on_create` is stamped only when this call creates the key; an existing
    /// key's TTL is never changed.
    ///
    /// # Errors
    /// `NotAnInteger` if the value is not a decimal i64 in Redis's grammar, `Overflow` if the
    /// result does not fit an i64 (both leave the value unchanged); `InvalidTtl`; as
    /// [`Db::set`].
    pub fn incr(
        &self,
        key: impl AsRef<[u8]>,
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        match self
            .submit(Op::Incr {
                key: key.as_ref(),
                delta,
                ttl_on_create,
            })?
            .wait()?
        {
            Outcome::Int(n) => Ok(n),
            other => unreachable!("incr yields Int, got {other:?}"),
        }
    }

    /// Sets the TTL of an existing key. Returns false if the key is missing.
    ///
    /// # Errors
    /// `InvalidTtl`; as [`Db::set`].
    pub fn expire(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<bool> {
        self.submit(Op::Expire {
            key: key.as_ref(),
            ttl,
        })?
        .wait()
        .map(outcome_bool)
    }

    /// Removes the TTL of a key. Returns true if the key exists and had a TTL.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn persist(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.submit(Op::Persist { key: key.as_ref() })?
            .wait()
            .map(outcome_bool)
    }

    /// Applies every operation of `batch` or none: in memory (no reader sees part of it) and on
    /// disk (one WAL record).
    ///
    /// # Errors
    /// `BatchTooLarge`, and any per-key error of [`Db::set`]; nothing is written then.
    pub fn write_batch(&self, batch: &Batch) -> Result<()> {
        self.submit(Op::Batch(batch))?.wait().map(|_| ())
    }

    /// Applies `op` in memory, queues its WAL record, and returns without waiting for
    /// durability. `.wait()` or `.await` the result to get the acknowledgement: the write is
    /// acknowledged only then.
    ///
    /// # Errors
    /// Input errors, `Poisoned` and `Closed` are returned here, before anything is applied.
    pub fn submit(&self, op: Op<'_>) -> Result<Pending<Outcome>> {
        match op {
            Op::Set { key, value, ttl } => {
                self.check_value(value)?;
                let ttl = ttl.map(ttl_ms).transpose()?;
                self.mutate(key, |_, now| {
                    let expires_at_ms = ttl.map_or(0, |t| now.saturating_add(t));
                    Ok((
                        Change::Put {
                            value: value.into(),
                            expires_at_ms,
                        },
                        Outcome::Unit,
                    ))
                })
            }
            Op::SetNx { key, value, ttl } => {
                self.check_value(value)?;
                let ttl = ttl.map(ttl_ms).transpose()?;
                self.mutate(key, |current, now| {
                    if current.is_some() {
                        return Ok((Change::None, Outcome::Bool(false)));
                    }
                    let expires_at_ms = ttl.map_or(0, |t| now.saturating_add(t));
                    Ok((
                        Change::Put {
                            value: value.into(),
                            expires_at_ms,
                        },
                        Outcome::Bool(true),
                    ))
                })
            }
            Op::CompareAndSwap {
                key,
                expected,
                new,
                ttl,
            } => {
                self.check_value(new)?;
                let set_ms = match ttl {
                    TtlPolicy::Set(t) => Some(ttl_ms(t)?),
                    TtlPolicy::Keep | TtlPolicy::Clear => None,
                };
                self.mutate(key, |current, now| {
                    let matches = match (current, expected) {
                        (None, None) => true,
                        (Some(slot), Some(exp)) => &*slot.value == exp,
                        _ => false,
                    };
                    if !matches {
                        return Ok((Change::None, Outcome::Bool(false)));
                    }
                    let expires_at_ms = match (ttl, set_ms) {
                        (TtlPolicy::Keep, _) => current.map_or(0, |s| s.expires_at_ms),
                        (_, Some(ms)) => now.saturating_add(ms),
                        (_, None) => 0,
                    };
                    Ok((
                        Change::Put {
                            value: new.into(),
                            expires_at_ms,
                        },
                        Outcome::Bool(true),
                    ))
                })
            }
            Op::CompareAndDelete { key, expected } => self.mutate(key, |current, _| {
                Ok(match current {
                    Some(slot) if &*slot.value == expected => (Change::Delete, Outcome::Bool(true)),
                    _ => (Change::None, Outcome::Bool(false)),
                })
            }),
            Op::Delete { key } => self.mutate(key, |current, _| {
                Ok(match current {
                    Some(_) => (Change::Delete, Outcome::Bool(true)),
                    None => (Change::None, Outcome::Bool(false)),
                })
            }),
            Op::Incr {
                key,
                delta,
                ttl_on_create,
            } => {
                let ttl = ttl_on_create.map(ttl_ms).transpose()?;
                self.mutate(key, |current, now| {
                    let (base, expires_at_ms) = match current {
                        Some(slot) => (
                            parse_i64(&slot.value).ok_or(Error::NotAnInteger)?,
                            slot.expires_at_ms,
                        ),
                        None => (0, ttl.map_or(0, |t| now.saturating_add(t))),
                    };
                    let next = base.checked_add(delta).ok_or(Error::Overflow)?;
                    Ok((
                        Change::Put {
                            value: next.to_string().into_bytes().into_boxed_slice(),
                            expires_at_ms,
                        },
                        Outcome::Int(next),
                    ))
                })
            }
            Op::Expire { key, ttl } => {
                let ttl = ttl_ms(ttl)?;
                self.mutate(key, |current, now| {
                    Ok(match current {
                        Some(_) => (
                            Change::Expire {
                                expires_at_ms: now.saturating_add(ttl),
                            },
                            Outcome::Bool(true),
                        ),
                        None => (Change::None, Outcome::Bool(false)),
                    })
                })
            }
            Op::Persist { key } => self.mutate(key, |current, _| {
                Ok(match current {
                    Some(slot) if slot.expires_at_ms != 0 => {
                        (Change::Expire { expires_at_ms: 0 }, Outcome::Bool(true))
                    }
                    _ => (Change::None, Outcome::Bool(false)),
                })
            }),
            Op::Batch(batch) => self.apply_batch(batch),
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        let max = self.core().limits.max_key_bytes;
        if key.len() > max {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max,
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        let max = self.core().limits.max_value_bytes;
        if value.len() > max {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max,
            });
        }
        Ok(())
    }

    fn before_write(&self) -> Result<()> {
        let core = self.core();
        if let Some(wal) = &core.wal {
            wal.shared().check_poison()?;
            if self.nonblocking {
                // The caller awaited `writable` (or chose not to wait): never block here.
                if core.snapshot_overdue() {
                    let _ = core.maintenance_kick.try_send(());
                }
                return Ok(());
            }
            if core.snapshot_overdue() {
                // Backpressure: the WAL is 4x past its snapshot threshold. Take the snapshot
                // here (no lock held; concurrent writers queue on the compaction mutex and
                // find it done). A failure is left to the maintenance thread to retry: the
                // write itself can still be made durable.
                let _ = core.compact_when(Core::snapshot_overdue);
            }
            wal.shared().throttle();
        }
        Ok(())
    }

    fn pending<T>(&self, value: T, lsn: Option<u64>) -> Pending<T> {
        match (lsn, &self.core().wal) {
            (Some(lsn), Some(wal)) if self.durability != Durability::Buffered => Pending {
                value: Some(value),
                wait: Some((crate::sync::Arc::clone(wal.shared()), lsn, self.durability)),
            },
            _ => Pending::ready(value),
        }
    }

    /// Runs one single-key operation atomically: `decide` sees the key's live slot (if any)
    /// and "now", and returns the change to make and the caller's result.
    fn mutate(
        &self,
        key: &[u8],
        decide: impl FnOnce(Option<&Slot>, u64) -> Result<(Change, Outcome)>,
    ) -> Result<Pending<Outcome>> {
        self.check_key(key)?;
        self.before_write()?;
        let core = self.core();
        #[cfg(test)]
        if let Some(hook) = core.before_shard_lock.lock().clone() {
            hook(key);
        }
        let mut shard = core.index.shard(core.index.shard_of(key)).write();
        // "Now" is read under the shard lock, never before it: a writer preempted on its way
        // here must not decide on a time older than what a snapshot or a reader of this key
        // has already acted on (see DESIGN.md, "Time and expiry").
        let now = core.clock.now_ms();
        let current = shard.map.get(key);
        if let Some(expired) = current.filter(|s| !s.is_live(now)) {
            core.saw_expired(expired.expires_at_ms);
        }
        let (change, outcome) = decide(current.filter(|s| s.is_live(now)), now)?;
        let entry = match &change {
            Change::None => return Ok(Pending::ready(outcome)),
            Change::Put {
                value,
                expires_at_ms,
            } => Entry::Put {
                key,
                value,
                expires_at_ms: (*expires_at_ms != 0).then_some(*expires_at_ms),
            },
            Change::Delete => Entry::Delete { key },
            Change::Expire { expires_at_ms } => Entry::Expire {
                key,
                expires_at_ms: (*expires_at_ms != 0).then_some(*expires_at_ms),
            },
        };
        if let Change::Put { value, .. } = &change {
            let old = shard
                .map
                .get(key)
                .map_or(0, |s| entry_bytes(key.len(), s.value.len()));
            let new = entry_bytes(key.len(), value.len());
            core.make_room(
                Some(&mut shard),
                key,
                new.saturating_sub(old),
                now,
                self.durability,
            )?;
        }
        // WAL first, under the shard lock: if the append is refused nothing changes, and the
        // per-key order of records matches the order of states in memory.
        let lsn = match &core.wal {
            Some(wal) => Some(wal.shared().append(now, &[entry], self.durability)?),
            None => None,
        };
        core.install(&mut shard, key, change);
        drop(shard);
        Ok(self.pending(outcome, lsn))
    }

    /// Reads `keys` and writes some of them, atomically: `decide` sees every key's live value
    /// (or `None`) and "now", all under the keys' shard locks (taken in ascending order, as a
    /// batch takes them), and returns one optional write per key (a value and what happens to
    /// its TTL) with the caller's result. The writes are one WAL record, so they are recovered
    /// all or none; no reader sees some without the others. A read-modify-write over several
    /// keys in one call: the contract's rate-limit step runs on it.
    ///
    /// # Errors
    /// Input errors (a key or value over the limits, a bad TTL), `Poisoned`, `Closed`,
    /// `MemoryLimit`; `decide`'s own error. Nothing is written then.
    ///
    /// # Panics
    /// If `decide` returns a number of writes other than `keys.len()`.
    pub fn update_many<R>(
        &self,
        keys: &[&[u8]],
        decide: impl FnOnce(&[Option<&[u8]>], u64) -> Result<(Vec<Option<(Vec<u8>, TtlPolicy)>>, R)>,
    ) -> Result<Pending<R>> {
        for key in keys {
            self.check_key(key)?;
        }
        self.before_write()?;
        let core = self.core();
        let op_shards: Vec<usize> = keys.iter().map(|k| core.index.shard_of(k)).collect();
        let mut shard_ids = op_shards.clone();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: Vec<_> = shard_ids
            .iter()
            .map(|&i| core.index.shard(i).write())
            .collect();
        let guard_of = |shard_id: &usize| {
            shard_ids
                .binary_search(shard_id)
                .expect("shard was locked above")
        };
        let now = core.clock.now_ms();
        let current: Vec<Option<(&[u8], u64)>> = keys
            .iter()
            .zip(&op_shards)
            .map(|(key, shard_id)| {
                let slot = guards[guard_of(shard_id)].map.get(*key);
                if let Some(expired) = slot.filter(|s| !s.is_live(now)) {
                    core.saw_expired(expired.expires_at_ms);
                }
                slot.filter(|s| s.is_live(now))
                    .map(|s| (&*s.value, s.expires_at_ms))
            })
            .collect();
        let values: Vec<Option<&[u8]>> = current.iter().map(|c| c.map(|(v, _)| v)).collect();
        let (writes, result) = decide(&values, now)?;
        assert_eq!(
            writes.len(),
            keys.len(),
            "update_many: decide must return one optional write per key"
        );
        let mut planned: Vec<(usize, Vec<u8>, u64)> = Vec::new();
        for (i, write) in writes.into_iter().enumerate() {
            let Some((value, ttl)) = write else { continue };
            self.check_value(&value)?;
            let expires_at_ms = match ttl {
                TtlPolicy::Set(t) => now.saturating_add(ttl_ms(t)?),
                TtlPolicy::Keep => current[i].map_or(0, |(_, at)| at),
                TtlPolicy::Clear => 0,
            };
            planned.push((i, value, expires_at_ms));
        }
        drop(current);
        drop(values);
        if planned.is_empty() {
            return Ok(Pending::ready(result));
        }
        let entries: Vec<Entry<'_>> = planned
            .iter()
            .map(|(i, value, expires_at_ms)| Entry::Put {
                key: keys[*i],
                value,
                expires_at_ms: (*expires_at_ms != 0).then_some(*expires_at_ms),
            })
            .collect();
        // The writes are one record: held to the batch limits, so the record always fits the
        // format (`Options::validate` keeps `max_batch_bytes` under its ceiling).
        let bytes = 4 + entries.iter().map(Entry::encoded_len).sum::<usize>();
        let limits = core.limits;
        if entries.len() > limits.max_batch_ops || bytes > limits.max_batch_bytes {
            return Err(Error::BatchTooLarge {
                ops: entries.len(),
                bytes,
                max_ops: limits.max_batch_ops,
                max_bytes: limits.max_batch_bytes,
            });
        }
        if core.max_memory.is_some() {
            let mut growth = 0u64;
            for (i, value, _) in &planned {
                let key = keys[*i];
                let old = guards[guard_of(&op_shards[*i])]
                    .map
                    .get(key)
                    .map_or(0, |s| entry_bytes(key.len(), s.value.len()));
                growth += entry_bytes(key.len(), value.len()).saturating_sub(old);
            }
            // The keys' own shards are locked by this thread: eviction samples the others.
            core.make_room(None, &[], growth, now, self.durability)?;
        }
        let lsn = match &core.wal {
            Some(wal) => Some(wal.shared().append(now, &entries, self.durability)?),
            None => None,
        };
        drop(entries);
        for (i, value, expires_at_ms) in planned {
            let change = Change::Put {
                value: value.into(),
                expires_at_ms,
            };
            core.install(&mut guards[guard_of(&op_shards[i])], keys[i], change);
        }
        drop(guards);
        Ok(self.pending(result, lsn))
    }

    fn apply_batch(&self, batch: &Batch) -> Result<Pending<Outcome>> {
        let core = self.core();
        let limits = core.limits;
        let mut bytes = 4usize;
        let mut ttls = Vec::with_capacity(batch.ops.len());
        for op in &batch.ops {
            match op {
                BatchOp::Set { key, value, ttl } => {
                    self.check_key(key)?;
                    self.check_value(value)?;
                    ttls.push(ttl.map(ttl_ms).transpose()?);
                    bytes += 1 + 2 + key.len() + 8 + 4 + value.len();
                }
                BatchOp::SetAt { key, value, .. } => {
                    self.check_key(key)?;
                    self.check_value(value)?;
                    ttls.push(None);
                    bytes += 1 + 2 + key.len() + 8 + 4 + value.len();
                }
                BatchOp::Delete { key } => {
                    self.check_key(key)?;
                    ttls.push(None);
                    bytes += 1 + 2 + key.len();
                }
            }
        }
        if batch.ops.len() > limits.max_batch_ops || bytes > limits.max_batch_bytes {
            return Err(Error::BatchTooLarge {
                ops: batch.ops.len(),
                bytes,
                max_ops: limits.max_batch_ops,
                max_bytes: limits.max_batch_bytes,
            });
        }
        if batch.is_empty() {
            return Ok(Pending::ready(Outcome::Unit));
        }
        self.before_write()?;
        // Lock every shard the batch touches, in ascending order (no deadlock with another
        // batch), so no reader sees part of it.
        let mut shard_ids: Vec<usize> = batch
            .ops
            .iter()
            .map(|op| match op {
                BatchOp::Set { key, .. } | BatchOp::SetAt { key, .. } | BatchOp::Delete { key } => {
                    core.index.shard_of(key)
                }
            })
            .collect();
        let op_shards = shard_ids.clone();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: Vec<_> = shard_ids
            .iter()
            .map(|&i| core.index.shard(i).write())
            .collect();
        let now = core.clock.now_ms();
        let entries: Vec<Entry<'_>> = batch
            .ops
            .iter()
            .zip(&ttls)
            .map(|(op, ttl)| match op {
                BatchOp::Set { key, value, .. } => Entry::Put {
                    key,
                    value,
                    expires_at_ms: ttl.map(|t| now.saturating_add(t)),
                },
                BatchOp::SetAt {
                    key,
                    value,
                    expires_at_ms,
                } => match expires_at_ms {
                    Some(at) if *at <= now => Entry::Delete { key },
                    _ => Entry::Put {
                        key,
                        value,
                        expires_at_ms: *expires_at_ms,
                    },
                },
                BatchOp::Delete { key } => Entry::Delete { key },
            })
            .collect();
        if core.max_memory.is_some() {
            let mut growth = 0u64;
            for (entry, shard_id) in entries.iter().zip(&op_shards) {
                if let Entry::Put { key, value, .. } = entry {
                    let g = shard_ids
                        .binary_search(shard_id)
                        .expect("shard was locked above");
                    let old = guards[g]
                        .map
                        .get(*key)
                        .map_or(0, |s| entry_bytes(key.len(), s.value.len()));
                    growth += entry_bytes(key.len(), value.len()).saturating_sub(old);
                }
            }
            // The batch's own shards are locked by this thread: eviction samples the others.
            core.make_room(None, &[], growth, now, self.durability)?;
        }
        let lsn = match &core.wal {
            Some(wal) => Some(wal.shared().append(now, &entries, self.durability)?),
            None => None,
        };
        for (entry, shard_id) in entries.iter().zip(op_shards) {
            let g = shard_ids
                .binary_search(&shard_id)
                .expect("shard was locked above");
            let change = match entry {
                Entry::Put {
                    value,
                    expires_at_ms,
                    ..
                } => Change::Put {
                    value: (*value).into(),
                    expires_at_ms: expires_at_ms.unwrap_or(0),
                },
                _ => Change::Delete,
            };
            core.install(&mut guards[g], entry.key(), change);
        }
        drop(guards);
        Ok(self.pending(Outcome::Unit, lsn))
    }
}

/// True if `dir` exists and holds at least one WAL segment or snapshot.
fn is_store(storage: &dyn Storage, dir: &Path) -> bool {
    let has_wal = wal::list_segments(storage, dir).is_ok_and(|s| !s.is_empty());
    has_wal || snapshot::list(storage, dir).is_ok_and(|s| !s.is_empty())
}

fn outcome_bool(o: Outcome) -> bool {
    match o {
        Outcome::Bool(b) => b,
        other => unreachable!("operation yields Bool, got {other:?}"),
    }
}

/// Rewrites the segment at `path` from what a read of it returns, through a temporary file
/// (fdatasync, rename over, and the caller fsyncs the directory).
///
/// Why: after a failed fdatasync (which poisons the store), Linux may mark the unwritten pages
/// clean, so a reopen in the same boot reads records that never reached the disk, and a later
/// fdatasync of the same file will not write them either. Building on them and acknowledging
/// new writes would leave a hole after a power loss. Writing the bytes recovery replayed to a
/// new file makes them durable for real. The cost is one sequential write of the last segment
/// (at most one segment, 64 MiB by default) per open.
fn rewrite_segment(storage: &dyn Storage, path: &Path) -> Result<()> {
    let bytes = storage.read(path)?;
    // A segment holding only its header is rewritten too: its header's fdatasync may be the
    // one that failed (a roll that poisoned the store), and records appended after a header
    // the disk never got would be unreadable after a power loss.
    if bytes.is_empty() {
        return Ok(());
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".rewrite");
    let tmp = PathBuf::from(tmp);
    let mut file = storage.create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_data()?;
    drop(file);
    storage.rename(&tmp, path)?;
    Ok(())
}

/// Drops every entry expired at `now_ms` after replay; returns the updated memory account.
fn purge_expired(index: &Index, now_ms: u64, mut memory: u64) -> u64 {
    for i in 0..index.shard_count() {
        let mut shard = index.shard(i).write();
        shard.map.retain(|key, slot| {
            let live = slot.is_live(now_ms);
            if !live {
                memory -= entry_bytes(key.len(), slot.value.len());
            }
            live
        });
    }
    memory
}

/// Applies one replayed WAL entry to the index; returns the updated memory account.
fn apply_replayed(index: &Index, entry: &Entry<'_>, mut memory: u64) -> u64 {
    let key = entry.key();
    let mut shard = index.shard(index.shard_of(key)).write();
    match *entry {
        Entry::Put {
            value,
            expires_at_ms,
            ..
        } => {
            // Kept even if already expired: a later Expire entry may have extended it (an
            // Expire is only ever logged for a live key). `purge_expired` drops what is still
            // expired once the whole log has been replayed.
            let slot = Slot::new(value.into(), expires_at_ms.unwrap_or(0), 0);
            if let Some(old) = shard.map.remove(key) {
                memory -= entry_bytes(key.len(), old.value.len());
            }
            memory += entry_bytes(key.len(), slot.value.len());
            shard.map.insert(key.into(), slot);
        }
        Entry::Delete { .. } => {
            if let Some(old) = shard.map.remove(key) {
                memory -= entry_bytes(key.len(), old.value.len());
            }
        }
        Entry::Expire { expires_at_ms, .. } => {
            if let Some(slot) = shard.map.get_mut(key) {
                slot.expires_at_ms = expires_at_ms.unwrap_or(0);
            }
        }
    }
    memory
}

/// Candidates eviction examines per shard visit (like Redis's `maxmemory-samples`).
const EVICTION_SAMPLE: usize = 16;

/// The future of [`Db::writable`].
#[must_use = "a future does nothing unless awaited"]
pub struct Writable {
    db: Db,
    /// `snapshot_attempts` when an overdue snapshot was first seen.
    attempts_at_start: Option<u64>,
}

impl Future for Writable {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = &mut *self;
        let core = this.db.core();
        let Some(wal) = &core.wal else {
            return Poll::Ready(Ok(()));
        };
        if let Err(e) = wal.shared().check_poison() {
            return Poll::Ready(Err(e));
        }
        if core.closing.load(Ordering::Acquire) {
            return Poll::Ready(Err(Error::Closed));
        }
        if core.snapshot_overdue() {
            let attempts = core.snapshot_attempts.load(Ordering::Acquire);
            let start = *this.attempts_at_start.get_or_insert(attempts);
            if attempts == start {
                // Register first, then ask and re-check: an attempt that ends after the
                // re-check wakes this waker (it is in the list before the check).
                {
                    let mut wakers = core.snapshot_wakers.lock();
                    if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                        wakers.push(cx.waker().clone());
                    }
                }
                let _ = core.maintenance_kick.try_send(());
                if core.snapshot_overdue()
                    && core.snapshot_attempts.load(Ordering::Acquire) == start
                    && !core.closing.load(Ordering::Acquire)
                {
                    return Poll::Pending;
                }
            }
        }
        if !wal.shared().poll_space(cx.waker()) {
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl Core {
    /// Wakes every async writer waiting for an overdue snapshot.
    fn wake_snapshot_waiters(&self) {
        let wakers = std::mem::take(&mut *self.snapshot_wakers.lock());
        for w in wakers {
            w.wake();
        }
    }

    /// Notes that a key expiring at `expires_at_ms` was found expired (its expiry has passed).
    fn saw_expired(&self, expires_at_ms: u64) {
        if expires_at_ms > self.expired_seen_ms.load(Ordering::Relaxed) {
            self.expired_seen_ms
                .fetch_max(expires_at_ms, Ordering::Relaxed);
        }
    }

    /// Makes the clock floor durable past every expiry seen so far, at most once per
    /// `FLOOR_SYNC_INTERVAL` (the maintenance thread calls it every tick). A record's time is
    /// the floor a reopen restores, so: if no record appended yet carries a time at or past
    /// the latest expiry seen, log an empty record stamped "now" (which is past it); then make
    /// the WAL durable. On an idle store where nothing expires, it does nothing.
    fn persist_floor(&self, last_sync: &mut Option<Instant>) {
        let (Some(disk), Some(wal)) = (&self.disk, &self.wal) else {
            return;
        };
        let seen = self.expired_seen_ms.load(Ordering::Relaxed);
        if seen <= disk.durable_floor_ms.load(Ordering::Relaxed)
            || last_sync.is_some_and(|t| t.elapsed() < FLOOR_SYNC_INTERVAL)
        {
            return;
        }
        *last_sync = Some(Instant::now());
        let wal = wal.shared();
        let now = self.clock.now_ms();
        if wal.max_appended_time_ms() < seen && wal.append(now, &[], Durability::Buffered).is_err()
        {
            return; // poisoned or closing: nothing more can be made durable
        }
        if wal.sync_all().is_ok() {
            disk.durable_floor_ms.fetch_max(seen, Ordering::Relaxed);
            tracing::trace!(floor_ms = seen, "keel-engine: clock floor made durable");
        }
    }

    /// Writes the clean-close marker (best effort: without it the next open rewrites the
    /// last segment and takes the floor from the log). Called once the WAL writer has written
    /// and fdatasynced everything and stopped.
    fn mark_clean_close(&self) {
        let (Some(disk), Some(wal)) = (&self.disk, &self.wal) else {
            return;
        };
        let (segment_first_lsn, segment_bytes) = wal.shared().active_segment();
        let m = CleanClose {
            last_lsn: wal.shared().last_appended_lsn(),
            floor_ms: self.clock.now_ms(),
            segment_first_lsn,
            segment_bytes,
        };
        let _ = marker::write(&*disk.storage, &disk.dir, m);
    }

    /// `Slot::touched` for the time `now_ms`.
    fn touch_at(&self, now_ms: u64) -> u32 {
        u32::try_from(now_ms.saturating_sub(self.touch_base_ms) / TOUCH_UNIT_MS).unwrap_or(u32::MAX)
    }

    fn touch_now(&self) -> u32 {
        if self.eviction == EvictionPolicy::AllKeysLru {
            self.touch_at(self.clock.now_ms())
        } else {
            0
        }
    }

    /// Makes room for `growth` more accounted bytes under `max_memory`, evicting per the policy.
    /// `own` is the writer's locked shard (sampled first; `key` in it is never evicted); other
    /// shards are only tried, never waited for, so eviction cannot deadlock with writers.
    ///
    /// Each eviction is logged as a Delete with the writer's durability, before the writer's own
    /// record: when the write is acknowledged, its evictions are as durable as it is.
    fn make_room(
        &self,
        mut own: Option<&mut Shard>,
        key: &[u8],
        growth: u64,
        now: u64,
        durability: Durability,
    ) -> Result<()> {
        let Some(limit) = self.max_memory else {
            return Ok(());
        };
        let over = |core: &Core| core.memory_bytes.load(Ordering::Relaxed) + growth > limit;
        if growth == 0 || !over(self) {
            return Ok(());
        }
        let refuse = || Error::MemoryLimit {
            used: self.memory_bytes.load(Ordering::Relaxed),
            limit,
        };
        if self.eviction == EvictionPolicy::NoEviction {
            return Err(refuse());
        }
        let shards = self.index.shard_count();
        let mut fruitless = 0;
        let evictions_before = self.evictions.load(Ordering::Relaxed);
        let evicted = |core: &Core| core.evictions.load(Ordering::Relaxed) - evictions_before;
        while over(self) {
            if fruitless > 2 * shards {
                tracing::debug!(
                    evicted = evicted(self),
                    growth,
                    "keel-engine: write refused, nothing left to evict"
                );
                return Err(refuse());
            }
            let evicted = match own.as_deref_mut().filter(|_| fruitless == 0) {
                Some(shard) => self.evict_one(shard, key, now, durability)?,
                None => {
                    let i =
                        self.evict_shard_cursor.fetch_add(1, Ordering::Relaxed) as usize % shards;
                    match self.index.shard(i).try_write() {
                        Some(mut shard) => self.evict_one(&mut shard, key, now, durability)?,
                        None => false,
                    }
                }
            };
            fruitless = if evicted { 0 } else { fruitless + 1 };
        }
        tracing::trace!(
            evicted = evicted(self),
            growth,
            "keel-engine: evicted to make room"
        );
        Ok(())
    }

    /// Samples up to `EVICTION_SAMPLE` entries of `shard` and evicts the best candidate: an
    /// already-expired entry first, else (AllKeysLru) the least recently touched or
    /// (VolatileTtl) the soonest to expire among entries with a TTL. Returns whether it evicted.
    fn evict_one(
        &self,
        shard: &mut Shard,
        protect: &[u8],
        now: u64,
        durability: Durability,
    ) -> Result<bool> {
        use std::ops::Bound;
        let start = match &shard.evict_cursor {
            Some(c) => Bound::Excluded(&**c),
            None => Bound::Unbounded,
        };
        let mut best: Option<(&[u8], (u8, u64))> = None;
        let mut last: Option<&[u8]> = None;
        let sample = shard
            .map
            .range::<[u8], _>((start, Bound::Unbounded))
            .chain(shard.map.iter())
            .take(EVICTION_SAMPLE);
        for (k, slot) in sample {
            last = Some(k);
            if &**k == protect {
                continue;
            }
            // Lower ranks evict first: (class, tiebreak).
            let rank = if !slot.is_live(now) {
                (0, 0)
            } else {
                match self.eviction {
                    EvictionPolicy::AllKeysLru => (1, u64::from(slot.touched())),
                    EvictionPolicy::VolatileTtl if slot.expires_at_ms != 0 => {
                        (1, slot.expires_at_ms)
                    }
                    _ => continue,
                }
            };
            if best.is_none_or(|(_, r)| rank < r) {
                best = Some((k, rank));
            }
        }
        let next_cursor = last.map(Box::<[u8]>::from);
        let victim = best.map(|(k, _)| Box::<[u8]>::from(k));
        shard.evict_cursor = next_cursor;
        let Some(victim) = victim else {
            return Ok(false);
        };
        if let Some(wal) = &self.wal {
            wal.shared()
                .append(now, &[Entry::Delete { key: &victim }], durability)?;
        }
        self.install(shard, &victim, Change::Delete);
        self.evictions.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
    /// WAL bytes appended since the last snapshot started, and the automatic threshold.
    fn wal_growth(&self) -> Option<(u64, u64)> {
        match (&self.disk, &self.wal) {
            (Some(disk), Some(wal)) if !wal.shared().is_poisoned() => {
                let appended = wal.shared().appended_bytes();
                let since = appended.saturating_sub(disk.appended_at_last.load(Ordering::Relaxed));
                Some((since, disk.snapshot_after_bytes))
            }
            _ => None,
        }
    }

    /// True when enough WAL has been appended since the last snapshot (the maintenance thread
    /// then takes one).
    fn snapshot_due(&self) -> bool {
        self.wal_growth()
            .is_some_and(|(since, limit)| since >= limit)
    }

    /// True when the maintenance thread has fallen far behind (4x the threshold): writers
    /// then take the snapshot themselves before writing, so the WAL stays bounded whatever the
    /// write rate and however the threads are scheduled.
    fn snapshot_overdue(&self) -> bool {
        self.wal_growth()
            .is_some_and(|(since, limit)| since >= limit.saturating_mul(WAL_OVERDUE_FACTOR))
    }

    /// Takes a snapshot if `needed` still holds once no other compaction is running.
    fn compact_when(&self, needed: impl Fn(&Core) -> bool) -> Result<Option<SnapshotReport>> {
        let (Some(disk), Some(wal)) = (&self.disk, &self.wal) else {
            return Ok(None);
        };
        let wal = wal.shared();
        wal.check_poison()?;
        // One compaction at a time; a caller that waited here may find the work done.
        let _one_at_a_time = disk.compaction.lock();
        if !needed(self) {
            return Ok(None);
        }
        let started = Instant::now();
        let appended_before = wal.appended_bytes();
        // Every record up to `lsn` is installed in memory before its shard lock is released,
        // and each shard is copied under its lock: the copy contains all of them.
        let lsn = wal.last_appended_lsn();
        wal.request_roll();
        let now = self.clock.now_ms();
        let mut writer = SnapshotWriter::create(&*disk.storage, &disk.dir, lsn, now)?;
        let mut chunk = Vec::new();
        for i in 0..self.index.shard_count() {
            chunk.clear();
            let mut n = 0;
            {
                let shard = self.index.shard(i).read();
                for (key, slot) in shard.map.iter() {
                    if slot.is_live(now) {
                        snapshot::encode_entry(&mut chunk, key, &slot.value, slot.expires_at_ms);
                        n += 1;
                    }
                }
            }
            writer.write_chunk(&chunk, n)?;
        }
        // The copy may hold states newer than `lsn`; make their records durable before the
        // snapshot exists, so it never shows a write (or part of a batch) a crash could lose.
        wal.sync_all()?;
        // If the active segment still holds records the snapshot covers (an idle store: no
        // commit ran since the roll was requested), roll now: a covered segment can only be
        // deleted once it is no longer the active one.
        wal.roll_now(lsn)?;
        let (_, entries) = writer.install(&*disk.storage, &disk.dir)?;
        disk.appended_at_last
            .store(appended_before, Ordering::Relaxed);
        let segments_deleted = self.truncate_covered_locked(disk, lsn)?;
        let report = SnapshotReport {
            lsn,
            entries,
            segments_deleted,
            duration: started.elapsed(),
        };
        tracing::debug!(
            lsn,
            entries,
            segments_deleted,
            duration_ms = report.duration.as_millis() as u64,
            "keel-engine: snapshot taken"
        );
        let mut reports = disk.reports.lock();
        reports.0 += 1;
        reports.1 = Some(report.clone());
        Ok(Some(report))
    }

    /// Deletes snapshots older than the one at `lsn` and WAL segments whose records are all
    /// `<= lsn`. The segment being appended to is never deleted.
    fn truncate_covered(&self, lsn: u64) -> Result<u64> {
        match &self.disk {
            Some(disk) => {
                let _one_at_a_time = disk.compaction.lock();
                self.truncate_covered_locked(disk, lsn)
            }
            None => Ok(0),
        }
    }

    fn truncate_covered_locked(&self, disk: &Disk, lsn: u64) -> Result<u64> {
        let Some(wal) = &self.wal else { return Ok(0) };
        let storage = &*disk.storage;
        let mut removed_any = false;
        for (snap_lsn, path) in snapshot::list(storage, &disk.dir)? {
            if snap_lsn < lsn {
                storage.remove(&path)?;
                removed_any = true;
            }
        }
        let segments = wal::list_segments(storage, &disk.dir)?;
        let active = wal.shared().active_first_lsn();
        let mut deleted = 0;
        for pair in segments.windows(2) {
            let ((first, path), (next_first, _)) = (&pair[0], &pair[1]);
            // Every record of this segment is below the next segment's first LSN.
            if *next_first <= lsn + 1 && *first < active {
                let bytes = storage.len(path)?;
                storage.remove(path)?;
                wal.shared().segment_removed(bytes);
                deleted += 1;
            }
        }
        if removed_any || deleted > 0 {
            // fsync the directory so the deletions are durable (not required for safety: a
            // resurrected covered file is ignored or deleted again at the next open).
            storage.sync_dir(&disk.dir)?;
        }
        Ok(deleted)
    }

    /// Installs `change` for `key` in its (locked) shard and keeps the memory account.
    fn install(&self, shard: &mut Shard, key: &[u8], change: Change) {
        match change {
            Change::None => {}
            Change::Put {
                value,
                expires_at_ms,
            } => {
                let added = entry_bytes(key.len(), value.len());
                let slot = Slot::new(value, expires_at_ms, self.touch_now());
                match shard.map.get_mut(key) {
                    Some(existing) => {
                        let removed = entry_bytes(key.len(), existing.value.len());
                        *existing = slot;
                        self.memory_bytes.fetch_add(added, Ordering::Relaxed);
                        self.memory_bytes.fetch_sub(removed, Ordering::Relaxed);
                    }
                    None => {
                        shard.map.insert(key.into(), slot);
                        self.memory_bytes.fetch_add(added, Ordering::Relaxed);
                    }
                }
            }
            Change::Delete => {
                if let Some(old) = shard.map.remove(key) {
                    self.memory_bytes
                        .fetch_sub(entry_bytes(key.len(), old.value.len()), Ordering::Relaxed);
                }
            }
            Change::Expire { expires_at_ms } => {
                if let Some(slot) = shard.map.get_mut(key) {
                    slot.expires_at_ms = expires_at_ms;
                }
            }
        }
    }

    /// One tick of the active expirer: in each shard, examine at most
    /// `expire_scan_per_shard` entries from where the last tick stopped and reclaim the expired
    /// ones, logging their deletion (buffered) so they cannot reappear after a restart. The
    /// bound keeps every shard-lock hold short whatever expires at once.
    fn expire_tick(&self) {
        let now = self.clock.now_ms();
        let reclaimed_before = self.expired_reclaimed.load(Ordering::Relaxed);
        for i in 0..self.index.shard_count() {
            let mut shard = self.index.shard(i).write();
            let lower = match &shard.expire_cursor {
                Some(c) => std::ops::Bound::Excluded(&**c),
                None => std::ops::Bound::Unbounded,
            };
            let mut examined = 0;
            let mut last: Option<&[u8]> = None;
            let mut expired: Vec<Box<[u8]>> = Vec::new();
            for (k, slot) in shard
                .map
                .range::<[u8], _>((lower, std::ops::Bound::Unbounded))
                .take(self.expire_scan_per_shard)
            {
                examined += 1;
                last = Some(k);
                if !slot.is_live(now) {
                    self.saw_expired(slot.expires_at_ms);
                    expired.push(k.clone());
                }
            }
            let next_cursor = if examined < self.expire_scan_per_shard {
                None
            } else {
                last.map(Box::from)
            };
            if !expired.is_empty() {
                if let Some(wal) = &self.wal {
                    let entries: Vec<Entry<'_>> =
                        expired.iter().map(|k| Entry::Delete { key: k }).collect();
                    if wal
                        .shared()
                        .append(now, &entries, Durability::Buffered)
                        .is_err()
                    {
                        // Poisoned or closing: leave the entries; they are invisible anyway.
                        return;
                    }
                }
                for k in &expired {
                    self.install(&mut shard, k, Change::Delete);
                }
                self.expired_reclaimed
                    .fetch_add(expired.len() as u64, Ordering::Relaxed);
            }
            shard.expire_cursor = next_cursor;
        }
        let reclaimed = self.expired_reclaimed.load(Ordering::Relaxed) - reclaimed_before;
        if reclaimed > 0 {
            tracing::debug!(reclaimed, "keel-engine: expirer reclaimed keys");
        }
    }
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
