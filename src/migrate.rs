//! Moving a service's state between backends: [`migrate`] copies every live key under a prefix
//! (value and remaining TTL) from one [`Backend`] to another, and [`verify`] compares two
//! backends key by key. Both go through the `Backend` contract only, so they work in every
//! direction between the embedded engine, Redis, Valkey, Postgres, sled and redb (and
//! `memory://` in tests); `keel migrate` is a thin wrapper around them.
//!
//! # Expiry is kept as an absolute time
//! A key's remaining TTL is read at the source and turned into a deadline on this process's
//! monotonic clock, taken *before* the read was sent (so a slow round trip can only shorten the
//! TTL, never extend it). Just before the write, the time left until that deadline is what
//! the destination is given. Copying slowly therefore does not lengthen any TTL, and a key
//! whose deadline passed while it was in flight is skipped rather than resurrected. Neither
//! server's wall clock is involved, so clock skew between them does not matter. A TTL read
//! is treated as up to [`TTL_GRANULARITY`] (1 ms) too long, since backends round to whole
//! milliseconds. What remains
//! is the write's own time in flight: the destination starts the TTL when the write reaches
//! it, so its deadline can be later than the source's by that long. A write that took longer
//! than [`SLOW_WRITE`] (a destination queueing a batch of writes, a slow network) is
//! therefore followed by an `expire` with the time then left, which pulls the deadline back
//! to within that `expire`'s own time in flight (repeated, up to three times, while it is
//! slow too); a key whose deadline passed meanwhile is deleted again and counted as expired.
//!
//! # Resuming an interrupted run
//! Before its first write, a run stores a *resume marker* in the destination: the key
//! `\xffkeel-migrate:` followed by a digest of the prefix (keys starting with
//! [`MARKER_TAG`] are reserved: migrations and verifications skip them on both sides). The
//! marker records the source's label and the conflict rule; a run that completes deletes it.
//! Running the same migration again after an interruption finds the marker and resumes: the
//! destination is not empty, but the keys in it are the earlier run's, so they are written
//! again with the source's current values (and the earlier run's `--merge` rule, if it had
//! one). Writes are plain sets, so re-running converges and nothing is duplicated. Keys
//! deleted at the source after an interrupted run copied them stay in the destination;
//! [`verify`] reports them.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use keel_primitives::backend::{SCAN_LIMIT_MAX, ScanCursor};

use crate::{Backend, Error};

/// Keys starting with these bytes are reserved for resume markers: never copied, never
/// counted, never compared.
pub const MARKER_TAG: &[u8] = b"\xffkeel-migrate:";
/// Keys per scan page, and keys in flight at once, unless [`MigrateOptions::batch_keys`]
/// says otherwise.
pub const BATCH_KEYS_DEFAULT: usize = 500;
/// The largest batch: a scan page never holds more.
pub const BATCH_KEYS_MAX: usize = SCAN_LIMIT_MAX;
/// How far apart the two sides' expiry deadlines may be before [`verify`] reports a key.
pub const TTL_TOLERANCE_DEFAULT: Duration = Duration::from_secs(1);
/// At most this many differences are kept in a [`VerifyReport`]; the rest are only counted.
pub const DIFFERENCES_KEPT_MAX: usize = 100;

/// Backends report and take TTLs in whole milliseconds, and a remaining TTL read from one
/// may be up to this much too long (the engine floors its clock, then subtracts). A deadline
/// therefore counts this much less than the TTL read, and a key with less than this left is
/// not written: a copied key never outlives the source's by rounding, and loses at most 2 ms.
pub const TTL_GRANULARITY: Duration = Duration::from_millis(1);

const _: () = assert!(BATCH_KEYS_DEFAULT <= BATCH_KEYS_MAX);

/// What to do with a key that already exists in the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Merge {
    /// The default: refuse to start if the destination holds any key under the prefix
    /// (unless it is an interrupted run of the same migration, which is resumed).
    Refuse,
    /// Keep the destination's value and TTL (the write is a `set_nx`).
    Skip,
    /// Replace it with the source's value and TTL.
    Overwrite,
    /// Stop with [`MigrateError::Conflict`] at the first key whose destination value differs
    /// from the source's (an identical value is not a conflict, so a resumed run does not
    /// trip over its own writes).
    Fail,
}

