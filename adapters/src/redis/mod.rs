//! The [`Backend`] contract on Redis (6.0 or newer): [`RedisBackend`] and its [`RedisOptions`].
//! This module owns everything keel says to a server speaking Redis's protocol: how each
//! contract operation becomes commands, the Lua scripts for the conditional writes Redis has no
//! native command for, how the server is detected at connect, and how client errors are
//! classified into [`ErrorKind`]s. The [Valkey adapter](crate::valkey) is this implementation
//! with Valkey's native conditional commands switched on by what connect detected.
//!
//! All operations share one multiplexed connection; each operation is bounded by
//! [`RedisOptions::op_timeout`]. A timeout, a broken connection or a `READONLY` reply (a
//! failover demoted the server behind the address) replaces the connection, and the server
//! kills the old one before the new one carries anything (see `link`), so an operation that
//! failed with [`ErrorKind::Timeout`] either took effect before the error was returned or
//! never will: it cannot land after a later acknowledged operation of the same handle. Keys and values are sent as
//! bytes, never as text. TTLs are validated with [`ttl_ms`] and key and value sizes with
//! [`check_key`] and [`check_value`] before anything is sent, and TTLs travel in whole
//! milliseconds (`PX`, `PEXPIRE`, `PTTL`), so expiry is measured by the server's clock.
//!
//! How each operation maps:
//! - `get`: `GET`. `get_with_ttl`: `MULTI GET PTTL EXEC`, so value and TTL are read together.
//! - `set`: `SET [PX]`. `set_nx`, and `compare_and_swap` expecting an absent key: `SET NX [PX]`.
//! - `compare_and_swap` expecting a value: a Lua script comparing with `GET` and writing with
//!   `SET` plus `KEEPTTL`, `PX` or nothing for the three [`TtlPolicy`]s (Valkey 8.1 and newer:
//!   `SET IFEQ`).
//! - `compare_and_delete`: a Lua script (`GET`, then `DEL`) (Valkey 9.0 and newer: `DELIFEQ`).
//! - `incr`: `INCRBY`; with a TTL for a new key, `MULTI SET key 0 NX PX ttl, INCRBY EXEC`.
//!   Redis's integer grammar is the contract's, and its two error replies become
//!   [`ErrorKind::NotAnInteger`] and [`ErrorKind::Overflow`] with the value unchanged.
//! - `expire`, `persist`, `ttl`, `delete`: `PEXPIRE`, `PERSIST`, `PTTL`, `DEL`.
//! - `scan`: `SCAN cursor MATCH <escaped prefix>* COUNT limit`; the cursor is Redis's numeric
//!   cursor, and a key may come back more than once (the contract allows it). Redis takes
//!   `COUNT` as a hint, so a page may hold a few more keys than `limit`, or none.
//! - `now_ms`: `TIME`, floored so one handle never sees the server's time go backwards.
//! - `incr_durable`: `INCRBY` then `WAITAOF 1 n op_timeout` on the same connection, so it is
//!   acknowledged only once fsynced to the append-only file (and `n` replicas'); a server that
//!   cannot (no AOF, Redis before 7.2) gets a typed error, not a token that can repeat. See
//!   [`FencingDurability`] for the server settings that make fencing tokens safe.
//!
//! Scripts go by `EVALSHA`, loaded on the first `NOSCRIPT` reply (after a restart or a
//! `SCRIPT FLUSH`, too).

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use keel_primitives::backend::rate;
use keel_primitives::backend::{
    RateMode, RateOutcome, RateRule, ReleaseNotices, check_key, check_value, not_an_integer,
    overflow, ttl_ms,
};
use keel_primitives::{
    Backend, Error, ErrorKind, Result, SCAN_LIMIT_MAX, ScanCursor, ScanPage, Ttl, TtlPolicy,
    VALUE_BYTES_MAX,
};
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError,
    RedisResult, ScriptInvocation, ServerErrorKind, cmd, pipe,
};

mod cluster;
mod link;
mod notice;
#[cfg(test)]
mod server_tests;

use link::Link;
use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{RedisFuture, Value};

/// How a backend reaches its server: one server over a replaceable connection, or a cluster
/// through the cluster client (which follows `MOVED`/`ASK` and reconnects per node itself).
#[derive(Clone)]
enum Transport {
    Single(Link),
    Cluster(ClusterConnection),
}

/// A connection an operation runs on.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// `compare_and_swap` with an expected value, where the server has no native command.
/// KEYS[1] = key; ARGV = expected, new, policy ("keep" | "px" | "clear"), TTL in ms (for "px").
/// A missing key makes `GET` return false, which equals no string, so it never swaps.
const COMPARE_AND_SWAP_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[3] == 'keep' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
elseif ARGV[3] == 'px' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
";

/// `compare_and_delete` where the server has no native command. KEYS[1] = key; ARGV[1] =
/// expected.
const COMPARE_AND_DELETE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The contract's rate-limit step (see `rate_limit.lua` for its arguments and reply).
static RATE_LIMIT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("rate_limit.lua")));
static COMPARE_AND_SWAP: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(COMPARE_AND_SWAP_LUA));
static COMPARE_AND_DELETE: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(COMPARE_AND_DELETE_LUA));

/// The oldest Redis keel runs on: `SET ... KEEPTTL` arrived in 6.0.
const REDIS_VERSION_MIN: Version = Version(6, 0, 0);
/// The first Redis with `WAITAOF`.
const WAITAOF_SINCE: Version = Version(7, 2, 0);
/// The first Valkey with `SET ... IFEQ`.
const VALKEY_SET_IFEQ_SINCE: Version = Version(8, 1, 0);
/// The first Valkey with `DELIFEQ`.
const VALKEY_DELIFEQ_SINCE: Version = Version(9, 0, 0);

/// How a [`RedisBackend`] (or a [`ValkeyBackend`](crate::valkey::ValkeyBackend)) talks to its
/// server. Start from `RedisOptions::default()` and change what you need:
///
/// ```
/// # use std::time::Duration;
/// # use keel_adapters::redis::RedisOptions;
/// let options = RedisOptions::default().with_op_timeout(Duration::from_millis(250));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RedisOptions {
    /// The longest one operation may take, including waiting for a reconnection; past it the
    /// operation fails with [`ErrorKind::Timeout`] and whether a write happened is unknown.
    /// Default 5 s; must not be zero.
    pub op_timeout: Duration,
    /// The longest `connect` may take to open its connection, and each later reconnection
    /// attempt. Default 5 s; must not be zero.
    pub connect_timeout: Duration,
    /// What `incr_durable` (the lock's fencing counter) requires before it acknowledges.
    /// Default [`FencingDurability::Aof`] with no replicas.
    pub fencing: FencingDurability,
    /// For `rediss://` (TLS): a PEM file of the certificate authorities to trust instead of
    /// the system's (e.g. a private CA). Also settable as `tls_ca_file=PATH` in the URL's
    /// query. The server's certificate must name the host of the URL either way.
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// How durable `incr_durable` must be on a Redis or Valkey server before it acknowledges.
///
/// A fencing token is only safe if the counter can never go back: a crash of a server that
/// had not yet written the increment to its append-only file (`appendfsync everysec`, or no
/// AOF at all), or a failover to a replica that had not received it, would hand the same
/// token to two holders. Which server settings make tokens safe:
///
/// | server | [`Aof`](FencingDurability::Aof) (default) |
/// |---|---|
/// | Redis ≥ 7.2 or Valkey, `appendonly yes` (any `appendfsync`) | safe: `WAITAOF` waits until the increment is fsynced to the AOF |
/// | the same, with `replicas: n` | also survives a failover: `WAITAOF` waits for `n` replicas' AOFs |
/// | `appendonly no` | refused: `incr_durable` fails with [`ErrorKind::Permanent`] saying so |
/// | Redis older than 7.2 (no `WAITAOF`) | refused, the same way |
///
/// [`BestEffort`](FencingDurability::BestEffort) is a plain `INCRBY`: as durable as the
/// server's settings happen to be, with no check, so tokens can repeat after a crash or a
/// failover. Choose it knowingly (e.g. for a lock used only for efficiency, not correctness).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FencingDurability {
    /// `INCRBY`, then `WAITAOF 1 replicas op_timeout`: acknowledged only once the increment
    /// is in the local AOF on disk and in `replicas` replicas' AOFs.
    Aof {
        /// Replicas that must also have the increment in their AOF (0: only the primary).
        replicas: u32,
    },
    /// Plain `INCRBY`; no durability check.
    BestEffort,
}

