//! Distributed locks with fencing tokens, built only on the [`Backend`] contract.
//!
//! A [`Lock`] hands out [`Lease`]s. A lease names its lock, carries a random owner token
//! (128 bits from a CSPRNG), a **fencing token** and a deadline on the local monotonic clock.
//! A lease is a *time-bounded* promise: a holder that stalls (a long GC pause, a swapped-out
//! VM, a slow network) can outlive its TTL and keep writing after someone else took the lock.
//! The fencing token is the defence: it is strictly greater for every later holder of the same
//! lock name, so the protected resource can refuse writes carrying an older token ([`Fence`]).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use keel_primitives::Embedded;
//! use keel_primitives::lock::{Fence, Lock};
//!
//! let backend = Arc::new(Embedded::memory());
//! let lock = Lock::new(backend.clone());
//! let fence = Fence::new(backend);
//! let written = lock
//!     .with_lock("invoice:17", Duration::from_secs(30), |lease| async move {
//!         // Every write to the protected resource carries the fencing token.
//!         fence.check_and_record("invoices", lease.fencing_token()).await
//!     })
//!     .await??;
//! assert!(written.is_accepted());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Layout
//! For a lock named `name` (arbitrary bytes; the braces are literal, a Redis Cluster hash tag
//! that keeps both keys of a lock in one slot):
//! - `lock:{name}` holds the current owner, with the lease's TTL. While an acquisition is in
//!   progress the value is the 16-byte owner token alone; once the fencing token is known it is
//!   `owner token (16 bytes) || fencing token (u64, 8 bytes little-endian)`, 24 bytes.
//! - `lock-stripe:{NNNN}` ([`fence_counter_key`]) is the fencing counter the name maps to: one
//!   of [`FENCE_STRIPES`] (4,096) counters that all lock names share, chosen by a fixed hash of
//!   the name. A decimal integer without a TTL, only ever incremented with
//!   [`Backend::incr_durable`]. Each name always uses the same stripe, so its tokens strictly
//!   increase across its holders (they skip the numbers other names of the stripe took, which
//!   is harmless); and fencing takes at most 4,096 keys of ~20 bytes, however many names come
//!   and go. Deleting a stripe resets the tokens of its names: don't (and don't flush a server
//!   holding it, or run Redis without persistence if tokens must survive a server restart).
//!   Earlier versions kept one counter per name, `lock-fence:{name}`: the first acquisition of
//!   a name in each process reads it, and moves the stripe past it if it is ahead, so tokens
//!   never go back across the upgrade (stop the old version's processes before the new one
//!   takes locks: an old process would keep counting on the per-name key).
//! - `fence:{resource}` is the highest token a [`Fence`] has accepted for `resource`, decimal,
//!   without a TTL.
//!
//! The two prefixes differ at their fifth byte, so no lock name's key can equal another name's
//! fencing counter. To share a server between applications, wrap the backend in
//! [`Namespaced`](crate::Namespaced).
//!
//! # Acquisition order, and why the tokens are safe
//! 1. Take `Instant::now()`. The lease's local deadline will be this plus the TTL minus a
//!    drift margin ([`drift_margin`]: 1% + 2 ms). Measuring from *before* the request means
//!    the server's TTL started no earlier than our clock did; the danger is a server clock
//!    that runs *faster* than ours, which would expire the key (and let another owner in)
//!    before our deadline: the margin covers a drift of up to 1%.
//! 2. `set_nx(lock:{name}, owner, ttl)`. Failure: the lock is held; nothing else was written.
//! 3. `incr_durable(lock-stripe:{NNNN}, 1)`: the fencing token, acknowledged only once durable.
//! 4. `compare_and_swap(lock:{name}, owner → owner || token, TtlPolicy::Keep)`. Failure means
//!    our pending hold expired before we could confirm it: the acquisition fails and the token
//!    is discarded (a gap in the sequence, which is harmless).
//!
//! The token is taken *after* the key is ours and the acquisition counts only if the key is
//! still ours afterwards. The owner token is unique, so once the key stops holding it, it never
//! holds it again: a successful confirmation in step 4 proves the key was ours continuously
//! from step 2 to step 4, so the increment in step 3 happened while we held the lock. Holds of
//! one lock never overlap (the backend's `set_nx` is atomic and the key is ours until it is
//! deleted or expires), so the increments of successive holders happen in holding order and a
//! later holder's token is strictly greater. Taking the token *first* would be unsafe: a client
//! could take token 5, stall, and acquire the lock after the holder of token 6 is gone.
//!
//! Tokens survive expiry (the counter has no TTL) and restarts of a durable backend
//! (`incr_durable` is durable before it returns, even when the embedded store runs with
//! `Durability::Periodic`). A TTL must comfortably exceed three round trips to the backend, or
//! step 4 fails with [`LockError::TtlTooShort`].
//!
//! An acquisition cancelled at any of its await points (its future dropped by a caller's
//! timeout) leaves no hold behind: a guard armed before step 2 deletes, in the background and
//! by exact value, whatever the attempt may already hold.
//!
//! # Releasing and extending
//! [`Lease::release`] is `compare_and_delete` on the exact stored value and [`Lease::extend`] is
//! `compare_and_swap(value → value, TtlPolicy::Set(ttl))`: both act only while the key still
//! holds this lease's value, so a holder whose lease expired can never delete or prolong the
//! next holder's lock. A [`Lease`] dropped without `release` is released in the background (if
//! a Tokio runtime is running); otherwise the key expires with its TTL.
//!
//! # Runtime
//! Waiting, auto-renew and background release use Tokio (timers and tasks); call them inside a
//! Tokio runtime with timers enabled.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, watch};

use crate::backend::{Backend, ReleaseNotice, TtlPolicy, ttl_ms};
use crate::error::{Error, ErrorKind};

/// Length of an owner token, in bytes (128 bits from a CSPRNG).
pub const OWNER_TOKEN_BYTES: usize = 16;
/// Length of the fencing token in the lock key's value (u64, little-endian).
const FENCE_BYTES: usize = 8;
/// Length of a confirmed lock key's value: owner token then fencing token.
const LOCK_VALUE_BYTES: usize = OWNER_TOKEN_BYTES + FENCE_BYTES;

/// Prefix of lock keys: `lock:{name}` (with literal braces).
pub const LOCK_KEY_PREFIX: &[u8] = b"lock:";
/// Prefix of the per-name fencing counters of earlier versions: `lock-fence:{name}` (with
/// literal braces). Read once per name and process to carry their tokens over, never written.
pub const FENCE_COUNTER_PREFIX: &[u8] = b"lock-fence:";
/// Prefix of the striped fencing counters: `lock-stripe:{NNNN}`, one per stripe.
pub const FENCE_STRIPE_PREFIX: &[u8] = b"lock-stripe:";
/// How many fencing counters all lock names share (each name always maps to the same one,
/// by a fixed hash): the space fencing takes is bounded by this many keys, whatever the
/// number of lock names.
pub const FENCE_STRIPES: u32 = 4096;
/// Prefix of the keys where a [`Fence`] records the highest token per resource.
pub const FENCE_RESOURCE_PREFIX: &[u8] = b"fence:";

