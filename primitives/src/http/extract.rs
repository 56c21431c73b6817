//! Key extraction shared by every layer: who is this request from? An [`Extractor`] turns a
//! request's head into a key (bytes) — the peer IP, the client IP behind trusted proxies, a
//! header, a cookie, a request extension (e.g. the authenticated user), one global key, a
//! compound of several, or any async closure. Failure is an [`ExtractError`], and each layer
//! decides what it means with [`OnExtractError`] (400, 500 or skip the layer); nothing panics.
//!
//! Keys are tagged by kind (`ip:`, `h:`, `c:`, ...), so a header holding `10.0.0.1` and a
//! peer at `10.0.0.1` are different keys. The layers store only a digest of the key and log
//! only [`redact`](super::redact)ed forms.
//!
//! # Client IP behind proxies
//! [`Extractor::client_ip`] starts from the TCP peer (axum's `ConnectInfo<SocketAddr>`).
//! If the peer is not one of the [`TrustedProxies`], the peer *is* the client, and any
//! forwarding header is ignored: a client cannot choose its own key by sending
//! `X-Forwarded-For`. If the peer is trusted, the configured header ([`ClientIpHeader`]) is read
//! **right to left**, skipping addresses that are trusted proxies: the first untrusted address
//! is the client (every hop appends, so entries left of the first untrusted one were written by
//! the client and prove nothing). If every hop is trusted, the leftmost is the client; if an
//! entry cannot be parsed (`unknown`, an obfuscated `_id`, garbage), the last trusted hop is
//! used, since nothing beyond it can be believed.

use std::any::type_name;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ConnectInfo;
use http::HeaderName;
use http::header::{COOKIE, FORWARDED};
use http::request::Parts;
use ipnet::IpNet;

/// Most trusted-proxy networks in one [`TrustedProxies`].
pub const TRUSTED_PROXIES_MAX: usize = 256;
/// Most forwarding hops read from a header; a longer chain is cut at the client end (the
/// rightmost hops are the ones written by our own proxies).
pub const FORWARDED_HOPS_MAX: usize = 32;
/// Most parts of a [`Extractor::compound`] key.
pub const COMPOUND_PARTS_MAX: usize = 16;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Why no key could be extracted from a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    /// The peer address is not in the request's extensions: the server was not started with
    /// connection info. With axum, serve
    /// `router.into_make_service_with_connect_info::<SocketAddr>()`.
    #[error(
        "the peer address is unknown: serve the app with \
         `into_make_service_with_connect_info::<SocketAddr>()` so `ConnectInfo<SocketAddr>` is \
         in the request's extensions"
    )]
    MissingConnectInfo,
    /// The header is absent.
    #[error("the request has no {name} header")]
    MissingHeader {
        /// The header's name.
        name: String,
    },
    /// The cookie is absent.
    #[error("the request has no {name:?} cookie")]
    MissingCookie {
        /// The cookie's name.
        name: String,
    },
    /// No value of this type is in the request's extensions (is the layer that inserts it,
    /// e.g. authentication, applied before this one?).
    #[error(
        "the request has no {type_name} extension: apply the layer that inserts it outside \
         (before) this one"
    )]
    MissingExtension {
        /// The Rust type looked for.
        type_name: &'static str,
    },
    /// A user extractor failed.
    #[error("{0}")]
    Custom(String),
}

/// What a layer does when the key cannot be extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnExtractError {
    /// Answer 400 with a problem document saying what is missing. The default.
    #[default]
    BadRequest,
    /// Answer 500 (for keys that can only be missing through a server misconfiguration).
    InternalServerError,
    /// Let the request through as if the layer were not there.
    Skip,
}

/// Produces a key from a request's head. Implement it for custom policies, or use the
/// constructors on [`Extractor`] (including [`Extractor::from_fn`] for async closures).
#[async_trait]
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key for this request.
    async fn extract(&self, parts: &Parts) -> Result<Vec<u8>, ExtractError>;
}

/// A shared, cheaply cloned [`KeyExtractor`], with constructors for the common ones.
#[derive(Clone)]
pub struct Extractor(Arc<dyn KeyExtractor>);

impl fmt::Debug for Extractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Extractor")
    }
}

