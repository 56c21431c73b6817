//! A loopback TCP proxy for fault tests: it forwards bytes between clients and a server and,
//! on command, freezes connections the way a network partition or a NAT/load balancer that
//! silently dropped a flow does.
//!
//! Model: while a connection is frozen, bytes sent on it are held "in the network"; nothing is
//! lost and nothing is delivered. When the connection thaws, held bytes are delivered only if
//! the socket that sent them is still open (TCP would retransmit them); a socket that was
//! closed or reset meanwhile loses them, as its packets would be. New connections are never
//! frozen by [`FaultProxy::freeze_existing`], so a client that reconnects gets through, which
//! is what happens after a silent flow drop or behind a load balancer after a failover.
//!
//! [`FaultProxy::start_buffering`] is the harsher model of a middlebox that accepted the bytes
//! and delivers them after the thaw whatever happened to their sender since.
//!
//! Test support only (compiled for this crate's tests).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Bytes one read moves at most.
const CHUNK_BYTES: usize = 64 * 1024;

/// A running proxy; it stops accepting when dropped (open connections end with their peers).
pub(crate) struct FaultProxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<watch::Sender<bool>>>>,
    upstream: Arc<Mutex<SocketAddr>>,
    held: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

/// What a pump needs besides its two sockets.
#[derive(Clone)]
struct PumpState {
    frozen: watch::Receiver<bool>,
    /// Chunks held right now, across every pump.
    held: Arc<AtomicUsize>,
    /// Deliver held bytes even if their sender closed meanwhile.
    buffering: bool,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port, forwarding to `upstream`: held bytes whose
    /// sender closed are lost (a network path).
    pub(crate) async fn start(upstream: SocketAddr) -> FaultProxy {
        FaultProxy::start_with(upstream, false).await
    }

    /// As [`FaultProxy::start`], but held bytes are delivered after the thaw even if their
    /// sender closed meanwhile (a buffering middlebox).
    pub(crate) async fn start_buffering(upstream: SocketAddr) -> FaultProxy {
        FaultProxy::start_with(upstream, true).await
    }

    async fn start_with(upstream: SocketAddr, buffering: bool) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<watch::Sender<bool>>>> = Arc::default();
        let upstream = Arc::new(Mutex::new(upstream));
        let held = Arc::new(AtomicUsize::new(0));
        let registry = Arc::clone(&conns);
        let target = Arc::clone(&upstream);
        let counter = Arc::clone(&held);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = *target.lock().unwrap();
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (frozen_tx, frozen_rx) = watch::channel(false);
                registry.lock().unwrap().push(frozen_tx);
                let state = PumpState {
                    frozen: frozen_rx,
                    held: Arc::clone(&counter),
                    buffering,
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, state.clone()));
                tokio::spawn(pump(server_read, client_write, state));
            }
        });
        FaultProxy {
            addr,
            conns,
            upstream,
            held,
            accept,
        }
    }

    /// Points new connections at another server (a virtual IP moving after a failover).
    pub(crate) fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    /// Chunks held by frozen connections right now (0 once a thaw has been fully processed).
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// The address clients connect to.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Freezes every connection open now, in both directions. Later connections flow.
    pub(crate) fn freeze_existing(&self) {
        for conn in self.conns.lock().unwrap().iter() {
            conn.send_replace(true);
        }
    }

    /// Thaws every connection: held bytes are delivered where their sender is still open.
    pub(crate) fn thaw(&self) {
        for conn in self.conns.lock().unwrap().iter() {
            conn.send_replace(false);
        }
    }

    /// Waits (bounded) until every held chunk was delivered or dropped after a thaw.
    pub(crate) async fn drained(&self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.held() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy still holds bytes 10 s after the thaw"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Copies `from` to `to`, holding each chunk while the connection is frozen.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut state: PumpState) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if *state.frozen.borrow() {
            state.held.fetch_add(1, Ordering::SeqCst);
            // Hold the chunk until the thaw; a dropped proxy ends the pump.
            let thawed = state.frozen.wait_for(|f| !*f).await.is_ok();
            // Lost with its sender, if it closed or reset meanwhile (unless buffering).
            let deliver = thawed && (state.buffering || sender_is_open(&mut from).await);
            let written = deliver && to.write_all(&buf[..n]).await.is_ok();
            state.held.fetch_sub(1, Ordering::SeqCst);
            if !written {
                break;
            }
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Whether the socket that sent the held bytes is still open: it has more to read, or
/// nothing yet (as opposed to an end of stream or a reset waiting to be read).
async fn sender_is_open(from: &mut OwnedReadHalf) -> bool {
    let mut probe = [0u8; 1];
    // A zero timeout still polls the peek once, so whatever is ready now is seen.
    match tokio::time::timeout(std::time::Duration::ZERO, from.peek(&mut probe)).await {
        Ok(Ok(0)) | Ok(Err(_)) => false,
        Ok(Ok(_)) | Err(_) => true,
    }
}