/// How many compare-and-swap rounds [`Fence::check_and_record`] tries before giving up with
/// [`LockError::Contention`]. Every lost round means another writer recorded a higher token,
/// so this is only reached by more than this many strictly increasing concurrent tokens.
pub const FENCE_CAS_ATTEMPTS_MAX: u32 = 64;

/// The default for [`LockOptions::wait`].
pub const WAIT_DEFAULT: Duration = Duration::from_secs(10);
/// The default first retry delay of [`Lock::acquire`].
pub const RETRY_INITIAL_DEFAULT: Duration = Duration::from_millis(10);
/// The default longest retry delay of [`Lock::acquire`].
pub const RETRY_MAX_DEFAULT: Duration = Duration::from_millis(200);
/// Auto-renew renews once a third of the TTL has passed since the last renewal.
const RENEW_DIVISOR: u32 = 3;
/// After a failed renewal, auto-renew retries after a tenth of the TTL (at least 1 ms).
const RENEW_RETRY_DIVISOR: u32 = 10;

const _: () = assert!(LOCK_VALUE_BYTES == 24);
const _: () = assert!(
    RENEW_DIVISOR >= 2,
    "renewing only at the deadline would lose the lock"
);

/// Why a lock operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// [`Lock::acquire`] waited as long as it was allowed to and the lock was still held.
    #[error(
        "lock {name:?} was still held by another owner after waiting {waited:?}; try again \
         later or wait longer (LockOptions::wait)"
    )]
    Timeout {
        /// The lock's name (lossy UTF-8).
        name: String,
        /// How long the call waited.
        waited: Duration,
    },
    /// The lease is no longer held: it expired (and another owner may hold the lock now) or
    /// auto-renew could not renew it in time. Stop touching the protected resource; acquire
    /// again to continue.
    #[error(
        "the lease on lock {name:?} was lost: it expired or another owner holds the lock now; \
         stop using the protected resource and acquire the lock again"
    )]
    Lost {
        /// The lock's name (lossy UTF-8).
        name: String,
    },
    /// A compare-and-swap loop lost [`FENCE_CAS_ATTEMPTS_MAX`] rounds to concurrent writers.
    /// Nothing was recorded; retrying may succeed.
    #[error(
        "{attempts} compare-and-swap rounds on fence {resource:?} lost to concurrent writers; \
         nothing was recorded, retry"
    )]
    Contention {
        /// The resource's name (lossy UTF-8).
        resource: String,
        /// Rounds tried.
        attempts: u32,
    },
    /// The lock's TTL ran out before the acquisition could confirm it: the TTL is shorter
    /// than the few round trips an acquisition takes (here `took`). Nothing is held; use a
    /// longer TTL.
    #[error(
        "lock {name:?}: the TTL of {ttl:?} expired before the acquisition was confirmed (it \
         took {took:?}); use a TTL of several round trips at least"
    )]
    TtlTooShort {
        /// The lock's name (lossy UTF-8).
        name: String,
        /// The TTL asked for.
        ttl: Duration,
        /// How long the attempt took.
        took: Duration,
    },
    /// The operation needs a Tokio runtime (to wait, renew or release in the background) and
    /// was called outside one. Nothing was written.
    #[error("this lock operation needs a Tokio runtime with timers; call it inside one")]
    NoRuntime,
    /// The backend failed (see [`Error::kind`] for whether retrying may help). For an
    /// acquisition, any partial hold was abandoned on a best-effort basis and otherwise expires
    /// with its TTL.
    #[error(transparent)]
    Backend(#[from] Error),
}

/// Whether a lease renews itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Renewal {
    /// The lease lasts its TTL unless [`Lease::extend`] is called. The default.
    #[default]
    Manual,
    /// A background task renews the lease once a third of its TTL has passed since the last
    /// renewal, until the lease is released or dropped, or a renewal finds the lock lost
    /// (then [`Lease::lost`] resolves). Needs a Tokio runtime.
    Auto,
}

/// How a [`Lock`] waits and renews. Start from `LockOptions::default()` and chain setters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOptions {
    wait: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    renewal: Renewal,
    wake_on_release: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            wait: WAIT_DEFAULT,
            retry_initial: RETRY_INITIAL_DEFAULT,
            retry_max: RETRY_MAX_DEFAULT,
            renewal: Renewal::Manual,
            wake_on_release: true,
        }
    }
}

impl LockOptions {
    /// How long [`Lock::acquire`] (and [`Lock::with_lock`]) keep retrying a held lock before
    /// failing with [`LockError::Timeout`]. Default [`WAIT_DEFAULT`] (10 s); zero tries once.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Retry delays while waiting: the first is `initial`, each next one doubles up to `max`,
    /// and each is jittered down by up to half so waiters spread out. Defaults 10 ms and
    /// 200 ms. `max` below `initial` is raised to `initial`.
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max.max(initial);
        self
    }

    /// Whether a release in this process wakes one waiting task at once (default `true`).
    /// `false` leaves every waiter to its polling backoff (for comparison).
    pub fn wake_on_release(mut self, wake: bool) -> Self {
        self.wake_on_release = wake;
        self
    }

    /// Whether leases from [`Lock::acquire`] and [`Lock::try_acquire`] renew themselves.
    /// Default [`Renewal::Manual`]. [`Lock::with_lock`] always renews.
    pub fn renewal(mut self, renewal: Renewal) -> Self {
        self.renewal = renewal;
        self
    }

    /// The configured wait.
    pub fn wait_limit(&self) -> Duration {
        self.wait
    }
}

/// A distributed lock service over one backend: acquire leases on named locks. Cheap to clone.
#[derive(Clone)]
pub struct Lock {
    backend: Arc<dyn Backend>,
    options: LockOptions,
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("backend", &self.backend.name())
            .field("options", &self.options)
            .finish()
    }
}

