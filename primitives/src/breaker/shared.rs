//! Shared mode: the breaker's state machine in the backend, so every replica using the same
//! name sees one breaker.
//!
//! # Keys (all under `breaker:{name}:`)
//! - `breaker:{name}:state`: `v1|{S}|{generation}|{deadline_ms}|{trips}` where `S` is `C`
//!   (closed), `O` (open until `deadline_ms`), `H` (half-open), `F` (forced open), `D` (forced
//!   closed). Absent means closed, generation 0. Every transition is a `compare_and_swap` from
//!   the exact bytes read, so of two replicas racing to trip (or to close), one wins and the
//!   other adopts its result. TTL: the remaining open time plus [`STATE_RETENTION`]; forced
//!   states carry no TTL (an operator's decision stands until reset).
//! - `breaker:{name}:{gen}:consec`: consecutive failures (`incr`), deleted by the first success
//!   a replica sees after one of its failures. TTL [`STATE_RETENTION`].
//! - `breaker:{name}:{gen}:p{i}:t{bucket}:calls|bad`: calls and bad (failed or slow) calls of
//!   policy `i` in time bucket `now / window` (tumbling time windows). TTL twice the window.
//! - `breaker:{name}:{gen}:p{i}:calls` and `…:p{i}:c{w}:bad`: policy `i`'s count window as
//!   tumbling windows of N calls: the `w`-th window holds calls `w·N+1 ..= (w+1)·N`. TTL
//!   [`STATE_RETENTION`].
//! - `breaker:{name}:probe:{gen}:{slot}`: a half-open probe lease (`set_nx`, a 16-byte random
//!   nonce, TTL the probe timeout), turned into `done` when its probe succeeds so the slot is not
//!   handed out again in that generation. Exactly N slots exist per generation, so exactly N
//!   probes run across the fleet; a hung probe's lease expires and the slot can be taken again.
//! - `breaker:{name}:{gen}:ok`: successful probes of a half-open generation (`incr`); the
//!   N-th closes the breaker. TTL [`STATE_RETENTION`].
//!
//! Every key carries a TTL except a forced state; a new generation starts new keys, and the old
//! ones expire.
//!
//! # Costs
//! While closed, a success costs no backend call: successes are counted locally and added to
//! the window counters at the next refresh or failure. A failure costs one `incr` per policy
//! (two for a count window). The view refresh is one `get` per refresh interval per replica.
//! While the local view says open-and-expired or half-open, admission goes to the backend: one
//! `get` (plus the CAS to half-open, once) and up to N `set_nx` per call, including calls that
//! find every probe slot taken and are rejected. That lasts until the probes report, typically
//! one call's latency.
//!
//! # Backend failure
//! Any backend error switches the breaker to local mode ([`Mode::LocalFallback`]) with a
//! `tracing` warning; it keeps deciding on its local view and windows. The next refresh that
//! reaches the backend adopts the shared state and returns to shared mode.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::{Breaker, GEN_MASK, PermitKind, Policy, Rejected, State, Window, duration_ms};
use crate::backend::{Backend, TtlPolicy};
use crate::error::Error;

/// How long transient shared state outlives its use (counters, a closed state record).
pub const STATE_RETENTION: Duration = Duration::from_secs(3600);
/// Prefix of every breaker key: `breaker:{name}:…`.
pub const KEY_PREFIX: &str = "breaker:";
const PROBE_DONE: &[u8] = b"done";

pub(crate) enum ProbeRefused {
    Rejected(Rejected),
    Backend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    state: State,
    generation: u64,
    deadline_ms: u64,
    trips: u32,
}

impl Record {
    const INITIAL: Record = Record {
        state: State::Closed,
        generation: 0,
        deadline_ms: 0,
        trips: 0,
    };

