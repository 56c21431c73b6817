//! What the sled and redb adapters share, so that the two differ only in how they talk to
//! their store: the stored value layout, the semantics of every operation (one pure function
//! from "what is stored now" to "what to store and what to answer"), the trusted clock, the
//! background sweeper, and the async layer that keeps blocking storage calls off the
//! runtime's worker threads. An adapter supplies a [`Store`] (read one key, apply one
//! operation atomically, list a key range, apply one operation to a batch of keys) and gets
//! the whole [`Backend`](keel_primitives::Backend) from [`backend_via_core!`].
//!
//! # Value layout, format 1
//! Every stored value starts with a fixed 9-byte header:
//!
//! ```text
//! offset  size  field
//! 0       1     format version: 1
//! 1       8     absolute expiry, Unix milliseconds, u64 little-endian; 0 = never expires
//! 9       n     the caller's value, byte for byte (n may be 0)
//! ```
//!
//! A stored value shorter than the header, or whose first byte is not a known version, is
//! damaged: reading it is [`ErrorKind::Corruption`], never a panic. A later format takes the
//! next version byte, and readers keep decoding every earlier one.
//!
//! # Expiry
//! Lazy: an entry whose expiry is at or before the trusted clock's now is absent for every
//! operation (`set_nx` and `compare_and_swap(None, ..)` succeed on it, `incr` counts from 0
//! and stamps its create TTL, `scan` skips it). The sweeper, one thread per open store,
//! removes such entries in the background so they stop taking space: every `sweep_interval`
//! it examines the next `sweep_batch` entries of a cursor that walks the whole key space and
//! wraps around, and removes those still expired when it re-reads them, atomically, so an
//! entry rewritten in the meantime is left alone. It holds the store only through a `Weak`
//! between ticks; dropping the backend stops it and waits for the tick in progress (at most
//! one batch).
//!
//! # Time
//! Now is the clock in [`ExpiryOptions`] (the wall clock by default) in Unix milliseconds,
//! floored so that within one process it never goes backwards: a wall clock stepped back
//! cannot resurrect an expired key. Each operation (each attempt, where sled retries) reads it
//! once, after it has read the entry or taken the transaction that makes it atomic.

use std::fmt;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use keel_engine::{Clock, SystemClock};
use keel_primitives::backend::rate;
use keel_primitives::backend::{
    RateMode, RateOutcome, RateRule, SCAN_LIMIT_MAX, check_key, check_value, not_an_integer,
    overflow, parse_i64, ttl_ms,
};
use keel_primitives::{Error, ErrorKind, Result, ScanCursor, ScanPage, Ttl, TtlPolicy};

/// The first byte of every value written by this version.
pub(crate) const FORMAT_VERSION: u8 = 1;
/// Bytes before the caller's value: the version byte and the expiry.
pub(crate) const HEADER_BYTES: usize = 1 + EXPIRY_BYTES;
const EXPIRY_BYTES: usize = 8;
const _: () = assert!(EXPIRY_BYTES == std::mem::size_of::<u64>());

/// How often the sweeper runs by default.
const SWEEP_INTERVAL_DEFAULT: Duration = Duration::from_millis(100);
/// How many entries one sweeper tick examines by default.
const SWEEP_BATCH_DEFAULT: usize = 1_024;
/// The largest batch a sweeper tick may examine: one tick is one bounded piece of work.
const SWEEP_BATCH_MAX: usize = SCAN_LIMIT_MAX;
const _: () = assert!(SWEEP_BATCH_DEFAULT <= SWEEP_BATCH_MAX);

/// How expiry is measured and how expired entries are reclaimed. Shared by the sled and redb
/// adapters.
#[derive(Clone)]
pub struct ExpiryOptions {
    /// Where now comes from, in Unix milliseconds. Default: the wall clock. Whatever it
    /// returns, the backend never lets now go backwards within the process. Tests pass a
    /// `keel_engine::ManualClock` to expire keys without sleeping.
    pub clock: Arc<dyn Clock>,
    /// How long the sweeper waits between ticks. Default: 100 ms. Must be at least 1 ms.
    pub sweep_interval: Duration,
    /// How many entries one sweeper tick examines. Default: 1,024; between 1 and 10,000
    /// (the scan page limit). A full pass over `n` entries takes `n / sweep_batch` ticks.
    pub sweep_batch: usize,
}

impl Default for ExpiryOptions {
    fn default() -> Self {
        ExpiryOptions {
            clock: Arc::new(SystemClock),
            sweep_interval: SWEEP_INTERVAL_DEFAULT,
            sweep_batch: SWEEP_BATCH_DEFAULT,
        }
    }
}

impl fmt::Debug for ExpiryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpiryOptions")
            .field("sweep_interval", &self.sweep_interval)
            .field("sweep_batch", &self.sweep_batch)
            .finish_non_exhaustive()
    }
}

impl ExpiryOptions {
    fn validate(&self) -> Result<()> {
        if self.sweep_interval < Duration::from_millis(1) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "sweep_interval is {:?}; it must be at least 1 ms",
                    self.sweep_interval
                ),
            ));
        }
        if !(1..=SWEEP_BATCH_MAX).contains(&self.sweep_batch) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "sweep_batch is {}; it must be between 1 and {SWEEP_BATCH_MAX}",
                    self.sweep_batch
                ),
            ));
        }
        Ok(())
    }
}

/// A stored value, decoded (see the module docs for the layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored<'a> {
    /// Absolute expiry in Unix milliseconds; 0 = never.
    pub(crate) expires_at_ms: u64,
    /// The caller's value.
    pub(crate) value: &'a [u8],
}

impl<'a> Stored<'a> {
    /// Decodes a stored value. A short value or an unknown version is
    /// [`ErrorKind::Corruption`].
    pub(crate) fn decode(raw: &'a [u8]) -> Result<Self> {
        let Some((&version, rest)) = raw.split_first() else {
            return Err(damaged("it is empty, shorter than the 9-byte header"));
        };
        if version != FORMAT_VERSION {
            return Err(damaged(&format!(
                "its format byte is {version}, and this version reads only format {FORMAT_VERSION}"
            )));
        }
        let Some((expiry, value)) = rest.split_first_chunk::<EXPIRY_BYTES>() else {
            return Err(damaged(&format!(
                "it is {} bytes, shorter than the {HEADER_BYTES}-byte header",
                raw.len()
            )));
        };
        Ok(Stored {
            expires_at_ms: u64::from_le_bytes(*expiry),
            value,
        })
    }

