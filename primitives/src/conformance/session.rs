//! Cookie sessions in a real axum server, driven by a real HTTP client with a cookie store, on
//! every backend. Concurrency is arranged with `Notify`s inside the handler; the absolute
//! lifetime runs on a manual clock; only the idle timeout and the touch interval, which the
//! backend's own TTL enforces, let short real TTLs elapse.

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio::sync::Notify;

use super::http_support::{Counting, client, header, serve};
use super::*;
use crate::session::{
    CookieMode, ManualClock, Session, SessionError, SessionLayer, SessionLayerBuilder,
    SessionStore, SessionStoreBuilder,
};

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(session_round_trip_sets_safe_cookie_attributes),
        case!(session_tampered_truncated_or_foreign_cookies_start_fresh),
        case!(session_rotated_key_verifies_and_is_reissued_with_the_current_key),
        case!(session_private_cookies_round_trip_and_hide_the_token),
        case!(session_cycle_id_kills_the_pre_login_id),
        case!(session_idle_timeout_ends_an_unused_session),
        case!(session_touch_extends_idle_at_most_once_per_interval),
        case!(session_absolute_lifetime_ends_an_active_session),
        case!(session_untouched_request_costs_no_backend_call),
        case!(session_flush_deletes_the_record_and_expires_the_cookie),
        case!(session_oversize_is_refused_and_nothing_is_written),
        case!(session_concurrent_saves_from_two_servers_merge_distinct_fields),
        case!(session_concurrent_saves_of_one_field_report_a_conflict),
        case!(session_save_after_a_concurrent_logout_is_not_resurrected),
    ]
}

pub(super) const KEY_1: &[u8] = b"conformance key one: 32+ bytes of test secret";
pub(super) const KEY_2: &[u8] = b"conformance key two: 32+ bytes of test secret";

/// Gates for a handler that loads the session, then waits.
#[derive(Clone, Default)]
pub(super) struct Gate {
    pub entered: Arc<Notify>,
    pub proceed: Arc<Notify>,
}

pub(super) fn store(backend: Arc<dyn Backend>) -> SessionStoreBuilder {
    SessionStore::builder(backend)
        .idle_timeout(Duration::from_secs(600))
        .absolute_lifetime(Duration::from_secs(3600))
}

pub(super) fn layer(store: SessionStore) -> SessionLayerBuilder {
    // Plain HTTP on loopback: the test client would never send a `Secure` cookie back.
    SessionLayer::builder(store).key(KEY_1).secure(false)
}