impl Lock {
    /// Locks on `backend` with default [`LockOptions`].
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Lock::with_options(backend, LockOptions::default())
    }

    /// Locks on `backend` with `options`.
    pub fn with_options(backend: Arc<dyn Backend>, options: LockOptions) -> Self {
        Lock { backend, options }
    }

    /// The options in force.
    pub fn options(&self) -> &LockOptions {
        &self.options
    }

    /// Tries once to take the lock `name` for `ttl`. `Ok(None)`: someone else holds it.
    ///
    /// # Errors
    /// [`LockError::Backend`] with [`ErrorKind::InvalidInput`] for a TTL of zero or over the
    /// maximum, [`ErrorKind::Limit`] for a name too long for a key; other backend failures;
    /// [`LockError::NoRuntime`] if auto-renew is configured and no Tokio runtime is running.
    pub async fn try_acquire(
        &self,
        name: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<Option<Lease>, LockError> {
        let name = name.as_ref();
        ttl_ms(ttl)?;
        // Checked before acquiring: failing after would leave the key held until its TTL.
        if self.options.renewal == Renewal::Auto && tokio::runtime::Handle::try_current().is_err() {
            return Err(LockError::NoRuntime);
        }
        let lease = match self.attempt(name, ttl).await {
            Ok(lease) => lease,
            Err(e) => {
                crate::observe::lock_acquisition("error");
                return Err(e);
            }
        };
        crate::observe::lock_acquisition(if lease.is_some() { "acquired" } else { "busy" });
        match lease {
            Some(mut lease) if self.options.renewal == Renewal::Auto => {
                lease.auto_renew()?;
                Ok(Some(lease))
            }
            other => Ok(other),
        }
    }

    /// Takes the lock `name` for `ttl`, retrying for up to [`LockOptions::wait`]: at once when
    /// a lease of it is released through this `Lock` (or a clone) in this process (a release,
    /// a dropped lease or an abandoned acquisition hands the lock to one waiting task), at once
    /// when a holder in another process releases it on a backend that carries release notices
    /// (Redis and Valkey pub/sub, Postgres `LISTEN`/`NOTIFY`: one waiter per process is
    /// woken), otherwise after a jittered exponential backoff (an expiry, a lost notice, or a
    /// backend without notices is seen at the next poll).
    ///
    /// # Errors
    /// [`LockError::Timeout`] if the lock was still held when the wait ran out; otherwise as
    /// [`Lock::try_acquire`].
    pub async fn acquire(&self, name: impl AsRef<[u8]>, ttl: Duration) -> Result<Lease, LockError> {
        self.acquire_within(name, ttl, self.options.wait).await
    }

    /// [`Lock::acquire`] with an explicit wait instead of [`LockOptions::wait`].
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    pub async fn acquire_within(
        &self,
        name: impl AsRef<[u8]>,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, LockError> {
        let name = name.as_ref();
        let started = Instant::now();
        let mut delay = self.options.retry_initial;
        let waiters = waiters_for(&self.backend, &tagged(LOCK_KEY_PREFIX, name));
        let wakes = self.options.wake_on_release;
        loop {
            // Registered before the attempt, so a release between a failed attempt and the
            // wait below still wakes this waiter. (Never registered when it will not be
            // awaited: it would take a wake-up another waiter needs.)
            let mut wake = std::pin::pin!(waiters.released.notified());
            if wakes {
                wake.as_mut().enable();
            }
            if let Some(lease) = self.try_acquire(name, ttl).await? {
                return Ok(lease);
            }
            let left = wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                crate::observe::lock_acquisition("timeout");
                return Err(LockError::Timeout {
                    name: lossy(name),
                    waited: started.elapsed(),
                });
            }
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(LockError::NoRuntime);
            }
            if wakes {
                listen_for_releases(&self.backend);
            }
            let jittered = delay.mul_f64(rand::random_range(0.5..=1.0));
            let _parked = Parked::new(&waiters);
            tokio::select! {
                // A release in this process: try again at once.
                () = &mut wake, if wakes => {}
                // Holders elsewhere (or an expiry): poll.
                () = tokio::time::sleep(jittered.min(left)) => {
                    delay = (delay * 2).min(self.options.retry_max);
                }
            }
        }
    }

    /// Runs `f` while holding the lock `name`: acquires it (waiting as [`Lock::acquire`]),
    /// renews it in the background while `f` runs, and releases it when `f` finishes, also if
    /// `f` panics (the panic then continues after the release) and, in the background, if this
    /// future is dropped before `f` finishes.
    ///
    /// `f` receives a [`LeaseWatch`] with the fencing token (pass it to the protected resource)
    /// and a way to learn that the lease was lost while `f` runs. `f` is not cancelled when the
    /// lease is lost (see [`Lock::with_lock_or_cancel`] for that), but the loss is reported:
    /// if the lease was found lost while `f` ran or at the release, the call returns
    /// [`LockError::Lost`] instead of `f`'s output, because `f`'s work may have overlapped
    /// another holder's. A release that fails on a backend error is not reported (the lease's
    /// drop retries in the background, and the TTL bounds the rest).
    ///
    /// # Errors
    /// As [`Lock::acquire`]; [`LockError::Lost`] as above. `f`'s own output is returned as is.
    pub async fn with_lock<F, Fut, T>(
        &self,
        name: impl AsRef<[u8]>,
        ttl: Duration,
        f: F,
    ) -> Result<T, LockError>
    where
        F: FnOnce(LeaseWatch) -> Fut,
        Fut: Future<Output = T>,
    {
        self.scoped(name.as_ref(), ttl, f, false).await
    }

    /// [`Lock::with_lock`], but `f` is cancelled (its future dropped at its next await point)
    /// as soon as the lease is known lost, and the call returns [`LockError::Lost`].
    ///
    /// # Errors
    /// As [`Lock::with_lock`].
    pub async fn with_lock_or_cancel<F, Fut, T>(
        &self,
        name: impl AsRef<[u8]>,
        ttl: Duration,
        f: F,
    ) -> Result<T, LockError>
    where
        F: FnOnce(LeaseWatch) -> Fut,
        Fut: Future<Output = T>,
    {
        self.scoped(name.as_ref(), ttl, f, true).await
    }

    async fn scoped<F, Fut, T>(
        &self,
        name: &[u8],
        ttl: Duration,
        f: F,
        cancel_on_loss: bool,
    ) -> Result<T, LockError>
    where
        F: FnOnce(LeaseWatch) -> Fut,
        Fut: Future<Output = T>,
    {
        // Checked before acquiring: failing after would leave the key held until its TTL.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(LockError::NoRuntime);
        }
        let mut lease = self.acquire(name, ttl).await?;
        lease.auto_renew()?;
        let watch = lease.watch();
        let lost = lease.watch();
        // `f` is called inside the first poll so a panic while building its future is caught
        // too. If this whole future is dropped, `lease`'s Drop releases the lock.
        let body = CatchUnwind::new(async move { f(watch).await });
        let outcome = if cancel_on_loss {
            tokio::select! {
                outcome = body => Some(outcome),
                () = lost.lost() => None,
            }
        } else {
            Some(body.await)
        };
        let was_lost = outcome.is_none() || lease.is_lost();
        let released = lease.release().await;
        let lost_error = || LockError::Lost { name: lossy(name) };
        match outcome {
            None => Err(lost_error()),
            Some(Err(panic)) => resume_unwind(panic),
            Some(Ok(_)) if was_lost || matches!(released, Ok(false)) => Err(lost_error()),
            Some(Ok(value)) => Ok(value),
        }
    }

    /// The next fencing token of `name`, from its stripe's counter. The first time this
    /// process takes a token for `name`, it also reads the per-name counter an earlier version
    /// kept and, if that is ahead, moves the stripe past it, so tokens never go back across
    /// the upgrade.
    async fn next_token(&self, name: &[u8], stripe: &[u8]) -> crate::error::Result<i64> {
        let token = self.backend.incr_durable(stripe, 1, None).await?;
        let legacy_key = tagged(FENCE_COUNTER_PREFIX, name);
        // A counter that is not positive is corrupt: the caller reports it.
        if token <= 0 || legacy_done(&legacy_key) {
            return Ok(token);
        }
        let legacy = match self.backend.get(&legacy_key).await? {
            Some(raw) => crate::backend::parse_i64(&raw).unwrap_or(0),
            None => 0,
        };
        let token = if legacy >= token {
            self.backend
                .incr_durable(stripe, legacy - token + 1, None)
                .await?
        } else {
            token
        };
        mark_legacy_done(&legacy_key);
        Ok(token)
    }

    async fn attempt(&self, name: &[u8], ttl: Duration) -> Result<Option<Lease>, LockError> {
        let key = tagged(LOCK_KEY_PREFIX, name);
        let fence_key = fence_counter_key(name);
        let owner: [u8; OWNER_TOKEN_BYTES] = rand::random();
        let started = Instant::now();
        // Armed before the first write: a future dropped at any await point below (a caller's
        // timeout, say) may already hold the key, and must not leave it held for its TTL.
        let mut partial = PartialHold::new(&self.backend, &key, &owner);
        if !self.backend.set_nx(&key, &owner, Some(ttl)).await? {
            partial.disarm();
            return Ok(None);
        }
        // The key is ours (pending). Take the fencing token while holding it; see the module
        // docs for why this order makes tokens strictly increase across holders.
        let token = match self.next_token(name, &fence_key).await {
            Ok(n) if n > 0 => n.unsigned_abs(),
            Ok(n) => {
                self.abandon(&key, &owner).await;
                partial.disarm();
                return Err(Error::new(
                    ErrorKind::Corruption,
                    format!(
                        "fencing counter {:?} went to {n}, not a positive integer; it was \
                         modified outside the lock, fix or delete it knowing tokens restart",
                        lossy(&fence_key)
                    ),
                )
                .into());
            }
            Err(e) => {
                self.abandon(&key, &owner).await;
                partial.disarm();
                return Err(e.into());
            }
        };
        let mut value = [0u8; LOCK_VALUE_BYTES];
        value[..OWNER_TOKEN_BYTES].copy_from_slice(&owner);
        value[OWNER_TOKEN_BYTES..].copy_from_slice(&token.to_le_bytes());
        partial.also(&value);
        match self
            .backend
            .compare_and_swap(&key, Some(&owner), &value, TtlPolicy::Keep)
            .await
        {
            Ok(true) => partial.disarm(),
            Ok(false) => {
                // The pending hold vanished before it was confirmed: with nobody else
                // allowed to touch it, it expired, so the TTL is shorter than the few round
                // trips an acquisition takes. Say so, instead of "held by another owner".
                partial.disarm();
                return Err(LockError::TtlTooShort {
                    name: lossy(name),
                    ttl,
                    took: started.elapsed(),
                });
            }
            Err(e) => {
                // Unknown whether the swap happened: abandon either value.
                self.abandon(&key, &owner).await;
                self.abandon(&key, &value).await;
                partial.disarm();
                return Err(e.into());
            }
        }
        // The lease is believed held until its TTL minus a drift margin, measured from before
        // the first write: the server's TTL clock started no earlier than `started`, and a
        // server clock that runs fast ends it up to the margin sooner.
        let deadline = started
            .checked_add(ttl.saturating_sub(drift_margin(ttl)))
            .unwrap_or(started);
        let (state, _) = watch::channel(LeaseState {
            deadline,
            ended: false,
        });
        Ok(Some(Lease {
            shared: Arc::new(Shared {
                backend: Arc::clone(&self.backend),
                name: name.to_vec(),
                key,
                value,
                token,
                state,
                ttl: Mutex::new(ttl),
            }),
            renewer: None,
            released: false,
        }))
    }

    /// Best-effort removal of a partial hold after a failure; the TTL bounds it otherwise.
    async fn abandon(&self, key: &[u8], value: &[u8]) {
        let _ = self.backend.compare_and_delete(key, value).await;
    }
}

