//! [`HttpCacheLayer`]: a shared HTTP response cache (RFC 9111, with RFC 5861's stale
//! extensions and RFC 9211's `Cache-Status`) as a tower layer (feature `http`), storing
//! responses in the [`Backend`], so every replica sharing it shares the cache.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use axum::{Router, routing::get};
//! use keel_primitives::Embedded;
//! use keel_primitives::cache::http::HttpCache;
//!
//! let backend = Arc::new(Embedded::open("./keel-data")?);
//! let cache = HttpCache::builder(backend).build()?;
//! let app = Router::new()
//!     .route("/report", get(|| async {
//!         ([(http::header::CACHE_CONTROL, "public, max-age=60")], "expensive report")
//!     }))
//!     .layer(cache.layer());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What is stored (§3)
//! Responses to `GET` whose status is final and not 206, 304 or 5xx, whose `Cache-Control` has neither
//! `no-store` nor `private` (qualified `private="…"` counts as `private`), without
//! `Set-Cookie`, without `Vary: *`, with a body of at most the cap (default 1 MiB; a larger
//! response is streamed through unstored), and with explicit freshness (`s-maxage`, `max-age`
//! or `Expires`), or `no-cache`/`public` and a validator. keel applies no heuristic freshness.
//! A request with `Authorization` has its response stored only when it is `public`,
//! `s-maxage` or `must-revalidate` (§3.5). A request with `no-store` is forwarded and its
//! response not stored.
//!
//! # What is reused (§4)
//! The stored variant matching the request's `Vary` fields (names lower-cased; values trimmed
//! with inner whitespace collapsed), if it is fresh enough for the request (`max-age`,
//! `min-fresh`, `max-stale`), neither side says `no-cache`, and an `Authorization` request meets
//! the §3.5 rule. Served with `Age` and `Cache-Status: keel;hit;ttl=…`. A client's
//! `If-None-Match` (weak comparison, `*`) or `If-Modified-Since` is answered with a 304 carrying
//! `Cache-Control`, `Content-Location`, `Date`, `ETag`, `Expires` and `Vary` (RFC 9110
//! §15.4.5).
//!
//! A stale entry within its `stale-while-revalidate` window is served
//! (`Cache-Status: keel;hit;ttl=-N`) while one background request revalidates it (one per
//! entry across replicas, through a lease). Otherwise it is revalidated with the origin using
//! its `ETag`/`Last-Modified`; a 304 refreshes its stored headers and it is served
//! (`fwd=stale;fwd-status=304`). If the origin fails (500, 502, 503, 504 or a handler error)
//! within the response's or the request's `stale-if-error` window, the stale entry is served.
//! `only-if-cached` with no usable entry is a 504.
//!
//! Misses (`fwd=uri-miss` or `fwd=vary-miss`) for one key collapse: one request (per key, per
//! process and across replicas through a lease) goes to the handler; the others wait, then read
//! what it stored (`Cache-Status: keel;hit;collapsed`), or go to the handler themselves when
//! nothing usable was stored.
//!
//! # Invalidation
//! A `POST`, `PUT`, `PATCH` or `DELETE` answered with a status below 400 drops the stored
//! entries of its URI and of its `Location` and `Content-Location` when they are on the same
//! host (§4.4). [`HttpCache::purge`] and [`HttpCache::purge_prefix`] drop entries by URI.
//!
//! # Failure
//! When the backend fails the layer steps aside (fail open): the request goes to the handler,
//! nothing is stored, and a `tracing` warning is logged. Malformed `Cache-Control` is read
//! conservatively (see `directives.rs`); it never causes an error response.

mod directives;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_LOCATION, DATE, ETAG, EXPIRES, HOST,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, LOCATION, SET_COOKIE, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use serde::{Deserialize, Serialize};
use sfv::{KeyRef, ListSerializer, TokenRef};
use tower::{Layer, Service};

use self::directives::{
    RequestCc, ResponseCc, freshness_lifetime, http_date, if_none_match, initial_age,
};
use super::{BackendClock, Clock, Collapsed, Collapser, KEY_PREFIX, LEASE_TTL_DEFAULT};
use crate::Backend;
use crate::backend::TTL_MAX;
use crate::http::{LayerBody, redact};

/// The `Cache-Status` response header (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// Default cap on a stored response body (1 MiB).
pub const BODY_BYTES_DEFAULT: usize = 1 << 20;
/// Largest body cap (the backend's value limit is 16 MiB, with room for headers).
pub const BODY_BYTES_MAX: usize = 15 << 20;
/// How long an entry is kept past its freshness (and stale windows) for revalidation.
pub const KEEP_STALE_DEFAULT: Duration = Duration::from_secs(300);
/// How long an entry without explicit freshness (`no-cache` + validator) is kept.
const REVALIDATE_ONLY_KEEP: Duration = Duration::from_secs(3600);
const RECORD_VERSION: u8 = 1;

/// Hop-by-hop headers (RFC 9110 §7.6.1) and per-hop metadata: never stored.
static NOT_STORED: [HeaderName; 10] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    AGE,
    HeaderName::from_static("cache-status"),
];

/// Headers a 304 carries (RFC 9110 §15.4.5).
static NOT_MODIFIED_HEADERS: [HeaderName; 6] =
    [CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, VARY];

/// A layer configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpCacheError {
    /// The body cap is 0 or over [`BODY_BYTES_MAX`].
    #[error("the body cap must be between 1 and {BODY_BYTES_MAX} bytes, got {0}")]
    BodyCap(usize),
    /// The namespace is empty, over 128 bytes or contains `:`.
    #[error("an HTTP cache namespace must be 1 to 128 bytes without ':', got {0:?}")]
    Namespace(String),
    /// The cache name is not a structured-field token.
    #[error("the Cache-Status name must be a token (RFC 9651), got {0:?}")]
    Name(String),
}

