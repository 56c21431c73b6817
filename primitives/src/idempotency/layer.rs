//! [`IdempotencyLayer`]: the `Idempotency-Key` request header
//! (draft-ietf-httpapi-idempotency-key-header-07) as a tower layer (feature `http`), on the
//! [`Idempotency`](super::Idempotency) primitive, so every replica sharing a backend honours
//! the same keys.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use axum::{Router, routing::post};
//! use keel_primitives::Embedded;
//! use keel_primitives::http::Extractor;
//! use keel_primitives::idempotency::IdempotencyLayer;
//!
//! let backend = Arc::new(Embedded::open("./keel-data")?);
//! // Records are scoped by principal: here the Authorization header (stored as a digest).
//! let principal = Extractor::header(http::header::AUTHORIZATION);
//! let app = Router::new()
//!     .route("/charges", post(|| async { "charged" }))
//!     .layer(IdempotencyLayer::builder(backend, principal).build()?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # A request with a key, on a configured method (default POST and PATCH)
//! 1. The key is validated: at most 255 printable ASCII characters, sent bare or as a
//!    structured-field string (`"…"`); malformed, or given twice → 400. No key: the request
//!    passes, or 400 if keys are [required](IdempotencyLayerBuilder::required).
//! 2. The principal [`Extractor`] scopes the key (one client never replays another's response);
//!    failure → [`OnExtractError`] (default 400).
//! 3. The body is buffered up to a limit (default 1 MiB; over it → 413, nothing runs) and the
//!    fingerprint is taken: method, path and query, the selected headers, BLAKE3 of the body.
//! 4. The key is claimed. Already completed with the same fingerprint → the stored response,
//!    byte for byte, with `Idempotency-Replayed: true`. Another fingerprint → 422. In flight →
//!    409 with `Retry-After`, or (with [`InFlight::Wait`]) wait for it and replay its result.
//!    Completed but not stored (too large) → 409, not a second execution.
//! 5. The handler runs while the claim's lease is renewed. Its response is buffered up to the
//!    cap (default 1 MiB) and stored (headers except hop-by-hop ones and the deny list,
//!    default `Set-Cookie`) before it is sent, so a retry right after it sees the record. Over
//!    the cap: sent streaming and completed as not replayable. 5xx, 408 and 429 release the
//!    claim so the retry runs (unless [`StatusPolicy::StoreAll`]). A handler that fails,
//!    panics or is cancelled (client disconnect) releases the claim.
//!
//! When the backend fails the layer fails closed by default (503: running unprotected could
//! run the work twice); [`OnBackendError::FailOpen`] runs the handler without protection and
//! logs a warning.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, RETRY_AFTER, SET_COOKIE};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tower::{Layer, Service};
use tracing::Instrument;

use super::{Begin, Fingerprint, Idempotency as Store, IdempotencyError, StoredResponse};
use crate::Backend;
use crate::http::problem::{SharedRenderer, default_renderer};
use crate::http::{
    Extractor, LayerBody, OnBackendError, OnExtractError, Problem, ProblemRenderer, redact,
};

/// `Idempotency-Replayed: true` marks a replayed response.
pub static IDEMPOTENCY_REPLAYED: HeaderName = HeaderName::from_static("idempotency-replayed");
/// Default request body limit for fingerprinting (1 MiB).
pub const REQUEST_BODY_BYTES_DEFAULT: usize = 1 << 20;
/// Default cap on stored response bodies (1 MiB).
pub const RESPONSE_BODY_BYTES_DEFAULT: usize = 1 << 20;
/// Largest body limit or cap (the backend's value limit is 16 MiB, with room for headers).
pub const BODY_BYTES_MAX: usize = 15 << 20;
/// `Retry-After` on a 409 for a request still in flight, in seconds.
const IN_FLIGHT_RETRY_AFTER_S: u64 = 1;
/// Polling bounds while waiting for an in-flight twin ([`InFlight::Wait`]).
const WAIT_POLL_MIN: Duration = Duration::from_millis(5);
const WAIT_POLL_MAX: Duration = Duration::from_millis(100);

