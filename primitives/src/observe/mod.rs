//! Observability: [`Observed`], a [`Backend`] that wraps any backend and reports every contract
//! operation as a `tracing` span and as metrics through the [`metrics`] facade; the metric
//! names the primitives report their decisions under; and [`EngineGauges`], which publishes
//! the embedded engine's own figures ([`keel_engine::Stats`]) as gauges.
//!
//! Everything here sits on the contract and never below it: `Observed` sees what a primitive
//! sees (one call, its outcome, its latency), not what a backend does inside the call. The
//! `metrics` facade does nothing until the application installs a recorder (for example
//! `metrics-exporter-prometheus`), and a `tracing` span costs a branch while no subscriber wants
//! it, so both are always compiled in.
//!
//! Keys are never logged raw: a span carries a 48-bit BLAKE3 digest of the key (`k:` and 12 hex
//! digits), computed only when a subscriber records the span. Metric labels carry no keys at
//! all, only bounded sets (backend, operation, outcome, error kind, a primitive's name).
//!
//! # Metrics
//! | name | type | labels |
//! |---|---|---|
//! | [`BACKEND_OPS_TOTAL`] | counter | `backend`, `op`, `outcome` (`ok`, `error`) |
//! | [`BACKEND_OP_SECONDS`] | histogram | `backend`, `op` |
//! | [`BACKEND_ERRORS_TOTAL`] | counter | `backend`, `op`, `kind` ([`ErrorKind::as_str`]) |
//! | [`RATELIMIT_DECISIONS_TOTAL`] | counter | `limiter`, `outcome` (`allowed`, `denied`) |
//! | [`CACHE_REQUESTS_TOTAL`] | counter | `cache` (`value`, `http`), `outcome` |
//! | [`CACHE_COALESCED_TOTAL`] | counter | `cache` |
//! | [`BREAKER_TRANSITIONS_TOTAL`] | counter | `breaker`, `from`, `to` |
//! | [`IDEMPOTENCY_REQUESTS_TOTAL`] | counter | `outcome` |
//! | [`SESSION_LOADS_TOTAL`] | counter | `outcome` (`found`, `missing`, `expired`, `error`) |
//! | [`SESSION_SAVES_TOTAL`] | counter | `outcome` |
//! | [`LOCK_ACQUISITIONS_TOTAL`] | counter | `outcome` (`acquired`, `busy`, `error`; `timeout`) |
//! | [`LOCK_LOSSES_TOTAL`] | counter | `reason` (`renewal`, `release`, `deadline`) |
//! | `keel_engine_*` | gauge | none (see [`EngineGauges`]) |

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metrics::{Key, Label, Metadata, SharedString, counter};
use tracing::Instrument;
use tracing::field::Empty;

use crate::backend::{
    Backend, RateMode, RateOutcome, RateRule, ScanCursor, ScanPage, Ttl, TtlPolicy,
};
use crate::error::{ErrorKind, Result};

mod engine;

pub use engine::*;