impl Default for FencingDurability {
    fn default() -> Self {
        FencingDurability::Aof { replicas: 0 }
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            op_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            fencing: FencingDurability::default(),
            tls_ca_file: None,
        }
    }
}

impl RedisOptions {
    /// Sets [`op_timeout`](RedisOptions::op_timeout).
    pub fn with_op_timeout(mut self, op_timeout: Duration) -> Self {
        self.op_timeout = op_timeout;
        self
    }

    /// Sets [`connect_timeout`](RedisOptions::connect_timeout).
    pub fn with_connect_timeout(mut self, connect_timeout: Duration) -> Self {
        self.connect_timeout = connect_timeout;
        self
    }

    /// Sets [`fencing`](RedisOptions::fencing).
    pub fn with_fencing(mut self, fencing: FencingDurability) -> Self {
        self.fencing = fencing;
        self
    }

    /// Applies the keel parameters of a URL's query (`fencing=aof`, `fencing=best-effort`,
    /// `fencing_replicas=N`, `tls_ca_file=PATH`) and returns the URL without them, for the
    /// client.
    pub(crate) fn with_url_params(mut self, url: &str) -> Result<(Self, String)> {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((self, url.to_owned()));
        };
        let mut kept = Vec::new();
        let mut replicas = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "fencing" => {
                    self.fencing = match value {
                        "aof" => FencingDurability::Aof { replicas: 0 },
                        "best-effort" => FencingDurability::BestEffort,
                        other => {
                            return Err(Error::new(
                                ErrorKind::InvalidInput,
                                format!(
                                    "unknown fencing={other:?} in the URL; use fencing=aof or \
                                     fencing=best-effort"
                                ),
                            ));
                        }
                    }
                }
                "tls_ca_file" => self.tls_ca_file = Some(std::path::PathBuf::from(value)),
                "fencing_replicas" => {
                    replicas = Some(value.parse::<u32>().map_err(|_| {
                        Error::new(
                            ErrorKind::InvalidInput,
                            format!("fencing_replicas={value:?} in the URL is not a number"),
                        )
                    })?);
                }
                _ => kept.push(pair),
            }
        }
        if let Some(n) = replicas {
            match &mut self.fencing {
                FencingDurability::Aof { replicas } => *replicas = n,
                FencingDurability::BestEffort => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        "fencing_replicas needs fencing=aof",
                    ));
                }
            }
        }
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((self, url))
    }

    fn validate(&self) -> Result<()> {
        if self.op_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "RedisOptions: op_timeout and connect_timeout must be longer than zero",
            ));
        }
        Ok(())
    }
}

/// Which server connect found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// Redis, or anything reporting only `redis_version`.
    Redis,
    /// Valkey: `INFO server` reports `valkey_version`.
    Valkey,
}

/// A server version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Version(pub(crate) u32, pub(crate) u32, pub(crate) u32);

impl Version {
    /// Parses "7.0.15" (a missing patch or minor counts as 0); `None` if it is not numeric.
    fn parse(text: &str) -> Option<Version> {
        let mut parts = text.trim().split('.');
        let mut next = |required: bool| match parts.next() {
            Some(p) => p.parse::<u32>().ok(),
            None if required => None,
            None => Some(0),
        };
        Some(Version(next(true)?, next(false)?, next(false)?))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// What connect learnt about the server; it decides which commands are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Server {
    /// `None` when `INFO` was refused (an ACL may forbid it): then only portable commands and
    /// scripts are used.
    pub(crate) flavor: Option<Flavor>,
    pub(crate) version: Option<Version>,
}

impl Server {
    /// Reads the `INFO server` reply: `valkey_version` present means Valkey (which also reports
    /// a `redis_version` for compatibility), else `redis_version` means Redis.
    pub(crate) fn from_info(info: &str) -> Server {
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if let Some(version) = field("valkey_version") {
            Server {
                flavor: Some(Flavor::Valkey),
                version: Version::parse(version),
            }
        } else if let Some(version) = field("redis_version") {
            Server {
                flavor: Some(Flavor::Redis),
                version: Version::parse(version),
            }
        } else {
            Server::UNKNOWN
        }
    }

    const UNKNOWN: Server = Server {
        flavor: None,
        version: None,
    };

    fn is_valkey_since(&self, since: Version) -> bool {
        self.flavor == Some(Flavor::Valkey) && self.version.is_some_and(|v| v >= since)
    }

    /// `SET key new IFEQ expected [KEEPTTL | PX ms]` replies OK or nil.
    pub(crate) fn has_set_ifeq(&self) -> bool {
        self.is_valkey_since(VALKEY_SET_IFEQ_SINCE)
    }

    /// `DELIFEQ key expected` replies 1 or 0.
    pub(crate) fn has_delifeq(&self) -> bool {
        self.is_valkey_since(VALKEY_DELIFEQ_SINCE)
    }

    /// `WAITAOF` arrived in Redis 7.2, which every Valkey descends from. Unknown servers
    /// (INFO refused) are given the benefit of the doubt: the server's reply decides.
    pub(crate) fn lacks_waitaof(&self) -> bool {
        self.flavor == Some(Flavor::Redis) && self.version.is_some_and(|v| v < WAITAOF_SINCE)
    }

