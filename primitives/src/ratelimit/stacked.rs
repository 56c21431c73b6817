//! [`Stacked`]: several rate-limiting policies on the same keys, all of which must admit a
//! request (e.g. 10 per second *and* 1,000 per hour).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Decision, Limiter, Planned, Quota, RateLimitError, RateLimiter};
use crate::backend::{RateMode, RateRule, rate};

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
/// How: the policies are decided in one atomic step of the backend
/// ([`Backend::rate_limit`](crate::Backend::rate_limit)): every policy at the same instant,
/// and their states are written only if all admit. So a denied request consumes from none of
/// them, and concurrent requests never see part of another's consumption (with the native
/// steps of keel's backends; a backend on the default compare-and-swap step gives back the
/// policies it wrote when a later one loses a race, and retries). That needs the policies
/// built on one backend handle (clones of one `Arc<dyn Backend>`); policies on different
/// handles are decided one after the other instead, each atomically, and when a later one
/// denies, the earlier ones get their cost back (between the two, concurrent requests may see
/// the extra usage and be denied: stricter, never looser).
///
/// The reported decision, when admitted, is the policy with the least remaining (ties: the
/// longest reset); when denied, the denying policy with the longest retry-after.
///
/// Each check counts one decision in `keel_ratelimit_decisions_total` under the policies'
/// names joined by `+` (see [`observe`](crate::observe)).
#[derive(Debug, Clone)]
pub struct Stacked {
    limiters: Vec<RateLimiter>,
    /// The `limiter` label of this stack's decisions: the names joined by `+`.
    label: String,
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
        let label = limiters
            .iter()
            .map(RateLimiter::name)
            .collect::<Vec<_>>()
            .join("+");
        Ok(Stacked { limiters, label })
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
        let planned = self.plan(key.as_ref(), cost, overrides)?;
        let decisions = self.step(&planned, RateMode::Consume).await?;
        let report = self.report(decisions)?;
        crate::observe::ratelimit_decision(&self.label, report.decision.allowed);
        Ok(report)
    }

    /// All policies in one step of the backend, or one after the other when they do not
    /// share a backend handle.
    async fn step(
        &self,
        planned: &[Planned],
        mode: RateMode,
    ) -> Result<Vec<Decision>, RateLimitError> {
        let first = &self.limiters[0];
        let shared = self
            .limiters
            .iter()
            .all(|l| std::ptr::addr_eq(Arc::as_ptr(&l.backend), Arc::as_ptr(&first.backend)));
        if !shared {
            return self.step_each(planned, mode).await;
        }
        let rules: Vec<RateRule<'_>> = self
            .limiters
            .iter()
            .zip(planned)
            .map(|(l, p)| p.rule(l.algorithm()))
            .collect();
        let outcome = first
            .backend
            .rate_limit(&rules, mode, first.at_ms())
            .await?;
        Ok(self
            .limiters
            .iter()
            .zip(planned)
            .zip(outcome.verdicts)
            .map(|((l, p), v)| l.decision(p, v))
            .collect())
    }

    async fn step_each(
        &self,
        planned: &[Planned],
        mode: RateMode,
    ) -> Result<Vec<Decision>, RateLimitError> {
        let mut decisions = Vec::with_capacity(planned.len());
        if mode == RateMode::Peek {
            for (l, p) in self.limiters.iter().zip(planned) {
                decisions.push(l.step(p, mode).await?.0);
            }
            return Ok(decisions);
        }
        let mut taken: Vec<(usize, u64)> = Vec::new();
        for (i, (l, p)) in self.limiters.iter().zip(planned).enumerate() {
            let (decision, now_ms) = match l.step(p, mode).await {
                Ok(done) => done,
                Err(e) => {
                    self.give_back(planned, &taken).await;
                    return Err(e);
                }
            };
            decisions.push(decision);
            if !decision.allowed {
                self.give_back(planned, &taken).await;
                // Report the others as they are now, nothing consumed.
                for (j, (l, p)) in self.limiters.iter().zip(planned).enumerate() {
                    if j != i {
                        let seen = l.step(p, RateMode::Peek).await?.0;
                        match decisions.get_mut(j) {
                            Some(d) => *d = seen,
                            None => decisions.push(seen),
                        }
                    }
                }
                return Ok(decisions);
            }
            if p.cost > 0 {
                taken.push((i, now_ms));
            }
        }
        Ok(decisions)
    }

    /// Gives back what the policies in `taken` consumed. Documented: a give-back that fails
    /// leaves that policy charged (stricter, never looser).
    async fn give_back(&self, planned: &[Planned], taken: &[(usize, u64)]) {
        for &(i, at) in taken.iter().rev() {
            let l = &self.limiters[i];
            let rule = planned[i].rule(l.algorithm());
            let _ = rate::refund_cas(&*l.backend, &rule, at).await;
        }
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
        let planned = self.plan(key.as_ref(), 1, &QuotaOverrides::default())?;
        combine(&self.step(&planned, RateMode::Peek).await?)
    }

    fn plan(
        &self,
        key: &[u8],
        cost: u64,
        overrides: &QuotaOverrides,
    ) -> Result<Vec<Planned>, RateLimitError> {
        self.limiters
            .iter()
            .map(|l| l.plan(key, cost, overrides.get(l.name())))
            .collect()
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
            label: limiter.name().to_owned(),
            limiters: vec![limiter],
        }
    }
}
