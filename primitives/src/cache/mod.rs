//! A value cache on the [`Backend`] contract, shared by every replica that shares the backend,
//! with stampede protection in the process and across processes.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keel_primitives::Embedded;
//! use keel_primitives::cache::Cache;
//!
//! let cache = Cache::new(Arc::new(Embedded::memory()), "users");
//! let name: String = cache
//!     .get_or_compute("42", Duration::from_secs(60), || async {
//!         Ok::<_, std::io::Error>("Ada".to_owned()) // the expensive lookup
//!     })
//!     .await?;
//! assert_eq!(name, "Ada");
//! // The second call is a hit: the closure does not run.
//! let again: String = cache
//!     .get_or_compute("42", Duration::from_secs(60), || async { unreachable!() })
//!     .await
//!     .map_err(|e: Arc<std::io::Error>| e)?;
//! assert_eq!(again, "Ada");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Reading through the cache: [`Cache::get_or_compute`]
//! 1. **Fresh entry**: returned (a hit). With early refresh on (XFetch, β =
//!    [`CacheBuilder::xfetch_beta`], default 1), a caller may be picked, with a probability that
//!    grows as expiry nears and with the time the last computation took, to recompute the entry
//!    before it expires (only if it takes the key's lease; everyone else keeps getting hits).
//! 2. **Stale entry** (past its TTL, within [`CacheBuilder::stale_while_revalidate`]): the
//!    caller that takes the key's lease recomputes it; every other caller gets the stale value
//!    at once. Within [`CacheBuilder::stale_if_error`] a failing computation returns the stale
//!    value instead of the error.
//! 3. **Miss**: one caller per process computes (the others await it: *stampede-joined*); across
//!    processes, that caller takes the key's **lease** with `set_nx` (a 16-byte random owner
//!    nonce, TTL [`CacheBuilder::lease_ttl`], default 10 s). Whoever holds the lease computes
//!    and stores; the others poll with jittered exponential backoff (5 ms to 100 ms) and read the
//!    stored value. A lease whose holder died expires, and the next poller takes it. A waiter
//!    that has waited [`CacheBuilder::lease_wait`] (default: the lease TTL) computes without the
//!    lease, so a caller's latency stays bounded.
//!
//! **When a computation fails**, its lease is released at once (`compare_and_delete` with the
//! nonce, so a lease that already expired and was taken by another is left alone) and nothing
//! is stored (unless the result is a negative one and negative caching is on). Callers awaiting
//! it *in the same process* receive the same error (an `Arc<E>`, as moka's `try_get_with`
//! does). Callers waiting *in other processes* see the lease gone without a value and take the
//! lease themselves: one of them computes again. So an error is never cached by accident, and a
//! failing dependency is called at most once at a time per key per process.
//!
//! **When the backend fails**, the cache fails open: reads that fail are misses, writes that
//! fail are skipped, and the computation runs; each is a `tracing` warning. `get_or_compute`
//! only ever returns the computation's own error.
//!
//! # Keys
//! Under `keel-cache:{namespace}:`: `e:{key}` holds an entry (`e:{key}\0{generations}` when it
//! has tags), `l:` + the same suffix its lease, `t:{tag}` a tag's generation counter. An entry's
//! value is a 22-byte header (version, kind, stored-at and fresh-until in backend-clock ms,
//! the last computation's duration) and the codec's bytes; its backend TTL is the entry's TTL
//! plus the longer of the stale windows, so it disappears by itself.
//!
//! # Invalidation
//! [`Cache::delete`] (one key), [`Cache::invalidate_prefix`] (every key starting with a prefix,
//! through `delete_prefix`), [`Cache::clear`] (the namespace) and [`Cache::invalidate_tag`]: a
//! tag's generation is part of the key of every entry carrying it, so one `incr` makes them all
//! unreachable (they expire with their TTL). Only single-key atomic operations are used, so the
//! cache runs unchanged on a Redis Cluster.
//!
//! # Time
//! Freshness is judged on a [`Clock`]: by default the backend's `now_ms` (the server's clock,
//! so replicas with skewed clocks agree), read once and then advanced with the local monotonic
//! clock, re-read every 10 s. Tests use [`ManualClock`].

mod codec;
mod flight;
#[cfg(feature = "http")]
pub mod http;

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

pub use codec::{Binary, Codec, CodecError, Json, Raw};
#[cfg(feature = "http")]
pub(crate) use flight::{Collapsed, Collapser};
use flight::{Flights, Role};

use crate::backend::{Backend, KEY_BYTES_MAX, TTL_MAX};
use crate::error::Result;
use crate::observe;

/// Prefix of every key the cache writes: `keel-cache:{namespace}:`.
pub const KEY_PREFIX: &[u8] = b"keel-cache:";
/// Longest namespace, in bytes.
pub const NAMESPACE_BYTES_MAX: usize = 128;
/// Default TTL of an entry when none is given ([`Cache::set`] with `None`).
pub const TTL_DEFAULT: Duration = Duration::from_secs(300);
/// Default lease TTL: how long a dead computer can hold a key up.
pub const LEASE_TTL_DEFAULT: Duration = Duration::from_secs(10);
/// Default XFetch β (1.0 is the paper's recommendation; 0 turns early refresh off).
pub const XFETCH_BETA_DEFAULT: f64 = 1.0;
/// Most tags on one entry.
pub const TAGS_MAX: usize = 16;
/// Polling bounds while another process holds a key's lease.
pub(crate) const POLL_MIN: Duration = Duration::from_millis(5);
pub(crate) const POLL_MAX: Duration = Duration::from_millis(100);
/// How often the default clock re-reads the backend's time.
const CLOCK_RESYNC: Duration = Duration::from_secs(10);
/// Bytes of a lease's owner nonce.
pub(crate) const NONCE_BYTES: usize = 16;
/// Entry header: version, kind, stored-at ms, fresh-until ms, compute ms.
const HEADER_BYTES: usize = 1 + 1 + 8 + 8 + 4;
const ENTRY_VERSION: u8 = 1;
const KIND_VALUE: u8 = 0;
const KIND_NEGATIVE: u8 = 1;

