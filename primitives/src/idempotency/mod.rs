//! Idempotency keys on the [`Backend`] contract: claim a key atomically, keep the claim alive
//! while the work runs, then store the outcome for retries to replay — safe across replicas
//! sharing one backend. Usable without HTTP; `IdempotencyLayer` (feature `http`) applies it
//! to requests (draft-ietf-httpapi-idempotency-key-header-07).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::sync::Arc;
//! use keel_primitives::Embedded;
//! use keel_primitives::idempotency::{Begin, Fingerprint, Idempotency, StoredResponse};
//!
//! let idem = Idempotency::new(Arc::new(Embedded::memory()));
//! let fp = Fingerprint::of(&[b"POST", b"/charges", b"{\"amount\":5}"]);
//! match idem.begin(b"user:42", b"key-1", fp).await? {
//!     Begin::Claimed(claim) => {
//!         let outcome = StoredResponse::new(201, vec![], b"charged".to_vec());
//!         claim.complete(&outcome).await?;
//!     }
//!     _ => unreachable!("first use of the key"),
//! }
//! // A retry gets the stored outcome back instead of charging twice.
//! assert!(matches!(idem.begin(b"user:42", b"key-1", fp).await?, Begin::Completed(r) if r.body == b"charged"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # States of a key
//! One backend key per (scope, key): `idem:{hex(BLAKE3(len(scope) ‖ scope ‖ key))}`, so one
//! principal's key never meets another's and raw keys are not stored. Its value is one of:
//! - **in flight** `P ‖ fingerprint (32) ‖ owner (16)`, with the lease TTL: taken by
//!   `set_nx`, renewed by `compare_and_swap(value → value, new TTL)` while the work runs
//!   ([`Claim::keep_alive`]), so a slow handler keeps it and a crashed replica's claim expires
//!   after one lease;
//! - **completed** `C ‖ fingerprint ‖ response`, with the record TTL (default 24 h): written
//!   by `compare_and_swap` from the exact in-flight value, so only the claim's owner, and
//!   only while it still holds the claim, can complete it;
//! - **not replayable** `N ‖ fingerprint`: the work finished but its outcome was not stored
//!   (too large); a retry must not run it again.
//!
//! A [`Claim`] dropped without completing or releasing (a panic, a cancelled request) is
//! released in the background (`compare_and_delete` of its exact value), so the retry runs.
//! Every record carries the request's [`Fingerprint`]: the same key with another fingerprint
//! is [`Begin::Mismatch`].

#[cfg(feature = "http")]
pub mod layer;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore;

use crate::backend::{Backend, TtlPolicy};
use crate::error::{Error, ErrorKind};

#[cfg(feature = "http")]
pub use layer::{
    IDEMPOTENCY_REPLAYED, Idempotency as IdempotencyService, IdempotencyLayer,
    IdempotencyLayerBuilder, IdempotencyLayerError, InFlight, RequestFingerprint, ResponseFuture,
    StatusPolicy,
};

/// Longest idempotency key, in bytes.
pub const KEY_BYTES_MAX: usize = 255;
/// Default lease of an in-flight claim; renewed every third of it while the work runs.
pub const LEASE_TTL_DEFAULT: Duration = Duration::from_secs(30);
/// Shortest lease: renewals must fit in it with room for a few round trips.
pub const LEASE_TTL_MIN: Duration = Duration::from_millis(100);
/// Default lifetime of a completed record.
pub const RECORD_TTL_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// Rounds [`Idempotency::begin`] tries when the key vanishes between its `set_nx` and `get`
/// (it expired or was released in between); each lost round means another request moved.
pub const BEGIN_ATTEMPTS_MAX: u32 = 16;
/// Most headers in a stored response.
pub const STORED_HEADERS_MAX: usize = 256;

const KEY_PREFIX: &[u8] = b"idem:";
const OWNER_BYTES: usize = 16;
const FINGERPRINT_BYTES: usize = 32;
const TAG_IN_FLIGHT: u8 = b'P';
const TAG_COMPLETED: u8 = b'C';
const TAG_NOT_REPLAYABLE: u8 = b'N';
/// Renew once a third of the lease has passed.
const RENEW_DIVISOR: u32 = 3;