/// Which parts of a request make its cache key. The default: host, path and query; `GET` and
/// `HEAD` share entries (a `HEAD` is answered from a stored `GET`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    method: bool,
    scheme: bool,
    host: bool,
    query: bool,
    headers: Vec<HeaderName>,
}

impl Default for CacheKey {
    fn default() -> Self {
        CacheKey {
            method: false,
            scheme: false,
            host: true,
            query: true,
            headers: Vec::new(),
        }
    }
}

impl CacheKey {
    /// Host, path and query.
    pub fn new() -> Self {
        CacheKey::default()
    }
    /// Keys `HEAD` apart from `GET` (a `HEAD` is then never answered from the cache).
    pub fn method(mut self, on: bool) -> Self {
        self.method = on;
        self
    }
    /// Adds the URI's scheme (requests in origin form have none, so mostly for proxies).
    pub fn scheme(mut self, on: bool) -> Self {
        self.scheme = on;
        self
    }
    /// Whether the host (URI authority, else `Host`) is part of the key.
    pub fn host(mut self, on: bool) -> Self {
        self.host = on;
        self
    }
    /// Whether the query is part of the key.
    pub fn query(mut self, on: bool) -> Self {
        self.query = on;
        self
    }
    /// Adds a request header's value to every key (a tenant header, say), on top of `Vary`.
    pub fn header(mut self, name: HeaderName) -> Self {
        self.headers.push(name);
        self
    }

    fn primary(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> String {
        let mut k = String::new();
        if self.method {
            let m = if method == Method::HEAD {
                "HEAD"
            } else {
                "GET"
            };
            k.push_str(m);
            k.push(' ');
        }
        if self.scheme {
            k.push_str(uri.scheme_str().unwrap_or("http"));
            k.push_str("://");
        }
        if self.host {
            let host = uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| {
                    headers
                        .get(HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            k.push_str(&host.to_ascii_lowercase());
        }
        k.push_str(uri.path());
        if self.query
            && let Some(q) = uri.query()
        {
            k.push('?');
            k.push_str(q);
        }
        for name in &self.headers {
            k.push('\u{1}');
            k.push_str(name.as_str());
            k.push('=');
            k.push_str(&normalised(headers, name));
        }
        k
    }
}

/// A request header's field lines joined with `,`, each trimmed, inner whitespace collapsed.
fn normalised(headers: &HeaderMap, name: &HeaderName) -> String {
    let mut parts = Vec::new();
    for v in headers.get_all(name) {
        let text = String::from_utf8_lossy(v.as_bytes());
        for part in text.split(',') {
            let words: Vec<&str> = part.split_whitespace().collect();
            if !words.is_empty() {
                parts.push(words.join(" "));
            }
        }
    }
    parts.join(",")
}

/// Counters since the cache was built, summed over its clones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpCacheStats {
    /// Responses served from the cache without going to the handler.
    pub hits: u64,
    /// Requests forwarded because nothing usable was stored.
    pub misses: u64,
    /// Stale responses served (stale-while-revalidate, stale-if-error, max-stale).
    pub stale: u64,
    /// Conditional requests sent to the handler to revalidate a stored response.
    pub revalidations: u64,
    /// Background revalidations finished (stale-while-revalidate).
    pub background_revalidations: u64,
    /// Responses stored.
    pub stored: u64,
    /// Requests that waited for another request's miss of the same key.
    pub collapsed_waits: u64,
    /// Stored entries dropped by unsafe methods or purges.
    pub invalidations: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
    revalidations: AtomicU64,
    background: AtomicU64,
    stored: AtomicU64,
    invalidations: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
    backend: Arc<dyn Backend>,
    prefix: Vec<u8>,
    body_cap: usize,
    keep_stale: Duration,
    key: CacheKey,
    name: String,
    clock: Arc<dyn Clock>,
    collapser: Collapser,
    counters: Counters,
}

/// Builds an [`HttpCache`]; see [`HttpCache::builder`].
pub struct HttpCacheBuilder {
    backend: Arc<dyn Backend>,
    namespace: String,
    body_cap: usize,
    keep_stale: Duration,
    key: CacheKey,
    name: String,
    clock: Option<Arc<dyn Clock>>,
    lease_ttl: Duration,
}

impl HttpCacheBuilder {
    /// Keys live under `keel-cache:{namespace}:` (default `http`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }
    /// Largest body stored (default [`BODY_BYTES_DEFAULT`], 1 MiB); larger responses stream
    /// through unstored.
    pub fn body_cap(mut self, bytes: usize) -> Self {
        self.body_cap = bytes;
        self
    }
    /// How long a stale entry is kept for revalidation past its freshness and stale windows
    /// (default [`KEEP_STALE_DEFAULT`], 5 minutes).
    pub fn keep_stale(mut self, keep: Duration) -> Self {
        self.keep_stale = keep;
        self
    }
    /// The parts of a request that make its key (default [`CacheKey::new`]).
    pub fn key(mut self, key: CacheKey) -> Self {
        self.key = key;
        self
    }
    /// The cache's name in `Cache-Status` (default `keel`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// The clock ages are measured on (default: the backend's, as for the value cache).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }
    /// The lease a miss holds while its request runs (default 10 s): how long a replica that
    /// died mid-request holds up the others.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// The cache.
    ///
    /// # Errors
    /// [`HttpCacheError`] for a setting that cannot work.
    pub fn build(self) -> Result<HttpCache, HttpCacheError> {
        if self.body_cap == 0 || self.body_cap > BODY_BYTES_MAX {
            return Err(HttpCacheError::BodyCap(self.body_cap));
        }
        let ns = &self.namespace;
        if ns.is_empty() || ns.len() > 128 || ns.contains(':') {
            return Err(HttpCacheError::Namespace(ns.clone()));
        }
        if TokenRef::from_str(&self.name).is_err() {
            return Err(HttpCacheError::Name(self.name));
        }
        let mut prefix = KEY_PREFIX.to_vec();
        prefix.extend_from_slice(ns.as_bytes());
        prefix.push(b':');
        let clock = self
            .clock
            .unwrap_or_else(|| Arc::new(BackendClock::new(Arc::clone(&self.backend))));
        let lease_ttl = if self.lease_ttl.is_zero() {
            LEASE_TTL_DEFAULT
        } else {
            self.lease_ttl
        };
        Ok(HttpCache {
            inner: Arc::new(Inner {
                collapser: Collapser::new(Arc::clone(&self.backend), lease_ttl, lease_ttl),
                backend: self.backend,
                prefix,
                body_cap: self.body_cap,
                keep_stale: self.keep_stale,
                key: self.key,
                name: self.name,
                clock,
                counters: Counters::default(),
            }),
        })
    }
}

/// A shared HTTP response cache: hands out [`HttpCacheLayer`]s and purges entries. Cheap to
/// clone; clones (and replicas on the same backend and namespace) share every entry.
#[derive(Clone)]
pub struct HttpCache {
    inner: Arc<Inner>,
}

impl fmt::Debug for HttpCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCache")
            .field("backend", &self.inner.backend.name())
            .field("body_cap", &self.inner.body_cap)
            .finish_non_exhaustive()
    }
}

