//! Redis Cluster and Valkey Cluster: the URL forms, the connection, and the parts of the
//! contract that span nodes.
//!
//! A cluster is reached with `redis+cluster://[user:password@]host:port[,host:port...]` (or
//! `rediss+cluster://`, `valkey+cluster://`, `valkeys+cluster://`): the listed nodes are
//! seeds, the client learns the rest from the cluster. Every contract operation touches one
//! key, so it goes to the primary that owns the key's slot; `MOVED` and `ASK` replies during
//! resharding or after a failover are followed by the client. Multi-command operations
//! (`get_with_ttl`'s `MULTI`, `incr`'s `SET NX` + `INCRBY`, `incr_durable`'s `WAITAOF`) name
//! one key and so stay on one node. `scan` walks every primary in turn (its cursor names the
//! node and that node's cursor), and `delete_prefix` builds on it.
//!
//! A plain `redis://` URL that reaches a cluster node is refused at connect: it would work
//! only for the keys that node happens to own.

use keel_primitives::{Error, ErrorKind, Result};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

/// The cluster schemes (after the Valkey spellings were rewritten to Redis's).
const SCHEMES: [(&str, &str); 2] = [
    ("redis+cluster://", "redis://"),
    ("rediss+cluster://", "rediss://"),
];

/// The seed nodes' URLs, if `url` is a cluster URL: `redis+cluster://a:1,b:2/?x` →
/// `redis://a:1/`, `redis://b:2/` (credentials repeated on each).
pub(crate) fn seed_urls(url: &str) -> Option<Result<Vec<String>>> {
    let (rest, scheme) = SCHEMES.iter().find_map(|(cluster, plain)| {
        let head = url.get(..cluster.len())?;
        head.eq_ignore_ascii_case(cluster)
            .then(|| (&url[cluster.len()..], *plain))
    })?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let seeds: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|host| match userinfo {
            Some(u) => format!("{scheme}{u}@{host}/"),
            None => format!("{scheme}{host}/"),
        })
        .collect();
    if seeds.is_empty() {
        return Some(Err(Error::new(
            ErrorKind::InvalidInput,
            "a cluster URL names at least one node: redis+cluster://host:port[,host:port...]",
        )));
    }
    if rest[authority.len()..]
        .trim_start_matches('/')
        .split('?')
        .next()
        .is_some_and(|db| !db.is_empty() && db != "0")
    {
        return Some(Err(Error::new(
            ErrorKind::InvalidInput,
            "a cluster has only database 0; remove the database number from the URL",
        )));
    }
    Some(Ok(seeds))
}

/// Connects to the cluster through its seeds.
pub(crate) async fn connect(
    seeds: &[String],
    connect_timeout: std::time::Duration,
    tls_roots: Option<redis::TlsCertificates>,
) -> redis::RedisResult<ClusterConnection> {
    let mut builder = ClusterClient::builder(seeds.iter().map(String::as_str))
        .connection_timeout(connect_timeout)
        .tcp_settings(super::link::tcp_settings());
    if let Some(certificates) = tls_roots {
        builder = builder.certs(certificates);
    }
    let client = builder.build()?;
    client.get_async_connection().await
}

/// Slots in a cluster.
const SLOTS: u16 = 16_384;

/// The cluster slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag (the bytes
/// between the first `{` and the next `}`, when not empty), modulo 16,384.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as Redis Cluster uses.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The primaries named by a `CLUSTER NODES` reply, as `host:port`, sorted, without failed or
/// address-less nodes.
pub(crate) fn primaries(nodes: &str) -> Vec<String> {
    let mut out: Vec<String> = nodes
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _id = fields.next()?;
            let addr = fields.next()?;
            let flags = fields.next()?;
            let flags: Vec<&str> = flags.split(',').collect();
            let usable = flags.contains(&"master")
                && !flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "fail?" | "noaddr" | "handshake"));
            // `ip:port@cport[,hostname]`
            let addr = addr.split(['@', ',']).next()?;
            (usable && !addr.starts_with(':')).then(|| addr.to_owned())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A cluster scan cursor: which primary, and that primary's own cursor.