/// The part of a lease's TTL a holder does not count on: 1% of it plus 2 ms (Redlock's rule),
/// for a server clock that runs faster than this process's. A holder's local deadline is
/// `start + ttl - drift_margin(ttl)`, so [`Lease::is_lost`] turns true before such a server
/// can hand the lock to someone else.
pub fn drift_margin(ttl: Duration) -> Duration {
    (ttl / 100 + DRIFT_MARGIN_FIXED).min(ttl)
}

/// The fixed part of [`drift_margin`].
const DRIFT_MARGIN_FIXED: Duration = Duration::from_millis(2);

/// A hold an acquisition may have taken but not yet handed to a [`Lease`]. Dropped while
/// armed (the acquiring future was cancelled at one of its await points), it deletes the
/// hold in the background, by value, so only a hold that is still this attempt's goes.
struct PartialHold {
    backend: Arc<dyn Backend>,
    key: Vec<u8>,
    values: Vec<Vec<u8>>,
    armed: bool,
}

impl PartialHold {
    fn new(backend: &Arc<dyn Backend>, key: &[u8], owner: &[u8]) -> PartialHold {
        PartialHold {
            backend: Arc::clone(backend),
            key: key.to_vec(),
            values: vec![owner.to_vec()],
            armed: true,
        }
    }

    /// The hold may also have this value (the confirmed one).
    fn also(&mut self, value: &[u8]) {
        self.values.push(value.to_vec());
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for PartialHold {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // no runtime left to run the delete on: the TTL ends the hold
        };
        let backend = Arc::clone(&self.backend);
        let key = std::mem::take(&mut self.key);
        let values = std::mem::take(&mut self.values);
        runtime.spawn(async move {
            for value in values {
                if let Ok(true) = backend.compare_and_delete(&key, &value).await {
                    released(&backend, &key).await;
                    return;
                }
            }
        });
    }
}

/// `prefix{name}`: the braces are a Redis Cluster hash tag, so a lock's lease key and its
/// fencing counter always hash to the same slot (whatever bytes the name holds, the text from
/// the first `{` to the next `}` is the same in both keys) and a future multi-key operation on
/// the pair stays on one node. (An empty name has an empty tag, which clusters ignore.)
fn tagged(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + name.len() + 2);
    key.extend_from_slice(prefix);
    key.push(b'{');
    key.extend_from_slice(name);
    key.push(b'}');
    key
}

