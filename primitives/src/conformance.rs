//! The backend conformance suite: written once, as plain async functions taking a backend, and
//! run on every backend keel ships (memory, embedded, Redis, Valkey, Postgres, sled, redb). A
//! backend that does not pass it is not done.
//!
//! Each case works under its own unique key prefix, so the suite can run against a shared
//! server without interfering with other data. Cases sleep only to let a real TTL elapse (a
//! server's clock cannot be driven by a manual clock); those TTLs are short.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() {
//! use std::sync::Arc;
//!
//! let backend = Arc::new(keel_primitives::Embedded::memory());
//! let report = keel_primitives::conformance::run(backend).await;
//! println!("{}", report.render());
//! assert!(report.passed());
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::{
    Backend, KEY_BYTES_MAX, ScanCursor, TTL_MAX, Ttl, TtlPolicy, VALUE_BYTES_MAX,
};
use crate::error::ErrorKind;
use crate::namespace::Namespaced;

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One conformance case.
pub struct Case {
    /// Its name, as printed in the matrix.
    pub name: &'static str,
    run: fn(Ctx) -> CaseFuture,
}

/// What a case gets: the backend and a key prefix no other case (or run) uses.
#[derive(Clone)]
pub struct Ctx {
    /// The backend under test.
    pub b: Arc<dyn Backend>,
    prefix: Vec<u8>,
}

impl Ctx {
    /// `prefix + name`.
    pub fn k(&self, name: impl AsRef<[u8]>) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(name.as_ref());
        k
    }
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case's name.
    pub name: &'static str,
    /// `None` on success, else what failed.
    pub failure: Option<String>,
    /// Time taken.
    pub elapsed: Duration,
}

/// The outcome of the suite on one backend.
#[derive(Debug, Clone)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// One result per case, in suite order.
    pub results: Vec<CaseResult>,
}

impl Report {
    /// True if every case passed.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.failure.is_none())
    }

    /// A human-readable table, one line per case, then a `N passed, N failed` line.
    pub fn render(&self) -> String {
        let mut out = format!("conformance on {}\n", self.backend);
        for r in &self.results {
            match &r.failure {
                None => out.push_str(&format!(
                    "  ok    {:<44} {:>6} ms\n",
                    r.name,
                    r.elapsed.as_millis()
                )),
                Some(why) => out.push_str(&format!("  FAIL  {:<44} {why}\n", r.name)),
            }
        }
        let failed = self.results.iter().filter(|r| r.failure.is_some()).count();
        out.push_str(&format!(
            "{}: {} passed, {} failed\n",
            self.backend,
            self.results.len() - failed,
            failed
        ));
        out
    }
}

macro_rules! case {
    ($name:ident) => {
        Case {
            name: stringify!($name),
            run: |ctx| Box::pin($name(ctx)),
        }
    };
}

/// Every case, in the order they run.
pub fn cases() -> Vec<Case> {
    vec![
        case!(get_missing_is_none),
        case!(binary_keys_and_values_round_trip),
        case!(empty_value_is_a_value),
        case!(set_replaces_value_and_ttl),
        case!(set_nx_only_when_absent),
        case!(zero_ttl_is_an_error_everywhere),
        case!(ttl_over_maximum_is_an_error),
        case!(oversize_key_and_value_are_refused),
        case!(ttl_reports_missing_no_expiry_and_remaining),
        case!(expired_key_is_invisible_to_every_operation),
        case!(compare_and_swap_semantics),
        case!(compare_and_swap_ttl_policies),
        case!(compare_and_delete_semantics),
        case!(delete_reports_whether_it_deleted),
        case!(incr_counts_from_zero_and_stores_decimal),
        case!(incr_stamps_ttl_only_on_create),
        case!(incr_rejects_non_integers_leaving_value),
        case!(incr_overflow_is_an_error_leaving_value),
        case!(incr_durable_behaves_like_incr),
        case!(expire_and_persist_semantics),
        case!(scan_returns_prefix_keys_across_pages),
        case!(scan_prefix_with_glob_characters),
        case!(scan_skips_expired_keys),
        case!(delete_prefix_removes_only_the_prefix),
        case!(now_is_close_to_wall_clock_and_monotonic),
        case!(namespaces_are_isolated),
        case!(concurrent_incr_sums_exactly),
        case!(concurrent_set_nx_has_one_winner),
        case!(concurrent_cas_has_one_winner_per_round),
        case!(scan_is_complete_under_concurrent_inserts),
        case!(lock_mutual_exclusion_under_contention),
        case!(lock_expiry_lets_the_next_holder_in),
        case!(lock_stale_holder_cannot_release_or_extend),
        case!(lock_fencing_tokens_increase_across_holders_and_expiry),
        case!(lock_fence_check_rejects_a_late_write),
        case!(lock_auto_renew_keeps_the_lease_and_reports_loss),
        case!(lock_with_lock_releases_on_success_error_and_cancel),
        case!(lock_acquire_waits_with_a_bound),
        case!(ratelimit_admits_exactly_the_quota_under_concurrency),
        case!(ratelimit_buckets_admit_the_burst_then_the_steady_rate),
        case!(ratelimit_cost_above_one_and_over_capacity),
        case!(ratelimit_denied_requests_do_not_consume),
        case!(ratelimit_peek_does_not_consume),
        case!(ratelimit_fixed_window_doubles_at_the_boundary_the_others_do_not),
        case!(ratelimit_stacked_denial_consumes_from_no_policy),
        case!(ratelimit_per_key_quotas),
        case!(ratelimit_trusted_clock_agrees_across_skewed_nodes),
        case!(ratelimit_state_keys_carry_ttls_and_vanish_when_idle),
        case!(ratelimit_decisions_carry_what_http_headers_need),
    ]
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Runs every case on `backend` (each under a fresh prefix, with a 120 s limit) and reports.
pub async fn run(backend: Arc<dyn Backend>) -> Report {
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let run_id = RUN.fetch_add(1, Ordering::Relaxed);
    let mut results = Vec::new();
    for case in cases() {
        let ctx = Ctx {
            b: Arc::clone(&backend),
            prefix: format!("keel-conformance:{nonce:x}:{run_id}:{}:", case.name).into_bytes(),
        };
        let started = Instant::now();
        let task = tokio::spawn((case.run)(ctx));
        let failure = match tokio::time::timeout(Duration::from_secs(120), task).await {
            Ok(Ok(())) => None,
            Ok(Err(join)) => Some(panic_message(join)),
            Err(_) => Some("timed out after 120 s".to_owned()),
        };
        results.push(CaseResult {
            name: case.name,
            failure,
            elapsed: started.elapsed(),
        });
    }
    Report {
        backend: backend.name().to_owned(),
        results,
    }
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => {
            if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_owned()
            } else {
                "panicked".to_owned()
            }
        }
        Err(e) => format!("task failed: {e}"),
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Lets a short TTL elapse on a real server's clock.
async fn let_expire(ttl: Duration) {
    tokio::time::sleep(ttl + ms(150)).await;
}

fn kind<T: std::fmt::Debug>(r: crate::Result<T>) -> ErrorKind {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.kind(),
    }
}

async fn get_missing_is_none(c: Ctx) {
    assert_eq!(c.b.get(&c.k("nope")).await.unwrap(), None);
    assert_eq!(c.b.get_with_ttl(&c.k("nope")).await.unwrap(), None);
}

async fn binary_keys_and_values_round_trip(c: Ctx) {
    let key = c.k(b"\x00\xff\xfe bin\x00key\xc3\x28");
    let value = b"\x00\x01\xff\xfe\x80 not utf-8 \xc3\x28\x00".to_vec();
    c.b.set(&key, &value, None).await.unwrap();
    assert_eq!(c.b.get(&key).await.unwrap(), Some(value.clone()));
    let all: Vec<u8> = (0..=255u8).collect();
    c.b.set(&c.k("all-bytes"), &all, None).await.unwrap();
    assert_eq!(c.b.get(&c.k("all-bytes")).await.unwrap(), Some(all));
    assert!(c.b.compare_and_delete(&key, &value).await.unwrap());
    assert_eq!(c.b.get(&key).await.unwrap(), None);
}

