//! The idempotency layer in a real axum server, driven by a real HTTP client, on every backend.
//! Concurrency is arranged with `Notify`s inside the handler, never with sleeps; the only
//! sleep lets a real lease TTL elapse.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use http::HeaderName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use super::http_support::{Server, client, header, problem, serve};
use super::*;
use crate::http::Extractor;
use crate::idempotency::{
    Idempotency, IdempotencyLayer, IdempotencyLayerBuilder, InFlight, KeyState,
};

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(http_idempotency_replays_byte_for_byte),
        case!(http_idempotency_concurrent_duplicate_gets_409_or_waits),
        case!(http_idempotency_changed_body_gets_422),
        case!(http_idempotency_bad_or_missing_key_gets_400),
        case!(http_idempotency_server_error_is_not_replayed),
        case!(http_idempotency_panicking_handler_key_is_retried),
        case!(http_idempotency_cancelled_request_releases_its_claim),
        case!(http_idempotency_principals_never_see_each_others_responses),
        case!(http_idempotency_lease_survives_a_handler_slower_than_its_ttl),
        case!(http_idempotency_oversized_response_is_neither_replayed_nor_rerun),
        case!(http_idempotency_request_body_over_the_limit_gets_413),
    ]
}

/// The handlers' shared state: how many times each ran, and the gates of the slow one.
#[derive(Clone, Default)]
struct Handlers {
    runs: Arc<AtomicUsize>,
    entered: Arc<Notify>,
    proceed: Arc<Notify>,
}

impl Handlers {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn app(&self, layer: IdempotencyLayer) -> Router {
        let h = self.clone();
        let orders = move |body: Bytes| {
            let n = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let mut out = format!("order {n}: ").into_bytes();
                out.extend_from_slice(&body);
                out.extend_from_slice(b"\x00\xff");
                (
                    StatusCode::CREATED,
                    [
                        ("x-order", n.to_string()),
                        ("set-cookie", format!("session={n}")),
                        ("content-type", "application/octet-stream".to_owned()),
                    ],
                    out,
                )
            }
        };
        let h = self.clone();
        let slow = move || {
            let h = h.clone();
            async move {
                let n = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
                h.entered.notify_one();
                h.proceed.notified().await;
                (StatusCode::CREATED, format!("slow {n}"))
            }
        };
        let h = self.clone();
        let flaky = move || {
            let n = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n == 1 {
                    (StatusCode::INTERNAL_SERVER_ERROR, "boom".to_owned())
                } else {
                    (StatusCode::CREATED, format!("ok {n}"))
                }
            }
        };
        let h = self.clone();
        let panics = move || {
            let n = h.runs.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                assert!(n > 1, "first run panics (the case expects this panic)");
                (StatusCode::CREATED, format!("ok {n}"))
            }
        };
        let h = self.clone();
        let big = move || {
            h.runs.fetch_add(1, Ordering::SeqCst);
            async move { (StatusCode::CREATED, vec![b'x'; 64]) }
        };
        Router::new()
            .route("/orders", post(orders))
            .route("/slow", post(slow))
            .route("/flaky", post(flaky))
            .route("/panics", post(panics))
            .route("/big", post(big))
            .layer(layer)
    }
}

fn layer(c: &Ctx) -> IdempotencyLayerBuilder {
    IdempotencyLayer::builder(
        confined(c),
        Extractor::header(HeaderName::from_static("x-user")),
    )
    // Long enough for every case, short enough not to leave records on a shared server.
    .record_ttl(Duration::from_secs(600))
}

async fn start(
    c: &Ctx,
    configure: impl FnOnce(IdempotencyLayerBuilder) -> IdempotencyLayerBuilder,
) -> (Handlers, Server) {
    let h = Handlers::default();
    let server = serve(h.app(configure(layer(c)).build().unwrap())).await;
    (h, server)
}

async fn send(
    server: &Server,
    path: &str,
    user: &str,
    key: Option<&str>,
    body: &'static [u8],
) -> reqwest::Response {
    let mut req = client()
        .post(server.url(path))
        .header("x-user", user)
        .body(body);
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.send().await.unwrap()
}

