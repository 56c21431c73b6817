//! The contract's atomic rate-limit step ([`Backend::rate_limit`]): the rules, the stored
//! state every backend shares, the decision as a pure function ([`decide`]), and the default
//! implementation on compare-and-swap ([`rate_limit_cas`]) that a backend without a native
//! step inherits.
//!
//! # One step, every backend
//! A step takes one or more [`RateRule`]s (a key, an algorithm, a quota, a cost) and decides
//! them together at one instant of the backend's clock: in [`RateMode::Consume`] the request
//! is admitted only if every rule admits it, and then every rule's state is updated; a denial
//! writes nothing anywhere. [`RateMode::Peek`] writes nothing either way. The native steps
//! (a Lua script on Redis and Valkey, a server-side function on Postgres, the shard locks on
//! the embedded engine, a transaction on sled and redb) do this in one round trip; the default
//! takes a clock read, a read per rule and a compare-and-swap per rule, retried with jittered
//! backoff when another decision on the same key wins (never a failure for being busy).
//!
//! # Stored state
//! One key per rule, holding ASCII text that the Rust, Lua and SQL implementations read and
//! write alike (integers in decimal):
//!
//! | algorithm | value |
//! |---|---|
//! | fixed window | `F2:{period_ms}:{window index}:{count}` |
//! | sliding window | `S2:{period_ms}:{window index}:{current count}:{previous count}` |
//! | token bucket | `T2:{level, in tokens × period_ms}:{last refill, Unix ms}:{period_ms}` |
//! | GCRA | `G2:{theoretical arrival time, Unix ms}:{fraction, in 1/limit ms}:{limit}` |
//!
//! A value that is not in this form (another program's, or an older keel's binary state) is
//! treated as absent and overwritten by the next admission. When a key's quota changes, a
//! window counter of another period starts afresh, a bucket keeps its whole tokens (at most
//! the new burst) and a GCRA arrival time keeps its whole milliseconds. A state's TTL is the
//! time until it no longer matters (the bucket is full again; a window's state lives until
//! the end of the next window), so an idle key leaves nothing behind. A window state naming a
//! later window than the decision's "now" (written by a node whose clock runs ahead) moves
//! the decision forward to that window's start.
//!
//! The arithmetic is [`crate::ratelimit`]'s exact integer model: the native steps compute the
//! same answers (the conformance suite compares them on every backend).

use std::time::Duration;

use super::{Backend, TTL_MAX, TtlPolicy};
use crate::error::{Error, ErrorKind, Result};
use crate::ratelimit::math::{self, Params, Verdict};

/// Most rules one step may decide.
pub const RATE_RULES_MAX: usize = 16;

const TTL_MAX_MS: u64 = TTL_MAX.as_secs() * 1000;
/// Native steps that compute in IEEE doubles (Lua) are exact while every scaled quantity stays
/// below this bound; [`RateRule::exact_in_f64`] tells which rules qualify.
const F64_EXACT_BOUND: u128 = 1 << 50;

/// How a rule counts (the semantics of each are [`crate::ratelimit::Strategy`]'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RateAlgorithm {
    /// One counter per window.
    FixedWindow,
    /// Two-window weighted counter.
    SlidingWindow,
    /// `burst` tokens refilled at `limit` per period.
    TokenBucket,
    /// Generic cell rate algorithm.
    Gcra,
}

impl RateAlgorithm {
    /// The one-letter code the native scripts use.
    pub fn code(self) -> &'static str {
        match self {
            RateAlgorithm::FixedWindow => "f",
            RateAlgorithm::SlidingWindow => "s",
            RateAlgorithm::TokenBucket => "t",
            RateAlgorithm::Gcra => "g",
        }
    }
}

