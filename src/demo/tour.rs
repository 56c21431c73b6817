//! `keel demo --tour`: drives the running service over real HTTP (reqwest, two cookie jars
//! standing in for two devices, and one without cookies), through every feature, printing each
//! request and a summary of its answer, and checking what came back. A failed check is
//! printed as `FAIL` and makes the tour (and the command) fail; it is also the service's smoke
//! test.
//!
//! Names (e-mail addresses, idempotency keys, event ids, job names) carry a per-run tag, so
//! the tour also passes on a store that earlier tours used.

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::app::{BREAKER_FAILURES, LOGIN_EMAIL};
use super::console::{Console, Mail, Outbox};
use crate::cli::failure::Failure;

/// How long the tour waits for a code to be "mailed", a breaker to close, or a job to start.
const WAIT: Duration = Duration::from_secs(30);
/// Pause between two polls of a condition.
const POLL: Duration = Duration::from_millis(100);
/// Visitors bucketed to show the flag's rollout.
const VISITORS: usize = 200;
/// Longest body excerpt printed.
const EXCERPT_CHARS: usize = 150;
/// Headers worth showing in a summary.
const SHOWN_HEADERS: &[&str] = &[
    "location",
    "retry-after",
    "ratelimit",
    "idempotency-replayed",
    "cache-status",
    "etag",
    "x-catalog-render",
    "x-dedup",
    "x-breaker-state",
];

/// One of the tour's HTTP clients.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    /// A browser-like client with its own cookie jar: device A.
    A,
    /// Another one: device B.
    B,
    /// A script without cookies (curl).
    Curl,
}

impl Who {
    fn label(self) -> &'static str {
        match self {
            Who::A => "device A",
            Who::B => "device B",
            Who::Curl => "curl    ",
        }
    }
}

/// An answer, read whole.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> String {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

struct Tour {
    base: String,
    a: reqwest::Client,
    b: reqwest::Client,
    curl: reqwest::Client,
    console: Console,
    mail: broadcast::Receiver<Mail>,
    tag: String,
    passed: usize,
    failed: Vec<String>,
}

/// Runs the tour against the service at `addr`.
///
/// # Errors
/// Any failed check (after the whole tour has run), or a client that cannot be built.
pub async fn run(addr: SocketAddr, outbox: &Outbox, console: &Console) -> Result<(), Failure> {
    let client = |cookies: bool| {
        reqwest::Client::builder()
            .no_proxy()
            .cookie_store(cookies)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(if cookies {
                "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
            } else {
                "curl/8.5.0"
            })
            .timeout(WAIT)
            .build()
            .map_err(|e| Failure::Error(format!("cannot build the tour's HTTP client: {e}")))
    };
    let mut tour = Tour {
        base: format!("http://{addr}"),
        a: client(true)?,
        b: client(true)?,
        curl: client(false)?,
        console: console.clone(),
        mail: outbox.subscribe(),
        tag: format!("{:06x}", rand::random::<u32>() & 0xff_ffff),
        passed: 0,
        failed: Vec::new(),
    };
    console.line(format!(
        "keel demo --tour: driving {} with an HTTP client (run tag {})",
        tour.base, tour.tag
    ));
    tour.pages().await;
    tour.sign_in_and_devices().await;
    tour.session_id_cycles_at_sign_in().await;
    tour.rate_limit().await;
    tour.orders().await;
    tour.catalog().await;
    tour.webhook().await;
    tour.flag().await;
    tour.breaker().await;
    tour.jobs().await;
    tour.metrics().await;

    let total = tour.passed + tour.failed.len();
    if tour.failed.is_empty() {
        console.line(format!("tour: all {total} checks passed"));
        Ok(())
    } else {
        console.line(format!(
            "tour: {} of {total} checks FAILED:",
            tour.failed.len()
        ));
        for f in &tour.failed {
            console.line(format!("  - {f}"));
        }
        Err(Failure::Error(format!(
            "the tour failed {} of {total} checks",
            tour.failed.len()
        )))
    }
}

impl Tour {
    fn section(&self, title: &str) {
        self.console.line("");
        self.console.line(format!("== {title}"));
    }

