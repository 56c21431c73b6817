//! Reopen time and memory for a store of 1,000,000 keys (16-byte keys, 100-byte values), from
//! one run: reopen from the WAL alone, reopen from a snapshot, the snapshot's own write time and
//! longest write stall while it ran, and memory per key (process RSS growth while loading, the
//! same for a memory-only store in a child process, and the engine's own accounting). Then the
//! snapshot it wrote is loaded into the engine's index four ways, side by side: today's
//! streamed format read into memory or memory-mapped, and the same entries as an rkyv archive
//! in a memory-mapped file, validated by rkyv's checker or by a checksum of the file
//! (DESIGN.md, "Snapshot file", keeps the figures).
//!
//! `cargo bench -p keel-engine --bench reopen -- [--keys N] [--dir PATH]`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_engine::snapshot::{self, IndexBuild};
use keel_engine::{Batch, Db, Durability, Options, SHARDS_DEFAULT};

/// Loads of each snapshot format in the comparison (alternating; the fastest is printed).
const FORMAT_RUNS: usize = 3;

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

/// Closes `db` and returns how long that took. Dropping a large index frees one allocation
/// per entry; glibc parks small freed chunks in its fast bins and merges them all on the next
/// large allocation, which would otherwise land in whatever runs next (the timed reopen in
/// this one process; a real restart never pays it). One large allocation here charges that
/// merge to the close, where it belongs.
fn close(db: Db) -> Duration {
    let started = Instant::now();
    db.close().unwrap();
    drop(std::hint::black_box(Vec::<u8>::with_capacity(1 << 20)));
    started.elapsed()
}

/// CPU time the calling thread has used (Linux: /proc/thread-self/schedstat; zero elsewhere):
/// recovery runs on the opening thread, so next to a reopen's wall time it shows how much of
/// that time the machine's other load took.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
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
    let mut index_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--keys" => keys = args.next().and_then(|v| v.parse().ok()).expect("--keys N"),
            "--dir" => dir = PathBuf::from(args.next().expect("--dir PATH")),
            "--index-rss-child" => index_only = true,
            _ => {}
        }
    }
    if index_only {
        index_rss_child(keys);
        return;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let value = [0x61u8; 100];
    let opts = Options::default()
        .durability(Durability::Buffered)
        // Keep the whole load in the WAL: the first reopen measures pure WAL replay.
        .snapshot_after_wal_bytes(u64::MAX / 16);

    let index_rss = index_only_rss(keys);
    let rss_before = rss_bytes();
    let load_started = Instant::now();
    let db = Db::open(&dir, opts.clone()).unwrap();
    load_keys(&db, keys, &value);
    let load = load_started.elapsed();
    let rss_loaded = rss_bytes();
    let accounted = db.stats().memory_bytes;
    let wal_bytes = db.stats().wal_bytes;
    let closed = close(db);

    let (started, cpu) = (Instant::now(), thread_cpu());
    let db = Db::open(&dir, opts.clone()).unwrap();
    let reopen_wal = started.elapsed();
    let reopen_wal_cpu = thread_cpu().saturating_sub(cpu);
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
    close(db);

    let (started, cpu) = (Instant::now(), thread_cpu());
    let db = Db::open(&dir, opts).unwrap();
    let reopen_snap = started.elapsed();
    let reopen_snap_cpu = thread_cpu().saturating_sub(cpu);
    assert_eq!(db.stats().keys, keys);
    let recovery = db.stats().recovery.unwrap();
    close(db);
    let formats = compare_formats(&dir);
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
        "close (frees the index)",
        closed.as_secs_f64()
    );
    println!(
        "{:<52} {:>11.3} s",
        "reopen: replay the WAL only",
        reopen_wal.as_secs_f64()
    );
    println!(
        "{:<52} {:>11.3} s",
        "  (CPU time of the opening thread)",
        reopen_wal_cpu.as_secs_f64()
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
        "{:<52} {:>11.3} s",
        "  (CPU time of the opening thread)",
        reopen_snap_cpu.as_secs_f64()
    );
    println!(
        "{:<52} {:>11.1} B",
        "memory per key: process RSS growth",
        per_key(rss_loaded.saturating_sub(rss_before))
    );
    println!(
        "{:<52} {:>11.1} B",
        "  (the same load into a memory-only store: no WAL)",
        per_key(index_rss)
    );
    println!(
        "{:<52} {:>11.1} B",
        "memory per key: engine accounting",
        per_key(accounted)
    );
    println!("{:<52} {:>11} B", "  of which key + value bytes", 116);

    println!(
        "\nthe last snapshot ({} entries) loaded into the index, fastest of {FORMAT_RUNS}\n",
        formats.entries
    );
    println!("{:<52} {:>10} {:>9}", "format", "load", "file");
    for (name, time, bytes) in &formats.rows {
        println!(
            "{:<52} {:>8.3} s {:>6.1} MB",
            name,
            time.as_secs_f64(),
            *bytes as f64 / 1e6
        );
    }
}

