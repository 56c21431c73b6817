//! `keel::migrate` between real backends: the embedded engine and each of Redis, Valkey and
//! Postgres in both directions (and the two clusters, sled, redb and memory-only), with TTLs
//! checked on the destination, a key expiring during the copy, an interrupted run resumed to
//! convergence, the verify pass, and every conflict rule.
//!
//! Server backends read their URL from `KEEL_TEST_REDIS_URL`, `KEEL_TEST_VALKEY_URL`,
//! `KEEL_TEST_POSTGRES_URL`, `KEEL_TEST_REDIS_CLUSTER_URL` and `KEEL_TEST_VALKEY_CLUSTER_URL`
//! (`scripts/test` sets them); an unset one fails its tests with instructions, never skips
//! them. Every test works under its own key prefix (test name, process id, a clock reading),
//! so tests run concurrently against shared servers, and deletes it at the end.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use keel::migrate::{
    self, Difference, MARKER_TAG, Merge, MigrateError, MigrateOptions, MigrateReport, VerifyOptions,
};
use keel::primitives::backend::{ScanCursor, ScanPage, Ttl, TtlPolicy};
use keel::{Backend, Result};

/// Keys each pair test copies: several scan pages at the batch size the tests use.
const KEYS: usize = 240;
/// The batch size of the tests: small, so a run spans several batches.
const BATCH: usize = 50;
/// Where the interrupted run stops.
const STOP_AFTER: u64 = 70;
/// The TTL of the keys that expire: far beyond any test's run time.
const LONG_TTL: Duration = Duration::from_secs(3600);
/// How far a copied key's remaining TTL may be from the source's, read at nearly the same
/// moment. The destination starts a TTL when the write reaches it, so its deadline can be
/// later by the write's time in flight (queued behind the batch in a pool or pipeline, on a
/// machine with a load average of 20 in the tests' 20-run loop: up to 305 ms seen); never by
/// the length of the copy, which the expiry test makes over a second longer than this.
const TTL_SLACK: Duration = Duration::from_millis(800);
/// The TTL of the key that expires during the copy; every read is held until it has passed,
/// so a copy that kept TTLs relative to the read would be this much late.
const DOOMED_TTL: Duration = Duration::from_secs(3);
const _: () = assert!(DOOMED_TTL.as_millis() >= 2 * TTL_SLACK.as_millis() + 1000);
/// The generous bound on waiting for a key to expire at the source.
const EXPIRY_WAIT_MAX: Duration = Duration::from_secs(20);

/// The URL of a server backend from the environment. Unset is a failure with instructions,
/// never a skip.
#[allow(dead_code)]
fn server_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set, so this migration test cannot run. Run `scripts/test`, which \
             starts Redis, Valkey and Postgres on this machine and sets it, or set it yourself \
             to a server you started."
        ),
    }
}

/// A prefix no other test (or run) uses.
fn unique_prefix(test: &str) -> Vec<u8> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("migtest:{test}:{}:{nanos}:", std::process::id()).into_bytes()
}

/// One end of a migration: a backend, and what keeps it alive (a temporary directory).
struct End {
    backend: Arc<dyn Backend>,
    _dir: Option<tempfile::TempDir>,
}

impl End {
    async fn embedded() -> End {
        let dir = tempfile::tempdir().expect("temp dir");
        let backend = keel::connect(&format!("keel://{}", dir.path().join("store").display()))
            .await
            .expect("opening the embedded store");
        End {
            backend,
            _dir: Some(dir),
        }
    }

    async fn url(url: &str) -> End {
        End {
            backend: keel::connect(url)
                .await
                .unwrap_or_else(|e| panic!("connecting to {url}: {e}")),
            _dir: None,
        }
    }

    #[allow(dead_code)] // used by the sled and redb pairs
    async fn file_url(scheme: &str) -> End {
        let dir = tempfile::tempdir().expect("temp dir");
        let backend = keel::connect(&format!("{scheme}:{}", dir.path().join("db").display()))
            .await
            .unwrap_or_else(|e| panic!("opening {scheme}: {e}"));
        End {
            backend,
            _dir: Some(dir),
        }
    }
}

