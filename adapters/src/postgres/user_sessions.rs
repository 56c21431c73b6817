//! [`PostgresUserSessions`]: the user-session repository
//! ([`UserSessionRepo`](keel_primitives::user_session::UserSessionRepo)) on a real PostgreSQL
//! table, sharing a [`PostgresBackend`]'s connection pool, timeouts and error mapping.
//!
//! # Schema
//! [`PostgresUserSessions::ensure_schema`] creates, if missing:
//!
//! ```sql
//! CREATE TABLE "keel_user_sessions" (
//!   session text PRIMARY KEY, user_id text NOT NULL,
//!   created_ms bigint NOT NULL, last_seen_ms bigint NOT NULL, expires_ms bigint NOT NULL,
//!   ip text NULL, user_agent text NULL, device jsonb NOT NULL, app jsonb NOT NULL);
//! CREATE INDEX "keel_user_sessions_user_idx"
//!   ON "keel_user_sessions" (user_id, created_ms DESC, session);
//! CREATE INDEX "keel_user_sessions_expires_idx" ON "keel_user_sessions" (expires_ms);
//! ```
//!
//! A page of a user's logins is one indexed range query (keyset pagination on
//! `(created_ms DESC, session)`), however many logins the user has. Every statement is
//! single-row or single-user and atomic on its own. Expired rows are invisible to reads; a
//! login deletes the user's expired rows, and [`PostgresUserSessions::sweep`] deletes expired
//! rows of every user in bounded batches.

use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use keel_primitives::session::SessionId;
use keel_primitives::user_session::{
    AppFields, Device, PAGE_LIMIT_MAX, Page, USER_SESSIONS_MAX, UserSession, UserSessionRepo,
};
use keel_primitives::{Error, ErrorKind, Result};
use tokio_postgres::Row;

use super::{PostgresBackend, SCHEMA_LOCK_KEY, Shared, is_identifier};

/// The table used unless [`PostgresUserSessions::with_table`] names another.
pub const USER_SESSIONS_TABLE_DEFAULT: &str = "keel_user_sessions";
/// Longest table name: its index names must stay within PostgreSQL's 63-byte identifiers.
const TABLE_BYTES_MAX: usize = 63 - "_expires_idx".len();
/// Rows one [`PostgresUserSessions::sweep`] statement deletes at most.
pub const SWEEP_BATCH_MAX: i64 = 10_000;

const COLUMNS: &str = "session, user_id, created_ms, last_seen_ms, expires_ms, ip, user_agent, \
                       device::text, app::text";

/// Login records in a PostgreSQL table (see the [module docs](self)).
pub struct PostgresUserSessions<A = ()> {
    shared: Arc<Shared>,
    table: String,
    user_index: String,
    expires_index: String,
    _app: PhantomData<fn() -> A>,
}

impl<A> std::fmt::Debug for PostgresUserSessions<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresUserSessions")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unms(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corruption,
        format!("postgres user sessions: unreadable {what}: {detail}"),
    )
}

impl<A: AppFields> PostgresUserSessions<A> {
    /// The repository on `backend`'s connection pool, in the table `keel_user_sessions`.
    /// Call [`ensure_schema`](Self::ensure_schema) once.
    pub fn new(backend: &PostgresBackend) -> Self {
        Self::with_table(backend, USER_SESSIONS_TABLE_DEFAULT)
            .unwrap_or_else(|_| unreachable!("the default table name is valid"))
    }