/// Hop-by-hop headers (RFC 9110 §7.6.1): never stored.
static HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// What a request gets while another with the same key is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum InFlight {
    /// 409 with `Retry-After`. The default.
    #[default]
    Reject,
    /// Wait up to this long for the first to finish and replay its result (or run, if it was
    /// released); still running after the bound → 409.
    Wait(Duration),
}

/// Which responses are stored for replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StatusPolicy {
    /// Store every response except 5xx, 408 and 429, which release the claim so a retry runs
    /// again. The default.
    #[default]
    ReleaseRetryable,
    /// Store every response, errors included (Stripe-style).
    StoreAll,
}

/// A layer configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyLayerError {
    /// A body limit is 0 or over [`BODY_BYTES_MAX`].
    #[error("{what} must be between 1 and {BODY_BYTES_MAX} bytes, got {bytes}")]
    BodyLimit {
        /// Which limit.
        what: &'static str,
        /// The value given.
        bytes: usize,
    },
    /// No methods.
    #[error("the idempotency layer needs at least one method")]
    NoMethods,
}

struct Config {
    store: Store,
    principal: Extractor,
    header: HeaderName,
    methods: Vec<Method>,
    required: bool,
    fingerprint_headers: Vec<HeaderName>,
    fingerprint: Option<Arc<dyn RequestFingerprint>>,
    deny_headers: Vec<HeaderName>,
    request_body_max: usize,
    response_body_max: usize,
    statuses: StatusPolicy,
    in_flight: InFlight,
    on_extract_error: OnExtractError,
    on_backend_error: OnBackendError,
    renderer: SharedRenderer,
}

/// Builds an [`IdempotencyLayer`]; validated once by [`IdempotencyLayerBuilder::build`].
pub struct IdempotencyLayerBuilder {
    config: Config,
}

impl fmt::Debug for IdempotencyLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayerBuilder {
    /// The request header carrying the key (default `Idempotency-Key`).
    pub fn header(mut self, name: HeaderName) -> Self {
        self.config.header = name;
        self
    }

    /// The methods the layer applies to (default POST and PATCH); others pass untouched.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.methods = methods.into_iter().collect();
        self
    }

    /// Requests on those methods without a key get 400 (default: they pass unprotected).
    pub fn required(mut self, required: bool) -> Self {
        self.config.required = required;
        self
    }

    /// Headers that are part of the fingerprint (default none: method, target and body).
    pub fn fingerprint_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.fingerprint_headers = names.into_iter().collect();
        self
    }

    /// Replaces the fingerprint (method, path and query, the selected headers, BLAKE3 of the
    /// body) with your own, e.g. over a canonical form of a JSON body.
    pub fn fingerprint(mut self, fingerprint: impl RequestFingerprint) -> Self {
        self.config.fingerprint = Some(Arc::new(fingerprint));
        self
    }

    /// Response headers never stored nor replayed (default `Set-Cookie`); hop-by-hop headers
    /// are never stored either.
    pub fn deny_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.config.deny_headers = names.into_iter().collect();
        self
    }

    /// Largest request body buffered for the fingerprint (default 1 MiB); larger → 413.
    pub fn request_body_limit(mut self, bytes: usize) -> Self {
        self.config.request_body_max = bytes;
        self
    }

    /// Largest response body stored for replay (default 1 MiB); larger responses are sent
    /// but not stored, and retries get a 409.
    pub fn response_body_limit(mut self, bytes: usize) -> Self {
        self.config.response_body_max = bytes;
        self
    }

    /// Which responses are stored (default: not 5xx, 408, 429).
    pub fn statuses(mut self, policy: StatusPolicy) -> Self {
        self.config.statuses = policy;
        self
    }

    /// What a concurrent duplicate gets (default 409).
    pub fn in_flight(mut self, policy: InFlight) -> Self {
        self.config.in_flight = policy;
        self
    }

    /// The claim's lease (default 30 s, renewed every third while the handler runs).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.store = self.config.store.with_lease_ttl(ttl);
        self
    }

    /// How long responses are kept for replay (default 24 h).
    pub fn record_ttl(mut self, ttl: Duration) -> Self {
        self.config.store = self.config.store.with_record_ttl(ttl);
        self
    }

    /// What to do when the principal cannot be extracted (default 400).
    pub fn on_extract_error(mut self, outcome: OnExtractError) -> Self {
        self.config.on_extract_error = outcome;
        self
    }

    /// What to do when the backend fails (default fail-closed: 503).
    pub fn on_backend_error(mut self, outcome: OnBackendError) -> Self {
        self.config.on_backend_error = outcome;
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
    /// [`IdempotencyLayerError`].
    pub fn build(self) -> Result<IdempotencyLayer, IdempotencyLayerError> {
        let c = &self.config;
        for (what, bytes) in [
            ("the request body limit", c.request_body_max),
            ("the response body limit", c.response_body_max),
        ] {
            if bytes == 0 || bytes > BODY_BYTES_MAX {
                return Err(IdempotencyLayerError::BodyLimit { what, bytes });
            }
        }
        if c.methods.is_empty() {
            return Err(IdempotencyLayerError::NoMethods);
        }
        Ok(IdempotencyLayer {
            config: Arc::new(self.config),
        })
    }
}

