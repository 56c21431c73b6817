//! Release notices: how a lock released in one process wakes the tasks waiting for it in
//! another, on backends that can carry a message between processes (Redis and Valkey
//! `PUBLISH`/`SUBSCRIBE`, Postgres `NOTIFY`/`LISTEN`).
//!
//! A notice is a hint, never a guarantee. It can be lost (no subscriber yet, a reconnect, a
//! slow receiver), duplicated or late; waiters therefore keep polling as before and use a
//! notice only to try again at once. A backend that cannot carry notices keeps the defaults
//! ([`Backend::publish_release`](super::Backend::publish_release) does nothing and
//! [`Backend::release_notices`](super::Backend::release_notices) returns `None`), and its
//! waiters poll; waiters in the same process are woken by the lock itself either way.
//!
//! Each backend handle (with its clones) sees only the notices published through *other*
//! handles: its own releases already woke its own waiters in-process.

use tokio::sync::broadcast;

/// Notices a receiver keeps before it counts as lagging (it then gets one
/// [`ReleaseNotice::Missed`] instead of what it missed).
pub const RELEASE_NOTICES_BUFFERED: usize = 1024;

/// One message on a [`ReleaseNotices`] stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseNotice {
    /// The hold on this key was released (deleted by its owner) through another handle.
    Released(Vec<u8>),
    /// Notices may have been lost (the subscription was (re)established, or this receiver
    /// lagged): every waiter should try again.
    Missed,
}

/// The sending side an adapter keeps: a broadcast channel of [`ReleaseNotice`]s.
pub type ReleaseSender = broadcast::Sender<ReleaseNotice>;

/// A new sender with room for [`RELEASE_NOTICES_BUFFERED`] notices per receiver.
pub fn release_channel() -> ReleaseSender {
    broadcast::channel(RELEASE_NOTICES_BUFFERED).0
}

/// A stream of release notices from other handles of the same store, restricted to one key
/// prefix (a [`Namespaced`](crate::Namespaced) backend sees only its own keys, without the
/// prefix).
#[derive(Debug)]
pub struct ReleaseNotices {
    rx: broadcast::Receiver<ReleaseNotice>,
    prefix: Vec<u8>,
}

impl ReleaseNotices {
    /// Every notice `sender` sends from now on.
    pub fn new(sender: &ReleaseSender) -> Self {
        ReleaseNotices {
            rx: sender.subscribe(),
            prefix: Vec::new(),
        }
    }

    /// Only the notices for keys starting with `prefix` (after any prefix already applied),
    /// with `prefix` removed.
    #[must_use]
    pub fn within(mut self, prefix: &[u8]) -> Self {
        self.prefix.extend_from_slice(prefix);
        self
    }

    /// The next notice; `None` once the backend is gone (no more notices will come).
    pub async fn recv(&mut self) -> Option<ReleaseNotice> {
        loop {
            match self.rx.recv().await {
                Ok(ReleaseNotice::Released(key)) => {
                    if let Some(rest) = key.strip_prefix(self.prefix.as_slice()) {
                        return Some(ReleaseNotice::Released(rest.to_vec()));
                    }
                }
                Ok(ReleaseNotice::Missed) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    return Some(ReleaseNotice::Missed);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_prefix_filters_and_strips_and_lag_becomes_missed() {
        let tx = release_channel();
        let mut all = ReleaseNotices::new(&tx);
        let mut ns = ReleaseNotices::new(&tx).within(b"app:");
        tx.send(ReleaseNotice::Released(b"other:x".to_vec()))
            .unwrap();
        tx.send(ReleaseNotice::Released(b"app:lock".to_vec()))
            .unwrap();
        assert_eq!(
            all.recv().await,
            Some(ReleaseNotice::Released(b"other:x".to_vec()))
        );
        assert_eq!(
            ns.recv().await,
            Some(ReleaseNotice::Released(b"lock".to_vec()))
        );
        for _ in 0..=RELEASE_NOTICES_BUFFERED {
            tx.send(ReleaseNotice::Released(b"app:lock".to_vec()))
                .unwrap();
        }
        assert_eq!(ns.recv().await, Some(ReleaseNotice::Missed));
        drop(tx);
        drop(all);
        while let Some(n) = ns.recv().await {
            assert_eq!(n, ReleaseNotice::Released(b"lock".to_vec()));
        }
    }
}
