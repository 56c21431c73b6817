//! A backend wrapper that stops one chosen write at a cancel point, so a case can drop the
//! caller's future exactly there: before the write reaches the backend, or after it took
//! effect but before its reply came back. Deterministic: the case waits for the point to be
//! reached (a `Notify`), never for time to pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::backend::{Backend, ScanCursor, ScanPage, Ttl, TtlPolicy};
use crate::error::Result;

/// Where the chosen write stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Before it is sent: it never happens.
    Before,
    /// After it took effect: only its reply is lost.
    After,
    /// It is held back this long (real time, for a backend's TTL to elapse meanwhile), then
    /// sent as usual.
    Delay(Duration),
}

/// Wraps a backend; the `at`-th write (1-based, counting `set_nx`, `compare_and_swap`,
/// `compare_and_delete`, `set`, `incr`, `incr_durable`, `delete`, `expire`, `persist`) stops
/// for ever at `stop` after signalling `reached` (or, for [`Stop::Delay`], is only delayed).
pub(crate) struct CancelPoint {
    inner: Arc<dyn Backend>,
    at: usize,
    stop: Stop,
    writes: AtomicUsize,
    pub(crate) reached: Arc<Notify>,
}

impl CancelPoint {
    pub(crate) fn new(inner: Arc<dyn Backend>, at: usize, stop: Stop) -> CancelPoint {
        CancelPoint {
            inner,
            at,
            stop,
            writes: AtomicUsize::new(0),
            reached: Arc::new(Notify::new()),
        }
    }

    /// Runs one write, stopping there if it is the chosen one.
    async fn write<T>(&self, op: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n != self.at {
            return op.await;
        }
        match self.stop {
            Stop::Delay(delay) => {
                tokio::time::sleep(delay).await;
                return op.await;
            }
            Stop::After => drop(op.await),
            Stop::Before => {}
        }
        self.reached.notify_one();
        std::future::pending().await
    }
}

#[async_trait]
impl Backend for CancelPoint {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        self.inner.get_with_ttl(key).await
    }
    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        self.write(self.inner.set(key, value, ttl)).await
    }
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        self.write(self.inner.set_nx(key, value, ttl)).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.write(self.inner.compare_and_swap(key, expected, new, ttl))
            .await
    }
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        self.write(self.inner.compare_and_delete(key, expected))
            .await
    }
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.write(self.inner.delete(key)).await
    }
    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64> {
        self.write(self.inner.incr(key, delta, ttl_on_create)).await
    }
    async fn incr_durable(
        &self,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        self.write(self.inner.incr_durable(key, delta, ttl_on_create))
            .await
    }
    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        self.write(self.inner.expire(key, ttl)).await
    }
    async fn persist(&self, key: &[u8]) -> Result<bool> {
        self.write(self.inner.persist(key)).await
    }
    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        self.inner.ttl(key).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        self.inner.scan(prefix, cursor, limit).await
    }
    async fn now_ms(&self) -> Result<u64> {
        self.inner.now_ms().await
    }
}
