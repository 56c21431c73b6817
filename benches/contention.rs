//! Hot keys, in one run on keel's engine, Redis, Valkey and Postgres:
//! 1. Rate-limit decisions per second: the contract's one-step GCRA against the
//!    compare-and-swap path it replaced, next to redis-cell's `CL.THROTTLE` semantics
//!    reproduced in a Lua script (the usual way to get them without the module).
//! 2. Lock acquire/release pairs per second, 64 callers contending on one name: waiters woken
//!    when a lease is released in the process, against waiters left to their polling backoff
//!    (10 ms doubling to 200 ms, jittered); on Redis and Valkey also with the callers spread
//!    over 4 backend handles (as 4 processes would be), woken across handles by release
//!    notices.
//!
//! `cargo bench --bench contention --all-features -- [--quick] [--secs S] [--dir PATH]
//! [--only rate|lock]`
//!
//! Rate-limit rows per backend:
//! - **step**: `RateLimiter::check` (GCRA), one call of the backend's native
//!   `Backend::rate_limit` (a Lua script on Redis/Valkey, one SQL statement on Postgres, the
//!   shard locks on the engine).
//! - **CAS**: the same decision through `rate::rate_limit_cas`, the default every backend
//!   inherits (clock, read, compare-and-swap, retried with backoff when another caller wins):
//!   the path every limiter took before the step existed.
//! - **cell-Lua** (Redis, Valkey): a GCRA script with redis-cell's arguments and reply, one
//!   `EVALSHA` per decision, called through the redis client directly (no keel in the path).
//!
//! Workloads: one hot key shared by every caller, and 10,000 keys picked at random. Each at 1
//! and 64 concurrent callers. The quota (10^9 per second) admits every request, so every
//! decision writes. keel's engine runs with `Durability::Immediate` (each admission fdatasynced
//! before it is acknowledged, concurrent ones sharing one), Redis and Valkey with
//! `appendfsync everysec` (started by this harness), Postgres with a logged table.

#[allow(dead_code)] // shared with `compare`, which uses every helper
mod support;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use keel_engine::Durability;
use keel_primitives::Backend;
use keel_primitives::backend::rate::{self, RateAlgorithm, RateMode, RateRule};
use keel_primitives::lock::{Lock, LockOptions};
use keel_primitives::ratelimit::{Quota, RateLimiter, Strategy};

use support::backends::{Kind, POOL_SIZE, Target};
use support::measure::{AsyncCaller, KeyPicker, Plan, drive_async};
use support::report::{REFERENCE, Row, Table};
use support::servers;

const CALLERS: [usize; 2] = [1, 64];
const _: () = assert!(CALLERS[1] <= POOL_SIZE);
const SPREAD_KEYS: usize = 10_000;
const OPS_PER_CALLER_MAX: u64 = 100_000_000;
const PG_TABLE: &str = "keel_bench_ratelimit";
/// Admits everything: every decision writes its state.
const LIMIT_PER_SECOND: u64 = 1_000_000_000;

/// redis-cell's `CL.THROTTLE key max_burst count_per_period period quantity` in Lua: GCRA
/// with a float theoretical arrival time, read with `GET`, written with `SET PX`, at the
/// server's `TIME`. Reply: limited (0/1), limit, remaining, retry after (s, -1), reset (s).
const CELL_LUA: &str = r"
local burst = tonumber(ARGV[1]) + 1
local interval = tonumber(ARGV[3]) * 1000 / tonumber(ARGV[2])
local quantity = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval * quantity
local diff = now - (new_tat - interval * burst)
if diff < 0 then
  return { 1, burst, 0, math.ceil(-diff / 1000), math.ceil((tat - now) / 1000) }
end
local ttl = math.max(1, math.ceil(new_tat - now))
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', ttl)
return { 0, burst, math.floor(diff / interval), -1, math.ceil(ttl / 1000) }
";

static CELL: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CELL_LUA));

struct Config {
    plan: Plan,
    scratch: PathBuf,
    /// `None`: both parts; else `rate` or `lock`.
    only: Option<String>,
}

