//! The service's state and its router: every primitive is built once here, on the one
//! [`Backend`] the service was given, and every layer is mounted here the way a production
//! service would mount it. Handlers live in `auth.rs` (sign-in, devices) and `shop.rs` (the
//! other features).
//!
//! | route | what it shows |
//! |---|---|
//! | `GET /` | the sign-in form, or the signed-in home page with the devices list |
//! | `POST /login`, `POST /api/login` | sends a one-time code (rate limited per IP and per e-mail) |
//! | `POST /login/verify`, `POST /api/login/verify` | signs in with the code: a cookie session and a device record |
//! | `GET /api/me`, `GET /api/devices` | who is signed in; their devices |
//! | `POST /devices/{id}/revoke`, `POST /devices/revoke-others` (+ `/api/…`) | ends one device's session; all others |
//! | `POST /logout`, `POST /api/logout` | signs out |
//! | `POST /orders` | creates an order; needs an `Idempotency-Key` |
//! | `GET /orders/{id}` | reads an order back |
//! | `GET /catalog` | JSON behind the shared HTTP cache (`ETag`, 304, `Cache-Status`) |
//! | `POST /webhooks/payments` | a webhook processed once per event id |
//! | `GET /welcome`, `GET /api/welcome` | a page variant chosen by a feature flag rollout |
//! | `GET /upstream?fail=…` | a flaky upstream call behind a circuit breaker |
//! | `POST /jobs/{name}?hold_ms=…`, `GET /jobs/{name}` | a job under a lock, with its fencing token |
//! | `GET /metrics` | Prometheus text format |

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use http::StatusCode;
use http::header::CONTENT_TYPE;
use keel_engine::SystemClock;
use keel_primitives::Backend;
use keel_primitives::breaker::{Breaker, Policy};
use keel_primitives::cache::http::HttpCache;
use keel_primitives::dedup::Dedup;
use keel_primitives::flags::{Flag, FlagClient, FlagStore};
use keel_primitives::http::{Extractor, OnExtractError, Problem};
use keel_primitives::idempotency::IdempotencyLayer;
use keel_primitives::lock::{Fence, Lock};
use keel_primitives::otp::{Otp, OtpOptions, OtpSecret};
use keel_primitives::ratelimit::{Quota, RateLimitLayer, RateLimiter, Route, Stacked, Strategy};
use keel_primitives::session::{SameSite, SessionLayer, SessionStore};
use keel_primitives::user_session::{BackendRepo, UserSessions};
use metrics_exporter_prometheus::PrometheusHandle;

use super::console::{Console, Outbox};
use super::{auth, shop, telemetry};
use crate::cli::failure::Failure;

/// The feature flag the welcome page reads.
pub const WELCOME_FLAG: &str = "welcome-v2";
/// Its document when the store has none: half of the visitors get the new page.
const WELCOME_FLAG_DOC: &str = r#"{
  "key": "welcome-v2", "enabled": true,
  "description": "the new welcome page, rolled out to half of the visitors",
  "variants": {"v2": true, "classic": false}, "default_variant": "classic",
  "rules": [{"rollout": {"percentage": 50, "variants": [{"name": "v2", "weight": 100}]}}]
}"#;
/// How often the flag client looks for changed flags (one read of the change counter).
const FLAG_REFRESH: Duration = Duration::from_secs(1);
/// Where the keys that sign cookies and hash codes live in the store (see [`secret`]).
const SESSION_KEY_KEY: &[u8] = b"keel-demo:secret:session-key";
const OTP_SECRET_KEY: &[u8] = b"keel-demo:secret:otp-secret";
/// Bytes of each secret.
const SECRET_BYTES: usize = 64;
/// The largest login request body the e-mail extractor reads.
const LOGIN_BODY_BYTES_MAX: usize = 16 * 1024;
/// How long an upstream call may take before it counts as a failure.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the breaker stays open after tripping (before a probe is let through).
pub const BREAKER_OPEN: Duration = Duration::from_secs(2);
/// Consecutive upstream failures that trip the breaker.
pub const BREAKER_FAILURES: u32 = 3;

