//! The circuit breaker on every backend: each trip policy, half-open admitting exactly N probes
//! under concurrency (one instance, and four replicas sharing the backend), backoff, a hung or
//! cancelled probe not wedging it, falling back to local mode when the backend is down, forced
//! states and callbacks, and every key carrying a TTL.
//!
//! Breakers run in shared mode on the backend under test (confined to the case's prefix), with
//! a [`ManualClock`] for open durations, windows and slow calls. Probe leases expire on the
//! backend's own clock, so the hung-probe case lets a short real TTL elapse.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use async_trait::async_trait;

use super::dedup::scan_all;
use super::*;
use crate::backend::ScanPage;
use crate::breaker::{
    Breaker, BreakerBuilder, CallError, Mode, Outcome, Policy, State, StateChange, Window,
};
use crate::error::Error;
use crate::ratelimit::ManualClock;

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(breaker_consecutive_failures_trip_every_replica),
        case!(breaker_failure_rate_over_a_count_window_trips),
        case!(breaker_failure_rate_over_a_time_window_trips),
        case!(breaker_slow_call_rate_trips),
        case!(breaker_classifier_decides_what_counts),
        case!(breaker_half_open_admits_exactly_n_probes_locally),
        case!(breaker_half_open_admits_exactly_n_probes_across_4_replicas),
        case!(breaker_probes_close_or_reopen_with_backoff),
        case!(breaker_hung_or_cancelled_probe_does_not_wedge),
        case!(breaker_backend_down_falls_back_to_local),
        case!(breaker_force_reset_metrics_and_callbacks),
        case!(breaker_keys_carry_ttls),
    ]
}

const START_MS: u64 = 1_000_000;
const OPEN: Duration = Duration::from_secs(10);
const REFRESH: Duration = Duration::from_secs(1);

fn builder(c: &Ctx, clock: &ManualClock) -> BreakerBuilder {
    Breaker::builder("svc")
        .shared(confined(c))
        .clock(Arc::new(clock.clone()))
        .open_duration(OPEN)
        .open_duration_max(Duration::from_secs(80))
        .jitter(0.0)
        .refresh_interval(REFRESH)
}

async fn fail(b: &Breaker) {
    let p = b.acquire().await.expect("admitted");
    p.failure().await;
}

async fn succeed(b: &Breaker) {
    let p = b.acquire().await.expect("admitted");
    p.success().await;
}

async fn breaker_consecutive_failures_trip_every_replica(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let make = || {
        builder(&c, &clock)
            .policy(Policy::ConsecutiveFailures(3))
            .build()
            .unwrap()
    };
    let (a, b) = (make(), make());
    assert_eq!(a.mode(), Mode::Shared);
    // Two failures, a success (resets the run), two more failures: still closed.
    fail(&a).await;
    fail(&b).await;
    succeed(&a).await;
    fail(&a).await;
    fail(&b).await;
    assert_eq!(a.state(), State::Closed);
    // The third failure in a row, from either replica, trips it for both.
    fail(&b).await;
    assert_eq!(b.state(), State::Open);
    a.refresh().await;
    assert_eq!(a.state(), State::Open, "the other replica sees the trip");
    let r = a.acquire().await.unwrap_err();
    assert_eq!(r.state, State::Open);
    assert_eq!(r.retry_after, OPEN);
    // A fresh replica (its first call refreshes its view) is rejected too.
    let fresh = make();
    assert!(fresh.acquire().await.is_err());
}

async fn breaker_failure_rate_over_a_count_window_trips(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let b = builder(&c, &clock)
        .policy(Policy::FailureRate {
            percent: 50,
            window: Window::Calls(10),
            min_calls: 10,
        })
        .build()
        .unwrap();
    // 4 failures among 9 calls: under the minimum, and under 50%.
    for i in 0..9 {
        if i % 2 == 0 && i < 8 {
            fail(&b).await;
        } else {
            succeed(&b).await;
        }
    }
    assert_eq!(b.state(), State::Closed);
    // The 10th call fails: 5 of 10 = 50%: trips.
    fail(&b).await;
    assert_eq!(b.state(), State::Open);
    // Below the minimum number of calls nothing trips, even at 100%.
    let quiet = Breaker::builder("min")
        .shared(confined(&c))
        .clock(Arc::new(clock.clone()))
        .policy(Policy::FailureRate {
            percent: 50,
            window: Window::Calls(100),
            min_calls: 5,
        })
        .build()
        .unwrap();
    for _ in 0..4 {
        fail(&quiet).await;
    }
    assert_eq!(quiet.state(), State::Closed);
    fail(&quiet).await;
    assert_eq!(quiet.state(), State::Open);
}

