//! `keel::migrate` throughput: 1,000,000 keys (16-byte keys, 100-byte values, half with a
//! TTL) copied from keel's engine on disk to Redis and to Postgres in one run, with keel's
//! engine as a destination for reference, then the verify pass over the same keys.
//!
//! `cargo bench --bench migrate --all-features -- [--quick] [--keys N] [--batch N] [--dir PATH]`
//!
//! The source is keel's engine with `Durability::Immediate`, filled before the clock starts.
//! Destinations: a Redis started by this harness (append-only file, `appendfsync everysec`,
//! as in `compare`), the local Postgres with a logged table (`synchronous_commit=on`, a pool
//! of 64 connections), and a fresh keel engine on disk (`Durability::Immediate`). Every run
//! uses `keel::migrate::migrate` with the CLI's defaults (batches of 500 keys in flight), then
//! `keel::migrate::verify`, which must come out clean. `--quick` copies 20,000 keys (for CI:
//! it checks that the harness runs, not how fast).

#[allow(dead_code)] // shared with `compare`, which uses every helper
mod support;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use keel::migrate::{self, MigrateOptions, VerifyOptions};
use keel_engine::{Batch, Db, Durability, Options};
use keel_primitives::{Backend, Embedded};

use support::backends::{Kind, Target};
use support::report::thousands;
use support::servers;

/// Keys in a full run.
const KEYS_FULL: usize = 1_000_000;
/// Keys with `--quick`.
const KEYS_QUICK: usize = 20_000;
/// Bytes per value.
const VALUE_BYTES: usize = 100;
/// The TTL of every other key: far beyond the run.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Keys per engine batch while filling the source.
const FILL_BATCH: usize = 1_000;
/// The Postgres table owned by this harness (dropped at the start and the end of a run).
const PG_TABLE: &str = "keel_bench_migrate";
/// Every key starts with this (4 bytes), then 12 digits: 16 bytes.
const KEY_PREFIX: &str = "mig:";

struct Config {
    keys: usize,
    batch: usize,
    scratch: PathBuf,
}

fn parse_args() -> Result<Config, String> {
    let mut keys = KEYS_FULL;
    let mut batch = migrate::BATCH_KEYS_DEFAULT;
    let mut scratch = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-migrate");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => keys = KEYS_QUICK,
            "--keys" => {
                keys = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n: &usize| (1..=10_000_000).contains(n))
                    .ok_or("--keys takes a number of keys, 1 to 10,000,000")?
            }
            "--batch" => {
                batch = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n: &usize| (1..=migrate::BATCH_KEYS_MAX).contains(n))
                    .ok_or("--batch takes a number of keys, 1 to 10,000")?
            }
            "--dir" => scratch = PathBuf::from(args.next().ok_or("--dir takes a path")?),
            "--bench" => {} // cargo bench passes it
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: migrate [--quick] [--keys N] [--batch N] \
                     [--dir PATH]"
                ));
            }
        }
    }
    Ok(Config {
        keys,
        batch,
        scratch,
    })
}

/// The 16-byte key of index `i`.
fn key(i: usize) -> String {
    let key = format!("{KEY_PREFIX}{i:012}");
    debug_assert_eq!(key.len(), 16);
    key
}

/// Fills a fresh engine store with the run's keys; returns it with its directory.
fn fill_source(config: &Config) -> Result<(Db, tempfile::TempDir), String> {
    let dir = support::backends::scratch_dir(&config.scratch, "source-")?;
    let db = Db::open(
        dir.path(),
        Options::default().durability(Durability::Immediate),
    )
    .map_err(|e| e.to_string())?;
    let value = [b'v'; VALUE_BYTES];
    let mut batch = Batch::new();
    for i in 0..config.keys {
        let ttl = (i % 2 == 0).then_some(TTL);
        batch.set(key(i), &value[..], ttl);
        if batch.len() == FILL_BATCH {
            db.write_batch(&batch).map_err(|e| e.to_string())?;
            batch = Batch::new();
        }
    }
    if !batch.is_empty() {
        db.write_batch(&batch).map_err(|e| e.to_string())?;
    }
    Ok((db, dir))
}

