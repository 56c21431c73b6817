//! The contract on redb 4: [`RedbBackend`] keeps every key in one table, `keel`
//! (`&[u8]` → `&[u8]`), of a single redb file. It owns only the translation; the value layout,
//! the operation semantics, expiry and the sweeper are shared with the sled adapter.
//!
//! **Value layout.** Each stored value is a 9-byte header (format byte `1`, then the absolute
//! expiry in Unix milliseconds as a little-endian u64, 0 for none) followed by the caller's
//! bytes. A value that does not decode is reported as [`ErrorKind::Corruption`].
//!
//! **Atomicity and durability.** Every write is one redb write transaction: read the entry,
//! decide, write, commit. redb runs write transactions one at a time, so each operation is
//! atomic per key, and a commit uses redb's default durability: it returns only once the data
//! is fsynced. Every acknowledged write therefore survives a crash, including `incr` (so
//! `incr_durable` is `incr`). The price is one fsync per write, and writes do not overlap: a
//! burst of concurrent writers queues behind the disk's fsync rate. An operation that writes
//! nothing (a failed `set_nx`, compare-and-swap or `incr`) aborts its transaction instead of
//! committing it, and costs no fsync.
//!
//! **Expiry.** Lazy (an expired entry is absent for every operation) plus a background sweeper
//! thread that removes expired entries in bounded batches, one write transaction per batch
//! that re-reads each entry and removes it only if it is still expired. The sweeper stops when
//! the backend is dropped.
//!
//! Every redb call may block, so each operation runs on the Tokio blocking pool.

use std::ops::Bound;
use std::path::Path;

use keel_primitives::{Error, ErrorKind, Result};
use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, Table, TableDefinition};

pub use crate::embedded_common::ExpiryOptions;
use crate::embedded_common::{
    Core, DecideRaw, Op, Outcome, Store, TrustedClock, Write, backend_via_core, collect_heads,
    head, scan_start,
};

/// The one table keel keeps its keys in.
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("keel");

/// Options for [`RedbBackend::open_with`].
#[derive(Debug, Clone, Default)]
pub struct RedbOptions {
    /// The expiry clock and the sweeper's pace.
    pub expiry: ExpiryOptions,
}

/// keel's [`Backend`](keel_primitives::Backend) on a redb file. See the module docs for the
/// layout, durability and expiry.
#[derive(Debug)]
pub struct RedbBackend {
    core: Core<RedbStore>,
}

impl RedbBackend {
    /// Opens (or creates) the redb file at `path` with [`RedbOptions::default`].
    ///
    /// # Errors
    /// As [`RedbBackend::open_with`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        RedbBackend::open_with(path, RedbOptions::default())
    }

    /// Opens (or creates) the redb file at `path`.
    ///
    /// # Errors
    /// [`ErrorKind::Locked`] if the file is already open (in this process or another);
    /// [`ErrorKind::Corruption`] if redb finds it damaged; [`ErrorKind::Transient`] on I/O
    /// errors; [`ErrorKind::Permanent`] if the file is not a redb file this version reads or
    /// its `keel` table has other types; [`ErrorKind::InvalidInput`] for invalid
    /// [`ExpiryOptions`].
    pub fn open_with(path: impl AsRef<Path>, options: RedbOptions) -> Result<Self> {
        let db = Database::create(path).map_err(redb_error)?;
        // Create the table now, so readers can open it before the first write.
        let txn = db.begin_write().map_err(redb_error)?;
        txn.open_table(TABLE).map_err(redb_error)?;
        txn.commit().map_err(redb_error)?;
        Ok(RedbBackend {
            core: Core::new(RedbStore { db }, options.expiry)?,
        })
    }
}

backend_via_core!(RedbBackend);

struct RedbStore {
    db: Database,
}

type KeelTable<'txn> = Table<'txn, &'static [u8], &'static [u8]>;

impl RedbStore {
    /// A read-only view of the table as of now.
    fn read_table(&self) -> Result<ReadOnlyTable<&'static [u8], &'static [u8]>> {
        let txn = self.db.begin_read().map_err(redb_error)?;
        txn.open_table(TABLE).map_err(redb_error)
    }

