//! The HTTP layers across real replicas: two servers with their *own* connections to one Redis
//! or Postgres enforce one quota and honour each other's idempotency keys; and the rate-limit
//! layer's fail-open / fail-closed policies when the connection to Redis is really cut (by a
//! loopback proxy this test owns; the shared server keeps running).
//!
//! Server URLs come from `KEEL_TEST_REDIS_URL` and `KEEL_TEST_POSTGRES_URL`, as in
//! `tests/conformance.rs`: unset is a failure with instructions, never a skip.
#![cfg(all(feature = "http", feature = "redis", feature = "postgres"))]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::{get, post};
use keel::adapters::postgres::PostgresBackend;
use keel::adapters::redis::{RedisBackend, RedisOptions};
use keel_primitives::http::{Extractor, OnBackendError};
use keel_primitives::idempotency::IdempotencyLayer;
use keel_primitives::ratelimit::{Quota, RateLimitLayer, RateLimiter, Strategy};
use keel_primitives::{Backend, Namespaced};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

fn server_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set, so the HTTP layers cannot be tested across replicas. Run \
             `scripts/test`, which starts Redis, Valkey and Postgres and sets it, or set it \
             yourself to a server you started."
        ),
    }
}

/// A prefix no other run uses, so runs against a shared server do not meet.
fn unique(name: &str) -> Vec<u8> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("keel-http-test:{name}:{nanos:x}:").into_bytes()
}

async fn serve(app: Router) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, service).await.unwrap();
    });
    (addr, task)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Two replicas, each with its own backend handle (its own connections), one shared quota.
async fn replicas_share_one_quota(one: Arc<dyn Backend>, two: Arc<dyn Backend>) {
    let app = |b: Arc<dyn Backend>| {
        let limiter = RateLimiter::new(b, "shared", Strategy::Gcra, Quota::per_hour(5)).unwrap();
        Router::new()
            .route("/", get(|| async { "ok" }))
            .layer(RateLimitLayer::new(limiter))
    };
    let (a, _ta) = serve(app(one)).await;
    let (b, _tb) = serve(app(two)).await;
    let http = client();
    let mut admitted = 0;
    for i in 0..10 {
        let addr = if i % 2 == 0 { a } else { b };
        let r = http.get(format!("http://{addr}/")).send().await.unwrap();
        admitted += usize::from(r.status() == 200);
    }
    assert_eq!(admitted, 5, "one quota across both replicas");
}

/// Idempotency keys taken on one replica are honoured by the other.
async fn replicas_share_idempotency(one: Arc<dyn Backend>, two: Arc<dyn Backend>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = |b: Arc<dyn Backend>| {
        let runs = Arc::clone(&runs);
        Router::new()
            .route(
                "/orders",
                post(move || {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    async move { format!("order {n}") }
                }),
            )
            .layer(
                IdempotencyLayer::builder(b, Extractor::global())
                    .build()
                    .unwrap(),
            )
    };
    let (a, _ta) = serve(app(one)).await;
    let (b, _tb) = serve(app(two)).await;
    let http = client();
    for addr in [a, b, a, b] {
        let r = http
            .post(format!("http://{addr}/orders"))
            .header("idempotency-key", "k")
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "order 1");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redis_handles_share_one_quota_and_one_set_of_keys() {
    let url = server_url("KEEL_TEST_REDIS_URL");
    let prefix = unique("redis");
    let handle = || async {
        let b = RedisBackend::connect(&url).await.unwrap();
        Arc::new(Namespaced::new(Arc::new(b), prefix.clone())) as Arc<dyn Backend>
    };
    replicas_share_one_quota(handle().await, handle().await).await;
    let prefix = unique("redis-idem");
    let handle = || async {
        let b = RedisBackend::connect(&url).await.unwrap();
        Arc::new(Namespaced::new(Arc::new(b), prefix.clone())) as Arc<dyn Backend>
    };
    replicas_share_idempotency(handle().await, handle().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_handles_share_one_quota_and_one_set_of_keys() {
    let url = server_url("KEEL_TEST_POSTGRES_URL");
    let handle = |prefix: Vec<u8>| {
        let url = url.clone();
        async move {
            let b = PostgresBackend::connect(&url).await.unwrap();
            b.ensure_schema().await.unwrap();
            Arc::new(Namespaced::new(Arc::new(b), prefix)) as Arc<dyn Backend>
        }
    };
    let prefix = unique("pg");
    replicas_share_one_quota(handle(prefix.clone()).await, handle(prefix).await).await;
    let prefix = unique("pg-idem");
    replicas_share_idempotency(handle(prefix.clone()).await, handle(prefix).await).await;
}

/// A loopback TCP proxy to a server; `cut` closes every connection and stops listening.
struct Proxy {
    addr: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let list = Arc::clone(&tasks);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().await.push(conn);
            }
        });
        tasks.lock().await.push(accept);
        Proxy { addr, tasks }
    }

    async fn cut(&self) {
        for task in self.tasks.lock().await.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_fails_open_or_closed_when_redis_is_unreachable() {
    let url = server_url("KEEL_TEST_REDIS_URL");
    // The same URL with the proxy as its host (keeping any user, path and query options).
    let (scheme, rest) = url.split_once("://").expect("a redis:// URL");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((user, host)) => (format!("{user}@"), host),
        None => (String::new(), authority),
    };
    let upstream: SocketAddr = tokio::net::lookup_host(hostport)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start(upstream).await;
    let options = RedisOptions::default()
        .with_op_timeout(Duration::from_millis(500))
        .with_connect_timeout(Duration::from_millis(500));
    let proxied = format!("{scheme}://{userinfo}{}{tail}", proxy.addr);
    let redis = RedisBackend::connect_with(&proxied, options).await.unwrap();
    let b: Arc<dyn Backend> = Arc::new(Namespaced::new(Arc::new(redis), unique("down")));
    let app = |name: &str, on_error| {
        let limiter =
            RateLimiter::new(b.clone(), name, Strategy::Gcra, Quota::per_hour(100)).unwrap();
        Router::new().route("/", get(|| async { "ok" })).layer(
            RateLimitLayer::builder()
                .limiter(limiter)
                .on_backend_error(on_error)
                .build()
                .unwrap(),
        )
    };
    let (open, _to) = serve(app("open", OnBackendError::FailOpen)).await;
    let (closed, _tc) = serve(app("closed", OnBackendError::FailClosed)).await;
    let http = client();
    let r = http.get(format!("http://{open}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("ratelimit"), "decided while up");

    proxy.cut().await;
    let r = http.get(format!("http://{open}/")).send().await.unwrap();
    assert_eq!(r.status(), 200, "fail-open admits");
    assert!(
        !r.headers().contains_key("ratelimit"),
        "no headers without a decision"
    );
    let r = http.get(format!("http://{closed}/")).send().await.unwrap();
    assert_eq!(r.status(), 503, "fail-closed rejects");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
}
