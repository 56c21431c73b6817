//! The smallest reproductions of the durability bugs the crash simulator, the model test and
//! fault injection found, each named after what it protects: a TTL extended by `expire` or
//! `persist` survives a restart after the original TTL has passed; a WAL segment whose name
//! reached the disk but whose header did not does not make the store unopenable; an open that
//! follows a failed directory fsync makes its segment's name durable before acknowledging
//! writes into it; a reopen after a failed fdatasync does not acknowledge writes that depend on
//! bytes the disk may never get.

#[path = "support/sim.rs"]
mod sim;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_engine::record::{SEGMENT_HEADER_BYTES, encode_segment_header};
use keel_engine::{Db, ManualClock, Options, Ttl};
use sim::{DirLoss, Fault, FsyncFailure, OpKind, SimDisk};

const T0: u64 = 1_700_000_000_000;
const STORE: &str = "/sim/store";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn a_ttl_extended_by_expire_or_persist_survives_a_restart_after_the_original_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let opts = Options::default().clock(Arc::new(clock.clone()));
    let db = Db::open(dir.path(), opts.clone()).unwrap();
    db.set("session", "alice", Some(ms(100))).unwrap();
    assert!(db.persist("session").unwrap());
    db.set("lease", "bob", Some(ms(100))).unwrap();
    assert!(db.expire("lease", Duration::from_secs(60)).unwrap());
    assert_eq!(db.incr("hits", 1, Some(ms(100))).unwrap(), 1);
    assert!(db.expire("hits", Duration::from_secs(60)).unwrap());
    clock.advance(ms(200));
    assert_eq!(db.get("session"), Some(b"alice".to_vec()));
    db.close().unwrap();

    let db = Db::open(dir.path(), opts).unwrap();
    assert_eq!(
        db.get("session"),
        Some(b"alice".to_vec()),
        "persisted key lost on restart"
    );
    assert_eq!(db.ttl("session"), Ttl::NoExpiry);
    assert_eq!(
        db.ttl("lease"),
        Ttl::Remaining(ms(59_800)),
        "extended key lost on restart"
    );
    assert_eq!(db.get("hits"), Some(b"1".to_vec()), "extended counter lost");
}

#[test]
fn a_ttl_extended_after_a_snapshot_survives_a_restart_after_the_original_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let opts = Options::default().clock(Arc::new(clock.clone()));
    let db = Db::open(dir.path(), opts.clone()).unwrap();
    // The snapshot holds the key with its short TTL; the WAL after it holds the extension.
    db.set("snapped", "carol", Some(ms(100))).unwrap();
    db.compact().unwrap();
    assert!(db.expire("snapped", Duration::from_secs(60)).unwrap());
    clock.advance(ms(200));
    db.close().unwrap();

    let db = Db::open(dir.path(), opts).unwrap();
    assert_eq!(
        db.ttl("snapped"),
        Ttl::Remaining(ms(59_800)),
        "extended key lost on restart after a snapshot"
    );
}

fn sim_options(disk: &SimDisk) -> Options {
    Options::default()
        .storage(Arc::new(disk.clone()))
        .clock(Arc::new(ManualClock::new(T0)))
}

#[test]
fn a_segment_whose_name_reached_disk_but_not_its_header_does_not_block_the_open() {
    let dir = Path::new(STORE);
    // A power loss while a segment was being created: the directory entry was committed (a
    // journal may do that before any fsync), the header's bytes were not. Zeros are what XFS
    // shows for such a block; a torn write may leave part of the header and garbage.
    let mut half_garbage = encode_segment_header(4)[..12].to_vec();
    half_garbage.resize(SEGMENT_HEADER_BYTES, 0xA5);
    for header in [vec![0; SEGMENT_HEADER_BYTES], half_garbage] {
        let disk = SimDisk::with_dir(dir);
        let db = Db::open(dir, sim_options(&disk)).unwrap();
        for i in 0..3 {
            db.set(format!("k{i}"), "v", None).unwrap();
        }
        db.close().unwrap();
        disk.put_file(&dir.join("wal-00000000000000000004.log"), &header);
        let db = Db::open(dir, sim_options(&disk))
            .expect("a segment holding no record must not make the store unopenable");
        assert_eq!(db.stats().keys, 3);
        db.set("k3", "v", None).unwrap();
    }
    // The same for the very first segment of a new store.
    let disk = SimDisk::with_dir(dir);
    disk.put_file(
        &dir.join("wal-00000000000000000001.log"),
        &[0; SEGMENT_HEADER_BYTES],
    );
    let db = Db::open(dir, sim_options(&disk)).expect("an empty store whose header was lost");
    db.set("k", "v", None).unwrap();
}

