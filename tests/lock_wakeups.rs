//! Lock waiters are woken by a release in *another process*: two separate handles to one real
//! server (as two processes would have; each has its own connections and its own notice id),
//! one holding, one waiting with a polling interval far longer than the test allows. Also after
//! the notice connection is killed on the server: the subscription comes back and the waiter is
//! still woken.
//!
//! Server URLs come from `KEEL_TEST_REDIS_URL`, `KEEL_TEST_VALKEY_URL`,
//! `KEEL_TEST_POSTGRES_URL` and the two cluster URLs (the test script sets them); an unset URL
//! is a failure with instructions, never a skip.

#![cfg(all(feature = "redis", feature = "valkey", feature = "postgres"))]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_primitives::Backend;
use keel_primitives::lock::{Lock, LockError, LockOptions, parked_waiters};

/// The waiter's polling interval: far longer than a woken waiter may take.
const POLL: Duration = Duration::from_secs(60);
/// How long a woken waiter may take (its next poll is at least `POLL / 2` away).
const WOKEN_WITHIN: Duration = Duration::from_secs(10);
const ROUNDS: usize = 3;

fn server_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set, so the cross-process lock wake-up test cannot run. Run \
             `scripts/test`, which starts the servers and sets it, or set it to a server you \
             started."
        ),
    }
}

fn nonce() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What can break the notice connection of `backend`'s server between rounds.
type Cut = fn(Arc<dyn Backend>, String) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// `ROUNDS` hand-offs from a holder on one handle to a waiter on another; before each odd
/// round, `cut` (if any) kills the notice connections on the server.
async fn a_release_elsewhere_wakes_the_waiter(url: &str, cut: Option<(Cut, String)>) {
    let holder_backend = keel::connect(url).await.unwrap();
    let waiter_backend = keel::connect(url).await.unwrap();
    let holder = Lock::new(Arc::clone(&holder_backend));
    let waiter = Lock::with_options(
        Arc::clone(&waiter_backend),
        LockOptions::default()
            .wait(Duration::from_secs(120))
            .retry_backoff(POLL, POLL),
    );
    let name = format!("wake-elsewhere-{:x}", nonce());
    for round in 0..ROUNDS {
        let held = holder
            .try_acquire(&name, Duration::from_secs(60))
            .await
            .unwrap()
            .expect("free");
        let task = {
            let waiter = waiter.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let lease = waiter.acquire(&name, Duration::from_secs(60)).await?;
                let woken_at = Instant::now();
                let token = lease.fencing_token();
                lease.release().await?;
                Ok::<_, LockError>((woken_at, token))
            })
        };
        until("the waiter to park", || {
            parked_waiters(&waiter_backend, name.as_bytes()) == 1
        })
        .await;
        if round % 2 == 1
            && let Some((cut, db)) = &cut
        {
            cut(Arc::clone(&holder_backend), db.clone()).await;
        }
        let released_at = Instant::now();
        let first = held.fencing_token();
        assert!(held.release().await.unwrap());
        let (woken_at, token) = tokio::time::timeout(POLL / 3, task)
            .await
            .unwrap_or_else(|_| {
                panic!("round {round} on {url}: the waiter was not woken (it would poll later)")
            })
            .unwrap()
            .unwrap();
        assert!(token > first, "round {round}");
        assert!(
            woken_at.duration_since(released_at) < WOKEN_WITHIN,
            "round {round} on {url}: woken only after {:?}",
            woken_at.duration_since(released_at)
        );
    }
}

/// Kills every pub/sub connection on a Redis or Valkey server (`CLIENT KILL TYPE pubsub`).
fn kill_pubsub(
    _: Arc<dyn Backend>,
    url: String,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let url = url
            .split('?')
            .next()
            .unwrap()
            .replacen("valkey://", "redis://", 1);
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(killed >= 1, "the waiter's subscription was live");
    })
}

/// Terminates the Postgres sessions that are listening for release notices.
fn kill_listeners(
    _: Arc<dyn Backend>,
    url: String,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let rows = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE query LIKE 'LISTEN keel_released_%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        assert!(!rows.is_empty(), "the waiter's LISTEN session was live");
    })
}

#[tokio::test]
async fn redis_release_wakes_a_waiter_in_another_process() {
    let url = server_url("KEEL_TEST_REDIS_URL");
    a_release_elsewhere_wakes_the_waiter(&url, Some((kill_pubsub as Cut, url.clone()))).await;
}

#[tokio::test]
async fn valkey_release_wakes_a_waiter_in_another_process() {
    let url = server_url("KEEL_TEST_VALKEY_URL");
    a_release_elsewhere_wakes_the_waiter(&url, Some((kill_pubsub as Cut, url.clone()))).await;
}

#[tokio::test]
async fn postgres_release_wakes_a_waiter_in_another_process() {
    let url = server_url("KEEL_TEST_POSTGRES_URL");
    a_release_elsewhere_wakes_the_waiter(&url, Some((kill_listeners as Cut, url.clone()))).await;
}

#[tokio::test]
async fn redis_cluster_release_wakes_a_waiter_in_another_process() {
    let url = server_url("KEEL_TEST_REDIS_CLUSTER_URL");
    a_release_elsewhere_wakes_the_waiter(&url, None).await;
}

#[tokio::test]
async fn valkey_cluster_release_wakes_a_waiter_in_another_process() {
    let url = server_url("KEEL_TEST_VALKEY_CLUSTER_URL");
    a_release_elsewhere_wakes_the_waiter(&url, None).await;
}
