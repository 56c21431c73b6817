//! The demo's other features, each the way a service would use it: orders behind the
//! `Idempotency-Key` layer, a catalog behind the shared HTTP cache, a payments webhook
//! processed once per event id (`dedup`), a welcome page whose variant a feature flag's
//! percentage rollout picks, a flaky upstream call behind a shared circuit breaker, and a job
//! that runs under a lock and writes through a fence with its fencing token.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, ETAG, LOCATION, RETRY_AFTER, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use keel_primitives::breaker::CallError;
use keel_primitives::dedup::Once;
use keel_primitives::flags::EvalContext;
use keel_primitives::http::Problem;
use keel_primitives::lock::{FenceCheck, LOCK_KEY_PREFIX};
use keel_primitives::session::Session;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::app::{App, WELCOME_FLAG, problem};
use super::auth::signed_in;
use super::{pages, telemetry};

/// How long orders, fence records and other records the demo writes itself are kept.
pub const RECORD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Largest quantity of one order.
const QTY_MAX: u32 = 100;
/// Longest webhook event id and job name, in bytes.
const ID_BYTES_MAX: usize = 128;
/// Longest a job may hold its lock for (`hold_ms`).
const JOB_HOLD_MAX: Duration = Duration::from_secs(30);
/// The job lock's TTL: longer than any hold, so only a crashed holder's lock expires.
const JOB_LOCK_TTL: Duration = Duration::from_secs(60);
/// How long the catalog may be reused by caches.
const CATALOG_MAX_AGE_S: u64 = 60;
/// The catalog's version: its entity tag changes when the items below do.
const CATALOG_ETAG: &str = "\"catalog-v1\"";
/// The catalog: id, name, price in cents.
pub const CATALOG: &[(&str, &str, u64)] = &[
    ("espresso", "Espresso", 250),
    ("flat-white", "Flat white", 350),
    ("croissant", "Croissant", 300),
];
/// Response header: which run of the catalog handler produced this body.
pub static CATALOG_RENDER: HeaderName = HeaderName::from_static("x-catalog-render");
/// Response header on webhook answers: `processed`, `duplicate` or `in-progress`.
pub static DEDUP: HeaderName = HeaderName::from_static("x-dedup");
/// Response header on `/upstream`: the breaker's state after the call.
pub static BREAKER_STATE: HeaderName = HeaderName::from_static("x-breaker-state");
/// The anonymous visitor cookie that keeps the welcome page's variant sticky.
pub const VISITOR_COOKIE: &str = "keel_visitor";

fn store_problem(e: impl std::fmt::Display) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("the store did not answer: {e}; retry later"),
    )
}

// ---- orders -------------------------------------------------------------------------------

/// An order as posted.
#[derive(Debug, Deserialize)]
pub struct NewOrder {
    item: String,
    qty: u32,
}

/// An order as stored and returned.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: i64,
    item: String,
    qty: u32,
    total_cents: u64,
}

/// `POST /orders` `{"item": …, "qty": …}` → 201 with the order. The `Idempotency-Key` layer in
/// front of it makes a retry with the same key return this same response without running it
/// again.
pub async fn create_order(State(app): State<App>, Json(new): Json<NewOrder>) -> Response {
    let Some(&(_, _, price)) = CATALOG.iter().find(|(id, _, _)| *id == new.item) else {
        return problem(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_item",
            format!("no item {:?} in the catalog (GET /catalog)", new.item),
        ));
    };
    if !(1..=QTY_MAX).contains(&new.qty) {
        return problem(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_qty",
            format!("qty is 1 to {QTY_MAX}"),
        ));
    }
    // The order sequence is permanent (ids are never reused); each order expires.
    let id = match app.backend.incr(b"orders:seq", 1, None).await {
        Ok(id) => id,
        Err(e) => return problem(store_problem(e)),
    };
    let order = Order {
        id,
        item: new.item,
        qty: new.qty,
        total_cents: price * u64::from(new.qty),
    };
    let record = serde_json::to_vec(&order).unwrap_or_default();
    if let Err(e) = app
        .backend
        .set(format!("orders:{id}").as_bytes(), &record, Some(RECORD_TTL))
        .await
    {
        return problem(store_problem(e));
    }
    metrics::counter!(telemetry::ORDERS).increment(1);
    let location = HeaderValue::from_str(&format!("/orders/{id}"))
        .unwrap_or(HeaderValue::from_static("/orders"));
    (StatusCode::CREATED, [(LOCATION, location)], Json(order)).into_response()
}