/// Waits (bounded) until the key's claim is gone: a released claim is deleted in the
/// background, so poll its state rather than sleeping.
async fn until_free(c: &Ctx, user: &str, key: &str) {
    let store = Idempotency::new(confined(c));
    let scope = format!("h:x-user:{user}");
    for _ in 0..500 {
        if store.state(scope.as_bytes(), key.as_bytes()).await.unwrap() == KeyState::Free {
            return;
        }
        tokio::time::sleep(ms(10)).await;
    }
    panic!("the claim on {key:?} was not released within 5 s");
}

async fn http_idempotency_replays_byte_for_byte(c: Ctx) {
    let (h, server) = start(&c, |l| l).await;
    let first = send(&server, "/orders", "alice", Some("k-1"), b"two apples").await;
    assert_eq!(first.status(), 201);
    assert_eq!(header(&first, "set-cookie").as_deref(), Some("session=1"));
    assert_eq!(header(&first, "idempotency-replayed"), None);
    let first_headers = first.headers().clone();
    let first_body = first.bytes().await.unwrap();
    assert_eq!(&first_body[..], b"order 1: two apples\x00\xff");
    for _ in 0..2 {
        let again = send(&server, "/orders", "alice", Some("k-1"), b"two apples").await;
        assert_eq!(again.status(), 201);
        assert_eq!(
            header(&again, "idempotency-replayed").as_deref(),
            Some("true")
        );
        assert_eq!(
            header(&again, "set-cookie"),
            None,
            "deny-listed header replayed"
        );
        for name in ["x-order", "content-type", "content-length"] {
            assert_eq!(again.headers().get(name), first_headers.get(name), "{name}");
        }
        assert_eq!(again.bytes().await.unwrap(), first_body);
    }
    assert_eq!(h.runs(), 1);
    // Without a key the request is not protected: it runs every time.
    send(&server, "/orders", "alice", None, b"x").await;
    send(&server, "/orders", "alice", None, b"x").await;
    assert_eq!(h.runs(), 3);
}

async fn http_idempotency_concurrent_duplicate_gets_409_or_waits(c: Ctx) {
    for wait in [false, true] {
        let (h, server) = start(&c, |l| {
            if wait {
                l.in_flight(InFlight::Wait(Duration::from_secs(30)))
            } else {
                l
            }
        })
        .await;
        let server = Arc::new(server);
        let key = if wait { "race-wait" } else { "race-409" };
        let s = Arc::clone(&server);
        let first = tokio::spawn(async move { send(&s, "/slow", "alice", Some(key), b"x").await });
        h.entered.notified().await; // the first request is inside the handler now
        let s = Arc::clone(&server);
        let second = tokio::spawn(async move { send(&s, "/slow", "alice", Some(key), b"x").await });
        if !wait {
            let second = second.await.unwrap();
            assert_eq!(second.status(), 409);
            assert_eq!(header(&second, "retry-after").as_deref(), Some("1"));
            assert_eq!(problem(second).await["code"], "idempotency_key_in_use");
            h.proceed.notify_one();
            let first = first.await.unwrap();
            assert_eq!(first.status(), 201);
            assert_eq!(first.text().await.unwrap(), "slow 1");
        } else {
            h.proceed.notify_one();
            let first = first.await.unwrap();
            assert_eq!(first.text().await.unwrap(), "slow 1");
            let second = second.await.unwrap();
            assert_eq!(second.status(), 201);
            assert_eq!(
                header(&second, "idempotency-replayed").as_deref(),
                Some("true")
            );
            assert_eq!(second.text().await.unwrap(), "slow 1");
        }
        assert_eq!(h.runs(), 1, "the duplicate never ran (wait = {wait})");
    }
}