/// Contract operations, by backend, operation and outcome (`ok` or `error`).
pub const BACKEND_OPS_TOTAL: &str = "keel_backend_ops_total";
/// Latency of contract operations in seconds, by backend and operation (both outcomes).
pub const BACKEND_OP_SECONDS: &str = "keel_backend_op_seconds";
/// Failed contract operations, by backend, operation and error kind.
pub const BACKEND_ERRORS_TOTAL: &str = "keel_backend_errors_total";
/// Rate-limit decisions (a consuming check; peeks are not decisions), by limiter and outcome.
/// A stack of policies counts once, under its policies' names joined by `+`.
pub const RATELIMIT_DECISIONS_TOTAL: &str = "keel_ratelimit_decisions_total";
/// Cache lookups by cache (`value`: [`Cache`](crate::cache::Cache); `http`: the response
/// cache) and outcome (`hit`, `miss`, `stale`; the HTTP cache also `revalidated`, `bypass`).
/// Each lookup counts once.
pub const CACHE_REQUESTS_TOTAL: &str = "keel_cache_requests_total";
/// Lookups answered by another caller's computation in this process (single-flight) instead
/// of their own; each is also counted (as `miss` or `stale`) in [`CACHE_REQUESTS_TOTAL`].
pub const CACHE_COALESCED_TOTAL: &str = "keel_cache_coalesced_total";
/// Circuit-breaker state changes seen by this process, by breaker, `from` and `to` state.
pub const BREAKER_TRANSITIONS_TOTAL: &str = "keel_breaker_transitions_total";
/// Idempotency-key claims by outcome: `claimed`, `replayed`, `in_flight`, `mismatch`,
/// `not_replayable`, `error`.
pub const IDEMPOTENCY_REQUESTS_TOTAL: &str = "keel_idempotency_requests_total";
/// Session records read from the backend, by outcome (`found`, `missing`, `expired`,
/// `error`). A session never used by its request is not loaded and not counted.
pub const SESSION_LOADS_TOTAL: &str = "keel_session_loads_total";
/// Session saves by outcome: `unchanged`, `stored`, `removed`, `conflict`, `ended`,
/// `too_large`, `error`.
pub const SESSION_SAVES_TOTAL: &str = "keel_session_saves_total";
/// Lock acquisition attempts by outcome: `acquired`, `busy` (held by another owner; a waiting
/// `acquire` counts one per attempt), `error`; and `timeout` once when a wait runs out.
pub const LOCK_ACQUISITIONS_TOTAL: &str = "keel_lock_acquisitions_total";
/// Leases found lost, by when: `renewal` (a renewal found another owner or no key),
/// `release` (the release found it gone), `deadline` (renewals failed until the deadline).
pub const LOCK_LOSSES_TOTAL: &str = "keel_lock_losses_total";

/// The `op` label of every contract operation, in the trait's order.
pub const OPS: &[&str] = &[
    "get",
    "get_with_ttl",
    "set",
    "set_nx",
    "compare_and_swap",
    "compare_and_delete",
    "delete",
    "incr",
    "incr_durable",
    "expire",
    "persist",
    "ttl",
    "scan",
    "now_ms",
    "rate_limit",
    "delete_prefix",
];

// Indexes into `OPS`, one per operation.
const GET: usize = 0;
const GET_WITH_TTL: usize = 1;
const SET: usize = 2;
const SET_NX: usize = 3;
const COMPARE_AND_SWAP: usize = 4;
const COMPARE_AND_DELETE: usize = 5;
const DELETE: usize = 6;
const INCR: usize = 7;
const INCR_DURABLE: usize = 8;
const EXPIRE: usize = 9;
const PERSIST: usize = 10;
const TTL: usize = 11;
const SCAN: usize = 12;
const NOW_MS: usize = 13;
const RATE_LIMIT: usize = 14;
const DELETE_PREFIX: usize = 15;
const _: () = assert!(OPS.len() == DELETE_PREFIX + 1);

/// Registers a description (and unit) for every metric keel reports with the installed
/// recorder, so an exporter can print `# HELP` lines. Call it once after installing the
/// recorder; without one it does nothing.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(BACKEND_OPS_TOTAL, "Backend contract operations by outcome");
    describe_histogram!(
        BACKEND_OP_SECONDS,
        Unit::Seconds,
        "Backend contract operation latency"
    );
    describe_counter!(
        BACKEND_ERRORS_TOTAL,
        "Failed backend operations by error kind"
    );
    describe_counter!(RATELIMIT_DECISIONS_TOTAL, "Rate-limit decisions");
    describe_counter!(CACHE_REQUESTS_TOTAL, "Cache lookups by outcome");
    describe_counter!(
        CACHE_COALESCED_TOTAL,
        "Cache misses served by another caller's computation"
    );
    describe_counter!(BREAKER_TRANSITIONS_TOTAL, "Circuit-breaker state changes");
    describe_counter!(
        IDEMPOTENCY_REQUESTS_TOTAL,
        "Idempotency-key claims by outcome"
    );
    describe_counter!(SESSION_LOADS_TOTAL, "Session records loaded by outcome");
    describe_counter!(SESSION_SAVES_TOTAL, "Session saves by outcome");
    describe_counter!(LOCK_ACQUISITIONS_TOTAL, "Lock acquisitions by outcome");
    describe_counter!(LOCK_LOSSES_TOTAL, "Lock leases found lost");
    engine::describe();
}

