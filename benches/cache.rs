//! The value cache and the HTTP response cache, measured.
//!
//! `cargo bench --bench cache --all-features -- [--quick] [--secs S]`
//!
//! Redis is the server at `KEEL_TEST_REDIS_URL` (`scripts/test` starts one and sets it;
//! `source` the env it prints, or point it at any local Redis); without it the Redis rows say
//! "unavailable".
//!
//! 1. **Hit path**: `get_or_compute` of a key that is present (a 64-byte string, JSON), at 1
//!    and 64 callers: keel on the embedded engine (memory), on Redis, on Redis with the moka L1
//!    (1 s staleness bound), and moka's own `get_with` alone for reference.
//! 2. **Stampede**: 4 replicas (4 separate Redis connections), 1,000 concurrent callers of one
//!    missing key (250 per replica), a computation that takes 20 ms; computations per burst for
//!    keel's `get_or_compute` and for a plain cache-aside (`get`, on a miss compute then `set`).
//! 3. **HTTP hit**: requests/s of 64 keep-alive clients fetching one cached response through
//!    an axum app with `HttpCacheLayer` (embedded engine), next to the bare handler.
//!
//! Prints Markdown tables (ops/s, p50, p99).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use keel_primitives::cache::Cache;
use keel_primitives::cache::http::HttpCache;
use keel_primitives::{Backend, Embedded};

const CALLERS: [usize; 2] = [1, 64];
const STAMPEDE_REPLICAS: usize = 4;
const STAMPEDE_CALLERS: usize = 1_000;
const STAMPEDE_BURSTS: usize = 5;
const COMPUTE: Duration = Duration::from_millis(20);
const HTTP_CLIENTS: usize = 64;
const OPS_PER_CALLER_MAX: u64 = 100_000_000;

type Op = Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Runs `op` from `callers` tasks for `secs`; returns (ops/s, p50 ns, p99 ns).
async fn measure(op: Op, callers: usize, secs: Duration) -> (f64, u64, u64) {
    // Warm-up.
    let warm = Instant::now() + secs / 10;
    while Instant::now() < warm {
        op().await;
    }
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (op, done) = (Arc::clone(&op), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            let mut n = 0;
            while start.elapsed() < secs && n < OPS_PER_CALLER_MAX {
                let t = Instant::now();
                op().await;
                h.record(t.elapsed().as_nanos() as u64).unwrap();
                n += 1;
            }
            done.fetch_add(n, Ordering::Relaxed);
            h
        }));
    }
    let mut all = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    (
        done.load(Ordering::Relaxed) as f64 / elapsed,
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99),
    )
}

fn row(name: &str, callers: usize, r: Option<(f64, u64, u64)>) {
    match r {
        Some((ops, p50, p99)) => {
            let (p50, p99) = (p50 as f64 / 1000.0, p99 as f64 / 1000.0);
            println!("| {name} | {callers} | {ops:.0} | {p50:.1} µs | {p99:.1} µs |")
        }
        None => println!("| {name} | {callers} | unavailable | | |"),
    }
}

async fn redis() -> Option<Arc<dyn Backend>> {
    let url = std::env::var("KEEL_TEST_REDIS_URL").ok()?;
    let b = keel_adapters::redis::RedisBackend::connect(&url)
        .await
        .ok()?;
    Some(Arc::new(b))
}

fn get_op(cache: Cache) -> Op {
    Arc::new(move || {
        let cache = cache.clone();
        Box::pin(async move {
            let v: String = cache
                .get_or_compute("hot", Duration::from_secs(3600), || async {
                    Ok::<_, std::io::Error>("x".repeat(64))
                })
                .await
                .unwrap();
            std::hint::black_box(v);
        })
    })
}

async fn hit_path(secs: Duration) {
    println!("\n### Value cache hit path (`get_or_compute` of a present key)\n");
    println!("| cache | callers | ops/s | p50 | p99 |\n|---|---:|---:|---:|---:|");
    let ns = format!("bench-{}", std::process::id());
    for callers in CALLERS {
        let embedded = Cache::new(Arc::new(Embedded::memory()), ns.clone());
        row(
            "keel, embedded (memory)",
            callers,
            Some(measure(get_op(embedded), callers, secs).await),
        );
        match redis().await {
            Some(b) => {
                let plain = Cache::new(Arc::clone(&b), ns.clone());
                row(
                    "keel, Redis",
                    callers,
                    Some(measure(get_op(plain), callers, secs).await),
                );
                let l1 = Cache::builder(b, ns.clone())
                    .l1(10_000, Duration::from_secs(1))
                    .build()
                    .unwrap();
                row(
                    "keel, Redis + moka L1 (1 s)",
                    callers,
                    Some(measure(get_op(l1), callers, secs).await),
                );
            }
            None => {
                row("keel, Redis", callers, None);
                row("keel, Redis + moka L1 (1 s)", callers, None);
            }
        }
        let moka: moka::future::Cache<String, String> = moka::future::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(Duration::from_secs(3600))
            .build();
        let op: Op = Arc::new(move || {
            let moka = moka.clone();
            Box::pin(async move {
                let v = moka
                    .get_with("hot".to_owned(), async { "x".repeat(64) })
                    .await;
                std::hint::black_box(v);
            })
        });
        row(
            "moka `get_with` alone",
            callers,
            Some(measure(op, callers, secs).await),
        );
    }
}

