//! Durable-write throughput next to the physical limit, from one run on one disk.
//!
//! Rows: the raw fdatasync rate of the disk (append 64 bytes + fdatasync, one thread: the
//! ceiling for a single durable writer), then `Db` writes (`incr` with a TTL on create) with
//! `Immediate`, `Periodic(100ms)`, `Buffered` and memory-only stores at 1 and 64 writer
//! threads. Group commit shows as the 64-writer `Immediate` row exceeding the raw rate.
//!
//! `cargo bench -p keel-engine --bench durability -- [--secs N] [--dir PATH]`
//! (default 3 s per row, in a temporary directory under `target/`).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keel_engine::{Db, Durability, Options};

struct Row {
    name: String,
    threads: usize,
    ops: u64,
    elapsed: Duration,
    latencies_ns: Vec<u64>,
}

impl Row {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile_us(&mut self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        self.latencies_ns.sort_unstable();
        let i = ((self.latencies_ns.len() - 1) as f64 * p).round() as usize;
        self.latencies_ns[i] as f64 / 1000.0
    }
}

fn args() -> (Duration, PathBuf) {
    let mut secs = 3.0;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-durability");
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => secs = it.next().and_then(|v| v.parse().ok()).expect("--secs N"),
            "--dir" => dir = PathBuf::from(it.next().expect("--dir PATH")),
            _ => {} // cargo bench passes --bench
        }
    }
    (Duration::from_secs_f64(secs), dir)
}

fn raw_fdatasync(dir: &Path, run_for: Duration) -> Row {
    let path = dir.join("raw-fdatasync.bin");
    let _ = std::fs::remove_file(&path);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let record = [0x5au8; 64];
    let mut latencies_ns = Vec::new();
    let started = Instant::now();
    while started.elapsed() < run_for {
        let t = Instant::now();
        file.write_all(&record).unwrap();
        file.sync_data().unwrap();
        latencies_ns.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = started.elapsed();
    std::fs::remove_file(&path).unwrap();
    Row {
        name: "raw write+fdatasync".into(),
        threads: 1,
        ops: latencies_ns.len() as u64,
        elapsed,
        latencies_ns,
    }
}

fn db_row(name: &str, db: Db, threads: usize, run_for: Duration) -> Row {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (db, stop) = (db.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let key = format!("bench:{t}");
                let mut lat = Vec::with_capacity(1 << 16);
                while !stop.load(Ordering::Relaxed) {
                    let s = Instant::now();
                    db.incr(&key, 1, Some(Duration::from_secs(3600))).unwrap();
                    lat.push(s.elapsed().as_nanos() as u64);
                }
                lat
            })
        })
        .collect();
    std::thread::sleep(run_for);
    stop.store(true, Ordering::Relaxed);
    let mut latencies_ns = Vec::new();
    for h in handles {
        latencies_ns.extend(h.join().unwrap());
    }
    let elapsed = started.elapsed();
    let fsyncs = db.stats().wal_fsyncs;
    db.close().unwrap();
    Row {
        name: if fsyncs > 0 {
            format!(
                "{name} ({:.1} writes/fsync)",
                latencies_ns.len() as f64 / fsyncs as f64
            )
        } else {
            name.to_owned()
        },
        threads,
        ops: latencies_ns.len() as u64,
        elapsed,
        latencies_ns,
    }
}

fn main() {
    let (run_for, dir) = args();
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows = vec![raw_fdatasync(&dir, run_for)];
    let configs = [
        ("keel Immediate", Some(Durability::Immediate)),
        (
            "keel Periodic(100ms)",
            Some(Durability::Periodic(Duration::from_millis(100))),
        ),
        ("keel Buffered", Some(Durability::Buffered)),
        ("keel memory-only", None),
    ];
    for (name, durability) in configs {
        for threads in [1, 64] {
            let store = dir.join("store");
            let _ = std::fs::remove_dir_all(&store);
            let db = match durability {
                Some(d) => Db::open(&store, Options::default().durability(d)).unwrap(),
                None => Db::memory(Options::default()),
            };
            rows.push(db_row(name, db, threads, run_for));
        }
    }
    let _ = std::fs::remove_dir_all(dir.join("store"));
    let raw = rows[0].ops_per_sec();
    let single = rows[1].ops_per_sec();
    println!(
        "\ndurable incr+TTL vs the disk's raw fdatasync rate ({} s per row)\n",
        run_for.as_secs_f64()
    );
    println!(
        "{:<44} {:>7} {:>12} {:>10} {:>10} {:>9}",
        "workload", "threads", "ops/s", "p50 us", "p99 us", "vs raw"
    );
    for row in &mut rows {
        let (p50, p99) = (row.percentile_us(0.50), row.percentile_us(0.99));
        println!(
            "{:<44} {:>7} {:>12.0} {:>10.1} {:>10.1} {:>8.2}x",
            row.name,
            row.threads,
            row.ops_per_sec(),
            p50,
            p99,
            row.ops_per_sec() / raw
        );
    }
    let group = rows[2].ops_per_sec();
    println!(
        "\nImmediate: 1 writer = {:.0}% of raw fdatasync; 64 writers = {:.1}x one writer",
        100.0 * single / raw,
        group / single
    );
}
