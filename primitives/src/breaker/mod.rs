//! A circuit breaker: stops calling a dependency that keeps failing, lets exactly N probe
//! calls through after a pause, and closes again when they succeed.
//!
//! States: **closed** (calls pass; outcomes are counted) → **open** (calls are rejected at
//! once, for an open duration that grows with exponential backoff and jitter between
//! consecutive trips) → **half-open** (exactly [`BreakerBuilder::probes`] probe calls are
//! admitted; all succeeding closes the breaker, any failing re-opens it) → closed. An operator
//! can also force it open or closed, and reset it.
//!
//! What trips it is a list of [`Policy`]s (any one trips): consecutive failures, failure rate
//! over the last N calls or over a time window, and the rate of slow calls; rates wait for a
//! minimum number of calls. What a failure is, the caller decides: [`Breaker::call`] counts
//! `Err` as a failure, [`Breaker::call_classified`] takes a classifier (5xx and timeouts are
//! failures, 4xx are not), and the guard API ([`Breaker::acquire`] → [`Permit`]) lets code
//! report [`Outcome`]s itself.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::time::Duration;
//! use keel_primitives::breaker::{Breaker, CallError, Policy, State};
//!
//! let breaker = Breaker::builder("payments")
//!     .policy(Policy::ConsecutiveFailures(3))
//!     .open_duration(Duration::from_secs(5))
//!     .build()?;
//! for _ in 0..3 {
//!     let r = breaker.call(|| async { Err::<(), _>("503 from upstream") }).await;
//!     assert!(matches!(r, Err(CallError::Inner("503 from upstream"))));
//! }
//! assert_eq!(breaker.state(), State::Open);
//! let r = breaker.call(|| async { Ok::<_, &str>("never runs") }).await;
//! assert!(matches!(r, Err(CallError::Rejected(_))));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Local and shared mode
//! A breaker built without a backend is **local**: its whole state is one packed `AtomicU64`
//! (state, generation, deadline) changed by compare-and-swap, plus atomic windows, so the hot
//! path takes no lock. With [`BreakerBuilder::shared`] the state machine lives in the backend
//! (see [`shared`](self::shared) for its keys and algorithm): one replica tripping opens the
//! breaker for all, and half-open probes are leases in the backend, so exactly N run across the
//! fleet. Each replica keeps a local view refreshed every [`BreakerBuilder::refresh_interval`],
//! so a closed breaker costs no backend call per call. If the backend fails, the breaker falls
//! back to local mode, says so ([`Breaker::mode`], a `tracing` warning) and returns to shared
//! mode once the backend answers a refresh again.
//!
//! # Generations
//! Every transition bumps a generation. A permit remembers the generation that admitted it; an
//! outcome reported for an older generation (a call that started before a trip, a probe that
//! outlived its lease) is counted in the metrics but changes no state.
//!
//! # Probes that never finish
//! A probe permit dropped without an outcome (its future was cancelled) frees its slot at once,
//! so another caller can probe. A probe that hangs holds its slot for at most
//! [`BreakerBuilder::probe_timeout`]; after that the slot can be taken again. Neither wedges
//! the breaker in half-open.
//!
//! # Clock
//! Open deadlines, time windows and slow calls are measured with an injectable
//! [`Clock`](crate::ratelimit::Clock) (the system clock by default; a
//! [`ManualClock`](crate::ratelimit::ManualClock) in tests). In shared mode each replica
//! compares the shared open deadline against its own clock, so clock skew between replicas
//! shifts when each sees the pause end; probe admission is still exactly N fleet-wide because
//! it goes through the backend.

#[cfg(feature = "http")]
pub mod layer;
pub(crate) mod shared;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use keel_engine::{Clock, SystemClock};

use crate::backend::Backend;

/// Default open duration of the first trip.
pub const OPEN_DURATION_DEFAULT: Duration = Duration::from_secs(30);
/// Default cap on the open duration after backoff.
pub const OPEN_DURATION_MAX_DEFAULT: Duration = Duration::from_secs(300);
/// Default factor by which the open duration grows with each consecutive trip.
pub const BACKOFF_FACTOR_DEFAULT: u32 = 2;
/// Default jitter: the open duration is scaled by a random factor in `1 ± 0.1`.
pub const JITTER_DEFAULT: f64 = 0.1;
/// Default number of half-open probes.
pub const PROBES_DEFAULT: u32 = 1;
/// Most half-open probes.
pub const PROBES_MAX: u32 = 64;
/// Default time a probe may run before its slot can be taken again.
pub const PROBE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Default interval at which a shared breaker refreshes its local view.
pub const REFRESH_INTERVAL_DEFAULT: Duration = Duration::from_millis(500);
/// Largest count window (calls), bounding the ring's memory.
pub const WINDOW_CALLS_MAX: u32 = 100_000;
/// Buckets of a local time window.
const TIME_BUCKETS: u64 = 10;
/// Longest breaker name, in bytes (its keys must stay under the key limit).
pub const NAME_BYTES_MAX: usize = 200;

const _: () = assert!(PROBES_DEFAULT >= 1 && PROBES_DEFAULT <= PROBES_MAX);

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Calls pass and their outcomes are counted.
    Closed,
    /// Calls are rejected until the open duration ends.
    Open,
    /// Up to N probe calls pass; the rest are rejected.
    HalfOpen,
    /// Forced open by an operator: every call is rejected until [`Breaker::reset`].
    ForcedOpen,
    /// Forced closed by an operator: every call passes and nothing trips it until
    /// [`Breaker::reset`].
    ForcedClosed,
}