/// One policy of a step: `cost` units against `key`'s state under `limit` per `period_ms`
/// (bucket capacity `burst` for the token bucket and GCRA; the windows ignore it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateRule<'a> {
    /// The state key (one per rule; keys in one step must be distinct).
    pub key: &'a [u8],
    /// How it counts.
    pub algorithm: RateAlgorithm,
    /// Requests (cost units) per period, 1 to 2^40.
    pub limit: u64,
    /// The period in ms, at least 1.
    pub period_ms: u64,
    /// Bucket capacity, 1 to 2^40.
    pub burst: u64,
    /// What this request costs; at most the capacity (`limit` for windows, `burst` else).
    pub cost: u64,
}

impl RateRule<'_> {
    fn params(&self) -> Params {
        Params {
            limit: self.limit,
            period_ms: self.period_ms,
            burst: self.burst,
        }
    }

    /// The most `cost` can be.
    pub fn capacity(&self) -> u64 {
        match self.algorithm {
            RateAlgorithm::FixedWindow | RateAlgorithm::SlidingWindow => self.limit,
            RateAlgorithm::TokenBucket | RateAlgorithm::Gcra => self.burst,
        }
    }

    /// Whether a native step computing in IEEE doubles (Redis's Lua) decides this rule
    /// exactly: every scaled quantity (`limit × period`, `burst × period`) stays below 2^50.
    /// Rules outside it (a limit of billions over days) go through the default step there.
    pub fn exact_in_f64(&self) -> bool {
        let period = u128::from(self.period_ms);
        u128::from(self.limit) * period < F64_EXACT_BOUND
            && u128::from(self.burst) * period < F64_EXACT_BOUND
    }
}

/// Whether a step consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateMode {
    /// Admit and count if every rule admits; otherwise write nothing.
    Consume,
    /// Decide, write nothing.
    Peek,
}

/// One rule's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateVerdict {
    /// Whether this rule alone admits the cost.
    pub allowed: bool,
    /// What is left: after this request if the step consumed, else as it is now.
    pub remaining: u64,
    /// Until the rule is back to its full quota, in ms (same "if consumed" rule).
    pub reset_after_ms: u64,
    /// When denied: until the cost would be admitted, in ms.
    pub retry_after_ms: Option<u64>,
}

impl From<Verdict> for RateVerdict {
    fn from(v: Verdict) -> Self {
        RateVerdict {
            allowed: v.allowed,
            remaining: v.remaining,
            reset_after_ms: v.reset_after_ms,
            retry_after_ms: v.retry_after_ms,
        }
    }
}

/// A step's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateOutcome {
    /// The instant it was decided at (the backend's clock, or the one given).
    pub now_ms: u64,
    /// Whether every rule admitted (in [`RateMode::Consume`]: and the cost was counted).
    pub admitted: bool,
    /// Each rule's verdict, in rule order. Remaining and reset show the state after the step:
    /// consumed if admitted in `Consume` mode, untouched otherwise.
    pub verdicts: Vec<RateVerdict>,
}

/// A state to store for one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateWrite {
    /// The new state.
    pub value: Vec<u8>,
    /// Its TTL; `None`: keep the key's current TTL.
    pub ttl: Option<Duration>,
}

impl RateWrite {
    /// The TTL policy to write it with.
    pub fn ttl_policy(&self) -> TtlPolicy {
        match self.ttl {
            Some(ttl) => TtlPolicy::Set(ttl),
            None => TtlPolicy::Keep,
        }
    }
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidInput, message)
}