/// A [`Backend`] that reports every operation of the backend it wraps: one `tracing` span
/// (`keel.backend`, target `keel::backend`, level DEBUG) per call with the fields `backend`,
/// `op`, `key` (a digest, see the [module docs](self)), `outcome` (`ok` or the error kind) and
/// `elapsed_us`, one event when the call ends (TRACE when it succeeded, DEBUG when it failed),
/// and the `keel_backend_*` metrics. Every method delegates to the wrapped backend, the
/// defaulted ones too (`incr_durable`, `rate_limit`, `delete_prefix`), so a backend's native
/// steps are kept; results and errors pass through unchanged.
///
/// [`keel::connect`](https://docs.rs/keel) wraps every backend it opens in one.
pub struct Observed<B: ?Sized = dyn Backend> {
    inner: Arc<B>,
    label: SharedString,
    /// The metric keys of every operation, built once: an operation then costs the recorder
    /// a lookup, not a key to build and hash (and with no recorder, nothing).
    keys: Arc<[OpKeys]>,
}

/// The keys one operation reports under.
struct OpKeys {
    ok: Key,
    error: Key,
    seconds: Key,
}

impl OpKeys {
    fn all(label: &SharedString) -> Arc<[OpKeys]> {
        let backend = || Label::new("backend", label.clone());
        OPS.iter()
            .map(|&op| {
                let ops = |outcome| {
                    Key::from_parts(
                        BACKEND_OPS_TOTAL,
                        vec![
                            backend(),
                            Label::new("op", op),
                            Label::new("outcome", outcome),
                        ],
                    )
                };
                OpKeys {
                    ok: ops("ok"),
                    error: ops("error"),
                    seconds: Key::from_parts(
                        BACKEND_OP_SECONDS,
                        vec![backend(), Label::new("op", op)],
                    ),
                }
            })
            .collect()
    }
}

/// Where the wrapper's metrics come from, for recorders that filter on it.
static METADATA: Metadata<'static> =
    Metadata::new("keel::backend", metrics::Level::INFO, Some(module_path!()));

impl<B: Backend + ?Sized> Observed<B> {
    /// Wraps `inner`; its metrics carry `backend = inner.name()`.
    pub fn new(inner: Arc<B>) -> Self {
        let label = SharedString::from(Arc::<str>::from(inner.name()));
        let keys = OpKeys::all(&label);
        Observed { inner, label, keys }
    }

