//! The rate-limit layer in a real axum server, driven by a real HTTP client, on every backend.

use axum::Router;
use axum::routing::get;
use http::{HeaderName, Method};

use super::http_support::{Outage, client, header, problem, serve, serve_without_connect_info};
use super::*;
use crate::http::{Extractor, OnBackendError, OnExtractError, TrustedProxies};
use crate::ratelimit::{
    ManualClock, Quota, QuotaOverrides, RateLimitLayer, RateLimiter, Route, Stacked, Strategy,
};

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(http_ratelimit_headers_exact_on_admitted_and_denied),
        case!(http_ratelimit_429_after_the_quota_on_the_backend_clock),
        case!(http_ratelimit_two_servers_share_one_quota),
        case!(http_ratelimit_trusted_proxy_refuses_spoofed_forwarded_for),
        case!(http_ratelimit_fail_open_and_fail_closed_with_the_backend_down),
        case!(http_ratelimit_shadow_mode_never_rejects),
        case!(http_ratelimit_per_route_method_and_plan_overrides),
        case!(http_ratelimit_key_failure_has_the_chosen_outcome),
    ]
}

/// A whole hour, so hour and minute windows begin exactly here.
const START_MS: u64 = 1_699_999_200_000;

fn app(layer: RateLimitLayer) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/login", get(|| async { "form" }).post(|| async { "in" }))
        .layer(layer)
}

fn limiter(b: &Arc<dyn Backend>, name: &str, s: Strategy, q: Quota) -> RateLimiter {
    RateLimiter::new(Arc::clone(b), name, s, q).unwrap()
}

async fn http_ratelimit_headers_exact_on_admitted_and_denied(c: Ctx) {
    let b = confined(&c);
    let clock = ManualClock::new(START_MS);
    let with_clock = |l: RateLimiter| l.with_clock(Arc::new(clock.clone()));
    let burst = with_clock(limiter(
        &b,
        "burst",
        Strategy::FixedWindow,
        Quota::per_minute(3),
    ));
    let hourly = with_clock(limiter(
        &b,
        "hourly",
        Strategy::FixedWindow,
        Quota::per_hour(10),
    ));
    let stack = Stacked::new(vec![burst, hourly]).unwrap();
    let server = serve(app(RateLimitLayer::new(stack))).await;
    let http = client();
    let policy = r#""burst";q=3;w=60, "hourly";q=10;w=3600"#;
    for remaining in [2u64, 1, 0] {
        let r = http.get(server.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "ratelimit-policy").as_deref(), Some(policy));
        let state = format!(
            r#""burst";r={remaining};t=60, "hourly";r={};t=3600"#,
            remaining + 7
        );
        assert_eq!(header(&r, "ratelimit").as_deref(), Some(state.as_str()));
        assert_eq!(header(&r, "x-ratelimit-limit").as_deref(), Some("3"));
        assert_eq!(
            header(&r, "x-ratelimit-remaining"),
            Some(remaining.to_string())
        );
        assert_eq!(header(&r, "x-ratelimit-reset").as_deref(), Some("60"));
        assert_eq!(header(&r, "retry-after"), None);
        assert_eq!(r.text().await.unwrap(), "ok");
    }
    let r = http.get(server.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "ratelimit-policy").as_deref(), Some(policy));
    assert_eq!(
        header(&r, "ratelimit").as_deref(),
        Some(r#""burst";r=0;t=60, "hourly";r=7;t=3600"#)
    );
    assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("0"));
    assert_eq!(header(&r, "retry-after").as_deref(), Some("60"));
    let doc = problem(r).await;
    assert_eq!(doc["status"], 429);
    assert_eq!(doc["policy"], "burst");
    assert_eq!(doc["code"], "rate_limited");
    // The denial consumed nothing: a minute later the burst is full and the hour lost 3.
    clock.advance(Duration::from_secs(60));
    let r = http.get(server.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "ratelimit").as_deref(),
        Some(r#""burst";r=2;t=60, "hourly";r=6;t=3540"#)
    );
}

