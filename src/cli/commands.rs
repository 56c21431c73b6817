//! One function per `keel` command. Each takes the [`Target`] store (a directory or a URL)
//! and its parsed arguments, writes its result to `out` (standard output in the binary) and
//! reports a [`Failure`] for everything else; it never prints to standard error itself, so the
//! exit-code policy stays in one place.
//!
//! The data commands (`get`, `set`, `del`, `incr`, `expire`, `persist`, `ttl`, `scan`, `dump`,
//! `load`, `stats`) go through the [`Backend`] contract only, so they are the same code on the
//! embedded engine, Redis, Valkey, Postgres, sled and redb. On a store directory, commands
//! that can create data (`set`, `incr`, `load`) create the store if the directory is new; the
//! others refuse a directory that does not exist, so a mistyped `--db` is an error rather
//! than an empty store. `compact` and `verify` work on the engine's files and refuse any other
//! backend with an error naming the command.

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keel::primitives::backend::ScanCursor;
use keel::{Backend, Embedded};
use keel_engine::storage::FsStorage;
use keel_engine::{Db, Options, Ttl};
use serde_json::{Value, json};

use super::dump::{self, Record, RecordLimits};
use super::escape::escape_bytes;
use super::failure::{CmdResult, Failure};

/// Keys fetched per scan call by `scan` and `dump`.
pub const SCAN_PAGE_KEYS: usize = 1000;
/// Most keys `load` writes at once (its batch); also how often it reads the backend's clock.
pub const LOAD_BATCH_KEYS: usize = 1000;
/// Inputs with at least this many records get a progress bar on standard error (when it is a
/// terminal).
pub const LOAD_PROGRESS_KEYS_MIN: usize = 10_000;
/// Keys `dump` reads at once.
const DUMP_IN_FLIGHT_MAX: usize = 256;

const _: () = assert!(SCAN_PAGE_KEYS <= keel_engine::SCAN_LIMIT_MAX);
const _: () = assert!(LOAD_BATCH_KEYS <= keel_engine::SCAN_LIMIT_MAX);

/// Where a command's data lives: the embedded engine's directory (from `--db`, `KEEL_DB`, the
/// default, or a `--url` that names a path, `file:` or `keel://`), or any other URL
/// `keel::connect` opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The embedded engine's store directory.
    Dir(PathBuf),
    /// A backend URL (`redis://`, `valkey://`, `postgres://`, `sled:`, `redb:`, `memory://`).
    Url(String),
}

impl Target {
    /// The target a URL names: a directory for embedded-engine URLs, the URL otherwise.
    pub fn from_url(url: &str) -> Target {
        match keel::embedded_path(url) {
            Some(path) => Target::Dir(PathBuf::from(path)),
            None => Target::Url(url.to_owned()),
        }
    }

    /// How to name the target in messages: the directory, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Target::Dir(dir) => dir.display().to_string(),
            Target::Url(url) => redact(url),
        }
    }

    /// The store directory, or an error naming `command` for a backend that is not the
    /// embedded engine.
    fn engine_dir(&self, command: &str) -> Result<&Path, Failure> {
        match self {
            Target::Dir(dir) => Ok(dir),
            Target::Url(url) => Err(Failure::Error(format!(
                "`keel {command}` works on the embedded engine's files only (a directory: \
                 --db DIR or --url keel://DIR); {} is not one",
                redact(url)
            ))),
        }
    }
}

/// `url` with the password of its user info (`scheme://user:password@host`) replaced by
/// `***`, for messages and resume markers.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Whether opening a store directory may create it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Create the store if the directory holds none (`set`, `incr`, `load`).
    IfMissing,
    /// Refuse a directory without a store.
    Never,
}

/// An open backend, and the engine under it when it is the embedded engine on disk (to close
/// it cleanly and to read its counters).
pub struct Store {
    /// The contract every data command uses.
    pub backend: Arc<dyn Backend>,
    /// The engine, for a store directory.
    pub db: Option<Db>,
    /// How the target is named in messages.
    pub label: String,
}

