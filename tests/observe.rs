//! `keel::connect` wraps every backend in `Observed`: operations through it show up in a real
//! recorder (metrics-util's `DebuggingRecorder`, installed for the test's thread), `Connect`
//! opts out and relabels, and an embedded URL hands out the engine for `EngineGauges`. The
//! Redis case runs against the real server (`KEEL_TEST_REDIS_URL`, set by `scripts/test`).

use std::time::Duration;

use keel::metrics as names;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};

/// What a test recorded: one snapshot (a snapshot drains the recorder's counters, so it is
/// taken once).
type Recorded = Vec<(CompositeKey, DebugValue)>;

fn recorded<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) -> Recorded {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(test()));
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| (key, value))
        .collect()
}

/// The sum of the counters called `name` whose labels include `labels`.
fn counter(s: &Recorded, name: &str, labels: &[(&str, &str)]) -> u64 {
    s.iter()
        .filter(|(key, _)| {
            key.kind() == MetricKind::Counter
                && key.key().name() == name
                && labels
                    .iter()
                    .all(|(n, v)| key.key().labels().any(|l| l.key() == *n && l.value() == *v))
        })
        .map(|(_, value)| match value {
            DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

#[test]
fn connect_observes_by_default_and_connect_observe_false_does_not() {
    let s = recorded(|| async {
        let observed = keel::connect("memory://").await.unwrap();
        observed.set(b"k", b"v", None).await.unwrap();
        observed.get(b"k").await.unwrap();
        let bare = keel::Connect::new()
            .observe(false)
            .open("memory://")
            .await
            .unwrap()
            .backend;
        bare.set(b"k", b"v", None).await.unwrap();
        bare.get(b"k").await.unwrap();
        let labelled = keel::Connect::new()
            .label("sessions")
            .open("memory://")
            .await
            .unwrap()
            .backend;
        labelled.get(b"k").await.unwrap();
        assert_eq!(
            labelled.name(),
            "memory",
            "the label does not rename the backend"
        );
    });
    assert_eq!(
        counter(&s, names::BACKEND_OPS_TOTAL, &[("backend", "memory")]),
        2,
        "only the observed handle's two operations count"
    );
    assert_eq!(
        counter(
            &s,
            names::BACKEND_OPS_TOTAL,
            &[("backend", "sessions"), ("op", "get"), ("outcome", "ok")]
        ),
        1
    );
}

#[test]
fn connect_hands_out_the_engine_of_an_embedded_url_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap().to_owned();
    let s = recorded(|| async move {
        let store = keel::Connect::new().open(&path).await.unwrap();
        store.backend.set(b"a", b"1", None).await.unwrap();
        store.backend.set(b"b", b"2", None).await.unwrap();
        let db = store.engine.clone().expect("a path opens the engine");
        let stats = keel::metrics::EngineGauges::new(db).publish();
        assert_eq!(stats.keys, 2);
        let memory = keel::Connect::new().open("memory://").await.unwrap();
        assert!(memory.engine.is_some());
    });
    let gauge = s.iter().find_map(|(key, value)| {
        (key.kind() == MetricKind::Gauge && key.key().name() == names::ENGINE_KEYS).then_some(value)
    });
    assert!(
        matches!(gauge, Some(DebugValue::Gauge(v)) if v.into_inner() == 2.0),
        "{gauge:?}"
    );
}

/// The wrapper on a network backend: a server-side error keeps its kind and is counted, and
/// the native rate-limit script runs (one `rate_limit` operation, no compare-and-swap).
#[cfg(feature = "redis")]
#[test]
fn connect_observes_redis_with_its_error_kinds_and_native_steps() {
    let url = match std::env::var("KEEL_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            panic!("KEEL_TEST_REDIS_URL is not set: run `scripts/test`, or start Redis and set it")
        }
    };
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let s = recorded(|| async move {
        let b = keel::connect(&url).await.unwrap();
        let key = format!("keel-test-observe:{nonce}:text");
        b.set(
            key.as_bytes(),
            b"not a number",
            Some(Duration::from_secs(60)),
        )
        .await
        .unwrap();
        let e = b.incr(key.as_bytes(), 1, None).await.unwrap_err();
        assert_eq!(e.kind(), keel::ErrorKind::NotAnInteger);
        let limiter = keel::primitives::ratelimit::RateLimiter::new(
            b,
            "observe-test",
            keel::primitives::ratelimit::Strategy::Gcra,
            keel::primitives::ratelimit::Quota::per_minute(10),
        )
        .unwrap();
        let rl_key = format!("{nonce}");
        assert!(limiter.check(rl_key.as_bytes(), 1).await.unwrap().allowed);
    });
    assert_eq!(
        counter(
            &s,
            names::BACKEND_ERRORS_TOTAL,
            &[
                ("backend", "redis"),
                ("op", "incr"),
                ("kind", "not_an_integer")
            ]
        ),
        1
    );
    assert_eq!(
        counter(
            &s,
            names::BACKEND_OPS_TOTAL,
            &[("backend", "redis"), ("op", "rate_limit")]
        ),
        1
    );
    assert_eq!(
        counter(&s, names::BACKEND_OPS_TOTAL, &[("op", "compare_and_swap")]),
        0
    );
    assert_eq!(
        counter(
            &s,
            names::RATELIMIT_DECISIONS_TOTAL,
            &[("limiter", "observe-test"), ("outcome", "allowed")]
        ),
        1
    );
}