    /// Wraps `inner`; its metrics and spans carry `backend = label` (to tell apart two
    /// backends of one kind, e.g. `"sessions"` and `"cache"` on two Redis servers).
    pub fn with_label(inner: Arc<B>, label: impl Into<String>) -> Self {
        let label = SharedString::from(Arc::<str>::from(label.into()));
        let keys = OpKeys::all(&label);
        Observed { inner, label, keys }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &Arc<B> {
        &self.inner
    }

    /// The `backend` label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs one operation inside its span and records its outcome.
    async fn observe<T>(
        &self,
        op: usize,
        key: Option<&[u8]>,
        call: impl Future<Output = Result<T>> + Send,
    ) -> Result<T> {
        let span = tracing::debug_span!(
            target: "keel::backend",
            "keel.backend",
            backend = &*self.label,
            op = OPS[op],
            key = Empty,
            outcome = Empty,
            elapsed_us = Empty,
        );
        if let Some(key) = key
            && !span.is_disabled()
        {
            span.record("key", redact(key).as_str());
        }
        let started = Instant::now();
        let result = call.instrument(span.clone()).await;
        let elapsed = started.elapsed();
        self.record(op, &span, elapsed, result.as_ref().err().map(|e| e.kind()));
        result
    }

    fn record(&self, op: usize, span: &tracing::Span, elapsed: Duration, err: Option<ErrorKind>) {
        let outcome = err.map_or("ok", ErrorKind::as_str);
        if !span.is_disabled() {
            let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
            span.record("outcome", outcome);
            span.record("elapsed_us", elapsed_us);
            // The span carries the fields; the event marks the end for subscribers that print
            // events only.
            match err {
                None => {
                    tracing::trace!(target: "keel::backend", parent: span, "backend operation done")
                }
                Some(_) => {
                    tracing::debug!(target: "keel::backend", parent: span, "backend operation failed")
                }
            }
        }
        let keys = &self.keys[op];
        metrics::with_recorder(|recorder| {
            let ops = if err.is_none() { &keys.ok } else { &keys.error };
            recorder.register_counter(ops, &METADATA).increment(1);
            recorder
                .register_histogram(&keys.seconds, &METADATA)
                .record(elapsed.as_secs_f64());
            if let Some(kind) = err {
                let errors = Key::from_parts(
                    BACKEND_ERRORS_TOTAL,
                    vec![
                        Label::new("backend", self.label.clone()),
                        Label::new("op", OPS[op]),
                        Label::new("kind", kind.as_str()),
                    ],
                );
                recorder.register_counter(&errors, &METADATA).increment(1);
            }
        });
    }
}

impl<B: ?Sized> Clone for Observed<B> {
    fn clone(&self) -> Self {
        Observed {
            inner: Arc::clone(&self.inner),
            label: self.label.clone(),
            keys: Arc::clone(&self.keys),
        }
    }
}

impl<B: ?Sized> fmt::Debug for Observed<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed")
            .field("backend", &&*self.label)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<B: Backend + ?Sized> Backend for Observed<B> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.observe(GET, Some(key), self.inner.get(key)).await
    }
    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        self.observe(GET_WITH_TTL, Some(key), self.inner.get_with_ttl(key))
            .await
    }
    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        self.observe(SET, Some(key), self.inner.set(key, value, ttl))
            .await
    }
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        self.observe(SET_NX, Some(key), self.inner.set_nx(key, value, ttl))
            .await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.observe(
            COMPARE_AND_SWAP,
            Some(key),
            self.inner.compare_and_swap(key, expected, new, ttl),
        )
        .await
    }
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        self.observe(
            COMPARE_AND_DELETE,
            Some(key),
            self.inner.compare_and_delete(key, expected),
        )
        .await
    }
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.observe(DELETE, Some(key), self.inner.delete(key))
            .await
    }
    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64> {
        self.observe(INCR, Some(key), self.inner.incr(key, delta, ttl_on_create))
            .await
    }
    async fn incr_durable(
        &self,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        self.observe(
            INCR_DURABLE,
            Some(key),
            self.inner.incr_durable(key, delta, ttl_on_create),
        )
        .await
    }
    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        self.observe(EXPIRE, Some(key), self.inner.expire(key, ttl))
            .await
    }
    async fn persist(&self, key: &[u8]) -> Result<bool> {
        self.observe(PERSIST, Some(key), self.inner.persist(key))
            .await
    }
    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        self.observe(TTL, Some(key), self.inner.ttl(key)).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        self.observe(SCAN, Some(prefix), self.inner.scan(prefix, cursor, limit))
            .await
    }
    async fn now_ms(&self) -> Result<u64> {
        self.observe(NOW_MS, None, self.inner.now_ms()).await
    }
    async fn rate_limit(
        &self,
        rules: &[RateRule<'_>],
        mode: RateMode,
        at_ms: Option<u64>,
    ) -> Result<RateOutcome> {
        // Several keys: the span names the first (a stack's keys share their request key).
        let key = rules.first().map(|r| r.key);
        self.observe(RATE_LIMIT, key, self.inner.rate_limit(rules, mode, at_ms))
            .await
    }
    async fn delete_prefix(&self, prefix: &[u8]) -> Result<u64> {
        self.observe(
            DELETE_PREFIX,
            Some(prefix),
            self.inner.delete_prefix(prefix),
        )
        .await
    }

    // Release notices are hints around the lock, not storage operations: passed through
    // unobserved (the lock counts its own acquisitions and losses).
    async fn publish_release(&self, key: &[u8]) -> Result<()> {
        self.inner.publish_release(key).await
    }

    fn release_notices(&self) -> Option<crate::backend::ReleaseNotices> {
        self.inner.release_notices()
    }
}