#[test]
fn an_open_after_a_failed_directory_fsync_makes_its_segment_durable() {
    let dir = Path::new(STORE);
    let disk = SimDisk::with_dir(dir);
    // The first open creates the segment and fails to fsync the directory; the application
    // retries, the second open succeeds and finds the segment.
    disk.inject(Fault {
        kind: OpKind::SyncDir,
        nth: 0,
        persistent: false,
    });
    assert!(Db::open(dir, sim_options(&disk)).is_err());
    let db = Db::open(dir, sim_options(&disk)).unwrap();
    db.set("acknowledged", "v", None).unwrap();
    let (after_power_loss, _) = disk.power_loss(1, DirLoss::ForgetUnsynced);
    drop(db);
    let db = Db::open(dir, sim_options(&after_power_loss)).unwrap();
    assert_eq!(
        db.get("acknowledged"),
        Some(b"v".to_vec()),
        "an acknowledged write lost: its segment's name was never made durable"
    );
}

#[test]
fn a_reopen_after_a_failed_fdatasync_does_not_build_on_bytes_the_disk_never_got() {
    let dir = Path::new(STORE);
    let disk = SimDisk::with_dir(dir);
    // Linux after a write-back error: the failed pages are marked clean, reads in this boot
    // still return them, no later fsync writes them (PostgreSQL's "fsyncgate").
    disk.on_fsync_failure(FsyncFailure::LosesPages);
    let db = Db::open(dir, sim_options(&disk)).unwrap();
    db.set("a", "acknowledged before", None).unwrap();
    disk.inject(Fault {
        kind: OpKind::SyncData,
        nth: disk.calls(OpKind::SyncData),
        persistent: false,
    });
    assert!(db.set("b", "never acknowledged", None).is_err());
    drop(db);
    // "Drop the store and open it again" (DESIGN.md, poisoning), in the same boot.
    let db = Db::open(dir, sim_options(&disk)).unwrap();
    db.set("c", "acknowledged after", None).unwrap();
    drop(db);
    let (after_power_loss, fates) = disk.power_loss(1, DirLoss::ForgetUnsynced);
    let db = Db::open(dir, sim_options(&after_power_loss)).unwrap_or_else(|e| {
        panic!("the store no longer opens ({e}); acknowledged writes lost. {fates:?}")
    });
    assert_eq!(db.get("a"), Some(b"acknowledged before".to_vec()));
    assert_eq!(db.get("c"), Some(b"acknowledged after".to_vec()));
}

#[test]
fn a_reopen_after_a_failed_fdatasync_of_a_new_segments_header_rewrites_that_header() {
    let dir = Path::new(STORE);
    let disk = SimDisk::with_dir(dir);
    disk.on_fsync_failure(FsyncFailure::LosesPages);
    let options = sim_options(&disk).wal_segment_bytes(4096);
    let db = Db::open(dir, options.clone()).unwrap();
    // Three records of about 1 KiB fill most of a 4 KiB segment; the fourth rolls first.
    for key in ["a", "b", "c"] {
        db.set(key, [b'v'; 1000], None).unwrap();
    }
    // The roll fdatasyncs the sealed segment, creates the next, writes its header and
    // fdatasyncs it: that second fdatasync fails, so the header's page never reaches the disk
    // although reads in this boot still return it.
    disk.inject(Fault {
        kind: OpKind::SyncData,
        nth: disk.calls(OpKind::SyncData) + 1,
        persistent: false,
    });
    assert!(db.set("d", [b'v'; 1000], None).is_err());
    let segments = disk.listing(dir);
    let segments: Vec<_> = segments
        .iter()
        .filter(|f| f.0.starts_with("wal-"))
        .collect();
    assert_eq!(
        segments.len(),
        2,
        "the failure hit a new segment: {segments:?}"
    );
    assert_eq!(
        segments[1].1, SEGMENT_HEADER_BYTES as u64,
        "which holds only its header"
    );
    drop(db);
    let db = Db::open(dir, options).unwrap();
    db.set("e", "acknowledged after", None).unwrap();
    drop(db);
    let (after_power_loss, fates) = disk.power_loss(1, DirLoss::ForgetUnsynced);
    let db = Db::open(dir, sim_options(&after_power_loss)).unwrap_or_else(|e| {
        panic!("the store no longer opens ({e}); acknowledged writes lost. {fates:?}")
    });
    assert_eq!(db.get("c"), Some(vec![b'v'; 1000]));
    assert_eq!(db.get("e"), Some(b"acknowledged after".to_vec()));
}
