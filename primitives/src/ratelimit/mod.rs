//! Rate limiting on the [`Backend`] contract: fixed window, sliding window, token bucket and
//! GCRA, per-key quotas, and stacked policies. Every decision is one atomic step of the
//! backend ([`Backend::rate_limit`]: one round trip on keel's backends, a stack of policies
//! included), so limiters on many application nodes sharing one backend enforce one limit
//! together, and a busy key never makes a decision fail.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::sync::Arc;
//! use keel_primitives::Embedded;
//! use keel_primitives::ratelimit::{Quota, RateLimiter, Stacked, Strategy};
//!
//! let backend = Arc::new(Embedded::memory());
//! let burst = RateLimiter::new(backend.clone(), "api-s", Strategy::Gcra, Quota::per_second(10))?;
//! let hourly = RateLimiter::new(backend, "api-h", Strategy::SlidingWindow, Quota::per_hour(1000))?;
//! let limiter = Stacked::new(vec![burst, hourly])?;
//! let d = limiter.check(b"user:42", 1).await?;
//! assert!(d.allowed);
//! assert_eq!(d.remaining, 9); // the tighter policy
//! // Denied: answer 429 with `Retry-After: d.retry_after_secs()`.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Strategies
//! - [`Strategy::FixedWindow`]: one counter per key and window. Cheapest and exact per window, but it admits up to **2 × limit within a
//!   short interval around a window boundary** (`limit` at the end of one window, `limit` at
//!   the start of the next). Use the sliding window, the token bucket or GCRA to avoid that.
//! - [`Strategy::SlidingWindow`]: the two-window weighted counter. The estimate is
//!   `previous × (period − elapsed) / period + current`, compared in exact integer arithmetic.
//!   Bound: in any interval of length `d ≤ period` it admits at most
//!   `limit × (1 + d / period)`, so around a boundary about `limit` (no fixed-window spike),
//!   and over a whole period less than `2 × limit`, approached only when the previous window's
//!   traffic all came at its very end. For evenly spread traffic it is close to exact.
//! - [`Strategy::TokenBucket`]: a bucket of `burst` tokens refilled at `limit` per `period`;
//!   the level and the time of the last update live in one key. Admits at most
//!   `burst + rate × d` in any interval of length `d`.
//! - [`Strategy::Gcra`]: the generic cell rate algorithm: one theoretical arrival time per key.
//!   Makes exactly the token bucket's decisions with smaller state.
//!
//! Each limiter key has one state key, `rl:{name}:{fw|sw|tb|gcra}:{key}`, in the text form
//! [`crate::backend::rate`] documents, with a TTL (until the end of the next window; or until
//! the bucket is full again), so idle keys disappear by themselves and a vanished key means
//! "full quota". On a Redis or Valkey Cluster a key with a hash tag (`{user:42}`) puts every
//! policy of a stack in one slot, so the stack stays one step there too.
//!
//! # Denied requests do not consume
//! A denial never makes the next request's outcome worse: the step writes a policy's state
//! only when every policy of the decision admits. Counters never go below zero: a refund
//! ([`Reservation::refund`]) that lands after a reset or in a later window gives nothing back,
//! and a stored count that is not a plain non-negative number counts as absent.
//!
//! A `cost` larger than the capacity (the limit for windows, the burst for buckets) could never
//! be admitted: [`RateLimiter::check`] refuses it with [`RateLimitError::CostOverCapacity`]
//! and consumes nothing. A cost of 0 consumes nothing and reports the current state.
//!
//! # Clocks
//! Every decision reads "now" once, by default inside the backend's step: the backend's
//! trusted clock (the server's, for Redis, Valkey and Postgres), the same for every
//! application node, at no extra round trip. [`RateLimiter::with_clock`] injects a [`Clock`]
//! instead ([`ManualClock`] in tests), whose reading is sent with the step.
//! TTLs always run on the backend's clock. With a local clock, skew between nodes matters:
//! - fixed window: a node δ ahead switches windows δ early, so around each boundary a node
//!   behind may count into the old window after the new one began (once the state names the
//!   new window, nodes behind count into it too);
//! - sliding window: the same window confusion, and a node δ ahead weighs the previous window
//!   δ/period too little;
//! - token bucket, GCRA: the state holds absolute times written by whichever node admitted
//!   last; a node δ ahead of the writer sees δ × rate of extra refill (up to the burst), a
//!   node δ behind sees the state in its future and denies for up to δ longer.
//!
//! # Per-key quotas and stacked policies
//! A [`QuotaResolver`] picks the quota per key (any `Fn(&[u8]) -> Quota` is one; so is a
//! plain [`Quota`]). [`Stacked`] combines policies (e.g. 10/s and 1,000/h): a request is
//! admitted only if every policy admits it, and a denial consumes from none of them. How,
//! and the remaining race window, are documented on [`Stacked`]. Quotas resolved per request
//! (asynchronously, e.g. from the user's plan) go in as [`QuotaOverrides`].
//!
//! # HTTP
//! With the `http` feature, `RateLimitLayer` (in `ratelimit::layer`) applies a limiter or a stack to
//! requests in axum or hyper, with the `RateLimit` headers and 429 problem responses.

