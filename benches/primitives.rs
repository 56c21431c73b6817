//! Throughput of the dedup and one-time-code primitives on keel's engine, Redis and Postgres.
//!
//! `cargo bench --bench primitives --all-features -- [--quick] [--secs S] [--dir PATH]`
//!
//! Backends: keel's engine on disk with `Durability::Immediate` (every write fdatasynced before
//! it is acknowledged; concurrent writers share one fdatasync), a Redis started by this harness
//! (append-only file, `appendfsync everysec`, as in `compare`), and the local Postgres with a
//! logged table (`synchronous_commit=on`). Each at 1 and 64 concurrent callers.
//!
//! Workloads:
//! 1. **dedup claim+complete**: `Dedup::claim` of a fresh id, then `Dedup::complete` (two
//!    atomic writes: `set_nx`, `compare_and_swap`).
//! 2. **OTP verify (wrong code)**: `Otp::verify` of a wrong guess against a live code, the full
//!    path: failure count (`incr`), the backend's clock, the record read, the attempt count
//!    (`incr`) and the constant-time comparison. Each caller cycles over its own 100 subjects,
//!    each with a code issued before the cell (limits raised so no budget is reached).
//! 3. **OTP issue+verify (right code)**: a login: `Otp::issue` for a fresh subject, then
//!    `Otp::verify` of the right code, which consumes it.
//!
//! Each prints a Markdown table: ops/s, p50 and p99, and the ratio to keel `Immediate`. A cell
//! runs for a fixed time (3 s, `--quick` 0.25 s) after a warm-up; every loop is also bounded
//! by a count. All traffic goes to 127.0.0.1.

#[allow(dead_code)] // shared with `compare`, which uses every helper
mod support;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_engine::Durability;
use keel_primitives::Backend;
use keel_primitives::dedup::{Claim, Dedup, DedupOptions};
use keel_primitives::otp::{BUDGET_MAX, Otp, OtpOptions, OtpSecret, Verification};

use support::backends::{Kind, POOL_SIZE, Target};
use support::measure::{AsyncCaller, Plan, drive_async};
use support::report::{REFERENCE, Row, Table};
use support::servers;

/// Caller counts per workload.
const CALLERS: [usize; 2] = [1, 64];
const _: () = assert!(CALLERS[1] <= POOL_SIZE);
/// Lease of a dedup claim (never reached: each claim is completed at once).
const LEASE: Duration = Duration::from_secs(30);
/// Retention of a completed id: long enough for the run, short so the keys go away.
const RETENTION: Duration = Duration::from_secs(600);
/// Subjects per caller in the wrong-code workload.
const SUBJECTS_PER_CALLER: usize = 100;
/// A count bound for every measuring loop, far above what the time bound allows.
const OPS_PER_CALLER_MAX: u64 = 100_000_000;
/// The Postgres table owned by this harness (dropped at the start and the end of a run).
const PG_TABLE: &str = "keel_bench_primitives";

struct Config {
    plan: Plan,
    scratch: PathBuf,
}

fn parse_args() -> Result<Config, String> {
    let mut quick = false;
    let mut secs: Option<f64> = None;
    let mut scratch = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-primitives");
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
            "--bench" => {} // cargo bench passes it
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: primitives [--quick] [--secs S] [--dir PATH]"
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
    })
}

/// Distinguishes this run's ids and subjects from earlier runs on the same servers.
fn run_nonce() -> u64 {
    rand::random()
}

// ---- callers ----------------------------------------------------------------------------

struct DedupCaller {
    dedup: Dedup,
    prefix: String,
    next: u64,
}