impl Extractor {
    /// Wraps any [`KeyExtractor`].
    pub fn new(extractor: impl KeyExtractor) -> Self {
        Extractor(Arc::new(extractor))
    }

    /// The TCP peer's IP (`ip:{addr}`), from axum's `ConnectInfo<SocketAddr>`.
    /// [`ExtractError::MissingConnectInfo`] when the server does not provide it.
    pub fn peer_ip() -> Self {
        Extractor::new(PeerIp)
    }

    /// The client's IP (`ip:{addr}`) behind `trusted` proxies; see the module docs.
    pub fn client_ip(trusted: TrustedProxies) -> Self {
        Extractor::new(ClientIp(trusted))
    }

    /// The value of header `name` (`h:{name}:{value}`). [`ExtractError::MissingHeader`] when
    /// absent. Several values are joined with `,`.
    pub fn header(name: HeaderName) -> Self {
        Extractor::new(Header(name))
    }

    /// The value of cookie `name` (`c:{name}:{value}`). [`ExtractError::MissingCookie`] when
    /// absent.
    pub fn cookie(name: impl Into<String>) -> Self {
        Extractor::new(Cookie(name.into()))
    }

    /// `key(&value)` of the request extension of type `T` (`x:{key}`), e.g. the authenticated
    /// user an auth layer inserted. [`ExtractError::MissingExtension`] when absent.
    pub fn extension<T, F>(key: F) -> Self
    where
        T: Send + Sync + 'static,
        F: Fn(&T) -> Vec<u8> + Send + Sync + 'static,
    {
        Extractor::new(Extension {
            key,
            _type: PhantomData::<fn(&T)>,
        })
    }

    /// One key for every request (`global`): a limit on the whole service.
    pub fn global() -> Self {
        Extractor::new(Global)
    }

    /// Every part's key, in order, length-prefixed (e.g. user *and* route). Fails if any part
    /// fails. Parts beyond the first [`COMPOUND_PARTS_MAX`] are ignored.
    pub fn compound(parts: impl IntoIterator<Item = Extractor>) -> Self {
        Extractor::new(Compound(
            parts.into_iter().take(COMPOUND_PARTS_MAX).collect(),
        ))
    }

    /// Any async function of the request head (a clone of it: headers, URI, extensions),
    /// e.g. a session lookup. Its key is used as returned (`f:{key}`).
    pub fn from_fn<F, Fut>(f: F) -> Self
    where
        F: Fn(Parts) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, ExtractError>> + Send + 'static,
    {
        Extractor::new(FromFn(f))
    }

    /// Extracts the key of a request.
    ///
    /// # Errors
    /// The extractor's [`ExtractError`].
    pub async fn extract(&self, parts: &Parts) -> Result<Vec<u8>, ExtractError> {
        self.0.extract(parts).await
    }
}

fn tagged(tag: &str, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(tag.len() + rest.len());
    key.extend_from_slice(tag.as_bytes());
    key.extend_from_slice(rest);
    key
}

struct PeerIp;

/// The peer's IP, IPv4-mapped IPv6 addresses shown as IPv4.
fn peer_ip(parts: &Parts) -> Result<IpAddr, ExtractError> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_canonical())
        .ok_or(ExtractError::MissingConnectInfo)
}

#[async_trait]
impl KeyExtractor for PeerIp {
    async fn extract(&self, parts: &Parts) -> Result<Vec<u8>, ExtractError> {
        Ok(tagged("ip:", peer_ip(parts)?.to_string().as_bytes()))
    }
}

/// Which header a trusted proxy writes the client chain into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientIpHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (every occurrence, in order). The default.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"` (the `for` parameters).
    Forwarded,
    /// `X-Real-IP: client`, a single address set by the trusted proxy.
    XRealIp,
}

/// The proxies whose forwarding headers are believed: networks (CIDRs) and the header they
/// write. Nothing is trusted by default.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: ClientIpHeader,
}

