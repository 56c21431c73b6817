//! The contract on sled 0.34: [`SledBackend`] keeps every key in the default tree of a sled
//! database directory, one sled entry per key. It owns only the translation; the value layout,
//! the operation semantics, expiry and the sweeper are shared with the redb adapter.
//!
//! **Value layout.** Each sled value is a 9-byte header (format byte `1`, then the absolute
//! expiry in Unix milliseconds as a little-endian u64, 0 for none) followed by the caller's
//! bytes. A value that does not decode is reported as [`ErrorKind::Corruption`].
//!
//! **Atomicity.** Every write is a read followed by sled's `compare_and_swap` of the whole
//! stored value, retried from the value the failed swap returns, so each operation is atomic
//! per key without a lock. `incr` parses, checks for overflow and only then swaps: a failure
//! leaves the value unchanged.
//!
//! **Durability.** sled keeps recent writes in memory buffers and writes them out from a
//! background thread every 500 ms: in its native mode a crash of the process can lose up to
//! the last half second of acknowledged writes. [`SledOptions`] defaults to flushing sled's
//! buffers after every write before acknowledging it, and `incr_durable` always flushes. Know
//! what a flush is: on Linux, sled 0.34 writes its log with `sync_file_range`
//! (`WAIT_BEFORE | WRITE | WAIT_AFTER`), not `fsync`/`fdatasync` (upstream sled issue 1452).
//! That pushes the pages to the device, so an acknowledged write survives a crash of the
//! process, but it neither flushes the drive's volatile write cache nor syncs file metadata:
//! after a power loss or a kernel crash, acknowledged writes can be lost. sled is therefore
//! **not power-loss durable**, flushed or not, unlike keel's engine and redb (which call
//! `fdatasync`/`fsync`). Use sled where losing recent writes on power loss is acceptable;
//! fencing counters on sled are safe against process crashes only.
//!
//! **Expiry.** Lazy (an expired entry is absent for every operation) plus a background sweeper
//! thread that removes expired entries in bounded batches, each with a conditional
//! `compare_and_swap`, so an entry rewritten since the sweeper looked at it is kept. The
//! sweeper stops when the backend is dropped.
//!
//! Every sled call blocks, so each operation runs on the Tokio blocking pool.

use std::ops::Bound;
use std::path::Path;

use keel_primitives::{Error, ErrorKind, Result};

pub use crate::embedded_common::ExpiryOptions;
use crate::embedded_common::{
    Core, DecideRaw, Op, Outcome, Store, TrustedClock, Write, backend_via_core, collect_heads,
    head, scan_start,
};

/// Options for [`SledBackend::open_with`].
#[derive(Debug, Clone)]
pub struct SledOptions {
    /// Flush sled's buffers after every write, before acknowledging it. Default: `true`, so an
    /// acknowledged write survives a crash of the process. A flush is `sync_file_range`, not
    /// `fsync` (see the module docs): it does not make writes survive a power loss. `false` is
    /// sled's native mode: faster, but a process crash can lose up to the last 500 ms of
    /// acknowledged writes. `incr_durable` flushes either way.
    pub flush_every_write: bool,
    /// The expiry clock and the sweeper's pace.
    pub expiry: ExpiryOptions,
}

impl Default for SledOptions {
    fn default() -> Self {
        SledOptions {
            flush_every_write: true,
            expiry: ExpiryOptions::default(),
        }
    }
}

/// keel's [`Backend`](keel_primitives::Backend) on a sled database directory. See the module
/// docs for the layout, durability and expiry.
#[derive(Debug)]
pub struct SledBackend {
    core: Core<SledStore>,
}

impl SledBackend {
    /// Opens (or creates) the sled database in `dir` with [`SledOptions::default`].
    ///
    /// # Errors
    /// As [`SledBackend::open_with`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        SledBackend::open_with(dir, SledOptions::default())
    }

    /// Opens (or creates) the sled database in `dir`.
    ///
    /// # Errors
    /// [`ErrorKind::Locked`] if the database is already open (in this process or another);
    /// [`ErrorKind::Corruption`] if sled finds it damaged; [`ErrorKind::Transient`] on I/O
    /// errors; [`ErrorKind::InvalidInput`] for invalid [`ExpiryOptions`].
    pub fn open_with(dir: impl AsRef<Path>, options: SledOptions) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir.as_ref())
            .open()
            .map_err(sled_error)?;
        let store = SledStore {
            db: Some(db),
            lock_file: dir.as_ref().join("db"),
            flush_every_write: options.flush_every_write,
        };
        Ok(SledBackend {
            core: Core::new(store, options.expiry)?,
        })
    }
}

backend_via_core!(SledBackend);

struct SledStore {
    /// Always `Some` until the store is dropped.
    db: Option<sled::Db>,
    /// The file sled holds an exclusive `flock` on while the database is open.
    lock_file: std::path::PathBuf,
    flush_every_write: bool,
}

