//! [`Namespaced`]: a key prefix in front of any backend, so several applications (or tenants)
//! can share one Redis, Valkey or Postgres without seeing each other's keys. The prefix counts
//! towards the key size limit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{
    Backend, RateMode, RateOutcome, RateRule, ReleaseNotices, ScanCursor, ScanPage, Ttl, TtlPolicy,
};
use crate::error::Result;

/// Wraps a backend so every key is stored as `prefix + key`; scans see only this namespace and
/// return keys without the prefix.
#[derive(Clone)]
pub struct Namespaced {
    inner: Arc<dyn Backend>,
    prefix: Vec<u8>,
}

impl std::fmt::Debug for Namespaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespaced")
            .field("inner", &self.inner.name())
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish()
    }
}

impl Namespaced {
    /// Keys of this handle live under `prefix` in `inner` (e.g. `b"billing:"`).
    pub fn new(inner: Arc<dyn Backend>, prefix: impl Into<Vec<u8>>) -> Self {
        Namespaced {
            inner,
            prefix: prefix.into(),
        }
    }

    fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }
}

#[async_trait]
impl Backend for Namespaced {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(&self.key(key)).await
    }
    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        self.inner.get_with_ttl(&self.key(key)).await
    }
    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        self.inner.set(&self.key(key), value, ttl).await
    }
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        self.inner.set_nx(&self.key(key), value, ttl).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.inner
            .compare_and_swap(&self.key(key), expected, new, ttl)
            .await
    }
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        self.inner
            .compare_and_delete(&self.key(key), expected)
            .await
    }
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.inner.delete(&self.key(key)).await
    }
    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64> {
        self.inner.incr(&self.key(key), delta, ttl_on_create).await
    }
    async fn incr_durable(
        &self,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        self.inner
            .incr_durable(&self.key(key), delta, ttl_on_create)
            .await
    }
    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        self.inner.expire(&self.key(key), ttl).await
    }
    async fn persist(&self, key: &[u8]) -> Result<bool> {
        self.inner.persist(&self.key(key)).await
    }
    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        self.inner.ttl(&self.key(key)).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        let mut page = self.inner.scan(&self.key(prefix), cursor, limit).await?;
        for key in &mut page.keys {
            key.drain(..self.prefix.len());
        }
        Ok(page)
    }
    async fn now_ms(&self) -> Result<u64> {
        self.inner.now_ms().await
    }
    async fn rate_limit(
        &self,
        rules: &[RateRule<'_>],
        mode: RateMode,
        at_ms: Option<u64>,
    ) -> Result<RateOutcome> {
        let keys: Vec<Vec<u8>> = rules.iter().map(|r| self.key(r.key)).collect();
        let prefixed: Vec<RateRule<'_>> = rules
            .iter()
            .zip(&keys)
            .map(|(r, key)| RateRule { key, ..*r })
            .collect();
        self.inner.rate_limit(&prefixed, mode, at_ms).await
    }
    async fn publish_release(&self, key: &[u8]) -> Result<()> {
        self.inner.publish_release(&self.key(key)).await
    }
    fn release_notices(&self) -> Option<ReleaseNotices> {
        Some(self.inner.release_notices()?.within(&self.prefix))
    }
}
