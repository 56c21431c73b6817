//! The flag client: an in-process cache of every flag document, so evaluation costs no backend
//! call. The cache is refreshed at most once per refresh interval; a refresh is one read of the
//! `flags:version` change counter, and only when it moved are the documents reloaded. A write
//! through any [`FlagStore`] therefore reaches every client within one refresh interval.
//!
//! If a refresh fails the client keeps serving the documents it has (fail-static) and logs a
//! `tracing` warning; the next interval tries again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use keel_engine::{Clock, SystemClock};
use serde_json::Value;

use super::{Details, EvalContext, Flag, FlagError, FlagStore, Reason};
use crate::backend::Backend;

/// Default refresh interval of a [`FlagClient`].
pub const REFRESH_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);

/// A cached view of every flag in a backend. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct FlagClient {
    inner: Arc<Inner>,
}

struct Inner {
    store: FlagStore,
    clock: Arc<dyn Clock>,
    interval_ms: u64,
    snapshot: RwLock<Arc<Snapshot>>,
    next_refresh_ms: AtomicU64,
    refreshing: AtomicBool,
}

#[derive(Default)]
struct Snapshot {
    counter: Option<i64>,
    flags: HashMap<String, Flag>,
}

impl std::fmt::Debug for FlagClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlagClient")
            .field("store", &self.inner.store)
            .field("flags", &self.snapshot().flags.len())
            .finish()
    }
}

impl FlagClient {
    /// A client over `backend`, refreshing every [`REFRESH_INTERVAL_DEFAULT`]. Its cache is
    /// empty until the first refresh (the first [`details`](Self::details) call, or
    /// [`refresh`](Self::refresh)).
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self::with_options(backend, REFRESH_INTERVAL_DEFAULT, Arc::new(SystemClock))
    }

    /// A client with its own refresh interval and clock (a `ManualClock` in tests).
    pub fn with_options(
        backend: Arc<dyn Backend>,
        refresh_interval: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        FlagClient {
            inner: Arc::new(Inner {
                store: FlagStore::new(backend),
                clock,
                interval_ms: super::super::breaker::duration_ms(refresh_interval).max(1),
                snapshot: RwLock::new(Arc::new(Snapshot::default())),
                next_refresh_ms: AtomicU64::new(0),
                refreshing: AtomicBool::new(false),
            }),
        }
    }

    /// The store the client reads.
    pub fn store(&self) -> &FlagStore {
        &self.inner.store
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        // A poisoned lock only means a writer panicked between two whole-Arc stores; the Arc
        // inside is always a complete snapshot.
        match self.inner.snapshot.read() {
            Ok(g) => Arc::clone(&g),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// Reads the change counter and, if it moved (or nothing is loaded yet), reloads every
    /// document. Returns whether it reloaded.
    ///
    /// # Errors
    /// [`FlagError::Backend`]; the cache is left as it was.
    pub async fn refresh(&self) -> Result<bool, FlagError> {
        let counter = self.inner.store.change_counter().await?;
        if self.snapshot().counter == Some(counter) {
            return Ok(false);
        }
        let flags = self.inner.store.list().await?;
        let next = Arc::new(Snapshot {
            counter: Some(counter),
            flags: flags.into_iter().map(|f| (f.key.clone(), f)).collect(),
        });
        match self.inner.snapshot.write() {
            Ok(mut g) => *g = next,
            Err(p) => *p.into_inner() = next,
        }
        Ok(true)
    }

    /// Refreshes if the last refresh is at least one interval old (one caller at a time; the
    /// others keep evaluating the current cache). A failure is logged and the cache kept.
    pub async fn maybe_refresh(&self) {
        let now = self.inner.clock.now_ms();
        if now < self.inner.next_refresh_ms.load(Ordering::Acquire)
            || self.inner.refreshing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.inner.next_refresh_ms.store(
            now.saturating_add(self.inner.interval_ms),
            Ordering::Release,
        );
        if let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "flag refresh failed; serving the cached flags");
        }
        self.inner.refreshing.store(false, Ordering::Release);
    }

    /// Evaluates `key` from the cache (no backend call). A flag the cache does not hold is
    /// `Reason::Error` with a `Null` value.
    pub fn evaluate(&self, key: &str, ctx: &EvalContext) -> Details {
        match self.snapshot().flags.get(key) {
            Some(flag) => flag.evaluate(ctx),
            None => Details {
                value: Value::Null,
                variant: String::new(),
                reason: Reason::Error,
                version: 0,
            },
        }
    }

    /// [`maybe_refresh`](Self::maybe_refresh), then [`evaluate`](Self::evaluate).
    pub async fn details(&self, key: &str, ctx: &EvalContext) -> Details {
        self.maybe_refresh().await;
        self.evaluate(key, ctx)
    }

    /// The flag's boolean value, or `default` if it is missing or not a boolean.
    pub async fn bool_value(&self, key: &str, ctx: &EvalContext, default: bool) -> bool {
        self.details(key, ctx)
            .await
            .value
            .as_bool()
            .unwrap_or(default)
    }

    /// The cached document of `key`.
    pub fn cached(&self, key: &str) -> Option<Flag> {
        self.snapshot().flags.get(key).cloned()
    }
}