/// The idempotency layer. Cheap to clone; clones and replicas on the same backend share
/// every key. See [the module docs](crate::idempotency::layer) for what a request goes
/// through.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("header", &self.config.header)
            .field("methods", &self.config.methods)
            .finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// Starts a configuration storing records on `backend`, scoped by `principal`.
    pub fn builder(backend: Arc<dyn Backend>, principal: Extractor) -> IdempotencyLayerBuilder {
        IdempotencyLayerBuilder {
            config: Config {
                store: Store::new(backend),
                principal,
                header: HeaderName::from_static("idempotency-key"),
                methods: vec![Method::POST, Method::PATCH],
                required: false,
                fingerprint_headers: Vec::new(),
                fingerprint: None,
                deny_headers: vec![SET_COOKIE],
                request_body_max: REQUEST_BODY_BYTES_DEFAULT,
                response_body_max: RESPONSE_BODY_BYTES_DEFAULT,
                statuses: StatusPolicy::default(),
                in_flight: InFlight::default(),
                on_extract_error: OnExtractError::default(),
                on_backend_error: OnBackendError::FailClosed,
                renderer: default_renderer(),
            },
        }
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The idempotency middleware service (see [`IdempotencyLayer`]). Re-exported as
/// `IdempotencyService`.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency").finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The response future of [`Idempotency`].
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<LayerBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: fmt::Display,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: fmt::Display,
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
        let span = tracing::debug_span!("keel_idempotency", method = %req.method(), path = %req.uri().path());
        ResponseFuture {
            inner: Box::pin(handle(config, inner, req).instrument(span)),
        }
    }
}

fn problem<B>(config: &Config, problem: Problem) -> Response<LayerBody<B>> {
    config.renderer.render(&problem).map(LayerBody::full)
}

/// The key from the header: `Ok(None)` if absent; a bare value or an sf-string.
fn parse_key(parts: &Parts, header: &HeaderName) -> Result<Option<Vec<u8>>, &'static str> {
    let mut values = parts.headers.get_all(header).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("the idempotency key header was sent more than once");
    }
    let raw = value.as_bytes();
    let key = if raw.first() == Some(&b'"') {
        let text = value
            .to_str()
            .map_err(|_| "the key is not printable ASCII")?;
        match sfv::Parser::new(text).parse_item() {
            Ok(sfv::Item {
                bare_item: sfv::BareItem::String(s),
                ..
            }) => s.as_str().as_bytes().to_vec(),
            _ => return Err("the key is not a valid structured-field string"),
        }
    } else {
        raw.to_vec()
    };
    super::validate_key(&key).map_err(|_| "the key must be 1 to 255 printable ASCII characters")?;
    Ok(Some(key))
}

/// Computes a request's [`Fingerprint`] from its head and buffered body. Any
/// `Fn(&Parts, &[u8]) -> Fingerprint + Send + Sync + 'static` is one.
pub trait RequestFingerprint: Send + Sync + 'static {
    /// The fingerprint of this request.
    fn fingerprint(&self, parts: &Parts, body: &[u8]) -> Fingerprint;
}

