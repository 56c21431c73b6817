//! keel next to the stores it replaces, every workload on every backend in one run.
//!
//! `cargo bench --bench compare --all-features -- [--quick] [--secs S] [--only LIST] [--dir PATH]`
//!
//! Backends: keel's engine (`Immediate`, `Periodic(100ms)`, memory-only) through the `Backend`
//! contract (and, for reads and the single-writer rounds, through `Db` directly); sled and redb
//! through their keel adapters and through their own APIs in their durable configuration;
//! Redis and Valkey, each started by this harness twice (`appendfsync always` and `everysec`);
//! the local Postgres with a logged table, and again with `synchronous_commit=off`.
//!
//! Workloads (numbered as in BENCHMARKS.md): 1 `incr` with a TTL on create, 2 lock
//! acquire+release, 3 `get` hits, 4 GCRA rate-limit checks, 5 reopen time, 6 memory per key,
//! 7 the disk's raw fdatasync rate next to keel's single durable writer. Each prints a Markdown
//! table: ops/s, p50 and p99 latency, and the ratio to keel `Immediate`, then the targets are
//! checked against the run. A cell runs for a fixed time after a short warm-up, and every loop
//! is also bounded by a count, so the run ends by itself. `--quick` shrinks everything so the
//! whole run takes well under two minutes: 0.25 s cells, 1,000 keys for `get`, 100,000 keys
//! for reopen and memory, one round of workload 7. All traffic goes to 127.0.0.1.
//! `--only incr,get` runs a subset (names: fsync, incr, lock, get, ratelimit, reopen, memory).
//! With `CI=true`, a backend that cannot be started fails the run instead of showing up as
//! unavailable.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_engine::{Batch, Db, Durability, Options};
use keel_primitives::Backend;
use keel_primitives::lock::Lock;
use keel_primitives::ratelimit::{Quota, RateLimiter, Strategy};

use support::backends::{
    Kind, Native, NativeStore, POOL_SIZE, REDB_NATIVE, SLED_NATIVE, Target, open_native,
    scratch_dir,
};
use support::measure::{
    AsyncCaller, BlockingCaller, KeyPicker, Measured, Plan, drive_async, drive_blocking,
};
use support::report::{REFERENCE, Row, Table, latency, secs, thousands};
use support::servers::{self, Server};

/// TTL stamped on a counter when `incr` creates it.
const INCR_TTL: Duration = Duration::from_secs(3600);
/// Lease TTL of the lock workload (never reached: each lease is released at once).
const LOCK_TTL: Duration = Duration::from_secs(30);
/// Caller counts per workload.
const INCR_CALLERS: [usize; 3] = [1, 8, 64];
const LOCK_CALLERS: [usize; 2] = [1, 64];
const GET_CALLERS: [usize; 2] = [1, 2];
const RATELIMIT_CALLERS: [usize; 2] = [1, 64];
// Every connection pool is at least as big as the most callers of any cell.
const _: () = assert!(
    INCR_CALLERS[2] <= POOL_SIZE
        && LOCK_CALLERS[1] <= POOL_SIZE
        && RATELIMIT_CALLERS[1] <= POOL_SIZE
);
/// Distinct keys the rate-limit workload spreads its checks over.
const RATELIMIT_KEYS: usize = 10_000;
/// Keys are 16 bytes (`key:` and 12 digits), values 100 bytes, in workloads 3, 5 and 6.
const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 100;
/// Keys loaded per batch / transaction / pipeline when filling a store.
const LOAD_BATCH: u64 = 1_000;
/// How long the memory workload waits for one reply from a server it is filling.
const SERVER_RESPONSE_WAIT: Duration = Duration::from_secs(30);
/// Concurrent writers when filling a store through the contract.
const POPULATE_TASKS: usize = 16;
/// Rounds of workload 7 in a full run (one with `--quick`), and the length of each of its
/// measurements: short rounds, back to back, so the disk's weather (other tenants' I/O on a
/// shared machine) hits the raw rate and keel alike.
const DISK_ROUNDS: usize = 5;
const DISK_MEASURE: Duration = Duration::from_secs(1);
const DISK_MEASURE_QUICK: Duration = Duration::from_millis(500);
/// A count bound for every measuring loop, far above what the time bound allows.
const OPS_PER_CALLER_MAX: u64 = 100_000_000;
/// Postgres tables owned by the harness (dropped at the start and the end of a run).
const PG_TABLE_LOGGED: &str = "keel_bench_logged";
const PG_TABLE_ASYNC: &str = "keel_bench_async";

const WORKLOADS: [&str; 7] = [
    "fsync",
    "incr",
    "lock",
    "get",
    "ratelimit",
    "reopen",
    "memory",
];

// ---- configuration ----------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Config {
    quick: bool,
    plan: Plan,
    /// Keys a `get` cell reads from.
    get_keys: usize,
    /// Keys in the reopen and memory workloads.
    big_keys: u64,
    /// Where every store, server directory and test file lives (one disk).
    scratch: PathBuf,
    only: Vec<String>,
}

impl Config {
    fn runs(&self, workload: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|w| w == workload)
    }
}

fn parse_args() -> Result<Config, String> {
    let mut quick = false;
    let mut secs: Option<f64> = None;
    let mut only = Vec::new();
    let mut scratch = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-compare");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--secs" => {
                secs = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|s: &f64| *s > 0.0 && *s <= 600.0)
                        .ok_or("--secs takes a number of seconds per cell, at most 600")?,
                )
            }
            "--only" => {
                let list = args.next().ok_or("--only takes a comma-separated list")?;
                for w in list.split(',') {
                    if !WORKLOADS.contains(&w) {
                        return Err(format!(
                            "unknown workload {w:?} (known: {})",
                            WORKLOADS.join(", ")
                        ));
                    }
                    only.push(w.to_owned());
                }
            }
            "--dir" => scratch = PathBuf::from(args.next().ok_or("--dir takes a path")?),
            "--bench" => {} // cargo bench passes it
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: compare [--quick] [--secs S] \
                     [--only {}] [--dir PATH]",
                    WORKLOADS.join(",")
                ));
            }
        }
    }
    let run_for = Duration::from_secs_f64(secs.unwrap_or(if quick { 0.25 } else { 3.0 }));
    Ok(Config {
        quick,
        plan: Plan {
            warmup: (run_for / 10).max(Duration::from_millis(50)),
            run_for,
            ops_per_caller_max: OPS_PER_CALLER_MAX,
        },
        get_keys: if quick { 1_000 } else { 10_000 },
        big_keys: if quick { 100_000 } else { 1_000_000 },
        scratch,
        only,
    })
}

fn key(i: u64) -> Vec<u8> {
    let k = format!("key:{i:012}").into_bytes();
    debug_assert_eq!(k.len(), KEY_BYTES);
    k
}

fn value() -> Vec<u8> {
    vec![b'v'; VALUE_BYTES]
}

