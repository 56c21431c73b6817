//! Configuration: [`Options`] for opening a store, [`Durability`] for when a write is
//! acknowledged, and [`Limits`] on what one operation may carry.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::record::RECORD_BODY_BYTES_MAX;
use crate::storage::{FsStorage, Storage};

/// The longest TTL accepted: 10 years (3,650 days). Longer TTLs are an
/// [`Error::InvalidTtl`](crate::Error::InvalidTtl); for "forever" store without a TTL.
pub const TTL_MAX: Duration = Duration::from_secs(3_650 * 24 * 60 * 60);

/// When a write is acknowledged to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Return only after the write's WAL record is on disk (fdatasync). Concurrent writers
    /// share one fdatasync (group commit). Survives process crash and power loss. The default.
    #[default]
    Immediate,
    /// Return after the WAL writer has handed the record to the OS (`write(2)`); while written
    /// data is not yet synced, the background fdatasyncs are at most this interval apart.
    /// Survives a process crash; a power loss can lose up to the interval's worth of
    /// acknowledged writes. The interval must be above zero (`Db::open` refuses
    /// `Periodic(Duration::ZERO)` with [`Error::InvalidOption`]).
    Periodic(Duration),
    /// Return as soon as the record is queued for the WAL writer; the OS decides when it
    /// reaches disk. A process crash can lose the queued records (microseconds' worth), a power
    /// loss whatever the OS had not flushed.
    Buffered,
}

/// Size limits. A violation is a typed error and writes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest key, in bytes. Default 1,024 (which every keel backend, Postgres's b-tree
    /// included, can index).
    pub max_key_bytes: usize,
    /// Largest value, in bytes. Default 16 MiB.
    pub max_value_bytes: usize,
    /// Most operations in one batch. Default 10,000.
    pub max_batch_ops: usize,
    /// Most encoded bytes in one batch. Default 64 MiB.
    pub max_batch_bytes: usize,
}

/// Default for [`Limits::max_key_bytes`].
pub const KEY_BYTES_MAX_DEFAULT: usize = 1024;
/// Default for [`Limits::max_value_bytes`].
pub const VALUE_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;
/// Default for [`Limits::max_batch_ops`].
pub const BATCH_OPS_MAX_DEFAULT: usize = 10_000;
/// Default for [`Limits::max_batch_bytes`].
pub const BATCH_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;
/// The largest [`Limits::max_key_bytes`] a store accepts: WAL entries and snapshot entries
/// frame keys with a `u16` length.
pub const KEY_BYTES_CEILING: usize = u16::MAX as usize;
/// Bytes a Put entry takes in a record body besides its key and value (tag, key length,
/// expiry, value length).
const PUT_ENTRY_OVERHEAD_BYTES: usize = 1 + 2 + 8 + 4;
/// Bytes of a record body's entry count.
const RECORD_COUNT_BYTES: usize = 4;
/// The largest [`Limits::max_value_bytes`] a store accepts: a set of a key of
/// [`KEY_BYTES_CEILING`] bytes to a value of this size is one record whose body is exactly the
/// largest the WAL decoder accepts ([`RECORD_BODY_BYTES_MAX`], 1 GiB).
pub const VALUE_BYTES_CEILING: usize =
    RECORD_BODY_BYTES_MAX - RECORD_COUNT_BYTES - PUT_ENTRY_OVERHEAD_BYTES - KEY_BYTES_CEILING;
/// The largest [`Limits::max_batch_bytes`] a store accepts: a batch is one record, and its
/// counted bytes are that record's body.
pub const BATCH_BYTES_CEILING: usize = RECORD_BODY_BYTES_MAX;

const _: () = assert!(
    RECORD_COUNT_BYTES + PUT_ENTRY_OVERHEAD_BYTES + KEY_BYTES_CEILING + VALUE_BYTES_CEILING
        == RECORD_BODY_BYTES_MAX
);
const _: () = assert!(VALUE_BYTES_CEILING <= u32::MAX as usize);
const _: () = assert!(VALUE_BYTES_MAX_DEFAULT <= VALUE_BYTES_CEILING);
const _: () = assert!(BATCH_BYTES_MAX_DEFAULT <= BATCH_BYTES_CEILING);
const _: () = assert!(KEY_BYTES_MAX_DEFAULT <= KEY_BYTES_CEILING);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: KEY_BYTES_MAX_DEFAULT,
            max_value_bytes: VALUE_BYTES_MAX_DEFAULT,
            max_batch_ops: BATCH_OPS_MAX_DEFAULT,
            max_batch_bytes: BATCH_BYTES_MAX_DEFAULT,
        }
    }
}