    fn describe(&self) -> String {
        let name = match self.flavor {
            Some(Flavor::Redis) => "Redis",
            Some(Flavor::Valkey) => "Valkey",
            None => "an unidentified server",
        };
        match self.version {
            Some(v) => format!("{name} {v}"),
            None => name.to_owned(),
        }
    }
}

/// The keel contract on a Redis server (6.0 or newer), over one multiplexed connection that
/// reconnects by itself. Cheap to clone; clones share the connection. See the module docs for
/// how each operation maps to commands.
///
/// Connected to a Valkey server it behaves as a [`ValkeyBackend`](crate::valkey::ValkeyBackend)
/// (native conditional commands where the version has them) and names itself "valkey".
#[derive(Clone)]
pub struct RedisBackend {
    transport: Transport,
    fencing: FencingDurability,
    server: Server,
    name: &'static str,
    op_timeout: Duration,
    /// The largest server time handed out, so `now_ms` never goes backwards for this handle
    /// (and its clones) even if the server's clock is stepped back or a failover lands on a
    /// server whose clock is behind.
    clock_floor_ms: Arc<AtomicU64>,
    /// Lock release notices to and from other handles (pub/sub).
    notices: Arc<notice::Notices>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("name", &self.name)
            .field("server", &self.server)
            .field("op_timeout", &self.op_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Connects to `url` with default [`RedisOptions`]: `redis://[user:password@]host[:port][/db]`,
    /// `redis+unix:///path`, or `rediss://` for TLS (the `valkey` spellings are accepted too).
    ///
    /// # Errors
    /// See [`connect_with`](RedisBackend::connect_with).
    pub async fn connect(url: &str) -> Result<Self> {
        RedisBackend::connect_with(url, RedisOptions::default()).await
    }

    /// Connects to `url`, checks the server answers `PING`, and detects which server it is.
    ///
    /// # Errors
    /// - [`ErrorKind::InvalidInput`]: the URL does not parse (or asks for TLS, which this build
    ///   does not include), or an option is zero.
    /// - [`ErrorKind::Transient`]: the server refused or dropped the connection, or is loading.
    /// - [`ErrorKind::Timeout`]: no connection within [`RedisOptions::connect_timeout`].
    /// - [`ErrorKind::Permanent`]: authentication failed, or the server is Redis older than
    ///   6.0.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self> {
        RedisBackend::open(url, options, Flavor::Redis).await
    }

