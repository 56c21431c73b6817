//! keel: state for services without infrastructure on day one.
//!
//! This facade re-exports the workspace's crates and adds [`connect`], which turns one URL
//! into a [`Backend`]: the same service code runs on the embedded engine today and on Redis,
//! Valkey or Postgres tomorrow by changing only that URL.
//!
//! - [`engine`] (`keel-engine`): the embedded TTL-aware key-value engine.
//! - [`primitives`] (`keel-primitives`): the `Backend` contract and the service primitives.
//! - [`adapters`] (`keel-adapters`): the contract on Redis, Valkey, Postgres, sled and redb,
//!   one cargo feature each (`redis`, `valkey`, `postgres`, `sled`, `redb`, or `full`).
//! - [`migrate`]: copy every live key (value and expiry) from one backend to another, and
//!   compare two backends key by key, through the `Backend` contract only.

// The README's examples compile and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

use std::path::Path;
use std::sync::Arc;

pub mod migrate;

pub use keel_adapters as adapters;
pub use keel_engine as engine;
pub use keel_primitives as primitives;
pub use keel_primitives::{Backend, Embedded, Error, ErrorKind, Namespaced, Observed, Result};

/// Observability: the metric names keel reports, [`Observed`] (the wrapper [`connect`] puts
/// around every backend), [`EngineGauges`](metrics::EngineGauges) for the embedded engine's
/// figures, and [`describe_metrics`](metrics::describe_metrics) for an exporter's `# HELP`
/// lines. Install a `metrics` recorder (e.g. `metrics-exporter-prometheus`) and a `tracing`
/// subscriber in the application to see them.
pub mod metrics {
    pub use keel_primitives::observe::*;
}

/// Opens the backend a URL names.
///
/// | URL | backend |
/// |---|---|
/// | `memory://` | the embedded engine, memory only |
/// | a path (`./keel-data`, `/var/lib/app`), `file:PATH` or `keel://PATH` | the embedded engine on disk |
/// | `redis://…`, `rediss://…` | Redis (feature `redis`) |
/// | `redis+cluster://host:port,host:port`, `rediss+cluster://…` | Redis Cluster (feature `redis`) |
/// | `valkey://…`, `valkeys://…` | Valkey (feature `valkey`) |
/// | `valkey+cluster://host:port,host:port`, `valkeys+cluster://…` | Valkey Cluster (feature `valkey`) |
/// | `postgres://…`, `postgresql://…` | Postgres (feature `postgres`); the table is created if missing |
/// | `sled:PATH` | sled (feature `sled`) |
/// | `redb:PATH` | redb (feature `redb`) |
///
/// The backend comes wrapped in [`Observed`]: every operation is a `tracing` span and counts
/// in the `keel_backend_*` metrics (see [`metrics`]), which cost next to nothing until the
/// application installs a subscriber or a recorder. [`Connect::observe`]`(false)` opens it
/// bare, and [`Connect::open`] also hands out the embedded engine for [`metrics::EngineGauges`].
///
/// # Errors
/// [`ErrorKind::InvalidInput`] for an unknown scheme or a backend whose feature is not compiled
/// in; the backend's own error (classified) when it cannot be opened or reached.
pub async fn connect(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Connect::new().open(url).await?.backend)
}

/// How [`connect`] opens a backend, for the cases it does not cover: a bare backend without
/// the [`Observed`] wrapper, another `backend` label, or the embedded engine's handle.
///
/// ```no_run
/// # async fn run() -> keel::Result<()> {
/// let store = keel::Connect::new().label("sessions").open("./keel-data").await?;
/// if let Some(db) = store.engine.clone() {
///     // Publish the engine's figures every 10 s while `_gauges` lives.
///     let _gauges = keel::metrics::EngineGauges::new(db).spawn(std::time::Duration::from_secs(10));
/// }
/// let bare = keel::Connect::new().observe(false).open("memory://").await?.backend;
/// # let _ = bare; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Connect {
    observe: bool,
    label: Option<String>,
}

impl Default for Connect {
    fn default() -> Self {
        Connect::new()
    }
}

/// What [`Connect::open`] opened.
#[derive(Clone)]
#[non_exhaustive]
pub struct Connected {
    /// The backend ([`Observed`] unless [`Connect::observe`]`(false)`).
    pub backend: Arc<dyn Backend>,
    /// The embedded engine, for a path, `file:` or `memory://` URL (for
    /// [`metrics::EngineGauges`], or [`engine::Db::stats`]); `None` for the other backends.
    pub engine: Option<engine::Db>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("backend", &self.backend.name())
            .field("engine", &self.engine.is_some())
            .finish()
    }
}

impl Connect {
    /// As [`connect`]: observed, labelled with the backend's name.
    pub fn new() -> Self {
        Connect {
            observe: true,
            label: None,
        }
    }

    /// Whether to wrap the backend in [`Observed`] (default `true`).
    pub fn observe(mut self, observe: bool) -> Self {
        self.observe = observe;
        self
    }

    /// The `backend` label of the metrics and spans (default: the backend's name, e.g.
    /// `redis`).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Opens the backend `url` names (see [`connect`] for the URLs).
    ///
    /// # Errors
    /// As [`connect`].
    pub async fn open(&self, url: &str) -> Result<Connected> {
        let (backend, engine) = match open_url(url).await? {
            Opened::Engine(e) => {
                let db = e.db().clone();
                (Arc::new(e) as Arc<dyn Backend>, Some(db))
            }
            Opened::Other(b) => (b, None),
        };
        let backend = match (&self.label, self.observe) {
            (_, false) => backend,
            (None, true) => Arc::new(Observed::new(backend)) as Arc<dyn Backend>,
            (Some(label), true) => Arc::new(Observed::with_label(backend, label.clone())),
        };
        Ok(Connected { backend, engine })
    }
}

