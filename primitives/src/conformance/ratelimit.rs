//! Rate limiting, every strategy, on every backend.

use super::kv::collect_scan;
use super::*;
use crate::ratelimit::{ManualClock, Quota, RateLimitError, RateLimiter, Stacked, Strategy};

pub(super) fn cases() -> Vec<Case> {
    vec![
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
        case!(ratelimit_hot_key_never_fails_and_admits_exactly_the_quota),
        case!(ratelimit_hot_key_never_fails_on_the_windows_either),
        case!(ratelimit_a_negative_counter_never_admits_extra),
        case!(ratelimit_invalid_quota_is_refused_at_construction),
        case!(ratelimit_until_ready_waits_for_room_within_its_bound),
        case!(ratelimit_refund_gives_back_unused_cost),
        case!(ratelimit_step_matches_the_model),
        case!(ratelimit_stacked_step_is_all_or_nothing_under_concurrency),
    ]
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
                let state = format!("rl:{name}:fw:k");
                let stored = confined(&c).get(state.as_bytes()).await.unwrap();
                let expected = format!("F2:3600000:{}:5", RL_START_MS / 3_600_000);
                assert_eq!(
                    stored,
                    Some(expected.into_bytes()),
                    "{name}: denials were counted"
                );
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
    // clocks they disagree: the fixed window counts across two windows, the bucket refills
    // early.
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
    // The node behind counted one request in its (old) window before the node ahead started
    // the next; from then on the state names the later window and both count into it (they
    // never take turns resetting each other's window, which would admit without bound).
    assert_eq!(
        admitted, 11,
        "skewed local clocks let the fixed window over-admit at the boundary"
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
        // Big pages: the key lives 200 ms, and a shared server's keyspace may be large.
        assert_eq!(
            collect_scan(&*confined(&c), prefix.as_bytes(), SCAN_LIMIT_MAX)
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

/// 500 concurrent checks of one key, for GCRA and the token bucket (the compare-and-swap
/// strategies): no errors (a busy key never fails a decision), and exactly the quota admitted.
async fn ratelimit_hot_key_never_fails_and_admits_exactly_the_quota(c: Ctx) {
    hot_key(c, &[Strategy::Gcra, Strategy::TokenBucket]).await;
}

/// The same for the two window strategies (counters, `incr`).
async fn ratelimit_hot_key_never_fails_on_the_windows_either(c: Ctx) {
    hot_key(c, &[Strategy::FixedWindow, Strategy::SlidingWindow]).await;
}

async fn hot_key(c: Ctx, strategies: &[Strategy]) {
    const CHECKS: usize = 500;
    const QUOTA: u64 = 20;
    for &strategy in strategies {
        let name = strategy_name(strategy);
        let clock = ManualClock::new(RL_START_MS);
        let l = Arc::new(limiter_on(
            &c,
            name,
            strategy,
            Quota::per_hour(QUOTA),
            &clock,
        ));
        let start = Arc::new(tokio::sync::Barrier::new(CHECKS));
        let mut tasks = Vec::new();
        for _ in 0..CHECKS {
            let (l, start) = (Arc::clone(&l), Arc::clone(&start));
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                l.check("hot", 1).await
            }));
        }
        let mut admitted = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(d) if d.allowed => admitted += 1,
                Ok(_) => {}
                Err(e) => panic!("{name}: a check failed under contention: {e}"),
            }
        }
        assert_eq!(admitted, QUOTA, "{name}");
    }
}