    fn encode(&self) -> Vec<u8> {
        format!(
            "v1|{}|{}|{}|{}",
            self.state.letter(),
            self.generation,
            self.deadline_ms,
            self.trips
        )
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Record> {
        let s = std::str::from_utf8(bytes).ok()?;
        let mut it = s.split('|');
        if it.next()? != "v1" {
            return None;
        }
        let mut letter = it.next()?.chars();
        let state = State::from_letter(letter.next()?)?;
        let record = Record {
            state,
            generation: it.next()?.parse().ok()?,
            deadline_ms: it.next()?.parse().ok()?,
            trips: it.next()?.parse().ok()?,
        };
        if letter.next().is_some() || it.next().is_some() {
            return None;
        }
        Some(record)
    }
}

pub(crate) struct Shared {
    backend: Arc<dyn Backend>,
    prefix: String,
    state_key: Vec<u8>,
    pub(crate) fallback: AtomicBool,
    next_refresh_ms: AtomicU64,
    refreshing: AtomicBool,
    /// The full generation of the local view (the local word keeps only its low bits).
    view_generation: AtomicU64,
    /// Closed-state successes not yet added to the shared counters.
    pending_ok: AtomicU64,
    /// Whether this replica added to the consecutive-failure counter since the last success.
    consecutive_dirty: AtomicBool,
}

impl Shared {
    pub(crate) fn new(backend: Arc<dyn Backend>, name: &str) -> Shared {
        let prefix = format!("{KEY_PREFIX}{name}:");
        Shared {
            backend,
            state_key: format!("{prefix}state").into_bytes(),
            prefix,
            fallback: AtomicBool::new(false),
            next_refresh_ms: AtomicU64::new(0),
            refreshing: AtomicBool::new(false),
            view_generation: AtomicU64::new(0),
            pending_ok: AtomicU64::new(0),
            consecutive_dirty: AtomicBool::new(false),
        }
    }

    fn key(&self, suffix: &str) -> Vec<u8> {
        format!("{}{suffix}", self.prefix).into_bytes()
    }

    async fn read(&self) -> Result<(Record, Option<Vec<u8>>), Error> {
        let raw = self.backend.get(&self.state_key).await?;
        let record = match &raw {
            None => Record::INITIAL,
            // A damaged record reads as closed; the next transition overwrites it.
            Some(bytes) => Record::decode(bytes).unwrap_or(Record::INITIAL),
        };
        Ok((record, raw))
    }

    /// CAS from `raw` to `next`; true if it swapped.
    async fn swap(&self, raw: &Option<Vec<u8>>, next: Record, now: u64) -> Result<bool, Error> {
        let ttl = match next.state {
            State::ForcedOpen | State::ForcedClosed => TtlPolicy::Clear,
            _ => TtlPolicy::Set(
                STATE_RETENTION + Duration::from_millis(next.deadline_ms.saturating_sub(now)),
            ),
        };
        self.backend
            .compare_and_swap(&self.state_key, raw.as_deref(), &next.encode(), ttl)
            .await
    }

    fn adopt(&self, breaker: &Breaker, record: Record) {
        self.view_generation
            .store(record.generation, Ordering::Release);
        breaker.set_trips(record.trips);
        breaker.set_local(
            record.state,
            record.generation & GEN_MASK,
            record.deadline_ms,
        );
    }