/// A trusted-proxy list that could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustedProxiesError {
    /// An entry is neither a CIDR (`10.0.0.0/8`) nor an address (`10.0.0.1`).
    #[error("{entry:?} is not a CIDR (like 10.0.0.0/8) or an IP address")]
    Invalid {
        /// The entry.
        entry: String,
    },
    /// More than [`TRUSTED_PROXIES_MAX`] networks.
    #[error("{count} trusted networks given; at most {TRUSTED_PROXIES_MAX}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
}

impl TrustedProxies {
    /// Trusts the given networks (`"10.0.0.0/8"`, `"::1/128"`, or single addresses).
    ///
    /// # Errors
    /// [`TrustedProxiesError`] for an unparsable entry or too many.
    pub fn new<I, S>(nets: I) -> Result<Self, TrustedProxiesError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut parsed = Vec::new();
        for entry in nets {
            let entry = entry.as_ref().trim();
            let net = IpNet::from_str(entry)
                .or_else(|_| IpAddr::from_str(entry).map(IpNet::from))
                .map_err(|_| TrustedProxiesError::Invalid {
                    entry: entry.to_owned(),
                })?;
            parsed.push(net);
        }
        if parsed.len() > TRUSTED_PROXIES_MAX {
            return Err(TrustedProxiesError::TooMany {
                count: parsed.len(),
            });
        }
        Ok(TrustedProxies {
            nets: parsed,
            header: ClientIpHeader::default(),
        })
    }

    /// Reads the client chain from `header` (default `X-Forwarded-For`). Configure the one
    /// header your proxy writes: a header the proxy passes through untouched is the client's
    /// to forge.
    pub fn header(mut self, header: ClientIpHeader) -> Self {
        self.header = header;
        self
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client IP of a request that came from `peer` with `headers` (see the module docs).
    pub fn client_ip(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let hops: Vec<Option<IpAddr>> = match self.header {
            ClientIpHeader::XForwardedFor => headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
                .map(parse_hop)
                .collect(),
            ClientIpHeader::Forwarded => headers
                .get_all(FORWARDED)
                .iter()
                .flat_map(|v| v.to_str().unwrap_or("for=\u{0}").split(','))
                .map(|element| {
                    element
                        .split(';')
                        .filter_map(|pair| pair.split_once('='))
                        .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                        .and_then(|(_, value)| parse_hop(value.trim().trim_matches('"')))
                })
                .collect(),
            ClientIpHeader::XRealIp => headers
                .get(&X_REAL_IP)
                .map(|v| parse_hop(v.to_str().unwrap_or("")))
                .into_iter()
                .collect(),
        };
        let mut client = peer;
        for hop in hops.into_iter().rev().take(FORWARDED_HOPS_MAX) {
            match hop {
                Some(ip) => {
                    client = ip;
                    if !self.contains(ip) {
                        return ip;
                    }
                }
                // Unparsable: nothing beyond the last trusted hop can be believed.
                None => return client,
            }
        }
        client
    }
}

/// One hop: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:4711`; else `None`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = IpAddr::from_str(hop) {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = SocketAddr::from_str(hop) {
        return Some(addr.ip().to_canonical());
    }
    // `[v6]` without a port.
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| IpAddr::from_str(h).ok())
        .map(|ip| ip.to_canonical())
}

struct ClientIp(TrustedProxies);

#[async_trait]
impl KeyExtractor for ClientIp {
    async fn extract(&self, parts: &Parts) -> Result<Vec<u8>, ExtractError> {
        let ip = self.0.client_ip(peer_ip(parts)?, &parts.headers);
        Ok(tagged("ip:", ip.to_string().as_bytes()))
    }
}

struct Header(HeaderName);

#[async_trait]
impl KeyExtractor for Header {
    async fn extract(&self, parts: &Parts) -> Result<Vec<u8>, ExtractError> {
        let mut values = parts.headers.get_all(&self.0).iter();
        let first = values.next().ok_or_else(|| ExtractError::MissingHeader {
            name: self.0.to_string(),
        })?;
        let mut key = tagged("h:", self.0.as_str().as_bytes());
        key.push(b':');
        key.extend_from_slice(first.as_bytes());
        for value in values {
            key.push(b',');
            key.extend_from_slice(value.as_bytes());
        }
        Ok(key)
    }
}

struct Cookie(String);