impl HttpCache {
    /// A builder with the defaults: namespace `http`, 1 MiB body cap, key host + path + query.
    pub fn builder(backend: Arc<dyn Backend>) -> HttpCacheBuilder {
        HttpCacheBuilder {
            backend,
            namespace: "http".into(),
            body_cap: BODY_BYTES_DEFAULT,
            keep_stale: KEEP_STALE_DEFAULT,
            key: CacheKey::default(),
            name: "keel".into(),
            clock: None,
            lease_ttl: LEASE_TTL_DEFAULT,
        }
    }

    /// The tower layer.
    pub fn layer(&self) -> HttpCacheLayer {
        HttpCacheLayer {
            inner: Arc::clone(&self.inner),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> HttpCacheStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HttpCacheStats {
            hits: l(&c.hits),
            misses: l(&c.misses),
            stale: l(&c.stale),
            revalidations: l(&c.revalidations),
            background_revalidations: l(&c.background),
            stored: l(&c.stored),
            collapsed_waits: l(&self.inner.collapser.waits),
            invalidations: l(&c.invalidations),
        }
    }

    /// Drops every stored variant of `uri` (`http://host/path?query`, or `/path?query` when
    /// the key has no host), as a `GET` of it would be keyed; returns whether there was any.
    ///
    /// # Errors
    /// The backend's, or [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) for a URI
    /// that does not parse.
    pub async fn purge(&self, uri: &str) -> crate::Result<bool> {
        let primary = self.inner.primary_of_uri(uri)?;
        self.inner.invalidate(&primary).await
    }

    /// Drops every stored entry whose key starts with `uri_prefix`'s key (say
    /// `http://example.com/users/`); returns how many keys were deleted.
    ///
    /// # Errors
    /// As [`HttpCache::purge`].
    pub async fn purge_prefix(&self, uri_prefix: &str) -> crate::Result<u64> {
        let primary = self.inner.primary_of_uri(uri_prefix)?;
        let b = &self.inner.backend;
        let n = b
            .delete_prefix(&self.inner.key(b"h:", &primary, None))
            .await?
            + b.delete_prefix(&self.inner.key(b"v:", &primary, None))
                .await?;
        if n > 0 {
            bump(&self.inner.counters.invalidations);
        }
        Ok(n)
    }
}

/// The tower layer of an [`HttpCache`].
#[derive(Clone)]
pub struct HttpCacheLayer {
    inner: Arc<Inner>,
}

impl fmt::Debug for HttpCacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HttpCacheLayer")
    }
}

impl<S> Layer<S> for HttpCacheLayer {
    type Service = HttpCacheService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HttpCacheService {
            inner,
            cache: Arc::clone(&self.inner),
        }
    }
}

/// The service [`HttpCacheLayer`] wraps around a handler.
#[derive(Clone)]
pub struct HttpCacheService<S> {
    inner: S,
    cache: Arc<Inner>,
}

impl<S> fmt::Debug for HttpCacheService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HttpCacheService")
    }
}

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<LayerBody<B>>, E>> + Send>>;

/// The future of [`HttpCacheService`].
pub struct ResponseFuture<B, E> {
    fut: BoxedResponse<B, E>,
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<LayerBody<B>>, E>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.fut.as_mut().poll(cx)
    }
}

/// A response as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// When it was received, on the cache's clock (ms).
    response_ms: u64,
    /// Its age when received (§4.2.3), seconds.
    initial_age_s: u64,
}

/// The `Vary` field names of the latest response stored under a URI.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VaryIndex {
    names: Vec<String>,
}

fn encode<T: Serialize>(v: &T) -> Option<Vec<u8>> {
    let mut out = vec![RECORD_VERSION];
    out.extend(postcard::to_stdvec(v).ok()?);
    Some(out)
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

impl Stored {
    fn header_map(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                h.append(n, v);
            }
        }
        h
    }

    fn from_parts(
        status: StatusCode,
        headers: &HeaderMap,
        body: Vec<u8>,
        request_ms: u64,
        response_ms: u64,
    ) -> Stored {
        Stored {
            status: status.as_u16(),
            headers: headers
                .iter()
                .filter(|(n, _)| !NOT_STORED.contains(n))
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            body,
            response_ms,
            initial_age_s: initial_age(headers, request_ms / 1000, response_ms / 1000),
        }
    }

    /// Current age in seconds (§4.2.3).
    fn age_s(&self, now_ms: u64) -> u64 {
        self.initial_age_s + now_ms.saturating_sub(self.response_ms) / 1000
    }
}

/// What a lookup found.
enum Lookup {
    UriMiss,
    VaryMiss,
    Found(Box<Stored>),
}

