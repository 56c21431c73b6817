//! Deduplication of work by id, built only on the [`Backend`] contract: the atomic "have I seen
//! this id?" that webhook receivers, queue consumers and run-once-across-replicas jobs need.
//!
//! An id is in one of three states: **free**, **in progress** (claimed by one owner, with a
//! lease) or **done** (for a retention period, by default three days, the longest common
//! webhook retry window). [`Dedup::claim`] moves a free id to in progress and hands out a
//! [`Ticket`]; only that ticket can [`complete`](Dedup::complete) it (done) or
//! [`release`](Dedup::release) it (free again, so a retry can run). A claim whose owner died
//! expires with its lease and can be claimed again; a done id is never run again within its
//! retention. [`Dedup::once`] wraps the whole dance around an async body.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::sync::Arc;
//! use keel_primitives::Embedded;
//! use keel_primitives::dedup::{Dedup, Once};
//!
//! let dedup = Dedup::new(Arc::new(Embedded::memory()));
//! let first = dedup.once("evt_1", || async { Ok::<_, std::io::Error>("charged") }).await?;
//! assert!(matches!(first, Once::Ran(Ok("charged"))));
//! // A redelivery of the same event does not run the body again.
//! let again = dedup.once("evt_1", || async { Ok::<_, std::io::Error>("charged twice!") }).await?;
//! assert!(matches!(again, Once::Done(None)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Keys
//! One key per id: `dedup:{id}` (the id is arbitrary bytes, 1 to [`ID_BYTES_MAX`]). Its value:
//! - in progress: `C` followed by the claim's 16-byte owner nonce (128 bits from a CSPRNG),
//!   with the lease as TTL;
//! - done: `D` alone, or `R` followed by a stored result (at most [`RESULT_BYTES_MAX`] bytes),
//!   with the retention as TTL.
//!
//! Every key carries a TTL: nothing grows forever. To share a server between applications,
//! wrap the backend in [`Namespaced`](crate::Namespaced).
//!
//! # Why it cannot race
//! - Claiming is `set_nx`: of any number of concurrent claims of a free id, exactly one wins.
//!   The losers read the key and report in progress or done.
//! - Completing is `compare_and_swap(C‖nonce → D, TTL = retention)`, renewing is the same swap
//!   onto itself with the lease as TTL, and releasing is `compare_and_delete(C‖nonce)`. The
//!   nonce is unique to the claim, so once the key stops holding it (the lease expired, and
//!   perhaps someone else claimed), it never holds it again: a late completion or release
//!   changes nothing and is reported ([`DedupError::Lost`], or `Ok(false)`).
//!
//! What no store can give is exactly-once *side effects*: if the process dies after the body's
//! side effect but before the completion, the lease expires and a retry runs the body again.
//! Make the side effect idempotent where that matters, or keep the lease long enough.
//!
//! # Runtime
//! [`Dedup::once`] renews its lease with Tokio timers and, if its future is dropped while the
//! body runs (cancellation), releases the claim by spawning the release onto the current Tokio
//! runtime; call it inside a runtime with timers enabled.

use std::fmt;
use std::future::{Future, poll_fn};
use std::panic::resume_unwind;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::backend::{Backend, KEY_BYTES_MAX, TtlPolicy, ttl_ms};
use crate::error::{Error, ErrorKind};
use crate::lock::CatchUnwind;

/// Prefix of every dedup key: `dedup:{id}`.
pub const KEY_PREFIX: &[u8] = b"dedup:";
/// Longest id, in bytes.
pub const ID_BYTES_MAX: usize = 512;
/// Largest result [`Dedup::complete_with`] and [`Dedup::once_with_result`] store, in bytes.
pub const RESULT_BYTES_MAX: usize = 64 * 1024;
/// Most ids in one [`Dedup::claim_many`] call.
pub const CLAIM_MANY_IDS_MAX: usize = 1_000;
/// Default retention of a done id: three days, the longest common webhook retry window.
pub const RETENTION_DEFAULT: Duration = Duration::from_secs(3 * 24 * 3600);
/// Default lease of a claim taken by [`Dedup::once`].
pub const LEASE_DEFAULT: Duration = Duration::from_secs(30);
/// Length of a claim's owner nonce, in bytes (128 bits from a CSPRNG).
pub const NONCE_BYTES: usize = 16;
/// How many `set_nx`/`get` rounds a claim tries when the key keeps vanishing between the two
/// (it expired or was released just then) before giving up with [`DedupError::Contention`].
pub const CLAIM_ROUNDS_MAX: u32 = 8;
/// [`Dedup::once`] renews its lease once this fraction (1/3) of it has passed.
const RENEW_DIVISOR: u32 = 3;

