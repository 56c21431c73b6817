//! What the HTTP cases share: a real axum server on a loopback socket, a real HTTP client, and
//! an outage switch in front of the backend under test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use super::*;
use crate::backend::ScanPage;
use crate::error::{Error, Result};

/// An axum app served on `127.0.0.1:0` with `ConnectInfo<SocketAddr>`; stops accepting when
/// dropped.
pub(super) struct Server {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) async fn serve(app: axum::Router) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, service).await.unwrap();
    });
    Server { addr, task }
}

/// [`serve`] without `ConnectInfo`: the misconfiguration the peer-IP extractor must report.
pub(super) async fn serve_without_connect_info(app: axum::Router) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Server { addr, task }
}

/// A keep-alive HTTP/1 client that never goes through a proxy from the environment.
pub(super) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub(super) fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// The JSON body of a problem response, after checking its media type.
pub(super) async fn problem(r: reqwest::Response) -> serde_json::Value {
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some("application/problem+json")
    );
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// The backend under test behind a switch: while down, every operation fails with a
/// transient error, as a backend whose server is unreachable does.
pub(super) struct Outage {
    inner: Arc<dyn Backend>,
    down: AtomicBool,
}

impl Outage {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Outage {
            inner,
            down: AtomicBool::new(false),
        })
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Transient,
                "backend unreachable (outage)",
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Backend for Outage {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        self.check()?;
        self.inner.get_with_ttl(key).await
    }
    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        self.check()?;
        self.inner.set(key, value, ttl).await
    }
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        self.check()?;
        self.inner.set_nx(key, value, ttl).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.check()?;
        self.inner.compare_and_swap(key, expected, new, ttl).await
    }
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        self.check()?;
        self.inner.compare_and_delete(key, expected).await
    }
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64> {
        self.check()?;
        self.inner.incr(key, delta, ttl_on_create).await
    }
    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        self.check()?;
        self.inner.expire(key, ttl).await
    }
    async fn persist(&self, key: &[u8]) -> Result<bool> {
        self.check()?;
        self.inner.persist(key).await
    }
    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        self.check()?;
        self.inner.ttl(key).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        self.check()?;
        self.inner.scan(prefix, cursor, limit).await
    }
    async fn now_ms(&self) -> Result<u64> {
        self.check()?;
        self.inner.now_ms().await
    }
}

/// The backend under test, counting the calls made through it (per operation), to show that
/// a layer did or did not touch the backend.
pub(super) struct Counting {
    inner: Arc<dyn Backend>,
    calls: std::sync::Mutex<std::collections::BTreeMap<&'static str, usize>>,
}

impl Counting {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            calls: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        })
    }

    fn hit(&self, op: &'static str) {
        *self.calls.lock().unwrap().entry(op).or_default() += 1;
    }

    /// Calls of every operation so far.
    pub fn total(&self) -> usize {
        self.calls.lock().unwrap().values().sum()
    }

    /// Calls of `op` so far.
    pub fn of(&self, op: &str) -> usize {
        self.calls.lock().unwrap().get(op).copied().unwrap_or(0)
    }

    /// What was called, for assertion messages.
    pub fn calls(&self) -> String {
        format!("{:?}", self.calls.lock().unwrap())
    }
}

#[async_trait]
impl Backend for Counting {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.hit("get");
        self.inner.get(key).await
    }
    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        self.hit("get_with_ttl");
        self.inner.get_with_ttl(key).await
    }
    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        self.hit("set");
        self.inner.set(key, value, ttl).await
    }
    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        self.hit("set_nx");
        self.inner.set_nx(key, value, ttl).await
    }
    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.hit("compare_and_swap");
        self.inner.compare_and_swap(key, expected, new, ttl).await
    }
    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        self.hit("compare_and_delete");
        self.inner.compare_and_delete(key, expected).await
    }
    async fn delete(&self, key: &[u8]) -> Result<bool> {
        self.hit("delete");
        self.inner.delete(key).await
    }
    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64> {
        self.hit("incr");
        self.inner.incr(key, delta, ttl_on_create).await
    }
    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        self.hit("expire");
        self.inner.expire(key, ttl).await
    }
    async fn persist(&self, key: &[u8]) -> Result<bool> {
        self.hit("persist");
        self.inner.persist(key).await
    }
    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        self.hit("ttl");
        self.inner.ttl(key).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        self.hit("scan");
        self.inner.scan(prefix, cursor, limit).await
    }
    async fn now_ms(&self) -> Result<u64> {
        self.hit("now_ms");
        self.inner.now_ms().await
    }
}
