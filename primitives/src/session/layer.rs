//! [`SessionLayer`]: cookie sessions as a tower layer (feature `http`). The cookie carries only
//! the session's token, signed (HMAC-SHA-256) or encrypted (AES-256-GCM) by the `cookie`
//! crate's jars; the data lives in the [`SessionStore`]. Handlers take the [`Session`] as an
//! axum extractor (or from the request's extensions).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use axum::{Router, routing::get};
//! use keel_primitives::Embedded;
//! use keel_primitives::session::{Session, SessionLayer, SessionStore};
//!
//! let store = SessionStore::builder(Arc::new(Embedded::open("./keel-data")?)).build()?;
//! let secret = std::env::var("SESSION_KEY")?; // at least 32 random bytes
//! let layer = SessionLayer::builder(store).key(secret.as_bytes()).build()?;
//! let app = Router::new()
//!     .route("/", get(|session: Session| async move {
//!         let visits: u64 = session.get("visits").await.ok().flatten().unwrap_or(0);
//!         let _ = session.insert("visits", visits + 1).await;
//!         format!("visit {}", visits + 1)
//!     }))
//!     .layer(layer);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # A request
//! 1. The cookie is read and verified with each key in turn (the first signs, all verify).
//!    A cookie that fails verification, is truncated, or carries a token of the wrong shape
//!    is ignored: the request gets a fresh anonymous session (and the bad cookie is cleared
//!    if the session is used). Never an error page.
//! 2. The handler runs with the [`Session`] in its extensions; nothing touches the backend
//!    unless the handler uses the session.
//! 3. After the handler, [`Session::save`] runs. A written or touched record sends a
//!    `Set-Cookie` whose `Max-Age` is the record's TTL; a cookie verified by a retired key is
//!    re-issued with the current one; a flushed session sends an expired `Set-Cookie`.
//!
//! When that save fails the handler's response is replaced, because it described changes
//! that were not kept: a conflict or an ended session → 409, an oversize record → 500, a
//! backend failure → 503 (the layer fails closed on writes). A backend failure while
//! *loading* reaches the handler as [`SessionError::Backend`] from the session's methods.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cookie::{Cookie, CookieJar, Key};

/// The `SameSite` cookie attribute (the `cookie` crate's), for
/// [`SessionLayerBuilder::same_site`].
pub use cookie::SameSite;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service};

use super::{Saved, Session, SessionError, SessionStore};
use crate::http::problem::{SharedRenderer, default_renderer};
use crate::http::{LayerBody, Problem, ProblemRenderer};

/// The cookie's name before any prefix.
pub const COOKIE_NAME_DEFAULT: &str = "keel_session";
/// Shortest master key accepted, in bytes (each is expanded with HKDF into signing and
/// encryption keys).
pub const KEY_BYTES_MIN: usize = 32;
/// The prefix browsers enforce for host-only, secure, root-path cookies.
const HOST_PREFIX: &str = "__Host-";

/// How the cookie protects the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CookieMode {
    /// Signed with HMAC-SHA-256: the client can read the token but not forge one. The default.
    #[default]
    Signed,
    /// Encrypted and authenticated with AES-256-GCM: the client sees neither.
    Private,
}

/// A layer configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionLayerError {
    /// No key was given.
    #[error("the session layer needs at least one key")]
    NoKey,
    /// A key is shorter than [`KEY_BYTES_MIN`].
    #[error(
        "session key {index} is {bytes} bytes; at least {KEY_BYTES_MIN} random bytes are needed"
    )]
    ShortKey {
        /// Its position in the key list.
        index: usize,
        /// Its length.
        bytes: usize,
    },
    /// The cookie name is empty or not a valid cookie name.
    #[error("invalid cookie name {0:?}")]
    CookieName(String),
}

struct Config {
    store: SessionStore,
    keys: Vec<Key>,
    mode: CookieMode,
    name: String,
    secure: bool,
    http_only: bool,
    same_site: SameSite,
    path: String,
    domain: Option<String>,
    host_prefix: bool,
    renderer: SharedRenderer,
}

/// Builds a [`SessionLayer`]; validated once by [`SessionLayerBuilder::build`].
pub struct SessionLayerBuilder {
    config: Config,
    raw_keys: Vec<Vec<u8>>,
}

impl fmt::Debug for SessionLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayerBuilder")
            .field("name", &self.config.name)
            .field("mode", &self.config.mode)
            .finish_non_exhaustive()
    }
}

impl SessionLayerBuilder {
    /// Adds a master key (at least 32 random bytes). The first key added signs; every key
    /// verifies, so add the new key first and keep the retired ones after it while their
    /// cookies may still be out there. A cookie verified by a retired key is re-issued with
    /// the first.
    pub fn key(mut self, master: impl AsRef<[u8]>) -> Self {
        self.raw_keys.push(master.as_ref().to_vec());
        self
    }

