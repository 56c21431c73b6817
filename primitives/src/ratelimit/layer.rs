//! [`RateLimitLayer`]: a tower layer that admits or rejects requests with a [`RateLimiter`]
//! or a [`Stacked`] set of policies (feature `http`).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::{net::SocketAddr, sync::Arc};
//! use axum::{Router, routing::get};
//! use keel_primitives::Embedded;
//! use keel_primitives::ratelimit::{Quota, RateLimitLayer, RateLimiter, Strategy};
//!
//! let backend = Arc::new(Embedded::open("./keel-data")?);
//! let limiter = RateLimiter::new(backend, "api", Strategy::Gcra, Quota::per_second(10))?;
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(RateLimitLayer::builder().limiter(limiter).build()?); // per peer IP
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What a request goes through
//! 1. The first matching [`Route`] (method and path) picks the policies; no match and no
//!    default limiter: the request passes untouched.
//! 2. The key [`Extractor`] (default: the peer IP) gives the key; on failure,
//!    [`OnExtractError`] decides (default 400).
//! 3. A [`QuotaOverride`], if set, may replace policies' quotas for this request (plan tiers).
//! 4. Every policy decides ([`Stacked::check_all`]); the backend stores only a BLAKE3 digest
//!    of the key.
//! 5. Admitted: the handler runs and its response gets the headers. Denied: `429` with a
//!    problem document naming the violated policy and the same headers, plus `Retry-After`.
//!
//! # Headers, on every response the layer decided on
//! - `RateLimit-Policy: "burst";q=10;w=1, "hourly";q=1000;w=3600` and
//!   `RateLimit: "burst";r=9;t=1, "hourly";r=999;t=3600` (draft-ietf-httpapi-ratelimit-headers
//!   -10 structured fields, serialized with `sfv`), every stacked policy listed: `q` is the
//!   policy's capacity (the limit for windows, the burst for buckets), `w` its period, `r` what
//!   remains, `t` the seconds until it is back to full, all rounded up.
//! - `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (seconds) of the
//!   reported decision (the tightest policy), unless turned off with
//!   [`RateLimitLayerBuilder::legacy_headers`].
//! - `Retry-After` (seconds, rounded up: never earlier than the decision) on 429.
//! - Nested layers (one per client IP around one per account, say) each add theirs: the
//!   `RateLimit` and `RateLimit-Policy` lists name every policy of both, and the legacy
//!   headers are those of the decision with less remaining.
//!
//! # When the backend fails
//! [`OnBackendError::FailOpen`] (the default) admits the request, logs a warning and adds no
//! headers; [`OnBackendError::FailClosed`] answers 503. Invalid quotas (from an override) and
//! lost compare-and-swap races count as failures too. In shadow mode
//! ([`RateLimitLayerBuilder::shadow`]) decisions and their headers are computed and logged
//! but never enforced nor sent: every request passes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use sfv::{KeyRef, ListSerializer, StringRef};
use tower::{Layer, Service};
use tracing::Instrument;

use super::{Decision, QuotaOverrides, RateLimitError, RateLimiter, StackDecision, Stacked};
pub use crate::http::OnBackendError;
use crate::http::problem::{SharedRenderer, default_renderer};
use crate::http::{Extractor, LayerBody, OnExtractError, Problem, ProblemRenderer, redact};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-10).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-10).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// Legacy `X-RateLimit-Limit`.
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// Legacy `X-RateLimit-Remaining`.
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// Legacy `X-RateLimit-Reset` (seconds until the quota is full again).
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Most [`Route`]s in one layer.
pub const ROUTES_MAX: usize = 256;

/// Resolves quota overrides for a request asynchronously (e.g. the user's plan tier from a
/// request extension or a lookup). Any `Fn(Parts) -> impl Future<Output = QuotaOverrides>`
/// is one (it gets a clone of the request head).
#[async_trait]
pub trait QuotaOverride: Send + Sync + 'static {
    /// The overrides for this request; [`QuotaOverrides::new`] for none.
    async fn overrides(&self, parts: &Parts) -> QuotaOverrides;
}

#[async_trait]
impl<F, Fut> QuotaOverride for F
where
    F: Fn(Parts) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = QuotaOverrides> + Send + 'static,
{
    async fn overrides(&self, parts: &Parts) -> QuotaOverrides {
        self(parts.clone()).await
    }
}