/// A backend just opened: the engine (whose `Db` [`Connected`] hands out) or another.
enum Opened {
    Engine(Embedded),
    Other(Arc<dyn Backend>),
}

async fn open_url(url: &str) -> Result<Opened> {
    if let Some(path) = embedded_path(url) {
        return open_blocking(path.to_owned(), |path| embedded(&path)).await;
    }
    let (scheme, rest) = split_scheme(url).unwrap_or_default();
    match scheme.as_str() {
        "memory" => Ok(Opened::Engine(Embedded::memory())),
        "redis" | "rediss" | "redis+cluster" | "rediss+cluster" => {
            redis(url).await.map(Opened::Other)
        }
        "valkey" | "valkeys" | "valkey+cluster" | "valkeys+cluster" => {
            valkey(url).await.map(Opened::Other)
        }
        "postgres" | "postgresql" => postgres(url).await.map(Opened::Other),
        "sled" => open_blocking(rest.to_owned(), |path| sled(&path).map(Opened::Other)).await,
        "redb" => open_blocking(rest.to_owned(), |path| redb(&path).map(Opened::Other)).await,
        other => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "unknown backend scheme `{other}:` in {url:?}; use a path, keel://PATH, \
                 memory://, redis://, rediss://, valkey://, postgres://, sled:PATH or redb:PATH"
            ),
        )),
    }
}

/// The directory of the embedded engine's store that `url` names, if it names one: a plain
/// path, `file:PATH` / `file://PATH` or `keel://PATH`. `None` for every other scheme
/// (`memory://` included: it has no directory).
pub fn embedded_path(url: &str) -> Option<&str> {
    match split_scheme(url) {
        None => Some(url),
        Some((scheme, rest)) if scheme == "file" || scheme == "keel" => {
            Some(rest.trim_start_matches("//"))
        }
        Some(_) => None,
    }
}

/// The lowercased scheme of `url` and what follows its `:`, if it has one. A single letter
/// before ':' would be a Windows drive, and "./x:y" a path: only a plain alphanumeric word
/// (with `+`) counts as a scheme.
fn split_scheme(url: &str) -> Option<(String, &str)> {
    let (s, rest) = url.split_once(':')?;
    (s.len() > 1 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+'))
        .then(|| (s.to_ascii_lowercase(), rest))
}

/// Opens an on-disk store on the runtime's blocking pool: opening may run recovery (replay a
/// log, check a file), which must not stall an async worker thread. Outside a runtime it
/// runs inline.
async fn open_blocking<T: Send + 'static>(
    path: String,
    open: fn(String) -> Result<T>,
) -> Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn_blocking(move || open(path))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Transient,
                    "opening the store was interrupted (the runtime is shutting down)",
                )
                .with_source(e)
            })?,
        Err(_) => open(path),
    }
}

fn embedded(path: &str) -> Result<Opened> {
    Ok(Opened::Engine(Embedded::open(Path::new(path))?))
}

#[allow(dead_code)]
fn not_compiled(feature: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!(
            "keel was built without the `{feature}` feature, so it cannot open this URL; \
             rebuild with `--features {feature}` (or `--features full`)"
        ),
    )
}

#[cfg(feature = "redis")]
async fn redis(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(adapters::redis::RedisBackend::connect(url).await?))
}
#[cfg(not(feature = "redis"))]
async fn redis(_: &str) -> Result<Arc<dyn Backend>> {
    Err(not_compiled("redis"))
}

#[cfg(feature = "valkey")]
async fn valkey(url: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(
        adapters::valkey::ValkeyBackend::connect(url).await?,
    ))
}
#[cfg(not(feature = "valkey"))]
async fn valkey(_: &str) -> Result<Arc<dyn Backend>> {
    Err(not_compiled("valkey"))
}

#[cfg(feature = "postgres")]
async fn postgres(url: &str) -> Result<Arc<dyn Backend>> {
    let backend = adapters::postgres::PostgresBackend::connect(url).await?;
    backend.ensure_schema().await?;
    Ok(Arc::new(backend))
}
#[cfg(not(feature = "postgres"))]
async fn postgres(_: &str) -> Result<Arc<dyn Backend>> {
    Err(not_compiled("postgres"))
}

#[cfg(feature = "sled")]
fn sled(path: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(adapters::sled::SledBackend::open(path)?))
}
#[cfg(not(feature = "sled"))]
fn sled(_: &str) -> Result<Arc<dyn Backend>> {
    Err(not_compiled("sled"))
}

#[cfg(feature = "redb")]
fn redb(path: &str) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(adapters::redb::RedbBackend::open(path)?))
}
#[cfg(not(feature = "redb"))]
fn redb(_: &str) -> Result<Arc<dyn Backend>> {
    Err(not_compiled("redb"))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_not_compiled_in_is_refused_naming_its_feature() {
        let e = not_compiled("redis");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("--features redis"), "{e}");
    }

    #[test]
    fn embedded_paths_are_recognised_by_scheme() {
        assert_eq!(embedded_path("./keel-data"), Some("./keel-data"));
        assert_eq!(embedded_path("keel:///var/lib/app"), Some("/var/lib/app"));
        assert_eq!(embedded_path("file:data"), Some("data"));
        assert_eq!(embedded_path("C:/data"), Some("C:/data"));
        assert_eq!(embedded_path("memory://"), None);
        assert_eq!(embedded_path("redis://127.0.0.1/"), None);
    }
}