impl Merge {
    /// The rule a resumed run applies: a run that refused a non-empty destination wrote every
    /// key there itself, so it overwrites them.
    fn on_resume(self) -> Merge {
        match self {
            Merge::Refuse => Merge::Overwrite,
            other => other,
        }
    }
}

impl fmt::Display for Merge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Merge::Refuse => "refuse",
            Merge::Skip => "skip",
            Merge::Overwrite => "overwrite",
            Merge::Fail => "fail",
        })
    }
}

/// How [`migrate`] runs. Start from [`MigrateOptions::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOptions {
    /// Only keys starting with this are copied (default: every key).
    pub prefix: Vec<u8>,
    /// The conflict rule (default [`Merge::Refuse`]).
    pub merge: Merge,
    /// Read and count, write nothing (not even the resume marker).
    pub dry_run: bool,
    /// Keys per scan page and keys in flight at once, 1 to [`BATCH_KEYS_MAX`]. Memory use is
    /// bounded by this many values. Default [`BATCH_KEYS_DEFAULT`].
    pub batch_keys: usize,
    /// Stop (as an interruption would) once this many keys have been handled: the run
    /// returns a report with [`MigrateReport::stopped`] set and leaves its resume marker.
    /// For tests of resumption; `None` (the default) runs to the end.
    pub stop_after_keys: Option<u64>,
    /// Names the source in the resume marker (a URL with its password removed), so a resume
    /// from another source is refused. Default empty.
    pub source_label: String,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            prefix: Vec::new(),
            merge: Merge::Refuse,
            dry_run: false,
            batch_keys: BATCH_KEYS_DEFAULT,
            stop_after_keys: None,
            source_label: String::new(),
        }
    }
}

/// Counts so far, passed to the progress callback after every batch and returned at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// Keys listed by the source's scan (a Redis or Valkey scan may list a key twice).
    pub scanned: u64,
    /// Keys written to the destination (in a dry run: that would be written).
    pub copied: u64,
    /// Keys left as the destination had them: `Merge::Skip` kept the destination's value, or
    /// `Merge::Fail` found the same value there.
    pub skipped: u64,
    /// Keys listed by the scan that expired (or were deleted) at the source before they could
    /// be written: not copied.
    pub expired: u64,
    /// This run continued an interrupted run of the same migration.
    pub resumed: bool,
    /// The run stopped early ([`MigrateOptions::stop_after_keys`]); run it again to finish.
    pub stopped: bool,
    /// Nothing was written.
    pub dry_run: bool,
    /// Wall time so far.
    pub elapsed: Duration,
}

impl MigrateReport {
    /// Keys handled (copied, skipped or expired) per second of wall time.
    pub fn keys_per_sec(&self) -> f64 {
        let handled = (self.copied + self.skipped + self.expired) as f64;
        handled / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Why a migration or a verification stopped.
#[derive(Debug)]
#[non_exhaustive]
pub enum MigrateError {
    /// An option is out of range. Nothing was read or written.
    InvalidOptions(String),
    /// The destination holds keys under the prefix and no `--merge` rule was given.
    /// Nothing was written.
    DestinationNotEmpty {
        /// The prefix migrated.
        prefix: Vec<u8>,
        /// One key found there.
        example: Vec<u8>,
    },
    /// The destination has an unfinished migration of this prefix from another source.
    /// Nothing was written.
    UnfinishedMigration {
        /// The other run's source label.
        source: String,
    },
    /// `Merge::Fail` found a key whose destination value differs from the source's. Keys of
    /// earlier batches (and some of this one) were copied.
    Conflict {
        /// The conflicting key.
        key: Vec<u8>,
    },
    /// Reading the source failed.
    Source(Error),
    /// Reading or writing the destination failed.
    Destination(Error),
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::InvalidOptions(why) => write!(f, "invalid migration options: {why}"),
            MigrateError::DestinationNotEmpty { prefix, example } => write!(
                f,
                "the destination is not empty: it holds keys under the prefix \"{}\" (e.g. \
                 \"{}\"); nothing was written. Pass --merge skip, overwrite or fail to say what \
                 happens to keys that exist on both sides",
                show(prefix),
                show(example)
            ),
            MigrateError::UnfinishedMigration { source } => write!(
                f,
                "the destination holds an unfinished migration of this prefix from {source:?}; \
                 nothing was written. Finish that one, or pass --merge to proceed anyway"
            ),
            MigrateError::Conflict { key } => write!(
                f,
                "conflict: \"{}\" exists in the destination with a different value \
                 (--merge fail); stopped there. Keys before it may have been copied",
                show(key)
            ),
            MigrateError::Source(e) => write!(f, "reading the source failed: {e}"),
            MigrateError::Destination(e) => write!(f, "the destination failed: {e}"),
        }
    }
}