const TAG_CLAIMED: u8 = b'C';
const TAG_DONE: u8 = b'D';
const TAG_DONE_RESULT: u8 = b'R';
const CLAIMED_VALUE_BYTES: usize = 1 + NONCE_BYTES;

const _: () = assert!(KEY_PREFIX.len() + ID_BYTES_MAX <= KEY_BYTES_MAX);
const _: () = assert!(
    RENEW_DIVISOR >= 2,
    "renewing at the deadline would lose the lease"
);

/// Why a dedup operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DedupError {
    /// The ticket's claim is gone: its lease expired (and someone else may have claimed the
    /// id since), or it was already completed or released. Nothing was changed; a completion
    /// was refused.
    #[error(
        "the claim on id {id:?} was lost: its lease expired (another owner may hold it now) or \
         it was already completed or released; nothing was changed"
    )]
    Lost {
        /// The id (lossy UTF-8).
        id: String,
    },
    /// The id's key vanished between `set_nx` and the read [`CLAIM_ROUNDS_MAX`] times in a
    /// row (claims expiring or being released just then). Nothing is held; retrying may
    /// succeed.
    #[error("claiming id {id:?} lost {rounds} rounds to concurrent expiry or release; retry")]
    Contention {
        /// The id (lossy UTF-8).
        id: String,
        /// Rounds tried.
        rounds: u32,
    },
    /// [`Dedup::once`] needs a Tokio runtime (to renew the lease and to release on
    /// cancellation) and was called outside one. Nothing was written.
    #[error("Dedup::once needs a Tokio runtime with timers; call it inside one")]
    NoRuntime,
    /// Bad input ([`ErrorKind::InvalidInput`]: an empty id, a zero or too long TTL;
    /// [`ErrorKind::Limit`]: an id, result or batch over its limit), detected before anything
    /// was written, or a backend failure (see [`Error::kind`]).
    #[error(transparent)]
    Backend(#[from] Error),
}

impl DedupError {
    /// The [`ErrorKind`] of a [`DedupError::Backend`] (bad input or a backend failure).
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            DedupError::Backend(e) => Some(e.kind()),
            _ => None,
        }
    }
}

/// How a [`Dedup`] keeps ids. Start from `DedupOptions::default()` and chain setters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupOptions {
    retention: Duration,
    lease: Duration,
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions {
            retention: RETENTION_DEFAULT,
            lease: LEASE_DEFAULT,
        }
    }
}

impl DedupOptions {
    /// How long a done id stays done. Default [`RETENTION_DEFAULT`] (3 days). Checked when
    /// used: at least 1 ms, at most the contract's longest TTL.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The lease [`Dedup::once`] claims with (renewed while the body runs). Default
    /// [`LEASE_DEFAULT`] (30 s).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The configured retention.
    pub fn retention_period(&self) -> Duration {
        self.retention
    }

    /// The configured lease for [`Dedup::once`].
    pub fn lease_period(&self) -> Duration {
        self.lease
    }
}

/// What the store says about an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Never seen, released, or its claim or retention expired: a claim would succeed.
    Free,
    /// Claimed by someone whose lease is still running.
    InProgress,
    /// Completed within the retention, with the stored result if one was stored.
    Done(Option<Vec<u8>>),
}

/// The outcome of [`Dedup::claim`].
#[derive(Debug)]
#[must_use = "a claimed id stays in progress until its lease expires unless completed or released"]
pub enum Claim {
    /// The id was free and is now claimed by this ticket: run the work, then
    /// [`Dedup::complete`] or [`Dedup::release`].
    Claimed(Ticket),
    /// Someone else holds a live claim: the work is running elsewhere.
    InProgress,
    /// Already done within the retention (with the first run's stored result, if any).
    Done(Option<Vec<u8>>),
}