/// Policies for some requests: a path (exact, or a prefix ending in `*`: `/api/*`) and
/// optionally methods.
#[derive(Debug, Clone)]
pub struct Route {
    path: String,
    prefix: bool,
    methods: Vec<Method>,
    limiter: Stacked,
}

impl Route {
    /// Requests to `path` (`/login`; `/api/*` for a prefix, `/*` for every path), any method,
    /// limited by `limiter`.
    pub fn new(path: impl Into<String>, limiter: impl Into<Stacked>) -> Self {
        let path: String = path.into();
        let (path, prefix) = match path.strip_suffix('*') {
            Some(prefix) => (prefix.to_owned(), true),
            None => (path, false),
        };
        Route {
            path,
            prefix,
            methods: Vec::new(),
            limiter: limiter.into(),
        }
    }

    /// Only these methods.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        let path_ok = if self.prefix {
            path.starts_with(&self.path)
        } else {
            path == self.path
        };
        path_ok && (self.methods.is_empty() || self.methods.contains(method))
    }
}

/// A layer configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimitLayerError {
    /// Neither a default limiter nor any route: the layer would do nothing.
    #[error(
        "the rate-limit layer has no limiter and no routes: add `.limiter(..)` or `.route(..)`"
    )]
    NothingToLimit,
    /// A route's path does not start with `/`.
    #[error("route path {path:?} must start with '/'")]
    InvalidRoute {
        /// The path.
        path: String,
    },
    /// More than [`ROUTES_MAX`] routes.
    #[error("{count} routes; at most {ROUTES_MAX}")]
    TooManyRoutes {
        /// How many.
        count: usize,
    },
}

struct Config {
    default: Option<Stacked>,
    routes: Vec<Route>,
    key: Extractor,
    overrides: Option<Arc<dyn QuotaOverride>>,
    on_extract_error: OnExtractError,
    on_backend_error: OnBackendError,
    shadow: bool,
    legacy_headers: bool,
    renderer: SharedRenderer,
}

/// Builds a [`RateLimitLayer`]; validated once by [`RateLimitLayerBuilder::build`].
pub struct RateLimitLayerBuilder {
    config: Config,
}

impl fmt::Debug for RateLimitLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayerBuilder")
            .finish_non_exhaustive()
    }
}

impl RateLimitLayerBuilder {
    /// The policies for requests no [`Route`] matches (a [`RateLimiter`] or a [`Stacked`]).
    /// Without it, unmatched requests pass untouched.
    pub fn limiter(mut self, limiter: impl Into<Stacked>) -> Self {
        self.config.default = Some(limiter.into());
        self
    }

    /// Adds a route; the first matching route wins, in the order added.
    pub fn route(mut self, route: Route) -> Self {
        self.config.routes.push(route);
        self
    }

    /// Who a request counts against (default [`Extractor::peer_ip`]).
    pub fn key(mut self, key: Extractor) -> Self {
        self.config.key = key;
        self
    }

    /// Per-request quota overrides, resolved asynchronously.
    pub fn quota_override(mut self, overrides: impl QuotaOverride) -> Self {
        self.config.overrides = Some(Arc::new(overrides));
        self
    }

    /// What to do when the key cannot be extracted (default 400).
    pub fn on_extract_error(mut self, outcome: OnExtractError) -> Self {
        self.config.on_extract_error = outcome;
        self
    }

    /// What to do when no decision can be made (default fail-open).
    pub fn on_backend_error(mut self, outcome: OnBackendError) -> Self {
        self.config.on_backend_error = outcome;
        self
    }

    /// Shadow mode: decide and log, never reject, send no headers (default off).
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.config.shadow = shadow;
        self
    }

    /// Whether to send `X-RateLimit-Limit/Remaining/Reset` (default on).
    pub fn legacy_headers(mut self, on: bool) -> Self {
        self.config.legacy_headers = on;
        self
    }

    /// Replaces the problem+json error responses.
    pub fn problem_renderer(mut self, renderer: impl ProblemRenderer) -> Self {
        self.config.renderer = Arc::new(renderer);
        self
    }

    /// Validates the configuration.
    ///
    /// # Errors
    /// [`RateLimitLayerError`].
    pub fn build(self) -> Result<RateLimitLayer, RateLimitLayerError> {
        let c = &self.config;
        if c.default.is_none() && c.routes.is_empty() {
            return Err(RateLimitLayerError::NothingToLimit);
        }
        if c.routes.len() > ROUTES_MAX {
            return Err(RateLimitLayerError::TooManyRoutes {
                count: c.routes.len(),
            });
        }
        if let Some(r) = c.routes.iter().find(|r| !r.path.starts_with('/')) {
            return Err(RateLimitLayerError::InvalidRoute {
                path: r.path.clone(),
            });
        }
        Ok(RateLimitLayer {
            config: Arc::new(self.config),
        })
    }
}