/// A key as logs may show it: `k:` and the first 48 bits of its BLAKE3 digest in hex.
pub fn redact(key: &[u8]) -> String {
    let digest = blake3::hash(key);
    let mut out = String::with_capacity(2 + REDACTED_HEX_CHARS);
    out.push_str("k:");
    for byte in &digest.as_bytes()[..REDACTED_HEX_CHARS / 2] {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Hex characters of a redacted key: 48 bits, enough to tell keys apart in a log.
const REDACTED_HEX_CHARS: usize = 12;

// ----- what the primitives report ---------------------------------------------------------

pub(crate) fn ratelimit_decision(limiter: &str, allowed: bool) {
    counter!(
        RATELIMIT_DECISIONS_TOTAL,
        "limiter" => limiter.to_owned(),
        "outcome" => if allowed { "allowed" } else { "denied" },
    )
    .increment(1);
}

pub(crate) fn cache_request(cache: &'static str, outcome: &'static str) {
    counter!(CACHE_REQUESTS_TOTAL, "cache" => cache, "outcome" => outcome).increment(1);
}

pub(crate) fn cache_coalesced(cache: &'static str) {
    counter!(CACHE_COALESCED_TOTAL, "cache" => cache).increment(1);
}

pub(crate) fn breaker_transition(breaker: &str, from: &'static str, to: &'static str) {
    counter!(
        BREAKER_TRANSITIONS_TOTAL,
        "breaker" => breaker.to_owned(),
        "from" => from,
        "to" => to,
    )
    .increment(1);
}

pub(crate) fn idempotency_request(outcome: &'static str) {
    counter!(IDEMPOTENCY_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
}

pub(crate) fn session_load(outcome: &'static str) {
    counter!(SESSION_LOADS_TOTAL, "outcome" => outcome).increment(1);
}

pub(crate) fn session_save(outcome: &'static str) {
    counter!(SESSION_SAVES_TOTAL, "outcome" => outcome).increment(1);
}

pub(crate) fn lock_acquisition(outcome: &'static str) {
    counter!(LOCK_ACQUISITIONS_TOTAL, "outcome" => outcome).increment(1);
}

pub(crate) fn lock_loss(reason: &'static str) {
    counter!(LOCK_LOSSES_TOTAL, "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_indexes_name_their_operation() {
        let named = [
            (GET, "get"),
            (GET_WITH_TTL, "get_with_ttl"),
            (SET, "set"),
            (SET_NX, "set_nx"),
            (COMPARE_AND_SWAP, "compare_and_swap"),
            (COMPARE_AND_DELETE, "compare_and_delete"),
            (DELETE, "delete"),
            (INCR, "incr"),
            (INCR_DURABLE, "incr_durable"),
            (EXPIRE, "expire"),
            (PERSIST, "persist"),
            (TTL, "ttl"),
            (SCAN, "scan"),
            (NOW_MS, "now_ms"),
            (RATE_LIMIT, "rate_limit"),
            (DELETE_PREFIX, "delete_prefix"),
        ];
        assert_eq!(named.len(), OPS.len());
        for (index, name) in named {
            assert_eq!(OPS[index], name);
        }
    }

    #[test]
    fn redaction_is_short_stable_and_hides_the_key() {
        assert_eq!(redact(b"user:alice"), redact(b"user:alice"));
        assert_ne!(redact(b"user:alice"), redact(b"user:bob"));
        assert_eq!(redact(b"x").len(), 2 + REDACTED_HEX_CHARS);
        assert!(!redact(b"alice").contains("alice"));
    }
}
