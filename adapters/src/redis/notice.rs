//! Lock release notices on Redis and Valkey: `PUBLISH` on one channel per logical database,
//! `SUBSCRIBE` on a dedicated connection (see keel-primitives' `backend::notice`).
//!
//! The channel is `keel:released:<db>` (pub/sub channels are server-wide, not per database;
//! the number keeps two databases' locks apart). A message is the publishing handle's 8-byte
//! id followed by the key, so a handle drops its own notices (its releases already woke its
//! waiters in-process). On a cluster the notice is published through the cluster client (any
//! node: classic pub/sub reaches every node over the cluster bus) and received on a plain
//! connection to one seed node, the next seed after a failure.
//!
//! The subscription starts on the first [`Notices::receiver`] call and lives until the last
//! clone of the backend is dropped. Whenever it is (re)established it sends
//! [`ReleaseNotice::Missed`], so a waiter that parked while no subscription was live tries
//! again instead of sleeping through a release it could not hear.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use keel_primitives::backend::notice::{ReleaseSender, release_channel};
use keel_primitives::backend::{ReleaseNotice, ReleaseNotices};
use redis::Client;
use tokio::sync::oneshot;

/// The first wait before subscribing again after a failure; it doubles up to the maximum.
const RESUBSCRIBE_INITIAL: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(5);

/// One backend handle's notices (shared by its clones).
pub(crate) struct Notices {
    /// Which handle published a notice.
    id: [u8; 8],
    channel: String,
    /// Where to subscribe: the server, or each seed of a cluster in turn.
    clients: Vec<Client>,
    connect_timeout: Duration,
    sender: OnceLock<ReleaseSender>,
    /// Dropped with the last backend clone, which stops the subscription task.
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl Notices {
    pub(crate) fn new(db: i64, clients: Vec<Client>, connect_timeout: Duration) -> Notices {
        Notices {
            id: rand::random(),
            channel: format!("keel:released:{db}"),
            clients,
            connect_timeout,
            sender: OnceLock::new(),
            stop: Mutex::new(None),
        }
    }

    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// The message that announces `key`'s release.
    pub(crate) fn message(&self, key: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(self.id.len() + key.len());
        m.extend_from_slice(&self.id);
        m.extend_from_slice(key);
        m
    }

    /// A receiver of other handles' notices; starts the subscription on the first call.
    /// `None` outside a Tokio runtime (there is nothing to run the subscription on).
    pub(crate) fn receiver(&self) -> Option<ReleaseNotices> {
        if let Some(sender) = self.sender.get() {
            return Some(ReleaseNotices::new(sender));
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let mut stop = self.stop.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = self.sender.get() {
            return Some(ReleaseNotices::new(sender));
        }
        let sender = release_channel();
        let receiver = ReleaseNotices::new(&sender);
        let (stop_tx, stop_rx) = oneshot::channel();
        runtime.spawn(subscribe_forever(
            self.clients.clone(),
            self.channel.clone(),
            self.id,
            self.connect_timeout,
            sender.clone(),
            stop_rx,
        ));
        *stop = Some(stop_tx);
        let _ = self.sender.set(sender);
        Some(receiver)
    }
}

/// Keeps a subscription to `channel` open until `stop` fires, forwarding other handles'
/// notices to `sender`.
async fn subscribe_forever(
    clients: Vec<Client>,
    channel: String,
    own: [u8; 8],
    connect_timeout: Duration,
    sender: ReleaseSender,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = RESUBSCRIBE_INITIAL;
    for client in clients.iter().cycle() {
        let mut subscribed = false;
        let session = async {
            let mut pubsub = tokio::time::timeout(connect_timeout, client.get_async_pubsub())
                .await
                .map_err(|_| "timed out connecting".to_owned())?
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(connect_timeout, pubsub.subscribe(&channel))
                .await
                .map_err(|_| "timed out subscribing".to_owned())?
                .map_err(|e| e.to_string())?;
            subscribed = true;
            let _ = sender.send(ReleaseNotice::Missed);
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let payload = message.get_payload_bytes();
                if payload.len() < own.len() || payload[..own.len()] == own {
                    continue;
                }
                let key = payload[own.len()..].to_vec();
                let _ = sender.send(ReleaseNotice::Released(key));
            }
            Err::<(), String>("the subscription connection closed".to_owned())
        };
        tokio::select! {
            _ = &mut stop => return,
            Err(why) = session => {
                tracing::debug!(%why, "release notices: resubscribing; waiters poll meanwhile");
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = if subscribed {
            RESUBSCRIBE_INITIAL
        } else {
            (backoff * 2).min(RESUBSCRIBE_MAX)
        };
    }
}
