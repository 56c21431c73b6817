//! [`Stacked`]: several rate-limiting policies on the same keys, all of which must admit a
//! request (e.g. 10 per second *and* 1,000 per hour).

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;

use super::{Decision, Limiter, Prepared, RateLimitError, RateLimiter, Receipt};

/// Most policies one [`Stacked`] limiter may combine.
pub const STACK_POLICIES_MAX: usize = 16;

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
        let key = key.as_ref();
        let prepared = self.prepare(key, cost).await?;
        let mut decisions = Vec::with_capacity(self.limiters.len());
        for (limiter, p) in self.limiters.iter().zip(&prepared) {
            decisions.push(limiter.evaluate(key, cost, p).await?);
        }
        if cost == 0 || decisions.iter().any(|d| !d.allowed) {
            return combine(&decisions);
        }
        decisions.clear();
        let mut taken: Vec<(&RateLimiter, Receipt)> = Vec::with_capacity(self.limiters.len());
        for (limiter, p) in self.limiters.iter().zip(&prepared) {
            match limiter.consume(key, cost, p, true).await {
                Ok((decision, receipt)) => {
                    if !decision.allowed {
                        refund_all(taken).await;
                        return Ok(decision);
                    }
                    if let Some(receipt) = receipt {
                        taken.push((limiter, receipt));
                    }
                    decisions.push(decision);
                }
                Err(e) => {
                    refund_all(taken).await;
                    return Err(e);
                }
            }
        }
        combine(&decisions)
    }

    /// Whether a request of cost 1 would be admitted by every policy now; consumes nothing.
    ///
    /// # Errors
    /// As [`RateLimiter::peek`].
    pub async fn peek(&self, key: impl AsRef<[u8]>) -> Result<Decision, RateLimitError> {
        let key = key.as_ref();
        let prepared = self.prepare(key, 1).await?;
        let mut decisions = Vec::with_capacity(self.limiters.len());
        for (limiter, p) in self.limiters.iter().zip(&prepared) {
            decisions.push(limiter.evaluate(key, 1, p).await?);
        }
        combine(&decisions)
    }

    async fn prepare(&self, key: &[u8], cost: u64) -> Result<Vec<Prepared>, RateLimitError> {
        let mut prepared = Vec::with_capacity(self.limiters.len());
        for limiter in &self.limiters {
            prepared.push(limiter.prepare(key, cost).await?);
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