    /// Connects for [`RedisBackend::connect_with`] or
    /// [`ValkeyBackend::connect_with`](crate::valkey::ValkeyBackend::connect_with): `wanted`
    /// says which server the caller asked for.
    pub(crate) async fn open(url: &str, options: RedisOptions, wanted: Flavor) -> Result<Self> {
        options.validate()?;
        let (options, url) = options.with_url_params(url)?;
        let url = url.as_str();
        let bad_url = |e: RedisError| {
            // The URL itself is not repeated: it may carry a password.
            Error::new(
                ErrorKind::InvalidInput,
                "not a usable Redis or Valkey URL: expected redis://[user:password@]host[:port][/db] \
                 (or rediss://, redis+unix://, redis+cluster://host:port,host:port, or the same \
                 with valkey)",
            )
            .with_source(e)
        };
        let url = redis_scheme(url);
        let seeds = cluster::seed_urls(&url).transpose()?;
        // The probe talks to the server itself, or to the first seed of a cluster.
        let probe_url = seeds.as_ref().map_or(url.as_ref(), |s| s[0].as_str());
        let info = probe_url
            .into_connection_info()
            .map_err(bad_url)?
            .set_tcp_settings(link::tcp_settings());
        let tls_roots = tls_roots(&options, &url)?;
        let client = match &tls_roots {
            Some(certificates) => Client::build_with_tls(info, certificates.clone()),
            None => Client::open(info),
        }
        .map_err(bad_url)?;
        let addr = client.get_connection_info().addr().to_string();
        let (server, cluster_enabled) = probe(&client, &addr, &options).await?;
        if cluster_enabled && seeds.is_none() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the server at {addr} is a cluster node; a plain URL would reach only the keys \
                     it owns. Connect with redis+cluster://{addr}[,host:port...] (or \
                     valkey+cluster://)"
                ),
            ));
        }
        if !cluster_enabled && seeds.is_some() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the server at {addr} is not in cluster mode; connect with redis:// (or \
                     valkey://)"
                ),
            ));
        }
        let name = match (server.flavor, wanted) {
            (Some(Flavor::Valkey), _) | (None, Flavor::Valkey) => "valkey",
            (Some(Flavor::Redis), Flavor::Valkey) => {
                return Err(Error::new(
                    ErrorKind::Permanent,
                    format!(
                        "the server at {addr} is {}, not Valkey; connect to it with RedisBackend",
                        server.describe()
                    ),
                ));
            }
            (Some(Flavor::Redis), Flavor::Redis) | (None, Flavor::Redis) => "redis",
        };
        if server.flavor == Some(Flavor::Redis)
            && server.version.is_some_and(|v| v < REDIS_VERSION_MIN)
        {
            return Err(Error::new(
                ErrorKind::Permanent,
                format!(
                    "the server at {addr} is {}; keel needs Redis {REDIS_VERSION_MIN} or newer \
                     (for SET ... KEEPTTL)",
                    server.describe()
                ),
            ));
        }
        // Release notices are received on a connection of their own: to the server, or to
        // each seed of a cluster in turn.
        let db = client.get_connection_info().redis_settings().db();
        let notice_clients = match &seeds {
            None => vec![client.clone()],
            Some(seeds) => seeds
                .iter()
                .map(|seed| {
                    let info = seed
                        .as_str()
                        .into_connection_info()
                        .map_err(bad_url)?
                        .set_tcp_settings(link::tcp_settings());
                    match &tls_roots {
                        Some(certificates) => Client::build_with_tls(info, certificates.clone()),
                        None => Client::open(info),
                    }
                    .map_err(bad_url)
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let notices = Arc::new(notice::Notices::new(
            db,
            notice_clients,
            options.connect_timeout,
        ));
        // The client's own response timeout stays off: every operation is bounded by
        // `op_timeout` here instead, which also covers waiting for a reconnection.
        let transport = match &seeds {
            None => tokio::time::timeout(
                options.connect_timeout,
                Link::connect(client, options.connect_timeout),
            )
            .await
            .map(|r| r.map(Transport::Single)),
            Some(seeds) => tokio::time::timeout(
                options.connect_timeout,
                cluster::connect(seeds, options.connect_timeout, tls_roots),
            )
            .await
            .map(|r| r.map(Transport::Cluster)),
        };
        let transport = match transport {
            Ok(Ok(transport)) => transport,
            Ok(Err(e)) => return Err(connect_error(&addr, e)),
            Err(elapsed) => return Err(connect_timed_out(&addr, &options).with_source(elapsed)),
        };
        Ok(RedisBackend {
            transport,
            server,
            name,
            fencing: options.fencing,
            op_timeout: options.op_timeout,
            clock_floor_ms: Arc::new(AtomicU64::new(0)),
            notices,
        })
    }

    /// Connections opened after the first one (after a timeout, a broken connection or a
    /// `READONLY` reply). For monitoring and tests.
    pub fn reconnects(&self) -> u64 {
        match &self.transport {
            Transport::Single(link) => link.reconnects(),
            // The cluster client reconnects per node on its own and does not count.
            Transport::Cluster(_) => 0,
        }
    }

    /// Whether this backend talks to a cluster (`redis+cluster://`).
    pub fn is_cluster(&self) -> bool {
        matches!(self.transport, Transport::Cluster(_))
    }

    /// What connect detected; tests use it to check which commands are chosen.
    #[cfg(test)]
    pub(crate) fn server(&self) -> Server {
        self.server
    }

    /// The same connection, treated as `server`: lets tests drive the script fallbacks on a
    /// server that has the native commands.
    #[cfg(test)]
    pub(crate) fn assuming(mut self, server: Server) -> Self {
        self.server = server;
        self
    }

    /// Runs `f` on the connection, bounded by the operation timeout (which includes waiting
    /// for a reconnection). The outer result is the timeout or a failed reconnection, the
    /// inner one the server's answer, so callers can map server errors their own way
    /// (`incr`). A timeout, a broken connection or a `READONLY` reply abandons the
    /// connection (see [`link`]): the next operation reconnects.
    async fn within<T, F, Fut>(&self, op: &'static str, f: F) -> Result<RedisResult<T>>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.op_timeout;
        let timed_out = |what: &str| {
            let rule = if self.is_cluster() {
                "it may or may not have taken effect"
            } else {
                "it may or may not have taken effect, but it will not take effect after a later \
                 operation of this handle is acknowledged"
            };
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "{op} did not finish within {} ms ({what}); {rule}; retrying may succeed",
                    self.op_timeout.as_millis()
                ),
            )
        };
        let link = match &self.transport {
            Transport::Single(link) => link,
            Transport::Cluster(conn) => {
                return match tokio::time::timeout_at(deadline, f(Conn::Cluster(conn.clone()))).await
                {
                    Ok(reply) => Ok(reply),
                    Err(elapsed) => Err(timed_out("no reply").with_source(elapsed)),
                };
            }
        };
        let lease = match tokio::time::timeout_at(deadline, link.lease()).await {
            Ok(Ok(lease)) => lease,
            Ok(Err(e)) => return Err(redis_error(op, e)),
            Err(_) => return Err(timed_out("waiting for a reconnection")),
        };
        match tokio::time::timeout_at(deadline, f(Conn::Single(lease.conn.clone()))).await {
            Ok(Err(e)) if link::must_reconnect(&e) => {
                link.abandon(&lease);
                Ok(Err(e))
            }
            Ok(reply) => Ok(reply),
            Err(elapsed) => {
                link.abandon(&lease);
                Err(timed_out("no reply").with_source(elapsed))
            }
        }
    }

    async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.within(op, f).await?.map_err(|e| redis_error(op, e))
    }

    async fn query<T: FromRedisValue>(&self, op: &'static str, command: Cmd) -> Result<T> {
        self.run(op, |mut conn| async move {
            command.query_async(&mut conn).await
        })
        .await
    }

    async fn query_pipe<T: FromRedisValue>(&self, op: &'static str, p: Pipeline) -> Result<T> {
        self.run(op, |mut conn| async move { p.query_async(&mut conn).await })
            .await
    }

    async fn invoke<T: FromRedisValue>(
        &self,
        op: &'static str,
        script: ScriptInvocation<'static>,
    ) -> Result<T> {
        self.run(op, |mut conn| async move {
            script.invoke_async(&mut conn).await
        })
        .await
    }

    /// `incr`, and with `wait_aof = Some(replicas)` followed on the same connection by
    /// `WAITAOF 1 replicas op_timeout`, acknowledged only once durable.
    async fn incr_with(
        &self,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
        wait_aof: Option<u32>,
    ) -> Result<i64> {
        check_key(key)?;
        let ttl_ms = ttl_on_create.map(ttl_ms).transpose()?;
        let mut p = pipe();
        match ttl_ms {
            None => {
                p.cmd("INCRBY").arg(key).arg(delta);
            }
            Some(ms) => {
                // One round trip, atomically: create the key as "0" with the TTL only if it
                // is absent, then add. INCRBY cannot fail on a key SET just created (0 + any
                // i64 fits), so a failing INCRBY always means the key existed and SET NX left
                // it, and its TTL, alone.
                p.atomic()
                    .cmd("SET")
                    .arg(key)
                    .arg(0)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .ignore()
                    .cmd("INCRBY")
                    .arg(key)
                    .arg(delta);
            }
        }
        let wait_ms = u64::try_from(self.op_timeout.as_millis()).unwrap_or(u64::MAX);
        let op = if wait_aof.is_some() {
            "INCRBY with WAITAOF"
        } else {
            "INCRBY"
        };
        // WAITAOF waits for this client's own last write, so it goes on the same connection,
        // right after the increment.
        let key_owned = key.to_vec();
        let reply = self
            .within(op, |mut conn| async move {
                let (n,): (i64,) = p.query_async(&mut conn).await?;
                let Some(replicas) = wait_aof else {
                    return Ok((n, None));
                };
                let mut wait = cmd("WAITAOF");
                wait.arg(1).arg(replicas).arg(wait_ms);
                let acked: (i64, i64) = match &mut conn {
                    Conn::Single(c) => wait.query_async(c).await?,
                    // On a cluster it must reach the node that took the increment.
                    Conn::Cluster(c) => {
                        let route = Route::new(cluster::key_slot(&key_owned), SlotAddr::Master);
                        let node = SingleNodeRoutingInfo::SpecificNode(route);
                        let reply = c.route_command(wait, RoutingInfo::SingleNode(node)).await?;
                        FromRedisValue::from_redis_value(reply)?
                    }
                };
                Ok((n, Some((acked, replicas))))
            })
            .await?;
        let (n, acked) = reply.map_err(|e| {
            if server_error_details(&e)
                .iter()
                .any(|d| d.contains("appendonly is disabled"))
            {
                return Error::new(
                    ErrorKind::Permanent,
                    "incr_durable cannot make the counter durable: the server runs with \
                     appendonly no (the increment itself was applied). Turn on the append-only \
                     file (appendonly yes), or accept tokens that can repeat after a crash \
                     with fencing=best-effort",
                )
                .with_source(e);
            }
            incr_error(op, e)
        })?;
        if let Some(((local, replicas_acked), replicas)) = acked
            && (local < 1 || replicas_acked < i64::from(replicas))
        {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "incr_durable: the increment to {n} was applied but not confirmed durable \
                     within {} ms (local AOF fsynced: {}, replicas with it: {replicas_acked} of \
                     {replicas}); do not rely on this value as a fencing token",
                    self.op_timeout.as_millis(),
                    local >= 1
                ),
            ));
        }
        Ok(n)
    }

    /// `scan` on a cluster: one primary at a time, in address order; the cursor names the
    /// primary and its own `SCAN` cursor. A key that moves between primaries during the scan
    /// (resharding) may be missed or repeated.
    async fn scan_cluster(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        let mut nodes = cmd("CLUSTER");
        nodes.arg("NODES");
        let nodes: String = self.query("CLUSTER NODES", nodes).await?;
        let primaries = cluster::primaries(&nodes);
        let (node, position) = match cursor {
            Some(c) => cluster::decode_cursor(&c.0)?,
            None => match primaries.first() {
                Some(first) => (first.clone(), 0),
                None => {
                    return Err(Error::new(
                        ErrorKind::Transient,
                        "the cluster reports no reachable primary",
                    ));
                }
            },
        };
        let (host, port) = cluster::host_port(&node)?;
        let mut c = cmd("SCAN");
        c.arg(position)
            .arg("MATCH")
            .arg(match_prefix(prefix))
            .arg("COUNT")
            .arg(limit.clamp(1, SCAN_LIMIT_MAX));
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
        let (next, keys): (u64, Vec<Vec<u8>>) = self
            .run("SCAN", |conn| async move {
                let Conn::Cluster(mut conn) = conn else {
                    unreachable!("scan_cluster runs only on a cluster transport")
                };
                let reply = conn.route_command(c, routing).await?;
                Ok(<(u64, Vec<Vec<u8>>)>::from_redis_value(reply)?)
            })
            .await?;
        let keys = keys.into_iter().filter(|k| k.starts_with(prefix)).collect();
        let next = if next != 0 {
            Some(cluster::encode_cursor(&node, next))
        } else {
            // This primary is done: the next one in address order, if any.
            primaries
                .iter()
                .find(|p| p.as_str() > node.as_str())
                .map(|p| cluster::encode_cursor(p, 0))
        };
        Ok(ScanPage {
            keys,
            next: next.map(ScanCursor),
        })
    }

    /// `SET key value NX [PX ms]`: whether it wrote.
    async fn set_if_absent(
        &self,
        op: &'static str,
        key: &[u8],
        value: &[u8],
        ttl_ms: Option<u64>,
    ) -> Result<bool> {
        let mut c = cmd("SET");
        c.arg(key).arg(value).arg("NX");
        if let Some(ms) = ttl_ms {
            c.arg("PX").arg(ms);
        }
        let reply: Option<String> = self.query(op, c).await?;
        Ok(reply.is_some())
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &str {
        self.name
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        let mut c = cmd("GET");
        c.arg(key);
        self.query("GET", c).await
    }

    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        check_key(key)?;
        let mut p = pipe();
        p.atomic().cmd("GET").arg(key).cmd("PTTL").arg(key);
        let (value, pttl): (Option<Vec<u8>>, i64) = self.query_pipe("GET with PTTL", p).await?;
        // Redis 7 and Valkey stop the clock for a whole MULTI, so a value always comes with a
        // TTL for the same key. Older servers may expire the key between the two; `Missing`
        // beside a value then reads as absent, which it is by then.
        Ok(match (value, ttl_from_pttl(pttl)) {
            (Some(v), Ttl::Remaining(d)) => Some((v, Some(d))),
            (Some(v), Ttl::NoExpiry) => Some((v, None)),
            _ => None,
        })
    }

    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        check_key(key)?;
        check_value(value)?;
        let ttl_ms = ttl.map(ttl_ms).transpose()?;
        let mut c = cmd("SET");
        c.arg(key).arg(value);
        if let Some(ms) = ttl_ms {
            c.arg("PX").arg(ms);
        }
        self.query::<()>("SET", c).await
    }

    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        check_key(key)?;
        check_value(value)?;
        let ttl_ms = ttl.map(ttl_ms).transpose()?;
        self.set_if_absent("SET NX", key, value, ttl_ms).await
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        check_key(key)?;
        check_value(new)?;
        let set_ms = match ttl {
            TtlPolicy::Set(d) => Some(ttl_ms(d)?),
            TtlPolicy::Keep | TtlPolicy::Clear => None,
        };
        let Some(expected) = expected else {
            // Expecting an absent key is SET NX whatever the policy: an absent key has no TTL
            // to keep, so Keep and Clear both write without one.
            return self
                .set_if_absent("compare_and_swap (SET NX)", key, new, set_ms)
                .await;
        };
        if expected.len() > VALUE_BYTES_MAX {
            // No value the contract lets exist can equal it; not worth sending.
            return Ok(false);
        }
        if self.server.has_set_ifeq() {
            let mut c = cmd("SET");
            c.arg(key).arg(new).arg("IFEQ").arg(expected);
            match (ttl, set_ms) {
                (TtlPolicy::Keep, _) => {
                    c.arg("KEEPTTL");
                }
                (_, Some(ms)) => {
                    c.arg("PX").arg(ms);
                }
                (_, None) => {}
            }
            let reply: Option<String> = self.query("compare_and_swap (SET IFEQ)", c).await?;
            return Ok(reply.is_some());
        }
        let (policy, ms) = match (ttl, set_ms) {
            (TtlPolicy::Keep, _) => ("keep", 0),
            (_, Some(ms)) => ("px", ms),
            (_, None) => ("clear", 0),
        };
        let mut script = COMPARE_AND_SWAP.prepare_invoke();
        script.key(key).arg(expected).arg(new).arg(policy).arg(ms);
        let swapped: i64 = self.invoke("compare_and_swap (script)", script).await?;
        Ok(swapped == 1)
    }

    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        check_key(key)?;
        if expected.len() > VALUE_BYTES_MAX {
            return Ok(false);
        }
        let deleted: i64 = if self.server.has_delifeq() {
            let mut c = cmd("DELIFEQ");
            c.arg(key).arg(expected);
            self.query("compare_and_delete (DELIFEQ)", c).await?
        } else {
            let mut script = COMPARE_AND_DELETE.prepare_invoke();
            script.key(key).arg(expected);
            self.invoke("compare_and_delete (script)", script).await?
        };
        Ok(deleted == 1)
    }

    async fn delete(&self, key: &[u8]) -> Result<bool> {
        check_key(key)?;
        let mut c = cmd("DEL");
        c.arg(key);
        let deleted: i64 = self.query("DEL", c).await?;
        Ok(deleted > 0)
    }

    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64> {
        self.incr_with(key, delta, ttl_on_create, None).await
    }

    async fn publish_release(&self, key: &[u8]) -> Result<()> {
        check_key(key)?;
        let mut c = cmd("PUBLISH");
        c.arg(self.notices.channel()).arg(self.notices.message(key));
        let _receivers: i64 = self.query("PUBLISH", c).await?;
        Ok(())
    }

    fn release_notices(&self) -> Option<ReleaseNotices> {
        self.notices.receiver()
    }

    async fn incr_durable(
        &self,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        match self.fencing {
            FencingDurability::BestEffort => self.incr_with(key, delta, ttl_on_create, None).await,
            FencingDurability::Aof { replicas } => {
                if self.server.lacks_waitaof() {
                    return Err(Error::new(
                        ErrorKind::Permanent,
                        format!(
                            "incr_durable needs WAITAOF to make the counter durable, and this \
                             server ({}) is older than Redis 7.2; upgrade it, or accept tokens \
                             that can repeat after a crash with fencing=best-effort",
                            self.server.describe()
                        ),
                    ));
                }
                self.incr_with(key, delta, ttl_on_create, Some(replicas))
                    .await
            }
        }
    }

    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        check_key(key)?;
        let ms = ttl_ms(ttl)?;
        let mut c = cmd("PEXPIRE");
        c.arg(key).arg(ms);
        let set: i64 = self.query("PEXPIRE", c).await?;
        Ok(set == 1)
    }

    async fn persist(&self, key: &[u8]) -> Result<bool> {
        check_key(key)?;
        let mut c = cmd("PERSIST");
        c.arg(key);
        let removed: i64 = self.query("PERSIST", c).await?;
        Ok(removed == 1)
    }

    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        check_key(key)?;
        let mut c = cmd("PTTL");
        c.arg(key);
        let pttl: i64 = self.query("PTTL", c).await?;
        Ok(ttl_from_pttl(pttl))
    }

    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        if self.is_cluster() {
            return self.scan_cluster(prefix, cursor, limit).await;
        }
        let position = match cursor {
            None => 0,
            Some(c) => parse_cursor(&c.0)?,
        };
        let mut c = cmd("SCAN");
        c.arg(position)
            .arg("MATCH")
            .arg(match_prefix(prefix))
            .arg("COUNT")
            .arg(limit.clamp(1, SCAN_LIMIT_MAX));
        let (next, keys): (Vec<u8>, Vec<Vec<u8>>) = self.query("SCAN", c).await?;
        if parse_cursor(&next).is_err() {
            return Err(Error::new(
                ErrorKind::Permanent,
                "SCAN replied with a cursor that is not a decimal number; this server is not \
                 compatible with Redis",
            ));
        }
        // MATCH already filtered; checking again costs little and keeps the contract even if
        // the server read the pattern differently.
        let keys = keys.into_iter().filter(|k| k.starts_with(prefix)).collect();
        Ok(ScanPage {
            keys,
            next: (next != b"0").then_some(ScanCursor(next)),
        })
    }

    /// One `EVALSHA` of `rate_limit.lua`: every rule read, decided and written on the server,
    /// at the server's `TIME` (or the instant given). Rules whose quotas Lua's doubles cannot
    /// compute exactly, and on a cluster rules whose keys live in different slots (give the
    /// keys one hash tag to keep a stack atomic there), take the default step instead.
    async fn rate_limit(
        &self,
        rules: &[RateRule<'_>],
        mode: RateMode,
        at_ms: Option<u64>,
    ) -> Result<RateOutcome> {
        rate::validate(rules)?;
        for rule in rules {
            check_key(rule.key)?;
        }
        let one_slot = || {
            let slot = cluster::key_slot(rules[0].key);
            rules.iter().all(|r| cluster::key_slot(r.key) == slot)
        };
        if !rules.iter().all(RateRule::exact_in_f64) || (self.is_cluster() && !one_slot()) {
            return rate::rate_limit_cas(self, rules, mode, at_ms).await;
        }
        let mut script = RATE_LIMIT.prepare_invoke();
        for rule in rules {
            script.key(rule.key);
        }
        script
            .arg(if mode == RateMode::Consume { "c" } else { "p" })
            .arg(at_ms.map(|t| t.to_string()).unwrap_or_default());
        for rule in rules {
            script
                .arg(rule.algorithm.code())
                .arg(rule.limit)
                .arg(rule.period_ms)
                .arg(rule.burst)
                .arg(rule.cost);
        }
        let reply: Vec<i64> = self.invoke("rate_limit (script)", script).await?;
        rate_reply(&reply, rules.len())
    }

    async fn now_ms(&self) -> Result<u64> {
        let (secs, micros): (u64, u64) = self.query("TIME", cmd("TIME")).await?;
        let server_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let floor = self.clock_floor_ms.fetch_max(server_ms, Ordering::Relaxed);
        Ok(floor.max(server_ms))
    }
}

