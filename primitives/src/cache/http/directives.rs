//! Parsing what RFC 9111 decides on: `Cache-Control` request and response directives, the
//! freshness lifetime and age of a stored response (§4.2), and entity-tag comparison for
//! conditional requests (RFC 9110 §8.8.3, §13.1.2).
//!
//! Malformed input is read conservatively, never as an error: an invalid or conflicting
//! freshness directive makes the response stale (§4.2.1), an unknown directive is ignored,
//! `private` or `no-cache` with field names count as their unqualified forms, and a request's
//! invalid `max-age` means 0 (revalidate).

use std::time::SystemTime;

use http::HeaderMap;
use http::header::{CACHE_CONTROL, DATE, EXPIRES};

/// delta-seconds above this are read as this (RFC 9111 §1.2.2).
pub(crate) const DELTA_SECONDS_MAX: u64 = 2_147_483_648;

/// One directive: a lower-cased name and its value (unquoted), if any.
type Directive = (String, Option<String>);

/// Splits every `Cache-Control` field line into directives, honouring quoted strings (a comma
/// inside quotes does not split). Lines that are not visible ASCII are skipped.
fn directives(headers: &HeaderMap) -> Vec<Directive> {
    let mut out = Vec::new();
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        let mut chars = text.chars().peekable();
        loop {
            // name
            let mut name = String::new();
            while let Some(&c) = chars.peek() {
                if c == ',' || c == '=' {
                    break;
                }
                name.push(c);
                chars.next();
            }
            let mut val = None;
            if chars.peek() == Some(&'=') {
                chars.next();
                let mut v = String::new();
                while chars.peek() == Some(&' ') || chars.peek() == Some(&'\t') {
                    chars.next();
                }
                if chars.peek() == Some(&'"') {
                    chars.next();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some(e) = chars.next() {
                                    v.push(e);
                                }
                            }
                            '"' => break,
                            c => v.push(c),
                        }
                    }
                    // Skip anything up to the next comma.
                    while let Some(&c) = chars.peek() {
                        if c == ',' {
                            break;
                        }
                        chars.next();
                    }
                } else {
                    while let Some(&c) = chars.peek() {
                        if c == ',' {
                            break;
                        }
                        v.push(c);
                        chars.next();
                    }
                }
                val = Some(v.trim().to_owned());
            }
            let name = name.trim().to_ascii_lowercase();
            if !name.is_empty() {
                out.push((name, val));
            }
            if chars.next().is_none() {
                break;
            }
        }
    }
    out
}

/// delta-seconds: digits only; `None` for anything else (a sign, a fraction, empty).
fn delta_seconds(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: only overflow can fail, and that is the maximum.
    Some(
        v.parse::<u64>()
            .unwrap_or(DELTA_SECONDS_MAX)
            .min(DELTA_SECONDS_MAX),
    )
}

/// The directives of a response that decide whether and how it is stored and reused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResponseCc {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    /// A freshness directive was invalid or given twice with different values: stale.
    pub invalid_freshness: bool,
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

/// Reads one freshness directive into `slot`, flagging invalid or conflicting values.
fn freshness(slot: &mut Option<u64>, invalid: &mut bool, v: Option<&str>) {
    match v.and_then(delta_seconds) {
        Some(n) => match *slot {
            Some(prev) if prev != n => *invalid = true,
            _ => *slot = Some(n),
        },
        None => *invalid = true,
    }
}

impl ResponseCc {
    pub(crate) fn parse(headers: &HeaderMap) -> ResponseCc {
        let mut cc = ResponseCc::default();
        for (name, v) in directives(headers) {
            let v = v.as_deref();
            match name.as_str() {
                "max-age" => freshness(&mut cc.max_age, &mut cc.invalid_freshness, v),
                "s-maxage" => freshness(&mut cc.s_maxage, &mut cc.invalid_freshness, v),
                "no-store" => cc.no_store = true,
                // With field names these forbid reusing part of the response; a shared cache
                // that does not strip fields treats them as the whole (conservative).
                "no-cache" => cc.no_cache = true,
                "private" => cc.private = true,
                "public" => cc.public = true,
                "must-revalidate" => cc.must_revalidate = true,
                "proxy-revalidate" => cc.proxy_revalidate = true,
                "stale-while-revalidate" => {
                    cc.stale_while_revalidate = v.and_then(delta_seconds);
                }
                "stale-if-error" => cc.stale_if_error = v.and_then(delta_seconds),
                _ => {}
            }
        }
        cc
    }

