//! `keel demo`: keel's main job as a real web service, and the tour that drives it.
//!
//! The service is an axum app on 127.0.0.1 whose only state is one keel store: the embedded
//! engine in `./keel-data` by default, or any backend `keel::connect` opens. It reaches that
//! state only through the [`Backend`] contract and the primitives built on it (sessions and
//! device records, one-time codes, rate limits, idempotency keys, the HTTP cache, dedup,
//! feature flags, the circuit breaker, locks with fencing tokens), mounted the way a service
//! that copies it would mount them. Nothing is kept in process memory that a second replica on
//! the same store would need.
//!
//! - `app.rs`: the state (every primitive, built once) and the router with its layers; its
//!   module docs list the routes.
//! - `auth.rs`: passwordless sign-in and the devices page. `shop.rs`: the other features.
//! - `pages.rs`: the HTML (maud, no scripts). `console.rs`: the output and the code "outbox".
//! - `telemetry.rs`: the Prometheus recorder behind the `metrics` facade, `GET /metrics`.
//! - `tour.rs`: `--tour`, an HTTP client that walks through every feature and checks it.
//!
//! Serving stops at Ctrl-C (or SIGTERM): the listener closes, requests in flight finish, then
//! the store is closed (the embedded engine flushes and syncs its log). A second Ctrl-C exits
//! at once with status 130.

mod app;
mod auth;
mod console;
mod pages;
mod shop;
mod telemetry;
mod tour;

use std::future::{Future, IntoFuture};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use keel_engine::{Db, Options as DbOptions};
use keel_primitives::{Backend, Embedded};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use self::console::Console;
use crate::cli::failure::{CmdResult, Failure};

/// Worker threads of the service's runtime.
const WORKER_THREADS: usize = 2;
/// Exit status after a second Ctrl-C (128 + SIGINT, as shells report it).
const FORCED_EXIT: i32 = 130;

/// Which store the service keeps its state in.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// The embedded engine in this directory (created if missing).
    Dir(PathBuf),
    /// Whatever `keel::connect` opens for this URL.
    Url(String),
    /// A fresh embedded store in a temporary directory, deleted afterwards (the tour's
    /// default, so it starts from nothing every time).
    Temporary,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The port on 127.0.0.1 (0: a free one). The tour always takes a free one.
    pub port: u16,
    /// The store.
    pub store: StoreChoice,
    /// Run the tour and exit instead of serving until Ctrl-C.
    pub tour: bool,
}

/// Runs the service (or its tour), writing its output to `out`.
///
/// # Errors
/// A store that cannot be opened, a port that cannot be bound, a server error, a failed
/// tour check, or a store that fails to close cleanly.
pub fn run(options: Options, out: &mut dyn Write) -> CmdResult {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .thread_name("keel-demo")
        .enable_all()
        .build()
        .map_err(|e| Failure::Error(format!("cannot start the async runtime: {e}")))?;
    let store = runtime.block_on(Store::open(&options.store))?;
    let (console, lines) = Console::new();
    let outcome = runtime.block_on(pump(
        service(options, Arc::clone(&store.backend), console),
        lines,
        out,
    ));
    // Ends what is still running (a background cache revalidation, the metrics upkeep) and
    // drops its handles on the store before the store is closed.
    drop(runtime);
    let closed = store.close();
    if let Ok(what) = &closed {
        writeln!(out, "{what}")?;
    }
    outcome.and(closed.map(drop))
}

/// Runs `work` while writing the console's lines to `out` as they come.
async fn pump(
    work: impl Future<Output = CmdResult>,
    mut lines: mpsc::Receiver<String>,
    out: &mut dyn Write,
) -> CmdResult {
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            biased;
            Some(line) = lines.recv() => {
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            result = &mut work => break result,
        }
    };
    while let Ok(line) = lines.try_recv() {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    result
}

/// Binds, builds the app, and serves until a signal (or runs the tour).
async fn service(options: Options, backend: Arc<dyn Backend>, console: Console) -> CmdResult {
    let label = describe(&options.store);
    let metrics = telemetry::install()?;
    let port = if options.tour { 0 } else { options.port };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|e| Failure::Error(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let addr = listener.local_addr()?;
    let (app, router) = app::build(backend, metrics, console.clone(), addr).await?;
    let (stop, mut stopped) = watch::channel(false);
    let server = tokio::spawn(
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .into_future(),
    );

    if options.tour {
        console.line(format!("keel demo: serving http://{addr} on {label}"));
        let outcome = tour::run(addr, &app.outbox, &console).await;
        let _ = stop.send(true);
        finish(server.await)?;
        return outcome;
    }

    // Listening before the banner says the service is up: a signal sent as soon as it is
    // printed must start a graceful shutdown, not find the default handler (which would kill
    // the process without closing the store).
    let signals = Signals::listen()?;
    banner(&console, addr, &label);
    tokio::spawn(stop_on_signal(signals, console.clone(), stop));
    finish(server.await)?;
    console.line("keel demo: stopped serving; closing the store");
    Ok(())
}

fn finish(joined: Result<std::io::Result<()>, tokio::task::JoinError>) -> CmdResult {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Failure::Error(format!("the server failed: {e}"))),
        Err(e) => Err(Failure::Error(format!("the server task failed: {e}"))),
    }
}

