//! A tower [`Layer`] that puts a [`Breaker`] in front of an HTTP service (feature `http`).
//!
//! While the breaker admits a call the request goes to the inner service, and the response is
//! classified: a 5xx is a failure, anything else a success (override with
//! [`BreakerLayer::classify_status`]); an error from the inner service is a failure. A rejected
//! request never reaches the inner service: it gets `503 Service Unavailable` with an
//! `application/problem+json` body (RFC 9457) and, when the breaker knows how long it stays
//! open, a `Retry-After` header in whole seconds. Each rejection emits a `tracing` event.
//!
//! The breaker decides fail-open or fail-closed on its own: a shared breaker whose backend is
//! down keeps working on its local view ([`Mode::LocalFallback`](super::Mode)), so the layer
//! never turns a backend outage into rejections by itself.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use http::{Request, Response, StatusCode};
//! use keel_primitives::breaker::{Breaker, Policy, layer::BreakerLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let breaker = Breaker::builder("upstream").policy(Policy::ConsecutiveFailures(1)).build()?;
//! let svc = ServiceBuilder::new()
//!     .layer(BreakerLayer::new(breaker))
//!     .service_fn(|_req: Request<String>| async {
//!         Ok::<_, std::convert::Infallible>(
//!             Response::builder().status(500).body(String::new()).unwrap(),
//!         )
//!     });
//! let first = svc.clone().oneshot(Request::new(String::new())).await?;
//! assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
//! let second = svc.oneshot(Request::new(String::new())).await?;
//! assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service};

use super::{Breaker, Outcome, Rejected};

type StatusClassifier = Arc<dyn Fn(StatusCode) -> Outcome + Send + Sync>;

/// Wraps services in a [`BreakerService`]. Cheap to clone; every clone shares one breaker.
#[derive(Clone)]
pub struct BreakerLayer {
    breaker: Breaker,
    classify: StatusClassifier,
}

impl fmt::Debug for BreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerLayer")
            .field("breaker", &self.breaker)
            .finish()
    }
}

impl BreakerLayer {
    /// A layer over `breaker`: 5xx responses and inner errors are failures.
    pub fn new(breaker: Breaker) -> Self {
        BreakerLayer {
            breaker,
            classify: Arc::new(|status: StatusCode| {
                if status.is_server_error() {
                    Outcome::Failure
                } else {
                    Outcome::Success
                }
            }),
        }
    }

    /// Replaces how a response status is classified (e.g. count 429 as a failure too).
    pub fn classify_status(
        mut self,
        f: impl Fn(StatusCode) -> Outcome + Send + Sync + 'static,
    ) -> Self {
        self.classify = Arc::new(f);
        self
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`BreakerLayer`] produces.
#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
    layer: BreakerLayer,
}

impl<S> fmt::Debug for BreakerService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerService")
            .field("layer", &self.layer)
            .finish()
    }
}

/// The future of [`BreakerService`].
pub struct ResponseFuture<T, E> {
    inner: Pin<Box<dyn Future<Output = Result<T, E>> + Send>>,
}

impl<T, E> Future for ResponseFuture<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T, E> fmt::Debug for ResponseFuture<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for BreakerService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: From<String> + Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<Response<ResB>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The clone that was driven to readiness serves this request; the fresh clone stays
        // behind for the next poll_ready (tower's usual pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                let permit = match layer.breaker.acquire().await {
                    Ok(p) => p,
                    Err(rejected) => {
                        tracing::debug!(
                            breaker = %rejected.name,
                            state = %rejected.state,
                            "request rejected by the circuit breaker"
                        );
                        return Ok(rejection(&rejected));
                    }
                };
                let result = inner.call(req).await;
                let outcome = match &result {
                    Ok(resp) => (layer.classify)(resp.status()),
                    Err(_) => Outcome::Failure,
                };
                tracing::trace!(
                    breaker = %layer.breaker.name(),
                    outcome = ?outcome,
                    "request passed the circuit breaker"
                );
                permit.record(outcome).await;
                result
            }),
        }
    }
}

