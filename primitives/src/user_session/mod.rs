//! User/device sessions: one record per login (who, since when, last seen, from which IP and
//! user agent, with a parsed browser/OS/device summary and application fields), so a user can
//! list where they are signed in and revoke a device, or every device but the current one.
//! Revoking a login deletes its cookie session's record, so the next request with that cookie
//! is anonymous.
//!
//! [`UserSessions`] ties a [`UserSessionRepo`] to a [`SessionStore`]. Two repositories ship:
//! [`BackendRepo`] on any [`Backend`], and (in `keel-adapters`, feature `postgres`) a Postgres
//! table. [`CachedRepo`] puts a `Backend` in front of either.
//!
//! ```
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use keel_primitives::Embedded;
//! use keel_primitives::session::SessionStore;
//! use keel_primitives::user_session::{BackendRepo, ClientInfo, UserSessions};
//!
//! let backend = Arc::new(Embedded::memory());
//! let store = SessionStore::builder(backend.clone()).build()?;
//! let users = UserSessions::new(BackendRepo::new(backend), store.clone());
//! let session = store.open(None);
//! let client = ClientInfo::new(Some("203.0.113.7".into()), Some("Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0".into()));
//! users.login(&session, "alice", b"password-hash-v1", client, ()).await?;
//! let page = users.list_active("alice", None, 50).await?;
//! assert_eq!(page.sessions[0].device.browser, "Firefox");
//! users.revoke(&page.sessions[0].session).await?; // that cookie is now anonymous
//! # Ok(())
//! # }
//! ```
//!
//! # The backend repository
//! A user's logins live in **one key** (the per-user index), rewritten with compare-and-swap,
//! so the index is always consistent (also on a Redis Cluster, where it is one slot) and a
//! page of a user's sessions, thousands or not, costs one round trip. Entries carry their
//! expiry (the cookie session's: last seen plus the idle timeout, cut to the absolute
//! lifetime); expired entries are pruned on every write and skipped on every read, and the
//! key's own TTL is its longest-lived entry's. A small pointer key per login maps a session
//! id to its user, so [`UserSessions::revoke`] needs only the id. A user holds at most
//! [`USER_SESSIONS_MAX`] logins; a new login past it evicts (and ends) the least recently
//! seen one.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use data_encoding::HEXLOWER;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, TtlPolicy};
use crate::error::{Error, ErrorKind, Result};
use crate::session::{Session, SessionError, SessionId, SessionStore};

/// Most logins one user holds; a new login past it ends the least recently seen one.
pub const USER_SESSIONS_MAX: usize = 10_000;
/// Largest page [`UserSessionRepo::list`] returns, whatever `limit` asks.
pub const PAGE_LIMIT_MAX: usize = 1_000;
/// Default interval between two updates of a login's last-seen time: 5 minutes.
pub const SEEN_INTERVAL_DEFAULT: Duration = Duration::from_secs(300);
/// Longest user agent kept, in bytes (longer ones are cut at a character boundary).
pub const USER_AGENT_BYTES_MAX: usize = 512;
/// How many times an index update retries a lost compare-and-swap.
const INDEX_ATTEMPTS_MAX: usize = 64;
/// The session field holding the last time [`UserSessions::seen`] recorded (ms).
const SEEN_FIELD: &str = "_keel.seen_ms";

/// Application fields a login record carries (`()` for none).
pub trait AppFields: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> AppFields for T {}

/// What a user agent string says about the client, parsed by the `woothee` crate.
/// Unrecognized parts are `"UNKNOWN"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Browser name ("Chrome", "Firefox", "Safari", ...).
    pub browser: String,
    /// Browser version.
    pub browser_version: String,
    /// Operating system ("Windows 10", "Mac OSX", "iPhone", "Android", "Linux", ...).
    pub os: String,
    /// Operating system version.
    pub os_version: String,
    /// Kind of device: "pc", "smartphone", "mobilephone", "crawler", "appliance", "misc".
    pub category: String,
}

impl Device {
    /// Parses a user agent string.
    pub fn from_user_agent(user_agent: &str) -> Device {
        match woothee::parser::Parser::new().parse(user_agent) {
            Some(r) => Device {
                browser: r.name.to_owned(),
                browser_version: r.version.to_owned(),
                os: r.os.to_owned(),
                os_version: r.os_version.into_owned(),
                category: r.category.to_owned(),
            },
            None => Device::unknown(),
        }
    }