#[async_trait]
impl KeyExtractor for Cookie {
    async fn extract(&self, parts: &Parts) -> Result<Vec<u8>, ExtractError> {
        cookie_value(&parts.headers, &self.0)
            .map(|value| {
                let mut key = tagged("c:", self.0.as_bytes());
                key.push(b':');
                key.extend_from_slice(value);
                key
            })
            .ok_or_else(|| ExtractError::MissingCookie {
                name: self.0.clone(),
            })
    }
}

/// The first value of cookie `name` in the `Cookie` headers.
fn cookie_value<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| {
                let value = pair[eq + 1..].trim_ascii();
                value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value)
            })
        })
}

struct Extension<T, F> {
    key: F,
    _type: PhantomData<fn(&T)>,
}

#[async_trait]
impl<T, F> KeyExtractor for Extension<T, F>
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> Vec<u8> + Send + Sync + 'static,
{
    async fn extract(&self, parts: &Parts) -> Result<Vec<u8>, ExtractError> {
        let value = parts
            .extensions
            .get::<T>()
            .ok_or(ExtractError::MissingExtension {
                type_name: type_name::<T>(),
            })?;
        Ok(tagged("x:", &(self.key)(value)))
    }
}

struct Global;

#[async_trait]
impl KeyExtractor for Global {
    async fn extract(&self, _parts: &Parts) -> Result<Vec<u8>, ExtractError> {
        Ok(b"global".to_vec())
    }
}

struct Compound(Vec<Extractor>);

#[async_trait]
impl KeyExtractor for Compound {
    async fn extract(&self, parts: &Parts) -> Result<Vec<u8>, ExtractError> {
        let mut key = b"cmp:".to_vec();
        for part in &self.0 {
            let k = part.extract(parts).await?;
            key.extend_from_slice(&u32::try_from(k.len()).unwrap_or(u32::MAX).to_le_bytes());
            key.extend_from_slice(&k);
        }
        Ok(key)
    }
}

struct FromFn<F>(F);

