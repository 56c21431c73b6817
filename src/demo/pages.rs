//! The HTML pages, rendered on the server with maud (no scripts): the sign-in and code forms,
//! the home page with the devices list and its revoke buttons (plain forms), and the welcome
//! page's two variants. Element ids and `data-` attributes are what the browser test finds.

use keel_primitives::user_session::UserSession;
use maud::{DOCTYPE, Markup, html};

use super::auth::SignedIn;
use super::shop::Variant;

const STYLE: &str = "
body { font: 16px/1.5 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222 }
h1 { font-size: 1.5rem } table { border-collapse: collapse; width: 100% }
td, th { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #ddd }
.current { font-weight: bold } .error { color: #a00 } form.inline { display: inline }
nav a { margin-right: 1rem } code { background: #f4f4f4; padding: 0 .2rem }
pre { overflow-x: auto; background: #f8f8f8; padding: .5rem }
.v2 { background: #eef6ff; border: 2px solid #3a7bd5; padding: 1rem; border-radius: .5rem }
";

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · keel demo" }
                style { (STYLE) }
            }
            body {
                nav {
                    a href="/" { "home" }
                    a href="/catalog" { "catalog" }
                    a href="/welcome" { "welcome" }
                    a href="/upstream" { "upstream" }
                    a href="/jobs/report" { "job status" }
                    a href="/metrics" { "metrics" }
                }
                h1 { (title) }
                (body)
            }
        }
    }
}

/// The sign-in form, with an error from the last attempt.
pub fn sign_in(error: Option<&str>, host: &str) -> Markup {
    layout(
        "Sign in",
        html! {
            @if let Some(e) = error { p.error #error { (e) } }
            p { "Enter your e-mail address; a one-time code is sent to it (this demo prints it in the server's output)." }
            form #login method="post" action="/login" {
                label { "E-mail " input #email type="email" name="email" required autofocus; }
                " "
                button #send type="submit" { "Send me a code" }
            }
            (try_it(host))
        },
    )
}

/// The code form for `email`.
pub fn enter_code(email: &str, ttl_s: u64, error: Option<&str>) -> Markup {
    layout(
        "Enter your code",
        html! {
            @if let Some(e) = error { p.error #error { (e) } }
            @if ttl_s > 0 {
                p #sent { "A code was sent to " strong { (email) } "; it is valid for " (ttl_s / 60) " minutes." }
            }
            form #verify method="post" action="/login/verify" {
                input type="hidden" name="email" value=(email);
                label { "Code " input #code name="code" inputmode="numeric" autocomplete="one-time-code" required autofocus; }
                " "
                button #sign-in type="submit" { "Sign in" }
            }
            p { a href="/" { "Use another address" } }
        },
    )
}

/// The signed-in home page: the user's devices, newest first, each with a revoke button.
pub fn home(me: &SignedIn, devices: &[UserSession], host: &str) -> Markup {
    layout(
        "Your devices",
        html! {
            p #user { "Signed in as " strong { (me.user) } "." }
            table #devices {
                thead { tr { th { "Device" } th { "IP" } th { "Signed in" } th { "Last seen" } th {} } }
                tbody {
                    @for d in devices {
                        @let current = d.session == me.session;
                        tr.device.current[current] data-session=(d.session) {
                            td { (d.device.browser) " on " (d.device.os) @if current { " (this device)" } }
                            td { (d.ip.as_deref().unwrap_or("?")) }
                            td { (ago(d.created_ms)) }
                            td { (ago(d.last_seen_ms)) }
                            td {
                                form.inline method="post" action={ "/devices/" (d.session) "/revoke" } {
                                    button.revoke type="submit" data-session=(d.session) { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
            p {
                form.inline method="post" action="/devices/revoke-others" {
                    button #revoke-others type="submit" { "Sign out everywhere else" }
                }
                " "
                form.inline method="post" action="/logout" {
                    button #logout type="submit" { "Sign out" }
                }
            }
            (try_it(host))
        },
    )
}

/// The welcome page: the variant the flag served.
pub fn welcome(v: &Variant) -> Markup {
    let title = if v.variant == "v2" {
        "Welcome (new page)"
    } else {
        "Welcome"
    };
    layout(
        title,
        html! {
            @if v.variant == "v2" {
                div.v2 #variant data-variant="v2" {
                    p { "This is the new welcome page. The " code { "welcome-v2" } " flag rolls it out to half of the visitors; you are in." }
                }
            } @else {
                div #variant data-variant="classic" {
                    p { "This is the classic welcome page. The " code { "welcome-v2" } " flag rolls the new one out to half of the visitors; you are not in (yet)." }
                }
            }
            p { "Visitor " code { (v.visitor) } ", variant " code { (v.variant) } ", reason " code { (v.reason) } ", flag version " (v.version) "." }
            p { "Try " a href="/welcome?visitor=alice" { "alice" } ", " a href="/welcome?visitor=bob" { "bob" } ", " a href="/welcome?visitor=carol" { "carol" } "." }
        },
    )
}

/// The curl lines for the JSON features, for the host the page was asked from.
fn try_it(host: &str) -> Markup {
    let lines = [
        format!("curl -i {host}/catalog"),
        format!(
            "curl -i -X POST {host}/orders -H 'Idempotency-Key: order-1' \\\n     \
             -H 'Content-Type: application/json' -d '{{\"item\":\"espresso\",\"qty\":2}}'"
        ),
        format!(
            "curl -i -X POST {host}/webhooks/payments -H 'Content-Type: application/json' \\\n     \
             -d '{{\"id\":\"evt_1\",\"type\":\"payment.succeeded\",\"amount_cents\":500}}'"
        ),
        format!("curl -i '{host}/upstream?fail=true'"),
        format!("curl -i -X POST '{host}/jobs/report?hold_ms=2000'"),
        format!("curl {host}/metrics"),
    ];
    html! {
        h2 { "Try the rest with curl" }
        pre { @for line in &lines { (line) "\n" } }
    }
}

/// The `Host` the request named, if it looks like one (letters, digits, `.`, `-`, `:`, `[`,
/// `]`), else the default address.
pub fn host(headers: &http::HeaderMap) -> String {
    headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("127.0.0.1:3000")
        .to_owned()
}

/// A Unix-ms time as "N s ago" / "N min ago" (the server's clock).
fn ago(ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}