async fn http_ratelimit_429_after_the_quota_on_the_backend_clock(c: Ctx) {
    let b = confined(&c);
    let l = limiter(&b, "api", Strategy::Gcra, Quota::per_minute(5));
    let server = serve(app(RateLimitLayer::new(l))).await;
    let http = client();
    for _ in 0..5 {
        let r = http.get(server.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = http.get(server.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    // GCRA at 5/min admits the next request 12 s after the last admission at the latest.
    let retry: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "Retry-After {retry}");
    assert_eq!(problem(r).await["policy"], "api");
}

async fn http_ratelimit_two_servers_share_one_quota(c: Ctx) {
    let b = confined(&c);
    // Two layers built separately (as two replicas would), sharing only the backend.
    let layer = || {
        RateLimitLayer::new(limiter(
            &b,
            "shared",
            Strategy::SlidingWindow,
            Quota::per_hour(6),
        ))
    };
    let (one, two) = (serve(app(layer())).await, serve(app(layer())).await);
    let http = client();
    let mut admitted = 0;
    for i in 0..12 {
        let server = if i % 2 == 0 { &one } else { &two };
        let r = http.get(server.url("/")).send().await.unwrap();
        if r.status() == 200 {
            admitted += 1;
            assert_eq!(
                header(&r, "x-ratelimit-remaining"),
                Some((6 - admitted).to_string())
            );
        } else {
            assert_eq!(r.status(), 429);
        }
    }
    assert_eq!(admitted, 6, "one quota across both servers");
}

async fn http_ratelimit_trusted_proxy_refuses_spoofed_forwarded_for(c: Ctx) {
    let b = confined(&c);
    let layer = |name: &str, trusted: &[&str]| {
        RateLimitLayer::builder()
            .limiter(limiter(&b, name, Strategy::FixedWindow, Quota::per_hour(2)))
            .key(Extractor::client_ip(TrustedProxies::new(trusted).unwrap()))
            .build()
            .unwrap()
    };
    let http = client();
    // The loopback peer is not a trusted proxy: its X-Forwarded-For is the client's own claim.
    let untrusting = serve(app(layer("untrusting", &["10.0.0.0/8"]))).await;
    let mut statuses = Vec::new();
    for spoof in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        let r = http
            .get(untrusting.url("/"))
            .header("x-forwarded-for", spoof)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429], "spoofing must not buy quota");
    // Behind a trusted proxy (the loopback peer), each forwarded client has its own quota.
    let trusting = serve(app(layer("trusting", &["127.0.0.1/32", "10.0.0.0/8"]))).await;
    let mut statuses = Vec::new();
    for chain in [
        "198.51.100.1, 10.0.0.7",
        "198.51.100.2",
        "198.51.100.1",
        "9.9.9.9, 198.51.100.1, 10.1.1.1",
    ] {
        let r = http
            .get(trusting.url("/"))
            .header("x-forwarded-for", chain)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    // 198.51.100.1 is the client in chains 1, 3 and 4 (the forged 9.9.9.9 is ignored).
    assert_eq!(statuses, [200, 200, 200, 429]);
}

async fn http_ratelimit_fail_open_and_fail_closed_with_the_backend_down(c: Ctx) {
    let outage = Outage::new(confined(&c));
    let b: Arc<dyn Backend> = outage.clone();
    let layer = |name: &str, on_error| {
        RateLimitLayer::builder()
            .limiter(limiter(&b, name, Strategy::Gcra, Quota::per_hour(100)))
            .on_backend_error(on_error)
            .build()
            .unwrap()
    };
    let open = serve(app(layer("open", OnBackendError::FailOpen))).await;
    let closed = serve(app(layer("closed", OnBackendError::FailClosed))).await;
    let http = client();
    let r = http.get(open.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "ratelimit").is_some());

    outage.set_down(true);
    let r = http.get(open.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200, "fail-open admits");
    assert_eq!(header(&r, "ratelimit"), None, "no decision, no headers");
    assert_eq!(header(&r, "x-ratelimit-limit"), None);
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = http.get(closed.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503, "fail-closed rejects");
    assert_eq!(problem(r).await["code"], "rate_limit_unavailable");

    outage.set_down(false);
    let r = http.get(closed.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "ratelimit").is_some());
}