/// A source of "now" in Unix milliseconds for freshness decisions.
#[async_trait]
pub trait Clock: Send + Sync + 'static {
    /// The current time, Unix ms.
    ///
    /// # Errors
    /// The time source failed (the backend for [`BackendClock`]); the cache then uses the
    /// system clock for that operation.
    async fn now_ms(&self) -> Result<u64>;
}

/// The default clock: the backend's `now_ms`, read once and advanced with the local monotonic
/// clock, re-read every 10 s.
pub struct BackendClock {
    backend: Arc<dyn Backend>,
    anchor: Mutex<Option<(Instant, u64)>>,
}

impl BackendClock {
    /// A clock following `backend`'s time.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        BackendClock {
            backend,
            anchor: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Clock for BackendClock {
    async fn now_ms(&self) -> Result<u64> {
        let anchor = *self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, ms)) = anchor
            && at.elapsed() < CLOCK_RESYNC
        {
            return Ok(ms + at.elapsed().as_millis() as u64);
        }
        let ms = self.backend.now_ms().await?;
        *self.anchor.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), ms));
        Ok(ms)
    }
}

/// A clock that moves only when told to: for tests of freshness, staleness and early refresh.
#[derive(Debug, Default)]
pub struct ManualClock {
    ms: AtomicU64,
}

impl ManualClock {
    /// A clock reading `ms`.
    pub fn new(ms: u64) -> Arc<Self> {
        Arc::new(ManualClock {
            ms: AtomicU64::new(ms),
        })
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }

    /// The time it reads.
    pub fn get(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Clock for ManualClock {
    async fn now_ms(&self) -> Result<u64> {
        Ok(self.get())
    }
}

/// A cache configuration that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheConfigError {
    /// The namespace is empty, over [`NAMESPACE_BYTES_MAX`] or contains `:`.
    #[error("a cache namespace must be 1 to {NAMESPACE_BYTES_MAX} bytes without ':', got {0:?}")]
    Namespace(String),
    /// A duration that must be positive (and at most ten years) is not.
    #[error("{what} must be between 1 ms and ten years, got {value:?}")]
    Duration {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: Duration,
    },
    /// β is negative or not finite.
    #[error("the XFetch beta must be a finite number >= 0, got {0}")]
    Beta(f64),
}

/// Hits, misses and the rest since the cache was built, summed over its clones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Fresh entries returned.
    pub hits: u64,
    /// Reads that found no usable entry (absent, undecodable, or stale past every window).
    pub misses: u64,
    /// Stale entries returned (stale-while-revalidate or stale-if-error).
    pub stale: u64,
    /// Recomputations of an entry that was still there (XFetch or stale-while-revalidate).
    pub refreshes: u64,
    /// Callers that got another caller's computation instead of computing: in this process
    /// (single-flight) or in another (read after waiting on its lease).
    pub stampede_joined: u64,
    /// Computations run by this process.
    pub computations: u64,
    /// Stored entries that failed to decode (recomputed and overwritten).
    pub decode_failures: u64,
    /// Times a lease was found held by another process (each wait counts once).
    pub lease_waits: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    refreshes: AtomicU64,
    stampede_joined: AtomicU64,
    computations: AtomicU64,
    decode_failures: AtomicU64,
    lease_waits: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Per-entry settings for [`Cache::get_or_compute_with`], [`Cache::set_with`] and
/// [`Cache::get_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryOptions {
    ttl: Option<Duration>,
    tags: Vec<String>,
    negative_ttl: Option<Duration>,
}

impl EntryOptions {
    /// Defaults: the cache's default TTL, no tags, no negative caching.
    pub fn new() -> Self {
        EntryOptions::default()
    }

    /// The entry's TTL (how long it is fresh).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Tags: [`Cache::invalidate_tag`] on any of them drops the entry. Reads and writes of a
    /// key must name the same tags (they are part of where the entry lives). At most
    /// [`TAGS_MAX`]; extra tags are ignored with a warning.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// Caches a `None` result (of [`Cache::get_or_compute_optional`]) for `ttl`. Without it a
    /// `None` is returned and not stored.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }
}

/// Builds a [`Cache`]; see [`Cache::builder`].
pub struct CacheBuilder {
    backend: Arc<dyn Backend>,
    namespace: String,
    default_ttl: Duration,
    lease_ttl: Duration,
    lease_wait: Option<Duration>,
    xfetch_beta: f64,
    swr: Option<Duration>,
    sie: Option<Duration>,
    clock: Option<Arc<dyn Clock>>,
    #[cfg(feature = "cache-l1")]
    l1: Option<(u64, Duration)>,
}