    /// The repository in another table.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] unless `table` is a plain identifier (ASCII letters,
    /// digits, `_`, not starting with a digit) of at most 51 bytes.
    pub fn with_table(backend: &PostgresBackend, table: &str) -> Result<Self> {
        if !is_identifier(table, TABLE_BYTES_MAX) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "invalid user-session table name {table:?}: use ASCII letters, digits and \
                     `_`, not starting with a digit, at most {TABLE_BYTES_MAX} bytes"
                ),
            ));
        }
        Ok(PostgresUserSessions {
            shared: Arc::clone(&backend.shared),
            table: format!("\"{table}\""),
            user_index: format!("\"{table}_user_idx\""),
            expires_index: format!("\"{table}_expires_idx\""),
            _app: PhantomData,
        })
    }

    /// Creates the table and its indexes if missing.
    ///
    /// # Errors
    /// The backend's.
    pub async fn ensure_schema(&self) -> Result<()> {
        let t = &self.table;
        // One simple-protocol message runs as one transaction, so the advisory lock (the
        // one the key-value table's schema takes) serializes concurrent callers.
        let ddl = format!(
            "SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY}); \
             CREATE TABLE IF NOT EXISTS {t} (session text PRIMARY KEY, user_id text NOT NULL, \
               created_ms bigint NOT NULL, last_seen_ms bigint NOT NULL, \
               expires_ms bigint NOT NULL, ip text NULL, user_agent text NULL, \
               device jsonb NOT NULL, app jsonb NOT NULL); \
             CREATE INDEX IF NOT EXISTS {ui} ON {t} (user_id, created_ms DESC, session); \
             CREATE INDEX IF NOT EXISTS {ei} ON {t} (expires_ms);",
            ui = self.user_index,
            ei = self.expires_index,
        );
        let shared = &self.shared;
        let limit = shared.options.op_timeout.max(super::SCHEMA_TIMEOUT_MIN);
        let run = async {
            let client = shared.pool.get().await.map_err(|e| {
                shared.error("user_sessions.ensure_schema", super::Failure::Pool(e))
            })?;
            client
                .batch_execute(&ddl)
                .await
                .map_err(|e| shared.pg_error("user_sessions.ensure_schema", e))
        };
        match tokio::time::timeout(limit, run).await {
            Ok(result) => result,
            Err(_) => Err(shared.error("user_sessions.ensure_schema", super::Failure::Timeout)),
        }
    }

    /// Deletes up to `batch` (at most [`SWEEP_BATCH_MAX`]) rows that expired before `now_ms`,
    /// using the expiry index; returns how many. Call it now and then (logins also prune
    /// their own user's expired rows).
    ///
    /// # Errors
    /// The backend's.
    pub async fn sweep(&self, now_ms: u64, batch: i64) -> Result<u64> {
        let sql = format!(
            "WITH gone AS (DELETE FROM {t} WHERE session IN (SELECT session FROM {t} \
             WHERE expires_ms <= $1 LIMIT $2) RETURNING 1) SELECT count(*) FROM gone",
            t = self.table
        );
        let n = self
            .shared
            .scalar(
                "user_sessions.sweep",
                &sql,
                &[&ms(now_ms), &batch.clamp(1, SWEEP_BATCH_MAX)],
            )
            .await?;
        Ok(unms(n))
    }

    fn record(row: &Row) -> Result<UserSession<A>> {
        let get_text = |i: usize| -> Result<String> {
            row.try_get::<_, String>(i)
                .map_err(|e| corrupt("column", e))
        };
        let session = SessionId::parse(&get_text(0)?)
            .ok_or_else(|| corrupt("session id", "not 32 hex characters"))?;
        let device: Device =
            serde_json::from_str(&get_text(7)?).map_err(|e| corrupt("device", e))?;
        let app: A = serde_json::from_str(&get_text(8)?).map_err(|e| corrupt("app", e))?;
        let int = |i: usize| -> Result<u64> {
            row.try_get::<_, i64>(i)
                .map(unms)
                .map_err(|e| corrupt("column", e))
        };
        let opt = |i: usize| -> Result<Option<String>> {
            row.try_get::<_, Option<String>>(i)
                .map_err(|e| corrupt("column", e))
        };
        Ok(UserSession {
            session,
            user: get_text(1)?,
            created_ms: int(2)?,
            last_seen_ms: int(3)?,
            expires_ms: int(4)?,
            ip: opt(5)?,
            user_agent: opt(6)?,
            device,
            app,
        })
    }
}

