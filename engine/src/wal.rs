//! The write-ahead log: segment files, the WAL writer thread with group commit, and recovery.
//!
//! Appending is split in two so the per-key order of records equals the order of states in
//! memory: a writer *appends* its encoded record to the in-memory queue (getting the next LSN)
//! while it still holds the key's shard lock, then releases the lock and *waits* for the LSN to
//! reach the durability it asked for. One WAL writer thread takes the whole queue at once,
//! writes it with one `write`, and (if any record in it asked for `Immediate`) makes it durable
//! with one `fdatasync`: that is group commit. Because LSNs are assigned under the queue lock in
//! the order records enter the buffer, "durable LSN >= n" means every record up to n is on disk.
//!
//! The queue is a mutex-protected byte buffer rather than a lock-free channel on purpose: the
//! LSN must be assigned in the same critical section that places the record in the buffer, or
//! a later LSN could reach the disk first and "durable LSN >= n" would lie. The hand-offs
//! (appender → writer doorbell, writer → waiters, backpressure) are condvar protocols,
//! model-checked with loom (`loom_tests` below, `RUSTFLAGS="--cfg loom"`).

use std::path::{Path, PathBuf};
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::options::Durability;
use crate::record::{self, DecodeError, Entry};
use crate::storage::{ReadMode, Storage, WritableFile, join, read_whole};
use crate::sync::{self, Arc, AtomicBool, AtomicU64, Condvar, JoinHandle, Mutex, Ordering};

/// The longest the writer thread holds a commit back while writers woken by the previous one
/// are still re-appending: well under one fdatasync on SSDs (~100 µs and more).
const COMMIT_DELAY_MAX: Duration = Duration::from_micros(50);

/// After a commit of a lone record, how long the writer thread watches for the next record
/// before it sleeps: about the time a woken writer takes to append again, well under one
/// fdatasync. Catching the record awake saves its appender a futex wake and the writer
/// thread a wake-up (see `await_next_record`).
const LONE_WRITER_SPIN: Duration = Duration::from_micros(50);
const _: () = assert!(LONE_WRITER_SPIN.as_micros() <= COMMIT_DELAY_MAX.as_micros());

/// Default bytes the append queue may hold before appenders wait for the writer: bounds
/// memory when the disk is slower than the writers (relevant for `Periodic` and `Buffered`).
pub(crate) const QUEUE_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;

const SEGMENT_PREFIX: &str = "wal-";
const SEGMENT_SUFFIX: &str = ".log";
/// Suffix of a segment's rewrite in progress (see `Db::open`); never parsed as a segment.
pub(crate) const REWRITE_SUFFIX: &str = ".log.rewrite";

/// The file name of the segment whose first record has `first_lsn`.
pub(crate) fn segment_name(first_lsn: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_lsn:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The WAL segments in `dir`, ordered by first LSN.
pub(crate) fn list_segments(storage: &dyn Storage, dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut segments: Vec<(u64, PathBuf)> = storage
        .list(dir)?
        .into_iter()
        .filter_map(|name| parse_segment_name(&name).map(|lsn| (lsn, join(dir, &name))))
        .collect();
    segments.sort_by_key(|(lsn, _)| *lsn);
    Ok(segments)
}

/// What reading the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalScan {
    /// Segments read.
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Bytes of the log holding valid records (headers included).
    pub valid_bytes: u64,
    /// LSN of the last valid record (0 if none).
    pub last_lsn: u64,
    /// Largest record time seen, Unix ms (0 if none).
    pub max_time_ms: u64,
    /// A torn tail: the last segment, the offset where valid data ends, and the bytes after it.
    pub torn_tail: Option<TornTail>,
    /// Format version of the last segment whose header is whole (0 if none): the segment the
    /// store appends to after recovery.
    pub last_segment_version: u32,
}

/// The end of the last segment that did not hold a complete record: a write cut by a crash, or
/// a batch that was never fdatasynced and reached the disk with holes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment.
    pub file: PathBuf,
    /// Offset where its valid data ends.
    pub valid_len: u64,
    /// Bytes after that offset.
    pub torn_bytes: u64,
    /// True if the header itself was incomplete (the segment holds no record at all).
    pub header_torn: bool,
    /// Whole, valid records found after the damage and discarded with it: records of batches
    /// that were never fdatasynced (so never acknowledged as durable), which a power loss kept
    /// while losing an earlier page of the same unsynced write.
    pub records_discarded: u64,
}

