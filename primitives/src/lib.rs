//! keel's service primitives and the contract they stand on.
//!
//! [`Backend`] is the contract: the embedded engine's atomic operations, async, with one set
//! of semantics (documented on the [`backend`] module) that every backend obeys: the embedded
//! engine here ([`Embedded`]), and Redis, Valkey, Postgres, sled and redb in `keel-adapters`.
//! Every primitive is built only on `Backend`, never on a concrete store, so it behaves the same
//! on all of them. [`Namespaced`] lets several applications share one server.
//!
//! The primitives themselves (rate limiting, lock with fencing tokens, idempotency keys,
//! sessions, cache with stampede protection, dedup, circuit breaker, feature flags, one-time
//! codes, and tower layers) land module by module on this contract.

pub mod backend;
pub mod breaker;
pub mod dedup;
mod embedded;
mod error;
pub mod flags;
pub mod lock;
mod namespace;
pub mod otp;
pub mod ratelimit;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use backend::{
    Backend, KEY_BYTES_MAX, SCAN_LIMIT_MAX, ScanCursor, ScanPage, TTL_MAX, Ttl, TtlPolicy,
    VALUE_BYTES_MAX,
};
pub use embedded::Embedded;
pub use error::{Error, ErrorKind, Result};
pub use namespace::Namespaced;