/// RSS growth while loading `keys` keys into a memory-only store the same way: the index
/// alone, without the WAL's buffers in flight (what `ENTRY_OVERHEAD_BYTES` accounts for).
/// Measured in a child process (this binary with `--index-rss-child`), so neither load
/// reuses memory the other freed.
fn index_only_rss(keys: u64) -> u64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--keys", &keys.to_string(), "--index-rss-child"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Writes keys `0..keys`, each holding `value`, in batches of 1,000.
fn load_keys(db: &Db, keys: u64, value: &[u8]) {
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
}

fn index_rss_child(keys: u64) {
    let value = [0x61u8; 100];
    let before = rss_bytes();
    let db = Db::memory(Options::default());
    load_keys(&db, keys, &value);
    println!("{}", rss_bytes().saturating_sub(before));
    drop(db);
}

/// One snapshot entry in the rkyv archive.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct ArchivedEntrySource {
    key: Vec<u8>,
    value: Vec<u8>,
    expires_at_ms: u64,
}

/// A whole snapshot as one rkyv archive: the header fields and the entries, plus (for the
/// checksummed variant) nothing else: the checksum of the file is kept beside it.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct SnapshotSource {
    lsn: u64,
    time_ms: u64,
    entries: Vec<ArchivedEntrySource>,
}

struct Formats {
    entries: u64,
    rows: Vec<(&'static str, Duration, u64)>,
}

/// Loads the snapshot in `dir` into a fresh index as today's streamed file, then writes the
/// same entries as an rkyv archive and loads that through a memory map, validated by rkyv's
/// checker (bytecheck) or by a BLAKE3 checksum of the file followed by unchecked access (the
/// streamed format's integrity check). Every variant ends with the same index build recovery
/// runs; the index is dropped outside the timing.
fn compare_formats(dir: &Path) -> Formats {
    let snap_path = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "snap"))
        .expect("the bench leaves a snapshot");
    let streamed_bytes = std::fs::metadata(&snap_path).unwrap().len();

    // The same entries, archived with rkyv.
    let bytes = std::fs::read(&snap_path).unwrap();
    let mut entries = Vec::new();
    let header = snapshot::decode(&bytes, |key, value, expires_at_ms| {
        entries.push(ArchivedEntrySource {
            key: key.to_vec(),
            value: value.to_vec(),
            expires_at_ms,
        });
    })
    .unwrap();
    drop(bytes);
    let source = SnapshotSource {
        lsn: header.lsn,
        time_ms: header.time_ms,
        entries,
    };
    let archive = rkyv::to_bytes::<rkyv::rancor::Error>(&source).unwrap();
    drop(source);
    let rkyv_path = dir.join("bench.rkyv");
    std::fs::write(&rkyv_path, &archive).unwrap();
    let checksum = *blake3::hash(&archive).as_bytes();
    drop(archive);
    let rkyv_bytes = std::fs::metadata(&rkyv_path).unwrap().len();

    let mut best = [Duration::MAX; 4];
    let mut loaded = [0u64; 4];
    for _ in 0..FORMAT_RUNS {
        let runs = [
            load_streamed(&snap_path),
            load_streamed_mapped(&snap_path),
            load_rkyv_checked(&rkyv_path),
            load_rkyv_checksummed(&rkyv_path, &checksum),
        ];
        for (i, (t, n)) in runs.into_iter().enumerate() {
            best[i] = best[i].min(t);
            loaded[i] = n;
        }
    }
    assert!(loaded.iter().all(|&n| n == header.entries), "{loaded:?}");
    Formats {
        entries: header.entries,
        rows: vec![
            (
                "streamed (today): read + BLAKE3 + decode",
                best[0],
                streamed_bytes,
            ),
            ("streamed, memmap2 instead of read", best[1], streamed_bytes),
            ("rkyv + memmap2: bytecheck validation", best[2], rkyv_bytes),
            (
                "rkyv + memmap2: BLAKE3 of the map, unchecked access",
                best[3],
                rkyv_bytes,
            ),
        ],
    }
}