    fn unknown() -> Device {
        let u = || "UNKNOWN".to_owned();
        Device {
            browser: u(),
            browser_version: u(),
            os: u(),
            os_version: u(),
            category: u(),
        }
    }
}

/// The client a login came from, as the application knows it (e.g. from
/// [`http::extract`](crate::http::extract)'s client IP and the `User-Agent` header).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's IP address.
    pub ip: Option<String>,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
}

impl ClientInfo {
    /// A client seen at `ip` with `user_agent`.
    pub fn new(ip: Option<String>, user_agent: Option<String>) -> ClientInfo {
        ClientInfo { ip, user_agent }
    }
}

/// One login of one user on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "A: AppFields")]
pub struct UserSession<A = ()> {
    /// The cookie session this login is.
    pub session: SessionId,
    /// The user.
    pub user: String,
    /// When the user logged in (Unix ms, the store's clock).
    pub created_ms: u64,
    /// When the session was last seen (updated at most once per seen interval).
    pub last_seen_ms: u64,
    /// When the login ends unless seen again (Unix ms).
    pub expires_ms: u64,
    /// The client's IP at login.
    pub ip: Option<String>,
    /// The client's user agent at login (at most [`USER_AGENT_BYTES_MAX`] bytes).
    pub user_agent: Option<String>,
    /// The user agent, parsed.
    pub device: Device,
    /// Application fields.
    pub app: A,
}

/// One page of a user's logins, most recent first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<A = ()> {
    /// The logins.
    pub sessions: Vec<UserSession<A>>,
    /// Pass it back for the next page; `None` at the end.
    pub next: Option<String>,
}

/// Where login records live. Every operation is idempotent; `now_ms` (the caller's clock,
/// read once per operation) decides which entries have expired.
#[async_trait]
pub trait UserSessionRepo<A: AppFields>: Send + Sync + 'static {
    /// Adds (or replaces) a login. Returns the sessions evicted to keep the user at
    /// [`USER_SESSIONS_MAX`]; the caller ends them.
    async fn insert(&self, record: &UserSession<A>, now_ms: u64) -> Result<Vec<SessionId>>;

    /// One login, if it is live.
    async fn get(&self, session: &SessionId, now_ms: u64) -> Result<Option<UserSession<A>>>;

    /// A page of the user's live logins, most recently created first, at most `limit`
    /// (capped at [`PAGE_LIMIT_MAX`]) per page.
    async fn list(
        &self,
        user: &str,
        now_ms: u64,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<A>>;

    /// Records that a login was seen; false if it is gone.
    async fn touch(
        &self,
        user: &str,
        session: &SessionId,
        last_seen_ms: u64,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<bool>;

    /// Removes a login; returns its user, or `None` if there was none.
    async fn remove(&self, session: &SessionId, now_ms: u64) -> Result<Option<String>>;

    /// Removes every login of `user` except `keep`; returns the removed sessions.
    async fn remove_user(
        &self,
        user: &str,
        keep: Option<&SessionId>,
        now_ms: u64,
    ) -> Result<Vec<SessionId>>;
}

/// Position of a login in a listing: newest first, ties by session id.
fn order<A>(a: &UserSession<A>, b: &UserSession<A>) -> std::cmp::Ordering {
    b.created_ms
        .cmp(&a.created_ms)
        .then_with(|| a.session.cmp(&b.session))
}

fn cursor_of<A>(s: &UserSession<A>) -> String {
    format!("{}.{}", s.created_ms, s.session)
}

/// Sorts live entries and cuts the page after `cursor`.
pub(crate) fn page_of<A: Clone>(
    mut live: Vec<UserSession<A>>,
    cursor: Option<&str>,
    limit: usize,
) -> Page<A> {
    live.sort_by(order);
    let limit = limit.clamp(1, PAGE_LIMIT_MAX);
    let start = match cursor.and_then(|c| c.split_once('.')) {
        Some((ms, id)) => {
            let ms: u64 = ms.parse().unwrap_or(u64::MAX);
            live.partition_point(|s| {
                s.created_ms > ms || (s.created_ms == ms && s.session.as_str() <= id)
            })
        }
        None => 0,
    };
    let rest = &live[start.min(live.len())..];
    let sessions: Vec<_> = rest.iter().take(limit).cloned().collect();
    let next = (rest.len() > limit)
        .then(|| sessions.last().map(cursor_of))
        .flatten();
    Page { sessions, next }
}

fn corrupt(what: &str, e: serde_json::Error) -> Error {
    Error::new(
        ErrorKind::Corruption,
        format!("unreadable user-session {what}: {e}"),
    )
    .with_source(e)
}

/// Adds (or replaces) `records` in a user's entries, evicting the least recently seen past
/// [`USER_SESSIONS_MAX`]; returns the evicted sessions.
fn add<'a, A: AppFields>(
    sessions: &mut Vec<UserSession<A>>,
    records: impl Iterator<Item = &'a UserSession<A>> + Clone,
) -> Vec<SessionId> {
    let ids: std::collections::BTreeSet<&SessionId> = records.clone().map(|r| &r.session).collect();
    sessions.retain(|s| !ids.contains(&s.session));
    sessions.extend(records.cloned());
    let mut evicted = Vec::new();
    if sessions.len() > USER_SESSIONS_MAX {
        sessions.sort_by_key(|s| std::cmp::Reverse(s.last_seen_ms));
        for gone in sessions.drain(USER_SESSIONS_MAX..) {
            evicted.push(gone.session);
        }
    }
    evicted
}

