//! The keel [`Backend`](keel_primitives::Backend) contract on other stores, one module and one
//! cargo feature each: `redis` and `valkey` (distributed, in memory), `postgres` (distributed,
//! on disk), `sled` and `redb` (embedded alternatives to keel's own engine). Every adapter
//! passes the same conformance suite as the embedded engine, so a service can move between
//! them by changing only its URL.

#[cfg(any(feature = "sled", feature = "redb"))]
mod embedded_common;
#[cfg(all(test, any(feature = "redis", feature = "postgres")))]
mod fault_proxy;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redb")]
pub mod redb;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(all(test, feature = "redis"))]
mod scratch;
#[cfg(feature = "sled")]
pub mod sled;
#[cfg(feature = "valkey")]
pub mod valkey;
