//! End-to-end tests of `keel demo`, always through the real binary: the tour (the service's
//! smoke test), serving until Ctrl-C with requests in flight, a second Ctrl-C, refused
//! options, and a real browser (headless Chromium driven over WebDriver) signing in, seeing its
//! devices and revoking another session.
//!
//! The browser test needs Chromium and chromedriver (Debian's `chromium` and `chromium-driver`,
//! which `scripts/test` installs): `KEEL_TEST_CHROMEDRIVER` and `KEEL_TEST_CHROMIUM` name them,
//! defaulting to `/usr/bin/chromedriver` and `/usr/bin/chromium`. Without them the test fails
//! with instructions; it is never skipped.
#![cfg(feature = "demo")]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keel_engine::{Db, Options};
use serde_json::{Value, json};

/// How long a test waits for the service to print something or to exit.
const WAIT: Duration = Duration::from_secs(60);

/// `keel` with `KEEL_DB` cleared, so the developer's environment cannot leak in.
fn keel() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.env_remove("KEEL_DB");
    cmd
}

/// A running `keel demo`, its output read line by line.
struct Service {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    base: String,
}

impl Service {
    /// Starts `keel --db DIR demo --port 0` and waits for its address.
    fn start(dir: &Path) -> Service {
        let mut child = keel()
            .arg("--db")
            .arg(dir)
            .args(["demo", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning keel demo");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut service = Service {
            child,
            lines,
            seen: Vec::new(),
            base: String::new(),
        };
        let banner = service.wait_for(|l| l.starts_with("keel demo: serving http://"));
        let rest = banner.trim_start_matches("keel demo: serving ");
        service.base = rest.split(' ').next().unwrap_or("").to_owned();
        service
    }

    /// The next output line matching `pred` (lines before it are kept for failure messages).
    fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "keel demo did not print the expected line ({e:?}); it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The sign-in code the service "mailed" to `email` next.
    fn code_for(&mut self, email: &str) -> String {
        let prefix = format!("mail to {email}: your sign-in code is ");
        let line = self.wait_for(|l| l.starts_with(&prefix));
        line[prefix.len()..]
            .split(' ')
            .next()
            .unwrap_or("")
            .to_owned()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit; the rest of its output is collected.
    fn exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for keel demo") {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keel demo did not exit; it printed:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn client(cookies: bool) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .cookie_store(cookies)
        .build()
        .expect("client")
}

/// Signs `http` in as `email` through the JSON API; returns the session id.
async fn sign_in(service: &mut Service, http: &reqwest::Client, email: &str) -> String {
    let sent = http
        .post(format!("{}/api/login", service.base))
        .json(&json!({"email": email}))
        .send()
        .await
        .expect("POST /api/login");
    assert_eq!(sent.status(), 202);
    let code = service.code_for(email);
    let verified = http
        .post(format!("{}/api/login/verify", service.base))
        .json(&json!({"email": email, "code": code}))
        .send()
        .await
        .expect("POST /api/login/verify");
    assert_eq!(verified.status(), 200);
    let body: Value = verified.json().await.expect("JSON");
    body["session"].as_str().expect("a session id").to_owned()
}

#[test]
fn the_tour_checks_every_feature_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let run = keel()
        .args(["demo", "--tour", "--url"])
        .arg(dir.path())
        .output()
        .expect("running keel demo --tour");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "exit {:?}\n{out}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    for section in [
        "== pages: server-rendered HTML",
        "== sign-in by one-time code, cookie sessions, devices",
        "== the session id changes at every sign-in",
        "== rate limit on sign-in: per client IP and per e-mail, stacked",
        "== POST /orders with an Idempotency-Key",
        "== GET /catalog behind the HTTP cache",
        "== POST /webhooks/payments, deduplicated by event id",
        "== a feature flag with a 50% rollout",
        "== a circuit breaker around a flaky upstream",
        "== a job under a lock, writing with its fencing token",
        "== GET /metrics",
    ] {
        assert!(out.contains(section), "no {section:?} in:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
    let summary = out
        .lines()
        .find(|l| l.starts_with("tour: all "))
        .unwrap_or_else(|| panic!("no summary in:\n{out}"));
    let checks: usize = summary
        .trim_start_matches("tour: all ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(checks >= 60, "{summary}");
    assert!(out.contains("keel demo: store closed"), "{out}");

    // The state is in the store it was given, and the store was closed (its lock is free).
    let db = Db::open(dir.path(), Options::default()).expect("the store reopens");
    assert_eq!(db.get("orders:seq").as_deref(), Some(&b"1"[..]));
    assert!(db.get("keel-demo:secret:session-key").is_some());
    assert!(db.get("flags:doc:welcome-v2").is_some());
}

/// The tour on a network backend named by `var` (set by `scripts/test`; unset is a failure
/// with instructions, never a skip).
#[cfg(all(feature = "redis", feature = "postgres"))]
fn tour_on(var: &str) {
    let url = match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set, so the demo cannot be toured on that backend. Run `scripts/test`, \
             which starts the servers and sets it, or set it yourself."
        ),
    };
    // The login routes' per-IP quotas live in the store, and every run of this test comes
    // from 127.0.0.1: forget what earlier runs used, so the test can run any number of times.
    runtime().block_on(async {
        let backend = keel::connect(&url)
            .await
            .expect("connecting to the backend");
        backend
            .delete_prefix(b"rl:login-")
            .await
            .expect("resetting the login quotas");
    });
    let run = keel()
        .args(["demo", "--tour", "--url", &url])
        .output()
        .expect("running keel demo --tour");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.contains("tour: all "), "{out}");
}