impl State {
    fn code(self) -> u64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
            State::ForcedOpen => 3,
            State::ForcedClosed => 4,
        }
    }

    fn from_code(code: u64) -> State {
        match code {
            1 => State::Open,
            2 => State::HalfOpen,
            3 => State::ForcedOpen,
            4 => State::ForcedClosed,
            _ => State::Closed,
        }
    }

    /// One letter, as stored in the backend.
    pub(crate) fn letter(self) -> char {
        match self {
            State::Closed => 'C',
            State::Open => 'O',
            State::HalfOpen => 'H',
            State::ForcedOpen => 'F',
            State::ForcedClosed => 'D',
        }
    }

    pub(crate) fn from_letter(c: char) -> Option<State> {
        Some(match c {
            'C' => State::Closed,
            'O' => State::Open,
            'H' => State::HalfOpen,
            'F' => State::ForcedOpen,
            'D' => State::ForcedClosed,
            _ => return None,
        })
    }
}

impl State {
    /// The state's name (`closed`, `open`, `half-open`, `forced-open`, `forced-closed`): its
    /// `Display` and the `from`/`to` labels of `keel_breaker_transitions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
            State::ForcedOpen => "forced-open",
            State::ForcedClosed => "forced-closed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the breaker's state lives right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// In this process only.
    Local,
    /// In the backend, shared by every replica using the same name.
    Shared,
    /// Configured as shared, but the backend failed: running on the local view until a
    /// refresh reaches the backend again.
    LocalFallback,
}

/// A window over which a rate is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last N calls (locally a sliding window; shared, tumbling windows of N calls).
    Calls(u32),
    /// The last period of time (locally 10 sliding buckets; shared, tumbling windows).
    Time(Duration),
}

/// What trips the breaker. Several can be given; any one trips it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Policy {
    /// This many failures in a row (a success resets the count).
    ConsecutiveFailures(u32),
    /// At least `percent`% of the calls in `window` failed, once it holds `min_calls` calls.
    FailureRate {
        /// Threshold, 1 to 100.
        percent: u8,
        /// The window.
        window: Window,
        /// Calls the window must hold before the rate counts.
        min_calls: u32,
    },
    /// At least `percent`% of the calls in `window` took `threshold` or longer.
    SlowCallRate {
        /// A call this slow or slower is slow (whatever its outcome).
        threshold: Duration,
        /// Threshold, 1 to 100.
        percent: u8,
        /// The window.
        window: Window,
        /// Calls the window must hold before the rate counts.
        min_calls: u32,
    },
}

/// What a call's result means to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The dependency worked.
    Success,
    /// The dependency failed (a 5xx, a timeout, a refused connection).
    Failure,
    /// Says nothing about the dependency (a 4xx, a cancelled request): not counted.
    Ignored,
}

/// A state change, as given to the [`BreakerBuilder::on_state_change`] callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateChange {
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
}

/// Counters since the breaker was built (this instance only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Calls admitted.
    pub calls: u64,
    /// Admitted calls that succeeded.
    pub successes: u64,
    /// Admitted calls that failed.
    pub failures: u64,
    /// Admitted calls that were slow.
    pub slow: u64,
    /// Calls rejected because the breaker was open (or half-open with every probe taken).
    pub rejected: u64,
}

/// A call the breaker refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker {name:?} is {state}; retry after {retry_after:?}")]
pub struct Rejected {
    /// The breaker's name.
    pub name: String,
    /// Its state when it refused.
    pub state: State,
    /// How long until it may admit a probe (zero when half-open with every probe taken, or
    /// forced open).
    pub retry_after: Duration,
}

/// The error of [`Breaker::call`].
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The breaker refused the call; the function did not run.
    #[error(transparent)]
    Rejected(Rejected),
    /// The function ran and failed.
    #[error("{0}")]
    Inner(E),
}

/// A configuration the builder refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid circuit breaker configuration: {0}")]
pub struct ConfigError(String);

type Callback = Arc<dyn Fn(StateChange) + Send + Sync>;

/// Builds a [`Breaker`]; every setting is checked once, in [`build`](Self::build).
pub struct BreakerBuilder {
    name: String,
    policies: Vec<Policy>,
    open_duration: Duration,
    open_duration_max: Duration,
    backoff_factor: u32,
    jitter: f64,
    probes: u32,
    probe_timeout: Duration,
    refresh_interval: Duration,
    clock: Arc<dyn Clock>,
    backend: Option<Arc<dyn Backend>>,
    callbacks: Vec<Callback>,
}

