//! The [`Backend`] contract: the atomic key-value operations every primitive is built from,
//! with one set of semantics that every backend (the embedded engine, Redis, Valkey, Postgres,
//! sled, redb) obeys. The conformance suite (`conformance` feature) checks each rule below on
//! every backend.
//!
//! # Semantics every backend obeys
//! - **Keys and values are bytes.** NUL, 0xFF and non-UTF-8 bytes work in both; the empty
//!   value is a value (distinct from a missing key); the empty key is a key.
//! - **Limits.** Keys up to [`KEY_BYTES_MAX`] (1,024) bytes, values up to
//!   [`VALUE_BYTES_MAX`] (16 MiB), on every backend (a namespace prefix counts towards the
//!   key). An over-length key is [`ErrorKind::Limit`] on every operation, reads included
//!   (never a silent miss); an over-length value is [`ErrorKind::Limit`]; nothing is written.
//! - **TTLs** are `Duration`s of at least 1 ms and at most [`TTL_MAX`] (10 years);
//!   sub-millisecond parts round up. A zero TTL is [`ErrorKind::InvalidInput`], never a
//!   silent delete. A key with a TTL is invisible to every operation from the instant it
//!   expires; expiry is measured by the backend's own clock (the server's, for Redis, Valkey
//!   and Postgres).
//! - **`set`** replaces value and TTL (no TTL given: the key no longer expires).
//! - **`set_nx`** succeeds if the key is absent or expired.
//! - **`compare_and_swap`** swaps only if the current value equals `expected` byte for byte
//!   (`None`: the key must be absent or expired); its [`TtlPolicy`] says what happens to the TTL.
//! - **`incr`** treats a missing key as 0, accepts only Redis's integer grammar (optional `-`,
//!   digits, no leading zeros, no `+`, no spaces, no `-0`, fits an i64), fails with
//!   [`ErrorKind::NotAnInteger`] / [`ErrorKind::Overflow`] leaving the value unchanged, and
//!   stamps `ttl_on_create` only when it creates the key; it never changes an existing TTL.
//! - **`expire`** returns false for a missing key; **`persist`** returns true only if the key
//!   existed and had a TTL.
//! - **`scan`** returns live keys with a prefix, in pages. Every key present for the whole
//!   scan is returned at least once (Redis may repeat a key; the embedded engine and Postgres
//!   return each exactly once); order is unspecified; a page may hold fewer keys than `limit`
//!   (even none) while `next` is still `Some`; the scan is over when `next` is `None`.
//! - **`now_ms`** is the backend's trusted clock: the server's for Redis, Valkey and Postgres,
//!   the process's (monotonic-floored) for embedded backends. Primitives that compare times
//!   across application nodes (rate limiters, lock deadlines) use it, so skew between the
//!   nodes' own clocks does not matter.
//! - **Timeouts and cancellation.** Network backends bound every operation by their
//!   `op_timeout`. An operation that fails with [`ErrorKind::Timeout`] (or any error), or whose
//!   future the caller drops, has either taken effect before the error was returned (or the
//!   future dropped) or never will: it never takes effect after a later operation of the same
//!   handle was acknowledged, and it never leaves a busy connection to another caller. Whether
//!   it took effect is unknown; retrying an idempotent write is safe. (On a Redis/Valkey
//!   Cluster, the cluster client owns the per-node connections: the bound holds, the ordering
//!   guarantee is the single-server adapters'.)
//! - **Durability**: an acknowledged write is as durable as the backend is configured to be.
//!   `incr_durable` is acknowledged only once durable even where the configured default is
//!   relaxed (the embedded engine's `Periodic`, Redis/Valkey `appendfsync everysec` through
//!   `WAITAOF`, an unlogged Postgres table through its logged floor table); a backend that
//!   cannot make it durable fails with a typed error instead. Fencing counters use it.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};

pub mod notice;
pub mod rate;

pub use notice::{ReleaseNotice, ReleaseNotices};
pub use rate::{RateAlgorithm, RateMode, RateOutcome, RateRule, RateVerdict};

pub use keel_engine::{TTL_MAX, Ttl, TtlPolicy, parse_i64};

/// Largest key, in bytes, on every backend.
pub const KEY_BYTES_MAX: usize = keel_engine::KEY_BYTES_MAX_DEFAULT;
/// Largest value, in bytes, on every backend.
pub const VALUE_BYTES_MAX: usize = keel_engine::VALUE_BYTES_MAX_DEFAULT;
/// Largest page a scan returns, whatever `limit` asks.
pub const SCAN_LIMIT_MAX: usize = keel_engine::SCAN_LIMIT_MAX;

/// An opaque scan position; pass it back to continue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScanCursor(pub Vec<u8>);

/// One page of a prefix scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Live keys with the prefix (order unspecified).
    pub keys: Vec<Vec<u8>>,
    /// Where to continue; `None` when the scan is complete.
    pub next: Option<ScanCursor>,
}