#[cfg(feature = "http")]
pub mod layer;
pub(crate) mod math;
mod stacked;

#[cfg(feature = "http")]
pub use layer::{
    OnBackendError, QuotaOverride, RateLimit, RateLimitLayer, RateLimitLayerBuilder,
    RateLimitLayerError, ResponseFuture, Route,
};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::rate;
use crate::backend::{Backend, RateAlgorithm, RateMode, RateRule, RateVerdict, TTL_MAX};
use crate::error::Error;

pub use keel_engine::{Clock, ManualClock, SystemClock};
pub use stacked::{PolicyDecision, QuotaOverrides, STACK_POLICIES_MAX, StackDecision, Stacked};

use math::Params;

/// Largest `limit` or `burst` a [`Quota`] may have (2^40, about 1.1 × 10^12).
pub const QUOTA_LIMIT_MAX: u64 = 1 << 40;
/// Longest quota period: half the longest TTL, since window counters live for two windows.
pub const PERIOD_MAX: Duration = Duration::from_millis(TTL_MAX_MS / 2);
/// Longest limiter name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;

const TTL_MAX_MS: u64 = TTL_MAX.as_secs() * 1000;
const KEY_PREFIX: &[u8] = b"rl:";

const _: () = assert!(TTL_MAX.subsec_nanos() == 0);
// `math` scales clock readings (any u64) by a limit, then adds a burst times a period: that
// must fit a u128 with room to spare.
const _: () = assert!((u64::MAX as u128) * (QUOTA_LIMIT_MAX as u128) < u128::MAX / 4);
const _: () = assert!((QUOTA_LIMIT_MAX as u128) * (TTL_MAX_MS as u128) < u128::MAX / 4);

/// How a [`RateLimiter`] counts. See the module docs for each one's guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Strategy {
    /// One counter per window; up to 2 × limit around a window boundary.
    FixedWindow,
    /// Two-window weighted counter; at most `limit × (1 + d / period)` in any interval `d`.
    SlidingWindow,
    /// `burst` tokens refilled at `limit` per `period`.
    TokenBucket,
    /// Generic cell rate algorithm; the token bucket's decisions with one timestamp of state.
    Gcra,
}

impl Strategy {
    fn tag(self) -> &'static [u8] {
        match self {
            Strategy::FixedWindow => b"fw",
            Strategy::SlidingWindow => b"sw",
            Strategy::TokenBucket => b"tb",
            Strategy::Gcra => b"gcra",
        }
    }

    fn is_window(self) -> bool {
        matches!(self, Strategy::FixedWindow | Strategy::SlidingWindow)
    }
}

/// A rate: `limit` per `period`, with an optional `burst` (bucket capacity) for the token
/// bucket and GCRA (default: `limit`; the window strategies ignore it).
///
/// Constructors never fail; a quota is validated by [`Quota::validate`], which
/// [`RateLimiter::new`] calls for a fixed quota (a per-key resolver's quotas are validated when
/// used): limit and burst between 1 and
/// [`QUOTA_LIMIT_MAX`], period between 1 ms and [`PERIOD_MAX`], sub-millisecond parts rounded
/// up, and refilling the whole burst must take at most the longest TTL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    limit: u64,
    period: Duration,
    burst: Option<u64>,
}

impl Quota {
    /// `limit` per `period`.
    pub const fn new(limit: u64, period: Duration) -> Self {
        Quota {
            limit,
            period,
            burst: None,
        }
    }