#[cfg(all(feature = "redis", feature = "postgres"))]
#[test]
fn the_tour_passes_on_redis() {
    tour_on("KEEL_TEST_REDIS_URL");
}

#[cfg(all(feature = "redis", feature = "postgres"))]
#[test]
fn the_tour_passes_on_postgres() {
    tour_on("KEEL_TEST_POSTGRES_URL");
}

#[test]
fn the_tour_without_a_store_uses_a_temporary_one_and_deletes_it() {
    let child = keel()
        .args(["demo", "--tour"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning keel demo --tour");
    let pid = child.id();
    let run = child.wait_with_output().expect("waiting for the tour");
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{out}");
    assert!(
        out.contains("a fresh keel store in a temporary directory"),
        "{out}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("keel-demo-{pid}-"))
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn ctrl_c_lets_requests_in_flight_finish_then_closes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start(dir.path());
    let base = service.base.clone();
    let rt = runtime();
    let http = client(false);
    let order = rt
        .block_on(
            http.post(format!("{base}/orders"))
                .header("idempotency-key", "k1")
                .json(&json!({"item": "croissant", "qty": 3}))
                .send(),
        )
        .expect("POST /orders");
    assert_eq!(order.status(), 201);

    // A job that holds its lock for 1.5 s is in flight when the signal arrives.
    let in_flight = rt.spawn(
        http.post(format!("{base}/jobs/nightly?hold_ms=1500"))
            .send(),
    );
    service.wait_for(|l| l.starts_with("job nightly: started"));
    service.signal("INT");
    service.wait_for(|l| l.contains("shutting down"));
    let done = rt
        .block_on(in_flight)
        .expect("the request task")
        .expect("the request in flight is answered");
    assert_eq!(done.status(), 200);
    let body: Value = rt.block_on(done.json()).expect("JSON");
    assert_eq!(body["fence"], "accepted");

    let status = service.exit();
    assert!(status.success(), "{status:?}\n{}", service.output());
    let out = service.output();
    assert!(out.contains("stopped serving"), "{out}");
    assert!(
        out.contains("store closed (log flushed and synced)"),
        "{out}"
    );

    // Everything acknowledged is on disk, and the store's lock was released.
    let db = Db::open(dir.path(), Options::default()).expect("the store reopens");
    let stored: Value = serde_json::from_slice(&db.get("orders:1").expect("order 1")).unwrap();
    assert_eq!(stored["total_cents"], 900);
    assert!(db.get("fence:job-output:nightly").is_some());
}

#[test]
fn a_second_ctrl_c_exits_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start(dir.path());
    let base = service.base.clone();
    let rt = runtime();
    let http = client(false);
    // 30 s of work: far longer than this test waits for the exit.
    let _in_flight = rt.spawn(http.post(format!("{base}/jobs/long?hold_ms=30000")).send());
    service.wait_for(|l| l.starts_with("job long: started"));
    let started = Instant::now();
    service.signal("INT");
    service.wait_for(|l| l.contains("shutting down"));
    service.signal("INT");
    let status = service.exit();
    assert_eq!(status.code(), Some(130), "{}", service.output());
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(rt);
}

#[test]
fn sigterm_stops_it_gracefully_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut service = Service::start(dir.path());
    service.signal("TERM");
    let status = service.exit();
    assert!(status.success(), "{status:?}\n{}", service.output());
    assert!(service.output().contains("store closed"));
}

#[test]
fn a_restart_on_the_same_store_keeps_sessions_and_idempotency_records() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let http = client(true);
    let mut first = Service::start(dir.path());
    let session = rt.block_on(sign_in(&mut first, &http, "dana@example.com"));
    let order = rt
        .block_on(
            http.post(format!("{}/orders", first.base))
                .header("idempotency-key", "restart-1")
                .json(&json!({"item": "espresso", "qty": 1}))
                .send(),
        )
        .unwrap();
    assert_eq!(order.status(), 201);
    first.signal("INT");
    assert!(first.exit().success(), "{}", first.output());

    // A new process on the same directory (and a new port: the cookie is host-only, and
    // 127.0.0.1 is the same host).
    let second = Service::start(dir.path());
    let me: Value = rt
        .block_on(async {
            http.get(format!("{}/api/me", second.base))
                .send()
                .await?
                .json()
                .await
        })
        .unwrap();
    assert_eq!(me["session"], session.as_str(), "{me}");
    let replay = rt
        .block_on(
            http.post(format!("{}/orders", second.base))
                .header("idempotency-key", "restart-1")
                .json(&json!({"item": "espresso", "qty": 1}))
                .send(),
        )
        .unwrap();
    assert_eq!(
        replay.headers().get("idempotency-replayed").unwrap(),
        "true"
    );
}