/// The trust roots for a TLS URL: the CA file's certificates when one is configured (the
/// system's are used otherwise); `None` for a plain URL. Installs rustls's ring provider as the
/// process default if none is installed yet.
fn tls_roots(options: &RedisOptions, url: &str) -> Result<Option<redis::TlsCertificates>> {
    let tls = url
        .get(..9)
        .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
        || url
            .get(..17)
            .is_some_and(|s| s.eq_ignore_ascii_case("rediss+cluster://"));
    if !tls {
        if options.tls_ca_file.is_some() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "tls_ca_file is set but the URL is not a TLS URL; use rediss:// (or valkeys://)",
            ));
        }
        return Ok(None);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(path) = &options.tls_ca_file else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("cannot read the TLS CA file {}", path.display()),
        )
        .with_source(e)
    })?;
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// Accepts the Valkey spellings of the URL schemes by rewriting them to Redis's.
pub(crate) fn redis_scheme(url: &str) -> Cow<'_, str> {
    const REWRITES: [(&str, &str); 5] = [
        ("valkey://", "redis://"),
        ("valkeys://", "rediss://"),
        ("valkey+unix://", "redis+unix://"),
        ("valkey+cluster://", "redis+cluster://"),
        ("valkeys+cluster://", "rediss+cluster://"),
    ];
    for (from, to) in REWRITES {
        if url.len() >= from.len()
            && url.is_char_boundary(from.len())
            && url[..from.len()].eq_ignore_ascii_case(from)
        {
            return Cow::Owned(format!("{to}{}", &url[from.len()..]));
        }
    }
    Cow::Borrowed(url)
}