    /// `limit` per second.
    pub const fn per_second(limit: u64) -> Self {
        Quota::new(limit, Duration::from_secs(1))
    }

    /// `limit` per minute.
    pub const fn per_minute(limit: u64) -> Self {
        Quota::new(limit, Duration::from_secs(60))
    }

    /// `limit` per hour.
    pub const fn per_hour(limit: u64) -> Self {
        Quota::new(limit, Duration::from_secs(3600))
    }

    /// `limit` per day.
    pub const fn per_day(limit: u64) -> Self {
        Quota::new(limit, Duration::from_secs(86_400))
    }

    /// The bucket capacity for the token bucket and GCRA: how many requests may come at once
    /// after a quiet spell.
    pub const fn with_burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }

    /// Requests (cost units) per period.
    pub const fn limit(&self) -> u64 {
        self.limit
    }

    /// The period (window length; for buckets, the time to earn `limit` tokens).
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// The bucket capacity (`limit` unless set).
    pub const fn burst(&self) -> u64 {
        match self.burst {
            Some(b) => b,
            None => self.limit,
        }
    }

    /// Checks the quota: limit and burst between 1 and [`QUOTA_LIMIT_MAX`], period between
    /// 1 ms and [`PERIOD_MAX`], and refilling the whole burst within the longest TTL.
    /// [`RateLimiter::new`] calls it for a fixed quota, so a bad one fails at construction.
    ///
    /// # Errors
    /// [`RateLimitError::InvalidQuota`] saying which rule the quota breaks.
    pub fn validate(&self) -> Result<(), RateLimitError> {
        self.params().map(drop)
    }

    fn params(&self) -> Result<Params, RateLimitError> {
        let invalid = |reason: String| Err(RateLimitError::InvalidQuota { reason });
        if self.limit == 0 || self.limit > QUOTA_LIMIT_MAX {
            return invalid(format!(
                "limit {} is outside 1..={QUOTA_LIMIT_MAX}",
                self.limit
            ));
        }
        let burst = self.burst();
        if burst == 0 || burst > QUOTA_LIMIT_MAX {
            return invalid(format!("burst {burst} is outside 1..={QUOTA_LIMIT_MAX}"));
        }
        let period_ms = self.period.as_nanos().div_ceil(1_000_000);
        if period_ms == 0 || self.period > PERIOD_MAX {
            return invalid(format!(
                "period {:?} is outside 1 ms..={PERIOD_MAX:?}",
                self.period
            ));
        }
        let period_ms = u64::try_from(period_ms).unwrap_or(u64::MAX);
        let refill_ms = u128::from(burst) * u128::from(period_ms) / u128::from(self.limit);
        if refill_ms > u128::from(TTL_MAX_MS) {
            return invalid(format!(
                "refilling a burst of {burst} at {} per {:?} takes longer than the longest TTL",
                self.limit, self.period
            ));
        }
        Ok(Params {
            limit: self.limit,
            period_ms,
            burst,
        })
    }
}

/// Picks the quota for a key (per-user plans, per-tenant limits). Implemented by any
/// `Fn(&[u8]) -> Quota + Send + Sync + 'static` and by [`Quota`] itself (the same for every
/// key). Called once per decision; keep it fast.
pub trait QuotaResolver: Send + Sync + 'static {
    /// The quota for `key`.
    fn quota(&self, key: &[u8]) -> Quota;

    /// The quota every key gets, if it is the same for all (then it is validated when the
    /// limiter is built). `None` by default.
    fn fixed(&self) -> Option<Quota> {
        None
    }
}

impl<F> QuotaResolver for F
where
    F: Fn(&[u8]) -> Quota + Send + Sync + 'static,
{
    fn quota(&self, key: &[u8]) -> Quota {
        self(key)
    }
}

impl QuotaResolver for Quota {
    fn quota(&self, _key: &[u8]) -> Quota {
        *self
    }

    fn fixed(&self) -> Option<Quota> {
        Some(*self)
    }
}

