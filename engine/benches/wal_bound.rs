//! WAL size on disk over a sustained write load, sampled every second, with the default
//! snapshot threshold (128 MiB) unless told otherwise: shows that automatic snapshots keep the
//! WAL bounded while the total written grows without bound.
//!
//! `cargo bench -p keel-engine --bench wal_bound -- [--secs N] [--threshold-mib M] [--dir PATH]`
//! Four writer threads overwrite 100,000 keys with 200-byte values, `Periodic(100ms)`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_engine::{Db, Durability, Options, SNAPSHOT_AFTER_WAL_BYTES_DEFAULT};

fn main() {
    let mut secs = 60u64;
    let mut threshold = SNAPSHOT_AFTER_WAL_BYTES_DEFAULT;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-wal-bound");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|v| v.parse().ok()).expect("--secs N"),
            "--threshold-mib" => {
                threshold = args
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .expect("--threshold-mib M")
                    << 20
            }
            "--dir" => dir = PathBuf::from(args.next().expect("--dir PATH")),
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let db = Db::open(
        &dir,
        Options::default()
            .durability(Durability::Periodic(Duration::from_millis(100)))
            .snapshot_after_wal_bytes(threshold),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (db, stop, written) = (db.clone(), Arc::clone(&stop), Arc::clone(&written));
            std::thread::spawn(move || {
                let value = [b'v'; 200];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    db.set(format!("key:{:08}", i % 100_000), value, None)
                        .unwrap();
                    written.fetch_add(1, Ordering::Relaxed);
                    i += 4;
                }
            })
        })
        .collect();
    println!(
        "\nWAL on disk under sustained writes (threshold {} MiB)\n",
        threshold >> 20
    );
    println!(
        "{:>6} {:>14} {:>14} {:>10} {:>10}",
        "second", "writes total", "WAL MiB", "segments", "snapshots"
    );
    let started = Instant::now();
    let mut max_wal = 0;
    for s in 1..=secs {
        std::thread::sleep(Duration::from_secs(s).saturating_sub(started.elapsed()));
        let st = db.stats();
        max_wal = max_wal.max(st.wal_bytes);
        println!(
            "{s:>6} {:>14} {:>14.1} {:>10} {:>10}",
            written.load(Ordering::Relaxed),
            st.wal_bytes as f64 / 1048576.0,
            st.wal_segments,
            st.snapshots
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let total = written.load(Ordering::Relaxed);
    println!(
        "\n{total} writes (~{:.0} MiB of records) in {secs} s; largest WAL seen {:.1} MiB",
        total as f64 * 250.0 / 1048576.0,
        max_wal as f64 / 1048576.0
    );
    db.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