/// Cache-Status parameters for one response.
#[derive(Default)]
struct Status {
    hit: bool,
    fwd: Option<&'static str>,
    fwd_status: Option<u16>,
    stored: bool,
    ttl: Option<i64>,
    collapsed: bool,
    detail: Option<&'static str>,
}

impl Status {
    /// The `outcome` label: `hit`, `stale` (served past its freshness), `miss`,
    /// `revalidated` (a stored response checked with the origin) or `bypass` (the request's
    /// directives sent it to the origin).
    fn outcome(&self) -> &'static str {
        if self.hit {
            return if self.ttl.is_some_and(|t| t < 0) {
                "stale"
            } else {
                "hit"
            };
        }
        match self.fwd {
            Some("stale") => "revalidated",
            Some("request") => "bypass",
            _ => "miss",
        }
    }
}

impl Inner {
    fn key(&self, kind: &[u8], primary: &str, secondary: Option<&str>) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(kind);
        k.extend_from_slice(primary.as_bytes());
        if let Some(s) = secondary {
            k.push(0);
            k.extend_from_slice(s.as_bytes());
        }
        k
    }

    fn primary_of_uri(&self, uri: &str) -> crate::Result<String> {
        let parsed: Uri = uri.parse().map_err(|e: http::uri::InvalidUri| {
            crate::Error::new(
                crate::ErrorKind::InvalidInput,
                format!("not a URI: {uri:?}"),
            )
            .with_source(e)
        })?;
        Ok(self.key.primary(&Method::GET, &parsed, &HeaderMap::new()))
    }

    async fn now_ms(&self) -> u64 {
        match self.clock.now_ms().await {
            Ok(ms) => ms,
            Err(e) => {
                tracing::warn!(target: "keel::cache::http", error = %e, "clock failed; using the system clock");
                super::system_ms()
            }
        }
    }

    /// The secondary key of a request for the `Vary` names (a digest, so any header value
    /// fits in a key).
    fn secondary(names: &[String], headers: &HeaderMap) -> String {
        let mut text = String::new();
        for name in names {
            text.push_str(name);
            text.push(':');
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                text.push_str(&normalised(headers, &n));
            }
            text.push('\n');
        }
        blake3::hash(text.as_bytes()).to_hex()[..32].to_owned()
    }

    async fn lookup(&self, primary: &str, headers: &HeaderMap) -> crate::Result<Lookup> {
        let Some(index) = self.backend.get(&self.key(b"v:", primary, None)).await? else {
            return Ok(Lookup::UriMiss);
        };
        let Some(index) = decode::<VaryIndex>(&index) else {
            return Ok(Lookup::UriMiss);
        };
        if index.names.iter().any(|n| n == "*") {
            return Ok(Lookup::VaryMiss);
        }
        let sec = Self::secondary(&index.names, headers);
        match self
            .backend
            .get(&self.key(b"h:", primary, Some(&sec)))
            .await?
        {
            Some(bytes) => match decode::<Stored>(&bytes) {
                Some(s) => Ok(Lookup::Found(Box::new(s))),
                None => {
                    tracing::warn!(target: "keel::cache::http", key = %redact(primary.as_bytes()), "stored response failed to decode; a miss");
                    Ok(Lookup::VaryMiss)
                }
            },
            None => Ok(Lookup::VaryMiss),
        }
    }

    /// Stores a response under the request's variant; returns whether it did.
    async fn store(&self, primary: &str, req_headers: &HeaderMap, stored: &Stored) -> bool {
        let headers = stored.header_map();
        let cc = ResponseCc::parse(&headers);
        let lifetime = freshness_lifetime(&cc, &headers, stored.response_ms / 1000);
        let windows = cc
            .stale_while_revalidate
            .max(cc.stale_if_error)
            .unwrap_or(0);
        let keep = match lifetime {
            Some(l) => {
                Duration::from_secs(l.saturating_sub(stored.initial_age_s) + windows)
                    + self.keep_stale
            }
            None => REVALIDATE_ONLY_KEEP,
        }
        .min(TTL_MAX);
        let mut names: Vec<String> = headers
            .get_all(VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        names.dedup();
        let sec = Self::secondary(&names, req_headers);
        let (Some(record), Some(index)) = (encode(stored), encode(&VaryIndex { names })) else {
            return false;
        };
        let r = async {
            self.backend
                .set(&self.key(b"h:", primary, Some(&sec)), &record, Some(keep))
                .await?;
            self.backend
                .set(&self.key(b"v:", primary, None), &index, Some(keep))
                .await
        }
        .await;
        match r {
            Ok(()) => {
                bump(&self.counters.stored);
                true
            }
            Err(e) => {
                tracing::warn!(target: "keel::cache::http", key = %redact(primary.as_bytes()), error = %e,
                    "storing a response failed; it is served but not cached");
                false
            }
        }
    }

    async fn invalidate(&self, primary: &str) -> crate::Result<bool> {
        let b = &self.backend;
        let index = b.delete(&self.key(b"v:", primary, None)).await?;
        let variants = b.delete_prefix(&self.key(b"h:", primary, Some(""))).await?;
        let any = index || variants > 0;
        if any {
            bump(&self.counters.invalidations);
        }
        Ok(any)
    }

    /// The `Cache-Status` header of one response; also counts the response in
    /// `keel_cache_requests_total{cache="http"}` (each response builds its status once).
    fn cache_status(&self, s: &Status) -> Option<HeaderValue> {
        let outcome = s.outcome();
        tracing::debug!(target: "keel::cache::http", outcome, collapsed = s.collapsed, "response cache decision");
        crate::observe::cache_request("http", outcome);
        if s.collapsed {
            crate::observe::cache_coalesced("http");
        }
        let name = TokenRef::from_str(&self.name).ok()?;
        let mut list = ListSerializer::new();
        let mut item = list.bare_item(name);
        if s.hit {
            item = item.parameter(KeyRef::constant("hit"), true);
        }
        if let Some(fwd) = s.fwd {
            item = item.parameter(KeyRef::constant("fwd"), TokenRef::from_str(fwd).ok()?);
        }
        if let Some(st) = s.fwd_status {
            item = item.parameter(
                KeyRef::constant("fwd-status"),
                sfv::Integer::try_from(i64::from(st)).ok()?,
            );
        }
        if s.stored {
            item = item.parameter(KeyRef::constant("stored"), true);
        }
        if s.collapsed {
            item = item.parameter(KeyRef::constant("collapsed"), true);
        }
        if let Some(ttl) = s.ttl {
            item = item.parameter(KeyRef::constant("ttl"), sfv::Integer::try_from(ttl).ok()?);
        }
        if let Some(detail) = s.detail {
            item = item.parameter(KeyRef::constant("detail"), TokenRef::from_str(detail).ok()?);
        }
        let _ = item;
        HeaderValue::from_str(&list.finish().ok()?).ok()
    }
}