// ---- callers ----------------------------------------------------------------------------

struct IncrCaller {
    backend: Arc<dyn Backend>,
    key: Vec<u8>,
}

impl AsyncCaller for IncrCaller {
    async fn call(&mut self) -> Result<(), String> {
        self.backend
            .incr(&self.key, 1, Some(INCR_TTL))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

struct LockCaller {
    lock: Lock,
    name: Vec<u8>,
}

impl AsyncCaller for LockCaller {
    async fn call(&mut self) -> Result<(), String> {
        let lease = self
            .lock
            .try_acquire(&self.name, LOCK_TTL)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("a caller's own lock was held by someone else")?;
        match lease.release().await {
            Ok(true) => Ok(()),
            Ok(false) => Err("release found the lease already gone".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    }
}

struct GetCaller {
    backend: Arc<dyn Backend>,
    keys: Arc<Vec<Vec<u8>>>,
    picker: KeyPicker,
}

impl AsyncCaller for GetCaller {
    async fn call(&mut self) -> Result<(), String> {
        let key = &self.keys[self.picker.below(self.keys.len())];
        match self.backend.get(key).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(format!("miss on {}", String::from_utf8_lossy(key))),
            Err(e) => Err(e.to_string()),
        }
    }
}

struct RateCaller {
    limiter: RateLimiter,
    keys: Arc<Vec<Vec<u8>>>,
    picker: KeyPicker,
    admitted: u64,
    refused: u64,
}

impl AsyncCaller for RateCaller {
    async fn call(&mut self) -> Result<(), String> {
        let key = &self.keys[self.picker.below(self.keys.len())];
        let decision = self
            .limiter
            .check(key, 1)
            .await
            .map_err(|e| e.to_string())?;
        if decision.allowed {
            self.admitted += 1;
        } else {
            self.refused += 1;
        }
        Ok(())
    }

    fn tally(&self) -> (u64, u64) {
        (self.admitted, self.refused)
    }
}

/// Does nothing: measures the measuring loop.
struct EmptyCaller;

impl AsyncCaller for EmptyCaller {
    async fn call(&mut self) -> Result<(), String> {
        std::hint::black_box(Ok(()))
    }
}

impl BlockingCaller for EmptyCaller {
    fn call(&mut self) -> Result<(), String> {
        std::hint::black_box(Ok(()))
    }
}

/// `Db` directly, no contract: `get` of a random loaded key, or `incr` of its own key.
enum DbCaller<'a> {
    Get {
        db: &'a Db,
        keys: &'a [Vec<u8>],
        picker: KeyPicker,
    },
    Incr {
        db: &'a Db,
        key: Vec<u8>,
    },
}

impl BlockingCaller for DbCaller<'_> {
    fn call(&mut self) -> Result<(), String> {
        match self {
            DbCaller::Get { db, keys, picker } => match db.get(&keys[picker.below(keys.len())]) {
                Some(_) => Ok(()),
                None => Err("miss".to_owned()),
            },
            DbCaller::Incr { db, key } => db
                .incr(&*key, 1, Some(INCR_TTL))
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }
}

enum NativeCaller<'a> {
    Get {
        store: &'a Native,
        keys: &'a [Vec<u8>],
        picker: KeyPicker,
    },
    Incr {
        store: &'a Native,
        key: Vec<u8>,
    },
}

impl BlockingCaller for NativeCaller<'_> {
    fn call(&mut self) -> Result<(), String> {
        match self {
            NativeCaller::Get {
                store,
                keys,
                picker,
            } => match store.get(&keys[picker.below(keys.len())])? {
                true => Ok(()),
                false => Err("miss".to_owned()),
            },
            NativeCaller::Incr { store, key } => store.incr(key),
        }
    }
}

// ---- the run ----------------------------------------------------------------------------

struct Ctx {
    config: Config,
    targets: Vec<Target>,
    workers: usize,
}

impl Ctx {
    fn progress(&self, workload: &str, backend: &str, callers: usize) {
        eprintln!("[compare] {workload}: {backend}, {callers} caller(s)");
    }

    async fn cell<C: AsyncCaller>(&self, callers: Vec<C>) -> Result<Measured, String> {
        let yield_each_op = callers.len() > self.workers;
        drive_async(callers, &self.config.plan, yield_each_op).await
    }
}

/// Notes how many writes shared each fdatasync of `db` during a cell, from its fdatasync
/// count before the cell (`fsyncs_before`) and the cell's operations, warm-up included.
fn note_group_commit(result: &mut Result<Measured, String>, db: &Db, fsyncs_before: u64) {
    let fsyncs = db.stats().wal_fsyncs.saturating_sub(fsyncs_before);
    if let Ok(m) = result
        && fsyncs > 0
    {
        m.note = format!("{:.1} writes/fdatasync", m.attempted as f64 / fsyncs as f64);
    }
}

fn unavailable_rows(table: &mut Table, label: &str, callers: &[usize], why: &str) {
    for &n in callers {
        table.rows.push(Row::new(label, n, Err(why.to_owned())));
    }
}

async fn workload_incr(ctx: &Ctx) -> Table {
    let mut table = Table::new(format!(
        "1. incr with a 1 h TTL on create; each caller increments its own key ({} per cell)",
        secs(ctx.config.plan.run_for)
    ));
    for target in &ctx.targets {
        let opened = match target.open(&ctx.config.scratch).await {
            Ok(o) => o,
            Err(why) => {
                unavailable_rows(&mut table, target.label, &INCR_CALLERS, &why);
                continue;
            }
        };
        for n in INCR_CALLERS {
            ctx.progress("incr", target.label, n);
            let callers = (0..n)
                .map(|i| IncrCaller {
                    backend: Arc::clone(&opened.backend),
                    key: format!("incr:{n}:{i}").into_bytes(),
                })
                .collect();
            let fsyncs_before = opened.db.as_ref().map(|db| db.stats().wal_fsyncs);
            let mut result = ctx.cell(callers).await;
            if let (Some(db), Some(before)) = (&opened.db, fsyncs_before) {
                note_group_commit(&mut result, db, before);
            }
            table.rows.push(Row::new(target.label, n, result));
        }
    }
    for label in [SLED_NATIVE, REDB_NATIVE] {
        let native = match open_native(label, &ctx.config.scratch) {
            Ok(n) => n,
            Err(why) => {
                unavailable_rows(&mut table, label, &INCR_CALLERS, &why);
                continue;
            }
        };
        for n in INCR_CALLERS {
            ctx.progress("incr", label, n);
            let callers = (0..n)
                .map(|i| NativeCaller::Incr {
                    store: &native,
                    key: format!("incr:{n}:{i}").into_bytes(),
                })
                .collect();
            let result = tokio::task::block_in_place(|| drive_blocking(callers, &ctx.config.plan));
            table.rows.push(Row::new(native.label, n, result));
        }
    }
    table
}