#[test]
fn bad_options_and_unusable_stores_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = keel().args(["demo", "--port", "70000"]).output().unwrap();
    assert_eq!(run.status.code(), Some(2));

    let run = keel()
        .args(["demo", "--url", "nosuch://x"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("unknown backend scheme"), "{stderr}");

    // A port already taken.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let run = keel()
        .arg("--db")
        .arg(dir.path())
        .args(["demo", "--port", &port])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );

    // A store another process holds.
    let held = Db::open(dir.path(), Options::default()).unwrap();
    let run = keel()
        .arg("--db")
        .arg(dir.path())
        .args(["demo", "--port", "0"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("locked"), "{stderr}");
    held.close().unwrap();
}

// ---- the browser ----------------------------------------------------------------------------

/// chromedriver, started on a free port by the test and stopped with it.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool(var: &str, default: &str, package: &str) -> String {
    let path = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    if !Path::new(&path).exists() {
        panic!(
            "{path} does not exist, so the browser test cannot start a browser. Run \
             `scripts/test`, which installs Debian's `chromium` and `chromium-driver`, or \
             `apt-get install {package}`, or set {var} to the binary."
        );
    }
    path
}

async fn start_driver() -> Driver {
    let chromedriver = tool(
        "KEEL_TEST_CHROMEDRIVER",
        "/usr/bin/chromedriver",
        "chromium-driver",
    );
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let child = Command::new(&chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {chromedriver}: {e}"));
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    // Ready when its status endpoint says so.
    let http = client(false);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = http.get(format!("{}/status", driver.url)).send().await
            && let Ok(v) = r.json::<Value>().await
            && v["value"]["ready"] == true
        {
            return driver;
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver on port {port} did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn browser(driver: &Driver, profile: &Path) -> fantoccini::Client {
    let chromium = tool("KEEL_TEST_CHROMIUM", "/usr/bin/chromium", "chromium");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    fantoccini::ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the browser did not start through chromedriver at {}: {e}",
                driver.url
            )
        })
}