    /// Whether the entry is visible at `now_ms`.
    pub(crate) fn is_live(&self, now_ms: u64) -> bool {
        self.expires_at_ms == 0 || self.expires_at_ms > now_ms
    }

    /// The remaining TTL of a live entry (`None`: never expires).
    fn remaining(&self, now_ms: u64) -> Option<Duration> {
        (self.expires_at_ms != 0).then(|| Duration::from_millis(self.expires_at_ms - now_ms))
    }
}

fn damaged(why: &str) -> Error {
    Error::new(
        ErrorKind::Corruption,
        format!("a stored value is damaged: {why}; restore the store from a backup"),
    )
}

/// Encodes a value with its absolute expiry (0 = never).
pub(crate) fn encode(expires_at_ms: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + value.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&expires_at_ms.to_le_bytes());
    out.extend_from_slice(value);
    debug_assert!(
        Stored::decode(&out).is_ok_and(|s| s.value == value && s.expires_at_ms == expires_at_ms)
    );
    out
}

/// The first bytes of a stored value: enough to decode its expiry without copying the value.
pub(crate) fn head(raw: &[u8]) -> Vec<u8> {
    raw[..raw.len().min(HEADER_BYTES)].to_vec()
}

/// Where a scan starts: just after the cursor if it is inside the prefix's range, else at the
/// prefix itself.
pub(crate) fn scan_start<'a>(prefix: &'a [u8], after: Option<&'a [u8]>) -> Bound<&'a [u8]> {
    match after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix),
    }
}

/// Collects up to `limit` `(key, head)` pairs from an ordered range, stopping at the first
/// key outside `prefix`.
pub(crate) fn collect_heads(
    entries: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>>,
    prefix: &[u8],
    limit: usize,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::with_capacity(limit.min(SCAN_LIMIT_MAX));
    for entry in entries {
        let (key, head) = entry?;
        if !key.starts_with(prefix) {
            break;
        }
        out.push((key, head));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// How a compare-and-swap changes the expiry, with its TTL already validated.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NewTtl {
    Keep,
    After(u64),
    Never,
}

/// One atomic read-modify-write on a single key, with inputs already validated.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Set {
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    },
    SetNx {
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    },
    CompareAndSwap {
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
        ttl: NewTtl,
    },
    CompareAndDelete {
        expected: Vec<u8>,
    },
    Delete,
    Incr {
        delta: i64,
        ttl_ms: Option<u64>,
    },
    Expire {
        ttl_ms: u64,
    },
    Persist,
    /// The sweeper's conditional delete: removes the entry only if it is (still) expired.
    RemoveExpired,
}

/// What an operation does to the stored entry.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Write {
    Nothing,
    Put(Vec<u8>),
    Remove,
}

/// What an operation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    Bool(bool),
    Int(i64),
}

fn after(now_ms: u64, ttl_ms: Option<u64>) -> u64 {
    ttl_ms.map_or(0, |ttl| now_ms.saturating_add(ttl))
}

impl Op {
    /// Decides what to store and what to answer, given the stored bytes (`None`: no entry) and
    /// now. Pure: the store applies the returned write atomically with the read it passed in,
    /// or retries. An error (damaged entry, not an integer, overflow) writes nothing.
    pub(crate) fn apply(&self, current: Option<&[u8]>, now_ms: u64) -> Result<(Write, Outcome)> {
        let live = || -> Result<Option<Stored<'_>>> {
            let stored = current.map(Stored::decode).transpose()?;
            Ok(stored.filter(|s| s.is_live(now_ms)))
        };
        let put = |expires_at_ms: u64, value: &[u8]| Write::Put(encode(expires_at_ms, value));
        let unchanged = |answer: bool| (Write::Nothing, Outcome::Bool(answer));
        Ok(match self {
            // A plain set does not read: it also replaces a damaged entry.
            Op::Set { value, ttl_ms } => (put(after(now_ms, *ttl_ms), value), Outcome::Done),
            Op::SetNx { value, ttl_ms } => match live()? {
                None => (put(after(now_ms, *ttl_ms), value), Outcome::Bool(true)),
                Some(_) => unchanged(false),
            },
            Op::CompareAndSwap { expected, new, ttl } => {
                let live = live()?;
                if live.map(|s| s.value) != expected.as_deref() {
                    return Ok(unchanged(false));
                }
                let expires_at_ms = match ttl {
                    NewTtl::Keep => live.map_or(0, |s| s.expires_at_ms),
                    NewTtl::After(ms) => after(now_ms, Some(*ms)),
                    NewTtl::Never => 0,
                };
                (put(expires_at_ms, new), Outcome::Bool(true))
            }
            Op::CompareAndDelete { expected } => match live()? {
                Some(s) if s.value == expected.as_slice() => (Write::Remove, Outcome::Bool(true)),
                _ => unchanged(false),
            },
            Op::Delete => match live()? {
                Some(_) => (Write::Remove, Outcome::Bool(true)),
                None => unchanged(false),
            },
            Op::Incr { delta, ttl_ms } => match live()? {
                None => {
                    let value = delta.to_string();
                    (
                        put(after(now_ms, *ttl_ms), value.as_bytes()),
                        Outcome::Int(*delta),
                    )
                }
                Some(s) => {
                    let base = parse_i64(s.value).ok_or_else(not_an_integer)?;
                    let next = base.checked_add(*delta).ok_or_else(overflow)?;
                    let value = next.to_string();
                    (put(s.expires_at_ms, value.as_bytes()), Outcome::Int(next))
                }
            },
            Op::Expire { ttl_ms } => match live()? {
                Some(s) => (
                    put(after(now_ms, Some(*ttl_ms)), s.value),
                    Outcome::Bool(true),
                ),
                None => unchanged(false),
            },
            Op::Persist => match live()? {
                Some(s) if s.expires_at_ms != 0 => (put(0, s.value), Outcome::Bool(true)),
                _ => unchanged(false),
            },
            // A damaged entry is left for a human to look at, not swept away.
            Op::RemoveExpired => match current.map(Stored::decode) {
                Some(Ok(s)) if !s.is_live(now_ms) => (Write::Remove, Outcome::Bool(true)),
                _ => unchanged(false),
            },
        })
    }
}