/// Opens one plain connection, checks `PING`, and reads `INFO server`. It runs before the
/// reconnecting manager exists so an unreachable server fails at once with its real cause
/// (connection refused, authentication), not after the manager's reconnection backoff.
async fn probe(client: &Client, addr: &str, options: &RedisOptions) -> Result<(Server, bool)> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.op_timeout));
    let mut conn: MultiplexedConnection = match tokio::time::timeout(
        options.connect_timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(connect_error(addr, e)),
        Err(elapsed) => return Err(connect_timed_out(addr, options).with_source(elapsed)),
    };
    let ping = tokio::time::timeout(
        options.op_timeout,
        cmd("PING").query_async::<String>(&mut conn),
    )
    .await;
    match ping {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(connect_error(addr, e)),
        Err(elapsed) => return Err(connect_timed_out(addr, options).with_source(elapsed)),
    }
    let info = tokio::time::timeout(
        options.op_timeout,
        cmd("INFO").arg("server").query_async::<String>(&mut conn),
    )
    .await;
    let server = match info {
        Ok(Ok(text)) => Server::from_info(&text),
        // A server that refuses INFO (an ACL, a renamed command) still works: it just gets
        // the portable commands and scripts.
        Ok(Err(e)) if e.kind() != redis::ErrorKind::Io => Server::UNKNOWN,
        Ok(Err(e)) => return Err(connect_error(addr, e)),
        Err(elapsed) => return Err(connect_timed_out(addr, options).with_source(elapsed)),
    };
    let cluster = tokio::time::timeout(
        options.op_timeout,
        cmd("INFO").arg("cluster").query_async::<String>(&mut conn),
    )
    .await;
    let cluster_enabled = match cluster {
        Ok(Ok(text)) => text.lines().any(|l| l.trim() == "cluster_enabled:1"),
        Ok(Err(e)) if e.kind() != redis::ErrorKind::Io => false,
        Ok(Err(e)) => return Err(connect_error(addr, e)),
        Err(elapsed) => return Err(connect_timed_out(addr, options).with_source(elapsed)),
    };
    Ok((server, cluster_enabled))
}

fn connect_error(addr: &str, e: RedisError) -> Error {
    let kind = classify(&e);
    let advice = match (kind, e.kind()) {
        (ErrorKind::Transient | ErrorKind::Timeout, _) => {
            "is the server running, and reachable from here? Retrying may succeed"
        }
        (ErrorKind::InvalidInput, _) => "check the URL",
        (_, redis::ErrorKind::AuthenticationFailed) => "check the credentials in the URL",
        (_, redis::ErrorKind::Server(_) | redis::ErrorKind::Extension) => {
            "check the credentials in the URL and the server's configuration"
        }
        _ => "is a Redis or Valkey server listening at that address?",
    };
    Error::new(
        kind,
        format!("could not connect to the server at {addr}: {advice}"),
    )
    .with_source(e)
}

fn connect_timed_out(addr: &str, options: &RedisOptions) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "could not connect to the server at {addr} within {} ms: is it running, and \
             reachable from here?",
            options.connect_timeout.as_millis()
        ),
    )
}

/// Escapes every byte Redis's glob matcher treats specially (`* ? [ ] \`) and appends `*`, so
/// `SCAN ... MATCH` matches exactly the keys starting with `prefix`, whatever bytes it holds.
/// The matcher compares byte by byte with explicit lengths, so NUL and non-UTF-8 bytes need no
/// escaping.
fn match_prefix(prefix: &[u8]) -> Vec<u8> {
    let mut pattern = Vec::with_capacity(prefix.len() * 2 + 1);
    for &b in prefix {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            pattern.push(b'\\');
        }
        pattern.push(b);
    }
    pattern.push(b'*');
    pattern
}

/// A scan cursor must be Redis's: a decimal u64.
fn parse_cursor(bytes: &[u8]) -> Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "not a scan cursor of this backend: pass back the `next` of a page it returned",
            )
        })
}