async fn workload_lock(ctx: &Ctx) -> Table {
    let mut table = Table::new(format!(
        "2. lock acquire + release (fencing token included); each caller its own lock name, \
         so nobody waits ({} per cell)",
        secs(ctx.config.plan.run_for)
    ));
    for target in &ctx.targets {
        let opened = match target.open(&ctx.config.scratch).await {
            Ok(o) => o,
            Err(why) => {
                unavailable_rows(&mut table, target.label, &LOCK_CALLERS, &why);
                continue;
            }
        };
        let lock = Lock::new(Arc::clone(&opened.backend));
        for n in LOCK_CALLERS {
            ctx.progress("lock", target.label, n);
            let callers = (0..n)
                .map(|i| LockCaller {
                    lock: lock.clone(),
                    name: format!("bench:{n}:{i}").into_bytes(),
                })
                .collect();
            table
                .rows
                .push(Row::new(target.label, n, ctx.cell(callers).await));
        }
    }
    table
}

/// Writes every key through the contract, `POPULATE_TASKS` writers at a time.
async fn populate(backend: &Arc<dyn Backend>, keys: &Arc<Vec<Vec<u8>>>) -> Result<(), String> {
    let tasks: Vec<_> = (0..POPULATE_TASKS)
        .map(|t| {
            let (backend, keys) = (Arc::clone(backend), Arc::clone(keys));
            tokio::spawn(async move {
                let v = value();
                for k in keys.iter().skip(t).step_by(POPULATE_TASKS) {
                    backend.set(k, &v, None).await.map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|e| format!("a loading task failed: {e}"))??;
    }
    Ok(())
}

const DIRECT_GET: &str = "keel Immediate, Db::get (no contract)";

async fn workload_get(ctx: &Ctx) -> Table {
    let keys: Arc<Vec<Vec<u8>>> = Arc::new((0..ctx.config.get_keys as u64).map(key).collect());
    let mut table = Table::new(format!(
        "3. get hits, uniformly random over {} loaded keys (16-byte keys, 100-byte values); \
         1 and 2 callers: tasks for the contract rows, OS threads for the direct and own-API rows \
         ({} per cell)",
        thousands(keys.len() as f64),
        secs(ctx.config.plan.run_for)
    ));
    for target in &ctx.targets {
        let opened = match target.open(&ctx.config.scratch).await {
            Ok(o) => o,
            Err(why) => {
                unavailable_rows(&mut table, target.label, &GET_CALLERS, &why);
                continue;
            }
        };
        eprintln!(
            "[compare] get: loading {} keys into {}",
            keys.len(),
            target.label
        );
        if let Err(why) = populate(&opened.backend, &keys).await {
            unavailable_rows(&mut table, target.label, &GET_CALLERS, &why);
            continue;
        }
        for n in GET_CALLERS {
            ctx.progress("get", target.label, n);
            let callers = (0..n)
                .map(|i| GetCaller {
                    backend: Arc::clone(&opened.backend),
                    keys: Arc::clone(&keys),
                    picker: KeyPicker::new(i as u64 + 1),
                })
                .collect();
            table
                .rows
                .push(Row::new(target.label, n, ctx.cell(callers).await));
        }
        if target.label == REFERENCE
            && let Some(db) = &opened.db
        {
            for n in GET_CALLERS {
                ctx.progress("get", DIRECT_GET, n);
                let callers = (0..n)
                    .map(|i| DbCaller::Get {
                        db,
                        keys: &keys,
                        picker: KeyPicker::new(i as u64 + 1),
                    })
                    .collect();
                let result =
                    tokio::task::block_in_place(|| drive_blocking(callers, &ctx.config.plan));
                table.rows.push(Row::new(DIRECT_GET, n, result));
            }
        }
    }
    for label in [SLED_NATIVE, REDB_NATIVE] {
        let native = match open_native(label, &ctx.config.scratch)
            .and_then(|n| n.load(&keys, &value()).map(|()| n))
        {
            Ok(n) => n,
            Err(why) => {
                unavailable_rows(&mut table, label, &GET_CALLERS, &why);
                continue;
            }
        };
        for n in GET_CALLERS {
            ctx.progress("get", label, n);
            let callers = (0..n)
                .map(|i| NativeCaller::Get {
                    store: &native,
                    keys: &keys,
                    picker: KeyPicker::new(i as u64 + 1),
                })
                .collect();
            let result = tokio::task::block_in_place(|| drive_blocking(callers, &ctx.config.plan));
            table.rows.push(Row::new(label, n, result));
        }
    }
    // What the measuring loop itself costs per operation (two clock reads, a histogram record,
    // the loop): part of every row above, so it pulls sub-microsecond ratios towards 1.
    for n in GET_CALLERS {
        ctx.progress("get", HARNESS_TASK, n);
        let callers = (0..n).map(|_| EmptyCaller).collect();
        table
            .rows
            .push(Row::new(HARNESS_TASK, n, ctx.cell(callers).await));
        ctx.progress("get", HARNESS_THREAD, n);
        let callers = (0..n).map(|_| EmptyCaller).collect();
        let result = tokio::task::block_in_place(|| drive_blocking(callers, &ctx.config.plan));
        table.rows.push(Row::new(HARNESS_THREAD, n, result));
    }
    table
}

const HARNESS_TASK: &str = "(harness only: an empty operation, task)";
const HARNESS_THREAD: &str = "(harness only: an empty operation, thread)";

async fn workload_ratelimit(ctx: &Ctx) -> Table {
    let keys: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..RATELIMIT_KEYS)
            .map(|i| format!("user:{i:06}").into_bytes())
            .collect(),
    );
    let quota = Quota::per_second(1_000);
    let mut table = Table::new(format!(
        "4. GCRA rate-limit check (cost 1, quota {}/s per key), uniformly random over {} keys \
         ({} per cell)",
        quota.limit(),
        thousands(RATELIMIT_KEYS as f64),
        secs(ctx.config.plan.run_for)
    ));
    for target in &ctx.targets {
        let opened = match target.open(&ctx.config.scratch).await {
            Ok(o) => o,
            Err(why) => {
                unavailable_rows(&mut table, target.label, &RATELIMIT_CALLERS, &why);
                continue;
            }
        };
        for n in RATELIMIT_CALLERS {
            ctx.progress("ratelimit", target.label, n);
            let limiter = match RateLimiter::new(
                Arc::clone(&opened.backend),
                &format!("bench-{n}"),
                Strategy::Gcra,
                quota,
            ) {
                Ok(l) => l,
                Err(e) => {
                    table
                        .rows
                        .push(Row::new(target.label, n, Err(e.to_string())));
                    continue;
                }
            };
            let callers = (0..n)
                .map(|i| RateCaller {
                    limiter: limiter.clone(),
                    keys: Arc::clone(&keys),
                    picker: KeyPicker::new(i as u64 + 1),
                    admitted: 0,
                    refused: 0,
                })
                .collect();
            table
                .rows
                .push(Row::new(target.label, n, ctx.cell(callers).await));
        }
    }
    table
}

// ---- 5: reopen ---------------------------------------------------------------------------

struct Reopen {
    store: String,
    load: Duration,
    reopen: Result<Duration, String>,
    note: String,
}

fn load_keel(db: &Db, keys: u64) -> Result<(), String> {
    let v = value();
    let mut batch = Batch::new();
    for i in 0..keys {
        batch.set(key(i), v.clone(), None);
        if batch.len() as u64 == LOAD_BATCH {
            db.write_batch(&batch).map_err(|e| e.to_string())?;
            batch = Batch::new();
        }
    }
    if !batch.is_empty() {
        db.write_batch(&batch).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// keel: replay of a WAL holding every key, then load of a snapshot holding every key.
fn reopen_keel(scratch: &Path, keys: u64) -> Result<Vec<Reopen>, String> {
    let dir = scratch_dir(scratch, "reopen-keel-")?;
    // Keep the whole load in the WAL, so the first reopen is pure WAL replay.
    let opts = Options::default()
        .durability(Durability::Buffered)
        .snapshot_after_wal_bytes(u64::MAX / 16);
    let e = |e: keel_engine::Error| e.to_string();
    let started = Instant::now();
    let db = Db::open(dir.path(), opts.clone()).map_err(e)?;
    load_keel(&db, keys)?;
    let wal_bytes = db.stats().wal_bytes;
    db.close().map_err(e)?;
    let load = started.elapsed();

    let started = Instant::now();
    let db = Db::open(dir.path(), opts.clone()).map_err(e)?;
    let wal = started.elapsed();
    if db.stats().keys != keys {
        return Err(format!(
            "reopened with {} keys, not {keys}",
            db.stats().keys
        ));
    }
    let started = Instant::now();
    db.compact().map_err(e)?;
    db.close().map_err(e)?;
    let snapshot_write = started.elapsed();

    let started = Instant::now();
    let db = Db::open(dir.path(), opts).map_err(e)?;
    let snap = started.elapsed();
    if db.stats().keys != keys {
        return Err(format!(
            "reopened with {} keys, not {keys}",
            db.stats().keys
        ));
    }
    db.close().map_err(e)?;
    Ok(vec![
        Reopen {
            store: "keel: replay the WAL".into(),
            load,
            reopen: Ok(wal),
            note: format!("WAL {:.0} MB", wal_bytes as f64 / 1e6),
        },
        Reopen {
            store: "keel: load the snapshot".into(),
            load: snapshot_write,
            reopen: Ok(snap),
            note: "load column: writing the snapshot".into(),
        },
    ])
}

fn reopen_native(label: &'static str, scratch: &Path, keys: u64) -> Result<Reopen, String> {
    let all: Vec<Vec<u8>> = (0..keys).map(key).collect();
    let started = Instant::now();
    let native = open_native(label, scratch)?;
    native.load(&all, &value())?;
    let load = started.elapsed();
    let Native { store, dir, .. } = native;
    let last = key(keys.saturating_sub(1));
    // Close, then time the open plus one read of the last key written (ready to serve).
    let reopen = match store {
        NativeStore::Sled(db) => {
            drop(db);
            let started = Instant::now();
            let db = sled::Config::new()
                .path(dir.path())
                .open()
                .map_err(|e| format!("sled: {e}"))?;
            let found = db.get(&last).map_err(|e| format!("sled: {e}"))?.is_some();
            let took = started.elapsed();
            if !found {
                return Err("sled reopened without the last key".into());
            }
            took
        }
        NativeStore::Redb(db) => {
            drop(db);
            let started = Instant::now();
            let db = redb::Database::open(dir.path().join("bench.redb"))
                .map_err(|e| format!("redb: {e}"))?;
            let native = Native {
                label,
                store: NativeStore::Redb(db),
                dir,
            };
            let found = native.get(&last)?;
            let took = started.elapsed();
            if !found {
                return Err("redb reopened without the last key".into());
            }
            took
        }
    };
    Ok(Reopen {
        store: format!("{label}: open + first get"),
        load,
        reopen: Ok(reopen),
        note: if label == SLED_NATIVE {
            "batches of 1,000 + flush".into()
        } else {
            "one write transaction".into()
        },
    })
}

fn workload_reopen(config: &Config) -> Vec<Reopen> {
    let keys = config.big_keys;
    eprintln!("[compare] reopen: {keys} keys into keel, sled and redb");
    let mut rows = Vec::new();
    match reopen_keel(&config.scratch, keys) {
        Ok(r) => rows.extend(r),
        Err(why) => rows.push(Reopen {
            store: "keel".into(),
            load: Duration::ZERO,
            reopen: Err(why),
            note: String::new(),
        }),
    }
    for label in [SLED_NATIVE, REDB_NATIVE] {
        rows.push(
            reopen_native(label, &config.scratch, keys).unwrap_or_else(|why| Reopen {
                store: label.into(),
                load: Duration::ZERO,
                reopen: Err(why),
                note: String::new(),
            }),
        );
    }
    rows
}

fn print_reopen(rows: &[Reopen], keys: u64, quick: bool) {
    println!(
        "\n### 5. reopen time, {} keys (16-byte keys, 100-byte values){}; page cache warm\n",
        thousands(keys as f64),
        if quick {
            " (quick mode: not the 1,000,000 of the full run)"
        } else {
            ""
        }
    );
    println!("| store | load | reopen | note |");
    println!("|---|--:|--:|---|");
    for r in rows {
        match &r.reopen {
            Ok(d) => println!(
                "| {} | {} | {} | {} |",
                r.store,
                secs(r.load),
                secs(*d),
                r.note
            ),
            Err(why) => println!("| {} | — | — | {why} |", r.store),
        }
    }
}

// ---- 6: memory --------------------------------------------------------------------------

/// Resident set size of this process: the second field of /proc/self/statm, in pages.
fn rss_bytes() -> Result<u64, String> {
    // 4 KiB pages: the page size of every platform this harness runs on (x86-64, aarch64
    // Linux with 4K pages); a different page size would scale both readings alike.
    const PAGE_BYTES: u64 = 4096;
    let statm = std::fs::read_to_string("/proc/self/statm")
        .map_err(|e| format!("could not read /proc/self/statm: {e}"))?;
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .map(|pages| pages * PAGE_BYTES)
        .ok_or_else(|| format!("unexpected /proc/self/statm: {statm:?}"))
}

/// Runs in a fresh process (`--memory-child KEYS DIR`), so the RSS delta holds nothing but
/// the store: prints `rss_delta_bytes=N accounted_bytes=M`.
fn memory_child(keys: u64, dir: &Path) -> Result<(), String> {
    let before = rss_bytes()?;
    // Default (Immediate) store; automatic snapshots off so none runs while we read RSS.
    let db = Db::open(
        dir,
        Options::default().snapshot_after_wal_bytes(u64::MAX / 16),
    )
    .map_err(|e| e.to_string())?;
    load_keel(&db, keys)?;
    let after = rss_bytes()?;
    let stats = db.stats();
    if stats.keys != keys {
        return Err(format!("loaded {} keys, not {keys}", stats.keys));
    }
    println!(
        "rss_delta_bytes={} accounted_bytes={}",
        after.saturating_sub(before),
        stats.memory_bytes
    );
    db.close().map_err(|e| e.to_string())
}

struct MemoryRow {
    store: String,
    bytes: Result<u64, String>,
    note: String,
}

fn keel_memory(config: &Config) -> Vec<MemoryRow> {
    let keys = config.big_keys;
    let run = || -> Result<(u64, u64), String> {
        let dir = scratch_dir(&config.scratch, "memory-keel-")?;
        let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
        let out = Command::new(exe)
            .arg("--memory-child")
            .arg(keys.to_string())
            .arg(dir.path())
            .output()
            .map_err(|e| format!("could not run the memory child: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "memory child failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .ok_or_else(|| format!("memory child printed no {name}: {text:?}"))
        };
        Ok((field("rss_delta_bytes")?, field("accounted_bytes")?))
    };
    match run() {
        Ok((rss, accounted)) => vec![
            MemoryRow {
                store: "keel (process RSS delta)".into(),
                bytes: Ok(rss),
                note: "fresh process, on-disk Immediate store, batches of 1,000".into(),
            },
            MemoryRow {
                store: "keel (engine's own accounting)".into(),
                bytes: Ok(accounted),
                note: "Stats::memory_bytes".into(),
            },
        ],
        Err(why) => vec![MemoryRow {
            store: "keel".into(),
            bytes: Err(why),
            note: String::new(),
        }],
    }
}

/// Loads the same keys into a fresh harness server with pipelined `SET`s and reads `INFO memory`
/// before and after: (used_memory delta, used_memory_rss delta).
async fn server_memory(url: &str, keys: u64) -> Result<(u64, u64), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    // The default half-second response timeout is too short for a server that may be
    // rewriting its append-only file (a fork of a large heap) on a busy disk.
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(SERVER_RESPONSE_WAIT))
        .set_connection_timeout(Some(SERVER_RESPONSE_WAIT));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    let e = |e: redis::RedisError| e.to_string();
    let (used_before, rss_before) = servers::redis_memory(&mut conn).await?;
    let v = value();
    let mut i = 0;
    while i < keys {
        let mut pipe = redis::pipe();
        for j in i..(i + LOAD_BATCH).min(keys) {
            pipe.cmd("SET").arg(key(j)).arg(&v).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(e)?;
        i += LOAD_BATCH;
    }
    let size: u64 = redis::cmd("DBSIZE")
        .query_async(&mut conn)
        .await
        .map_err(e)?;
    if size != keys {
        return Err(format!("server holds {size} keys, not {keys}"));
    }
    let (used_after, rss_after) = servers::redis_memory(&mut conn).await?;
    Ok((
        used_after.saturating_sub(used_before),
        rss_after.saturating_sub(rss_before),
    ))
}

/// keel in a fresh process, and Redis and Valkey each in a fresh server started for this
/// measurement alone (so its RSS, too, starts from an empty server).
async fn workload_memory(
    config: &Config,
    binaries: &[(&'static str, &Result<PathBuf, String>)],
) -> Vec<MemoryRow> {
    let keys = config.big_keys;
    eprintln!("[compare] memory: {keys} keys into keel and fresh servers");
    let mut rows = tokio::task::block_in_place(|| keel_memory(config));
    for (label, binary) in binaries {
        let measured = match binary {
            Ok(binary) => {
                match servers::start_redis_like(binary, "everysec", &config.scratch).await {
                    Ok(server) => server_memory(&server.url, keys).await,
                    Err(why) => Err(why),
                }
            }
            Err(why) => Err(format!("unavailable: {why}")),
        };
        match measured {
            Ok((used, rss)) => {
                rows.push(MemoryRow {
                    store: format!("{label} (INFO used_memory delta)"),
                    bytes: Ok(used),
                    note: "fresh server (everysec), pipelined SET, batches of 1,000".into(),
                });
                rows.push(MemoryRow {
                    store: format!("{label} (INFO used_memory_rss delta)"),
                    bytes: Ok(rss),
                    note: "the same, as resident memory (allocator overhead included)".into(),
                });
            }
            Err(why) => rows.push(MemoryRow {
                store: (*label).into(),
                bytes: Err(why),
                note: String::new(),
            }),
        }
    }
    rows
}

fn print_memory(rows: &[MemoryRow], keys: u64, quick: bool) {
    println!(
        "\n### 6. memory for {} keys (16-byte keys, 100-byte values = 116 bytes of data per \
         key){}\n",
        thousands(keys as f64),
        if quick {
            " (quick mode: not the 1,000,000 of the full run)"
        } else {
            ""
        }
    );
    println!("| store | total | per key | note |");
    println!("|---|--:|--:|---|");
    for r in rows {
        match &r.bytes {
            Ok(b) => println!(
                "| {} | {:.1} MB | {:.0} B | {} |",
                r.store,
                *b as f64 / 1e6,
                *b as f64 / keys as f64,
                r.note
            ),
            Err(why) => println!("| {} | — | — | {why} |", r.store),
        }
    }
}

// ---- 7: the disk ---------------------------------------------------------------------------

/// Append 64 bytes + fdatasync, one thread, for `run_for`: the ceiling for one durable writer.
fn raw_fdatasync(scratch: &Path, plan: &Plan) -> Result<Measured, String> {
    use std::io::Write;
    struct Appender(std::fs::File);
    impl BlockingCaller for Appender {
        fn call(&mut self) -> Result<(), String> {
            self.0.write_all(&[0x5a; 64]).map_err(|e| e.to_string())?;
            self.0.sync_data().map_err(|e| e.to_string())
        }
    }
    let dir = scratch_dir(scratch, "fdatasync-")?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("raw.bin"))
        .map_err(|e| format!("could not create a file in {}: {e}", dir.path().display()))?;
    drive_blocking(vec![Appender(file)], plan)
}

/// keel `Immediate`, `Db::incr` directly, one thread, on a fresh store.
fn direct_incr(scratch: &Path, plan: &Plan) -> Result<Measured, String> {
    let dir = scratch_dir(scratch, "keel-direct-")?;
    let db = Db::open(dir.path(), Options::default()).map_err(|e| e.to_string())?;
    let before = db.stats().wal_fsyncs;
    let mut result = drive_blocking(
        vec![DbCaller::Incr {
            db: &db,
            key: b"incr:direct".to_vec(),
        }],
        plan,
    );
    note_group_commit(&mut result, &db, before);
    db.close().map_err(|e| e.to_string())?;
    result
}

/// keel `Immediate` through the contract, one caller, on a fresh store.
async fn contract_incr(ctx: &Ctx, plan: &Plan) -> Result<Measured, String> {
    let keel = ctx
        .targets
        .iter()
        .find(|t| t.label == REFERENCE)
        .ok_or("no keel Immediate target")?;
    let opened = keel.open(&ctx.config.scratch).await?;
    let db = opened.db.as_ref().ok_or("keel Immediate without its Db")?;
    let before = db.stats().wal_fsyncs;
    let callers = vec![IncrCaller {
        backend: Arc::clone(&opened.backend),
        key: b"incr:contract".to_vec(),
    }];
    let mut result = drive_async(callers, plan, false).await;
    note_group_commit(&mut result, db, before);
    result
}

/// One round of workload 7: the raw rate, then keel's single writer two ways, back to back,
/// so the three see the same disk weather.
struct DiskRound {
    raw: Result<Measured, String>,
    direct: Result<Measured, String>,
    contract: Result<Measured, String>,
}

impl DiskRound {
    /// keel through the contract as a share of the raw rate, in percent.
    fn contract_pct(&self) -> Option<f64> {
        let (k, r) = (self.contract.as_ref().ok()?, self.raw.as_ref().ok()?);
        Some(100.0 * k.ops_per_sec() / r.ops_per_sec())
    }
}

async fn workload_disk(ctx: &Ctx, plan: &Plan) -> Vec<DiskRound> {
    let rounds = if ctx.config.quick { 1 } else { DISK_ROUNDS };
    let mut out = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        eprintln!("[compare] fsync: round {round} of {rounds}");
        let raw = tokio::task::block_in_place(|| raw_fdatasync(&ctx.config.scratch, plan));
        let direct = tokio::task::block_in_place(|| direct_incr(&ctx.config.scratch, plan));
        let contract = contract_incr(ctx, plan).await;
        out.push(DiskRound {
            raw,
            direct,
            contract,
        });
    }
    out
}

fn print_disk(rounds: &[DiskRound], plan: &Plan) {
    println!(
        "\n### 7. the disk: append 64 bytes + fdatasync, one thread, next to keel Immediate with \
         one writer ({} per measurement; rounds run back to back)\n",
        secs(plan.run_for)
    );
    println!(
        "| round | raw fdatasync/s | raw p50 | raw p99 | keel Db::incr ops/s | p50 | \
         keel contract incr ops/s | p50 | contract ÷ raw |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let cell = |m: &Result<Measured, String>| match m {
        Ok(m) => (
            thousands(m.ops_per_sec()),
            latency(m.quantile_ns(0.5)),
            latency(m.quantile_ns(0.99)),
        ),
        Err(why) => (why.clone(), "—".into(), "—".into()),
    };
    for (i, r) in rounds.iter().enumerate() {
        let (raw, raw50, raw99) = cell(&r.raw);
        let (direct, direct50, _) = cell(&r.direct);
        let (contract, contract50, _) = cell(&r.contract);
        let note = |m: &Result<Measured, String>| {
            m.as_ref()
                .map(|m| format!(" ({})", m.note))
                .unwrap_or_default()
        };
        println!(
            "| {} | {raw} | {raw50} | {raw99} | {direct}{} | {direct50} | {contract}{} | \
             {contract50} | {} |",
            i + 1,
            note(&r.direct),
            note(&r.contract),
            r.contract_pct()
                .map_or_else(|| "—".to_owned(), |p| format!("{p:.0}%"))
        );
    }
}

// ---- targets --------------------------------------------------------------------------------

fn ratio(a: Option<&Measured>, b: Option<&Measured>) -> Option<f64> {
    let (a, b) = (a?.ops_per_sec(), b?.ops_per_sec());
    (b > 0.0).then(|| a / b)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

struct Summary<'a> {
    incr: Option<&'a Table>,
    get: Option<&'a Table>,
    disk: &'a [DiskRound],
    reopen: &'a [Reopen],
    memory: &'a [MemoryRow],
    quick: bool,
}

fn print_targets(s: &Summary<'_>) {
    println!("\n### Targets (from this run)\n");
    if let Some(incr) = s.incr {
        let keel = incr.get(REFERENCE, 64);
        match ratio(keel, incr.get("Redis always", 64)) {
            Some(r) => println!(
                "- incr+TTL, 64 callers, keel Immediate ÷ Redis always: {r:.2}× (target ≥ 2×): {}",
                verdict(r >= 2.0)
            ),
            None => println!("- incr+TTL, 64 callers vs Redis always: not measured"),
        }
        // The disk's group-commit ceiling: 64 writers sharing every fdatasync, each fdatasync
        // taking the raw p50 measured in this run (median over the rounds).
        let mut p50s: Vec<u64> = s
            .disk
            .iter()
            .filter_map(|d| d.raw.as_ref().ok())
            .map(|m| m.quantile_ns(0.5))
            .collect();
        p50s.sort_unstable();
        match (keel, p50s.get(p50s.len() / 2)) {
            (Some(k), Some(&p50)) if p50 > 0 => {
                let ceiling = 64.0 * 1e9 / p50 as f64;
                let share = 100.0 * k.ops_per_sec() / ceiling;
                println!(
                    "- incr+TTL, 64 callers, keel Immediate ÷ the group-commit ceiling (64 ÷ raw \
                     fdatasync p50 {} = {:.0}/s): {share:.0}% (target ≥ 50%): {}",
                    latency(p50),
                    ceiling,
                    verdict(share >= 50.0)
                );
            }
            _ => println!("- incr+TTL, 64 callers vs the group-commit ceiling: not measured"),
        }
        for other in ["redb adapter", REDB_NATIVE, "sled adapter", SLED_NATIVE] {
            match ratio(keel, incr.get(other, 64)) {
                Some(r) => println!(
                    "- incr+TTL, 64 callers, keel Immediate ÷ {other}: {r:.2}× (target ≥ 10×): {}",
                    verdict(r >= 10.0)
                ),
                None => println!("- incr+TTL, 64 callers vs {other}: not measured"),
            }
        }
    }
    let mut pcts: Vec<f64> = s.disk.iter().filter_map(DiskRound::contract_pct).collect();
    if pcts.is_empty() {
        println!("- durable single caller vs raw fdatasync: not measured");
    } else {
        let rounds: Vec<String> = pcts.iter().map(|p| format!("{p:.0}%")).collect();
        pcts.sort_by(f64::total_cmp);
        let median = pcts[pcts.len() / 2];
        println!(
            "- durable single caller: keel Immediate through the contract ÷ raw fdatasync, per \
             round: {} (median {median:.0}%; target ≥ 90%): {}",
            rounds.join(", "),
            verdict(median >= 90.0)
        );
    }
    if let Some(get) = s.get {
        let keel = get.get(REFERENCE, 1);
        for other in ["redb adapter", REDB_NATIVE, "sled adapter", SLED_NATIVE] {
            match ratio(keel, get.get(other, 1)) {
                Some(r) => println!(
                    "- get hit, 1 thread, keel through the contract ÷ {other}: {r:.2}× \
                     (target ≥ 2×): {}",
                    verdict(r >= 2.0)
                ),
                None => println!("- get hit vs {other}: not measured"),
            }
        }
        if let Some(k) = keel {
            let p50 = k.quantile_ns(0.5);
            println!(
                "- get hit, 1 thread, keel through the contract: p50 {} (target ≤ 250 ns): {}",
                latency(p50),
                verdict(p50 <= 250)
            );
        }
    }
    for r in s.reopen.iter().filter(|r| r.store.starts_with("keel")) {
        // From a snapshot ≤ 0.4 s, by WAL replay after a clean close ≤ 0.5 s.
        let target = match r.store.contains("snapshot") {
            true => Duration::from_millis(400),
            false => Duration::from_millis(500),
        };
        if let Ok(d) = r.reopen {
            println!(
                "- {}: {}{} (target ≤ {} for 1,000,000 keys): {}",
                r.store,
                secs(d),
                if s.quick {
                    " for 100,000 keys (quick mode)"
                } else {
                    ""
                },
                secs(target),
                verdict(d <= target)
            );
        }
    }
    let find = |prefix: &str| {
        s.memory
            .iter()
            .find(|r| r.store.starts_with(prefix))
            .and_then(|r| r.bytes.as_ref().ok().copied())
    };
    match (
        find("keel (process RSS"),
        find("Valkey (INFO used_memory delta"),
    ) {
        (Some(k), Some(v)) => println!(
            "- memory: keel RSS delta {:.1} MB vs Valkey used_memory delta {:.1} MB ({:.2}×; \
             target ≤ 1×): {}",
            k as f64 / 1e6,
            v as f64 / 1e6,
            k as f64 / v as f64,
            verdict(k <= v)
        ),
        _ => println!("- memory vs Valkey: not measured"),
    }
    // The like-for-like comparisons, for context.
    if let (Some(k), Some(r)) = (
        find("keel (process RSS"),
        find("Redis (INFO used_memory_rss delta"),
    ) {
        println!(
            "  (resident memory on both sides: keel {:.1} MB vs Redis {:.1} MB, {:.2}×)",
            k as f64 / 1e6,
            r as f64 / 1e6,
            k as f64 / r as f64
        );
    }
    if let (Some(k), Some(r)) = (
        find("keel (engine's own accounting"),
        find("Redis (INFO used_memory delta"),
    ) {
        println!(
            "  (allocator-level accounting on both sides: keel {:.1} MB vs Redis {:.1} MB, \
             {:.2}×)",
            k as f64 / 1e6,
            r as f64 / 1e6,
            k as f64 / r as f64
        );
    }
}

// ---- main -------------------------------------------------------------------------------

fn machine() -> String {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "{cpus} CPUs, {mem} memory, load average at start {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The commit being measured, and whether the crates under test differ from it (the harness
/// runs right after its build, so this is what was compiled unless someone edits in between).
fn code_version() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "engine/src",
                "primitives/src",
                "adapters/src",
            ])
            .is_some_and(|s| !s.is_empty());
            format!(
                "commit {commit}{}",
                if dirty {
                    " with uncommitted changes in engine/primitives/adapters sources"
                } else {
                    " (engine, primitives and adapters sources as committed)"
                }
            )
        }
        None => "unknown (not a git checkout)".to_owned(),
    }
}