    /// Runs `body` in one write transaction, with now read once the transaction is ours.
    /// Commits (durably) if `body` says it wrote, aborts otherwise or on error.
    fn write<T>(
        &self,
        clock: &TrustedClock,
        body: impl FnOnce(&mut KeelTable<'_>, u64) -> Result<(bool, T)>,
    ) -> Result<T> {
        let txn = self.db.begin_write().map_err(redb_error)?;
        let now_ms = clock.now_ms();
        let result = txn
            .open_table(TABLE)
            .map_err(redb_error)
            .and_then(|mut table| body(&mut table, now_ms));
        match result {
            Ok((true, answer)) => {
                txn.commit().map_err(redb_error)?;
                Ok(answer)
            }
            Ok((false, answer)) => {
                txn.abort().map_err(redb_error)?;
                Ok(answer)
            }
            Err(e) => {
                // The operation's own error says what went wrong; an abort failure after it
                // would only hide that, and redb refuses further writes after an I/O error
                // anyway.
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    /// Applies `op` to `key` inside a write transaction; returns whether it wrote.
    fn apply_in(
        table: &mut KeelTable<'_>,
        key: &[u8],
        op: &Op,
        now_ms: u64,
    ) -> Result<(bool, Outcome)> {
        let (write, outcome) = {
            let current = table.get(key).map_err(redb_error)?;
            op.apply(current.as_ref().map(|guard| guard.value()), now_ms)?
        };
        match write {
            Write::Nothing => return Ok((false, outcome)),
            Write::Put(bytes) => {
                table.insert(key, bytes.as_slice()).map_err(redb_error)?;
            }
            Write::Remove => {
                table.remove(key).map_err(redb_error)?;
            }
        }
        Ok((true, outcome))
    }
}

impl Store for RedbStore {
    const NAME: &'static str = "redb";

    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let table = self.read_table()?;
        let found = table.get(key).map_err(redb_error)?;
        Ok(found.map(|guard| guard.value().to_vec()))
    }

    fn apply(&self, key: &[u8], op: &Op, clock: &TrustedClock, _durable: bool) -> Result<Outcome> {
        // Every commit is durable already, so `durable` asks for nothing more.
        self.write(clock, |table, now_ms| {
            Self::apply_in(table, key, op, now_ms)
        })
    }

    fn apply_each(&self, keys: &[Vec<u8>], op: &Op, clock: &TrustedClock) -> Result<()> {
        self.write(clock, |table, now_ms| {
            let mut wrote = false;
            for key in keys {
                wrote |= Self::apply_in(table, key, op, now_ms)?.0;
            }
            Ok((wrote, ()))
        })
    }

    fn update_many<R>(
        &self,
        keys: &[Vec<u8>],
        clock: &TrustedClock,
        decide: &DecideRaw<'_, R>,
    ) -> Result<R> {
        self.write(clock, |table, now_ms| {
            let mut raws = Vec::with_capacity(keys.len());
            for key in keys {
                raws.push(
                    table
                        .get(key.as_slice())
                        .map_err(redb_error)?
                        .map(|guard| guard.value().to_vec()),
                );
            }
            let refs: Vec<Option<&[u8]>> = raws.iter().map(Option::as_deref).collect();
            let (writes, result) = decide(&refs, now_ms)?;
            let mut wrote = false;
            for (key, write) in keys.iter().zip(writes) {
                if let Some(bytes) = write {
                    table
                        .insert(key.as_slice(), bytes.as_slice())
                        .map_err(redb_error)?;
                    wrote = true;
                }
            }
            Ok((wrote, result))
        })
    }

    fn heads(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let table = self.read_table()?;
        let range = table
            .range::<&[u8]>((scan_start(prefix, after), Bound::Unbounded))
            .map_err(redb_error)?
            .map(|entry| {
                entry
                    .map(|(key, value)| (key.value().to_vec(), head(value.value())))
                    .map_err(redb_error)
            });
        collect_heads(range, prefix, limit)
    }
}

/// Classifies a redb error, keeping it as the source.
fn redb_error(e: impl Into<redb::Error>) -> Error {
    let e: redb::Error = e.into();
    let (kind, message) = match &e {
        redb::Error::DatabaseAlreadyOpen => (
            ErrorKind::Locked,
            "the redb file is already open (in this process or another); close it first",
        ),
        redb::Error::Io(_) => (
            ErrorKind::Transient,
            "redb I/O failed; whether the write happened is unknown",
        ),
        redb::Error::PreviousIo => (
            ErrorKind::Poisoned,
            "redb refuses to write after an earlier I/O failure; reopen the database",
        ),
        redb::Error::Corrupted(_) => (
            ErrorKind::Corruption,
            "the redb file is damaged; restore it from a backup",
        ),
        redb::Error::ValueTooLarge(_) => (ErrorKind::Limit, "the value is too large for redb"),
        _ => (ErrorKind::Permanent, "redb refused the operation"),
    };
    Error::new(kind, message).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, expiry: ExpiryOptions) -> Result<Core<RedbStore>> {
        let options = RedbOptions { expiry };
        RedbBackend::open_with(dir.join("keel.redb"), options).map(|backend| backend.core)
    }

    fn put_raw(core: &Core<RedbStore>, key: &[u8], raw: &[u8]) {
        let txn = core.store().db.begin_write().expect("begin");
        txn.open_table(TABLE)
            .expect("table")
            .insert(key, raw)
            .expect("insert");
        txn.commit().expect("commit");
    }

    crate::embedded_common::tests::store_tests!();
}
