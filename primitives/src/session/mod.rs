//! Server-side sessions on any [`Backend`]: a record per session holding typed fields (serde),
//! found by a secret token that a client presents (with the `http` feature, in a signed or
//! private cookie: [`SessionLayer`]). The record is loaded lazily, saved only if modified, and
//! saved with compare-and-swap so concurrent requests of one session on different processes
//! never silently lose each other's writes.
//!
//! ```
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use keel_primitives::Embedded;
//! use keel_primitives::session::SessionStore;
//!
//! let store = SessionStore::builder(Arc::new(Embedded::memory())).build()?;
//! let session = store.open(None);                  // a new, anonymous session
//! session.insert("cart", vec!["apple"]).await?;
//! let token = session.save().await?.token().unwrap().to_owned(); // what a cookie carries
//! let again = store.open(Some(&token));
//! assert_eq!(again.get::<Vec<String>>("cart").await?, Some(vec!["apple".to_owned()]));
//! # Ok(())
//! # }
//! ```
//!
//! # Tokens and ids
//! A session's **token** is 256 bits from the operating system's CSPRNG (via `rand`'s thread
//! generator, a ChaCha CSPRNG seeded from it), base64url: only the client holds it. The
//! backend never stores it: records are keyed by the session's [`SessionId`], a 128-bit BLAKE3
//! digest of the token, which is also what logs, the user-session index and revocation use. A
//! dump of the backend therefore holds no usable credential.
//!
//! # Expiry
//! Two limits, both enforced by the backend's TTL on the record (so every replica, and a
//! client that keeps an old cookie, sees the same end):
//! - **idle timeout** (default 24 h): the record's TTL is reset by activity. A request that
//!   reads the session extends the TTL with one `expire` call, without rewriting the data,
//!   and only once the TTL has run down by at least the **touch interval** (default 60 s), so
//!   read-heavy traffic does not write on every request.
//! - **absolute lifetime** (default 7 days) from the session's creation, which activity never
//!   extends: the TTL is always `min(idle timeout, time left of the absolute lifetime)`. The
//!   record carries its absolute deadline, and a load at or past it (by the store's
//!   [`Clock`]) deletes the record and starts a fresh session.
//!
//! A request that never touches its session costs no backend call, and so does not extend it.
//!
//! # The save rule under concurrency
//! Every record carries a version, and a save is a compare-and-swap against the exact record
//! the request read. If another request saved in between, the save re-reads the record and
//! compares it with what this request read: the fields whose value differs were *changed
//! concurrently*. Then:
//! - if none of the fields this request inserted or removed was changed concurrently, this
//!   request's inserts and removals are applied on top of the record just read and the
//!   compare-and-swap is tried again (up to [`SAVE_ATTEMPTS_MAX`] times);
//! - otherwise nothing is written and the save fails with [`SessionError::Conflict`], naming
//!   the overlapping fields. A [`clear`](Session::clear) counts as changing every field, so it
//!   conflicts with any concurrent change;
//! - if the record kept changing for [`SAVE_ATTEMPTS_MAX`] attempts in a row, the save fails
//!   with [`SessionError::Conflict`] naming no field;
//! - if the record is gone (another request flushed it, a revocation deleted it, or it
//!   expired), nothing is written and the save fails with [`SessionError::Ended`]: a save
//!   never resurrects an ended session.
//!
//! Reads are not tracked: a request that read field `a`, then wrote field `b` computed from
//! it, merges with a concurrent write of `a`. Store values that must change together in one
//! field. [`cycle_id`](Session::cycle_id) writes the request's view under the new id and
//! deletes the old record unconditionally (a login must leave the pre-login id dead).

#[cfg(feature = "http")]
pub mod layer;

#[cfg(feature = "http")]
pub use layer::{
    COOKIE_NAME_DEFAULT, CookieMode, KEY_BYTES_MIN, SameSite, SessionLayer, SessionLayerBuilder,
    SessionLayerError, SessionService,
};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use data_encoding::{BASE64URL_NOPAD, HEXLOWER};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use subtle::ConstantTimeEq;

pub use keel_engine::{Clock, ManualClock, SystemClock};

use crate::backend::{Backend, TtlPolicy, VALUE_BYTES_MAX};
use crate::error::Error;