async fn stampede() {
    println!(
        "\n### Stampede: {STAMPEDE_CALLERS} concurrent misses of one key, {STAMPEDE_REPLICAS} replicas on Redis, 20 ms computation\n"
    );
    println!(
        "| cache | computations per burst (mean of {STAMPEDE_BURSTS}) | slowest caller |\n|---|---:|---:|"
    );
    let mut handles = Vec::new();
    for _ in 0..STAMPEDE_REPLICAS {
        match redis().await {
            Some(b) => handles.push(b),
            None => {
                println!(
                    "| keel `get_or_compute` | unavailable | |\n| plain cache-aside | unavailable | |"
                );
                return;
            }
        }
    }
    for keel in [true, false] {
        let mut computations = 0;
        let mut slowest = Duration::ZERO;
        for burst in 0..STAMPEDE_BURSTS {
            let ns = format!("stampede-{}-{burst}-{keel}", std::process::id());
            let caches: Vec<Cache> = handles
                .iter()
                .map(|b| Cache::new(Arc::clone(b), ns.clone()))
                .collect();
            let runs = Arc::new(AtomicU64::new(0));
            let barrier = Arc::new(tokio::sync::Barrier::new(STAMPEDE_CALLERS));
            let mut tasks = Vec::new();
            for i in 0..STAMPEDE_CALLERS {
                let (cache, runs, barrier) = (
                    caches[i % STAMPEDE_REPLICAS].clone(),
                    Arc::clone(&runs),
                    Arc::clone(&barrier),
                );
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let t = Instant::now();
                    let compute = || async {
                        runs.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(COMPUTE).await;
                        Ok::<_, std::io::Error>("value".to_owned())
                    };
                    if keel {
                        cache
                            .get_or_compute("hot", Duration::from_secs(60), compute)
                            .await
                            .unwrap();
                    } else if cache.get::<String>("hot").await.unwrap().is_none() {
                        let v = compute().await.unwrap();
                        cache
                            .set("hot", &v, Some(Duration::from_secs(60)))
                            .await
                            .unwrap();
                    }
                    t.elapsed()
                }));
            }
            for t in tasks {
                slowest = slowest.max(t.await.unwrap());
            }
            computations += runs.load(Ordering::Relaxed);
            caches[0].clear().await.unwrap();
        }
        let name = if keel {
            "keel `get_or_compute`"
        } else {
            "plain cache-aside (get, compute, set)"
        };
        println!(
            "| {name} | {:.1} | {} ms |",
            computations as f64 / STAMPEDE_BURSTS as f64,
            slowest.as_millis()
        );
    }
}

async fn http_hits(secs: Duration) {
    use axum::{Router, routing::get};
    println!("\n### HTTP response cache: one cached response, {HTTP_CLIENTS} keep-alive clients\n");
    println!("| app | clients | req/s | p50 | p99 |\n|---|---:|---:|---:|---:|");
    let handler = || async {
        (
            [(axum::http::header::CACHE_CONTROL, "public, max-age=3600")],
            "x".repeat(1024),
        )
    };
    let cache = HttpCache::builder(Arc::new(Embedded::memory()))
        .build()
        .unwrap();
    for (name, app) in [
        ("bare handler", Router::new().route("/r", get(handler))),
        (
            "HttpCacheLayer hit (embedded)",
            Router::new().route("/r", get(handler)).layer(cache.layer()),
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("http://{addr}/r");
        let op: Op = Arc::new(move || {
            let (client, url) = (client.clone(), url.clone());
            Box::pin(async move {
                let r = client.get(&url).send().await.unwrap();
                std::hint::black_box(r.bytes().await.unwrap());
            })
        });
        row(
            name,
            HTTP_CLIENTS,
            Some(measure(op, HTTP_CLIENTS, secs).await),
        );
        server.abort();
    }
}

fn main() -> ExitCode {
    let mut secs = None;
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--secs" => secs = args.next().and_then(|s| s.parse::<f64>().ok()),
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other:?}; usage: cache [--quick] [--secs S]");
                return ExitCode::FAILURE;
            }
        }
    }
    let secs = Duration::from_secs_f64(secs.unwrap_or(if quick { 0.25 } else { 2.0 }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        hit_path(secs).await;
        stampede().await;
        http_hits(secs).await;
    });
    ExitCode::SUCCESS
}