const _: () = assert!(LEASE_TTL_MIN.as_millis() >= 10 * RENEW_DIVISOR as u128);

/// A digest of what a request asks for (method, target, selected headers, body). Two requests
/// with the same key must have the same fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; FINGERPRINT_BYTES]);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

impl Fingerprint {
    /// BLAKE3 of the parts, each length-prefixed (so `["ab", "c"]` ≠ `["a", "bc"]`).
    pub fn of(parts: &[&[u8]]) -> Self {
        let mut h = blake3::Hasher::new();
        for part in parts {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Fingerprint(*h.finalize().as_bytes())
    }
}

/// A completed operation's outcome, as stored and replayed: for HTTP, the response's status,
/// headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status code.
    pub status: u16,
    /// Header names and values, in order.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

impl StoredResponse {
    /// An outcome.
    pub fn new(status: u16, headers: Vec<(Vec<u8>, Vec<u8>)>, body: Vec<u8>) -> Self {
        StoredResponse {
            status,
            headers,
            body,
        }
    }

    /// `status u16 ‖ count u16 ‖ (name len u16 ‖ name ‖ value len u32 ‖ value)* ‖ body`, all
    /// little-endian.
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), IdempotencyError> {
        let too_big = || IdempotencyError::TooLarge;
        out.extend_from_slice(&self.status.to_le_bytes());
        let count = u16::try_from(self.headers.len()).map_err(|_| too_big())?;
        if self.headers.len() > STORED_HEADERS_MAX {
            return Err(too_big());
        }
        out.extend_from_slice(&count.to_le_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(
                &u16::try_from(name.len())
                    .map_err(|_| too_big())?
                    .to_le_bytes(),
            );
            out.extend_from_slice(name);
            out.extend_from_slice(
                &u32::try_from(value.len())
                    .map_err(|_| too_big())?
                    .to_le_bytes(),
            );
            out.extend_from_slice(value);
        }
        out.extend_from_slice(&self.body);
        Ok(())
    }

    fn decode(mut raw: &[u8]) -> Option<Self> {
        fn take<'a>(raw: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if raw.len() < n {
                return None;
            }
            let (head, rest) = raw.split_at(n);
            *raw = rest;
            Some(head)
        }
        let status = u16::from_le_bytes(take(&mut raw, 2)?.try_into().ok()?);
        let count = u16::from_le_bytes(take(&mut raw, 2)?.try_into().ok()?);
        if usize::from(count) > STORED_HEADERS_MAX {
            return None;
        }
        let mut headers = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let n = u16::from_le_bytes(take(&mut raw, 2)?.try_into().ok()?);
            let name = take(&mut raw, usize::from(n))?.to_vec();
            let n = u32::from_le_bytes(take(&mut raw, 4)?.try_into().ok()?);
            let value = take(&mut raw, usize::try_from(n).ok()?)?.to_vec();
            headers.push((name, value));
        }
        Some(StoredResponse {
            status,
            headers,
            body: raw.to_vec(),
        })
    }
}

/// What [`Idempotency::begin`] found.
#[derive(Debug)]
#[non_exhaustive]
pub enum Begin {
    /// The key is ours: do the work, then [`Claim::complete`] (or release it).
    Claimed(Claim),
    /// Another request with this key and fingerprint is running.
    InFlight,
    /// The key was used with another fingerprint (another request body, path, ...).
    Mismatch,
    /// The work is done; here is its outcome, to replay.
    Completed(StoredResponse),
    /// The work is done but its outcome was not stored (too large): it must not run again.
    NotReplayable,
}

/// What the key currently holds (for inspection and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyState {
    /// Nothing: a request with this key would run.
    Free,
    /// Claimed by a running request.
    InFlight,
    /// Completed, with a stored outcome.
    Completed,
    /// Completed without a stored outcome.
    NotReplayable,
}