/// Default idle timeout: 24 hours.
pub const IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// Default absolute lifetime: 7 days.
pub const ABSOLUTE_LIFETIME_DEFAULT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default touch interval: 60 seconds.
pub const TOUCH_INTERVAL_DEFAULT: Duration = Duration::from_secs(60);
/// Default limit on a stored record: 64 KiB.
pub const RECORD_BYTES_DEFAULT: usize = 64 << 10;
/// How many times a save re-reads and re-applies after losing a compare-and-swap.
pub const SAVE_ATTEMPTS_MAX: usize = 64;
/// Random bytes in a token (256 bits).
const TOKEN_BYTES: usize = 32;
/// Characters of a token: base64url without padding of [`TOKEN_BYTES`].
pub(crate) const TOKEN_CHARS: usize = 43;
/// Bytes of the BLAKE3 digest a [`SessionId`] keeps (128 bits).
const ID_BYTES: usize = 16;
/// The reserved field holding the session-auth hash (see [`Session::set_auth`]).
const AUTH_FIELD: &str = "_keel.auth";

const _: () = assert!(TOKEN_CHARS == (TOKEN_BYTES * 8).div_ceil(6));
const _: () = assert!(RECORD_BYTES_DEFAULT <= VALUE_BYTES_MAX);

/// What can go wrong with a session, as the handler sees it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The backend failed; the session could not be loaded or saved. Nothing is known to be
    /// written; the request may be retried.
    #[error("session backend error: {0}")]
    Backend(#[from] Error),
    /// A value could not be serialized, or a stored value does not deserialize as the type
    /// asked for.
    #[error("session field {field:?}: {source}")]
    Serde {
        /// The field.
        field: String,
        /// What serde said.
        source: serde_json::Error,
    },
    /// The record would exceed the configured limit; nothing was written. Store less in the
    /// session (or raise [`SessionStoreBuilder::max_record_bytes`]).
    #[error(
        "session record would be {bytes} bytes, over the limit of {limit}; nothing was written"
    )]
    TooLarge {
        /// The record's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Another request changed the same fields since this one read the session (see the
    /// [module docs](crate::session) for the rule); nothing was written. Reload and retry.
    #[error("session fields {fields:?} were changed by a concurrent request; nothing was written")]
    Conflict {
        /// The fields both requests changed.
        fields: Vec<String>,
    },
    /// The session ended (flushed, revoked or expired) while this request ran; nothing was
    /// written.
    #[error("the session ended while this request ran; nothing was written")]
    Ended,
}

/// A session's public identifier: a 128-bit digest of its secret token, as 32 lowercase hex
/// characters. It names the record in the backend and in user-session listings; it cannot be
/// turned back into a token, so it is safe to show and to log.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(String);

impl SessionId {
    fn of(token: &str) -> SessionId {
        let digest = blake3::hash(token.as_bytes());
        SessionId(HEXLOWER.encode(&digest.as_bytes()[..ID_BYTES]))
    }

    /// Parses the 32-hex-character form.
    pub fn parse(s: &str) -> Option<SessionId> {
        (s.len() == ID_BYTES * 2 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| SessionId(s.to_owned()))
    }