/// The repository on any [`Backend`]: a per-user index key kept consistent with
/// compare-and-swap (see the [module docs](crate::user_session)).
pub struct BackendRepo<A = ()> {
    backend: Arc<dyn Backend>,
    prefix: Vec<u8>,
    _app: PhantomData<fn() -> A>,
}

impl<A> fmt::Debug for BackendRepo<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendRepo")
            .field("backend", &self.backend.name())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "A: AppFields")]
struct Index<A> {
    sessions: Vec<UserSession<A>>,
}

impl<A: AppFields> BackendRepo<A> {
    /// A repository on `backend` under the prefix `keel:user_session:`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        BackendRepo {
            backend,
            prefix: b"keel:user_session:".to_vec(),
            _app: PhantomData,
        }
    }

    /// Another key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    fn index_key(&self, user: &str) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(b"u:");
        k.extend_from_slice(
            HEXLOWER
                .encode(&blake3::hash(user.as_bytes()).as_bytes()[..16])
                .as_bytes(),
        );
        k
    }

    fn pointer_key(&self, session: &SessionId) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(b"s:");
        k.extend_from_slice(session.as_str().as_bytes());
        k
    }

    async fn read(&self, user: &str) -> Result<(Option<Vec<u8>>, Vec<UserSession<A>>)> {
        match self.backend.get(&self.index_key(user)).await? {
            None => Ok((None, Vec::new())),
            Some(bytes) => {
                let index: Index<A> =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt("index", e))?;
                Ok((Some(bytes), index.sessions))
            }
        }
    }

    /// Applies `f` to the user's live entries with compare-and-swap, retrying on a race.
    async fn update<T>(
        &self,
        user: &str,
        now_ms: u64,
        mut f: impl FnMut(&mut Vec<UserSession<A>>) -> T,
    ) -> Result<T> {
        let key = self.index_key(user);
        for _ in 0..INDEX_ATTEMPTS_MAX {
            let (old, mut sessions) = self.read(user).await?;
            sessions.retain(|s| s.expires_ms > now_ms);
            let out = f(&mut sessions);
            let done = match (sessions.iter().map(|s| s.expires_ms).max(), &old) {
                (None, None) => true,
                (None, Some(old)) => self.backend.compare_and_delete(&key, old).await?,
                (Some(last), old) => {
                    let bytes = serde_json::to_vec(&Index {
                        sessions: std::mem::take(&mut sessions),
                    })
                    .map_err(|e| corrupt("record", e))?;
                    let ttl = Duration::from_millis(last.saturating_sub(now_ms).max(1));
                    self.backend
                        .compare_and_swap(&key, old.as_deref(), &bytes, TtlPolicy::Set(ttl))
                        .await?
                }
            };
            if done {
                return Ok(out);
            }
        }
        Err(Error::new(
            ErrorKind::Transient,
            format!("user-session index kept changing for {INDEX_ATTEMPTS_MAX} attempts; retry"),
        ))
    }

    /// Adds many logins at once (a migration from another repository): one index write per
    /// user, then one pointer per login. Returns the sessions evicted to keep each user at
    /// [`USER_SESSIONS_MAX`]; the caller ends them.
    ///
    /// # Errors
    /// The backend's.
    pub async fn import(&self, records: &[UserSession<A>], now_ms: u64) -> Result<Vec<SessionId>> {
        let mut by_user: std::collections::BTreeMap<&str, Vec<&UserSession<A>>> =
            std::collections::BTreeMap::new();
        for r in records {
            by_user.entry(r.user.as_str()).or_default().push(r);
        }
        let mut evicted = Vec::new();
        for (user, batch) in by_user {
            evicted.extend(
                self.update(user, now_ms, |sessions| {
                    add(sessions, batch.iter().copied())
                })
                .await?,
            );
            for r in batch {
                let ttl = Duration::from_millis(r.expires_ms.saturating_sub(now_ms).max(1));
                self.backend
                    .set(&self.pointer_key(&r.session), r.user.as_bytes(), Some(ttl))
                    .await?;
            }
        }
        for id in &evicted {
            self.backend.delete(&self.pointer_key(id)).await?;
        }
        Ok(evicted)
    }

    async fn user_of(&self, session: &SessionId) -> Result<Option<String>> {
        Ok(self
            .backend
            .get(&self.pointer_key(session))
            .await?
            .and_then(|u| String::from_utf8(u).ok()))
    }
}