/// Why an idempotency operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdempotencyError {
    /// The key is empty, longer than [`KEY_BYTES_MAX`], or not printable ASCII.
    #[error("invalid idempotency key: it must be 1 to {KEY_BYTES_MAX} printable ASCII characters")]
    InvalidKey,
    /// The claim expired (a renewal failed for longer than the lease) and the key may have
    /// been claimed again; the outcome was not stored.
    #[error(
        "the idempotency claim was lost before the work completed (its lease expired); the \
         outcome was not stored and a retry may run the work again"
    )]
    Lost,
    /// The outcome does not fit a record (too many or too large headers, or a value over the
    /// backend's limit). Nothing was stored; complete it as not replayable instead.
    #[error("the outcome is too large to store as an idempotency record")]
    TooLarge,
    /// The key holds something that is not an idempotency record.
    #[error("the idempotency record is damaged or was written by something else; delete it")]
    Corrupt,
    /// [`Idempotency::begin`] lost [`BEGIN_ATTEMPTS_MAX`] rounds to concurrent requests.
    #[error("the idempotency key kept changing under concurrent requests; retry")]
    Contention,
    /// The backend failed (see [`Error::kind`]).
    #[error(transparent)]
    Backend(#[from] Error),
}

/// Checks an idempotency key: 1 to [`KEY_BYTES_MAX`] bytes of printable ASCII (space to `~`).
///
/// # Errors
/// [`IdempotencyError::InvalidKey`].
pub fn validate_key(key: &[u8]) -> Result<(), IdempotencyError> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX || !key.iter().all(|b| (0x20..=0x7e).contains(b))
    {
        return Err(IdempotencyError::InvalidKey);
    }
    Ok(())
}

/// Idempotency records on one backend. Cheap to clone.
#[derive(Clone)]
pub struct Idempotency {
    backend: Arc<dyn Backend>,
    lease_ttl: Duration,
    record_ttl: Duration,
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("backend", &self.backend.name())
            .field("lease_ttl", &self.lease_ttl)
            .field("record_ttl", &self.record_ttl)
            .finish()
    }
}

