//! Metrics: the process-wide recorder behind the `metrics` facade (Prometheus text format,
//! served at `GET /metrics`), the middleware that counts every request by route, method and
//! status, and the demo's own counters. The primitives emit through the same facade, so their
//! figures appear on the same page once they record any.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::app::App;
use crate::cli::failure::Failure;

/// Requests answered, by `route` (the matched route pattern, `unmatched` for 404s), `method`
/// and `status`.
pub const HTTP_REQUESTS: &str = "keel_demo_http_requests_total";
/// Seconds from a request's arrival to its response head, by `route`.
pub const HTTP_DURATION: &str = "keel_demo_http_request_duration_seconds";
/// Sign-in codes sent.
pub const CODES_SENT: &str = "keel_demo_login_codes_sent_total";
/// Sign-ins completed.
pub const SIGN_INS: &str = "keel_demo_sign_ins_total";
/// Orders created (replays of an `Idempotency-Key` are not counted: the handler did not run).
pub const ORDERS: &str = "keel_demo_orders_created_total";
/// Times the catalog handler ran (cache hits do not run it).
pub const CATALOG_RENDERS: &str = "keel_demo_catalog_renders_total";
/// Webhook deliveries by `outcome`: `processed`, `duplicate`, `in_progress`, `failed`.
pub const WEBHOOKS: &str = "keel_demo_webhooks_total";
/// Upstream calls through the breaker by `outcome`: `ok`, `failed`, `rejected`.
pub const UPSTREAM_CALLS: &str = "keel_demo_upstream_calls_total";
/// Jobs run by `outcome`: `done`, `busy`.
pub const JOBS: &str = "keel_demo_jobs_total";

/// How often the recorder's histograms are compacted.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder as the process's `metrics` recorder and starts its upkeep
/// task (histogram compaction). Call once, inside the runtime.
///
/// # Errors
/// A recorder is already installed.
pub fn install() -> Result<PrometheusHandle, Failure> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| Failure::Error(format!("cannot install the metrics recorder: {e}")))?;
    describe();
    keel::metrics::describe_metrics();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        HTTP_REQUESTS,
        "Requests answered, by route, method and status."
    );
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "Time to the response head, by route."
    );
    describe_counter!(CODES_SENT, "Sign-in codes sent.");
    describe_counter!(SIGN_INS, "Sign-ins completed.");
    describe_counter!(ORDERS, "Orders created.");
    describe_counter!(CATALOG_RENDERS, "Catalog handler runs (cache misses).");
    describe_counter!(WEBHOOKS, "Webhook deliveries, by outcome.");
    describe_counter!(
        UPSTREAM_CALLS,
        "Upstream calls through the breaker, by outcome."
    );
    describe_counter!(JOBS, "Job requests, by outcome.");
}

/// Middleware: counts and times every request.
pub async fn count(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(HTTP_DURATION, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(HTTP_REQUESTS, "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
}

/// `GET /metrics`: every metric in the Prometheus text format.
pub async fn render(State(app): State<App>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        app.metrics.render(),
    )
}