async fn http_idempotency_changed_body_gets_422(c: Ctx) {
    let (h, server) = start(&c, |l| l).await;
    assert_eq!(
        send(&server, "/orders", "alice", Some("k"), b"one")
            .await
            .status(),
        201
    );
    let r = send(&server, "/orders", "alice", Some("k"), b"two").await;
    assert_eq!(r.status(), 422);
    assert_eq!(problem(r).await["code"], "idempotency_key_reused");
    // The path and query are part of the fingerprint too.
    let r = client()
        .post(server.url("/orders?again=1"))
        .header("x-user", "alice")
        .header("idempotency-key", "k")
        .body("one")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(h.runs(), 1);
}

async fn http_idempotency_bad_or_missing_key_gets_400(c: Ctx) {
    let (h, server) = start(&c, |l| l.required(true)).await;
    let long = "k".repeat(256);
    for bad in [long.as_str(), "\"unterminated", "\"\""] {
        let r = send(&server, "/orders", "alice", Some(bad), b"x").await;
        assert_eq!(r.status(), 400, "{bad:?}");
        assert_eq!(problem(r).await["code"], "idempotency_key_invalid");
    }
    let r = client()
        .post(server.url("/orders"))
        .header("x-user", "alice")
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "non-ASCII key");
    let r = client()
        .post(server.url("/orders"))
        .header("x-user", "alice")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "two keys");
    let r = send(&server, "/orders", "alice", None, b"x").await;
    assert_eq!(r.status(), 400);
    assert_eq!(problem(r).await["code"], "idempotency_key_missing");
    assert_eq!(h.runs(), 0, "nothing ran");
    // Longest valid key, and a structured-field string.
    let longest = "k".repeat(255);
    assert_eq!(
        send(&server, "/orders", "alice", Some(&longest), b"x")
            .await
            .status(),
        201
    );
    assert_eq!(
        send(&server, "/orders", "alice", Some(r#""sf key""#), b"x")
            .await
            .status(),
        201
    );
    // Other methods pass untouched.
    let r = client().get(server.url("/orders")).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

async fn http_idempotency_server_error_is_not_replayed(c: Ctx) {
    let (h, server) = start(&c, |l| l).await;
    let r = send(&server, "/flaky", "alice", Some("k"), b"x").await;
    assert_eq!(r.status(), 500);
    until_free(&c, "alice", "k").await;
    let r = send(&server, "/flaky", "alice", Some("k"), b"x").await;
    assert_eq!(r.status(), 201, "the retry ran");
    assert_eq!(header(&r, "idempotency-replayed"), None);
    assert_eq!(r.text().await.unwrap(), "ok 2");
    let r = send(&server, "/flaky", "alice", Some("k"), b"x").await;
    assert_eq!(header(&r, "idempotency-replayed").as_deref(), Some("true"));
    assert_eq!(r.text().await.unwrap(), "ok 2");
    assert_eq!(h.runs(), 2);
}

async fn http_idempotency_panicking_handler_key_is_retried(c: Ctx) {
    let (h, server) = start(&c, |l| l).await;
    let failed = client()
        .post(server.url("/panics"))
        .header("x-user", "alice")
        .header("idempotency-key", "k")
        .send()
        .await;
    assert!(
        failed.is_err(),
        "the connection of a panicking handler closes"
    );
    assert_eq!(h.runs(), 1);
    until_free(&c, "alice", "k").await;
    let r = send(&server, "/panics", "alice", Some("k"), b"").await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.text().await.unwrap(), "ok 2");
}

async fn http_idempotency_cancelled_request_releases_its_claim(c: Ctx) {
    let (h, server) = start(&c, |l| l).await;
    let server = Arc::new(server);
    let s = Arc::clone(&server);
    let request = tokio::spawn(async move { send(&s, "/slow", "alice", Some("k"), b"x").await });
    h.entered.notified().await;
    // The client gives up: its connection closes while the handler runs.
    request.abort();
    let _ = request.await;
    until_free(&c, "alice", "k").await;
    h.proceed.notify_one(); // a permit for the retry's handler
    let r = send(&server, "/slow", "alice", Some("k"), b"x").await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.text().await.unwrap(), "slow 2");
}