/// A response built from a stored one: full, or 304 when the request's conditions say the
/// client's copy is current, with `Age` and `Cache-Status`.
fn from_stored<B>(
    cache: &Inner,
    stored: &Stored,
    req_method: &Method,
    req_headers: &HeaderMap,
    now_ms: u64,
    status: &Status,
) -> Response<LayerBody<B>> {
    let headers = stored.header_map();
    let not_modified = stored.status == 200 && not_modified(req_headers, &headers);
    let mut res = if not_modified {
        let mut r = Response::new(LayerBody::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        for name in &NOT_MODIFIED_HEADERS {
            for v in headers.get_all(name) {
                r.headers_mut().append(name.clone(), v.clone());
            }
        }
        r
    } else {
        let body = if req_method == Method::HEAD {
            LayerBody::empty()
        } else {
            LayerBody::full(Bytes::from(stored.body.clone()))
        };
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
        *r.headers_mut() = headers;
        r
    };
    res.headers_mut()
        .insert(AGE, HeaderValue::from(stored.age_s(now_ms)));
    if let Some(v) = cache.cache_status(status) {
        res.headers_mut().insert(CACHE_STATUS.clone(), v);
    }
    res
}

/// RFC 9110 §13.2.2: `If-None-Match` first (weak comparison); without it,
/// `If-Modified-Since` against `Last-Modified` (or `Date`).
fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let etag = stored.get(ETAG).and_then(|v| v.to_str().ok());
    if req.contains_key(IF_NONE_MATCH) {
        let cond: Vec<&str> = req
            .get_all(IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        return if_none_match(&cond.join(","), etag);
    }
    if let Some(ims) = http_date(req, IF_MODIFIED_SINCE) {
        let lm = http_date(stored, LAST_MODIFIED).or_else(|| http_date(stored, DATE));
        return lm.is_some_and(|lm| lm <= ims);
    }
    false
}

/// Whether a response to this request may be stored (§3, §3.5), and for how long it is fresh.
fn storable(
    req_headers: &HeaderMap,
    rcc: &RequestCc,
    status: StatusCode,
    headers: &HeaderMap,
    response_s: u64,
) -> bool {
    // 5xx are not stored: they would replace a good entry that stale-if-error could serve.
    if rcc.no_store
        || status.is_server_error()
        || status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return false;
    }
    let cc = ResponseCc::parse(headers);
    if cc.no_store || cc.private || headers.contains_key(SET_COOKIE) {
        return false;
    }
    if headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|n| n.trim() == "*"))
    {
        return false;
    }
    if req_headers.contains_key(AUTHORIZATION)
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate)
    {
        return false;
    }
    let validator = headers.contains_key(ETAG) || headers.contains_key(LAST_MODIFIED);
    freshness_lifetime(&cc, headers, response_s).is_some()
        || ((cc.no_cache || cc.public) && validator)
}

/// What reading a handler's response body to the cap gave.
enum Buffered<B> {
    Whole(Vec<u8>),
    /// Over the cap: the chunks read so far, then the rest of the body.
    Over(Response<LayerBody<B>>),
    /// The body failed while being read.
    Failed,
}

async fn buffer<B>(res: Response<B>, cap: usize) -> (http::response::Parts, Buffered<B>)
where
    B: Body<Data = Bytes> + Unpin,
{
    let (parts, mut body) = res.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap as u64) {
        let res = Response::from_parts(parts.clone(), LayerBody::inner(body));
        return (parts, Buffered::Over(res));
    }
    let mut buf = BytesMut::new();
    let mut chunks = std::collections::VecDeque::new();
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => break,
            Some(Err(_)) => return (parts, Buffered::Failed),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    chunks.push_back(data);
                    if buf.len() > cap {
                        let res =
                            Response::from_parts(parts.clone(), LayerBody::prefixed(chunks, body));
                        return (parts, Buffered::Over(res));
                    }
                }
            }
        }
    }
    (parts, Buffered::Whole(buf.to_vec()))
}