/// The async runtime the commands drive the contract with.
///
/// # Errors
/// If the runtime cannot start (no threads available).
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Error(format!("cannot start an async runtime: {e}")))
}

impl Store {
    /// Opens `target`: a directory with the CLI's lock wait and `create` rule, anything else
    /// with `keel::connect`.
    ///
    /// # Errors
    /// `NotAStore` / locked / corruption for a directory; the backend's own error (an
    /// unknown scheme, a backend not compiled in, an unreachable server) for a URL.
    pub fn open(
        runtime: &tokio::runtime::Runtime,
        target: &Target,
        create: Create,
    ) -> Result<Store, Failure> {
        match target {
            Target::Dir(dir) => {
                let db = match create {
                    Create::IfMissing => open_or_create(dir)?,
                    Create::Never => open_existing(dir)?,
                };
                Ok(Store {
                    backend: Arc::new(Embedded::new(db.clone())),
                    db: Some(db),
                    label: dir.display().to_string(),
                })
            }
            Target::Url(url) => {
                let backend = runtime
                    .block_on(keel::connect(url))
                    .map_err(|e| Failure::Error(format!("cannot open {}: {e}", redact(url))))?;
                Ok(Store {
                    backend,
                    db: None,
                    label: redact(url),
                })
            }
        }
    }

    /// Drops the backend (inside the runtime, which its connections belong to) and closes
    /// the engine, turning a late I/O failure into an error the user sees.
    pub fn close(self, runtime: &tokio::runtime::Runtime) -> CmdResult {
        let _entered = runtime.enter();
        drop(self.backend);
        if let Some(db) = self.db {
            close(db)?;
        }
        Ok(())
    }
}

/// Opens `target`, runs `body` on its backend, and closes it (also when `body` failed).
fn with_store<T>(
    target: &Target,
    create: Create,
    body: impl AsyncFnOnce(&dyn Backend) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let runtime = runtime()?;
    let store = Store::open(&runtime, target, create)?;
    let result = runtime.block_on(body(&*store.backend));
    let closed = store.close(&runtime);
    let value = result?;
    closed?;
    Ok(value)
}

/// Opens the store in `dir`, creating it if needed.
///
/// # Errors
/// Whatever [`Db::open`] returns, e.g. `Locked` naming the holding process.
pub fn open_or_create(dir: &Path) -> Result<Db, Failure> {
    Ok(Db::open(dir, cli_options())?)
}

/// The CLI waits briefly for a store's lock, so a command run right after a service stopped
/// does not fail spuriously.
fn cli_options() -> Options {
    Options::default().lock_wait(LOCK_WAIT)
}

/// How long a command waits for another holder to release the store.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Opens the existing store in `dir`; creates nothing if there is none.
///
/// # Errors
/// `NotAStore` naming `dir` if it holds no store; otherwise as [`open_or_create`].
pub fn open_existing(dir: &Path) -> Result<Db, Failure> {
    Ok(Db::open(dir, cli_options().create_if_missing(false))?)
}

/// `keel compact`: takes a snapshot now and deletes the WAL it covers.
pub fn compact(target: &Target, out: &mut dyn Write) -> CmdResult {
    let db = open_existing(target.engine_dir("compact")?)?;
    let before = db.stats();
    let report = db.compact()?;
    let after = db.stats();
    close(db)?;
    match report {
        Some(r) => writeln!(
            out,
            "snapshot at lsn {}: {} entries in {:.3} ms; {} WAL segment(s) deleted; WAL {} -> {} bytes",
            r.lsn,
            r.entries,
            r.duration.as_secs_f64() * 1000.0,
            r.segments_deleted,
            before.wal_bytes,
            after.wal_bytes
        )?,
        None => writeln!(out, "nothing to compact")?,
    }
    Ok(())
}

/// Closes `db`, turning a late I/O failure into an error the user sees.
fn close(db: Db) -> CmdResult {
    db.close()?;
    Ok(())
}

