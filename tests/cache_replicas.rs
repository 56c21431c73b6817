//! Four value-cache replicas, each with its own connection to one real Redis, Valkey or
//! Postgres (separate backend handles, as four processes would have): 100 concurrent callers
//! of one missing key, spread over the four, run its computation exactly once, over several
//! rounds.
//!
//! Server URLs come from `KEEL_TEST_REDIS_URL`, `KEEL_TEST_VALKEY_URL` and
//! `KEEL_TEST_POSTGRES_URL` (the test script sets them); an unset URL is a failure with
//! instructions, never a skip.

#![cfg(all(feature = "redis", feature = "valkey", feature = "postgres"))]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_primitives::Backend;
use keel_primitives::cache::Cache;

const REPLICAS: usize = 4;
const CALLERS_PER_REPLICA: usize = 25;
const ROUNDS: usize = 5;

fn server_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set, so the four-replica cache test cannot run. Run `scripts/test`, \
             which starts the servers and sets it, or set it to a server you started."
        ),
    }
}

/// Waits (bounded) until `cond` holds: a condition other tasks reach on their own.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn one_computation_across_replicas<F, Fut>(connect: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Backend>>,
{
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut handles = Vec::new();
    for _ in 0..REPLICAS {
        handles.push(connect().await);
    }
    for round in 0..ROUNDS {
        let ns = format!("replicas-test-{nonce:x}-{round}");
        let replicas: Vec<Cache> = handles
            .iter()
            .map(|b| Cache::new(Arc::clone(b), ns.clone()))
            .collect();
        let runs = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let total = REPLICAS * CALLERS_PER_REPLICA;
        let start = Arc::new(tokio::sync::Barrier::new(total));
        let mut tasks = Vec::new();
        for r in &replicas {
            for _ in 0..CALLERS_PER_REPLICA {
                let (r, start, runs, release) = (
                    r.clone(),
                    Arc::clone(&start),
                    Arc::clone(&runs),
                    Arc::clone(&release),
                );
                tasks.push(tokio::spawn(async move {
                    start.wait().await;
                    r.get_or_compute("hot", Duration::from_secs(60), || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _permit = release.acquire().await.map_err(|_| "closed")?;
                        Ok::<_, &'static str>(format!("value {round}"))
                    })
                    .await
                    .unwrap()
                }));
            }
        }
        until("the computation started", || {
            runs.load(Ordering::SeqCst) >= 1
        })
        .await;
        until("the other replicas wait on its lease", || {
            replicas
                .iter()
                .filter(|r| r.stats().lease_waits >= 1)
                .count()
                == REPLICAS - 1
        })
        .await;
        release.add_permits(1);
        for t in tasks {
            assert_eq!(t.await.unwrap(), format!("value {round}"));
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "round {round}: {total} callers on {REPLICAS} replicas, one computation"
        );
        replicas[0].clear().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_redis_connections_compute_once() {
    let url = server_url("KEEL_TEST_REDIS_URL");
    one_computation_across_replicas(|| {
        let url = url.clone();
        async move {
            let b = keel_adapters::redis::RedisBackend::connect(&url)
                .await
                .unwrap();
            Arc::new(b) as Arc<dyn Backend>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_valkey_connections_compute_once() {
    let url = server_url("KEEL_TEST_VALKEY_URL");
    one_computation_across_replicas(|| {
        let url = url.clone();
        async move {
            let b = keel_adapters::valkey::ValkeyBackend::connect(&url)
                .await
                .unwrap();
            Arc::new(b) as Arc<dyn Backend>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_postgres_connections_compute_once() {
    let url = server_url("KEEL_TEST_POSTGRES_URL");
    one_computation_across_replicas(|| {
        let url = url.clone();
        async move {
            let b = keel_adapters::postgres::PostgresBackend::connect(&url)
                .await
                .unwrap();
            b.ensure_schema().await.unwrap();
            Arc::new(b) as Arc<dyn Backend>
        }
    })
    .await;
}