/// `PTTL`'s reply as a [`Ttl`]: -2 missing, -1 no expiry, else milliseconds left. A key
/// that is still live reports at least 1 ms (Redis says 0 in its last millisecond).
fn ttl_from_pttl(pttl: i64) -> Ttl {
    match pttl {
        -1 => Ttl::NoExpiry,
        ms if ms >= 0 => Ttl::Remaining(Duration::from_millis(ms.max(1) as u64)),
        _ => Ttl::Missing,
    }
}

/// Classifies a client error: may retrying help (`Transient`, `Timeout`), or not.
pub(crate) fn classify(e: &RedisError) -> ErrorKind {
    use redis::ErrorKind as K;
    if e.is_timeout() {
        return ErrorKind::Timeout;
    }
    match e.kind() {
        // Refused, reset, broken pipe, end of stream: the connection manager reconnects.
        K::Io => ErrorKind::Transient,
        K::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly,
        ) => ErrorKind::Transient,
        // Replies the client has no kind for (BUSY, WRONGTYPE, NOAUTH, ...) go by their code.
        K::Extension => match server_error_code(e).as_deref() {
            // BUSY: a script is running; NOREPLICAS / MISCONF: replication or persistence is
            // failing for now; OOM: memory is full until keys expire or are evicted.
            Some("BUSY" | "NOREPLICAS" | "MISCONF" | "OOM") => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        },
        K::InvalidClientConfig => ErrorKind::InvalidInput,
        // Authentication, unknown commands (ERR), WRONGTYPE, ACL refusals, protocol mismatch.
        _ => ErrorKind::Permanent,
    }
}

/// The code (first word) of the first server error reply inside `e`, if it has one.
fn server_error_code(e: &RedisError) -> Option<String> {
    let errors = e.clone().into_server_errors()?;
    errors.first().map(|(_, err)| err.code().to_owned())
}

/// The detail (text after the code) of every server error reply inside `e`.
fn server_error_details(e: &RedisError) -> Vec<String> {
    e.clone()
        .into_server_errors()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|(_, err)| err.details().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Maps a client error into the contract's error, keeping it as the source.
pub(crate) fn redis_error(op: &str, e: RedisError) -> Error {
    let kind = classify(&e);
    let advice = match kind {
        ErrorKind::Transient => {
            "the server is unreachable, restarting or busy; retrying may succeed, and whether a \
             write happened is unknown"
        }
        ErrorKind::Timeout => {
            "the server did not answer in time; retrying may succeed, and whether a write \
             happened is unknown"
        }
        _ => "retrying will not help; check the server's version, configuration and access rights",
    };
    Error::new(kind, format!("{op} failed: {advice}")).with_source(e)
}

/// `incr`'s errors: Redis's two integer errors become the contract's, the rest as usual.
fn incr_error(op: &str, e: RedisError) -> Error {
    for detail in server_error_details(&e) {
        if detail.starts_with("value is not an integer") {
            return not_an_integer().with_source(e);
        }
        if detail.starts_with("increment or decrement would overflow") {
            return overflow().with_source(e);
        }
    }
    redis_error(op, e)
}

/// What the tests against real servers share, here and in the Valkey module.
#[cfg(test)]
pub(crate) mod test_server {
    /// The server URL in `var`. Unset is a failure that says how to set it, never a skip.
    pub(crate) fn url(var: &str, example: &str) -> String {
        match std::env::var(var) {
            Ok(url) if !url.is_empty() => url,
            _ => panic!("{var} is not set: start a server and set it, e.g. {var}={example}"),
        }
    }

    /// A key no other test or run uses.
    pub(crate) fn unique(name: &str) -> Vec<u8> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("keel-adapter-test:{nanos:x}:{name}").into_bytes()
    }
}

