//! One function per `keel` command. Each takes the store directory and its parsed arguments,
//! writes its result to `out` (standard output in the binary) and reports a [`Failure`] for
//! everything else; it never prints to standard error itself, so the exit-code policy stays
//! in one place. Commands that can create data (`set`, `incr`, `load`, `demo`) create the
//! store if the directory is new; the others refuse a directory that does not exist, so a
//! mistyped `--db` is an error rather than an empty store.

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keel_engine::storage::FsStorage;
use keel_engine::{
    BATCH_BYTES_MAX_DEFAULT, BATCH_OPS_MAX_DEFAULT, Batch, Db, KEY_BYTES_MAX_DEFAULT, Options,
    ScanCursor, Ttl, VALUE_BYTES_MAX_DEFAULT,
};

use super::dump::{self, Record, RecordLimits};
use super::escape::escape_bytes;
use super::failure::{CmdResult, Failure};

/// Keys fetched per engine scan call by `scan` and `dump`.
pub const SCAN_PAGE_KEYS: usize = 1000;
/// Most operations `load` puts in one atomic batch.
pub const LOAD_BATCH_OPS_MAX: usize = 1000;
/// Inputs with at least this many records get a progress bar on standard error (when it is a
/// terminal).
pub const LOAD_PROGRESS_KEYS_MIN: usize = 10_000;

const _: () = assert!(LOAD_BATCH_OPS_MAX <= BATCH_OPS_MAX_DEFAULT);
const _: () = assert!(SCAN_PAGE_KEYS <= keel_engine::SCAN_LIMIT_MAX);
// One record of the largest allowed key and value must fit in a batch on its own.
const _: () = assert!(
    BATCH_HEADER_BYTES + batch_entry_bytes(KEY_BYTES_MAX_DEFAULT, VALUE_BYTES_MAX_DEFAULT)
        <= BATCH_BYTES_MAX_DEFAULT
);

/// The bytes the engine accounts for a batch before its first operation (the count).
const BATCH_HEADER_BYTES: usize = 4;