async fn http_ratelimit_shadow_mode_never_rejects(c: Ctx) {
    let b = confined(&c);
    let l = || limiter(&b, "shadowed", Strategy::FixedWindow, Quota::per_hour(1));
    let shadow = RateLimitLayer::builder()
        .limiter(l())
        .shadow(true)
        .build()
        .unwrap();
    let server = serve(app(shadow)).await;
    let http = client();
    for _ in 0..3 {
        let r = http.get(server.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "ratelimit"), None);
        assert_eq!(header(&r, "retry-after"), None);
    }
    // The shadow decisions were real: the same policy, enforced, has nothing left.
    let enforced = serve(app(RateLimitLayer::new(l()))).await;
    let r = http.get(enforced.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 429);
}

async fn http_ratelimit_per_route_method_and_plan_overrides(c: Ctx) {
    let b = confined(&c);
    let user = HeaderName::from_static("x-user");
    let layer = RateLimitLayer::builder()
        .limiter(limiter(
            &b,
            "default",
            Strategy::FixedWindow,
            Quota::per_hour(100),
        ))
        .route(
            Route::new(
                "/login",
                limiter(&b, "login", Strategy::FixedWindow, Quota::per_hour(2)),
            )
            .methods([Method::POST]),
        )
        .key(Extractor::header(user))
        .quota_override(|parts: http::request::Parts| async move {
            // A plan tier, resolved asynchronously from the request (here: a header).
            match parts.headers.get("x-plan").map(|v| v.as_bytes()) {
                Some(b"pro") => QuotaOverrides::new().set("login", Quota::per_hour(5)),
                _ => QuotaOverrides::new(),
            }
        })
        .build()
        .unwrap();
    let server = serve(app(layer)).await;
    let http = client();
    let post = |who: &'static str, plan: Option<&'static str>| {
        let mut req = http.post(server.url("/login")).header("x-user", who);
        if let Some(plan) = plan {
            req = req.header("x-plan", plan);
        }
        req.send()
    };
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(post("free", None).await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    // Other methods on the route, and other routes, use the default policy.
    let r = http
        .get(server.url("/login"))
        .header("x-user", "free")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "ratelimit-policy").as_deref(),
        Some(r#""default";q=100;w=3600"#)
    );
    // The pro plan gets 5 logins an hour.
    for _ in 0..5 {
        let r = post("pro", Some("pro")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "ratelimit-policy").as_deref(),
            Some(r#""login";q=5;w=3600"#)
        );
    }
    let r = post("pro", Some("pro")).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(problem(r).await["policy"], "login");
    // A missing key is a 400, not a panic.
    let r = http.get(server.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

async fn http_ratelimit_key_failure_has_the_chosen_outcome(c: Ctx) {
    let b = confined(&c);
    let layer = |name: &str, outcome| {
        RateLimitLayer::builder()
            .limiter(limiter(&b, name, Strategy::Gcra, Quota::per_hour(100)))
            .on_extract_error(outcome)
            .build()
            .unwrap()
    };
    let http = client();
    // Served without ConnectInfo, the peer-IP key cannot exist: the answer says how to fix it.
    let bad = serve_without_connect_info(app(layer("a", OnExtractError::BadRequest))).await;
    let r = http.get(bad.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let doc = problem(r).await;
    assert_eq!(doc["code"], "rate_limit_key_missing");
    assert!(
        doc["detail"]
            .as_str()
            .unwrap()
            .contains("into_make_service_with_connect_info"),
        "{doc}"
    );
    let internal =
        serve_without_connect_info(app(layer("b", OnExtractError::InternalServerError))).await;
    assert_eq!(
        http.get(internal.url("/")).send().await.unwrap().status(),
        500
    );
    let skip = serve_without_connect_info(app(layer("c", OnExtractError::Skip))).await;
    let r = http.get(skip.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200, "skip: the layer steps aside");
    assert_eq!(header(&r, "ratelimit"), None);
}