/// The trusted clock: the configured clock, floored so it never goes backwards.
pub(crate) struct TrustedClock {
    source: Arc<dyn Clock>,
    floor_ms: AtomicU64,
}

impl TrustedClock {
    fn new(source: Arc<dyn Clock>) -> Self {
        TrustedClock {
            source,
            floor_ms: AtomicU64::new(0),
        }
    }

    /// Now, in Unix milliseconds, never less than any value returned before.
    pub(crate) fn now_ms(&self) -> u64 {
        let now = self.source.now_ms();
        self.floor_ms.fetch_max(now, Ordering::AcqRel).max(now)
    }
}

/// A key-value store the shared layer runs on. Every method blocks (it may fsync); the shared
/// layer calls them on the blocking thread pool.
pub(crate) trait Store: Send + Sync + 'static {
    /// The backend's name in logs and test output.
    const NAME: &'static str;

    /// The stored bytes of `key`, header included.
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Applies `op` to `key` atomically: the write [`Op::apply`] returns is stored only if
    /// the entry is still what it was given. Reads now from `clock` once per attempt, after
    /// whatever makes the attempt atomic. `durable`: acknowledge only once on disk, whatever
    /// the configured durability.
    fn apply(&self, key: &[u8], op: &Op, clock: &TrustedClock, durable: bool) -> Result<Outcome>;

    /// Applies `op` to each key, each atomically (the sweeper's batch).
    fn apply_each(&self, keys: &[Vec<u8>], op: &Op, clock: &TrustedClock) -> Result<()>;

    /// Reads `keys`' stored bytes and writes the new stored bytes [`decide_raw`] derives from
    /// them, in one transaction (re-run from fresh reads if the store retries it).
    fn update_many<R>(
        &self,
        keys: &[Vec<u8>],
        clock: &TrustedClock,
        decide: &DecideRaw<'_, R>,
    ) -> Result<R>;

    /// Up to `limit` `(key, head)` pairs in key order, for keys starting with `prefix` and
    /// after `after` (see [`scan_start`], [`collect_heads`] and [`head`]).
    fn heads(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
}

/// New stored bytes per key (header included); `None`: leave the key alone.
pub(crate) type RawWrites = Vec<Option<Vec<u8>>>;

/// What a multi-key read-modify-write decides on: the callers' values.
pub(crate) type Updates = Vec<Option<(Vec<u8>, TtlPolicy)>>;

/// The decision of [`Store::update_many`]: from the keys' stored bytes and "now" to their new
/// stored bytes and the caller's result.
pub(crate) type DecideRaw<'a, R> =
    dyn Fn(&[Option<&[u8]>], u64) -> Result<(RawWrites, R)> + Sync + 'a;

/// Runs `decide` on the live values inside `raws` (stored bytes) at `now_ms`, and encodes its
/// writes back into stored bytes with their expiry (a kept TTL is the current entry's).
pub(crate) fn decide_raw<R>(
    raws: &[Option<&[u8]>],
    now_ms: u64,
    decide: impl FnOnce(&[Option<&[u8]>], u64) -> Result<(Updates, R)>,
) -> Result<(RawWrites, R)> {
    let mut stored = Vec::with_capacity(raws.len());
    for raw in raws {
        stored.push(match raw {
            Some(raw) => Some(Stored::decode(raw)?).filter(|s| s.is_live(now_ms)),
            None => None,
        });
    }
    let values: Vec<Option<&[u8]>> = stored.iter().map(|s| s.as_ref().map(|s| s.value)).collect();
    let (updates, result) = decide(&values, now_ms)?;
    let mut writes = Vec::with_capacity(updates.len());
    for (update, current) in updates.into_iter().zip(&stored) {
        writes.push(match update {
            None => None,
            Some((value, ttl)) => {
                check_value(&value)?;
                let expires_at_ms = match ttl {
                    TtlPolicy::Set(ttl) => after(now_ms, Some(ttl_ms(ttl)?)),
                    TtlPolicy::Keep => current.as_ref().map_or(0, |s| s.expires_at_ms),
                    TtlPolicy::Clear => 0,
                };
                Some(encode(expires_at_ms, &value))
            }
        });
    }
    Ok((writes, result))
}

/// Decodes the expiry of a scanned entry: `Some` if it is live.
fn live_key(key: Vec<u8>, head: &[u8], now_ms: u64) -> Result<Option<Vec<u8>>> {
    Ok(Stored::decode(head)?.is_live(now_ms).then_some(key))
}

/// One sweeper tick: examines the next `batch` entries after `cursor` and removes the expired
/// ones. Returns where the next tick starts (`None`: wrap around to the first key).
fn sweep_once<S: Store>(
    store: &S,
    clock: &TrustedClock,
    cursor: Option<&[u8]>,
    batch: usize,
) -> Result<Option<Vec<u8>>> {
    let heads = store.heads(b"", cursor, batch)?;
    let next = (heads.len() >= batch)
        .then(|| heads.last().map(|(key, _)| key.clone()))
        .flatten();
    let now_ms = clock.now_ms();
    let expired: Vec<Vec<u8>> = heads
        .into_iter()
        .filter(|(_, head)| matches!(Stored::decode(head), Ok(s) if !s.is_live(now_ms)))
        .map(|(key, _)| key)
        .collect();
    if !expired.is_empty() {
        store.apply_each(&expired, &Op::RemoveExpired, clock)?;
    }
    Ok(next)
}

#[derive(Default)]
struct SweepState {
    stop: bool,
    ticks: u64,
}

struct SweepSignal {
    state: Mutex<SweepState>,
    changed: Condvar,
}