/// `lock-stripe:{NNNN}`: the key of the fencing counter lock `name` maps to (FNV-1a, fixed, so every process
/// and version maps a name to the same stripe; the braces keep a stripe in one cluster slot).
pub fn fence_counter_key(name: &[u8]) -> Vec<u8> {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in name {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let mut key = FENCE_STRIPE_PREFIX.to_vec();
    key.extend_from_slice(format!("{{{:04}}}", hash % FENCE_STRIPES).as_bytes());
    key
}

/// Names whose per-name counter of an earlier version this process has already carried over
/// (bounded: when full it starts again, which costs one more read per name, nothing else).
static LEGACY_CHECKED: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<Vec<u8>>>> =
    std::sync::LazyLock::new(Default::default);
const LEGACY_CHECKED_MAX: usize = 65_536;

/// Whether this process has carried `legacy_key`'s counter over already.
fn legacy_done(legacy_key: &[u8]) -> bool {
    LEGACY_CHECKED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(legacy_key)
}

/// Records that `legacy_key`'s counter is carried over (only once that succeeded).
fn mark_legacy_done(legacy_key: &[u8]) {
    let mut set = LEGACY_CHECKED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if set.len() >= LEGACY_CHECKED_MAX {
        set.clear();
    }
    set.insert(legacy_key.to_vec());
}

/// Waiters for locks in this process, by backend handle and lease key: a release wakes one of
/// them at once (a hand-off: waking them all would send every waiter to the server for one
/// free lock) instead of leaving them to their next poll. Weak, so a key nobody waits for
/// costs nothing once its waiters are gone; the map is pruned when it grows.
type WaitersMap = std::collections::HashMap<(usize, Vec<u8>), std::sync::Weak<Waiters>>;
static WAITERS: std::sync::LazyLock<std::sync::Mutex<WaitersMap>> =
    std::sync::LazyLock::new(Default::default);

/// Tells backend handles apart in [`WAITERS`]: leases and waiters of one `Lock` (and its
/// clones) share the handle, so a release wakes only waiters on the same backend.
fn backend_id(backend: &Arc<dyn Backend>) -> usize {
    Arc::as_ptr(backend).cast::<()>() as usize
}
/// Entries past which [`waiters_for`] prunes the keys nobody waits for.
const WAITERS_PRUNE_AT: usize = 1024;

/// The waiters of one lock key in this process.
#[derive(Default)]
struct Waiters {
    released: tokio::sync::Notify,
    /// Waiters between a failed attempt and their next one (for tests and monitoring).
    parked: std::sync::atomic::AtomicUsize,
}

/// The wake-up signal of `key`'s waiters on `backend` in this process.
fn waiters_for(backend: &Arc<dyn Backend>, key: &[u8]) -> Arc<Waiters> {
    let id = (backend_id(backend), key.to_vec());
    let mut map = WAITERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(waiters) = map.get(&id).and_then(std::sync::Weak::upgrade) {
        return waiters;
    }
    if map.len() >= WAITERS_PRUNE_AT {
        map.retain(|_, w| w.strong_count() > 0);
    }
    let waiters = Arc::new(Waiters::default());
    map.insert(id, Arc::downgrade(&waiters));
    waiters
}

/// Wakes one of this process's waiters for `key` on `backend` (a hold was just deleted).
fn wake_waiters(backend: &Arc<dyn Backend>, key: &[u8]) {
    wake_waiters_of(backend_id(backend), key);
}

fn wake_waiters_of(backend: usize, key: &[u8]) {
    let id = (backend, key.to_vec());
    let waiters = WAITERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&id)
        .and_then(std::sync::Weak::upgrade);
    if let Some(waiters) = waiters {
        waiters.released.notify_one();
    }
}

/// Wakes one waiter of every key on `backend` in this process (release notices were lost).
fn wake_every_waiter_of(backend: usize) {
    let all: Vec<Arc<Waiters>> = WAITERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter(|((b, _), _)| *b == backend)
        .filter_map(|(_, w)| w.upgrade())
        .collect();
    for waiters in all {
        waiters.released.notify_one();
    }
}

/// A hold on `key` was deleted by its owner: hands the lock to one waiter in this process and
/// tells the other processes (a release notice; a lost one only leaves waiters elsewhere to
/// their polling). Awaited, not spawned: a background task would keep the backend alive past
/// the release, and an embedded store could not be reopened at once after it is dropped.
async fn released(backend: &Arc<dyn Backend>, key: &[u8]) {
    wake_waiters(backend, key);
    if let Err(e) = backend.publish_release(key).await {
        tracing::debug!(error = %e, "lock release notice not sent; waiters elsewhere poll");
    }
}

/// Backend handles whose release notices are being turned into wake-ups, by
/// [`backend_id`]; the `Weak` tells a handle from a later one at the same address.
type ListenersMap = std::collections::HashMap<usize, std::sync::Weak<dyn Backend>>;
static LISTENERS: std::sync::LazyLock<std::sync::Mutex<ListenersMap>> =
    std::sync::LazyLock::new(Default::default);

/// Starts, once per backend handle, the task that turns release notices from other processes
/// into hand-offs to this process's waiters (one waiter per released key, as for a release in
/// this process). A backend without notices is remembered too, so it is asked only once.
fn listen_for_releases(backend: &Arc<dyn Backend>) {
    let id = backend_id(backend);
    {
        let mut map = LISTENERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map
            .get(&id)
            .and_then(std::sync::Weak::upgrade)
            .is_some_and(|known| Arc::ptr_eq(&known, backend))
        {
            return;
        }
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(id, Arc::downgrade(backend));
    }
    let Some(mut notices) = backend.release_notices() else {
        return;
    };
    // The task holds no strong reference: it ends when the backend (and so the sender of
    // its notices) is gone.
    tokio::spawn(async move {
        while let Some(notice) = notices.recv().await {
            match notice {
                ReleaseNotice::Released(key) => wake_waiters_of(id, &key),
                ReleaseNotice::Missed => wake_every_waiter_of(id),
            }
        }
    });
}

/// Counts a waiter as parked while it lives.
struct Parked<'a>(&'a Waiters);