    /// Whether a stale response may be served without revalidation at all (§4.2.4): not with
    /// `must-revalidate`, `proxy-revalidate` or `s-maxage` in a shared cache.
    pub(crate) fn may_serve_stale(&self) -> bool {
        !(self.must_revalidate || self.proxy_revalidate || self.s_maxage.is_some())
    }
}

/// The directives of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RequestCc {
    pub no_cache: bool,
    pub no_store: bool,
    pub max_age: Option<u64>,
    /// `Some(None)`: `max-stale` without a value (any staleness).
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
    pub only_if_cached: bool,
    pub stale_if_error: Option<u64>,
}

impl RequestCc {
    pub(crate) fn parse(headers: &HeaderMap) -> RequestCc {
        let mut cc = RequestCc::default();
        for (name, v) in directives(headers) {
            let v = v.as_deref();
            match name.as_str() {
                "no-cache" => cc.no_cache = true,
                "no-store" => cc.no_store = true,
                // Invalid: 0, the strictest reading (revalidate).
                "max-age" => {
                    let n = v.and_then(delta_seconds).unwrap_or(0);
                    cc.max_age = Some(cc.max_age.map_or(n, |m| m.min(n)));
                }
                "max-stale" => {
                    cc.max_stale = match v {
                        None => Some(None),
                        // Invalid: no extra staleness.
                        Some(v) => Some(Some(delta_seconds(v).unwrap_or(0))),
                    }
                }
                // Invalid: the whole remaining lifetime must be left (never fresh enough).
                "min-fresh" => {
                    cc.min_fresh = Some(v.and_then(delta_seconds).unwrap_or(DELTA_SECONDS_MAX));
                }
                "only-if-cached" => cc.only_if_cached = true,
                "stale-if-error" => cc.stale_if_error = v.and_then(delta_seconds),
                _ => {}
            }
        }
        cc
    }
}

/// An HTTP-date header as Unix seconds; `None` when absent or not a date.
pub(crate) fn http_date(headers: &HeaderMap, name: http::HeaderName) -> Option<u64> {
    let text = headers.get(name)?.to_str().ok()?;
    let t = httpdate::parse_http_date(text.trim()).ok()?;
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// The freshness lifetime in seconds (§4.2.1) for a shared cache: `s-maxage`, else `max-age`,
/// else `Expires` minus `Date` (the response time when there is no `Date`). An invalid
/// `Expires` (such as `0`) is in the past. `None`: no explicit freshness (keel applies no
/// heuristic, so such a response is reused only after revalidation).
pub(crate) fn freshness_lifetime(
    cc: &ResponseCc,
    headers: &HeaderMap,
    response_s: u64,
) -> Option<u64> {
    if cc.invalid_freshness {
        return Some(0);
    }
    if let Some(s) = cc.s_maxage {
        return Some(s);
    }
    if let Some(m) = cc.max_age {
        return Some(m);
    }
    if headers.contains_key(EXPIRES) {
        if headers.get_all(EXPIRES).iter().count() > 1 {
            return Some(0);
        }
        return Some(match http_date(headers, EXPIRES) {
            Some(expires) => {
                let date = http_date(headers, DATE).unwrap_or(response_s);
                expires.saturating_sub(date)
            }
            None => 0,
        });
    }
    None
}

/// The age of a response when it arrived (§4.2.3): the larger of the apparent age (response
/// time minus `Date`) and the `Age` it came with plus the time it took.
pub(crate) fn initial_age(headers: &HeaderMap, request_s: u64, response_s: u64) -> u64 {
    let apparent = http_date(headers, DATE).map_or(0, |date| response_s.saturating_sub(date));
    let age_value = headers
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| delta_seconds(v.trim()))
        .unwrap_or(0);
    let corrected = age_value + response_s.saturating_sub(request_s);
    apparent.max(corrected)
}