/// The answer to a rate-limit check: whether it was admitted, and what an HTTP layer needs
/// for `RateLimit`/`RateLimit-Policy`, `X-RateLimit-*` and `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request was admitted (and counted).
    pub allowed: bool,
    /// The capacity `remaining` counts against: the quota's limit for the window strategies,
    /// its burst for the token bucket and GCRA.
    pub limit: u64,
    /// What is left now, after this request if it was admitted.
    pub remaining: u64,
    /// How long until `remaining` is back to `limit` if nothing else arrives. Fixed window:
    /// the end of the current window. Sliding window: until every counted request has slid
    /// out (zero if none). Token bucket, GCRA: until the bucket is full.
    pub reset_after: Duration,
    /// For a denial, how long until the same request would be admitted if nothing else
    /// arrives; `None` when admitted.
    pub retry_after: Option<Duration>,
    /// The quota that decided (for `RateLimit-Policy`: `q = limit`, `w = period`).
    pub quota: Quota,
}

impl Decision {
    /// `reset_after` in whole seconds, rounded up (for headers).
    pub fn reset_after_secs(&self) -> u64 {
        ceil_secs(self.reset_after)
    }

    /// `retry_after` in whole seconds, rounded up (for `Retry-After`).
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(ceil_secs)
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Why a rate-limit call failed (as opposed to denying the request).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimitError {
    /// The quota (from the resolver) is out of range; nothing was consumed.
    #[error("invalid rate-limit quota: {reason}; fix the quota")]
    InvalidQuota {
        /// What is wrong.
        reason: String,
    },
    /// The request costs more than the policy's capacity, so it could never be admitted;
    /// nothing was consumed.
    #[error(
        "a request costing {cost} can never be admitted: the capacity is {capacity}; nothing \
         was consumed, split the request or raise the quota"
    )]
    CostOverCapacity {
        /// The request's cost.
        cost: u64,
        /// The limit (windows) or burst (buckets).
        capacity: u64,
    },
    /// A limiter name is empty, too long or has characters other than ASCII letters, digits,
    /// `-`, `_`, `.`; or a stack repeats a name.
    #[error("invalid rate limiter name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A [`Stacked`] limiter was built with no policies or more than [`STACK_POLICIES_MAX`].
    #[error("invalid stack of rate limiters: {reason}")]
    InvalidStack {
        /// What is wrong.
        reason: String,
    },
    /// [`RateLimiter::until_ready`] had to wait and no Tokio runtime is running.
    #[error("waiting for a rate limit needs a Tokio runtime with timers; call it inside one")]
    NoRuntime,
    /// The backend failed (see [`Error::kind`]). For a check, whether the request was counted
    /// is unknown.
    #[error(transparent)]
    Backend(#[from] Error),
}

/// What an admitted [`RateLimiter::check_reserving`] took, to give back with
/// [`Reservation::refund`] when the work it paid for was not done.
pub struct Reservation {
    limiter: RateLimiter,
    planned: Planned,
    consumed_at_ms: u64,
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("limiter", &self.limiter.name)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// Gives the cost back: exactly for the window strategies (never below zero); for the
    /// bucket strategies the tokens are returned, capped at the burst.
    ///
    /// # Errors
    /// `Backend`.
    pub async fn refund(self) -> Result<(), RateLimitError> {
        let rule = self.planned.rule(self.limiter.algorithm());
        rate::refund_cas(&*self.limiter.backend, &rule, self.consumed_at_ms).await?;
        Ok(())
    }
}

/// Anything that decides on requests: a [`RateLimiter`] or a [`Stacked`] one. Lets an HTTP
/// layer take either.
#[async_trait]
pub trait Limiter: Send + Sync {
    /// Decides on a request of `cost` for `key`, consuming if admitted.
    async fn check(&self, key: &[u8], cost: u64) -> Result<Decision, RateLimitError>;
    /// Reports whether a request of cost 1 would be admitted now, consuming nothing.
    async fn peek(&self, key: &[u8]) -> Result<Decision, RateLimitError>;
}

/// One rate-limiting policy on one backend: a name (for its keys), a [`Strategy`], a quota
/// per key and a clock. Cheap to clone.
#[derive(Clone)]
pub struct RateLimiter {
    backend: Arc<dyn Backend>,
    name: String,
    strategy: Strategy,
    quotas: Arc<dyn QuotaResolver>,
    clock: Option<Arc<dyn Clock>>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("backend", &self.backend.name())
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .field(
                "clock",
                &if self.clock.is_some() {
                    "injected"
                } else {
                    "backend"
                },
            )
            .finish()
    }
}