/// Reads the native step's reply (see [`rate::decode_reply`]).
fn rate_reply(reply: &[i64], rules: usize) -> Result<RateOutcome> {
    rate::decode_reply(reply, rules).ok_or_else(|| {
        Error::new(
            ErrorKind::Permanent,
            format!(
                "the rate-limit script answered {reply:?} for {rules} rules; another script \
                 may have been loaded under its SHA"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::test_server::unique;
    use super::*;

    /// A server error reply as the client parses it off the wire.
    fn reply_error(wire: &[u8]) -> RedisError {
        match redis::parse_redis_value(wire).and_then(|v| v.extract_error()) {
            Err(e) => e,
            Ok(v) => panic!(
                "{:?} did not parse as an error reply: {v:?}",
                String::from_utf8_lossy(wire)
            ),
        }
    }

    fn io_error(kind: io::ErrorKind) -> RedisError {
        RedisError::from(io::Error::new(kind, "test"))
    }

    /// The server named by `KEEL_TEST_REDIS_URL`.
    async fn redis_server() -> RedisBackend {
        let url = test_server::url("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/");
        match RedisBackend::connect(&url).await {
            Ok(b) => b,
            Err(e) => panic!("cannot connect to KEEL_TEST_REDIS_URL={url}: {e}"),
        }
    }

    #[test]
    fn match_prefix_escapes_every_glob_byte() {
        assert_eq!(match_prefix(b""), b"*");
        assert_eq!(match_prefix(b"plain:"), b"plain:*");
        assert_eq!(
            match_prefix(b"a*b?c[d]e\\f"),
            b"a\\*b\\?c\\[d\\]e\\\\f*".to_vec()
        );
        // Other bytes, including NUL, 0xFF and `^`/`-` (only special inside brackets), pass
        // through untouched.
        assert_eq!(match_prefix(b"\x00\xff^-!"), b"\x00\xff^-!*".to_vec());
    }

    #[test]
    fn valkey_schemes_are_rewritten() {
        assert_eq!(redis_scheme("valkey://h:1/0"), "redis://h:1/0");
        assert_eq!(redis_scheme("VALKEY://h"), "redis://h");
        assert_eq!(redis_scheme("valkeys://u:p@h"), "rediss://u:p@h");
        assert_eq!(redis_scheme("valkey+unix:///tmp/s"), "redis+unix:///tmp/s");
        assert_eq!(redis_scheme("redis://h"), "redis://h");
        assert_eq!(redis_scheme("rediss://h"), "rediss://h");
        assert_eq!(redis_scheme("vé"), "vé");
    }

    #[test]
    fn pttl_maps_to_ttl() {
        assert_eq!(ttl_from_pttl(-2), Ttl::Missing);
        assert_eq!(ttl_from_pttl(-1), Ttl::NoExpiry);
        assert_eq!(ttl_from_pttl(0), Ttl::Remaining(Duration::from_millis(1)));
        assert_eq!(
            ttl_from_pttl(1500),
            Ttl::Remaining(Duration::from_millis(1500))
        );
    }

    #[test]
    fn cursors_are_decimal_u64() {
        assert_eq!(parse_cursor(b"0").ok(), Some(0));
        assert_eq!(parse_cursor(b"18446744073709551615").ok(), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b" 1",
            b"1a",
            b"18446744073709551616",
            b"\xff",
        ] {
            let kind = parse_cursor(bad).err().map(|e| e.kind());
            assert_eq!(kind, Some(ErrorKind::InvalidInput), "{bad:?}");
        }
    }

    #[test]
    fn server_detection_reads_info() {
        let redis =
            Server::from_info("# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n");
        assert_eq!(redis.flavor, Some(Flavor::Redis));
        assert_eq!(redis.version, Some(Version(7, 0, 15)));
        assert!(!redis.has_set_ifeq() && !redis.has_delifeq());

        let valkey = |v: &str| {
            Server::from_info(&format!(
                "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:{v}\r\n"
            ))
        };
        let v9 = valkey("9.1.2");
        assert_eq!(v9.flavor, Some(Flavor::Valkey));
        assert_eq!(v9.version, Some(Version(9, 1, 2)));
        assert!(v9.has_set_ifeq() && v9.has_delifeq());
        let v81 = valkey("8.1.0");
        assert!(v81.has_set_ifeq() && !v81.has_delifeq());
        let v80 = valkey("8.0.4");
        assert!(!v80.has_set_ifeq() && !v80.has_delifeq());
        let odd = valkey("unstable");
        assert_eq!(odd.flavor, Some(Flavor::Valkey));
        assert!(
            !odd.has_set_ifeq(),
            "an unreadable version gets the scripts"
        );

        assert_eq!(Server::from_info(""), Server::UNKNOWN);
        assert_eq!(Version::parse("6"), Some(Version(6, 0, 0)));
        assert_eq!(Version::parse("6.2"), Some(Version(6, 2, 0)));
        assert_eq!(Version::parse("x.1"), None);
    }

    #[test]
    fn io_errors_are_transient_and_timeouts_are_timeouts() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
        ] {
            assert_eq!(classify(&io_error(kind)), ErrorKind::Transient, "{kind:?}");
        }
        assert_eq!(
            classify(&io_error(io::ErrorKind::TimedOut)),
            ErrorKind::Timeout
        );
    }

    #[test]
    fn server_replies_are_classified() {
        let cases: [(&[u8], ErrorKind); 12] = [
            (
                b"-LOADING Redis is loading the dataset in memory\r\n",
                ErrorKind::Transient,
            ),
            (
                b"-BUSY Redis is busy running a script.\r\n",
                ErrorKind::Transient,
            ),
            (
                b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
                ErrorKind::Transient,
            ),
            (
                b"-MASTERDOWN Link with MASTER is down\r\n",
                ErrorKind::Transient,
            ),
            (
                b"-READONLY You can't write against a read only replica.\r\n",
                ErrorKind::Transient,
            ),
            (
                b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
                ErrorKind::Transient,
            ),
            (
                b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
                ErrorKind::Permanent,
            ),
            (
                b"-ERR unknown command 'NOPE', with args beginning with: \r\n",
                ErrorKind::Permanent,
            ),
            (
                b"-NOAUTH Authentication required.\r\n",
                ErrorKind::Permanent,
            ),
            (
                b"-WRONGPASS invalid username-password pair\r\n",
                ErrorKind::Permanent,
            ),
            (
                b"-NOPERM this user has no permissions to run the 'info' command\r\n",
                ErrorKind::Permanent,
            ),
            (b"-MOVED 3999 127.0.0.1:6381\r\n", ErrorKind::Permanent),
        ];
        for (wire, expected) in cases {
            let e = reply_error(wire);
            assert_eq!(classify(&e), expected, "{}", String::from_utf8_lossy(wire));
            assert_eq!(redis_error("TEST", e).kind(), expected);
        }
        let auth = RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert_eq!(classify(&auth), ErrorKind::Permanent);
        let url = RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "Redis URL did not parse",
        ));
        assert_eq!(classify(&url), ErrorKind::InvalidInput);
    }

    #[test]
    fn incr_errors_become_the_contracts() {
        let nan = reply_error(b"-ERR value is not an integer or out of range\r\n");
        assert_eq!(incr_error("INCRBY", nan).kind(), ErrorKind::NotAnInteger);
        let over = reply_error(b"-ERR increment or decrement would overflow\r\n");
        assert_eq!(incr_error("INCRBY", over).kind(), ErrorKind::Overflow);
        let wrong =
            reply_error(b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        assert_eq!(incr_error("INCRBY", wrong).kind(), ErrorKind::Permanent);
    }

    #[tokio::test]
    async fn unreachable_server_fails_connect_with_the_cause() {
        // Port 1 on loopback has nothing listening: the connection is refused at once.
        let err = match RedisBackend::connect("redis://127.0.0.1:1/").await {
            Ok(b) => panic!("connected to nothing: {b:?}"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
        let text = err.to_string();
        assert!(text.contains("127.0.0.1:1"), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[tokio::test]
    async fn bad_urls_and_options_are_invalid_input() {
        let err = RedisBackend::connect("http://127.0.0.1/").await.err();
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::InvalidInput));
        let zero = RedisOptions::default().with_op_timeout(Duration::ZERO);
        let err = RedisBackend::connect_with("redis://127.0.0.1:1/", zero)
            .await
            .err();
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::InvalidInput));
    }

    #[tokio::test]
    async fn real_server_errors_are_classified() {
        let b = redis_server().await;
        let Transport::Single(link) = &b.transport else {
            panic!("KEEL_TEST_REDIS_URL is a single server")
        };
        let mut conn = link.lease().await.unwrap().conn;
        let unknown = cmd("KEEL-NO-SUCH-COMMAND")
            .query_async::<()>(&mut conn)
            .await;
        let err = unknown.err().map(|e| redis_error("TEST", e));
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::Permanent));

        let list = unique("list");
        let _: i64 = cmd("RPUSH")
            .arg(&list)
            .arg("x")
            .query_async(&mut conn)
            .await
            .unwrap_or(0);
        let err = b.incr(&list, 1, None).await.err();
        assert_eq!(
            err.map(|e| e.kind()),
            Some(ErrorKind::Permanent),
            "WRONGTYPE"
        );
        let err = b
            .compare_and_swap(&list, Some(b"x"), b"y", TtlPolicy::Keep)
            .await
            .err();
        assert_eq!(
            err.map(|e| e.kind()),
            Some(ErrorKind::Permanent),
            "WRONGTYPE in a script"
        );
        assert!(b.delete(&list).await.is_ok_and(|deleted| deleted));
    }

    #[tokio::test]
    async fn operation_past_op_timeout_is_a_timeout() {
        let b = redis_server().await;
        let b = RedisBackend {
            op_timeout: Duration::from_millis(50),
            ..b
        };
        // BLPOP on a key nobody pushes to holds the reply back for 0.5 s, longer than the
        // 50 ms allowed.
        let key = unique("never-pushed");
        let err = b
            .run("BLPOP", |mut conn| async move {
                cmd("BLPOP")
                    .arg(&key)
                    .arg(0.5)
                    .query_async::<Option<(Vec<u8>, Vec<u8>)>>(&mut conn)
                    .await
            })
            .await
            .err();
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::Timeout));
        // The timed-out connection was replaced, and the handle works on the new one.
        b.set(&unique("after"), b"v", Some(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(b.reconnects(), 1);
    }

    #[tokio::test]
    async fn redis_is_detected_and_gets_the_scripts() {
        let b = redis_server().await;
        let server = b.server();
        assert_eq!(
            server.flavor,
            Some(Flavor::Redis),
            "KEEL_TEST_REDIS_URL is not a Redis server"
        );
        assert_eq!(b.name(), "redis");
        assert!(
            server.version.is_some_and(|v| v >= REDIS_VERSION_MIN),
            "{server:?}"
        );
        assert!(
            !server.has_set_ifeq() && !server.has_delifeq(),
            "{server:?}"
        );
    }
}