fn show(r: Result<Option<serde_json::Value>, SessionError>) -> (StatusCode, String) {
    match r {
        Ok(Some(v)) => (StatusCode::OK, v.to_string()),
        Ok(None) => (StatusCode::OK, "none".to_owned()),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn saved(r: Result<crate::session::Saved, SessionError>) -> (StatusCode, String) {
    match r {
        Ok(_) => (StatusCode::OK, "saved".to_owned()),
        Err(SessionError::Conflict { fields }) => {
            (StatusCode::CONFLICT, format!("conflict {fields:?}"))
        }
        Err(SessionError::Ended) => (StatusCode::CONFLICT, "ended".to_owned()),
        Err(SessionError::TooLarge { .. }) => {
            (StatusCode::PAYLOAD_TOO_LARGE, "too large".to_owned())
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) fn app(layer: SessionLayer, gate: Gate) -> Router {
    Router::new()
        .route(
            "/get/{field}",
            get(|s: Session, Path(f): Path<String>| async move {
                show(s.get::<serde_json::Value>(&f).await)
            }),
        )
        .route(
            "/set/{field}/{value}",
            post(
                |s: Session, Path((f, v)): Path<(String, String)>| async move {
                    match s.insert(&f, v).await {
                        Ok(()) => (StatusCode::OK, "ok".to_owned()),
                        Err(SessionError::TooLarge { .. }) => {
                            (StatusCode::PAYLOAD_TOO_LARGE, "too large".to_owned())
                        }
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                    }
                },
            ),
        )
        .route(
            "/id",
            get(|s: Session| async move {
                match s.id().await {
                    Ok(Some(id)) => id.to_string(),
                    Ok(None) => "none".to_owned(),
                    Err(e) => e.to_string(),
                }
            }),
        )
        .route(
            "/cycle",
            post(|s: Session| async move {
                s.cycle_id().await.unwrap();
                "cycled"
            }),
        )
        .route(
            "/logout",
            post(|s: Session| async move {
                s.flush().await;
                "bye"
            }),
        )
        .route("/noop", get(|| async { "ok" }))
        .route(
            "/gated/{field}/{value}",
            post(
                move |s: Session, Path((f, v)): Path<(String, String)>| async move {
                    let _ = s.get::<serde_json::Value>(&f).await;
                    gate.entered.notify_one();
                    gate.proceed.notified().await;
                    if let Err(e) = s.insert(&f, v).await {
                        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                    }
                    saved(s.save().await)
                },
            ),
        )
        .layer(layer)
}

pub(super) fn cookie_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .cookie_store(true)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub(super) async fn text(r: reqwest::Response) -> (u16, String) {
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The `name=value` pair of a `Set-Cookie` header.
pub(super) fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

/// Sets `field=value` with a plain client and returns the cookie pair it got.
pub(super) async fn start(server_url: &str) -> String {
    let r = client().post(server_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    pair(&header(&r, "set-cookie").expect("a cookie is issued on the first write"))
}

async fn get_with(url: &str, cookie: &str) -> (u16, String, Option<String>) {
    let r = client()
        .get(url)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let set = header(&r, "set-cookie");
    let (s, t) = text(r).await;
    (s, t, set)
}

async fn session_round_trip_sets_safe_cookie_attributes(c: Ctx) {
    let store = store(confined(&c)).build().unwrap();
    // The defaults, as a production deployment gets them.
    let strict = serve(app(
        SessionLayer::builder(store.clone())
            .key(KEY_1)
            .build()
            .unwrap(),
        Gate::default(),
    ))
    .await;
    let r = client().post(strict.url("/set/a/1")).send().await.unwrap();
    let set = header(&r, "set-cookie").unwrap();
    assert!(set.starts_with("__Host-keel_session="), "{set}");
    for attr in [
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
        "Path=/",
        "Max-Age=600",
    ] {
        assert!(set.contains(attr), "{attr} missing in {set}");
    }
    assert!(!set.contains("Domain"), "{set}");

    let server = serve(app(layer(store).build().unwrap(), Gate::default())).await;
    let http = cookie_client();
    assert_eq!(
        text(http.get(server.url("/get/a")).send().await.unwrap()).await,
        (200, "none".into())
    );
    let r = http.post(server.url("/set/a/1")).send().await.unwrap();
    let set = header(&r, "set-cookie").unwrap();
    assert!(set.starts_with("keel_session="), "{set}");
    assert!(!set.contains("Secure"), "{set}");
    assert_eq!(
        text(http.get(server.url("/get/a")).send().await.unwrap()).await,
        (200, "\"1\"".into())
    );
    // An unmodified read within the touch interval sends no cookie.
    let r = http.get(server.url("/get/a")).send().await.unwrap();
    assert_eq!(header(&r, "set-cookie"), None);
}

async fn session_tampered_truncated_or_foreign_cookies_start_fresh(c: Ctx) {
    let store = store(confined(&c)).build().unwrap();
    let server = serve(app(layer(store).build().unwrap(), Gate::default())).await;
    let good = start(&server.url("/set/a/secret")).await;
    let (name, value) = good.split_once('=').unwrap();
    let (s, t, _) = get_with(&server.url("/get/a"), &good).await;
    assert_eq!((s, t.as_str()), (200, "\"secret\""));

    let mut flipped = value.as_bytes().to_vec();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let foreign = {
        let other = SessionStore::builder(confined(&c)).build().unwrap();
        let other = serve(app(
            SessionLayer::builder(other)
                .key(b"an attacker's own key, 32+ bytes long!!")
                .secure(false)
                .build()
                .unwrap(),
            Gate::default(),
        ))
        .await;
        start(&other.url("/set/a/forged")).await
    };
    let bad = [
        format!("{name}={}", String::from_utf8(flipped).unwrap()),
        format!("{name}={}", &value[..value.len() / 2]),
        format!("{name}={}", &value[..value.len() - 1]),
        format!("{name}="),
        format!("{name}=not-base64-!!!"),
        format!("{name}={}", &value[value.len() - 43..]),
        foreign,
    ];
    for cookie in bad {
        let (s, t, set) = get_with(&server.url("/get/a"), &cookie).await;
        assert_eq!((s, t.as_str()), (200, "none"), "cookie {cookie}");
        // The bad cookie is cleared.
        let set = set.expect("a bad cookie is cleared");
        assert!(set.contains("Max-Age=0"), "{set}");
    }
    // Raw bytes that are not even a cookie header.
    let r = client()
        .get(server.url("/get/a"))
        .header(
            "cookie",
            reqwest::header::HeaderValue::from_bytes(b"\xff\xfe=\xfa").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(text(r).await, (200, "none".into()));
    // And the good one still works.
    let (s, t, _) = get_with(&server.url("/get/a"), &good).await;
    assert_eq!((s, t.as_str()), (200, "\"secret\""));
}

async fn session_rotated_key_verifies_and_is_reissued_with_the_current_key(c: Ctx) {
    let backend = confined(&c);
    let old = serve(app(
        layer(store(backend.clone()).build().unwrap())
            .build()
            .unwrap(),
        Gate::default(),
    ))
    .await;
    let cookie = start(&old.url("/set/a/kept")).await;
    let rotated = serve(app(
        SessionLayer::builder(store(backend.clone()).build().unwrap())
            .keys([KEY_2, KEY_1])
            .secure(false)
            .build()
            .unwrap(),
        Gate::default(),
    ))
    .await;
    let (s, t, set) = get_with(&rotated.url("/get/a"), &cookie).await;
    assert_eq!((s, t.as_str()), (200, "\"kept\""));
    let reissued = pair(&set.expect("a cookie signed with a retired key is re-issued"));
    assert_ne!(reissued, cookie);
    // The re-issued cookie verifies with the new key alone.
    let new_only = serve(app(
        SessionLayer::builder(store(backend).build().unwrap())
            .key(KEY_2)
            .secure(false)
            .build()
            .unwrap(),
        Gate::default(),
    ))
    .await;
    let (s, t, _) = get_with(&new_only.url("/get/a"), &reissued).await;
    assert_eq!((s, t.as_str()), (200, "\"kept\""));
    // Once the old key is retired for good, its cookies are worthless.
    let (s, t, _) = get_with(&new_only.url("/get/a"), &cookie).await;
    assert_eq!((s, t.as_str()), (200, "none"));
}

async fn session_private_cookies_round_trip_and_hide_the_token(c: Ctx) {
    let backend = confined(&c);
    let private = serve(app(
        layer(store(backend.clone()).build().unwrap())
            .mode(CookieMode::Private)
            .build()
            .unwrap(),
        Gate::default(),
    ))
    .await;
    let http = cookie_client();
    http.post(private.url("/set/a/hidden"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        text(http.get(private.url("/get/a")).send().await.unwrap()).await,
        (200, "\"hidden\"".into())
    );
    // A signed cookie (which shows its token) is not accepted by a private layer.
    let signed = serve(app(
        layer(store(backend).build().unwrap()).build().unwrap(),
        Gate::default(),
    ))
    .await;
    let cookie = start(&signed.url("/set/a/signed")).await;
    let token = cookie.split_once('=').unwrap().1;
    let (s, t, _) = get_with(&private.url("/get/a"), &cookie).await;
    assert_eq!((s, t.as_str()), (200, "none"));
    // And a private cookie does not carry its token in the clear.
    let r = client().post(private.url("/set/b/x")).send().await.unwrap();
    let p = pair(&header(&r, "set-cookie").unwrap());
    assert!(!p.contains(&token[token.len() - 43..]));
}

async fn session_cycle_id_kills_the_pre_login_id(c: Ctx) {
    let store = store(confined(&c)).build().unwrap();
    let server = serve(app(layer(store).build().unwrap(), Gate::default())).await;
    let before = start(&server.url("/set/cart/apple")).await;
    let (_, id_before, _) = get_with(&server.url("/id"), &before).await;
    let r = client()
        .post(server.url("/cycle"))
        .header("cookie", &before)
        .send()
        .await
        .unwrap();
    let after = pair(&header(&r, "set-cookie").expect("a new cookie at login"));
    assert_ne!(after, before);
    let (_, id_after, _) = get_with(&server.url("/id"), &after).await;
    assert_ne!(id_before, id_after);
    // Data kept under the new id; the pre-login id is dead.
    let (_, t, _) = get_with(&server.url("/get/cart"), &after).await;
    assert_eq!(t, "\"apple\"");
    let (s, t, _) = get_with(&server.url("/get/cart"), &before).await;
    assert_eq!((s, t.as_str()), (200, "none"));
}

async fn session_idle_timeout_ends_an_unused_session(c: Ctx) {
    let store = SessionStore::builder(confined(&c))
        .idle_timeout(ms(800))
        .absolute_lifetime(Duration::from_secs(60))
        .touch_interval(ms(100))
        .build()
        .unwrap();
    let server = serve(app(layer(store).build().unwrap(), Gate::default())).await;
    let cookie = start(&server.url("/set/a/1")).await;
    let (_, t, _) = get_with(&server.url("/get/a"), &cookie).await;
    assert_eq!(t, "\"1\"");
    // The backend's TTL ends it: nobody touched it for longer than the idle timeout.
    let_expire(ms(800)).await;
    let (s, t, _) = get_with(&server.url("/get/a"), &cookie).await;
    assert_eq!((s, t.as_str()), (200, "none"));
}

async fn session_touch_extends_idle_at_most_once_per_interval(c: Ctx) {
    let counting = Counting::new(confined(&c));
    let store = SessionStore::builder(counting.clone())
        .idle_timeout(ms(3000))
        .absolute_lifetime(Duration::from_secs(60))
        .touch_interval(ms(1000))
        .build()
        .unwrap();
    let server = serve(app(layer(store).build().unwrap(), Gate::default())).await;
    let cookie = start(&server.url("/set/a/1")).await;
    for _ in 0..5 {
        let (_, t, set) = get_with(&server.url("/get/a"), &cookie).await;
        assert_eq!(t, "\"1\"");
        assert_eq!(set, None, "no touch within the interval");
    }
    assert_eq!(counting.of("expire"), 0, "{}", counting.calls());
    assert_eq!(counting.of("compare_and_swap"), 1, "{}", counting.calls());
    // Let the TTL run down past the interval: the next read extends it, once, without
    // rewriting the record.
    tokio::time::sleep(ms(1200)).await;
    let (_, _, set) = get_with(&server.url("/get/a"), &cookie).await;
    let set = set.expect("a touch refreshes the cookie's Max-Age");
    assert!(set.contains("Max-Age=3"), "{set}");
    let (_, _, set) = get_with(&server.url("/get/a"), &cookie).await;
    assert_eq!(set, None);
    assert_eq!(counting.of("expire"), 1, "{}", counting.calls());
    assert_eq!(counting.of("compare_and_swap"), 1, "{}", counting.calls());
    // 3.4 s after the write, 2.2 s after the touch: alive only because of the touch.
    tokio::time::sleep(ms(2200)).await;
    let (_, t, _) = get_with(&server.url("/get/a"), &cookie).await;
    assert_eq!(t, "\"1\"");
}

async fn session_absolute_lifetime_ends_an_active_session(c: Ctx) {
    let backend = confined(&c);
    let clock = ManualClock::new(c.b.now_ms().await.unwrap());
    let store = SessionStore::builder(backend.clone())
        .idle_timeout(Duration::from_secs(30))
        .absolute_lifetime(Duration::from_secs(60))
        .touch_interval(Duration::from_secs(1))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let server = serve(app(layer(store).build().unwrap(), Gate::default())).await;
    let cookie = start(&server.url("/set/a/1")).await;
    let (_, id, _) = get_with(&server.url("/id"), &cookie).await;
    let key = format!("keel:session:{id}").into_bytes();
    // Active all along: 59 s in, a write gets only the second that is left.
    clock.advance(Duration::from_secs(59));
    let r = client()
        .post(server.url("/set/b/2"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let set = header(&r, "set-cookie").unwrap();
    assert!(set.contains("Max-Age=1"), "{set}");
    match backend.ttl(&key).await.unwrap() {
        Ttl::Remaining(left) => assert!(left <= Duration::from_secs(1), "{left:?}"),
        other => panic!("expected a TTL, got {other:?}"),
    }
    // Past the lifetime by the store's clock: gone, whatever the record's TTL says.
    clock.advance(Duration::from_millis(1500));
    let (s, t, _) = get_with(&server.url("/get/a"), &cookie).await;
    assert_eq!((s, t.as_str()), (200, "none"));
}

async fn session_untouched_request_costs_no_backend_call(c: Ctx) {
    let counting = Counting::new(confined(&c));
    let store = store(counting.clone()).build().unwrap();
    let server = serve(app(layer(store).build().unwrap(), Gate::default())).await;
    let cookie = start(&server.url("/set/a/1")).await;
    let before = counting.total();
    for _ in 0..10 {
        let (s, _, set) = get_with(&server.url("/noop"), &cookie).await;
        assert_eq!((s, set), (200, None));
        let r = client().get(server.url("/noop")).send().await.unwrap();
        assert_eq!(header(&r, "set-cookie"), None);
    }
    assert_eq!(counting.total(), before, "{}", counting.calls());
    // A read costs exactly one call.
    get_with(&server.url("/get/a"), &cookie).await;
    assert_eq!(counting.total(), before + 1, "{}", counting.calls());
}

async fn session_flush_deletes_the_record_and_expires_the_cookie(c: Ctx) {
    let backend = confined(&c);
    let store = store(backend.clone()).build().unwrap();
    let server = serve(app(layer(store).build().unwrap(), Gate::default())).await;
    let http = cookie_client();
    http.post(server.url("/set/a/1")).send().await.unwrap();
    let id = text(http.get(server.url("/id")).send().await.unwrap())
        .await
        .1;
    let key = format!("keel:session:{id}").into_bytes();
    assert!(backend.get(&key).await.unwrap().is_some());
    let r = http.post(server.url("/logout")).send().await.unwrap();
    let set = header(&r, "set-cookie").unwrap();
    assert!(set.contains("Max-Age=0"), "{set}");
    assert!(set.contains("Path=/"), "{set}");
    assert_eq!(backend.get(&key).await.unwrap(), None);
    assert_eq!(
        text(http.get(server.url("/get/a")).send().await.unwrap()).await,
        (200, "none".into())
    );
}

async fn session_oversize_is_refused_and_nothing_is_written(c: Ctx) {
    let counting = Counting::new(confined(&c));
    let store = store(counting.clone())
        .max_record_bytes(256)
        .build()
        .unwrap();
    let server = serve(app(layer(store).build().unwrap(), Gate::default())).await;
    let http = cookie_client();
    let big = "x".repeat(300);
    let r = http
        .post(server.url(&format!("/set/a/{big}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(header(&r, "set-cookie"), None);
    assert_eq!(counting.of("compare_and_swap"), 0, "{}", counting.calls());
    http.post(server.url("/set/a/small")).send().await.unwrap();
    let r = http
        .post(server.url(&format!("/set/b/{big}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(counting.of("compare_and_swap"), 1, "{}", counting.calls());
    assert_eq!(
        text(http.get(server.url("/get/a")).send().await.unwrap()).await,
        (200, "\"small\"".into())
    );
    assert_eq!(
        text(http.get(server.url("/get/b")).send().await.unwrap()).await,
        (200, "none".into())
    );
}

/// Two servers, each with its own layer and store, on the one backend under test.
async fn two_servers(c: &Ctx, gate: Gate) -> (Server, Server) {
    let a = serve(app(
        layer(store(confined(c)).build().unwrap()).build().unwrap(),
        gate,
    ))
    .await;
    let b = serve(app(
        layer(store(confined(c)).build().unwrap()).build().unwrap(),
        Gate::default(),
    ))
    .await;
    (a, b)
}

use super::http_support::Server;

async fn session_concurrent_saves_from_two_servers_merge_distinct_fields(c: Ctx) {
    let gate = Gate::default();
    let (a, b) = two_servers(&c, gate.clone()).await;
    let cookie = start(&a.url("/set/init/0")).await;

    // Deterministic: A has read the session, B saves field y, then A saves field x.
    let slow = {
        let url = a.url("/gated/x/from-a");
        let cookie = cookie.clone();
        tokio::spawn(async move {
            text(
                client()
                    .post(url)
                    .header("cookie", cookie)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        })
    };
    gate.entered.notified().await;
    let r = client()
        .post(b.url("/set/y/from-b"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gate.proceed.notify_one();
    assert_eq!(slow.await.unwrap(), (200, "saved".into()));
    for (f, v) in [("init", "0"), ("x", "from-a"), ("y", "from-b")] {
        let (_, t, _) = get_with(&a.url(&format!("/get/{f}")), &cookie).await;
        assert_eq!(t, format!("\"{v}\""), "field {f}");
    }

    // Free-running: 2 servers x 10 concurrent writers of distinct fields; every
    // acknowledged write is there.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = if i % 2 == 0 { a.url("") } else { b.url("") };
        let cookie = cookie.clone();
        tasks.push(tokio::spawn(async move {
            let r = client()
                .post(format!("{url}/set/f{i}/{i}"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    for i in 0..20 {
        let (_, t, _) = get_with(&b.url(&format!("/get/f{i}")), &cookie).await;
        assert_eq!(t, format!("\"{i}\""), "field f{i} lost");
    }
}

async fn session_concurrent_saves_of_one_field_report_a_conflict(c: Ctx) {
    let gate = Gate::default();
    let (a, b) = two_servers(&c, gate.clone()).await;
    let cookie = start(&a.url("/set/x/0")).await;
    let slow = {
        let url = a.url("/gated/x/from-a");
        let cookie = cookie.clone();
        tokio::spawn(async move {
            text(
                client()
                    .post(url)
                    .header("cookie", cookie)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        })
    };
    gate.entered.notified().await;
    let r = client()
        .post(b.url("/set/x/from-b"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gate.proceed.notify_one();
    // The handler sees the typed conflict; the first write stands.
    assert_eq!(slow.await.unwrap(), (409, "conflict [\"x\"]".into()));
    let (_, t, _) = get_with(&a.url("/get/x"), &cookie).await;
    assert_eq!(t, "\"from-b\"");

    // The layer's own save reports it too, as a 409 problem, when the handler did not save.
    let gate2 = Gate::default();
    let slow_layer = serve(
        Router::new()
            .route(
                "/w",
                post({
                    let gate = gate2.clone();
                    move |s: Session| async move {
                        let _ = s.get::<String>("x").await;
                        gate.entered.notify_one();
                        gate.proceed.notified().await;
                        s.insert("x", "late").await.unwrap();
                        "handler says ok"
                    }
                }),
            )
            .layer(layer(store(confined(&c)).build().unwrap()).build().unwrap()),
    )
    .await;
    let late = {
        let url = slow_layer.url("/w");
        let cookie = cookie.clone();
        tokio::spawn(async move {
            let r = client()
                .post(url)
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    gate2.entered.notified().await;
    client()
        .post(b.url("/set/x/again-b"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    gate2.proceed.notify_one();
    let (status, body) = late.await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("session-conflict"), "{body}");
    let (_, t, _) = get_with(&a.url("/get/x"), &cookie).await;
    assert_eq!(t, "\"again-b\"");
}

async fn session_save_after_a_concurrent_logout_is_not_resurrected(c: Ctx) {
    let gate = Gate::default();
    let (a, b) = two_servers(&c, gate.clone()).await;
    let cookie = start(&a.url("/set/x/0")).await;
    let slow = {
        let url = a.url("/gated/y/late");
        let cookie = cookie.clone();
        tokio::spawn(async move {
            text(
                client()
                    .post(url)
                    .header("cookie", cookie)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        })
    };
    gate.entered.notified().await;
    let r = client()
        .post(b.url("/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gate.proceed.notify_one();
    assert_eq!(slow.await.unwrap(), (409, "ended".into()));
    let (s, t, _) = get_with(&a.url("/get/y"), &cookie).await;
    assert_eq!((s, t.as_str()), (200, "none"));
}
