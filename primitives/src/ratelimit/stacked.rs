//! [`Stacked`]: several rate-limiting policies on the same keys, all of which must admit a
//! request (e.g. 10 per second *and* 1,000 per hour).

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;

use super::{Decision, Limiter, Prepared, Quota, RateLimitError, RateLimiter, Receipt};

/// Most policies one [`Stacked`] limiter may combine.
pub const STACK_POLICIES_MAX: usize = 16;

/// Quotas that replace policies' own for one decision, by policy name (per-user plans resolved
/// at request time). Policies not named keep their resolver's quota.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaOverrides(Vec<(String, Quota)>);

impl QuotaOverrides {
    /// No overrides.
    pub fn new() -> Self {
        QuotaOverrides::default()
    }

    /// Uses `quota` for the policy named `policy` (replacing an earlier override of it).
    pub fn set(mut self, policy: impl Into<String>, quota: Quota) -> Self {
        let policy = policy.into();
        self.0.retain(|(name, _)| *name != policy);
        self.0.push((policy, quota));
        self
    }

    /// The override for `policy`.
    pub fn get(&self, policy: &str) -> Option<Quota> {
        self.0
            .iter()
            .find(|(name, _)| name == policy)
            .map(|(_, q)| *q)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One policy's decision within a [`StackDecision`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    /// The policy's (limiter's) name.
    pub name: String,
    /// Its decision.
    pub decision: Decision,
}

/// Every policy's decision on one request, and the one that sums them up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackDecision {
    /// The reported decision (see [`Stacked`]: the tightest admitting policy, or the denying
    /// policy with the longest retry-after).
    pub decision: Decision,
    /// Each policy's decision, in stack order. After a denial, the policies that admitted
    /// show their state with nothing consumed.
    pub policies: Vec<PolicyDecision>,
}

impl StackDecision {
    /// The name of the policy that denied (the one with the longest retry-after), if any.
    pub fn denied_by(&self) -> Option<&str> {
        self.policies
            .iter()
            .filter(|p| !p.decision.allowed)
            .max_by_key(|p| p.decision.retry_after.unwrap_or(Duration::ZERO))
            .map(|p| p.name.as_str())
    }
}

/// Policies applied together: a request is admitted only if every policy admits it, and a
/// denied request consumes from none of them.
///
/// How: [`Stacked::check`] first evaluates every policy without writing (like
/// [`RateLimiter::peek`], for the request's cost). If any would deny, it returns that denial:
/// nothing was consumed anywhere. Otherwise it consumes from each policy in order. If one now
/// denies (a concurrent request took the room in between), the policies already consumed get
/// their share back: exactly for the window counters (`incr(−cost)` on the same window), and
/// as returned tokens (capped at the burst) for the token bucket and GCRA.
///
/// The race window, honestly: between a consumption and its refund, concurrent requests see
/// the consumed amount and may be denied although they would fit once it is refunded. So under
/// contention a stack can deny falsely; it never admits beyond any policy's limit (each policy
/// admits atomically on its own). A refund that fails (backend error) is not retried: that
/// policy stays charged, which is stricter, never looser.
///
/// The reported decision, when admitted, is the policy with the least remaining (ties: the
/// longest reset); when denied, the denying policy with the longest retry-after.
#[derive(Debug, Clone)]
pub struct Stacked {
    limiters: Vec<RateLimiter>,
}

impl Stacked {
    /// Stacks `limiters`, which must have distinct names (their state keys would collide
    /// otherwise).
    ///
    /// # Errors
    /// [`RateLimitError::InvalidStack`] for no limiters or more than [`STACK_POLICIES_MAX`];
    /// [`RateLimitError::InvalidName`] for a repeated name.
    pub fn new(limiters: Vec<RateLimiter>) -> Result<Self, RateLimitError> {
        if limiters.is_empty() || limiters.len() > STACK_POLICIES_MAX {
            return Err(RateLimitError::InvalidStack {
                reason: format!(
                    "{} policies given; a stack needs 1 to {STACK_POLICIES_MAX}",
                    limiters.len()
                ),
            });
        }
        let mut names = HashSet::new();
        for limiter in &limiters {
            if !names.insert(limiter.name()) {
                return Err(RateLimitError::InvalidName {
                    name: limiter.name().to_owned(),
                    reason: "two policies in one stack have this name; give each its own",
                });
            }
        }
        Ok(Stacked { limiters })
    }

    /// The policies, in the order they are applied.
    pub fn limiters(&self) -> &[RateLimiter] {
        &self.limiters
    }

    /// Decides on a request of `cost` for `key` under every policy; consumes from all of them
    /// if all admit, from none otherwise (see the type's docs for the race window).
    ///
    /// # Errors
    /// As [`RateLimiter::check`]; a cost over any policy's capacity is
    /// [`RateLimitError::CostOverCapacity`] and consumes nothing.
    pub async fn check(
        &self,
        key: impl AsRef<[u8]>,
        cost: u64,
    ) -> Result<Decision, RateLimitError> {
        Ok(self
            .check_all(key, cost, &QuotaOverrides::default())
            .await?
            .decision)
    }