impl BreakerBuilder {
    /// Adds a trip policy (default when none is given: 5 consecutive failures).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policies.push(policy);
        self
    }

    /// The open duration of the first trip (default [`OPEN_DURATION_DEFAULT`]).
    pub fn open_duration(mut self, d: Duration) -> Self {
        self.open_duration = d;
        self
    }

    /// The cap on the open duration after backoff (default [`OPEN_DURATION_MAX_DEFAULT`]).
    pub fn open_duration_max(mut self, d: Duration) -> Self {
        self.open_duration_max = d;
        self
    }

    /// Growth factor of the open duration per consecutive trip (default 2; 1 disables backoff).
    pub fn backoff_factor(mut self, factor: u32) -> Self {
        self.backoff_factor = factor;
        self
    }

    /// Jitter as a fraction in `0.0..=0.5`: the open duration is scaled by a random factor in
    /// `1 ± jitter` (default [`JITTER_DEFAULT`]; 0 for none).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Probe calls admitted in half-open, 1 to [`PROBES_MAX`] (default 1).
    pub fn probes(mut self, n: u32) -> Self {
        self.probes = n;
        self
    }

    /// How long a probe may run before its slot is given to another caller (default
    /// [`PROBE_TIMEOUT_DEFAULT`]).
    pub fn probe_timeout(mut self, d: Duration) -> Self {
        self.probe_timeout = d;
        self
    }

    /// How often a shared breaker refreshes its local view (default
    /// [`REFRESH_INTERVAL_DEFAULT`]). Ignored in local mode.
    pub fn refresh_interval(mut self, d: Duration) -> Self {
        self.refresh_interval = d;
        self
    }

    /// The clock (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Shares the breaker's state through `backend` with every replica using the same name.
    pub fn shared(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Calls `f` on every state change this instance makes or observes. Keep it short: it runs
    /// on the caller's task.
    pub fn on_state_change(mut self, f: impl Fn(StateChange) + Send + Sync + 'static) -> Self {
        self.callbacks.push(Arc::new(f));
        self
    }

    /// The breaker.
    ///
    /// # Errors
    /// [`ConfigError`] for an empty or too long name, a zero open duration or probe timeout,
    /// a cap below the open duration, a backoff factor of 0, jitter outside `0.0..=0.5`, a
    /// probe count outside 1..=[`PROBES_MAX`], a percentage outside 1..=100, or a count window
    /// of 0 or over [`WINDOW_CALLS_MAX`] calls, a zero time window or threshold.
    pub fn build(mut self) -> Result<Breaker, ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.name.is_empty() || self.name.len() > NAME_BYTES_MAX {
            return bad(format!("the name must be 1 to {NAME_BYTES_MAX} bytes"));
        }
        if self.open_duration.is_zero() || self.probe_timeout.is_zero() {
            return bad("the open duration and probe timeout must be positive".into());
        }
        if self.open_duration_max < self.open_duration {
            return bad("the maximum open duration is below the open duration".into());
        }
        if self.backoff_factor == 0 {
            return bad("the backoff factor must be at least 1".into());
        }
        if !(0.0..=0.5).contains(&self.jitter) {
            return bad(format!("jitter {} is outside 0.0..=0.5", self.jitter));
        }
        if self.probes == 0 || self.probes > PROBES_MAX {
            return bad(format!("probes must be 1 to {PROBES_MAX}"));
        }
        if self.refresh_interval.is_zero() {
            return bad("the refresh interval must be positive".into());
        }
        if self.policies.is_empty() {
            self.policies.push(Policy::ConsecutiveFailures(5));
        }
        let mut tracked = Vec::new();
        for p in &self.policies {
            let window = match *p {
                Policy::ConsecutiveFailures(0) => {
                    return bad("consecutive failures must be at least 1".into());
                }
                Policy::ConsecutiveFailures(_) => None,
                Policy::FailureRate {
                    percent, window, ..
                } => Some((percent, window, None)),
                Policy::SlowCallRate {
                    threshold,
                    percent,
                    window,
                    ..
                } => {
                    if threshold.is_zero() {
                        return bad("the slow-call threshold must be positive".into());
                    }
                    Some((percent, window, Some(threshold)))
                }
            };
            if let Some((percent, window, _)) = window {
                if !(1..=100).contains(&percent) {
                    return bad(format!("percentage {percent} is outside 1..=100"));
                }
                match window {
                    Window::Calls(n) if n == 0 || n > WINDOW_CALLS_MAX => {
                        return bad(format!("a count window must be 1 to {WINDOW_CALLS_MAX}"));
                    }
                    Window::Time(d) if d.as_millis() < TIME_BUCKETS as u128 => {
                        return bad(format!("a time window must be at least {TIME_BUCKETS} ms"));
                    }
                    _ => {}
                }
            }
            tracked.push(Tracked {
                policy: *p,
                stats: window.map(|(_, w, _)| Stats::new(w)),
            });
        }
        let probe_slots = (0..self.probes).map(|_| AtomicU64::new(0)).collect();
        let times_calls = self
            .policies
            .iter()
            .any(|p| matches!(p, Policy::SlowCallRate { .. }));
        let needs_now_to_record = self.policies.iter().any(|p| {
            matches!(
                p,
                Policy::FailureRate {
                    window: Window::Time(_),
                    ..
                } | Policy::SlowCallRate {
                    window: Window::Time(_),
                    ..
                }
            )
        });
        let shared = self.backend.map(|b| shared::Shared::new(b, &self.name));
        let inner = Inner {
            name: self.name,
            tracked,
            open_duration: self.open_duration,
            open_duration_max: self.open_duration_max,
            backoff_factor: self.backoff_factor,
            jitter: self.jitter,
            probes: self.probes,
            times_calls,
            needs_now_to_record,
            probe_timeout: self.probe_timeout,
            refresh_interval: self.refresh_interval,
            clock: self.clock,
            callbacks: self.callbacks,
            word: AtomicU64::new(pack(State::Closed, 0, 0)),
            trips: AtomicU32::new(0),
            consecutive: AtomicU32::new(0),
            probe_slots,
            probe_ok: AtomicU64::new(0),
            counters: Counters::default(),
            shared,
        };
        Ok(Breaker {
            inner: Arc::new(inner),
        })
    }
}