    /// The hex form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SessionId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        SessionId::parse(&s).ok_or_else(|| format!("not a session id: {s:?}"))
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> String {
        id.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

/// Whether `s` has the shape of a token (so a forged or truncated value never reaches the
/// backend).
fn is_token(s: &str) -> bool {
    s.len() == TOKEN_CHARS
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn new_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    BASE64URL_NOPAD.encode(&bytes)
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionStoreError {
    /// A duration is zero or the relation between them is wrong.
    #[error("invalid session timing: {0}")]
    Timing(&'static str),
    /// The record limit is 0 or over the backend's value limit.
    #[error("the record limit must be between 1 and {VALUE_BYTES_MAX} bytes, got {0}")]
    RecordLimit(usize),
}

struct StoreConfig {
    backend: Arc<dyn Backend>,
    prefix: Vec<u8>,
    idle_ms: u64,
    absolute_ms: u64,
    touch_ms: u64,
    record_bytes_max: usize,
    clock: Arc<dyn Clock>,
}

/// Builds a [`SessionStore`]; validated once by [`SessionStoreBuilder::build`].
pub struct SessionStoreBuilder {
    backend: Arc<dyn Backend>,
    prefix: Vec<u8>,
    idle: Duration,
    absolute: Duration,
    touch: Duration,
    record_bytes_max: usize,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for SessionStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionStoreBuilder")
            .field("idle", &self.idle)
            .field("absolute", &self.absolute)
            .finish_non_exhaustive()
    }
}

impl SessionStoreBuilder {
    /// The key prefix of session records (default `keel:session:`).
    pub fn prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a session lives without activity (default 24 h).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// How long a session lives at most, whatever its activity (default 7 days).
    pub fn absolute_lifetime(mut self, absolute: Duration) -> Self {
        self.absolute = absolute;
        self
    }

    /// How far the idle TTL must have run down before a read extends it (default 60 s; at
    /// most half the idle timeout).
    pub fn touch_interval(mut self, touch: Duration) -> Self {
        self.touch = touch;
        self
    }

    /// The largest record stored (default 64 KiB); a save over it fails with
    /// [`SessionError::TooLarge`] and writes nothing.
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.record_bytes_max = bytes;
        self
    }

    /// The clock that dates sessions and checks their absolute lifetime (default the
    /// system's). Tests inject a [`ManualClock`]; the TTLs themselves run on the backend's
    /// clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Validates the configuration.
    ///
    /// # Errors
    /// [`SessionStoreError`]: a zero duration, an idle timeout over the absolute lifetime, a
    /// touch interval over half the idle timeout, or a record limit out of range.
    pub fn build(self) -> Result<SessionStore, SessionStoreError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (idle_ms, absolute_ms, touch_ms) = (ms(self.idle), ms(self.absolute), ms(self.touch));
        if idle_ms == 0 || absolute_ms == 0 {
            return Err(SessionStoreError::Timing(
                "the idle timeout and absolute lifetime must be at least 1 ms",
            ));
        }
        if idle_ms > absolute_ms {
            return Err(SessionStoreError::Timing(
                "the idle timeout must not exceed the absolute lifetime",
            ));
        }
        if absolute_ms > ms(crate::TTL_MAX) {
            return Err(SessionStoreError::Timing(
                "the absolute lifetime must not exceed the backend's TTL_MAX",
            ));
        }
        if touch_ms > idle_ms / 2 {
            return Err(SessionStoreError::Timing(
                "the touch interval must be at most half the idle timeout",
            ));
        }
        if self.record_bytes_max == 0 || self.record_bytes_max > VALUE_BYTES_MAX {
            return Err(SessionStoreError::RecordLimit(self.record_bytes_max));
        }
        Ok(SessionStore {
            config: Arc::new(StoreConfig {
                backend: self.backend,
                prefix: self.prefix,
                idle_ms,
                absolute_ms,
                touch_ms,
                record_bytes_max: self.record_bytes_max,
                clock: self.clock,
            }),
        })
    }
}

/// Where sessions live: a backend, a key prefix and the expiry policy. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    config: Arc<StoreConfig>,
}

impl fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionStore")
            .field("backend", &self.config.backend.name())
            .field("idle_ms", &self.config.idle_ms)
            .field("absolute_ms", &self.config.absolute_ms)
            .finish_non_exhaustive()
    }
}