    pub(crate) fn enter_fallback(&self, breaker: &Breaker, e: &Error) {
        if !self.fallback.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                breaker = %breaker.inner.name,
                error = %e,
                "circuit breaker backend failed; falling back to local mode until it answers"
            );
        }
    }

    /// Refreshes the local view if it is older than the refresh interval. One caller
    /// refreshes; the others go on with the current view.
    pub(crate) async fn maybe_refresh(&self, breaker: &Breaker, now: u64) {
        if now < self.next_refresh_ms.load(Ordering::Acquire)
            || self.refreshing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.finish_refresh(breaker, now).await;
    }

    /// Refreshes; the caller holds `refreshing`, which this releases.
    async fn finish_refresh(&self, breaker: &Breaker, now: u64) {
        let interval = duration_ms(breaker.inner.refresh_interval);
        self.next_refresh_ms
            .store(now.saturating_add(interval), Ordering::Release);
        match self.refresh(breaker, now).await {
            Ok(()) => {
                if self.fallback.swap(false, Ordering::AcqRel) {
                    tracing::info!(breaker = %breaker.inner.name, "circuit breaker back in shared mode");
                }
            }
            Err(e) => self.enter_fallback(breaker, &e),
        }
        self.refreshing.store(false, Ordering::Release);
    }

    pub(crate) async fn force_refresh(&self, breaker: &Breaker) {
        // Wait out a refresh already running, then refresh ourselves so the caller sees a view
        // read after the call began.
        while self.refreshing.swap(true, Ordering::AcqRel) {
            tokio::task::yield_now().await;
        }
        let now = breaker.inner.clock.now_ms();
        self.finish_refresh(breaker, now).await;
    }

    async fn refresh(&self, breaker: &Breaker, now: u64) -> Result<(), Error> {
        let (record, _) = self.read().await?;
        if !self.fallback.load(Ordering::Acquire) {
            let pending = self.pending_ok.swap(0, Ordering::AcqRel);
            if pending > 0 && record.state == State::Closed {
                self.add_calls(breaker, record.generation, pending, now)
                    .await?;
            }
        }
        self.adopt(breaker, record);
        Ok(())
    }

    /// Adds `n` good calls to every rate policy's window.
    async fn add_calls(
        &self,
        breaker: &Breaker,
        generation: u64,
        n: u64,
        now: u64,
    ) -> Result<(), Error> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        for (i, t) in breaker.inner.tracked.iter().enumerate() {
            match window_of(&t.policy) {
                Some(Window::Time(d)) => {
                    let bucket = now / duration_ms(d).max(1);
                    let key = self.key(&format!("{generation}:p{i}:t{bucket}:calls"));
                    self.backend.incr(&key, n, Some(d * 2)).await?;
                }
                Some(Window::Calls(_)) => {
                    let key = self.key(&format!("{generation}:p{i}:calls"));
                    self.backend.incr(&key, n, Some(STATE_RETENTION)).await?;
                }
                None => {}
            }
        }
        Ok(())
    }

    /// A closed-state outcome. Successes are batched; a bad outcome is counted in the backend
    /// at once and may trip the breaker for everyone.
    pub(crate) async fn record_closed(
        &self,
        breaker: &Breaker,
        failed: bool,
        elapsed_ms: u64,
        now: u64,
    ) -> Result<(), Error> {
        let generation = self.view_generation.load(Ordering::Acquire);
        let slow_of = |p: &Policy| match *p {
            Policy::SlowCallRate { threshold, .. } => elapsed_ms >= duration_ms(threshold),
            _ => false,
        };
        let any_bad = failed || breaker.inner.tracked.iter().any(|t| slow_of(&t.policy));
        if !failed && self.consecutive_dirty.swap(false, Ordering::AcqRel) {
            self.backend
                .delete(&self.key(&format!("{generation}:consec")))
                .await?;
        }
        if !any_bad {
            self.pending_ok.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        let calls = 1 + self.pending_ok.swap(0, Ordering::AcqRel);
        let calls = i64::try_from(calls).unwrap_or(i64::MAX);
        let mut trip = false;
        for (i, t) in breaker.inner.tracked.iter().enumerate() {
            let bad = match t.policy {
                Policy::ConsecutiveFailures(n) => {
                    if failed {
                        let key = self.key(&format!("{generation}:consec"));
                        let c = self.backend.incr(&key, 1, Some(STATE_RETENTION)).await?;
                        self.consecutive_dirty.store(true, Ordering::Release);
                        trip |= c >= i64::from(n);
                    }
                    continue;
                }
                Policy::FailureRate { .. } => failed,
                Policy::SlowCallRate { .. } => slow_of(&t.policy),
            };
            let (percent, min_calls) = match t.policy {
                Policy::FailureRate {
                    percent, min_calls, ..
                }
                | Policy::SlowCallRate {
                    percent, min_calls, ..
                } => (percent, min_calls),
                Policy::ConsecutiveFailures(_) => continue,
            };
            let (in_window, bad_in_window) = match window_of(&t.policy) {
                Some(Window::Time(d)) => {
                    let bucket = now / duration_ms(d).max(1);
                    let ttl = Some(d * 2);
                    let c = self
                        .backend
                        .incr(
                            &self.key(&format!("{generation}:p{i}:t{bucket}:calls")),
                            calls,
                            ttl,
                        )
                        .await?;
                    let bad_key = self.key(&format!("{generation}:p{i}:t{bucket}:bad"));
                    let b = if bad {
                        self.backend.incr(&bad_key, 1, ttl).await?
                    } else {
                        0
                    };
                    (c, b)
                }
                Some(Window::Calls(size)) => {
                    let n = self
                        .backend
                        .incr(
                            &self.key(&format!("{generation}:p{i}:calls")),
                            calls,
                            Some(STATE_RETENTION),
                        )
                        .await?;
                    let size = i64::from(size);
                    let w = (n - 1).max(0) / size;
                    let bad_key = self.key(&format!("{generation}:p{i}:c{w}:bad"));
                    let b = if bad {
                        self.backend
                            .incr(&bad_key, 1, Some(STATE_RETENTION))
                            .await?
                    } else {
                        0
                    };
                    (n - w * size, b)
                }
                None => continue,
            };
            if bad {
                trip |= super::rate_trips(
                    in_window.max(0).unsigned_abs(),
                    bad_in_window.max(0).unsigned_abs(),
                    percent,
                    min_calls,
                );
            }
        }
        if trip {
            let (record, raw) = self.read().await?;
            if record.state == State::Closed && record.generation == generation {
                let next = Record {
                    state: State::Open,
                    generation: generation + 1,
                    deadline_ms: now.saturating_add(breaker.open_duration_ms(record.trips)),
                    trips: record.trips.saturating_add(1),
                };
                if self.swap(&raw, next, now).await? {
                    self.adopt(breaker, next);
                    return Ok(());
                }
            }
            // Someone else moved it first: adopt what is there now.
            let (record, _) = self.read().await?;
            self.adopt(breaker, record);
        }
        Ok(())
    }

    /// Half-open admission through the backend: moves an expired open state to half-open,
    /// then takes one of the generation's N probe leases.
    pub(crate) async fn try_probe(
        &self,
        breaker: &Breaker,
        now: u64,
    ) -> Result<PermitKind, ProbeRefused> {
        match self.try_probe_inner(breaker, now).await {
            Ok(r) => r,
            Err(e) => {
                self.enter_fallback(breaker, &e);
                Err(ProbeRefused::Backend)
            }
        }
    }

    async fn try_probe_inner(
        &self,
        breaker: &Breaker,
        now: u64,
    ) -> Result<Result<PermitKind, ProbeRefused>, Error> {
        let rejected = |state, after: u64| {
            Err(ProbeRefused::Rejected(Rejected {
                name: breaker.inner.name.clone(),
                state,
                retry_after: Duration::from_millis(after),
            }))
        };
        // A few rounds: each lost CAS means another replica moved the state just now.
        for _ in 0..4 {
            let (record, raw) = self.read().await?;
            match record.state {
                State::Closed => {
                    self.adopt(breaker, record);
                    return Ok(Ok(PermitKind::Normal {
                        generation: record.generation & GEN_MASK,
                    }));
                }
                State::ForcedClosed => {
                    self.adopt(breaker, record);
                    return Ok(Ok(PermitKind::Forced));
                }
                State::ForcedOpen => {
                    self.adopt(breaker, record);
                    return Ok(rejected(State::ForcedOpen, 0));
                }
                State::Open if now < record.deadline_ms => {
                    self.adopt(breaker, record);
                    return Ok(rejected(State::Open, record.deadline_ms - now));
                }
                State::Open => {
                    let next = Record {
                        state: State::HalfOpen,
                        generation: record.generation + 1,
                        deadline_ms: now,
                        trips: record.trips,
                    };
                    self.swap(&raw, next, now).await?;
                }
                State::HalfOpen => {
                    self.adopt(breaker, record);
                    let g = record.generation;
                    for slot in 0..breaker.inner.probes {
                        let key = self.key(&format!("probe:{g}:{slot}"));
                        let nonce: [u8; 16] = rand::random();
                        if self
                            .backend
                            .set_nx(&key, &nonce, Some(breaker.inner.probe_timeout))
                            .await?
                        {
                            return Ok(Ok(PermitKind::SharedProbe {
                                generation: g,
                                key,
                                nonce,
                            }));
                        }
                    }
                    return Ok(rejected(State::HalfOpen, 0));
                }
            }
        }
        Ok(rejected(State::HalfOpen, 0))
    }

    pub(crate) async fn probe_result(
        &self,
        breaker: &Breaker,
        generation: u64,
        key: Vec<u8>,
        nonce: [u8; 16],
        failed: bool,
        now: u64,
    ) {
        if let Err(e) = self
            .probe_result_inner(breaker, generation, &key, &nonce, failed, now)
            .await
        {
            self.enter_fallback(breaker, &e);
            // Decide on the local view instead.
            let (state, g, _) = breaker.local_word();
            if state == State::HalfOpen && g == generation & GEN_MASK {
                let word = super::pack(state, g, breaker.local_word().2);
                if failed {
                    breaker.reopen_local(word, now);
                } else if breaker.inner.probes == 1 {
                    breaker.close_local(word);
                }
            }
        }
    }

    async fn probe_result_inner(
        &self,
        breaker: &Breaker,
        generation: u64,
        key: &[u8],
        nonce: &[u8; 16],
        failed: bool,
        now: u64,
    ) -> Result<(), Error> {
        if failed {
            let (record, raw) = self.read().await?;
            if record.state == State::HalfOpen && record.generation == generation {
                let next = Record {
                    state: State::Open,
                    generation: generation + 1,
                    deadline_ms: now.saturating_add(breaker.open_duration_ms(record.trips)),
                    trips: record.trips.saturating_add(1),
                };
                if self.swap(&raw, next, now).await? {
                    self.adopt(breaker, next);
                    return Ok(());
                }
            }
            let (record, _) = self.read().await?;
            self.adopt(breaker, record);
            return Ok(());
        }
        // Keep the slot taken for the rest of this generation; if the lease already expired
        // (the probe outran the probe timeout), another probe owns the slot and ours is void.
        let kept = self
            .backend
            .compare_and_swap(
                key,
                Some(nonce),
                PROBE_DONE,
                TtlPolicy::Set(STATE_RETENTION),
            )
            .await?;
        if !kept {
            return Ok(());
        }
        let ok_key = self.key(&format!("{generation}:ok"));
        let ok = self.backend.incr(&ok_key, 1, Some(STATE_RETENTION)).await?;
        if ok >= i64::from(breaker.inner.probes) {
            let (record, raw) = self.read().await?;
            if record.state == State::HalfOpen && record.generation == generation {
                let next = Record {
                    state: State::Closed,
                    generation: generation + 1,
                    deadline_ms: 0,
                    trips: 0,
                };
                if self.swap(&raw, next, now).await? {
                    self.adopt(breaker, next);
                    return Ok(());
                }
            }
            let (record, _) = self.read().await?;
            self.adopt(breaker, record);
        }
        Ok(())
    }

    /// Writes a forced (or reset) state for every replica; false if the backend failed.
    pub(crate) async fn force(&self, breaker: &Breaker, state: State) -> bool {
        let result: Result<Record, Error> = async {
            let (record, _) = self.read().await?;
            let next = Record {
                state,
                generation: record.generation + 1,
                deadline_ms: 0,
                trips: 0,
            };
            let ttl = match state {
                State::ForcedOpen | State::ForcedClosed => None,
                _ => Some(STATE_RETENTION),
            };
            self.backend
                .set(&self.state_key, &next.encode(), ttl)
                .await?;
            Ok(next)
        }
        .await;
        match result {
            Ok(next) => {
                self.pending_ok.store(0, Ordering::Release);
                self.adopt(breaker, next);
                true
            }
            Err(e) => {
                self.enter_fallback(breaker, &e);
                false
            }
        }
    }
}

fn window_of(p: &Policy) -> Option<Window> {
    match *p {
        Policy::ConsecutiveFailures(_) => None,
        Policy::FailureRate { window, .. } | Policy::SlowCallRate { window, .. } => Some(window),
    }
}

/// Frees a shared probe lease whose permit was dropped without an outcome (cancellation), on
/// the current Tokio runtime; outside one, the lease's TTL frees it.
pub(crate) fn release_probe_in_background(breaker: &Breaker, key: Vec<u8>, nonce: [u8; 16]) {
    let Some(shared) = &breaker.inner.shared else {
        return;
    };
    let backend = Arc::clone(&shared.backend);
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = backend.compare_and_delete(&key, &nonce).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let r = Record {
            state: State::HalfOpen,
            generation: 42,
            deadline_ms: 1_700_000_000_000,
            trips: 3,
        };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        for bad in [
            &b"v2|C|0|0|0"[..],
            b"v1|X|0|0|0",
            b"v1|C|0|0",
            b"v1|CC|0|0|0",
            b"v1|C|0|0|0|0",
        ] {
            assert_eq!(
                Record::decode(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
