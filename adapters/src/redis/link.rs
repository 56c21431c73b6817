//! The connection a [`RedisBackend`](super::RedisBackend) talks through, and how it is
//! replaced when it stops working.
//!
//! One multiplexed connection carries every operation (commands on it run in the order they
//! were sent). An operation that times out, or fails with an I/O error or a `READONLY` reply
//! (the primary behind the address was demoted), *abandons* the connection it used: the next
//! operation opens a fresh one. Before the fresh connection carries anything, the abandoned
//! connections are killed on the server (`CLIENT KILL ID`), so a command that was stuck on an
//! abandoned connection (held by a frozen network path, say) can never be executed after an
//! operation on the new connection was acknowledged: the server has closed the socket it
//! would arrive on. Sockets are closed abortively (`SO_LINGER` 0) and carry TCP keepalive
//! probes, so a silently dropped path is noticed by the kernel too.
//!
//! If the server refuses `CLIENT KILL` (an ACL without `+client|kill`), the fresh connection is
//! used anyway and a warning is logged: commands stuck on the abandoned connection then die
//! only when that connection's socket does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, RedisResult, ServerErrorKind, cmd};
use tokio::time::Instant;

/// Idle time before the first TCP keepalive probe, and between probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// After a failed reconnection, operations fail at once with that failure for this long
/// instead of each trying again, so a down server is not hammered by every caller.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// TCP settings for every connection: no Nagle delay, keepalive probes, abortive close.
pub(crate) fn tcp_settings() -> redis::io::tcp::TcpSettings {
    let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive)
        .set_linger_time(Duration::ZERO)
}

/// A connection in use, and which one it is.
#[derive(Clone)]
pub(crate) struct Lease {
    pub(crate) conn: MultiplexedConnection,
    generation: u64,
}

#[derive(Clone)]
struct Live {
    conn: MultiplexedConnection,
    generation: u64,
    /// The server's `CLIENT ID` for it, if the server told.
    id: Option<i64>,
}

/// The replaceable connection. Cheap to clone; clones share it.
#[derive(Clone)]
pub(crate) struct Link {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    current: Mutex<Option<Live>>,
    /// Held while a reconnection runs, so only one runs at a time.
    reconnecting: tokio::sync::Mutex<Option<(Instant, RedisError)>>,
    /// `CLIENT ID`s of abandoned connections, to kill before the next one is used.
    abandoned: Mutex<Vec<i64>>,
    generations: AtomicU64,
    reconnects: AtomicU64,
}

impl Link {
    /// Opens the first connection.
    pub(crate) async fn connect(client: Client, connect_timeout: Duration) -> RedisResult<Link> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(None);
        let inner = Inner {
            client,
            config,
            connect_timeout,
            current: Mutex::new(None),
            reconnecting: tokio::sync::Mutex::new(None),
            abandoned: Mutex::new(Vec::new()),
            generations: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        };
        let live = inner.open().await?;
        *inner.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(live);
        Ok(Link {
            inner: Arc::new(inner),
        })
    }

    /// The current connection, reconnecting first if it was abandoned. Callers bound this
    /// with their own deadline.
    pub(crate) async fn lease(&self) -> RedisResult<Lease> {
        if let Some(lease) = self.inner.current_lease() {
            return Ok(lease);
        }
        let mut last_failure = self.inner.reconnecting.lock().await;
        // Someone else may have reconnected while this caller waited.
        if let Some(lease) = self.inner.current_lease() {
            return Ok(lease);
        }
        if let Some((at, e)) = last_failure.as_ref()
            && at.elapsed() < RECONNECT_BACKOFF
        {
            return Err(e.clone());
        }
        match self.inner.open().await {
            Ok(live) => {
                *last_failure = None;
                self.inner.reconnects.fetch_add(1, Ordering::Relaxed);
                let lease = Lease {
                    conn: live.conn.clone(),
                    generation: live.generation,
                };
                *self.inner.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(live);
                Ok(lease)
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Stops using the connection `lease` came from (if it is still the current one): the
    /// next operation reconnects, and this one is killed on the server first.
    pub(crate) fn abandon(&self, lease: &Lease) {
        let mut current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().map(|l| l.generation) == Some(lease.generation) {
            let live = current.take();
            drop(current);
            if let Some(id) = live.and_then(|l| l.id) {
                self.inner
                    .abandoned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(id);
            }
        }
    }

    /// Connections opened after the first.
    pub(crate) fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }
}

impl Inner {
    fn current_lease(&self) -> Option<Lease> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().map(|l| Lease {
            conn: l.conn.clone(),
            generation: l.generation,
        })
    }

    /// Opens a connection, learns its `CLIENT ID`, and kills every abandoned connection.
    async fn open(&self) -> RedisResult<Live> {
        let deadline = Instant::now() + self.connect_timeout;
        let timed_out = || RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let mut conn = tokio::time::timeout_at(
            deadline,
            self.client
                .get_multiplexed_async_connection_with_config(&self.config),
        )
        .await
        .map_err(|_| timed_out())??;
        let id =
            match tokio::time::timeout_at(deadline, cmd("CLIENT").arg("ID").query_async(&mut conn))
                .await
            {
                Ok(Ok(id)) => Some(id),
                Ok(Err(e)) if e.is_io_error() => return Err(e),
                // An ACL or an old server: carry on without (see the module docs).
                Ok(Err(_)) => None,
                Err(_) => return Err(timed_out()),
            };
        let abandoned: Vec<i64> =
            std::mem::take(&mut *self.abandoned.lock().unwrap_or_else(|p| p.into_inner()));
        for (i, old) in abandoned.iter().enumerate() {
            let killed: RedisResult<()> = match tokio::time::timeout_at(
                deadline,
                cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(*old)
                    .query_async(&mut conn),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(timed_out()),
            };
            match killed {
                Ok(()) => {}
                // "No such client": it is gone already.
                Err(e) if !e.is_io_error() && e.to_string().contains("No such client") => {}
                Err(e) if e.is_io_error() => {
                    // Not killed yet: keep the rest for the next attempt.
                    self.abandoned
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&abandoned[i..]);
                    return Err(e);
                }
                Err(e) => tracing::warn!(
                    target: "keel::redis",
                    error = %e,
                    "could not kill an abandoned connection on the server; commands stuck on \
                     it can still run until its socket closes"
                ),
            }
        }
        Ok(Live {
            conn,
            generation: self.generations.fetch_add(1, Ordering::Relaxed),
            id,
        })
    }
}

/// Whether an error means the connection must be replaced: it broke, or the server behind the
/// address is now a read-only replica (a failover moved the primary elsewhere).
pub(crate) fn must_reconnect(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(ServerErrorKind::ReadOnly)
        )
}