async fn run(config: Config, workers: usize) -> Result<(), String> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.scratch)
        .map_err(|e| format!("could not create {}: {e}", config.scratch.display()))?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");

    // Servers: Redis and Valkey started here, Postgres prepared.
    let redis_bin = servers::find_on_path("redis-server")
        .ok_or_else(|| "redis-server not found on PATH".to_owned());
    let valkey_bin = servers::find_valkey();
    let mut started_servers: Vec<(&'static str, Result<Server, String>)> = Vec::new();
    for (label, bin, fsync) in [
        ("Redis always", &redis_bin, "always"),
        ("Redis everysec", &redis_bin, "everysec"),
        ("Valkey always", &valkey_bin, "always"),
        ("Valkey everysec", &valkey_bin, "everysec"),
    ] {
        let server = match bin {
            Ok(bin) => servers::start_redis_like(bin, fsync, &config.scratch).await,
            Err(why) => Err(why.clone()),
        };
        started_servers.push((label, server));
    }
    let mut clusters: Vec<(&'static str, Result<servers::Cluster, String>)> = Vec::new();
    for (label, bin) in [
        ("Redis Cluster everysec", &redis_bin),
        ("Valkey Cluster everysec", &valkey_bin),
    ] {
        let cluster = match bin {
            Ok(bin) => servers::start_cluster(bin, "everysec", &config.scratch).await,
            Err(why) => Err(why.clone()),
        };
        clusters.push((label, cluster));
    }
    let (pg_url, pg) = match servers::postgres_url() {
        Ok(url) => {
            let prepared =
                servers::prepare_postgres(&url, &[PG_TABLE_LOGGED, PG_TABLE_ASYNC]).await;
            (url, prepared)
        }
        Err(why) => (String::new(), Err(why)),
    };
    let pg_async_url = servers::postgres_url_async_commit(&pg_url);
    let pg_async_check = match &pg {
        Ok(_) => servers::postgres_synchronous_commit(&pg_async_url).await,
        Err(why) => Err(why.clone()),
    };
    let pg_async = match &pg_async_check {
        Ok(v) if v == "off" => Ok(()),
        Ok(v) => Err(format!(
            "the URL's options did not reach the server: synchronous_commit is {v}"
        )),
        Err(why) => Err(why.clone()),
    };

    let server_kind = |i: usize, make: fn(String) -> Kind| -> Result<Kind, String> {
        match &started_servers[i].1 {
            Ok(s) => Ok(make(s.url.clone())),
            Err(why) => Err(format!("unavailable: {why}")),
        }
    };
    let targets = vec![
        Target {
            label: REFERENCE,
            kind: Ok(Kind::Keel(Some(Durability::Immediate))),
        },
        Target {
            label: "keel Periodic(100ms)",
            kind: Ok(Kind::Keel(Some(Durability::Periodic(
                Duration::from_millis(100),
            )))),
        },
        Target {
            label: "keel memory-only",
            kind: Ok(Kind::Keel(None)),
        },
        Target {
            label: "sled adapter",
            kind: Ok(Kind::Sled),
        },
        Target {
            label: "redb adapter",
            kind: Ok(Kind::Redb),
        },
        Target {
            label: "Redis always",
            kind: server_kind(0, Kind::Redis),
        },
        Target {
            label: "Redis everysec",
            kind: server_kind(1, Kind::Redis),
        },
        Target {
            label: "Valkey always",
            kind: server_kind(2, Kind::Valkey),
        },
        Target {
            label: "Valkey everysec",
            kind: server_kind(3, Kind::Valkey),
        },
        Target {
            label: "Redis Cluster everysec",
            kind: match &clusters[0].1 {
                Ok(c) => Ok(Kind::Redis(c.url.clone())),
                Err(why) => Err(format!("unavailable: {why}")),
            },
        },
        Target {
            label: "Valkey Cluster everysec",
            kind: match &clusters[1].1 {
                Ok(c) => Ok(Kind::Valkey(
                    c.url.replace("redis+cluster://", "valkey+cluster://"),
                )),
                Err(why) => Err(format!("unavailable: {why}")),
            },
        },
        Target {
            label: "Postgres logged",
            kind: pg
                .as_ref()
                .map(|_| Kind::Postgres {
                    url: pg_url.clone(),
                    table: PG_TABLE_LOGGED,
                })
                .map_err(|why| format!("unavailable: {why}")),
        },
        Target {
            label: "Postgres sync_commit=off",
            kind: pg_async
                .as_ref()
                .map(|()| Kind::Postgres {
                    url: pg_async_url.clone(),
                    table: PG_TABLE_ASYNC,
                })
                .map_err(|why| format!("unavailable: {why}")),
        },
    ];
    let missing: Vec<String> = targets
        .iter()
        .filter_map(|t| {
            t.kind
                .as_ref()
                .err()
                .map(|why| format!("{}: {why}", t.label))
        })
        .collect();
    if ci && !missing.is_empty() {
        return Err(format!(
            "CI=true and some backends are unavailable:\n  {}",
            missing.join("\n  ")
        ));
    }

    println!(
        "## keel comparison run{}\n",
        if config.quick { " (--quick)" } else { "" }
    );
    println!("- machine: {}", machine());
    println!("- code: {}", code_version());
    println!(
        "- cells: {} measured after {} warm-up; Backend-contract callers are tasks on a \
         {workers}-thread Tokio runtime, direct/own-API callers are OS threads",
        secs(config.plan.run_for),
        secs(config.plan.warmup)
    );
    println!(
        "- scratch directory (every store, server directory and test file): {}",
        config.scratch.display()
    );
    println!(
        "- keel: Db::open(dir, Options::default().durability(..)) behind Embedded; memory-only is Db::memory"
    );
    println!(
        "- sled adapter: SledOptions::default() (flush_every_write: true); own API: update_and_fetch + flush() per op; a sled flush is sync_file_range, not fsync: process-crash safe, not power-loss durable"
    );
    println!(
        "- redb adapter: RedbBackend::open (a durable write transaction per op); own API: a write transaction per op, default durability"
    );
    for (label, server) in &started_servers {
        match server {
            Ok(s) => println!("- {label}: started by the harness, {}", s.config),
            Err(why) => println!("- {label}: unavailable: {why}"),
        }
    }
    for (label, cluster) in &clusters {
        match cluster {
            Ok(c) => println!("- {label}: started by the harness, {}", c.config),
            Err(why) => println!("- {label}: unavailable: {why}"),
        }
    }
    println!(
        "- Redis/Valkey adapter: one multiplexed connection (concurrent callers are pipelined on it); \
         on a cluster, the cluster client's connection per primary; fencing counters: Redis 7.0 has \
         no WAITAOF, so plain INCRBY (fencing=best-effort); Valkey: INCRBY + WAITAOF (durable)"
    );
    match &pg {
        Ok(version) => println!(
            "- Postgres {version}: {pg_url}, logged tables {PG_TABLE_LOGGED} and \
             {PG_TABLE_ASYNC}, pool of {POOL_SIZE} connections; the second with \
             synchronous_commit={} per connection (URL options)",
            pg_async_check.as_deref().unwrap_or("?")
        ),
        Err(why) => println!("- Postgres: unavailable: {why}"),
    }

    let ctx = Ctx {
        config: config.clone(),
        targets,
        workers,
    };
    let fsync_plan = Plan {
        run_for: if config.quick {
            DISK_MEASURE_QUICK
        } else {
            DISK_MEASURE
        },
        ..config.plan
    };
    let mut disk = Vec::new();
    if config.runs("fsync") {
        disk = workload_disk(&ctx, &fsync_plan).await;
        print_disk(&disk, &fsync_plan);
    }
    let mut tables: Vec<Table> = Vec::new();
    if config.runs("incr") {
        let t = workload_incr(&ctx).await;
        t.print();
        tables.push(t);
    }
    if config.runs("lock") {
        let t = workload_lock(&ctx).await;
        t.print();
        tables.push(t);
    }
    if config.runs("get") {
        let t = workload_get(&ctx).await;
        t.print();
        tables.push(t);
    }
    if config.runs("ratelimit") {
        let t = workload_ratelimit(&ctx).await;
        t.print();
        tables.push(t);
    }
    let mut reopen = Vec::new();
    if config.runs("reopen") {
        reopen = tokio::task::block_in_place(|| workload_reopen(&config));
        print_reopen(&reopen, config.big_keys, config.quick);
    }
    let mut memory = Vec::new();
    if config.runs("memory") {
        memory = workload_memory(&config, &[("Redis", &redis_bin), ("Valkey", &valkey_bin)]).await;
        print_memory(&memory, config.big_keys, config.quick);
    }
    print_targets(&Summary {
        incr: tables.iter().find(|t| t.title.starts_with("1.")),
        get: tables.iter().find(|t| t.title.starts_with("3.")),
        disk: &disk,
        reopen: &reopen,
        memory: &memory,
        quick: config.quick,
    });
    if pg.is_ok()
        && let Err(why) =
            servers::cleanup_postgres(&pg_url, &[PG_TABLE_LOGGED, PG_TABLE_ASYNC]).await
    {
        eprintln!("[compare] could not drop the benchmark tables: {why}");
    }
    drop(started_servers);
    drop(clusters);
    println!("\ntotal time: {}", secs(started.elapsed()));
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--memory-child") {
        let keys = args.get(2).and_then(|k| k.parse().ok());
        let dir = args.get(3).map(PathBuf::from);
        return match (keys, dir) {
            (Some(keys), Some(dir)) => match memory_child(keys, &dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            },
            _ => {
                eprintln!("usage: compare --memory-child KEYS DIR");
                ExitCode::FAILURE
            }
        };
    }
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("compare: {e}");
            return ExitCode::FAILURE;
        }
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("compare: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        // Ctrl-C or SIGTERM: stop the servers this harness started, then exit.
        tokio::spawn(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = terminated => {}
            }
            servers::kill_all();
            eprintln!("compare: interrupted; the servers it started are stopped");
            std::process::exit(130);
        });
        run(config, workers).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: {e}");
            ExitCode::FAILURE
        }
    }
}
