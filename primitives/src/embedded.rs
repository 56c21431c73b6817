//! The contract on keel's own engine: [`Embedded`] wraps a [`keel_engine::Db`] (on disk or
//! memory-only). Reads run inline (they only take a shard read lock); writes are applied inline
//! and then *awaited*: the engine's `Pending` future is woken by the WAL writer thread, so
//! waiting for group commit never blocks a runtime thread.

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
    db: Db,
    durable: Db,
    name: &'static str,
}

impl Embedded {
    /// Wraps an open store.
    pub fn new(db: Db) -> Self {
        let name = if db.is_memory() { "memory" } else { "embedded" };
        Embedded {
            durable: db.with_durability(Durability::Immediate),
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
        Ok(db.submit(op)?.await?)
    }

    async fn run_bool(&self, op: Op<'_>) -> Result<bool> {
        match self.run(&self.db, op).await? {
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
        self.run(&self.db, Op::Set { key, value, ttl })
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
        self.run_int(&self.db, op).await
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
        self.run_int(&self.durable, op).await
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
        let pending = self.db.update_many(&keys, |states, now| {
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