/// Checks a step's rules: 1 to [`RATE_RULES_MAX`] of them, distinct keys, valid quotas,
/// costs within capacity.
///
/// # Errors
/// [`ErrorKind::InvalidInput`] naming the broken rule.
pub fn validate(rules: &[RateRule<'_>]) -> Result<()> {
    if rules.is_empty() || rules.len() > RATE_RULES_MAX {
        return Err(invalid(format!(
            "a rate-limit step takes 1 to {RATE_RULES_MAX} rules, not {}",
            rules.len()
        )));
    }
    for (i, rule) in rules.iter().enumerate() {
        let max = crate::ratelimit::QUOTA_LIMIT_MAX;
        if rule.limit == 0 || rule.limit > max || rule.burst == 0 || rule.burst > max {
            return Err(invalid(format!(
                "rate rule {i}: limit {} and burst {} must be 1..={max}",
                rule.limit, rule.burst
            )));
        }
        if rule.period_ms == 0 || rule.period_ms > TTL_MAX_MS / 2 {
            return Err(invalid(format!(
                "rate rule {i}: period {} ms is outside 1..={} ms",
                rule.period_ms,
                TTL_MAX_MS / 2
            )));
        }
        if rule.cost > rule.capacity() {
            return Err(invalid(format!(
                "rate rule {i}: cost {} is over the capacity {}",
                rule.cost,
                rule.capacity()
            )));
        }
        if rules[..i].iter().any(|r| r.key == rule.key) {
            return Err(invalid(format!(
                "rate rule {i} repeats an earlier rule's key"
            )));
        }
    }
    Ok(())
}

/// The parsed state of one rule's key, in the rule's current scale.
#[derive(Debug, Clone, Copy)]
enum State {
    Fixed { index: u64, count: u64 },
    Sliding { index: u64, curr: u64, prev: u64 },
    Bucket { level: u128, last: u64 },
    Gcra { tat: u128 },
}

fn fields<const N: usize>(raw: &[u8], tag: &str) -> Option<[u64; N]> {
    let text = std::str::from_utf8(raw).ok()?;
    let rest = text.strip_prefix(tag)?.strip_prefix(':')?;
    let mut out = [0u64; N];
    let mut parts = rest.split(':');
    for slot in &mut out {
        let part = parts.next()?;
        // Plain decimal digits only, as every implementation writes them.
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = part.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse(rule: &RateRule<'_>, raw: Option<&[u8]>) -> Option<State> {
    let raw = raw?;
    match rule.algorithm {
        RateAlgorithm::FixedWindow => {
            let [period, index, count] = fields::<3>(raw, "F2")?;
            (period == rule.period_ms).then_some(State::Fixed { index, count })
        }
        RateAlgorithm::SlidingWindow => {
            let [period, index, curr, prev] = fields::<4>(raw, "S2")?;
            (period == rule.period_ms).then_some(State::Sliding { index, curr, prev })
        }
        RateAlgorithm::TokenBucket => {
            let [level, last, period] = fields::<3>(raw, "T2")?;
            if period == 0 {
                return None;
            }
            let level = if period == rule.period_ms {
                u128::from(level)
            } else {
                // Whole tokens survive a change of period, at most the burst.
                u128::from((level / period).min(rule.burst)) * u128::from(rule.period_ms)
            };
            Some(State::Bucket { level, last })
        }
        RateAlgorithm::Gcra => {
            let [tat_ms, frac, limit] = fields::<3>(raw, "G2")?;
            let base = u128::from(tat_ms) * u128::from(rule.limit);
            let tat = if limit == rule.limit && frac < rule.limit {
                base + u128::from(frac)
            } else {
                base // whole milliseconds survive a change of limit
            };
            Some(State::Gcra { tat })
        }
    }
}

/// Clamps a counter read from storage to what an i64-based model accepts.
fn count_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One rule's verdict for `cost` at `now_ms`, and the state to store if it is counted.
fn judge(
    rule: &RateRule<'_>,
    state: Option<State>,
    now_ms: u64,
    cost: u64,
) -> (Verdict, String, u64) {
    let p = rule.params();
    match rule.algorithm {
        RateAlgorithm::FixedWindow => {
            let now_ms = window_now(&p, state, now_ms);
            let (index, elapsed) = math::window(&p, now_ms);
            let count = match state {
                Some(State::Fixed { index: i, count }) if i == index => count,
                _ => 0,
            };
            let verdict = math::fixed_window(&p, elapsed, count_i64(count), cost);
            let next = count.saturating_add(cost);
            let ttl = window_ttl(&p, elapsed);
            (verdict, format!("F2:{}:{index}:{next}", p.period_ms), ttl)
        }
        RateAlgorithm::SlidingWindow => {
            let now_ms = window_now(&p, state, now_ms);
            let (index, elapsed) = math::window(&p, now_ms);
            let (curr, prev) = match state {
                Some(State::Sliding {
                    index: i,
                    curr,
                    prev,
                }) if i == index => (curr, prev),
                Some(State::Sliding { index: i, curr, .. }) if i.checked_add(1) == Some(index) => {
                    (0, curr)
                }
                _ => (0, 0),
            };
            let verdict = math::sliding_window(&p, elapsed, count_i64(prev), count_i64(curr), cost);
            let next = curr.saturating_add(cost);
            let ttl = window_ttl(&p, elapsed);
            (
                verdict,
                format!("S2:{}:{index}:{next}:{prev}", p.period_ms),
                ttl,
            )
        }
        RateAlgorithm::TokenBucket => {
            let state = match state {
                Some(State::Bucket { level, last }) => Some((level, last)),
                _ => None,
            };
            let (verdict, (level, last)) = math::token_bucket(&p, state, now_ms, cost);
            let ttl = verdict.reset_after_ms;
            (verdict, format!("T2:{level}:{last}:{}", p.period_ms), ttl)
        }
        RateAlgorithm::Gcra => {
            let tat = match state {
                Some(State::Gcra { tat }) => Some(tat),
                _ => None,
            };
            let (verdict, tat) = math::gcra(&p, tat, now_ms, cost);
            let limit = u128::from(p.limit);
            let ttl = verdict.reset_after_ms;
            (
                verdict,
                format!("G2:{}:{}:{}", tat / limit, tat % limit, p.limit),
                ttl,
            )
        }
    }
}

/// A window state written by a node whose clock runs ahead names a later window than "now":
/// the decision moves forward to that window's start, so nodes never take turns resetting
/// each other's windows (which would admit without bound).
fn window_now(p: &Params, state: Option<State>, now_ms: u64) -> u64 {
    let index = match state {
        Some(State::Fixed { index, .. } | State::Sliding { index, .. }) => index,
        _ => return now_ms,
    };
    now_ms.max(index.saturating_mul(p.period_ms))
}

/// A window state lives until the end of the next window (two periods from the window's
/// start): the sliding window weighs it until then, and a fixed window's state outlives its
/// window rather than expire early on a clock that is not the backend's.
fn window_ttl(p: &Params, elapsed_ms: u64) -> u64 {
    p.period_ms.saturating_mul(2).saturating_sub(elapsed_ms)
}

fn ttl_of(ms: u64) -> Duration {
    Duration::from_millis(ms.clamp(1, TTL_MAX_MS))
}

/// Decides a step on the rules' current states (`states[i]` is `rules[i].key`'s live value)
/// at `now_ms`. Returns the outcome and, per rule, the state to write: only in
/// [`RateMode::Consume`], only if every rule admitted, and only for a positive cost. A native
/// step written in Rust (the embedded engine, sled, redb) reads the states, calls this and
/// applies the writes atomically; the rules must have passed [`validate`].
pub fn decide(
    rules: &[RateRule<'_>],
    states: &[Option<&[u8]>],
    now_ms: u64,
    mode: RateMode,
) -> (RateOutcome, Vec<Option<RateWrite>>) {
    let parsed: Vec<Option<State>> = rules
        .iter()
        .zip(states)
        .map(|(rule, raw)| parse(rule, *raw))
        .collect();
    let asked: Vec<(Verdict, String, u64)> = rules
        .iter()
        .zip(&parsed)
        .map(|(rule, state)| judge(rule, *state, now_ms, rule.cost))
        .collect();
    let admitted = asked.iter().all(|(v, _, _)| v.allowed);
    if mode == RateMode::Consume && admitted {
        let writes = rules
            .iter()
            .zip(&asked)
            .map(|(rule, (_, value, ttl_ms))| {
                (rule.cost > 0).then(|| RateWrite {
                    value: value.clone().into_bytes(),
                    ttl: Some(ttl_of(*ttl_ms)),
                })
            })
            .collect();
        let verdicts = asked
            .iter()
            .map(|(v, _, _)| RateVerdict::from(*v))
            .collect();
        return (
            RateOutcome {
                now_ms,
                admitted,
                verdicts,
            },
            writes,
        );
    }
    // Nothing consumed: whether each rule admits the cost, and the state as it is.
    let verdicts = rules
        .iter()
        .zip(&parsed)
        .zip(&asked)
        .map(|((rule, state), (asked, _, _))| {
            let now = judge(rule, *state, now_ms, 0).0;
            RateVerdict {
                allowed: asked.allowed,
                remaining: now.remaining,
                reset_after_ms: now.reset_after_ms,
                retry_after_ms: asked.retry_after_ms,
            }
        })
        .collect();
    (
        RateOutcome {
            now_ms,
            admitted,
            verdicts,
        },
        vec![None; rules.len()],
    )
}

/// The state that gives back `rule.cost` counted at `consumed_at_ms` (work that was not
/// done), or `None` when there is nothing to give back (the window has moved on, the state is
/// gone or not ours). Counters never go below zero; a bucket never above its burst.
pub fn refund(rule: &RateRule<'_>, raw: &[u8], consumed_at_ms: u64) -> Option<RateWrite> {
    let p = rule.params();
    let cost = rule.cost;
    match parse(rule, Some(raw))? {
        State::Fixed { index, count } => {
            let (at, _) = math::window(&p, consumed_at_ms);
            (index == at && count > 0).then(|| RateWrite {
                value: format!("F2:{}:{index}:{}", p.period_ms, count.saturating_sub(cost))
                    .into_bytes(),
                ttl: None,
            })
        }
        State::Sliding { index, curr, prev } => {
            let (at, _) = math::window(&p, consumed_at_ms);
            let (curr, prev) = if index == at && curr > 0 {
                (curr.saturating_sub(cost), prev)
            } else if at.checked_add(1) == Some(index) && prev > 0 {
                (curr, prev.saturating_sub(cost))
            } else {
                return None;
            };
            Some(RateWrite {
                value: format!("S2:{}:{index}:{curr}:{prev}", p.period_ms).into_bytes(),
                ttl: None,
            })
        }
        State::Bucket { level, last } => {
            let ((level, last), ttl_ms) =
                math::bucket_refund(&p, (level, last), consumed_at_ms, cost);
            Some(RateWrite {
                value: format!("T2:{level}:{last}:{}", p.period_ms).into_bytes(),
                ttl: Some(ttl_of(ttl_ms)),
            })
        }
        State::Gcra { tat } => {
            let (tat, ttl_ms) = math::gcra_refund(&p, tat, consumed_at_ms, cost);
            let limit = u128::from(p.limit);
            Some(RateWrite {
                value: format!("G2:{}:{}:{}", tat / limit, tat % limit, p.limit).into_bytes(),
                ttl: Some(ttl_of(ttl_ms)),
            })
        }
    }
}

/// Reads a native step's reply in the flat form the Lua script and the SQL function return:
/// `now_ms, admitted (1/0)`, then per rule `allowed (1/0), remaining, reset_after_ms,
/// retry_after_ms (-1: none)`. `None` if it does not have that shape for `rules` rules.
pub fn decode_reply(reply: &[i64], rules: usize) -> Option<RateOutcome> {
    let unsigned = |n: i64| u64::try_from(n).ok();
    if reply.len() != 2 + 4 * rules {
        return None;
    }
    let mut verdicts = Vec::with_capacity(rules);
    for v in reply[2..].chunks_exact(4) {
        verdicts.push(RateVerdict {
            allowed: v[0] == 1,
            remaining: unsigned(v[1])?,
            reset_after_ms: unsigned(v[2])?,
            retry_after_ms: if v[3] < 0 {
                None
            } else {
                Some(unsigned(v[3])?)
            },
        });
    }
    Some(RateOutcome {
        now_ms: unsigned(reply[0])?,
        admitted: reply[1] == 1,
        verdicts,
    })
}

/// Lost compare-and-swap rounds retried after a mere yield, before backoff starts.
const CAS_YIELD_ROUNDS: u32 = 2;
/// The first backoff after a lost round (jittered down to half), doubling up to the longest.
const CAS_BACKOFF_FIRST: Duration = Duration::from_millis(1);
const CAS_BACKOFF_MAX: Duration = Duration::from_millis(32);

/// Waits after losing round `round` (0-based): a yield for the first rounds, then jittered
/// exponential backoff, so contending decisions spread out instead of colliding again.
pub(crate) async fn lost_round(round: u32) {
    if round < CAS_YIELD_ROUNDS {
        tokio::task::yield_now().await;
    } else {
        let exp = (round - CAS_YIELD_ROUNDS).min(5);
        let base = (CAS_BACKOFF_FIRST * 2u32.pow(exp)).min(CAS_BACKOFF_MAX);
        tokio::time::sleep(base.mul_f64(rand::random_range(0.5..=1.0))).await;
    }
}

/// Gives back `rule.cost` counted at `consumed_at_ms`, by compare-and-swap, retried until it
/// lands or there is nothing to give back.
///
/// # Errors
/// The backend's.
pub async fn refund_cas<B: Backend + ?Sized>(
    backend: &B,
    rule: &RateRule<'_>,
    consumed_at_ms: u64,
) -> Result<()> {
    let mut round = 0;
    loop {
        let Some(raw) = backend.get(rule.key).await? else {
            return Ok(()); // expired: already back to full
        };
        let Some(write) = refund(rule, &raw, consumed_at_ms) else {
            return Ok(());
        };
        if backend
            .compare_and_swap(rule.key, Some(&raw), &write.value, write.ttl_policy())
            .await?
        {
            return Ok(());
        }
        lost_round(round).await;
        round += 1;
    }
}

/// The default [`Backend::rate_limit`]: the clock (unless `at_ms` is given), a read per rule,
/// [`decide`], then a compare-and-swap per rule to write. A lost compare-and-swap (another
/// decision on the same key won) gives back the rules already written in this round and
/// retries the whole step after a jittered backoff, without bound: a busy key slows a
/// decision down, it never fails it. Between a write and its give-back another decision may
/// see the extra usage (and deny although it would fit): stricter, never looser. The native
/// steps have no such window.
///
/// # Errors
/// [`ErrorKind::InvalidInput`] from [`validate`]; the backend's errors. A give-back that
/// fails leaves that rule charged (stricter) and returns the error.
pub async fn rate_limit_cas<B: Backend + ?Sized>(
    backend: &B,
    rules: &[RateRule<'_>],
    mode: RateMode,
    at_ms: Option<u64>,
) -> Result<RateOutcome> {
    validate(rules)?;
    let mut round = 0;
    loop {
        let now_ms = match at_ms {
            Some(at) => at,
            None => backend.now_ms().await?,
        };
        let mut states = Vec::with_capacity(rules.len());
        for rule in rules {
            states.push(backend.get(rule.key).await?);
        }
        let refs: Vec<Option<&[u8]>> = states.iter().map(Option::as_deref).collect();
        let (outcome, writes) = decide(rules, &refs, now_ms, mode);
        let mut written: Vec<usize> = Vec::with_capacity(rules.len());
        let mut lost = false;
        for (i, write) in writes.iter().enumerate() {
            let Some(write) = write else { continue };
            if backend
                .compare_and_swap(rules[i].key, refs[i], &write.value, write.ttl_policy())
                .await?
            {
                written.push(i);
            } else {
                lost = true;
                break;
            }
        }
        if !lost {
            return Ok(outcome);
        }
        for &i in written.iter().rev() {
            refund_cas(backend, &rules[i], now_ms).await?;
        }
        lost_round(round).await;
        round += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(algorithm: RateAlgorithm, cost: u64) -> RateRule<'static> {
        RateRule {
            key: b"k",
            algorithm,
            limit: 10,
            period_ms: 1000,
            burst: 10,
            cost,
        }
    }

    const ALL: [RateAlgorithm; 4] = [
        RateAlgorithm::FixedWindow,
        RateAlgorithm::SlidingWindow,
        RateAlgorithm::TokenBucket,
        RateAlgorithm::Gcra,
    ];

    #[test]
    fn every_algorithm_admits_its_quota_then_denies() {
        for algorithm in ALL {
            let r = rule(algorithm, 1);
            let mut state: Option<Vec<u8>> = None;
            for n in 0..10 {
                let (out, writes) = decide(&[r], &[state.as_deref()], 5_000, RateMode::Consume);
                assert!(out.admitted, "{algorithm:?} request {n}");
                assert_eq!(out.verdicts[0].remaining, 9 - n, "{algorithm:?}");
                state = Some(writes[0].clone().unwrap().value);
            }
            let (out, writes) = decide(&[r], &[state.as_deref()], 5_000, RateMode::Consume);
            assert!(!out.admitted, "{algorithm:?}");
            assert!(writes[0].is_none());
            assert!(out.verdicts[0].retry_after_ms.is_some());
        }
    }

    #[test]
    fn a_stack_is_all_or_nothing() {
        let a = RateRule {
            key: b"a",
            ..rule(RateAlgorithm::Gcra, 1)
        };
        let b = RateRule {
            key: b"b",
            limit: 1,
            burst: 1,
            ..rule(RateAlgorithm::FixedWindow, 1)
        };
        let (out, writes) = decide(&[a, b], &[None, None], 0, RateMode::Consume);
        assert!(out.admitted);
        let b_state = writes[1].clone().unwrap().value;
        let (out, writes) = decide(&[a, b], &[None, Some(&b_state)], 10, RateMode::Consume);
        assert!(!out.admitted);
        assert!(
            writes.iter().all(Option::is_none),
            "a denial writes nothing"
        );
        assert!(out.verdicts[0].allowed);
        assert_eq!(out.verdicts[0].remaining, 10, "nothing consumed from a");
        assert!(!out.verdicts[1].allowed);
    }

    #[test]
    fn refunds_give_back_exactly() {
        for algorithm in ALL {
            let r = rule(algorithm, 3);
            let (_, writes) = decide(&[r], &[None], 5_000, RateMode::Consume);
            let state = writes[0].clone().unwrap().value;
            let back = refund(&r, &state, 5_000).unwrap().value;
            let (out, _) = decide(&[r], &[Some(&back)], 5_000, RateMode::Peek);
            assert_eq!(out.verdicts[0].remaining, 10, "{algorithm:?}");
        }
    }

    #[test]
    fn foreign_values_count_as_absent() {
        for algorithm in ALL {
            let r = rule(algorithm, 1);
            for raw in [&b"junk"[..], b"G2:1:2", b"F2:1000:x:1", b"G2:+1:0:10", b""] {
                let (out, _) = decide(&[r], &[Some(raw)], 5_000, RateMode::Peek);
                assert_eq!(out.verdicts[0].remaining, 10, "{algorithm:?} {raw:?}");
            }
        }
    }

    #[test]
    fn validation_names_the_rule() {
        let r = rule(RateAlgorithm::Gcra, 11);
        assert!(validate(&[r]).unwrap_err().to_string().contains("cost 11"));
        let r = rule(RateAlgorithm::Gcra, 1);
        assert!(
            validate(&[r, r])
                .unwrap_err()
                .to_string()
                .contains("repeats")
        );
        assert!(validate(&[]).is_err());
    }
}