/// The 503 problem+json response for a rejected request.
fn rejection<B: From<String>>(rejected: &Rejected) -> Response<B> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": "Service Unavailable",
        "status": 503,
        "detail": format!("circuit breaker {:?} is {}", rejected.name, rejected.state),
    })
    .to_string();
    let mut resp = Response::new(B::from(body));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if !rejected.retry_after.is_zero() {
        let secs = rejected.retry_after.as_millis().div_ceil(1000).max(1);
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs as u64));
    }
    resp
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;
    use crate::breaker::{Policy, State};
    use crate::ratelimit::ManualClock;

    fn status(code: u16) -> Response<String> {
        Response::builder()
            .status(code)
            .body(String::new())
            .unwrap()
    }

    #[tokio::test]
    async fn five_hundreds_trip_it_and_rejections_are_problem_json_with_retry_after() {
        let clock = ManualClock::new(1_000_000);
        let breaker = Breaker::builder("up")
            .clock(Arc::new(clock.clone()))
            .open_duration(Duration::from_millis(2_500))
            .jitter(0.0)
            .policy(Policy::ConsecutiveFailures(2))
            .build()
            .unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let seen = Arc::clone(&calls);
        let svc = ServiceBuilder::new()
            .layer(BreakerLayer::new(breaker.clone()))
            .service(service_fn(move |req: Request<String>| {
                seen.fetch_add(1, Ordering::SeqCst);
                let code = req.body().parse::<u16>().unwrap();
                async move { Ok::<_, Infallible>(status(code)) }
            }));
        let send = |code: &str| svc.clone().oneshot(Request::new(code.to_owned()));
        assert_eq!(send("404").await.unwrap().status(), 404);
        assert_eq!(send("503").await.unwrap().status(), 503);
        assert_eq!(
            send("404").await.unwrap().status(),
            404,
            "4xx resets the run"
        );
        assert_eq!(breaker.state(), State::Closed);
        send("500").await.unwrap();
        send("502").await.unwrap();
        assert_eq!(breaker.state(), State::Open);
        let resp = send("200").await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(resp.headers()[RETRY_AFTER], "3", "2.5 s rounds up");
        let body: serde_json::Value = serde_json::from_str(resp.body()).unwrap();
        assert_eq!(body["status"], 503);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "the rejected request never ran"
        );
        // After the open duration one probe goes through and closes it.
        clock.advance(Duration::from_millis(2_500));
        assert_eq!(send("200").await.unwrap().status(), 200);
        assert_eq!(breaker.state(), State::Closed);
    }

    #[tokio::test]
    async fn inner_errors_are_failures_and_the_classifier_can_be_replaced() {
        let breaker = Breaker::builder("up")
            .policy(Policy::ConsecutiveFailures(1))
            .build()
            .unwrap();
        let failing = ServiceBuilder::new()
            .layer(BreakerLayer::new(breaker.clone()))
            .service(service_fn(|_req: Request<String>| async {
                Err::<Response<String>, _>("connection refused")
            }));
        assert!(
            failing
                .clone()
                .oneshot(Request::new(String::new()))
                .await
                .is_err()
        );
        assert_eq!(breaker.state(), State::Open);

        let breaker = Breaker::builder("throttled")
            .policy(Policy::ConsecutiveFailures(1))
            .build()
            .unwrap();
        let layer = BreakerLayer::new(breaker.clone()).classify_status(|s| {
            if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() {
                Outcome::Failure
            } else {
                Outcome::Success
            }
        });
        let svc =
            ServiceBuilder::new()
                .layer(layer)
                .service(service_fn(|_req: Request<String>| async {
                    Ok::<_, Infallible>(status(429))
                }));
        svc.oneshot(Request::new(String::new())).await.unwrap();
        assert_eq!(breaker.state(), State::Open);
        // Forced open: no Retry-After (there is no known end).
        breaker.force_open().await;
        let resp = rejection::<String>(&breaker.acquire().await.unwrap_err());
        assert!(resp.headers().get(RETRY_AFTER).is_none());
    }
}