/// `keel set`.
pub fn set(
    target: &Target,
    key: &[u8],
    value: &[u8],
    ttl: Option<Duration>,
    nx: bool,
    out: &mut dyn Write,
) -> CmdResult {
    with_store(target, Create::IfMissing, async |b| {
        if nx {
            if !b.set_nx(key, value, ttl).await? {
                return Err(Failure::Negative("not set: key exists".to_owned()));
            }
        } else {
            b.set(key, value, ttl).await?;
        }
        Ok(())
    })?;
    writeln!(out, "OK")?;
    Ok(())
}

/// `keel get`: the raw value bytes, with nothing added.
pub fn get(target: &Target, key: &[u8], out: &mut dyn Write) -> CmdResult {
    match with_store(target, Create::Never, async |b| Ok(b.get(key).await?))? {
        Some(value) => {
            out.write_all(&value)?;
            Ok(())
        }
        None => Err(Failure::Negative(format!(
            "not found: {}",
            escape_bytes(key)
        ))),
    }
}

/// `keel del`: 1 if a live key was deleted, 0 otherwise.
pub fn del(target: &Target, key: &[u8], out: &mut dyn Write) -> CmdResult {
    let deleted = with_store(target, Create::Never, async |b| Ok(b.delete(key).await?))?;
    writeln!(out, "{}", u8::from(deleted))?;
    Ok(())
}

/// `keel incr`: the new value.
pub fn incr(
    target: &Target,
    key: &[u8],
    by: i64,
    ttl: Option<Duration>,
    out: &mut dyn Write,
) -> CmdResult {
    let value = with_store(target, Create::IfMissing, async |b| {
        Ok(b.incr(key, by, ttl).await?)
    })?;
    writeln!(out, "{value}")?;
    Ok(())
}

/// `keel expire`: 1 if the key exists and now expires after `ttl`, 0 if it is missing.
pub fn expire(target: &Target, key: &[u8], ttl: Duration, out: &mut dyn Write) -> CmdResult {
    let done = with_store(target, Create::Never, async |b| {
        Ok(b.expire(key, ttl).await?)
    })?;
    writeln!(out, "{}", u8::from(done))?;
    Ok(())
}

/// `keel persist`: 1 if the key existed and had a TTL (now removed), 0 otherwise.
pub fn persist(target: &Target, key: &[u8], out: &mut dyn Write) -> CmdResult {
    let done = with_store(target, Create::Never, async |b| Ok(b.persist(key).await?))?;
    writeln!(out, "{}", u8::from(done))?;
    Ok(())
}

/// The PTTL-style number for a [`Ttl`]: milliseconds left, -1 without expiry, -2 if missing.
pub fn ttl_number(ttl: Ttl) -> i128 {
    match ttl {
        Ttl::Missing => -2,
        Ttl::NoExpiry => -1,
        Ttl::Remaining(left) => i128::try_from(left.as_millis()).unwrap_or(i128::MAX),
    }
}

/// `keel ttl`.
pub fn ttl(target: &Target, key: &[u8], out: &mut dyn Write) -> CmdResult {
    let ttl = with_store(target, Create::Never, async |b| Ok(b.ttl(key).await?))?;
    writeln!(out, "{}", ttl_number(ttl))?;
    Ok(())
}

/// `keel scan`: one escaped key per line, at most `limit` keys, in the backend's scan order
/// (byte order on the embedded engine; each other backend's own scan order).
pub fn scan(
    target: &Target,
    prefix: &[u8],
    limit: Option<usize>,
    out: &mut dyn Write,
) -> CmdResult {
    with_store(target, Create::Never, async |b| {
        let mut cursor: Option<ScanCursor> = None;
        let mut printed = 0usize;
        loop {
            let want = match limit {
                Some(limit) => (limit - printed).min(SCAN_PAGE_KEYS),
                None => SCAN_PAGE_KEYS,
            };
            if want == 0 {
                return Ok(());
            }
            let page = b.scan(prefix, cursor.as_ref(), want).await?;
            for key in page.keys.iter().take(want) {
                writeln!(out, "{}", escape_bytes(key))?;
            }
            printed += page.keys.len().min(want);
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    })
}

/// How `keel stats` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsFormat {
    /// One figure per line, for people.
    Text,
    /// One JSON object, for scripts.
    Json,
}