/// Polls `f` until it is true (the page may still be loading after a click).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_browser_signs_in_sees_its_devices_and_revokes_another_session() {
    use fantoccini::Locator;

    let dir = tempfile::tempdir().unwrap();
    let profile = tempfile::tempdir().unwrap();
    let mut service = Service::start(dir.path());
    let base = service.base.clone();
    let rt = runtime();
    rt.block_on(async {
        let driver = start_driver().await;
        let c = browser(&driver, profile.path()).await;
        let email = "alice@example.com";

        // Sign in with the code from the server's output.
        c.goto(&format!("{base}/")).await.unwrap();
        c.find(Locator::Css("#email"))
            .await
            .unwrap()
            .send_keys(email)
            .await
            .unwrap();
        c.find(Locator::Css("#send"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait().for_element(Locator::Css("#code")).await.unwrap();
        let code = service.code_for(email);
        c.find(Locator::Css("#code"))
            .await
            .unwrap()
            .send_keys(&code)
            .await
            .unwrap();
        c.find(Locator::Css("#sign-in"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("#devices"))
            .await
            .unwrap();
        let user = c
            .find(Locator::Css("#user"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(user.contains(email), "{user}");
        let rows = c.find_all(Locator::Css("tr.device")).await.unwrap();
        assert_eq!(rows.len(), 1);
        let class = rows[0].attr("class").await.unwrap().unwrap_or_default();
        assert!(class.contains("current"), "{class}");
        let browser_session = rows[0].attr("data-session").await.unwrap().unwrap();

        // A second session of the same user, from an HTTP client.
        let http = client(true);
        let other = sign_in(&mut service, &http, email).await;
        assert_ne!(other, browser_session);
        c.refresh().await.unwrap();
        let other_row = format!("tr.device[data-session='{other}']");
        c.wait()
            .for_element(Locator::Css(&other_row))
            .await
            .unwrap();
        assert_eq!(
            c.find_all(Locator::Css("tr.device")).await.unwrap().len(),
            2
        );

        // The browser revokes it with the row's button (a plain form post).
        c.find(Locator::Css(&format!(
            "button.revoke[data-session='{other}']"
        )))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
        eventually("the revoked session's row is gone", || async {
            c.find_all(Locator::Css(&other_row))
                .await
                .is_ok_and(|rows| rows.is_empty())
                && c.find(Locator::Css("#devices")).await.is_ok()
        })
        .await;
        let rows = c.find_all(Locator::Css("tr.device")).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            rows[0].attr("data-session").await.unwrap().as_deref(),
            Some(browser_session.as_str())
        );

        // The revoked session's next request is anonymous.
        let me = http.get(format!("{base}/api/me")).send().await.unwrap();
        assert_eq!(me.status(), 401);

        // The cookie the browser stored: HttpOnly, SameSite=Lax.
        let cookies = c.get_all_cookies().await.unwrap();
        let session = cookies
            .iter()
            .find(|k| k.name() == "keel_session")
            .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
        assert_eq!(session.http_only(), Some(true), "{session:?}");
        assert_eq!(
            session.same_site(),
            Some(cookie::SameSite::Lax),
            "{session:?}"
        );
        assert_eq!(session.path(), Some("/"));

        // And the browser is still signed in.
        c.goto(&format!("{base}/")).await.unwrap();
        let user = c
            .find(Locator::Css("#user"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(user.contains(email), "{user}");
        c.close().await.unwrap();
        drop(driver);
    });
    service.signal("INT");
    assert!(service.exit().success(), "{}", service.output());
    let _: SocketAddr = base
        .trim_start_matches("http://")
        .parse()
        .expect("the banner names an address");
}