async fn breaker_failure_rate_over_a_time_window_trips(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let b = builder(&c, &clock)
        .policy(Policy::FailureRate {
            percent: 60,
            window: Window::Time(Duration::from_secs(10)),
            min_calls: 5,
        })
        .build()
        .unwrap();
    // Four failures, then the window passes: they no longer count.
    for _ in 0..4 {
        fail(&b).await;
    }
    assert_eq!(b.state(), State::Closed);
    clock.advance(Duration::from_secs(25));
    // In the new window: 2 successes, 2 failures (50% of 4: below the minimum anyway).
    succeed(&b).await;
    succeed(&b).await;
    fail(&b).await;
    fail(&b).await;
    assert_eq!(b.state(), State::Closed);
    // A fifth call, failing: 3 of 5 = 60%: trips.
    fail(&b).await;
    assert_eq!(b.state(), State::Open);
}

async fn breaker_slow_call_rate_trips(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let b = builder(&c, &clock)
        .policy(Policy::SlowCallRate {
            threshold: Duration::from_secs(2),
            percent: 50,
            window: Window::Calls(4),
            min_calls: 4,
        })
        .build()
        .unwrap();
    let slow_ok = || {
        let (b, clock) = (b.clone(), clock.clone());
        async move {
            b.call(|| async {
                clock.advance(Duration::from_secs(3));
                Ok::<_, ()>(())
            })
            .await
            .unwrap();
        }
    };
    slow_ok().await;
    succeed(&b).await;
    succeed(&b).await;
    assert_eq!(b.state(), State::Closed);
    // A slow *successful* call still counts as slow: 2 of 4.
    slow_ok().await;
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.metrics().slow, 2);
    assert_eq!(b.metrics().failures, 0);
}

#[derive(Debug, PartialEq)]
struct Status(u16);

async fn breaker_classifier_decides_what_counts(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let b = builder(&c, &clock)
        .policy(Policy::ConsecutiveFailures(2))
        .build()
        .unwrap();
    let classify = |r: &Result<Status, Status>| match r {
        Err(Status(s)) if *s >= 500 => Outcome::Failure,
        Err(_) => Outcome::Ignored,
        Ok(_) => Outcome::Success,
    };
    for _ in 0..5 {
        let r = b
            .call_classified(classify, || async { Err::<Status, _>(Status(404)) })
            .await;
        assert!(matches!(r, Err(CallError::Inner(Status(404)))));
    }
    assert_eq!(b.state(), State::Closed, "4xx are not failures");
    for _ in 0..2 {
        let _ = b
            .call_classified(classify, || async { Err::<Status, _>(Status(503)) })
            .await;
    }
    assert_eq!(b.state(), State::Open, "5xx are");
    let r = b
        .call_classified(classify, || async { Ok::<_, Status>(Status(200)) })
        .await;
    assert!(matches!(r, Err(CallError::Rejected(_))));
}

/// Trips `b`, lets the open duration pass, then has `per` concurrent callers on each breaker
/// ask at once; admitted probes hold their permit until every caller has asked. Returns how many
/// were admitted, after checking each admitted call is a probe.
async fn concurrent_probes(breakers: &[Breaker], clock: &ManualClock, per: usize) -> usize {
    let total = breakers.len() * per;
    let asked = Arc::new(tokio::sync::Barrier::new(total));
    let start = Arc::new(tokio::sync::Barrier::new(total));
    let mut handles = Vec::new();
    for b in breakers {
        for _ in 0..per {
            let (b, asked, start) = (b.clone(), Arc::clone(&asked), Arc::clone(&start));
            handles.push(tokio::spawn(async move {
                start.wait().await;
                let permit = b.acquire().await;
                asked.wait().await;
                match permit {
                    Ok(p) => {
                        assert!(p.is_probe(), "an admitted call in half-open is a probe");
                        p.success().await;
                        1
                    }
                    Err(r) => {
                        assert_eq!(r.state, State::HalfOpen);
                        0
                    }
                }
            }));
        }
    }
    let mut admitted = 0;
    for h in handles {
        admitted += h.await.unwrap();
    }
    let _ = clock;
    admitted
}