/// One policy's part of a decision, resolved before the step: its state key, quota and cost.
#[derive(Debug, Clone)]
pub(crate) struct Planned {
    state_key: Vec<u8>,
    params: Params,
    quota: Quota,
    cost: u64,
}

impl Planned {
    fn rule(&self, algorithm: RateAlgorithm) -> RateRule<'_> {
        RateRule {
            key: &self.state_key,
            algorithm,
            limit: self.params.limit,
            period_ms: self.params.period_ms,
            burst: self.params.burst,
            cost: self.cost,
        }
    }
}

impl RateLimiter {
    /// A limiter called `name` (its keys start with `rl:{name}:`; ASCII letters, digits, `-`,
    /// `_`, `.`, at most [`NAME_BYTES_MAX`] bytes) using `strategy`, with quotas from `quotas`
    /// (a [`Quota`] or a closure), reading time from the backend.
    ///
    /// # Errors
    /// [`RateLimitError::InvalidName`]; [`RateLimitError::InvalidQuota`] for a fixed quota
    /// that [`Quota::validate`] refuses.
    pub fn new(
        backend: Arc<dyn Backend>,
        name: &str,
        strategy: Strategy,
        quotas: impl QuotaResolver,
    ) -> Result<Self, RateLimitError> {
        validate_name(name)?;
        if let Some(quota) = quotas.fixed() {
            quota.validate()?;
        }
        Ok(RateLimiter {
            backend,
            name: name.to_owned(),
            strategy,
            quotas: Arc::new(quotas),
            clock: None,
        })
    }

    /// Reads time from `clock` instead of the backend (see the module docs on skew).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The limiter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limiter's strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The quota that applies to `key`.
    pub fn quota_for(&self, key: impl AsRef<[u8]>) -> Quota {
        self.quotas.quota(key.as_ref())
    }

    /// Decides on a request of `cost` for `key`; an admitted request is counted. A denied one
    /// consumes nothing (see the module docs).
    ///
    /// # Errors
    /// [`RateLimitError::CostOverCapacity`] (nothing consumed), `InvalidQuota`, `Backend`.
    pub async fn check(
        &self,
        key: impl AsRef<[u8]>,
        cost: u64,
    ) -> Result<Decision, RateLimitError> {
        self.check_with_quota(key, cost, None).await
    }

    /// [`RateLimiter::check`] under `quota` (when given) instead of the resolver's: for quotas
    /// resolved asynchronously per request, e.g. from the user's plan.
    ///
    /// # Errors
    /// As [`RateLimiter::check`].
    pub async fn check_with_quota(
        &self,
        key: impl AsRef<[u8]>,
        cost: u64,
        quota: Option<Quota>,
    ) -> Result<Decision, RateLimitError> {
        let planned = self.plan(key.as_ref(), cost, quota)?;
        let (decision, _) = self.step(&planned, RateMode::Consume).await?;
        crate::observe::ratelimit_decision(&self.name, decision.allowed);
        Ok(decision)
    }

    /// [`RateLimiter::check`], and for an admitted request a [`Reservation`] that gives the
    /// cost back with [`Reservation::refund`] if the work it paid for was not done (the
    /// request failed before doing anything, say). Dropping the reservation keeps the cost.
    ///
    /// # Errors
    /// As [`RateLimiter::check`].
    pub async fn check_reserving(
        &self,
        key: impl AsRef<[u8]>,
        cost: u64,
    ) -> Result<(Decision, Option<Reservation>), RateLimitError> {
        let planned = self.plan(key.as_ref(), cost, None)?;
        let (decision, now_ms) = self.step(&planned, RateMode::Consume).await?;
        crate::observe::ratelimit_decision(&self.name, decision.allowed);
        let reservation = (decision.allowed && cost > 0).then(|| Reservation {
            limiter: self.clone(),
            planned,
            consumed_at_ms: now_ms,
        });
        Ok((decision, reservation))
    }

