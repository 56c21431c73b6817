//! The HTTP layers' cost: a trivial axum handler with no layer, with keel's rate-limit layer on
//! three backends, with tower_governor (in-process), and with keel's idempotency layer (first
//! requests and replays), each driven by 64 concurrent keep-alive HTTP/1.1 connections.
//!
//! `cargo bench --bench http --features full,http -- [--quick] [--secs S]`
//!
//! Every server and the client run in this process on one Tokio runtime over loopback, so the
//! client's work is part of every figure; compare the rows, not the absolute numbers. Each
//! connection sends as fast as its previous response arrives (closed loop), after a warm-up.
//! Rate limits are set far above the offered load, so the admitted path is measured, and every
//! connection is its own client (header `x-client`), as with many clients in production.
//! Redis is `KEEL_TEST_REDIS_URL` (default `redis://127.0.0.1:6379/`); without it, that row
//! says so. All traffic stays on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use keel_primitives::http::Extractor;
use keel_primitives::idempotency::IdempotencyLayer;
use keel_primitives::ratelimit::{Quota, RateLimitLayer, RateLimiter, Strategy};
use keel_primitives::{Backend, Embedded, Namespaced};
use tokio::net::{TcpListener, TcpStream};

const CONNECTIONS: usize = 64;
/// Far above what one machine can offer, so every request is admitted.
const QUOTA_PER_SECOND: u64 = 1_000_000_000;

#[derive(Clone, Copy)]
enum Traffic {
    /// `GET /`.
    Get,
    /// `POST /` with a new idempotency key on every request.
    FirstRequests,
    /// `POST /` repeating one key per connection (after its first request, all replays).
    Replays,
}

struct Row {
    name: String,
    result: Result<Measured, String>,
}

struct Measured {
    requests: u64,
    elapsed: Duration,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let secs: f64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 0.5 } else { 5.0 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(run(Duration::from_secs_f64(secs), quick));
}

