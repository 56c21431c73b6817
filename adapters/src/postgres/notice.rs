//! Lock release notices on Postgres: `pg_notify` through the pool, `LISTEN` on a dedicated
//! connection (see keel-primitives' `backend::notice`).
//!
//! The channel is `keel_released_` and a 64-bit FNV-1a hash of the table's quoted name, so
//! two tables' locks do not wake each other and the name stays within Postgres's 63-byte
//! identifier limit. The payload is text (a `NOTIFY` payload must be): the publishing
//! handle's 8-byte id and the key, both in hex (a 1,024-byte key makes 2,064 characters,
//! well under the 8,000-byte payload limit). A handle drops its own notices.
//!
//! `NOTIFY` is delivered when its transaction commits; `pg_notify` outside a transaction
//! commits at once. The listening connection starts on the first [`Notices::receiver`] call,
//! reconnects after a failure with a capped backoff, sends [`ReleaseNotice::Missed`] whenever
//! it (re)starts listening, and is closed when the last clone of the backend is dropped.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use keel_primitives::backend::notice::{ReleaseSender, release_channel};
use keel_primitives::backend::{ReleaseNotice, ReleaseNotices};
use rustls::ClientConfig;
use tokio::sync::oneshot;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Config, NoTls, Socket};

const RELISTEN_INITIAL: Duration = Duration::from_millis(100);
const RELISTEN_MAX: Duration = Duration::from_secs(5);

/// One backend handle's notices (shared by its clones).
pub(super) struct Notices {
    /// Which handle published a notice, in hex.
    id: String,
    channel: String,
    config: Config,
    tls: Option<ClientConfig>,
    sender: OnceLock<ReleaseSender>,
    /// Dropped with the last backend clone, which stops the listening task.
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl Notices {
    pub(super) fn new(table_quoted: &str, config: Config, tls: Option<ClientConfig>) -> Notices {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in table_quoted.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        Notices {
            id: hex(&rand::random::<[u8; 8]>()),
            channel: format!("keel_released_{hash:016x}"),
            config,
            tls,
            sender: OnceLock::new(),
            stop: Mutex::new(None),
        }
    }

    pub(super) fn channel(&self) -> &str {
        &self.channel
    }

    /// The payload that announces `key`'s release.
    pub(super) fn payload(&self, key: &[u8]) -> String {
        let mut p = String::with_capacity(self.id.len() + 2 * key.len());
        p.push_str(&self.id);
        p.push_str(&hex(key));
        p
    }

    /// A receiver of other handles' notices; starts listening on the first call. `None`
    /// outside a Tokio runtime.
    pub(super) fn receiver(&self) -> Option<ReleaseNotices> {
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
        runtime.spawn(listen_forever(
            self.config.clone(),
            self.tls.clone(),
            self.channel.clone(),
            self.id.clone(),
            sender.clone(),
            stop_rx,
        ));
        *stop = Some(stop_tx);
        let _ = self.sender.set(sender);
        Some(receiver)
    }
}

/// Keeps a `LISTEN` connection open until `stop` fires, forwarding other handles' notices to
/// `sender`.
async fn listen_forever(
    config: Config,
    tls: Option<ClientConfig>,
    channel: String,
    own: String,
    sender: ReleaseSender,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = RELISTEN_INITIAL;
    loop {
        let mut listened = false;
        let session = async {
            match &tls {
                None => listen_once(&config, NoTls, &channel, &own, &sender, &mut listened).await,
                Some(tls) => {
                    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone());
                    listen_once(&config, tls, &channel, &own, &sender, &mut listened).await
                }
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            why = session => {
                tracing::debug!(%why, "release notices: listening again; waiters poll meanwhile");
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = if listened {
            RELISTEN_INITIAL
        } else {
            (backoff * 2).min(RELISTEN_MAX)
        };
    }
}

/// One listening connection, until it fails; returns why it ended.
async fn listen_once<T>(
    config: &Config,
    tls: T,
    channel: &str,
    own: &str,
    sender: &ReleaseSender,
    listened: &mut bool,
) -> String
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = match config.connect(tls).await {
        Ok(pair) => pair,
        Err(e) => return format!("connect: {e}"),
    };
    // The connection delivers notifications only while it is polled, so it is polled here,
    // next to the LISTEN statement, and then on its own.
    let driver = async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    let payload = n.payload();
                    if payload.len() < own.len() || payload.starts_with(own) {
                        continue;
                    }
                    if let Some(key) = unhex(&payload[own.len()..]) {
                        let _ = sender.send(ReleaseNotice::Released(key));
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return format!("connection: {e}"),
                None => return "the connection closed".to_owned(),
            }
        }
    };
    tokio::pin!(driver);
    let listen = format!("LISTEN {channel}");
    tokio::select! {
        why = &mut driver => return why,
        done = client.batch_execute(&listen) => {
            if let Err(e) = done {
                return format!("LISTEN: {e}");
            }
        }
    }
    *listened = true;
    let _ = sender.send(ReleaseNotice::Missed);
    let why = driver.await;
    drop(client);
    why
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_odd_or_bad_text() {
        let key = b"lock:{\x00\xff job}";
        assert_eq!(unhex(&hex(key)).as_deref(), Some(&key[..]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