fn banner(console: &Console, addr: SocketAddr, label: &str) {
    let base = format!("http://{addr}");
    console.line(format!("keel demo: serving {base} on {label}"));
    console.line(format!(
        "  open {base}/ in a browser to sign in (codes are printed here instead of mailed)"
    ));
    console.line("  or try it with curl:");
    for line in [
        format!("    curl -i {base}/catalog"),
        format!(
            "    curl -i -X POST {base}/orders -H 'Idempotency-Key: order-1' \
             -H 'Content-Type: application/json' -d '{{\"item\":\"espresso\",\"qty\":2}}'"
        ),
        format!(
            "    curl -i -X POST {base}/webhooks/payments -H 'Content-Type: application/json' \
             -d '{{\"id\":\"evt_1\",\"type\":\"payment.succeeded\",\"amount_cents\":500}}'"
        ),
        format!("    curl -i '{base}/upstream?fail=true'"),
        format!("    curl -i -X POST '{base}/jobs/report?hold_ms=2000'"),
        format!("    curl {base}/metrics"),
    ] {
        console.line(line);
    }
    console.line("  Ctrl-C stops it.");
}

/// The signals that stop the service, registered once.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts listening for Ctrl-C (SIGINT) and SIGTERM.
    fn listen() -> Result<Signals, Failure> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let failed =
                |e: std::io::Error| Failure::Error(format!("cannot listen for signals: {e}"));
            Ok(Signals {
                interrupt: signal(SignalKind::interrupt()).map_err(failed)?,
                terminate: signal(SignalKind::terminate()).map_err(failed)?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The first Ctrl-C or SIGTERM.
    async fn first(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }

    /// The next Ctrl-C.
    async fn interrupt(&mut self) {
        #[cfg(unix)]
        self.interrupt.recv().await;
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The first Ctrl-C (or SIGTERM) starts a graceful shutdown; a second Ctrl-C exits at once.
async fn stop_on_signal(mut signals: Signals, console: Console, stop: watch::Sender<bool>) {
    signals.first().await;
    console.line(
        "keel demo: shutting down: finishing the requests in flight (Ctrl-C again to stop now)",
    );
    let _ = stop.send(true);
    signals.interrupt().await;
    // Standard output belongs to the command's thread; this last word goes to standard error.
    eprintln!("keel demo: second Ctrl-C: exiting without waiting");
    std::process::exit(FORCED_EXIT);
}

/// What the banner says the state is kept in.
fn describe(choice: &StoreChoice) -> String {
    match choice {
        StoreChoice::Dir(dir) => format!("the keel store in {}", dir.display()),
        StoreChoice::Url(url) => format!("the backend at {}", redact_url(url)),
        StoreChoice::Temporary => "a fresh keel store in a temporary directory".to_owned(),
    }
}

/// `url` without its password, for printing.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// The store, and what closing it takes.
struct Store {
    backend: Arc<dyn Backend>,
    /// The engine, when the demo opened it (closed explicitly, so a failed flush is reported).
    db: Option<Db>,
    /// A temporary directory to delete after closing.
    temporary: Option<PathBuf>,
    /// Publishes the engine's figures as gauges while it lives.
    _gauges: Option<keel::metrics::EngineGaugesTask>,
}

/// How often the engine's figures are published for /metrics.
const ENGINE_GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

impl Store {
    async fn open(choice: &StoreChoice) -> Result<Store, Failure> {
        match choice {
            StoreChoice::Dir(dir) => Store::embedded(dir.clone(), None).await,
            StoreChoice::Temporary => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let dir = std::env::temp_dir()
                    .join(format!("keel-demo-{}-{nanos:x}", std::process::id()));
                Store::embedded(dir.clone(), Some(dir)).await
            }
            StoreChoice::Url(url) => {
                let backend = keel::connect(url).await.map_err(|e| {
                    Failure::Error(format!("cannot open the store at {}: {e}", redact_url(url)))
                })?;
                Ok(Store {
                    backend,
                    db: None,
                    temporary: None,
                    _gauges: None,
                })
            }
        }
    }

    async fn embedded(dir: PathBuf, temporary: Option<PathBuf>) -> Result<Store, Failure> {
        let shown = dir.display().to_string();
        // Opening may replay a log: not on a runtime worker.
        let db = tokio::task::spawn_blocking(move || Db::open(&dir, DbOptions::default()))
            .await
            .map_err(|e| Failure::Error(format!("opening the store was interrupted: {e}")))?
            .map_err(|e| Failure::Error(format!("cannot open the store in {shown}: {e}")))?;
        // Observed, as `keel::connect` would wrap it, so every operation shows on /metrics;
        // the engine's own figures are published next to them while the store is open.
        let gauges = keel::metrics::EngineGauges::new(db.clone()).spawn(ENGINE_GAUGES_EVERY);
        Ok(Store {
            backend: Arc::new(keel::Observed::new(Arc::new(Embedded::new(db.clone())))),
            db: Some(db),
            temporary,
            _gauges: Some(gauges),
        })
    }

    /// Closes the store; says what it did.
    fn close(self) -> Result<String, Failure> {
        let Store {
            backend,
            db,
            temporary,
            _gauges,
        } = self;
        drop(_gauges);
        drop(backend);
        let said = match db {
            Some(db) => {
                db.close()
                    .map_err(|e| Failure::Error(format!("closing the store failed: {e}")))?;
                "keel demo: store closed (log flushed and synced)"
            }
            None => "keel demo: store closed",
        };
        if let Some(dir) = temporary {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(said.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/keel"),
            "postgres://app:***@db:5432/keel"
        );
        assert_eq!(redact_url("redis://127.0.0.1/"), "redis://127.0.0.1/");
        assert_eq!(redact_url("./keel-data"), "./keel-data");
    }
}