pub(crate) fn encode_cursor(node: &str, position: u64) -> Vec<u8> {
    format!("{node}/{position}").into_bytes()
}

/// Reads a cursor made by [`encode_cursor`].
pub(crate) fn decode_cursor(bytes: &[u8]) -> Result<(String, u64)> {
    let bad = || {
        Error::new(
            ErrorKind::InvalidInput,
            "not a cluster scan cursor (expected host:port/position from an earlier page)",
        )
    };
    let text = std::str::from_utf8(bytes).map_err(|_| bad())?;
    let (node, position) = text.rsplit_once('/').ok_or_else(bad)?;
    let position = position.parse().map_err(|_| bad())?;
    if node.is_empty() {
        return Err(bad());
    }
    Ok((node.to_owned(), position))
}

/// `host` and `port` of a `host:port` node address.
pub(crate) fn host_port(node: &str) -> Result<(String, u16)> {
    let (host, port) = node.rsplit_once(':').ok_or_else(|| {
        Error::new(
            ErrorKind::Permanent,
            format!("the cluster reported a node address without a port: {node}"),
        )
    })?;
    let port = port.parse().map_err(|_| {
        Error::new(
            ErrorKind::Permanent,
            format!("the cluster reported a node address with a bad port: {node}"),
        )
    })?;
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_become_seed_urls() {
        let seeds = seed_urls("redis+cluster://127.0.0.1:7001,127.0.0.1:7002/?fencing=aof")
            .unwrap()
            .unwrap();
        assert_eq!(
            seeds,
            ["redis://127.0.0.1:7001/", "redis://127.0.0.1:7002/"]
        );
        let seeds = seed_urls("rediss+cluster://u:p@a:1,b:2").unwrap().unwrap();
        assert_eq!(seeds, ["rediss://u:p@a:1/", "rediss://u:p@b:2/"]);
        assert!(seed_urls("redis://127.0.0.1:6379/").is_none());
        assert!(seed_urls("redis+cluster://").unwrap().is_err());
        assert!(seed_urls("redis+cluster://a:1/3").unwrap().is_err());
    }

    #[test]
    fn key_slots_match_redis_cluster() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        // A lock's lease and its per-name fencing counter of earlier versions share a slot,
        // whatever the name holds.
        for name in [&b"job"[..], b"a}b", b"{x}", b"\xff\x00"] {
            let lease = [&b"lock:{"[..], name, b"}"].concat();
            let fence = [&b"lock-fence:{"[..], name, b"}"].concat();
            assert_eq!(key_slot(&lease), key_slot(&fence), "{name:?}");
        }
    }

    #[test]
    fn primaries_come_from_cluster_nodes() {
        let nodes = "\
a1 127.0.0.1:7002@17002 master - 0 1 2 connected 5461-10922
a2 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
a3 127.0.0.1:7004@17004 slave a1 0 1 2 connected
a4 127.0.0.1:7003@17003,node-c master - 0 1 3 connected 10923-16383
a5 127.0.0.1:7005@17005 master,fail - 0 1 4 disconnected
a6 :0@0 master,noaddr - 0 1 5 disconnected";
        assert_eq!(
            primaries(nodes),
            ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        );
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = encode_cursor("127.0.0.1:7001", 42);
        assert_eq!(
            decode_cursor(&c).unwrap(),
            ("127.0.0.1:7001".to_owned(), 42)
        );
        assert!(decode_cursor(b"17").is_err());
        assert!(decode_cursor(b"/5").is_err());
        assert!(decode_cursor(b"a:1/x").is_err());
        assert_eq!(host_port("[::1]:7001").unwrap(), ("::1".to_owned(), 7001));
    }
}