/// `keel stats`: the engine's counters on a store directory; on any other backend, what the
/// contract can tell (its name, its clock and a round trip). With a prefix, also the number
/// of live keys under it (a full scan of the prefix).
pub fn stats(
    target: &Target,
    prefix: Option<&[u8]>,
    format: StatsFormat,
    out: &mut dyn Write,
) -> CmdResult {
    let runtime = runtime()?;
    let store = Store::open(&runtime, target, Create::Never)?;
    let contract = runtime.block_on(async {
        let asked = Instant::now();
        let now_ms = store.backend.now_ms().await?;
        let round_trip = asked.elapsed();
        let keys = match prefix {
            Some(prefix) => Some(count_keys(&*store.backend, prefix).await?),
            None => None,
        };
        Ok::<_, Failure>((now_ms, round_trip, keys))
    });
    let name = store.backend.name().to_owned();
    let engine = store.db.as_ref().map(Db::stats);
    let label = store.label.clone();
    store.close(&runtime)?;
    let (now_ms, round_trip, keys_under_prefix) = contract?;

    let mut object = json!({
        "backend": name,
        "target": label,
        "clock_ms": now_ms,
        "round_trip_ms": round_trip.as_secs_f64() * 1000.0,
    });
    if let (Some(prefix), Some(keys)) = (prefix, keys_under_prefix) {
        object["prefix"] = Value::from(escape_bytes(prefix));
        object["keys_under_prefix"] = Value::from(keys);
    }
    if let Some(stats) = &engine {
        engine_json(stats, &mut object);
    }
    match format {
        StatsFormat::Json => writeln!(out, "{object}")?,
        StatsFormat::Text => {
            writeln!(out, "backend: {name} ({label})")?;
            if let Some(keys) = keys_under_prefix {
                writeln!(
                    out,
                    "live keys under {:?}: {keys}",
                    escape_bytes(prefix.unwrap_or_default())
                )?;
            }
            match &engine {
                Some(stats) => engine_text(stats, out)?,
                None => writeln!(
                    out,
                    "clock: {now_ms} ms since the Unix epoch (the server's); round trip {:.3} ms",
                    round_trip.as_secs_f64() * 1000.0
                )?,
            }
        }
    }
    Ok(())
}

/// Live keys under `prefix`, each counted once.
async fn count_keys(backend: &dyn Backend, prefix: &[u8]) -> Result<u64, Failure> {
    // A Redis or Valkey scan may list a key twice; count distinct keys.
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = backend
            .scan(prefix, cursor.as_ref(), SCAN_PAGE_KEYS)
            .await?;
        seen.extend(page.keys);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(seen.len() as u64),
        }
    }
}

/// The engine's counters as JSON fields.
fn engine_json(stats: &keel_engine::Stats, object: &mut Value) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let fields = json!({
        "keys": stats.keys,
        "memory_bytes": stats.memory_bytes,
        "memory_limit_bytes": stats.max_memory,
        "evictions": stats.evictions,
        "expired_reclaimed": stats.expired_reclaimed,
        "wal_bytes": stats.wal_bytes,
        "wal_segments": stats.wal_segments,
        "wal_fsyncs": stats.wal_fsyncs,
        "durable_lsn": stats.durable_lsn,
        "snapshots": stats.snapshots,
        "last_snapshot": stats.last_snapshot.as_ref().map(|s| json!({
            "lsn": s.lsn,
            "entries": s.entries,
            "segments_deleted": s.segments_deleted,
            "duration_ms": ms(s.duration),
        })),
        "poisoned": stats.poisoned,
        "recovery": stats.recovery.as_ref().map(|r| json!({
            "snapshot_lsn": r.snapshot_lsn,
            "segments": r.segments,
            "records": r.records,
            "bytes_truncated": r.bytes_truncated,
            "records_discarded": r.records_discarded,
            "keys": r.keys,
            "last_lsn": r.last_lsn,
            "duration_ms": ms(r.duration),
        })),
    });
    if let (Value::Object(object), Value::Object(fields)) = (object, fields) {
        object.extend(fields);
    }
}