impl Claim {
    /// True for [`Claim::Claimed`].
    pub fn is_claimed(&self) -> bool {
        matches!(self, Claim::Claimed(_))
    }
}

/// Proof of a claim: the id and the claim's owner nonce. Only the holder of the ticket can
/// complete, renew or release the claim. Dropping a ticket does nothing: the claim then
/// expires with its lease (release it to let a retry run at once).
#[derive(Clone)]
pub struct Ticket {
    id: Vec<u8>,
    key: Vec<u8>,
    value: [u8; CLAIMED_VALUE_BYTES],
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The nonce is the claim's capability: never printed.
        f.debug_struct("Ticket")
            .field("id", &lossy(&self.id))
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// The claimed id.
    pub fn id(&self) -> &[u8] {
        &self.id
    }
}

/// The outcome of [`Dedup::once`].
#[derive(Debug)]
pub enum Once<T> {
    /// This call claimed the id and ran the body; its output. After `Ok` the id is done,
    /// after `Err` (or a panic) it was released so a retry can run.
    Ran(T),
    /// The body ran and succeeded, but the claim was lost before it could be completed (the
    /// lease expired, for example because renewals failed, and someone else may have claimed
    /// the id): the completion was refused, so a duplicate may run or have run.
    RanButLost(T),
    /// Already done within the retention: the body did not run. The first run's stored
    /// result, if it stored one ([`Dedup::once_with_result`]).
    Done(Option<Vec<u8>>),
    /// Someone else is running it right now: the body did not run. Typically answer
    /// "retry later" (a webhook sender will redeliver).
    InProgress,
}

/// Deduplication on one backend. Cheap to clone.
#[derive(Clone)]
pub struct Dedup {
    backend: Arc<dyn Backend>,
    options: DedupOptions,
}

impl fmt::Debug for Dedup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("backend", &self.backend.name())
            .field("options", &self.options)
            .finish()
    }
}