/// The rate-limit layer. Cheap to clone; every clone (and every replica on the same backend)
/// shares the same limits. See [the module docs](crate::ratelimit::layer) for what a request
/// goes through, the headers, and failure handling.
#[derive(Clone)]
pub struct RateLimitLayer {
    config: Arc<Config>,
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("routes", &self.config.routes.len())
            .field("shadow", &self.config.shadow)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// Starts a configuration.
    pub fn builder() -> RateLimitLayerBuilder {
        RateLimitLayerBuilder {
            config: Config {
                default: None,
                routes: Vec::new(),
                key: Extractor::peer_ip(),
                overrides: None,
                on_extract_error: OnExtractError::default(),
                on_backend_error: OnBackendError::FailOpen,
                shadow: false,
                legacy_headers: true,
                renderer: default_renderer(),
            },
        }
    }

    /// A layer limiting every request per peer IP with `limiter`, other settings default.
    pub fn new(limiter: impl Into<Stacked>) -> Self {
        RateLimitLayer {
            config: Arc::new(RateLimitLayer::builder().limiter(limiter).config),
        }
    }
}

impl From<RateLimiter> for RateLimitLayer {
    fn from(limiter: RateLimiter) -> Self {
        RateLimitLayer::new(limiter)
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The rate-limit middleware service (see [`RateLimitLayer`]).
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit").finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The response future of [`RateLimit`].
pub struct ResponseFuture<B, E> {
    inner: BoxFuture<Result<Response<LayerBody<B>>, E>>,
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<LayerBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<LayerBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The clone is not ready; the ready one handles this request (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = Arc::clone(&self.config);
        let span = tracing::debug_span!("keel_ratelimit", method = %req.method(), path = %req.uri().path());
        ResponseFuture {
            inner: Box::pin(handle(config, inner, req).instrument(span)),
        }
    }
}

/// What the layer decided before the handler runs.
enum Verdict {
    /// Run the handler; add these headers (none: not decided, or shadow).
    Pass(Option<HeaderMap>),
    /// Answer this instead.
    Reject(Response<Bytes>),
}

async fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<LayerBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let (parts, body) = req.into_parts();
    let verdict = decide(&config, &parts).await;
    match verdict {
        Verdict::Reject(response) => Ok(response.map(LayerBody::full)),
        Verdict::Pass(headers) => {
            let response = inner.call(Request::from_parts(parts, body)).await?;
            let mut response = response.map(LayerBody::inner);
            if let Some(headers) = headers {
                merge_headers(response.headers_mut(), headers);
            }
            Ok(response)
        }
    }
}

async fn decide(config: &Config, parts: &Parts) -> Verdict {
    let path = parts.uri.path();
    let stack = match config
        .routes
        .iter()
        .find(|r| r.matches(&parts.method, path))
    {
        Some(route) => &route.limiter,
        None => match &config.default {
            Some(stack) => stack,
            None => return Verdict::Pass(None),
        },
    };
    let key = match config.key.extract(parts).await {
        Ok(key) => key,
        Err(e) => {
            let status = match config.on_extract_error {
                OnExtractError::Skip => {
                    tracing::debug!(target: "keel::ratelimit", error = %e, "no key; skipped");
                    return Verdict::Pass(None);
                }
                OnExtractError::InternalServerError => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            tracing::info!(target: "keel::ratelimit", error = %e, %status, "no key; rejected");
            let problem = Problem::new(status, "rate_limit_key_missing", e.to_string());
            return Verdict::Reject(config.renderer.render(&problem));
        }
    };
    let redacted = redact(&key);
    let overrides = match &config.overrides {
        Some(o) => o.overrides(parts).await,
        None => QuotaOverrides::new(),
    };
    // The backend sees a fixed-size digest: bounded, and no raw IPs or user ids at rest.
    let stored_key = blake3::hash(&key).to_hex();
    match stack.check_all(stored_key.as_bytes(), 1, &overrides).await {
        Ok(sd) => {
            let headers = headers(&sd, config.legacy_headers);
            let allowed = sd.decision.allowed;
            if config.shadow {
                tracing::info!(
                    target: "keel::ratelimit", key = %redacted, allowed, shadow = true,
                    policy = sd.denied_by().unwrap_or(""), remaining = sd.decision.remaining,
                    headers = ?headers, "shadow decision (not enforced)"
                );
                return Verdict::Pass(None);
            }
            if allowed {
                tracing::debug!(
                    target: "keel::ratelimit", key = %redacted, allowed,
                    remaining = sd.decision.remaining, "admitted"
                );
                return Verdict::Pass(Some(headers));
            }
            let policy = sd.denied_by().unwrap_or("").to_owned();
            let retry = sd.decision.retry_after_secs().unwrap_or(1).max(1);
            tracing::info!(
                target: "keel::ratelimit", key = %redacted, allowed, %policy,
                retry_after_s = retry, "denied"
            );
            let mut problem = Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("rate-limit policy \"{policy}\" exceeded; retry in {retry} s or later"),
            )
            .with_member("policy", policy.clone())
            .with_member("retry_after", retry);
            for (name, value) in &headers {
                problem = problem.with_header(name.clone(), value.clone());
            }
            let problem = problem.with_header(RETRY_AFTER, HeaderValue::from(retry));
            Verdict::Reject(config.renderer.render(&problem))
        }
        Err(e) => backend_failure(config, &redacted, &e),
    }
}

fn backend_failure(config: &Config, redacted: &str, e: &RateLimitError) -> Verdict {
    if config.shadow || config.on_backend_error == OnBackendError::FailOpen {
        tracing::warn!(
            target: "keel::ratelimit", key = %redacted, error = %e, shadow = config.shadow,
            "no rate-limit decision; failing open"
        );
        return Verdict::Pass(None);
    }
    tracing::warn!(
        target: "keel::ratelimit", key = %redacted, error = %e,
        "no rate-limit decision; failing closed"
    );
    let problem = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "rate_limit_unavailable",
        "the rate limiter could not decide on this request; retry later",
    );
    Verdict::Reject(config.renderer.render(&problem))
}