#[async_trait]
impl<A: AppFields> UserSessionRepo<A> for PostgresUserSessions<A> {
    async fn insert(&self, r: &UserSession<A>, now_ms: u64) -> Result<Vec<SessionId>> {
        let shared = &self.shared;
        let t = &self.table;
        let device = serde_json::to_string(&r.device).map_err(|e| corrupt("device", e))?;
        let app = serde_json::to_string(&r.app).map_err(|e| corrupt("app", e))?;
        let upsert = format!(
            "INSERT INTO {t} (session, user_id, created_ms, last_seen_ms, expires_ms, ip, \
             user_agent, device, app) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9::text::jsonb) \
             ON CONFLICT (session) DO UPDATE SET user_id = EXCLUDED.user_id, \
             created_ms = EXCLUDED.created_ms, last_seen_ms = EXCLUDED.last_seen_ms, \
             expires_ms = EXCLUDED.expires_ms, ip = EXCLUDED.ip, \
             user_agent = EXCLUDED.user_agent, device = EXCLUDED.device, app = EXCLUDED.app"
        );
        shared
            .query(
                "user_sessions.insert",
                &upsert,
                &[
                    &r.session.as_str(),
                    &r.user,
                    &ms(r.created_ms),
                    &ms(r.last_seen_ms),
                    &ms(r.expires_ms),
                    &r.ip,
                    &r.user_agent,
                    &device,
                    &app,
                ],
            )
            .await?;
        // Prune the user's expired rows, then evict the least recently seen past the limit.
        let prune = format!("DELETE FROM {t} WHERE user_id = $1 AND expires_ms <= $2");
        shared
            .query("user_sessions.prune", &prune, &[&r.user, &ms(now_ms)])
            .await?;
        let evict = format!(
            "DELETE FROM {t} WHERE session IN (SELECT session FROM {t} WHERE user_id = $1 \
             ORDER BY last_seen_ms DESC, session OFFSET $2) RETURNING session"
        );
        let max = i64::try_from(USER_SESSIONS_MAX).unwrap_or(i64::MAX);
        let rows = shared
            .query("user_sessions.evict", &evict, &[&r.user, &max])
            .await?;
        rows.iter()
            .map(|row| {
                row.try_get::<_, String>(0)
                    .ok()
                    .and_then(|s| SessionId::parse(&s))
                    .ok_or_else(|| corrupt("session id", "not 32 hex characters"))
            })
            .collect()
    }