/// How long dropping a store waits for sled's own background work to let go of the file.
const UNLOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Drop for SledStore {
    /// sled finishes some I/O on its own threads after its last handle is dropped, and only
    /// then releases the file lock; a reopen before that fails with `Locked`. So the drop
    /// waits (bounded) until the lock can be taken, which makes "drop, then reopen at once"
    /// work (the caller, `Core`'s drop, keeps this off the async workers).
    fn drop(&mut self) {
        drop(self.db.take());
        let Ok(file) = std::fs::File::open(&self.lock_file) else {
            return;
        };
        let started = std::time::Instant::now();
        while file.try_lock().is_err() && started.elapsed() < UNLOCK_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = file.unlock();
    }
}

impl SledStore {
    fn db(&self) -> &sled::Db {
        // Only `drop` takes it out.
        self.db
            .as_ref()
            .expect("the sled database is open until the store is dropped")
    }
}

impl SledStore {
    /// The compare-and-swap loop: applies `op` to `key` atomically, without flushing.
    fn swap(&self, key: &[u8], op: &Op, clock: &TrustedClock) -> Result<Outcome> {
        let mut current = self.db().get(key).map_err(sled_error)?;
        loop {
            let (write, outcome) = op.apply(current.as_deref(), clock.now_ms())?;
            let new = match write {
                Write::Nothing => return Ok(outcome),
                Write::Put(bytes) => Some(bytes),
                Write::Remove => None,
            };
            match self
                .db()
                .compare_and_swap(key, current.as_ref(), new)
                .map_err(sled_error)?
            {
                Ok(()) => return Ok(outcome),
                // Someone wrote in between: decide again from what is there now.
                Err(conflict) => current = conflict.current,
            }
        }
    }
}

impl Store for SledStore {
    const NAME: &'static str = "sled";

    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db().get(key).map_err(sled_error)?.map(|v| v.to_vec()))
    }

    fn apply(&self, key: &[u8], op: &Op, clock: &TrustedClock, durable: bool) -> Result<Outcome> {
        let outcome = self.swap(key, op, clock)?;
        // Flushed even when this operation wrote nothing: its answer may rest on another
        // writer's write that is not on disk yet. sled's flush returns at once when nothing
        // is dirty.
        if durable || self.flush_every_write {
            self.db().flush().map_err(sled_error)?;
        }
        Ok(outcome)
    }

    fn apply_each(&self, keys: &[Vec<u8>], op: &Op, clock: &TrustedClock) -> Result<()> {
        // Not flushed: a sweeper delete lost in a crash leaves an entry that is still expired.
        for key in keys {
            self.swap(key, op, clock)?;
        }
        Ok(())
    }

    fn update_many<R>(
        &self,
        keys: &[Vec<u8>],
        clock: &TrustedClock,
        decide: &DecideRaw<'_, R>,
    ) -> Result<R> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let result = self.db().transaction(|tx| {
            let mut raws = Vec::with_capacity(keys.len());
            for key in keys {
                raws.push(tx.get(key)?.map(|v| v.to_vec()));
            }
            let refs: Vec<Option<&[u8]>> = raws.iter().map(Option::as_deref).collect();
            let (writes, result) =
                decide(&refs, clock.now_ms()).map_err(ConflictableTransactionError::Abort)?;
            for (key, write) in keys.iter().zip(writes) {
                if let Some(bytes) = write {
                    tx.insert(key.as_slice(), bytes)?;
                }
            }
            Ok(result)
        });
        let result = match result {
            Ok(result) => result,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(sled_error(e)),
        };
        if self.flush_every_write {
            self.db().flush().map_err(sled_error)?;
        }
        Ok(result)
    }

    fn heads(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let range = self
            .db()
            .range::<&[u8], _>((scan_start(prefix, after), Bound::Unbounded))
            .map(|entry| {
                entry
                    .map(|(key, value)| (key.to_vec(), head(&value)))
                    .map_err(sled_error)
            });
        collect_heads(range, prefix, limit)
    }
}

/// Classifies a sled error, keeping it as the source.
fn sled_error(e: sled::Error) -> Error {
    let (kind, message) = match &e {
        // sled reports a held file lock as a plain I/O error; its wording is the only sign.
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => (
            ErrorKind::Locked,
            "the sled database is already open (in this process or another); close it first",
        ),
        sled::Error::Io(_) => (
            ErrorKind::Transient,
            "sled I/O failed; whether the write happened is unknown",
        ),
        sled::Error::Corruption { .. } => (
            ErrorKind::Corruption,
            "the sled database is damaged; restore it from a backup",
        ),
        _ => (ErrorKind::Permanent, "sled refused the operation"),
    };
    Error::new(kind, message).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, expiry: ExpiryOptions) -> Result<Core<SledStore>> {
        let options = SledOptions {
            expiry,
            ..SledOptions::default()
        };
        SledBackend::open_with(dir, options).map(|backend| backend.core)
    }

    fn put_raw(core: &Core<SledStore>, key: &[u8], raw: &[u8]) {
        core.store().db().insert(key, raw).expect("raw insert");
    }

    crate::embedded_common::tests::store_tests!();
}
