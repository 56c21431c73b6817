//! User/device sessions on every backend: logins through a real axum server and real HTTP
//! clients with cookie stores, listed and revoked through [`UserSessions`] on the backend's
//! repository (and through the cache-aside wrapper). Pruning runs on a manual clock.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};

use super::http_support::{Counting, client, serve};
use super::session::{cookie_client, layer, store, text};
use super::*;
use crate::session::{Clock, ManualClock, Session, SessionId, SessionStore};
use crate::user_session::{
    BackendRepo, CachedRepo, ClientInfo, PAGE_LIMIT_MAX, UserSession, UserSessionRepo, UserSessions,
};

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(user_session_login_lists_devices_with_parsed_agents),
        case!(user_session_revoke_ends_the_cookie_session_at_once),
        case!(user_session_revoke_all_except_keeps_the_current_device),
        case!(user_session_revocation_is_idempotent),
        case!(user_session_auth_hash_change_logs_out_every_device),
        case!(user_session_thousands_list_in_one_round_trip_per_page),
        case!(user_session_concurrent_logins_from_two_servers_are_all_listed),
        case!(user_session_expired_logins_are_pruned),
        case!(user_session_cache_aside_sees_revocations),
    ]
}

const FIREFOX: &str = "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0";
const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";

/// Application fields on each login.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Label {
    method: String,
}

type Repo = Arc<dyn UserSessionRepo<Label>>;

#[derive(Clone)]
struct App {
    users: Arc<UserSessions<Label, Repo>>,
    /// Each user's current credential version (bumped by a password reset).
    credential: Arc<std::sync::Mutex<String>>,
}

#[async_trait::async_trait]
impl<A: crate::user_session::AppFields> UserSessionRepo<A> for Arc<dyn UserSessionRepo<A>> {
    async fn insert(&self, r: &UserSession<A>, now: u64) -> crate::Result<Vec<SessionId>> {
        (**self).insert(r, now).await
    }
    async fn get(&self, s: &SessionId, now: u64) -> crate::Result<Option<UserSession<A>>> {
        (**self).get(s, now).await
    }
    async fn list(
        &self,
        user: &str,
        now: u64,
        cursor: Option<&str>,
        limit: usize,
    ) -> crate::Result<crate::user_session::Page<A>> {
        (**self).list(user, now, cursor, limit).await
    }
    async fn touch(
        &self,
        user: &str,
        s: &SessionId,
        seen: u64,
        expires: u64,
        now: u64,
    ) -> crate::Result<bool> {
        (**self).touch(user, s, seen, expires, now).await
    }
    async fn remove(&self, s: &SessionId, now: u64) -> crate::Result<Option<String>> {
        (**self).remove(s, now).await
    }
    async fn remove_user(
        &self,
        user: &str,
        keep: Option<&SessionId>,
        now: u64,
    ) -> crate::Result<Vec<SessionId>> {
        (**self).remove_user(user, keep, now).await
    }
}

/// The signed-in user, if the session's auth hash still matches the credential version.
async fn current_user(app: &App, s: &Session) -> Option<String> {
    let credential = app.credential.lock().unwrap().clone();
    if !s.verify_auth(credential.as_bytes()).await.ok()? {
        return None;
    }
    let user = s.auth_user().await.ok()??;
    app.users.seen(s).await.ok()?;
    Some(user)
}

fn routes(app: App, layer: crate::session::SessionLayer) -> Router {
    Router::new()
        .route(
            "/login/{user}",
            post(
                |State(app): State<App>, s: Session, Path(user): Path<String>, h: HeaderMap| async move {
                    let ua = h
                        .get("user-agent")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let credential = app.credential.lock().unwrap().clone();
                    let label = Label {
                        method: "password".into(),
                    };
                    match app
                        .users
                        .login(
                            &s,
                            &user,
                            credential.as_bytes(),
                            ClientInfo::new(Some("127.0.0.1".into()), ua),
                            label,
                        )
                        .await
                    {
                        Ok(r) => (StatusCode::OK, r.session.to_string()),
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    }
                },
            ),
        )
        .route(
            "/me",
            get(|State(app): State<App>, s: Session| async move {
                current_user(&app, &s)
                    .await
                    .unwrap_or_else(|| "anonymous".into())
            }),
        )
        .route(
            "/sign-out-others",
            post(|State(app): State<App>, s: Session| async move {
                let Some(user) = current_user(&app, &s).await else {
                    return (StatusCode::UNAUTHORIZED, "anonymous".to_owned());
                };
                let me = s.id().await.unwrap().unwrap();
                let ended = app.users.revoke_all_except(&user, &me).await.unwrap();
                (StatusCode::OK, ended.len().to_string())
            }),
        )
        .layer(layer)
        .with_state(app)
}