impl CacheBuilder {
    /// TTL of entries stored without one (default [`TTL_DEFAULT`], 5 minutes).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// How long a computation's lease lasts (default [`LEASE_TTL_DEFAULT`], 10 s): longer than
    /// a computation takes, short enough that a dead holder does not stall a key for long.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long a caller waits for another process's computation before computing itself
    /// (default: the lease TTL).
    pub fn lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = Some(wait);
        self
    }

    /// XFetch's β: higher refreshes earlier; 0 turns early refresh off (default 1).
    pub fn xfetch_beta(mut self, beta: f64) -> Self {
        self.xfetch_beta = beta;
        self
    }

    /// After an entry's TTL, serve it stale for up to `window` while one caller recomputes it
    /// (RFC 5861's stale-while-revalidate). Off by default.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.swr = Some(window);
        self
    }

    /// After an entry's TTL, serve it stale for up to `window` when its recomputation fails
    /// (RFC 5861's stale-if-error). Off by default.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.sie = Some(window);
        self
    }

    /// The clock freshness is judged on (default [`BackendClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// An in-process L1 (moka) of at most `capacity` entries in front of the backend. An
    /// entry is served from it for at most `max_staleness` after it was read from or written
    /// to the backend, so a change made by another replica is seen within that bound (changes
    /// and invalidations made through this cache are seen at once).
    #[cfg(feature = "cache-l1")]
    pub fn l1(mut self, capacity: u64, max_staleness: Duration) -> Self {
        self.l1 = Some((capacity, max_staleness));
        self
    }

    /// The cache, with the [`Json`] codec (see [`Cache::with_codec`]).
    ///
    /// # Errors
    /// [`CacheConfigError`] for a namespace or duration that cannot work.
    pub fn build(self) -> Result<Cache, CacheConfigError> {
        let ns = &self.namespace;
        if ns.is_empty() || ns.len() > NAMESPACE_BYTES_MAX || ns.contains(':') {
            return Err(CacheConfigError::Namespace(ns.clone()));
        }
        let check = |what, value: Duration| {
            if value.is_zero() || value > TTL_MAX {
                Err(CacheConfigError::Duration { what, value })
            } else {
                Ok(())
            }
        };
        check("default_ttl", self.default_ttl)?;
        check("lease_ttl", self.lease_ttl)?;
        if let Some(w) = self.lease_wait {
            check("lease_wait", w)?;
        }
        if let Some(w) = self.swr {
            check("stale_while_revalidate", w)?;
        }
        if let Some(w) = self.sie {
            check("stale_if_error", w)?;
        }
        if !self.xfetch_beta.is_finite() || self.xfetch_beta < 0.0 {
            return Err(CacheConfigError::Beta(self.xfetch_beta));
        }
        let mut prefix = KEY_PREFIX.to_vec();
        prefix.extend_from_slice(ns.as_bytes());
        prefix.push(b':');
        #[cfg(feature = "cache-l1")]
        let l1 = match self.l1 {
            Some((capacity, staleness)) => {
                check("l1 max_staleness", staleness)?;
                Some(
                    moka::future::Cache::builder()
                        .max_capacity(capacity)
                        .time_to_live(staleness)
                        .build(),
                )
            }
            None => None,
        };
        let clock = self
            .clock
            .unwrap_or_else(|| Arc::new(BackendClock::new(Arc::clone(&self.backend))));
        Ok(Cache {
            inner: Arc::new(Inner {
                backend: self.backend,
                prefix,
                default_ttl: self.default_ttl,
                lease_ttl: self.lease_ttl,
                lease_wait: self.lease_wait.unwrap_or(self.lease_ttl),
                beta: self.xfetch_beta,
                swr: self.swr.unwrap_or_default(),
                sie: self.sie.unwrap_or_default(),
                clock,
                flights: Flights::default(),
                counters: Counters::default(),
                #[cfg(feature = "cache-l1")]
                l1,
            }),
            codec: Json,
        })
    }
}

struct Inner {
    backend: Arc<dyn Backend>,
    prefix: Vec<u8>,
    default_ttl: Duration,
    lease_ttl: Duration,
    lease_wait: Duration,
    beta: f64,
    swr: Duration,
    sie: Duration,
    clock: Arc<dyn Clock>,
    flights: Flights,
    counters: Counters,
    #[cfg(feature = "cache-l1")]
    l1: Option<moka::future::Cache<Vec<u8>, Arc<Vec<u8>>>>,
}

/// A value cache over a [`Backend`]; see the [module docs](self). Cheap to clone (an `Arc`
/// inside); clones share the stampede protection, the counters and the L1. `C` is the
/// [`Codec`]: [`Json`] unless changed with [`Cache::with_codec`].
pub struct Cache<C = Json> {
    inner: Arc<Inner>,
    codec: C,
}

impl<C: Clone> Clone for Cache<C> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
            codec: self.codec.clone(),
        }
    }
}

impl<C> fmt::Debug for Cache<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("backend", &self.inner.backend.name())
            .field("prefix", &String::from_utf8_lossy(&self.inner.prefix))
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// A cache under `namespace` with the defaults (JSON, 5-minute TTL, 10 s leases, XFetch
    /// β = 1, no stale windows, no L1).
    ///
    /// # Panics
    /// If `namespace` is empty, longer than [`NAMESPACE_BYTES_MAX`] or contains `:`; use
    /// [`Cache::builder`] to get that as an error.
    pub fn new(backend: Arc<dyn Backend>, namespace: impl Into<String>) -> Cache {
        match Cache::builder(backend, namespace).build() {
            Ok(cache) => cache,
            Err(e) => panic!("{e}"),
        }
    }

    /// A builder for a cache under `namespace` (1 to [`NAMESPACE_BYTES_MAX`] bytes, no `:`).
    pub fn builder(backend: Arc<dyn Backend>, namespace: impl Into<String>) -> CacheBuilder {
        CacheBuilder {
            backend,
            namespace: namespace.into(),
            default_ttl: TTL_DEFAULT,
            lease_ttl: LEASE_TTL_DEFAULT,
            lease_wait: None,
            xfetch_beta: XFETCH_BETA_DEFAULT,
            swr: None,
            sie: None,
            clock: None,
            #[cfg(feature = "cache-l1")]
            l1: None,
        }
    }
}

/// A stored entry, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    negative: bool,
    stored_ms: u64,
    fresh_until_ms: u64,
    compute_ms: u32,
}

