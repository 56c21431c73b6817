//! Time. The engine reads "now" through the [`Clock`] trait so tests can drive expiry with a
//! [`ManualClock`] instead of sleeping. Whatever the clock says, the store never lets its own
//! notion of now go backwards (see `Db`'s clock floor), so a wall clock stepped back by NTP
//! cannot resurrect an expired key inside one process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of Unix time in milliseconds.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The wall clock (`SystemTime`), read in milliseconds.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 is treated as 1970; the store's floor keeps time monotonic.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now_ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A manual clock starting at `start_ms` milliseconds since the epoch.
    pub fn new(start_ms: u64) -> Self {
        ManualClock {
            now_ms: Arc::new(AtomicU64::new(start_ms)),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock to `ms`, possibly backwards (the store will not follow it backwards).
    pub fn set_ms(&self, ms: u64) {
        self.now_ms.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// A clock that never goes backwards: `max(floor, inner.now_ms())`.
pub(crate) struct MonotonicClock {
    inner: Arc<dyn Clock>,
    floor_ms: AtomicU64,
}

impl MonotonicClock {
    pub(crate) fn new(inner: Arc<dyn Clock>) -> Self {
        MonotonicClock {
            inner,
            floor_ms: AtomicU64::new(0),
        }
    }

    /// Raises the floor to at least `ms` (used at recovery with the newest time in the log).
    pub(crate) fn raise_floor(&self, ms: u64) {
        self.floor_ms.fetch_max(ms, Ordering::SeqCst);
    }

    /// Now, in milliseconds, never less than any value returned before.
    pub(crate) fn now_ms(&self) -> u64 {
        let now = self.inner.now_ms();
        // Most reads fall in a millisecond already seen: a plain load then, so concurrent
        // readers do not bounce the floor's cache line with a read-modify-write each.
        let floor = self.floor_ms.load(Ordering::Acquire);
        if now <= floor {
            return floor;
        }
        let prev = self.floor_ms.fetch_max(now, Ordering::AcqRel);
        prev.max(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_ignores_backward_steps() {
        let manual = ManualClock::new(10_000);
        let mono = MonotonicClock::new(Arc::new(manual.clone()));
        assert_eq!(mono.now_ms(), 10_000);
        manual.set_ms(5_000);
        assert_eq!(mono.now_ms(), 10_000);
        manual.set_ms(12_000);
        assert_eq!(mono.now_ms(), 12_000);
        mono.raise_floor(20_000);
        assert_eq!(mono.now_ms(), 20_000);
    }
}
