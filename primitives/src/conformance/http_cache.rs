//! The HTTP response cache in a real axum server, driven by a real HTTP client, on every
//! backend: a table of RFC 9111 / RFC 5861 header cases (status, body, `Age`, `Cache-Status`,
//! handler calls), conditional requests, origin revalidation, `Vary`, invalidation by unsafe
//! methods and purges, the body cap, collapsed misses across two replicas, and one background
//! revalidation under stale-while-revalidate. Ages run on a [`ManualClock`]; concurrency is
//! arranged with semaphores in the handler and the cache's own counters, never with sleeps.

use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, Method, Request};

use super::http_support::{Server, client, header, serve};
use super::*;
use crate::cache::ManualClock;
use crate::cache::http::{HttpCache, HttpCacheStats};

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(http_cache_rfc9111_header_table),
        case!(http_cache_conditional_requests_get_304_from_the_store),
        case!(http_cache_origin_304_refreshes_stored_headers),
        case!(http_cache_vary_keeps_one_entry_per_variant),
        case!(http_cache_unsafe_methods_invalidate_uri_and_locations),
        case!(http_cache_body_over_the_cap_passes_through_unstored),
        case!(http_cache_purge_by_uri_and_prefix),
        case!(http_cache_concurrent_misses_collapse_across_replicas),
        case!(http_cache_stale_while_revalidate_runs_one_background_revalidation),
    ]
}

/// Start of every manual clock (seconds-aligned so `Expires` arithmetic is exact).
const T0_MS: u64 = 1_700_000_000_000;

/// What the scripted origin answers: for the nth call (1-based), the request it got.
type Script =
    dyn Fn(usize, &Method, &HeaderMap) -> (u16, Vec<(String, String)>, String) + Send + Sync;

#[derive(Clone)]
struct Origin {
    calls: Arc<AtomicUsize>,
    /// Calls from the second on wait for a permit here when set.
    gate: Option<Arc<tokio::sync::Semaphore>>,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    script: Arc<Script>,
}