/// `GET /orders/{id}`: an order, or 404.
pub async fn order(State(app): State<App>, Path(id): Path<i64>) -> Response {
    match app.backend.get(format!("orders:{id}").as_bytes()).await {
        Ok(Some(record)) => match serde_json::from_slice::<Order>(&record) {
            Ok(order) => Json(order).into_response(),
            Err(e) => problem(store_problem(format!("order {id} is damaged: {e}"))),
        },
        Ok(None) => problem(Problem::new(
            StatusCode::NOT_FOUND,
            "no_such_order",
            format!("there is no order {id} (or it expired)"),
        )),
        Err(e) => problem(store_problem(e)),
    }
}

// ---- catalog ------------------------------------------------------------------------------

/// `GET /catalog`: public, cacheable JSON with an entity tag. The HTTP cache layer in front of
/// it stores the first answer and serves the next ones itself (`Cache-Status: keel; hit`),
/// answers `If-None-Match` with 304, and lets this handler run again only once the entry is
/// stale.
pub async fn catalog(State(app): State<App>) -> Response {
    let render = match app
        .backend
        .incr(b"catalog:renders", 1, Some(RECORD_TTL))
        .await
    {
        Ok(n) => n,
        Err(e) => return problem(store_problem(e)),
    };
    metrics::counter!(telemetry::CATALOG_RENDERS).increment(1);
    let items: Vec<_> = CATALOG
        .iter()
        .map(|(id, name, cents)| json!({"id": id, "name": name, "price_cents": cents}))
        .collect();
    (
        [
            (
                CACHE_CONTROL,
                HeaderValue::from_str(&format!("public, max-age={CATALOG_MAX_AGE_S}"))
                    .unwrap_or(HeaderValue::from_static("no-store")),
            ),
            (ETAG, HeaderValue::from_static(CATALOG_ETAG)),
            (CATALOG_RENDER.clone(), HeaderValue::from(render)),
        ],
        Json(json!({"items": items})),
    )
        .into_response()
}

// ---- webhook ------------------------------------------------------------------------------

/// A payment provider's event.
#[derive(Debug, Deserialize)]
pub struct PaymentEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    amount_cents: u64,
}

/// `POST /webhooks/payments` `{"id": …, "type": …, "amount_cents": …}`: processed once per
/// event id, however often the sender delivers it. A duplicate gets the first delivery's
/// answer back (`X-Dedup: duplicate`); one arriving while the first still runs gets 409 and
/// `Retry-After` (the sender retries).
pub async fn webhook(State(app): State<App>, Json(event): Json<PaymentEvent>) -> Response {
    if event.id.is_empty() || event.id.len() > ID_BYTES_MAX {
        return problem(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_event_id",
            format!("an event id is 1 to {ID_BYTES_MAX} bytes"),
        ));
    }
    let backend = &app.backend;
    let outcome = app
        .dedup
        .once_with_result(format!("payments:{}", event.id), || async {
            let total = backend
                .incr(
                    b"payments:received_cents",
                    i64::try_from(event.amount_cents).unwrap_or(i64::MAX),
                    None,
                )
                .await?;
            let answer = json!({
                "processed": event.id, "type": event.kind, "total_received_cents": total,
            });
            Ok::<_, keel_primitives::Error>(serde_json::to_vec(&answer).unwrap_or_default())
        })
        .await;
    let (outcome, response) = match outcome {
        Ok(Once::Ran(Ok(body)) | Once::RanButLost(Ok(body))) => {
            ("processed", json_bytes(StatusCode::OK, body))
        }
        Ok(Once::Done(Some(body))) => ("duplicate", json_bytes(StatusCode::OK, body)),
        Ok(Once::Done(None)) => (
            "duplicate",
            Json(json!({"processed": event.id})).into_response(),
        ),
        Ok(Once::InProgress) => {
            let mut r = problem(
                Problem::new(
                    StatusCode::CONFLICT,
                    "event_in_progress",
                    "this event is being processed right now; deliver it again later",
                )
                .with_header(RETRY_AFTER, HeaderValue::from(1)),
            );
            r.headers_mut()
                .insert(DEDUP.clone(), HeaderValue::from_static("in-progress"));
            metrics::counter!(telemetry::WEBHOOKS, "outcome" => "in_progress").increment(1);
            return r;
        }
        Ok(Once::Ran(Err(e)) | Once::RanButLost(Err(e))) => {
            metrics::counter!(telemetry::WEBHOOKS, "outcome" => "failed").increment(1);
            return problem(store_problem(e));
        }
        Err(e) => {
            metrics::counter!(telemetry::WEBHOOKS, "outcome" => "failed").increment(1);
            return problem(store_problem(e));
        }
    };
    metrics::counter!(telemetry::WEBHOOKS, "outcome" => outcome).increment(1);
    let mut response = response;
    response
        .headers_mut()
        .insert(DEDUP.clone(), HeaderValue::from_static(outcome));
    response
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

// ---- welcome page (feature flag) ----------------------------------------------------------