impl<F> RequestFingerprint for F
where
    F: Fn(&Parts, &[u8]) -> Fingerprint + Send + Sync + 'static,
{
    fn fingerprint(&self, parts: &Parts, body: &[u8]) -> Fingerprint {
        self(parts, body)
    }
}

fn fingerprint(config: &Config, parts: &Parts, body: &[u8]) -> Fingerprint {
    if let Some(custom) = &config.fingerprint {
        return custom.fingerprint(parts, body);
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |pq| pq.as_str());
    let body_digest = blake3::hash(body);
    let mut items: Vec<&[u8]> = vec![parts.method.as_str().as_bytes(), target.as_bytes()];
    for name in &config.fingerprint_headers {
        items.push(name.as_str().as_bytes());
        for value in parts.headers.get_all(name) {
            items.push(value.as_bytes());
        }
        items.push(b"\n");
    }
    items.push(body_digest.as_bytes());
    Fingerprint::of(&items)
}

/// Reads a request body up to `max` bytes; `Err(true)` when over the limit, `Err(false)` when
/// the body failed.
async fn buffer_body<B>(body: B, max: usize) -> Result<Bytes, bool>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    if body.size_hint().lower() > max as u64 {
        return Err(true);
    }
    let mut body = std::pin::pin!(body);
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| false)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(true);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

async fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<LayerBody<ResBody>>, S::Error>
where
    S: Service<Request<LayerBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: fmt::Display,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: fmt::Display,
{
    let (parts, body) = req.into_parts();
    let pass =
        |inner: &mut S, parts, body| inner.call(Request::from_parts(parts, LayerBody::inner(body)));
    if !config.methods.contains(&parts.method) {
        return Ok(pass(&mut inner, parts, body).await?.map(LayerBody::inner));
    }
    let key = match parse_key(&parts, &config.header) {
        Ok(Some(key)) => key,
        Ok(None) if !config.required => {
            return Ok(pass(&mut inner, parts, body).await?.map(LayerBody::inner));
        }
        Ok(None) => {
            let detail = format!("this request needs an {} header", config.header);
            let p = Problem::new(StatusCode::BAD_REQUEST, "idempotency_key_missing", detail);
            return Ok(problem(&config, p));
        }
        Err(why) => {
            let p = Problem::new(StatusCode::BAD_REQUEST, "idempotency_key_invalid", why);
            return Ok(problem(&config, p));
        }
    };
    let scope = match config.principal.extract(&parts).await {
        Ok(scope) => scope,
        Err(e) => {
            let status = match config.on_extract_error {
                OnExtractError::Skip => {
                    return Ok(pass(&mut inner, parts, body).await?.map(LayerBody::inner));
                }
                OnExtractError::InternalServerError => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            let p = Problem::new(status, "idempotency_principal_missing", e.to_string());
            return Ok(problem(&config, p));
        }
    };
    let redacted = redact(&key);
    let body = match buffer_body(body, config.request_body_max).await {
        Ok(body) => body,
        Err(over) => {
            let p = if over {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "idempotency_body_too_large",
                    format!(
                        "the request body is over {} bytes, the most this endpoint fingerprints; \
                         nothing was executed",
                        config.request_body_max
                    ),
                )
            } else {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "request_body_unreadable",
                    "the request body could not be read; nothing was executed",
                )
            };
            return Ok(problem(&config, p));
        }
    };
    let fp = fingerprint(&config, &parts, &body);
    let started = Instant::now();
    loop {
        let begun = config.store.begin(&scope, &key, fp).await;
        let claim = match begun {
            Ok(Begin::Claimed(claim)) => claim,
            Ok(Begin::Completed(stored)) => {
                tracing::debug!(target: "keel::idempotency", key = %redacted, "replayed");
                return Ok(replay(stored));
            }
            Ok(Begin::Mismatch) => {
                tracing::info!(target: "keel::idempotency", key = %redacted, "fingerprint mismatch");
                let p = Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this idempotency key was used for a different request (method, target, \
                     headers or body); use a new key for a new request",
                );
                return Ok(problem(&config, p));
            }
            Ok(Begin::NotReplayable) => {
                tracing::info!(target: "keel::idempotency", key = %redacted, "not replayable");
                let p = Problem::new(
                    StatusCode::CONFLICT,
                    "idempotency_response_not_stored",
                    "the request with this idempotency key already completed, but its response \
                     was too large to store; it will not be executed again",
                );
                return Ok(problem(&config, p));
            }
            Ok(Begin::InFlight) => {
                if let InFlight::Wait(bound) = config.in_flight {
                    let waited = started.elapsed();
                    if waited < bound {
                        let step = (waited / 4).clamp(WAIT_POLL_MIN, WAIT_POLL_MAX);
                        tokio::time::sleep(step.min(bound - waited)).await;
                        continue;
                    }
                }
                tracing::info!(target: "keel::idempotency", key = %redacted, "in flight");
                let p = Problem::new(
                    StatusCode::CONFLICT,
                    "idempotency_key_in_use",
                    "a request with this idempotency key is still being processed; retry later",
                )
                .with_member("retry_after", IN_FLIGHT_RETRY_AFTER_S)
                .with_header(RETRY_AFTER, HeaderValue::from(IN_FLIGHT_RETRY_AFTER_S));
                return Ok(problem(&config, p));
            }
            Err(IdempotencyError::InvalidKey) => {
                let p = Problem::new(
                    StatusCode::BAD_REQUEST,
                    "idempotency_key_invalid",
                    IdempotencyError::InvalidKey.to_string(),
                );
                return Ok(problem(&config, p));
            }
            Err(e) => {
                let error = e.to_string();
                if config.on_backend_error == OnBackendError::FailOpen {
                    tracing::warn!(
                        target: "keel::idempotency", key = %redacted, %error,
                        "idempotency unavailable; running unprotected (fail-open)"
                    );
                    let req = Request::from_parts(parts, LayerBody::full(body));
                    return Ok(inner.call(req).await?.map(LayerBody::inner));
                }
                tracing::warn!(
                    target: "keel::idempotency", key = %redacted, %error,
                    "idempotency unavailable; failing closed"
                );
                let p = Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "idempotency_unavailable",
                    "the idempotency store is unavailable; nothing was executed, retry later",
                );
                return Ok(problem(&config, p));
            }
        };
        return execute(&config, inner, parts, body, claim, &redacted).await;
    }
}

