//! The conformance suite on every backend. One test per backend, so the runner's output is a
//! backend-by-backend list; each also writes its per-case table to
//! `target/conformance/<backend>.txt`, which the test script prints as a matrix.
//!
//! Server backends read their URL from `KEEL_TEST_REDIS_URL`, `KEEL_TEST_VALKEY_URL`,
//! `KEEL_TEST_POSTGRES_URL` (the test script sets them). A server backend whose URL is unset
//! fails under `CI=true` and, elsewhere, fails with a message saying how to start it: nothing is
//! skipped silently.

use std::sync::Arc;

use keel_primitives::{Backend, Embedded, conformance};

async fn check(backend: Arc<dyn Backend>, label: &str) {
    let report = conformance::run(backend).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_embedded() {
    let dir = tempfile::tempdir().unwrap();
    check(Arc::new(Embedded::open(dir.path()).unwrap()), "embedded").await;
}
