//! Scratch Redis and Valkey servers for tests that stop, demote or freeze a server: each test
//! gets its own process on a free loopback port, with its own directory, killed on drop.
//!
//! Redis comes from `redis-server` on the `PATH`; Valkey from `KEEL_TEST_VALKEY_SERVER` (the
//! path of a `valkey-server` binary, which `scripts/test` sets). A missing binary is a failure
//! that says how to provide it, never a skip.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which server to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Redis,
    Valkey,
}

impl Kind {
    fn binary(self) -> PathBuf {
        match self {
            Kind::Redis => PathBuf::from("redis-server"),
            Kind::Valkey => match std::env::var("KEEL_TEST_VALKEY_SERVER") {
                Ok(path) if !path.is_empty() => PathBuf::from(path),
                _ => panic!(
                    "KEEL_TEST_VALKEY_SERVER is not set: run scripts/test (it installs Valkey and \
                     sets it), or set it to the path of a valkey-server binary"
                ),
            },
        }
    }

    /// The URL scheme to reach it with.
    pub(crate) fn scheme(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Valkey => "valkey",
        }
    }
}

/// A running scratch server.
#[allow(dead_code, reason = "the directory is held so it outlives the server")]
pub(crate) struct Scratch {
    pub(crate) kind: Kind,
    pub(crate) port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (another process could take it before the server binds it; `start`
/// retries then).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

impl Scratch {
    /// Starts a server with no persistence plus `extra` arguments, and waits until it answers.
    pub(crate) fn start(kind: Kind, extra: &[&str]) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        Scratch::start_in(kind, dir, extra)
    }

    /// As [`Scratch::start`], in `dir` (kept, so a restart finds its files).
    pub(crate) fn start_in(kind: Kind, dir: tempfile::TempDir, extra: &[&str]) -> Scratch {
        let mut dir = Some(dir);
        for _ in 0..5 {
            let port = free_port();
            if let Some(s) = Scratch::try_start(kind, dir.take().unwrap(), port, extra) {
                return s;
            } else {
                dir = Some(tempfile::tempdir().unwrap());
            }
        }
        panic!("could not start a scratch {kind:?} server");
    }

    fn try_start(kind: Kind, dir: tempfile::TempDir, port: u16, extra: &[&str]) -> Option<Scratch> {
        let child = Command::new(kind.binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", kind.binary()));
        let mut s = Scratch {
            kind,
            port,
            dir,
            child,
        };
        s.wait_until_up().then_some(s)
    }

    /// Polls `PING` until the server answers (bounded); false if it exited or never answered.
    fn wait_until_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if self.cli(&["PING"]).is_some_and(|r| r == "PONG") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Runs one command with `redis-cli` and returns its trimmed output.
    pub(crate) fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub(crate) fn url(&self) -> String {
        format!("{}://127.0.0.1:{}/", self.kind.scheme(), self.port)
    }

    /// Kills the server at once (no shutdown save) and starts it again on the same port and
    /// directory with the same arguments, as after a crash.
    pub(crate) fn crash_and_restart(mut self, extra: &[&str]) -> Scratch {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (kind, port) = (self.kind, self.port);
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        drop(self);
        Scratch::try_start(kind, dir, port, extra)
            .unwrap_or_else(|| panic!("the scratch {kind:?} server did not restart"))
    }

    /// Waits (bounded) until `INFO replication` shows a working link to the primary.
    pub(crate) fn wait_replica_synced(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self
                .cli(&["INFO", "replication"])
                .is_some_and(|i| i.contains("master_link_status:up"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the scratch replica never synced with its primary");
    }
}