async fn empty_value_is_a_value(c: Ctx) {
    let key = c.k("empty");
    c.b.set(&key, b"", None).await.unwrap();
    assert_eq!(c.b.get(&key).await.unwrap(), Some(Vec::new()));
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::NoExpiry);
    assert!(!c.b.set_nx(&key, b"x", None).await.unwrap());
    assert!(
        c.b.compare_and_swap(&key, Some(b""), b"now", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"now".to_vec()));
    // The shortest key under this case's prefix is the prefix itself.
    c.b.set(&c.k(""), b"v", None).await.unwrap();
    assert_eq!(c.b.get(&c.k("")).await.unwrap(), Some(b"v".to_vec()));
}

async fn set_replaces_value_and_ttl(c: Ctx) {
    let key = c.k("k");
    c.b.set(&key, b"one", Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(matches!(c.b.ttl(&key).await.unwrap(), Ttl::Remaining(_)));
    c.b.set(&key, b"two", None).await.unwrap();
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"two".to_vec()));
    assert_eq!(
        c.b.ttl(&key).await.unwrap(),
        Ttl::NoExpiry,
        "set without a TTL clears the TTL"
    );
}

async fn set_nx_only_when_absent(c: Ctx) {
    let key = c.k("k");
    assert!(c.b.set_nx(&key, b"first", None).await.unwrap());
    assert!(!c.b.set_nx(&key, b"second", None).await.unwrap());
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"first".to_vec()));
    let short = c.k("short");
    assert!(c.b.set_nx(&short, b"a", Some(ms(100))).await.unwrap());
    let_expire(ms(100)).await;
    assert!(
        c.b.set_nx(&short, b"b", None).await.unwrap(),
        "set_nx succeeds on an expired key"
    );
    assert_eq!(c.b.get(&short).await.unwrap(), Some(b"b".to_vec()));
    assert_eq!(c.b.ttl(&short).await.unwrap(), Ttl::NoExpiry);
}