impl Origin {
    fn new(
        script: impl Fn(usize, &Method, &HeaderMap) -> (u16, Vec<(String, String)>, String)
        + Send
        + Sync
        + 'static,
    ) -> Origin {
        Origin {
            calls: Arc::new(AtomicUsize::new(0)),
            gate: None,
            seen: Arc::new(Mutex::new(Vec::new())),
            script: Arc::new(script),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn app(&self, cache: &HttpCache) -> Router {
        let origin = self.clone();
        Router::new()
            .fallback(move |req: Request<Body>| {
                let origin = origin.clone();
                async move {
                    let n = origin.calls.fetch_add(1, Ordering::SeqCst) + 1;
                    origin.seen.lock().unwrap().push(req.headers().clone());
                    if let Some(gate) = &origin.gate {
                        gate.acquire().await.unwrap().forget();
                    }
                    let (status, headers, body) = (origin.script)(n, req.method(), req.headers());
                    let mut res = Response::builder().status(status);
                    for (k, v) in headers {
                        res = res.header(k, v);
                    }
                    res.body(Body::from(body)).unwrap()
                }
            })
            .layer(cache.layer())
    }
}

fn cache_on(c: &Ctx, clock: &Arc<ManualClock>) -> HttpCache {
    HttpCache::builder(confined(c))
        .clock(Arc::clone(clock) as Arc<dyn crate::cache::Clock>)
        .build()
        .unwrap()
}

fn hv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn get(server: &Server, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = client().get(server.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

fn http_date_at(secs: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// One row of the header table: the origin answers `first` headers with 200 `v1` on its first
/// call, and on later calls 304 when the request's `If-None-Match` names `"e1"`, else
/// `later_status` with the same headers and `v{n}`.
struct Row {
    name: &'static str,
    first: &'static [(&'static str, &'static str)],
    later_status: u16,
    req1: &'static [(&'static str, &'static str)],
    advance_s: u64,
    req2: &'static [(&'static str, &'static str)],
    want_status: u16,
    want_body: &'static str,
    want_calls: usize,
    want_cache_status: &'static str,
    want_age: Option<&'static str>,
}

const ROWS: &[Row] = &[
    Row {
        name: "§4.2 fresh max-age is a hit with Age",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 10,
        req2: &[],
        want_status: 200,
        want_body: "v1",
        want_calls: 1,
        want_cache_status: "keel;hit;ttl=50",
        want_age: Some("10"),
    },
    Row {
        name: "§3 no-store is never stored",
        first: &[("cache-control", "no-store, max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 0,
        req2: &[],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=uri-miss",
        want_age: None,
    },
    Row {
        name: "§3 private is never stored by a shared cache",
        first: &[("cache-control", "private, max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 0,
        req2: &[],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=uri-miss",
        want_age: None,
    },
    Row {
        name: "§3 Set-Cookie is not stored",
        first: &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
        later_status: 200,
        req1: &[],
        advance_s: 0,
        req2: &[],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=uri-miss",
        want_age: None,
    },
    Row {
        name: "§4.2.1 s-maxage wins over max-age",
        first: &[("cache-control", "s-maxage=5, max-age=600")],
        later_status: 200,
        req1: &[],
        advance_s: 10,
        req2: &[],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=stale;fwd-status=200;stored",
        want_age: Some("0"),
    },
    Row {
        name: "§4.2.1 Expires minus response time",
        first: &[("expires", "@+60")],
        later_status: 200,
        req1: &[],
        advance_s: 30,
        req2: &[],
        want_status: 200,
        want_body: "v1",
        want_calls: 1,
        want_cache_status: "keel;hit;ttl=30",
        want_age: Some("30"),
    },
    Row {
        name: "§4.2.1 malformed max-age is stale, never an error",
        first: &[("cache-control", "max-age=soon"), ("etag", "\"e1\"")],
        later_status: 200,
        req1: &[],
        advance_s: 0,
        req2: &[],
        want_status: 200,
        want_body: "v1",
        want_calls: 2,
        want_cache_status: "keel;fwd=stale;fwd-status=304;stored",
        want_age: Some("0"),
    },
    Row {
        name: "§5.2.2.4 no-cache is stored but revalidated",
        first: &[("cache-control", "no-cache"), ("etag", "\"e1\"")],
        later_status: 200,
        req1: &[],
        advance_s: 1,
        req2: &[],
        want_status: 200,
        want_body: "v1",
        want_calls: 2,
        want_cache_status: "keel;fwd=stale;fwd-status=304;stored",
        want_age: Some("0"),
    },
    Row {
        name: "§5.2.1.4 request no-cache forwards",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 1,
        req2: &[("cache-control", "no-cache")],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=request;fwd-status=200;stored",
        want_age: Some("0"),
    },
    Row {
        name: "§5.2.1.5 request no-store forwards",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 1,
        req2: &[("cache-control", "no-store")],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=request",
        want_age: None,
    },
    Row {
        name: "§5.2.1.1 request max-age below the age forwards",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 10,
        req2: &[("cache-control", "max-age=5")],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=request;fwd-status=200;stored",
        want_age: Some("0"),
    },
    Row {
        name: "§5.2.1.3 request min-fresh beyond what is left forwards",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 10,
        req2: &[("cache-control", "min-fresh=55")],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=request;fwd-status=200;stored",
        want_age: Some("0"),
    },
    Row {
        name: "§5.2.1.2 request max-stale accepts a stale entry",
        first: &[("cache-control", "max-age=10")],
        later_status: 200,
        req1: &[],
        advance_s: 20,
        req2: &[("cache-control", "max-stale=30")],
        want_status: 200,
        want_body: "v1",
        want_calls: 1,
        want_cache_status: "keel;hit;ttl=-10",
        want_age: Some("20"),
    },
    Row {
        name: "§4.2.4 must-revalidate refuses max-stale",
        first: &[("cache-control", "max-age=10, must-revalidate")],
        later_status: 200,
        req1: &[],
        advance_s: 20,
        req2: &[("cache-control", "max-stale")],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=stale;fwd-status=200;stored",
        want_age: Some("0"),
    },
    Row {
        name: "§5.2.1.7 only-if-cached with nothing stored is 504",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[("x-skip", "1")],
        advance_s: 0,
        req2: &[("cache-control", "only-if-cached")],
        want_status: 504,
        want_body: "",
        want_calls: 0,
        want_cache_status: "keel;fwd=uri-miss;detail=only-if-cached",
        want_age: None,
    },
    Row {
        name: "§5.2.1.7 only-if-cached with a fresh entry is a hit",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 5,
        req2: &[("cache-control", "only-if-cached")],
        want_status: 200,
        want_body: "v1",
        want_calls: 1,
        want_cache_status: "keel;hit;ttl=55",
        want_age: Some("5"),
    },
    Row {
        name: "§3.5 Authorization does not reuse a plain response",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 1,
        req2: &[("authorization", "Bearer t")],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=miss",
        want_age: None,
    },
    Row {
        name: "§3.5 Authorization reuses a public response",
        first: &[("cache-control", "public, max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 1,
        req2: &[("authorization", "Bearer t")],
        want_status: 200,
        want_body: "v1",
        want_calls: 1,
        want_cache_status: "keel;hit;ttl=59",
        want_age: Some("1"),
    },
    Row {
        name: "§3.5 Authorization reuses an s-maxage response",
        first: &[("cache-control", "s-maxage=60")],
        later_status: 200,
        req1: &[],
        advance_s: 1,
        req2: &[("authorization", "Bearer t")],
        want_status: 200,
        want_body: "v1",
        want_calls: 1,
        want_cache_status: "keel;hit;ttl=59",
        want_age: Some("1"),
    },
    Row {
        name: "§3.5 an Authorization request's plain response is not stored",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[("authorization", "Bearer t")],
        advance_s: 1,
        req2: &[],
        want_status: 200,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=uri-miss;stored",
        want_age: Some("0"),
    },
    Row {
        name: "RFC 5861 stale-if-error serves stale on 503",
        first: &[("cache-control", "max-age=10, stale-if-error=60")],
        later_status: 503,
        req1: &[],
        advance_s: 30,
        req2: &[],
        want_status: 200,
        want_body: "v1",
        want_calls: 2,
        want_cache_status: "keel;fwd=stale;fwd-status=503;detail=stale-if-error",
        want_age: Some("30"),
    },
    Row {
        name: "RFC 5861 stale-if-error ends with its window",
        first: &[("cache-control", "max-age=10, stale-if-error=60")],
        later_status: 503,
        req1: &[],
        advance_s: 100,
        req2: &[],
        want_status: 503,
        want_body: "v2",
        want_calls: 2,
        want_cache_status: "keel;fwd=stale;fwd-status=503",
        want_age: None,
    },
    Row {
        name: "RFC 5861 request stale-if-error serves stale on 500",
        first: &[("cache-control", "max-age=10")],
        later_status: 500,
        req1: &[],
        advance_s: 30,
        req2: &[("cache-control", "stale-if-error=60")],
        want_status: 200,
        want_body: "v1",
        want_calls: 2,
        want_cache_status: "keel;fwd=stale;fwd-status=500;detail=stale-if-error",
        want_age: Some("30"),
    },
    Row {
        name: "§3 HEAD is answered from a stored GET",
        first: &[("cache-control", "max-age=60")],
        later_status: 200,
        req1: &[],
        advance_s: 2,
        req2: &[("x-head", "1")],
        want_status: 200,
        want_body: "",
        want_calls: 1,
        want_cache_status: "keel;hit;ttl=58",
        want_age: Some("2"),
    },
];

async fn http_cache_rfc9111_header_table(c: Ctx) {
    for (i, row) in ROWS.iter().enumerate() {
        let clock = ManualClock::new(T0_MS);
        let cache = HttpCache::builder(confined(&c))
            .namespace(format!("table{i}"))
            .clock(Arc::clone(&clock) as Arc<dyn crate::cache::Clock>)
            .build()
            .unwrap();
        let first: Vec<(String, String)> = row
            .first
            .iter()
            .map(|(k, v)| {
                // `@+N`: an HTTP-date N seconds after the clock's start.
                let v = match v.strip_prefix("@+") {
                    Some(n) => http_date_at(T0_MS / 1000 + n.parse::<u64>().unwrap()),
                    None => (*v).to_owned(),
                };
                ((*k).to_owned(), v)
            })
            .collect();
        let later_status = row.later_status;
        let origin = Origin::new(move |n, _m, h| {
            if n == 1 {
                return (200, first.clone(), "v1".to_owned());
            }
            let inm = h.get("if-none-match").and_then(|v| v.to_str().ok());
            if inm == Some("\"e1\"") {
                return (304, first.clone(), String::new());
            }
            (later_status, first.clone(), format!("v{n}"))
        });
        let server = serve(origin.app(&cache)).await;
        if row.req1.first() != Some(&("x-skip", "1")) {
            let r1 = get(&server, "/t", row.req1).await;
            assert_eq!(r1.status(), 200, "{}: first response", row.name);
            assert_eq!(r1.text().await.unwrap(), "v1", "{}", row.name);
        }
        clock.advance(Duration::from_secs(row.advance_s));
        let r2 = if row.req2.first() == Some(&("x-head", "1")) {
            client().head(server.url("/t")).send().await.unwrap()
        } else {
            get(&server, "/t", row.req2).await
        };
        let status = r2.status().as_u16();
        let cs = header(&r2, "cache-status");
        let age = header(&r2, "age");
        let body = r2.text().await.unwrap();
        let ctx = format!(
            "{}: status {status}, body {body:?}, Cache-Status {cs:?}, Age {age:?}, calls {}",
            row.name,
            origin.calls()
        );
        assert_eq!(status, row.want_status, "{ctx}");
        assert_eq!(body, row.want_body, "{ctx}");
        assert_eq!(origin.calls(), row.want_calls, "{ctx}");
        assert_eq!(cs.as_deref(), Some(row.want_cache_status), "{ctx}");
        assert_eq!(age.as_deref(), row.want_age, "{ctx}");
    }
}

async fn http_cache_conditional_requests_get_304_from_the_store(c: Ctx) {
    let clock = ManualClock::new(T0_MS);
    let cache = cache_on(&c, &clock);
    let lm = http_date_at(T0_MS / 1000 - 3600);
    let lm2 = lm.clone();
    let origin = Origin::new(move |_, _, _| {
        let h = hv(&[
            ("cache-control", "max-age=600"),
            ("etag", "W/\"abc\""),
            ("vary", "accept-language"),
            ("content-location", "/doc.en"),
            ("x-extra", "not in a 304"),
        ]);
        let mut h = h;
        h.push(("last-modified".into(), lm2.clone()));
        (200, h, "document".into())
    });
    let server = serve(origin.app(&cache)).await;
    // The first request is itself conditional: the origin still gets an unconditional one
    // (so the full response is stored), and the client gets its 304.
    let r = get(&server, "/doc", &[("if-none-match", "\"abc\"")]).await;
    assert_eq!(r.status(), 304);
    assert!(
        origin.seen.lock().unwrap()[0]
            .get("if-none-match")
            .is_none()
    );
    clock.advance(Duration::from_secs(5));
    let before = http_date_at(T0_MS / 1000 - 7200);
    let after = http_date_at(T0_MS / 1000);
    for (cond, want) in [
        (("if-none-match", "\"abc\""), 304),
        (("if-none-match", "W/\"abc\""), 304),
        (("if-none-match", "\"x\", W/\"abc\""), 304),
        (("if-none-match", "*"), 304),
        (("if-none-match", "\"other\""), 200),
        (("if-modified-since", after.as_str()), 304),
        (("if-modified-since", before.as_str()), 200),
        (("if-modified-since", "not a date"), 200),
    ] {
        let r = get(&server, "/doc", &[cond]).await;
        assert_eq!(r.status().as_u16(), want, "{cond:?}");
        assert_eq!(header(&r, "age").as_deref(), Some("5"), "{cond:?}");
        assert_eq!(
            header(&r, "cache-status").as_deref(),
            Some("keel;hit;ttl=595")
        );
        if want == 304 {
            // RFC 9110 §15.4.5: the headers a 200 would have sent that a 304 must carry.
            assert_eq!(header(&r, "etag").as_deref(), Some("W/\"abc\""));
            assert_eq!(header(&r, "cache-control").as_deref(), Some("max-age=600"));
            assert_eq!(header(&r, "vary").as_deref(), Some("accept-language"));
            assert_eq!(header(&r, "content-location").as_deref(), Some("/doc.en"));
            assert_eq!(header(&r, "x-extra"), None);
            assert!(r.bytes().await.unwrap().is_empty());
        } else {
            assert_eq!(r.text().await.unwrap(), "document");
        }
    }
    assert_eq!(origin.calls(), 1);
}

async fn http_cache_origin_304_refreshes_stored_headers(c: Ctx) {
    let clock = ManualClock::new(T0_MS);
    let cache = cache_on(&c, &clock);
    let origin = Origin::new(|n, _, h| {
        let inm = h
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match n {
            1 => (
                200,
                hv(&[
                    ("cache-control", "max-age=10"),
                    ("etag", "\"v1\""),
                    ("x-version", "1"),
                ]),
                "body-1".into(),
            ),
            _ if inm.as_deref() == Some("\"v1\"") => (
                304,
                hv(&[
                    ("cache-control", "max-age=100"),
                    ("etag", "\"v1\""),
                    ("x-version", "2"),
                ]),
                String::new(),
            ),
            _ => (
                200,
                hv(&[("cache-control", "max-age=10")]),
                "unexpected".into(),
            ),
        }
    });
    let server = serve(origin.app(&cache)).await;
    assert_eq!(
        get(&server, "/r", &[]).await.text().await.unwrap(),
        "body-1"
    );
    clock.advance(Duration::from_secs(20));
    let r = get(&server, "/r", &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-version").as_deref(),
        Some("2"),
        "the 304's headers replace the stored ones"
    );
    assert_eq!(
        header(&r, "cache-status").as_deref(),
        Some("keel;fwd=stale;fwd-status=304;stored")
    );
    assert_eq!(r.text().await.unwrap(), "body-1");
    assert_eq!(
        origin.seen.lock().unwrap()[1]
            .get("if-none-match")
            .map(|v| v.to_str().unwrap().to_owned())
            .as_deref(),
        Some("\"v1\""),
        "revalidation sends the stored validator"
    );
    // Fresh again for the 304's max-age.
    clock.advance(Duration::from_secs(50));
    let r = get(&server, "/r", &[]).await;
    assert_eq!(
        header(&r, "cache-status").as_deref(),
        Some("keel;hit;ttl=50")
    );
    assert_eq!(header(&r, "x-version").as_deref(), Some("2"));
    assert_eq!(origin.calls(), 2);
}

async fn http_cache_vary_keeps_one_entry_per_variant(c: Ctx) {
    let clock = ManualClock::new(T0_MS);
    let cache = cache_on(&c, &clock);
    let origin = Origin::new(|n, _, h| {
        let lang = h
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        (
            200,
            hv(&[("cache-control", "max-age=60"), ("vary", "Accept-Language")]),
            format!("{lang}#{n}"),
        )
    });
    let server = serve(origin.app(&cache)).await;
    let body = |r: reqwest::Response| async move {
        let cs = header(&r, "cache-status").unwrap_or_default();
        (r.text().await.unwrap(), cs)
    };
    assert_eq!(
        body(get(&server, "/v", &[("accept-language", "en")]).await).await,
        ("en#1".into(), "keel;fwd=uri-miss;stored".into())
    );
    assert_eq!(
        body(get(&server, "/v", &[("accept-language", "fr")]).await).await,
        ("fr#2".into(), "keel;fwd=vary-miss;stored".into())
    );
    assert_eq!(
        body(get(&server, "/v", &[("accept-language", "en")]).await)
            .await
            .0,
        "en#1"
    );
    // Normalised: surrounding and repeated whitespace does not make another variant.
    assert_eq!(
        body(get(&server, "/v", &[("accept-language", "  en ")]).await)
            .await
            .0,
        "en#1"
    );
    assert_eq!(
        body(get(&server, "/v", &[("accept-language", "fr")]).await)
            .await
            .0,
        "fr#2"
    );
    assert_eq!(
        body(get(&server, "/v", &[]).await).await,
        ("none#3".into(), "keel;fwd=vary-miss;stored".into())
    );
    assert_eq!(origin.calls(), 3);
    // Vary: * never matches, so it is never stored.
    let star = Origin::new(|n, _, _| {
        (
            200,
            hv(&[("cache-control", "max-age=60"), ("vary", "*")]),
            format!("star#{n}"),
        )
    });
    let server = serve(star.app(&cache)).await;
    assert_eq!(
        get(&server, "/star", &[]).await.text().await.unwrap(),
        "star#1"
    );
    assert_eq!(
        get(&server, "/star", &[]).await.text().await.unwrap(),
        "star#2"
    );
}

async fn http_cache_unsafe_methods_invalidate_uri_and_locations(c: Ctx) {
    let clock = ManualClock::new(T0_MS);
    let cache = cache_on(&c, &clock);
    let origin = Origin::new(|n, m, _| match *m {
        Method::POST => (
            201,
            hv(&[
                ("location", "/items/2"),
                ("content-location", "http://elsewhere.example/items/3"),
            ]),
            String::new(),
        ),
        Method::DELETE => (500, vec![], String::new()),
        _ => (
            200,
            hv(&[("cache-control", "max-age=600")]),
            format!("#{n}"),
        ),
    });
    let server = serve(origin.app(&cache)).await;
    for p in ["/items/1", "/items/2", "/items/3"] {
        get(&server, p, &[]).await;
    }
    assert_eq!(origin.calls(), 3);
    let http = client();
    // A failed DELETE invalidates nothing.
    assert_eq!(
        http.delete(server.url("/items/1"))
            .send()
            .await
            .unwrap()
            .status(),
        500
    );
    assert_eq!(
        header(&get(&server, "/items/1", &[]).await, "cache-status").as_deref(),
        Some("keel;hit;ttl=600")
    );
    // A POST to /items/1 drops its entry and its Location's; the Content-Location on another
    // host is left alone.
    assert_eq!(
        http.post(server.url("/items/1"))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    for (p, want) in [
        ("/items/1", "keel;fwd=uri-miss;stored"),
        ("/items/2", "keel;fwd=uri-miss;stored"),
        ("/items/3", "keel;hit;ttl=600"),
    ] {
        assert_eq!(
            header(&get(&server, p, &[]).await, "cache-status").as_deref(),
            Some(want),
            "{p}"
        );
    }
    assert!(cache.stats().invalidations >= 2);
}

async fn http_cache_body_over_the_cap_passes_through_unstored(c: Ctx) {
    let clock = ManualClock::new(T0_MS);
    let cache = HttpCache::builder(confined(&c))
        .clock(Arc::clone(&clock) as Arc<dyn crate::cache::Clock>)
        .body_cap(1024)
        .build()
        .unwrap();
    let origin = Origin::new(|_, _, h| {
        let size: usize = h
            .get("x-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        (
            200,
            hv(&[("cache-control", "max-age=60")]),
            "x".repeat(size),
        )
    });
    let server = serve(origin.app(&cache)).await;
    for _ in 0..2 {
        let r = get(&server, "/big", &[("x-size", "4096")]).await;
        assert_eq!(
            header(&r, "cache-status").as_deref(),
            Some("keel;fwd=uri-miss;detail=too-large")
        );
        assert_eq!(
            r.text().await.unwrap().len(),
            4096,
            "the large body passes through whole"
        );
    }
    assert_eq!(origin.calls(), 2);
    for _ in 0..2 {
        assert_eq!(
            get(&server, "/small", &[("x-size", "1024")])
                .await
                .text()
                .await
                .unwrap()
                .len(),
            1024
        );
    }
    assert_eq!(origin.calls(), 3, "a body at the cap is stored");
    // The default cap is 1 MiB.
    assert_eq!(crate::cache::http::BODY_BYTES_DEFAULT, 1 << 20);
}

async fn http_cache_purge_by_uri_and_prefix(c: Ctx) {
    let clock = ManualClock::new(T0_MS);
    let cache = cache_on(&c, &clock);
    let origin = Origin::new(|n, _, _| {
        (
            200,
            hv(&[("cache-control", "max-age=600")]),
            format!("#{n}"),
        )
    });
    let server = serve(origin.app(&cache)).await;
    for p in ["/a/1", "/a/2?x=1", "/b/1"] {
        get(&server, p, &[]).await;
    }
    let base = format!("http://{}", server.addr);
    assert!(cache.purge(&format!("{base}/a/1")).await.unwrap());
    assert!(!cache.purge(&format!("{base}/a/1")).await.unwrap());
    assert_eq!(
        header(&get(&server, "/a/1", &[]).await, "cache-status").as_deref(),
        Some("keel;fwd=uri-miss;stored")
    );
    assert!(cache.purge_prefix(&format!("{base}/a/")).await.unwrap() >= 2);
    assert_eq!(
        header(&get(&server, "/a/2?x=1", &[]).await, "cache-status").as_deref(),
        Some("keel;fwd=uri-miss;stored")
    );
    assert_eq!(
        header(&get(&server, "/b/1", &[]).await, "cache-status").as_deref(),
        Some("keel;hit;ttl=600")
    );
    assert!(cache.purge("not a uri at all").await.is_err());
}

const COLLAPSE_REQUESTS: usize = 20;

async fn http_cache_concurrent_misses_collapse_across_replicas(c: Ctx) {
    let clock = ManualClock::new(T0_MS);
    // Two replicas: two caches (each with its own in-process single-flight) and two servers
    // on one backend, in front of one origin.
    let replicas = [cache_on(&c, &clock), cache_on(&c, &clock)];
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut origin = Origin::new(|n, _, _| {
        (
            200,
            hv(&[("cache-control", "max-age=60")]),
            format!("report#{n}"),
        )
    });
    // The first call waits too: the gate holds every call until released.
    origin.gate = Some(Arc::clone(&gate));
    let servers = [
        serve(origin.app(&replicas[0])).await,
        serve(origin.app(&replicas[1])).await,
    ];
    let http = client();
    let mut handles = Vec::new();
    for i in 0..COLLAPSE_REQUESTS {
        // Same key on both replicas: the Host header names one site.
        let req = http
            .get(servers[i % 2].url("/report"))
            .header("host", "site.example");
        handles.push(tokio::spawn(async move { req.send().await.unwrap() }));
    }
    until("one request reached the origin", || origin.calls() >= 1).await;
    let waits = |s: [HttpCacheStats; 2]| s[0].collapsed_waits + s[1].collapsed_waits;
    until("every other request waits for it", || {
        waits([replicas[0].stats(), replicas[1].stats()]) as usize >= COLLAPSE_REQUESTS - 1
    })
    .await;
    gate.add_permits(COLLAPSE_REQUESTS);
    let mut collapsed = 0;
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!(r.status(), 200);
        let cs = header(&r, "cache-status");
        if cs.as_deref().is_some_and(|s| s.contains("collapsed")) {
            collapsed += 1;
        }
        let stats = [replicas[0].stats(), replicas[1].stats()];
        assert_eq!(
            r.text().await.unwrap(),
            "report#1",
            "Cache-Status {cs:?}, {stats:?}"
        );
    }
    assert_eq!(
        origin.calls(),
        1,
        "{COLLAPSE_REQUESTS} concurrent misses, one handler call"
    );
    assert_eq!(collapsed, COLLAPSE_REQUESTS - 1);
}

async fn http_cache_stale_while_revalidate_runs_one_background_revalidation(c: Ctx) {
    let clock = ManualClock::new(T0_MS);
    let cache = cache_on(&c, &clock);
    let gate = Arc::new(tokio::sync::Semaphore::new(1));
    let mut origin = Origin::new(|n, _, _| {
        (
            200,
            hv(&[("cache-control", "max-age=10, stale-while-revalidate=600")]),
            format!("v{n}"),
        )
    });
    origin.gate = Some(Arc::clone(&gate));
    let server = serve(origin.app(&cache)).await;
    assert_eq!(get(&server, "/swr", &[]).await.text().await.unwrap(), "v1");
    clock.advance(Duration::from_secs(30));
    // Every request is answered stale at once, while the one background revalidation waits
    // at the gate.
    let mut handles = Vec::new();
    for _ in 0..10 {
        let url = server.url("/swr");
        handles.push(tokio::spawn(async move {
            client().get(url).send().await.unwrap()
        }));
    }
    for h in handles {
        let r = h.await.unwrap();
        assert_eq!(
            header(&r, "cache-status").as_deref(),
            Some("keel;hit;ttl=-20")
        );
        assert_eq!(header(&r, "age").as_deref(), Some("30"));
        assert_eq!(r.text().await.unwrap(), "v1");
    }
    until("the background revalidation reached the origin", || {
        origin.calls() == 2
    })
    .await;
    gate.add_permits(1);
    until("the background revalidation finished", || {
        cache.stats().background_revalidations == 1
    })
    .await;
    let r = get(&server, "/swr", &[]).await;
    assert_eq!(
        header(&r, "cache-status").as_deref(),
        Some("keel;hit;ttl=10")
    );
    assert_eq!(r.text().await.unwrap(), "v2");
    assert_eq!(
        origin.calls(),
        2,
        "exactly one revalidation for 10 stale hits"
    );
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(ms(1)).await;
    }
}