impl<'a> Parked<'a> {
    fn new(waiters: &'a Waiters) -> Self {
        waiters
            .parked
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Parked(waiters)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0
            .parked
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How many tasks of this process wait for lock `name` on `backend` between two attempts (for
/// monitoring and tests: a waiter counted here is woken by a release through `backend`, or by
/// a release notice from another process).
pub fn parked_waiters(backend: &Arc<dyn Backend>, name: &[u8]) -> usize {
    let id = (backend_id(backend), tagged(LOCK_KEY_PREFIX, name));
    WAITERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&id)
        .and_then(std::sync::Weak::upgrade)
        .map_or(0, |w| w.parked.load(std::sync::atomic::Ordering::SeqCst))
}

fn prefixed(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + name.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(name);
    key
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What watchers know about a lease.
#[derive(Debug, Clone, Copy)]
struct LeaseState {
    /// Until when the lease certainly holds (local monotonic clock, conservative).
    deadline: Instant,
    /// Lost, or released/dropped by its holder: no longer held either way.
    ended: bool,
}

/// State shared by a lease, its renewer task and its watchers.
struct Shared {
    backend: Arc<dyn Backend>,
    name: Vec<u8>,
    key: Vec<u8>,
    value: [u8; LOCK_VALUE_BYTES],
    token: u64,
    state: watch::Sender<LeaseState>,
    /// The TTL renewals use. Held across a renewal, so renewals (auto and manual) run one at a
    /// time and the deadline always belongs to the latest one.
    ttl: Mutex<Duration>,
}

impl Shared {
    fn lost_error(&self) -> LockError {
        LockError::Lost {
            name: lossy(&self.name),
        }
    }

    fn end(&self) {
        self.state.send_modify(|s| s.ended = true);
    }

    /// Prolongs the lease to `ttl` (or the current TTL) from now, if it is still ours.
    async fn renew(&self, ttl: Option<Duration>) -> Result<(), LockError> {
        let mut current = self.ttl.lock().await;
        if self.state.borrow().ended {
            return Err(self.lost_error());
        }
        let ttl = ttl.unwrap_or(*current);
        let started = Instant::now();
        let swapped = self
            .backend
            .compare_and_swap(
                &self.key,
                Some(&self.value),
                &self.value,
                TtlPolicy::Set(ttl),
            )
            .await?;
        if swapped {
            *current = ttl;
            let deadline = started
                .checked_add(ttl.saturating_sub(drift_margin(ttl)))
                .unwrap_or(started);
            self.state.send_modify(|s| s.deadline = deadline);
            Ok(())
        } else {
            crate::observe::lock_loss("renewal");
            self.end();
            Err(self.lost_error())
        }
    }
}

/// A held lock: its fencing token, its deadline, and the means to extend or release it.
///
/// Dropping a lease without [`Lease::release`] stops its auto-renew and releases it in the
/// background (inside a Tokio runtime; otherwise the key expires with its TTL). Prefer
/// `release().await` to learn whether the lease was still held.
pub struct Lease {
    shared: Arc<Shared>,
    renewer: Option<tokio::task::AbortHandle>,
    released: bool,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("name", &lossy(&self.shared.name))
            .field("fencing_token", &self.shared.token)
            .field("remaining", &self.remaining())
            .field("auto_renew", &self.renewer.is_some())
            .finish()
    }
}

impl Lease {
    /// The lock's name.
    pub fn name(&self) -> &[u8] {
        &self.shared.name
    }

    /// The fencing token: strictly greater than that of every earlier holder of this lock.
    /// Pass it with every write to the protected resource (see [`Fence`]).
    pub fn fencing_token(&self) -> u64 {
        self.shared.token
    }

    /// This holder's random owner token, as stored in the lock key.
    pub fn owner_token(&self) -> [u8; OWNER_TOKEN_BYTES] {
        let mut owner = [0u8; OWNER_TOKEN_BYTES];
        owner.copy_from_slice(&self.shared.value[..OWNER_TOKEN_BYTES]);
        owner
    }

    /// Until when the lease certainly holds, on the local monotonic clock: measured from
    /// before the acquiring (or last renewing) request, so it errs early.
    pub fn deadline(&self) -> Instant {
        self.shared.state.borrow().deadline
    }

    /// Time left until [`Lease::deadline`] (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// True once the lease can no longer be relied on: its deadline passed or a renewal found
    /// the lock taken. A later successful [`Lease::extend`] makes it false again (the key was
    /// then ours all along).
    pub fn is_lost(&self) -> bool {
        is_lost(&self.shared.state.borrow())
    }

    /// Resolves once [`Lease::is_lost`] becomes true (follows renewals).
    pub async fn lost(&self) {
        self.watch().lost().await;
    }

    /// A cloneable handle to watch this lease (fencing token, loss) from other tasks.
    pub fn watch(&self) -> LeaseWatch {
        LeaseWatch {
            rx: self.shared.state.subscribe(),
            token: self.shared.token,
        }
    }

    /// Prolongs the lease: the lock now expires `ttl` after this call (this may shorten it).
    /// With auto-renew running, later renewals use this TTL.
    ///
    /// # Errors
    /// [`LockError::Lost`] if the lock is no longer held with this lease (it expired, another
    /// owner has it, or a renewal already found it lost): nothing was changed.
    /// [`LockError::Backend`] for an invalid TTL or a backend failure (then whether the lease
    /// was prolonged is unknown; its deadline is unchanged).
    pub async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        ttl_ms(ttl)?;
        self.shared.renew(Some(ttl)).await
    }

    /// Starts renewing the lease in the background, once a third of its TTL has passed since
    /// the last renewal, until it is released, dropped or found lost. A renewal that fails with
    /// a backend error is retried every tenth of the TTL until the deadline passes; then the
    /// lease counts as lost. Does nothing if already renewing.
    ///
    /// # Errors
    /// [`LockError::NoRuntime`] outside a Tokio runtime.
    pub fn auto_renew(&mut self) -> Result<(), LockError> {
        if self.renewer.is_some() {
            return Ok(());
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|_| LockError::NoRuntime)?;
        let task = handle.spawn(keep_alive(Arc::clone(&self.shared)));
        self.renewer = Some(task.abort_handle());
        Ok(())
    }

    /// Releases the lock. `Ok(true)`: it was held with this lease and is now free.
    /// `Ok(false)`: the lease had already been lost (the key expired or belongs to a newer
    /// holder, which is left untouched).
    ///
    /// # Errors
    /// [`LockError::Backend`] if the backend failed; the release is then retried once in the
    /// background and the TTL bounds the rest.
    pub async fn release(mut self) -> Result<bool, LockError> {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        self.shared.end();
        let freed = self
            .shared
            .backend
            .compare_and_delete(&self.shared.key, &self.shared.value)
            .await?;
        self.released = true;
        if freed {
            released(&self.shared.backend, &self.shared.key).await;
        } else {
            crate::observe::lock_loss("release");
        }
        Ok(freed)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        if self.released {
            return;
        }
        self.shared.end();
        // A compare-and-delete on this lease's unique value can only ever remove this lease's
        // own hold, however late it runs.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let shared = Arc::clone(&self.shared);
            handle.spawn(async move {
                if let Ok(true) = shared
                    .backend
                    .compare_and_delete(&shared.key, &shared.value)
                    .await
                {
                    released(&shared.backend, &shared.key).await;
                }
            });
        }
    }
}

fn is_lost(state: &LeaseState) -> bool {
    state.ended || Instant::now() >= state.deadline
}

/// The auto-renew task: renews at a third of the TTL; on backend errors, retries until the
/// deadline; ends when the lease ends.
async fn keep_alive(shared: Arc<Shared>) {
    let mut retry_at: Option<Instant> = None;
    loop {
        let state = *shared.state.borrow();
        if state.ended {
            return;
        }
        let ttl = *shared.ttl.lock().await;
        let at = retry_at.unwrap_or_else(|| {
            let since_renewal = ttl / RENEW_DIVISOR;
            // deadline = renewal start + ttl - margin, so this is renewal start + ttl/3 - margin:
            // a renewal comes a margin early, never late.
            state
                .deadline
                .checked_sub(ttl.saturating_sub(since_renewal))
                .unwrap_or(state.deadline)
        });
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        match shared.renew(None).await {
            Ok(()) => retry_at = None,
            Err(LockError::Lost { .. }) => return,
            Err(_) => {
                let now = Instant::now();
                let deadline = shared.state.borrow().deadline;
                if now >= deadline {
                    crate::observe::lock_loss("deadline");
                    shared.end();
                    return;
                }
                let pause = (ttl / RENEW_RETRY_DIVISOR)
                    .max(Duration::from_millis(1))
                    .min(deadline - now);
                retry_at = Some(now + pause);
            }
        }
    }
}

/// Watches a [`Lease`] from anywhere: its fencing token and whether it is lost. Cloneable;
/// outlives the lease (after the lease is released or dropped it reports lost).
#[derive(Debug, Clone)]
pub struct LeaseWatch {
    rx: watch::Receiver<LeaseState>,
    token: u64,
}

impl LeaseWatch {
    /// The lease's fencing token.
    pub fn fencing_token(&self) -> u64 {
        self.token
    }

    /// True once the lease is lost, expired by its deadline, or released.
    pub fn is_lost(&self) -> bool {
        is_lost(&self.rx.borrow())
    }

    /// Until when the lease certainly holds (local monotonic clock).
    pub fn deadline(&self) -> Instant {
        self.rx.borrow().deadline
    }

