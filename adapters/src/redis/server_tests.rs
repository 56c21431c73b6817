//! Tests against servers this module starts or configures itself: faults a production network
//! has, on scratch Redis and Valkey servers (a path that stops delivering, frozen by a loopback
//! proxy; a failover that demotes the primary behind a stable address; a crash restart),
//! scratch clusters (refusal of a plain URL, resharding), and TLS. Deterministic: the proxy holds bytes until told, servers are demoted by
//! command, and every wait is a bounded poll for a state, not a sleep hoping for one.

use std::time::Duration;

use keel_primitives::{Backend, ErrorKind};
use tokio::time::Instant;

use super::{RedisBackend, RedisOptions};
use crate::fault_proxy::FaultProxy;
use crate::scratch::{Kind, Scratch};

/// Long enough that a loaded machine never times out an operation that should succeed; the
/// operations meant to time out wait on a frozen path, whatever the bound.
const OP_TIMEOUT: Duration = Duration::from_secs(1);

async fn through(proxy: &FaultProxy, kind: Kind) -> RedisBackend {
    let url = format!("{}://{}/", kind.scheme(), proxy.addr());
    let options = RedisOptions::default()
        .with_op_timeout(OP_TIMEOUT)
        .with_connect_timeout(OP_TIMEOUT * 2);
    RedisBackend::connect_with(&url, options).await.unwrap()
}

/// The server's client IDs (one per line of `CLIENT LIST`), without the asking connection.
fn client_ids(server: &Scratch) -> Vec<String> {
    let list = server.cli(&["CLIENT", "LIST"]).unwrap();
    list.lines()
        .filter(|l| !l.contains("cmd=client|list") && !l.contains("cmd=client "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("id="))
                .map(str::to_owned)
        })
        .collect()
}

/// A silent drop: the handle's path stops delivering. The timed-out `SET` is held by a
/// middlebox that delivers it later; the handle must reconnect within a few op timeouts, kill
/// the old connection first, and the held `SET` must never land after the later one.
async fn silent_drop_recovers_and_the_timed_out_write_never_lands(kind: Kind) {
    let server = Scratch::start(kind, &[]);
    let proxy = FaultProxy::start_buffering(server.addr()).await;
    let b = through(&proxy, kind).await;
    b.set(b"k", b"v", None).await.unwrap();
    let before = client_ids(&server);
    assert_eq!(before.len(), 1, "one connection: {before:?}");

    proxy.freeze_existing();
    let frozen_at = Instant::now();
    let err = b
        .set(b"k", b"w", None)
        .await
        .expect_err("the path is frozen");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        err.to_string().contains("will not take effect after"),
        "{err}"
    );

    // The next operation reconnects (a new flow through the proxy is not frozen).
    b.set(b"k", b"x", None).await.unwrap();
    let recovered = frozen_at.elapsed();
    assert!(
        recovered < OP_TIMEOUT * 3,
        "recovered after {recovered:?}, more than 3 op timeouts"
    );
    assert_eq!(b.reconnects(), 1);
    let after = client_ids(&server);
    assert!(
        !after.contains(&before[0]),
        "the abandoned connection {} was not killed before the new one was used: {after:?}",
        before[0]
    );

    // Heal the path: the middlebox delivers the held SET w to a socket the server closed.
    proxy.thaw();
    proxy.drained().await;
    assert_eq!(server.cli(&["GET", "k"]).unwrap(), "x");
    assert_eq!(b.get(b"k").await.unwrap(), Some(b"x".to_vec()));
}

