//! What keel reports: each test installs a real recorder (metrics-util's `DebuggingRecorder`)
//! or a real `tracing` subscriber for its own thread, drives the embedded engine through
//! [`Observed`] or a primitive, and checks the counters, histograms, gauges and span fields
//! that came out. A current-thread runtime keeps every task of a test on the thread that holds
//! its recorder or subscriber, so tests running in parallel never see each other's figures.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_primitives::breaker::{Breaker, Policy, State};
use keel_primitives::cache::Cache;
use keel_primitives::idempotency::{Begin, Fingerprint, Idempotency, StoredResponse};
use keel_primitives::lock::Lock;
use keel_primitives::observe::{self, EngineGauges, Observed};
use keel_primitives::ratelimit::{Quota, RateLimiter, Stacked, Strategy};
use keel_primitives::session::{Saved, SessionStore};
use keel_primitives::{Backend, Embedded, ErrorKind, VALUE_BYTES_MAX};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};

/// Runs `test` on a current-thread runtime with a fresh recorder installed for this thread,
/// and hands back what was recorded.
fn recorded<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) -> Figures {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(test()));
    Figures::of(&snapshotter)
}

/// One snapshot of a recorder, searchable by name and labels.
struct Figures(Vec<(CompositeKey, DebugValue)>);