/// An entity tag: whether it is weak, and its opaque tag (with quotes).
fn entity_tag(s: &str) -> Option<(bool, &str)> {
    let s = s.trim();
    let (weak, tag) = match s.strip_prefix("W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    (tag.len() >= 2 && tag.starts_with('"') && tag.ends_with('"')).then_some((weak, tag))
}

/// Whether an `If-None-Match` value matches the stored `ETag` by weak comparison (RFC 9110
/// §13.1.2): `*` matches any stored response; a malformed list matches nothing.
pub(crate) fn if_none_match(condition: &str, etag: Option<&str>) -> bool {
    if condition.trim() == "*" {
        return true;
    }
    let Some((_, stored)) = etag.and_then(entity_tag) else {
        return false;
    };
    condition
        .split(',')
        .filter_map(entity_tag)
        .any(|(_, tag)| tag == stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn resp(cc: &[&str]) -> ResponseCc {
        let pairs: Vec<_> = cc.iter().map(|v| ("cache-control", *v)).collect();
        ResponseCc::parse(&headers(&pairs))
    }

    fn req(cc: &str) -> RequestCc {
        RequestCc::parse(&headers(&[("cache-control", cc)]))
    }

    #[test]
    fn response_directives_table() {
        let d = ResponseCc::default;
        let cases: Vec<(Vec<&str>, ResponseCc)> = vec![
            (
                vec!["max-age=60"],
                ResponseCc {
                    max_age: Some(60),
                    ..d()
                },
            ),
            (
                vec!["MAX-AGE=60, Public"],
                ResponseCc {
                    max_age: Some(60),
                    public: true,
                    ..d()
                },
            ),
            (
                vec!["max-age=\"60\""],
                ResponseCc {
                    max_age: Some(60),
                    ..d()
                },
            ),
            (
                vec!["s-maxage=10, max-age=60"],
                ResponseCc {
                    max_age: Some(60),
                    s_maxage: Some(10),
                    ..d()
                },
            ),
            (
                vec!["max-age=60", "max-age=60"],
                ResponseCc {
                    max_age: Some(60),
                    ..d()
                },
            ),
            (
                vec!["max-age=60", "max-age=30"],
                ResponseCc {
                    max_age: Some(60),
                    invalid_freshness: true,
                    ..d()
                },
            ),
            (
                vec!["max-age=-1"],
                ResponseCc {
                    invalid_freshness: true,
                    ..d()
                },
            ),
            (
                vec!["max-age=1.5"],
                ResponseCc {
                    invalid_freshness: true,
                    ..d()
                },
            ),
            (
                vec!["max-age"],
                ResponseCc {
                    invalid_freshness: true,
                    ..d()
                },
            ),
            (
                vec!["max-age=99999999999999999999"],
                ResponseCc {
                    max_age: Some(DELTA_SECONDS_MAX),
                    ..d()
                },
            ),
            (
                vec!["no-store"],
                ResponseCc {
                    no_store: true,
                    ..d()
                },
            ),
            (
                vec!["no-cache=\"set-cookie, x-a\", max-age=5"],
                ResponseCc {
                    no_cache: true,
                    max_age: Some(5),
                    ..d()
                },
            ),
            (
                vec!["private=\"x\""],
                ResponseCc {
                    private: true,
                    ..d()
                },
            ),
            (
                vec!["must-revalidate, proxy-revalidate"],
                ResponseCc {
                    must_revalidate: true,
                    proxy_revalidate: true,
                    ..d()
                },
            ),
            (
                vec!["max-age=1, stale-while-revalidate=30, stale-if-error=600"],
                ResponseCc {
                    max_age: Some(1),
                    stale_while_revalidate: Some(30),
                    stale_if_error: Some(600),
                    ..d()
                },
            ),
            (
                vec![",,, ,max-age=5,,"],
                ResponseCc {
                    max_age: Some(5),
                    ..d()
                },
            ),
            (
                vec!["unknown-ext=\"a,b\", max-age=7"],
                ResponseCc {
                    max_age: Some(7),
                    ..d()
                },
            ),
            (vec!["garbage;;; =="], d()),
            (vec![""], d()),
        ];
        for (input, want) in cases {
            assert_eq!(resp(&input), want, "Cache-Control: {input:?}");
        }
    }

    #[test]
    fn request_directives_table() {
        let d = RequestCc::default;
        let cases: Vec<(&str, RequestCc)> = vec![
            (
                "no-cache",
                RequestCc {
                    no_cache: true,
                    ..d()
                },
            ),
            (
                "no-store",
                RequestCc {
                    no_store: true,
                    ..d()
                },
            ),
            (
                "max-age=0",
                RequestCc {
                    max_age: Some(0),
                    ..d()
                },
            ),
            (
                "max-age=abc",
                RequestCc {
                    max_age: Some(0),
                    ..d()
                },
            ),
            (
                "max-age=10, max-age=5",
                RequestCc {
                    max_age: Some(5),
                    ..d()
                },
            ),
            (
                "max-stale",
                RequestCc {
                    max_stale: Some(None),
                    ..d()
                },
            ),
            (
                "max-stale=30",
                RequestCc {
                    max_stale: Some(Some(30)),
                    ..d()
                },
            ),
            (
                "max-stale=x",
                RequestCc {
                    max_stale: Some(Some(0)),
                    ..d()
                },
            ),
            (
                "min-fresh=20",
                RequestCc {
                    min_fresh: Some(20),
                    ..d()
                },
            ),
            (
                "min-fresh=",
                RequestCc {
                    min_fresh: Some(DELTA_SECONDS_MAX),
                    ..d()
                },
            ),
            (
                "ONLY-IF-CACHED",
                RequestCc {
                    only_if_cached: true,
                    ..d()
                },
            ),
            (
                "stale-if-error=60",
                RequestCc {
                    stale_if_error: Some(60),
                    ..d()
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(req(input), want, "Cache-Control: {input}");
        }
    }

    #[test]
    fn freshness_lifetime_prefers_s_maxage_then_max_age_then_expires() {
        let now = 1_700_000_000;
        let date =
            httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now));
        let later = httpdate::fmt_http_date(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now + 120),
        );
        let h = headers(&[
            ("cache-control", "s-maxage=5, max-age=60"),
            ("expires", &later),
            ("date", &date),
        ]);
        assert_eq!(freshness_lifetime(&ResponseCc::parse(&h), &h, now), Some(5));
        let h = headers(&[("cache-control", "max-age=60"), ("expires", &later)]);
        assert_eq!(
            freshness_lifetime(&ResponseCc::parse(&h), &h, now),
            Some(60)
        );
        let h = headers(&[("expires", &later), ("date", &date)]);
        assert_eq!(
            freshness_lifetime(&ResponseCc::parse(&h), &h, now),
            Some(120)
        );
        let h = headers(&[("expires", "0")]);
        assert_eq!(freshness_lifetime(&ResponseCc::parse(&h), &h, now), Some(0));
        let h = headers(&[("cache-control", "max-age=oops")]);
        assert_eq!(freshness_lifetime(&ResponseCc::parse(&h), &h, now), Some(0));
        let h = headers(&[("cache-control", "public")]);
        assert_eq!(freshness_lifetime(&ResponseCc::parse(&h), &h, now), None);
    }

    #[test]
    fn initial_age_takes_the_larger_of_apparent_and_corrected() {
        let now = 1_700_000_000;
        let date = httpdate::fmt_http_date(
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(now - 30),
        );
        assert_eq!(initial_age(&headers(&[("date", &date)]), now, now), 30);
        assert_eq!(
            initial_age(&headers(&[("age", "100"), ("date", &date)]), now - 2, now),
            102
        );
        assert_eq!(initial_age(&headers(&[("age", "-5")]), now, now), 0);
        assert_eq!(initial_age(&HeaderMap::new(), now, now), 0);
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let cases = [
            ("\"a\"", Some("\"a\""), true),
            ("W/\"a\"", Some("\"a\""), true),
            ("\"a\"", Some("W/\"a\""), true),
            ("\"b\", W/\"a\"", Some("\"a\""), true),
            ("\"b\"", Some("\"a\""), false),
            ("*", None, true),
            ("*", Some("\"a\""), true),
            ("\"a\"", None, false),
            ("a", Some("a"), false),
            ("", Some("\"a\""), false),
        ];
        for (cond, etag, want) in cases {
            assert_eq!(
                if_none_match(cond, etag),
                want,
                "If-None-Match: {cond} vs {etag:?}"
            );
        }
    }
}