fn parse_args() -> Result<Config, String> {
    let mut quick = false;
    let mut secs: Option<f64> = None;
    let mut scratch = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-contention");
    let mut only = None;
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
            "--dir" => scratch = PathBuf::from(args.next().ok_or("--dir takes a path")?),
            "--only" => {
                let part = args.next().ok_or("--only takes rate or lock")?;
                if part != "rate" && part != "lock" {
                    return Err(format!("--only takes rate or lock, not {part:?}"));
                }
                only = Some(part);
            }
            "--bench" => {}
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: contention [--quick] [--secs S] [--dir PATH] [--only rate|lock]"
                ));
            }
        }
    }
    let run_for = Duration::from_secs_f64(secs.unwrap_or(if quick { 0.25 } else { 3.0 }));
    Ok(Config {
        plan: Plan {
            warmup: (run_for / 10).max(Duration::from_millis(50)),
            run_for,
            ops_per_caller_max: OPS_PER_CALLER_MAX,
        },
        scratch,
        only,
    })
}

/// How one decision is made.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Step,
    Cas,
    Cell,
}

struct Caller {
    path: Path,
    limiter: RateLimiter,
    backend: Arc<dyn Backend>,
    cell: Option<redis::aio::MultiplexedConnection>,
    keys: Arc<Vec<String>>,
    picker: KeyPicker,
}

impl Caller {
    fn key(&mut self) -> String {
        let i = if self.keys.len() == 1 {
            0
        } else {
            self.picker.below(self.keys.len())
        };
        self.keys[i].clone()
    }
}

impl AsyncCaller for Caller {
    async fn call(&mut self) -> Result<(), String> {
        let key = self.key();
        let allowed = match self.path {
            Path::Step => {
                self.limiter
                    .check(&key, 1)
                    .await
                    .map_err(|e| e.to_string())?
                    .allowed
            }
            Path::Cas => {
                let state = format!("rl:bench:gcra:{key}");
                let rule = RateRule {
                    key: state.as_bytes(),
                    algorithm: RateAlgorithm::Gcra,
                    limit: LIMIT_PER_SECOND,
                    period_ms: 1000,
                    burst: LIMIT_PER_SECOND,
                    cost: 1,
                };
                rate::rate_limit_cas(&*self.backend, &[rule], RateMode::Consume, None)
                    .await
                    .map_err(|e| e.to_string())?
                    .admitted
            }
            Path::Cell => {
                let conn = self.cell.as_mut().ok_or("no redis connection")?;
                let mut call = CELL.prepare_invoke();
                call.key(format!("cell:{key}"))
                    .arg(LIMIT_PER_SECOND - 1)
                    .arg(LIMIT_PER_SECOND)
                    .arg(1)
                    .arg(1);
                let reply: Vec<i64> = call.invoke_async(conn).await.map_err(|e| e.to_string())?;
                reply.first() == Some(&0)
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "{key} was denied under a quota that admits everything"
            ))
        }
    }
}

/// A backend's row labels (one-step, compare-and-swap, cell-Lua if any), the backend, and
/// its server's URL for the cell-Lua client.
type TargetRows = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Target,
    Option<String>,
);

struct LockCaller {
    lock: Lock,
    name: String,
}