async fn breaker_half_open_admits_exactly_n_probes_locally(c: Ctx) {
    const PROBES: u32 = 3;
    let clock = ManualClock::new(START_MS);
    // The local state machine (no backend) and one shared instance.
    let local = Breaker::builder("local")
        .clock(Arc::new(clock.clone()))
        .open_duration(OPEN)
        .jitter(0.0)
        .probes(PROBES)
        .policy(Policy::ConsecutiveFailures(1))
        .build()
        .unwrap();
    let shared = builder(&c, &clock)
        .probes(PROBES)
        .policy(Policy::ConsecutiveFailures(1))
        .build()
        .unwrap();
    for b in [&local, &shared] {
        fail(b).await;
        assert!(b.acquire().await.is_err());
    }
    clock.advance(OPEN);
    for b in [local, shared] {
        let admitted = concurrent_probes(std::slice::from_ref(&b), &clock, 32).await;
        assert_eq!(admitted, PROBES as usize, "{:?}", b.mode());
        b.refresh().await;
        assert_eq!(b.state(), State::Closed, "N successful probes close it");
    }
}

async fn breaker_half_open_admits_exactly_n_probes_across_4_replicas(c: Ctx) {
    const PROBES: u32 = 2;
    const REPLICAS: usize = 4;
    let clock = ManualClock::new(START_MS);
    let replicas: Vec<Breaker> = (0..REPLICAS)
        .map(|_| {
            builder(&c, &clock)
                .probes(PROBES)
                .policy(Policy::ConsecutiveFailures(1))
                .build()
                .unwrap()
        })
        .collect();
    fail(&replicas[0]).await;
    for r in &replicas {
        r.refresh().await;
        assert_eq!(r.state(), State::Open);
    }
    clock.advance(OPEN);
    let admitted = concurrent_probes(&replicas, &clock, 8).await;
    assert_eq!(
        admitted, PROBES as usize,
        "exactly N probes across the fleet"
    );
    for r in &replicas {
        r.refresh().await;
        assert_eq!(r.state(), State::Closed);
    }
}

async fn breaker_probes_close_or_reopen_with_backoff(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let b = builder(&c, &clock)
        .policy(Policy::ConsecutiveFailures(1))
        .build()
        .unwrap();
    fail(&b).await;
    // Each failed probe re-opens for twice as long: 10 s, 20 s, 40 s, then the 80 s cap.
    for expected in [10, 20, 40, 80, 80] {
        let r = b.acquire().await.unwrap_err();
        assert_eq!(r.retry_after, Duration::from_secs(expected));
        clock.advance(Duration::from_secs(expected) - ms(1));
        assert!(b.acquire().await.is_err(), "still open 1 ms before the end");
        clock.advance(ms(1));
        let probe = b.acquire().await.unwrap();
        assert!(probe.is_probe());
        probe.failure().await;
        assert_eq!(b.state(), State::Open);
    }
    clock.advance(Duration::from_secs(80));
    b.acquire().await.unwrap().success().await;
    assert_eq!(b.state(), State::Closed);
    // Closing forgets the backoff: the next trip opens for the base duration again.
    fail(&b).await;
    assert_eq!(b.acquire().await.unwrap_err().retry_after, OPEN);

    // Jitter keeps the open duration within ±jitter of the backoff step.
    let jittery = Breaker::builder("jitter")
        .clock(Arc::new(clock.clone()))
        .open_duration(OPEN)
        .jitter(0.2)
        .policy(Policy::ConsecutiveFailures(1))
        .build()
        .unwrap();
    fail(&jittery).await;
    let after = jittery.acquire().await.unwrap_err().retry_after;
    assert!((ms(8_000)..=ms(12_000)).contains(&after), "{after:?}");
}