struct Fixture {
    users: Arc<UserSessions<Label, Repo>>,
    credential: Arc<std::sync::Mutex<String>>,
    server: super::http_support::Server,
}

async fn fixture_with(store: SessionStore, repo: Repo) -> Fixture {
    let users = Arc::new(UserSessions::new(repo, store.clone()));
    let credential = Arc::new(std::sync::Mutex::new("v1".to_owned()));
    let app = App {
        users: users.clone(),
        credential: credential.clone(),
    };
    let server = serve(routes(app, layer(store).build().unwrap())).await;
    Fixture {
        users,
        credential,
        server,
    }
}

async fn fixture(c: &Ctx) -> Fixture {
    let backend = confined(c);
    let repo: Repo = Arc::new(BackendRepo::<Label>::new(backend.clone()));
    fixture_with(store(backend).build().unwrap(), repo).await
}

/// A device: its own cookie store, logged in as `user` with `agent`.
async fn device(f: &Fixture, user: &str, agent: &str) -> (reqwest::Client, String) {
    let http = cookie_client();
    let (s, id) = text(
        http.post(f.server.url(&format!("/login/{user}")))
            .header("user-agent", agent)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{id}");
    (http, id)
}

async fn me(f: &Fixture, http: &reqwest::Client) -> String {
    text(http.get(f.server.url("/me")).send().await.unwrap())
        .await
        .1
}

async fn user_session_login_lists_devices_with_parsed_agents(c: Ctx) {
    let f = fixture(&c).await;
    let (laptop, laptop_id) = device(&f, "alice", FIREFOX).await;
    let (_phone, phone_id) = device(&f, "alice", IPHONE).await;
    device(&f, "bob", FIREFOX).await;
    assert_eq!(me(&f, &laptop).await, "alice");
    let page = f.users.list_active("alice", None, 50).await.unwrap();
    assert_eq!(page.next, None);
    assert_eq!(page.sessions.len(), 2);
    let by_id = |id: &str| {
        page.sessions
            .iter()
            .find(|s| s.session.as_str() == id)
            .unwrap()
            .clone()
    };
    let l = by_id(&laptop_id);
    assert_eq!(
        (l.device.browser.as_str(), l.device.category.as_str()),
        ("Firefox", "pc")
    );
    assert_eq!(l.user_agent.as_deref(), Some(FIREFOX));
    assert_eq!(l.ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(l.app.method, "password");
    assert!(l.created_ms <= l.last_seen_ms && l.last_seen_ms < l.expires_ms);
    let p = by_id(&phone_id);
    assert_eq!(
        (p.device.browser.as_str(), p.device.category.as_str()),
        ("Safari", "smartphone")
    );
    assert_eq!(
        f.users
            .list_active("bob", None, 50)
            .await
            .unwrap()
            .sessions
            .len(),
        1
    );
    assert_eq!(
        f.users
            .repo()
            .get(&l.session, 0)
            .await
            .unwrap()
            .map(|s| s.user),
        Some("alice".into())
    );
    // Logging in again on the laptop replaces its login record (the old id is dead).
    let (s, relogin) = text(
        laptop
            .post(f.server.url("/login/alice"))
            .header("user-agent", FIREFOX)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 200, "{relogin}");
    assert_ne!(relogin, laptop_id);
    let page = f.users.list_active("alice", None, 50).await.unwrap();
    assert_eq!(page.sessions.len(), 2);
    assert!(page.sessions.iter().any(|s| s.session.as_str() == relogin));
    assert_eq!(me(&f, &laptop).await, "alice");
}

async fn user_session_revoke_ends_the_cookie_session_at_once(c: Ctx) {
    let f = fixture(&c).await;
    let (laptop, laptop_id) = device(&f, "alice", FIREFOX).await;
    let (phone, _) = device(&f, "alice", IPHONE).await;
    assert_eq!(me(&f, &laptop).await, "alice");
    let id = SessionId::parse(&laptop_id).unwrap();
    assert!(f.users.revoke(&id).await.unwrap());
    assert_eq!(me(&f, &laptop).await, "anonymous");
    assert_eq!(me(&f, &phone).await, "alice");
    let page = f.users.list_active("alice", None, 50).await.unwrap();
    assert_eq!(page.sessions.len(), 1);
    assert!(page.sessions.iter().all(|s| s.session != id));
}

async fn user_session_revoke_all_except_keeps_the_current_device(c: Ctx) {
    let f = fixture(&c).await;
    let (laptop, laptop_id) = device(&f, "alice", FIREFOX).await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(device(&f, "alice", IPHONE).await.0);
    }
    let (bob, _) = device(&f, "bob", FIREFOX).await;
    let r = laptop
        .post(f.server.url("/sign-out-others"))
        .send()
        .await
        .unwrap();
    assert_eq!(text(r).await, (200, "3".into()));
    assert_eq!(me(&f, &laptop).await, "alice");
    for other in &others {
        assert_eq!(me(&f, other).await, "anonymous");
    }
    assert_eq!(me(&f, &bob).await, "bob");
    let page = f.users.list_active("alice", None, 50).await.unwrap();
    assert_eq!(
        page.sessions
            .iter()
            .map(|s| s.session.to_string())
            .collect::<Vec<_>>(),
        vec![laptop_id]
    );
    let ended = f.users.revoke_all("alice").await.unwrap();
    assert_eq!(ended.len(), 1);
    assert_eq!(me(&f, &laptop).await, "anonymous");
    assert!(
        f.users
            .list_active("alice", None, 50)
            .await
            .unwrap()
            .sessions
            .is_empty()
    );
}

async fn user_session_revocation_is_idempotent(c: Ctx) {
    let f = fixture(&c).await;
    let (laptop, laptop_id) = device(&f, "alice", FIREFOX).await;
    let id = SessionId::parse(&laptop_id).unwrap();
    assert!(f.users.revoke(&id).await.unwrap());
    assert!(!f.users.revoke(&id).await.unwrap());
    assert!(f.users.revoke_all("alice").await.unwrap().is_empty());
    assert!(f.users.revoke_all("nobody").await.unwrap().is_empty());
    let unknown = SessionId::parse(&"0".repeat(32)).unwrap();
    assert!(!f.users.revoke(&unknown).await.unwrap());
    assert_eq!(me(&f, &laptop).await, "anonymous");
}

async fn user_session_auth_hash_change_logs_out_every_device(c: Ctx) {
    let f = fixture(&c).await;
    let (laptop, _) = device(&f, "alice", FIREFOX).await;
    let (phone, _) = device(&f, "alice", IPHONE).await;
    assert_eq!(me(&f, &laptop).await, "alice");
    assert_eq!(me(&f, &phone).await, "alice");
    // A password reset.
    *f.credential.lock().unwrap() = "v2".into();
    assert_eq!(me(&f, &laptop).await, "anonymous");
    assert_eq!(me(&f, &phone).await, "anonymous");
    // Logging in again with the new credential works.
    let (again, _) = device(&f, "alice", FIREFOX).await;
    assert_eq!(me(&f, &again).await, "alice");
    assert_eq!(me(&f, &laptop).await, "anonymous");
}

fn record(user: &str, i: u64, now: u64) -> UserSession<Label> {
    UserSession {
        session: SessionId::parse(&format!("{:032x}", i + 1)).unwrap(),
        user: user.into(),
        created_ms: now + i,
        last_seen_ms: now + i,
        expires_ms: now + 3_600_000,
        ip: None,
        user_agent: None,
        device: crate::user_session::Device::from_user_agent(FIREFOX),
        app: Label {
            method: format!("m{i}"),
        },
    }
}

async fn user_session_thousands_list_in_one_round_trip_per_page(c: Ctx) {
    let counting = Counting::new(confined(&c));
    let repo = BackendRepo::<Label>::new(counting.clone());
    let now = c.b.now_ms().await.unwrap();
    const N: u64 = 2_500;
    let records: Vec<_> = (0..N).map(|i| record("many", i, now)).collect();
    repo.import(&records, now).await.unwrap();
    // One more through the ordinary path: the index stays one key.
    repo.insert(&record("many", N, now), now).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let before = counting.total();
        let page = repo
            .list("many", now, cursor.as_deref(), PAGE_LIMIT_MAX)
            .await
            .unwrap();
        assert_eq!(counting.total(), before + 1, "{}", counting.calls());
        pages += 1;
        for s in page.sessions {
            assert!(seen.insert(s.session), "a session listed twice");
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!(seen.len() as u64, N + 1);
    assert_eq!(pages, (N + 1).div_ceil(PAGE_LIMIT_MAX as u64));
}

async fn user_session_concurrent_logins_from_two_servers_are_all_listed(c: Ctx) {
    let backend = confined(&c);
    let a = fixture_with(
        store(backend.clone()).build().unwrap(),
        Arc::new(BackendRepo::<Label>::new(backend.clone())),
    )
    .await;
    let b = fixture_with(
        store(backend.clone()).build().unwrap(),
        Arc::new(BackendRepo::<Label>::new(backend.clone())),
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let url = if i % 2 == 0 {
            a.server.url("/login/carol")
        } else {
            b.server.url("/login/carol")
        };
        tasks.push(tokio::spawn(async move {
            text(
                client()
                    .post(url)
                    .header("user-agent", FIREFOX)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let (s, id) = t.await.unwrap();
        assert_eq!(s, 200, "{id}");
        ids.insert(id);
    }
    let listed: std::collections::BTreeSet<String> = a
        .users
        .list_active("carol", None, 100)
        .await
        .unwrap()
        .sessions
        .into_iter()
        .map(|s| s.session.to_string())
        .collect();
    assert_eq!(listed, ids);
    // And concurrent revocations from both servers leave nothing behind.
    let ids: Vec<_> = ids.iter().map(|i| SessionId::parse(i).unwrap()).collect();
    let mut tasks = Vec::new();
    for (n, id) in ids.into_iter().enumerate() {
        let users = if n % 2 == 0 {
            a.users.clone()
        } else {
            b.users.clone()
        };
        tasks.push(tokio::spawn(
            async move { users.revoke(&id).await.unwrap() },
        ));
    }
    for t in tasks {
        assert!(t.await.unwrap());
    }
    assert!(
        b.users
            .list_active("carol", None, 100)
            .await
            .unwrap()
            .sessions
            .is_empty()
    );
}

async fn user_session_expired_logins_are_pruned(c: Ctx) {
    let backend = confined(&c);
    let clock = ManualClock::new(c.b.now_ms().await.unwrap());
    let store = SessionStore::builder(backend.clone())
        .idle_timeout(Duration::from_secs(600))
        .absolute_lifetime(Duration::from_secs(3600))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let repo = BackendRepo::<Label>::new(backend.clone());
    let users = UserSessions::new(repo, store.clone()).seen_interval(Duration::from_secs(60));
    let login = |client: &'static str| {
        let users = &users;
        let store = &store;
        async move {
            let s = store.open(None);
            users
                .login(
                    &s,
                    "dave",
                    b"v1",
                    ClientInfo::new(None, Some(client.into())),
                    Label { method: "m".into() },
                )
                .await
                .unwrap();
            s
        }
    };
    login(FIREFOX).await;
    clock.advance(Duration::from_secs(400));
    let fresh = login(IPHONE).await;
    clock.advance(Duration::from_secs(300));
    // 700 s after the first login (idle 600 s) and 300 s after the second.
    let page = users.list_active("dave", None, 10).await.unwrap();
    assert_eq!(page.sessions.len(), 1);
    assert_eq!(page.sessions[0].device.browser, "Safari");
    // Activity moves last-seen (at most once per interval) and the expiry with it.
    users.seen(&fresh).await.unwrap();
    let page = users.list_active("dave", None, 10).await.unwrap();
    assert_eq!(page.sessions[0].last_seen_ms, clock.now_ms());
    clock.advance(Duration::from_secs(500));
    assert_eq!(
        users
            .list_active("dave", None, 10)
            .await
            .unwrap()
            .sessions
            .len(),
        1
    );
    // A write prunes what expired: the index holds only the live logins.
    login(FIREFOX).await;
    let raw = {
        let mut total = 0;
        let mut cursor = None;
        loop {
            let page = backend
                .scan(b"keel:user_session:u:", cursor.as_ref(), 100)
                .await
                .unwrap();
            for k in page.keys {
                let v = backend.get(&k).await.unwrap().unwrap();
                let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
                total += v["sessions"].as_array().unwrap().len();
            }
            match page.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        total
    };
    assert_eq!(raw, 2, "the expired login was pruned from the index");
}

async fn user_session_cache_aside_sees_revocations(c: Ctx) {
    let backend = confined(&c);
    let counting = Counting::new(backend.clone());
    let inner = BackendRepo::<Label>::new(counting.clone());
    let cache: Arc<dyn Backend> = Arc::new(Namespaced::new(backend.clone(), b"cache:".to_vec()));
    let repo: Repo = Arc::new(CachedRepo::new(inner, cache, Duration::from_secs(60)));
    let f = fixture_with(store(backend).build().unwrap(), repo).await;
    let (laptop, laptop_id) = device(&f, "erin", FIREFOX).await;
    device(&f, "erin", IPHONE).await;
    assert_eq!(
        f.users
            .list_active("erin", None, 10)
            .await
            .unwrap()
            .sessions
            .len(),
        2
    );
    let before = counting.total();
    for _ in 0..5 {
        assert_eq!(
            f.users
                .list_active("erin", None, 10)
                .await
                .unwrap()
                .sessions
                .len(),
            2
        );
    }
    assert_eq!(
        counting.total(),
        before,
        "cached pages do not reach the repository"
    );
    f.users
        .revoke(&SessionId::parse(&laptop_id).unwrap())
        .await
        .unwrap();
    assert_eq!(
        f.users
            .list_active("erin", None, 10)
            .await
            .unwrap()
            .sessions
            .len(),
        1
    );
    assert_eq!(me(&f, &laptop).await, "anonymous");
}