/// The per-IP policies on the login endpoints.
pub const LOGIN_IP_BURST: Quota = Quota::per_minute(60);
/// See [`LOGIN_IP_BURST`].
pub const LOGIN_IP_HOURLY: Quota = Quota::per_hour(300);
/// The per-e-mail policy on the login endpoints: 10 requests, then one a minute.
pub const LOGIN_EMAIL: Quota = Quota::new(10, Duration::from_secs(600));

/// The service's state: the backend and every primitive on it. Cheap to clone.
#[derive(Clone)]
pub struct App(Arc<Inner>);

impl Deref for App {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// What [`App`] holds.
pub struct Inner {
    /// The one store.
    pub backend: Arc<dyn Backend>,
    /// Logins (device records) tied to cookie sessions.
    pub users: UserSessions<(), BackendRepo>,
    /// One-time sign-in codes.
    pub otp: Otp,
    /// Webhook deduplication.
    pub dedup: Dedup,
    /// Feature flags, cached in process.
    pub flags: FlagClient,
    /// The breaker around the upstream call, shared through the backend.
    pub breaker: Breaker,
    /// Job locks.
    pub lock: Lock,
    /// The job output's fence.
    pub fence: Fence,
    /// Where codes go.
    pub outbox: Outbox,
    /// Output lines.
    pub console: Console,
    /// The metrics recorder.
    pub metrics: PrometheusHandle,
    /// The client for the upstream call.
    pub upstream: reqwest::Client,
    /// The flaky upstream's URL (a route of this service, reached over the network).
    pub upstream_url: String,
}

/// Builds the state and the router for a service listening on `addr`.
///
/// # Errors
/// A store that cannot be read or written, or a configuration a primitive refuses.
pub async fn build(
    backend: Arc<dyn Backend>,
    metrics: PrometheusHandle,
    console: Console,
    addr: SocketAddr,
) -> Result<(App, Router), Failure> {
    let failed = |what: &str, e: &dyn std::fmt::Display| Failure::Error(format!("{what}: {e}"));
    let session_key = secret(&*backend, SESSION_KEY_KEY).await?;
    let otp_secret = secret(&*backend, OTP_SECRET_KEY).await?;

    let sessions = SessionStore::builder(Arc::clone(&backend))
        .build()
        .map_err(|e| failed("session store", &e))?;
    // Plain HTTP on loopback: a `Secure` cookie would work in browsers (they treat
    // 127.0.0.1 as a secure context) but not in every HTTP client, so this development
    // service leaves `Secure` (and with it the `__Host-` prefix) off. Behind TLS, keep the
    // layer's defaults.
    let session_layer = SessionLayer::builder(sessions.clone())
        .key(&session_key)
        .secure(false)
        .http_only(true)
        .same_site(SameSite::Lax)
        .build()
        .map_err(|e| failed("session layer", &e))?;
    let users = UserSessions::new(BackendRepo::new(Arc::clone(&backend)), sessions);
    let otp = Otp::new(
        Arc::clone(&backend),
        OtpSecret::from_bytes(&otp_secret).map_err(|e| failed("one-time codes", &e))?,
        OtpOptions::default(),
    )
    .map_err(|e| failed("one-time codes", &e))?;

    let flags = FlagClient::with_options(Arc::clone(&backend), FLAG_REFRESH, Arc::new(SystemClock));
    seed_flag(flags.store()).await?;

    let breaker = Breaker::builder("demo-upstream")
        .policy(Policy::ConsecutiveFailures(BREAKER_FAILURES))
        .open_duration(BREAKER_OPEN)
        .probes(1)
        .shared(Arc::clone(&backend))
        .build()
        .map_err(|e| failed("circuit breaker", &e))?;

    let app = App(Arc::new(Inner {
        users,
        otp,
        dedup: Dedup::new(Arc::clone(&backend)),
        flags,
        breaker,
        lock: Lock::new(Arc::clone(&backend)),
        fence: Fence::new(Arc::clone(&backend)).with_retention(shop::RECORD_TTL),
        outbox: Outbox::new(console.clone()),
        console,
        metrics,
        upstream: reqwest::Client::builder()
            .no_proxy()
            .timeout(UPSTREAM_TIMEOUT)
            .build()
            .map_err(|e| failed("HTTP client", &e))?,
        upstream_url: format!("http://{addr}/_upstream/quote"),
        backend: Arc::clone(&backend),
    }));
    let router = router(&app, &backend, session_layer)?;
    Ok((app, router))
}

fn router(
    app: &App,
    backend: &Arc<dyn Backend>,
    session_layer: SessionLayer,
) -> Result<Router, Failure> {
    let failed = |what: &str, e: &dyn std::fmt::Display| Failure::Error(format!("{what}: {e}"));
    let limiter = |name: &str, strategy: Strategy, quota: Quota| {
        RateLimiter::new(Arc::clone(backend), name, strategy, quota)
            .map_err(|e| failed("rate limiter", &e))
    };
    // Per client IP: a burst policy and an hourly one, decided together (a request denied by
    // one consumes from neither).
    let per_ip = Stacked::new(vec![
        limiter("login-ip-minute", Strategy::Gcra, LOGIN_IP_BURST)?,
        limiter("login-ip-hour", Strategy::SlidingWindow, LOGIN_IP_HOURLY)?,
    ])
    .map_err(|e| failed("rate limiter", &e))?;
    let per_email = limiter("login-email", Strategy::Gcra, LOGIN_EMAIL)?;
    let login_paths = ["/login", "/login/verify", "/api/login", "/api/login/verify"];
    let mut ip_layer = RateLimitLayer::builder().key(Extractor::peer_ip());
    let mut email_layer = RateLimitLayer::builder()
        .key(Extractor::extension(|e: &LoginEmail| {
            e.0.clone().into_bytes()
        }))
        // No e-mail in the body: the handler answers that, with a clearer message.
        .on_extract_error(OnExtractError::Skip);
    for path in login_paths {
        ip_layer = ip_layer.route(Route::new(path, per_ip.clone()).methods([http::Method::POST]));
        email_layer =
            email_layer.route(Route::new(path, per_email.clone()).methods([http::Method::POST]));
    }
    let ip_layer = ip_layer.build().map_err(|e| failed("rate limit", &e))?;
    let email_layer = email_layer.build().map_err(|e| failed("rate limit", &e))?;

    // Layers added later wrap the earlier ones: the per-IP limit decides first (before the
    // body is read), then the e-mail is taken from the body, then the per-e-mail limit.
    let login = Router::new()
        .route("/login", post(auth::start_form))
        .route("/login/verify", post(auth::verify_form))
        .route("/api/login", post(auth::start_json))
        .route("/api/login/verify", post(auth::verify_json))
        .layer(email_layer)
        .layer(middleware::from_fn(login_email))
        .layer(ip_layer);

    // Orders are open to anonymous callers; keys are scoped per client IP, so one client never
    // replays another's response.
    let idempotency = IdempotencyLayer::builder(Arc::clone(backend), Extractor::peer_ip())
        .required(true)
        .build()
        .map_err(|e| failed("idempotency layer", &e))?;
    let orders = Router::new()
        .route("/orders", post(shop::create_order))
        .layer(idempotency);

    let cache = HttpCache::builder(Arc::clone(backend))
        .namespace("demo-http")
        .build()
        .map_err(|e| failed("HTTP cache", &e))?;
    let catalog = Router::new()
        .route("/catalog", get(shop::catalog))
        .layer(cache.layer());

    Ok(Router::new()
        .route("/", get(auth::home))
        .route("/logout", post(auth::logout_form))
        .route("/api/logout", post(auth::logout_json))
        .route("/api/me", get(auth::me))
        .route("/api/devices", get(auth::devices_json))
        .route("/devices/{id}/revoke", post(auth::revoke_form))
        .route("/api/devices/{id}/revoke", post(auth::revoke_json))
        .route("/devices/revoke-others", post(auth::revoke_others_form))
        .route("/api/devices/revoke-others", post(auth::revoke_others_json))
        .route("/orders/{id}", get(shop::order))
        .route("/webhooks/payments", post(shop::webhook))
        .route("/welcome", get(shop::welcome_page))
        .route("/api/welcome", get(shop::welcome_json))
        .route("/upstream", get(shop::upstream))
        .route("/_upstream/quote", get(shop::flaky_quote))
        .route("/jobs/{name}", post(shop::run_job).get(shop::job_status))
        .route("/metrics", get(telemetry::render))
        .merge(login)
        .merge(orders)
        .merge(catalog)
        .fallback(not_found)
        .layer(session_layer)
        .layer(middleware::from_fn(telemetry::count))
        .with_state(app.clone()))
}

/// The e-mail address a login request names, lower-cased; the per-e-mail rate limit's key.
#[derive(Clone, Debug)]
pub struct LoginEmail(pub String);

/// Middleware on the login routes: reads the (small) body, finds its `email` field (form or
/// JSON) and puts it in the request's extensions for the per-e-mail rate limit.
async fn login_email(req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, LOGIN_BODY_BYTES_MAX).await else {
        return problem(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("a login request body is at most {LOGIN_BODY_BYTES_MAX} bytes"),
        ));
    };
    let json = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let email = if json {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("email").and_then(|e| e.as_str()).map(str::to_owned))
    } else {
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .ok()
            .and_then(|fields| fields.into_iter().find(|(k, _)| k == "email"))
            .map(|(_, v)| v)
    };
    if let Some(email) = email {
        parts
            .extensions
            .insert(LoginEmail(email.trim().to_lowercase()));
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

async fn not_found() -> Response {
    problem(Problem::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; GET / lists what this service offers",
    ))
}