/// Reads every segment in order, calling `apply` for each valid record, without modifying
/// anything.
///
/// A damaged record in the last segment is a torn tail (reported in [`WalScan::torn_tail`])
/// when nothing shows it was ever durable, and [`Error::Corruption`] when something does: a
/// later commit marker saying an LSN at or past it was durable when its batch was written, or
/// `durable_lsn` (what the caller knows was durable, e.g. from a clean-close marker). In a
/// format 1 segment, which has no markers, any valid record after the damage makes it
/// corruption. A gap in LSNs or a damaged sealed segment is always [`Error::Corruption`].
///
/// Each segment is read the way `mode` says ([`ReadMode::Mapped`] only with the store's lock
/// held) and released before the next one is read: no map outlives the scan, so the caller
/// may truncate or rewrite a segment once it returns.
pub(crate) fn scan(
    storage: &dyn Storage,
    dir: &Path,
    mode: ReadMode,
    mut expected_lsn: u64,
    durable_lsn: u64,
    mut apply: impl FnMut(u64, u64, &[Entry<'_>]),
) -> Result<WalScan> {
    let segments = list_segments(storage, dir)?;
    let mut out = WalScan {
        last_lsn: expected_lsn.saturating_sub(1),
        ..WalScan::default()
    };
    // Segments wholly covered by a snapshot (first LSN below the expected one and a successor
    // that also starts at or below it) are skipped.
    let start = segments
        .iter()
        .rposition(|(first, _)| *first <= expected_lsn)
        .unwrap_or(0);
    let count = segments.len();
    for (i, (first_lsn, path)) in segments.iter().enumerate().skip(start) {
        let is_last = i + 1 == count;
        let bytes = read_whole(storage, path, mode)?;
        out.segments += 1;
        let header_torn = |bytes: &[u8]| TornTail {
            file: path.clone(),
            valid_len: 0,
            torn_bytes: bytes.len() as u64,
            header_torn: true,
            records_discarded: 0,
        };
        let header = match record::decode_segment_header(&bytes) {
            Ok(header) => header,
            Err(DecodeError::Truncated { .. }) if is_last => {
                out.torn_tail = Some(header_torn(&bytes));
                break;
            }
            Err(DecodeError::Truncated { .. }) => {
                return Err(Error::corruption(path, 0, "segment header is incomplete"));
            }
            // A header is fdatasynced before any record is written after it, so a last segment
            // no longer than a header whose header is damaged holds no record: its name reached
            // the disk but its header did not (zeros, or a torn write). Not corruption.
            Err(DecodeError::Invalid(_))
                if is_last && bytes.len() <= record::SEGMENT_HEADER_BYTES =>
            {
                out.torn_tail = Some(header_torn(&bytes));
                break;
            }
            Err(DecodeError::Invalid(why)) => return Err(Error::corruption(path, 0, why)),
        };
        out.last_segment_version = header.version;
        if header.first_lsn != *first_lsn {
            return Err(Error::corruption(
                path,
                16,
                format!(
                    "header says first LSN {}, file name says {first_lsn}",
                    header.first_lsn
                ),
            ));
        }
        if *first_lsn > expected_lsn {
            return Err(Error::corruption(
                path,
                16,
                format!(
                    "log has a gap: expected LSN {expected_lsn}, segment starts at {first_lsn}"
                ),
            ));
        }
        let markers = header.has_commit_markers();
        let mut offset = record::SEGMENT_HEADER_BYTES;
        out.valid_bytes += offset as u64;
        // A marker not yet followed by its batch's first record: at the end of the last
        // segment, the batch was cut off whole and the marker goes with the torn tail.
        let mut dangling_marker: Option<usize> = None;
        while offset < bytes.len() {
            let decoded =
                record::decode_frame(&bytes[offset..]).and_then(|(frame, used)| match markers {
                    true => record::commit_marker(&frame).map(|m| (frame, m, used)),
                    false => Ok((frame, None, used)),
                });
            match decoded {
                Ok((_, Some(marker), used)) => {
                    // A marker names the record right after it: never one past the next
                    // expected (in a part covered by a snapshot it names an earlier one).
                    if marker.first_lsn > expected_lsn {
                        return Err(Error::corruption(
                            path,
                            offset as u64,
                            format!(
                                "commit marker names LSN {}, expected LSN {expected_lsn}",
                                marker.first_lsn
                            ),
                        ));
                    }
                    dangling_marker.get_or_insert(offset);
                    offset += used;
                    out.valid_bytes += used as u64;
                }
                Ok((frame, None, used)) => {
                    dangling_marker = None;
                    if frame.lsn < expected_lsn {
                        // Covered by a snapshot: already applied.
                    } else if frame.lsn == expected_lsn {
                        let entries = record::decode_entries(frame.body).map_err(|e| {
                            Error::corruption(
                                path,
                                offset as u64,
                                format!("bad record body: {e:?}"),
                            )
                        })?;
                        apply(frame.lsn, frame.time_ms, &entries);
                        out.records += 1;
                        out.last_lsn = frame.lsn;
                        expected_lsn += 1;
                    } else {
                        return Err(Error::corruption(
                            path,
                            offset as u64,
                            format!("expected LSN {expected_lsn}, found {}", frame.lsn),
                        ));
                    }
                    out.max_time_ms = out.max_time_ms.max(frame.time_ms);
                    offset += used;
                    out.valid_bytes += used as u64;
                }
                Err(err) => {
                    let tail = &bytes[offset..];
                    let reason = match err {
                        DecodeError::Truncated { needed, have } => {
                            format!("record needs {needed} bytes, segment has {have}")
                        }
                        DecodeError::Invalid(why) => why.to_owned(),
                    };
                    if !is_last {
                        return Err(Error::corruption(
                            path,
                            offset as u64,
                            format!("{reason}, in a sealed (fdatasynced) segment"),
                        ));
                    }
                    let after = frames_after(tail, expected_lsn);
                    let synced = match markers {
                        // Damage before a record some later batch (or the caller) knew was
                        // durable is damage to synced data.
                        true => after.durable_lsn.max(durable_lsn) >= expected_lsn,
                        // No markers: valid records after the damage are the only evidence.
                        false => after.records > 0 || durable_lsn >= expected_lsn,
                    };
                    if synced {
                        let why = if markers && after.durable_lsn >= expected_lsn {
                            format!(
                                "a commit marker after it says LSN {} was durable",
                                after.durable_lsn
                            )
                        } else if durable_lsn >= expected_lsn {
                            format!("LSN {durable_lsn} was durable at the last clean close")
                        } else {
                            "valid records follow".to_owned()
                        };
                        return Err(Error::corruption(
                            path,
                            offset as u64,
                            format!(
                                "{reason} at LSN {expected_lsn}; {why}, so this is damage to \
                                 synced data, not a torn write"
                            ),
                        ));
                    }
                    let valid_len = dangling_marker.take().unwrap_or(offset);
                    out.valid_bytes -= (offset - valid_len) as u64;
                    out.torn_tail = Some(TornTail {
                        file: path.clone(),
                        valid_len: valid_len as u64,
                        torn_bytes: (bytes.len() - valid_len) as u64,
                        header_torn: false,
                        records_discarded: after.records,
                    });
                    break;
                }
            }
        }
        if is_last
            && out.torn_tail.is_none()
            && let Some(valid_len) = dangling_marker
        {
            out.valid_bytes -= (bytes.len() - valid_len) as u64;
            out.torn_tail = Some(TornTail {
                file: path.clone(),
                valid_len: valid_len as u64,
                torn_bytes: (bytes.len() - valid_len) as u64,
                header_torn: false,
                records_discarded: 0,
            });
        }
    }
    Ok(out)
}

/// What valid frames lie after the first byte of a damaged region.
#[derive(Debug, Default)]
struct FramesAfter {
    /// Valid records with LSN at least the expected one.
    records: u64,
    /// The largest durable LSN a valid commit marker claims (0 if none).
    durable_lsn: u64,
}

/// Looks for valid frames at every offset past the first byte of `tail` (skipping over each
/// one found). Cheap for garbage and for zeros (a lost page often reads back as zeros): only
/// offsets whose fields are plausible (a record LSN at least `expected`, or a marker's LSN 0
/// with its body length 16) are checksummed.
fn frames_after(tail: &[u8], expected_lsn: u64) -> FramesAfter {
    let field = |bytes: &[u8]| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&bytes[..8]);
        u64::from_le_bytes(v)
    };
    let marker_len = (record::COMMIT_MARKER_BYTES - record::FRAME_HEADER_BYTES) as u32;
    let mut found = FramesAfter::default();
    let mut start = 1;
    while start + record::FRAME_HEADER_BYTES <= tail.len() {
        let rest = &tail[start..];
        let lsn = field(&rest[12..20]);
        let body_len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let plausible = (lsn == 0 && body_len == marker_len)
            || (lsn >= expected_lsn && lsn <= expected_lsn.saturating_add(1 << 32));
        if plausible && let Ok((frame, used)) = record::decode_frame(rest) {
            match record::commit_marker(&frame) {
                Ok(Some(marker)) => found.durable_lsn = found.durable_lsn.max(marker.durable_lsn),
                Ok(None) => found.records += 1,
                Err(_) => {}
            }
            start += used;
            continue;
        }
        start += 1;
    }
    found
}

