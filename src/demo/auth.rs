//! Passwordless sign-in and the devices page: a one-time code (the `otp` primitive) "mailed"
//! through the [`Outbox`](super::console::Outbox), then a cookie session whose id is cycled at
//! sign-in, and a device record per sign-in (`user_session`), which the user can list and
//! revoke. Every action has an HTML form route (for the browser) and a JSON route under
//! `/api/` (for scripts and the tour).

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Form, Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::header::{RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, HeaderValue, StatusCode};
use keel_primitives::http::Problem;
use keel_primitives::otp::{OtpError, PublicOutcome};
use keel_primitives::session::{Session, SessionError, SessionId};
use keel_primitives::user_session::{ClientInfo, PAGE_LIMIT_MAX};
use serde::Deserialize;
use serde_json::json;

use super::app::{App, problem};
use super::pages;
use super::telemetry;

/// The one-time codes' purpose.
const PURPOSE: &str = "login";
/// The credential version a session's auth hash is taken over. Users here have no password;
/// a service with one passes its hash (or a counter bumped at each reset) so that a reset ends
/// every session.
const CREDENTIAL: &[u8] = b"one-time-code";
/// Longest e-mail address accepted (RFC 5321's path limit).
const EMAIL_BYTES_MAX: usize = 254;
/// How many devices the home page lists.
const DEVICES_SHOWN: usize = 50;

/// The sign-in forms' fields.
#[derive(Debug, Deserialize)]
pub struct LoginFields {
    email: String,
    #[serde(default)]
    code: Option<String>,
}

/// Someone signed in.
pub struct SignedIn {
    /// The user (their e-mail address).
    pub user: String,
    /// This session's id.
    pub session: SessionId,
}

/// The signed-in user of `session`, if any (and marks the device as seen).
pub async fn signed_in(app: &App, session: &Session) -> Result<Option<SignedIn>, Problem> {
    let Some(user) = session.auth_user().await.map_err(session_problem)? else {
        return Ok(None);
    };
    app.users.seen(session).await.map_err(session_problem)?;
    let Some(id) = session.id().await.map_err(session_problem)? else {
        return Ok(None);
    };
    Ok(Some(SignedIn { user, session: id }))
}

fn session_problem(e: SessionError) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "session_unavailable",
        format!("the session could not be read or written: {e}"),
    )
}

fn store_problem(e: impl std::fmt::Display) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        format!("the store did not answer: {e}; retry later"),
    )
}

fn not_signed_in() -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "not_signed_in",
        "sign in first: POST /api/login, then POST /api/login/verify with the code",
    )
}

/// Checks and normalises an e-mail address (lower case, trimmed).
fn email(raw: &str) -> Result<String, Box<Problem>> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= EMAIL_BYTES_MAX
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains('@')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(Box::new(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_email",
            format!("{raw:?} is not an e-mail address"),
        )))
    }
}

fn retry_after(problem: Problem, after: std::time::Duration) -> Problem {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    problem
        .with_member("retry_after", secs.max(1))
        .with_header(RETRY_AFTER, HeaderValue::from(secs.max(1)))
}

/// Issues a code for `raw_email` and "mails" it; returns the address and the code's lifetime.
async fn send_code(app: &App, raw_email: &str) -> Result<(String, u64), Problem> {
    let email = email(raw_email).map_err(|p| *p)?;
    match app.otp.issue(&email, PURPOSE).await {
        Ok(issued) => {
            let ttl = issued.ttl().as_secs();
            app.outbox.send_code(&email, issued.code().as_str(), ttl);
            metrics::counter!(telemetry::CODES_SENT).increment(1);
            Ok((email, ttl))
        }
        Err(OtpError::Cooldown { retry_after: after }) => Err(retry_after(
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "code_cooldown",
                "a code was sent to this address moments ago; use it, or ask again later",
            ),
            after,
        )),
        Err(OtpError::ResendBudget { retry_after: after }) => Err(retry_after(
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "code_budget",
                "too many codes were sent to this address; ask again later",
            ),
            after,
        )),
        Err(OtpError::Invalid { reason, .. }) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_email",
            reason,
        )),
        Err(e) => Err(store_problem(e)),
    }
}

