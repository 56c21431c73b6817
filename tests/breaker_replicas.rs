//! Four breaker replicas, each with its own connection to one real Redis or Postgres (separate
//! `RedisBackend` / `PostgresBackend` handles, as four processes would have): a trip on one is
//! seen by all, and half-open admits exactly N probes across the four under concurrency,
//! repeated over several rounds.
//!
//! Server URLs come from `KEEL_TEST_REDIS_URL` and `KEEL_TEST_POSTGRES_URL` (the test script
//! sets them); an unset URL is a failure with instructions, never a skip.

#![cfg(all(feature = "redis", feature = "postgres"))]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_engine::ManualClock;
use keel_primitives::Backend;
use keel_primitives::breaker::{Breaker, Policy, State};

const REPLICAS: usize = 4;
const CALLERS_PER_REPLICA: usize = 8;
const PROBES: u32 = 2;
const ROUNDS: usize = 5;
const OPEN: Duration = Duration::from_secs(10);

fn server_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set, so the four-replica breaker test cannot run. Run `scripts/test`, \
             which starts the servers and sets it, or set it to a server you started."
        ),
    }
}

async fn exactly_n_probes_across_replicas<F, Fut>(connect: F)
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
        let clock = ManualClock::new(1_000_000);
        let name = format!("replicas-test-{nonce:x}-{round}");
        let replicas: Vec<Breaker> = handles
            .iter()
            .map(|b| {
                Breaker::builder(name.clone())
                    .shared(Arc::clone(b))
                    .clock(Arc::new(clock.clone()))
                    .open_duration(OPEN)
                    .jitter(0.0)
                    .probes(PROBES)
                    .policy(Policy::ConsecutiveFailures(1))
                    .build()
                    .unwrap()
            })
            .collect();
        replicas[round % REPLICAS]
            .acquire()
            .await
            .unwrap()
            .failure()
            .await;
        for r in &replicas {
            r.refresh().await;
            assert_eq!(
                r.state(),
                State::Open,
                "round {round}: every replica sees the trip"
            );
        }
        clock.advance(OPEN);
        let total = REPLICAS * CALLERS_PER_REPLICA;
        let start = Arc::new(tokio::sync::Barrier::new(total));
        let asked = Arc::new(tokio::sync::Barrier::new(total));
        let mut tasks = Vec::new();
        for r in &replicas {
            for _ in 0..CALLERS_PER_REPLICA {
                let (r, start, asked) = (r.clone(), Arc::clone(&start), Arc::clone(&asked));
                tasks.push(tokio::spawn(async move {
                    start.wait().await;
                    let permit = r.acquire().await;
                    asked.wait().await;
                    match permit {
                        Ok(p) => {
                            assert!(p.is_probe());
                            p.success().await;
                            1
                        }
                        Err(_) => 0,
                    }
                }));
            }
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap();
        }
        assert_eq!(
            admitted, PROBES,
            "round {round}: exactly N probes across the fleet"
        );
        for r in &replicas {
            r.refresh().await;
            assert_eq!(r.state(), State::Closed, "round {round}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_redis_connections_share_one_breaker() {
    let url = server_url("KEEL_TEST_REDIS_URL");
    exactly_n_probes_across_replicas(|| {
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
async fn four_postgres_connections_share_one_breaker() {
    let url = server_url("KEEL_TEST_POSTGRES_URL");
    exactly_n_probes_across_replicas(|| {
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
