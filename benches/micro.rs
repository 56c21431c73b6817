//! Criterion micro-benchmarks of the engine's hot paths, one operation per iteration, no
//! fsync in the loop: `get` (hit and miss), `set` and `incr` (memory-only, and on disk with
//! `Durability::Buffered` so the WAL encode and enqueue are included but the disk is not),
//! encoding one WAL record, and recovery (reopening a small store from its WAL and from a
//! snapshot). The side-by-side numbers against other stores are in `benches/compare.rs`.
//!
//! `cargo bench --bench micro [-- --quick] [-- FILTER]`

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use keel_engine::record::{Entry, encode_record};
use keel_engine::{Batch, Db, Durability, Options};

/// Keys loaded into the stores the read and write benchmarks use.
const KEYS: u64 = 10_000;
/// Keys in the store the recovery benchmarks reopen.
const RECOVERY_KEYS: u64 = 10_000;
const VALUE_BYTES: usize = 100;
const TTL: Duration = Duration::from_secs(3600);

/// 16-byte keys, as in the comparison harness.
fn key(i: u64) -> Vec<u8> {
    format!("key:{i:012}").into_bytes()
}

fn load(db: &Db, keys: u64) {
    let value = vec![b'v'; VALUE_BYTES];
    let mut batch = Batch::new();
    for i in 0..keys {
        batch.set(key(i), value.clone(), None);
        if batch.len() == 1_000 {
            db.write_batch(&batch).expect("loading the benchmark store");
            batch = Batch::new();
        }
    }
    if !batch.is_empty() {
        db.write_batch(&batch).expect("loading the benchmark store");
    }
}

fn scratch() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-micro");
    std::fs::create_dir_all(&base).expect("creating target/bench-micro");
    tempfile::tempdir_in(base).expect("creating a directory under target/bench-micro")
}

fn reads(c: &mut Criterion) {
    let db = Db::memory(Options::default());
    load(&db, KEYS);
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    let mut group = c.benchmark_group("get");
    let mut i = 0usize;
    group.bench_function("hit", |b| {
        b.iter(|| {
            i = (i + 7919) % keys.len();
            black_box(db.get(&keys[i]))
        })
    });
    group.bench_function("miss", |b| b.iter(|| black_box(db.get(b"key:absent-0000"))));
    group.finish();
}

fn writes(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
    let value = vec![b'w'; VALUE_BYTES];
    let dir = scratch();
    let stores = [
        ("memory", Db::memory(Options::default())),
        (
            "buffered",
            Db::open(
                dir.path(),
                Options::default().durability(Durability::Buffered),
            )
            .expect("opening the benchmark store"),
        ),
    ];
    for (name, db) in &stores {
        load(db, KEYS);
        let mut group = c.benchmark_group(format!("write/{name}"));
        let mut i = 0usize;
        group.bench_function("set", |b| {
            b.iter(|| {
                i = (i + 7919) % keys.len();
                db.set(&keys[i], &value, None).expect("set")
            })
        });
        group.bench_function("incr_ttl_on_create", |b| {
            b.iter(|| black_box(db.incr("counter", 1, Some(TTL)).expect("incr")))
        });
        group.finish();
    }
}

fn wal_encode(c: &mut Criterion) {
    let key = key(42);
    let value = vec![b'v'; VALUE_BYTES];
    let entries = [Entry::Put {
        key: &key,
        value: &value,
        expires_at_ms: Some(1_900_000_000_000),
    }];
    let mut out = Vec::with_capacity(4096);
    let mut lsn = 0u64;
    c.bench_function("wal/encode_record put 16B/100B", |b| {
        b.iter(|| {
            out.clear();
            lsn += 1;
            encode_record(&mut out, lsn, 1_800_000_000_000, black_box(&entries));
            black_box(out.len())
        })
    });
}

/// Copies every file of a store directory (flat: segments, snapshots, lock file).
fn copy_store(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("listing the template store") {
        let entry = entry.expect("listing the template store");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copying the store");
    }
}

fn recovery(c: &mut Criterion) {
    let opts = Options::default()
        .durability(Durability::Buffered)
        .snapshot_after_wal_bytes(u64::MAX / 16);
    let wal_only = scratch();
    let db = Db::open(wal_only.path(), opts.clone()).expect("opening the template store");
    load(&db, RECOVERY_KEYS);
    db.close().expect("closing the template store");
    let snapshotted = scratch();
    let db = Db::open(snapshotted.path(), opts.clone()).expect("opening the template store");
    load(&db, RECOVERY_KEYS);
    db.compact().expect("snapshot of the template store");
    db.close().expect("closing the template store");

    let mut group = c.benchmark_group(format!("recovery/{RECOVERY_KEYS} keys"));
    for (name, template) in [("wal replay", &wal_only), ("snapshot", &snapshotted)] {
        // Each iteration opens a fresh copy, so a reopen never sees what an earlier one wrote.
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let dir = scratch();
                    copy_store(template.path(), dir.path());
                    dir
                },
                |dir| {
                    let db = Db::open(dir.path(), opts.clone()).expect("reopen");
                    assert_eq!(db.stats().keys, RECOVERY_KEYS);
                    db.close().expect("close");
                    dir
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, reads, writes, wal_encode, recovery);
criterion_main!(benches);