fn is_unsafe(m: &Method) -> bool {
    matches!(
        *m,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

fn is_error_for_sie(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HttpCacheService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Default + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
{
    type Response = Response<LayerBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The clone that was driven to readiness serves this request; the fresh clone stays.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let cache = Arc::clone(&self.cache);
        ResponseFuture {
            fut: Box::pin(handle(cache, inner, req)),
        }
    }
}

/// Drives a service to readiness, then calls it (the tower contract: clones made inside the
/// layer have not been polled ready).
async fn ready_call<S, R>(svc: &mut S, req: R) -> Result<S::Response, S::Error>
where
    S: Service<R>,
{
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
    svc.call(req).await
}

fn passthrough<B>(res: Response<B>) -> Response<LayerBody<B>> {
    res.map(LayerBody::inner)
}

fn with_status<B>(
    cache: &Inner,
    mut res: Response<LayerBody<B>>,
    s: &Status,
) -> Response<LayerBody<B>> {
    if let Some(v) = cache.cache_status(s) {
        res.headers_mut().insert(CACHE_STATUS.clone(), v);
    }
    res
}

fn gateway_timeout<B>(cache: &Inner, fwd: &'static str) -> Response<LayerBody<B>> {
    let mut r = Response::new(LayerBody::empty());
    *r.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    with_status(
        cache,
        r,
        &Status {
            fwd: Some(fwd),
            detail: Some("only-if-cached"),
            ..Status::default()
        },
    )
}

fn bad_gateway<B>(cache: &Inner) -> Response<LayerBody<B>> {
    let mut r = Response::new(LayerBody::empty());
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    with_status(
        cache,
        r,
        &Status {
            fwd: Some("miss"),
            detail: Some("body-failed"),
            ..Status::default()
        },
    )
}

async fn handle<S, ReqBody, ResBody>(
    cache: Arc<Inner>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<LayerBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Default + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
{
    let method = req.method().clone();
    if is_unsafe(&method) {
        let primary = cache.key.primary(&Method::GET, req.uri(), req.headers());
        let req_authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let res = ready_call(&mut inner, req).await?;
        if res.status().as_u16() < 400 {
            let mut targets = vec![primary];
            for name in [LOCATION, CONTENT_LOCATION] {
                let Some(loc) = res.headers().get(&name).and_then(|v| v.to_str().ok()) else {
                    continue;
                };
                let Ok(uri) = loc.parse::<Uri>() else {
                    continue;
                };
                // Same origin only (§4.4): a relative reference, or an absolute one naming
                // the request's host.
                let same = match uri.authority() {
                    None => true,
                    Some(a) => req_authority
                        .as_deref()
                        .is_some_and(|h| h.eq_ignore_ascii_case(a.as_str())),
                };
                if same && uri.path().starts_with('/') {
                    let mut headers = HeaderMap::new();
                    if let Some(h) = &req_authority
                        && let Ok(v) = HeaderValue::from_str(h)
                    {
                        headers.insert(HOST, v);
                    }
                    let path_only: Uri = uri
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/")
                        .parse()
                        .unwrap_or_else(|_| Uri::from_static("/"));
                    targets.push(cache.key.primary(&Method::GET, &path_only, &headers));
                }
            }
            for t in targets {
                if let Err(e) = cache.invalidate(&t).await {
                    tracing::warn!(target: "keel::cache::http", key = %redact(t.as_bytes()), error = %e,
                        "invalidation after an unsafe method failed; the entry lives until it expires");
                }
            }
        }
        return Ok(passthrough(res));
    }
    if method != Method::GET && method != Method::HEAD {
        return Ok(passthrough(ready_call(&mut inner, req).await?));
    }
    let rcc = RequestCc::parse(req.headers());
    let primary = cache.key.primary(&method, req.uri(), req.headers());
    if rcc.no_store {
        bump(&cache.counters.misses);
        let res = ready_call(&mut inner, req).await?;
        return Ok(with_status(
            &cache,
            passthrough(res),
            &Status {
                fwd: Some("request"),
                ..Status::default()
            },
        ));
    }
    let now = cache.now_ms().await;
    let lookup = match cache.lookup(&primary, req.headers()).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(target: "keel::cache::http", key = %redact(primary.as_bytes()), error = %e,
                "cache backend failed; forwarding uncached (fail open)");
            let res = ready_call(&mut inner, req).await?;
            return Ok(with_status(
                &cache,
                passthrough(res),
                &Status {
                    fwd: Some("miss"),
                    detail: Some("backend-error"),
                    ..Status::default()
                },
            ));
        }
    };
    match lookup {
        Lookup::Found(stored) => serve_found(cache, inner, req, rcc, primary, *stored, now).await,
        miss => {
            let fwd = if matches!(miss, Lookup::UriMiss) {
                "uri-miss"
            } else {
                "vary-miss"
            };
            if rcc.only_if_cached {
                return Ok(gateway_timeout(&cache, fwd));
            }
            bump(&cache.counters.misses);
            if method != Method::GET || req.headers().contains_key(AUTHORIZATION) {
                return forward(&cache, inner, req, &rcc, &primary, fwd).await;
            }
            // Collapse concurrent misses of this key: one request goes forward.
            let lease = cache.key(b"l:", &primary, None);
            let (parts, body) = req.into_parts();
            let parts_again = parts.clone();
            let req = Request::from_parts(parts, body);
            let cache2 = Arc::clone(&cache);
            let inner2 = inner.clone();
            let rcc2 = rcc.clone();
            let primary2 = primary.clone();
            match cache
                .collapser
                .run(&lease, forward(&cache2, inner2, req, &rcc2, &primary2, fwd))
                .await
            {
                Collapsed::Ran(r) => r,
                Collapsed::Waited => {
                    let now = cache.now_ms().await;
                    if let Ok(Lookup::Found(stored)) =
                        cache.lookup(&primary, &parts_again.headers).await
                        && let Some(ttl) = fresh_for(&stored, &rcc, &parts_again.headers, now)
                    {
                        bump(&cache.counters.hits);
                        let s = Status {
                            hit: true,
                            collapsed: true,
                            ttl: Some(ttl),
                            ..Status::default()
                        };
                        return Ok(from_stored(
                            &cache,
                            &stored,
                            &method,
                            &parts_again.headers,
                            now,
                            &s,
                        ));
                    }
                    let req = Request::from_parts(parts_again, ReqBody::default());
                    forward(&cache, inner, req, &rcc, &primary, "miss").await
                }
            }
        }
    }
}

/// Seconds of freshness left for this request, if the stored response may be reused without
/// revalidation (§4.2, §3.5, request directives).
fn fresh_for(stored: &Stored, rcc: &RequestCc, req_headers: &HeaderMap, now: u64) -> Option<i64> {
    let headers = stored.header_map();
    let cc = ResponseCc::parse(&headers);
    if req_headers.contains_key(AUTHORIZATION)
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate)
    {
        return None;
    }
    if cc.no_cache || rcc.no_cache {
        return None;
    }
    let lifetime = freshness_lifetime(&cc, &headers, stored.response_ms / 1000)?;
    let age = stored.age_s(now);
    if rcc.max_age.is_some_and(|m| age > m) {
        return None;
    }
    let left = lifetime as i64 - age as i64;
    if left > 0 {
        if rcc.min_fresh.is_some_and(|m| (left as u64) < m) {
            return None;
        }
        return Some(left);
    }
    // Stale: only with the request's max-stale, and only where the response allows it.
    match rcc.max_stale {
        Some(bound) if cc.may_serve_stale() && bound.is_none_or(|b| (-left) as u64 <= b) => {
            Some(left)
        }
        _ => None,
    }
}