fn encode_entry(h: Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.push(ENTRY_VERSION);
    out.push(if h.negative {
        KIND_NEGATIVE
    } else {
        KIND_VALUE
    });
    out.extend_from_slice(&h.stored_ms.to_le_bytes());
    out.extend_from_slice(&h.fresh_until_ms.to_le_bytes());
    out.extend_from_slice(&h.compute_ms.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn decode_entry(bytes: &[u8]) -> Option<(Header, &[u8])> {
    if bytes.len() < HEADER_BYTES || bytes[0] != ENTRY_VERSION {
        return None;
    }
    let negative = match bytes[1] {
        KIND_VALUE => false,
        KIND_NEGATIVE => true,
        _ => return None,
    };
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
    let compute_ms = u32::from_le_bytes(bytes[18..22].try_into().unwrap_or([0; 4]));
    Some((
        Header {
            negative,
            stored_ms: u64_at(2),
            fresh_until_ms: u64_at(10),
            compute_ms,
        },
        &bytes[HEADER_BYTES..],
    ))
}

/// What a read found.
enum Found<T> {
    Fresh(Option<T>, Header),
    Stale(Option<T>, Header),
    Miss,
}

/// A key as it may appear in logs: a short BLAKE3 digest, never the raw key.
fn redact(key: &[u8]) -> String {
    let digest = blake3::hash(key);
    let mut out = String::from("k:");
    for b in &digest.as_bytes()[..6] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl<C> Cache<C> {
    /// This cache with another codec (same entries, counters and stampede protection).
    pub fn with_codec<D>(&self, codec: D) -> Cache<D> {
        Cache {
            inner: Arc::clone(&self.inner),
            codec,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: l(&c.hits),
            misses: l(&c.misses),
            stale: l(&c.stale),
            refreshes: l(&c.refreshes),
            stampede_joined: l(&c.stampede_joined),
            computations: l(&c.computations),
            decode_failures: l(&c.decode_failures),
            lease_waits: l(&c.lease_waits),
        }
    }

    /// The backend under the cache.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    async fn now_ms(&self) -> u64 {
        match self.inner.clock.now_ms().await {
            Ok(ms) => ms,
            Err(e) => {
                tracing::warn!(target: "keel::cache", error = %e, "clock failed; using the system clock");
                system_ms()
            }
        }
    }

    fn suffix_key(&self, kind: &[u8], suffix: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.inner.prefix.len() + kind.len() + suffix.len());
        k.extend_from_slice(&self.inner.prefix);
        k.extend_from_slice(kind);
        k.extend_from_slice(suffix);
        k
    }

    /// The entry's key suffix: the key, then (with tags) NUL and each tag's generation.
    async fn entry_suffix(&self, key: &[u8], tags: &[String]) -> Result<Vec<u8>> {
        let mut suffix = key.to_vec();
        if tags.is_empty() {
            return Ok(suffix);
        }
        if tags.len() > TAGS_MAX {
            tracing::warn!(target: "keel::cache", tags = tags.len(), max = TAGS_MAX, "extra tags ignored");
        }
        suffix.push(0);
        for (i, tag) in tags.iter().take(TAGS_MAX).enumerate() {
            let gen_key = self.suffix_key(b"t:", tag.as_bytes());
            let generation = self.read_raw(&gen_key).await?;
            if i > 0 {
                suffix.push(b'.');
            }
            match generation {
                Some(g) => suffix.extend_from_slice(&g),
                None => suffix.push(b'0'),
            }
        }
        Ok(suffix)
    }

    /// A backend read, through the L1 when there is one.
    async fn read_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        #[cfg(feature = "cache-l1")]
        if let Some(l1) = &self.inner.l1
            && let Some(v) = l1.get(key).await
        {
            return Ok(Some(v.as_ref().clone()));
        }
        let v = self.inner.backend.get(key).await?;
        #[cfg(feature = "cache-l1")]
        if let (Some(l1), Some(v)) = (&self.inner.l1, &v) {
            l1.insert(key.to_vec(), Arc::new(v.clone())).await;
        }
        Ok(v)
    }

    async fn write_raw(&self, key: &[u8], value: Vec<u8>, ttl: Duration) -> Result<()> {
        self.inner.backend.set(key, &value, Some(ttl)).await?;
        #[cfg(feature = "cache-l1")]
        if let Some(l1) = &self.inner.l1 {
            l1.insert(key.to_vec(), Arc::new(value)).await;
        }
        Ok(())
    }

    #[cfg(feature = "cache-l1")]
    async fn forget_l1(&self, key: Option<&[u8]>) {
        if let Some(l1) = &self.inner.l1 {
            match key {
                Some(k) => l1.invalidate(k).await,
                None => l1.invalidate_all(),
            }
        }
    }
    #[cfg(not(feature = "cache-l1"))]
    async fn forget_l1(&self, _key: Option<&[u8]>) {}

    /// The backend key of a key's lease (the conformance suite plants dead holders with it).
    #[cfg(feature = "conformance")]
    pub(crate) async fn lease_key_of(&self, key: &[u8], opts: &EntryOptions) -> Vec<u8> {
        let suffix = self.entry_suffix(key, &opts.tags).await.unwrap_or_default();
        self.suffix_key(b"l:", &suffix)
    }

    /// The backend key of a key's entry.
    #[cfg(feature = "conformance")]
    pub(crate) async fn entry_key_of(&self, key: &[u8], opts: &EntryOptions) -> Vec<u8> {
        let suffix = self.entry_suffix(key, &opts.tags).await.unwrap_or_default();
        self.suffix_key(b"e:", &suffix)
    }

    /// Deletes `key`'s entry (stored without tags, or with `opts`' tags via
    /// [`Cache::delete_with`]); returns whether there was one.
    ///
    /// # Errors
    /// The backend's.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.delete_with(key, &EntryOptions::new()).await
    }

    /// [`Cache::delete`] of an entry stored with tags.
    ///
    /// # Errors
    /// The backend's.
    pub async fn delete_with(&self, key: impl AsRef<[u8]>, opts: &EntryOptions) -> Result<bool> {
        let suffix = self.entry_suffix(key.as_ref(), &opts.tags).await?;
        let k = self.suffix_key(b"e:", &suffix);
        self.forget_l1(Some(&k)).await;
        let deleted = self.inner.backend.delete(&k).await?;
        tracing::debug!(target: "keel::cache", key = %redact(key.as_ref()), deleted, "cache delete");
        Ok(deleted)
    }

    /// Deletes every entry whose key starts with `prefix` (tagged or not); returns how many.
    /// Entries written during the call may survive (as `delete_prefix` says).
    ///
    /// # Errors
    /// The backend's.
    pub async fn invalidate_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<u64> {
        let k = self.suffix_key(b"e:", prefix.as_ref());
        self.forget_l1(None).await;
        let n = self.inner.backend.delete_prefix(&k).await?;
        tracing::debug!(target: "keel::cache", deleted = n, "cache prefix invalidated");
        Ok(n)
    }

    /// Deletes every key of the namespace (entries, leases, tag generations).
    ///
    /// # Errors
    /// The backend's.
    pub async fn clear(&self) -> Result<u64> {
        self.forget_l1(None).await;
        self.inner.backend.delete_prefix(&self.inner.prefix).await
    }

    /// Makes every entry tagged `tag` unreachable: one `incr` of the tag's generation. Returns
    /// the new generation.
    ///
    /// # Errors
    /// The backend's.
    pub async fn invalidate_tag(&self, tag: impl AsRef<str>) -> Result<i64> {
        let k = self.suffix_key(b"t:", tag.as_ref().as_bytes());
        self.forget_l1(None).await;
        let generation = self.inner.backend.incr(&k, 1, None).await?;
        tracing::debug!(target: "keel::cache", generation, "cache tag invalidated");
        Ok(generation)
    }
}