/// The engine's counters, one per line.
fn engine_text(stats: &keel_engine::Stats, out: &mut dyn Write) -> CmdResult {
    writeln!(
        out,
        "keys: {} (entries in memory, expired ones not yet reclaimed included)",
        stats.keys
    )?;
    writeln!(out, "memory bytes: {}", stats.memory_bytes)?;
    match stats.max_memory {
        Some(limit) => writeln!(out, "memory limit: {limit} bytes")?,
        None => writeln!(out, "memory limit: none")?,
    }
    writeln!(out, "evictions since open: {}", stats.evictions)?;
    writeln!(out, "wal bytes: {}", stats.wal_bytes)?;
    writeln!(out, "wal segments: {}", stats.wal_segments)?;
    writeln!(out, "wal fsyncs since open: {}", stats.wal_fsyncs)?;
    writeln!(out, "durable lsn: {}", stats.durable_lsn)?;
    writeln!(
        out,
        "poisoned: {}",
        if stats.poisoned { "yes" } else { "no" }
    )?;
    match &stats.recovery {
        Some(r) => writeln!(
            out,
            "last recovery: snapshot at lsn {}, then {} records replayed from {} segment(s), \
             {} bytes truncated ({} unsynced records after a hole discarded), {} keys, took \
             {:.3} ms",
            r.snapshot_lsn,
            r.records,
            r.segments,
            r.bytes_truncated,
            r.records_discarded,
            r.keys,
            r.duration.as_secs_f64() * 1000.0
        )?,
        None => writeln!(out, "last recovery: none")?,
    }
    Ok(())
}

/// `keel verify`: checks every WAL record's checksum without opening (or locking, or
/// modifying) the store.
pub fn verify(target: &Target, out: &mut dyn Write) -> CmdResult {
    let dir = target.engine_dir("verify")?;
    if !dir.is_dir() {
        return Err(Failure::Error(format!(
            "no keel store at {}: the directory does not exist",
            dir.display()
        )));
    }
    let report = keel_engine::Db::verify(dir, &FsStorage)?;
    for (path, header) in &report.snapshots {
        writeln!(
            out,
            "ok: snapshot {} (lsn {}, {} entries)",
            path.display(),
            header.lsn,
            header.entries
        )?;
    }
    let wal = report.wal;
    writeln!(
        out,
        "ok: {} segment(s), {} record(s), {} bytes of valid records checked in {}",
        wal.segments,
        wal.records,
        wal.valid_bytes,
        dir.display()
    )?;
    if let Some(torn) = &wal.torn_tail {
        let what = if torn.header_torn {
            "an incomplete segment header".to_owned()
        } else if torn.records_discarded > 0 {
            format!(
                "an unsynced write with a hole after byte offset {}, followed by {} whole \
                 record(s) that were never made durable",
                torn.valid_len, torn.records_discarded
            )
        } else {
            format!(
                "an incomplete last record after byte offset {}",
                torn.valid_len
            )
        };
        writeln!(
            out,
            "note: torn tail in {}: {} byte(s) of {what} (writes cut short by a crash); \
             the next open will truncate them, losing only writes never acknowledged as \
             durable",
            torn.file.display(),
            torn.torn_bytes
        )?;
    }
    Ok(())
}