/// The stored record: a version for compare-and-swap, the dates, the fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    v: u64,
    created_ms: u64,
    deadline_ms: u64,
    data: BTreeMap<String, Value>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        // A map of strings to JSON values always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl SessionStore {
    /// Starts a configuration on `backend`.
    pub fn builder(backend: Arc<dyn Backend>) -> SessionStoreBuilder {
        SessionStoreBuilder {
            backend,
            prefix: b"keel:session:".to_vec(),
            idle: IDLE_TIMEOUT_DEFAULT,
            absolute: ABSOLUTE_LIFETIME_DEFAULT,
            touch: TOUCH_INTERVAL_DEFAULT,
            record_bytes_max: RECORD_BYTES_DEFAULT,
            clock: Arc::new(SystemClock),
        }
    }

    /// The session a client's token names (`None`, or a token of the wrong shape: a new
    /// anonymous session). Costs nothing until the session is used.
    pub fn open(&self, token: Option<&str>) -> Session {
        self.open_with(token, token.is_some(), false)
    }

    /// [`open`](SessionStore::open), for the layer: `presented` says the client sent a cookie
    /// (even one that failed verification, so it gets cleared), `reissue` that its token must
    /// be re-issued (it was signed with a retired key).
    pub(crate) fn open_with(&self, token: Option<&str>, presented: bool, reissue: bool) -> Session {
        let token = token.filter(|t| is_token(t)).map(str::to_owned);
        Session {
            inner: Arc::new(SessionInner {
                store: self.clone(),
                presented,
                state: tokio::sync::Mutex::new(State {
                    token,
                    reissue,
                    ..State::default()
                }),
            }),
        }
    }

    /// Deletes a session's record: its next request starts anonymous. Idempotent; returns
    /// whether a live record was deleted.
    ///
    /// # Errors
    /// The backend's.
    pub async fn delete(&self, id: &SessionId) -> crate::Result<bool> {
        self.config.backend.delete(&self.key(id)).await
    }

    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.config.idle_ms)
    }

    /// The absolute lifetime.
    pub fn absolute_lifetime(&self) -> Duration {
        Duration::from_millis(self.config.absolute_ms)
    }

    /// The store's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.config.clock
    }

    fn key(&self, id: &SessionId) -> Vec<u8> {
        let mut key = self.config.prefix.clone();
        key.extend_from_slice(id.0.as_bytes());
        key
    }

    /// The TTL a record gets now: the idle timeout, cut to what is left of its lifetime.
    /// `None` once the lifetime is over.
    fn ttl_ms(&self, now_ms: u64, deadline_ms: u64) -> Option<u64> {
        let left = deadline_ms.checked_sub(now_ms).filter(|&l| l > 0)?;
        Some(left.min(self.config.idle_ms))
    }
}

/// What a save or the end of a request did, for the layer to put in a cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Saved {
    /// Nothing to do: the session was not used, or only read within the touch interval.
    Unchanged,
    /// The record was written or its idle TTL extended; the client should hold `token` for
    /// `ttl` (a cookie's `Max-Age`).
    Stored {
        /// The token the client must present from now on.
        token: String,
        /// The record's TTL.
        ttl: Duration,
    },
    /// The session was flushed (or has no record any more); the client should drop its token.
    Removed,
}

impl Saved {
    /// The token to hand to the client, if there is one to (re-)issue.
    pub fn token(&self) -> Option<&str> {
        match self {
            Saved::Stored { token, .. } => Some(token),
            _ => None,
        }
    }
}

struct SessionInner {
    store: SessionStore,
    /// Whether the client presented a well-formed token (so a removal must clear it).
    presented: bool,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The token whose record this session is (`None`: anonymous, nothing stored).
    token: Option<String>,
    loaded: bool,
    /// The bytes and record the request read (`None`: no record).
    base: Option<(Vec<u8>, Record)>,
    /// The record's remaining TTL when read, in ms (`None`: no expiry).
    base_ttl_ms: Option<u64>,
    /// The request's view of the fields.
    data: BTreeMap<String, Value>,
    /// This request's own changes: `Some` inserted, `None` removed.
    changes: BTreeMap<String, Option<Value>>,
    cleared: bool,
    cycle: bool,
    flushed: bool,
    /// A cookie is due even without changes: the token was signed with a retired key, or a
    /// save during the request wrote the record.
    reissue: bool,
}

