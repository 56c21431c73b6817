//! The [`Backend`] contract on Valkey: [`ValkeyBackend`]. Valkey speaks Redis's protocol, so
//! this is the [Redis adapter](crate::redis)'s implementation, with the same client, options
//! ([`RedisOptions`]), scripts and error classification; this module owns only the Valkey
//! entry point, which accepts Valkey's URL schemes and insists the server really is Valkey.
//!
//! Connect reads `INFO server` (`valkey_version`) and, where the server's version has a native
//! conditional command, uses it instead of a Lua script:
//! - `compare_and_swap` with an expected value: `SET key new IFEQ expected`, with `KEEPTTL`,
//!   `PX ms` or nothing for the three [`TtlPolicy`]s (Valkey 8.1 and newer; it replies OK
//!   when it swapped, nil when not).
//! - `compare_and_delete`: `DELIFEQ key expected` (Valkey 9.0 and newer; it replies 1 or 0).
//!
//! Older Valkey versions get the Redis adapter's scripts for both. Everything else maps to the
//! same commands as on Redis.

use std::time::Duration;

use async_trait::async_trait;
use keel_primitives::{Backend, Result, ScanCursor, ScanPage, Ttl, TtlPolicy};

use crate::redis::{Flavor, RedisBackend, RedisOptions};

/// The keel contract on a Valkey server. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct ValkeyBackend {
    inner: RedisBackend,
}

impl ValkeyBackend {
    /// Connects to `url` with default [`RedisOptions`]: `valkey://[user:password@]host[:port][/db]`
    /// (or `redis://`), `valkeys://` (or `rediss://`) for TLS, `valkey+unix:///path`.
    ///
    /// # Errors
    /// See [`connect_with`](ValkeyBackend::connect_with).
    pub async fn connect(url: &str) -> Result<Self> {
        ValkeyBackend::connect_with(url, RedisOptions::default()).await
    }

    /// Connects to `url`, checks the server answers `PING`, and detects its version to choose
    /// the native conditional commands (see the module docs).
    ///
    /// # Errors
    /// As [`RedisBackend::connect_with`], and [`ErrorKind::Permanent`] if the server is Redis
    /// rather than Valkey (use [`RedisBackend`] for it).
    ///
    /// [`ErrorKind::Permanent`]: keel_primitives::ErrorKind::Permanent
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self> {
        let inner = RedisBackend::open(url, options, Flavor::Valkey).await?;
        Ok(ValkeyBackend { inner })
    }
}

impl From<ValkeyBackend> for RedisBackend {
    /// The same connection, as the Redis adapter's type.
    fn from(valkey: ValkeyBackend) -> Self {
        valkey.inner
    }
}