async fn serve_found<S, ReqBody, ResBody>(
    cache: Arc<Inner>,
    inner: S,
    req: Request<ReqBody>,
    rcc: RequestCc,
    primary: String,
    stored: Stored,
    now: u64,
) -> Result<Response<LayerBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Default + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
{
    let method = req.method().clone();
    let headers = stored.header_map();
    let cc = ResponseCc::parse(&headers);
    let auth_blocked = req.headers().contains_key(AUTHORIZATION)
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate);
    if auth_blocked {
        if rcc.only_if_cached {
            return Ok(gateway_timeout(&cache, "miss"));
        }
        bump(&cache.counters.misses);
        return forward(&cache, inner, req, &rcc, &primary, "miss").await;
    }
    if let Some(ttl) = fresh_for(&stored, &rcc, req.headers(), now) {
        bump(&cache.counters.hits);
        if ttl <= 0 {
            bump(&cache.counters.stale);
        }
        let s = Status {
            hit: true,
            ttl: Some(ttl),
            ..Status::default()
        };
        return Ok(from_stored(
            &cache,
            &stored,
            &method,
            req.headers(),
            now,
            &s,
        ));
    }
    let lifetime = freshness_lifetime(&cc, &headers, stored.response_ms / 1000);
    let age = stored.age_s(now);
    let stale_by = lifetime.map(|l| age.saturating_sub(l));
    // stale-while-revalidate: serve now, one background revalidation.
    if !cc.no_cache
        && !rcc.no_cache
        && rcc.max_age.is_none()
        && cc.may_serve_stale()
        && let (Some(swr), Some(by)) = (cc.stale_while_revalidate, stale_by)
        && by > 0
        && by <= swr
    {
        bump(&cache.counters.hits);
        bump(&cache.counters.stale);
        spawn_revalidation(Arc::clone(&cache), inner, &req, primary, stored.clone());
        let ttl = lifetime.map_or(0, |l| l as i64 - age as i64);
        let s = Status {
            hit: true,
            ttl: Some(ttl),
            ..Status::default()
        };
        return Ok(from_stored(
            &cache,
            &stored,
            &method,
            req.headers(),
            now,
            &s,
        ));
    }
    if rcc.only_if_cached {
        return Ok(gateway_timeout(&cache, "stale"));
    }
    let fwd = if rcc.no_cache || rcc.max_age.is_some() || rcc.min_fresh.is_some() {
        "request"
    } else {
        "stale"
    };
    // Within stale-if-error (the response's, or the request's), a failing origin is masked.
    let sie = cc.stale_if_error.max(rcc.stale_if_error);
    let sie_ok = stale_by.is_some_and(|by| sie.is_some_and(|w| by <= w));
    revalidate(cache, inner, req, rcc, primary, stored, fwd, sie_ok).await
}

/// The request to the handler for revalidating `stored`: the client's conditionals replaced by
/// the stored validators.
fn conditional<B>(mut req: Request<B>, stored_headers: &HeaderMap) -> Request<B> {
    let h = req.headers_mut();
    h.remove(IF_NONE_MATCH);
    h.remove(IF_MODIFIED_SINCE);
    if let Some(etag) = stored_headers.get(ETAG) {
        h.insert(IF_NONE_MATCH, etag.clone());
    }
    if let Some(lm) = stored_headers.get(LAST_MODIFIED) {
        h.insert(IF_MODIFIED_SINCE, lm.clone());
    }
    req
}

/// §4.3.4: a 304 updates the stored headers (except framing), and the response time.
fn refreshed(
    stored: &Stored,
    not_modified: &HeaderMap,
    request_ms: u64,
    response_ms: u64,
) -> Stored {
    let mut headers = stored.header_map();
    for name in not_modified.keys() {
        if name == CONTENT_LENGTH || NOT_STORED.contains(name) {
            continue;
        }
        headers.remove(name);
        for v in not_modified.get_all(name) {
            headers.append(name.clone(), v.clone());
        }
    }
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    Stored::from_parts(
        status,
        &headers,
        stored.body.clone(),
        request_ms,
        response_ms,
    )
}

#[allow(clippy::too_many_arguments)]
async fn revalidate<S, ReqBody, ResBody>(
    cache: Arc<Inner>,
    mut inner: S,
    req: Request<ReqBody>,
    rcc: RequestCc,
    primary: String,
    stored: Stored,
    fwd: &'static str,
    sie_ok: bool,
) -> Result<Response<LayerBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Default + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
{
    bump(&cache.counters.revalidations);
    let method = req.method().clone();
    let client_headers = req.headers().clone();
    let stored_headers = stored.header_map();
    let request_ms = cache.now_ms().await;
    let result = ready_call(&mut inner, conditional(req, &stored_headers)).await;
    let response_ms = cache.now_ms().await;
    let res = match result {
        Ok(res) => res,
        Err(e) if sie_ok => {
            let _ = e;
            bump(&cache.counters.stale);
            let s = Status {
                fwd: Some(fwd),
                detail: Some("stale-if-error"),
                ..Status::default()
            };
            return Ok(from_stored(
                &cache,
                &stored,
                &method,
                &client_headers,
                response_ms,
                &s,
            ));
        }
        Err(e) => return Err(e),
    };
    let status = res.status();
    if status == StatusCode::NOT_MODIFIED {
        let fresh = refreshed(&stored, res.headers(), request_ms, response_ms);
        let stored_ok = cache.store(&primary, &client_headers, &fresh).await;
        let s = Status {
            fwd: Some(fwd),
            fwd_status: Some(304),
            stored: stored_ok,
            ..Status::default()
        };
        return Ok(from_stored(
            &cache,
            &fresh,
            &method,
            &client_headers,
            response_ms,
            &s,
        ));
    }
    if is_error_for_sie(status) && sie_ok {
        bump(&cache.counters.stale);
        let s = Status {
            fwd: Some(fwd),
            fwd_status: Some(status.as_u16()),
            detail: Some("stale-if-error"),
            ..Status::default()
        };
        return Ok(from_stored(
            &cache,
            &stored,
            &method,
            &client_headers,
            response_ms,
            &s,
        ));
    }
    Ok(finish(
        &cache,
        res,
        &method,
        &client_headers,
        &rcc,
        &primary,
        request_ms,
        response_ms,
        fwd,
    )
    .await)
}