/// The headers for a decision (see the module docs).
fn headers(sd: &StackDecision, legacy: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut policy = ListSerializer::new();
    let mut state = ListSerializer::new();
    for p in &sd.policies {
        let d = &p.decision;
        // Limiter names are ASCII letters, digits, '-', '_', '.': always a valid sf-string.
        let Ok(name) = StringRef::from_str(&p.name) else {
            continue;
        };
        policy
            .bare_item(name)
            .parameter(KeyRef::constant("q"), sf_int(d.limit))
            .parameter(KeyRef::constant("w"), sf_int(ceil_secs(d.quota.period())));
        state
            .bare_item(name)
            .parameter(KeyRef::constant("r"), sf_int(d.remaining))
            .parameter(KeyRef::constant("t"), sf_int(d.reset_after_secs()));
    }
    for (name, value) in [
        (&RATELIMIT_POLICY, policy.finish()),
        (&RATELIMIT, state.finish()),
    ] {
        if let Some(v) = value.ok().and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(name.clone(), v);
        }
    }
    if legacy {
        let d: &Decision = &sd.decision;
        h.insert(X_RATELIMIT_LIMIT.clone(), HeaderValue::from(d.limit));
        h.insert(
            X_RATELIMIT_REMAINING.clone(),
            HeaderValue::from(d.remaining),
        );
        h.insert(
            X_RATELIMIT_RESET.clone(),
            HeaderValue::from(d.reset_after_secs()),
        );
    }
    h
}