impl SweepSignal {
    fn lock(&self) -> MutexGuard<'_, SweepState> {
        // The state is two plain fields, valid whatever a panicking holder was doing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The background sweeper thread; stopped and joined on drop.
pub(crate) struct Sweeper {
    signal: Arc<SweepSignal>,
    thread: Option<JoinHandle<()>>,
}

impl Sweeper {
    fn start<S: Store>(
        store: Weak<S>,
        clock: Arc<TrustedClock>,
        interval: Duration,
        batch: usize,
    ) -> Result<Self> {
        let signal = Arc::new(SweepSignal {
            state: Mutex::new(SweepState::default()),
            changed: Condvar::new(),
        });
        let thread_signal = Arc::clone(&signal);
        let thread = std::thread::Builder::new()
            .name(format!("keel-{}-sweeper", S::NAME))
            .spawn(move || sweep_loop(&store, &clock, &thread_signal, interval, batch))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Transient,
                    "could not start the expiry sweeper thread",
                )
                .with_source(e)
            })?;
        Ok(Sweeper {
            signal,
            thread: Some(thread),
        })
    }

    /// Waits until the sweeper has completed `n` more ticks; false on timeout.
    #[cfg(test)]
    pub(crate) fn wait_ticks(&self, n: u64, timeout: Duration) -> bool {
        let state = self.signal.lock();
        let target = state.ticks + n;
        let (state, _) = self
            .signal
            .changed
            .wait_timeout_while(state, timeout, |s| s.ticks < target)
            .unwrap_or_else(PoisonError::into_inner);
        state.ticks >= target
    }
}

fn sweep_loop<S: Store>(
    store: &Weak<S>,
    clock: &TrustedClock,
    signal: &SweepSignal,
    interval: Duration,
    batch: usize,
) {
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        {
            let state = signal.lock();
            let (state, _) = signal
                .changed
                .wait_timeout_while(state, interval, |s| !s.stop)
                .unwrap_or_else(PoisonError::into_inner);
            if state.stop {
                return;
            }
        }
        let Some(store) = store.upgrade() else { return };
        // A failed tick (an I/O error) keeps its cursor and is retried at the next tick; the
        // error itself reaches callers through their own operations on the same store.
        if let Ok(next) = sweep_once(&*store, clock, cursor.as_deref(), batch) {
            cursor = next;
        }
        drop(store);
        signal.lock().ticks += 1;
        signal.changed.notify_all();
    }
}

impl Sweeper {
    /// Stops the thread and waits for it (at most the tick it is in).
    fn stop(&mut self) {
        self.signal.lock().stop = true;
        self.signal.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            // The sweeper never panics by design; if it did, there is nothing left to stop.
            let _ = thread.join();
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        if self.thread.is_some() {
            outside_the_runtime(|| self.stop());
        }
    }
}

/// A [`Store`] with its clock, its sweeper and the async operations of the contract.
///
/// Dropping it stops the sweeper and waits for every storage call still running on the
/// blocking pool (a call whose caller gave up keeps running there until it is done), so when
/// the drop returns the store is closed and can be reopened at once. The wait is at most one
/// storage call; on a multi-threaded Tokio runtime it runs in `block_in_place`, so the
/// runtime's other tasks move to another worker meanwhile.
pub(crate) struct Core<S: Store> {
    // Held for its `Drop`, which stops the thread; declared first so that happens before the
    // store can be dropped.
    #[cfg_attr(not(test), allow(dead_code, reason = "held for its Drop"))]
    pub(crate) sweeper: Sweeper,
    /// `Some` until the drop, which closes the store inside its wait (see above).
    store: Option<Arc<S>>,
    clock: Arc<TrustedClock>,
    in_flight: Arc<InFlight>,
    /// A cancel point for tests: storage calls wait here before they start.
    #[cfg(test)]
    pub(crate) hold: Mutex<Option<Arc<std::sync::Barrier>>>,
}

/// Storage calls running on the blocking pool.
#[derive(Default)]
struct InFlight {
    calls: Mutex<usize>,
    idle: Condvar,
}

/// Counts one call for as long as it lives.
struct CallGuard(Arc<InFlight>);

impl CallGuard {
    fn new(in_flight: &Arc<InFlight>) -> CallGuard {
        *in_flight
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner) += 1;
        CallGuard(Arc::clone(in_flight))
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut calls = self.0.calls.lock().unwrap_or_else(PoisonError::into_inner);
        *calls -= 1;
        if *calls == 0 {
            self.0.idle.notify_all();
        }
    }
}

impl<S: Store> Drop for Core<S> {
    fn drop(&mut self) {
        let in_flight = Arc::clone(&self.in_flight);
        let sweeper = &mut self.sweeper;
        outside_the_runtime(move || {
            sweeper.stop();
            let calls = in_flight
                .calls
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            drop(
                in_flight
                    .idle
                    .wait_while(calls, |n| *n > 0)
                    .unwrap_or_else(PoisonError::into_inner),
            );
        });
    }
}

/// Runs a short blocking wait without stalling a Tokio worker: inside a multi-threaded
/// runtime through `block_in_place` (its tasks move to other workers), elsewhere directly.
fn outside_the_runtime(wait: impl FnOnce()) {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

impl<S: Store> fmt::Debug for Core<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("store", &S::NAME)
            .finish_non_exhaustive()
    }
}

fn bool_outcome(outcome: Outcome) -> Result<bool> {
    match outcome {
        Outcome::Bool(b) => Ok(b),
        other => Err(internal(other)),
    }
}

fn int_outcome(outcome: Outcome) -> Result<i64> {
    match outcome {
        Outcome::Int(n) => Ok(n),
        other => Err(internal(other)),
    }
}

fn internal(outcome: Outcome) -> Error {
    Error::new(
        ErrorKind::Permanent,
        format!(
            "internal error: an operation answered {outcome:?}, which its caller does not expect"
        ),
    )
}

fn join_error(e: tokio::task::JoinError) -> Error {
    let (kind, message) = if e.is_panic() {
        (
            ErrorKind::Permanent,
            "a storage call panicked; whether it wrote is unknown",
        )
    } else {
        (
            ErrorKind::Transient,
            "a storage call was cancelled because the runtime is shutting down; whether it wrote is unknown",
        )
    };
    Error::new(kind, message).with_source(e)
}