async fn http_idempotency_principals_never_see_each_others_responses(c: Ctx) {
    let (h, server) = start(&c, |l| l).await;
    let alice = send(&server, "/orders", "alice", Some("same"), b"x").await;
    let bob = send(&server, "/orders", "bob", Some("same"), b"x").await;
    assert_eq!(
        header(&bob, "idempotency-replayed"),
        None,
        "bob's request ran"
    );
    assert_eq!(&alice.bytes().await.unwrap()[..], b"order 1: x\x00\xff");
    assert_eq!(&bob.bytes().await.unwrap()[..], b"order 2: x\x00\xff");
    for (user, body) in [
        ("alice", &b"order 1: x\x00\xff"[..]),
        ("bob", b"order 2: x\x00\xff"),
    ] {
        let r = send(&server, "/orders", user, Some("same"), b"x").await;
        assert_eq!(header(&r, "idempotency-replayed").as_deref(), Some("true"));
        assert_eq!(&r.bytes().await.unwrap()[..], body);
    }
    // No principal: 400, never an unscoped record.
    let r = client()
        .post(server.url("/orders"))
        .header("idempotency-key", "same")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(h.runs(), 2);
}

async fn http_idempotency_lease_survives_a_handler_slower_than_its_ttl(c: Ctx) {
    // Renewed every third of a second: only a stall of about two thirds of a second on the
    // runtime (or the backend) could lose it.
    let lease = Duration::from_secs(1);
    let (h, server) = start(&c, |l| l.lease_ttl(lease)).await;
    let server = Arc::new(server);
    let s = Arc::clone(&server);
    let first = tokio::spawn(async move { send(&s, "/slow", "alice", Some("k"), b"x").await });
    h.entered.notified().await;
    // Let two leases pass on the backend's clock while the handler runs.
    let_expire(lease * 2).await;
    let store = Idempotency::new(confined(&c));
    assert_eq!(
        store.state(b"h:x-user:alice", b"k").await.unwrap(),
        KeyState::InFlight,
        "the running handler's lease was renewed"
    );
    let dup = send(&server, "/slow", "alice", Some("k"), b"x").await;
    assert_eq!(dup.status(), 409);
    h.proceed.notify_one();
    assert_eq!(first.await.unwrap().text().await.unwrap(), "slow 1");
    let r = send(&server, "/slow", "alice", Some("k"), b"x").await;
    assert_eq!(header(&r, "idempotency-replayed").as_deref(), Some("true"));
    assert_eq!(h.runs(), 1);
}

async fn http_idempotency_oversized_response_is_neither_replayed_nor_rerun(c: Ctx) {
    let (h, server) = start(&c, |l| l.response_body_limit(16)).await;
    let r = send(&server, "/big", "alice", Some("k"), b"").await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.bytes().await.unwrap().len(), 64, "sent in full");
    let r = send(&server, "/big", "alice", Some("k"), b"").await;
    assert_eq!(r.status(), 409);
    assert_eq!(problem(r).await["code"], "idempotency_response_not_stored");
    assert_eq!(h.runs(), 1);
}

async fn http_idempotency_request_body_over_the_limit_gets_413(c: Ctx) {
    let (h, server) = start(&c, |l| l.request_body_limit(8)).await;
    let r = send(&server, "/orders", "alice", Some("k"), b"123456789").await;
    assert_eq!(r.status(), 413);
    assert_eq!(problem(r).await["code"], "idempotency_body_too_large");
    // A streamed (chunked) body without Content-Length is cut at the limit too.
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = "POST /orders HTTP/1.1\r\nhost: keel\r\nx-user: alice\r\n\
                   idempotency-key: k\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
                   5\r\n12345\r\n4\r\n6789\r\n0\r\n\r\n";
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await.unwrap();
    assert!(
        response.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert_eq!(h.runs(), 0, "nothing ran");
    let store = Idempotency::new(confined(&c));
    assert_eq!(
        store.state(b"h:x-user:alice", b"k").await.unwrap(),
        KeyState::Free
    );
    assert_eq!(
        send(&server, "/orders", "alice", Some("k"), b"12345678")
            .await
            .status(),
        201
    );
}
