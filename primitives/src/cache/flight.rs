//! In-process single-flight: one computation per key per process, every other caller of that
//! key awaits its outcome. Outcomes are type-erased (`Arc<dyn Any>`) so one map serves every
//! value type; a caller that finds an outcome of another type (two types cached under one
//! key, a misuse) computes for itself instead.
//!
//! A leader that is dropped before it finishes (its caller was cancelled) drops its sender:
//! the followers see the channel close and one of them becomes the next leader.
//!
//! `Collapser` (feature `http`) adds a cross-process lease for work whose result the caller
//! finds by itself afterwards: the HTTP cache's misses.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// A finished computation, shared with the followers.
pub(crate) type Outcome = Arc<dyn Any + Send + Sync>;

type Slot = watch::Receiver<Option<Outcome>>;

/// The flights in progress, by key.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<Vec<u8>, Slot>>,
}

/// What [`Flights::join`] makes of a caller.
pub(crate) enum Role<'a> {
    /// Compute, then [`Leader::finish`].
    Leader(Leader<'a>),
    /// Someone else computes: await [`follow`].
    Follower(Slot),
}

/// The one caller computing a key; dropping it unfinished hands the key to a follower.
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: Vec<u8>,
    tx: watch::Sender<Option<Outcome>>,
}

impl Flights {
    /// Leads the key's flight, or follows the one in progress.
    pub(crate) fn join(&self, key: &[u8]) -> Role<'_> {
        // The lock is never held across an await, and nothing under it can panic except an
        // allocation failure, so poisoning cannot happen in practice; recover anyway.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = map.get(key)
            && rx.has_changed().is_ok()
        {
            return Role::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.to_vec(), rx);
        Role::Leader(Leader {
            flights: self,
            key: key.to_vec(),
            tx,
        })
    }

    /// Keys with a flight in progress (for tests and stats).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Leader<'_> {
    /// Publishes the outcome to every follower and ends the flight.
    pub(crate) fn finish(self, outcome: Outcome) {
        // Remove first: a caller arriving after this point starts a new flight (and reads the
        // value just stored) rather than joining a finished one.
        self.remove();
        self.tx.send_replace(Some(outcome));
    }

    fn remove(&self) {
        let mut map = self.flights.map.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            map.remove(&self.key);
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        // Finished or abandoned: either way the entry must not outlive the leader.
        self.remove();
    }
}

/// The leader's outcome, or `None` if the leader was dropped without one.
pub(crate) async fn follow(mut rx: Slot) -> Option<Outcome> {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.clone(),
        Err(_) => None,
    }
}

#[cfg(feature = "http")]
pub(crate) use collapse::{Collapsed, Collapser};

/// Single-flight plus a lease, for the HTTP cache's misses.
#[cfg(feature = "http")]
mod collapse {
    use std::future::Future;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};

    use super::{Flights, Role, follow};
    use crate::Backend;
    use crate::cache::{LeaseGuard, NONCE_BYTES, POLL_MAX, POLL_MIN, bump};

    /// The outcome of [`Collapser::run`].
    pub(crate) enum Collapsed<R> {
        /// This caller did the work.
        Ran(R),
        /// Another caller (here or in another process) did it; look for its result.
        Waited,
    }

    /// Single-flight plus a lease, for work whose result the caller finds by itself afterwards
    /// (the HTTP cache re-reads the stored response): one runner per key in the process, one
    /// across processes; everyone else waits until the runner is done (or its lease is gone) and
    /// is told so.
    pub(crate) struct Collapser {
        backend: Arc<dyn Backend>,
        flights: Flights,
        pub(crate) lease_ttl: Duration,
        lease_wait: Duration,
        /// Callers that waited for another's work (in this process or another).
        pub(crate) waits: AtomicU64,
    }

    impl Collapser {
        pub(crate) fn new(
            backend: Arc<dyn Backend>,
            lease_ttl: Duration,
            lease_wait: Duration,
        ) -> Self {
            Collapser {
                backend,
                flights: Flights::default(),
                lease_ttl,
                lease_wait,
                waits: AtomicU64::new(0),
            }
        }

        /// Runs `work` unless someone else holds the key; the backend failing means running it.
        pub(crate) async fn run<R, Fut>(&self, lease_key: &[u8], work: Fut) -> Collapsed<R>
        where
            Fut: Future<Output = R>,
        {
            let leader = loop {
                match self.flights.join(lease_key) {
                    Role::Follower(rx) => {
                        bump(&self.waits);
                        if follow(rx).await.is_some() {
                            return Collapsed::Waited;
                        }
                    }
                    Role::Leader(leader) => break leader,
                }
            };
            let nonce: [u8; NONCE_BYTES] = rand::random();
            match self
                .backend
                .set_nx(lease_key, &nonce, Some(self.lease_ttl))
                .await
            {
                Ok(true) => {
                    let guard = LeaseGuard {
                        backend: Arc::clone(&self.backend),
                        key: lease_key.to_vec(),
                        nonce,
                        armed: true,
                    };
                    let r = work.await;
                    guard.release().await;
                    leader.finish(Arc::new(()));
                    return Collapsed::Ran(r);
                }
                Ok(false) => bump(&self.waits),
                Err(e) => {
                    tracing::warn!(target: "keel::cache", error = %e,
                        "cache lease failed; running without collapsing");
                    let r = work.await;
                    leader.finish(Arc::new(()));
                    return Collapsed::Ran(r);
                }
            }
            // Another process holds the key. Wait until its lease is gone (released after it
            // stored its result, or expired with its holder), and never take it over: the lease
            // may be released between a poll and a retake, and the retake would run the work a
            // second time. The caller looks for the stored result and, if there is none (not
            // storable, or the holder died), does the work itself.
            let deadline = Instant::now() + self.lease_wait;
            let mut delay = POLL_MIN;
            loop {
                if Instant::now() >= deadline {
                    let r = work.await;
                    leader.finish(Arc::new(()));
                    return Collapsed::Ran(r);
                }
                tokio::time::sleep(delay.mul_f64(rand::random_range(0.5..=1.0))).await;
                delay = (delay * 2).min(POLL_MAX);
                match self.backend.get(lease_key).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        leader.finish(Arc::new(()));
                        return Collapsed::Waited;
                    }
                    Err(e) => {
                        tracing::warn!(target: "keel::cache", error = %e,
                            "cache lease poll failed; running without collapsing");
                        let r = work.await;
                        leader.finish(Arc::new(()));
                        return Collapsed::Ran(r);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_outcome() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join(b"k") else {
            panic!("first caller leads")
        };
        let Role::Follower(rx) = flights.join(b"k") else {
            panic!("second caller follows")
        };
        leader.finish(Arc::new(7u32));
        let got = follow(rx).await.unwrap();
        assert_eq!(got.downcast_ref::<u32>(), Some(&7));
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join(b"k"), Role::Leader(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_hands_the_key_on() {
        let flights = Flights::default();
        let leader = flights.join(b"k");
        let Role::Follower(rx) = flights.join(b"k") else {
            panic!("second caller follows")
        };
        drop(leader);
        assert!(follow(rx).await.is_none());
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join(b"k"), Role::Leader(_)));
    }
}