impl<C> Cache<C> {
    /// Reads and classifies an entry; undecodable entries are misses (with a warning).
    async fn read_entry<T>(&self, ekey: &[u8], now: u64) -> Result<Found<T>>
    where
        C: Codec<T>,
    {
        let Some(bytes) = self.read_raw(ekey).await? else {
            return Ok(Found::Miss);
        };
        let decoded = match decode_entry(&bytes) {
            None => Err(CodecError {
                codec: "entry",
                reason: "not a keel cache entry (unknown header)".into(),
            }),
            Some((h, _)) if h.negative => Ok((h, None)),
            Some((h, payload)) => self.codec.decode(payload).map(|v| (h, Some(v))),
        };
        let (h, value) = match decoded {
            Ok(v) => v,
            Err(e) => {
                bump(&self.inner.counters.decode_failures);
                tracing::warn!(target: "keel::cache", key = %redact(ekey), error = %e,
                    "cached entry failed to decode; treating it as a miss and recomputing");
                return Ok(Found::Miss);
            }
        };
        if now < h.fresh_until_ms {
            Ok(Found::Fresh(value, h))
        } else if now < h.fresh_until_ms + self.stale_window_ms() {
            Ok(Found::Stale(value, h))
        } else {
            Ok(Found::Miss)
        }
    }

    fn stale_window_ms(&self) -> u64 {
        self.inner.swr.max(self.inner.sie).as_millis() as u64
    }

    async fn store<T>(
        &self,
        ekey: &[u8],
        value: Option<&T>,
        ttl: Duration,
        now: u64,
        compute_ms: u32,
    ) -> Result<(), CodecError>
    where
        C: Codec<T>,
    {
        let payload = match value {
            Some(v) => self.codec.encode(v)?,
            None => Vec::new(),
        };
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let header = Header {
            negative: value.is_none(),
            stored_ms: now,
            fresh_until_ms: now + ttl_ms,
            compute_ms,
        };
        let backend_ttl = ttl + self.inner.swr.max(self.inner.sie);
        if let Err(e) = self
            .write_raw(
                ekey,
                encode_entry(header, &payload),
                backend_ttl.min(TTL_MAX),
            )
            .await
        {
            tracing::warn!(target: "keel::cache", key = %redact(ekey), error = %e,
                "cache write failed; the value is returned but not cached");
        }
        Ok(())
    }

    /// The value stored under `key`, if fresh or within a stale window. A decode failure or a
    /// negative entry reads as `None`.
    ///
    /// # Errors
    /// The backend's.
    pub async fn get<T>(&self, key: impl AsRef<[u8]>) -> Result<Option<T>>
    where
        C: Codec<T>,
    {
        self.get_with(key, &EntryOptions::new()).await
    }

    /// [`Cache::get`] of an entry stored with tags.
    ///
    /// # Errors
    /// The backend's.
    pub async fn get_with<T>(&self, key: impl AsRef<[u8]>, opts: &EntryOptions) -> Result<Option<T>>
    where
        C: Codec<T>,
    {
        let suffix = self.entry_suffix(key.as_ref(), &opts.tags).await?;
        let now = self.now_ms().await;
        let found = self
            .read_entry::<T>(&self.suffix_key(b"e:", &suffix), now)
            .await?;
        Ok(match found {
            Found::Fresh(v, _) => {
                bump(&self.inner.counters.hits);
                observe::cache_request("value", "hit");
                v
            }
            Found::Stale(v, _) => {
                bump(&self.inner.counters.stale);
                observe::cache_request("value", "stale");
                v
            }
            Found::Miss => {
                bump(&self.inner.counters.misses);
                observe::cache_request("value", "miss");
                None
            }
        })
    }

    /// Stores `value` under `key` for `ttl` (`None`: the cache's default TTL).
    ///
    /// # Errors
    /// The backend's, or [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) when the
    /// codec cannot encode the value.
    pub async fn set<T>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<()>
    where
        C: Codec<T>,
    {
        let mut opts = EntryOptions::new();
        opts.ttl = ttl;
        self.set_with(key, value, &opts).await
    }

