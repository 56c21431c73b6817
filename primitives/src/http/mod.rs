//! What every HTTP layer shares (feature `http`): key extraction ([`extract`]: peer and client
//! IP behind trusted proxies, headers, cookies, request extensions, compounds, async
//! closures), RFC 9457 problem responses ([`problem`]), the body type the layers hand on
//! ([`LayerBody`]) and key redaction for logs.
//!
//! The layers themselves live next to their primitives:
//! [`RateLimitLayer`](crate::ratelimit::RateLimitLayer) in `ratelimit/layer.rs` and
//! [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) in `idempotency/layer.rs`. They are
//! tower 0.5 layers over `http` 1.x requests and responses, so they work in axum 0.8
//! (`Router::layer`) and in plain hyper 1 services. Each is `Clone` with its state in the
//! [`Backend`](crate::Backend): clones, and replicas sharing a server, behave as one.

pub mod extract;
pub mod problem;

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pub use extract::{ExtractError, Extractor, KeyExtractor, OnExtractError, TrustedProxies};
pub use problem::{Problem, ProblemRenderer};

pin_project! {
    /// The body of requests and responses that passed through a keel layer: either the
    /// original body (possibly behind chunks a layer already read from it), or bytes the layer
    /// produced itself (a problem document, a replayed response, a buffered request body).
    pub struct LayerBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            prefix: VecDeque<Bytes>,
            #[pin]
            inner: B,
        },
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> fmt::Debug for LayerBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LayerBody")
    }
}

impl<B> LayerBody<B> {
    /// The original body, untouched.
    pub fn inner(inner: B) -> Self {
        LayerBody::prefixed(VecDeque::new(), inner)
    }

    /// Chunks already read from `inner`, then the rest of `inner`.
    pub fn prefixed(prefix: VecDeque<Bytes>, inner: B) -> Self {
        LayerBody {
            kind: Kind::Inner { prefix, inner },
        }
    }

    /// A complete body held in memory.
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        LayerBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        LayerBody {
            kind: Kind::Full { data: None },
        }
    }
}

impl<B> Body for LayerBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { prefix, inner } => match prefix.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => inner.poll_frame(cx),
            },
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { prefix, inner } => prefix.is_empty() && inner.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { prefix, inner } => {
                let buffered: u64 = prefix.iter().map(|c| c.remaining() as u64).sum();
                let h = inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(h.lower().saturating_add(buffered));
                if let Some(upper) = h.upper() {
                    hint.set_upper(upper.saturating_add(buffered));
                }
                hint
            }
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// What a layer does when its backend fails (or a decision cannot be made). Each layer
/// documents its default: the rate limit fails open, the idempotency layer fails closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnBackendError {
    /// Let the request through as if the layer were not there, and log a warning.
    FailOpen,
    /// Answer 503 with a problem document.
    FailClosed,
}

/// A key as it may appear in logs: a short BLAKE3 digest, never the raw bytes (an IP address,
/// a user id or a token).
pub fn redact(key: &[u8]) -> String {
    let digest = blake3::hash(key);
    let mut out = String::with_capacity(2 + REDACTED_HEX_CHARS);
    out.push_str("k:");
    for byte in &digest.as_bytes()[..REDACTED_HEX_CHARS / 2] {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Hex characters of a redacted key: 48 bits, enough to tell keys apart in a log.
const REDACTED_HEX_CHARS: usize = 12;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn prefixed_body_yields_prefix_then_inner() {
        let inner = http_body_util::Full::new(Bytes::from_static(b"world"));
        let body = LayerBody::prefixed(VecDeque::from([Bytes::from_static(b"hello ")]), inner);
        assert_eq!(body.size_hint().exact(), Some(11));
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"hello world");
    }

    #[test]
    fn redaction_is_short_and_stable() {
        assert_eq!(redact(b"10.0.0.1"), redact(b"10.0.0.1"));
        assert_ne!(redact(b"10.0.0.1"), redact(b"10.0.0.2"));
        assert_eq!(redact(b"x").len(), 14);
        assert!(!redact(b"alice").contains("alice"));
    }
}