/// Adds this layer's headers to a response that another rate-limit layer inside this one may
/// have decided on too (e.g. one per client IP around one per account): `RateLimit` and
/// `RateLimit-Policy` are structured-field lists, so this layer's policies are appended to
/// the inner layer's; the legacy `X-RateLimit-*` headers describe a single decision, so the
/// one with less remaining is kept.
fn merge_headers(response: &mut HeaderMap, ours: HeaderMap) {
    let remaining = |h: &HeaderMap| {
        h.get(&X_RATELIMIT_REMAINING)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let keep_theirs = match (remaining(response), remaining(&ours)) {
        (Some(theirs), Some(mine)) => theirs <= mine,
        _ => false,
    };
    for (name, value) in &ours {
        if *name == RATELIMIT || *name == RATELIMIT_POLICY {
            response.append(name.clone(), value.clone());
        } else if !keep_theirs || !response.contains_key(name) {
            response.insert(name.clone(), value.clone());
        }
    }
}

/// A structured-field integer; quotas and seconds are far below its 10^15 bound (limits are
/// at most 2^40, periods at most 5 years), so the clamp never bites.
fn sf_int(v: u64) -> sfv::Integer {
    sfv::Integer::try_from(v.min(999_999_999_999_999)).unwrap_or(sfv::integer(0))
}

fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ratelimit::{PolicyDecision, Quota};

    fn d(allowed: bool, limit: u64, remaining: u64, reset: u64, period: u64) -> Decision {
        Decision {
            allowed,
            limit,
            remaining,
            reset_after: Duration::from_millis(reset),
            retry_after: (!allowed).then(|| Duration::from_millis(reset)),
            quota: Quota::new(limit, Duration::from_millis(period)),
        }
    }

    #[test]
    fn draft_10_headers_list_every_policy() {
        let sd = StackDecision {
            decision: d(true, 10, 9, 1000, 1000),
            policies: vec![
                PolicyDecision {
                    name: "burst".into(),
                    decision: d(true, 10, 9, 1000, 1000),
                },
                PolicyDecision {
                    name: "hourly".into(),
                    decision: d(true, 1000, 999, 3_599_001, 3_600_000),
                },
            ],
        };
        let h = headers(&sd, true);
        assert_eq!(
            h[&RATELIMIT_POLICY],
            r#""burst";q=10;w=1, "hourly";q=1000;w=3600"#
        );
        assert_eq!(h[&RATELIMIT], r#""burst";r=9;t=1, "hourly";r=999;t=3600"#);
        assert_eq!(h[&X_RATELIMIT_LIMIT], "10");
        assert_eq!(h[&X_RATELIMIT_REMAINING], "9");
        assert_eq!(h[&X_RATELIMIT_RESET], "1");
        assert!(!headers(&sd, false).contains_key(&X_RATELIMIT_LIMIT));
    }

    #[test]
    fn nested_layers_list_both_policies_and_keep_the_tighter_legacy_headers() {
        let outer = StackDecision {
            decision: d(true, 60, 50, 1000, 60_000),
            policies: vec![PolicyDecision {
                name: "per-ip".into(),
                decision: d(true, 60, 50, 1000, 60_000),
            }],
        };
        let inner = StackDecision {
            decision: d(false, 10, 0, 60_000, 600_000),
            policies: vec![PolicyDecision {
                name: "per-account".into(),
                decision: d(false, 10, 0, 60_000, 600_000),
            }],
        };
        let mut response = headers(&inner, true);
        merge_headers(&mut response, headers(&outer, true));
        let all = |name: &HeaderName| {
            response
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert_eq!(
            all(&RATELIMIT),
            r#""per-account";r=0;t=60, "per-ip";r=50;t=1"#
        );
        assert_eq!(
            all(&RATELIMIT_POLICY),
            r#""per-account";q=10;w=600, "per-ip";q=60;w=60"#
        );
        assert_eq!(response[&X_RATELIMIT_REMAINING], "0");
        assert_eq!(response[&X_RATELIMIT_LIMIT], "10");

        // The other way round: the outer layer is the tighter one.
        let mut response = headers(&outer, true);
        merge_headers(&mut response, headers(&inner, true));
        assert_eq!(response[&X_RATELIMIT_REMAINING], "0");
        assert_eq!(response[&X_RATELIMIT_LIMIT], "10");
    }

    #[test]
    fn routes_match_path_and_method() {
        let b: Arc<dyn crate::Backend> = Arc::new(crate::Embedded::memory());
        let l = RateLimiter::new(
            b,
            "x",
            crate::ratelimit::Strategy::Gcra,
            Quota::per_second(1),
        )
        .unwrap();
        let r = Route::new("/api/*", l.clone()).methods([Method::POST]);
        assert!(r.matches(&Method::POST, "/api/users"));
        assert!(!r.matches(&Method::GET, "/api/users"));
        assert!(!r.matches(&Method::POST, "/apx"));
        let exact = Route::new("/login", l);
        assert!(exact.matches(&Method::GET, "/login"));
        assert!(!exact.matches(&Method::GET, "/login/x"));
        assert!(matches!(
            RateLimitLayer::builder().build(),
            Err(RateLimitLayerError::NothingToLimit)
        ));
    }
}