impl std::error::Error for MigrateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MigrateError::Source(e) | MigrateError::Destination(e) => Some(e),
            _ => None,
        }
    }
}

/// A key as one readable line: printable ASCII as is, everything else escaped.
pub fn show(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

/// The resume marker's key for `prefix`.
pub fn marker_key(prefix: &[u8]) -> Vec<u8> {
    let digest = blake3::hash(prefix);
    let mut key = MARKER_TAG.to_vec();
    key.extend_from_slice(digest.to_hex()[..32].as_bytes());
    key
}

/// What the resume marker records.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// The source's label.
    source: String,
    /// The rule the interrupted run applied.
    merge: Merge,
    /// When that run started, on the destination's clock (for people reading the key).
    started_at_ms: u64,
}

/// What became of one key.
enum Outcome {
    Copied,
    Skipped,
    Expired,
}

/// Copies every live key under `options.prefix` from `source` to `destination` (see the
/// module docs), calling `progress` after every batch.
///
/// # Errors
/// [`MigrateError::InvalidOptions`] for a batch size out of range;
/// [`MigrateError::DestinationNotEmpty`] (with `Merge::Refuse`) and
/// [`MigrateError::UnfinishedMigration`] before anything is written;
/// [`MigrateError::Conflict`] (with `Merge::Fail`); [`MigrateError::Source`] /
/// [`MigrateError::Destination`] when a backend fails. After a failure part-way, running the
/// same migration again resumes it.
pub async fn migrate(
    source: &dyn Backend,
    destination: &dyn Backend,
    options: &MigrateOptions,
    mut progress: impl FnMut(&MigrateReport),
) -> Result<MigrateReport, MigrateError> {
    check_batch(options.batch_keys)?;
    let started = Instant::now();
    let prefix = &options.prefix[..];
    let marker_key = marker_key(prefix);
    let marker = read_marker(destination, &marker_key).await?;
    let mut report = MigrateReport {
        dry_run: options.dry_run,
        ..MigrateReport::default()
    };
    let (rule, recorded) = match (options.merge, marker) {
        (Merge::Refuse, Some(marker)) => {
            if marker.source != options.source_label {
                return Err(MigrateError::UnfinishedMigration {
                    source: marker.source,
                });
            }
            report.resumed = true;
            (marker.merge.on_resume(), marker.merge)
        }
        (Merge::Refuse, None) => {
            if let Some(example) = first_key(destination, prefix).await? {
                return Err(MigrateError::DestinationNotEmpty {
                    prefix: prefix.to_vec(),
                    example,
                });
            }
            (Merge::Refuse, Merge::Refuse)
        }
        (rule, marker) => {
            report.resumed = marker.is_some();
            (rule, rule)
        }
    };
    if !options.dry_run {
        let marker = Marker {
            source: options.source_label.clone(),
            merge: recorded,
            started_at_ms: destination
                .now_ms()
                .await
                .map_err(MigrateError::Destination)?,
        };
        let value = serde_json::to_vec(&marker).map_err(|e| {
            MigrateError::InvalidOptions(format!("cannot encode the resume marker: {e}"))
        })?;
        destination
            .set(&marker_key, &value, None)
            .await
            .map_err(MigrateError::Destination)?;
    }

    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = source
            .scan(prefix, cursor.as_ref(), options.batch_keys)
            .await
            .map_err(MigrateError::Source)?;
        let mut keys: Vec<Vec<u8>> = page
            .keys
            .into_iter()
            .filter(|k| !k.starts_with(MARKER_TAG))
            .collect();
        if let Some(limit) = options.stop_after_keys {
            let handled = report.copied + report.skipped + report.expired;
            keys.truncate(usize::try_from(limit.saturating_sub(handled)).unwrap_or(usize::MAX));
        }
        report.scanned += keys.len() as u64;
        let outcomes: Vec<Outcome> = stream::iter(keys.iter())
            .map(|key| copy_one(source, destination, key, rule, options.dry_run))
            .buffer_unordered(options.batch_keys)
            .try_collect()
            .await?;
        for outcome in outcomes {
            match outcome {
                Outcome::Copied => report.copied += 1,
                Outcome::Skipped => report.skipped += 1,
                Outcome::Expired => report.expired += 1,
            }
        }
        report.elapsed = started.elapsed();
        progress(&report);
        if let Some(limit) = options.stop_after_keys
            && report.copied + report.skipped + report.expired >= limit
        {
            report.stopped = true;
            return Ok(report);
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    if !options.dry_run {
        destination
            .delete(&marker_key)
            .await
            .map_err(MigrateError::Destination)?;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn check_batch(batch_keys: usize) -> Result<(), MigrateError> {
    if batch_keys == 0 || batch_keys > BATCH_KEYS_MAX {
        return Err(MigrateError::InvalidOptions(format!(
            "the batch size is {batch_keys}; it must be between 1 and {BATCH_KEYS_MAX}"
        )));
    }
    Ok(())
}

/// Reads the resume marker; a marker that does not parse is treated as another source's.
async fn read_marker(
    destination: &dyn Backend,
    key: &[u8],
) -> Result<Option<Marker>, MigrateError> {
    let value = destination
        .get(key)
        .await
        .map_err(MigrateError::Destination)?;
    Ok(value.map(|v| {
        serde_json::from_slice(&v).unwrap_or(Marker {
            source: format!("(an unreadable marker: {})", show(&v)),
            merge: Merge::Refuse,
            started_at_ms: 0,
        })
    }))
}

/// One live key under `prefix` in `backend` (resume markers aside), if there is any.
async fn first_key(backend: &dyn Backend, prefix: &[u8]) -> Result<Option<Vec<u8>>, MigrateError> {
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = backend
            .scan(prefix, cursor.as_ref(), BATCH_KEYS_DEFAULT)
            .await
            .map_err(MigrateError::Destination)?;
        if let Some(key) = page.keys.into_iter().find(|k| !k.starts_with(MARKER_TAG)) {
            return Ok(Some(key));
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(None),
        }
    }
}

/// A write (or `expire`) that took longer than this may have left the destination's deadline
/// that much later than the source's: [`settle_deadline`] pulls it back.
pub const SLOW_WRITE: Duration = Duration::from_millis(50);

/// After a write of `key` with the deadline `deadline` sent at `sent`: if it was slow, sets
/// the destination's TTL again to the time left (see the module docs). Returns `false` if the
/// deadline passed meanwhile and the key was deleted again.
async fn settle_deadline(
    destination: &dyn Backend,
    key: &[u8],
    deadline: Option<Instant>,
    sent: Instant,
) -> Result<bool, MigrateError> {
    let Some(deadline) = deadline else {
        return Ok(true);
    };
    let dst = |e| MigrateError::Destination(e);
    let mut took = sent.elapsed();
    for _ in 0..3 {
        if took < SLOW_WRITE {
            break;
        }
        let again = Instant::now();
        match remaining(Some(deadline)) {
            Some(Some(ttl)) => {
                destination.expire(key, ttl).await.map_err(dst)?;
            }
            _ => {
                destination.delete(key).await.map_err(dst)?;
                return Ok(false);
            }
        }
        took = again.elapsed();
    }
    Ok(true)
}

/// The time left until `deadline`, or `None` if less than [`TTL_GRANULARITY`] is left (a
/// backend would round it up to a whole millisecond). `Some(None)`: no expiry.
fn remaining(deadline: Option<Instant>) -> Option<Option<Duration>> {
    match deadline {
        None => Some(None),
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            (left >= TTL_GRANULARITY).then_some(Some(left))
        }
    }
}

/// Copies one key under `rule`.
async fn copy_one(
    source: &dyn Backend,
    destination: &dyn Backend,
    key: &[u8],
    rule: Merge,
    dry_run: bool,
) -> Result<Outcome, MigrateError> {
    // The deadline counts from before the read was sent: the server measured the TTL later,
    // so this can only shorten it.
    let asked = Instant::now();
    let Some((value, ttl)) = source
        .get_with_ttl(key)
        .await
        .map_err(MigrateError::Source)?
    else {
        return Ok(Outcome::Expired);
    };
    let deadline = ttl.map(|ttl| asked + ttl.saturating_sub(TTL_GRANULARITY));
    let dst = |e| MigrateError::Destination(e);
    // A conditional write that loses to a key expiring at the destination is tried again;
    // three rounds is plenty for a key that keeps expiring under us.
    for _ in 0..3 {
        let Some(ttl) = remaining(deadline) else {
            return Ok(Outcome::Expired);
        };
        match rule {
            Merge::Refuse | Merge::Overwrite => {
                if !dry_run {
                    let sent = Instant::now();
                    destination.set(key, &value, ttl).await.map_err(dst)?;
                    if !settle_deadline(destination, key, deadline, sent).await? {
                        return Ok(Outcome::Expired);
                    }
                }
                return Ok(Outcome::Copied);
            }
            Merge::Skip | Merge::Fail => {
                let sent = Instant::now();
                let written = if dry_run {
                    destination.get(key).await.map_err(dst)?.is_none()
                } else {
                    destination.set_nx(key, &value, ttl).await.map_err(dst)?
                };
                if written {
                    if !dry_run && !settle_deadline(destination, key, deadline, sent).await? {
                        return Ok(Outcome::Expired);
                    }
                    return Ok(Outcome::Copied);
                }
                if rule == Merge::Skip {
                    return Ok(Outcome::Skipped);
                }
                match destination.get(key).await.map_err(dst)? {
                    Some(theirs) if theirs == value => return Ok(Outcome::Skipped),
                    Some(_) => {
                        return Err(MigrateError::Conflict { key: key.to_vec() });
                    }
                    // Expired between the two calls: try the write again.
                    None => continue,
                }
            }
        }
    }
    Err(MigrateError::Destination(Error::new(
        crate::ErrorKind::Transient,
        format!(
            "\"{}\" kept expiring in the destination between a conditional write and a read",
            show(key)
        ),
    )))
}

/// How [`verify`] compares. Start from [`VerifyOptions::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Only keys starting with this are compared (default: every key).
    pub prefix: Vec<u8>,
    /// How far apart the two expiry deadlines may be. Default [`TTL_TOLERANCE_DEFAULT`].
    pub ttl_tolerance: Duration,
    /// Keys per scan page and keys compared at once, 1 to [`BATCH_KEYS_MAX`]. Default
    /// [`BATCH_KEYS_DEFAULT`].
    pub batch_keys: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            prefix: Vec::new(),
            ttl_tolerance: TTL_TOLERANCE_DEFAULT,
            batch_keys: BATCH_KEYS_DEFAULT,
        }
    }
}