/// A window counter left negative (the reproduction: an undo that landed after a
/// reset left it at -3) counts as absent, never as extra room: a limit of 5 admits 5, not 8.
/// Refunds never take a counter below zero either.
async fn ratelimit_a_negative_counter_never_admits_extra(c: Ctx) {
    let clock = ManualClock::new(RL_START_MS);
    let l = limiter_on(&c, "neg", Strategy::FixedWindow, Quota::per_hour(5), &clock);
    let b = confined(&c);
    let (first, reservation) = l.check_reserving("k", 1).await.unwrap();
    assert!(first.allowed);
    l.reset("k").await.unwrap();
    assert!(collect_scan(&*b, b"rl:neg:", 100).await.is_empty());
    // A refund landing after the reset has nothing to give back: no negative count appears.
    reservation.expect("admitted").refund().await.unwrap();
    assert!(collect_scan(&*b, b"rl:neg:", 100).await.is_empty());
    // The state as a lost race of an older version could have left it.
    let index = RL_START_MS / 3_600_000;
    let state = b"rl:neg:fw:k";
    b.set(
        state,
        format!("F2:3600000:{index}:-3").as_bytes(),
        Some(HOUR),
    )
    .await
    .unwrap();
    let mut admitted = 0;
    for _ in 0..10 {
        if l.check("k", 1).await.unwrap().allowed {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);
    let stored = b.get(state).await.unwrap().unwrap();
    assert_eq!(
        stored,
        format!("F2:3600000:{index}:5").into_bytes(),
        "the state was repaired"
    );
}

/// The backend's rate-limit step (native where the backend has one) gives exactly the
/// answers, and stores exactly the states, of the model in `backend::rate`: a seeded random
/// walk of steps over every algorithm, single rules and stacks, quotas small and huge (the
/// huge ones are outside what Lua's doubles compute exactly, so Redis and Valkey take the
/// default step for them), times that go forward and, a little, back.
async fn ratelimit_step_matches_the_model(c: Ctx) {
    use crate::backend::rate::{self, RateAlgorithm, RateMode, RateRule};
    use rand::{Rng, SeedableRng};
    // A whole day, so windows of 1 h, 2 h and 1 day all start here; steps come within the first
    // 30 minutes, so every state written lives at least that long on the backend's clock.
    const DAY_START_MS: u64 = 1_699_920_000_000;
    let b = confined(&c);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b65_656c);
    let algorithms = [
        RateAlgorithm::FixedWindow,
        RateAlgorithm::SlidingWindow,
        RateAlgorithm::TokenBucket,
        RateAlgorithm::Gcra,
    ];
    let keys: Vec<Vec<u8>> = (0..6)
        .map(|i| format!("model:{{s}}:{i}").into_bytes())
        .collect();
    let mut fallback_rules = 0;
    for step in 0..160 {
        let n = if rng.random_bool(0.3) {
            rng.random_range(2..=3)
        } else {
            1
        };
        let mut picked: Vec<usize> = Vec::new();
        while picked.len() < n {
            let k = rng.random_range(0..keys.len());
            if !picked.contains(&k) {
                picked.push(k);
            }
        }
        let rules: Vec<RateRule<'_>> = picked
            .iter()
            .map(|&k| {
                // A key keeps one algorithm and mostly one quota, so states build up.
                let algorithm = algorithms[k % algorithms.len()];
                let huge = k == 5;
                let period_ms = [3_600_000, 7_200_000, 86_400_000][k % 3];
                let (limit, burst) = if huge {
                    (1 << 40, 1 << 40)
                } else {
                    ([7, 12, 30][rng.random_range(0..3)], [7, 12, 30][k % 3])
                };
                let capacity = match algorithm {
                    RateAlgorithm::FixedWindow | RateAlgorithm::SlidingWindow => limit,
                    _ => burst,
                };
                let cost = if huge {
                    rng.random_range(capacity / 8..=capacity / 3)
                } else {
                    rng.random_range(0..=capacity.min(4))
                };
                RateRule {
                    key: &keys[k],
                    algorithm,
                    limit,
                    period_ms,
                    burst,
                    cost,
                }
            })
            .collect();
        fallback_rules += rules.iter().filter(|r| !r.exact_in_f64()).count();
        let at = DAY_START_MS + rng.random_range(0..1_800_000);
        let mode = if rng.random_bool(0.8) {
            RateMode::Consume
        } else {
            RateMode::Peek
        };
        let mut before = Vec::new();
        for rule in &rules {
            before.push(b.get(rule.key).await.unwrap());
        }
        let refs: Vec<Option<&[u8]>> = before.iter().map(Option::as_deref).collect();
        let (expected, writes) = rate::decide(&rules, &refs, at, mode);
        let got = b.rate_limit(&rules, mode, Some(at)).await.unwrap();
        assert_eq!(got, expected, "step {step}: {rules:?} at {at} {mode:?}");
        for ((rule, old), write) in rules.iter().zip(&before).zip(&writes) {
            let now = b.get(rule.key).await.unwrap();
            let want = write
                .as_ref()
                .map(|w| w.value.clone())
                .or_else(|| old.clone());
            assert_eq!(
                now.as_deref().map(String::from_utf8_lossy),
                want.as_deref().map(String::from_utf8_lossy),
                "step {step}: state of {:?}",
                String::from_utf8_lossy(rule.key)
            );
        }
    }
    assert!(fallback_rules > 0, "the walk covers quotas outside f64");
}