    /// Waits until a request of `cost` is admitted, for at most `max_wait`: a denial whose
    /// `retry_after` still fits in the wait is retried after it (plus up to 10% jitter, so
    /// waiters spread out); otherwise the denial is returned. A cost over the capacity fails
    /// at once (it can never be admitted).
    ///
    /// # Errors
    /// As [`RateLimiter::check`]; [`RateLimitError::NoRuntime`] when it would have to wait
    /// outside a Tokio runtime.
    pub async fn until_ready(
        &self,
        key: impl AsRef<[u8]>,
        cost: u64,
        max_wait: Duration,
    ) -> Result<Decision, RateLimitError> {
        let key = key.as_ref();
        let started = tokio::time::Instant::now();
        loop {
            let decision = self.check(key, cost).await?;
            let Some(retry_after) = decision.retry_after else {
                return Ok(decision);
            };
            let left = max_wait.saturating_sub(started.elapsed());
            if decision.allowed || retry_after > left {
                return Ok(decision);
            }
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(RateLimitError::NoRuntime);
            }
            let jitter = retry_after.mul_f64(rand::random_range(0.0..=0.1));
            tokio::time::sleep((retry_after + jitter).min(left)).await;
        }
    }

    /// Whether a request of cost 1 would be admitted now (`allowed`, `retry_after`), and what
    /// remains now (`remaining`, `reset_after`: nothing is consumed, so not less one).
    ///
    /// # Errors
    /// As [`RateLimiter::check`].
    pub async fn peek(&self, key: impl AsRef<[u8]>) -> Result<Decision, RateLimitError> {
        let planned = self.plan(key.as_ref(), 1, None)?;
        Ok(self.step(&planned, RateMode::Peek).await?.0)
    }

    /// Forgets `key`'s usage: its full quota is available again.
    ///
    /// # Errors
    /// `Backend`.
    pub async fn reset(&self, key: impl AsRef<[u8]>) -> Result<(), RateLimitError> {
        self.backend.delete(&self.state_key(key.as_ref())).await?;
        Ok(())
    }

    fn algorithm(&self) -> RateAlgorithm {
        match self.strategy {
            Strategy::FixedWindow => RateAlgorithm::FixedWindow,
            Strategy::SlidingWindow => RateAlgorithm::SlidingWindow,
            Strategy::TokenBucket => RateAlgorithm::TokenBucket,
            Strategy::Gcra => RateAlgorithm::Gcra,
        }
    }

    fn capacity(&self, params: &Params) -> u64 {
        if self.strategy.is_window() {
            params.limit
        } else {
            params.burst
        }
    }

    /// Resolves and validates the quota (`quota`, when given, instead of the resolver's) and
    /// refuses impossible costs.
    pub(crate) fn plan(
        &self,
        key: &[u8],
        cost: u64,
        quota: Option<Quota>,
    ) -> Result<Planned, RateLimitError> {
        let quota = quota.unwrap_or_else(|| self.quotas.quota(key));
        let params = quota.params()?;
        let capacity = self.capacity(&params);
        if cost > capacity {
            return Err(RateLimitError::CostOverCapacity { cost, capacity });
        }
        Ok(Planned {
            state_key: self.state_key(key),
            params,
            quota,
            cost,
        })
    }

    /// The instant to decide at, when this limiter has its own clock.
    pub(crate) fn at_ms(&self) -> Option<u64> {
        self.clock.as_ref().map(|c| c.now_ms())
    }

    /// One step of this policy alone; the decision and the instant it was made at.
    async fn step(
        &self,
        planned: &Planned,
        mode: RateMode,
    ) -> Result<(Decision, u64), RateLimitError> {
        let rule = planned.rule(self.algorithm());
        let outcome = self.backend.rate_limit(&[rule], mode, self.at_ms()).await?;
        let verdict = outcome.verdicts.first().copied().unwrap_or_default();
        Ok((self.decision(planned, verdict), outcome.now_ms))
    }

    pub(crate) fn decision(&self, planned: &Planned, verdict: RateVerdict) -> Decision {
        Decision {
            allowed: verdict.allowed,
            limit: self.capacity(&planned.params),
            remaining: verdict.remaining,
            reset_after: Duration::from_millis(verdict.reset_after_ms),
            retry_after: verdict.retry_after_ms.map(Duration::from_millis),
            quota: planned.quota,
        }
    }

    /// `rl:{name}:{fw|sw|tb|gcra}:{key}`: one state key per limiter and key.
    fn state_key(&self, key: &[u8]) -> Vec<u8> {
        let tag = self.strategy.tag();
        let mut k =
            Vec::with_capacity(KEY_PREFIX.len() + self.name.len() + tag.len() + 2 + key.len());
        k.extend_from_slice(KEY_PREFIX);
        k.extend_from_slice(self.name.as_bytes());
        k.push(b':');
        k.extend_from_slice(tag);
        k.push(b':');
        k.extend_from_slice(key);
        k
    }
}

