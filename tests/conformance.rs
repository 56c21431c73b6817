//! The conformance suite on every backend (and on the memory backend behind the `Observed`
//! wrapper, column `observed`). One test per backend, so the runner's output is a
//! backend-by-backend list; each also writes its per-case table to
//! `target/conformance/<backend>.txt`, which the test script prints as a matrix.
//!
//! `KEEL_CONFORMANCE_CASES=dedup_,otp_` limits every backend to the cases whose names start
//! with one of the prefixes (to repeat an area's concurrency cases many times).
//!
//! Server backends read their URL from `KEEL_TEST_REDIS_URL`, `KEEL_TEST_VALKEY_URL`,
//! `KEEL_TEST_POSTGRES_URL`, `KEEL_TEST_REDIS_CLUSTER_URL`, `KEEL_TEST_VALKEY_CLUSTER_URL` (the
//! test script sets them). A server backend whose URL is unset
//! fails under `CI=true` and, elsewhere, fails with a message saying how to start it: nothing is
//! skipped silently.

use std::sync::Arc;

use keel_primitives::{Backend, Embedded, conformance};

async fn check(backend: Arc<dyn Backend>, label: &str) {
    // `KEEL_CONFORMANCE_CASES=dedup_,otp_` runs only the cases starting with one of the given
    // prefixes (to repeat one area many times); unset or empty runs the whole suite.
    let only: Vec<String> = std::env::var("KEEL_CONFORMANCE_CASES")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let mut report = conformance::run_matching(backend, |name| {
        only.is_empty() || only.iter().any(|p| name.starts_with(p.as_str()))
    })
    .await;
    // The column's label, not the backend's own name: a cluster backend calls itself "redis"
    // or "valkey", and CI checks each column by its label.
    report.backend = label.to_owned();
    let table = report.render();
    println!("{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/conformance");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{label}.txt")), &table).unwrap();
    assert!(report.passed(), "conformance failed on {label}:\n{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_memory() {
    check(Arc::new(Embedded::memory()), "memory").await;
}

/// The memory backend behind the `Observed` wrapper that `keel::connect` puts around every
/// backend: the wrapper must pass the contract unchanged (native steps included).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_memory_observed() {
    let backend = keel_primitives::Observed::new(Arc::new(Embedded::memory()));
    check(Arc::new(backend), "observed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_embedded() {
    let dir = tempfile::tempdir().unwrap();
    check(Arc::new(Embedded::open(dir.path()).unwrap()), "embedded").await;
}

/// The URL of a server backend from the environment. Unset is a failure with instructions,
/// never a skip.
#[allow(dead_code)]
fn server_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set, so this backend's conformance cannot run. Run `scripts/test`, \
             which starts Redis, Valkey and Postgres on this machine and sets it, or set it \
             yourself to a server you started."
        ),
    }
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_redis() {
    let url = server_url("KEEL_TEST_REDIS_URL");
    let backend = keel_adapters::redis::RedisBackend::connect(&url)
        .await
        .unwrap();
    check(Arc::new(backend), "redis").await;
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_valkey() {
    let url = server_url("KEEL_TEST_VALKEY_URL");
    let backend = keel_adapters::valkey::ValkeyBackend::connect(&url)
        .await
        .unwrap();
    check(Arc::new(backend), "valkey").await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_redis_cluster() {
    let url = server_url("KEEL_TEST_REDIS_CLUSTER_URL");
    let backend = keel_adapters::redis::RedisBackend::connect(&url)
        .await
        .unwrap();
    assert!(backend.is_cluster());
    check(Arc::new(backend), "redis-cluster").await;
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_valkey_cluster() {
    let url = server_url("KEEL_TEST_VALKEY_CLUSTER_URL");
    let backend = keel_adapters::valkey::ValkeyBackend::connect(&url)
        .await
        .unwrap();
    check(Arc::new(backend), "valkey-cluster").await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_postgres() {
    let url = server_url("KEEL_TEST_POSTGRES_URL");
    let backend = keel_adapters::postgres::PostgresBackend::connect(&url)
        .await
        .unwrap();
    backend.ensure_schema().await.unwrap();
    check(Arc::new(backend), "postgres").await;
}

#[cfg(feature = "sled")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_sled() {
    let dir = tempfile::tempdir().unwrap();
    let backend = keel_adapters::sled::SledBackend::open(dir.path()).unwrap();
    check(Arc::new(backend), "sled").await;
}

#[cfg(feature = "redb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_redb() {
    let dir = tempfile::tempdir().unwrap();
    let backend = keel_adapters::redb::RedbBackend::open(dir.path().join("keel.redb")).unwrap();
    check(Arc::new(backend), "redb").await;
}

/// Under CI every backend must be compiled in: a build without an adapter's feature would
/// silently drop that backend's conformance run.
#[test]
fn every_backend_is_compiled_in_under_ci() {
    let missing: Vec<&str> = [
        ("redis", cfg!(feature = "redis")),
        ("valkey", cfg!(feature = "valkey")),
        ("postgres", cfg!(feature = "postgres")),
        ("sled", cfg!(feature = "sled")),
        ("redb", cfg!(feature = "redb")),
    ]
    .into_iter()
    .filter(|(_, on)| !on)
    .map(|(name, _)| name)
    .collect();
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert!(
            missing.is_empty(),
            "built without backends {missing:?}: run with --all-features"
        );
    } else if !missing.is_empty() {
        eprintln!("note: backends not compiled in (use --all-features): {missing:?}");
    }
}