async fn breaker_hung_or_cancelled_probe_does_not_wedge(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let probe_timeout = ms(300);
    let local = Breaker::builder("local")
        .clock(Arc::new(clock.clone()))
        .open_duration(OPEN)
        .probe_timeout(Duration::from_secs(5))
        .jitter(0.0)
        .policy(Policy::ConsecutiveFailures(1))
        .build()
        .unwrap();
    let shared = builder(&c, &clock)
        .probe_timeout(probe_timeout)
        .policy(Policy::ConsecutiveFailures(1))
        .build()
        .unwrap();
    for b in [&local, &shared] {
        fail(b).await;
    }
    clock.advance(OPEN);
    for b in [&local, &shared] {
        // A probe whose future never completes, cancelled by dropping it.
        let b2 = b.clone();
        let (inside_tx, inside) = tokio::sync::oneshot::channel::<()>();
        let hung = tokio::spawn(async move {
            b2.call(|| async move {
                let _ = inside_tx.send(());
                std::future::pending::<Result<(), ()>>().await
            })
            .await
        });
        inside
            .await
            .expect("the hung call was admitted as the probe");
        assert!(b.acquire().await.is_err(), "it holds the only probe slot");
        hung.abort();
        let _ = hung.await;
        // The cancelled probe freed its slot (a shared one in a background task): bounded wait.
        let mut admitted = None;
        for _ in 0..200 {
            if let Ok(p) = b.acquire().await {
                admitted = Some(p);
                break;
            }
            tokio::time::sleep(ms(5)).await;
        }
        let probe = admitted.expect("a cancelled probe does not wedge the breaker");
        assert!(probe.is_probe());
        // Now a probe that hangs while holding its permit (never reported, never dropped).
        assert!(b.acquire().await.is_err());
        if b.mode() == Mode::Local {
            clock.advance(Duration::from_secs(5));
        } else {
            let_expire(probe_timeout).await;
        }
        let next = b
            .acquire()
            .await
            .expect("a hung probe's slot is given out again");
        next.success().await;
        b.refresh().await;
        assert_eq!(b.state(), State::Closed);
        // The hung probe finally answers (a failure): it is stale and changes nothing.
        probe.failure().await;
        b.refresh().await;
        assert_eq!(
            b.state(),
            State::Closed,
            "a stale probe's outcome is ignored"
        );
    }
}

/// A backend that fails every call with `Transient` while `down` is set.
struct Switchable {
    inner: Arc<dyn Backend>,
    down: AtomicBool,
}