async fn run(cell: Duration, quick: bool) {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let embedded: Arc<dyn Backend> =
        Arc::new(Embedded::open(dir.path().join("rl")).expect("the embedded store"));
    let idem_embedded: Arc<dyn Backend> =
        Arc::new(Embedded::open(dir.path().join("idem")).expect("the embedded store"));
    let memory: Arc<dyn Backend> = Arc::new(Embedded::memory());
    let redis_url = std::env::var("KEEL_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned());
    let redis: Result<Arc<dyn Backend>, String> =
        match keel_adapters::redis::RedisBackend::connect(&redis_url).await {
            Ok(r) => Ok(Arc::new(Namespaced::new(
                Arc::new(r),
                format!("keel-bench-http:{}:", std::process::id()),
            ))),
            Err(e) => Err(format!("Redis unavailable at {redis_url}: {e}")),
        };

    let plain = || Router::new().route("/", get(|| async { "ok" }).post(|| async { "ok" }));
    let keel_rl = |b: Arc<dyn Backend>| {
        let limiter = RateLimiter::new(
            b,
            "bench",
            Strategy::Gcra,
            Quota::per_second(QUOTA_PER_SECOND),
        )
        .expect("a limiter");
        let layer = RateLimitLayer::builder()
            .limiter(limiter)
            .key(Extractor::header(axum::http::HeaderName::from_static(
                "x-client",
            )))
            .build()
            .expect("a layer");
        plain().layer(layer)
    };
    let governor = || {
        let config = tower_governor::governor::GovernorConfigBuilder::default()
            .per_nanosecond(1)
            .burst_size(u32::MAX)
            .key_extractor(ClientHeader)
            .finish()
            .expect("a governor config");
        plain().layer(tower_governor::GovernorLayer::new(config))
    };
    let idem = |b: Arc<dyn Backend>| {
        let layer = IdempotencyLayer::builder(
            b,
            Extractor::header(axum::http::HeaderName::from_static("x-client")),
        )
        .build()
        .expect("a layer");
        Router::new()
            .route("/", post(|| async { "ok" }))
            .layer(layer)
    };

    let mut rows = Vec::new();
    let mut cells: Vec<(&str, Result<Router, String>, Traffic)> = vec![
        ("no layer (GET)", Ok(plain()), Traffic::Get),
        (
            "keel rate limit, embedded (Immediate)",
            Ok(keel_rl(embedded)),
            Traffic::Get,
        ),
        (
            "keel rate limit, embedded memory",
            Ok(keel_rl(memory.clone())),
            Traffic::Get,
        ),
        ("keel rate limit, Redis", redis.map(keel_rl), Traffic::Get),
        ("tower_governor (in-memory)", Ok(governor()), Traffic::Get),
        ("no layer (POST)", Ok(plain()), Traffic::FirstRequests),
        (
            "keel idempotency, first requests, embedded (Immediate)",
            Ok(idem(idem_embedded.clone())),
            Traffic::FirstRequests,
        ),
        (
            "keel idempotency, replays, embedded (Immediate)",
            Ok(idem(idem_embedded)),
            Traffic::Replays,
        ),
        (
            "keel idempotency, first requests, embedded memory",
            Ok(idem(memory.clone())),
            Traffic::FirstRequests,
        ),
        (
            "keel idempotency, replays, embedded memory",
            Ok(idem(memory)),
            Traffic::Replays,
        ),
    ];
    for (name, app, traffic) in cells.drain(..) {
        let result = match app {
            Ok(app) => drive(app, traffic, cell, quick).await,
            Err(e) => Err(e),
        };
        if let Ok(m) = &result {
            eprintln!(
                "{name}: {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs",
                m.requests as f64 / m.elapsed.as_secs_f64(),
                m.p50_us,
                m.p99_us
            );
        }
        rows.push(Row {
            name: name.to_owned(),
            result,
        });
    }
    print_table(&rows, cell);
}

/// tower_governor keyed like keel's layer in this benchmark: one key per connection.
#[derive(Clone)]
struct ClientHeader;

impl tower_governor::key_extractor::KeyExtractor for ClientHeader {
    type Key = Vec<u8>;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, tower_governor::GovernorError> {
        req.headers()
            .get("x-client")
            .map(|v| v.as_bytes().to_vec())
            .ok_or(tower_governor::GovernorError::UnableToExtractKey)
    }
}

async fn drive(
    app: Router,
    traffic: Traffic,
    cell: Duration,
    quick: bool,
) -> Result<Measured, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let server = tokio::spawn(async move {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        let _ = axum::serve(listener, service).await;
    });
    let warmup = if quick {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(500)
    };
    let start = Instant::now() + warmup;
    let end = start + cell;
    let keys = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for conn in 0..CONNECTIONS {
        let keys = Arc::clone(&keys);
        tasks.push(tokio::spawn(async move {
            connection(addr, conn, traffic, start, end, keys).await
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mut l, e) = task.await.map_err(|e| e.to_string())??;
        latencies.append(&mut l);
        errors += e;
    }
    server.abort();
    if latencies.is_empty() {
        return Err("no request completed".to_owned());
    }
    latencies.sort_unstable();
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Ok(Measured {
        requests: latencies.len() as u64,
        elapsed: cell,
        p50_us: q(0.50),
        p99_us: q(0.99),
        errors,
    })
}

/// One keep-alive connection in a closed loop; latencies (ns) of the requests sent in the
/// measured interval, and how many answers were not 200.
async fn connection(
    addr: SocketAddr,
    conn: usize,
    traffic: Traffic,
    start: Instant,
    end: Instant,
    keys: Arc<AtomicU64>,
) -> Result<(Vec<u64>, u64), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let client = format!("client-{conn}");
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    // Bounded by time, and by count in case the clock misbehaves.
    for _ in 0..50_000_000u64 {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let builder = Request::builder()
            .uri("/")
            .header("host", "bench")
            .header("x-client", &client);
        let req = match traffic {
            Traffic::Get => builder.method("GET"),
            Traffic::FirstRequests => builder.method("POST").header(
                "idempotency-key",
                keys.fetch_add(1, Ordering::Relaxed).to_string(),
            ),
            Traffic::Replays => builder.method("POST").header("idempotency-key", "same"),
        }
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let ok = response.status() == 200;
        let _ = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let done = Instant::now();
        if sent >= start {
            latencies.push(done.duration_since(sent).as_nanos() as u64);
            errors += u64::from(!ok);
        }
    }
    Ok((latencies, errors))
}

fn print_table(rows: &[Row], cell: Duration) {
    println!(
        "\n{CONNECTIONS} concurrent keep-alive connections, {:.1} s per row, one process (client \
         and server share the machine)\n",
        cell.as_secs_f64()
    );
    println!("| server | requests/s | p50 | p99 | non-200 |");
    println!("|---|---:|---:|---:|---:|");
    for row in rows {
        match &row.result {
            Ok(m) => println!(
                "| {} | {} | {:.0} µs | {:.0} µs | {} |",
                row.name,
                thousands(m.requests as f64 / m.elapsed.as_secs_f64()),
                m.p50_us,
                m.p99_us,
                m.errors
            ),
            Err(e) => println!("| {} | unavailable: {e} | | | |", row.name),
        }
    }
}

fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