/// Forwards a request (its own conditionals removed, so a full response comes back to store),
/// stores the response if it may, and answers the client's conditionals from it.
async fn forward<S, ReqBody, ResBody>(
    cache: &Inner,
    mut inner: S,
    mut req: Request<ReqBody>,
    rcc: &RequestCc,
    primary: &str,
    fwd: &'static str,
) -> Result<Response<LayerBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Default + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
{
    let method = req.method().clone();
    let client_headers = req.headers().clone();
    if method == Method::GET {
        req.headers_mut().remove(IF_NONE_MATCH);
        req.headers_mut().remove(IF_MODIFIED_SINCE);
    }
    let request_ms = cache.now_ms().await;
    let res = ready_call(&mut inner, req).await?;
    let response_ms = cache.now_ms().await;
    Ok(finish(
        cache,
        res,
        &method,
        &client_headers,
        rcc,
        primary,
        request_ms,
        response_ms,
        fwd,
    )
    .await)
}

#[allow(clippy::too_many_arguments)]
async fn finish<ResBody>(
    cache: &Inner,
    res: Response<ResBody>,
    method: &Method,
    client_headers: &HeaderMap,
    rcc: &RequestCc,
    primary: &str,
    request_ms: u64,
    response_ms: u64,
    fwd: &'static str,
) -> Response<LayerBody<ResBody>>
where
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
{
    let mut s = Status {
        fwd: Some(fwd),
        ..Status::default()
    };
    if fwd == "stale" || fwd == "request" {
        s.fwd_status = Some(res.status().as_u16());
    }
    let may_store = *method == Method::GET
        && storable(
            client_headers,
            rcc,
            res.status(),
            res.headers(),
            response_ms / 1000,
        );
    if !may_store {
        return with_status(cache, passthrough(res), &s);
    }
    let (parts, buffered) = buffer(res, cache.body_cap).await;
    match buffered {
        Buffered::Over(res) => {
            s.detail = Some("too-large");
            with_status(cache, res, &s)
        }
        Buffered::Failed => bad_gateway(cache),
        Buffered::Whole(body) => {
            let stored =
                Stored::from_parts(parts.status, &parts.headers, body, request_ms, response_ms);
            s.stored = cache.store(primary, client_headers, &stored).await;
            from_stored(cache, &stored, method, client_headers, response_ms, &s)
        }
    }
}

/// One background revalidation of a stale entry (stale-while-revalidate), across replicas:
/// whoever takes the entry's revalidation lease sends it; the others do nothing.
fn spawn_revalidation<S, ReqBody, ResBody>(
    cache: Arc<Inner>,
    mut inner: S,
    req: &Request<ReqBody>,
    primary: String,
    stored: Stored,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Default + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
{
    let mut background = Request::new(ReqBody::default());
    *background.method_mut() = Method::GET;
    *background.uri_mut() = req.uri().clone();
    *background.headers_mut() = req.headers().clone();
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    handle.spawn(async move {
        let lease = cache.key(b"r:", &primary, None);
        let nonce: [u8; 16] = rand::random();
        match cache
            .backend
            .set_nx(&lease, &nonce, Some(cache.collapser_lease_ttl()))
            .await
        {
            Ok(true) => {}
            _ => return,
        }
        // A replica (or an earlier task here) may have refreshed the entry already.
        if let Ok(Lookup::Found(now_stored)) = cache.lookup(&primary, background.headers()).await
            && now_stored.response_ms != stored.response_ms
        {
            let _ = cache.backend.compare_and_delete(&lease, &nonce).await;
            return;
        }
        let client_headers = background.headers().clone();
        let stored_headers = stored.header_map();
        let request_ms = cache.now_ms().await;
        let result = ready_call(&mut inner, conditional(background, &stored_headers)).await;
        let response_ms = cache.now_ms().await;
        if let Ok(res) = result {
            let rcc = RequestCc::default();
            if res.status() == StatusCode::NOT_MODIFIED {
                let fresh = refreshed(&stored, res.headers(), request_ms, response_ms);
                cache.store(&primary, &client_headers, &fresh).await;
            } else if storable(
                &client_headers,
                &rcc,
                res.status(),
                res.headers(),
                response_ms / 1000,
            ) {
                let (parts, buffered) = buffer(res, cache.body_cap).await;
                if let Buffered::Whole(body) = buffered {
                    let fresh = Stored::from_parts(
                        parts.status,
                        &parts.headers,
                        body,
                        request_ms,
                        response_ms,
                    );
                    cache.store(&primary, &client_headers, &fresh).await;
                }
            }
        }
        let _ = cache.backend.compare_and_delete(&lease, &nonce).await;
        bump(&cache.counters.background);
    });
}

impl Inner {
    fn collapser_lease_ttl(&self) -> Duration {
        self.collapser.lease_ttl
    }
}