impl Figures {
    fn of(snapshotter: &Snapshotter) -> Self {
        Figures(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| (key, value))
                .collect(),
        )
    }

    fn find(&self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Option<&DebugValue> {
        self.0.iter().find_map(|(key, value)| {
            let k = key.key();
            let matches = key.kind() == kind
                && k.name() == name
                && labels
                    .iter()
                    .all(|(n, v)| k.labels().any(|l| l.key() == *n && l.value() == *v));
            matches.then_some(value)
        })
    }

    /// A counter's value; 0 when it was never touched.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.find(MetricKind::Counter, name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            Some(other) => panic!("{name} is not a counter: {other:?}"),
            None => 0,
        }
    }

    fn gauge(&self, name: &str) -> Option<f64> {
        match self.find(MetricKind::Gauge, name, &[])? {
            DebugValue::Gauge(v) => Some(v.into_inner()),
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.find(MetricKind::Histogram, name, labels) {
            Some(DebugValue::Histogram(v)) => v.iter().map(|x| x.into_inner()).collect(),
            Some(other) => panic!("{name} is not a histogram: {other:?}"),
            None => Vec::new(),
        }
    }

    /// Every counter of `name` whose labels include `labels`, summed.
    fn counter_sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.0
            .iter()
            .filter(|(key, _)| {
                let k = key.key();
                key.kind() == MetricKind::Counter
                    && k.name() == name
                    && labels
                        .iter()
                        .all(|(n, v)| k.labels().any(|l| l.key() == *n && l.value() == *v))
            })
            .map(|(_, value)| match value {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    }
}

fn observed_memory() -> Arc<dyn Backend> {
    Arc::new(Observed::new(Arc::new(Embedded::memory())))
}

#[test]
fn every_operation_counts_by_backend_op_and_outcome_with_its_latency() {
    let figures = recorded(|| async {
        let b = observed_memory();
        b.set(b"a", b"1", None).await.unwrap();
        assert_eq!(b.get(b"a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(b.get(b"missing").await.unwrap(), None);
        assert_eq!(b.incr(b"a", 2, None).await.unwrap(), 3);
        assert!(b.expire(b"a", Duration::from_secs(60)).await.unwrap());
        assert!(b.delete(b"a").await.unwrap());
    });
    let ok = |op| {
        figures.counter(
            observe::BACKEND_OPS_TOTAL,
            &[("backend", "memory"), ("op", op), ("outcome", "ok")],
        )
    };
    assert_eq!(ok("set"), 1);
    assert_eq!(ok("get"), 2, "a miss is a successful operation");
    assert_eq!(ok("incr"), 1);
    assert_eq!(ok("expire"), 1);
    assert_eq!(ok("delete"), 1);
    assert_eq!(figures.counter_sum(observe::BACKEND_OPS_TOTAL, &[]), 6);
    assert_eq!(figures.counter_sum(observe::BACKEND_ERRORS_TOTAL, &[]), 0);
    let latencies = figures.samples(
        observe::BACKEND_OP_SECONDS,
        &[("backend", "memory"), ("op", "get")],
    );
    assert_eq!(latencies.len(), 2);
    assert!(
        latencies.iter().all(|s| *s >= 0.0 && *s < 60.0),
        "{latencies:?}"
    );
}

#[test]
fn errors_count_by_kind_and_pass_through_unchanged() {
    let figures = recorded(|| async {
        let b = observed_memory();
        let oversize = vec![0u8; VALUE_BYTES_MAX + 1];
        let e = b.set(b"big", &oversize, None).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Limit);
        b.set(b"text", b"not a number", None).await.unwrap();
        let e = b.incr(b"text", 1, None).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotAnInteger);
        let e = b.expire(b"text", Duration::ZERO).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    });
    let errors = |op, kind| {
        figures.counter(
            observe::BACKEND_ERRORS_TOTAL,
            &[("backend", "memory"), ("op", op), ("kind", kind)],
        )
    };
    assert_eq!(errors("set", "limit"), 1);
    assert_eq!(errors("incr", "not_an_integer"), 1);
    assert_eq!(errors("expire", "invalid_input"), 1);
    assert_eq!(
        figures.counter(
            observe::BACKEND_OPS_TOTAL,
            &[("op", "set"), ("outcome", "error")]
        ),
        1
    );
    assert_eq!(
        figures.counter(
            observe::BACKEND_OPS_TOTAL,
            &[("op", "set"), ("outcome", "ok")]
        ),
        1
    );
    assert_eq!(figures.counter_sum(observe::BACKEND_ERRORS_TOTAL, &[]), 3);
}

/// `rate_limit` and `delete_prefix` have default bodies built on other operations; the
/// wrapper must hand them to the wrapped backend's native step, not run the defaults (which
/// would show up as `get`/`compare_and_swap`/`scan`/`delete` operations).
#[test]
fn defaulted_operations_reach_the_native_step() {
    let figures = recorded(|| async {
        let b = observed_memory();
        let limiter =
            RateLimiter::new(Arc::clone(&b), "api", Strategy::Gcra, Quota::per_minute(5)).unwrap();
        assert!(limiter.check(b"client", 1).await.unwrap().allowed);
        for i in 0..3 {
            b.set(format!("ns:{i}").as_bytes(), b"x", None)
                .await
                .unwrap();
        }
        assert_eq!(b.delete_prefix(b"ns:").await.unwrap(), 3);
    });
    let ops = |op| figures.counter_sum(observe::BACKEND_OPS_TOTAL, &[("op", op)]);
    assert_eq!(ops("rate_limit"), 1);
    assert_eq!(ops("delete_prefix"), 1);
    assert_eq!(ops("set"), 3);
    for default_path in ["get", "compare_and_swap", "now_ms", "scan", "delete"] {
        assert_eq!(
            ops(default_path),
            0,
            "{default_path} ran: a default body was used"
        );
    }
}

#[test]
fn rate_limit_decisions_count_allowed_and_denied() {
    let figures = recorded(|| async {
        let b: Arc<dyn Backend> = Arc::new(Embedded::memory());
        let limiter = RateLimiter::new(
            Arc::clone(&b),
            "login",
            Strategy::FixedWindow,
            Quota::per_hour(2),
        )
        .unwrap();
        let allowed: Vec<bool> = [
            limiter.check(b"ip", 1).await.unwrap().allowed,
            limiter.check(b"ip", 1).await.unwrap().allowed,
            limiter.check(b"ip", 1).await.unwrap().allowed,
        ]
        .to_vec();
        assert_eq!(allowed, [true, true, false]);
        // A peek decides nothing.
        assert!(!limiter.peek(b"ip").await.unwrap().allowed);
        let per_email =
            RateLimiter::new(Arc::clone(&b), "email", Strategy::Gcra, Quota::per_hour(10)).unwrap();
        let stack = Stacked::new(vec![limiter, per_email]).unwrap();
        assert!(!stack.check(b"ip", 1).await.unwrap().allowed);
        assert!(stack.check(b"other-ip", 1).await.unwrap().allowed);
    });
    let decisions = |limiter, outcome| {
        figures.counter(
            observe::RATELIMIT_DECISIONS_TOTAL,
            &[("limiter", limiter), ("outcome", outcome)],
        )
    };
    assert_eq!(decisions("login", "allowed"), 2);
    assert_eq!(decisions("login", "denied"), 1);
    assert_eq!(decisions("login+email", "denied"), 1);
    assert_eq!(decisions("login+email", "allowed"), 1);
    assert_eq!(
        figures.counter_sum(observe::RATELIMIT_DECISIONS_TOTAL, &[]),
        5
    );
}

#[test]
fn cache_lookups_count_hits_misses_and_coalesced_waiters() {
    let figures = recorded(|| async {
        let cache = Cache::new(Arc::new(Embedded::memory()), "catalog");
        let ttl = Duration::from_secs(60);
        let v: u32 = cache
            .get_or_compute(b"a", ttl, || async { Ok::<_, std::io::Error>(1) })
            .await
            .unwrap();
        assert_eq!(v, 1);
        let v: u32 = cache
            .get_or_compute(b"a", ttl, || async { Ok::<_, std::io::Error>(2) })
            .await
            .unwrap();
        assert_eq!(v, 1, "the second lookup is a hit");

        // A second caller of a key whose computation is running joins it. The leader's
        // computation waits for `release`; the follower is parked once it counted its miss
        // (the runtime has one thread, so both run only when this task awaits).
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let leader = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_compute(b"b", ttl, || async move {
                        released.await.unwrap();
                        Ok::<u32, std::io::Error>(7)
                    })
                    .await
                    .unwrap()
            })
        };
        let follower = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_compute(b"b", ttl, || async { Ok::<u32, std::io::Error>(8) })
                    .await
                    .unwrap()
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while cache.stats().misses < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the follower never looked up"
            );
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        assert_eq!(leader.await.unwrap(), 7);
        assert_eq!(
            follower.await.unwrap(),
            7,
            "the follower got the leader's value"
        );
    });
    let lookups = |outcome| {
        figures.counter(
            observe::CACHE_REQUESTS_TOTAL,
            &[("cache", "value"), ("outcome", outcome)],
        )
    };
    assert_eq!(lookups("miss"), 3);
    assert_eq!(lookups("hit"), 1);
    assert_eq!(lookups("stale"), 0);
    assert_eq!(
        figures.counter(observe::CACHE_COALESCED_TOTAL, &[("cache", "value")]),
        1
    );
}