/// A circuit breaker. Cheap to clone (an `Arc` inside); clones share one state.
#[derive(Clone)]
pub struct Breaker {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.inner.name)
            .field("state", &self.state())
            .field("mode", &self.mode())
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) name: String,
    tracked: Vec<Tracked>,
    open_duration: Duration,
    open_duration_max: Duration,
    backoff_factor: u32,
    jitter: f64,
    pub(crate) probes: u32,
    /// A slow-call policy exists: calls are timed.
    times_calls: bool,
    /// A time window exists: recording any outcome needs the time.
    needs_now_to_record: bool,
    pub(crate) probe_timeout: Duration,
    pub(crate) refresh_interval: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    callbacks: Vec<Callback>,
    /// The local state (or the local view of the shared one): see [`pack`].
    word: AtomicU64,
    /// Consecutive trips, for backoff; reset when the breaker closes.
    trips: AtomicU32,
    consecutive: AtomicU32,
    /// One per probe: 0 free, else `gen_tag << 48 | deadline_ms` (deadline `DONE` once the
    /// probe reported success, so its slot is not handed out again in this generation).
    probe_slots: Box<[AtomicU64]>,
    /// `gen << 32 | successful probes` of the current half-open generation.
    probe_ok: AtomicU64,
    counters: Counters,
    pub(crate) shared: Option<shared::Shared>,
}

struct Tracked {
    policy: Policy,
    stats: Option<Stats>,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    slow: AtomicU64,
    rejected: AtomicU64,
}

// The packed state word: deadline_ms (48 bits) << 16 | generation (13 bits) << 3 | state (3).
// Generations wrap; they only have to differ between neighbouring transitions, and every
// transition compares the whole word.
const GEN_BITS: u32 = 13;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const DEADLINE_MASK: u64 = (1 << 48) - 1;
/// A probe slot's deadline once its probe succeeded.
const DONE: u64 = DEADLINE_MASK;

fn pack(state: State, generation: u64, deadline_ms: u64) -> u64 {
    (deadline_ms.min(DEADLINE_MASK) << 16) | ((generation & GEN_MASK) << 3) | state.code()
}

fn unpack(word: u64) -> (State, u64, u64) {
    (
        State::from_code(word & 0b111),
        (word >> 3) & GEN_MASK,
        word >> 16,
    )
}

/// Permission to make one call. Report its outcome with [`Permit::record`] (or the
/// `success`/`failure` shorthands). Dropped without a report, it counts as nothing and, if it
/// was a half-open probe, frees the probe slot at once.
#[must_use = "a permit reports its call's outcome; dropping it counts as nothing"]
pub struct Permit {
    breaker: Breaker,
    kind: PermitKind,
    started_ms: u64,
    reported: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum PermitKind {
    /// Admitted while closed, in this generation.
    Normal { generation: u64 },
    /// Admitted while forced closed: counted in metrics only.
    Forced,
    /// A local half-open probe in slot `slot` holding `value`.
    LocalProbe {
        generation: u64,
        slot: usize,
        value: u64,
    },
    /// A shared half-open probe holding lease `key` with `nonce`.
    SharedProbe {
        generation: u64,
        key: Vec<u8>,
        nonce: [u8; 16],
    },
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("kind", &self.kind).finish()
    }
}

impl Permit {
    /// True if this permit is a half-open probe.
    pub fn is_probe(&self) -> bool {
        matches!(
            self.kind,
            PermitKind::LocalProbe { .. } | PermitKind::SharedProbe { .. }
        )
    }

    /// Reports the call's outcome (its duration is measured from the permit's creation).
    pub async fn record(mut self, outcome: Outcome) {
        self.reported = true;
        let elapsed_ms = if self.breaker.inner.times_calls {
            self.breaker
                .inner
                .clock
                .now_ms()
                .saturating_sub(self.started_ms)
        } else {
            0
        };
        let kind = self.kind.clone();
        self.breaker.report(kind, outcome, elapsed_ms).await;
    }

    /// `record(Outcome::Success)`.
    pub async fn success(self) {
        self.record(Outcome::Success).await
    }