    /// [`Stacked::check`], with per-policy quota `overrides` (e.g. resolved from the user's
    /// plan), reporting every policy's decision as well (for `RateLimit` headers that list
    /// each policy).
    ///
    /// # Errors
    /// As [`Stacked::check`].
    pub async fn check_all(
        &self,
        key: impl AsRef<[u8]>,
        cost: u64,
        overrides: &QuotaOverrides,
    ) -> Result<StackDecision, RateLimitError> {
        let key = key.as_ref();
        let prepared = self.prepare(key, cost, overrides).await?;
        let mut decisions = Vec::with_capacity(self.limiters.len());
        for (limiter, p) in self.limiters.iter().zip(&prepared) {
            decisions.push(limiter.evaluate(key, cost, p).await?);
        }
        if cost == 0 || decisions.iter().any(|d| !d.allowed) {
            return self.report(decisions);
        }
        let mut taken: Vec<(&RateLimiter, Receipt)> = Vec::with_capacity(self.limiters.len());
        for (i, (limiter, p)) in self.limiters.iter().zip(&prepared).enumerate() {
            match limiter.consume(key, cost, p, true).await {
                Ok((decision, receipt)) => {
                    decisions[i] = decision;
                    if !decision.allowed {
                        refund_all(taken).await;
                        // The policies consumed before this one were refunded: report them as
                        // evaluated (nothing consumed), and this one's denial.
                        for (j, (l, p)) in self.limiters.iter().zip(&prepared).enumerate() {
                            if j < i {
                                decisions[j] = l.evaluate(key, cost, p).await?;
                            }
                        }
                        return self.report(decisions);
                    }
                    if let Some(receipt) = receipt {
                        taken.push((limiter, receipt));
                    }
                }
                Err(e) => {
                    refund_all(taken).await;
                    return Err(e);
                }
            }
        }
        self.report(decisions)
    }

    fn report(&self, decisions: Vec<Decision>) -> Result<StackDecision, RateLimitError> {
        let decision = combine(&decisions)?;
        Ok(StackDecision {
            decision,
            policies: self
                .limiters
                .iter()
                .zip(decisions)
                .map(|(l, decision)| PolicyDecision {
                    name: l.name().to_owned(),
                    decision,
                })
                .collect(),
        })
    }

    /// Whether a request of cost 1 would be admitted by every policy now; consumes nothing.
    ///
    /// # Errors
    /// As [`RateLimiter::peek`].
    pub async fn peek(&self, key: impl AsRef<[u8]>) -> Result<Decision, RateLimitError> {
        let key = key.as_ref();
        let prepared = self.prepare(key, 1, &QuotaOverrides::default()).await?;
        let mut decisions = Vec::with_capacity(self.limiters.len());
        for (limiter, p) in self.limiters.iter().zip(&prepared) {
            decisions.push(limiter.evaluate(key, 1, p).await?);
        }
        combine(&decisions)
    }

    async fn prepare(
        &self,
        key: &[u8],
        cost: u64,
        overrides: &QuotaOverrides,
    ) -> Result<Vec<Prepared>, RateLimitError> {
        let mut prepared = Vec::with_capacity(self.limiters.len());
        for limiter in &self.limiters {
            let quota = overrides.get(limiter.name());
            prepared.push(limiter.prepare_with(key, cost, quota).await?);
        }
        Ok(prepared)
    }
}

async fn refund_all(taken: Vec<(&RateLimiter, Receipt)>) {
    for (limiter, receipt) in taken.into_iter().rev() {
        // Documented: a failed refund leaves that policy charged (stricter, never looser).
        let _ = limiter.refund(receipt).await;
    }
}

/// The decision to report for a stack.
fn combine(decisions: &[Decision]) -> Result<Decision, RateLimitError> {
    let denied = decisions
        .iter()
        .filter(|d| !d.allowed)
        .max_by_key(|d| d.retry_after.unwrap_or(Duration::ZERO));
    let chosen = denied.or_else(|| {
        decisions.iter().min_by(|a, b| {
            a.remaining
                .cmp(&b.remaining)
                .then(b.reset_after.cmp(&a.reset_after))
        })
    });
    chosen.copied().ok_or_else(|| RateLimitError::InvalidStack {
        reason: "no policies".to_owned(),
    })
}

#[async_trait]
impl Limiter for Stacked {
    async fn check(&self, key: &[u8], cost: u64) -> Result<Decision, RateLimitError> {
        Stacked::check(self, key, cost).await
    }

    async fn peek(&self, key: &[u8]) -> Result<Decision, RateLimitError> {
        Stacked::peek(self, key).await
    }
}

impl From<RateLimiter> for Stacked {
    /// A stack of one policy.
    fn from(limiter: RateLimiter) -> Self {
        Stacked {
            limiters: vec![limiter],
        }
    }
}