async fn zero_ttl_is_an_error_everywhere(c: Ctx) {
    let key = c.k("k");
    let z = Duration::ZERO;
    assert_eq!(
        kind(c.b.set(&key, b"v", Some(z)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(c.b.set_nx(&key, b"v", Some(z)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(c.b.incr(&key, 1, Some(z)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(
            c.b.compare_and_swap(&key, None, b"v", TtlPolicy::Set(z))
                .await
        ),
        ErrorKind::InvalidInput
    );
    assert_eq!(c.b.get(&key).await.unwrap(), None, "nothing was written");
    c.b.set(&key, b"v", None).await.unwrap();
    assert_eq!(kind(c.b.expire(&key, z).await), ErrorKind::InvalidInput);
    assert_eq!(
        c.b.get(&key).await.unwrap(),
        Some(b"v".to_vec()),
        "a zero TTL never deletes"
    );
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::NoExpiry);
    // Sub-millisecond TTLs round up to 1 ms rather than being refused.
    c.b.set(&c.k("tiny"), b"v", Some(Duration::from_micros(10)))
        .await
        .unwrap();
}

async fn ttl_over_maximum_is_an_error(c: Ctx) {
    let key = c.k("k");
    let huge = TTL_MAX + ms(1);
    assert_eq!(
        kind(c.b.set(&key, b"v", Some(huge)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(c.b.incr(&key, 1, Some(huge)).await),
        ErrorKind::InvalidInput
    );
    assert_eq!(c.b.get(&key).await.unwrap(), None);
    c.b.set(&key, b"v", Some(TTL_MAX)).await.unwrap();
    assert!(matches!(c.b.ttl(&key).await.unwrap(), Ttl::Remaining(_)));
}

async fn oversize_key_and_value_are_refused(c: Ctx) {
    let big_key = vec![b'k'; KEY_BYTES_MAX + 1];
    assert_eq!(kind(c.b.set(&big_key, b"v", None).await), ErrorKind::Limit);
    assert_eq!(kind(c.b.incr(&big_key, 1, None).await), ErrorKind::Limit);
    assert_eq!(
        kind(c.b.set_nx(&big_key, b"v", None).await),
        ErrorKind::Limit
    );
    let key = c.k("k");
    let big_value = vec![0u8; VALUE_BYTES_MAX + 1];
    assert_eq!(
        kind(c.b.set(&key, &big_value, None).await),
        ErrorKind::Limit
    );
    assert_eq!(
        kind(
            c.b.compare_and_swap(&key, None, &big_value, TtlPolicy::Keep)
                .await
        ),
        ErrorKind::Limit
    );
    assert_eq!(c.b.get(&key).await.unwrap(), None, "nothing was written");
    // Exactly at the limits is fine.
    let max_key = {
        let mut k = c.k("");
        k.resize(KEY_BYTES_MAX, b'x');
        k
    };
    c.b.set(&max_key, b"v", None).await.unwrap();
    assert_eq!(c.b.get(&max_key).await.unwrap(), Some(b"v".to_vec()));
}

async fn ttl_reports_missing_no_expiry_and_remaining(c: Ctx) {
    assert_eq!(c.b.ttl(&c.k("missing")).await.unwrap(), Ttl::Missing);
    c.b.set(&c.k("forever"), b"v", None).await.unwrap();
    assert_eq!(c.b.ttl(&c.k("forever")).await.unwrap(), Ttl::NoExpiry);
    c.b.set(&c.k("soon"), b"v", Some(Duration::from_secs(30)))
        .await
        .unwrap();
    match c.b.ttl(&c.k("soon")).await.unwrap() {
        Ttl::Remaining(d) => assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        ),
        other => panic!("expected Remaining, got {other:?}"),
    }
    let (v, ttl) = c.b.get_with_ttl(&c.k("soon")).await.unwrap().unwrap();
    assert_eq!(v, b"v");
    let ttl = ttl.expect("has a TTL");
    assert!(
        ttl > Duration::from_secs(25) && ttl <= Duration::from_secs(30),
        "{ttl:?}"
    );
    assert_eq!(
        c.b.get_with_ttl(&c.k("forever")).await.unwrap(),
        Some((b"v".to_vec(), None))
    );
}

async fn expired_key_is_invisible_to_every_operation(c: Ctx) {
    let key = c.k("k");
    c.b.set(&key, b"old", Some(ms(100))).await.unwrap();
    let_expire(ms(100)).await;
    assert_eq!(c.b.get(&key).await.unwrap(), None);
    assert_eq!(c.b.get_with_ttl(&key).await.unwrap(), None);
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::Missing);
    assert!(!c.b.delete(&key).await.unwrap());
    assert!(!c.b.compare_and_delete(&key, b"old").await.unwrap());
    assert!(!c.b.expire(&key, Duration::from_secs(10)).await.unwrap());
    assert!(!c.b.persist(&key).await.unwrap());
    assert!(
        !c.b.compare_and_swap(&key, Some(b"old"), b"x", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    let page = c.b.scan(&c.k(""), None, 100).await.unwrap();
    assert!(page.keys.is_empty(), "scan returned an expired key");
    assert!(
        c.b.compare_and_swap(&key, None, b"new", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(
        c.b.ttl(&key).await.unwrap(),
        Ttl::NoExpiry,
        "an expired key's TTL is not kept"
    );
    c.b.set(&c.k("n"), b"41", Some(ms(100))).await.unwrap();
    let_expire(ms(100)).await;
    assert_eq!(
        c.b.incr(&c.k("n"), 1, None).await.unwrap(),
        1,
        "incr on an expired key starts at 0"
    );
    assert_eq!(c.b.ttl(&c.k("n")).await.unwrap(), Ttl::NoExpiry);
}

async fn compare_and_swap_semantics(c: Ctx) {
    let key = c.k("k");
    assert!(
        !c.b.compare_and_swap(&key, Some(b"x"), b"y", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(c.b.get(&key).await.unwrap(), None);
    assert!(
        c.b.compare_and_swap(&key, None, b"a", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        !c.b.compare_and_swap(&key, None, b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        !c.b.compare_and_swap(&key, Some(b"A"), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        !c.b.compare_and_swap(&key, Some(b"a\0"), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        !c.b.compare_and_swap(&key, Some(b""), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert!(
        c.b.compare_and_swap(&key, Some(b"a"), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"b".to_vec()));
}

async fn compare_and_swap_ttl_policies(c: Ctx) {
    let key = c.k("k");
    c.b.set(&key, b"a", Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        c.b.compare_and_swap(&key, Some(b"a"), b"b", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    match c.b.ttl(&key).await.unwrap() {
        Ttl::Remaining(d) => assert!(d > Duration::from_secs(50), "Keep kept {d:?}"),
        other => panic!("Keep lost the TTL: {other:?}"),
    }
    assert!(
        c.b.compare_and_swap(
            &key,
            Some(b"b"),
            b"c",
            TtlPolicy::Set(Duration::from_secs(1000))
        )
        .await
        .unwrap()
    );
    match c.b.ttl(&key).await.unwrap() {
        Ttl::Remaining(d) => assert!(d > Duration::from_secs(900), "Set gave {d:?}"),
        other => panic!("Set lost the TTL: {other:?}"),
    }
    assert!(
        c.b.compare_and_swap(&key, Some(b"c"), b"d", TtlPolicy::Clear)
            .await
            .unwrap()
    );
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::NoExpiry);
    let fresh = c.k("fresh");
    assert!(
        c.b.compare_and_swap(&fresh, None, b"v", TtlPolicy::Set(Duration::from_secs(30)))
            .await
            .unwrap()
    );
    assert!(matches!(c.b.ttl(&fresh).await.unwrap(), Ttl::Remaining(_)));
    let fresh2 = c.k("fresh2");
    assert!(
        c.b.compare_and_swap(&fresh2, None, b"v", TtlPolicy::Keep)
            .await
            .unwrap()
    );
    assert_eq!(c.b.ttl(&fresh2).await.unwrap(), Ttl::NoExpiry);
    // A failed swap leaves value and TTL alone.
    assert!(
        !c.b.compare_and_swap(&fresh, Some(b"zz"), b"w", TtlPolicy::Clear)
            .await
            .unwrap()
    );
    assert!(matches!(c.b.ttl(&fresh).await.unwrap(), Ttl::Remaining(_)));
}

async fn compare_and_delete_semantics(c: Ctx) {
    let key = c.k("k");
    assert!(!c.b.compare_and_delete(&key, b"v").await.unwrap());
    c.b.set(&key, b"v", None).await.unwrap();
    assert!(!c.b.compare_and_delete(&key, b"V").await.unwrap());
    assert!(!c.b.compare_and_delete(&key, b"").await.unwrap());
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"v".to_vec()));
    assert!(c.b.compare_and_delete(&key, b"v").await.unwrap());
    assert_eq!(c.b.get(&key).await.unwrap(), None);
}

async fn delete_reports_whether_it_deleted(c: Ctx) {
    let key = c.k("k");
    assert!(!c.b.delete(&key).await.unwrap());
    c.b.set(&key, b"v", None).await.unwrap();
    assert!(c.b.delete(&key).await.unwrap());
    assert!(!c.b.delete(&key).await.unwrap());
}

async fn incr_counts_from_zero_and_stores_decimal(c: Ctx) {
    let key = c.k("n");
    assert_eq!(c.b.incr(&key, 5, None).await.unwrap(), 5);
    assert_eq!(c.b.incr(&key, -7, None).await.unwrap(), -2);
    assert_eq!(c.b.get(&key).await.unwrap(), Some(b"-2".to_vec()));
    assert_eq!(c.b.incr(&key, 0, None).await.unwrap(), -2);
    c.b.set(&key, b"-9223372036854775808", None).await.unwrap();
    assert_eq!(c.b.incr(&key, 0, None).await.unwrap(), i64::MIN);
    c.b.set(&key, b"0", None).await.unwrap();
    assert_eq!(c.b.incr(&key, i64::MAX, None).await.unwrap(), i64::MAX);
}

async fn incr_stamps_ttl_only_on_create(c: Ctx) {
    let key = c.k("n");
    assert_eq!(
        c.b.incr(&key, 1, Some(Duration::from_secs(100)))
            .await
            .unwrap(),
        1
    );
    let Ttl::Remaining(first) = c.b.ttl(&key).await.unwrap() else {
        panic!("no TTL on create")
    };
    assert_eq!(
        c.b.incr(&key, 1, Some(Duration::from_secs(5000)))
            .await
            .unwrap(),
        2
    );
    let Ttl::Remaining(second) = c.b.ttl(&key).await.unwrap() else {
        panic!("TTL lost")
    };
    assert!(
        second <= first,
        "incr changed the TTL of an existing key: {first:?} -> {second:?}"
    );
    let plain = c.k("plain");
    c.b.set(&plain, b"10", None).await.unwrap();
    assert_eq!(
        c.b.incr(&plain, 1, Some(Duration::from_secs(100)))
            .await
            .unwrap(),
        11
    );
    assert_eq!(
        c.b.ttl(&plain).await.unwrap(),
        Ttl::NoExpiry,
        "incr added a TTL to an existing key"
    );
    let short = c.k("short");
    assert_eq!(c.b.incr(&short, 1, Some(ms(100))).await.unwrap(), 1);
    let_expire(ms(100)).await;
    assert_eq!(
        c.b.get(&short).await.unwrap(),
        None,
        "the TTL stamped on create expires the counter"
    );
}

async fn incr_rejects_non_integers_leaving_value(c: Ctx) {
    let key = c.k("n");
    for bad in [
        &b"abc"[..],
        b"+1",
        b"01",
        b" 1",
        b"1 ",
        b"-0",
        b"1.5",
        b"",
        b"1e3",
        b"9223372036854775808",
        b"\x001",
        b"\xff",
    ] {
        c.b.set(&key, bad, Some(Duration::from_secs(60)))
            .await
            .unwrap();
        assert_eq!(
            kind(c.b.incr(&key, 1, None).await),
            ErrorKind::NotAnInteger,
            "{bad:?}"
        );
        assert_eq!(
            c.b.get(&key).await.unwrap(),
            Some(bad.to_vec()),
            "{bad:?} was changed"
        );
        assert!(
            matches!(c.b.ttl(&key).await.unwrap(), Ttl::Remaining(_)),
            "{bad:?} lost its TTL"
        );
    }
}

async fn incr_overflow_is_an_error_leaving_value(c: Ctx) {
    let key = c.k("n");
    c.b.set(&key, i64::MAX.to_string().as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(kind(c.b.incr(&key, 1, None).await), ErrorKind::Overflow);
    assert_eq!(
        c.b.get(&key).await.unwrap(),
        Some(i64::MAX.to_string().into_bytes())
    );
    c.b.set(&key, i64::MIN.to_string().as_bytes(), None)
        .await
        .unwrap();
    assert_eq!(kind(c.b.incr(&key, -1, None).await), ErrorKind::Overflow);
    assert_eq!(
        c.b.get(&key).await.unwrap(),
        Some(i64::MIN.to_string().into_bytes())
    );
    let fresh = c.k("fresh");
    assert_eq!(c.b.incr(&fresh, i64::MIN, None).await.unwrap(), i64::MIN);
    assert_eq!(kind(c.b.incr(&fresh, -1, None).await), ErrorKind::Overflow);
}

async fn incr_durable_behaves_like_incr(c: Ctx) {
    let key = c.k("fence");
    assert_eq!(c.b.incr_durable(&key, 1, None).await.unwrap(), 1);
    assert_eq!(c.b.incr_durable(&key, 1, None).await.unwrap(), 2);
    assert_eq!(c.b.incr(&key, 1, None).await.unwrap(), 3);
    c.b.set(&key, b"x", None).await.unwrap();
    assert_eq!(
        kind(c.b.incr_durable(&key, 1, None).await),
        ErrorKind::NotAnInteger
    );
}

async fn expire_and_persist_semantics(c: Ctx) {
    let key = c.k("k");
    assert!(!c.b.expire(&key, Duration::from_secs(10)).await.unwrap());
    assert!(!c.b.persist(&key).await.unwrap());
    c.b.set(&key, b"v", None).await.unwrap();
    assert!(
        !c.b.persist(&key).await.unwrap(),
        "persist on a key without TTL is false"
    );
    assert!(c.b.expire(&key, Duration::from_secs(10)).await.unwrap());
    assert!(matches!(c.b.ttl(&key).await.unwrap(), Ttl::Remaining(_)));
    assert!(c.b.persist(&key).await.unwrap());
    assert_eq!(c.b.ttl(&key).await.unwrap(), Ttl::NoExpiry);
    assert!(c.b.expire(&key, ms(100)).await.unwrap());
    let_expire(ms(100)).await;
    assert_eq!(c.b.get(&key).await.unwrap(), None, "expire really expires");
}

async fn collect_scan(b: &dyn Backend, prefix: &[u8], limit: usize) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    let mut cursor: Option<ScanCursor> = None;
    for _ in 0..100_000 {
        let page = b.scan(prefix, cursor.as_ref(), limit).await.unwrap();
        keys.extend(page.keys);
        match page.next {
            Some(n) => cursor = Some(n),
            None => return keys,
        }
    }
    panic!("scan did not finish");
}

async fn scan_returns_prefix_keys_across_pages(c: Ctx) {
    for i in 0..250u32 {
        c.b.set(&c.k(format!("a/{i:04}")), b"v", None)
            .await
            .unwrap();
    }
    for i in 0..20u32 {
        c.b.set(&c.k(format!("b/{i:04}")), b"v", None)
            .await
            .unwrap();
    }
    c.b.set(&c.k("a"), b"v", None).await.unwrap(); // shorter than the prefix: not matched
    let mut keys = collect_scan(&*c.b, &c.k("a/"), 37).await;
    keys.sort();
    keys.dedup();
    let expected: Vec<Vec<u8>> = (0..250u32).map(|i| c.k(format!("a/{i:04}"))).collect();
    assert_eq!(keys, expected);
    let mut all = collect_scan(&*c.b, &c.k(""), 1000).await;
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 271);
    assert!(collect_scan(&*c.b, &c.k("zzz"), 10).await.is_empty());
}

async fn scan_prefix_with_glob_characters(c: Ctx) {
    // Redis MATCH treats * ? [ ] \ as pattern syntax: the prefix must be escaped.
    let tricky = c.k(b"we*ird?[x]\\-\x00\xff:");
    c.b.set(&[tricky.clone(), b"1".to_vec()].concat(), b"v", None)
        .await
        .unwrap();
    c.b.set(&[tricky.clone(), b"2".to_vec()].concat(), b"v", None)
        .await
        .unwrap();
    c.b.set(&c.k(b"weXird?[x]\\-\x00\xff:3"), b"v", None)
        .await
        .unwrap();
    c.b.set(&c.k(b"we*irdZ[x]\\-\x00\xff:4"), b"v", None)
        .await
        .unwrap();
    let mut keys = collect_scan(&*c.b, &tricky, 10).await;
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys,
        vec![
            [tricky.clone(), b"1".to_vec()].concat(),
            [tricky, b"2".to_vec()].concat()
        ]
    );
}

async fn scan_skips_expired_keys(c: Ctx) {
    c.b.set(&c.k("live"), b"v", None).await.unwrap();
    c.b.set(&c.k("dead"), b"v", Some(ms(100))).await.unwrap();
    let_expire(ms(100)).await;
    let keys = collect_scan(&*c.b, &c.k(""), 10).await;
    assert_eq!(keys, vec![c.k("live")]);
}

async fn delete_prefix_removes_only_the_prefix(c: Ctx) {
    for i in 0..30 {
        c.b.set(&c.k(format!("cache/{i}")), b"v", None)
            .await
            .unwrap();
    }
    c.b.set(&c.k("cachex"), b"v", None).await.unwrap();
    c.b.set(&c.k("other"), b"v", None).await.unwrap();
    assert_eq!(c.b.delete_prefix(&c.k("cache/")).await.unwrap(), 30);
    assert!(collect_scan(&*c.b, &c.k("cache/"), 100).await.is_empty());
    assert_eq!(c.b.get(&c.k("cachex")).await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(c.b.get(&c.k("other")).await.unwrap(), Some(b"v".to_vec()));
}

async fn now_is_close_to_wall_clock_and_monotonic(c: Ctx) {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let a = c.b.now_ms().await.unwrap();
    let b = c.b.now_ms().await.unwrap();
    assert!(b >= a, "trusted time went backwards: {a} -> {b}");
    assert!(
        a.abs_diff(wall) < 60_000,
        "backend time {a} is far from wall time {wall}"
    );
}

async fn namespaces_are_isolated(c: Ctx) {
    let one = Namespaced::new(Arc::clone(&c.b), c.k("app1:"));
    let two = Namespaced::new(Arc::clone(&c.b), c.k("app2:"));
    one.set(b"k", b"from one", None).await.unwrap();
    two.set(b"k", b"from two", None).await.unwrap();
    assert_eq!(one.get(b"k").await.unwrap(), Some(b"from one".to_vec()));
    assert_eq!(two.get(b"k").await.unwrap(), Some(b"from two".to_vec()));
    assert_eq!(
        c.b.get(&c.k("app1:k")).await.unwrap(),
        Some(b"from one".to_vec())
    );
    let keys = collect_scan(&one, b"", 10).await;
    assert_eq!(
        keys,
        vec![b"k".to_vec()],
        "scan is confined to the namespace, prefix stripped"
    );
    assert_eq!(one.delete_prefix(b"").await.unwrap(), 1);
    assert_eq!(two.get(b"k").await.unwrap(), Some(b"from two".to_vec()));
}

const TASKS: usize = 32;

async fn concurrent_incr_sums_exactly(c: Ctx) {
    let key = c.k("counter");
    let per_task = 1000;
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let (b, key) = (Arc::clone(&c.b), key.clone());
        handles.push(tokio::spawn(async move {
            let mut last = i64::MIN;
            for _ in 0..per_task {
                let n = b
                    .incr(&key, 1, Some(Duration::from_secs(600)))
                    .await
                    .unwrap();
                assert!(n > last, "a task saw its counter go backwards");
                last = n;
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(
        c.b.get(&key).await.unwrap(),
        Some((TASKS * per_task).to_string().into_bytes())
    );
}

async fn concurrent_set_nx_has_one_winner(c: Ctx) {
    for round in 0..20 {
        let key = c.k(format!("race/{round}"));
        let mut handles = Vec::new();
        for task in 0..TASKS {
            let (b, key) = (Arc::clone(&c.b), key.clone());
            handles.push(tokio::spawn(async move {
                b.set_nx(
                    &key,
                    task.to_string().as_bytes(),
                    Some(Duration::from_secs(60)),
                )
                .await
                .unwrap()
            }));
        }
        let mut winners = Vec::new();
        for (task, h) in handles.into_iter().enumerate() {
            if h.await.unwrap() {
                winners.push(task);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let stored = c.b.get(&key).await.unwrap().unwrap();
        assert_eq!(stored, winners[0].to_string().into_bytes());
    }
}

async fn concurrent_cas_has_one_winner_per_round(c: Ctx) {
    let key = c.k("cas");
    c.b.set(&key, b"0", None).await.unwrap();
    for round in 0..20u32 {
        let current = round.to_string().into_bytes();
        let next = (round + 1).to_string().into_bytes();
        let mut handles = Vec::new();
        for _ in 0..TASKS {
            let (b, key, cur, nxt) = (Arc::clone(&c.b), key.clone(), current.clone(), next.clone());
            handles.push(tokio::spawn(async move {
                b.compare_and_swap(&key, Some(&cur), &nxt, TtlPolicy::Keep)
                    .await
                    .unwrap()
            }));
        }
        let mut wins = 0;
        for h in handles {
            wins += usize::from(h.await.unwrap());
        }
        assert_eq!(wins, 1, "round {round}");
        assert_eq!(c.b.get(&key).await.unwrap(), Some(next));
    }
}

async fn scan_is_complete_under_concurrent_inserts(c: Ctx) {
    let stable: Vec<Vec<u8>> = (0..400u32).map(|i| c.k(format!("s/{i:05}"))).collect();
    for k in &stable {
        c.b.set(k, b"v", None).await.unwrap();
    }
    let b = Arc::clone(&c.b);
    let prefix = c.k("s/");
    let writer = tokio::spawn(async move {
        for i in 0..400u32 {
            let mut k = prefix.clone();
            k.extend_from_slice(format!("{:05}-new", i * 7 % 400).as_bytes());
            b.set(&k, b"v", None).await.unwrap();
            if i % 16 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    let mut seen = Vec::new();
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = c.b.scan(&c.k("s/"), cursor.as_ref(), 25).await.unwrap();
        seen.extend(page.keys);
        tokio::task::yield_now().await;
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    writer.await.unwrap();
    seen.sort();
    for k in &stable {
        assert!(
            seen.binary_search(k).is_ok(),
            "scan missed {:?}",
            String::from_utf8_lossy(k)
        );
    }
}

// ----- lock -----------------------------------------------------------------------------------
//
// The lock and rate-limit cases run the primitives on the backend under test, inside the case's
// own prefix (through `Namespaced`), so they check that the contract is enough to build them.

use crate::lock::{Fence, FenceCheck, Lock, LockError, LockOptions, OWNER_TOKEN_BYTES, Renewal};
use crate::ratelimit::{ManualClock, Quota, RateLimitError, RateLimiter, Stacked, Strategy};

/// The backend under test, confined to the case's prefix.
fn confined(c: &Ctx) -> Arc<dyn Backend> {
    Arc::new(Namespaced::new(Arc::clone(&c.b), c.k("")))
}

async fn lock_mutual_exclusion_under_contention(c: Ctx) {
    const LOCK_TASKS: usize = 16;
    const ROUNDS: usize = 8;
    let options = LockOptions::default()
        .wait(Duration::from_secs(60))
        .retry_backoff(ms(1), ms(20));
    let lock = Lock::with_options(confined(&c), options);
    let holders = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for _ in 0..LOCK_TASKS {
        let (lock, holders, tokens) = (lock.clone(), Arc::clone(&holders), Arc::clone(&tokens));
        handles.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let lease = lock
                    .acquire("shared", Duration::from_secs(30))
                    .await
                    .unwrap();
                let before = holders.fetch_add(1, Ordering::SeqCst);
                assert_eq!(before, 0, "two holders inside the critical section at once");
                tokens.lock().unwrap().push(lease.fencing_token());
                tokio::task::yield_now().await;
                holders.fetch_sub(1, Ordering::SeqCst);
                assert!(lease.release().await.unwrap(), "a live lease releases");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let tokens = tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), LOCK_TASKS * ROUNDS);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens must increase in holding order: {tokens:?}"
    );
}

async fn lock_expiry_lets_the_next_holder_in(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::new(Arc::clone(&b));
    let ttl = ms(200);
    let first = lock
        .try_acquire("job", ttl)
        .await
        .unwrap()
        .expect("a free lock");
    assert!(!first.is_lost());
    assert!(first.remaining() <= ttl);
    assert!(
        lock.try_acquire("job", ttl).await.unwrap().is_none(),
        "held until the TTL passes"
    );
    let_expire(ttl).await;
    assert!(first.is_lost(), "the local deadline passed too");
    let second = lock
        .try_acquire("job", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("an expired lock is free");
    assert!(second.fencing_token() > first.fencing_token());
    assert!(second.release().await.unwrap());
}

async fn lock_stale_holder_cannot_release_or_extend(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::new(Arc::clone(&b));
    let stale = lock.try_acquire("job", ms(200)).await.unwrap().unwrap();
    let_expire(ms(200)).await;
    let current = lock
        .try_acquire("job", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    match stale.extend(Duration::from_secs(30)).await {
        Err(LockError::Lost { .. }) => {}
        other => panic!("extending an expired lease must fail with Lost, got {other:?}"),
    }
    assert!(
        !stale.release().await.unwrap(),
        "releasing a lost lease reports false"
    );
    let stored = b
        .get(b"lock:job")
        .await
        .unwrap()
        .expect("the new holder's key survives");
    assert_eq!(stored[..OWNER_TOKEN_BYTES], current.owner_token());
    assert_eq!(
        stored[OWNER_TOKEN_BYTES..],
        current.fencing_token().to_le_bytes()
    );
    match b.ttl(b"lock:job").await.unwrap() {
        Ttl::Remaining(d) => assert!(d > Duration::from_secs(20), "TTL disturbed: {d:?}"),
        other => panic!("the new holder's TTL is gone: {other:?}"),
    }
    current.extend(Duration::from_secs(60)).await.unwrap();
    assert!(current.remaining() > Duration::from_secs(50));
    match b.ttl(b"lock:job").await.unwrap() {
        Ttl::Remaining(d) => assert!(d > Duration::from_secs(50), "extend did not extend: {d:?}"),
        other => panic!("extend lost the TTL: {other:?}"),
    }
    assert!(current.release().await.unwrap());
    assert_eq!(b.get(b"lock:job").await.unwrap(), None);
    // Expired with nobody else holding it: extend still fails, and says so.
    let lapsed = lock.try_acquire("alone", ms(200)).await.unwrap().unwrap();
    let_expire(ms(200)).await;
    assert!(matches!(
        lapsed.extend(Duration::from_secs(30)).await,
        Err(LockError::Lost { .. })
    ));
    assert!(lapsed.is_lost());
    assert!(!lapsed.release().await.unwrap());
}

async fn lock_fencing_tokens_increase_across_holders_and_expiry(c: Ctx) {
    let b = confined(&c);
    // Two "nodes" sharing the backend.
    let nodes = [Lock::new(Arc::clone(&b)), Lock::new(Arc::clone(&b))];
    let mut last = 0;
    for i in 0..6 {
        let lease = nodes[i % 2]
            .try_acquire("fenced", ms(200))
            .await
            .unwrap()
            .expect("free");
        assert!(
            lease.fencing_token() > last,
            "token {} after {last}",
            lease.fencing_token()
        );
        last = lease.fencing_token();
        if i % 3 == 0 {
            let_expire(ms(200)).await; // this holder loses it by expiry
            assert!(!lease.release().await.unwrap());
        } else {
            assert!(lease.release().await.unwrap());
        }
    }
    assert_eq!(
        b.ttl(b"lock-fence:fenced").await.unwrap(),
        Ttl::NoExpiry,
        "the fencing counter must never expire"
    );
    let other = nodes[0]
        .try_acquire("another", ms(200))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        other.fencing_token(),
        1,
        "each lock name has its own sequence"
    );
}

async fn lock_fence_check_rejects_a_late_write(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::new(Arc::clone(&b));
    let fence = Fence::new(Arc::clone(&b));
    let stale = lock
        .try_acquire("ledger-lock", ms(200))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fence
            .check_and_record("ledger", stale.fencing_token())
            .await
            .unwrap(),
        FenceCheck::Accepted
    );
    let_expire(ms(200)).await;
    let current = lock
        .try_acquire("ledger-lock", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert!(
        fence
            .check_and_record("ledger", current.fencing_token())
            .await
            .unwrap()
            .is_accepted()
    );
    // The stalled first holder wakes up and tries to write: refused.
    assert_eq!(
        fence
            .check_and_record("ledger", stale.fencing_token())
            .await
            .unwrap(),
        FenceCheck::Rejected {
            highest: current.fencing_token()
        }
    );
    assert!(
        fence
            .check_and_record("ledger", current.fencing_token())
            .await
            .unwrap()
            .is_accepted(),
        "the current holder may write again"
    );
    assert_eq!(
        fence.highest("ledger").await.unwrap(),
        Some(current.fencing_token())
    );
    assert_eq!(fence.highest("untouched").await.unwrap(), None);
    // Concurrent writers with tokens 1..=16: the record ends at the highest, and a writer is
    // rejected only in favour of a higher token.
    let mut handles = Vec::new();
    for token in 1..=16u64 {
        let fence = fence.clone();
        handles.push(tokio::spawn(async move {
            (token, fence.check_and_record("race", token).await.unwrap())
        }));
    }
    for h in handles {
        let (token, check) = h.await.unwrap();
        if let FenceCheck::Rejected { highest } = check {
            assert!(highest > token, "token {token} rejected by {highest}");
        }
    }
    assert_eq!(fence.highest("race").await.unwrap(), Some(16));
}

async fn lock_auto_renew_keeps_the_lease_and_reports_loss(c: Ctx) {
    let b = confined(&c);
    let renewing = Lock::with_options(
        Arc::clone(&b),
        LockOptions::default().renewal(Renewal::Auto),
    );
    let other = Lock::new(Arc::clone(&b));
    let lease = renewing
        .try_acquire("renewed", ms(300))
        .await
        .unwrap()
        .unwrap();
    // Several TTLs of real time: only the renewals keep it.
    tokio::time::sleep(ms(1000)).await;
    assert!(!lease.is_lost(), "auto-renew let the lease lapse");
    assert!(
        other
            .try_acquire("renewed", ms(300))
            .await
            .unwrap()
            .is_none(),
        "still held"
    );
    // The key disappears behind the holder's back (an operator, a failover) and someone else
    // takes the lock: the next renewal finds out and reports the loss.
    assert!(b.delete(b"lock:renewed").await.unwrap());
    let thief = other
        .try_acquire("renewed", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), lease.lost())
        .await
        .expect("the loss was not reported");
    assert!(lease.is_lost());
    assert!(lease.watch().is_lost());
    assert!(matches!(
        lease.extend(ms(300)).await,
        Err(LockError::Lost { .. })
    ));
    assert!(!lease.release().await.unwrap());
    let stored = b
        .get(b"lock:renewed")
        .await
        .unwrap()
        .expect("the new holder keeps the lock");
    assert_eq!(stored[..OWNER_TOKEN_BYTES], thief.owner_token());
    assert!(thief.release().await.unwrap());
}

async fn lock_with_lock_releases_on_success_error_and_cancel(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::new(Arc::clone(&b));
    let ttl = Duration::from_secs(30);
    let seen = {
        let b = Arc::clone(&b);
        lock.with_lock("scoped", ttl, |lease| async move {
            assert!(!lease.is_lost());
            assert!(
                b.get(b"lock:scoped").await.unwrap().is_some(),
                "held while running"
            );
            lease.fencing_token()
        })
        .await
        .unwrap()
    };
    assert_eq!(seen, 1);
    assert_eq!(
        b.get(b"lock:scoped").await.unwrap(),
        None,
        "released after success"
    );

    let failed: Result<(), &str> = lock
        .with_lock("scoped", ttl, |_| async { Err("boom") })
        .await
        .unwrap();
    assert_eq!(failed, Err("boom"));
    assert_eq!(
        b.get(b"lock:scoped").await.unwrap(),
        None,
        "released after an error"
    );

    // Release on panic is the same release; `lock`'s unit tests cover it without printing a
    // panic into this matrix.

    // Dropped while the body runs: the lease's drop releases it in the background.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let mut running = Box::pin(lock.with_lock("scoped", ttl, move |_| async move {
        let _ = started_tx.send(());
        std::future::pending::<()>().await
    }));
    tokio::select! {
        _ = &mut running => panic!("the body never finishes"),
        started = started_rx => started.unwrap(),
    }
    drop(running);
    let next = lock
        .acquire_within("scoped", ttl, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        next.fencing_token(),
        4,
        "tokens 1-3 went to the three scoped runs"
    );
    assert!(next.release().await.unwrap());
}

async fn lock_acquire_waits_with_a_bound(c: Ctx) {
    let b = confined(&c);
    let lock = Lock::with_options(
        Arc::clone(&b),
        LockOptions::default().retry_backoff(ms(5), ms(50)),
    );
    let ttl = Duration::from_secs(30);
    let held = lock.try_acquire("busy", ttl).await.unwrap().unwrap();
    match lock.acquire_within("busy", ttl, ms(300)).await {
        Err(LockError::Timeout { waited, .. }) => {
            assert!(waited >= ms(300), "gave up early: {waited:?}")
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    let (waiting_tx, waiting_rx) = tokio::sync::oneshot::channel();
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move {
            let _ = waiting_tx.send(());
            let lease = lock
                .acquire_within("busy", ttl, Duration::from_secs(30))
                .await
                .unwrap();
            let token = lease.fencing_token();
            assert!(lease.release().await.unwrap());
            token
        })
    };
    waiting_rx.await.unwrap();
    let held_token = held.fencing_token();
    assert!(held.release().await.unwrap());
    assert!(
        waiter.await.unwrap() > held_token,
        "the waiter got in after the release"
    );
}

// ----- rate limiting --------------------------------------------------------------------------

/// A manual clock's start: a whole hour, so hour windows begin exactly here.
const RL_START_MS: u64 = 1_699_999_200_000;
const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);
const STRATEGIES: [Strategy; 4] = [
    Strategy::FixedWindow,
    Strategy::SlidingWindow,
    Strategy::TokenBucket,
    Strategy::Gcra,
];

const _: () = assert!(RL_START_MS.is_multiple_of(3_600_000));

fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::FixedWindow => "fixed",
        Strategy::SlidingWindow => "sliding",
        Strategy::TokenBucket => "bucket",
        _ => "gcra",
    }
}

fn limiter_on(
    c: &Ctx,
    name: &str,
    strategy: Strategy,
    quota: Quota,
    clock: &ManualClock,
) -> RateLimiter {
    RateLimiter::new(confined(c), name, strategy, quota)
        .unwrap()
        .with_clock(Arc::new(clock.clone()))
}

/// `callers` concurrent tasks each try `per_caller` requests of cost 1; returns how many were
/// admitted.
async fn admitted_concurrently(
    l: &RateLimiter,
    key: &str,
    callers: usize,
    per_caller: usize,
) -> usize {
    let mut handles = Vec::new();
    for _ in 0..callers {
        let (l, key) = (l.clone(), key.to_owned());
        handles.push(tokio::spawn(async move {
            let mut admitted = 0;
            for _ in 0..per_caller {
                admitted += usize::from(l.check(&key, 1).await.unwrap().allowed);
            }
            admitted
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    total
}

async fn ratelimit_admits_exactly_the_quota_under_concurrency(c: Ctx) {
    for strategy in STRATEGIES {
        let name = strategy_name(strategy);
        let clock = ManualClock::new(RL_START_MS);
        let l = limiter_on(&c, name, strategy, Quota::per_hour(20), &clock);
        assert_eq!(
            admitted_concurrently(&l, "k", 32, 3).await,
            20,
            "{name}: first window / burst"
        );
        let peek = l.peek("k").await.unwrap();
        assert!(!peek.allowed && peek.remaining == 0, "{name}: {peek:?}");
        // Half an hour on: the buckets earned 10; the windows are still in the first hour.
        clock.advance(30 * MINUTE);
        let expected = if strategy == Strategy::FixedWindow || strategy == Strategy::SlidingWindow {
            0
        } else {
            10
        };
        assert_eq!(
            admitted_concurrently(&l, "k", 32, 2).await,
            expected,
            "{name}: +30 min"
        );
        // Half way through the second hour: a fresh fixed window; the sliding window still
        // weighs the first hour's 20 by one half; the buckets earned 20 more (a full burst).
        clock.advance(HOUR);
        let expected = match strategy {
            Strategy::FixedWindow => 20,
            Strategy::SlidingWindow => 10,
            _ => 20,
        };
        assert_eq!(
            admitted_concurrently(&l, "k", 32, 2).await,
            expected,
            "{name}: +90 min"
        );
    }
}

async fn ratelimit_buckets_admit_the_burst_then_the_steady_rate(c: Ctx) {
    for strategy in [Strategy::TokenBucket, Strategy::Gcra] {
        let name = strategy_name(strategy);
        let clock = ManualClock::new(RL_START_MS);
        // One per second, five at once.
        let l = limiter_on(
            &c,
            name,
            strategy,
            Quota::per_minute(60).with_burst(5),
            &clock,
        );
        for i in 0..5 {
            let d = l.check("k", 1).await.unwrap();
            assert!(d.allowed, "{name}: burst request {i}");
            assert_eq!(d.remaining, 4 - i, "{name}");
            assert_eq!(d.limit, 5, "{name}: the limit reported is the burst");
        }
        let d = l.check("k", 1).await.unwrap();
        assert!(!d.allowed, "{name}: the burst is spent");
        assert_eq!(d.retry_after, Some(Duration::from_secs(1)), "{name}");
        assert_eq!(d.reset_after, Duration::from_secs(5), "{name}");
        clock.advance(ms(999));
        let d = l.check("k", 1).await.unwrap();
        assert!(!d.allowed, "{name}: 1 ms early");
        assert_eq!(d.retry_after, Some(ms(1)), "{name}");
        clock.advance(ms(1));
        assert!(
            l.check("k", 1).await.unwrap().allowed,
            "{name}: one earned after 1 s"
        );
        assert!(!l.check("k", 1).await.unwrap().allowed, "{name}: only one");
        // Steady rate: one per second.
        for second in 0..10 {
            clock.advance(Duration::from_secs(1));
            assert!(
                l.check("k", 1).await.unwrap().allowed,
                "{name}: second {second}"
            );
            assert!(
                !l.check("k", 1).await.unwrap().allowed,
                "{name}: second {second}, again"
            );
        }
        // A long quiet spell refills only up to the burst.
        clock.advance(HOUR);
        assert_eq!(
            admitted_concurrently(&l, "k", 16, 2).await,
            5,
            "{name}: capped at the burst"
        );
    }
}

async fn ratelimit_cost_above_one_and_over_capacity(c: Ctx) {
    for strategy in STRATEGIES {
        let name = strategy_name(strategy);
        let clock = ManualClock::new(RL_START_MS);
        let l = limiter_on(&c, name, strategy, Quota::per_hour(10), &clock);
        let d = l.check("k", 4).await.unwrap();
        assert!(d.allowed && d.remaining == 6, "{name}: {d:?}");
        let d = l.check("k", 4).await.unwrap();
        assert!(d.allowed && d.remaining == 2, "{name}: {d:?}");
        let d = l.check("k", 3).await.unwrap();
        assert!(
            !d.allowed && d.remaining == 2,
            "{name}: 3 > 2 is denied, consuming nothing: {d:?}"
        );
        let d = l.check("k", 2).await.unwrap();
        assert!(
            d.allowed && d.remaining == 0,
            "{name}: the remaining 2 still fit: {d:?}"
        );
        match l.check("fresh", 11).await {
            Err(RateLimitError::CostOverCapacity {
                cost: 11,
                capacity: 10,
            }) => {}
            other => panic!("{name}: expected CostOverCapacity, got {other:?}"),
        }
        assert_eq!(
            l.peek("fresh").await.unwrap().remaining,
            10,
            "{name}: nothing consumed"
        );
        let d = l.check("fresh", 10).await.unwrap();
        assert!(
            d.allowed && d.remaining == 0,
            "{name}: a cost equal to the capacity fits"
        );
        let d = l.check("other", 0).await.unwrap();
        assert!(
            d.allowed && d.remaining == 10,
            "{name}: cost 0 observes: {d:?}"
        );
    }
    // The buckets' capacity is the burst.
    let clock = ManualClock::new(RL_START_MS);
    for strategy in [Strategy::TokenBucket, Strategy::Gcra] {
        let l = limiter_on(
            &c,
            "burst4",
            strategy,
            Quota::per_hour(10).with_burst(4),
            &clock,
        );
        assert!(matches!(
            l.check("k", 5).await,
            Err(RateLimitError::CostOverCapacity {
                cost: 5,
                capacity: 4
            })
        ));
        assert!(l.check("k", 4).await.unwrap().allowed);
    }
}

async fn ratelimit_denied_requests_do_not_consume(c: Ctx) {
    for strategy in STRATEGIES {
        let name = strategy_name(strategy);
        let clock = ManualClock::new(RL_START_MS);
        let l = limiter_on(&c, name, strategy, Quota::per_hour(5), &clock);
        assert_eq!(admitted_concurrently(&l, "k", 5, 1).await, 5, "{name}");
        assert_eq!(
            admitted_concurrently(&l, "k", 25, 4).await,
            0,
            "{name}: the flood is denied"
        );
        match strategy {
            Strategy::FixedWindow => {
                let counter = format!("rl:{name}:fw:3600000:{}:k", RL_START_MS / 3_600_000);
                let stored = confined(&c).get(counter.as_bytes()).await.unwrap();
                assert_eq!(stored, Some(b"5".to_vec()), "{name}: denials were counted");
                clock.advance(HOUR);
                assert_eq!(l.peek("k").await.unwrap().remaining, 5, "{name}");
            }
            Strategy::SlidingWindow => {
                // 12 minutes into the next hour the first hour weighs 4/5 of 5 = 4: one left,
                // unless the 100 denials had been counted.
                clock.advance(HOUR + 12 * MINUTE);
                assert_eq!(l.peek("k").await.unwrap().remaining, 1, "{name}");
            }
            _ => {
                // One token is earned every 12 minutes, whatever was denied meanwhile.
                clock.advance(12 * MINUTE);
                assert_eq!(l.peek("k").await.unwrap().remaining, 1, "{name}");
            }
        }
        assert!(l.check("k", 1).await.unwrap().allowed, "{name}");
    }
}

async fn ratelimit_peek_does_not_consume(c: Ctx) {
    for strategy in STRATEGIES {
        let name = strategy_name(strategy);
        let clock = ManualClock::new(RL_START_MS);
        let l = limiter_on(&c, name, strategy, Quota::per_hour(3), &clock);
        for _ in 0..10 {
            let d = l.peek("k").await.unwrap();
            assert!(
                d.allowed && d.remaining == 3 && d.retry_after.is_none(),
                "{name}: {d:?}"
            );
        }
        assert_eq!(l.check("k", 1).await.unwrap().remaining, 2, "{name}");
        assert_eq!(l.peek("k").await.unwrap().remaining, 2, "{name}");
        assert!(l.check("k", 2).await.unwrap().allowed, "{name}");
        let d = l.peek("k").await.unwrap();
        assert!(
            !d.allowed && d.remaining == 0 && d.retry_after.is_some(),
            "{name}: {d:?}"
        );
    }
}

async fn ratelimit_fixed_window_doubles_at_the_boundary_the_others_do_not(c: Ctx) {
    for strategy in STRATEGIES {
        let name = strategy_name(strategy);
        // One millisecond before the end of an hour window.
        let clock = ManualClock::new(RL_START_MS + 3_600_000 - 1);
        let l = limiter_on(&c, name, strategy, Quota::per_hour(10), &clock);
        assert_eq!(admitted_concurrently(&l, "k", 10, 2).await, 10, "{name}");
        clock.advance(ms(2)); // one millisecond into the next window
        let again = admitted_concurrently(&l, "k", 10, 2).await;
        let expected = if strategy == Strategy::FixedWindow {
            10
        } else {
            0
        };
        assert_eq!(again, expected, "{name}: admitted 2 ms after a full window");
    }
}

async fn ratelimit_stacked_denial_consumes_from_no_policy(c: Ctx) {
    let clock = ManualClock::new(RL_START_MS);
    let per_second = limiter_on(
        &c,
        "per-second",
        Strategy::Gcra,
        Quota::per_second(3),
        &clock,
    );
    let per_hour = limiter_on(
        &c,
        "per-hour",
        Strategy::FixedWindow,
        Quota::per_hour(5),
        &clock,
    );
    let stack = Stacked::new(vec![per_second.clone(), per_hour.clone()]).unwrap();
    for _ in 0..3 {
        assert!(stack.check("k", 1).await.unwrap().allowed);
    }
    let d = stack.check("k", 1).await.unwrap();
    assert!(!d.allowed, "the per-second policy denies");
    assert_eq!(d.quota, Quota::per_second(3));
    assert_eq!(
        d.retry_after,
        Some(ms(334)),
        "a third of a second, rounded up"
    );
    assert_eq!(
        per_hour.peek("k").await.unwrap().remaining,
        2,
        "the hour was not charged"
    );
    clock.advance(Duration::from_secs(1));
    assert!(stack.check("k", 1).await.unwrap().allowed);
    let d = stack.check("k", 1).await.unwrap();
    assert!(
        d.allowed && d.remaining == 0,
        "the hour's last; it reports the tighter policy: {d:?}"
    );
    let d = stack.check("k", 1).await.unwrap();
    assert!(!d.allowed, "the hour is spent");
    assert_eq!(d.quota, Quota::per_hour(5));
    assert_eq!(d.retry_after, Some(HOUR - Duration::from_secs(1)));
    assert_eq!(
        per_second.peek("k").await.unwrap().remaining,
        1,
        "the second was not charged"
    );
    assert!(stack.peek("k").await.is_ok_and(|d| !d.allowed));
    match stack.check("k", 4).await {
        Err(RateLimitError::CostOverCapacity {
            cost: 4,
            capacity: 3,
        }) => {}
        other => panic!("expected CostOverCapacity, got {other:?}"),
    }
    // Under contention: the hour (15) admits first, the bucket (10) refuses some of those, and
    // the refunds give the hour back exactly what the bucket refused.
    let hour = limiter_on(
        &c,
        "hour15",
        Strategy::FixedWindow,
        Quota::per_hour(15),
        &clock,
    );
    let bucket = limiter_on(
        &c,
        "bucket10",
        Strategy::TokenBucket,
        Quota::per_hour(10),
        &clock,
    );
    let stack = Stacked::new(vec![hour.clone(), bucket.clone()]).unwrap();
    let mut handles = Vec::new();
    for _ in 0..32 {
        let stack = stack.clone();
        handles.push(tokio::spawn(async move {
            stack.check("c", 1).await.unwrap().allowed
        }));
    }
    let mut admitted = 0;
    for h in handles {
        admitted += usize::from(h.await.unwrap());
    }
    assert_eq!(admitted, 10, "the tighter policy bounds the stack");
    assert_eq!(bucket.peek("c").await.unwrap().remaining, 0);
    assert_eq!(
        hour.peek("c").await.unwrap().remaining,
        5,
        "only admitted requests stay charged"
    );
    assert!(matches!(
        Stacked::new(vec![hour.clone(), hour]),
        Err(RateLimitError::InvalidName { .. })
    ));
}

async fn ratelimit_per_key_quotas(c: Ctx) {
    let clock = ManualClock::new(RL_START_MS);
    for strategy in STRATEGIES {
        let name = strategy_name(strategy);
        let plans = |key: &[u8]| {
            if key.starts_with(b"premium:") {
                Quota::per_hour(10)
            } else {
                Quota::per_hour(2)
            }
        };
        let l = RateLimiter::new(confined(&c), name, strategy, plans)
            .unwrap()
            .with_clock(Arc::new(clock.clone()));
        assert_eq!(l.quota_for("premium:7"), Quota::per_hour(10));
        assert_eq!(
            admitted_concurrently(&l, "premium:7", 8, 2).await,
            10,
            "{name}"
        );
        assert_eq!(admitted_concurrently(&l, "free:7", 8, 2).await, 2, "{name}");
        let d = l.peek("free:8").await.unwrap();
        assert_eq!((d.limit, d.quota), (2, Quota::per_hour(2)), "{name}");
    }
}

async fn ratelimit_trusted_clock_agrees_across_skewed_nodes(c: Ctx) {
    // Two nodes whose own clocks are 5 s apart, straddling a window boundary. With their own
    // clocks they disagree: the fixed window counts in two windows, the bucket refills early.
    let behind = ManualClock::new(RL_START_MS + 3_600_000 - 2_000);
    let ahead = ManualClock::new(RL_START_MS + 3_600_000 + 3_000);
    let a = limiter_on(
        &c,
        "skew-fixed",
        Strategy::FixedWindow,
        Quota::per_hour(10),
        &behind,
    );
    let b = limiter_on(
        &c,
        "skew-fixed",
        Strategy::FixedWindow,
        Quota::per_hour(10),
        &ahead,
    );
    let mut admitted = 0;
    for _ in 0..20 {
        admitted += usize::from(a.check("k", 1).await.unwrap().allowed);
        admitted += usize::from(b.check("k", 1).await.unwrap().allowed);
    }
    assert_eq!(
        admitted, 20,
        "skewed local clocks double the fixed window's limit"
    );
    let a = limiter_on(
        &c,
        "skew-gcra",
        Strategy::Gcra,
        Quota::per_second(1).with_burst(5),
        &behind,
    );
    let b = limiter_on(
        &c,
        "skew-gcra",
        Strategy::Gcra,
        Quota::per_second(1).with_burst(5),
        &ahead,
    );
    let mut admitted = 0;
    for _ in 0..10 {
        admitted += usize::from(a.check("k", 1).await.unwrap().allowed);
    }
    for _ in 0..10 {
        admitted += usize::from(b.check("k", 1).await.unwrap().allowed);
    }
    assert_eq!(
        admitted, 10,
        "the node 5 s ahead sees 5 s of refill that never happened"
    );
    // The same two nodes on the backend's clock (the default): they agree exactly. Buckets of
    // 10 per hour earn a token every 6 minutes, far longer than this case runs.
    for strategy in [Strategy::TokenBucket, Strategy::Gcra] {
        let name = strategy_name(strategy);
        let node = || RateLimiter::new(confined(&c), name, strategy, Quota::per_hour(10)).unwrap();
        let (a, b) = (node(), node());
        let mut admitted = 0;
        for _ in 0..15 {
            admitted += usize::from(a.check("k", 1).await.unwrap().allowed);
            admitted += usize::from(b.check("k", 1).await.unwrap().allowed);
        }
        assert_eq!(
            admitted, 10,
            "{name}: nodes on the trusted clock share one limit"
        );
        let (pa, pb) = (a.peek("k").await.unwrap(), b.peek("k").await.unwrap());
        assert_eq!(
            (pa.allowed, pa.remaining),
            (pb.allowed, pb.remaining),
            "{name}"
        );
    }
}

async fn ratelimit_state_keys_carry_ttls_and_vanish_when_idle(c: Ctx) {
    let clock = ManualClock::new(RL_START_MS);
    for strategy in STRATEGIES {
        let l = limiter_on(
            &c,
            strategy_name(strategy),
            strategy,
            Quota::per_hour(10),
            &clock,
        );
        assert!(l.check("k", 3).await.unwrap().allowed);
    }
    let keys = collect_scan(&*confined(&c), b"rl:", 100).await;
    assert_eq!(keys.len(), 4, "{keys:?}");
    for key in keys {
        match confined(&c).ttl(&key).await.unwrap() {
            // Windows: two hours; buckets: until full again (3 tokens at 10 per hour = 18 min).
            Ttl::Remaining(d) => {
                assert!(d <= 2 * HOUR, "{:?}: {d:?}", String::from_utf8_lossy(&key))
            }
            other => panic!("{:?} has no TTL: {other:?}", String::from_utf8_lossy(&key)),
        }
    }
    // On the backend's clock a bucket's state lives exactly until it would be full again.
    for strategy in [Strategy::TokenBucket, Strategy::Gcra] {
        let name = format!("idle-{}", strategy_name(strategy));
        let l = RateLimiter::new(confined(&c), &name, strategy, Quota::per_second(10)).unwrap();
        let d = l.check("k", 2).await.unwrap();
        assert_eq!(d.reset_after, ms(200));
        let prefix = format!("rl:{name}:");
        assert_eq!(
            collect_scan(&*confined(&c), prefix.as_bytes(), 10)
                .await
                .len(),
            1
        );
        let_expire(ms(200)).await;
        assert!(
            collect_scan(&*confined(&c), prefix.as_bytes(), 10)
                .await
                .is_empty(),
            "{name}"
        );
        assert_eq!(
            l.peek("k").await.unwrap().remaining,
            10,
            "{name}: a vanished key is a full bucket"
        );
    }
}

async fn ratelimit_decisions_carry_what_http_headers_need(c: Ctx) {
    // A quarter past the hour.
    let clock = ManualClock::new(RL_START_MS + 15 * 60_000);
    let fixed = limiter_on(
        &c,
        "fixed",
        Strategy::FixedWindow,
        Quota::per_hour(2),
        &clock,
    );
    let d = fixed.check("k", 1).await.unwrap();
    assert_eq!((d.allowed, d.limit, d.remaining), (true, 2, 1));
    assert_eq!((d.reset_after, d.retry_after), (45 * MINUTE, None));
    fixed.check("k", 1).await.unwrap();
    let d = fixed.check("k", 1).await.unwrap();
    assert_eq!(
        (d.allowed, d.remaining, d.retry_after),
        (false, 0, Some(45 * MINUTE))
    );
    assert_eq!(
        (d.reset_after_secs(), d.retry_after_secs()),
        (2700, Some(2700))
    );

    let sliding = limiter_on(
        &c,
        "sliding",
        Strategy::SlidingWindow,
        Quota::per_hour(2),
        &clock,
    );
    let d = sliding.check("k", 2).await.unwrap();
    assert_eq!((d.allowed, d.remaining), (true, 0));
    assert_eq!(
        d.reset_after,
        45 * MINUTE + HOUR,
        "until the requests slide out"
    );
    let d = sliding.check("k", 1).await.unwrap();
    // Next window: 2 × (60 − e) / 60 ≤ 1 at e = 30 min.
    assert_eq!(d.retry_after, Some(45 * MINUTE + 30 * MINUTE));

    let gcra = limiter_on(
        &c,
        "gcra",
        Strategy::Gcra,
        Quota::per_minute(6).with_burst(3),
        &clock,
    );
    let d = gcra.check("k", 1).await.unwrap();
    assert_eq!(
        (d.limit, d.remaining, d.reset_after),
        (3, 2, Duration::from_secs(10))
    );
    assert_eq!(d.quota, Quota::per_minute(6).with_burst(3));
    gcra.check("k", 2).await.unwrap();
    let d = gcra.check("k", 1).await.unwrap();
    assert_eq!(
        (d.allowed, d.retry_after, d.reset_after),
        (
            false,
            Some(Duration::from_secs(10)),
            Duration::from_secs(30)
        )
    );
}
