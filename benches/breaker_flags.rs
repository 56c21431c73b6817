//! The cost of keel's circuit breaker while closed, and of evaluating a feature flag.
//!
//! `cargo bench --bench breaker_flags --all-features -- [--quick] [--secs S]`
//!
//! Breaker: nanoseconds per call of an async function that succeeds at once, through
//! - nothing (the baseline),
//! - keel's breaker in local mode (`Breaker::call`),
//! - keel's breaker in shared mode over the in-memory engine and over a Redis started by this
//!   harness (append-only file, `appendfsync everysec`, as in `compare`): the hot path reads the
//!   local view; a refresh (one `get`) happens once per 500 ms refresh interval,
//! - tower-resilience's circuit breaker (`tower-resilience-circuitbreaker`), driven as a tower
//!   service (`ready` + `call`), next to the same service without it.
//!
//! Every breaker trips on a 50% failure rate over the last 100 calls (keel adds 5 consecutive
//! failures), so each records every outcome in a sliding window. One caller on a
//! current-thread runtime, and 4 callers on a 4-thread runtime (one breaker shared by all).
//!
//! Flags: evaluations per second of a flag with a constraint and a 50% rollout over two
//! weighted variants, from a `FlagClient`'s cache (no backend call), for 1,000 subjects in turn,
//! next to a `HashMap<String, bool>` lookup of the same keys.
//!
//! Each cell runs for a fixed time (2 s; `--quick` 0.2 s) after a warm-up.

#[allow(dead_code)] // shared with `compare`, which uses every helper
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_primitives::breaker::{Breaker, Policy, Window};
use keel_primitives::flags::{EvalContext, Flag, FlagClient, FlagStore};
use keel_primitives::{Backend, Embedded};
use tower::{Layer, Service, ServiceExt, service_fn};

/// Calls between two clock reads in a measuring loop.
const BATCH: u64 = 1_000;
/// A bound on every measuring loop, far above what the time bound allows.
const BATCHES_MAX: u64 = 10_000_000;
/// Subjects the flag benchmark cycles over.
const SUBJECTS: usize = 1_000;
/// Concurrent callers in the second breaker column.
const CALLERS: usize = 4;

fn parse_args() -> Result<Duration, String> {
    let mut cell = Duration::from_secs(2);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => cell = Duration::from_millis(200),
            "--secs" => {
                cell = args
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|s| *s > 0.0 && *s <= 600.0)
                    .map(Duration::from_secs_f64)
                    .ok_or("--secs takes a number of seconds per cell, at most 600")?
            }
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(cell)
}

/// Runs `op` in batches for `cell` (after a warm-up of a tenth of it); ns per call.
async fn measure<F, Fut>(cell: Duration, mut op: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let warm = Instant::now();
    while warm.elapsed() < cell / 10 {
        for _ in 0..BATCH {
            op().await;
        }
    }
    let started = Instant::now();
    let mut calls = 0u64;
    for _ in 0..BATCHES_MAX {
        for _ in 0..BATCH {
            op().await;
        }
        calls += BATCH;
        if started.elapsed() >= cell {
            break;
        }
    }
    started.elapsed().as_nanos() as f64 / calls as f64
}

/// `CALLERS` tasks each running `make()`'s op; ns per call across all of them (wall time /
/// total calls).
async fn measure_concurrent<F, Op, Fut>(cell: Duration, make: F) -> f64
where
    F: Fn() -> Op,
    Op: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let mut op = make();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let mut calls = 0u64;
            for _ in 0..BATCHES_MAX {
                for _ in 0..BATCH {
                    op().await;
                }
                calls += BATCH;
                if t.elapsed() >= cell {
                    break;
                }
            }
            calls
        }));
    }
    let mut calls = 0;
    for t in tasks {
        calls += t.await.expect("caller task");
    }
    started.elapsed().as_nanos() as f64 / calls as f64
}

fn keel_breaker(name: &str, shared: Option<Arc<dyn Backend>>) -> Breaker {
    let mut b = Breaker::builder(name)
        .policy(Policy::ConsecutiveFailures(5))
        .policy(Policy::FailureRate {
            percent: 50,
            window: Window::Calls(100),
            min_calls: 100,
        });
    if let Some(backend) = shared {
        b = b.shared(backend);
    }
    b.build().expect("valid breaker")
}