/// `?visitor=` on the welcome routes.
#[derive(Debug, Deserialize)]
pub struct VisitorQuery {
    visitor: Option<String>,
}

/// What the flag served one visitor.
pub struct Variant {
    /// Who was bucketed.
    pub visitor: String,
    /// `v2` or `classic`.
    pub variant: String,
    /// Why (`Split`: the rollout placed them; `Default`: outside it; `Disabled`: kill switch).
    pub reason: String,
    /// The flag document's version.
    pub version: u64,
    /// A new visitor id to remember in a cookie.
    new_visitor: bool,
}

/// Who the visitor is: `?visitor=`, else the signed-in user, else the visitor cookie, else a
/// new random id (then set as the cookie, so the variant sticks).
async fn evaluate(
    app: &App,
    session: &Session,
    headers: &HeaderMap,
    query: VisitorQuery,
) -> Variant {
    let mut new_visitor = false;
    let visitor = match query
        .visitor
        .filter(|v| !v.is_empty() && v.len() <= ID_BYTES_MAX)
    {
        Some(v) => v,
        None => match signed_in(app, session).await.ok().flatten() {
            Some(me) => me.user,
            None => match cookie(headers, VISITOR_COOKIE) {
                Some(v) => v,
                None => {
                    new_visitor = true;
                    format!("v-{:016x}", rand::random::<u64>())
                }
            },
        },
    };
    let details = app
        .flags
        .details(WELCOME_FLAG, &EvalContext::new(visitor.clone()))
        .await;
    Variant {
        visitor,
        variant: if details.variant.is_empty() {
            "classic".to_owned()
        } else {
            details.variant
        },
        reason: format!("{:?}", details.reason),
        version: details.version,
        new_visitor,
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty() && v.len() <= ID_BYTES_MAX)
        .map(|(_, v)| v.to_owned())
}

fn remember_visitor(response: &mut Response, variant: &Variant) {
    if !variant.new_visitor {
        return;
    }
    let cookie = format!(
        "{VISITOR_COOKIE}={}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax",
        variant.visitor
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(SET_COOKIE, v);
    }
}

/// `GET /welcome`: the page variant the `welcome-v2` flag picks for this visitor.
pub async fn welcome_page(
    State(app): State<App>,
    session: Session,
    headers: HeaderMap,
    Query(query): Query<VisitorQuery>,
) -> Response {
    let variant = evaluate(&app, &session, &headers, query).await;
    let mut response = pages::welcome(&variant).into_response();
    remember_visitor(&mut response, &variant);
    response
}

/// `GET /api/welcome` → `{"visitor", "variant", "reason", "version"}`.
pub async fn welcome_json(
    State(app): State<App>,
    session: Session,
    headers: HeaderMap,
    Query(query): Query<VisitorQuery>,
) -> Response {
    let variant = evaluate(&app, &session, &headers, query).await;
    let mut response = Json(json!({
        "visitor": variant.visitor, "variant": variant.variant,
        "reason": variant.reason, "version": variant.version,
    }))
    .into_response();
    remember_visitor(&mut response, &variant);
    response
}

// ---- upstream (circuit breaker) -----------------------------------------------------------

/// `?fail=` on the upstream routes.
#[derive(Debug, Deserialize)]
pub struct FailQuery {
    #[serde(default)]
    fail: Option<String>,
}

impl FailQuery {
    fn fail(&self) -> bool {
        matches!(self.fail.as_deref(), Some("1" | "true" | "yes"))
    }
}

/// `GET /_upstream/quote?fail=…`: the deliberately flaky dependency (500 when asked to fail).
pub async fn flaky_quote(Query(q): Query<FailQuery>) -> Response {
    if q.fail() {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "upstream failure, as asked",
        )
            .into_response()
    } else {
        Json(json!({"quote": "Simple things should be simple."})).into_response()
    }
}