#[test]
fn breaker_transitions_count_from_and_to() {
    let figures = recorded(|| async {
        let breaker = Breaker::builder("payments")
            .policy(Policy::ConsecutiveFailures(2))
            .open_duration(Duration::from_secs(60))
            .build()
            .unwrap();
        for _ in 0..2 {
            let _ = breaker.call(|| async { Err::<(), _>("503") }).await;
        }
        assert_eq!(breaker.state(), State::Open);
        breaker.reset().await;
        assert_eq!(breaker.state(), State::Closed);
    });
    let transitions = |from, to| {
        figures.counter(
            observe::BREAKER_TRANSITIONS_TOTAL,
            &[("breaker", "payments"), ("from", from), ("to", to)],
        )
    };
    assert_eq!(transitions("closed", "open"), 1);
    assert_eq!(transitions("open", "closed"), 1);
    assert_eq!(
        figures.counter_sum(observe::BREAKER_TRANSITIONS_TOTAL, &[]),
        2
    );
}

#[test]
fn idempotency_claims_replays_and_conflicts_are_counted() {
    let figures = recorded(|| async {
        let idem = Idempotency::new(Arc::new(Embedded::memory()));
        let fp = Fingerprint::of(&[b"POST /orders", b"{\"sku\":1}"]);
        let Begin::Claimed(claim) = idem.begin(b"anon", b"key-1", fp).await.unwrap() else {
            panic!("first use claims");
        };
        assert!(matches!(
            idem.begin(b"anon", b"key-1", fp).await.unwrap(),
            Begin::InFlight
        ));
        claim
            .complete(&StoredResponse::new(201, Vec::new(), b"ok".to_vec()))
            .await
            .unwrap();
        assert!(matches!(
            idem.begin(b"anon", b"key-1", fp).await.unwrap(),
            Begin::Completed(_)
        ));
        let other = Fingerprint::of(&[b"POST /orders", b"{\"sku\":2}"]);
        assert!(matches!(
            idem.begin(b"anon", b"key-1", other).await.unwrap(),
            Begin::Mismatch
        ));
    });
    let outcome = |o| figures.counter(observe::IDEMPOTENCY_REQUESTS_TOTAL, &[("outcome", o)]);
    assert_eq!(outcome("claimed"), 1);
    assert_eq!(outcome("in_flight"), 1);
    assert_eq!(outcome("replayed"), 1);
    assert_eq!(outcome("mismatch"), 1);
}