#[allow(dead_code)]
async fn redis() -> End {
    End::url(&server_url("KEEL_TEST_REDIS_URL")).await
}
#[allow(dead_code)]
async fn valkey() -> End {
    End::url(&server_url("KEEL_TEST_VALKEY_URL")).await
}
#[allow(dead_code)]
async fn postgres() -> End {
    End::url(&server_url("KEEL_TEST_POSTGRES_URL")).await
}

fn key(prefix: &[u8], name: &str) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

/// Writes the pair tests' data under `prefix`: `KEYS` keys, every other one with a TTL of
/// `LONG_TTL` plus its index in seconds, plus a binary key and an empty value.
async fn seed(backend: &dyn Backend, prefix: &[u8]) {
    for i in 0..KEYS {
        let ttl = (i % 2 == 0).then(|| LONG_TTL + Duration::from_secs(i as u64));
        backend
            .set(
                &key(prefix, &format!("k{i:04}")),
                format!("value {i}").as_bytes(),
                ttl,
            )
            .await
            .expect("seeding the source");
    }
    let mut binary = prefix.to_vec();
    binary.extend_from_slice(b"\x00\xff bin");
    backend
        .set(&binary, b"\xff\x00\x80", Some(LONG_TTL))
        .await
        .expect("seeding a binary key");
    backend
        .set(&key(prefix, "empty"), b"", None)
        .await
        .expect("seeding an empty value");
}

/// Every live key under `prefix`, each once, sorted.
async fn keys_under(backend: &dyn Backend, prefix: &[u8]) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = backend
            .scan(prefix, cursor.as_ref(), 1000)
            .await
            .expect("scan");
        keys.extend(page.keys);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Deletes the test's keys (and its resume marker) from a backend that outlives the test.
async fn clean(backend: &dyn Backend, prefix: &[u8]) {
    backend.delete_prefix(prefix).await.expect("cleaning up");
    backend
        .delete(&migrate::marker_key(prefix))
        .await
        .expect("cleaning up the marker");
}

fn options(prefix: &[u8], source_label: &str) -> MigrateOptions {
    MigrateOptions {
        prefix: prefix.to_vec(),
        batch_keys: BATCH,
        source_label: source_label.to_owned(),
        ..MigrateOptions::default()
    }
}

fn handled(report: &MigrateReport) -> u64 {
    report.copied + report.skipped + report.expired
}

/// Checks that every key under `prefix` has the same value at both ends and the same
/// remaining TTL within `TTL_SLACK` (read at both ends at nearly the same moment).
async fn assert_same_data(source: &dyn Backend, destination: &dyn Backend, prefix: &[u8]) {
    let keys = keys_under(source, prefix).await;
    assert_eq!(keys.len(), KEYS + 2, "the source holds the seeded keys");
    assert_eq!(keys_under(destination, prefix).await, keys, "same keys");
    for key in &keys {
        let (src, dst) =
            futures_util::join!(source.get_with_ttl(key), destination.get_with_ttl(key));
        let (src_value, src_ttl) = src.expect("source read").expect("source key");
        let (dst_value, dst_ttl) = dst.expect("destination read").expect("destination key");
        assert_eq!(dst_value, src_value, "value of {}", migrate::show(key));
        match (src_ttl, dst_ttl) {
            (None, None) => {}
            (Some(s), Some(d)) => {
                let gap = s.abs_diff(d);
                assert!(
                    gap <= TTL_SLACK,
                    "TTL of {}: source {s:?}, destination {d:?}",
                    migrate::show(key)
                );
                // Never longer than the TTL the key was written with at the source.
                assert!(d <= LONG_TTL + Duration::from_secs(KEYS as u64));
            }
            other => panic!("expiry of {} differs: {other:?}", migrate::show(key)),
        }
    }
}