/// Runs the handler under `claim` and records the outcome. The claim is released by its
/// `Drop` if this future is dropped (client disconnect) or unwinds (handler panic).
async fn execute<S, ReqBody, ResBody>(
    config: &Config,
    mut inner: S,
    parts: Parts,
    body: Bytes,
    mut claim: super::Claim,
    redacted: &str,
) -> Result<Response<LayerBody<ResBody>>, S::Error>
where
    S: Service<Request<LayerBody<ReqBody>>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: fmt::Display,
{
    tracing::debug!(target: "keel::idempotency", key = %redacted, "claimed; executing");
    claim.keep_alive();
    let response = inner
        .call(Request::from_parts(parts, LayerBody::full(body)))
        .await?;
    let status = response.status();
    let retryable = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    if retryable && config.statuses == StatusPolicy::ReleaseRetryable {
        tracing::debug!(target: "keel::idempotency", key = %redacted, %status, "released for retry");
        if let Err(e) = claim.release().await {
            tracing::warn!(target: "keel::idempotency", key = %redacted, error = %e, "release failed; the claim expires with its lease");
        }
        return Ok(response.map(LayerBody::inner));
    }
    let (head, mut res_body) = response.into_parts();
    let mut chunks = VecDeque::new();
    let mut size = 0usize;
    let mut over = head
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > config.response_body_max as u64);
    while !over {
        let Some(frame) = res_body.frame().await else {
            break;
        };
        match frame {
            Ok(frame) => {
                // Trailers are not stored; a replay has none.
                if let Ok(data) = frame.into_data() {
                    size += data.len();
                    chunks.push_back(data);
                    over = size > config.response_body_max;
                }
            }
            Err(e) => {
                tracing::warn!(target: "keel::idempotency", key = %redacted, error = %e, "response body failed; released");
                drop(claim);
                return Ok(Response::from_parts(
                    head,
                    LayerBody::prefixed(chunks, res_body),
                ));
            }
        }
    }
    if over {
        tracing::info!(target: "keel::idempotency", key = %redacted, "response over the cap; completed as not replayable");
        if let Err(e) = claim.complete_unreplayable().await {
            tracing::warn!(target: "keel::idempotency", key = %redacted, error = %e, "could not complete the claim");
        }
        return Ok(Response::from_parts(
            head,
            LayerBody::prefixed(chunks, res_body),
        ));
    }
    let mut stored_body = Vec::with_capacity(size);
    for chunk in &chunks {
        stored_body.extend_from_slice(chunk);
    }
    let headers = head
        .headers
        .iter()
        .filter(|(name, _)| !HOP_BY_HOP.contains(name) && !config.deny_headers.contains(name))
        .map(|(name, value)| (name.as_str().as_bytes().to_vec(), value.as_bytes().to_vec()))
        .collect();
    let stored = StoredResponse::new(head.status.as_u16(), headers, stored_body);
    match claim.complete(&stored).await {
        Ok(()) => {
            tracing::debug!(target: "keel::idempotency", key = %redacted, status = %head.status, "stored")
        }
        Err(e) => {
            tracing::warn!(target: "keel::idempotency", key = %redacted, error = %e, "response not stored; a retry may execute again")
        }
    }
    Ok(Response::from_parts(
        head,
        LayerBody::full(Bytes::from(stored.body)),
    ))
}

