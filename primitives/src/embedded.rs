//! The contract on keel's own engine: [`Embedded`] wraps a [`keel_engine::Db`] (on disk or
//! memory-only). Reads run inline (they only take a shard read lock). A write first awaits
//! [`Db::writable`] (backpressure: the WAL queue's byte budget and an overdue snapshot, which
//! the engine's maintenance thread takes), then is applied inline through a
//! [`Db::for_async`] handle (which never waits before applying), then its `Pending` is
//! awaited: woken by the WAL writer thread. No step blocks a runtime thread beyond short
//! shard-lock and queue-mutex holds.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use keel_engine::{Db, Durability, Op, Options, Outcome};

use crate::backend::rate;
use crate::backend::{
    Backend, RateMode, RateOutcome, RateRule, ScanCursor, ScanPage, Ttl, TtlPolicy, check_key,
};
use crate::error::Result;

/// The embedded engine as a [`Backend`].
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The handle given to `new`, returned by `db()` (blocking callers keep its backpressure);
    /// reads go through it.
    db: Db,
    /// Async handles (`Db::for_async`) the contract's writes go through.
    writes: Db,
    durable_writes: Db,
    name: &'static str,
}

impl Embedded {
    /// Wraps an open store.
    pub fn new(db: Db) -> Self {
        let name = if db.is_memory() { "memory" } else { "embedded" };
        Embedded {
            durable_writes: db.with_durability(Durability::Immediate).for_async(),
            writes: db.for_async(),
            db,
            name,
        }
    }

    /// Opens (or creates) a durable store in `dir` with default options.
    ///
    /// # Errors
    /// As [`Db::open`]: locked by another process, corruption, I/O.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Ok(Embedded::new(Db::open(dir, Options::default())?))
    }

    /// A memory-only store.
    pub fn memory() -> Self {
        Embedded::new(Db::memory(Options::default()))
    }

    /// The underlying store.
    pub fn db(&self) -> &Db {
        &self.db
    }

    async fn run(&self, db: &Db, op: Op<'_>) -> Result<Outcome> {
        db.writable().await?;
        Ok(db.submit(op)?.await?)
    }

    async fn run_bool(&self, op: Op<'_>) -> Result<bool> {
        match self.run(&self.writes, op).await? {
            Outcome::Bool(b) => Ok(b),
            other => unreachable!("operation yields Bool, got {other:?}"),
        }
    }

    async fn run_int(&self, db: &Db, op: Op<'_>) -> Result<i64> {
        match self.run(db, op).await? {
            Outcome::Int(n) => Ok(n),
            other => unreachable!("incr yields Int, got {other:?}"),
        }
    }
}