/// One way the destination differs from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The source has the key, the destination does not.
    MissingInDestination(Vec<u8>),
    /// The destination has the key, the source does not.
    OnlyInDestination(Vec<u8>),
    /// Both have it, with different values (BLAKE3 digests of each).
    Value {
        /// The key.
        key: Vec<u8>,
        /// The source value's digest.
        source: [u8; 32],
        /// The destination value's digest.
        destination: [u8; 32],
    },
    /// Both have it with the same value, but the expiry differs by more than the tolerance
    /// (or only one side expires).
    Ttl {
        /// The key.
        key: Vec<u8>,
        /// The source's remaining TTL (`None`: no expiry).
        source: Option<Duration>,
        /// The destination's remaining TTL.
        destination: Option<Duration>,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ttl = |t: &Option<Duration>| match t {
            Some(t) => format!("{} ms", t.as_millis()),
            None => "no expiry".to_owned(),
        };
        match self {
            Difference::MissingInDestination(key) => {
                write!(f, "missing in destination: {}", show(key))
            }
            Difference::OnlyInDestination(key) => {
                write!(f, "only in destination: {}", show(key))
            }
            Difference::Value {
                key,
                source,
                destination,
            } => write!(
                f,
                "value differs: {} (source blake3 {}, destination blake3 {})",
                show(key),
                hex16(source),
                hex16(destination)
            ),
            Difference::Ttl {
                key,
                source,
                destination,
            } => write!(
                f,
                "ttl differs: {} (source {}, destination {})",
                show(key),
                ttl(source),
                ttl(destination)
            ),
        }
    }
}