impl Dedup {
    /// Dedup on `backend` with default [`DedupOptions`] (3-day retention, 30 s lease).
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Dedup::with_options(backend, DedupOptions::default())
    }

    /// Dedup on `backend` with `options`.
    pub fn with_options(backend: Arc<dyn Backend>, options: DedupOptions) -> Self {
        Dedup { backend, options }
    }

    /// The options in force.
    pub fn options(&self) -> &DedupOptions {
        &self.options
    }

    /// Claims `id` for `lease` if it is free: of any number of concurrent claims exactly one
    /// gets [`Claim::Claimed`].
    ///
    /// # Errors
    /// [`DedupError::Backend`] with [`ErrorKind::InvalidInput`] for an empty id or a zero or
    /// too long lease, [`ErrorKind::Limit`] for an id over [`ID_BYTES_MAX`] (nothing written),
    /// [`ErrorKind::Corruption`] if the key holds something dedup did not write; other backend
    /// failures; [`DedupError::Contention`] (rare, see [`CLAIM_ROUNDS_MAX`]).
    pub async fn claim(&self, id: impl AsRef<[u8]>, lease: Duration) -> Result<Claim, DedupError> {
        let id = id.as_ref();
        let key = key_for(id)?;
        ttl_ms(lease)?;
        self.claim_key(id, key, lease).await
    }

    async fn claim_key(
        &self,
        id: &[u8],
        key: Vec<u8>,
        lease: Duration,
    ) -> Result<Claim, DedupError> {
        self.claim_as(id, key, claimed_value(), lease).await
    }

    /// Claims `key` with a claim value chosen by the caller (so [`Dedup::once`] can arm its
    /// release-on-drop guard before the claim is even sent).
    async fn claim_as(
        &self,
        id: &[u8],
        key: Vec<u8>,
        value: [u8; CLAIMED_VALUE_BYTES],
        lease: Duration,
    ) -> Result<Claim, DedupError> {
        for _ in 0..CLAIM_ROUNDS_MAX {
            if self.backend.set_nx(&key, &value, Some(lease)).await? {
                return Ok(Claim::Claimed(Ticket {
                    id: id.to_vec(),
                    key,
                    value,
                }));
            }
            match self.backend.get(&key).await? {
                // Expired or released between the two calls: try again.
                None => continue,
                Some(raw) => match decode(&key, &raw)? {
                    State::Free => continue,
                    State::InProgress => return Ok(Claim::InProgress),
                    State::Done(result) => return Ok(Claim::Done(result)),
                },
            }
        }
        Err(DedupError::Contention {
            id: lossy(id),
            rounds: CLAIM_ROUNDS_MAX,
        })
    }

    /// Claims every id in `ids` for `lease`; one outcome per id, in order.
    ///
    /// Each id is claimed on its own (`set_nx`), not atomically with the others; the claims are
    /// issued concurrently, so on Redis and Valkey (one multiplexed connection) they travel
    /// pipelined, in about one round trip, on Postgres they spread over the connection pool,
    /// and on embedded backends they are local calls. The same id twice in one batch: one of
    /// the two is claimed, the other reports [`Claim::InProgress`].
    ///
    /// # Errors
    /// Input errors as [`Dedup::claim`] for any id (then nothing was written), and
    /// [`ErrorKind::Limit`] for more than [`CLAIM_MANY_IDS_MAX`] ids. If any claim fails with
    /// a backend error, the claims that succeeded are released (best effort; otherwise they
    /// expire with the lease) and the first error is returned.
    pub async fn claim_many<I>(&self, ids: I, lease: Duration) -> Result<Vec<Claim>, DedupError>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let ids: Vec<I::Item> = ids.into_iter().collect();
        if ids.len() > CLAIM_MANY_IDS_MAX {
            return Err(Error::new(
                ErrorKind::Limit,
                format!(
                    "claim_many got {} ids, the limit is {CLAIM_MANY_IDS_MAX}; nothing was written",
                    ids.len()
                ),
            )
            .into());
        }
        ttl_ms(lease)?;
        let keys = ids
            .iter()
            .map(|id| key_for(id.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let claims = join_all(
            ids.iter()
                .zip(keys)
                .map(|(id, key)| self.claim_key(id.as_ref(), key, lease))
                .collect(),
        )
        .await;
        let mut outcomes = Vec::with_capacity(claims.len());
        let mut first_error = None;
        for claim in claims {
            match claim {
                Ok(claim) => outcomes.push(claim),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some(error) = first_error else {
            return Ok(outcomes);
        };
        for claim in outcomes {
            if let Claim::Claimed(ticket) = claim {
                let _ = self.release(&ticket).await;
            }
        }
        Err(error)
    }

    /// What the store says about `id` now, without changing anything.
    ///
    /// # Errors
    /// Input errors as [`Dedup::claim`]; [`ErrorKind::Corruption`]; backend failures.
    pub async fn seen(&self, id: impl AsRef<[u8]>) -> Result<State, DedupError> {
        let key = key_for(id.as_ref())?;
        match self.backend.get(&key).await? {
            None => Ok(State::Free),
            Some(raw) => decode(&key, &raw),
        }
    }

    /// Marks the ticket's id done for the retention, storing no result.
    ///
    /// # Errors
    /// [`DedupError::Lost`] if the claim is no longer this ticket's (lease expired, already
    /// completed or released): the completion is refused and nothing changes. Backend
    /// failures (then whether it completed is unknown).
    pub async fn complete(&self, ticket: &Ticket) -> Result<(), DedupError> {
        self.finish(ticket, &[TAG_DONE]).await
    }

    /// Marks the ticket's id done for the retention, storing `result` (at most
    /// [`RESULT_BYTES_MAX`] bytes): duplicates get it back in [`Claim::Done`] / [`Once::Done`].
    ///
    /// # Errors
    /// [`ErrorKind::Limit`] for a result over the limit (nothing written); otherwise as
    /// [`Dedup::complete`].
    pub async fn complete_with(&self, ticket: &Ticket, result: &[u8]) -> Result<(), DedupError> {
        check_result(result)?;
        let mut value = Vec::with_capacity(1 + result.len());
        value.push(TAG_DONE_RESULT);
        value.extend_from_slice(result);
        self.finish(ticket, &value).await
    }

    async fn finish(&self, ticket: &Ticket, done: &[u8]) -> Result<(), DedupError> {
        ttl_ms(self.options.retention)?;
        let swapped = self
            .backend
            .compare_and_swap(
                &ticket.key,
                Some(&ticket.value),
                done,
                TtlPolicy::Set(self.options.retention),
            )
            .await?;
        if swapped {
            Ok(())
        } else {
            Err(DedupError::Lost {
                id: lossy(&ticket.id),
            })
        }
    }

    /// Frees the ticket's id so a retry can claim it. `Ok(true)`: it was this ticket's claim
    /// and is now free; `Ok(false)`: the claim was already lost (expired, completed or
    /// released; a newer claim is left untouched).
    ///
    /// # Errors
    /// Backend failures (the claim then expires with its lease at the latest).
    pub async fn release(&self, ticket: &Ticket) -> Result<bool, DedupError> {
        Ok(self
            .backend
            .compare_and_delete(&ticket.key, &ticket.value)
            .await?)
    }

    /// Prolongs the ticket's claim: it now expires `lease` after this call.
    ///
    /// # Errors
    /// [`DedupError::Lost`] if the claim is no longer this ticket's; input errors for the
    /// lease; backend failures.
    pub async fn extend(&self, ticket: &Ticket, lease: Duration) -> Result<(), DedupError> {
        ttl_ms(lease)?;
        let swapped = self
            .backend
            .compare_and_swap(
                &ticket.key,
                Some(&ticket.value),
                &ticket.value,
                TtlPolicy::Set(lease),
            )
            .await?;
        if swapped {
            Ok(())
        } else {
            Err(DedupError::Lost {
                id: lossy(&ticket.id),
            })
        }
    }

    /// Runs `work` once per `id`: claims the id (with the configured lease, renewed every
    /// third of it while `work` runs), runs `work`, and then
    /// - on `Ok`, completes the id ([`Once::Ran`]), or reports [`Once::RanButLost`] if the
    ///   claim was lost meanwhile (the completion was refused);
    /// - on `Err`, releases the id so a retry can run, and returns [`Once::Ran`] with the error;
    /// - on a panic, releases the id, then the panic continues;
    /// - if this future is dropped while `work` runs (cancellation, a timeout), releases the id
    ///   by spawning the release onto the current Tokio runtime.
    ///
    /// If the id is done or in progress elsewhere, `work` is not called ([`Once::Done`],
    /// [`Once::InProgress`]). `work` is called inside the first poll after the claim, so a
    /// panic while building its future is caught too.
    ///
    /// # Errors
    /// [`DedupError::NoRuntime`] outside a Tokio runtime; input and backend errors as
    /// [`Dedup::claim`]. A backend error while completing is returned as is: the work ran,
    /// and its claim expires with the lease (so a retry may run it again).
    pub async fn once<F, Fut, T, E>(
        &self,
        id: impl AsRef<[u8]>,
        work: F,
    ) -> Result<Once<Result<T, E>>, DedupError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_once(id.as_ref(), work, |_| None).await
    }

    /// [`Dedup::once`] for a body whose success is a small result (at most
    /// [`RESULT_BYTES_MAX`] bytes, e.g. a serialized response): the result is stored with the
    /// completion, and duplicates get it back in [`Once::Done`]. A result over the limit is not
    /// stored (the id is still completed, and duplicates see `Done(None)`).
    ///
    /// # Errors
    /// As [`Dedup::once`].
    pub async fn once_with_result<F, Fut, E>(
        &self,
        id: impl AsRef<[u8]>,
        work: F,
    ) -> Result<Once<Result<Vec<u8>, E>>, DedupError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        self.run_once(id.as_ref(), work, |result: &Vec<u8>| {
            (result.len() <= RESULT_BYTES_MAX).then_some(result.as_slice())
        })
        .await
    }

    async fn run_once<F, Fut, T, E>(
        &self,
        id: &[u8],
        work: F,
        stored: impl Fn(&T) -> Option<&[u8]>,
    ) -> Result<Once<Result<T, E>>, DedupError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // Checked before claiming: failing after would leave the id in progress until the
        // lease expires.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(DedupError::NoRuntime);
        }
        let lease = self.options.lease;
        let key = key_for(id)?;
        ttl_ms(lease)?;
        // The guard is armed before the claim is sent: if this future is dropped while the
        // `set_nx` is in flight, the claim may land on the store without a ticket coming back,
        // and the guard's compare-and-delete of this unique value removes exactly that claim
        // (or nothing).
        let value = claimed_value();
        let mut guard = ReleaseOnDrop {
            backend: Arc::clone(&self.backend),
            ticket: Some(Ticket {
                id: id.to_vec(),
                key: key.clone(),
                value,
            }),
        };
        let ticket = match self.claim_as(id, key, value, lease).await {
            Ok(Claim::Claimed(ticket)) => ticket,
            Ok(Claim::InProgress) => {
                guard.disarm();
                return Ok(Once::InProgress);
            }
            Ok(Claim::Done(result)) => {
                guard.disarm();
                return Ok(Once::Done(result));
            }
            // Unknown whether the claim landed: the guard removes it if it did.
            Err(e) => return Err(e),
        };
        let body = CatchUnwind::new(async move { work().await });
        tokio::pin!(body);
        let renew_every = (lease / RENEW_DIVISOR).max(Duration::from_millis(1));
        let mut renewing = true;
        let outcome = loop {
            tokio::select! {
                outcome = &mut body => break outcome,
                () = tokio::time::sleep(renew_every), if renewing => {
                    match self.extend(&ticket, lease).await {
                        Ok(()) => {}
                        // Lost: the completion will be refused and reported; stop renewing.
                        Err(DedupError::Lost { .. }) => renewing = false,
                        // A failed renewal is retried at the next tick; the lease bounds it.
                        Err(_) => {}
                    }
                }
            }
        };
        match outcome {
            Ok(Ok(value)) => {
                // From here on the claim is never released: the work has run.
                guard.disarm();
                let finished = match stored(&value) {
                    Some(result) => self.complete_with(&ticket, result).await,
                    None => self.complete(&ticket).await,
                };
                match finished {
                    Ok(()) => Ok(Once::Ran(Ok(value))),
                    Err(DedupError::Lost { .. }) => Ok(Once::RanButLost(Ok(value))),
                    Err(e) => Err(e),
                }
            }
            Ok(Err(error)) => {
                if self.release(&ticket).await.is_ok() {
                    guard.disarm();
                }
                Ok(Once::Ran(Err(error)))
            }
            Err(panic) => {
                if self.release(&ticket).await.is_ok() {
                    guard.disarm();
                }
                resume_unwind(panic)
            }
        }
    }
}