#[async_trait]
impl Limiter for RateLimiter {
    async fn check(&self, key: &[u8], cost: u64) -> Result<Decision, RateLimitError> {
        RateLimiter::check(self, key, cost).await
    }

    async fn peek(&self, key: &[u8]) -> Result<Decision, RateLimitError> {
        RateLimiter::peek(self, key).await
    }
}

fn validate_name(name: &str) -> Result<(), RateLimitError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > NAME_BYTES_MAX {
        Some("it is longer than 64 bytes")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(RateLimitError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Embedded;

    fn limiter(strategy: Strategy, quota: Quota, clock: &ManualClock) -> RateLimiter {
        RateLimiter::new(Arc::new(Embedded::memory()), "t", strategy, quota)
            .unwrap()
            .with_clock(Arc::new(clock.clone()))
    }

    #[test]
    fn names_are_validated() {
        let b: Arc<dyn Backend> = Arc::new(Embedded::memory());
        for bad in ["", "a:b", "sp ace", &"x".repeat(65)] {
            assert!(matches!(
                RateLimiter::new(Arc::clone(&b), bad, Strategy::Gcra, Quota::per_second(1)),
                Err(RateLimitError::InvalidName { .. })
            ));
        }
        RateLimiter::new(b, "api-v1.login_x", Strategy::Gcra, Quota::per_second(1)).unwrap();
    }

    #[test]
    fn quotas_are_validated() {
        let ok = |q: Quota| q.params().is_ok();
        assert!(ok(Quota::per_second(1)));
        assert!(!ok(Quota::per_second(0)));
        assert!(!ok(Quota::per_second(QUOTA_LIMIT_MAX + 1)));
        assert!(!ok(Quota::new(1, Duration::ZERO)));
        assert!(!ok(Quota::new(1, PERIOD_MAX + Duration::from_millis(1))));
        assert!(!ok(Quota::per_second(1).with_burst(0)));
        assert!(
            !ok(Quota::per_day(1).with_burst(1_000_000)),
            "a 2700-year refill"
        );
        assert_eq!(
            Quota::new(1, Duration::from_micros(1500))
                .params()
                .unwrap()
                .period_ms,
            2
        );
    }

    #[test]
    fn header_seconds_round_up() {
        let d = Decision {
            allowed: false,
            limit: 1,
            remaining: 0,
            reset_after: Duration::from_millis(1001),
            retry_after: Some(Duration::from_millis(1)),
            quota: Quota::per_second(1),
        };
        assert_eq!(d.reset_after_secs(), 2);
        assert_eq!(d.retry_after_secs(), Some(1));
    }

    #[tokio::test]
    async fn window_state_names_its_period_and_window() {
        let clock = ManualClock::new(10_000);
        let l = limiter(Strategy::FixedWindow, Quota::per_second(5), &clock);
        l.check("k:1", 2).await.unwrap();
        assert_eq!(
            l.backend.get(b"rl:t:fw:k:1").await.unwrap(),
            Some(b"F2:1000:10:2".to_vec())
        );
    }

    #[tokio::test]
    async fn reset_forgets_usage() {
        let clock = ManualClock::new(3_600_000 * 100);
        for strategy in [
            Strategy::FixedWindow,
            Strategy::SlidingWindow,
            Strategy::TokenBucket,
            Strategy::Gcra,
        ] {
            let l = limiter(strategy, Quota::per_hour(3), &clock);
            assert!(l.check("k", 3).await.unwrap().allowed);
            assert!(!l.check("k", 1).await.unwrap().allowed);
            l.reset("k").await.unwrap();
            assert_eq!(l.peek("k").await.unwrap().remaining, 3, "{strategy:?}");
        }
    }

    #[tokio::test]
    async fn foreign_state_is_overwritten() {
        let clock = ManualClock::new(1_000_000);
        let l = limiter(Strategy::Gcra, Quota::per_second(2), &clock);
        l.backend.set(b"rl:t:gcra:k", b"junk", None).await.unwrap();
        let d = l.check("k", 1).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 1);
    }
}