/// The first 8 bytes of a digest in hex.
fn hex16(digest: &[u8; 32]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Live keys under the prefix at the source (each counted once).
    pub source_keys: u64,
    /// Live keys under the prefix at the destination (each counted once).
    pub destination_keys: u64,
    /// How many differences were found.
    pub differences: u64,
    /// The first [`DIFFERENCES_KEPT_MAX`] of them.
    pub examples: Vec<Difference>,
    /// Wall time.
    pub elapsed: Duration,
}

impl VerifyReport {
    /// True if the destination matches the source.
    pub fn is_clean(&self) -> bool {
        self.differences == 0 && self.source_keys == self.destination_keys
    }

    fn add(&mut self, difference: Difference) {
        self.differences += 1;
        if self.examples.len() < DIFFERENCES_KEPT_MAX {
            self.examples.push(difference);
        }
    }
}

/// One side's view of a key: its value's digest and its expiry deadline.
type Seen = Option<([u8; 32], Option<Instant>)>;

async fn look(backend: &dyn Backend, key: &[u8]) -> Result<Seen, Error> {
    let asked = Instant::now();
    Ok(backend
        .get_with_ttl(key)
        .await?
        .map(|(value, ttl)| (*blake3::hash(&value).as_bytes(), ttl.map(|t| asked + t))))
}