/// A failover behind a stable address: the old primary is demoted (`REPLICAOF`), the replica
/// promoted, and the address now leads to it. The handle's connection to the demoted server
/// answers `READONLY`; the handle must reconnect and write to the new primary.
async fn readonly_after_failover_reconnects_to_the_new_primary(kind: Kind) {
    let a = Scratch::start(kind, &[]);
    let port = a.port.to_string();
    let b_server = Scratch::start(kind, &["--replicaof", "127.0.0.1", &port]);
    b_server.wait_replica_synced();
    let proxy = FaultProxy::start(a.addr()).await;
    let b = through(&proxy, kind).await;
    b.set(b"k", b"1", None).await.unwrap();

    // Fail over: promote the replica, demote the primary, move the address.
    assert_eq!(b_server.cli(&["REPLICAOF", "NO", "ONE"]).unwrap(), "OK");
    let new_primary = b_server.port.to_string();
    assert_eq!(
        a.cli(&["REPLICAOF", "127.0.0.1", &new_primary]).unwrap(),
        "OK"
    );
    proxy.set_upstream(b_server.addr());

    let err = b
        .set(b"k", b"2", None)
        .await
        .expect_err("the old primary is read-only now");
    assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
    // One retry reaches the new primary.
    b.set(b"k", b"2", None).await.unwrap();
    assert_eq!(b.reconnects(), 1);
    assert_eq!(b_server.cli(&["GET", "k"]).unwrap(), "2");
}