    /// Resolves once [`LeaseWatch::is_lost`] becomes true, following renewals.
    pub async fn lost(&self) {
        let mut rx = self.rx.clone();
        loop {
            let state = *rx.borrow_and_update();
            if is_lost(&state) {
                return;
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The lease and its renewer are gone: no longer held.
                        return;
                    }
                }
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(state.deadline)) => {}
            }
        }
    }
}

/// Polls a future, turning a panic into an `Err` so the lock can be released before the panic
/// continues. Shared with `dedup::Dedup::once`, which releases its claim the same way.
pub(crate) struct CatchUnwind<F> {
    inner: Pin<Box<F>>,
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(inner: F) -> Self {
        CatchUnwind {
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.get_mut().inner.as_mut();
        // The future is never polled again after it panicked (it is dropped with `self`), so
        // no broken invariant inside it can be observed: asserting unwind safety is sound.
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// The outcome of [`Fence::check_and_record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceCheck {
    /// The token is at least the highest seen; it is now recorded. Go ahead with the write.
    Accepted,
    /// A newer holder has written already (or, with
    /// [`Fence::check_and_record_owned`], another owner holding the same token): refuse the
    /// write.
    Rejected {
        /// The highest token recorded for the resource.
        highest: u64,
    },
}

impl FenceCheck {
    /// True for [`FenceCheck::Accepted`].
    pub fn is_accepted(self) -> bool {
        self == FenceCheck::Accepted
    }
}

/// The protected resource's side of fencing: remembers, per resource, the highest fencing
/// token that has written to it (and, with [`Fence::check_and_record_owned`], which lease held
/// it), and refuses older ones. Atomic through a compare-and-swap loop on `fence:{resource}`.
///
/// The check and the record are one atomic step, but the write it guards is a separate step:
/// a holder that passes the check and then stalls can still write after a newer holder's
/// check. Fencing is airtight only where the resource itself enforces the token in the same
/// atomic step as the write (a conditional update keyed on the token, a storage system that
/// accepts a token); use this helper where the guarded write is quick and idempotent, or as
/// the model for such a condition.
///
/// Space: one key per resource, `fence:{resource}`, holding `token` or `token:owner` in
/// decimal and hex (at most ~60 bytes). Records keep no TTL unless [`Fence::with_retention`]
/// gives them one (then a resource idle for longer forgets its highest token: choose a
/// retention far longer than any holder can stall).
#[derive(Clone)]
pub struct Fence {
    backend: Arc<dyn Backend>,
    retention: Option<Duration>,
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fence")
            .field("backend", &self.backend.name())
            .field("retention", &self.retention)
            .finish()
    }
}

/// A fence record: the highest token, and the owner that wrote it when known.
struct FenceRecord {
    token: u64,
    owner: Option<Vec<u8>>,
}

impl Fence {
    /// Fences recorded on `backend`, kept forever.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Fence {
            backend,
            retention: None,
        }
    }

    /// Records expire `retention` after they were last raised (see the type's docs on space).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// Accepts a write to `resource` carrying `token` only if `token` is at least the highest
    /// token accepted before (equal is accepted: one holder may write many times; this form
    /// cannot tell two holders of one token apart, see
    /// [`Fence::check_and_record_owned`]), recording it as the new highest.
    ///
    /// # Errors
    /// [`LockError::Contention`] after [`FENCE_CAS_ATTEMPTS_MAX`] lost rounds; a
    /// [`LockError::Backend`] with [`ErrorKind::Corruption`] if the record is not a fence
    /// record; other backend failures.
    pub async fn check_and_record(
        &self,
        resource: impl AsRef<[u8]>,
        token: u64,
    ) -> Result<FenceCheck, LockError> {
        self.check(resource.as_ref(), token, None).await
    }

    /// [`Fence::check_and_record`] for a lease: `token` and the lease's
    /// [`owner token`](Lease::owner_token). An equal token is accepted only from the owner
    /// that recorded it, so two holders handed the same token (a counter rolled back by a
    /// server crash or a failover without durable writes) cannot both write: the second is
    /// rejected.
    ///
    /// # Errors
    /// As [`Fence::check_and_record`].
    pub async fn check_and_record_owned(
        &self,
        resource: impl AsRef<[u8]>,
        token: u64,
        owner: &[u8],
    ) -> Result<FenceCheck, LockError> {
        self.check(resource.as_ref(), token, Some(owner)).await
    }

    async fn check(
        &self,
        resource: &[u8],
        token: u64,
        owner: Option<&[u8]>,
    ) -> Result<FenceCheck, LockError> {
        let key = prefixed(FENCE_RESOURCE_PREFIX, resource);
        let encoded = encode_record(token, owner);
        let ttl = match self.retention {
            Some(retention) => TtlPolicy::Set(retention),
            None => TtlPolicy::Keep,
        };
        for round in 0..FENCE_CAS_ATTEMPTS_MAX {
            let current = self.backend.get(&key).await?;
            if let Some(raw) = &current {
                let record = parse_record(&key, raw)?;
                if token < record.token {
                    return Ok(FenceCheck::Rejected {
                        highest: record.token,
                    });
                }
                if token == record.token {
                    match (&record.owner, owner) {
                        (Some(recorded), Some(owner)) if recorded.as_slice() != owner => {
                            return Ok(FenceCheck::Rejected {
                                highest: record.token,
                            });
                        }
                        // The same owner, or an owner that cannot be compared: accepted, and
                        // an owner learnt now is recorded below.
                        (Some(_), _) | (None, None) => return Ok(FenceCheck::Accepted),
                        (None, Some(_)) => {}
                    }
                }
            }
            if self
                .backend
                .compare_and_swap(&key, current.as_deref(), &encoded, ttl)
                .await?
            {
                return Ok(FenceCheck::Accepted);
            }
            crate::backend::rate::lost_round(round).await;
        }
        Err(LockError::Contention {
            resource: lossy(resource),
            attempts: FENCE_CAS_ATTEMPTS_MAX,
        })
    }

    /// The highest token accepted for `resource`, if any.
    ///
    /// # Errors
    /// As [`Fence::check_and_record`], except contention.
    pub async fn highest(&self, resource: impl AsRef<[u8]>) -> Result<Option<u64>, LockError> {
        let key = prefixed(FENCE_RESOURCE_PREFIX, resource.as_ref());
        match self.backend.get(&key).await? {
            Some(raw) => Ok(Some(parse_record(&key, &raw)?.token)),
            None => Ok(None),
        }
    }
}

/// `token` or `token:owner-hex`.
fn encode_record(token: u64, owner: Option<&[u8]>) -> Vec<u8> {
    let mut out = token.to_string().into_bytes();
    if let Some(owner) = owner {
        out.push(b':');
        out.extend_from_slice(data_encoding::HEXLOWER.encode(owner).as_bytes());
    }
    out
}

fn parse_record(key: &[u8], raw: &[u8]) -> Result<FenceRecord, LockError> {
    let (token, owner) = match raw.iter().position(|&b| b == b':') {
        Some(at) => (&raw[..at], Some(&raw[at + 1..])),
        None => (raw, None),
    };
    let token = parse_token(key, token)?;
    let owner = match owner {
        Some(hex) => Some(data_encoding::HEXLOWER.decode(hex).map_err(|_| {
            LockError::from(Error::new(
                ErrorKind::Corruption,
                format!(
                    "fence record {:?} holds {:?}, whose owner is not hex; it was written \
                     outside Fence, fix or delete it",
                    lossy(key),
                    lossy(raw)
                ),
            ))
        })?),
        None => None,
    };
    Ok(FenceRecord { token, owner })
}

