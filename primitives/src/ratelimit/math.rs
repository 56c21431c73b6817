//! The arithmetic of each strategy, as pure functions of (quota, stored state, now, cost), so
//! it can be tested exhaustively without a backend. Integer arithmetic only (u128/i128 where
//! products can exceed 64 bits): no rounding drift, and the same answer on every node.
//!
//! Units. Time is whole milliseconds. GCRA keeps its theoretical arrival time (TAT) scaled by
//! the quota's `limit`, so the emission interval `period / limit` is the integer `period_ms`.
//! The token bucket counts tokens scaled by `period_ms`, so the refill rate `limit / period`
//! is the integer `limit` units per millisecond.

/// A validated quota in integer units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    /// Requests (cost units) per period.
    pub limit: u64,
    /// The period (window) in ms, at least 1.
    pub period_ms: u64,
    /// Bucket capacity (token bucket, GCRA), at least 1.
    pub burst: u64,
}

/// A strategy's answer, before it is dressed up as a `Decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub allowed: bool,
    pub remaining: u64,
    pub reset_after_ms: u64,
    pub retry_after_ms: Option<u64>,
}

fn to_u64(n: i128) -> u64 {
    u64::try_from(n.max(0)).unwrap_or(u64::MAX)
}

fn to_u64_wide(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn ceil_div(n: u128, d: u128) -> u128 {
    n.div_ceil(d.max(1))
}

/// Which fixed window `now_ms` falls in and how far into it: `(index, elapsed_ms)`.
pub(crate) fn window(p: &Params, now_ms: u64) -> (u64, u64) {
    (now_ms / p.period_ms, now_ms % p.period_ms)
}

/// Fixed window: `count` is the window's counter before this request.
pub(crate) fn fixed_window(p: &Params, elapsed_ms: u64, count: i64, cost: u64) -> Verdict {
    let limit = i128::from(p.limit);
    let count = i128::from(count.max(0));
    let cost = i128::from(cost);
    let reset = p.period_ms - elapsed_ms;
    if count + cost <= limit {
        Verdict {
            allowed: true,
            remaining: to_u64(limit - count - cost),
            reset_after_ms: reset,
            retry_after_ms: None,
        }
    } else {
        // cost <= limit is checked before, so the next window admits it.
        Verdict {
            allowed: false,
            remaining: to_u64(limit - count),
            reset_after_ms: reset,
            retry_after_ms: Some(reset),
        }
    }
}

/// Sliding window (two-window weighted counter): `prev` and `curr` are the previous and
/// current windows' counters before this request; the estimate is
/// `prev * (period - elapsed) / period + curr`, compared exactly (scaled by the period).
pub(crate) fn sliding_window(
    p: &Params,
    elapsed_ms: u64,
    prev: i64,
    curr: i64,
    cost: u64,
) -> Verdict {
    let w = i128::from(p.period_ms);
    let e = i128::from(elapsed_ms);
    let limit = i128::from(p.limit);
    let prev = i128::from(prev.max(0));
    let curr = i128::from(curr.max(0));
    let cost = i128::from(cost);
    // Admit iff prev*(w-e) + (curr+cost)*w <= limit*w, i.e. curr + cost <= floor(budget / w).
    let budget = limit * w - prev * (w - e);
    let available = budget.div_euclid(w) - curr;
    let allowed = cost <= available;
    let curr_after = if allowed { curr + cost } else { curr };
    // Back to the full limit once every counted request has slid out.
    let reset = if curr_after > 0 {
        2 * w - e
    } else if prev > 0 {
        w - e
    } else {
        0
    };
    let retry_after_ms = if allowed {
        None
    } else {
        // Later in this window the previous window weighs less: the first elapsed e1 with
        // prev*(w-e1) <= (limit-curr-cost)*w.
        let slack = limit - curr - cost;
        let in_window = if slack >= 0 && prev > 0 {
            let e1 = w - (slack * w).div_euclid(prev);
            (e1 < w).then_some(e1 - e)
        } else {
            None
        };
        // Otherwise in the next window, where today's count is the previous window's.
        let wait = in_window.unwrap_or_else(|| {
            let e2 = if curr == 0 {
                0
            } else {
                (w - ((limit - cost) * w).div_euclid(curr)).max(0)
            };
            (w - e) + e2
        });
        Some(to_u64(wait))
    };
    Verdict {
        allowed,
        remaining: to_u64(if allowed { available - cost } else { available }),
        reset_after_ms: to_u64(reset),
        retry_after_ms,
    }
}

/// GCRA: `tat` is the stored theoretical arrival time (ms × limit). Returns the verdict and
/// the TAT to store if allowed.
pub(crate) fn gcra(p: &Params, tat: Option<u128>, now_ms: u64, cost: u64) -> (Verdict, u128) {
    let limit = u128::from(p.limit);
    let interval = u128::from(p.period_ms); // emission interval, scaled by limit
    let capacity = u128::from(p.burst) * interval;
    let now = u128::from(now_ms) * limit;
    let base = tat.map_or(now, |t| t.max(now));
    let next = base + u128::from(cost) * interval;
    let allowed = next - now <= capacity;
    let after = if allowed { next } else { base };
    let ahead = after - now;
    let verdict = Verdict {
        allowed,
        remaining: to_u64_wide(capacity.saturating_sub(ahead) / interval),
        reset_after_ms: to_u64_wide(ceil_div(ahead, limit)),
        retry_after_ms: (!allowed).then(|| to_u64_wide(ceil_div(next - now - capacity, limit))),
    };
    (verdict, after)
}

/// Token bucket: `state` is `(level, last_ms)` with the level in tokens × period_ms. Returns
/// the verdict and the state to store if allowed.
pub(crate) fn token_bucket(
    p: &Params,
    state: Option<(u128, u64)>,
    now_ms: u64,
    cost: u64,
) -> (Verdict, (u128, u64)) {
    let rate = u128::from(p.limit); // units per ms
    let unit = u128::from(p.period_ms); // units per token
    let capacity = u128::from(p.burst) * unit;
    let (level, last) = state.unwrap_or((capacity, now_ms));
    let elapsed = u128::from(now_ms.saturating_sub(last));
    let level = level
        .min(capacity)
        .saturating_add(elapsed * rate)
        .min(capacity);
    let need = u128::from(cost) * unit;
    let allowed = need <= level;
    let after = if allowed { level - need } else { level };
    let verdict = Verdict {
        allowed,
        remaining: to_u64_wide(after / unit),
        reset_after_ms: to_u64_wide(ceil_div(capacity - after, rate)),
        retry_after_ms: (!allowed).then(|| to_u64_wide(ceil_div(need - level, rate))),
    };
    (verdict, (after, last.max(now_ms)))
}

/// Gives back a GCRA admission of `cost`: the TAT moves back by `cost` intervals, never
/// before now. Returns the TAT and its TTL in ms.
pub(crate) fn gcra_refund(p: &Params, tat: u128, now_ms: u64, cost: u64) -> (u128, u64) {
    let limit = u128::from(p.limit);
    let now = u128::from(now_ms) * limit;
    let back = u128::from(cost) * u128::from(p.period_ms);
    let tat = tat.saturating_sub(back).max(now);
    (tat, to_u64_wide(ceil_div(tat - now, limit)))
}

/// Gives back a token bucket admission of `cost`, capped at the burst. Returns the state and
/// its TTL in ms.
pub(crate) fn bucket_refund(
    p: &Params,
    (level, last): (u128, u64),
    now_ms: u64,
    cost: u64,
) -> ((u128, u64), u64) {
    let rate = u128::from(p.limit);
    let unit = u128::from(p.period_ms);
    let capacity = u128::from(p.burst) * unit;
    let elapsed = u128::from(now_ms.saturating_sub(last));
    let level = level.min(capacity).saturating_add(elapsed * rate);
    let level = level.saturating_add(u128::from(cost) * unit).min(capacity);
    let ttl_ms = to_u64_wide(ceil_div(capacity - level, rate));
    ((level, last.max(now_ms)), ttl_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Params = Params {
        limit: 10,
        period_ms: 1000,
        burst: 10,
    };

    #[test]
    fn fixed_window_admits_up_to_the_limit() {
        assert!(fixed_window(&P, 0, 9, 1).allowed);
        let v = fixed_window(&P, 250, 10, 1);
        assert!(!v.allowed);
        assert_eq!(v.remaining, 0);
        assert_eq!(v.retry_after_ms, Some(750));
        let v = fixed_window(&P, 250, 7, 4);
        assert!(!v.allowed, "cost 4 over 3 left");
        assert_eq!(v.remaining, 3);
        assert_eq!(fixed_window(&P, 0, 7, 3).remaining, 0);
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        // Previous window full, half way through: half the limit is left.
        let v = sliding_window(&P, 500, 10, 0, 1);
        assert!(v.allowed);
        assert_eq!(v.remaining, 4);
        assert!(sliding_window(&P, 500, 10, 4, 1).allowed);
        let v = sliding_window(&P, 500, 10, 5, 1);
        assert!(!v.allowed);
        // 10*(1000-e) + 6*1000 <= 10_000 at e = 600: 100 ms later.
        assert_eq!(v.retry_after_ms, Some(100));
        let v = sliding_window(&P, 600, 10, 5, 1);
        assert!(v.allowed);
    }

    #[test]
    fn sliding_window_retry_crosses_into_the_next_window() {
        // Current window full: wait for the window to end, then for it to weigh little enough.
        let v = sliding_window(&P, 200, 0, 10, 1);
        assert!(!v.allowed);
        // Next window: 10*(1000-e2) <= 9*1000 at e2 = 100.
        assert_eq!(v.retry_after_ms, Some(800 + 100));
        assert!(!sliding_window(&P, 999, 0, 10, 1).allowed);
        assert!(!sliding_window(&P, 99, 10, 0, 1).allowed);
        assert!(sliding_window(&P, 100, 10, 0, 1).allowed);
        // A cost equal to the limit needs both windows empty.
        let v = sliding_window(&P, 200, 0, 3, 10);
        assert!(!v.allowed);
        assert_eq!(v.retry_after_ms, Some(800 + 1000));
    }

    #[test]
    fn sliding_window_retry_is_exact() {
        // Brute force: the first ms at which the same request is allowed.
        for prev in 0..=10i64 {
            for curr in 0..=10i64 {
                for cost in 1..=10u64 {
                    for e in [0u64, 1, 333, 500, 999] {
                        let v = sliding_window(&P, e, prev, curr, cost);
                        if v.allowed {
                            continue;
                        }
                        let retry = v.retry_after_ms.unwrap();
                        let first = (1..=3000u64)
                            .find(|d| {
                                let t = e + d;
                                let (p2, c2, e2) = match t / 1000 {
                                    0 => (prev, curr, t),
                                    1 => (curr, 0, t - 1000),
                                    _ => (0, 0, t % 1000),
                                };
                                sliding_window(&P, e2, p2, c2, cost).allowed
                            })
                            .unwrap();
                        assert_eq!(retry, first, "prev {prev} curr {curr} cost {cost} e {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn gcra_admits_the_burst_then_one_per_interval() {
        let mut tat = None;
        for i in 0..10 {
            let (v, t) = gcra(&P, tat, 1_000_000, 1);
            assert!(v.allowed, "request {i}");
            assert_eq!(v.remaining, 9 - i);
            tat = Some(t);
        }
        let (v, _) = gcra(&P, tat, 1_000_000, 1);
        assert!(!v.allowed);
        assert_eq!(v.retry_after_ms, Some(100));
        assert_eq!(v.reset_after_ms, 1000);
        let (v, _) = gcra(&P, tat, 1_000_099, 1);
        assert!(!v.allowed);
        let (v, _) = gcra(&P, tat, 1_000_100, 1);
        assert!(v.allowed);
    }

    #[test]
    fn gcra_and_token_bucket_agree() {
        let p = Params {
            limit: 7,
            period_ms: 3000,
            burst: 5,
        };
        let mut tat = None;
        let mut bucket = None;
        let mut now = 5_000_000u64;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            now += seed % 700;
            let cost = 1 + (seed >> 20) % 5;
            let (g, t) = gcra(&p, tat, now, cost);
            let (b, s) = token_bucket(&p, bucket, now, cost);
            assert_eq!(g, b, "at {now} cost {cost}");
            if g.allowed {
                tat = Some(t);
                bucket = Some(s);
            }
        }
    }

    #[test]
    fn token_bucket_refills_at_the_rate_and_caps_at_the_burst() {
        let (v, s) = token_bucket(&P, None, 0, 10);
        assert!(v.allowed);
        assert_eq!(v.remaining, 0);
        assert_eq!(v.reset_after_ms, 1000);
        let (v, _) = token_bucket(&P, Some(s), 99, 1);
        assert!(!v.allowed);
        assert_eq!(v.retry_after_ms, Some(1));
        let (v, _) = token_bucket(&P, Some(s), 100, 1);
        assert!(v.allowed);
        let (v, _) = token_bucket(&P, Some(s), 1_000_000, 1);
        assert_eq!(v.remaining, 9, "capped at the burst");
    }

    #[test]
    fn refunds_undo_an_admission() {
        let (_, tat) = gcra(&P, None, 1000, 3);
        let (back, ttl) = gcra_refund(&P, tat, 1000, 3);
        assert_eq!(back, 1000 * 10, "back to now: a full bucket");
        assert_eq!(ttl, 0);
        let (_, state) = token_bucket(&P, None, 1000, 3);
        let ((level, _), ttl) = bucket_refund(&P, state, 1000, 3);
        assert_eq!(level, 10 * 1000);
        assert_eq!(ttl, 0);
        let (_, state) = token_bucket(&P, None, 1000, 5);
        let ((level, _), ttl) = bucket_refund(&P, state, 1000, 2);
        assert_eq!(level, 7 * 1000);
        assert_eq!(ttl, 300);
    }
}