impl Switchable {
    fn check(&self) -> crate::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Transient, "injected: backend down"));
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for Switchable {
    fn name(&self) -> &str {
        "switchable"
    }
    async fn get(&self, key: &[u8]) -> crate::Result<Option<Vec<u8>>> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn get_with_ttl(&self, key: &[u8]) -> crate::Result<Option<(Vec<u8>, Option<Duration>)>> {
        self.check()?;
        self.inner.get_with_ttl(key).await
    }
    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> crate::Result<()> {
        self.check()?;
        self.inner.set(key, value, ttl).await
    }
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> crate::Result<bool> {
        self.check()?;
        self.inner.set_nx(key, value, ttl).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> crate::Result<bool> {
        self.check()?;
        self.inner.compare_and_swap(key, expected, new, ttl).await
    }
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> crate::Result<bool> {
        self.check()?;
        self.inner.compare_and_delete(key, expected).await
    }
    async fn delete(&self, key: &[u8]) -> crate::Result<bool> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &[u8], delta: i64, ttl: Option<Duration>) -> crate::Result<i64> {
        self.check()?;
        self.inner.incr(key, delta, ttl).await
    }
    async fn expire(&self, key: &[u8], ttl: Duration) -> crate::Result<bool> {
        self.check()?;
        self.inner.expire(key, ttl).await
    }
    async fn persist(&self, key: &[u8]) -> crate::Result<bool> {
        self.check()?;
        self.inner.persist(key).await
    }
    async fn ttl(&self, key: &[u8]) -> crate::Result<Ttl> {
        self.check()?;
        self.inner.ttl(key).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> crate::Result<ScanPage> {
        self.check()?;
        self.inner.scan(prefix, cursor, limit).await
    }
    async fn now_ms(&self) -> crate::Result<u64> {
        self.check()?;
        self.inner.now_ms().await
    }
}

async fn breaker_backend_down_falls_back_to_local(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let backend = Arc::new(Switchable {
        inner: confined(&c),
        down: AtomicBool::new(false),
    });
    let b = Breaker::builder("svc")
        .shared(backend.clone())
        .clock(Arc::new(clock.clone()))
        .open_duration(OPEN)
        .jitter(0.0)
        .refresh_interval(REFRESH)
        .policy(Policy::ConsecutiveFailures(2))
        .build()
        .unwrap();
    succeed(&b).await;
    assert_eq!(b.mode(), Mode::Shared);
    backend.down.store(true, Ordering::SeqCst);
    // Calls still work; failures are counted locally and trip the local breaker.
    fail(&b).await;
    assert_eq!(
        b.mode(),
        Mode::LocalFallback,
        "the breaker says it fell back"
    );
    fail(&b).await;
    assert_eq!(
        b.state(),
        State::Open,
        "local mode still protects the caller"
    );
    assert!(b.acquire().await.is_err());
    clock.advance(OPEN);
    // Half-open with the backend down: a local probe.
    let probe = b.acquire().await.unwrap();
    assert!(probe.is_probe());
    probe.success().await;
    assert_eq!(b.state(), State::Closed);
    // The backend comes back: the next refresh returns to shared mode.
    backend.down.store(false, Ordering::SeqCst);
    clock.advance(REFRESH);
    succeed(&b).await;
    assert_eq!(b.mode(), Mode::Shared);
    fail(&b).await;
    fail(&b).await;
    assert_eq!(b.state(), State::Open);
    // And the trip is shared again.
    let other = builder(&c, &clock)
        .policy(Policy::ConsecutiveFailures(2))
        .build()
        .unwrap();
    assert!(other.acquire().await.is_err());
}

async fn breaker_force_reset_metrics_and_callbacks(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&changes);
    let b = builder(&c, &clock)
        .policy(Policy::ConsecutiveFailures(1))
        .on_state_change(move |ch| seen.lock().unwrap().push(ch))
        .build()
        .unwrap();
    let other = builder(&c, &clock)
        .policy(Policy::ConsecutiveFailures(1))
        .build()
        .unwrap();
    succeed(&b).await;
    b.force_open().await;
    assert_eq!(b.state(), State::ForcedOpen);
    clock.advance(Duration::from_secs(3600));
    assert!(
        b.acquire().await.is_err(),
        "forced open ignores the open duration"
    );
    other.refresh().await;
    assert_eq!(other.state(), State::ForcedOpen, "forcing is fleet-wide");
    b.force_closed().await;
    for _ in 0..5 {
        fail(&b).await;
    }
    assert_eq!(
        b.state(),
        State::ForcedClosed,
        "nothing trips a forced-closed breaker"
    );
    b.reset().await;
    assert_eq!(b.state(), State::Closed);
    fail(&b).await;
    assert_eq!(b.state(), State::Open);
    let m = b.metrics();
    assert_eq!(
        (m.calls, m.successes, m.failures, m.rejected),
        (7, 1, 6, 1),
        "{m:?}"
    );
    let changes = changes.lock().unwrap().clone();
    let expect = |from, to| StateChange { from, to };
    assert_eq!(
        changes,
        vec![
            expect(State::Closed, State::ForcedOpen),
            expect(State::ForcedOpen, State::ForcedClosed),
            expect(State::ForcedClosed, State::Closed),
            expect(State::Closed, State::Open),
        ]
    );
}

async fn breaker_keys_carry_ttls(c: Ctx) {
    let clock = ManualClock::new(START_MS);
    let b = builder(&c, &clock)
        .policy(Policy::ConsecutiveFailures(2))
        .policy(Policy::FailureRate {
            percent: 50,
            window: Window::Time(Duration::from_secs(10)),
            min_calls: 100,
        })
        .policy(Policy::FailureRate {
            percent: 50,
            window: Window::Calls(100),
            min_calls: 100,
        })
        .build()
        .unwrap();
    succeed(&b).await;
    fail(&b).await;
    fail(&b).await;
    clock.advance(OPEN);
    b.acquire().await.unwrap().success().await;
    let backend = confined(&c);
    let keys = scan_all(&*backend, b"breaker:svc:").await;
    assert!(keys.len() >= 5, "{keys:?}");
    for key in &keys {
        match backend.ttl(key).await.unwrap() {
            Ttl::Remaining(_) => {}
            other => panic!("{:?} has {other:?}", String::from_utf8_lossy(key)),
        }
    }
    // A forced state is an operator's decision: it does not expire.
    b.force_open().await;
    assert_eq!(
        backend.ttl(b"breaker:svc:state").await.unwrap(),
        Ttl::NoExpiry
    );
}