    async fn get(&self, session: &SessionId, now_ms: u64) -> Result<Option<UserSession<A>>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE session = $1 AND expires_ms > $2",
            self.table
        );
        let rows = self
            .shared
            .query("user_sessions.get", &sql, &[&session.as_str(), &ms(now_ms)])
            .await?;
        rows.first().map(Self::record).transpose()
    }

    async fn list(
        &self,
        user: &str,
        now_ms: u64,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<A>> {
        let limit = limit.clamp(1, PAGE_LIMIT_MAX);
        let (after_ms, after_id) = match cursor.and_then(|c| c.split_once('.')) {
            Some((ms_text, id)) => (ms_text.parse::<i64>().unwrap_or(i64::MAX), id.to_owned()),
            None => (i64::MAX, String::new()),
        };
        let first = cursor.is_none();
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE user_id = $1 AND expires_ms > $2 \
             AND ($3 OR created_ms < $4 OR (created_ms = $4 AND session > $5)) \
             ORDER BY created_ms DESC, session LIMIT $6",
            self.table
        );
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let rows = self
            .shared
            .query(
                "user_sessions.list",
                &sql,
                &[&user, &ms(now_ms), &first, &after_ms, &after_id, &fetch],
            )
            .await?;
        let more = rows.len() > limit;
        let sessions = rows
            .iter()
            .take(limit)
            .map(Self::record)
            .collect::<Result<Vec<_>>>()?;
        let next = if more {
            sessions
                .last()
                .map(|s| format!("{}.{}", s.created_ms, s.session))
        } else {
            None
        };
        Ok(Page { sessions, next })
    }

    async fn touch(
        &self,
        user: &str,
        session: &SessionId,
        last_seen_ms: u64,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<bool> {
        let sql = format!(
            "UPDATE {} SET last_seen_ms = GREATEST(last_seen_ms, $3), \
             expires_ms = GREATEST(expires_ms, $4) \
             WHERE session = $2 AND user_id = $1 AND expires_ms > $5 RETURNING true",
            self.table
        );
        self.shared
            .acted(
                "user_sessions.touch",
                &sql,
                &[
                    &user,
                    &session.as_str(),
                    &ms(last_seen_ms),
                    &ms(expires_ms),
                    &ms(now_ms),
                ],
            )
            .await
    }

    async fn remove(&self, session: &SessionId, now_ms: u64) -> Result<Option<String>> {
        let sql = format!(
            "DELETE FROM {} WHERE session = $1 RETURNING user_id, expires_ms > $2",
            self.table
        );
        let rows = self
            .shared
            .query(
                "user_sessions.remove",
                &sql,
                &[&session.as_str(), &ms(now_ms)],
            )
            .await?;
        match rows.first() {
            Some(row) if row.try_get::<_, bool>(1).unwrap_or(false) => row
                .try_get::<_, String>(0)
                .map(Some)
                .map_err(|e| corrupt("column", e)),
            _ => Ok(None),
        }
    }

    async fn remove_user(
        &self,
        user: &str,
        keep: Option<&SessionId>,
        _now_ms: u64,
    ) -> Result<Vec<SessionId>> {
        let sql = format!(
            "DELETE FROM {} WHERE user_id = $1 AND ($2::text IS NULL OR session <> $2) \
             RETURNING session",
            self.table
        );
        let keep = keep.map(SessionId::as_str);
        let rows = self
            .shared
            .query("user_sessions.remove_user", &sql, &[&user, &keep])
            .await?;
        rows.iter()
            .map(|row| {
                row.try_get::<_, String>(0)
                    .ok()
                    .and_then(|s| SessionId::parse(&s))
                    .ok_or_else(|| corrupt("session id", "not 32 hex characters"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use keel_primitives::session::{ManualClock, SessionStore};
    use keel_primitives::user_session::{CachedRepo, ClientInfo, UserSessions};
    use keel_primitives::{Backend, Embedded};

    use super::*;

    fn server_url() -> String {
        match std::env::var("KEEL_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => url,
            _ => panic!(
                "KEEL_TEST_POSTGRES_URL is not set, so the Postgres user-session repository's \
                 tests cannot run; set it to a server you may create tables on"
            ),
        }
    }

    fn table_name(purpose: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!(
            "keel_test_{purpose}_{}_{:x}",
            std::process::id(),
            nanos as u64
        )
    }

    const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0";

    async fn repo(purpose: &str) -> (PostgresUserSessions<String>, Arc<PostgresBackend>, String) {
        let backend = Arc::new(PostgresBackend::connect(&server_url()).await.unwrap());
        backend.ensure_schema().await.unwrap();
        let table = table_name(purpose);
        let repo = PostgresUserSessions::with_table(&backend, &table).unwrap();
        repo.ensure_schema().await.unwrap();
        repo.ensure_schema().await.unwrap();
        (repo, backend, table)
    }

    async fn drop_table(backend: &PostgresBackend, table: &str) {
        backend
            .shared
            .query("test", &format!("DROP TABLE IF EXISTS \"{table}\""), &[])
            .await
            .unwrap();
    }

    fn record(user: &str, i: u64, now: u64) -> UserSession<String> {
        UserSession {
            session: SessionId::parse(&format!("{:032x}", i + 1)).unwrap(),
            user: user.into(),
            created_ms: now + i / 2,
            last_seen_ms: now + i,
            expires_ms: now + 3_600_000,
            ip: Some("192.0.2.1".into()),
            user_agent: Some(FIREFOX.into()),
            device: Device::from_user_agent(FIREFOX),
            app: format!("app {i}"),
        }
    }

    #[tokio::test]
    async fn logins_list_revoke_and_end_cookie_sessions_on_a_real_table() {
        let (repo, backend, table) = repo("us_login").await;
        let kv: Arc<dyn Backend> = backend.clone();
        let store = SessionStore::builder(Arc::new(keel_primitives::Namespaced::new(
            kv,
            format!("{table}:").into_bytes(),
        )))
        .build()
        .unwrap();
        let users = UserSessions::new(repo, store.clone());
        let mut sessions = Vec::new();
        for n in 0..3 {
            let s = store.open(None);
            let r = users
                .login(
                    &s,
                    "alice",
                    b"v1",
                    ClientInfo::new(Some("203.0.113.9".into()), Some(FIREFOX.into())),
                    format!("device {n}"),
                )
                .await
                .unwrap();
            assert_eq!(r.device.browser, "Firefox");
            sessions.push((
                s.save().await.unwrap().token().unwrap().to_owned(),
                r.session,
            ));
        }
        let page = users.list_active("alice", None, 10).await.unwrap();
        assert_eq!(page.sessions.len(), 3);
        assert_eq!(page.sessions[0].app, "device 2", "newest first");
        assert_eq!(page.sessions[0].ip.as_deref(), Some("203.0.113.9"));

        // Revoking ends the cookie session at once, and is idempotent.
        let (token0, id0) = &sessions[0];
        assert!(users.revoke(id0).await.unwrap());
        assert!(!users.revoke(id0).await.unwrap());
        assert_eq!(store.open(Some(token0)).auth_user().await.unwrap(), None);
        let (token2, id2) = &sessions[2];
        let ended = users.revoke_all_except("alice", id2).await.unwrap();
        assert_eq!(ended, vec![sessions[1].1.clone()]);
        assert_eq!(
            store.open(Some(&sessions[1].0)).auth_user().await.unwrap(),
            None
        );
        assert_eq!(
            store.open(Some(token2)).auth_user().await.unwrap(),
            Some("alice".into())
        );
        assert_eq!(users.revoke_all("alice").await.unwrap(), vec![id2.clone()]);
        assert!(users.revoke_all("alice").await.unwrap().is_empty());
        drop_table(&backend, &table).await;
    }

    #[tokio::test]
    async fn a_user_with_thousands_of_logins_pages_with_keyset_queries() {
        let (repo, backend, table) = repo("us_pages").await;
        let now = 1_000_000;
        const N: u64 = 1_500;
        for i in 0..N {
            repo.insert(&record("many", i, now), now).await.unwrap();
        }
        repo.insert(&record("other", N + 1, now), now)
            .await
            .unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let mut cursor = None;
        let mut last: Option<(u64, SessionId)> = None;
        loop {
            let page = repo
                .list("many", now, cursor.as_deref(), 400)
                .await
                .unwrap();
            for s in page.sessions {
                if let Some((ms, id)) = &last {
                    assert!(
                        s.created_ms < *ms || (s.created_ms == *ms && s.session > *id),
                        "out of order"
                    );
                }
                last = Some((s.created_ms, s.session.clone()));
                assert!(seen.insert(s.session));
            }
            match page.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(seen.len() as u64, N);
        drop_table(&backend, &table).await;
    }

    #[tokio::test]
    async fn expired_logins_are_invisible_and_pruned() {
        let (repo, backend, table) = repo("us_expiry").await;
        let now = 5_000_000;
        let mut old = record("bob", 1, now);
        old.expires_ms = now + 10;
        repo.insert(&old, now).await.unwrap();
        repo.insert(&record("bob", 2, now), now).await.unwrap();
        assert!(repo.get(&old.session, now).await.unwrap().is_some());
        let later = now + 11;
        assert!(repo.get(&old.session, later).await.unwrap().is_none());
        assert_eq!(
            repo.list("bob", later, None, 10)
                .await
                .unwrap()
                .sessions
                .len(),
            1
        );
        assert!(
            repo.touch("bob", &old.session, later, later + 100, later)
                .await
                .unwrap()
                .eq(&false)
        );
        repo.insert(&record("bob", 3, later), later).await.unwrap();
        assert_eq!(repo.remove(&old.session, later).await.unwrap(), None);
        let mut stale = record("carol", 4, now);
        stale.expires_ms = now + 1;
        repo.insert(&stale, now).await.unwrap();
        assert_eq!(repo.sweep(later, 100).await.unwrap(), 1);
        drop_table(&backend, &table).await;
    }

    #[tokio::test]
    async fn the_cache_aside_wrapper_serves_pages_and_sees_revocations() {
        let (repo, backend, table) = repo("us_cache").await;
        let clock = ManualClock::new(2_000_000);
        let store = SessionStore::builder(Arc::new(Embedded::memory()))
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let cached = CachedRepo::new(repo, Arc::new(Embedded::memory()), Duration::from_secs(60));
        let users = UserSessions::new(cached, store.clone());
        let s = store.open(None);
        let r = users
            .login(&s, "dora", b"v1", ClientInfo::default(), "a".to_owned())
            .await
            .unwrap();
        assert_eq!(
            users
                .list_active("dora", None, 10)
                .await
                .unwrap()
                .sessions
                .len(),
            1
        );
        // Remove the row behind the cache's back: the cached page still answers...
        backend
            .shared
            .query(
                "test",
                &format!("DELETE FROM \"{table}\" WHERE user_id = 'dora'"),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            users
                .list_active("dora", None, 10)
                .await
                .unwrap()
                .sessions
                .len(),
            1
        );
        // ...until a write through the wrapper invalidates the user's pages.
        let s2 = store.open(None);
        let r2 = users
            .login(&s2, "dora", b"v1", ClientInfo::default(), "b".to_owned())
            .await
            .unwrap();
        let page = users.list_active("dora", None, 10).await.unwrap();
        assert_eq!(
            page.sessions.iter().map(|s| &s.session).collect::<Vec<_>>(),
            vec![&r2.session]
        );
        assert!(r.session != r2.session);
        users.revoke(&r2.session).await.unwrap();
        assert!(
            users
                .list_active("dora", None, 10)
                .await
                .unwrap()
                .sessions
                .is_empty()
        );
        assert!(
            users
                .repo()
                .get(&r2.session, 2_000_000)
                .await
                .unwrap()
                .is_none()
        );
        drop_table(&backend, &table).await;
    }
}