impl<S: Store> Core<S> {
    /// Wraps an open store and starts its sweeper.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for invalid [`ExpiryOptions`]; [`ErrorKind::Transient`] if
    /// the sweeper thread cannot be started.
    pub(crate) fn new(store: S, expiry: ExpiryOptions) -> Result<Self> {
        expiry.validate()?;
        let store = Arc::new(store);
        let clock = Arc::new(TrustedClock::new(expiry.clock));
        let sweeper = Sweeper::start(
            Arc::downgrade(&store),
            Arc::clone(&clock),
            expiry.sweep_interval,
            expiry.sweep_batch,
        )?;
        Ok(Core {
            sweeper,
            store: Some(store),
            clock,
            in_flight: Arc::default(),
            #[cfg(test)]
            hold: Mutex::new(None),
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        S::NAME
    }

    /// The store (present until the drop).
    pub(crate) fn store(&self) -> &Arc<S> {
        self.store
            .as_ref()
            .expect("the store is open until the backend is dropped")
    }

    /// Runs a blocking storage call on the runtime's blocking pool, so an fsync never stalls
    /// a worker thread. Outside a Tokio runtime it runs inline.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&S, &TrustedClock) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = Arc::clone(self.store());
        let clock = Arc::clone(&self.clock);
        let guard = CallGuard::new(&self.in_flight);
        #[cfg(test)]
        let hold = self
            .hold
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let job = move || {
            #[cfg(test)]
            if let Some(barrier) = hold {
                barrier.wait();
            }
            let result = call(&store, &clock);
            // The store's last references go before the call stops counting, so a drop
            // waiting for idle finds the store closable.
            drop((store, clock));
            drop(guard);
            result
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime.spawn_blocking(job).await.map_err(join_error)?,
            Err(_) => job(),
        }
    }

    /// The native rate-limit step: the rules' states read, decided and written in one
    /// transaction of the store, on the blocking pool.
    pub(crate) async fn rate_limit(
        &self,
        rules: &[RateRule<'_>],
        mode: RateMode,
        at_ms: Option<u64>,
    ) -> Result<RateOutcome> {
        rate::validate(rules)?;
        for rule in rules {
            check_key(rule.key)?;
        }
        let keys: Vec<Vec<u8>> = rules.iter().map(|r| r.key.to_vec()).collect();
        let owned: Vec<RateRule<'static>> =
            rules.iter().map(|r| RateRule { key: &[], ..*r }).collect();
        self.blocking(move |store, clock| {
            let decide = |states: &[Option<&[u8]>], now_ms: u64| {
                let rules: Vec<RateRule<'_>> = owned
                    .iter()
                    .zip(&keys)
                    .map(|(r, key)| RateRule { key, ..*r })
                    .collect();
                let (outcome, writes) = rate::decide(&rules, states, at_ms.unwrap_or(now_ms), mode);
                let updates = writes
                    .into_iter()
                    .map(|w| {
                        w.map(|w| {
                            let ttl = w.ttl_policy();
                            (w.value, ttl)
                        })
                    })
                    .collect();
                Ok((updates, outcome))
            };
            store.update_many(&keys, clock, &|raws, now_ms| {
                decide_raw(raws, now_ms, decide)
            })
        })
        .await
    }

    async fn apply(&self, key: &[u8], op: Op, durable: bool) -> Result<Outcome> {
        check_key(key)?;
        let key = key.to_vec();
        self.blocking(move |store, clock| store.apply(&key, &op, clock, durable))
            .await
    }

    pub(crate) async fn get_with_ttl(
        &self,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        check_key(key)?;
        let key = key.to_vec();
        self.blocking(move |store, clock| {
            let Some(mut raw) = store.get_raw(&key)? else {
                return Ok(None);
            };
            let now_ms = clock.now_ms();
            let stored = Stored::decode(&raw)?;
            if !stored.is_live(now_ms) {
                return Ok(None);
            }
            let remaining = stored.remaining(now_ms);
            // In range: the value decoded, so it is at least a header long.
            raw.drain(..HEADER_BYTES);
            Ok(Some((raw, remaining)))
        })
        .await
    }

    pub(crate) async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.get_with_ttl(key).await?.map(|(value, _)| value))
    }