#[test]
fn lock_acquisitions_and_a_lost_lease_are_counted() {
    let figures = recorded(|| async {
        let b: Arc<dyn Backend> = Arc::new(Embedded::memory());
        let lock = Lock::new(Arc::clone(&b));
        let ttl = Duration::from_secs(30);
        let lease = lock.try_acquire(b"job", ttl).await.unwrap().unwrap();
        assert!(lock.try_acquire(b"job", ttl).await.unwrap().is_none());
        // Another owner's hold replaces ours (as after an expiry): the release finds it lost.
        b.set(b"lock:{job}", b"someone else", Some(ttl))
            .await
            .unwrap();
        assert!(!lease.release().await.unwrap());
    });
    let acquisitions = |o| figures.counter(observe::LOCK_ACQUISITIONS_TOTAL, &[("outcome", o)]);
    assert_eq!(acquisitions("acquired"), 1);
    assert_eq!(acquisitions("busy"), 1);
    assert_eq!(
        figures.counter(observe::LOCK_LOSSES_TOTAL, &[("reason", "release")]),
        1
    );
}

#[test]
fn session_loads_and_saves_are_counted() {
    let figures = recorded(|| async {
        let store = SessionStore::builder(Arc::new(Embedded::memory()))
            .build()
            .unwrap();
        let session = store.open(None);
        session.insert("user", "u1").await.unwrap();
        let token = session.save().await.unwrap().token().unwrap().to_owned();
        let again = store.open(Some(&token));
        assert_eq!(
            again.get::<String>("user").await.unwrap().as_deref(),
            Some("u1")
        );
        assert!(matches!(again.save().await.unwrap(), Saved::Unchanged));
        // A token of the right shape that was never issued: loaded, not found.
        let first = if token.starts_with('A') { "B" } else { "A" };
        let forged = format!("{first}{}", &token[1..]);
        let forged = store.open(Some(&forged));
        assert_eq!(forged.get::<String>("user").await.unwrap(), None);
    });
    let loads = |o| figures.counter(observe::SESSION_LOADS_TOTAL, &[("outcome", o)]);
    let saves = |o| figures.counter(observe::SESSION_SAVES_TOTAL, &[("outcome", o)]);
    assert_eq!(loads("found"), 1);
    assert_eq!(loads("missing"), 1);
    assert_eq!(saves("stored"), 1);
    assert_eq!(saves("unchanged"), 1);
}