/// The pair scenario: an interrupted run, the same run again (resumed to convergence), the
/// data compared key by key with TTLs, and the verify pass clean.
async fn interrupted_run_resumes_and_verifies(source: &End, destination: &End, test: &str) {
    let prefix = unique_prefix(test);
    let (src, dst) = (&*source.backend, &*destination.backend);
    seed(src, &prefix).await;
    let label = format!("{}:{test}", src.name());

    let stopped = migrate::migrate(
        src,
        dst,
        &MigrateOptions {
            stop_after_keys: Some(STOP_AFTER),
            ..options(&prefix, &label)
        },
        |_| {},
    )
    .await
    .expect("the first run");
    assert!(stopped.stopped, "{stopped:?}");
    assert_eq!(handled(&stopped), STOP_AFTER);
    let partial = keys_under(dst, &prefix).await.len();
    assert!(
        (1..KEYS + 2).contains(&partial),
        "a part was copied: {partial}"
    );
    assert!(
        dst.get(&migrate::marker_key(&prefix))
            .await
            .expect("marker read")
            .is_some(),
        "the interrupted run left its resume marker"
    );

    let mut batches = 0;
    let resumed = migrate::migrate(src, dst, &options(&prefix, &label), |_| batches += 1)
        .await
        .expect("the same run again resumes");
    assert!(resumed.resumed && !resumed.stopped, "{resumed:?}");
    assert_eq!(resumed.copied, (KEYS + 2) as u64, "{resumed:?}");
    assert_eq!(resumed.expired, 0);
    assert!(
        batches >= (KEYS / BATCH),
        "progress after every batch: {batches}"
    );
    assert!(
        dst.get(&migrate::marker_key(&prefix))
            .await
            .expect("marker read")
            .is_none(),
        "a completed run removes its marker"
    );
    assert_same_data(src, dst, &prefix).await;

    let verified = migrate::verify(
        src,
        dst,
        &VerifyOptions {
            prefix: prefix.clone(),
            batch_keys: BATCH,
            ..VerifyOptions::default()
        },
    )
    .await
    .expect("verify");
    assert!(verified.is_clean(), "{verified:?}");
    assert_eq!(verified.source_keys, (KEYS + 2) as u64);
    assert_eq!(verified.destination_keys, (KEYS + 2) as u64);

    // A run that completed leaves no marker, so running it again is refused.
    let again = migrate::migrate(src, dst, &options(&prefix, &label), |_| {}).await;
    assert!(
        matches!(again, Err(MigrateError::DestinationNotEmpty { .. })),
        "{again:?}"
    );
    clean(src, &prefix).await;
    clean(dst, &prefix).await;
}

/// A source that holds every read's answer until `doomed` has expired at the source: every
/// key is read well over a second before it is written.
struct HoldReads {
    inner: Arc<dyn Backend>,
    doomed: Vec<u8>,
}

impl HoldReads {
    async fn until_doomed_expired(&self) -> Result<()> {
        let started = Instant::now();
        while self.inner.ttl(&self.doomed).await? != Ttl::Missing {
            assert!(
                started.elapsed() < EXPIRY_WAIT_MAX,
                "the doomed key did not expire in {EXPIRY_WAIT_MAX:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for HoldReads {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        let read = self.inner.get_with_ttl(key).await?;
        self.until_doomed_expired().await?;
        Ok(read)
    }
    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        self.inner.set(key, value, ttl).await
    }
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        self.inner.set_nx(key, value, ttl).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.inner.compare_and_swap(key, expected, new, ttl).await
    }
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        self.inner.compare_and_delete(key, expected).await
    }
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &[u8], delta: i64, ttl: Option<Duration>) -> Result<i64> {
        self.inner.incr(key, delta, ttl).await
    }
    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        self.inner.expire(key, ttl).await
    }
    async fn persist(&self, key: &[u8]) -> Result<bool> {
        self.inner.persist(key).await
    }
    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        self.inner.ttl(key).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        self.inner.scan(prefix, cursor, limit).await
    }
    async fn now_ms(&self) -> Result<u64> {
        self.inner.now_ms().await
    }
}