/// One destination's figures.
struct Measured {
    copied: u64,
    copy: Duration,
    verify: Duration,
}

async fn measure(
    source: &dyn Backend,
    destination: &dyn Backend,
    config: &Config,
) -> Result<Measured, String> {
    let options = MigrateOptions {
        prefix: KEY_PREFIX.as_bytes().to_vec(),
        batch_keys: config.batch,
        source_label: "bench".to_owned(),
        ..MigrateOptions::default()
    };
    let report = migrate::migrate(source, destination, &options, |_| {})
        .await
        .map_err(|e| e.to_string())?;
    if report.copied != config.keys as u64 {
        return Err(format!(
            "copied {} keys, expected {}: {report:?}",
            report.copied, config.keys
        ));
    }
    let started = Instant::now();
    let verified = migrate::verify(
        source,
        destination,
        &VerifyOptions {
            prefix: options.prefix.clone(),
            batch_keys: config.batch,
            ..VerifyOptions::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let verify = started.elapsed();
    if !verified.is_clean() {
        return Err(format!(
            "verify found {} difference(s), e.g. {:?}",
            verified.differences,
            verified.examples.first()
        ));
    }
    Ok(Measured {
        copied: report.copied,
        copy: report.elapsed,
        verify,
    })
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
    let fill_started = Instant::now();
    let (db, _source_dir) = fill_source(&config)?;
    let source = Embedded::new(db.clone());
    println!(
        "# keel migrate: {} keys ({}-byte keys, {VALUE_BYTES}-byte values, half with a TTL)\n\n\
         source: keel engine on disk, Durability::Immediate (filled in {:.1} s); batches of {} \
         keys in flight\nRedis: {}; Postgres: {}\n",
        thousands(config.keys as f64),
        key(0).len(),
        fill_started.elapsed().as_secs_f64(),
        config.batch,
        redis
            .as_ref()
            .map_or_else(|e| e.clone(), |s| s.config.clone()),
        pg.as_ref().map_or_else(|e| e.clone(), |v| v.clone()),
    );
    let destinations = [
        Target {
            label: "keel engine (Immediate)",
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
            label: "Postgres logged",
            kind: match (&pg_url, &pg) {
                (Ok(url), Ok(_)) => Ok(Kind::Postgres {
                    url: url.clone(),
                    table: PG_TABLE,
                }),
                (Err(why), _) | (_, Err(why)) => Err(format!("unavailable: {why}")),
            },
        },
    ];
    println!("| keel engine → | keys | copy | keys/s | verify | verified keys/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut failed = Vec::new();
    for target in &destinations {
        let result = match target.open(&config.scratch).await {
            Ok(opened) => measure(&source, &*opened.backend, &config).await,
            Err(why) => Err(why),
        };
        match result {
            Ok(m) => println!(
                "| {} | {} | {:.2} s | {} | {:.2} s | {} |",
                target.label,
                thousands(m.copied as f64),
                m.copy.as_secs_f64(),
                thousands(m.copied as f64 / m.copy.as_secs_f64()),
                m.verify.as_secs_f64(),
                thousands(m.copied as f64 / m.verify.as_secs_f64()),
            ),
            Err(why) => {
                println!("| {} | failed: {why} | | | | |", target.label);
                failed.push(format!("{}: {why}", target.label));
            }
        }
    }
    drop(source);
    db.close().map_err(|e| e.to_string())?;
    if let Ok(url) = &pg_url {
        let _ = servers::cleanup_postgres(url, &[PG_TABLE]).await;
    }
    println!("\nwhole run: {:.1} s", started.elapsed().as_secs_f64());
    if ci && !failed.is_empty() {
        return Err(format!("destinations failed: {}", failed.join("; ")));
    }
    Ok(())
}

fn main() -> ExitCode {
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("migrate: {e}");
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
            eprintln!("migrate: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        // Ctrl-C: stop the Redis this harness started, then exit.
        tokio::spawn(async {
            let _ = tokio::signal::ctrl_c().await;
            servers::kill_all();
            eprintln!("migrate: interrupted; the server it started is stopped");
            std::process::exit(130);
        });
        run(config).await
    });
    servers::kill_all();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate: {e}");
            ExitCode::FAILURE
        }
    }
}