/// One session, as a request sees it: cheap to clone (handles share state). Loaded on first
/// use; [`save`](Session::save) writes it, and the [`SessionLayer`] saves it after the handler
/// if it was modified.
#[derive(Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// The session's id (`None` while it is anonymous and unsaved). Loads the session.
    ///
    /// # Errors
    /// [`SessionError::Backend`].
    pub async fn id(&self) -> Result<Option<SessionId>, SessionError> {
        let state = self.loaded().await?;
        Ok(state.token.as_deref().map(SessionId::of))
    }

    /// The value of `field`, deserialized as `T`.
    ///
    /// # Errors
    /// [`SessionError::Backend`]; [`SessionError::Serde`] if the stored value is not a `T`.
    pub async fn get<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>, SessionError> {
        let state = self.loaded().await?;
        state
            .data
            .get(field)
            .map(|v| {
                serde_json::from_value(v.clone()).map_err(|source| SessionError::Serde {
                    field: field.to_owned(),
                    source,
                })
            })
            .transpose()
    }

    /// Sets `field` to `value`.
    ///
    /// # Errors
    /// [`SessionError::Backend`]; [`SessionError::Serde`] if `value` does not serialize;
    /// [`SessionError::TooLarge`] if the record would exceed the limit (the field is then
    /// left as it was).
    pub async fn insert<T: Serialize>(&self, field: &str, value: T) -> Result<(), SessionError> {
        let value = serde_json::to_value(value).map_err(|source| SessionError::Serde {
            field: field.to_owned(),
            source,
        })?;
        let mut state = self.loaded().await?;
        let previous = state.data.insert(field.to_owned(), value.clone());
        let bytes = self.record_for(&state, 0).encode().len();
        let limit = self.inner.store.config.record_bytes_max;
        if bytes > limit {
            match previous {
                Some(p) => state.data.insert(field.to_owned(), p),
                None => state.data.remove(field),
            };
            return Err(SessionError::TooLarge { bytes, limit });
        }
        state.changes.insert(field.to_owned(), Some(value));
        Ok(())
    }

    /// Removes `field`, returning its value.
    ///
    /// # Errors
    /// [`SessionError::Backend`]; [`SessionError::Serde`] if the value is not a `T` (it is
    /// removed all the same).
    pub async fn remove<T: DeserializeOwned>(
        &self,
        field: &str,
    ) -> Result<Option<T>, SessionError> {
        let mut state = self.loaded().await?;
        let Some(value) = state.data.remove(field) else {
            return Ok(None);
        };
        state.changes.insert(field.to_owned(), None);
        serde_json::from_value(value)
            .map(Some)
            .map_err(|source| SessionError::Serde {
                field: field.to_owned(),
                source,
            })
    }

    /// Removes every field (the session and its id stay).
    ///
    /// # Errors
    /// [`SessionError::Backend`].
    pub async fn clear(&self) -> Result<(), SessionError> {
        let mut state = self.loaded().await?;
        let fields: Vec<String> = state.data.keys().cloned().collect();
        for field in fields {
            state.changes.insert(field, None);
        }
        state.data.clear();
        state.cleared = true;
        Ok(())
    }

    /// Gives the session a new id at the next save, keeping its data, and deletes the record
    /// under the old id: the session-fixation defence. Call it at login.
    ///
    /// # Errors
    /// [`SessionError::Backend`].
    pub async fn cycle_id(&self) -> Result<(), SessionError> {
        let mut state = self.loaded().await?;
        state.cycle = true;
        Ok(())
    }

    /// Ends the session: its record is deleted at the next save (the layer's, after the
    /// handler) and the client is told to drop its cookie. Logout. Does not touch the backend
    /// until then; the session stays ended for the rest of the request.
    #[doc(alias = "destroy")]
    pub async fn flush(&self) {
        let mut state = self.inner.state.lock().await;
        state.flushed = true;
        state.loaded = true;
        state.data.clear();
        state.changes.clear();
    }

    /// Records that the session is logged in as `user`, with a digest of the user's
    /// credential version (a password hash, a counter bumped at each reset, ...): the
    /// session-auth hash of axum-login. [`verify_auth`](Session::verify_auth) ends the session
    /// once that version changes. Only a BLAKE3 digest of `credential` is stored.
    ///
    /// # Errors
    /// As [`insert`](Session::insert).
    pub async fn set_auth(&self, user: &str, credential: &[u8]) -> Result<(), SessionError> {
        let auth = Auth {
            user: user.to_owned(),
            hash: HEXLOWER.encode(blake3::hash(credential).as_bytes()),
        };
        self.insert(AUTH_FIELD, auth).await
    }

    /// The user [`set_auth`](Session::set_auth) recorded, if any.
    ///
    /// # Errors
    /// [`SessionError::Backend`].
    pub async fn auth_user(&self) -> Result<Option<String>, SessionError> {
        Ok(self.get::<Auth>(AUTH_FIELD).await?.map(|a| a.user))
    }

    /// Checks the stored session-auth hash against the user's current credential version
    /// (constant-time). On a mismatch the session is [flushed](Session::flush) and `false` is
    /// returned: a password reset logs out every session on its next request. `true` if the
    /// session is not logged in or the hash matches.
    ///
    /// # Errors
    /// [`SessionError::Backend`].
    pub async fn verify_auth(&self, current_credential: &[u8]) -> Result<bool, SessionError> {
        let Some(auth) = self.get::<Auth>(AUTH_FIELD).await.ok().flatten() else {
            return Ok(true);
        };
        let current = HEXLOWER.encode(blake3::hash(current_credential).as_bytes());
        if bool::from(auth.hash.as_bytes().ct_eq(current.as_bytes())) {
            return Ok(true);
        }
        let id = self.id().await?.map(|i| i.0).unwrap_or_default();
        tracing::info!(session = %id, "session-auth hash changed: session ended");
        self.flush().await;
        Ok(false)
    }

    /// Writes the session now if it was modified (or extends its idle TTL if due), so the
    /// handler sees the outcome. The layer calls it after the handler; a handler that must
    /// know about a conflict calls it itself.
    ///
    /// # Errors
    /// [`SessionError::Conflict`] and [`SessionError::Ended`] (see the
    /// [module docs](crate::session)), [`SessionError::TooLarge`], [`SessionError::Backend`].
    /// Nothing was written in every case.
    pub async fn save(&self) -> Result<Saved, SessionError> {
        let mut state = self.inner.state.lock().await;
        let result = self.save_locked(&mut state).await;
        let outcome = match &result {
            Ok(Saved::Unchanged) => "unchanged",
            Ok(Saved::Stored { .. }) => "stored",
            Ok(Saved::Removed) => "removed",
            Err(SessionError::Conflict { .. }) => "conflict",
            Err(SessionError::Ended) => "ended",
            Err(SessionError::TooLarge { .. }) => "too_large",
            Err(_) => "error",
        };
        tracing::debug!(target: "keel::session", outcome, "session save");
        crate::observe::session_save(outcome);
        match &result {
            Err(SessionError::Ended) => {
                // Nothing left to save: the client drops its cookie.
                *state = State {
                    loaded: true,
                    ..State::default()
                };
            }
            Err(SessionError::Conflict { .. } | SessionError::TooLarge { .. }) => {
                // Reported to the caller; the request's changes are dropped, so the layer's
                // save after the handler does not report them again.
                state.changes.clear();
                state.cleared = false;
                state.cycle = false;
                state.data = state
                    .base
                    .as_ref()
                    .map(|(_, r)| r.data.clone())
                    .unwrap_or_default();
            }
            _ => {}
        }
        result
    }

    async fn save_locked(&self, state: &mut State) -> Result<Saved, SessionError> {
        let store = &self.inner.store;
        let config = &store.config;
        let b = &config.backend;
        if state.flushed {
            let had = state.token.take();
            if let Some(token) = &had {
                b.delete(&store.key(&SessionId::of(token))).await?;
            }
            state.base = None;
            return Ok(if had.is_some() || self.inner.presented {
                Saved::Removed
            } else {
                Saved::Unchanged
            });
        }
        if !state.loaded {
            return Ok(Saved::Unchanged);
        }
        let now = config.clock.now_ms();
        let modified = !state.changes.is_empty() || state.cycle;
        if !modified {
            let (Some(token), Some(deadline_ms)) = (
                state.token.clone(),
                state.base.as_ref().map(|(_, r)| r.deadline_ms),
            ) else {
                // A presented token that named no live record: the client drops it.
                return Ok(if self.inner.presented {
                    Saved::Removed
                } else {
                    Saved::Unchanged
                });
            };
            let Some(ttl) = store.ttl_ms(now, deadline_ms) else {
                return Ok(Saved::Unchanged);
            };
            let ran_down = state
                .base_ttl_ms
                .is_some_and(|left| ttl.saturating_sub(left) >= config.touch_ms);
            if ran_down {
                let id = SessionId::of(&token);
                if !b
                    .expire(&store.key(&id), Duration::from_millis(ttl))
                    .await?
                {
                    return Ok(Saved::Removed);
                }
                state.base_ttl_ms = Some(ttl);
            } else if !state.reissue {
                return Ok(Saved::Unchanged);
            }
            state.reissue = false;
            let left = if ran_down {
                ttl
            } else {
                state.base_ttl_ms.unwrap_or(ttl)
            };
            return Ok(Saved::Stored {
                token,
                ttl: Duration::from_millis(left),
            });
        }

        let (created_ms, deadline_ms) = match &state.base {
            Some((_, r)) => (r.created_ms, r.deadline_ms),
            None => (now, now.saturating_add(config.absolute_ms)),
        };
        let Some(ttl_ms) = store.ttl_ms(now, deadline_ms) else {
            return Err(SessionError::Ended);
        };
        let ttl = Duration::from_millis(ttl_ms);
        let mut attempt = 0;
        loop {
            attempt += 1;
            if attempt > SAVE_ATTEMPTS_MAX {
                return Err(SessionError::Conflict { fields: Vec::new() });
            }
            let version = state.base.as_ref().map_or(0, |(_, r)| r.v) + 1;
            let record = Record {
                v: version,
                created_ms,
                deadline_ms,
                data: state.data.clone(),
            };
            let bytes = record.encode();
            if bytes.len() > config.record_bytes_max {
                return Err(SessionError::TooLarge {
                    bytes: bytes.len(),
                    limit: config.record_bytes_max,
                });
            }
            if state.cycle {
                // A fresh token: the record is new, nothing can race it. The old record
                // dies unconditionally, so the pre-login token is worthless.
                let token = new_token();
                let key = store.key(&SessionId::of(&token));
                if !b
                    .compare_and_swap(&key, None, &bytes, TtlPolicy::Set(ttl))
                    .await?
                {
                    continue;
                }
                if let Some(old) = state.token.replace(token.clone()) {
                    b.delete(&store.key(&SessionId::of(&old))).await?;
                }
                return Ok(self.saved(state, bytes, record, ttl_ms, token));
            }
            let token = match &state.token {
                Some(t) => t.clone(),
                None => {
                    let t = new_token();
                    state.token = Some(t.clone());
                    t
                }
            };
            let key = store.key(&SessionId::of(&token));
            let expected = state.base.as_ref().map(|(b, _)| b.as_slice());
            if b.compare_and_swap(&key, expected, &bytes, TtlPolicy::Set(ttl))
                .await?
            {
                return Ok(self.saved(state, bytes, record, ttl_ms, token));
            }
            if state.base.is_none() {
                // Only a brand-new token has no base, and it cannot collide (256 random
                // bits); a retry draws another.
                state.token = None;
                continue;
            }
            // Lost the race: merge onto the current record if the rule allows it.
            let Some(current) = b.get(&key).await? else {
                return Err(SessionError::Ended);
            };
            let Ok(current_record) = serde_json::from_slice::<Record>(&current) else {
                return Err(SessionError::Ended);
            };
            let empty = BTreeMap::new();
            let read = state.base.as_ref().map_or(&empty, |(_, r)| &r.data);
            let concurrent = changed_fields(read, &current_record.data);
            let overlap: Vec<String> = if state.cleared {
                concurrent.into_iter().collect()
            } else {
                state
                    .changes
                    .keys()
                    .filter(|f| concurrent.contains(*f))
                    .cloned()
                    .collect()
            };
            if !overlap.is_empty() {
                tracing::info!(session = %SessionId::of(&token), fields = ?overlap, "session save conflict");
                return Err(SessionError::Conflict { fields: overlap });
            }
            let mut data = current_record.data.clone();
            for (field, change) in &state.changes {
                match change {
                    Some(v) => data.insert(field.clone(), v.clone()),
                    None => data.remove(field),
                };
            }
            state.data = data;
            state.base = Some((current, current_record));
        }
    }

    fn saved(
        &self,
        state: &mut State,
        bytes: Vec<u8>,
        record: Record,
        ttl_ms: u64,
        token: String,
    ) -> Saved {
        state.base = Some((bytes, record));
        state.base_ttl_ms = Some(ttl_ms);
        state.changes.clear();
        state.cleared = false;
        state.cycle = false;
        // The layer's save after the handler (a no-op if nothing changed since) still has to
        // hand the client this token.
        state.reissue = true;
        Saved::Stored {
            token,
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    /// The record for the current data (for the size check).
    fn record_for(&self, state: &State, now_ms: u64) -> Record {
        let (created_ms, deadline_ms) = state
            .base
            .as_ref()
            .map_or((now_ms, u64::MAX), |(_, r)| (r.created_ms, r.deadline_ms));
        Record {
            v: u64::MAX,
            created_ms,
            deadline_ms,
            data: state.data.clone(),
        }
    }

    /// The state, loaded from the backend on first use.
    async fn loaded(&self) -> Result<tokio::sync::MutexGuard<'_, State>, SessionError> {
        let mut state = self.inner.state.lock().await;
        if state.loaded {
            return Ok(state);
        }
        let Some(token) = state.token.clone() else {
            state.loaded = true;
            return Ok(state);
        };
        let store = &self.inner.store;
        let key = store.key(&SessionId::of(&token));
        let read = match store.config.backend.get_with_ttl(&key).await {
            Ok(read) => read,
            Err(e) => {
                crate::observe::session_load("error");
                return Err(e.into());
            }
        };
        let now = store.config.clock.now_ms();
        state.loaded = true;
        match read.and_then(|(bytes, ttl)| {
            serde_json::from_slice::<Record>(&bytes)
                .ok()
                .map(|r| (bytes, r, ttl))
        }) {
            Some((bytes, record, ttl)) if now < record.deadline_ms => {
                crate::observe::session_load("found");
                state.data = record.data.clone();
                state.base_ttl_ms = ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
                state.base = Some((bytes, record));
            }
            Some(_) => {
                // Past its absolute lifetime by our clock: gone, and a fresh session starts.
                crate::observe::session_load("expired");
                store.config.backend.delete(&key).await?;
                state.token = None;
            }
            None => {
                // Missing, expired or unreadable: a fresh anonymous session.
                crate::observe::session_load("missing");
                state.token = None;
            }
        }
        Ok(state)
    }
}