#[async_trait]
impl<F, Fut> KeyExtractor for FromFn<F>
where
    F: Fn(Parts) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, ExtractError>> + Send + 'static,
{
    async fn extract(&self, parts: &Parts) -> Result<Vec<u8>, ExtractError> {
        Ok(tagged("f:", &(self.0)(parts.clone()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(peer: &str, headers: &[(&str, &str)]) -> Parts {
        let mut req = http::Request::builder().uri("/");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let (mut parts, ()) = req.body(()).unwrap().into_parts();
        if !peer.is_empty() {
            parts
                .extensions
                .insert(ConnectInfo(SocketAddr::from_str(peer).unwrap()));
        }
        parts
    }

    fn ip(s: &str) -> IpAddr {
        IpAddr::from_str(s).unwrap()
    }

    async fn key(e: &Extractor, p: &Parts) -> Result<String, ExtractError> {
        e.extract(p)
            .await
            .map(|k| String::from_utf8_lossy(&k).into_owned())
    }

    #[tokio::test]
    async fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
        let trusted = TrustedProxies::new(["10.0.0.0/8"]).unwrap();
        let e = Extractor::client_ip(trusted);
        let p = parts("203.0.113.9:5000", &[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(key(&e, &p).await.unwrap(), "ip:203.0.113.9");
    }

    #[tokio::test]
    async fn forwarded_for_is_read_right_to_left_skipping_trusted_hops() {
        let trusted = TrustedProxies::new(["10.0.0.0/8", "192.168.1.1"]).unwrap();
        let e = Extractor::client_ip(trusted.clone());
        // The client forged "9.9.9.9" on the left; our proxies appended the rest.
        let p = parts(
            "10.0.0.2:443",
            &[
                ("x-forwarded-for", "9.9.9.9, 198.51.100.7"),
                ("x-forwarded-for", "192.168.1.1, 10.1.2.3"),
            ],
        );
        assert_eq!(key(&e, &p).await.unwrap(), "ip:198.51.100.7");
        // Every hop trusted: the leftmost.
        let all = [("x-forwarded-for", "10.9.9.9, 10.1.1.1")];
        assert_eq!(
            trusted.client_ip(ip("10.0.0.2"), &parts("", &all).headers),
            ip("10.9.9.9")
        );
        // Garbage beyond a trusted hop: the last trusted hop.
        let junk = [("x-forwarded-for", "9.9.9.9, unknown, 10.1.1.1")];
        assert_eq!(
            trusted.client_ip(ip("10.0.0.2"), &parts("", &junk).headers),
            ip("10.1.1.1")
        );
        // No header: the peer.
        assert_eq!(
            trusted.client_ip(ip("10.0.0.2"), &http::HeaderMap::new()),
            ip("10.0.0.2")
        );
    }

    #[tokio::test]
    async fn rfc7239_forwarded_and_x_real_ip() {
        let fwd = TrustedProxies::new(["127.0.0.0/8"])
            .unwrap()
            .header(ClientIpHeader::Forwarded);
        let h = parts(
            "",
            &[(
                "forwarded",
                "for=192.0.2.60;proto=http, For=\"[2001:db8:cafe::17]:4711\";by=203.0.113.43",
            )],
        );
        assert_eq!(
            fwd.client_ip(ip("127.0.0.1"), &h.headers),
            ip("2001:db8:cafe::17")
        );
        let real = TrustedProxies::new(["127.0.0.1/32"])
            .unwrap()
            .header(ClientIpHeader::XRealIp);
        let h = parts("", &[("x-real-ip", "198.51.100.1")]);
        assert_eq!(
            real.client_ip(ip("127.0.0.1"), &h.headers),
            ip("198.51.100.1")
        );
        assert_eq!(real.client_ip(ip("127.0.0.2"), &h.headers), ip("127.0.0.2"));
        // IPv4-mapped IPv6 peers are IPv4.
        assert!(real.contains(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn trusted_proxies_refuse_garbage() {
        assert!(matches!(
            TrustedProxies::new(["10.0.0.0/33"]),
            Err(TrustedProxiesError::Invalid { .. })
        ));
        assert!(TrustedProxies::new(["::1", "fd00::/8", "10.0.0.1"]).is_ok());
    }

    #[tokio::test]
    async fn missing_connect_info_is_a_clear_error() {
        let err = key(&Extractor::peer_ip(), &parts("", &[]))
            .await
            .unwrap_err();
        assert_eq!(err, ExtractError::MissingConnectInfo);
        assert!(
            err.to_string()
                .contains("into_make_service_with_connect_info")
        );
    }

    #[tokio::test]
    async fn header_cookie_extension_global_compound_and_closures() {
        let mut p = parts(
            "127.0.0.1:1",
            &[("x-api-key", "k1"), ("cookie", "a=1; sid=\"s2\"; b=3")],
        );
        p.extensions.insert(42u64);
        let h = Extractor::header(HeaderName::from_static("x-api-key"));
        assert_eq!(key(&h, &p).await.unwrap(), "h:x-api-key:k1");
        assert_eq!(
            key(&Extractor::cookie("sid"), &p).await.unwrap(),
            "c:sid:s2"
        );
        assert!(matches!(
            key(&Extractor::cookie("nope"), &p).await,
            Err(ExtractError::MissingCookie { .. })
        ));
        let user = Extractor::extension(|id: &u64| id.to_string().into_bytes());
        assert_eq!(key(&user, &p).await.unwrap(), "x:42");
        assert!(matches!(
            key(&Extractor::extension(|_: &String| vec![]), &p).await,
            Err(ExtractError::MissingExtension { .. })
        ));
        assert_eq!(key(&Extractor::global(), &p).await.unwrap(), "global");
        let both = Extractor::compound([Extractor::peer_ip(), user]);
        assert_eq!(
            both.extract(&p).await.unwrap(),
            b"cmp:\x0c\x00\x00\x00ip:127.0.0.1\x04\x00\x00\x00x:42".to_vec()
        );
        let f =
            Extractor::from_fn(
                |parts: Parts| async move { Ok(parts.uri.path().as_bytes().to_vec()) },
            );
        assert_eq!(key(&f, &p).await.unwrap(), "f:/");
        let failing =
            Extractor::from_fn(|_| async { Err(ExtractError::Custom("no session".into())) });
        assert_eq!(
            key(&failing, &p).await,
            Err(ExtractError::Custom("no session".into()))
        );
    }
}