/// A caller that gives up (drops the future) does not hold up unrelated calls, and the
/// cancelled write cannot land after a later acknowledged one (commands on one connection run
/// in order, and a replaced connection is killed first).
async fn cancelled_call_leaves_the_handle_usable(kind: Kind) {
    let server = Scratch::start(kind, &[]);
    let proxy = FaultProxy::start(server.addr()).await;
    let b = through(&proxy, kind).await;
    b.set(b"k", b"v", None).await.unwrap();
    proxy.freeze_existing();
    let cancelled = tokio::time::timeout(Duration::from_millis(50), b.set(b"k", b"w", None)).await;
    assert!(
        cancelled.is_err(),
        "the frozen call was cancelled by its caller"
    );
    // The next call times out on the frozen connection, abandoning it; the one after works.
    let started = Instant::now();
    let first = b.get(b"other").await;
    let second = b.set(b"k", b"x", None).await;
    assert!(
        first.is_ok()
            || first
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::Timeout),
        "{first:?}"
    );
    second.unwrap();
    assert!(
        started.elapsed() < OP_TIMEOUT * 3,
        "{:?}",
        started.elapsed()
    );
    proxy.thaw();
    proxy.drained().await;
    assert_eq!(server.cli(&["GET", "k"]).unwrap(), "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_silent_drop_recovers_and_the_timed_out_write_never_lands() {
    silent_drop_recovers_and_the_timed_out_write_never_lands(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_silent_drop_recovers_and_the_timed_out_write_never_lands() {
    silent_drop_recovers_and_the_timed_out_write_never_lands(Kind::Valkey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_readonly_after_failover_reconnects_to_the_new_primary() {
    readonly_after_failover_reconnects_to_the_new_primary(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_readonly_after_failover_reconnects_to_the_new_primary() {
    readonly_after_failover_reconnects_to_the_new_primary(Kind::Valkey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cancelled_call_leaves_the_handle_usable() {
    cancelled_call_leaves_the_handle_usable(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_cancelled_call_leaves_the_handle_usable() {
    cancelled_call_leaves_the_handle_usable(Kind::Valkey).await;
}

/// The rate-limit step survives a script cache flush (a restart, `SCRIPT FLUSH`): the
/// `NOSCRIPT` reply reloads the script and the step continues from the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_step_reloads_its_script_after_a_flush() {
    use keel_primitives::backend::{RateAlgorithm, RateMode, RateRule};
    for kind in [Kind::Redis, Kind::Valkey] {
        let server = Scratch::start(kind, &[]);
        let b = RedisBackend::connect(&server.url()).await.unwrap();
        let rules = [RateRule {
            key: b"limited",
            algorithm: RateAlgorithm::Gcra,
            limit: 3,
            period_ms: 3_600_000,
            burst: 3,
            cost: 1,
        }];
        let mut admitted = Vec::new();
        for i in 0..5 {
            let sha = super::RATE_LIMIT.get_hash();
            if i == 2 {
                assert_eq!(server.cli(&["SCRIPT", "EXISTS", sha]).unwrap().trim(), "1");
                assert_eq!(server.cli(&["SCRIPT", "FLUSH"]).unwrap(), "OK");
                assert_eq!(server.cli(&["SCRIPT", "EXISTS", sha]).unwrap().trim(), "0");
            }
            let outcome = b.rate_limit(&rules, RateMode::Consume, None).await;
            admitted.push(outcome.unwrap().admitted);
            assert_eq!(
                server.cli(&["SCRIPT", "EXISTS", sha]).unwrap().trim(),
                "1",
                "{kind:?}: step {i} ran the native script"
            );
        }
        assert_eq!(admitted, [true, true, true, false, false], "{kind:?}");
    }
}

/// Fencing counters survive a crash: with the append-only file on and `appendfsync everysec`
/// (where a plain `INCR` acknowledged in the last second is lost by a crash), `incr_durable`
/// waits for the fsync (`WAITAOF`), so after `kill -9` and a restart the next token is higher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_fencing_counter_survives_a_crash_restart() {
    let args = ["--appendonly", "yes", "--appendfsync", "everysec"];
    let server = Scratch::start(Kind::Valkey, &args);
    let b = RedisBackend::connect(&server.url()).await.unwrap();
    for expected in 1..=5 {
        assert_eq!(b.incr_durable(b"fence", 1, None).await.unwrap(), expected);
    }
    drop(b);
    let server = server.crash_and_restart(&args);
    let b = RedisBackend::connect(&server.url()).await.unwrap();
    assert_eq!(b.incr_durable(b"fence", 1, None).await.unwrap(), 6);
}

/// A server that cannot make the counter durable refuses with a typed error that says what
/// to change, instead of handing out tokens that can repeat; `fencing=best-effort` opts out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_without_an_append_only_file_is_refused() {
    for kind in [Kind::Redis, Kind::Valkey] {
        let server = Scratch::start(kind, &[]);
        let b = RedisBackend::connect(&server.url()).await.unwrap();
        let err = b
            .incr_durable(b"fence", 1, None)
            .await
            .expect_err("no AOF: not durable");
        assert_eq!(err.kind(), ErrorKind::Permanent, "{kind:?}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("appendonly") || text.contains("older than Redis 7.2"),
            "{kind:?}: {text}"
        );
        assert!(text.contains("fencing=best-effort"), "{text}");
        let relaxed = RedisBackend::connect(&format!("{}?fencing=best-effort", server.url()))
            .await
            .unwrap();
        let n = relaxed.incr_durable(b"fence", 1, None).await.unwrap();
        assert!(n >= 1);
    }
}

/// Two scratch primaries in one cluster, half the slots each.
fn scratch_cluster(kind: Kind) -> (Scratch, Scratch) {
    let args = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ];
    let a = Scratch::start(kind, &args);
    let b = Scratch::start(kind, &args);
    assert_eq!(
        a.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "8191"]).unwrap(),
        "OK"
    );
    assert_eq!(
        b.cli(&["CLUSTER", "ADDSLOTSRANGE", "8192", "16383"])
            .unwrap(),
        "OK"
    );
    let b_port = b.port.to_string();
    assert_eq!(
        a.cli(&["CLUSTER", "MEET", "127.0.0.1", &b_port]).unwrap(),
        "OK"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for node in [&a, &b] {
        while !node
            .cli(&["CLUSTER", "INFO"])
            .is_some_and(|i| i.contains("cluster_state:ok"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the scratch cluster never formed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (a, b)
}

/// A plain URL to a cluster node is refused with the URL form to use, instead of half working.
async fn plain_url_to_a_cluster_node_is_refused(kind: Kind) {
    let (a, _b) = scratch_cluster(kind);
    let err = RedisBackend::connect(&a.url())
        .await
        .expect_err("a cluster node behind a plain URL");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("+cluster://"), "{err}");
}

/// Resharding while the backend works: the slot of the test keys moves from one primary to
/// the other by hand (`SETSLOT MIGRATING/IMPORTING`, `MIGRATE`, `SETSLOT NODE`). Operations
/// during the move follow `ASK`, and after it `MOVED`, and never lose a key.
async fn resharding_is_followed(kind: Kind) {
    let (a, b) = scratch_cluster(kind);
    let url = format!(
        "{}+cluster://127.0.0.1:{},127.0.0.1:{}/?fencing=best-effort",
        kind.scheme(),
        a.port,
        b.port
    );
    let backend = RedisBackend::connect(&url).await.unwrap();
    assert!(backend.is_cluster());
    backend.set(b"{moving}old", b"1", None).await.unwrap();
    let slot = a.cli(&["CLUSTER", "KEYSLOT", "{moving}"]).unwrap();
    let (src, dst) = if slot.parse::<u16>().unwrap() <= 8191 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let src_id = src.cli(&["CLUSTER", "MYID"]).unwrap();
    let dst_id = dst.cli(&["CLUSTER", "MYID"]).unwrap();
    assert_eq!(
        dst.cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id])
            .unwrap(),
        "OK"
    );
    assert_eq!(
        src.cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id])
            .unwrap(),
        "OK"
    );
    // Mid-migration: a new key in the slot goes to the importing node (ASK); the old key is
    // still read from the source.
    backend.set(b"{moving}new", b"2", None).await.unwrap();
    assert_eq!(
        backend.get(b"{moving}old").await.unwrap(),
        Some(b"1".to_vec())
    );
    let dst_port = dst.port.to_string();
    let migrated = src
        .cli(&[
            "MIGRATE",
            "127.0.0.1",
            &dst_port,
            "",
            "0",
            "5000",
            "KEYS",
            "{moving}old",
        ])
        .unwrap();
    assert_eq!(migrated, "OK");
    // The key has left the source: ASK leads to it.
    assert_eq!(
        backend.get(b"{moving}old").await.unwrap(),
        Some(b"1".to_vec())
    );
    for node in [src, dst] {
        assert_eq!(
            node.cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id])
                .unwrap(),
            "OK"
        );
    }
    // Moved for good: MOVED leads to the new owner.
    assert_eq!(backend.incr(b"{moving}n", 5, None).await.unwrap(), 5);
    assert_eq!(
        backend.get(b"{moving}old").await.unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(
        backend.get(b"{moving}new").await.unwrap(),
        Some(b"2".to_vec())
    );
    assert_eq!(dst.cli(&["GET", "{moving}n"]).unwrap(), "5");
    // The scan covers both primaries.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = backend
            .scan(b"{moving}", cursor.as_ref(), 10)
            .await
            .unwrap();
        seen.extend(page.keys);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_plain_url_to_a_cluster_node_is_refused() {
    plain_url_to_a_cluster_node_is_refused(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_plain_url_to_a_cluster_node_is_refused() {
    plain_url_to_a_cluster_node_is_refused(Kind::Valkey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_resharding_is_followed() {
    resharding_is_followed(Kind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_cluster_resharding_is_followed() {
    resharding_is_followed(Kind::Valkey).await;
}

/// `rediss://` with a private CA: the connection works and is checked; without the CA (system
/// roots) or under a name the certificate does not carry, it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connects_with_a_private_ca_and_checks_the_certificate() {
    let url = super::test_server::url(
        "KEEL_TEST_REDIS_TLS_URL",
        "rediss://localhost:6390/?tls_ca_file=/path/ca.crt",
    );
    let b = RedisBackend::connect(&url).await.unwrap();
    let key = super::test_server::unique("tls");
    b.set(&key, b"over tls", Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(b.get(&key).await.unwrap(), Some(b"over tls".to_vec()));

    let (base, query) = url.split_once('?').unwrap();
    let without_ca: Vec<&str> = query
        .split('&')
        .filter(|p| !p.starts_with("tls_ca_file="))
        .collect();
    let untrusted = format!("{base}?{}", without_ca.join("&"));
    let err = RedisBackend::connect(&untrusted)
        .await
        .expect_err("the private CA is not a system root");
    assert_ne!(err.kind(), ErrorKind::InvalidInput, "{err}");
    // The certificate names localhost, not 127.0.0.1.
    let wrong_name = url.replace("localhost", "127.0.0.1");
    RedisBackend::connect(&wrong_name)
        .await
        .expect_err("the certificate does not name 127.0.0.1");
    // A CA file on a plain URL is a mistake, said at once.
    let plain = RedisBackend::connect("redis://127.0.0.1:6379/?tls_ca_file=/ca.crt").await;
    assert_eq!(plain.err().map(|e| e.kind()), Some(ErrorKind::InvalidInput));
}