/// Checks the code and signs `session` in: a new session id, and a device record.
async fn sign_in(
    app: &App,
    session: &Session,
    peer: SocketAddr,
    headers: &HeaderMap,
    raw_email: &str,
    code: &str,
) -> Result<SignedIn, Problem> {
    let email = email(raw_email).map_err(|p| *p)?;
    let verification = match app.otp.verify(&email, PURPOSE, code.trim()).await {
        Ok(v) => v,
        Err(OtpError::Invalid { reason, .. }) => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_code",
                reason,
            ));
        }
        Err(e) => return Err(store_problem(e)),
    };
    match verification.public() {
        PublicOutcome::Verified => {}
        PublicOutcome::Rejected => {
            return Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "code_rejected",
                "that code is wrong, used or expired; check it, or ask for a new one",
            ));
        }
        PublicOutcome::Locked { retry_after: after } => {
            return Err(retry_after(
                Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "sign_in_locked",
                    "too many wrong codes for this address; try again later",
                ),
                after,
            ));
        }
    }
    let client = ClientInfo::new(
        Some(peer.ip().to_canonical().to_string()),
        headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    let record = app
        .users
        .login(session, &email, CREDENTIAL, client, ())
        .await
        .map_err(session_problem)?;
    metrics::counter!(telemetry::SIGN_INS).increment(1);
    app.console.line(format!(
        "sign-in: {email} on a new device (session {})",
        record.session
    ));
    Ok(SignedIn {
        user: email,
        session: record.session,
    })
}

/// Ends `target` if it is one of `user`'s devices; `false` if it is not theirs.
async fn revoke_own(app: &App, user: &str, target: &SessionId) -> Result<bool, Problem> {
    let page = app
        .users
        .list_active(user, None, PAGE_LIMIT_MAX)
        .await
        .map_err(store_problem)?;
    if !page.sessions.iter().any(|s| &s.session == target) {
        return Ok(false);
    }
    app.users.revoke(target).await.map_err(store_problem)?;
    Ok(true)
}

// ---- HTML ---------------------------------------------------------------------------------

/// `GET /`: the sign-in form, or the home page with the user's devices.
pub async fn home(State(app): State<App>, session: Session, headers: HeaderMap) -> Response {
    let host = pages::host(&headers);
    let me = match signed_in(&app, &session).await {
        Ok(Some(me)) => me,
        Ok(None) => return pages::sign_in(None, &host).into_response(),
        Err(p) => return problem(p),
    };
    match app.users.list_active(&me.user, None, DEVICES_SHOWN).await {
        Ok(page) => pages::home(&me, &page.sessions, &host).into_response(),
        Err(e) => problem(store_problem(e)),
    }
}

/// `POST /login` (form): sends a code, then shows the code form.
pub async fn start_form(
    State(app): State<App>,
    headers: HeaderMap,
    Form(fields): Form<LoginFields>,
) -> Response {
    match send_code(&app, &fields.email).await {
        Ok((email, ttl)) => pages::enter_code(&email, ttl, None).into_response(),
        Err(p) => page_error(pages::sign_in(Some(p.detail()), &pages::host(&headers)), &p),
    }
}

/// `POST /login/verify` (form): signs in and goes home, or shows the code form again.
pub async fn verify_form(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    session: Session,
    headers: HeaderMap,
    Form(fields): Form<LoginFields>,
) -> Response {
    let code = fields.code.unwrap_or_default();
    match sign_in(&app, &session, peer, &headers, &fields.email, &code).await {
        Ok(_) => Redirect::to("/").into_response(),
        Err(p) => page_error(
            pages::enter_code(fields.email.trim(), 0, Some(p.detail())),
            &p,
        ),
    }
}

/// An HTML page with the problem's status and headers (e.g. `Retry-After`).
fn page_error(page: maud::Markup, p: &Problem) -> Response {
    let mut response = (p.status(), page).into_response();
    for (name, value) in p.headers() {
        response.headers_mut().append(name, value.clone());
    }
    response
}

/// `POST /devices/{id}/revoke` (form).
pub async fn revoke_form(
    State(app): State<App>,
    session: Session,
    Path(id): Path<String>,
) -> Response {
    let me = match signed_in(&app, &session).await {
        Ok(Some(me)) => me,
        Ok(None) => return Redirect::to("/").into_response(),
        Err(p) => return problem(p),
    };
    let Some(target) = SessionId::parse(&id) else {
        return problem(no_such_device());
    };
    match revoke_own(&app, &me.user, &target).await {
        Ok(true) => Redirect::to("/").into_response(),
        Ok(false) => problem(no_such_device()),
        Err(p) => problem(p),
    }
}

/// `POST /devices/revoke-others` (form).
pub async fn revoke_others_form(State(app): State<App>, session: Session) -> Response {
    match revoke_others(&app, &session).await {
        Ok(_) => Redirect::to("/").into_response(),
        Err(p) if p.status() == StatusCode::UNAUTHORIZED => Redirect::to("/").into_response(),
        Err(p) => problem(p),
    }
}

/// `POST /logout` (form).
pub async fn logout_form(State(app): State<App>, session: Session) -> Response {
    match logout(&app, &session).await {
        Ok(()) => Redirect::to("/").into_response(),
        Err(p) => problem(p),
    }
}

