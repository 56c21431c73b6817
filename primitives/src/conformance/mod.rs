//! The backend conformance suite: written once, as plain async functions taking a backend, and
//! run on every backend keel ships (memory, embedded, Redis, Valkey, Postgres, sled, redb). A
//! backend that does not pass it is not done.
//!
//! Each case works under its own unique key prefix, so the suite can run against a shared
//! server without interfering with other data. Cases sleep only to let a real TTL elapse (a
//! server's clock cannot be driven by a manual clock); those TTLs are short.
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() {
//! use std::sync::Arc;
//!
//! let backend = Arc::new(keel_primitives::Embedded::memory());
//! let report = keel_primitives::conformance::run(backend).await;
//! println!("{}", report.render());
//! assert!(report.passed());
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::{
    Backend, KEY_BYTES_MAX, SCAN_LIMIT_MAX, ScanCursor, TTL_MAX, Ttl, TtlPolicy, VALUE_BYTES_MAX,
};
use crate::error::ErrorKind;
use crate::namespace::Namespaced;

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One conformance case.
pub struct Case {
    /// Its name, as printed in the matrix.
    pub name: &'static str,
    run: fn(Ctx) -> CaseFuture,
}

/// What a case gets: the backend and a key prefix no other case (or run) uses.
#[derive(Clone)]
pub struct Ctx {
    /// The backend under test.
    pub b: Arc<dyn Backend>,
    prefix: Vec<u8>,
}

impl Ctx {
    /// `prefix + name`.
    pub fn k(&self, name: impl AsRef<[u8]>) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(name.as_ref());
        k
    }
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case's name.
    pub name: &'static str,
    /// `None` on success, else what failed.
    pub failure: Option<String>,
    /// Time taken.
    pub elapsed: Duration,
}

/// The outcome of the suite on one backend.
#[derive(Debug, Clone)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// One result per case, in suite order.
    pub results: Vec<CaseResult>,
}

impl Report {
    /// True if every case passed.
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.failure.is_none())
    }

    /// A human-readable table, one line per case, then a `N passed, N failed` line.
    pub fn render(&self) -> String {
        let mut out = format!("conformance on {}\n", self.backend);
        for r in &self.results {
            match &r.failure {
                None => out.push_str(&format!(
                    "  ok    {:<64} {:>6} ms\n",
                    r.name,
                    r.elapsed.as_millis()
                )),
                Some(why) => out.push_str(&format!("  FAIL  {:<64} {why}\n", r.name)),
            }
        }
        let failed = self.results.iter().filter(|r| r.failure.is_some()).count();
        out.push_str(&format!(
            "{}: {} passed, {} failed\n",
            self.backend,
            self.results.len() - failed,
            failed
        ));
        out
    }
}

macro_rules! case {
    ($name:ident) => {
        Case {
            name: stringify!($name),
            run: |ctx| Box::pin($name(ctx)),
        }
    };
}

mod breaker;
mod cache;
mod cancel_point;
mod dedup;
mod flags;
#[cfg(feature = "http")]
mod http_cache;
#[cfg(feature = "http")]
mod http_idempotency;
#[cfg(feature = "http")]
mod http_ratelimit;
#[cfg(feature = "http")]
mod http_support;
mod kv;
mod lock;
mod otp;
mod ratelimit;
#[cfg(feature = "http")]
mod session;
#[cfg(feature = "http")]
mod user_session;

/// Every case, in the order they run: one module per area (`kv`, `lock`, `ratelimit`,
/// `dedup`, `otp`, ...), each case named `<area>_<behaviour>`. With the `http` feature, the
/// HTTP layers' cases (`http_ratelimit_…`, `http_idempotency_…`) and the sessions' (`session_…`,
/// `user_session_…`) run a real axum server and
/// client on the backend.
pub fn cases() -> Vec<Case> {
    let mut all = kv::cases();
    all.extend(lock::cases());
    all.extend(ratelimit::cases());
    all.extend(dedup::cases());
    all.extend(otp::cases());
    all.extend(breaker::cases());
    all.extend(flags::cases());
    all.extend(cache::cases());
    #[cfg(feature = "http")]
    {
        all.extend(http_ratelimit::cases());
        all.extend(http_idempotency::cases());
        all.extend(http_cache::cases());
        all.extend(session::cases());
        all.extend(user_session::cases());
    }
    all
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Runs every case on `backend` (each under a fresh prefix, with a 120 s limit) and reports.
pub async fn run(backend: Arc<dyn Backend>) -> Report {
    run_matching(backend, |_| true).await
}

/// Runs the cases whose name `select` accepts (e.g. one area, to repeat its concurrency cases
/// many times) and reports only those.
pub async fn run_matching(backend: Arc<dyn Backend>, select: impl Fn(&str) -> bool) -> Report {
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let run_id = RUN.fetch_add(1, Ordering::Relaxed);
    let mut results = Vec::new();
    for case in cases().into_iter().filter(|c| select(c.name)) {
        let ctx = Ctx {
            b: Arc::clone(&backend),
            prefix: format!("keel-conformance:{nonce:x}:{run_id}:{}:", case.name).into_bytes(),
        };
        let started = Instant::now();
        let task = tokio::spawn((case.run)(ctx));
        let failure = match tokio::time::timeout(Duration::from_secs(120), task).await {
            Ok(Ok(())) => None,
            Ok(Err(join)) => Some(panic_message(join)),
            Err(_) => Some("timed out after 120 s".to_owned()),
        };
        results.push(CaseResult {
            name: case.name,
            failure,
            elapsed: started.elapsed(),
        });
    }
    Report {
        backend: backend.name().to_owned(),
        results,
    }
}

fn panic_message(join: tokio::task::JoinError) -> String {
    match join.try_into_panic() {
        Ok(payload) => {
            if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_owned()
            } else {
                "panicked".to_owned()
            }
        }
        Err(e) => format!("task failed: {e}"),
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Lets a short TTL elapse on a real server's clock.
async fn let_expire(ttl: Duration) {
    tokio::time::sleep(ttl + ms(150)).await;
}

fn kind<T: std::fmt::Debug>(r: crate::Result<T>) -> ErrorKind {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.kind(),
    }
}

/// The backend under test, confined to the case's prefix (through [`Namespaced`]), so a
/// primitive built on it sees only the case's keys.
fn confined(c: &Ctx) -> Arc<dyn Backend> {
    Arc::new(Namespaced::new(Arc::clone(&c.b), c.k("")))
}