/// State shared by appenders, waiters and the WAL writer thread.
pub(crate) struct WalShared {
    queue: Mutex<Queue>,
    queue_space: Condvar,
    /// Rung (under the queue mutex) when the writer has something to do.
    doorbell: Condvar,
    sync: Mutex<SyncState>,
    synced: Condvar,
    written_lsn: AtomicU64,
    durable_lsn: AtomicU64,
    poisoned: AtomicBool,
    poison_reason: Mutex<Option<String>>,
    /// Threads blocked in `wait`: a lone one leads commits itself.
    blocking_waiters: AtomicU64,
    /// Mirrors `!SyncState::handed_off.is_empty()` (stored under the sync mutex), so an async
    /// waiter whose record is published skips the mutex when nobody is left to wake.
    handed_off_pending: AtomicBool,
    /// Records in the last group commit: after one of several records the writer thread
    /// waits briefly for the next batch to fill (`gather`); after a lone record it watches
    /// for the next one before sleeping (`await_next_record`).
    last_batch_records: AtomicU64,
    /// The batch the writer thread gathers towards: the last commit's records plus those
    /// queued by the time its fdatasync ended (see `gather`). A hint that no hand-off depends
    /// on (a stale value only changes how long a gather waits, never for more than
    /// `COMMIT_DELAY_MAX`), so a std atomic, which loom does not model.
    gather_target: std::sync::atomic::AtomicU64,
    /// `Some(interval)` for `Durability::Periodic`: the background fdatasync period.
    periodic: Option<Duration>,
    /// True while the segment holds written bytes not yet fdatasynced (mirrors `Io::unsynced`
    /// so the writer thread can plan the periodic fdatasync without taking `io`).
    unsynced: AtomicBool,
    /// The largest record time appended (Unix ms), since open.
    max_time_ms: AtomicU64,
    /// When the last fdatasync of the WAL ended, in µs since `started`.
    last_sync_us: AtomicU64,
    /// The origin of `last_sync_us`.
    started: Instant,
    io: Mutex<Io>,
    wal_bytes: AtomicU64,
    appended_bytes: AtomicU64,
    active_first_lsn: AtomicU64,
    segments: AtomicU64,
    fsyncs: AtomicU64,
    /// Writes that found the queue over its budget and had to wait (blocking or async).
    backpressure_waits: AtomicU64,
    /// The queue's byte budget (`Options::wal_queue_bytes`).
    queue_bytes_max: usize,
    /// Bytes in the queue, mirrored (stored under the queue mutex) so `poll_space` can answer
    /// "under budget" without taking the mutex.
    queued_bytes: AtomicU64,
    /// Records in the queue, mirrored the same way: read by the writer thread without the
    /// mutex (`await_next_record`, the gather target). A hint like `gather_target`: the
    /// writer decides on the queue under its mutex.
    queued_records: std::sync::atomic::AtomicU64,
}

struct Queue {
    buf: Vec<u8>,
    /// Records in `buf`.
    records: u64,
    /// An append rings the doorbell only once `records` reaches this: 1 (any record) while
    /// the writer thread sleeps for work, the batch it gathers towards while it gathers.
    /// Rings below it would only wake the writer to go back to sleep.
    ring_at_records: u64,
    next_lsn: u64,
    first_lsn_in_buf: u64,
    needs_sync: bool,
    roll: bool,
    shutdown: bool,
    /// Async writers waiting for the queue to drain below its budget (`poll_space`); woken,
    /// like `queue_space`, whenever a commit takes the queue.
    space_wakers: Vec<Waker>,
}

#[derive(Default)]
struct SyncState {
    /// Async waiters registered for the next commit to end.
    wakers: Vec<Waker>,
    /// Async waiters a finished commit has yet to wake: the leader wakes them one by one,
    /// and an async waiter that finds its record published wakes all that are left (see
    /// `wake_handed_off`).
    handed_off: Vec<Waker>,
    /// A thread holds `io` and is running a group commit; it clears this and notifies
    /// `synced` when done, under this mutex.
    leading: bool,
}

/// Where the WAL writer starts after recovery.
pub(crate) struct WalStart {
    pub(crate) storage: std::sync::Arc<dyn Storage>,
    pub(crate) dir: PathBuf,
    /// The active segment, positioned at its end.
    pub(crate) file: Box<dyn WritableFile>,
    /// Length of the active segment.
    pub(crate) file_bytes: u64,
    /// LSN the next record gets.
    pub(crate) next_lsn: u64,
    /// Bytes in all segments.
    pub(crate) wal_bytes: u64,
    /// Number of segments.
    pub(crate) segments: u64,
    /// Roll to a new segment past this size.
    pub(crate) segment_bytes: u64,
    /// `Some` for `Durability::Periodic`: the background fdatasync interval.
    pub(crate) periodic: Option<Duration>,
    /// First LSN of the active segment.
    pub(crate) active_first_lsn: u64,
    /// Whether the active segment's format has commit markers (false for a format 1 segment
    /// found at open, until the next roll).
    pub(crate) commit_markers: bool,
    /// Bytes the append queue may hold before writers wait.
    pub(crate) queue_bytes_max: usize,
}