    /// [`Cache::set`] with tags.
    ///
    /// # Errors
    /// As [`Cache::set`].
    pub async fn set_with<T>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
        opts: &EntryOptions,
    ) -> Result<()>
    where
        C: Codec<T>,
    {
        let suffix = self.entry_suffix(key.as_ref(), &opts.tags).await?;
        let ekey = self.suffix_key(b"e:", &suffix);
        check_len(&ekey)?;
        let now = self.now_ms().await;
        let payload = self.codec.encode(value).map_err(|e| {
            crate::Error::new(
                crate::ErrorKind::InvalidInput,
                "the codec cannot encode the value",
            )
            .with_source(e)
        })?;
        let ttl = opts.ttl.unwrap_or(self.inner.default_ttl);
        let header = Header {
            negative: false,
            stored_ms: now,
            fresh_until_ms: now + ttl.as_millis().max(1) as u64,
            compute_ms: 0,
        };
        let backend_ttl = (ttl + self.inner.swr.max(self.inner.sie)).min(TTL_MAX);
        self.write_raw(&ekey, encode_entry(header, &payload), backend_ttl)
            .await
    }

    /// The value under `key`, or `compute`'s result, stored for `ttl`. One computation per key
    /// at a time per process and, through the key's lease, across processes; see the
    /// [module docs](self) for stale entries, early refresh and what happens on failure.
    ///
    /// # Errors
    /// Only `compute`'s error (shared, hence the `Arc`, with the callers that awaited it in this
    /// process). Backend failures make the cache step aside (the computation runs, a warning is
    /// logged); a stale-if-error window turns a failure into the stale value.
    pub async fn get_or_compute<T, E, F, Fut>(
        &self,
        key: impl AsRef<[u8]>,
        ttl: Duration,
        compute: F,
    ) -> Result<T, Arc<E>>
    where
        C: Codec<T>,
        T: Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.get_or_compute_with(key, &EntryOptions::new().ttl(ttl), compute)
            .await
    }

    /// [`Cache::get_or_compute`] with per-entry options (tags; the TTL defaults to the
    /// cache's).
    ///
    /// # Errors
    /// As [`Cache::get_or_compute`].
    pub async fn get_or_compute_with<T, E, F, Fut>(
        &self,
        key: impl AsRef<[u8]>,
        opts: &EntryOptions,
        compute: F,
    ) -> Result<T, Arc<E>>
    where
        C: Codec<T>,
        T: Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut opts = opts.clone();
        opts.negative_ttl = None;
        let got = self
            .fetch(key.as_ref(), &opts, || async { compute().await.map(Some) })
            .await?;
        match got {
            Some(v) => Ok(v),
            // Unreachable in practice: negative entries are never written without a negative
            // TTL, and a foreign negative entry under this key is read as a miss below.
            None => unreachable_negative(),
        }
    }

    /// Like [`Cache::get_or_compute_with`] for lookups that may find nothing: a `None` is
    /// stored for the options' [`negative_ttl`](EntryOptions::negative_ttl) (and not at all
    /// without one). Errors are never cached.
    ///
    /// # Errors
    /// As [`Cache::get_or_compute`].
    pub async fn get_or_compute_optional<T, E, F, Fut>(
        &self,
        key: impl AsRef<[u8]>,
        opts: &EntryOptions,
        compute: F,
    ) -> Result<Option<T>, Arc<E>>
    where
        C: Codec<T>,
        T: Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        self.fetch(key.as_ref(), opts, compute).await
    }

    async fn fetch<T, E, F, Fut>(
        &self,
        key: &[u8],
        opts: &EntryOptions,
        compute: F,
    ) -> Result<Option<T>, Arc<E>>
    where
        C: Codec<T>,
        T: Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let counters = &self.inner.counters;
        let suffix = match self.entry_suffix(key, &opts.tags).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "keel::cache", key = %redact(key), error = %e,
                    "cache backend failed reading tag generations; computing without the cache");
                bump(&counters.misses);
                bump(&counters.computations);
                observe::cache_request("value", "miss");
                return compute().await.map_err(Arc::new);
            }
        };
        let ekey = self.suffix_key(b"e:", &suffix);
        let lkey = self.suffix_key(b"l:", &suffix);
        if check_len(&ekey).is_err() || check_len(&lkey).is_err() {
            tracing::warn!(target: "keel::cache", key = %redact(key), "cache key too long; computing without the cache");
            bump(&counters.misses);
            bump(&counters.computations);
            observe::cache_request("value", "miss");
            return compute().await.map_err(Arc::new);
        }
        let now = self.now_ms().await;
        let found = match self.read_entry::<T>(&ekey, now).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(target: "keel::cache", key = %redact(key), error = %e,
                    "cache read failed; treating it as a miss");
                Found::Miss
            }
        };
        let found = match found {
            Found::Fresh(None, _) | Found::Stale(None, _) if opts.negative_ttl.is_none() => {
                Found::Miss
            }
            other => other,
        };
        // Each lookup counts once, by what it found (a stale entry that gets recomputed is
        // still a `stale` lookup).
        observe::cache_request(
            "value",
            match &found {
                Found::Fresh(..) => "hit",
                Found::Stale(..) => "stale",
                Found::Miss => "miss",
            },
        );
        match found {
            Found::Fresh(value, h) => {
                if self.xfetch_fires(&h, now) {
                    // Recompute early, but only if nobody else is already computing this key.
                    if let Some(nonce) = self.try_lease(&lkey).await {
                        bump(&counters.refreshes);
                        tracing::debug!(target: "keel::cache", key = %redact(key), "early refresh (XFetch)");
                        let outcome = self.compute_and_store(&ekey, opts, compute).await;
                        self.release(&lkey, &nonce).await;
                        return match outcome {
                            Ok(v) => Ok(v),
                            // The old value is still fresh: a failed early refresh is no reason
                            // to fail the caller.
                            Err(_) => Ok(value),
                        };
                    }
                }
                bump(&counters.hits);
                tracing::trace!(target: "keel::cache", key = %redact(key), "cache hit");
                Ok(value)
            }
            Found::Stale(value, h) => {
                let stale_for = now - h.fresh_until_ms;
                let in_swr = stale_for < self.inner.swr.as_millis() as u64;
                let in_sie = stale_for < self.inner.sie.as_millis() as u64;
                if in_swr {
                    let Some(nonce) = self.try_lease(&lkey).await else {
                        bump(&counters.stale);
                        tracing::debug!(target: "keel::cache", key = %redact(key), "serving stale while another caller revalidates");
                        return Ok(value);
                    };
                    bump(&counters.refreshes);
                    let outcome = self.compute_and_store(&ekey, opts, compute).await;
                    self.release(&lkey, &nonce).await;
                    return match outcome {
                        Ok(v) => Ok(v),
                        Err(e) if in_sie => {
                            bump(&counters.stale);
                            tracing::warn!(target: "keel::cache", key = %redact(key), "refresh failed; serving stale (stale-if-error)");
                            let _ = e;
                            Ok(value)
                        }
                        Err(e) => Err(e),
                    };
                }
                // Stale, outside stale-while-revalidate: recompute like a miss (with stampede
                // protection), falling back to the stale value within stale-if-error.
                match self.compute_shared(&ekey, &lkey, opts, compute).await {
                    Ok(v) => Ok(v),
                    Err(e) if in_sie => {
                        bump(&counters.stale);
                        tracing::warn!(target: "keel::cache", key = %redact(key), "recomputation failed; serving stale (stale-if-error)");
                        let _ = e;
                        Ok(value)
                    }
                    Err(e) => Err(e),
                }
            }
            Found::Miss => {
                bump(&counters.misses);
                tracing::trace!(target: "keel::cache", key = %redact(key), "cache miss");
                self.compute_shared(&ekey, &lkey, opts, compute).await
            }
        }
    }

    /// XFetch (Vattani, Chierichetti, Lowenstein 2015): refresh now if
    /// `now - δ·β·ln(rand) >= expiry`, δ being the last computation's duration.
    fn xfetch_fires(&self, h: &Header, now: u64) -> bool {
        if self.inner.beta == 0.0 || h.compute_ms == 0 {
            return false;
        }
        // In (0, 1], so the logarithm is finite and <= 0.
        let r: f64 = 1.0 - rand::random::<f64>();
        let gap = h.fresh_until_ms.saturating_sub(now) as f64;
        f64::from(h.compute_ms) * self.inner.beta * -r.ln() >= gap
    }

    /// Takes the lease if free; `None` when another holds it (or the backend failed).
    async fn try_lease(&self, lkey: &[u8]) -> Option<[u8; NONCE_BYTES]> {
        let nonce: [u8; NONCE_BYTES] = rand::random();
        match self
            .inner
            .backend
            .set_nx(lkey, &nonce, Some(self.inner.lease_ttl))
            .await
        {
            Ok(true) => Some(nonce),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(target: "keel::cache", error = %e, "cache lease failed");
                None
            }
        }
    }

    async fn release(&self, lkey: &[u8], nonce: &[u8]) {
        if let Err(e) = self.inner.backend.compare_and_delete(lkey, nonce).await {
            tracing::warn!(target: "keel::cache", error = %e,
                "releasing a cache lease failed; it expires with its TTL");
        }
    }

    /// Runs the computation and stores its result (values always; `None` only with a
    /// negative TTL).
    async fn compute_and_store<T, E, F, Fut>(
        &self,
        ekey: &[u8],
        opts: &EntryOptions,
        compute: F,
    ) -> Result<Option<T>, Arc<E>>
    where
        C: Codec<T>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        bump(&self.inner.counters.computations);
        let started = Instant::now();
        let result = compute().await.map_err(Arc::new)?;
        let compute_ms = started.elapsed().as_millis().clamp(1, u32::MAX as u128) as u32;
        let ttl = match &result {
            Some(_) => Some(opts.ttl.unwrap_or(self.inner.default_ttl)),
            None => opts.negative_ttl,
        };
        if let Some(ttl) = ttl {
            let now = self.now_ms().await;
            if let Err(e) = self
                .store(ekey, result.as_ref(), ttl, now, compute_ms)
                .await
            {
                tracing::warn!(target: "keel::cache", key = %redact(ekey), error = %e,
                    "the codec cannot encode the value; returned but not cached");
            }
        }
        Ok(result)
    }

    /// A miss: one computation per key in this process, under the key's lease across
    /// processes.
    async fn compute_shared<T, E, F, Fut>(
        &self,
        ekey: &[u8],
        lkey: &[u8],
        opts: &EntryOptions,
        compute: F,
    ) -> Result<Option<T>, Arc<E>>
    where
        C: Codec<T>,
        T: Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        loop {
            match self.inner.flights.join(ekey) {
                Role::Follower(rx) => {
                    if let Some(outcome) = flight::follow(rx).await {
                        let shared = outcome.downcast_ref::<Result<Option<T>, Arc<E>>>();
                        // A `None` is only shared with callers that cache negatives (a
                        // `get_or_compute_optional` may lead a `get_or_compute`'s key).
                        let usable = |r: &&Result<Option<T>, Arc<E>>| {
                            opts.negative_ttl.is_some() || !matches!(r, Ok(None))
                        };
                        if let Some(r) = shared.filter(usable) {
                            bump(&self.inner.counters.stampede_joined);
                            observe::cache_coalesced("value");
                            return r.clone();
                        }
                        // Another type under the same key, or a `None` we may not use: compute
                        // for ourselves.
                        return self.compute_leased(ekey, lkey, opts, compute).await;
                    }
                    // The leader was cancelled: try to lead.
                }
                Role::Leader(leader) => {
                    let r = self.compute_leased(ekey, lkey, opts, compute).await;
                    let shared: Arc<dyn Any + Send + Sync> = Arc::new(r.clone());
                    leader.finish(shared);
                    return r;
                }
            }
        }
    }

    async fn compute_leased<T, E, F, Fut>(
        &self,
        ekey: &[u8],
        lkey: &[u8],
        opts: &EntryOptions,
        compute: F,
    ) -> Result<Option<T>, Arc<E>>
    where
        C: Codec<T>,
        T: Clone + Send + Sync + 'static,
        E: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let counters = &self.inner.counters;
        let deadline = Instant::now() + self.inner.lease_wait;
        let mut delay = POLL_MIN;
        let mut waited = false;
        loop {
            let nonce: [u8; NONCE_BYTES] = rand::random();
            match self
                .inner
                .backend
                .set_nx(lkey, &nonce, Some(self.inner.lease_ttl))
                .await
            {
                Ok(true) => {
                    // A value may have landed between our read and the lease (a holder, here
                    // or elsewhere, stored and released it): use it rather than compute again.
                    let now = self.now_ms().await;
                    if let Ok(Found::Fresh(v, _)) = self.read_entry::<T>(ekey, now).await
                        && (v.is_some() || opts.negative_ttl.is_some())
                    {
                        self.release(lkey, &nonce).await;
                        bump(&counters.stampede_joined);
                        return Ok(v);
                    }
                    let guard = LeaseGuard {
                        backend: Arc::clone(&self.inner.backend),
                        key: lkey.to_vec(),
                        nonce,
                        armed: true,
                    };
                    let r = self.compute_and_store(ekey, opts, compute).await;
                    guard.release().await;
                    return r;
                }
                Ok(false) => {
                    if !waited {
                        bump(&counters.lease_waits);
                        waited = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "keel::cache", key = %redact(ekey), error = %e,
                        "cache lease failed; computing without stampede protection");
                    return self.compute_and_store(ekey, opts, compute).await;
                }
            }
            if Instant::now() >= deadline {
                tracing::warn!(target: "keel::cache", key = %redact(ekey), wait_ms = self.inner.lease_wait.as_millis() as u64,
                    "waited the bound for another process's computation; computing here");
                return self.compute_and_store(ekey, opts, compute).await;
            }
            tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..=1.0))).await;
            delay = (delay * 2).min(POLL_MAX);
            let now = self.now_ms().await;
            if let Ok(Found::Fresh(v, _)) = self.read_entry::<T>(ekey, now).await
                && (v.is_some() || opts.negative_ttl.is_some())
            {
                bump(&counters.stampede_joined);
                return Ok(v);
            }
        }
    }
}