#[test]
fn engine_gauges_publish_the_stores_figures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let published = Arc::new(Mutex::new(None));
    let out = Arc::clone(&published);
    let figures = recorded(move || async move {
        let store = Embedded::open(&path).unwrap();
        for i in 0..10 {
            store
                .set(format!("k{i}").as_bytes(), b"value", None)
                .await
                .unwrap();
        }
        store.db().compact().unwrap();
        *out.lock().unwrap() = Some(EngineGauges::new(store.db().clone()).publish());
    });
    let stats = published.lock().unwrap().take().unwrap();
    assert_eq!(stats.keys, 10);
    assert_eq!(figures.gauge(observe::ENGINE_KEYS), Some(10.0));
    assert_eq!(
        figures.gauge(observe::ENGINE_MEMORY_BYTES),
        Some(stats.memory_bytes as f64)
    );
    assert!(stats.memory_bytes > 0);
    assert_eq!(
        figures.gauge(observe::ENGINE_WAL_BYTES),
        Some(stats.wal_bytes as f64)
    );
    assert_eq!(
        figures.gauge(observe::ENGINE_WAL_SEGMENTS),
        Some(stats.wal_segments as f64)
    );
    assert_eq!(
        figures.counter(observe::ENGINE_WAL_FSYNCS_TOTAL, &[]),
        stats.wal_fsyncs
    );
    assert!(stats.wal_fsyncs > 0, "ten durable writes fsynced the WAL");
    assert_eq!(
        figures.gauge(observe::ENGINE_DURABLE_LSN),
        Some(stats.durable_lsn as f64)
    );
    assert_eq!(figures.counter(observe::ENGINE_SNAPSHOTS_TOTAL, &[]), 1);
    let snapshot_s = figures
        .gauge(observe::ENGINE_LAST_SNAPSHOT_SECONDS)
        .unwrap();
    assert_eq!(
        snapshot_s,
        stats.last_snapshot.unwrap().duration.as_secs_f64()
    );
    assert!(figures.gauge(observe::ENGINE_RECOVERY_SECONDS).is_some());
    assert_eq!(figures.gauge(observe::ENGINE_POISONED), Some(0.0));
}

#[test]
fn spawned_engine_gauges_republish_with_their_label_until_the_task_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let keys = move || match Figures::of(&snapshotter).find(
        MetricKind::Gauge,
        observe::ENGINE_KEYS,
        &[("store", "main")],
    ) {
        Some(DebugValue::Gauge(v)) => Some(v.into_inner()),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let store = Embedded::open(dir.path()).unwrap();
            let task = EngineGauges::with_label(store.db().clone(), "main")
                .spawn(Duration::from_millis(5));
            // Each write changes the store; the task's next tick publishes it.
            for (i, want) in [(0, 1.0), (1, 2.0), (2, 3.0)] {
                store
                    .set(format!("k{i}").as_bytes(), b"v", None)
                    .await
                    .unwrap();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while keys() != Some(want) {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no publish of {want} keys: {:?}",
                        keys()
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            // The debugging recorder's snapshot resets a gauge to 0, so the read that saw 3
            // left 0 behind: only a publish after the drop could change it. Nothing else runs
            // between that read and the drop (one thread, no await).
            drop(task);
            store.set(b"k3", b"v", None).await.unwrap();
            // Twenty periods: a task still running would have published 4 by now.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(keys(), Some(0.0), "a dropped task kept publishing");
        })
    });
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn spans_carry_backend_op_outcome_and_never_the_raw_key() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let key = b"user:alice@example.com:session";
    let value = b"secret-value-0042";
    tracing::subscriber::with_default(subscriber, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let b = observed_memory();
            b.set(key, value, None).await.unwrap();
            assert_eq!(b.get(key).await.unwrap(), Some(value.to_vec()));
            let oversize = vec![b'z'; VALUE_BYTES_MAX + 1];
            assert!(b.set(key, &oversize, None).await.is_err());
        });
    });
    let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let digest = observe::redact(key);
    let closes = |op: &str, outcome: &str| {
        lines
            .iter()
            .filter(|l| {
                l.contains("close")
                    && l.contains("keel.backend")
                    && l.contains("backend=\"memory\"")
                    && l.contains(&format!("op=\"{op}\""))
                    && l.contains(&format!("outcome=\"{outcome}\""))
                    && l.contains(&format!("key=\"{digest}\""))
                    && l.contains("elapsed_us=")
            })
            .count()
    };
    assert_eq!(closes("set", "ok"), 1, "{out}");
    assert_eq!(closes("get", "ok"), 1, "{out}");
    assert_eq!(closes("set", "limit"), 1, "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("backend operation failed")),
        "{out}"
    );
    for raw in ["alice", "example.com", "secret-value", "zzzz"] {
        assert!(
            !out.contains(raw),
            "{raw:?} appeared in the trace output:\n{out}"
        );
    }
}