/// `GET /upstream?fail=…`: calls the flaky dependency over HTTP through the shared breaker.
/// 200 with its answer; 502 when it failed; 503 with `Retry-After` while the breaker is open
/// (the call is not even made).
pub async fn upstream(State(app): State<App>, Query(q): Query<FailQuery>) -> Response {
    let url = format!("{}?fail={}", app.upstream_url, q.fail());
    let client = &app.upstream;
    let result = app
        .breaker
        .call(|| async {
            let answer = client.get(&url).send().await.map_err(|e| e.to_string())?;
            if answer.status().is_server_error() {
                return Err(format!("upstream answered {}", answer.status()));
            }
            answer
                .json::<serde_json::Value>()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
    let state = app.breaker.state().to_string();
    let mut response = match result {
        Ok(quote) => {
            metrics::counter!(telemetry::UPSTREAM_CALLS, "outcome" => "ok").increment(1);
            Json(json!({"upstream": quote, "breaker": state})).into_response()
        }
        Err(CallError::Inner(e)) => {
            metrics::counter!(telemetry::UPSTREAM_CALLS, "outcome" => "failed").increment(1);
            problem(
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "upstream_failed",
                    format!("the upstream call failed: {e}"),
                )
                .with_member("breaker", state.clone()),
            )
        }
        Err(CallError::Rejected(r)) => {
            metrics::counter!(telemetry::UPSTREAM_CALLS, "outcome" => "rejected").increment(1);
            let secs =
                (r.retry_after.as_secs() + u64::from(r.retry_after.subsec_nanos() > 0)).max(1);
            problem(
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "breaker_open",
                    format!(
                        "the upstream is failing; the breaker is {}: not calling it",
                        r.state
                    ),
                )
                .with_member("breaker", r.state.to_string())
                .with_member("retry_after", secs)
                .with_header(RETRY_AFTER, HeaderValue::from(secs)),
            )
        }
    };
    if let Ok(v) = HeaderValue::from_str(&app.breaker.state().to_string()) {
        response.headers_mut().insert(BREAKER_STATE.clone(), v);
    }
    response
}

// ---- jobs (lock + fencing token) ----------------------------------------------------------

/// `?hold_ms=` on `POST /jobs/{name}`: how long the job "works" while holding its lock.
#[derive(Debug, Deserialize)]
pub struct JobQuery {
    #[serde(default)]
    hold_ms: u64,
}

fn job_name(name: &str) -> Result<(), Box<Problem>> {
    let valid = !name.is_empty()
        && name.len() <= ID_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(Box::new(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_job_name",
            format!("a job name is 1 to {ID_BYTES_MAX} ASCII letters, digits, '-' or '_'"),
        )))
    }
}

/// `POST /jobs/{name}?hold_ms=…`: runs the job under the lock `job:{name}`: 409 if another run
/// holds it; otherwise works for `hold_ms` and writes its output through the fence with its
/// fencing token (a run whose lease was taken over meanwhile would be refused), then answers
/// `{"job", "fencing_token", "fence"}`.
pub async fn run_job(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<JobQuery>,
) -> Response {
    if let Err(p) = job_name(&name) {
        return problem(*p);
    }
    let hold = Duration::from_millis(q.hold_ms);
    if hold > JOB_HOLD_MAX {
        return problem(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_hold",
            format!("hold_ms is at most {}", JOB_HOLD_MAX.as_millis()),
        ));
    }
    let lease = match app
        .lock
        .try_acquire(format!("job:{name}"), JOB_LOCK_TTL)
        .await
    {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            metrics::counter!(telemetry::JOBS, "outcome" => "busy").increment(1);
            return problem(
                Problem::new(
                    StatusCode::CONFLICT,
                    "job_running",
                    format!("job {name} is running; try again when it is done"),
                )
                .with_header(RETRY_AFTER, HeaderValue::from(1)),
            );
        }
        Err(e) => return problem(store_problem(e)),
    };
    let token = lease.fencing_token();
    app.console.line(format!(
        "job {name}: started with fencing token {token}, working {} ms",
        hold.as_millis()
    ));
    tokio::time::sleep(hold).await;
    let fence = app
        .fence
        .check_and_record(format!("job-output:{name}"), token)
        .await;
    let released = lease.release().await;
    let fence = match (fence, released) {
        (Ok(FenceCheck::Accepted), Ok(_)) => "accepted".to_owned(),
        (Ok(FenceCheck::Rejected { highest }), Ok(_)) => format!("rejected (highest {highest})"),
        (Err(e), _) | (_, Err(e)) => return problem(store_problem(e)),
    };
    metrics::counter!(telemetry::JOBS, "outcome" => "done").increment(1);
    app.console
        .line(format!("job {name}: done, output fence {fence}"));
    Json(json!({"job": name, "fencing_token": token, "fence": fence})).into_response()
}

/// `GET /jobs/{name}` → `{"job", "running", "last_token"}`: whether its lock is held, and the
/// highest fencing token its output has accepted.
pub async fn job_status(State(app): State<App>, Path(name): Path<String>) -> Response {
    if let Err(p) = job_name(&name) {
        return problem(*p);
    }
    // The lock's key, as the lock module documents it: `lock:{name}`, braces included.
    let mut key = LOCK_KEY_PREFIX.to_vec();
    key.extend_from_slice(format!("{{job:{name}}}").as_bytes());
    let running = match app.backend.get(&key).await {
        Ok(v) => v.is_some(),
        Err(e) => return problem(store_problem(e)),
    };
    let last = match app.fence.highest(format!("job-output:{name}")).await {
        Ok(t) => t,
        Err(e) => return problem(store_problem(e)),
    };
    Json(json!({"job": name, "running": running, "last_token": last})).into_response()
}