impl AsyncCaller for LockCaller {
    async fn call(&mut self) -> Result<(), String> {
        let lease = self
            .lock
            .acquire(&self.name, Duration::from_secs(30))
            .await
            .map_err(|e| e.to_string())?;
        lease.release().await.map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// `callers` contending on one name, spread round-robin over `backends` (one handle: one
/// process; several: as many processes, each with its own connections).
async fn lock_cell(
    backends: &[Arc<dyn Backend>],
    wake: bool,
    callers: usize,
    name: &str,
    plan: &Plan,
) -> Result<support::measure::Measured, String> {
    let options = LockOptions::default()
        .wait(Duration::from_secs(120))
        .wake_on_release(wake);
    let locks: Vec<Lock> = backends
        .iter()
        .map(|b| Lock::with_options(Arc::clone(b), options))
        .collect();
    let all = (0..callers)
        .map(|i| LockCaller {
            lock: locks[i % locks.len()].clone(),
            name: name.to_owned(),
        })
        .collect();
    drive_async(all, plan, true).await
}

async fn cell(
    path: Path,
    backend: &Arc<dyn Backend>,
    redis_url: Option<&str>,
    callers: usize,
    keys: &Arc<Vec<String>>,
    plan: &Plan,
) -> Result<support::measure::Measured, String> {
    let limiter = RateLimiter::new(
        Arc::clone(backend),
        "bench",
        Strategy::Gcra,
        Quota::per_second(LIMIT_PER_SECOND),
    )
    .map_err(|e| e.to_string())?;
    let cell_conn = match (path, redis_url) {
        (Path::Cell, Some(url)) => Some(
            redis::Client::open(url)
                .map_err(|e| e.to_string())?
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?,
        ),
        (Path::Cell, None) => return Err("cell-Lua needs Redis or Valkey".to_owned()),
        _ => None,
    };
    let all = (0..callers)
        .map(|i| Caller {
            path,
            limiter: limiter.clone(),
            backend: Arc::clone(backend),
            cell: cell_conn.clone(),
            keys: Arc::clone(keys),
            picker: KeyPicker::new(i as u64 + 1),
        })
        .collect();
    drive_async(all, plan, true).await
}

async fn run(config: Config) -> Result<(), String> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.scratch)
        .map_err(|e| format!("could not create {}: {e}", config.scratch.display()))?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let redis = match servers::find_on_path("redis-server") {
        Some(bin) => servers::start_redis_like(&bin, "everysec", &config.scratch).await,
        None => Err("redis-server not found on PATH".to_owned()),
    };
    let valkey = match servers::find_valkey() {
        Ok(bin) => servers::start_redis_like(&bin, "everysec", &config.scratch).await,
        Err(why) => Err(why),
    };
    let pg_url = servers::postgres_url();
    let pg = match &pg_url {
        Ok(url) => servers::prepare_postgres(url, &[PG_TABLE]).await,
        Err(why) => Err(why.clone()),
    };
    if ci {
        for (what, status) in [("Redis", &redis), ("Valkey", &valkey)] {
            if let Err(why) = status {
                return Err(format!("{what} could not be started: {why}"));
            }
        }
        if let Err(why) = &pg {
            return Err(format!("Postgres is not available: {why}"));
        }
    }
    let unavailable = |why: &String| format!("unavailable: {why}");
    let targets: Vec<TargetRows> = vec![
        (
            REFERENCE,
            "keel Immediate CAS",
            None,
            Target {
                label: REFERENCE,
                kind: Ok(Kind::Keel(Some(Durability::Immediate))),
            },
            None,
        ),
        (
            "Redis step",
            "Redis CAS",
            Some("Redis cell-Lua"),
            Target {
                label: "Redis",
                kind: redis
                    .as_ref()
                    .map(|s| Kind::Redis(s.url.clone()))
                    .map_err(unavailable),
            },
            redis.as_ref().ok().map(|s| s.url.clone()),
        ),
        (
            "Valkey step",
            "Valkey CAS",
            Some("Valkey cell-Lua"),
            Target {
                label: "Valkey",
                kind: valkey
                    .as_ref()
                    .map(|s| Kind::Valkey(s.url.clone()))
                    .map_err(unavailable),
            },
            valkey.as_ref().ok().map(|s| s.url.clone()),
        ),
        (
            "Postgres step",
            "Postgres CAS",
            None,
            Target {
                label: "Postgres",
                kind: match (&pg_url, &pg) {
                    (Ok(url), Ok(_)) => Ok(Kind::Postgres {
                        url: url.clone(),
                        table: PG_TABLE,
                    }),
                    (Err(why), _) | (_, Err(why)) => Err(unavailable(why)),
                },
            },
            None,
        ),
    ];
    println!(
        "# keel rate limiting: one-step GCRA vs the compare-and-swap path\n\n{} s per cell \
         after a {} ms warm-up; Redis: {}; Valkey: {}; Postgres: {}",
        config.plan.run_for.as_secs_f64(),
        config.plan.warmup.as_millis(),
        redis
            .as_ref()
            .map_or_else(|e| e.clone(), |s| s.config.clone()),
        valkey
            .as_ref()
            .map_or_else(|e| e.clone(), |s| s.config.clone()),
        pg.as_ref().map_or_else(|e| e.clone(), |v| v.clone()),
    );
    let nonce: u64 = rand::random();
    let workloads: [(&str, Vec<String>); 2] = [
        (
            "GCRA decisions on one hot key shared by every caller",
            vec![format!("hot:{nonce:x}")],
        ),
        (
            "GCRA decisions on 10,000 keys picked at random",
            (0..SPREAD_KEYS)
                .map(|i| format!("spread:{nonce:x}:{i}"))
                .collect(),
        ),
    ];
    let mut failed = Vec::new();
    let part = |name: &str| config.only.as_deref().is_none_or(|only| only == name);
    for (title, keys) in workloads.into_iter().filter(|_| part("rate")) {
        let keys = Arc::new(keys);
        let mut table = Table::new(title);
        for (step_label, cas_label, cell_label, target, url) in &targets {
            let opened = target.open(&config.scratch).await;
            let mut paths = vec![(Path::Step, *step_label), (Path::Cas, *cas_label)];
            if let Some(label) = cell_label {
                paths.push((Path::Cell, *label));
            }
            for &n in &CALLERS {
                for &(path, label) in &paths {
                    let result = match &opened {
                        Ok(o) => {
                            cell(path, &o.backend, url.as_deref(), n, &keys, &config.plan).await
                        }
                        Err(why) => Err(why.clone()),
                    };
                    if let Err(why) = &result {
                        failed.push(format!("{title}: {label} at {n}: {why}"));
                    }
                    table.rows.push(Row::new(label, n, result));
                }
            }
        }
        table.print();
        // The figure the rate-limit issue asks for, from this run.
        for n in CALLERS {
            for (step, cas) in [
                ("Redis step", "Redis CAS"),
                ("Valkey step", "Valkey CAS"),
                ("Postgres step", "Postgres CAS"),
                (REFERENCE, "keel Immediate CAS"),
            ] {
                if let (Some(a), Some(b)) = (table.get(step, n), table.get(cas, n)) {
                    println!(
                        "- {n} callers: {step} / {cas} = {:.2}×",
                        a.ops_per_sec() / b.ops_per_sec().max(f64::MIN_POSITIVE)
                    );
                }
            }
        }
    }
    let mut table = Table::new(
        "Lock acquire/release pairs, 64 callers on one name: woken on release vs polling; \
         x4: the callers spread over 4 handles, as 4 processes (woken by release notices)",
    );
    for (step_label, _, _, target, _) in targets.iter().filter(|_| part("lock")) {
        let opened = target.open(&config.scratch).await;
        let name = format!("hot-lock:{nonce:x}");
        // Three more handles where a second process could open the store (the servers).
        let mut others = Vec::new();
        // (Postgres is left out: four more connection pools next to the rest of a test run
        // can pass the server's connection limit. tests/lock_wakeups.rs covers its notices.)
        let server = matches!(target.kind, Ok(Kind::Redis(_) | Kind::Valkey(_)));
        if server {
            for _ in 0..3 {
                others.push(target.open(&config.scratch).await);
            }
        }
        let mut cells = vec![(true, "woken", 1), (false, "polling", 1)];
        if !others.is_empty() {
            cells.extend([(true, "woken x4", 4), (false, "polling x4", 4)]);
        }
        for (wake, suffix, handles) in cells {
            let label = if *step_label == REFERENCE && wake && handles == 1 {
                REFERENCE.to_owned()
            } else {
                format!("{} {suffix}", target.label)
            };
            let backends: Result<Vec<Arc<dyn Backend>>, String> = std::iter::once(&opened)
                .chain(others.iter())
                .take(handles)
                .map(|o| {
                    o.as_ref()
                        .map(|o| Arc::clone(&o.backend))
                        .map_err(Clone::clone)
                })
                .collect();
            let result = match backends {
                Ok(b) => lock_cell(&b, wake, CALLERS[1], &name, &config.plan).await,
                Err(why) => Err(why),
            };
            if let Err(why) = &result {
                failed.push(format!("lock pairs: {label}: {why}"));
            }
            table.rows.push(Row::new(label, CALLERS[1], result));
        }
    }
    table.print();
    if let Ok(url) = &pg_url {
        let _ = servers::cleanup_postgres(url, &[PG_TABLE]).await;
    }
    println!("\nwhole run: {:.1} s", started.elapsed().as_secs_f64());
    if ci && !failed.is_empty() {
        return Err(format!("cells failed: {}", failed.join("; ")));
    }
    Ok(())
}

fn main() -> ExitCode {
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("contention: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("contention: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(config));
    servers::kill_all();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("contention: {e}");
            ExitCode::FAILURE
        }
    }
}