    /// Adds several keys, in order (see [`key`](SessionLayerBuilder::key)).
    pub fn keys<K: AsRef<[u8]>>(mut self, masters: impl IntoIterator<Item = K>) -> Self {
        for k in masters {
            self = self.key(k);
        }
        self
    }

    /// Signed (the default) or private cookies.
    pub fn mode(mut self, mode: CookieMode) -> Self {
        self.config.mode = mode;
        self
    }

    /// The cookie's name (default `keel_session`), before the `__Host-` prefix.
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// The `Secure` attribute (default on). Turn it off only for plain-HTTP development:
    /// browsers never send a `Secure` cookie over HTTP.
    pub fn secure(mut self, secure: bool) -> Self {
        self.config.secure = secure;
        self
    }

    /// The `HttpOnly` attribute (default on: scripts cannot read the cookie).
    pub fn http_only(mut self, http_only: bool) -> Self {
        self.config.http_only = http_only;
        self
    }

    /// The `SameSite` attribute (default `Lax`).
    pub fn same_site(mut self, same_site: SameSite) -> Self {
        self.config.same_site = same_site;
        self
    }

    /// The `Path` attribute (default `/`).
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.config.path = path.into();
        self
    }

    /// The `Domain` attribute (default none: host-only).
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.config.domain = Some(domain.into());
        self
    }

    /// Whether to prefix the name with `__Host-` when its rules allow it: `Secure`, no
    /// `Domain`, `Path=/` (default on). Browsers then refuse the cookie from a sibling
    /// subdomain or over HTTP.
    pub fn host_prefix(mut self, on: bool) -> Self {
        self.config.host_prefix = on;
        self
    }

    /// Replaces the problem+json error responses.
    pub fn problem_renderer(mut self, renderer: impl ProblemRenderer) -> Self {
        self.config.renderer = Arc::new(renderer);
        self
    }

    /// Validates the configuration.
    ///
    /// # Errors
    /// [`SessionLayerError`].
    pub fn build(mut self) -> Result<SessionLayer, SessionLayerError> {
        if self.raw_keys.is_empty() {
            return Err(SessionLayerError::NoKey);
        }
        for (index, k) in self.raw_keys.iter().enumerate() {
            if k.len() < KEY_BYTES_MIN {
                return Err(SessionLayerError::ShortKey {
                    index,
                    bytes: k.len(),
                });
            }
        }
        // Checked above: `derive_from` needs at least 32 bytes.
        self.config.keys = self.raw_keys.iter().map(|k| Key::derive_from(k)).collect();
        let c = &mut self.config;
        let valid = !c.name.is_empty()
            && c.name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !valid {
            return Err(SessionLayerError::CookieName(c.name.clone()));
        }
        if c.host_prefix && c.secure && c.domain.is_none() && c.path == "/" {
            c.name = format!("{HOST_PREFIX}{}", c.name);
        }
        Ok(SessionLayer {
            config: Arc::new(self.config),
        })
    }
}

/// The session layer. Cheap to clone; every clone and replica on the same backend and keys
/// sees the same sessions. See [the module docs](crate::session::layer).
#[derive(Clone)]
pub struct SessionLayer {
    config: Arc<Config>,
}

impl fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayer")
            .field("cookie", &self.config.name)
            .field("mode", &self.config.mode)
            .finish_non_exhaustive()
    }
}

impl SessionLayer {
    /// Starts a configuration on `store`; add at least one [`key`](SessionLayerBuilder::key).
    pub fn builder(store: SessionStore) -> SessionLayerBuilder {
        SessionLayerBuilder {
            config: Config {
                store,
                keys: Vec::new(),
                mode: CookieMode::default(),
                name: COOKIE_NAME_DEFAULT.to_owned(),
                secure: true,
                http_only: true,
                same_site: SameSite::Lax,
                path: "/".to_owned(),
                domain: None,
                host_prefix: true,
                renderer: default_renderer(),
            },
            raw_keys: Vec::new(),
        }
    }

    /// The cookie's name, prefix included.
    pub fn cookie_name(&self) -> &str {
        &self.config.name
    }

    /// The store the layer's sessions live in.
    pub fn store(&self) -> &SessionStore {
        &self.config.store
    }
}