/// A problem+json response (RFC 9457), rendered as the keel layers render theirs.
pub fn problem(problem: Problem) -> Response {
    use keel_primitives::http::ProblemRenderer;
    keel_primitives::http::problem::ProblemJson
        .render(&problem)
        .map(axum::body::Body::from)
}

/// A secret kept in the store itself, so the store stays the service's only state (a
/// production service would read it from its secret manager instead): the first start writes
/// random bytes with `set_nx`, and every start (and every replica) reads the same ones.
async fn secret(backend: &dyn Backend, key: &[u8]) -> Result<Vec<u8>, Failure> {
    let failed = |e: keel_primitives::Error| {
        Failure::Error(format!(
            "cannot read or write the service's secrets in the store: {e}"
        ))
    };
    let fresh: [u8; SECRET_BYTES] = std::array::from_fn(|_| rand::random());
    backend.set_nx(key, &fresh, None).await.map_err(failed)?;
    let stored = backend.get(key).await.map_err(failed)?;
    match stored {
        Some(s) if s.len() == SECRET_BYTES => Ok(s),
        Some(s) => Err(Failure::Error(format!(
            "the secret under {:?} is {} bytes, not {SECRET_BYTES}; delete it to have a new one made",
            String::from_utf8_lossy(key),
            s.len()
        ))),
        None => Err(Failure::Error(format!(
            "the secret under {:?} vanished right after it was written",
            String::from_utf8_lossy(key)
        ))),
    }
}

/// Writes the welcome flag's document unless the store already has one (an operator's edits,
/// e.g. with `keel flags set`, are kept).
async fn seed_flag(store: &FlagStore) -> Result<(), Failure> {
    let failed = |e: &dyn std::fmt::Display| Failure::Error(format!("feature flags: {e}"));
    if store
        .get(WELCOME_FLAG)
        .await
        .map_err(|e| failed(&e))?
        .is_none()
    {
        let flag = Flag::from_json(WELCOME_FLAG_DOC.as_bytes()).map_err(|e| failed(&e))?;
        store.put(&flag).await.map_err(|e| failed(&e))?;
    }
    Ok(())
}