/// Compares every live key under the prefix: the key counts, each key's value (by BLAKE3
/// digest) and its expiry deadline (within `ttl_tolerance`), in both directions. Each key is
/// counted once even if a scan lists it twice; this holds 16 bytes per key in memory.
///
/// # Errors
/// [`MigrateError::InvalidOptions`], [`MigrateError::Source`], [`MigrateError::Destination`].
pub async fn verify(
    source: &dyn Backend,
    destination: &dyn Backend,
    options: &VerifyOptions,
) -> Result<VerifyReport, MigrateError> {
    check_batch(options.batch_keys)?;
    let started = Instant::now();
    let prefix = &options.prefix[..];
    let tolerance = options.ttl_tolerance;
    let mut report = VerifyReport::default();
    let mut source_seen: HashSet<[u8; 16]> = HashSet::new();
    let mut dest_seen: HashSet<[u8; 16]> = HashSet::new();

    // Pass 1: every source key, looked up on both sides.
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = source
            .scan(prefix, cursor.as_ref(), options.batch_keys)
            .await
            .map_err(MigrateError::Source)?;
        let keys: Vec<Vec<u8>> = page
            .keys
            .into_iter()
            .filter(|k| !k.starts_with(MARKER_TAG) && source_seen.insert(key_id(k)))
            .collect();
        let looked: Vec<(Vec<u8>, Seen, Seen)> = stream::iter(keys)
            .map(|key| async move {
                let (src, dst) = futures_util::join!(look(source, &key), look(destination, &key));
                Ok::<_, MigrateError>((
                    key,
                    src.map_err(MigrateError::Source)?,
                    dst.map_err(MigrateError::Destination)?,
                ))
            })
            .buffer_unordered(options.batch_keys)
            .try_collect()
            .await?;
        for (key, src, dst) in looked {
            let Some((src_digest, src_deadline)) = src else {
                // Gone at the source since the scan: nothing to compare.
                continue;
            };
            report.source_keys += 1;
            let now = Instant::now();
            match dst {
                None => {
                    // A key about to expire may already be gone on the other side.
                    if src_deadline.is_none_or(|d| d > now + tolerance) {
                        report.add(Difference::MissingInDestination(key));
                    }
                }
                Some((dst_digest, dst_deadline)) => {
                    report.destination_keys += 1;
                    dest_seen.insert(key_id(&key));
                    if src_digest != dst_digest {
                        report.add(Difference::Value {
                            key,
                            source: src_digest,
                            destination: dst_digest,
                        });
                    } else if !deadlines_agree(src_deadline, dst_deadline, tolerance) {
                        let left = |d: Option<Instant>| d.map(|d| d.saturating_duration_since(now));
                        report.add(Difference::Ttl {
                            key,
                            source: left(src_deadline),
                            destination: left(dst_deadline),
                        });
                    }
                }
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }

    // Pass 2: destination keys the first pass did not see.
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = destination
            .scan(prefix, cursor.as_ref(), options.batch_keys)
            .await
            .map_err(MigrateError::Destination)?;
        let keys: Vec<Vec<u8>> = page
            .keys
            .into_iter()
            .filter(|k| !k.starts_with(MARKER_TAG) && dest_seen.insert(key_id(k)))
            .collect();
        let only_here: Vec<Option<Vec<u8>>> = stream::iter(keys)
            .map(|key| async move {
                let live = destination
                    .ttl(&key)
                    .await
                    .map_err(MigrateError::Destination)?;
                if matches!(live, crate::engine::Ttl::Missing) {
                    return Ok::<_, MigrateError>(None);
                }
                Ok(Some(key))
            })
            .buffer_unordered(options.batch_keys)
            .try_collect()
            .await?;
        for key in only_here.into_iter().flatten() {
            report.destination_keys += 1;
            if !source_seen.contains(&key_id(&key)) {
                report.add(Difference::OnlyInDestination(key));
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// A key's identity for de-duplication: 128 bits of its BLAKE3 digest.
fn key_id(key: &[u8]) -> [u8; 16] {
    let mut id = [0; 16];
    id.copy_from_slice(&blake3::hash(key).as_bytes()[..16]);
    id
}

fn deadlines_agree(a: Option<Instant>, b: Option<Instant>, tolerance: Duration) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            let gap = if a > b { a - b } else { b - a };
            gap <= tolerance
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_keys_are_reserved_and_fit_any_prefix() {
        let long = vec![b'p'; crate::primitives::backend::KEY_BYTES_MAX];
        for prefix in [&b""[..], b"a:", &long] {
            let key = marker_key(prefix);
            assert!(key.starts_with(MARKER_TAG));
            assert!(key.len() <= crate::primitives::backend::KEY_BYTES_MAX);
        }
        assert_ne!(marker_key(b"a:"), marker_key(b"b:"));
    }

    #[test]
    fn deadlines_agree_within_the_tolerance_only() {
        let now = Instant::now();
        let tol = Duration::from_millis(100);
        assert!(deadlines_agree(None, None, tol));
        assert!(!deadlines_agree(Some(now), None, tol));
        assert!(deadlines_agree(Some(now), Some(now + tol), tol));
        assert!(!deadlines_agree(
            Some(now + tol + Duration::from_millis(1)),
            Some(now),
            tol
        ));
    }
}