    pub(crate) async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        Ok(match self.get_with_ttl(key).await? {
            None => Ttl::Missing,
            Some((_, None)) => Ttl::NoExpiry,
            Some((_, Some(remaining))) => Ttl::Remaining(remaining),
        })
    }

    pub(crate) async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        check_value(value)?;
        let op = Op::Set {
            value: value.to_vec(),
            ttl_ms: ttl.map(ttl_ms).transpose()?,
        };
        self.apply(key, op, false).await.map(|_| ())
    }

    pub(crate) async fn set_nx(
        &self,
        key: &[u8],
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool> {
        check_value(value)?;
        let op = Op::SetNx {
            value: value.to_vec(),
            ttl_ms: ttl.map(ttl_ms).transpose()?,
        };
        bool_outcome(self.apply(key, op, false).await?)
    }

    pub(crate) async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        check_value(new)?;
        let ttl = match ttl {
            TtlPolicy::Keep => NewTtl::Keep,
            TtlPolicy::Set(ttl) => NewTtl::After(ttl_ms(ttl)?),
            TtlPolicy::Clear => NewTtl::Never,
        };
        let op = Op::CompareAndSwap {
            expected: expected.map(<[u8]>::to_vec),
            new: new.to_vec(),
            ttl,
        };
        bool_outcome(self.apply(key, op, false).await?)
    }

    pub(crate) async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        let op = Op::CompareAndDelete {
            expected: expected.to_vec(),
        };
        bool_outcome(self.apply(key, op, false).await?)
    }

    pub(crate) async fn delete(&self, key: &[u8]) -> Result<bool> {
        bool_outcome(self.apply(key, Op::Delete, false).await?)
    }

    pub(crate) async fn incr(
        &self,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
        durable: bool,
    ) -> Result<i64> {
        let op = Op::Incr {
            delta,
            ttl_ms: ttl_on_create.map(ttl_ms).transpose()?,
        };
        int_outcome(self.apply(key, op, durable).await?)
    }

    pub(crate) async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        let op = Op::Expire {
            ttl_ms: ttl_ms(ttl)?,
        };
        bool_outcome(self.apply(key, op, false).await?)
    }

    pub(crate) async fn persist(&self, key: &[u8]) -> Result<bool> {
        bool_outcome(self.apply(key, Op::Persist, false).await?)
    }

    pub(crate) async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        let limit = limit.clamp(1, SCAN_LIMIT_MAX);
        let prefix = prefix.to_vec();
        let after = cursor.map(|c| c.0.clone());
        self.blocking(move |store, clock| {
            let heads = store.heads(&prefix, after.as_deref(), limit)?;
            // A full page may have more after it; a short one reached the end of the prefix.
            // Expired entries count towards the page, so a page may hold fewer live keys.
            let next = (heads.len() >= limit)
                .then(|| heads.last().map(|(key, _)| ScanCursor(key.clone())))
                .flatten();
            let now_ms = clock.now_ms();
            let mut keys = Vec::with_capacity(heads.len());
            for (key, head) in heads {
                keys.extend(live_key(key, &head, now_ms)?);
            }
            Ok(ScanPage { keys, next })
        })
        .await
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// Implements [`Backend`](keel_primitives::Backend) for a type with a `core: Core<_>` field by
/// delegating every method to it.
macro_rules! backend_via_core {
    ($backend:ty) => {
        #[::async_trait::async_trait]
        impl ::keel_primitives::Backend for $backend {
            fn name(&self) -> &str {
                self.core.name()
            }

            async fn get(&self, key: &[u8]) -> ::keel_primitives::Result<Option<Vec<u8>>> {
                self.core.get(key).await
            }

            async fn get_with_ttl(
                &self,
                key: &[u8],
            ) -> ::keel_primitives::Result<Option<(Vec<u8>, Option<::std::time::Duration>)>> {
                self.core.get_with_ttl(key).await
            }

            async fn set(
                &self,
                key: &[u8],
                value: &[u8],
                ttl: Option<::std::time::Duration>,
            ) -> ::keel_primitives::Result<()> {
                self.core.set(key, value, ttl).await
            }

            async fn set_nx(
                &self,
                key: &[u8],
                value: &[u8],
                ttl: Option<::std::time::Duration>,
            ) -> ::keel_primitives::Result<bool> {
                self.core.set_nx(key, value, ttl).await
            }

            async fn compare_and_swap(
                &self,
                key: &[u8],
                expected: Option<&[u8]>,
                new: &[u8],
                ttl: ::keel_primitives::TtlPolicy,
            ) -> ::keel_primitives::Result<bool> {
                self.core.compare_and_swap(key, expected, new, ttl).await
            }

            async fn compare_and_delete(
                &self,
                key: &[u8],
                expected: &[u8],
            ) -> ::keel_primitives::Result<bool> {
                self.core.compare_and_delete(key, expected).await
            }

            async fn delete(&self, key: &[u8]) -> ::keel_primitives::Result<bool> {
                self.core.delete(key).await
            }

            async fn incr(
                &self,
                key: &[u8],
                delta: i64,
                ttl_on_create: Option<::std::time::Duration>,
            ) -> ::keel_primitives::Result<i64> {
                self.core.incr(key, delta, ttl_on_create, false).await
            }

            async fn incr_durable(
                &self,
                key: &[u8],
                delta: i64,
                ttl_on_create: Option<::std::time::Duration>,
            ) -> ::keel_primitives::Result<i64> {
                self.core.incr(key, delta, ttl_on_create, true).await
            }

            async fn expire(
                &self,
                key: &[u8],
                ttl: ::std::time::Duration,
            ) -> ::keel_primitives::Result<bool> {
                self.core.expire(key, ttl).await
            }

            async fn persist(&self, key: &[u8]) -> ::keel_primitives::Result<bool> {
                self.core.persist(key).await
            }

            async fn ttl(&self, key: &[u8]) -> ::keel_primitives::Result<::keel_primitives::Ttl> {
                self.core.ttl(key).await
            }

            async fn scan(
                &self,
                prefix: &[u8],
                cursor: Option<&::keel_primitives::ScanCursor>,
                limit: usize,
            ) -> ::keel_primitives::Result<::keel_primitives::ScanPage> {
                self.core.scan(prefix, cursor, limit).await
            }

            async fn now_ms(&self) -> ::keel_primitives::Result<u64> {
                Ok(self.core.now_ms())
            }

            async fn rate_limit(
                &self,
                rules: &[::keel_primitives::backend::RateRule<'_>],
                mode: ::keel_primitives::backend::RateMode,
                at_ms: Option<u64>,
            ) -> ::keel_primitives::Result<::keel_primitives::backend::RateOutcome> {
                self.core.rate_limit(rules, mode, at_ms).await
            }
        }
    };
}
pub(crate) use backend_via_core;

/// Unit tests of the shared pieces, and checks written once and run by each adapter's tests.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use keel_engine::ManualClock;

    const START_MS: u64 = 1_700_000_000_000;
    const WAIT: Duration = Duration::from_secs(30);

    fn manual(sweep_interval: Duration, sweep_batch: usize) -> (ManualClock, ExpiryOptions) {
        let clock = ManualClock::new(START_MS);
        let options = ExpiryOptions {
            clock: Arc::new(clock.clone()),
            sweep_interval,
            sweep_batch,
        };
        (clock, options)
    }

    fn kind<T: fmt::Debug>(r: Result<T>) -> ErrorKind {
        match r {
            Ok(v) => panic!("expected an error, got Ok({v:?})"),
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn header_round_trips() {
        for (expires_at_ms, value) in [(0, &b""[..]), (u64::MAX, b"\x00\xff"), (START_MS, b"v")] {
            let raw = encode(expires_at_ms, value);
            assert_eq!(raw.len(), HEADER_BYTES + value.len());
            assert_eq!(raw[0], FORMAT_VERSION);
            assert_eq!(raw[1..HEADER_BYTES], expires_at_ms.to_le_bytes());
            let stored = Stored::decode(&raw).expect("decodes");
            assert_eq!(
                stored,
                Stored {
                    expires_at_ms,
                    value
                }
            );
            let head = head(&raw);
            assert_eq!(
                Stored::decode(&head).expect("head decodes").expires_at_ms,
                expires_at_ms
            );
        }
    }

    #[test]
    fn damaged_header_is_a_corruption_error_not_a_panic() {
        let valid = encode(START_MS, b"value");
        for len in 0..HEADER_BYTES {
            assert_eq!(
                kind(Stored::decode(&valid[..len])),
                ErrorKind::Corruption,
                "{len} bytes"
            );
        }
        for version in [0, 2, 0xff] {
            let mut other = valid.clone();
            other[0] = version;
            assert_eq!(
                kind(Stored::decode(&other)),
                ErrorKind::Corruption,
                "version {version}"
            );
        }
    }

    #[test]
    fn expiry_is_exclusive_of_now() {
        let stored = Stored {
            expires_at_ms: START_MS,
            value: b"",
        };
        assert!(stored.is_live(START_MS - 1));
        assert!(!stored.is_live(START_MS));
        assert!(
            Stored {
                expires_at_ms: 0,
                value: b""
            }
            .is_live(u64::MAX)
        );
    }

    #[test]
    fn failed_incr_writes_nothing() {
        let stored = encode(0, b"not a number");
        let op = Op::Incr {
            delta: 1,
            ttl_ms: None,
        };
        assert_eq!(
            kind(op.apply(Some(&stored), START_MS)),
            ErrorKind::NotAnInteger
        );
        let max = encode(0, i64::MAX.to_string().as_bytes());
        assert_eq!(kind(op.apply(Some(&max), START_MS)), ErrorKind::Overflow);
    }

    #[test]
    fn remove_expired_spares_live_and_damaged_entries() {
        let op = Op::RemoveExpired;
        let live = encode(START_MS + 1, b"v");
        assert_eq!(
            op.apply(Some(&live), START_MS).expect("ok").0,
            Write::Nothing
        );
        let damaged = [FORMAT_VERSION, 1, 2];
        assert_eq!(
            op.apply(Some(&damaged), START_MS).expect("ok").0,
            Write::Nothing
        );
        assert_eq!(op.apply(None, START_MS).expect("ok").0, Write::Nothing);
        let expired = encode(START_MS, b"v");
        assert_eq!(
            op.apply(Some(&expired), START_MS).expect("ok").0,
            Write::Remove
        );
    }

    #[test]
    fn trusted_clock_never_goes_backwards() {
        let manual = ManualClock::new(START_MS);
        let clock = TrustedClock::new(Arc::new(manual.clone()));
        assert_eq!(clock.now_ms(), START_MS);
        manual.set_ms(START_MS - 5_000);
        assert_eq!(clock.now_ms(), START_MS);
        manual.set_ms(START_MS + 1);
        assert_eq!(clock.now_ms(), START_MS + 1);
    }

    #[test]
    fn invalid_sweep_options_are_refused() {
        let (_, zero_interval) = manual(Duration::ZERO, 1);
        assert_eq!(kind(zero_interval.validate()), ErrorKind::InvalidInput);
        let (_, zero_batch) = manual(Duration::from_secs(1), 0);
        assert_eq!(kind(zero_batch.validate()), ErrorKind::InvalidInput);
        let (_, huge_batch) = manual(Duration::from_secs(1), SWEEP_BATCH_MAX + 1);
        assert_eq!(kind(huge_batch.validate()), ErrorKind::InvalidInput);
    }

    /// The background sweeper physically removes expired entries, across several ticks of a
    /// small batch, and leaves live ones.
    pub(crate) async fn sweeper_removes_expired_entries<S: Store>(
        open: impl FnOnce(ExpiryOptions) -> Result<Core<S>>,
    ) {
        let (clock, options) = manual(Duration::from_millis(1), 2);
        let core = open(options).expect("open");
        let short: Vec<Vec<u8>> = (0..5).map(|i| format!("short/{i}").into_bytes()).collect();
        for key in &short {
            core.set(key, b"v", Some(Duration::from_secs(1)))
                .await
                .expect("set");
        }
        core.set(b"long", b"v", Some(Duration::from_secs(3_600)))
            .await
            .expect("set");
        core.set(b"forever", b"v", None).await.expect("set");
        assert!(
            core.sweeper.wait_ticks(10, WAIT),
            "the sweeper is not ticking"
        );
        for key in &short {
            assert!(
                core.store().get_raw(key).expect("read").is_some(),
                "swept a live entry"
            );
        }
        clock.advance(Duration::from_secs(2));
        // 7 entries in batches of 2 take 4 ticks a pass; wait for more than two passes.
        assert!(
            core.sweeper.wait_ticks(10, WAIT),
            "the sweeper is not ticking"
        );
        for key in &short {
            assert_eq!(core.store().get_raw(key).expect("read"), None, "not swept");
        }
        assert!(core.store().get_raw(b"long").expect("read").is_some());
        assert!(core.store().get_raw(b"forever").expect("read").is_some());
    }

    /// The sweeper's delete is conditional: an entry it saw expired but that was rewritten
    /// before its delete ran is kept.
    pub(crate) async fn sweeper_keeps_an_entry_rewritten_after_it_looked<S: Store>(
        open: impl FnOnce(ExpiryOptions) -> Result<Core<S>>,
    ) {
        // The background sweeper stays asleep; this test plays its two steps by hand.
        let (clock, options) = manual(Duration::from_secs(3_600), SWEEP_BATCH_DEFAULT);
        let core = open(options).expect("open");
        let ttl = Some(Duration::from_secs(1));
        core.set(b"rewritten", b"old", ttl).await.expect("set");
        core.set(b"stale", b"old", ttl).await.expect("set");
        clock.advance(Duration::from_secs(2));
        let now_ms = core.clock.now_ms();
        let heads = core
            .store()
            .heads(b"", None, SWEEP_BATCH_DEFAULT)
            .expect("heads");
        let expired: Vec<Vec<u8>> = heads
            .into_iter()
            .filter(|(_, head)| !Stored::decode(head).expect("decodes").is_live(now_ms))
            .map(|(key, _)| key)
            .collect();
        assert_eq!(expired, vec![b"rewritten".to_vec(), b"stale".to_vec()]);
        core.set(b"rewritten", b"new", None).await.expect("set");
        core.store()
            .apply_each(&expired, &Op::RemoveExpired, &core.clock)
            .expect("sweep");
        assert_eq!(
            core.get(b"rewritten").await.expect("get"),
            Some(b"new".to_vec())
        );
        assert_eq!(core.store().get_raw(b"stale").expect("read"), None);
    }

    /// Reading a damaged value is a typed error on every path that decodes it; a plain `set`
    /// replaces it.
    pub(crate) async fn damaged_value_is_a_corruption_error<S: Store>(
        core: &Core<S>,
        put_raw: impl Fn(&Core<S>, &[u8], &[u8]),
    ) {
        let key = b"damaged";
        let mut other_version = encode(0, b"v");
        other_version[0] = FORMAT_VERSION + 1;
        for raw in [&b""[..], &[FORMAT_VERSION, 0, 0], &other_version] {
            put_raw(core, key, raw);
            assert_eq!(kind(core.get(key).await), ErrorKind::Corruption, "{raw:?}");
            assert_eq!(kind(core.ttl(key).await), ErrorKind::Corruption, "{raw:?}");
            assert_eq!(
                kind(core.incr(key, 1, None, false).await),
                ErrorKind::Corruption
            );
            assert_eq!(kind(core.scan(b"", None, 10).await), ErrorKind::Corruption);
            assert_eq!(
                core.store().get_raw(key).expect("read").as_deref(),
                Some(raw)
            );
        }
        core.set(key, b"fresh", None)
            .await
            .expect("set replaces a damaged value");
        assert_eq!(core.get(key).await.expect("get"), Some(b"fresh".to_vec()));
    }

    /// Dropping the backend stops its sweeper and releases the store, so it reopens at once
    /// with its data.
    pub(crate) async fn reopen_after_drop_keeps_data<S: Store>(open: impl Fn() -> Result<Core<S>>) {
        let core = open().expect("open");
        core.set(b"k", b"v", None).await.expect("set");
        drop(core);
        let core = open().expect("reopen after drop");
        assert_eq!(core.get(b"k").await.expect("get"), Some(b"v".to_vec()));
    }

    /// A call whose caller gave up while it ran on the blocking pool does not keep the store
    /// open after the backend is dropped: the drop waits for it, so a reopen right after
    /// succeeds. The call is held at a cancel point inside the blocking job; it is released
    /// once the drop has had the chance to return early (which it must not).
    pub(crate) async fn cancelled_call_then_drop_releases_the_store<S: Store>(
        open: impl Fn() -> Result<Core<S>>,
    ) {
        let core = Arc::new(open().expect("open"));
        let barrier = Arc::new(std::sync::Barrier::new(2));
        *core.hold.lock().unwrap() = Some(Arc::clone(&barrier));
        let caller = Arc::clone(&core);
        let task = tokio::spawn(async move { caller.set(b"k", b"v", None).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while *core.in_flight.calls.lock().unwrap() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the call never started"
            );
            tokio::task::yield_now().await;
        }
        task.abort();
        assert!(task.await.is_err(), "the caller was cancelled");
        *core.hold.lock().unwrap() = None;
        let core = Arc::into_inner(core).expect("the cancelled caller let go of the backend");
        let (reopened_tx, reopened_rx) = std::sync::mpsc::channel::<()>();
        let releaser = std::thread::spawn(move || {
            // A drop that waits never lets the reopen happen first: release after a bound.
            let _ = reopened_rx.recv_timeout(Duration::from_millis(300));
            barrier.wait();
        });
        drop(core);
        let reopened = open();
        let _ = reopened_tx.send(());
        releaser.join().unwrap();
        let core = reopened.expect("reopen right after the drop");
        assert_eq!(core.get(b"k").await.expect("get"), Some(b"v".to_vec()));
    }

    /// A second open of an open store is [`ErrorKind::Locked`].
    pub(crate) fn opening_twice_is_locked<S: Store>(open: impl Fn() -> Result<Core<S>>) {
        let _first = open().expect("first open");
        assert_eq!(kind(open()), ErrorKind::Locked);
    }

    /// The shared checks as tests of the calling adapter's test module, which defines
    /// `fn open(dir: &Path, expiry: ExpiryOptions) -> Result<Core<_>>` and
    /// `fn put_raw(core: &Core<_>, key: &[u8], raw: &[u8])` (writes stored bytes as they are).
    macro_rules! store_tests {
        () => {
            use $crate::embedded_common::tests as shared;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sweeper_removes_expired_entries() {
                let dir = tempfile::tempdir().expect("tempdir");
                shared::sweeper_removes_expired_entries(|expiry| open(dir.path(), expiry)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sweeper_keeps_an_entry_rewritten_after_it_looked() {
                let dir = tempfile::tempdir().expect("tempdir");
                let open_in_dir = |expiry| open(dir.path(), expiry);
                shared::sweeper_keeps_an_entry_rewritten_after_it_looked(open_in_dir).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn damaged_value_is_a_corruption_error() {
                let dir = tempfile::tempdir().expect("tempdir");
                let core = open(dir.path(), ExpiryOptions::default()).expect("open");
                shared::damaged_value_is_a_corruption_error(&core, put_raw).await;
            }

            #[test]
            fn opening_an_open_store_is_locked() {
                let dir = tempfile::tempdir().expect("tempdir");
                shared::opening_twice_is_locked(|| open(dir.path(), ExpiryOptions::default()));
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cancelled_call_then_drop_releases_the_store() {
                let dir = tempfile::tempdir().expect("tempdir");
                let open_in_dir = || open(dir.path(), ExpiryOptions::default());
                shared::cancelled_call_then_drop_releases_the_store(open_in_dir).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropping_the_backend_stops_the_sweeper_and_keeps_the_data() {
                let dir = tempfile::tempdir().expect("tempdir");
                let open_in_dir = || open(dir.path(), ExpiryOptions::default());
                shared::reopen_after_drop_keeps_data(open_in_dir).await;
            }
        };
    }
    pub(crate) use store_tests;
}
