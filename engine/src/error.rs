//! The engine's error type. Every fallible operation returns [`Error`]; each variant says what
//! happened and what the caller can do about it.

use std::io;
use std::path::PathBuf;

/// Shorthand for `Result<T, keel_engine::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
///
/// Input errors (`KeyTooLarge`, `InvalidTtl`, `NotAnInteger`, ...) are detected before anything
/// is written: the store is unchanged when they are returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key is longer than [`Limits::max_key_bytes`](crate::Limits::max_key_bytes).
    #[error("key is {len} bytes, the limit is {max} bytes; nothing was written")]
    KeyTooLarge {
        /// Length of the rejected key.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The value is longer than [`Limits::max_value_bytes`](crate::Limits::max_value_bytes).
    #[error("value is {len} bytes, the limit is {max} bytes; nothing was written")]
    ValueTooLarge {
        /// Length of the rejected value.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A batch has more operations or more bytes than
    /// [`Limits::max_batch_ops`](crate::Limits::max_batch_ops) /
    /// [`Limits::max_batch_bytes`](crate::Limits::max_batch_bytes).
    #[error(
        "batch has {ops} operations and {bytes} bytes, the limits are {max_ops} operations and {max_bytes} bytes; nothing was written"
    )]
    BatchTooLarge {
        /// Operations in the rejected batch.
        ops: usize,
        /// Encoded bytes of the rejected batch.
        bytes: usize,
        /// Operation limit.
        max_ops: usize,
        /// Byte limit.
        max_bytes: usize,
    },
    /// A TTL of zero, or longer than [`TTL_MAX`](crate::TTL_MAX).
    #[error(
        "invalid TTL {ttl_ms} ms: a TTL must be at least 1 ms and at most {max_ms} ms; nothing was written"
    )]
    InvalidTtl {
        /// The rejected TTL in milliseconds (rounded up).
        ttl_ms: u128,
        /// The maximum TTL in milliseconds.
        max_ms: u64,
    },
    /// `incr` found a value that is not a decimal 64-bit integer in Redis's grammar.
    #[error("value is not an integer or out of range; the value was left unchanged")]
    NotAnInteger,
    /// `incr` would overflow a signed 64-bit integer.
    #[error("increment or decrement would overflow; the value was left unchanged")]
    Overflow,
    /// The store's `max_memory` would be exceeded and the eviction policy cannot make room
    /// (`NoEviction`, or `VolatileTtl` with no key that has a TTL).
    #[error(
        "memory limit of {limit} bytes reached ({used} bytes used) and the eviction policy cannot make room; nothing was written"
    )]
    MemoryLimit {
        /// Accounted bytes in use.
        used: u64,
        /// The configured limit.
        limit: u64,
    },
    /// Another `Db` (in this or another process) has the directory open.
    #[error("{} is locked by another open store{}", path.display(), match pid { Some(p) => format!(" (process {p})"), None => String::new() })]
    Locked {
        /// The directory.
        path: PathBuf,
        /// The process that holds the lock, if it wrote its id.
        pid: Option<u32>,
    },
    /// The directory holds no keel store (missing, or no WAL and no snapshot), and the caller
    /// asked not to create one ([`Options::create_if_missing`](crate::Options::create_if_missing)
    /// set to false, or `Db::verify`).
    #[error("{} is not a keel store (no such directory, or no WAL segment or snapshot in it)", path.display())]
    NotAStore {
        /// The directory.
        path: PathBuf,
    },
    /// A file is damaged in a way recovery must not paper over (for example a bad record
    /// followed by valid ones). Nothing was modified; inspect with `keel verify`.
    #[error("corruption in {} at byte offset {offset}: {reason}", file.display())]
    Corruption {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the first bad byte or record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An earlier write or fsync failed, so the on-disk state is unknown. Every later write is
    /// refused; reads keep working. Drop the store and open it again to recover.
    #[error(
        "store is poisoned by an earlier I/O failure ({0}); writes are refused, reopen the store to recover"
    )]
    Poisoned(String),
    /// A setting in `Options` is outside what the store supports (for example a size limit
    /// above the on-disk format's ceiling). Nothing was opened or created; fix the setting.
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        /// The setting.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The store has been closed.
    #[error("store is closed")]
    Closed,
    /// An I/O error from the storage layer.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    pub(crate) fn corruption(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corruption {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }
}
