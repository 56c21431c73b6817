//! In-process single-flight: one computation per key per process, every other caller of that
//! key awaits its outcome. Outcomes are type-erased (`Arc<dyn Any>`) so one map serves every
//! value type; a caller that finds an outcome of another type (two types cached under one
//! key, a misuse) computes for itself instead.
//!
//! A leader that is dropped before it finishes (its caller was cancelled) drops its sender:
//! the followers see the channel close and one of them becomes the next leader.

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