/// Two policies on one backend handle are decided in one step: under a flood of concurrent
/// requests the stack admits exactly the tighter quota, and the looser policy is charged for
/// exactly the admitted requests (a denial never consumed from it, not even for a moment
/// that a concurrent request could see).
async fn ratelimit_stacked_step_is_all_or_nothing_under_concurrency(c: Ctx) {
    let b = confined(&c);
    let clock = ManualClock::new(RL_START_MS);
    let loose = RateLimiter::new(Arc::clone(&b), "loose", Strategy::Gcra, Quota::per_hour(20))
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    let tight = RateLimiter::new(
        Arc::clone(&b),
        "tight",
        Strategy::FixedWindow,
        Quota::per_hour(7),
    )
    .unwrap()
    .with_clock(Arc::new(clock.clone()));
    let stack = Arc::new(Stacked::new(vec![loose.clone(), tight]).unwrap());
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let stack = Arc::clone(&stack);
        tasks.push(tokio::spawn(async move {
            let d = stack.check("{k}", 1).await.unwrap();
            // Every denial saw the loose policy with nothing consumed by other denials.
            if !d.allowed {
                let all = stack
                    .check_all("{k}", 0, &Default::default())
                    .await
                    .unwrap();
                assert!(all.policies[0].decision.remaining >= 13, "{all:?}");
            }
            d.allowed
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.unwrap());
    }
    assert_eq!(admitted, 7);
    assert_eq!(loose.peek("{k}").await.unwrap().remaining, 13);
}

/// A quota that can never work is a construction error, not a failure on every check.
async fn ratelimit_invalid_quota_is_refused_at_construction(c: Ctx) {
    let b = confined(&c);
    for bad in [
        Quota::per_second(0),
        Quota::per_second(10).with_burst(0),
        Quota::new(10, Duration::ZERO),
    ] {
        assert!(matches!(
            bad.validate(),
            Err(RateLimitError::InvalidQuota { .. })
        ));
        let built = RateLimiter::new(Arc::clone(&b), "bad", Strategy::Gcra, bad);
        assert!(
            matches!(built, Err(RateLimitError::InvalidQuota { .. })),
            "{bad:?}: {built:?}"
        );
    }
    Quota::per_second(10).validate().unwrap();
}

/// `until_ready` waits out a denial that fits in its bound (on the backend's clock: real
/// time passes, 200 ms), and returns a denial that does not fit at once.
async fn ratelimit_until_ready_waits_for_room_within_its_bound(c: Ctx) {
    let l = RateLimiter::new(confined(&c), "ready", Strategy::Gcra, Quota::per_second(5)).unwrap();
    for _ in 0..5 {
        assert!(l.check("k", 1).await.unwrap().allowed);
    }
    let denied = l.until_ready("k", 1, ms(10)).await.unwrap();
    assert!(
        !denied.allowed,
        "a wait of 10 ms cannot cover a 200 ms retry"
    );
    let started = Instant::now();
    let admitted = l.until_ready("k", 1, Duration::from_secs(5)).await.unwrap();
    assert!(admitted.allowed);
    assert!(started.elapsed() >= ms(100), "it waited for the room");
}

/// A reserved cost refunded is available again, for every strategy.
async fn ratelimit_refund_gives_back_unused_cost(c: Ctx) {
    for strategy in STRATEGIES {
        let name = strategy_name(strategy);
        let clock = ManualClock::new(RL_START_MS);
        let l = limiter_on(
            &c,
            &format!("refund-{name}"),
            strategy,
            Quota::per_hour(3),
            &clock,
        );
        let (first, reservation) = l.check_reserving("k", 2).await.unwrap();
        assert!(first.allowed, "{name}");
        assert_eq!(l.peek("k").await.unwrap().remaining, 1, "{name}");
        reservation.expect("admitted").refund().await.unwrap();
        assert_eq!(l.peek("k").await.unwrap().remaining, 3, "{name}: refunded");
        let (denied, none) = l.check_reserving("k", 4).await.map_or_else(
            |e| {
                assert!(matches!(e, RateLimitError::CostOverCapacity { .. }), "{e}");
                (None, None)
            },
            |(d, r)| (Some(d), r),
        );
        assert!(denied.is_none() && none.is_none(), "{name}");
    }
}