/// Releases a claim when [`Dedup::once`]'s future is dropped before the body finished (or
/// when a release after an error failed): a `compare_and_delete` on the claim's unique value,
/// spawned onto the current Tokio runtime, which can only ever remove this claim, however late
/// it runs. Without a runtime the claim expires with its lease.
struct ReleaseOnDrop {
    backend: Arc<dyn Backend>,
    ticket: Option<Ticket>,
}

impl ReleaseOnDrop {
    fn disarm(&mut self) {
        self.ticket = None;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let backend = Arc::clone(&self.backend);
            handle.spawn(async move {
                let _ = backend.compare_and_delete(&ticket.key, &ticket.value).await;
            });
        }
    }
}

/// A fresh claim value: the tag and a 128-bit nonce from the thread's CSPRNG.
fn claimed_value() -> [u8; CLAIMED_VALUE_BYTES] {
    let nonce: [u8; NONCE_BYTES] = rand::random();
    let mut value = [0u8; CLAIMED_VALUE_BYTES];
    value[0] = TAG_CLAIMED;
    value[1..].copy_from_slice(&nonce);
    value
}

/// Polls every future concurrently on the calling task; outputs in input order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

fn key_for(id: &[u8]) -> Result<Vec<u8>, Error> {
    if id.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "dedup id is empty; nothing was written",
        ));
    }
    if id.len() > ID_BYTES_MAX {
        return Err(Error::new(
            ErrorKind::Limit,
            format!(
                "dedup id is {} bytes, the limit is {ID_BYTES_MAX}; nothing was written",
                id.len()
            ),
        ));
    }
    let mut key = Vec::with_capacity(KEY_PREFIX.len() + id.len());
    key.extend_from_slice(KEY_PREFIX);
    key.extend_from_slice(id);
    Ok(key)
}