/// The bytes the engine accounts for one set in a batch (tag, key length, key, expiry, value
/// length, value).
const fn batch_entry_bytes(key_len: usize, value_len: usize) -> usize {
    1 + 2 + key_len + 8 + 4 + value_len
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
pub fn compact(dir: &Path, out: &mut dyn Write) -> CmdResult {
    let db = open_existing(dir)?;
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
    dir: &Path,
    key: &[u8],
    value: &[u8],
    ttl: Option<Duration>,
    nx: bool,
    out: &mut dyn Write,
) -> CmdResult {
    let db = open_or_create(dir)?;
    if nx {
        if !db.set_nx(key, value, ttl)? {
            close(db)?;
            return Err(Failure::Negative("not set: key exists".to_owned()));
        }
    } else {
        db.set(key, value, ttl)?;
    }
    close(db)?;
    writeln!(out, "OK")?;
    Ok(())
}

/// `keel get`: the raw value bytes, with nothing added.
pub fn get(dir: &Path, key: &[u8], out: &mut dyn Write) -> CmdResult {
    let db = open_existing(dir)?;
    let value = db.get(key);
    close(db)?;
    match value {
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
pub fn del(dir: &Path, key: &[u8], out: &mut dyn Write) -> CmdResult {
    let db = open_existing(dir)?;
    let deleted = db.delete(key)?;
    close(db)?;
    writeln!(out, "{}", u8::from(deleted))?;
    Ok(())
}

/// `keel incr`: the new value.
pub fn incr(
    dir: &Path,
    key: &[u8],
    by: i64,
    ttl: Option<Duration>,
    out: &mut dyn Write,
) -> CmdResult {
    let db = open_or_create(dir)?;
    let value = db.incr(key, by, ttl)?;
    close(db)?;
    writeln!(out, "{value}")?;
    Ok(())
}

/// `keel expire`: 1 if the key exists and now expires after `ttl`, 0 if it is missing.
pub fn expire(dir: &Path, key: &[u8], ttl: Duration, out: &mut dyn Write) -> CmdResult {
    let db = open_existing(dir)?;
    let done = db.expire(key, ttl)?;
    close(db)?;
    writeln!(out, "{}", u8::from(done))?;
    Ok(())
}

/// `keel persist`: 1 if the key existed and had a TTL (now removed), 0 otherwise.
pub fn persist(dir: &Path, key: &[u8], out: &mut dyn Write) -> CmdResult {
    let db = open_existing(dir)?;
    let done = db.persist(key)?;
    close(db)?;
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
pub fn ttl(dir: &Path, key: &[u8], out: &mut dyn Write) -> CmdResult {
    let db = open_existing(dir)?;
    let ttl = db.ttl(key);
    close(db)?;
    writeln!(out, "{}", ttl_number(ttl))?;
    Ok(())
}

/// `keel scan`: one escaped key per line, at most `limit` keys.
pub fn scan(dir: &Path, prefix: &[u8], limit: Option<usize>, out: &mut dyn Write) -> CmdResult {
    let db = open_existing(dir)?;
    let mut cursor: Option<ScanCursor> = None;
    let mut printed = 0usize;
    loop {
        let want = match limit {
            Some(limit) => (limit - printed).min(SCAN_PAGE_KEYS),
            None => SCAN_PAGE_KEYS,
        };
        if want == 0 {
            break;
        }
        let page = db.scan(prefix, cursor.as_ref(), want, false);
        for entry in &page.entries {
            writeln!(out, "{}", escape_bytes(&entry.key))?;
        }
        printed += page.entries.len();
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    close(db)
}

/// `keel stats`.
pub fn stats(dir: &Path, out: &mut dyn Write) -> CmdResult {
    let db = open_existing(dir)?;
    let stats = db.stats();
    close(db)?;
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
             {} bytes truncated, {} keys, took {:.3} ms",
            r.snapshot_lsn,
            r.records,
            r.segments,
            r.bytes_truncated,
            r.keys,
            r.duration.as_secs_f64() * 1000.0
        )?,
        None => writeln!(out, "last recovery: none")?,
    }
    Ok(())
}

/// `keel verify`: checks every WAL record's checksum without opening (or locking, or
/// modifying) the store.
pub fn verify(dir: &Path, out: &mut dyn Write) -> CmdResult {
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
        } else {
            format!(
                "an incomplete last record after byte offset {}",
                torn.valid_len
            )
        };
        writeln!(
            out,
            "note: torn tail in {}: {} byte(s) of {what} (a write cut short by a crash); \
             the next open will truncate them, losing only that unacknowledged write",
            torn.file.display(),
            torn.torn_bytes
        )?;
    }
    Ok(())
}

/// `keel dump`: one JSON line per live key.
pub fn dump(dir: &Path, out: &mut dyn Write) -> CmdResult {
    let db = open_existing(dir)?;
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = db.scan(b"", cursor.as_ref(), SCAN_PAGE_KEYS, true);
        for entry in &page.entries {
            let Some(value) = &entry.value else {
                return Err(Failure::Error(format!(
                    "the store returned no value for {} in a scan that asked for values",
                    escape_bytes(&entry.key)
                )));
            };
            let line = dump::encode_line(&entry.key, value, entry.expires_at_ms)
                .map_err(|e| Failure::error(format!("cannot encode a dump line: {e}")))?;
            writeln!(out, "{line}")?;
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    close(db)
}

/// `keel load`: validates all of `file` (`-` for standard input), then writes it in batches.
pub fn load(dir: &Path, file: &Path, out: &mut dyn Write) -> CmdResult {
    let limits = RecordLimits {
        key_bytes_max: KEY_BYTES_MAX_DEFAULT,
        value_bytes_max: VALUE_BYTES_MAX_DEFAULT,
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

    let db = open_or_create(dir)?;
    let now_ms = db.now_ms();
    let mut live = validation.records;
    let total = live.len();
    // An entry whose expiry has passed would only delete the key; skip it instead.
    live.retain(|r| r.expires_at_ms.is_none_or(|at| at > now_ms));
    let skipped = total - live.len();
    let to_load = live.len();
    let progress = if to_load >= LOAD_PROGRESS_KEYS_MIN {
        // indicatif draws nothing when standard error is not a terminal.
        let bar = ProgressBar::with_draw_target(Some(to_load as u64), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{bar:40} {pos}/{len} keys loaded ({eta} left)")
        {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let written = write_in_batches(&db, live, &progress);
    progress.finish_and_clear();
    if let Err((loaded, e)) = written {
        return Err(Failure::Error(format!(
            "{e}; {loaded} of {to_load} key(s) were written before the failure \
             (each batch of up to {LOAD_BATCH_OPS_MAX} is atomic), the rest were not"
        )));
    }
    close(db)?;
    writeln!(
        out,
        "loaded {} key(s), skipped {} already expired",
        to_load, skipped
    )?;
    Ok(())
}

/// Writes `records` in atomic batches of at most [`LOAD_BATCH_OPS_MAX`] operations and
/// [`BATCH_BYTES_MAX_DEFAULT`] bytes, advancing `progress`.
///
/// # Errors
/// The engine's error, with the number of records written by the batches before it.
fn write_in_batches(
    db: &Db,
    records: Vec<Record>,
    progress: &ProgressBar,
) -> Result<(), (usize, keel_engine::Error)> {
    let mut written = 0usize;
    let mut batch = Batch::new();
    let mut batch_bytes = BATCH_HEADER_BYTES;
    let mut flush = |batch: &mut Batch, batch_bytes: &mut usize| {
        db.write_batch(batch).map_err(|e| (written, e))?;
        written += batch.len();
        progress.inc(batch.len() as u64);
        *batch = Batch::new();
        *batch_bytes = BATCH_HEADER_BYTES;
        Ok(())
    };
    for record in records {
        let entry_bytes = batch_entry_bytes(record.key.len(), record.value.len());
        if batch.len() == LOAD_BATCH_OPS_MAX || batch_bytes + entry_bytes > BATCH_BYTES_MAX_DEFAULT
        {
            flush(&mut batch, &mut batch_bytes)?;
        }
        batch.set_expiring_at(record.key, record.value, record.expires_at_ms);
        batch_bytes += entry_bytes;
    }
    if !batch.is_empty() {
        flush(&mut batch, &mut batch_bytes)?;
    }
    Ok(())
}