fn no_such_device() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no_such_device",
        "you have no signed-in device with that id",
    )
}

// ---- JSON ---------------------------------------------------------------------------------

/// `POST /api/login` `{"email": …}` → 202 `{"sent": true, "expires_in_s": …}`.
pub async fn start_json(State(app): State<App>, Json(fields): Json<LoginFields>) -> Response {
    match send_code(&app, &fields.email).await {
        Ok((email, ttl)) => (
            StatusCode::ACCEPTED,
            Json(json!({"sent": true, "email": email, "expires_in_s": ttl})),
        )
            .into_response(),
        Err(p) => problem(p),
    }
}

/// `POST /api/login/verify` `{"email": …, "code": …}` → `{"user": …, "session": …}` and the
/// session cookie.
pub async fn verify_json(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    session: Session,
    headers: HeaderMap,
    Json(fields): Json<LoginFields>,
) -> Response {
    let code = fields.code.unwrap_or_default();
    match sign_in(&app, &session, peer, &headers, &fields.email, &code).await {
        Ok(me) => Json(json!({"user": me.user, "session": me.session})).into_response(),
        Err(p) => problem(p),
    }
}

/// `GET /api/me` → `{"user": …, "session": …}`, or 401.
pub async fn me(State(app): State<App>, session: Session) -> Response {
    match signed_in(&app, &session).await {
        Ok(Some(me)) => Json(json!({"user": me.user, "session": me.session})).into_response(),
        Ok(None) => problem(not_signed_in()),
        Err(p) => problem(p),
    }
}

/// `GET /api/devices` → `{"devices": [{"session", "current", "browser", "os", "ip", …}]}`.
pub async fn devices_json(State(app): State<App>, session: Session) -> Response {
    let me = match signed_in(&app, &session).await {
        Ok(Some(me)) => me,
        Ok(None) => return problem(not_signed_in()),
        Err(p) => return problem(p),
    };
    match app.users.list_active(&me.user, None, DEVICES_SHOWN).await {
        Ok(page) => {
            let devices: Vec<_> = page
                .sessions
                .iter()
                .map(|d| {
                    json!({
                        "session": d.session,
                        "current": d.session == me.session,
                        "browser": d.device.browser,
                        "os": d.device.os,
                        "category": d.device.category,
                        "ip": d.ip,
                        "created_ms": d.created_ms,
                        "last_seen_ms": d.last_seen_ms,
                    })
                })
                .collect();
            Json(json!({"user": me.user, "devices": devices})).into_response()
        }
        Err(e) => problem(store_problem(e)),
    }
}

/// `POST /api/devices/{id}/revoke` → `{"revoked": true}`, or 404 if it is not the user's.
pub async fn revoke_json(
    State(app): State<App>,
    session: Session,
    Path(id): Path<String>,
) -> Response {
    let me = match signed_in(&app, &session).await {
        Ok(Some(me)) => me,
        Ok(None) => return problem(not_signed_in()),
        Err(p) => return problem(p),
    };
    let Some(target) = SessionId::parse(&id) else {
        return problem(no_such_device());
    };
    match revoke_own(&app, &me.user, &target).await {
        Ok(true) => Json(json!({"revoked": true, "session": target})).into_response(),
        Ok(false) => problem(no_such_device()),
        Err(p) => problem(p),
    }
}

/// `POST /api/devices/revoke-others` → `{"revoked": n}`: every device but this one.
pub async fn revoke_others_json(State(app): State<App>, session: Session) -> Response {
    match revoke_others(&app, &session).await {
        Ok(n) => Json(json!({"revoked": n})).into_response(),
        Err(p) => problem(p),
    }
}

async fn revoke_others(app: &App, session: &Session) -> Result<usize, Problem> {
    let me = signed_in(app, session).await?.ok_or_else(not_signed_in)?;
    let ended = app
        .users
        .revoke_all_except(&me.user, &me.session)
        .await
        .map_err(store_problem)?;
    app.console.line(format!(
        "sign-out elsewhere: {} ended {} other session(s)",
        me.user,
        ended.len()
    ));
    Ok(ended.len())
}

/// `POST /api/logout` → `{"signed_out": true}`.
pub async fn logout_json(State(app): State<App>, session: Session) -> Response {
    match logout(&app, &session).await {
        Ok(()) => Json(json!({"signed_out": true})).into_response(),
        Err(p) => problem(p),
    }
}

async fn logout(app: &App, session: &Session) -> Result<(), Problem> {
    if let Some(me) = signed_in(app, session).await? {
        app.users.revoke(&me.session).await.map_err(store_problem)?;
    }
    session.flush().await;
    Ok(())
}