#[async_trait]
impl Backend for ValkeyBackend {
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
        self.inner.set(key, value, ttl).await
    }
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        self.inner.set_nx(key, value, ttl).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.inner.compare_and_swap(key, expected, new, ttl).await
    }
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        self.inner.compare_and_delete(key, expected).await
    }
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64> {
        self.inner.incr(key, delta, ttl_on_create).await
    }
    async fn publish_release(&self, key: &[u8]) -> Result<()> {
        self.inner.publish_release(key).await
    }
    fn release_notices(&self) -> Option<keel_primitives::backend::ReleaseNotices> {
        self.inner.release_notices()
    }
    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        self.inner.expire(key, ttl).await
    }
    async fn persist(&self, key: &[u8]) -> Result<bool> {
        self.inner.persist(key).await
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
    async fn rate_limit(
        &self,
        rules: &[keel_primitives::backend::RateRule<'_>],
        mode: keel_primitives::backend::RateMode,
        at_ms: Option<u64>,
    ) -> Result<keel_primitives::backend::RateOutcome> {
        self.inner.rate_limit(rules, mode, at_ms).await
    }

    async fn now_ms(&self) -> Result<u64> {
        self.inner.now_ms().await
    }
}

#[cfg(test)]
mod tests {
    use keel_primitives::ErrorKind;

    use super::*;
    use crate::redis::test_server::{self, unique};
    use crate::redis::{Server, Version, redis_scheme};

    fn valkey_url() -> String {
        test_server::url("KEEL_TEST_VALKEY_URL", "valkey://127.0.0.1:6390/")
    }

    async fn valkey_server() -> ValkeyBackend {
        let url = valkey_url();
        match ValkeyBackend::connect(&url).await {
            Ok(b) => b,
            Err(e) => panic!("cannot connect to KEEL_TEST_VALKEY_URL={url}: {e}"),
        }
    }

    /// `calls` of one command in `INFO commandstats`, read on a connection of its own.
    async fn calls(command: &str) -> u64 {
        let client = redis::Client::open(redis_scheme(&valkey_url()).as_ref())
            .unwrap_or_else(|e| panic!("KEEL_TEST_VALKEY_URL does not parse: {e}"));
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to KEEL_TEST_VALKEY_URL: {e}"));
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("INFO commandstats failed: {e}"));
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Both conditional writes, every TTL policy, binary values: what the native commands and
    /// the scripts must agree on.
    async fn check_conditional_writes(b: &dyn Backend, key: &[u8]) {
        let secs = Duration::from_secs;
        let remaining = |ttl: Ttl| match ttl {
            Ttl::Remaining(d) => d,
            other => panic!("expected a TTL, got {other:?}"),
        };
        assert!(
            !b.compare_and_swap(key, Some(b"a"), b"b", TtlPolicy::Keep)
                .await
                .unwrap()
        );
        assert_eq!(
            b.get(key).await.unwrap(),
            None,
            "a missing key is never swapped"
        );
        b.set(key, b"a\x00\xff", Some(secs(60))).await.unwrap();
        assert!(
            !b.compare_and_swap(key, Some(b"a"), b"x", TtlPolicy::Clear)
                .await
                .unwrap()
        );
        assert!(
            remaining(b.ttl(key).await.unwrap()) > secs(50),
            "a failed swap keeps the TTL"
        );
        assert!(
            b.compare_and_swap(key, Some(b"a\x00\xff"), b"b", TtlPolicy::Keep)
                .await
                .unwrap()
        );
        assert!(
            remaining(b.ttl(key).await.unwrap()) > secs(50),
            "Keep keeps the TTL"
        );
        assert!(
            b.compare_and_swap(key, Some(b"b"), b"c", TtlPolicy::Set(secs(1000)))
                .await
                .unwrap()
        );
        assert!(
            remaining(b.ttl(key).await.unwrap()) > secs(900),
            "Set sets the TTL"
        );
        assert!(
            b.compare_and_swap(key, Some(b"c"), b"d", TtlPolicy::Clear)
                .await
                .unwrap()
        );
        assert_eq!(
            b.ttl(key).await.unwrap(),
            Ttl::NoExpiry,
            "Clear clears the TTL"
        );
        assert_eq!(b.get(key).await.unwrap(), Some(b"d".to_vec()));
        assert!(!b.compare_and_delete(key, b"D").await.unwrap());
        assert!(!b.compare_and_delete(key, b"").await.unwrap());
        assert!(b.compare_and_delete(key, b"d").await.unwrap());
        assert_eq!(b.get(key).await.unwrap(), None);
        assert!(!b.compare_and_delete(key, b"d").await.unwrap());
    }

    #[tokio::test]
    async fn valkey_9_is_detected_with_both_native_commands() {
        let b = valkey_server().await;
        assert_eq!(b.name(), "valkey");
        let server = RedisBackend::from(b).server();
        assert!(
            server.version.is_some_and(|v| v >= Version(9, 0, 0)),
            "this test expects Valkey 9.0 or newer at KEEL_TEST_VALKEY_URL, found {server:?}"
        );
        assert!(server.has_set_ifeq() && server.has_delifeq(), "{server:?}");
    }

    /// One test, not two: the script half would make the native half's "no script ran" count
    /// wrong if they ran side by side.
    #[tokio::test]
    async fn native_commands_replace_the_scripts_which_remain_the_fallback() {
        let b = valkey_server().await;
        let (delifeq, evalsha) = (calls("delifeq").await, calls("evalsha").await);
        check_conditional_writes(&b, &unique("native")).await;
        // check_conditional_writes calls compare_and_delete four times.
        assert!(
            calls("delifeq").await >= delifeq + 4,
            "DELIFEQ was not used"
        );
        assert_eq!(
            calls("evalsha").await,
            evalsha,
            "a script ran where a native command exists"
        );

        let b = RedisBackend::from(b).assuming(Server {
            flavor: Some(Flavor::Valkey),
            version: Some(Version(8, 0, 0)),
        });
        check_conditional_writes(&b, &unique("scripts")).await;
        assert!(
            calls("evalsha").await > evalsha,
            "Valkey 8.0 gets the scripts"
        );
        let b = b.assuming(Server {
            flavor: Some(Flavor::Valkey),
            version: Some(Version(8, 1, 0)),
        });
        check_conditional_writes(&b, &unique("ifeq-only")).await;
    }

    #[tokio::test]
    async fn valkey_backend_refuses_a_redis_server() {
        let url = test_server::url("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/");
        let err = ValkeyBackend::connect(&url).await.err();
        let kind = err.as_ref().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::Permanent), "{err:?}");
    }
}