/// The WAL: the shared state plus the writer thread.
pub(crate) struct Wal {
    shared: Arc<WalShared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// The WAL file and what only the current leader may touch. Behind `WalShared::io`: whoever
/// holds that mutex is the leader of the next group commit.
struct Io {
    storage: std::sync::Arc<dyn Storage>,
    dir: PathBuf,
    file: Box<dyn WritableFile>,
    file_bytes: u64,
    segment_bytes: u64,
    periodic: Option<Duration>,
    unsynced: bool,
    last_sync: Instant,
    spare: Vec<u8>,
    roll_requested: bool,
    /// Whether batches written to the active segment start with a commit marker.
    commit_markers: bool,
}

impl Wal {
    /// Starts the writer thread.
    pub(crate) fn start(s: WalStart) -> Result<Wal> {
        let WalStart {
            storage,
            dir,
            file,
            file_bytes,
            next_lsn,
            wal_bytes,
            segments,
            segment_bytes,
            periodic,
            active_first_lsn,
            commit_markers,
            queue_bytes_max,
        } = s;
        let last = next_lsn - 1;
        let shared = Arc::new(WalShared {
            queue: Mutex::new(Queue {
                buf: Vec::with_capacity(64 * 1024),
                records: 0,
                ring_at_records: 1,
                next_lsn,
                first_lsn_in_buf: next_lsn,
                needs_sync: false,
                roll: false,
                shutdown: false,
                space_wakers: Vec::new(),
            }),
            queue_space: Condvar::new(),
            doorbell: Condvar::new(),
            sync: Mutex::new(SyncState::default()),
            synced: Condvar::new(),
            written_lsn: AtomicU64::new(last),
            durable_lsn: AtomicU64::new(last),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(None),
            blocking_waiters: AtomicU64::new(0),
            handed_off_pending: AtomicBool::new(false),
            last_batch_records: AtomicU64::new(0),
            gather_target: std::sync::atomic::AtomicU64::new(0),
            periodic,
            unsynced: AtomicBool::new(false),
            max_time_ms: AtomicU64::new(0),
            last_sync_us: AtomicU64::new(0),
            started: Instant::now(),
            io: Mutex::new(Io {
                storage,
                dir,
                file,
                file_bytes,
                segment_bytes,
                periodic,
                unsynced: false,
                last_sync: Instant::now(),
                spare: Vec::with_capacity(64 * 1024),
                roll_requested: false,
                commit_markers,
            }),
            wal_bytes: AtomicU64::new(wal_bytes),
            appended_bytes: AtomicU64::new(0),
            active_first_lsn: AtomicU64::new(active_first_lsn),
            segments: AtomicU64::new(segments),
            fsyncs: AtomicU64::new(0),
            backpressure_waits: AtomicU64::new(0),
            queue_bytes_max,
            queued_bytes: AtomicU64::new(0),
            queued_records: std::sync::atomic::AtomicU64::new(0),
        });
        let background = Arc::clone(&shared);
        let handle = sync::spawn("keel-wal-writer", move || background.run_background())?;
        Ok(Wal {
            shared,
            writer: Mutex::new(Some(handle)),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<WalShared> {
        &self.shared
    }

    /// Flushes and syncs everything queued, then stops the writer. Idempotent.
    pub(crate) fn shutdown(&self) -> Result<()> {
        {
            let mut q = self.shared.queue.lock();
            q.shutdown = true;
            q.needs_sync = true;
            for w in std::mem::take(&mut q.space_wakers) {
                w.wake();
            }
        }
        self.shared.doorbell.notify_one();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        self.shared.check_poison()
    }
}

impl WalShared {
    /// Refuses if the store is poisoned.
    pub(crate) fn check_poison(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            let reason = self.poison_reason.lock().clone().unwrap_or_default();
            return Err(Error::Poisoned(reason));
        }
        Ok(())
    }

    /// Waits (without holding any lock) while the queue is over its byte budget.
    pub(crate) fn throttle(&self) {
        let mut q = self.queue.lock();
        let mut waited = false;
        while q.buf.len() >= self.queue_bytes_max
            && !q.shutdown
            && !self.poisoned.load(Ordering::Acquire)
        {
            if !waited {
                waited = true;
                self.backpressure_waits.fetch_add(1, Ordering::Relaxed);
            }
            self.queue_space.wait(&mut q);
        }
    }

    /// The non-blocking `throttle` for async writers: `true` when the queue is under its byte
    /// budget (or the store is closing or poisoned: the write then fails on its own), else
    /// registers `waker`, which the next commit to take the queue wakes.
    pub(crate) fn poll_space(&self, waker: &Waker) -> bool {
        // Fast path, no mutex: the budget is soft (concurrent writers may each add a record).
        if self.queued_bytes.load(Ordering::Relaxed) < self.queue_bytes_max as u64 {
            return true;
        }
        let mut q = self.queue.lock();
        if q.buf.len() < self.queue_bytes_max || q.shutdown || self.poisoned.load(Ordering::Acquire)
        {
            return true;
        }
        if !q.space_wakers.iter().any(|w| w.will_wake(waker)) {
            q.space_wakers.push(waker.clone());
        }
        self.backpressure_waits.fetch_add(1, Ordering::Relaxed);
        // The writer checks for work under the queue mutex: ring so a full queue is taken.
        self.doorbell.notify_one();
        false
    }

    /// Appends one record holding `entries`, stamped with `time_ms`; returns its LSN. Call with
    /// the shard locks of every key in `entries` held.
    pub(crate) fn append(
        &self,
        time_ms: u64,
        entries: &[Entry<'_>],
        durability: Durability,
    ) -> Result<u64> {
        self.check_poison()?;
        let (lsn, ring) = {
            let mut q = self.queue.lock();
            if q.shutdown {
                return Err(Error::Closed);
            }
            let lsn = q.next_lsn;
            q.next_lsn += 1;
            if q.buf.is_empty() {
                q.first_lsn_in_buf = lsn;
                // Room for the batch's commit marker, which the writer fills in (it alone
                // knows what is durable when the batch is written).
                q.buf.extend_from_slice(&[0; record::COMMIT_MARKER_BYTES]);
            }
            let before = q.buf.len();
            q.records += 1;
            // Under the queue mutex: a plain load and store cannot lose a larger time.
            if time_ms > self.max_time_ms.load(Ordering::Relaxed) {
                self.max_time_ms.store(time_ms, Ordering::Relaxed);
            }
            record::encode_record(&mut q.buf, lsn, time_ms, entries);
            self.queued_bytes
                .store(q.buf.len() as u64, Ordering::Relaxed);
            self.queued_records.store(q.records, Ordering::Relaxed);
            self.appended_bytes
                .fetch_add((q.buf.len() - before) as u64, Ordering::Relaxed);
            if durability == Durability::Immediate {
                q.needs_sync = true;
            }
            (lsn, q.records >= q.ring_at_records)
        };
        // The writer sets `ring_at_records` and checks for work under the queue mutex before
        // it waits, so a notification after the unlock cannot be lost.
        if ring {
            self.doorbell.notify_one();
        }
        Ok(lsn)
    }

    fn reached(&self, lsn: u64, durability: Durability) -> bool {
        match durability {
            Durability::Immediate => self.durable_lsn.load(Ordering::Acquire) >= lsn,
            Durability::Periodic(_) => self.written_lsn.load(Ordering::Acquire) >= lsn,
            Durability::Buffered => true,
        }
    }

    /// Blocks until record `lsn` has reached `durability`.
    ///
    /// A lone blocking waiter runs the group commit itself (it becomes the leader: one `write`,
    /// one `fdatasync` for everything queued), so a single writer pays for its fdatasync and
    /// nothing else, with no hand-off to the writer thread and back. When several threads wait,
    /// they leave the commits to the writer thread, which batches everything that arrives while
    /// an fdatasync runs: letting each waiter lead would commit tiny batches back to back.
    pub(crate) fn wait(&self, lsn: u64, durability: Durability) -> Result<()> {
        if self.reached(lsn, durability) {
            return Ok(());
        }
        let alone = self.blocking_waiters.fetch_add(1, Ordering::AcqRel) == 0;
        let result = self.wait_registered(lsn, durability, alone);
        self.blocking_waiters.fetch_sub(1, Ordering::AcqRel);
        result
    }

    fn wait_registered(&self, lsn: u64, durability: Durability, alone: bool) -> Result<()> {
        loop {
            if self.reached(lsn, durability) {
                return Ok(());
            }
            self.check_poison()?;
            if alone && let Some(mut io) = self.io.try_lock() {
                if !self.reached(lsn, durability) {
                    self.lead(&mut io);
                }
                continue;
            }
            // The writer thread (rung by our append) or the running leader will publish our
            // record; both notify under this mutex after publishing.
            let mut state = self.sync.lock();
            if self.reached(lsn, durability) {
                return Ok(());
            }
            self.check_poison()?;
            if alone && !state.leading {
                // `io` is held by a commit that is just starting or just ended: try again.
                drop(state);
                sync::yield_now();
                continue;
            }
            self.synced.wait(&mut state);
        }
    }

    /// Non-blocking check for async callers: `Ok(true)` when reached, else registers `waker`.
    ///
    /// A waiter whose record is published first wakes the other async waiters the commit has
    /// not woken yet (`wake_handed_off`): it runs on a runtime worker, where a wake is a push
    /// on the worker's own run queue, while the WAL writer thread's wakes each go through
    /// the runtime's shared queue and may have to unpark a worker.
    pub(crate) fn poll(&self, lsn: u64, durability: Durability, waker: &Waker) -> Result<bool> {
        if self.reached(lsn, durability) {
            self.wake_handed_off(true);
            return Ok(true);
        }
        let mut state = self.sync.lock();
        if self.reached(lsn, durability) {
            drop(state);
            self.wake_handed_off(true);
            return Ok(true);
        }
        self.check_poison()?;
        if !state.wakers.iter().any(|w| w.will_wake(waker)) {
            state.wakers.push(waker.clone());
        }
        Ok(false)
    }

    /// Ends a group commit: publishes what it made written / durable (if anything), clears
    /// `leading`, and wakes every waiter: blocking ones through `synced`, async ones by handing
    /// their wakers off (`wake_handed_off`). The leader wakes async waiters one at a time
    /// until none is left; the first of them to run usually wakes the rest from its runtime
    /// worker, so the leader's own wakes are few. The leader never stops before the list is
    /// empty, so every waker is woken even if no woken task ever runs.
    fn end_lead(&self, published: Option<(u64, Option<u64>)>) {
        {
            let mut state = self.sync.lock();
            if let Some((written, durable)) = published {
                self.written_lsn.store(written, Ordering::Release);
                if let Some(d) = durable {
                    self.durable_lsn.store(d, Ordering::Release);
                }
            }
            state.leading = false;
            if state.handed_off.is_empty() {
                let SyncState {
                    wakers, handed_off, ..
                } = &mut *state;
                std::mem::swap(wakers, handed_off);
            } else {
                let wakers = std::mem::take(&mut state.wakers);
                state.handed_off.extend(wakers);
            }
            self.handed_off_pending
                .store(!state.handed_off.is_empty(), Ordering::Relaxed);
        }
        self.synced.notify_all();
        self.wake_handed_off(false);
    }

    /// Wakes the handed-off async waiters until none is left: `all` at once (an async waiter
    /// whose record is published), or one per hold of the sync mutex (the leader: between
    /// two of its wakes, a woken waiter running on a runtime worker can take the rest).
    fn wake_handed_off(&self, all: bool) {
        while self.handed_off_pending.load(Ordering::Relaxed) {
            let mut state = self.sync.lock();
            if all {
                let wakers = std::mem::take(&mut state.handed_off);
                self.handed_off_pending.store(false, Ordering::Relaxed);
                drop(state);
                for w in wakers {
                    w.wake();
                }
            } else {
                let waker = state.handed_off.pop();
                self.handed_off_pending
                    .store(!state.handed_off.is_empty(), Ordering::Relaxed);
                drop(state);
                if let Some(w) = waker {
                    w.wake();
                }
            }
        }
    }

    fn poison(&self, what: &str, err: &std::io::Error) {
        tracing::debug!(what, error = %err, "keel-engine: store poisoned");
        *self.poison_reason.lock() = Some(format!("{what}: {err}"));
        self.poisoned.store(true, Ordering::Release);
        let wakers = std::mem::take(&mut self.sync.lock().wakers);
        let space_wakers = std::mem::take(&mut self.queue.lock().space_wakers);
        self.synced.notify_all();
        self.queue_space.notify_all();
        for w in wakers.into_iter().chain(space_wakers) {
            w.wake();
        }
        self.wake_handed_off(true);
    }

    /// The largest record time appended since open (Unix ms; 0 if none).
    pub(crate) fn max_appended_time_ms(&self) -> u64 {
        self.max_time_ms.load(Ordering::Relaxed)
    }

    /// (first LSN, length) of the segment being appended to.
    pub(crate) fn active_segment(&self) -> (u64, u64) {
        let io = self.io.lock();
        (self.active_first_lsn(), io.file_bytes)
    }

    /// For a write that changed nothing but saw what earlier records wrote: the LSN of the
    /// last record appended, if it is not durable yet, with an fdatasync requested for it
    /// (it may have been appended with a relaxed durability that asked for none). `None` when
    /// everything appended is already durable.
    pub(crate) fn undurable_tail(&self) -> Option<u64> {
        let last = {
            let mut q = self.queue.lock();
            let last = q.next_lsn - 1;
            if self.durable_lsn.load(Ordering::Acquire) >= last {
                return None;
            }
            q.needs_sync = true;
            last
        };
        self.doorbell.notify_one();
        Some(last)
    }

    /// LSN of the last record appended (0 if none yet).
    pub(crate) fn last_appended_lsn(&self) -> u64 {
        self.queue.lock().next_lsn - 1
    }

    /// Asks the writer to start a new segment before its next batch, so the current one can be
    /// deleted once a snapshot covers it.
    pub(crate) fn request_roll(&self) {
        self.queue.lock().roll = true;
    }

    /// Starts a new segment now if the active one holds a record `<= covered` (a snapshot at
    /// `covered` calls it after making the WAL durable up to there), so the segments the
    /// snapshot covers can all be deleted. Without it an idle store keeps its whole WAL: the
    /// roll the snapshot requested waits for the next write, and a roll done by a commit of
    /// records queued before the snapshot leaves them in the new active segment.
    pub(crate) fn roll_now(&self, covered: u64) -> Result<()> {
        let mut io = self.io.lock();
        let next = {
            let mut q = self.queue.lock();
            io.roll_requested |= std::mem::take(&mut q.roll);
            if !q.buf.is_empty() {
                // Commit what is queued first; a requested roll happens before it is written.
                drop(q);
                self.lead(&mut io);
                q = self.queue.lock();
            }
            q.buf.is_empty().then_some(q.next_lsn)
        };
        let has_records = io.file_bytes > record::SEGMENT_HEADER_BYTES as u64;
        if let Some(first_lsn) = next
            && has_records
            && self.active_first_lsn() <= covered
            && !self.is_poisoned()
        {
            self.sync.lock().leading = true;
            // Records appended from here on get LSNs >= `first_lsn` and are written by a
            // later commit, into the new segment.
            let rolled = io.roll(first_lsn, self);
            io.roll_requested = false;
            match rolled {
                Err((what, e)) => {
                    self.poison(what, &e);
                    self.end_lead(None);
                }
                Ok(()) => {
                    // `roll` fdatasynced the sealed segment, which holds every record written
                    // so far: they are all durable now.
                    self.note_synced(&mut io);
                    let written = self.written_lsn.load(Ordering::Acquire);
                    self.end_lead(Some((written, Some(written))));
                }
            }
        }
        drop(io);
        self.check_poison()
    }

    /// Makes every record appended so far durable, whatever durability each asked for.
    pub(crate) fn sync_all(&self) -> Result<()> {
        let last = {
            let mut q = self.queue.lock();
            q.needs_sync = true;
            q.next_lsn - 1
        };
        self.doorbell.notify_one();
        self.wait(last, Durability::Immediate)
    }

    /// First LSN of the segment the writer appends to (never deleted by truncation).
    pub(crate) fn active_first_lsn(&self) -> u64 {
        self.active_first_lsn.load(Ordering::Acquire)
    }

    /// Record bytes appended since open, counted when queued (monotonic; not reduced by
    /// truncation).
    pub(crate) fn appended_bytes(&self) -> u64 {
        self.appended_bytes.load(Ordering::Relaxed)
    }

    /// Accounts for a deleted segment of `bytes` bytes.
    pub(crate) fn segment_removed(&self, bytes: u64) {
        self.wal_bytes.fetch_sub(
            bytes.min(self.wal_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.segments.fetch_sub(1, Ordering::Relaxed);
    }

    /// (bytes in all segments, number of segments, fdatasyncs so far, durable LSN).
    pub(crate) fn stats(&self) -> (u64, u64, u64, u64) {
        (
            self.wal_bytes.load(Ordering::Relaxed),
            self.segments.load(Ordering::Relaxed),
            self.fsyncs.load(Ordering::Relaxed),
            self.durable_lsn.load(Ordering::Acquire),
        )
    }

    /// Times a write had to wait for the queue to drain under its budget.
    pub(crate) fn backpressure_waits(&self) -> u64 {
        self.backpressure_waits.load(Ordering::Relaxed)
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

impl WalShared {
    /// The WAL writer thread: runs a group commit whenever there is work and no waiting
    /// writer took it (async callers never lead; the periodic fdatasync and shutdown happen
    /// here).
    fn run_background(&self) {
        // The last commit was this thread's, of one record, with no thread blocked waiting:
        // a lone async writer, whose next record is worth watching for (`await_next_record`).
        let mut lone_async = false;
        loop {
            if lone_async {
                self.await_next_record();
            }
            {
                let mut q = self.queue.lock();
                // Sleep until there is work: records, a sync request, shutdown, or (Periodic)
                // the background fdatasync falling due.
                while q.buf.is_empty() && !q.needs_sync && !q.shutdown {
                    // Periodic with written, unsynced data: fdatasync once `interval` has
                    // passed since the last one, so two fdatasyncs are never more than an
                    // interval apart while there is data to sync. With nothing unsynced there
                    // is nothing to time: a leader that leaves data unsynced rings the
                    // doorbell (under the queue mutex, so the ring cannot be lost).
                    let due = self
                        .periodic
                        .filter(|_| self.unsynced.load(Ordering::Acquire))
                        .map(|interval| self.periodic_left(interval));
                    match due {
                        None => self.doorbell.wait(&mut q),
                        Some(left) if left.is_zero() => break,
                        Some(left) => self.doorbell.wait_for(&mut q, left),
                    }
                }
                self.gather(&mut q);
            }
            let shutdown = {
                let mut io = self.io.lock();
                self.lead(&mut io)
            };
            // A blocking lone writer leads its own commits: this thread must not race it for
            // them (it would then wait on the condvar for this thread's commit instead).
            lone_async = !cfg!(loom)
                && self.last_batch_records.load(Ordering::Relaxed) == 1
                && self.blocking_waiters.load(Ordering::Relaxed) == 0;
            if shutdown && self.queue.lock().buf.is_empty() {
                return;
            }
        }
    }

    /// Time left until the periodic fdatasync is due (zero: due now).
    fn periodic_left(&self, interval: Duration) -> Duration {
        let last = Duration::from_micros(self.last_sync_us.load(Ordering::Acquire));
        (last + interval).saturating_sub(self.started.elapsed())
    }

    /// Records a finished fdatasync (under `io`).
    fn note_synced(&self, io: &mut Io) {
        io.unsynced = false;
        io.last_sync = Instant::now();
        let us = u64::try_from(io.last_sync.duration_since(self.started).as_micros())
            .unwrap_or(u64::MAX);
        self.last_sync_us.store(us, Ordering::Release);
        self.unsynced.store(false, Ordering::Release);
    }

    /// Commit delay, adaptive. Under a steady load of N concurrent writers, commits would
    /// otherwise settle into alternating halves: while one batch's fdatasync runs, the writers
    /// acknowledged by the previous commit queue the next batch, which the writer thread takes
    /// the instant the fdatasync ends, before the writers just woken have re-appended; each
    /// writer then waits two fdatasyncs per write. So when the last commit carried several
    /// records, wait until the queue holds `gather_target` records (the last batch, whose
    /// writers were just woken, plus the records queued while its fdatasync ran), or
    /// `COMMIT_DELAY_MAX` passes. Records queued after the wake-ups are the woken writers'
    /// own and do not raise the target: counting them made it unreachable for a closed loop
    /// of N writers, and every commit waited out the whole delay. Only the append that reaches
    /// the target rings (`ring_at_records`): the writer sleeps through the others. A lone
    /// writer (last batch of one record) never waits, nor does a sync request with nothing
    /// queued (snapshot) or shutdown.
    fn gather(&self, q: &mut sync::MutexGuard<'_, Queue>) {
        // loom has no time: a timed wait there is an untimed one, which could wait forever.
        if cfg!(loom) || q.records == 0 || q.shutdown {
            return;
        }
        if self.last_batch_records.load(Ordering::Relaxed) < 2 {
            return;
        }
        let target = self.gather_target.load(Ordering::Relaxed);
        if q.records >= target {
            return;
        }
        let deadline = Instant::now() + COMMIT_DELAY_MAX;
        q.ring_at_records = target;
        while q.records < target && !q.shutdown {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.doorbell.wait_for(q, left);
        }
        q.ring_at_records = 1;
    }

    /// After this thread committed a lone async writer's record, watches the queue (without
    /// its mutex) for up to `LONE_WRITER_SPIN` before going to sleep on the doorbell. The
    /// writer appends its next record a few microseconds after the commit woke it; found
    /// awake, this thread takes it at once, and the append's doorbell finds nobody to wake.
    /// After larger commits the writer thread gathers instead (`gather`), sleeping: spinning
    /// there would take a CPU from the writers filling the batch.
    fn await_next_record(&self) {
        if cfg!(loom) {
            return;
        }
        let until = Instant::now() + LONE_WRITER_SPIN;
        while self.queued_records.load(Ordering::Relaxed) == 0 && Instant::now() < until {
            for _ in 0..32 {
                std::hint::spin_loop();
            }
        }
    }

    /// One group commit, by the holder of `io`: takes everything queued, writes it with one
    /// `write`, fdatasyncs once if any record asked for `Immediate` (or the periodic interval
    /// elapsed, or the store is closing), and publishes. Returns whether shutdown was asked.
    fn lead(&self, io: &mut Io) -> bool {
        self.sync.lock().leading = true;
        let ((batch_last, first, needs_sync, shutdown), space_wakers, records) = {
            let mut q = self.queue.lock();
            std::mem::swap(&mut q.buf, &mut io.spare);
            self.queued_bytes
                .store(q.buf.len() as u64, Ordering::Relaxed);
            let records = std::mem::take(&mut q.records);
            self.queued_records.store(0, Ordering::Relaxed);
            self.last_batch_records.store(records, Ordering::Relaxed);
            let needs_sync = std::mem::take(&mut q.needs_sync);
            io.roll_requested |= std::mem::take(&mut q.roll);
            let space_wakers = std::mem::take(&mut q.space_wakers);
            (
                (q.next_lsn - 1, q.first_lsn_in_buf, needs_sync, q.shutdown),
                space_wakers,
                records,
            )
        };
        self.queue_space.notify_all();
        for w in space_wakers {
            w.wake();
        }
        if self.is_poisoned() {
            // Nothing more reaches the disk; waiters were woken with the poison.
            io.spare.clear();
            self.end_lead(None);
            return shutdown;
        }
        let has_records = !io.spare.is_empty();
        let batch_bytes = io.spare.len();
        let mut newly_unsynced = false;
        if has_records {
            let written = io.write_batch(first, self);
            io.spare.clear();
            if let Err((what, e)) = written {
                self.poison(what, &e);
                self.end_lead(None);
                return shutdown;
            }
            if !io.unsynced {
                io.unsynced = true;
                self.unsynced.store(true, Ordering::Release);
                newly_unsynced = true;
            }
        }
        let periodic_due = io
            .periodic
            .is_some_and(|iv| io.unsynced && io.last_sync.elapsed() >= iv);
        let mut durable = None;
        let mut fsync_us = None;
        if io.unsynced && (needs_sync || periodic_due || shutdown) {
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            let sync_started = Instant::now();
            let synced = io.file.sync_data();
            fsync_us = Some(sync_started.elapsed().as_micros() as u64);
            if let Err(e) = synced {
                // Never retry an fsync and acknowledge: the kernel may have dropped the
                // dirty pages (fsyncgate). Poison and make every waiter fail.
                self.poison("fdatasync of the WAL failed", &e);
                self.end_lead(None);
                return shutdown;
            }
            self.note_synced(io);
            durable = Some(batch_last);
        } else if !io.unsynced {
            durable = Some(batch_last);
        }
        // The next batch gathers towards this one's writers, about to be woken, plus the
        // writers whose records were queued while it ran (see `gather`).
        self.gather_target.store(
            records + self.queued_records.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.end_lead(Some((batch_last, durable)));
        if has_records {
            metrics::histogram!(crate::METRIC_GROUP_COMMIT_RECORDS).record(records as f64);
        }
        if let Some(us) = fsync_us {
            metrics::histogram!(crate::METRIC_WAL_FSYNC_SECONDS).record(us as f64 / 1e6);
        }
        tracing::trace!(
            records,
            bytes = batch_bytes,
            fsync_us,
            periodic_due,
            "keel-engine: WAL group commit"
        );
        if newly_unsynced && io.unsynced && self.periodic.is_some() {
            // Data is now waiting for the periodic fdatasync: make the writer thread time it
            // (it sleeps untimed while nothing is unsynced). Ringing under the queue mutex
            // means the writer is either before its check (and sees `unsynced`) or waiting.
            let _q = self.queue.lock();
            self.doorbell.notify_one();
        }
        shutdown
    }
}

impl Io {
    fn write_batch(
        &mut self,
        first_lsn: u64,
        shared: &WalShared,
    ) -> std::result::Result<(), (&'static str, std::io::Error)> {
        // Roll before the batch would take the segment past its size; a segment holding no
        // record yet takes the batch whatever its size (a batch is never split), so a segment
        // exceeds its size only when one batch alone is larger.
        let has_records = self.file_bytes > record::SEGMENT_HEADER_BYTES as u64;
        let would_exceed = self.file_bytes + self.spare.len() as u64 > self.segment_bytes;
        if has_records && (would_exceed || self.roll_requested) {
            self.roll(first_lsn, shared)?;
        }
        self.roll_requested = false;
        let start = match self.commit_markers {
            true => {
                // Everything durable now was fdatasynced before any byte of this batch was
                // written: recovery may trust the claim (see `scan`).
                let marker = record::CommitMarker {
                    durable_lsn: shared.durable_lsn.load(Ordering::Acquire),
                    first_lsn,
                };
                record::encode_commit_marker(
                    &mut self.spare[..record::COMMIT_MARKER_BYTES],
                    marker,
                );
                0
            }
            false => record::COMMIT_MARKER_BYTES,
        };
        let bytes = &self.spare[start..];
        self.file
            .write_all(bytes)
            .map_err(|e| ("write to the WAL failed", e))?;
        self.file_bytes += bytes.len() as u64;
        shared
            .wal_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Seals the current segment and starts a new one whose first record is `first_lsn`.
    fn roll(
        &mut self,
        first_lsn: u64,
        shared: &WalShared,
    ) -> std::result::Result<(), (&'static str, std::io::Error)> {
        // The sealed segment must be durable before records land in the next one, or recovery
        // could see a later segment after a torn earlier one.
        self.file
            .sync_data()
            .map_err(|e| ("fdatasync of the sealed WAL segment failed", e))?;
        let path = join(&self.dir, &segment_name(first_lsn));
        let mut file = self
            .storage
            .create(&path)
            .map_err(|e| ("creating a WAL segment failed", e))?;
        let header = record::encode_segment_header(first_lsn);
        file.write_all(&header)
            .map_err(|e| ("writing a WAL segment header failed", e))?;
        file.sync_data()
            .map_err(|e| ("fdatasync of a new WAL segment failed", e))?;
        // fsync the directory so the new segment's name survives power loss.
        self.storage
            .sync_dir(&self.dir)
            .map_err(|e| ("fsync of the store directory failed", e))?;
        self.file = file;
        self.file_bytes = header.len() as u64;
        self.commit_markers = true;
        shared
            .wal_bytes
            .fetch_add(header.len() as u64, Ordering::Relaxed);
        shared.segments.fetch_add(1, Ordering::Relaxed);
        shared.active_first_lsn.store(first_lsn, Ordering::Release);
        tracing::debug!(first_lsn, "keel-engine: WAL rolled to a new segment");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_sort_by_lsn_and_parse_back() {
        assert_eq!(segment_name(1), "wal-00000000000000000001.log");
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("wal-1.log"), None);
        assert_eq!(
            parse_segment_name("snapshot-00000000000000000001.snap"),
            None
        );
    }
}

/// Model checks of the group-commit hand-offs: every interleaving (within loom's preemption
/// bound) of appenders, waiters and the WAL writer thread. Run with
/// `RUSTFLAGS="--cfg loom" cargo test -p keel-engine --lib --release loom_`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::storage::FsStorage;

    /// An in-memory segment file whose fdatasync can be made to fail.
    struct MemFile {
        bytes: Arc<Mutex<Vec<u8>>>,
        fail_sync: bool,
    }

    impl WritableFile for MemFile {
        fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
            self.bytes.lock().extend_from_slice(buf);
            Ok(())
        }
        fn sync_data(&mut self) -> std::io::Result<()> {
            if self.fail_sync {
                return Err(std::io::Error::other("injected fdatasync failure"));
            }
            Ok(())
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            self.bytes.lock().truncate(len as usize);
            Ok(())
        }
    }

    /// The LSNs of the records in `bytes`, in order, checking that every batch starts with a
    /// commit marker naming its first record and claiming only earlier LSNs durable.
    fn record_lsns(mut bytes: &[u8]) -> Vec<u64> {
        let mut lsns = Vec::new();
        let mut marker = None;
        while !bytes.is_empty() {
            let (frame, used) = record::decode_frame(bytes).expect("a whole frame");
            match record::commit_marker(&frame).expect("a valid frame") {
                Some(m) => marker = Some(m),
                None => {
                    let m = marker.take();
                    assert!(
                        m.is_some_and(|m| m.first_lsn == frame.lsn) || lsns.last().is_some(),
                        "the first record follows its marker"
                    );
                    lsns.push(frame.lsn);
                }
            }
            bytes = &bytes[used..];
        }
        lsns
    }

    fn start(fail_sync: bool) -> (Wal, Arc<Mutex<Vec<u8>>>) {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let wal = Wal::start(WalStart {
            storage: std::sync::Arc::new(FsStorage),
            dir: PathBuf::from("/nonexistent"),
            file: Box::new(MemFile {
                bytes: Arc::clone(&bytes),
                fail_sync,
            }),
            file_bytes: record::SEGMENT_HEADER_BYTES as u64,
            next_lsn: 1,
            wal_bytes: 0,
            segments: 1,
            segment_bytes: u64::MAX,
            periodic: None,
            active_first_lsn: 1,
            commit_markers: true,
            queue_bytes_max: QUEUE_BYTES_MAX_DEFAULT,
        })
        .expect("start");
        (wal, bytes)
    }

    /// Two writers append and wait for `Immediate`: each wakes only once its record (and every
    /// earlier one) is written and synced, nobody sleeps forever, and shutdown drains.
    #[test]
    fn loom_immediate_waiters_wake_once_durable() {
        loom::model(|| {
            let (wal, bytes) = start(false);
            let handles: Vec<_> = (0..2u8)
                .map(|i| {
                    let shared = Arc::clone(wal.shared());
                    loom::thread::spawn(move || {
                        let key = [i];
                        let lsn = shared
                            .append(0, &[Entry::Delete { key: &key }], Durability::Immediate)
                            .expect("append");
                        shared.wait(lsn, Durability::Immediate).expect("durable");
                        assert!(shared.durable_lsn.load(Ordering::Acquire) >= lsn);
                        lsn
                    })
                })
                .collect();
            let mut lsns: Vec<u64> = handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect();
            lsns.sort_unstable();
            assert_eq!(lsns, vec![1, 2]);
            wal.shutdown().expect("clean shutdown");
            // Both records reached the file, in LSN order.
            assert_eq!(record_lsns(&bytes.lock()), vec![1, 2]);
        });
    }

    /// What `Pending` does as a future: `WalShared::poll` until the record is durable.
    struct Durable<'a> {
        shared: &'a WalShared,
        lsn: u64,
    }

    impl std::future::Future for Durable<'_> {
        type Output = Result<()>;
        fn poll(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<()>> {
            match self
                .shared
                .poll(self.lsn, Durability::Immediate, cx.waker())
            {
                Ok(true) => std::task::Poll::Ready(Ok(())),
                Ok(false) => std::task::Poll::Pending,
                Err(e) => std::task::Poll::Ready(Err(e)),
            }
        }
    }

    /// An async waiter never leads: it registers a waker and relies on the writer thread,
    /// which the append's doorbell must wake (removing that notification deadlocks here).
    #[test]
    fn loom_async_waiter_is_woken_by_the_writer_thread() {
        loom::model(|| {
            let (wal, _) = start(false);
            let shared = Arc::clone(wal.shared());
            let t = loom::thread::spawn(move || {
                let lsn = shared
                    .append(0, &[Entry::Delete { key: b"a" }], Durability::Immediate)
                    .expect("append");
                loom::future::block_on(Durable {
                    shared: &shared,
                    lsn,
                })
                .expect("durable");
                assert!(shared.durable_lsn.load(Ordering::Acquire) >= lsn);
            });
            t.join().expect("join");
            wal.shutdown().expect("clean shutdown");
        });
    }

    /// Two async waiters: a commit hands their wakers off, the writer thread wakes them one at
    /// a time while a woken waiter may take and wake the rest; whichever way it goes, each
    /// is woken once its record is durable and nobody sleeps forever. Preemption bound 2,
    /// whatever `LOOM_MAX_PREEMPTIONS` says: with three threads besides the writer, bound 3
    /// ran for over 20 minutes; bound 2 takes about two.
    #[test]
    fn loom_handed_off_async_waiters_are_all_woken() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(|| {
            let (wal, _) = start(false);
            let handles: Vec<_> = (0..2u8)
                .map(|i| {
                    let shared = Arc::clone(wal.shared());
                    loom::thread::spawn(move || {
                        let key = [i];
                        let lsn = shared
                            .append(0, &[Entry::Delete { key: &key }], Durability::Immediate)
                            .expect("append");
                        loom::future::block_on(Durable {
                            shared: &shared,
                            lsn,
                        })
                        .expect("durable");
                        assert!(shared.durable_lsn.load(Ordering::Acquire) >= lsn);
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("join");
            }
            wal.shutdown().expect("clean shutdown");
        });
    }

    /// A Buffered append never waits, and a later Immediate one still makes both durable.
    #[test]
    fn loom_buffered_then_immediate() {
        loom::model(|| {
            let (wal, _) = start(false);
            let shared = Arc::clone(wal.shared());
            let t = loom::thread::spawn(move || {
                let a = shared
                    .append(0, &[Entry::Delete { key: b"a" }], Durability::Buffered)
                    .expect("append");
                shared
                    .wait(a, Durability::Buffered)
                    .expect("buffered returns at once");
                let b = shared
                    .append(0, &[Entry::Delete { key: b"b" }], Durability::Immediate)
                    .expect("append");
                shared.wait(b, Durability::Immediate).expect("durable");
                assert!(shared.durable_lsn.load(Ordering::Acquire) >= 2);
            });
            t.join().expect("join");
            wal.shutdown().expect("clean shutdown");
        });
    }

    /// A failed fdatasync poisons: every waiter whose record was not durable gets `Poisoned`
    /// (never `Ok`), nobody hangs, and later appends are refused.
    #[test]
    fn loom_failed_sync_wakes_every_waiter_with_poison() {
        loom::model(|| {
            let (wal, _) = start(true);
            let handles: Vec<_> = (0..2u8)
                .map(|i| {
                    let shared = Arc::clone(wal.shared());
                    loom::thread::spawn(move || {
                        let key = [i];
                        match shared.append(
                            0,
                            &[Entry::Delete { key: &key }],
                            Durability::Immediate,
                        ) {
                            Ok(lsn) => {
                                let r = shared.wait(lsn, Durability::Immediate);
                                assert!(matches!(r, Err(Error::Poisoned(_))), "{r:?}");
                            }
                            // The other writer's failed sync may poison the store first.
                            Err(e) => assert!(matches!(e, Error::Poisoned(_)), "{e:?}"),
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("join");
            }
            assert!(matches!(wal.shutdown(), Err(Error::Poisoned(_))));
        });
    }
}