/// What happens when a write would take the store past its `max_memory`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Refuse the write with [`Error::MemoryLimit`](crate::Error::MemoryLimit); nothing is
    /// written. The default.
    #[default]
    NoEviction,
    /// Evict keys that have a TTL, soonest to expire first among a sample (Redis's
    /// `volatile-ttl`); refuse the write if no key has a TTL.
    VolatileTtl,
    /// Evict any key, approximately least recently used: the oldest-touched of a sample of 16
    /// (Redis's `allkeys-lru`). Reads record their access time.
    AllKeysLru,
}

/// How to open a store. Start from `Options::default()` and adjust with the builder methods.
#[derive(Clone)]
pub struct Options {
    pub(crate) durability: Durability,
    pub(crate) limits: Limits,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) shards: usize,
    pub(crate) wal_segment_bytes: u64,
    pub(crate) expire_interval: Duration,
    pub(crate) expire_scan_per_shard: usize,
    pub(crate) snapshot_after_wal_bytes: u64,
    pub(crate) create_if_missing: bool,
    pub(crate) lock_wait: Duration,
    pub(crate) max_memory: Option<u64>,
    pub(crate) eviction: EvictionPolicy,
    pub(crate) wal_queue_bytes: usize,
}

/// Default WAL growth that triggers an automatic snapshot: 128 MiB.
pub const SNAPSHOT_AFTER_WAL_BYTES_DEFAULT: u64 = 128 * 1024 * 1024;

/// Default byte budget of the WAL's append queue: 64 MiB.
pub const WAL_QUEUE_BYTES_DEFAULT: usize = crate::wal::QUEUE_BYTES_MAX_DEFAULT;

/// Default WAL segment size: 64 MiB.
pub const WAL_SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Default number of index shards.
pub const SHARDS_DEFAULT: usize = 64;
/// Default period of the active expirer.
pub const EXPIRE_INTERVAL_DEFAULT: Duration = Duration::from_millis(100);
/// Default number of entries the active expirer examines per shard per tick. Bounds the time a
/// shard is held by the expirer, whatever expires at once.
pub const EXPIRE_SCAN_PER_SHARD_DEFAULT: usize = 256;

impl Default for Options {
    fn default() -> Self {
        Options {
            durability: Durability::default(),
            limits: Limits::default(),
            clock: Arc::new(SystemClock),
            storage: Arc::new(FsStorage),
            shards: SHARDS_DEFAULT,
            wal_segment_bytes: WAL_SEGMENT_BYTES_DEFAULT,
            expire_interval: EXPIRE_INTERVAL_DEFAULT,
            expire_scan_per_shard: EXPIRE_SCAN_PER_SHARD_DEFAULT,
            snapshot_after_wal_bytes: SNAPSHOT_AFTER_WAL_BYTES_DEFAULT,
            create_if_missing: true,
            lock_wait: Duration::ZERO,
            max_memory: None,
            eviction: EvictionPolicy::NoEviction,
            wal_queue_bytes: WAL_QUEUE_BYTES_DEFAULT,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("durability", &self.durability)
            .field("limits", &self.limits)
            .field("shards", &self.shards)
            .field("wal_segment_bytes", &self.wal_segment_bytes)
            .field("expire_interval", &self.expire_interval)
            .field("expire_scan_per_shard", &self.expire_scan_per_shard)
            .field("snapshot_after_wal_bytes", &self.snapshot_after_wal_bytes)
            .field("create_if_missing", &self.create_if_missing)
            .field("lock_wait", &self.lock_wait)
            .field("max_memory", &self.max_memory)
            .field("eviction", &self.eviction)
            .field("wal_queue_bytes", &self.wal_queue_bytes)
            .finish_non_exhaustive()
    }
}

impl Options {
    /// Default durability for writes (per-operation overrides via `Db::with_durability`).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Size limits. Each must be at most its ceiling ([`KEY_BYTES_CEILING`],
    /// [`VALUE_BYTES_CEILING`], [`BATCH_BYTES_CEILING`]: what the on-disk format can frame);
    /// `Db::open` refuses a larger one with [`Error::InvalidOption`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Checks the settings against what the store supports; `Db::open` calls it before it
    /// touches the directory.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] naming the setting: a limit above its ceiling (a write under
    /// it could be acknowledged and then not read back), or `Durability::Periodic` with a zero
    /// interval.
    pub fn validate(&self) -> Result<()> {
        let over = |option: &'static str, value: usize, ceiling: usize| {
            if value > ceiling {
                Err(Error::InvalidOption {
                    option,
                    reason: format!(
                        "{value} is above {ceiling}, the most the on-disk format can hold"
                    ),
                })
            } else {
                Ok(())
            }
        };
        over(
            "max_key_bytes",
            self.limits.max_key_bytes,
            KEY_BYTES_CEILING,
        )?;
        over(
            "max_value_bytes",
            self.limits.max_value_bytes,
            VALUE_BYTES_CEILING,
        )?;
        over(
            "max_batch_bytes",
            self.limits.max_batch_bytes,
            BATCH_BYTES_CEILING,
        )?;
        if self.durability == Durability::Periodic(Duration::ZERO) {
            return Err(Error::InvalidOption {
                option: "durability",
                reason: "Periodic needs an interval above zero (for an fdatasync before every \
                         acknowledgement use Immediate)"
                    .into(),
            });
        }
        Ok(())
    }