#[async_trait]
impl<A: AppFields> UserSessionRepo<A> for BackendRepo<A> {
    async fn insert(&self, record: &UserSession<A>, now_ms: u64) -> Result<Vec<SessionId>> {
        let evicted = self
            .update(&record.user, now_ms, |sessions| {
                add(sessions, std::iter::once(record))
            })
            .await?;
        let ttl = Duration::from_millis(record.expires_ms.saturating_sub(now_ms).max(1));
        self.backend
            .set(
                &self.pointer_key(&record.session),
                record.user.as_bytes(),
                Some(ttl),
            )
            .await?;
        for id in &evicted {
            self.backend.delete(&self.pointer_key(id)).await?;
        }
        Ok(evicted)
    }

    async fn get(&self, session: &SessionId, now_ms: u64) -> Result<Option<UserSession<A>>> {
        let Some(user) = self.user_of(session).await? else {
            return Ok(None);
        };
        let (_, sessions) = self.read(&user).await?;
        Ok(sessions
            .into_iter()
            .find(|s| &s.session == session && s.expires_ms > now_ms))
    }

    async fn list(
        &self,
        user: &str,
        now_ms: u64,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<A>> {
        let (_, mut sessions) = self.read(user).await?;
        sessions.retain(|s| s.expires_ms > now_ms);
        Ok(page_of(sessions, cursor, limit))
    }

    async fn touch(
        &self,
        user: &str,
        session: &SessionId,
        last_seen_ms: u64,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<bool> {
        let found = self
            .update(user, now_ms, |sessions| {
                match sessions.iter_mut().find(|s| &s.session == session) {
                    Some(s) => {
                        s.last_seen_ms = s.last_seen_ms.max(last_seen_ms);
                        s.expires_ms = s.expires_ms.max(expires_ms);
                        true
                    }
                    None => false,
                }
            })
            .await?;
        if found {
            let ttl = Duration::from_millis(expires_ms.saturating_sub(now_ms).max(1));
            self.backend.expire(&self.pointer_key(session), ttl).await?;
        }
        Ok(found)
    }

    async fn remove(&self, session: &SessionId, now_ms: u64) -> Result<Option<String>> {
        let Some(user) = self.user_of(session).await? else {
            return Ok(None);
        };
        let removed = self
            .update(&user, now_ms, |sessions| {
                let before = sessions.len();
                sessions.retain(|s| &s.session != session);
                before != sessions.len()
            })
            .await?;
        self.backend.delete(&self.pointer_key(session)).await?;
        Ok(removed.then_some(user))
    }

    async fn remove_user(
        &self,
        user: &str,
        keep: Option<&SessionId>,
        now_ms: u64,
    ) -> Result<Vec<SessionId>> {
        let removed = self
            .update(user, now_ms, |sessions| {
                let mut removed = Vec::new();
                sessions.retain(|s| {
                    let kept = Some(&s.session) == keep;
                    if !kept {
                        removed.push(s.session.clone());
                    }
                    kept
                });
                removed
            })
            .await?;
        for id in &removed {
            self.backend.delete(&self.pointer_key(id)).await?;
        }
        Ok(removed)
    }
}

/// Cache-aside in front of any repository: single logins and listing pages are cached in a
/// [`Backend`] for `ttl`; every write through the wrapper invalidates what it changed (a
/// per-user generation counter retires all of that user's cached pages at once). Writes that
/// bypass the wrapper are seen after at most `ttl`.
pub struct CachedRepo<R> {
    inner: R,
    cache: Arc<dyn Backend>,
    prefix: Vec<u8>,
    ttl: Duration,
}

impl<R> fmt::Debug for CachedRepo<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedRepo")
            .field("cache", &self.cache.name())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl<R> CachedRepo<R> {
    /// `inner` behind `cache`, entries kept for `ttl`, under the prefix
    /// `keel:user_session_cache:`.
    pub fn new(inner: R, cache: Arc<dyn Backend>, ttl: Duration) -> Self {
        CachedRepo {
            inner,
            cache,
            prefix: b"keel:user_session_cache:".to_vec(),
            ttl,
        }
    }

    /// Another key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The repository behind the cache.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    fn key(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(b':');
            }
            k.extend_from_slice(p);
        }
        k
    }

    fn user_tag(user: &str) -> String {
        HEXLOWER.encode(&blake3::hash(user.as_bytes()).as_bytes()[..16])
    }

    async fn invalidate(&self, user: Option<&str>, sessions: &[SessionId]) -> Result<()> {
        for s in sessions {
            self.cache
                .delete(&self.key(&[b"s", s.as_str().as_bytes()]))
                .await?;
        }
        if let Some(user) = user {
            let gen_key = self.key(&[b"g", Self::user_tag(user).as_bytes()]);
            self.cache.incr(&gen_key, 1, None).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl<A: AppFields, R: UserSessionRepo<A>> UserSessionRepo<A> for CachedRepo<R> {
    async fn insert(&self, record: &UserSession<A>, now_ms: u64) -> Result<Vec<SessionId>> {
        let evicted = self.inner.insert(record, now_ms).await?;
        let mut stale = evicted.clone();
        stale.push(record.session.clone());
        self.invalidate(Some(&record.user), &stale).await?;
        Ok(evicted)
    }

    async fn get(&self, session: &SessionId, now_ms: u64) -> Result<Option<UserSession<A>>> {
        let key = self.key(&[b"s", session.as_str().as_bytes()]);
        if let Some(bytes) = self.cache.get(&key).await?
            && let Ok(record) = serde_json::from_slice::<UserSession<A>>(&bytes)
        {
            return Ok((record.expires_ms > now_ms).then_some(record));
        }
        let found = self.inner.get(session, now_ms).await?;
        if let Some(record) = &found {
            let bytes = serde_json::to_vec(record).map_err(|e| corrupt("record", e))?;
            self.cache.set(&key, &bytes, Some(self.ttl)).await?;
        }
        Ok(found)
    }

    async fn list(
        &self,
        user: &str,
        now_ms: u64,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<A>> {
        let tag = Self::user_tag(user);
        let generation = self
            .cache
            .get(&self.key(&[b"g", tag.as_bytes()]))
            .await?
            .unwrap_or_default();
        let limit_text = limit.to_string();
        let key = self.key(&[
            b"l",
            tag.as_bytes(),
            &generation,
            limit_text.as_bytes(),
            cursor.unwrap_or("").as_bytes(),
        ]);
        if let Some(bytes) = self.cache.get(&key).await?
            && let Ok((sessions, next)) =
                serde_json::from_slice::<(Vec<UserSession<A>>, Option<String>)>(&bytes)
        {
            let sessions = sessions
                .into_iter()
                .filter(|s| s.expires_ms > now_ms)
                .collect();
            return Ok(Page { sessions, next });
        }
        let page = self.inner.list(user, now_ms, cursor, limit).await?;
        let bytes =
            serde_json::to_vec(&(&page.sessions, &page.next)).map_err(|e| corrupt("page", e))?;
        self.cache.set(&key, &bytes, Some(self.ttl)).await?;
        Ok(page)
    }

    async fn touch(
        &self,
        user: &str,
        session: &SessionId,
        last_seen_ms: u64,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<bool> {
        let found = self
            .inner
            .touch(user, session, last_seen_ms, expires_ms, now_ms)
            .await?;
        self.invalidate(Some(user), std::slice::from_ref(session))
            .await?;
        Ok(found)
    }

    async fn remove(&self, session: &SessionId, now_ms: u64) -> Result<Option<String>> {
        let user = self.inner.remove(session, now_ms).await?;
        self.invalidate(user.as_deref(), std::slice::from_ref(session))
            .await?;
        Ok(user)
    }

    async fn remove_user(
        &self,
        user: &str,
        keep: Option<&SessionId>,
        now_ms: u64,
    ) -> Result<Vec<SessionId>> {
        let removed = self.inner.remove_user(user, keep, now_ms).await?;
        self.invalidate(Some(user), &removed).await?;
        Ok(removed)
    }
}

/// Logins tied to cookie sessions: [`login`](UserSessions::login) creates both,
/// [`revoke`](UserSessions::revoke) ends both. Cheap to clone if `R` is.
#[derive(Clone)]
pub struct UserSessions<A, R> {
    repo: R,
    store: SessionStore,
    seen_ms: u64,
    _app: PhantomData<fn() -> A>,
}

impl<A, R> fmt::Debug for UserSessions<A, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserSessions")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<A: AppFields, R: UserSessionRepo<A>> UserSessions<A, R> {
    /// Logins in `repo`, for cookie sessions in `store`.
    pub fn new(repo: R, store: SessionStore) -> Self {
        UserSessions {
            repo,
            store,
            seen_ms: u64::try_from(SEEN_INTERVAL_DEFAULT.as_millis()).unwrap_or(u64::MAX),
            _app: PhantomData,
        }
    }

    /// How often [`seen`](UserSessions::seen) updates a login's last-seen time (default
    /// 5 minutes).
    pub fn seen_interval(mut self, interval: Duration) -> Self {
        self.seen_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The repository.
    pub fn repo(&self) -> &R {
        &self.repo
    }

    fn expires_ms(&self, created_ms: u64, seen_ms: u64) -> u64 {
        let idle = u64::try_from(self.store.idle_timeout().as_millis()).unwrap_or(u64::MAX);
        let absolute =
            u64::try_from(self.store.absolute_lifetime().as_millis()).unwrap_or(u64::MAX);
        seen_ms
            .saturating_add(idle)
            .min(created_ms.saturating_add(absolute))
    }

    /// Logs `session` in as `user`: gives it a new id ([`Session::cycle_id`], the fixation
    /// defence), stores the session-auth hash of `credential` ([`Session::set_auth`]), saves
    /// it, and records the login (replacing the record of a login this session already had).
    ///
    /// # Errors
    /// The session's save errors, and the repository's as [`SessionError::Backend`]. If the
    /// login record could not be written, the new session is ended again.
    pub async fn login(
        &self,
        session: &Session,
        user: &str,
        credential: &[u8],
        client: ClientInfo,
        app: A,
    ) -> std::result::Result<UserSession<A>, SessionError> {
        let now = self.store.clock().now_ms();
        // A login over a logged-in session (switching accounts) replaces its login record:
        // the old id dies with `cycle_id`, so its record would list a dead session.
        if session.auth_user().await?.is_some()
            && let Some(old) = session.id().await?
        {
            self.repo.remove(&old, now).await?;
        }
        session.cycle_id().await?;
        session.set_auth(user, credential).await?;
        session.insert(SEEN_FIELD, now).await?;
        session.save().await?;
        let Some(id) = session.id().await? else {
            return Err(SessionError::Ended);
        };
        let user_agent = client.user_agent.map(|mut ua| {
            if ua.len() > USER_AGENT_BYTES_MAX {
                let mut cut = USER_AGENT_BYTES_MAX;
                while !ua.is_char_boundary(cut) {
                    cut -= 1;
                }
                ua.truncate(cut);
            }
            ua
        });
        let record = UserSession {
            session: id.clone(),
            user: user.to_owned(),
            created_ms: now,
            last_seen_ms: now,
            expires_ms: self.expires_ms(now, now),
            ip: client.ip,
            device: user_agent
                .as_deref()
                .map_or_else(Device::unknown, Device::from_user_agent),
            user_agent,
            app,
        };
        match self.repo.insert(&record, now).await {
            Ok(evicted) => {
                for gone in &evicted {
                    self.store.delete(gone).await?;
                }
                tracing::info!(session = %id, "user session created");
                Ok(record)
            }
            Err(e) => {
                session.flush().await;
                let _ = session.save().await;
                Err(e.into())
            }
        }
    }

    /// Records activity of a logged-in session: updates its login's last-seen time (and
    /// expiry) at most once per seen interval. Call it from the middleware or extractor that
    /// authenticates requests. Costs nothing extra between updates beyond reading the
    /// session.
    ///
    /// # Errors
    /// The session's and the repository's.
    pub async fn seen(&self, session: &Session) -> std::result::Result<(), SessionError> {
        let Some(user) = session.auth_user().await? else {
            return Ok(());
        };
        let now = self.store.clock().now_ms();
        let last: u64 = session.get(SEEN_FIELD).await?.unwrap_or(0);
        if now.saturating_sub(last) < self.seen_ms {
            return Ok(());
        }
        let Some(id) = session.id().await? else {
            return Ok(());
        };
        let Some(record) = self.repo.get(&id, now).await? else {
            return Ok(());
        };
        session.insert(SEEN_FIELD, now).await?;
        self.repo
            .touch(
                &user,
                &id,
                now,
                self.expires_ms(record.created_ms, now),
                now,
            )
            .await?;
        Ok(())
    }

    /// A page of `user`'s live logins, most recent first (one repository round trip).
    ///
    /// # Errors
    /// The repository's.
    pub async fn list_active(
        &self,
        user: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<A>> {
        let now = self.store.clock().now_ms();
        self.repo.list(user, now, cursor, limit).await
    }

    /// Ends one login: its cookie session's record is deleted first (the next request with
    /// that cookie is anonymous), then the login record. Idempotent; returns whether a login
    /// was found.
    ///
    /// # Errors
    /// The backend's or repository's; retrying is safe.
    pub async fn revoke(&self, session: &SessionId) -> Result<bool> {
        let now = self.store.clock().now_ms();
        self.store.delete(session).await?;
        let user = self.repo.remove(session, now).await?;
        tracing::info!(session = %session, found = user.is_some(), "user session revoked");
        Ok(user.is_some())
    }

    /// Ends every login of `user` but `current` (the "sign out other devices" button).
    /// Returns the sessions ended.
    ///
    /// # Errors
    /// The backend's or repository's; retrying is safe.
    pub async fn revoke_all_except(
        &self,
        user: &str,
        current: &SessionId,
    ) -> Result<Vec<SessionId>> {
        self.revoke_user(user, Some(current)).await
    }

    /// Ends every login of `user`. Returns the sessions ended.
    ///
    /// # Errors
    /// The backend's or repository's; retrying is safe.
    pub async fn revoke_all(&self, user: &str) -> Result<Vec<SessionId>> {
        self.revoke_user(user, None).await
    }

    async fn revoke_user(&self, user: &str, keep: Option<&SessionId>) -> Result<Vec<SessionId>> {
        let now = self.store.clock().now_ms();
        // Cookie sessions first, so a failure part-way never leaves a live session that is no
        // longer listed; then the records, and the cookie sessions of any login that arrived
        // in between.
        let mut ended = Vec::new();
        let mut cursor = None;
        loop {
            let page = self
                .repo
                .list(user, now, cursor.as_deref(), PAGE_LIMIT_MAX)
                .await?;
            for s in page.sessions {
                if Some(&s.session) != keep {
                    self.store.delete(&s.session).await?;
                    ended.push(s.session);
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        for id in self.repo.remove_user(user, keep, now).await? {
            if !ended.contains(&id) {
                self.store.delete(&id).await?;
                ended.push(id);
            }
        }
        tracing::info!(count = ended.len(), "user sessions revoked");
        Ok(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_agents_are_summarised() {
        let d = Device::from_user_agent(
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
        );
        assert_eq!(d.browser, "Safari");
        assert_eq!(d.category, "smartphone");
        assert_eq!(Device::from_user_agent("").browser, "UNKNOWN");
    }

    #[test]
    fn pages_follow_the_cursor_without_gaps_or_repeats() {
        let mk = |i: u64| UserSession {
            session: SessionId::parse(&format!("{i:032x}")).unwrap(),
            user: "u".into(),
            created_ms: i / 3,
            last_seen_ms: 0,
            expires_ms: u64::MAX,
            ip: None,
            user_agent: None,
            device: Device::unknown(),
            app: (),
        };
        let all: Vec<_> = (0..50).map(mk).collect();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let p = page_of(all.clone(), cursor.as_deref(), 7);
            seen.extend(p.sessions.into_iter().map(|s| s.session));
            match p.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(seen.len(), 50);
        let unique: std::collections::BTreeSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), 50);
    }
}
