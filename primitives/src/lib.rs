//! keel's service primitives and the contract they stand on.
//!
//! [`Backend`] is the contract: the embedded engine's atomic operations, async, with one set
//! of semantics (documented on the [`backend`] module) that every backend obeys: the embedded
//! engine here ([`Embedded`]), and Redis, Valkey, Postgres, sled and redb in `keel-adapters`.
//! Every primitive is built only on `Backend`, never on a concrete store, so it behaves the same
//! on all of them. [`Namespaced`] lets several applications share one server.
//!
//! The primitives themselves land module by module on this contract: [`lock`] (leases with
//! fencing tokens), [`ratelimit`], [`idempotency`], [`cache`] (a value cache with stampede
//! protection across replicas; with `http`, an RFC 9111 response cache layer), [`session`]
//! (server-side sessions) and [`user_session`] (per-device logins a user can list and
//! revoke), among others. With the `http` feature, `http` holds what tower layers share (key
//! extraction, problem responses) and each primitive's layer sits beside it:
//! `ratelimit::RateLimitLayer`, `idempotency::IdempotencyLayer`, `session::SessionLayer`,
//! `cache::http::HttpCacheLayer`.
//!
//! [`observe`] reports what happens on the contract: [`Observed`] wraps any backend and emits a
//! `tracing` span and `metrics` per operation; the primitives count their decisions (rate-limit
//! outcomes, cache hits, breaker transitions, ...) through the same facade.

pub mod backend;
pub mod breaker;
pub mod cache;
pub mod dedup;
mod embedded;
mod error;
pub mod flags;
#[cfg(feature = "http")]
pub mod http;
pub mod idempotency;
pub mod lock;
mod namespace;
pub mod observe;
pub mod otp;
pub mod ratelimit;
pub mod session;
pub mod user_session;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use backend::{
    Backend, KEY_BYTES_MAX, SCAN_LIMIT_MAX, ScanCursor, ScanPage, TTL_MAX, Ttl, TtlPolicy,
    VALUE_BYTES_MAX,
};
pub use embedded::Embedded;
pub use error::{Error, ErrorKind, Result};
pub use namespace::Namespaced;
pub use observe::Observed;