/// Releases a lease when dropped unreleased (the computing caller was cancelled), on the
/// current runtime, so waiters in other processes need not wait out its TTL.
pub(crate) struct LeaseGuard {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) key: Vec<u8>,
    pub(crate) nonce: [u8; NONCE_BYTES],
    pub(crate) armed: bool,
}

impl LeaseGuard {
    pub(crate) async fn release(mut self) {
        self.armed = false;
        if let Err(e) = self
            .backend
            .compare_and_delete(&self.key, &self.nonce)
            .await
        {
            tracing::warn!(target: "keel::cache", error = %e,
                "releasing a cache lease failed; it expires with its TTL");
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (backend, key, nonce) = (
                Arc::clone(&self.backend),
                std::mem::take(&mut self.key),
                self.nonce,
            );
            rt.spawn(async move {
                let _ = backend.compare_and_delete(&key, &nonce).await;
            });
        }
    }
}

fn check_len(key: &[u8]) -> Result<()> {
    if key.len() > KEY_BYTES_MAX {
        return Err(crate::Error::new(
            crate::ErrorKind::Limit,
            format!(
                "cache key is {} bytes with its prefix, the limit is {KEY_BYTES_MAX}",
                key.len()
            ),
        ));
    }
    Ok(())
}

/// `get_or_compute` never stores `None` (its computation returns a `T`), and its reads treat a
/// negative entry as a miss (no negative TTL): `None` cannot come back.
fn unreachable_negative<T, E>() -> Result<T, Arc<E>> {
    unreachable!("get_or_compute read a negative entry although negative caching is off")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Embedded;

    #[test]
    fn entry_header_round_trips_and_rejects_foreign_bytes() {
        let h = Header {
            negative: false,
            stored_ms: 1,
            fresh_until_ms: 2,
            compute_ms: 3,
        };
        let bytes = encode_entry(h, b"payload");
        assert_eq!(decode_entry(&bytes), Some((h, &b"payload"[..])));
        assert_eq!(decode_entry(b"short"), None);
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        assert_eq!(decode_entry(&wrong_version), None);
        let mut wrong_kind = bytes;
        wrong_kind[1] = 7;
        assert_eq!(decode_entry(&wrong_kind), None);
    }

    #[test]
    fn bad_configurations_fail_at_build() {
        let b: Arc<dyn Backend> = Arc::new(Embedded::memory());
        assert!(matches!(
            Cache::builder(Arc::clone(&b), "").build(),
            Err(CacheConfigError::Namespace(_))
        ));
        assert!(matches!(
            Cache::builder(Arc::clone(&b), "a:b").build(),
            Err(CacheConfigError::Namespace(_))
        ));
        assert!(matches!(
            Cache::builder(Arc::clone(&b), "ns")
                .default_ttl(Duration::ZERO)
                .build(),
            Err(CacheConfigError::Duration { .. })
        ));
        assert!(matches!(
            Cache::builder(Arc::clone(&b), "ns")
                .xfetch_beta(-1.0)
                .build(),
            Err(CacheConfigError::Beta(_))
        ));
        assert!(matches!(
            Cache::builder(b, "ns").xfetch_beta(f64::NAN).build(),
            Err(CacheConfigError::Beta(_))
        ));
    }

    #[tokio::test]
    async fn a_cancelled_leader_hands_the_key_to_a_waiter() {
        let cache = Cache::new(Arc::new(Embedded::memory()), "t");
        let started = Arc::new(tokio::sync::Notify::new());
        let leader = {
            let (cache, started) = (cache.clone(), Arc::clone(&started));
            tokio::spawn(async move {
                cache
                    .get_or_compute("k", TTL_DEFAULT, || async {
                        started.notify_one();
                        std::future::pending::<Result<u8, ()>>().await
                    })
                    .await
            })
        };
        started.notified().await;
        let follower = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_compute("k", TTL_DEFAULT, || async { Ok::<u8, ()>(9) })
                    .await
            })
        };
        tokio::task::yield_now().await;
        leader.abort();
        assert_eq!(follower.await.unwrap(), Ok(9));
        assert_eq!(cache.inner.flights.len(), 0);
    }

    #[cfg(feature = "cache-l1")]
    #[tokio::test]
    async fn l1_serves_within_its_bound_and_local_invalidation_clears_it() {
        let backend: Arc<dyn Backend> = Arc::new(Embedded::memory());
        let cache = Cache::builder(Arc::clone(&backend), "l1")
            .l1(100, Duration::from_secs(60))
            .build()
            .unwrap();
        cache.set("k", &1u32, None).await.unwrap();
        // Another replica deletes the entry behind this one's back: the L1 still serves it
        // (within its staleness bound)...
        let other = Cache::new(Arc::clone(&backend), "l1");
        assert!(other.delete("k").await.unwrap());
        assert_eq!(cache.get::<u32>("k").await.unwrap(), Some(1));
        // ...while a delete through this cache is seen at once.
        cache.set("k", &2u32, None).await.unwrap();
        assert!(cache.delete("k").await.unwrap());
        assert_eq!(cache.get::<u32>("k").await.unwrap(), None);
        cache.set("j", &3u32, None).await.unwrap();
        cache.invalidate_prefix("").await.unwrap();
        assert_eq!(cache.get::<u32>("j").await.unwrap(), None);
    }
}