    /// `record(Outcome::Failure)`.
    pub async fn failure(self) {
        self.record(Outcome::Failure).await
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.reported {
            return;
        }
        match &self.kind {
            PermitKind::LocalProbe { slot, value, .. } => {
                // Free the slot only if it still holds our probe (not a later one's).
                let _ = self.breaker.inner.probe_slots[*slot].compare_exchange(
                    *value,
                    0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            PermitKind::SharedProbe { key, nonce, .. } => {
                shared::release_probe_in_background(&self.breaker, key.clone(), *nonce);
            }
            PermitKind::Normal { .. } | PermitKind::Forced => {}
        }
    }
}

impl Breaker {
    /// A builder for a breaker named `name` (the name keys its shared state).
    pub fn builder(name: impl Into<String>) -> BreakerBuilder {
        BreakerBuilder {
            name: name.into(),
            policies: Vec::new(),
            open_duration: OPEN_DURATION_DEFAULT,
            open_duration_max: OPEN_DURATION_MAX_DEFAULT,
            backoff_factor: BACKOFF_FACTOR_DEFAULT,
            jitter: JITTER_DEFAULT,
            probes: PROBES_DEFAULT,
            probe_timeout: PROBE_TIMEOUT_DEFAULT,
            refresh_interval: REFRESH_INTERVAL_DEFAULT,
            clock: Arc::new(SystemClock),
            backend: None,
            callbacks: Vec::new(),
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The state as this instance sees it, without a backend call. In shared mode this is the
    /// local view, at most one refresh interval old. An open breaker whose pause has ended reads
    /// `HalfOpen` (the next call may probe).
    pub fn state(&self) -> State {
        let (state, _, deadline) = unpack(self.inner.word.load(Ordering::Acquire));
        if state == State::Open && self.inner.clock.now_ms() >= deadline {
            return State::HalfOpen;
        }
        state
    }

    /// Local, shared, or shared but falling back to local because the backend failed.
    pub fn mode(&self) -> Mode {
        match &self.inner.shared {
            None => Mode::Local,
            Some(s) if s.fallback.load(Ordering::Acquire) => Mode::LocalFallback,
            Some(_) => Mode::Shared,
        }
    }

    /// Refreshes a shared breaker's local view from the backend now, instead of at the next
    /// refresh interval (a no-op in local mode). A backend failure switches to
    /// [`Mode::LocalFallback`]; a success returns to [`Mode::Shared`].
    pub async fn refresh(&self) {
        if let Some(s) = &self.inner.shared {
            s.force_refresh(self).await;
        }
    }

    /// This instance's counters.
    pub fn metrics(&self) -> Metrics {
        let c = &self.inner.counters;
        Metrics {
            calls: c.calls.load(Ordering::Relaxed),
            successes: c.successes.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            slow: c.slow.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` if the breaker admits a call; `Err` counts as a failure, `Ok` as a success.
    ///
    /// # Errors
    /// [`CallError::Rejected`] if the breaker refused (`f` did not run), else `f`'s error.
    pub async fn call<F, Fut, T, E>(&self, f: F) -> Result<T, CallError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(
            |r: &Result<T, E>| {
                if r.is_ok() {
                    Outcome::Success
                } else {
                    Outcome::Failure
                }
            },
            f,
        )
        .await
    }

    /// Runs `f` if the breaker admits a call, and lets `classify` say what its result means
    /// (e.g. a 4xx response is [`Outcome::Success`] or [`Outcome::Ignored`], a 5xx a failure).
    /// If the returned future is dropped while `f` runs, the call counts as nothing and a probe
    /// slot it held is freed.
    ///
    /// # Errors
    /// [`CallError::Rejected`] if the breaker refused (`f` did not run), else `f`'s error.
    pub async fn call_classified<F, Fut, T, E, C>(
        &self,
        classify: C,
        f: F,
    ) -> Result<T, CallError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: FnOnce(&Result<T, E>) -> Outcome,
    {
        let permit = self.acquire().await.map_err(CallError::Rejected)?;
        let result = f().await;
        permit.record(classify(&result)).await;
        result.map_err(CallError::Inner)
    }

    /// Asks for permission to make one call: the guard API, for code that reports outcomes
    /// itself.
    ///
    /// # Errors
    /// [`Rejected`] when the breaker is open, forced open, or half-open with every probe slot
    /// taken.
    pub async fn acquire(&self) -> Result<Permit, Rejected> {
        let inner = &self.inner;
        // The hot path of a local breaker that is closed and has no slow-call policy needs no
        // time at all; reading the clock can cost a system call, so it is read only when used.
        if inner.shared.is_none() && !inner.times_calls {
            let (state, generation, _) = unpack(inner.word.load(Ordering::Acquire));
            let kind = match state {
                State::Closed => Some(PermitKind::Normal { generation }),
                State::ForcedClosed => Some(PermitKind::Forced),
                _ => None,
            };
            if let Some(kind) = kind {
                inner.counters.calls.fetch_add(1, Ordering::Relaxed);
                return Ok(Permit {
                    breaker: self.clone(),
                    kind,
                    started_ms: 0,
                    reported: false,
                });
            }
        }
        let now = inner.clock.now_ms();
        if let Some(s) = &inner.shared {
            s.maybe_refresh(self, now).await;
        }
        let kind = match self.admit(now).await {
            Ok(kind) => kind,
            Err(rejected) => {
                self.inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(rejected);
            }
        };
        self.inner.counters.calls.fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            breaker: self.clone(),
            kind,
            started_ms: now,
            reported: false,
        })
    }

    async fn admit(&self, now: u64) -> Result<PermitKind, Rejected> {
        let inner = &self.inner;
        let word = inner.word.load(Ordering::Acquire);
        let (state, generation, deadline) = unpack(word);
        match state {
            State::Closed => Ok(PermitKind::Normal { generation }),
            State::ForcedClosed => Ok(PermitKind::Forced),
            State::ForcedOpen => Err(self.rejected(State::ForcedOpen, 0)),
            State::Open if now < deadline => {
                Err(self.rejected(State::Open, deadline.saturating_sub(now)))
            }
            State::Open | State::HalfOpen => match &inner.shared {
                Some(s) if !s.fallback.load(Ordering::Acquire) => {
                    match s.try_probe(self, now).await {
                        Ok(kind) => Ok(kind),
                        Err(shared::ProbeRefused::Rejected(r)) => Err(r),
                        Err(shared::ProbeRefused::Backend) => self.admit_local_probe(now),
                    }
                }
                _ => self.admit_local_probe(now),
            },
        }
    }

    /// Half-open admission on the local word: moves an expired open state to half-open, then
    /// takes a free (or timed-out) probe slot.
    fn admit_local_probe(&self, now: u64) -> Result<PermitKind, Rejected> {
        let inner = &self.inner;
        loop {
            let word = inner.word.load(Ordering::Acquire);
            let (state, generation, deadline) = unpack(word);
            match state {
                State::Closed => return Ok(PermitKind::Normal { generation }),
                State::ForcedClosed => return Ok(PermitKind::Forced),
                State::ForcedOpen => return Err(self.rejected(state, 0)),
                State::Open if now < deadline => {
                    return Err(self.rejected(state, deadline - now));
                }
                State::Open => {
                    // Slots and the success count are tagged with their generation, so the new
                    // generation starts with every slot free without clearing anything (a
                    // clear here could race with a probe another thread already admitted).
                    let next = (generation + 1) & GEN_MASK;
                    if inner
                        .word
                        .compare_exchange(
                            word,
                            pack(State::HalfOpen, next, now),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                    {
                        self.notify(State::Open, State::HalfOpen);
                    }
                }
                State::HalfOpen => {
                    let probe_deadline = now.saturating_add(duration_ms(inner.probe_timeout));
                    let value = ((generation & 0xFFFF) << 48) | probe_deadline.min(DONE - 1);
                    for (i, slot) in inner.probe_slots.iter().enumerate() {
                        let held = slot.load(Ordering::Acquire);
                        let free = held == 0
                            || (held >> 48) != (generation & 0xFFFF)
                            || ((held & DEADLINE_MASK) != DONE && (held & DEADLINE_MASK) <= now);
                        if free
                            && slot
                                .compare_exchange(held, value, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                        {
                            if inner.word.load(Ordering::Acquire) != word {
                                // The state moved while we took the slot: give it back.
                                let _ = slot.compare_exchange(
                                    value,
                                    0,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                );
                                break;
                            }
                            return Ok(PermitKind::LocalProbe {
                                generation,
                                slot: i,
                                value,
                            });
                        }
                    }
                    if inner.word.load(Ordering::Acquire) == word {
                        return Err(self.rejected(State::HalfOpen, 0));
                    }
                }
            }
        }
    }

    fn rejected(&self, state: State, retry_after_ms: u64) -> Rejected {
        Rejected {
            name: self.inner.name.clone(),
            state,
            retry_after: Duration::from_millis(retry_after_ms),
        }
    }

    async fn report(&self, kind: PermitKind, outcome: Outcome, elapsed_ms: u64) {
        let inner = &self.inner;
        let c = &inner.counters;
        match outcome {
            Outcome::Success => c.successes.fetch_add(1, Ordering::Relaxed),
            Outcome::Failure => c.failures.fetch_add(1, Ordering::Relaxed),
            Outcome::Ignored => 0,
        };
        let slow_any = inner.tracked.iter().any(|t| match t.policy {
            Policy::SlowCallRate { threshold, .. } => elapsed_ms >= duration_ms(threshold),
            _ => false,
        });
        if slow_any {
            c.slow.fetch_add(1, Ordering::Relaxed);
        }
        if outcome == Outcome::Ignored {
            match kind {
                PermitKind::LocalProbe { slot, value, .. } => {
                    let _ = inner.probe_slots[slot].compare_exchange(
                        value,
                        0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                PermitKind::SharedProbe { key, nonce, .. } => {
                    shared::release_probe_in_background(self, key, nonce);
                }
                _ => {}
            }
            return;
        }
        let failed = outcome == Outcome::Failure;
        match kind {
            PermitKind::Forced => {}
            PermitKind::Normal { generation } => {
                let (state, current, _) = unpack(inner.word.load(Ordering::Acquire));
                if state != State::Closed || current != generation {
                    return;
                }
                // A success on a breaker without time windows needs no time (a shared one
                // only counts it locally until the next refresh).
                let now = if inner.needs_now_to_record || failed || inner.times_calls {
                    inner.clock.now_ms()
                } else {
                    0
                };
                let trip = self.record_closed(failed, elapsed_ms, now);
                match &inner.shared {
                    Some(s) if !s.fallback.load(Ordering::Acquire) => {
                        if let Err(e) = s.record_closed(self, failed, elapsed_ms, now).await {
                            s.enter_fallback(self, &e);
                            if trip {
                                self.trip_local(generation, inner.clock.now_ms());
                            }
                        }
                    }
                    _ => {
                        if trip {
                            self.trip_local(generation, inner.clock.now_ms());
                        }
                    }
                }
            }
            PermitKind::LocalProbe {
                generation,
                slot,
                value,
            } => {
                let now = inner.clock.now_ms();
                if failed {
                    let word = inner.word.load(Ordering::Acquire);
                    let (state, current, _) = unpack(word);
                    if state == State::HalfOpen && current == generation {
                        self.reopen_local(word, now);
                    }
                } else {
                    self.probe_succeeded_local(generation, slot, value);
                }
            }
            PermitKind::SharedProbe {
                generation,
                key,
                nonce,
            } => {
                let now = inner.clock.now_ms();
                s_probe_result(self, generation, key, nonce, failed, now).await;
            }
        }
    }

    /// Records a closed-state outcome in the local windows; true if a policy says trip.
    fn record_closed(&self, failed: bool, elapsed_ms: u64, now: u64) -> bool {
        let inner = &self.inner;
        let consecutive = if failed {
            inner.consecutive.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            inner.consecutive.store(0, Ordering::Release);
            0
        };
        let mut trip = false;
        for t in &inner.tracked {
            match (t.policy, &t.stats) {
                (Policy::ConsecutiveFailures(n), _) => trip |= consecutive >= n,
                (
                    Policy::FailureRate {
                        percent, min_calls, ..
                    },
                    Some(stats),
                ) => {
                    let (calls, bad) = stats.record(failed, now);
                    trip |= rate_trips(calls, bad, percent, min_calls);
                }
                (
                    Policy::SlowCallRate {
                        threshold,
                        percent,
                        min_calls,
                        ..
                    },
                    Some(stats),
                ) => {
                    let slow = elapsed_ms >= duration_ms(threshold);
                    let (calls, bad) = stats.record(slow, now);
                    trip |= rate_trips(calls, bad, percent, min_calls);
                }
                _ => {}
            }
        }
        trip
    }

    /// Closed (generation `generation`) → open, locally.
    fn trip_local(&self, generation: u64, now: u64) {
        let inner = &self.inner;
        let word = pack(State::Closed, generation, 0);
        let open_ms = self.open_duration_ms(inner.trips.load(Ordering::Acquire));
        let next = pack(
            State::Open,
            (generation + 1) & GEN_MASK,
            now.saturating_add(open_ms),
        );
        if inner
            .word
            .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            inner.trips.fetch_add(1, Ordering::AcqRel);
            self.notify(State::Closed, State::Open);
        }
    }

    /// Half-open → open after a failed probe, with the next backoff step.
    fn reopen_local(&self, word: u64, now: u64) {
        let inner = &self.inner;
        let (_, generation, _) = unpack(word);
        let open_ms = self.open_duration_ms(inner.trips.load(Ordering::Acquire));
        let next = pack(
            State::Open,
            (generation + 1) & GEN_MASK,
            now.saturating_add(open_ms),
        );
        if inner
            .word
            .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            inner.trips.fetch_add(1, Ordering::AcqRel);
            self.notify(State::HalfOpen, State::Open);
        }
    }

    fn probe_succeeded_local(&self, generation: u64, slot: usize, value: u64) {
        let inner = &self.inner;
        // Mark the slot done so it is not handed out again in this generation.
        let done = (value & !DEADLINE_MASK) | DONE;
        if inner.probe_slots[slot]
            .compare_exchange(value, done, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return; // The slot timed out and went to another probe, or the state moved on.
        }
        let mut ok = inner.probe_ok.load(Ordering::Acquire);
        loop {
            // The first success of a generation replaces an older generation's count.
            let next = if ok >> 32 == generation {
                ok + 1
            } else {
                (generation << 32) | 1
            };
            match inner
                .probe_ok
                .compare_exchange(ok, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    ok = next;
                    break;
                }
                Err(now) => ok = now,
            }
        }
        if ok & 0xFFFF_FFFF >= u64::from(inner.probes) {
            let word = inner.word.load(Ordering::Acquire);
            let (state, current, _) = unpack(word);
            if state == State::HalfOpen && current == generation {
                self.close_local(word);
            }
        }
    }

    fn close_local(&self, word: u64) -> bool {
        let inner = &self.inner;
        let (from, generation, _) = unpack(word);
        self.clear_windows();
        let next = pack(State::Closed, (generation + 1) & GEN_MASK, 0);
        if inner
            .word
            .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            inner.trips.store(0, Ordering::Release);
            self.notify(from, State::Closed);
            return true;
        }
        false
    }

    fn clear_windows(&self) {
        self.inner.consecutive.store(0, Ordering::Release);
        for t in &self.inner.tracked {
            if let Some(s) = &t.stats {
                s.clear();
            }
        }
    }

    /// The open duration after `trips` consecutive trips: `base × factor^trips`, capped, with
    /// jitter.
    pub(crate) fn open_duration_ms(&self, trips: u32) -> u64 {
        let inner = &self.inner;
        let base = duration_ms(inner.open_duration);
        let max = duration_ms(inner.open_duration_max);
        let grown = u64::from(inner.backoff_factor)
            .checked_pow(trips.min(63))
            .and_then(|f| base.checked_mul(f))
            .unwrap_or(max)
            .min(max);
        if inner.jitter == 0.0 {
            return grown.max(1);
        }
        let scale = rand::random_range((1.0 - inner.jitter)..=(1.0 + inner.jitter));
        ((grown as f64 * scale) as u64).max(1)
    }

    /// Sets the local word (used by forced transitions and by the shared view), notifying on a
    /// state change.
    pub(crate) fn set_local(&self, state: State, generation: u64, deadline_ms: u64) {
        let inner = &self.inner;
        let next = pack(state, generation, deadline_ms);
        let prev = inner.word.swap(next, Ordering::AcqRel);
        let (from, prev_gen, _) = unpack(prev);
        let _ = prev_gen;
        if state == State::Closed && from != State::Closed {
            self.clear_windows();
        }
        if from != state {
            self.notify(from, state);
        }
    }

    pub(crate) fn local_word(&self) -> (State, u64, u64) {
        unpack(self.inner.word.load(Ordering::Acquire))
    }

    pub(crate) fn set_trips(&self, trips: u32) {
        self.inner.trips.store(trips, Ordering::Release);
    }

    fn notify(&self, from: State, to: State) {
        if from == to {
            return;
        }
        tracing::info!(breaker = %self.inner.name, %from, %to, "circuit breaker state change");
        crate::observe::breaker_transition(&self.inner.name, from.as_str(), to.as_str());
        for cb in &self.inner.callbacks {
            cb(StateChange { from, to });
        }
    }

    /// Forces the breaker open: every call is rejected until [`reset`](Self::reset). In
    /// shared mode this applies to every replica (after its next refresh).
    pub async fn force_open(&self) {
        self.force(State::ForcedOpen).await
    }

    /// Forces the breaker closed: every call passes and nothing trips it until
    /// [`reset`](Self::reset). In shared mode this applies to every replica.
    pub async fn force_closed(&self) {
        self.force(State::ForcedClosed).await
    }

    /// Back to closed with empty windows and no backoff memory.
    pub async fn reset(&self) {
        self.force(State::Closed).await
    }

    async fn force(&self, state: State) {
        let (_, generation, _) = self.local_word();
        let next = (generation + 1) & GEN_MASK;
        self.inner.trips.store(0, Ordering::Release);
        self.clear_windows();
        if let Some(s) = &self.inner.shared
            && s.force(self, state).await
        {
            return;
        }
        self.set_local(state, next, 0);
    }
}

async fn s_probe_result(
    breaker: &Breaker,
    generation: u64,
    key: Vec<u8>,
    nonce: [u8; 16],
    failed: bool,
    now: u64,
) {
    if let Some(s) = &breaker.inner.shared {
        s.probe_result(breaker, generation, key, nonce, failed, now)
            .await;
    }
}

fn rate_trips(calls: u64, bad: u64, percent: u8, min_calls: u32) -> bool {
    calls >= u64::from(min_calls.max(1)) && bad * 100 >= u64::from(percent) * calls
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A rate window: a lock-free ring of the last N outcomes, or time buckets.
enum Stats {
    Calls {
        ring: Box<[AtomicU8]>,
        cursor: AtomicU64,
        calls: AtomicI64,
        bad: AtomicI64,
    },
    Time {
        bucket_ms: u64,
        buckets: Box<[Bucket]>,
    },
}

#[derive(Default)]
struct Bucket {
    epoch: AtomicU64,
    calls: AtomicU64,
    bad: AtomicU64,
}

const SLOT_EMPTY: u8 = 0;
const SLOT_GOOD: u8 = 1;
const SLOT_BAD: u8 = 2;

impl Stats {
    fn new(window: Window) -> Stats {
        match window {
            Window::Calls(n) => Stats::Calls {
                ring: (0..n).map(|_| AtomicU8::new(SLOT_EMPTY)).collect(),
                cursor: AtomicU64::new(0),
                calls: AtomicI64::new(0),
                bad: AtomicI64::new(0),
            },
            Window::Time(d) => Stats::Time {
                bucket_ms: (duration_ms(d) / TIME_BUCKETS).max(1),
                buckets: (0..TIME_BUCKETS).map(|_| Bucket::default()).collect(),
            },
        }
    }

    /// Records one outcome (`bad`: failed or slow) and returns (calls, bad) in the window.
    fn record(&self, is_bad: bool, now: u64) -> (u64, u64) {
        match self {
            Stats::Calls {
                ring,
                cursor,
                calls,
                bad,
            } => {
                let i = cursor.fetch_add(1, Ordering::AcqRel) % ring.len() as u64;
                let new = if is_bad { SLOT_BAD } else { SLOT_GOOD };
                let old = ring[i as usize].swap(new, Ordering::AcqRel);
                // The aggregate moves by (new - old); concurrent updates commute.
                if old == SLOT_EMPTY {
                    calls.fetch_add(1, Ordering::AcqRel);
                }
                match (old == SLOT_BAD, is_bad) {
                    (false, true) => {
                        bad.fetch_add(1, Ordering::AcqRel);
                    }
                    (true, false) => {
                        bad.fetch_sub(1, Ordering::AcqRel);
                    }
                    _ => {}
                }
                // A concurrent `clear` can leave the aggregates briefly off; never below zero.
                let calls = calls.load(Ordering::Acquire).max(0).unsigned_abs();
                let bad = bad.load(Ordering::Acquire).max(0).unsigned_abs();
                (calls, bad.min(calls))
            }
            Stats::Time { bucket_ms, buckets } => {
                let epoch = now / bucket_ms + 1; // 0 marks an unused bucket
                let b = &buckets[(epoch % TIME_BUCKETS) as usize];
                let seen = b.epoch.load(Ordering::Acquire);
                if seen != epoch
                    && b.epoch
                        .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    b.calls.store(0, Ordering::Release);
                    b.bad.store(0, Ordering::Release);
                }
                b.calls.fetch_add(1, Ordering::AcqRel);
                if is_bad {
                    b.bad.fetch_add(1, Ordering::AcqRel);
                }
                let (mut calls, mut bad) = (0, 0);
                for b in buckets.iter() {
                    let e = b.epoch.load(Ordering::Acquire);
                    if e != 0 && e + TIME_BUCKETS > epoch {
                        calls += b.calls.load(Ordering::Acquire);
                        bad += b.bad.load(Ordering::Acquire);
                    }
                }
                (calls, bad)
            }
        }
    }

    fn clear(&self) {
        match self {
            Stats::Calls {
                ring, calls, bad, ..
            } => {
                for s in ring.iter() {
                    s.store(SLOT_EMPTY, Ordering::Release);
                }
                calls.store(0, Ordering::Release);
                bad.store(0, Ordering::Release);
            }
            Stats::Time { buckets, .. } => {
                for b in buckets.iter() {
                    b.epoch.store(0, Ordering::Release);
                }
            }
        }
    }
}