    /// The clock expiry is measured against (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The storage implementation (default: the real file system).
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = storage;
        self
    }

    /// Number of index shards, rounded up to a power of two, at least 1 (default 64).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards.max(1).next_power_of_two();
        self
    }

    /// Size at which the WAL rolls to a new segment (default 64 MiB, at least 4 KiB).
    pub fn wal_segment_bytes(mut self, bytes: u64) -> Self {
        self.wal_segment_bytes = bytes.max(4096);
        self
    }

    /// Whether `Db::open` may create a new store (default true). With false, opening a
    /// directory that is missing or holds no WAL segment or snapshot is
    /// [`Error::NotAStore`](crate::Error::NotAStore) and creates nothing: what inspection tools
    /// want, so a mistyped path does not silently become an empty store.
    pub fn create_if_missing(mut self, create: bool) -> Self {
        self.create_if_missing = create;
        self
    }

    /// How long `Db::open` keeps retrying when another holder has the store's lock before it
    /// returns [`Error::Locked`](crate::Error::Locked) (default: not at all). A short wait
    /// helps a tool that runs right after a service stopped, and a process that spawns
    /// children while reopening (a child briefly inherits the lock between `fork` and `exec`).
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// Caps the memory the store accounts for (keys, values and a fixed per-entry index
    /// overhead, see `Stats::memory_bytes`), with `policy` deciding what a write that would
    /// exceed it does (default: no limit). Evictions are logged, so evicted keys stay gone
    /// after a restart. The cap is checked per write: concurrent writers can overshoot it by
    /// at most one write each. A store reopened over the cap loads everything and evicts as
    /// new writes arrive.
    pub fn max_memory(mut self, bytes: u64, policy: EvictionPolicy) -> Self {
        self.max_memory = Some(bytes);
        self.eviction = policy;
        self
    }

    /// Take a snapshot automatically (and delete the WAL it covers) once this many WAL bytes
    /// have been appended since the last one (default 128 MiB, at least 4 KiB). The check runs
    /// on the maintenance thread every expiry tick.
    pub fn snapshot_after_wal_bytes(mut self, bytes: u64) -> Self {
        self.snapshot_after_wal_bytes = bytes.max(4096);
        self
    }

    /// Bytes of written-but-not-yet-handed-to-the-OS WAL records the store may hold before a
    /// write waits for the WAL writer (backpressure; default 64 MiB, at least 64 KiB). Bounds
    /// memory when writers outrun the disk (`Periodic`, `Buffered`).
    pub fn wal_queue_bytes(mut self, bytes: usize) -> Self {
        self.wal_queue_bytes = bytes.max(64 * 1024);
        self
    }

    /// Period of the active expirer (default 100 ms) and the entries it examines per shard
    /// per tick (default 256, at least 1).
    pub fn active_expiry(mut self, interval: Duration, scan_per_shard: usize) -> Self {
        self.expire_interval = interval.max(Duration::from_millis(1));
        self.expire_scan_per_shard = scan_per_shard.max(1);
        self
    }
}