impl AsyncCaller for DedupCaller {
    async fn call(&mut self) -> Result<(), String> {
        self.next += 1;
        let id = format!("{}:{}", self.prefix, self.next);
        match self.dedup.claim(&id, LEASE).await {
            Ok(Claim::Claimed(ticket)) => self
                .dedup
                .complete(&ticket)
                .await
                .map_err(|e| e.to_string()),
            Ok(other) => Err(format!("a fresh id was not claimed: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

struct VerifyCaller {
    otp: Otp,
    subjects: Vec<(String, String)>,
    next: usize,
}

impl AsyncCaller for VerifyCaller {
    async fn call(&mut self) -> Result<(), String> {
        let (subject, wrong) = &self.subjects[self.next % self.subjects.len()];
        self.next += 1;
        match self.otp.verify(subject, "login", wrong).await {
            Ok(Verification::Wrong { .. }) => Ok(()),
            Ok(other) => Err(format!("a wrong code got {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

struct LoginCaller {
    otp: Otp,
    prefix: String,
    next: u64,
}

impl AsyncCaller for LoginCaller {
    async fn call(&mut self) -> Result<(), String> {
        self.next += 1;
        let subject = format!("{}:{}", self.prefix, self.next);
        let issued = self
            .otp
            .issue(&subject, "login")
            .await
            .map_err(|e| e.to_string())?;
        match self
            .otp
            .verify(&subject, "login", issued.code().as_str())
            .await
        {
            Ok(Verification::Verified) => Ok(()),
            Ok(other) => Err(format!("the right code got {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn otp_on(backend: Arc<dyn Backend>) -> Result<Otp, String> {
    let secret: [u8; 32] = rand::random();
    let options = OtpOptions::default()
        .max_attempts(BUDGET_MAX)
        .failure_budget(BUDGET_MAX, Duration::from_secs(3600))
        .resend_cooldown(Duration::ZERO)
        .resend_budget(BUDGET_MAX, Duration::from_secs(3600));
    Otp::new(
        backend,
        OtpSecret::from_bytes(&secret).map_err(|e| e.to_string())?,
        options,
    )
    .map_err(|e| e.to_string())
}

/// A six-digit code that is not `code`.
fn wrong(code: &str) -> String {
    if code == "000000" { "000001" } else { "000000" }.to_owned()
}

// ---- workloads ----------------------------------------------------------------------------

static CELL: AtomicU64 = AtomicU64::new(0);

async fn cell(
    workload: &str,
    backend: &Arc<dyn Backend>,
    callers: usize,
    plan: &Plan,
    nonce: u64,
) -> Result<support::measure::Measured, String> {
    let cell = CELL.fetch_add(1, Ordering::Relaxed);
    let prefix = |i: usize| format!("bench:{nonce:x}:{cell}:{i}");
    match workload {
        "dedup" => {
            let dedup = Dedup::with_options(
                Arc::clone(backend),
                DedupOptions::default().retention(RETENTION),
            );
            let callers = (0..callers)
                .map(|i| DedupCaller {
                    dedup: dedup.clone(),
                    prefix: prefix(i),
                    next: 0,
                })
                .collect();
            drive_async(callers, plan, true).await
        }
        "verify" => {
            let otp = otp_on(Arc::clone(backend))?;
            let mut all = Vec::with_capacity(callers);
            for i in 0..callers {
                let mut subjects = Vec::with_capacity(SUBJECTS_PER_CALLER);
                for s in 0..SUBJECTS_PER_CALLER {
                    let subject = format!("{}:{s}", prefix(i));
                    let issued = otp
                        .issue(&subject, "login")
                        .await
                        .map_err(|e| e.to_string())?;
                    subjects.push((subject, wrong(issued.code().as_str())));
                }
                all.push(VerifyCaller {
                    otp: otp.clone(),
                    subjects,
                    next: 0,
                });
            }
            drive_async(all, plan, true).await
        }
        _ => {
            let otp = otp_on(Arc::clone(backend))?;
            let callers = (0..callers)
                .map(|i| LoginCaller {
                    otp: otp.clone(),
                    prefix: prefix(i),
                    next: 0,
                })
                .collect();
            drive_async(callers, plan, true).await
        }
    }
}

const WORKLOADS: [(&str, &str); 3] = [
    (
        "dedup",
        "dedup claim+complete of fresh ids (set_nx, then compare_and_swap)",
    ),
    (
        "verify",
        "OTP verifications of a wrong code (failure incr, clock, read, attempt incr, compare)",
    ),
    (
        "login",
        "OTP login cycles: issue for a fresh subject, then verify the right code (consumed)",
    ),
];

async fn run(config: Config) -> Result<(), String> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.scratch)
        .map_err(|e| format!("could not create {}: {e}", config.scratch.display()))?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let redis = match servers::find_on_path("redis-server") {
        Some(bin) => servers::start_redis_like(&bin, "everysec", &config.scratch).await,
        None => Err("redis-server not found on PATH".to_owned()),
    };
    let pg_url = servers::postgres_url();
    let pg = match &pg_url {
        Ok(url) => servers::prepare_postgres(url, &[PG_TABLE]).await,
        Err(why) => Err(why.clone()),
    };
    if ci {
        if let Err(why) = &redis {
            return Err(format!("Redis could not be started: {why}"));
        }
        if let Err(why) = &pg {
            return Err(format!("Postgres is not available: {why}"));
        }
    }
    let targets = [
        Target {
            label: REFERENCE,
            kind: Ok(Kind::Keel(Some(Durability::Immediate))),
        },
        Target {
            label: "Redis everysec",
            kind: redis
                .as_ref()
                .map(|s| Kind::Redis(s.url.clone()))
                .map_err(|why| format!("unavailable: {why}")),
        },
        Target {
            label: "Postgres",
            kind: match (&pg_url, &pg) {
                (Ok(url), Ok(_)) => Ok(Kind::Postgres {
                    url: url.clone(),
                    table: PG_TABLE,
                }),
                (Err(why), _) | (_, Err(why)) => Err(format!("unavailable: {why}")),
            },
        },
    ];
    println!(
        "# keel primitives: dedup and one-time codes\n\n{} s per cell after a {} ms warm-up; \
         Redis: {}; Postgres: {}",
        config.plan.run_for.as_secs_f64(),
        config.plan.warmup.as_millis(),
        redis
            .as_ref()
            .map_or_else(|e| e.clone(), |s| s.config.clone()),
        pg.as_ref().map_or_else(|e| e.clone(), |v| v.clone()),
    );
    let nonce = run_nonce();
    let mut failed = Vec::new();
    for (workload, title) in WORKLOADS {
        let mut table = Table::new(title);
        for target in &targets {
            // A fresh store (or connection pool) per workload, shared by its caller counts.
            let opened = target.open(&config.scratch).await;
            for &n in &CALLERS {
                let result = match &opened {
                    Ok(o) => cell(workload, &o.backend, n, &config.plan, nonce).await,
                    Err(why) => Err(why.clone()),
                };
                if let Err(why) = &result {
                    failed.push(format!("{workload} on {} at {n}: {why}", target.label));
                }
                table.rows.push(Row::new(target.label, n, result));
            }
        }
        table.print();
    }
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
            eprintln!("primitives: {e}");
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
            eprintln!("primitives: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        // Ctrl-C: stop the Redis this harness started, then exit.
        tokio::spawn(async {
            let _ = tokio::signal::ctrl_c().await;
            servers::kill_all();
            eprintln!("primitives: interrupted; the server it started is stopped");
            std::process::exit(130);
        });
        run(config).await
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            servers::kill_all();
            eprintln!("primitives: {e}");
            ExitCode::FAILURE
        }
    }
}
