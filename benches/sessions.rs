//! Cookie sessions under load: a handler that reads the session and one that writes it, with
//! keel's `SessionLayer` on the embedded engine, Redis and Postgres, next to tower-sessions with
//! its in-process memory store, each driven by 64 concurrent keep-alive HTTP/1.1 connections.
//!
//! `cargo bench --bench sessions --all-features -- [--quick] [--secs S]`
//!
//! Every server and the client run in this process on one Tokio runtime over loopback, so the
//! client's work is part of every figure; compare the rows, not the absolute numbers. Each
//! connection is one browser: it logs in once (its first write creates its session and cookie),
//! then sends requests with that cookie as fast as the previous response arrives (closed loop),
//! after a warm-up. The read handler gets one field; the write handler increments a counter
//! field (a load and a compare-and-swap save for keel). Redis is `KEEL_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379/`), Postgres `KEEL_TEST_POSTGRES_URL`; a row whose server is missing
//! says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use keel_primitives::session::{Session, SessionLayer, SessionStore};
use keel_primitives::{Backend, Embedded, Namespaced};
use tokio::net::{TcpListener, TcpStream};

const CONNECTIONS: usize = 64;

#[derive(Clone, Copy, PartialEq)]
enum Traffic {
    Read,
    Write,
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

fn keel_app(backend: Arc<dyn Backend>) -> Router {
    let store = SessionStore::builder(backend).build().expect("a store");
    let layer = SessionLayer::builder(store)
        .key(b"benchmark key: at least thirty-two bytes long")
        .secure(false)
        .build()
        .expect("a layer");
    Router::new()
        .route(
            "/read",
            get(|s: Session| async move {
                let n: u64 = s.get("n").await.ok().flatten().unwrap_or(0);
                n.to_string()
            }),
        )
        .route(
            "/write",
            post(|s: Session| async move {
                let n: u64 = s.get("n").await.ok().flatten().unwrap_or(0);
                let _ = s.insert("n", n + 1).await;
                (n + 1).to_string()
            }),
        )
        .layer(layer)
}

fn tower_sessions_app() -> Router {
    use tower_sessions::{MemoryStore, SessionManagerLayer};
    let layer = SessionManagerLayer::new(MemoryStore::default()).with_secure(false);
    Router::new()
        .route(
            "/read",
            get(|s: tower_sessions::Session| async move {
                let n: u64 = s.get("n").await.ok().flatten().unwrap_or(0);
                n.to_string()
            }),
        )
        .route(
            "/write",
            post(|s: tower_sessions::Session| async move {
                let n: u64 = s.get("n").await.ok().flatten().unwrap_or(0);
                let _ = s.insert("n", n + 1).await;
                (n + 1).to_string()
            }),
        )
        .layer(layer)
}

async fn run(cell: Duration, quick: bool) {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let embedded: Arc<dyn Backend> =
        Arc::new(Embedded::open(dir.path().join("sessions")).expect("the embedded store"));
    let memory: Arc<dyn Backend> = Arc::new(Embedded::memory());
    let prefix = format!("keel-bench-sessions:{}:", std::process::id());
    let redis_url = std::env::var("KEEL_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned());
    let redis: Result<Arc<dyn Backend>, String> =
        match keel_adapters::redis::RedisBackend::connect(&redis_url).await {
            Ok(r) => Ok(Arc::new(Namespaced::new(Arc::new(r), prefix.clone()))),
            Err(e) => Err(format!("Redis unavailable at {redis_url}: {e}")),
        };
    let postgres: Result<Arc<dyn Backend>, String> = match std::env::var("KEEL_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => {
            match keel_adapters::postgres::PostgresBackend::connect(&url).await {
                Ok(p) => match p.ensure_schema().await {
                    Ok(()) => Ok(Arc::new(Namespaced::new(Arc::new(p), prefix.clone()))),
                    Err(e) => Err(format!("Postgres schema: {e}")),
                },
                Err(e) => Err(format!("Postgres unavailable: {e}")),
            }
        }
        _ => Err("KEEL_TEST_POSTGRES_URL is not set".to_owned()),
    };

    let mut cells: Vec<(String, Result<Router, String>, Traffic)> = Vec::new();
    for traffic in [Traffic::Read, Traffic::Write] {
        let what = if traffic == Traffic::Read {
            "read"
        } else {
            "write"
        };
        cells.push((
            format!("keel, embedded (Immediate), {what}"),
            Ok(keel_app(embedded.clone())),
            traffic,
        ));
        cells.push((
            format!("keel, embedded memory, {what}"),
            Ok(keel_app(memory.clone())),
            traffic,
        ));
        cells.push((
            format!("keel, Redis, {what}"),
            redis.clone().map(keel_app),
            traffic,
        ));
        cells.push((
            format!("keel, Postgres, {what}"),
            postgres.clone().map(keel_app),
            traffic,
        ));
        cells.push((
            format!("tower-sessions, MemoryStore, {what}"),
            Ok(tower_sessions_app()),
            traffic,
        ));
    }
    let mut rows = Vec::new();
    for (name, app, traffic) in cells {
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
        rows.push(Row { name, result });
    }
    print_table(&rows, cell);
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
        let _ = axum::serve(listener, app).await;
    });
    let warmup = if quick {
        Duration::from_millis(100)
    } else {
        Duration::from_millis(500)
    };
    let start = Instant::now() + warmup;
    let end = start + cell;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        tasks.push(tokio::spawn(connection(addr, traffic, start, end)));
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

/// One browser on one keep-alive connection: a first write creates its session, then a closed
/// loop with its cookie. Latencies (ns) of the requests in the measured interval, and how many
/// answers were not 200.
async fn connection(
    addr: std::net::SocketAddr,
    traffic: Traffic,
    start: Instant,
    end: Instant,
) -> Result<(Vec<u64>, u64), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let login = Request::builder()
        .method("POST")
        .uri("/write")
        .header("host", "bench")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let response = sender
        .send_request(login)
        .await
        .map_err(|e| e.to_string())?;
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .ok_or("the first write set no cookie")?
        .to_owned();
    let _ = response.into_body().collect().await;
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut errors = 0;
    for _ in 0..50_000_000u64 {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let (method, uri) = match traffic {
            Traffic::Read => ("GET", "/read"),
            Traffic::Write => ("POST", "/write"),
        };
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "bench")
            .header("cookie", &cookie)
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
        "\n{CONNECTIONS} concurrent keep-alive connections (one session each), {:.1} s per row, \
         one process (client and server share the machine)\n",
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