fn load_streamed(path: &Path) -> (Duration, u64) {
    let started = Instant::now();
    let mut build = IndexBuild::new(SHARDS_DEFAULT);
    let bytes = std::fs::read(path).unwrap();
    snapshot::decode(&bytes, |key, value, expires_at_ms| {
        build.push(key, value, expires_at_ms)
    })
    .unwrap();
    drop(bytes);
    let (entries, _, index) = build.finish();
    let took = started.elapsed();
    drop(index);
    (took, entries)
}

fn load_streamed_mapped(path: &Path) -> (Duration, u64) {
    let started = Instant::now();
    let mut build = IndexBuild::new(SHARDS_DEFAULT);
    let mapped = map(path);
    snapshot::decode(&mapped, |key, value, expires_at_ms| {
        build.push(key, value, expires_at_ms)
    })
    .unwrap();
    drop(mapped);
    let (entries, _, index) = build.finish();
    let took = started.elapsed();
    drop(index);
    (took, entries)
}

#[allow(unsafe_code)]
fn map(path: &Path) -> memmap2::Mmap {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: the bench wrote this file and nothing modifies or truncates it while mapped.
    unsafe { memmap2::Mmap::map(&file) }.unwrap()
}

fn build_from_archive(archive: &ArchivedSnapshotSource) -> (u64, impl Sized) {
    let mut build = IndexBuild::new(SHARDS_DEFAULT);
    for e in archive.entries.iter() {
        build.push(&e.key, &e.value, e.expires_at_ms.to_native());
    }
    let (entries, _, index) = build.finish();
    (entries, index)
}

fn load_rkyv_checked(path: &Path) -> (Duration, u64) {
    let started = Instant::now();
    let mapped = map(path);
    let archive = rkyv::access::<ArchivedSnapshotSource, rkyv::rancor::Error>(&mapped[..]).unwrap();
    let (entries, index) = build_from_archive(archive);
    let took = started.elapsed();
    drop(index);
    (took, entries)
}

#[allow(unsafe_code)]
fn load_rkyv_checksummed(path: &Path, checksum: &[u8; 32]) -> (Duration, u64) {
    let started = Instant::now();
    let mapped = map(path);
    assert_eq!(blake3::hash(&mapped[..]).as_bytes(), checksum);
    // SAFETY: the bytes are exactly what `rkyv::to_bytes` produced for this type (the
    // checksum matched), and the map is page-aligned, more than the archive needs.
    let archive = unsafe { rkyv::access_unchecked::<ArchivedSnapshotSource>(&mapped[..]) };
    let (entries, index) = build_from_archive(archive);
    let took = started.elapsed();
    drop(index);
    (took, entries)
}