/// A key read with 3 s left and written after its deadline is not written (not resurrected),
/// and the TTL of a key read long before its write is the source's, not extended by the
/// wait: expiry is kept as an absolute time.
async fn expiring_key_is_not_resurrected(source: &End, destination: &End, test: &str) {
    let prefix = unique_prefix(test);
    let (src, dst) = (&source.backend, &*destination.backend);
    let doomed = key(&prefix, "doomed");
    let long = key(&prefix, "long");
    let forever = key(&prefix, "forever");
    src.set(&doomed, b"d", Some(DOOMED_TTL)).await.expect("set");
    src.set(&long, b"l", Some(LONG_TTL)).await.expect("set");
    src.set(&forever, b"f", None).await.expect("set");
    let held: Arc<dyn Backend> = Arc::new(HoldReads {
        inner: Arc::clone(src),
        doomed: doomed.clone(),
    });

    let report = migrate::migrate(&*held, dst, &options(&prefix, "held"), |_| {})
        .await
        .expect("migrate");
    // The scan may or may not list the doomed key, depending on when it expired; either way
    // it is not copied.
    assert_eq!(report.copied, 2, "{report:?}");
    assert!(report.expired <= 1, "{report:?}");
    assert_eq!(
        dst.get(&doomed).await.expect("get"),
        None,
        "not resurrected"
    );
    assert_eq!(dst.get(&forever).await.expect("get"), Some(b"f".to_vec()));
    assert_eq!(dst.ttl(&forever).await.expect("ttl"), Ttl::NoExpiry);
    let (src_ttl, dst_ttl) = futures_util::join!(src.ttl(&long), dst.ttl(&long));
    let (Ttl::Remaining(s), Ttl::Remaining(d)) = (src_ttl.expect("ttl"), dst_ttl.expect("ttl"))
    else {
        panic!("both ends must have a TTL on {}", migrate::show(&long));
    };
    // Read about 3 s before it was written: a TTL copied as "remaining at read time" would be
    // about 3 s longer at the destination.
    assert!(
        d <= s + TTL_SLACK,
        "the destination's TTL ({d:?}) outlives the source's ({s:?})"
    );
    assert!(s <= d + TTL_SLACK, "source {s:?}, destination {d:?}");
    clean(&**src, &prefix).await;
    clean(dst, &prefix).await;
}