type Cell = (&'static str, f64, f64);

async fn breaker_cell(name: &'static str, b: Breaker, cell: Duration) -> Cell {
    let one = {
        let b = b.clone();
        measure(cell, move || {
            let b = b.clone();
            async move {
                let r = b.call(|| async { Ok::<_, ()>(black_box(1u64)) }).await;
                black_box(r.is_ok());
            }
        })
        .await
    };
    let many = measure_concurrent(cell, || {
        let b = b.clone();
        move || {
            let b = b.clone();
            async move {
                let r = b.call(|| async { Ok::<_, ()>(black_box(1u64)) }).await;
                black_box(r.is_ok());
            }
        }
    })
    .await;
    (name, one, many)
}

async fn breakers(cell: Duration, redis: Arc<dyn Backend>) -> Vec<Cell> {
    let mut rows = Vec::new();
    let bare_one = measure(cell, || async {
        let r: Result<u64, ()> = async { Ok(black_box(1u64)) }.await;
        black_box(r.is_ok());
    })
    .await;
    let bare_many = measure_concurrent(cell, || {
        || async {
            let r: Result<u64, ()> = async { Ok(black_box(1u64)) }.await;
            black_box(r.is_ok());
        }
    })
    .await;
    rows.push(("no breaker (async fn)", bare_one, bare_many));
    rows.push(breaker_cell("keel, local", keel_breaker("bench-local", None), cell).await);
    let memory: Arc<dyn Backend> = Arc::new(Embedded::memory());
    rows.push(
        breaker_cell(
            "keel, shared (in-memory engine)",
            keel_breaker("bench-memory", Some(memory)),
            cell,
        )
        .await,
    );
    let name: &'static str = Box::leak(
        format!(
            "bench-redis-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        )
        .into_boxed_str(),
    );
    rows.push(
        breaker_cell(
            "keel, shared (Redis)",
            keel_breaker(name, Some(redis)),
            cell,
        )
        .await,
    );

    // tower: the same service with and without tower-resilience's breaker.
    let svc = || service_fn(|x: u64| async move { Ok::<_, Infallible>(black_box(x)) });
    let tower_bare = {
        let s = svc();
        let one = measure(cell, move || async move {
            let r = s.oneshot(1).await;
            black_box(r.is_ok());
        })
        .await;
        let many = measure_concurrent(cell, || {
            let s = svc();
            move || async move {
                black_box(s.oneshot(1).await.is_ok());
            }
        })
        .await;
        ("tower service, no breaker", one, many)
    };
    rows.push(tower_bare);
    let layer = tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .build()
        .expect("valid tower-resilience breaker");
    let guarded = layer.layer(svc());
    let one = {
        let s = guarded.clone();
        measure(cell, move || {
            let mut s = s.clone();
            async move {
                let r = match s.ready().await {
                    Ok(s) => s.call(1).await.is_ok(),
                    Err(_) => false,
                };
                black_box(r);
            }
        })
        .await
    };
    let many = measure_concurrent(cell, || {
        let s = guarded.clone();
        move || {
            let mut s = s.clone();
            async move {
                let r = match s.ready().await {
                    Ok(s) => s.call(1).await.is_ok(),
                    Err(_) => false,
                };
                black_box(r);
            }
        }
    })
    .await;
    rows.push(("tower-resilience circuit breaker", one, many));
    rows
}

async fn flags(cell: Duration) -> Vec<(&'static str, f64)> {
    let backend: Arc<dyn Backend> = Arc::new(Embedded::memory());
    let flag = Flag::from_json(
        br#"{"key": "checkout", "enabled": true,
             "variants": {"old": "old", "new-a": "a", "new-b": "b"}, "default_variant": "old",
             "block": ["user-13"],
             "rules": [{"constraints": [{"attribute": "country", "operator": "IN",
                                          "values": ["NL", "BE", "DE"]}],
                        "rollout": {"percentage": 50, "variants": [
                            {"name": "new-a", "weight": 50}, {"name": "new-b", "weight": 50}]}}]}"#,
    )
    .expect("valid flag");
    FlagStore::new(Arc::clone(&backend))
        .put(&flag)
        .await
        .expect("flag written");
    let client = FlagClient::new(backend);
    client.refresh().await.expect("flags loaded");
    let contexts: Vec<EvalContext> = (0..SUBJECTS)
        .map(|i| EvalContext::new(format!("user-{i}")).with("country", "NL"))
        .collect();
    let mut i = 0;
    let ns = measure(cell, || {
        i = (i + 1) % SUBJECTS;
        let d = client.evaluate("checkout", &contexts[i]);
        black_box(d.variant.len());
        async {}
    })
    .await;
    let map: HashMap<String, bool> = (0..SUBJECTS)
        .map(|i| (format!("user-{i}"), i % 2 == 0))
        .collect();
    let keys: Vec<String> = (0..SUBJECTS).map(|i| format!("user-{i}")).collect();
    let mut j = 0;
    let map_ns = measure(cell, || {
        j = (j + 1) % SUBJECTS;
        black_box(map.get(&keys[j]));
        async {}
    })
    .await;
    vec![
        ("keel FlagClient::evaluate (cached)", ns),
        ("HashMap<String, bool>::get", map_ns),
    ]
}

fn main() -> ExitCode {
    let cell = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let scratch = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-breaker-flags");
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        eprintln!("error: cannot create {}: {e}", scratch.display());
        return ExitCode::from(2);
    }
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CALLERS)
        .enable_all()
        .build()
        .expect("runtime");
    let result: Result<(), String> = multi.block_on(async {
        let redis_bin = support::servers::find_on_path("redis-server")
            .ok_or("redis-server is not on PATH (the shared-on-Redis row needs it)")?;
        let server = support::servers::start_redis_like(&redis_bin, "everysec", &scratch).await?;
        let redis: Arc<dyn Backend> = Arc::new(
            keel_adapters::redis::RedisBackend::connect(&server.url)
                .await
                .map_err(|e| format!("connecting to the harness's Redis: {e}"))?,
        );
        println!(
            "## Circuit breaker overhead while closed (ns per call; {} s per cell)\n",
            cell.as_secs_f64()
        );
        println!("| breaker | 1 caller | {CALLERS} callers |");
        println!("|---|---:|---:|");
        // The single-caller column runs on the multi-thread runtime's block_on thread with
        // nothing else scheduled.
        for (name, one, many) in breakers(cell, redis).await {
            println!("| {name} | {one:.1} | {many:.1} |");
        }
        println!("\n## Flag evaluation (1 caller)\n");
        println!("| lookup | ns per evaluation | evaluations/s |");
        println!("|---|---:|---:|");
        for (name, ns) in flags(cell).await {
            println!("| {name} | {ns:.1} | {:.0} |", 1e9 / ns);
        }
        drop(server);
        Ok(())
    });
    support::servers::kill_all();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