#[derive(Serialize, Deserialize)]
struct Auth {
    user: String,
    hash: String,
}

/// The fields whose value differs between `a` and `b` (present in one only, or unequal).
fn changed_fields(a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (k, v) in a {
        if b.get(k) != Some(v) {
            out.insert(k.clone());
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.insert(k.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Embedded;

    fn store(clock: &ManualClock) -> SessionStore {
        SessionStore::builder(Arc::new(Embedded::memory()))
            .clock(Arc::new(clock.clone()))
            .idle_timeout(Duration::from_secs(60))
            .absolute_lifetime(Duration::from_secs(600))
            .touch_interval(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn tokens_are_256_bit_and_ids_are_their_digest() {
        let t = new_token();
        assert!(is_token(&t));
        assert_ne!(t, new_token());
        let id = SessionId::of(&t);
        assert_eq!(SessionId::parse(id.as_str()), Some(id.clone()));
        assert!(!id.as_str().contains(&t[..8]));
    }

    #[tokio::test]
    async fn non_overlapping_changes_merge_and_overlapping_ones_conflict() {
        let clock = ManualClock::new(1_000_000);
        let s = store(&clock);
        let first = s.open(None);
        first.insert("a", 1).await.unwrap();
        let token = first.save().await.unwrap().token().unwrap().to_owned();

        let x = s.open(Some(&token));
        let y = s.open(Some(&token));
        x.insert("b", 2).await.unwrap();
        y.insert("c", 3).await.unwrap();
        x.save().await.unwrap();
        y.save().await.unwrap();
        let z = s.open(Some(&token));
        assert_eq!(z.get::<i32>("b").await.unwrap(), Some(2));
        assert_eq!(z.get::<i32>("c").await.unwrap(), Some(3));

        let x = s.open(Some(&token));
        let y = s.open(Some(&token));
        x.insert("a", 10).await.unwrap();
        y.insert("a", 20).await.unwrap();
        x.save().await.unwrap();
        match y.save().await {
            Err(SessionError::Conflict { fields }) => assert_eq!(fields, vec!["a".to_owned()]),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_configurations_are_refused() {
        let b: Arc<dyn Backend> = Arc::new(Embedded::memory());
        assert!(
            SessionStore::builder(b.clone())
                .idle_timeout(Duration::from_secs(10))
                .absolute_lifetime(Duration::from_secs(5))
                .build()
                .is_err()
        );
        assert!(
            SessionStore::builder(b.clone())
                .max_record_bytes(0)
                .build()
                .is_err()
        );
        assert!(
            SessionStore::builder(b)
                .idle_timeout(Duration::from_secs(10))
                .touch_interval(Duration::from_secs(6))
                .build()
                .is_err()
        );
    }
}