fn replay<B>(stored: StoredResponse) -> Response<LayerBody<B>> {
    let mut response = Response::new(LayerBody::full(Bytes::from(stored.body)));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&name),
            HeaderValue::from_bytes(&value),
        ) {
            headers.append(name, value);
        }
    }
    headers.insert(
        IDEMPOTENCY_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut req = Request::builder().method("POST").uri("/x?y=1");
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn fingerprints_cover_target_selected_headers_and_body_or_a_custom_hook() {
        let backend: Arc<dyn Backend> = Arc::new(crate::Embedded::memory());
        let layer = IdempotencyLayer::builder(Arc::clone(&backend), Extractor::global())
            .fingerprint_headers([http::header::CONTENT_TYPE])
            .build()
            .unwrap();
        let fp = |headers: &[(&str, &str)], body: &[u8]| {
            fingerprint(&layer.config, &parts(headers), body)
        };
        assert_eq!(fp(&[], b"a"), fp(&[("x-other", "1")], b"a"));
        assert_ne!(fp(&[], b"a"), fp(&[], b"b"));
        assert_ne!(fp(&[], b"a"), fp(&[("content-type", "text/plain")], b"a"));
        let custom = IdempotencyLayer::builder(backend, Extractor::global())
            .fingerprint(|_: &Parts, body: &[u8]| Fingerprint::of(&[body]))
            .build()
            .unwrap();
        let mut other = parts(&[]);
        other.uri = http::Uri::from_static("/elsewhere");
        assert_eq!(
            fingerprint(&custom.config, &parts(&[]), b"a"),
            fingerprint(&custom.config, &other, b"a")
        );
    }

    #[test]
    fn keys_bare_or_sf_string_validated() {
        let h = HeaderName::from_static("idempotency-key");
        assert_eq!(parse_key(&parts(&[]), &h), Ok(None));
        assert_eq!(
            parse_key(&parts(&[("idempotency-key", "abc-1")]), &h),
            Ok(Some(b"abc-1".to_vec()))
        );
        assert_eq!(
            parse_key(&parts(&[("idempotency-key", r#""a \"q\" b""#)]), &h),
            Ok(Some(br#"a "q" b"#.to_vec()))
        );
        let long = "k".repeat(256);
        for bad in [long.as_str(), "\"unterminated", "\"\""] {
            assert!(
                parse_key(&parts(&[("idempotency-key", bad)]), &h).is_err(),
                "{bad}"
            );
        }
        assert!(
            parse_key(
                &parts(&[("idempotency-key", "a"), ("idempotency-key", "b")]),
                &h
            )
            .is_err()
        );
    }
}
