//! Reopen time and memory for a store of 1,000,000 keys (16-byte keys, 100-byte values), from
//! one run: reopen from the WAL alone, reopen from a snapshot, the snapshot's own write time and
//! longest write stall while it ran, and memory per key (process RSS growth while loading, next
//! to the engine's own accounting).
//!
//! `cargo bench -p keel-engine --bench reopen -- [--keys N] [--dir PATH]`

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_engine::{Batch, Db, Durability, Options};

fn rss_bytes() -> u64 {
    // Resident pages (second field of /proc/self/statm) times the page size.
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(b"key:");
    k[4..].copy_from_slice(format!("{i:012}").as_bytes());
    k
}

fn main() {
    let mut keys: u64 = 1_000_000;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-reopen");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--keys" => keys = args.next().and_then(|v| v.parse().ok()).expect("--keys N"),
            "--dir" => dir = PathBuf::from(args.next().expect("--dir PATH")),
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let value = [0x61u8; 100];
    let opts = Options::default()
        .durability(Durability::Buffered)
        // Keep the whole load in the WAL: the first reopen measures pure WAL replay.
        .snapshot_after_wal_bytes(u64::MAX / 16);

    let rss_before = rss_bytes();
    let load_started = Instant::now();
    let db = Db::open(&dir, opts.clone()).unwrap();
    let mut batch = Batch::new();
    for i in 0..keys {
        batch.set(key(i).to_vec(), value.to_vec(), None);
        if batch.len() == 1000 {
            db.write_batch(&batch).unwrap();
            batch = Batch::new();
        }
    }
    if !batch.is_empty() {
        db.write_batch(&batch).unwrap();
    }
    let load = load_started.elapsed();
    let rss_loaded = rss_bytes();
    let accounted = db.stats().memory_bytes;
    let wal_bytes = db.stats().wal_bytes;
    db.close().unwrap();

    let started = Instant::now();
    let db = Db::open(&dir, opts.clone()).unwrap();
    let reopen_wal = started.elapsed();
    assert_eq!(db.stats().keys, keys);

    // A snapshot while a writer keeps writing: its duration and the writer's longest wait.
    let stop = Arc::new(AtomicBool::new(false));
    let max_stall_ns = Arc::new(AtomicU64::new(0));
    let writer = {
        let (db, stop, max) = (db.clone(), Arc::clone(&stop), Arc::clone(&max_stall_ns));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                db.set(key(i % keys), value, None).unwrap();
                max.fetch_max(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                i += 1;
            }
            i
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let baseline_stall = max_stall_ns.swap(0, Ordering::Relaxed);
    let snap = db.compact().unwrap().unwrap();
    let stall = max_stall_ns.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let writes_during = writer.join().unwrap();
    db.close().unwrap();

    let started = Instant::now();
    let db = Db::open(&dir, opts).unwrap();
    let reopen_snap = started.elapsed();
    assert_eq!(db.stats().keys, keys);
    let recovery = db.stats().recovery.unwrap();
    db.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let per_key = |b: u64| b as f64 / keys as f64;
    println!("\n{keys} keys, 16-byte keys, 100-byte values (one run)\n");
    println!("{:<52} {:>14}", "measure", "value");
    println!(
        "{:<52} {:>11.3} s",
        "load (batches of 1,000, Buffered)",
        load.as_secs_f64()
    );
    println!(
        "{:<52} {:>11.1} MB",
        "WAL size after load",
        wal_bytes as f64 / 1e6
    );
    println!(
        "{:<52} {:>11.3} s",
        "reopen: replay the WAL only",
        reopen_wal.as_secs_f64()
    );
    println!(
        "{:<52} {:>11.3} s",
        "snapshot: write (while a writer runs)",
        snap.duration.as_secs_f64()
    );
    println!(
        "{:<52} {:>11.3} ms",
        "snapshot: longest single write during it",
        stall as f64 / 1e6
    );
    println!(
        "{:<52} {:>11.3} ms",
        "  (longest single write in the 100 ms before it)",
        baseline_stall as f64 / 1e6
    );
    println!(
        "{:<52} {:>14}",
        "  writes completed during the snapshot", writes_during
    );
    println!(
        "{:<52} {:>11.3} s",
        format!("reopen: snapshot + {} WAL records", recovery.records),
        reopen_snap.as_secs_f64()
    );
    println!(
        "{:<52} {:>11.1} B",
        "memory per key: process RSS growth",
        per_key(rss_loaded.saturating_sub(rss_before))
    );
    println!(
        "{:<52} {:>11.1} B",
        "memory per key: engine accounting",
        per_key(accounted)
    );
    println!("{:<52} {:>11} B", "  of which key + value bytes", 116);
}