impl Config {
    /// The token of the first cookie with our name that verifies, and whether a retired key
    /// verified it; `presented` if any cookie had our name.
    fn read(&self, headers: &http::HeaderMap) -> (Option<String>, bool, bool) {
        let mut presented = false;
        for header in headers.get_all(COOKIE) {
            let Ok(text) = header.to_str() else { continue };
            for cookie in Cookie::split_parse(text).flatten() {
                if cookie.name() != self.name {
                    continue;
                }
                presented = true;
                if let Some((token, retired)) = self.verify(cookie.value()) {
                    return (Some(token), true, retired);
                }
            }
        }
        (None, presented, false)
    }

    fn verify(&self, value: &str) -> Option<(String, bool)> {
        for (index, key) in self.keys.iter().enumerate() {
            let mut jar = CookieJar::new();
            jar.add_original(Cookie::new(self.name.clone(), value.to_owned()));
            let verified = match self.mode {
                CookieMode::Signed => jar.signed(key).get(&self.name),
                CookieMode::Private => jar.private(key).get(&self.name),
            };
            if let Some(c) = verified
                && super::is_token(c.value())
            {
                return Some((c.value().to_owned(), index > 0));
            }
        }
        None
    }

    fn base(&self, value: String) -> Cookie<'static> {
        let mut c = Cookie::new(self.name.clone(), value);
        c.set_http_only(self.http_only);
        c.set_secure(self.secure);
        c.set_same_site(self.same_site);
        c.set_path(self.path.clone());
        if let Some(d) = &self.domain {
            c.set_domain(d.clone());
        }
        c
    }

    fn issue(&self, token: &str, ttl: Duration) -> Option<HeaderValue> {
        let mut cookie = self.base(token.to_owned());
        let secs = i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX);
        cookie.set_max_age(cookie::time::Duration::seconds(secs));
        let mut jar = CookieJar::new();
        let key = &self.keys[0];
        match self.mode {
            CookieMode::Signed => jar.signed_mut(key).add(cookie),
            CookieMode::Private => jar.private_mut(key).add(cookie),
        }
        let sealed = jar.get(&self.name)?;
        HeaderValue::from_str(&sealed.to_string()).ok()
    }

    fn removal(&self) -> Option<HeaderValue> {
        let mut cookie = self.base(String::new());
        cookie.make_removal();
        HeaderValue::from_str(&cookie.to_string()).ok()
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> SessionService<S> {
        SessionService {
            inner,
            config: Arc::clone(&self.config),
        }
    }
}

/// The session middleware service (see [`SessionLayer`]).
#[derive(Clone)]
pub struct SessionService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> fmt::Debug for SessionService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionService").finish_non_exhaustive()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The response future of [`SessionService`].
pub struct ResponseFuture<B, E> {
    inner: BoxFuture<Result<Response<LayerBody<B>>, E>>,
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<LayerBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<LayerBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // The clone is not ready; the ready one handles this request (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = Arc::clone(&self.config);
        let (token, presented, retired) = config.read(req.headers());
        let session = config.store.open_with(token.as_deref(), presented, retired);
        req.extensions_mut().insert(session.clone());
        ResponseFuture {
            inner: Box::pin(async move {
                let response = inner.call(req).await?.map(LayerBody::inner);
                Ok(finish(&config, &session, response).await)
            }),
        }
    }
}

async fn finish<B>(
    config: &Config,
    session: &Session,
    mut response: Response<LayerBody<B>>,
) -> Response<LayerBody<B>> {
    let header = match session.save().await {
        Ok(Saved::Unchanged) => None,
        Ok(Saved::Stored { token, ttl }) => config.issue(&token, ttl),
        Ok(Saved::Removed) => config.removal(),
        Err(e) => {
            let problem = match &e {
                SessionError::Conflict { fields } => Problem::new(
                    StatusCode::CONFLICT,
                    "session-conflict",
                    "a concurrent request changed the same session fields; nothing was saved",
                )
                .with_member("fields", fields.clone()),
                SessionError::Ended => Problem::new(
                    StatusCode::CONFLICT,
                    "session-ended",
                    "the session ended while this request ran; nothing was saved",
                ),
                SessionError::TooLarge { .. } => Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "session-too-large",
                    "the session grew over its size limit; nothing was saved",
                ),
                SessionError::Backend(_) | SessionError::Serde { .. } => Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "session-unavailable",
                    "the session could not be saved; try again",
                ),
            };
            tracing::warn!(error = %e, status = %problem.status(), "session save failed: response replaced");
            let mut replaced = config.renderer.render(&problem).map(LayerBody::full);
            if matches!(e, SessionError::Ended)
                && let Some(v) = config.removal()
            {
                replaced.headers_mut().append(SET_COOKIE, v);
            }
            return replaced;
        }
    };
    if let Some(value) = header {
        response.headers_mut().append(SET_COOKIE, value);
    }
    response
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Session {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Session>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "no session: add keel_primitives::session::SessionLayer to this route",
        ))
    }
}