impl Idempotency {
    /// Records on `backend`, with the default lease (30 s) and record TTL (24 h).
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Idempotency {
            backend,
            lease_ttl: LEASE_TTL_DEFAULT,
            record_ttl: RECORD_TTL_DEFAULT,
        }
    }

    /// How long an in-flight claim lasts without renewal (at least [`LEASE_TTL_MIN`]).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(LEASE_TTL_MIN);
        self
    }

    /// How long a completed record is kept (at least 1 ms, at most the longest TTL).
    pub fn with_record_ttl(mut self, ttl: Duration) -> Self {
        self.record_ttl = ttl.clamp(Duration::from_millis(1), crate::TTL_MAX);
        self
    }

    /// The lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The record TTL.
    pub fn record_ttl(&self) -> Duration {
        self.record_ttl
    }

    fn storage_key(scope: &[u8], key: &[u8]) -> Vec<u8> {
        let mut h = blake3::Hasher::new();
        h.update(&(scope.len() as u64).to_le_bytes());
        h.update(scope);
        h.update(key);
        let mut k = KEY_PREFIX.to_vec();
        k.extend_from_slice(h.finalize().to_hex().as_bytes());
        k
    }

    /// Claims `key` within `scope` (the principal: one client's keys never meet another's) for
    /// a request with `fingerprint`, or reports what the key holds.
    ///
    /// # Errors
    /// [`IdempotencyError::InvalidKey`], `Corrupt`, `Contention`, `Backend`.
    pub async fn begin(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
    ) -> Result<Begin, IdempotencyError> {
        let begun = self.begin_inner(scope, key, fingerprint).await;
        crate::observe::idempotency_request(match &begun {
            Ok(Begin::Claimed(_)) => "claimed",
            Ok(Begin::InFlight) => "in_flight",
            Ok(Begin::Mismatch) => "mismatch",
            Ok(Begin::Completed(_)) => "replayed",
            Ok(Begin::NotReplayable) => "not_replayable",
            Err(_) => "error",
        });
        begun
    }

    async fn begin_inner(
        &self,
        scope: &[u8],
        key: &[u8],
        fingerprint: Fingerprint,
    ) -> Result<Begin, IdempotencyError> {
        validate_key(key)?;
        let storage_key = Self::storage_key(scope, key);
        let mut owner = [0u8; OWNER_BYTES];
        rand::rng().fill_bytes(&mut owner);
        let mut value = Vec::with_capacity(1 + FINGERPRINT_BYTES + OWNER_BYTES);
        value.push(TAG_IN_FLIGHT);
        value.extend_from_slice(&fingerprint.0);
        value.extend_from_slice(&owner);
        for _ in 0..BEGIN_ATTEMPTS_MAX {
            if self
                .backend
                .set_nx(&storage_key, &value, Some(self.lease_ttl))
                .await?
            {
                return Ok(Begin::Claimed(Claim {
                    backend: Arc::clone(&self.backend),
                    key: storage_key,
                    value,
                    lease_ttl: self.lease_ttl,
                    record_ttl: self.record_ttl,
                    renewer: None,
                    finished: false,
                }));
            }
            let Some(current) = self.backend.get(&storage_key).await? else {
                continue; // expired or released in between: try to claim again
            };
            let (tag, fp, rest) = split(&current)?;
            if fp != fingerprint.0 {
                return Ok(Begin::Mismatch);
            }
            return match tag {
                TAG_IN_FLIGHT => Ok(Begin::InFlight),
                TAG_COMPLETED => StoredResponse::decode(rest)
                    .map(Begin::Completed)
                    .ok_or(IdempotencyError::Corrupt),
                TAG_NOT_REPLAYABLE => Ok(Begin::NotReplayable),
                _ => Err(IdempotencyError::Corrupt),
            };
        }
        Err(IdempotencyError::Contention)
    }

    /// What `key` within `scope` holds now.
    ///
    /// # Errors
    /// `Corrupt`, `Backend`.
    pub async fn state(&self, scope: &[u8], key: &[u8]) -> Result<KeyState, IdempotencyError> {
        let Some(current) = self.backend.get(&Self::storage_key(scope, key)).await? else {
            return Ok(KeyState::Free);
        };
        match split(&current)?.0 {
            TAG_IN_FLIGHT => Ok(KeyState::InFlight),
            TAG_COMPLETED => Ok(KeyState::Completed),
            TAG_NOT_REPLAYABLE => Ok(KeyState::NotReplayable),
            _ => Err(IdempotencyError::Corrupt),
        }
    }

    /// Forgets `key` within `scope`, whatever it holds.
    ///
    /// # Errors
    /// `Backend`.
    pub async fn forget(&self, scope: &[u8], key: &[u8]) -> Result<bool, IdempotencyError> {
        Ok(self.backend.delete(&Self::storage_key(scope, key)).await?)
    }
}

fn split(value: &[u8]) -> Result<(u8, [u8; FINGERPRINT_BYTES], &[u8]), IdempotencyError> {
    if value.len() < 1 + FINGERPRINT_BYTES {
        return Err(IdempotencyError::Corrupt);
    }
    let mut fp = [0u8; FINGERPRINT_BYTES];
    fp.copy_from_slice(&value[1..=FINGERPRINT_BYTES]);
    Ok((value[0], fp, &value[1 + FINGERPRINT_BYTES..]))
}

/// An in-flight claim on a key. Complete it with the outcome, or release it so a retry runs
/// the work; dropped without either (a panic, a cancelled request), it is released in the
/// background when a Tokio runtime is running, else it expires with its lease.
pub struct Claim {
    backend: Arc<dyn Backend>,
    key: Vec<u8>,
    value: Vec<u8>,
    lease_ttl: Duration,
    record_ttl: Duration,
    renewer: Option<tokio::task::JoinHandle<()>>,
    finished: bool,
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

impl Claim {
    /// Renews the lease now; false if the claim was lost (expired and maybe taken again).
    ///
    /// # Errors
    /// `Backend`.
    pub async fn renew(&self) -> Result<bool, IdempotencyError> {
        Ok(self
            .backend
            .compare_and_swap(
                &self.key,
                Some(&self.value),
                &self.value,
                TtlPolicy::Set(self.lease_ttl),
            )
            .await?)
    }