fn check_result(result: &[u8]) -> Result<(), Error> {
    if result.len() > RESULT_BYTES_MAX {
        return Err(Error::new(
            ErrorKind::Limit,
            format!(
                "dedup result is {} bytes, the limit is {RESULT_BYTES_MAX}; nothing was written",
                result.len()
            ),
        ));
    }
    Ok(())
}

/// Decodes a live key's value: never [`State::Free`].
fn decode(key: &[u8], raw: &[u8]) -> Result<State, DedupError> {
    match raw.split_first() {
        Some((&TAG_CLAIMED, nonce)) if nonce.len() == NONCE_BYTES => Ok(State::InProgress),
        Some((&TAG_DONE, [])) => Ok(State::Done(None)),
        Some((&TAG_DONE_RESULT, result)) => Ok(State::Done(Some(result.to_vec()))),
        _ => Err(Error::new(
            ErrorKind::Corruption,
            format!(
                "dedup key {:?} holds {} bytes dedup did not write; fix or delete it",
                lossy(key),
                raw.len()
            ),
        )
        .into()),
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Embedded;

    fn dedup() -> (Arc<dyn Backend>, Dedup) {
        let b: Arc<dyn Backend> = Arc::new(Embedded::memory());
        (Arc::clone(&b), Dedup::new(b))
    }

    #[tokio::test]
    async fn stored_values_follow_the_documented_layout() {
        let (b, d) = dedup();
        let Claim::Claimed(ticket) = d.claim("a", Duration::from_secs(10)).await.unwrap() else {
            panic!("a fresh id is claimed");
        };
        let raw = b.get(b"dedup:a").await.unwrap().unwrap();
        assert_eq!(raw.len(), CLAIMED_VALUE_BYTES);
        assert_eq!(raw[0], b'C');
        assert_eq!(raw, ticket.value);
        d.complete_with(&ticket, b"resp").await.unwrap();
        assert_eq!(b.get(b"dedup:a").await.unwrap().unwrap(), b"Rresp");
        match b.ttl(b"dedup:a").await.unwrap() {
            crate::Ttl::Remaining(left) => {
                assert!(left > RETENTION_DEFAULT - Duration::from_secs(60))
            }
            other => panic!("done ids keep the retention as TTL, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn foreign_values_are_corruption() {
        let (b, d) = dedup();
        b.set(b"dedup:x", b"Cshort", None).await.unwrap();
        assert_eq!(
            d.seen("x").await.unwrap_err().kind(),
            Some(ErrorKind::Corruption)
        );
        assert_eq!(
            d.claim("x", Duration::from_secs(1))
                .await
                .unwrap_err()
                .kind(),
            Some(ErrorKind::Corruption)
        );
    }

    #[tokio::test]
    async fn once_releases_before_a_panic_continues() {
        let (b, d) = dedup();
        let panicking = d.clone();
        let joined = tokio::spawn(async move {
            panicking
                .once("p", || async { panic!("expected panic inside once") })
                .await
                .map(|_: Once<Result<(), ()>>| ())
        })
        .await;
        assert!(joined.is_err_and(|e| e.is_panic()));
        assert_eq!(
            b.get(b"dedup:p").await.unwrap(),
            None,
            "released before it went on"
        );
        // A panic while building the body's future is caught too.
        let panicking = d.clone();
        let joined = tokio::spawn(async move {
            panicking
                .once("p", || -> std::future::Ready<Result<(), ()>> {
                    panic!("expected panic building the body")
                })
                .await
                .map(drop)
        })
        .await;
        assert!(joined.is_err_and(|e| e.is_panic()));
        assert_eq!(d.seen("p").await.unwrap(), State::Free);
    }

    #[test]
    fn once_outside_a_runtime_writes_nothing() {
        let (b, d) = dedup();
        let outcome = futures_block_on(d.once("r", || async { Ok::<_, ()>(()) }));
        assert!(matches!(outcome, Err(DedupError::NoRuntime)));
        assert_eq!(futures_block_on(b.get(b"dedup:r")).unwrap(), None);
    }

    /// Drives a future that never waits on a timer or I/O (the embedded backend in memory).
    fn futures_block_on<F: Future>(future: F) -> F::Output {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(value) = future.as_mut().poll(&mut cx) {
                return value;
            }
        }
    }
}
