//! Measuring one cell of the comparison: N callers run one operation in a loop, first for a
//! warm-up (not recorded: connection pools fill, caches warm), then for a fixed duration. Every
//! loop is bounded by time *and* by a count, so a cell always ends by itself.
//!
//! Callers are either async tasks on the harness's runtime ([`AsyncCaller`], for anything
//! reached through the `Backend` contract) or OS threads ([`BlockingCaller`], for blocking
//! APIs: `Db` directly, sled's and redb's own APIs). Each caller keeps its own latency
//! histogram; they are merged at the end, so recording never contends.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How long a cell runs and the count that bounds it.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Operations run but not recorded before the measured window.
    pub warmup: Duration,
    /// The measured window.
    pub run_for: Duration,
    /// Most operations one caller performs in a cell (warm-up included), whatever the time.
    pub ops_per_caller_max: u64,
}

/// The longest latency a histogram records exactly; longer ones saturate to it.
const LATENCY_NS_MAX: u64 = 60_000_000_000;

fn histogram() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits: constant bounds that hdrhistogram accepts.
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("constant, valid histogram bounds")
}

/// What a cell measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Operations completed in the measured window.
    pub ops: u64,
    /// Operations completed in the whole cell, warm-up included (to relate the cell to
    /// counters read around it, such as a store's fdatasync count).
    pub attempted: u64,
    /// From the start of the measured window to the end of the last recorded operation.
    pub elapsed: Duration,
    /// Latency of each recorded operation, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// Anything worth printing next to the figures (e.g. share of rate-limit admissions).
    pub note: String,
}

impl Measured {
    /// Operations per second over the measured window.
    pub fn ops_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    /// Latency at quantile `q` (0..=1), in nanoseconds.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        self.latency_ns.value_at_quantile(q)
    }
}

/// One caller's loop, run as a task on the runtime.
pub trait AsyncCaller: Send + 'static {
    /// Performs one operation. An error ends this caller and fails the cell.
    fn call(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    /// Counts of (admitted, refused) decisions for the note column, summed over callers;
    /// `(0, 0)` (the default) prints no note.
    fn tally(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// One caller's loop, run on its own OS thread.
pub trait BlockingCaller: Send {
    /// Performs one operation. An error ends this caller and fails the cell.
    fn call(&mut self) -> Result<(), String>;
}

struct CallerOutcome {
    ops: u64,
    attempted: u64,
    last_end: Instant,
    latency_ns: Histogram<u64>,
    tally: (u64, u64),
    error: Option<String>,
}

/// Window bounds shared by every caller of a cell.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    deadline: Instant,
    ops_max: u64,
}

impl Window {
    fn new(plan: &Plan) -> Self {
        let measure_from = Instant::now() + plan.warmup;
        Window {
            measure_from,
            deadline: measure_from + plan.run_for,
            ops_max: plan.ops_per_caller_max,
        }
    }
}

/// Runs one async caller per element of `callers`, concurrently. `yield_each_op`: give the
/// runtime a chance to run the other callers after every operation (outside the timed part),
/// needed when there are more callers than worker threads and an operation can complete
/// without ever waiting (a memory-only store), which would otherwise let one task run alone.
pub async fn drive_async<C: AsyncCaller>(
    callers: Vec<C>,
    plan: &Plan,
    yield_each_op: bool,
) -> Result<Measured, String> {
    let window = Window::new(plan);
    let tasks: Vec<_> = callers
        .into_iter()
        .map(|mut caller| {
            tokio::spawn(async move {
                let mut out = CallerOutcome::new(window.measure_from);
                let mut done = 0u64;
                loop {
                    let started = Instant::now();
                    if started >= window.deadline || done >= window.ops_max {
                        break;
                    }
                    let result = caller.call().await;
                    let ended = Instant::now();
                    done += 1;
                    if let Err(e) = result {
                        out.error = Some(e);
                        break;
                    }
                    out.record(started, ended, window.measure_from);
                    if yield_each_op {
                        tokio::task::yield_now().await;
                    }
                }
                out.tally = caller.tally();
                out.attempted = done;
                out
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(
            task.await
                .map_err(|e| format!("a caller task failed: {e}"))?,
        );
    }
    merge(outcomes, window.measure_from)
}

/// Runs one OS thread per element of `callers`, concurrently. Blocks the calling thread.
pub fn drive_blocking<C: BlockingCaller>(callers: Vec<C>, plan: &Plan) -> Result<Measured, String> {
    let window = Window::new(plan);
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = callers
            .into_iter()
            .map(|mut caller| {
                scope.spawn(move || {
                    let mut out = CallerOutcome::new(window.measure_from);
                    let mut done = 0u64;
                    loop {
                        let started = Instant::now();
                        if started >= window.deadline || done >= window.ops_max {
                            break;
                        }
                        let result = caller.call();
                        let ended = Instant::now();
                        done += 1;
                        if let Err(e) = result {
                            out.error = Some(e);
                            break;
                        }
                        out.record(started, ended, window.measure_from);
                    }
                    out.attempted = done;
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a caller thread panicked".to_owned()))
            .collect::<Result<Vec<_>, String>>()
    })?;
    merge(outcomes, window.measure_from)
}

impl CallerOutcome {
    fn new(measure_from: Instant) -> Self {
        CallerOutcome {
            ops: 0,
            attempted: 0,
            last_end: measure_from,
            latency_ns: histogram(),
            tally: (0, 0),
            error: None,
        }
    }

    fn record(&mut self, started: Instant, ended: Instant, measure_from: Instant) {
        if started < measure_from {
            return; // warm-up
        }
        let ns = (ended - started).as_nanos().try_into().unwrap_or(u64::MAX);
        self.latency_ns.saturating_record(ns.max(1));
        self.ops += 1;
        self.last_end = self.last_end.max(ended);
    }
}

fn merge(outcomes: Vec<CallerOutcome>, measure_from: Instant) -> Result<Measured, String> {
    let mut latency_ns = histogram();
    let mut ops = 0;
    let mut attempted = 0;
    let mut last_end = measure_from;
    let (mut yes, mut no) = (0, 0);
    for o in outcomes {
        if let Some(e) = o.error {
            return Err(e);
        }
        latency_ns
            .add(&o.latency_ns)
            .expect("histograms with identical bounds always merge");
        ops += o.ops;
        attempted += o.attempted;
        last_end = last_end.max(o.last_end);
        yes += o.tally.0;
        no += o.tally.1;
    }
    if ops == 0 {
        return Err("no operation completed in the measured window".to_owned());
    }
    let note = if yes + no > 0 {
        format!("{:.1}% admitted", 100.0 * yes as f64 / (yes + no) as f64)
    } else {
        String::new()
    };
    Ok(Measured {
        ops,
        attempted,
        elapsed: last_end - measure_from,
        latency_ns,
        note,
    })
}

/// A small, fast PRNG for choosing keys (xorshift64*); each caller has its own.
#[derive(Debug, Clone)]
pub struct KeyPicker {
    state: u64,
}

impl KeyPicker {
    /// A picker seeded from `seed` (any value; 0 is remapped).
    pub fn new(seed: u64) -> Self {
        KeyPicker {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        }
    }

    /// A uniformly distributed index below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let r = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((u128::from(r) * n as u128) >> 64) as usize
    }
}