    /// Renews the lease in the background every third of its TTL until the claim is completed,
    /// released or dropped. Needs a Tokio runtime; without one, nothing is renewed. A renewal
    /// that fails with a backend error is retried at the next tick; one that finds the claim
    /// lost stops (completing will then report [`IdempotencyError::Lost`]).
    pub fn keep_alive(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.renewer.is_some() {
            return;
        }
        let (backend, key, value, ttl) = (
            Arc::clone(&self.backend),
            self.key.clone(),
            self.value.clone(),
            self.lease_ttl,
        );
        self.renewer = Some(runtime.spawn(async move {
            let period = ttl / RENEW_DIVISOR;
            loop {
                tokio::time::sleep(period).await;
                let renewed = backend
                    .compare_and_swap(&key, Some(&value), &value, TtlPolicy::Set(ttl))
                    .await;
                if let Ok(false) = renewed {
                    return;
                }
            }
        }));
    }

    fn stop_renewing(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }

    async fn finish_with(&mut self, value: Vec<u8>) -> Result<(), IdempotencyError> {
        self.stop_renewing();
        let swapped = self
            .backend
            .compare_and_swap(
                &self.key,
                Some(&self.value),
                &value,
                TtlPolicy::Set(self.record_ttl),
            )
            .await;
        match swapped {
            Ok(true) => {
                self.finished = true;
                Ok(())
            }
            Ok(false) => {
                self.finished = true; // not ours any more: nothing to release
                Err(IdempotencyError::Lost)
            }
            // Drop releases the claim, so a retry runs the work rather than waiting a lease.
            Err(e) => Err(e.into()),
        }
    }

    /// Stores `outcome` for retries to replay (with the record TTL).
    ///
    /// # Errors
    /// [`IdempotencyError::Lost`] if the claim expired first; `TooLarge` (the claim is released
    /// on drop: complete it with [`Claim::complete_unreplayable`] instead to prevent a rerun);
    /// `Backend` (the claim is released on drop).
    pub async fn complete(mut self, outcome: &StoredResponse) -> Result<(), IdempotencyError> {
        let mut value = Vec::with_capacity(1 + FINGERPRINT_BYTES + 64 + outcome.body.len());
        value.push(TAG_COMPLETED);
        value.extend_from_slice(&self.value[1..=FINGERPRINT_BYTES]);
        outcome.encode(&mut value)?;
        if crate::backend::check_value(&value).is_err() {
            return Err(IdempotencyError::TooLarge);
        }
        self.finish_with(value).await
    }

    /// Marks the work done without a stored outcome: retries get [`Begin::NotReplayable`]
    /// and the work never runs again under this key (until the record TTL passes).
    ///
    /// # Errors
    /// As [`Claim::complete`].
    pub async fn complete_unreplayable(mut self) -> Result<(), IdempotencyError> {
        let mut value = Vec::with_capacity(1 + FINGERPRINT_BYTES);
        value.push(TAG_NOT_REPLAYABLE);
        value.extend_from_slice(&self.value[1..=FINGERPRINT_BYTES]);
        self.finish_with(value).await
    }

    /// Gives the key up so a retry runs the work; false if the claim was already lost.
    ///
    /// # Errors
    /// `Backend` (the claim then expires with its lease).
    pub async fn release(mut self) -> Result<bool, IdempotencyError> {
        self.stop_renewing();
        self.finished = true;
        Ok(self
            .backend
            .compare_and_delete(&self.key, &self.value)
            .await?)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.stop_renewing();
        if self.finished {
            return;
        }
        // A panic or a cancelled request: release in the background so the retry can run.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (backend, key, value) = (
                Arc::clone(&self.backend),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.value),
            );
            runtime.spawn(async move {
                let _ = backend.compare_and_delete(&key, &value).await;
            });
        }
    }
}