fn parse_token(key: &[u8], raw: &[u8]) -> Result<u64, LockError> {
    std::str::from_utf8(raw)
        .ok()
        .filter(|s| !s.starts_with('+'))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Corruption,
                format!(
                    "fence record {:?} holds {:?}, not a decimal token; it was written outside \
                     Fence, fix or delete it",
                    lossy(key),
                    lossy(raw)
                ),
            )
            .into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Embedded;

    fn backend() -> Arc<dyn Backend> {
        Arc::new(Embedded::memory())
    }

    #[tokio::test]
    async fn lock_value_is_owner_then_little_endian_token() {
        let b = backend();
        let lock = Lock::new(Arc::clone(&b));
        let lease = lock
            .try_acquire("job", Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        let stored = b.get(b"lock:{job}").await.unwrap().unwrap();
        assert_eq!(stored.len(), LOCK_VALUE_BYTES);
        assert_eq!(stored[..OWNER_TOKEN_BYTES], lease.owner_token());
        assert_eq!(stored[OWNER_TOKEN_BYTES..], 1u64.to_le_bytes());
        assert_eq!(
            b.get(&fence_counter_key(b"job")).await.unwrap(),
            Some(b"1".to_vec())
        );
        assert!(lease.release().await.unwrap());
        assert_eq!(b.get(b"lock:{job}").await.unwrap(), None);
        assert_eq!(
            b.get(&fence_counter_key(b"job")).await.unwrap(),
            Some(b"1".to_vec()),
            "kept"
        );
    }

    #[tokio::test]
    async fn owner_tokens_differ() {
        let lock = Lock::new(backend());
        let a = lock
            .try_acquire("a", Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        let b = lock
            .try_acquire("b", Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(a.owner_token(), b.owner_token());
    }

    #[tokio::test]
    async fn zero_ttl_is_invalid_input_and_writes_nothing() {
        let b = backend();
        let lock = Lock::new(Arc::clone(&b));
        match lock.try_acquire("x", Duration::ZERO).await {
            Err(LockError::Backend(e)) => assert_eq!(e.kind(), ErrorKind::InvalidInput),
            other => panic!("expected InvalidInput, got {other:?}"),
        }
        assert_eq!(b.get(&fence_counter_key(b"x")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn tokens_carry_over_from_an_earlier_per_name_counter() {
        let b = backend();
        b.set(b"lock-fence:{old}", b"41", None).await.unwrap();
        let lock = Lock::new(Arc::clone(&b));
        let lease = lock.try_acquire("old", Duration::from_secs(10)).await;
        assert_eq!(lease.unwrap().unwrap().fencing_token(), 42);
        let next = lock.try_acquire("old", Duration::from_secs(10)).await;
        assert!(next.unwrap().is_none(), "still held");
    }

    #[test]
    fn names_map_to_bounded_stable_stripes() {
        let key = fence_counter_key(b"job");
        assert!(key.starts_with(b"lock-stripe:{"), "{key:?}");
        assert_eq!(key, fence_counter_key(b"job"));
        let stripes: std::collections::HashSet<Vec<u8>> = (0..100_000)
            .map(|i| fence_counter_key(format!("n{i}").as_bytes()))
            .collect();
        assert_eq!(
            stripes.len(),
            FENCE_STRIPES as usize,
            "every stripe used, no more"
        );
    }

    #[tokio::test]
    async fn corrupt_fence_counter_fails_the_acquisition_and_frees_the_key() {
        let b = backend();
        b.set(&fence_counter_key(b"x"), b"-5", None).await.unwrap();
        let lock = Lock::new(Arc::clone(&b));
        match lock.try_acquire("x", Duration::from_secs(10)).await {
            Err(LockError::Backend(e)) => assert_eq!(e.kind(), ErrorKind::Corruption),
            other => panic!("expected Corruption, got {other:?}"),
        }
        assert_eq!(
            b.get(b"lock:{x}").await.unwrap(),
            None,
            "the pending hold was abandoned"
        );
    }

    #[tokio::test]
    async fn dropped_lease_is_released_in_the_background() {
        let b = backend();
        let lock = Lock::new(Arc::clone(&b));
        let lease = lock
            .try_acquire("x", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let watch = lease.watch();
        drop(lease);
        assert!(watch.is_lost(), "a dropped lease is no longer held");
        // The background release is a spawned task: wait for it on the lock itself.
        let again = lock
            .acquire_within("x", Duration::from_secs(60), Duration::from_secs(10))
            .await;
        assert_eq!(again.unwrap().fencing_token(), 2);
    }

    #[tokio::test]
    async fn with_lock_releases_before_a_panic_continues() {
        let b = backend();
        let lock = Lock::new(Arc::clone(&b));
        let panicking = lock.clone();
        let joined = tokio::spawn(async move {
            panicking
                .with_lock("scoped", Duration::from_secs(30), |_| async {
                    panic!("expected panic inside with_lock")
                })
                .await
        })
        .await;
        assert!(
            joined.is_err_and(|e| e.is_panic()),
            "the panic continues after the release"
        );
        assert_eq!(
            b.get(b"lock:{scoped}").await.unwrap(),
            None,
            "released before it went on"
        );
        // A panic while building the body's future is caught too.
        let panicking = lock.clone();
        let joined = tokio::spawn(async move {
            panicking
                .with_lock(
                    "scoped",
                    Duration::from_secs(30),
                    |_| -> std::future::Ready<()> { panic!("expected panic building the body") },
                )
                .await
        })
        .await;
        assert!(joined.is_err_and(|e| e.is_panic()));
        assert_eq!(b.get(b"lock:{scoped}").await.unwrap(), None);
    }

    #[tokio::test]
    async fn fence_record_with_garbage_is_corruption() {
        let b = backend();
        b.set(b"fence:r", b"+7", None).await.unwrap();
        let fence = Fence::new(b);
        match fence.check_and_record("r", 9).await {
            Err(LockError::Backend(e)) => assert_eq!(e.kind(), ErrorKind::Corruption),
            other => panic!("expected Corruption, got {other:?}"),
        }
    }

    #[test]
    fn operations_outside_a_runtime_do_not_panic() {
        let (state, _) = watch::channel(LeaseState {
            deadline: Instant::now() + Duration::from_secs(1),
            ended: false,
        });
        let mut lease = Lease {
            shared: Arc::new(Shared {
                backend: backend(),
                name: b"x".to_vec(),
                key: b"lock:{x}".to_vec(),
                value: [0; LOCK_VALUE_BYTES],
                token: 1,
                state,
                ttl: Mutex::new(Duration::from_secs(1)),
            }),
            renewer: None,
            released: false,
        };
        assert!(matches!(lease.auto_renew(), Err(LockError::NoRuntime)));
        drop(lease); // no runtime: no background release, and no panic
    }
}