#[async_trait]
impl Backend for Embedded {
    fn name(&self) -> &str {
        self.name
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        Ok(self.db.get(key))
    }

    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        check_key(key)?;
        Ok(self.db.get_with_ttl(key))
    }

    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        self.run(&self.writes, Op::Set { key, value, ttl })
            .await
            .map(|_| ())
    }

    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        self.run_bool(Op::SetNx { key, value, ttl }).await
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.run_bool(Op::CompareAndSwap {
            key,
            expected,
            new,
            ttl,
        })
        .await
    }

    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        self.run_bool(Op::CompareAndDelete { key, expected }).await
    }

    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.run_bool(Op::Delete { key }).await
    }

    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64> {
        let op = Op::Incr {
            key,
            delta,
            ttl_on_create,
        };
        self.run_int(&self.writes, op).await
    }

    async fn incr_durable(
        &self,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        let op = Op::Incr {
            key,
            delta,
            ttl_on_create,
        };
        self.run_int(&self.durable_writes, op).await
    }

    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        self.run_bool(Op::Expire { key, ttl }).await
    }

    async fn persist(&self, key: &[u8]) -> Result<bool> {
        self.run_bool(Op::Persist { key }).await
    }

    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        check_key(key)?;
        Ok(self.db.ttl(key))
    }

    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        let cursor = cursor.map(|c| keel_engine::ScanCursor::from_bytes(c.0.clone()));
        let page = self.db.scan(prefix, cursor.as_ref(), limit, false);
        Ok(ScanPage {
            keys: page.entries.into_iter().map(|e| e.key).collect(),
            next: page.next.map(|c| ScanCursor(c.as_bytes().to_vec())),
        })
    }

    async fn now_ms(&self) -> Result<u64> {
        Ok(self.db.now_ms())
    }

    /// The native step: every rule's state read, decided and written under the keys' shard
    /// locks, as one WAL record (see `Db::update_many`).
    async fn rate_limit(
        &self,
        rules: &[RateRule<'_>],
        mode: RateMode,
        at_ms: Option<u64>,
    ) -> Result<RateOutcome> {
        rate::validate(rules)?;
        let keys: Vec<&[u8]> = rules.iter().map(|r| r.key).collect();
        self.writes.writable().await?;
        let pending = self.writes.update_many(&keys, |states, now| {
            let (outcome, writes) = rate::decide(rules, states, at_ms.unwrap_or(now), mode);
            let writes = writes
                .into_iter()
                .map(|w| {
                    w.map(|w| {
                        let ttl = w.ttl_policy();
                        (w.value, ttl)
                    })
                })
                .collect();
            Ok((writes, outcome))
        })?;
        Ok(pending.await?)
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use keel_engine::storage::{DirLock, FsStorage, LockError, Storage, WritableFile};
    use keel_engine::{Batch, Db, Durability, Options};

    use super::Embedded;
    use crate::backend::Backend;

    /// A disk that writes about 16 MB/s: the real file system, with each write delayed in
    /// proportion to its size (the delay is the simulated device, on the engine's threads).
    struct SlowDisk;

    struct SlowFile(Box<dyn WritableFile>);

    impl WritableFile for SlowFile {
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            std::thread::sleep(Duration::from_micros(buf.len() as u64 / 16));
            self.0.write_all(buf)
        }
        fn sync_data(&mut self) -> io::Result<()> {
            self.0.sync_data()
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.0.truncate(len)
        }
    }

    impl Storage for SlowDisk {
        fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
            FsStorage.create_dir_all(dir)
        }
        fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
            FsStorage.list(dir)
        }
        fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
            FsStorage.read(path)
        }
        fn create(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
            Ok(Box::new(SlowFile(FsStorage.create(path)?)))
        }
        fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
            Ok(Box::new(SlowFile(FsStorage.open_append(path)?)))
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            FsStorage.rename(from, to)
        }
        fn remove(&self, path: &Path) -> io::Result<()> {
            FsStorage.remove(path)
        }
        fn len(&self, path: &Path) -> io::Result<u64> {
            FsStorage.len(path)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            FsStorage.sync_dir(dir)
        }
        fn lock(&self, path: &Path) -> Result<Box<dyn DirLock>, LockError> {
            FsStorage.lock(path)
        }
    }

    /// How late a 5 ms timer on the same current-thread runtime may fire while the writers run:
    /// well under what one blocking wait costs here (an overdue snapshot takes over 0.5 s on the
    /// slow disk, a drain of the queue 0.25 s), with room for a shared, loaded 2-core machine.
    const TIMER_LATENESS_MAX: Duration = Duration::from_millis(200);

    /// Issue 16, item 7: on a current-thread runtime, writers that outrun a slow disk (so
    /// they hit the WAL queue's backpressure) and outrun the maintenance thread's snapshots
    /// (so snapshots fall overdue) never block the runtime thread: a timer task on the same
    /// thread keeps its 5 ms schedule within `TIMER_LATENESS_MAX`.
    #[test]
    fn writes_never_block_the_runtime_through_backpressure_and_an_overdue_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options::default()
            .storage(Arc::new(SlowDisk))
            .durability(Durability::Buffered)
            .wal_queue_bytes(4 << 20)
            .snapshot_after_wal_bytes(4 << 20)
            // The maintenance thread never ticks on its own: it only runs when an async
            // writer asks it to take an overdue snapshot.
            .active_expiry(Duration::from_secs(3600), 256);
        let db = Db::open(dir.path(), options).unwrap();
        // 10 MB of small keys: every snapshot takes over half a second on the slow disk.
        for chunk in 0..10u32 {
            let mut batch = Batch::new();
            for i in 0..1000u32 {
                batch.set(format!("pre:{chunk}:{i}"), vec![b'p'; 1000], None);
            }
            db.write_batch(&batch).unwrap();
        }
        let snapshots_before = db.stats().snapshots;
        let embedded = Embedded::new(db.clone());
        // The timer driver is checked after every task poll (tokio's default is every 61): the
        // lateness then measures how long one poll of a writer holds the thread, not how the
        // scheduler batches a run of always-ready writers (each poll hashes and copies a
        // 256 KiB value, milliseconds in a debug build).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .event_interval(1)
            .build()
            .unwrap();
        let worst = rt.block_on(async move {
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let timer = {
                let done = Arc::clone(&done);
                tokio::spawn(async move {
                    let mut worst = Duration::ZERO;
                    let mut next = tokio::time::Instant::now();
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        next += Duration::from_millis(5);
                        tokio::time::sleep_until(next).await;
                        let late = tokio::time::Instant::now().saturating_duration_since(next);
                        worst = worst.max(late);
                        // Measure lateness per tick, not accumulated drift.
                        next = tokio::time::Instant::now();
                    }
                    worst
                })
            };
            let value = vec![b'v'; 256 * 1024];
            let writers: Vec<_> = (0..4u32)
                .map(|w| {
                    let (embedded, value) = (embedded.clone(), value.clone());
                    tokio::spawn(async move {
                        for i in 0..50u32 {
                            let key = format!("big:{w}:{}", i % 4);
                            embedded.set(key.as_bytes(), &value, None).await.unwrap();
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            for w in writers {
                w.await.unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            timer.await.unwrap()
        });
        let stats = db.stats();
        assert!(
            stats.backpressure_waits > 0,
            "the writers never hit backpressure: {stats:?}"
        );
        assert!(
            stats.snapshots > snapshots_before,
            "no snapshot ran during the writes: {stats:?}"
        );
        assert!(
            worst <= TIMER_LATENESS_MAX,
            "a 5 ms timer fired {worst:?} late: the runtime thread was blocked"
        );
        println!("worst timer lateness {worst:?}, {stats:?}");
        db.close().unwrap();
    }
}