impl From<IdempotencyError> for Error {
    fn from(e: IdempotencyError) -> Self {
        match e {
            IdempotencyError::Backend(e) => e,
            other => {
                let kind = match &other {
                    IdempotencyError::InvalidKey | IdempotencyError::TooLarge => {
                        ErrorKind::InvalidInput
                    }
                    IdempotencyError::Corrupt => ErrorKind::Corruption,
                    _ => ErrorKind::Transient,
                };
                Error::new(kind, other.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Embedded;

    fn idem() -> Idempotency {
        Idempotency::new(Arc::new(Embedded::memory()))
    }

    #[test]
    fn stored_responses_round_trip_and_garbage_is_refused() {
        let r = StoredResponse::new(
            201,
            vec![(b"x-a".to_vec(), b"1".to_vec()), (b"x-b".to_vec(), vec![])],
            b"\x00body\xff".to_vec(),
        );
        let mut raw = Vec::new();
        r.encode(&mut raw).unwrap();
        assert_eq!(StoredResponse::decode(&raw), Some(r));
        for cut in 0..raw.len() - 8 {
            // Truncated inside the header section: refused, never a panic.
            let _ = StoredResponse::decode(&raw[..cut]);
        }
        assert_eq!(StoredResponse::decode(&[1]), None);
    }

    #[test]
    fn keys_are_validated() {
        assert!(validate_key(b"a").is_ok());
        assert!(validate_key(&[b'a'; KEY_BYTES_MAX]).is_ok());
        assert!(validate_key(&[b'a'; KEY_BYTES_MAX + 1]).is_err());
        assert!(validate_key(b"").is_err());
        assert!(validate_key(b"tab\there").is_err());
        assert!(validate_key("é".as_bytes()).is_err());
    }

    #[tokio::test]
    async fn claim_complete_replay_mismatch_and_release() {
        let i = idem();
        let fp = Fingerprint::of(&[b"a"]);
        let Begin::Claimed(claim) = i.begin(b"s", b"k", fp).await.unwrap() else {
            panic!("first begin claims")
        };
        assert!(matches!(
            i.begin(b"s", b"k", fp).await.unwrap(),
            Begin::InFlight
        ));
        assert!(matches!(
            i.begin(b"s", b"k", Fingerprint::of(&[b"b"])).await.unwrap(),
            Begin::Mismatch
        ));
        // Another scope is another key.
        assert!(matches!(
            i.begin(b"t", b"k", fp).await.unwrap(),
            Begin::Claimed(_)
        ));
        claim
            .complete(&StoredResponse::new(200, vec![], b"ok".to_vec()))
            .await
            .unwrap();
        assert!(
            matches!(i.begin(b"s", b"k", fp).await.unwrap(), Begin::Completed(r) if r.body == b"ok")
        );

        let Begin::Claimed(claim) = i.begin(b"s", b"k2", fp).await.unwrap() else {
            panic!()
        };
        assert!(claim.release().await.unwrap());
        assert_eq!(i.state(b"s", b"k2").await.unwrap(), KeyState::Free);

        let Begin::Claimed(claim) = i.begin(b"s", b"k3", fp).await.unwrap() else {
            panic!()
        };
        claim.complete_unreplayable().await.unwrap();
        assert!(matches!(
            i.begin(b"s", b"k3", fp).await.unwrap(),
            Begin::NotReplayable
        ));
    }

    #[tokio::test]
    async fn a_dropped_claim_is_released_in_the_background() {
        let i = idem();
        let fp = Fingerprint::of(&[]);
        let Begin::Claimed(claim) = i.begin(b"s", b"k", fp).await.unwrap() else {
            panic!()
        };
        drop(claim);
        for _ in 0..1000 {
            if i.state(b"s", b"k").await.unwrap() == KeyState::Free {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the dropped claim was not released");
    }
}