/// The storage contract every primitive is written against. Object safe:
/// `Arc<dyn Backend>` is the usual way to hold one. See the module docs for the semantics.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and test output ("embedded", "memory", "redis", ...).
    fn name(&self) -> &str;

    /// The value of `key`.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// The value of `key` and its remaining TTL (`None`: no expiry).
    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>>;

    /// Sets `key` to `value`, replacing value and TTL.
    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()>;

    /// Sets `key` only if absent or expired; returns whether it did.
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool>;

    /// Replaces the value only if it equals `expected` (`None`: only if absent); returns
    /// whether it swapped.
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool>;

    /// Deletes `key` only if its value equals `expected`; returns whether it did.
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool>;

    /// Deletes `key`; returns whether a live key was deleted.
    async fn delete(&self, key: &[u8]) -> Result<bool>;

    /// Adds `delta` and returns the new value; `ttl_on_create` only applies when this creates
    /// the key.
    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64>;

    /// `incr`, acknowledged only once durable even if the backend's default durability is
    /// relaxed. Backends whose every write already has the configured durability use `incr`.
    async fn incr_durable(
        &self,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        self.incr(key, delta, ttl_on_create).await
    }

    /// Sets the TTL of an existing key; false if missing.
    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool>;

    /// Removes the TTL; true only if the key existed and had one.
    async fn persist(&self, key: &[u8]) -> Result<bool>;

    /// Whether the key exists and its remaining TTL.
    async fn ttl(&self, key: &[u8]) -> Result<Ttl>;

    /// One page of live keys starting with `prefix`. `limit` is a hint, capped at
    /// [`SCAN_LIMIT_MAX`].
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage>;

    /// The backend's trusted time, Unix milliseconds.
    async fn now_ms(&self) -> Result<u64>;

    /// Decides one rate-limit step atomically: every rule at one instant (`at_ms`, or the
    /// backend's clock), admitted only if every rule admits, and then counted in every rule's
    /// state; a denial or a [`RateMode::Peek`] writes nothing. See [`rate`] for the rules, the
    /// stored state and the algorithms.
    ///
    /// The default ([`rate::rate_limit_cas`]) is built on `now_ms`, `get` and
    /// `compare_and_swap`; backends override it with a one-round-trip native step (a script,
    /// one SQL statement, the engine's shard locks, a transaction) with the same answers.
    async fn rate_limit(
        &self,
        rules: &[RateRule<'_>],
        mode: RateMode,
        at_ms: Option<u64>,
    ) -> Result<RateOutcome> {
        rate::rate_limit_cas(self, rules, mode, at_ms).await
    }

    /// Tells the other processes (other handles) sharing this store that the hold on `key` was
    /// just released, so their waiters can try again at once (see [`notice`]). Best effort:
    /// an error means only that waiters elsewhere fall back to polling. The default does
    /// nothing (a backend no other process can reach, or one without messaging).
    async fn publish_release(&self, key: &[u8]) -> Result<()> {
        let _ = key;
        Ok(())
    }

    /// The release notices published through other handles of this store, or `None` if this
    /// backend cannot carry them (the default): waiters then poll. The first call may start a
    /// background subscription (a pub/sub connection, a `LISTEN` connection) that lives as
    /// long as the backend.
    fn release_notices(&self) -> Option<ReleaseNotices> {
        None
    }

    /// Deletes every key starting with `prefix` (e.g. a cache namespace); returns how many
    /// were deleted. Keys created during the call may survive. The default scans and deletes.
    async fn delete_prefix(&self, prefix: &[u8]) -> Result<u64> {
        let mut deleted = 0;
        let mut cursor = None;
        loop {
            let page = self.scan(prefix, cursor.as_ref(), 1000).await?;
            for key in &page.keys {
                if self.delete(key).await? {
                    deleted += 1;
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(deleted),
            }
        }
    }
}

/// Rejects a key over [`KEY_BYTES_MAX`]. Adapters call this before touching the server so
/// every backend refuses the same inputs with the same error.
pub fn check_key(key: &[u8]) -> Result<()> {
    if key.len() > KEY_BYTES_MAX {
        return Err(Error::new(
            ErrorKind::Limit,
            format!(
                "key is {} bytes, the limit is {KEY_BYTES_MAX} bytes; nothing was written",
                key.len()
            ),
        ));
    }
    Ok(())
}

/// Rejects a value over [`VALUE_BYTES_MAX`].
pub fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(Error::new(
            ErrorKind::Limit,
            format!(
                "value is {} bytes, the limit is {VALUE_BYTES_MAX} bytes; nothing was written",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Converts a TTL to whole milliseconds (rounding up) or rejects it: zero and anything over
/// [`TTL_MAX`] are [`ErrorKind::InvalidInput`].
pub fn ttl_ms(ttl: Duration) -> Result<u64> {
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    if ms == 0 || ttl > TTL_MAX {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "invalid TTL {ms} ms: a TTL must be at least 1 ms and at most {} ms; nothing was written",
                TTL_MAX.as_millis()
            ),
        ));
    }
    Ok(ms as u64)
}

/// The error `incr` returns for a non-integer value.
pub fn not_an_integer() -> Error {
    Error::new(
        ErrorKind::NotAnInteger,
        "value is not an integer or out of range; the value was left unchanged",
    )
}

/// The error `incr` returns on overflow.
pub fn overflow() -> Error {
    Error::new(
        ErrorKind::Overflow,
        "increment or decrement would overflow; the value was left unchanged",
    )
}