    fn check(&mut self, ok: bool, what: impl Display) {
        if ok {
            self.passed += 1;
            self.console.line(format!("   ok    {what}"));
        } else {
            self.console.line(format!("   FAIL  {what}"));
            self.failed.push(what.to_string());
        }
    }

    /// Sends a request, prints it and a summary of the answer. A transport error is status 0.
    async fn send(
        &self,
        who: Who,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Reply {
        let client = match who {
            Who::A => &self.a,
            Who::B => &self.b,
            Who::Curl => &self.curl,
        };
        let mut shown = format!("-> [{}] {method} {path}", who.label());
        for (name, value) in headers {
            shown.push_str(&format!(" | {name}: {value}"));
        }
        let mut request = client.request(method, format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            shown.push_str(&format!(" {body}"));
            request = request.json(body);
        }
        self.console.line(shown);
        let reply = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let body = response.text().await.unwrap_or_default();
                Reply {
                    status,
                    headers,
                    body,
                }
            }
            Err(e) => {
                self.console.line(format!("<- request failed: {e}"));
                return Reply {
                    status: 0,
                    headers: HeaderMap::new(),
                    body: String::new(),
                };
            }
        };
        let mut summary = format!("<- {}", reply.status);
        for name in SHOWN_HEADERS {
            let value = reply.header(name);
            if !value.is_empty() {
                summary.push_str(&format!(" | {name}: {value}"));
            }
        }
        if let Some(cookie) = reply
            .headers
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
        {
            let attributes: Vec<&str> = cookie.split(';').skip(1).map(str::trim).collect();
            let name = cookie.split('=').next().unwrap_or("");
            summary.push_str(&format!(
                " | set-cookie: {name}=…; {}",
                attributes.join("; ")
            ));
        }
        let body = reply.body.trim();
        if !body.is_empty() && !body.starts_with("<!DOCTYPE") && !body.starts_with("# ") {
            let excerpt: String = body.chars().take(EXCERPT_CHARS).collect();
            let more = if body.chars().count() > EXCERPT_CHARS {
                "…"
            } else {
                ""
            };
            summary.push_str(&format!(" | {excerpt}{more}"));
        }
        self.console.line(summary);
        reply
    }

    async fn get(&self, who: Who, path: &str) -> Reply {
        self.send(who, Method::GET, path, &[], None).await
    }

    async fn post(&self, who: Who, path: &str, body: &Value) -> Reply {
        self.send(who, Method::POST, path, &[], Some(body)).await
    }

    /// The next code mailed to `email`.
    async fn code_for(&mut self, email: &str) -> Option<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.mail.recv()).await {
                Ok(Ok(mail)) if mail.to == email => {
                    self.console.line(format!(
                        "   (the tour reads the code {} from the outbox)",
                        mail.code
                    ));
                    return Some(mail.code);
                }
                Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return None,
            }
        }
    }

    /// Signs `who` in as `email`; returns the new session id.
    async fn sign_in(&mut self, who: Who, email: &str) -> Option<String> {
        let sent = self.post(who, "/api/login", &json!({"email": email})).await;
        self.check(
            sent.status == 202,
            format!("a code is sent to {email} (202)"),
        );
        let code = self.code_for(email).await;
        self.check(code.is_some(), "the code reached the outbox");
        let verified = self
            .post(
                who,
                "/api/login/verify",
                &json!({"email": email, "code": code.unwrap_or_default()}),
            )
            .await;
        self.check(verified.status == 200, "the code signs in (200)");
        verified.json()["session"].as_str().map(str::to_owned)
    }

    async fn pages(&mut self) {
        self.section("pages: server-rendered HTML");
        let home = self.get(Who::Curl, "/").await;
        self.check(
            home.status == 200 && home.body.contains("id=\"login\""),
            "GET / shows the sign-in form to an anonymous visitor",
        );
        let missing = self.get(Who::Curl, "/no-such-page").await;
        self.check(
            missing.status == 404 && missing.header("content-type") == "application/problem+json",
            "an unknown route is a 404 problem document",
        );
    }

    async fn sign_in_and_devices(&mut self) {
        self.section("sign-in by one-time code, cookie sessions, devices");
        let alice = format!("alice-{}@example.com", self.tag);
        let me = self.get(Who::A, "/api/me").await;
        self.check(me.status == 401, "before signing in, /api/me is 401");
        let wrong = self
            .post(Who::A, "/api/login", &json!({"email": "not-an-address"}))
            .await;
        self.check(wrong.status == 422, "a malformed address is refused (422)");

        let sent = self
            .post(Who::A, "/api/login", &json!({"email": alice}))
            .await;
        self.check(sent.status == 202, "a code is sent (202)");
        let policy = sent.header("ratelimit-policy");
        self.check(
            policy.contains("\"login-email\"") && policy.contains("\"login-ip-minute\""),
            "RateLimit-Policy lists the per-e-mail and per-IP policies",
        );
        let code = self.code_for(&alice).await.unwrap_or_default();
        let verified = self
            .post(
                Who::A,
                "/api/login/verify",
                &json!({"email": alice, "code": code}),
            )
            .await;
        self.check(verified.status == 200, "the code signs device A in (200)");
        let cookie = verified.header("set-cookie");
        self.check(
            cookie.starts_with("keel_session=")
                && cookie.contains("HttpOnly")
                && cookie.contains("SameSite=Lax"),
            "the session cookie is HttpOnly and SameSite=Lax",
        );
        let again = self
            .post(
                Who::Curl,
                "/api/login/verify",
                &json!({"email": alice, "code": code}),
            )
            .await;
        self.check(
            again.status == 401,
            "a used code does not sign in again (401)",
        );
        let session_a = verified.json()["session"].as_str().unwrap_or("").to_owned();
        let me = self.get(Who::A, "/api/me").await;
        self.check(
            me.status == 200 && me.json()["user"] == alice.as_str(),
            "device A is signed in as alice",
        );

        let session_b = self.sign_in(Who::B, &alice).await.unwrap_or_default();
        let devices = self.get(Who::A, "/api/devices").await;
        let list = devices.json()["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        self.check(
            list.len() == 2
                && list.iter().filter(|d| d["current"] == true).count() == 1
                && list.iter().any(|d| d["session"] == session_b.as_str()),
            "alice's devices: 2, one of them this one",
        );
        self.check(
            list.iter().any(|d| d["browser"] == "Firefox"),
            "device records carry the parsed user agent",
        );
        let home = self.get(Who::A, "/").await;
        self.check(
            home.body.contains(&format!("data-session=\"{session_b}\"")),
            "the home page lists device B with a revoke button",
        );

        let revoked = self
            .send(
                Who::A,
                Method::POST,
                &format!("/api/devices/{session_b}/revoke"),
                &[],
                None,
            )
            .await;
        self.check(revoked.status == 200, "device A revokes device B");
        let me_b = self.get(Who::B, "/api/me").await;
        self.check(
            me_b.status == 401,
            "device B's next request is signed out (401)",
        );
        let not_mine = self
            .send(
                Who::B,
                Method::POST,
                &format!("/api/devices/{session_a}/revoke"),
                &[],
                None,
            )
            .await;
        self.check(
            not_mine.status == 401,
            "a signed-out device cannot revoke anything",
        );

        let _ = self.sign_in(Who::B, &alice).await;
        let others = self
            .send(
                Who::A,
                Method::POST,
                "/api/devices/revoke-others",
                &[],
                None,
            )
            .await;
        self.check(
            others.status == 200 && others.json()["revoked"] == 1,
            "\"sign out everywhere else\" ends the other device",
        );
        let me_b = self.get(Who::B, "/api/me").await;
        self.check(me_b.status == 401, "device B is signed out again");
        let me_a = self.get(Who::A, "/api/me").await;
        self.check(me_a.status == 200, "device A is still signed in");
        let out = self
            .send(Who::A, Method::POST, "/api/logout", &[], None)
            .await;
        self.check(out.status == 200, "device A signs out");
        let me_a = self.get(Who::A, "/api/me").await;
        self.check(me_a.status == 401, "and is anonymous afterwards");
    }

    async fn session_id_cycles_at_sign_in(&mut self) {
        self.section("the session id changes at every sign-in (fixation defence)");
        let carol = format!("carol-{}@example.com", self.tag);
        let first = self.sign_in(Who::A, &carol).await.unwrap_or_default();
        let second = self.sign_in(Who::A, &carol).await.unwrap_or_default();
        self.check(
            !first.is_empty() && !second.is_empty() && first != second,
            "signing in again gives a new session id",
        );
        let devices = self.get(Who::A, "/api/devices").await;
        let list = devices.json()["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        self.check(
            list.len() == 1 && list[0]["session"] == second.as_str(),
            "the old id's device record was replaced, not kept",
        );
        let _ = self
            .send(Who::A, Method::POST, "/api/logout", &[], None)
            .await;
    }

    async fn rate_limit(&mut self) {
        self.section("rate limit on sign-in: per client IP and per e-mail, stacked");
        let mallory = format!("mallory-{}@example.com", self.tag);
        let limit = LOGIN_EMAIL.limit();
        let mut refused = 0;
        for _ in 0..limit {
            let r = self
                .post(
                    Who::Curl,
                    "/api/login/verify",
                    &json!({"email": mallory, "code": "000000"}),
                )
                .await;
            refused += usize::from(r.status == 401);
        }
        self.check(
            refused == usize::try_from(limit).unwrap_or(usize::MAX),
            format!("{limit} wrong codes are each refused (401)"),
        );
        let limited = self
            .post(
                Who::Curl,
                "/api/login/verify",
                &json!({"email": mallory, "code": "000000"}),
            )
            .await;
        let problem = limited.json();
        self.check(
            limited.status == 429 && problem["policy"] == "login-email",
            format!(
                "attempt {} for the same address is rate limited (429, policy login-email)",
                limit + 1
            ),
        );
        self.check(
            !limited.header("retry-after").is_empty()
                && limited.header("ratelimit").contains("\"login-email\";r=0"),
            "with Retry-After and RateLimit headers",
        );
        let other = format!("trent-{}@example.com", self.tag);
        let fine = self
            .post(
                Who::Curl,
                "/api/login/verify",
                &json!({"email": other, "code": "000000"}),
            )
            .await;
        self.check(
            fine.status == 401,
            "another address from the same IP is not limited by it",
        );
    }

    async fn orders(&mut self) {
        self.section("POST /orders with an Idempotency-Key");
        let key = format!("order-{}", self.tag);
        let body = json!({"item": "espresso", "qty": 2});
        let none = self.post(Who::Curl, "/orders", &body).await;
        self.check(none.status == 400, "without a key: 400");
        let headers = [("idempotency-key", key.as_str())];
        let first = self
            .send(Who::Curl, Method::POST, "/orders", &headers, Some(&body))
            .await;
        self.check(first.status == 201, "the order is created (201)");
        let retry = self
            .send(Who::Curl, Method::POST, "/orders", &headers, Some(&body))
            .await;
        self.check(
            retry.status == 201
                && retry.header("idempotency-replayed") == "true"
                && retry.json()["id"] == first.json()["id"],
            "a retry with the same key gets the same order back, not a second one",
        );
        let other = json!({"item": "croissant", "qty": 1});
        let misuse = self
            .send(Who::Curl, Method::POST, "/orders", &headers, Some(&other))
            .await;
        self.check(misuse.status == 422, "the same key with another body: 422");
        let id = first.json()["id"].as_i64().unwrap_or(0);
        let read = self.get(Who::Curl, &format!("/orders/{id}")).await;
        self.check(
            read.status == 200 && read.json()["total_cents"] == 500,
            "the order reads back",
        );
        let unknown = self
            .send(
                Who::Curl,
                Method::POST,
                "/orders",
                &[("idempotency-key", &format!("{key}-x"))],
                Some(&json!({"item": "caviar", "qty": 1})),
            )
            .await;
        self.check(unknown.status == 422, "an unknown item: 422");
    }

    async fn catalog(&mut self) {
        self.section("GET /catalog behind the HTTP cache");
        let path = format!("/catalog?run={}", self.tag);
        let first = self.get(Who::Curl, &path).await;
        self.check(
            first.status == 200 && first.header("cache-status").contains("fwd=uri-miss"),
            "the first request misses and is stored",
        );
        let second = self.get(Who::Curl, &path).await;
        self.check(
            second.status == 200
                && second.header("cache-status").contains("hit")
                && second.header("x-catalog-render") == first.header("x-catalog-render"),
            "the second is a hit: the handler did not run again",
        );
        let etag = first.header("etag");
        let revalidated = self
            .send(
                Who::Curl,
                Method::GET,
                &path,
                &[("if-none-match", etag.as_str())],
                None,
            )
            .await;
        self.check(
            !etag.is_empty() && revalidated.status == 304,
            "If-None-Match with its ETag: 304 Not Modified",
        );
    }

    async fn webhook(&mut self) {
        self.section("POST /webhooks/payments, deduplicated by event id");
        let event = json!({"id": format!("evt_{}_1", self.tag), "type": "payment.succeeded", "amount_cents": 700});
        let first = self.post(Who::Curl, "/webhooks/payments", &event).await;
        self.check(
            first.status == 200 && first.header("x-dedup") == "processed",
            "the first delivery is processed",
        );
        let again = self.post(Who::Curl, "/webhooks/payments", &event).await;
        self.check(
            again.status == 200
                && again.header("x-dedup") == "duplicate"
                && again.body == first.body,
            "a redelivery is recognised and gets the first answer back",
        );
        let next = json!({"id": format!("evt_{}_2", self.tag), "type": "payment.succeeded", "amount_cents": 300});
        let second = self.post(Who::Curl, "/webhooks/payments", &next).await;
        let total = |r: &Reply| r.json()["total_received_cents"].as_i64().unwrap_or(0);
        self.check(
            second.header("x-dedup") == "processed" && total(&second) == total(&first) + 300,
            "another event is processed, and the total counted the first one once",
        );
    }

    async fn flag(&mut self) {
        self.section("a feature flag with a 50% rollout picks the welcome page");
        let mut v2 = 0;
        let mut sticky = true;
        self.console.line(format!(
            "   (asking /api/welcome for {VISITORS} visitors, quietly)"
        ));
        for i in 0..VISITORS {
            let url = format!("{}/api/welcome?visitor=user-{i}", self.base);
            let variant = |r: Result<reqwest::Response, reqwest::Error>| async move {
                match r {
                    Ok(r) => r.json::<Value>().await.ok().map(|v| v["variant"].clone()),
                    Err(_) => None,
                }
            };
            let one = variant(self.curl.get(&url).send().await).await;
            let two = variant(self.curl.get(&url).send().await).await;
            sticky &= one.is_some() && one == two;
            v2 += usize::from(one.as_ref().and_then(Value::as_str) == Some("v2"));
        }
        self.console
            .line(format!("   {v2} of {VISITORS} visitors got v2"));
        self.check(
            (VISITORS * 35 / 100..=VISITORS * 65 / 100).contains(&v2),
            format!("about half of {VISITORS} visitors get the new page ({v2})"),
        );
        self.check(sticky, "each visitor gets the same variant every time");
        let page = self.get(Who::B, "/welcome").await;
        self.check(
            page.status == 200
                && page.body.contains("data-variant=")
                && page.header("set-cookie").starts_with("keel_visitor="),
            "GET /welcome renders a variant and remembers the visitor in a cookie",
        );
        let variant = |body: &str| body.contains("data-variant=\"v2\"");
        let again = self.get(Who::B, "/welcome").await;
        self.check(
            variant(&again.body) == variant(&page.body) && again.header("set-cookie").is_empty(),
            "the same browser sees the same variant",
        );
    }

    async fn breaker(&mut self) {
        self.section("a circuit breaker around a flaky upstream");
        let ok = self.get(Who::Curl, "/upstream?fail=false").await;
        self.check(
            ok.status == 200,
            "the upstream answers (200, breaker closed)",
        );
        let mut failed = 0;
        for _ in 0..BREAKER_FAILURES {
            failed += usize::from(self.get(Who::Curl, "/upstream?fail=true").await.status == 502);
        }
        self.check(
            failed == usize::try_from(BREAKER_FAILURES).unwrap_or(usize::MAX),
            format!("{BREAKER_FAILURES} failures in a row (502)"),
        );
        let open = self.get(Who::Curl, "/upstream?fail=false").await;
        self.check(
            open.status == 503 && !open.header("retry-after").is_empty(),
            "then the breaker is open: 503 with Retry-After, the upstream is not called",
        );
        self.console.line(format!(
            "   (polling every {} ms until the breaker lets a probe through)",
            POLL.as_millis()
        ));
        let deadline = Instant::now() + WAIT;
        let mut closed = false;
        let mut polls = 0;
        while Instant::now() < deadline {
            polls += 1;
            let r = self
                .curl
                .get(format!("{}/upstream?fail=false", self.base))
                .send()
                .await;
            if let Ok(r) = r
                && r.status() == 200
            {
                closed = true;
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        self.check(
            closed,
            format!("after the open period a probe succeeds ({polls} polls)"),
        );
        let after = self.get(Who::Curl, "/upstream?fail=false").await;
        self.check(
            after.status == 200 && after.header("x-breaker-state") == "closed",
            "and the breaker is closed again",
        );
    }

    async fn jobs(&mut self) {
        self.section("a job under a lock, writing with its fencing token");
        let name = format!("report-{}", self.tag);
        let path = format!("/jobs/{name}");
        let first = self.send(Who::Curl, Method::POST, &path, &[], None).await;
        let second = self.send(Who::Curl, Method::POST, &path, &[], None).await;
        let token = |r: &Reply| r.json()["fencing_token"].as_u64().unwrap_or(0);
        self.check(
            first.status == 200 && first.json()["fence"] == "accepted",
            "the job runs, and the fence accepts its output",
        );
        self.check(
            second.status == 200 && token(&second) > token(&first),
            "the next run gets a larger fencing token",
        );
        let slow = format!("{path}?hold_ms=2000");
        let client = self.curl.clone();
        let url = format!("{}{slow}", self.base);
        self.console
            .line(format!("-> [curl    ] POST {slow} (in the background)"));
        let running = tokio::spawn(async move { client.post(url).send().await });
        let deadline = Instant::now() + WAIT;
        let mut held = false;
        while Instant::now() < deadline && !held {
            let r = self.curl.get(format!("{}{path}", self.base)).send().await;
            if let Ok(r) = r {
                held = r
                    .json::<Value>()
                    .await
                    .ok()
                    .is_some_and(|v| v["running"] == true);
            }
            if !held {
                tokio::time::sleep(POLL).await;
            }
        }
        self.check(held, "GET /jobs/… sees the background run holding the lock");
        let busy = self.send(Who::Curl, Method::POST, &path, &[], None).await;
        self.check(
            busy.status == 409,
            "a run while it holds the lock is refused (409)",
        );
        let done = running.await.ok().and_then(Result::ok);
        let status = done.as_ref().map_or(0, |r| r.status().as_u16());
        self.console.line(format!("<- (background run) {status}"));
        self.check(status == 200, "the background run finishes (200)");
        let after = self.get(Who::Curl, &path).await;
        self.check(
            after.json()["running"] == false
                && after.json()["last_token"].as_u64() > Some(token(&second)),
            "the lock is free again, and the fence remembers the highest token",
        );
    }

    async fn metrics(&mut self) {
        self.section("GET /metrics (Prometheus text format)");
        let m = self.get(Who::Curl, "/metrics").await;
        for (series, what) in [
            (
                "keel_demo_http_requests_total{",
                "requests by route, method and status",
            ),
            ("route=\"/orders\"", "the orders route"),
            (
                "keel_demo_orders_created_total 1",
                "one order created (the replay did not count)",
            ),
            (
                "keel_demo_webhooks_total{outcome=\"duplicate\"} 1",
                "one duplicate webhook",
            ),
            (
                "keel_demo_http_request_duration_seconds",
                "request durations",
            ),
        ] {
            self.check(
                m.status == 200 && m.body.contains(series),
                format!("/metrics has {what}"),
            );
        }
        let lines = m.body.lines().filter(|l| !l.starts_with('#')).count();
        self.console.line(format!("   ({lines} series)"));
    }
}