async fn pair(source: End, destination: End, test: &str) {
    interrupted_run_resumes_and_verifies(&source, &destination, test).await;
    expiring_key_is_not_resurrected(&source, &destination, &format!("{test}-expiry")).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_redis() {
    pair(End::embedded().await, redis().await, "embedded_to_redis").await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_to_embedded() {
    pair(redis().await, End::embedded().await, "redis_to_embedded").await;
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_valkey() {
    pair(End::embedded().await, valkey().await, "embedded_to_valkey").await;
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_to_embedded() {
    pair(valkey().await, End::embedded().await, "valkey_to_embedded").await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_postgres() {
    pair(
        End::embedded().await,
        postgres().await,
        "embedded_to_postgres",
    )
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_to_embedded() {
    pair(
        postgres().await,
        End::embedded().await,
        "postgres_to_embedded",
    )
    .await;
}

#[cfg(all(feature = "redis", feature = "postgres"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_to_postgres() {
    pair(redis().await, postgres().await, "redis_to_postgres").await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_redis_cluster() {
    pair(
        End::embedded().await,
        End::url(&server_url("KEEL_TEST_REDIS_CLUSTER_URL")).await,
        "embedded_to_redis_cluster",
    )
    .await;
}

#[cfg(feature = "valkey")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_cluster_to_embedded() {
    pair(
        End::url(&server_url("KEEL_TEST_VALKEY_CLUSTER_URL")).await,
        End::embedded().await,
        "valkey_cluster_to_embedded",
    )
    .await;
}

#[cfg(feature = "sled")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_sled() {
    pair(
        End::embedded().await,
        End::file_url("sled").await,
        "embedded_to_sled",
    )
    .await;
}

#[cfg(feature = "redb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_to_embedded() {
    pair(
        End::file_url("redb").await,
        End::embedded().await,
        "redb_to_embedded",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_to_embedded() {
    pair(
        End::url("memory://").await,
        End::embedded().await,
        "memory_to_embedded",
    )
    .await;
}

/// The destination for the conflict-rule tests: Redis when compiled in (a network backend's
/// `set_nx` and reads), else the embedded engine.
async fn rules_destination() -> End {
    #[cfg(feature = "redis")]
    return redis().await;
    #[cfg(not(feature = "redis"))]
    return End::embedded().await;
}

/// Source keys a, b, c under `prefix`; the destination already has b (same value) and c
/// (another value, no TTL).
async fn conflicting(test: &str) -> (End, End, Vec<u8>) {
    let prefix = unique_prefix(test);
    let source = End::embedded().await;
    let destination = rules_destination().await;
    for (name, value) in [("a", "1"), ("b", "2"), ("c", "3")] {
        source
            .backend
            .set(&key(&prefix, name), value.as_bytes(), Some(LONG_TTL))
            .await
            .expect("set");
    }
    let dst = &destination.backend;
    dst.set(&key(&prefix, "b"), b"2", Some(LONG_TTL))
        .await
        .expect("set");
    dst.set(&key(&prefix, "c"), b"theirs", None)
        .await
        .expect("set");
    (source, destination, prefix)
}

async fn value(end: &End, prefix: &[u8], name: &str) -> Option<Vec<u8>> {
    end.backend.get(&key(prefix, name)).await.expect("get")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_empty_destination_is_refused_and_nothing_is_written() {
    let (source, destination, prefix) = conflicting("refuse").await;
    let result = migrate::migrate(
        &*source.backend,
        &*destination.backend,
        &options(&prefix, "src"),
        |_| {},
    )
    .await;
    match result {
        Err(MigrateError::DestinationNotEmpty { example, .. }) => {
            assert!(example.starts_with(&prefix), "{}", migrate::show(&example));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(value(&destination, &prefix, "a").await, None);
    assert_eq!(
        destination
            .backend
            .get(&migrate::marker_key(&prefix))
            .await
            .expect("get"),
        None,
        "a refused run writes no marker"
    );
    // A key outside the prefix does not make the destination non-empty for it.
    let other = unique_prefix("refuse-other");
    let empty_here = migrate::migrate(
        &*source.backend,
        &*destination.backend,
        &options(&other, "src"),
        |_| {},
    )
    .await
    .expect("nothing under another prefix");
    assert_eq!(empty_here.copied, 0);
    clean(&*destination.backend, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_skip_keeps_the_destination_value() {
    let (source, destination, prefix) = conflicting("skip").await;
    let report = migrate::migrate(
        &*source.backend,
        &*destination.backend,
        &MigrateOptions {
            merge: Merge::Skip,
            ..options(&prefix, "src")
        },
        |_| {},
    )
    .await
    .expect("migrate");
    assert_eq!((report.copied, report.skipped), (1, 2), "{report:?}");
    assert_eq!(value(&destination, &prefix, "a").await, Some(b"1".to_vec()));
    assert_eq!(
        value(&destination, &prefix, "c").await,
        Some(b"theirs".to_vec())
    );
    assert_eq!(
        destination
            .backend
            .ttl(&key(&prefix, "c"))
            .await
            .expect("ttl"),
        Ttl::NoExpiry,
        "the destination's TTL is kept too"
    );
    clean(&*destination.backend, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_overwrite_replaces_value_and_ttl() {
    let (source, destination, prefix) = conflicting("overwrite").await;
    let report = migrate::migrate(
        &*source.backend,
        &*destination.backend,
        &MigrateOptions {
            merge: Merge::Overwrite,
            ..options(&prefix, "src")
        },
        |_| {},
    )
    .await
    .expect("migrate");
    assert_eq!((report.copied, report.skipped), (3, 0), "{report:?}");
    assert_eq!(value(&destination, &prefix, "c").await, Some(b"3".to_vec()));
    assert!(matches!(
        destination
            .backend
            .ttl(&key(&prefix, "c"))
            .await
            .expect("ttl"),
        Ttl::Remaining(_)
    ));
    let verified = migrate::verify(
        &*source.backend,
        &*destination.backend,
        &VerifyOptions {
            prefix: prefix.clone(),
            ..VerifyOptions::default()
        },
    )
    .await
    .expect("verify");
    assert!(verified.is_clean(), "{verified:?}");
    clean(&*destination.backend, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_fail_names_the_conflicting_key_and_accepts_identical_values() {
    let (source, destination, prefix) = conflicting("fail").await;
    let result = migrate::migrate(
        &*source.backend,
        &*destination.backend,
        &MigrateOptions {
            merge: Merge::Fail,
            ..options(&prefix, "src")
        },
        |_| {},
    )
    .await;
    match result {
        // b holds the same value on both sides: not a conflict. c differs.
        Err(MigrateError::Conflict { key: conflict }) => {
            assert_eq!(conflict, key(&prefix, "c"));
            let message = MigrateError::Conflict { key: conflict }.to_string();
            assert!(message.contains(":c\""), "{message}");
        }
        other => panic!("expected a conflict on c, got {other:?}"),
    }
    assert_eq!(
        value(&destination, &prefix, "c").await,
        Some(b"theirs".to_vec()),
        "the conflicting key is left alone"
    );
    clean(&*destination.backend, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_counts_and_writes_nothing() {
    let (source, destination, prefix) = conflicting("dry").await;
    for (merge, copied, skipped) in [(Merge::Skip, 1, 2), (Merge::Overwrite, 3, 0)] {
        let report = migrate::migrate(
            &*source.backend,
            &*destination.backend,
            &MigrateOptions {
                merge,
                dry_run: true,
                ..options(&prefix, "src")
            },
            |_| {},
        )
        .await
        .expect("dry run");
        assert!(report.dry_run);
        assert_eq!(
            (report.copied, report.skipped),
            (copied, skipped),
            "{merge}"
        );
    }
    let refused = migrate::migrate(
        &*source.backend,
        &*destination.backend,
        &MigrateOptions {
            dry_run: true,
            ..options(&prefix, "src")
        },
        |_| {},
    )
    .await;
    assert!(matches!(
        refused,
        Err(MigrateError::DestinationNotEmpty { .. })
    ));
    assert_eq!(value(&destination, &prefix, "a").await, None);
    assert_eq!(
        value(&destination, &prefix, "c").await,
        Some(b"theirs".to_vec())
    );
    assert_eq!(
        destination
            .backend
            .get(&migrate::marker_key(&prefix))
            .await
            .expect("get"),
        None,
        "a dry run writes no marker"
    );
    clean(&*destination.backend, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_another_source_is_refused() {
    let prefix = unique_prefix("other-source");
    let (first, second, destination) = (
        End::embedded().await,
        End::embedded().await,
        rules_destination().await,
    );
    first
        .backend
        .set(&key(&prefix, "a"), b"1", None)
        .await
        .expect("set");
    first
        .backend
        .set(&key(&prefix, "b"), b"2", None)
        .await
        .expect("set");
    let stopped = migrate::migrate(
        &*first.backend,
        &*destination.backend,
        &MigrateOptions {
            stop_after_keys: Some(1),
            ..options(&prefix, "first")
        },
        |_| {},
    )
    .await
    .expect("first run");
    assert!(stopped.stopped);
    let other = migrate::migrate(
        &*second.backend,
        &*destination.backend,
        &options(&prefix, "second"),
        |_| {},
    )
    .await;
    match other {
        Err(MigrateError::UnfinishedMigration { source }) => assert_eq!(source, "first"),
        other => panic!("expected UnfinishedMigration, got {other:?}"),
    }
    clean(&*destination.backend, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_every_kind_of_difference() {
    let prefix = unique_prefix("verify");
    let source = End::embedded().await;
    let destination = rules_destination().await;
    let (src, dst) = (&*source.backend, &*destination.backend);
    let k = |name| key(&prefix, name);
    src.set(&k("same"), b"v", None).await.expect("set");
    dst.set(&k("same"), b"v", None).await.expect("set");
    src.set(&k("missing"), b"v", None).await.expect("set");
    dst.set(&k("extra"), b"v", None).await.expect("set");
    src.set(&k("value"), b"one", None).await.expect("set");
    dst.set(&k("value"), b"two", None).await.expect("set");
    src.set(&k("ttl"), b"v", Some(LONG_TTL)).await.expect("set");
    dst.set(&k("ttl"), b"v", Some(LONG_TTL / 2))
        .await
        .expect("set");
    // A marker is never compared.
    dst.set(&migrate::marker_key(&prefix), b"{}", None)
        .await
        .expect("set");
    let report = migrate::verify(
        src,
        dst,
        &VerifyOptions {
            prefix: prefix.clone(),
            ..VerifyOptions::default()
        },
    )
    .await
    .expect("verify");
    assert!(!report.is_clean());
    assert_eq!((report.source_keys, report.destination_keys), (4, 4));
    assert_eq!(report.differences, 4, "{report:?}");
    let mut kinds: Vec<&str> = report
        .examples
        .iter()
        .map(|d| match d {
            Difference::MissingInDestination(key) => {
                assert_eq!(key, &k("missing"));
                "missing"
            }
            Difference::OnlyInDestination(key) => {
                assert_eq!(key, &k("extra"));
                "extra"
            }
            Difference::Value { key, .. } => {
                assert_eq!(key, &k("value"));
                "value"
            }
            Difference::Ttl { key, .. } => {
                assert_eq!(key, &k("ttl"));
                "ttl"
            }
        })
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["extra", "missing", "ttl", "value"]);
    clean(dst, &prefix).await;
    assert!(MARKER_TAG.starts_with(b"\xff"));
}

/// How long [`SlowWrites`] holds each write before it reaches the destination.
const WRITE_DELAY: Duration = Duration::from_secs(2);

/// A destination whose writes wait [`WRITE_DELAY`] before they reach the store, as writes
/// queued behind a batch on a busy server do: the store starts each TTL that much late.
struct SlowWrites {
    inner: Arc<dyn Backend>,
}

#[async_trait]
impl Backend for SlowWrites {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(key).await
    }
    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        self.inner.get_with_ttl(key).await
    }
    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        tokio::time::sleep(WRITE_DELAY).await;
        self.inner.set(key, value, ttl).await
    }
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        tokio::time::sleep(WRITE_DELAY).await;
        self.inner.set_nx(key, value, ttl).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.inner.compare_and_swap(key, expected, new, ttl).await
    }
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        self.inner.compare_and_delete(key, expected).await
    }
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &[u8], delta: i64, ttl: Option<Duration>) -> Result<i64> {
        self.inner.incr(key, delta, ttl).await
    }
    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        self.inner.expire(key, ttl).await
    }
    async fn persist(&self, key: &[u8]) -> Result<bool> {
        self.inner.persist(key).await
    }
    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        self.inner.ttl(key).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        self.inner.scan(prefix, cursor, limit).await
    }
    async fn now_ms(&self) -> Result<u64> {
        self.inner.now_ms().await
    }
}

/// A write that reaches the destination late does not leave its TTL late: the slow write is
/// followed by an `expire` with the time then left (without it, the destination's TTL would
/// be about `WRITE_DELAY` longer than the source's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_write_does_not_lengthen_the_ttl() {
    let prefix = unique_prefix("slow_write");
    let source = End::embedded().await;
    let destination = End::embedded().await;
    let src = &source.backend;
    let long = key(&prefix, "long");
    let forever = key(&prefix, "forever");
    src.set(&long, b"l", Some(LONG_TTL)).await.expect("set");
    src.set(&forever, b"f", None).await.expect("set");
    let slow: Arc<dyn Backend> = Arc::new(SlowWrites {
        inner: Arc::clone(&destination.backend),
    });
    let report = migrate::migrate(&**src, &*slow, &options(&prefix, "slow"), |_| {})
        .await
        .expect("migrate");
    assert_eq!(report.copied, 2, "{report:?}");
    let dst = &destination.backend;
    assert_eq!(dst.ttl(&forever).await.expect("ttl"), Ttl::NoExpiry);
    let (Ttl::Remaining(s), Ttl::Remaining(d)) = (
        src.ttl(&long).await.expect("ttl"),
        dst.ttl(&long).await.expect("ttl"),
    ) else {
        panic!("both ends must have a TTL");
    };
    assert!(
        d <= s + TTL_SLACK,
        "the destination's TTL ({d:?}) outlives the source's ({s:?}) by the write's delay"
    );
    assert!(s <= d + TTL_SLACK, "source {s:?}, destination {d:?}");
}