/// `keel dump`: one JSON line per live key, with its expiry as an absolute time on the
/// backend's clock (read once per page).
pub fn dump(target: &Target, out: &mut dyn Write) -> CmdResult {
    with_store(target, Create::Never, async |b| {
        let mut cursor: Option<ScanCursor> = None;
        loop {
            let page = b.scan(b"", cursor.as_ref(), SCAN_PAGE_KEYS).await?;
            let now_ms = b.now_ms().await?;
            let entries: Vec<_> = stream::iter(page.keys)
                .map(|key| async move {
                    let entry = b.get_with_ttl(&key).await?;
                    Ok::<_, keel::Error>((key, entry))
                })
                .buffered(DUMP_IN_FLIGHT_MAX)
                .try_collect()
                .await?;
            for (key, entry) in entries {
                // Expired or deleted since the scan listed it.
                let Some((value, ttl)) = entry else { continue };
                let expires_at_ms = ttl.map(|t| {
                    now_ms.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
                });
                let line = dump::encode_line(&key, &value, expires_at_ms)
                    .map_err(|e| Failure::error(format!("cannot encode a dump line: {e}")))?;
                writeln!(out, "{line}")?;
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    })
}

/// `keel load`: validates all of `file` (`-` for standard input), then writes it.
pub fn load(target: &Target, file: &Path, out: &mut dyn Write) -> CmdResult {
    let limits = RecordLimits {
        key_bytes_max: keel::primitives::backend::KEY_BYTES_MAX,
        value_bytes_max: keel::primitives::backend::VALUE_BYTES_MAX,
    };
    let (name, validation) = if file == Path::new("-") {
        let stdin = io::stdin();
        (
            "standard input".to_owned(),
            dump::read_dump(stdin.lock(), limits),
        )
    } else {
        let reader = File::open(file)
            .map_err(|e| Failure::Error(format!("cannot open {}: {e}", file.display())))?;
        (
            file.display().to_string(),
            dump::read_dump(BufReader::new(reader), limits),
        )
    };
    let validation = validation.map_err(|e| Failure::Error(format!("cannot read {name}: {e}")))?;
    if validation.invalid_lines > 0 {
        let mut message = format!(
            "{name} has {} invalid line(s); nothing was written:",
            validation.invalid_lines
        );
        for error in &validation.errors {
            message.push_str("\n  ");
            message.push_str(error);
        }
        let unlisted = validation.invalid_lines - validation.errors.len();
        if unlisted > 0 {
            message.push_str(&format!("\n  ... and {unlisted} more"));
        }
        return Err(Failure::Error(message));
    }

    let records = validation.records;
    let total = records.len();
    let progress = if total >= LOAD_PROGRESS_KEYS_MIN {
        // indicatif draws nothing when standard error is not a terminal.
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} keys loaded ({eta} left)")
        {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut loaded = 0usize;
    let mut skipped = 0usize;
    let written = with_store(target, Create::IfMissing, async |b| {
        for batch in records.chunks(LOAD_BATCH_KEYS) {
            let now_ms = b.now_ms().await?;
            let outcomes: Vec<bool> = stream::iter(batch)
                .map(|record| write_record(b, record, now_ms))
                .buffer_unordered(LOAD_BATCH_KEYS)
                .try_collect()
                .await
                .map_err(|e| {
                    Failure::Error(format!(
                        "{e}; {loaded} of {total} key(s) were written before the failure \
                         (and some of the {} in flight); loading the same input again \
                         completes it",
                        batch.len()
                    ))
                })?;
            let written = outcomes.iter().filter(|w| **w).count();
            loaded += written;
            skipped += outcomes.len() - written;
            progress.inc(batch.len() as u64);
        }
        Ok(())
    });
    progress.finish_and_clear();
    written?;
    writeln!(
        out,
        "loaded {loaded} key(s), skipped {skipped} already expired"
    )?;
    Ok(())
}

/// Writes one dump record with the time left until its expiry on the backend's clock
/// (`now_ms`); returns false (writing nothing) if that expiry has passed.
async fn write_record(b: &dyn Backend, record: &Record, now_ms: u64) -> keel::Result<bool> {
    let ttl = match record.expires_at_ms {
        None => None,
        Some(at) if at <= now_ms => return Ok(false),
        Some(at) => Some(Duration::from_millis(at - now_ms)),
    };
    b.set(&record.key, &record.value, ttl).await?;
    Ok(true)
}
