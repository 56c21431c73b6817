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

fn manual_options(disk: &SimDisk, clock: &ManualClock, expire_every: Duration) -> Options {
    Options::default()
        .storage(Arc::new(disk.clone()))
        .clock(Arc::new(clock.clone()))
        .active_expiry(expire_every, 256)
}

/// Issue 16, item 2: a key seen expired before a clean close stays gone when the store is
/// reopened with the clock set back (the floor at close is kept in the clean-close marker).
#[test]
fn a_key_seen_expired_before_a_clean_close_stays_gone_with_the_clock_set_back() {
    let dir = Path::new(STORE);
    let disk = SimDisk::with_dir(dir);
    let clock = ManualClock::new(T0);
    // The active expirer never ticks: only the read sees the key expire, nothing logs it.
    let options = manual_options(&disk, &clock, Duration::from_secs(3600));
    let db = Db::open(dir, options.clone()).unwrap();
    db.set("session", "v", Some(Duration::from_secs(10)))
        .unwrap();
    clock.advance(Duration::from_secs(20));
    assert_eq!(db.get("session"), None);
    db.close().unwrap();
    clock.set_ms(T0 + 1_000);
    let db = Db::open(dir, options).unwrap();
    assert_eq!(db.get("session"), None, "an expired key came back");
    assert_eq!(db.ttl("session"), Ttl::Missing);
}

/// Issue 16, item 2, without a clean close: once an expiry has been seen, the maintenance
/// thread makes a clock floor past it durable within `FLOOR_SYNC_INTERVAL` (1 s) and a tick,
/// so a power loss after that, then a reopen with the clock behind, keeps the key gone.
#[test]
fn a_key_seen_expired_stays_gone_after_a_power_loss_and_the_clock_set_back() {
    let dir = Path::new(STORE);
    let disk = SimDisk::with_dir(dir);
    let clock = ManualClock::new(T0);
    let options = manual_options(&disk, &clock, Duration::from_millis(20));
    let db = Db::open(dir, options).unwrap();
    db.set("session", "v", Some(Duration::from_secs(10)))
        .unwrap();
    db.set("other", "kept", None).unwrap();
    clock.advance(Duration::from_secs(20));
    assert_eq!(db.get("session"), None);
    // Poll what a power loss would leave, reopened with the clock 19 s behind, until the key
    // stays gone there (generous deadline; the bound itself is 1 s plus a tick).
    let started = std::time::Instant::now();
    let behind = ManualClock::new(T0 + 1_000);
    loop {
        let (image, _) = disk.power_loss(1, DirLoss::ForgetUnsynced);
        let reopened = Db::open(
            dir,
            manual_options(&image, &behind, Duration::from_secs(3600)),
        )
        .expect("a power-loss image opens");
        assert_eq!(reopened.get("other"), Some(b"kept".to_vec()));
        if reopened.get("session").is_none() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "after 20 s a power loss still brings the expired key back"
        );
        std::thread::yield_now();
    }
    drop(db);
}

/// Issue 16, item 4: a reopen after a clean close does not rewrite the last segment (the
/// marker shows the log is exactly what was fdatasynced); after a power loss it does.
#[test]
fn a_reopen_after_a_clean_close_skips_the_segment_rewrite_and_one_after_a_crash_does_not() {
    let dir = Path::new(STORE);
    let rewrites = |disk: &SimDisk| {
        disk.trace()
            .iter()
            .filter(|e| e.kind == OpKind::Create && e.name().ends_with(".rewrite"))
            .count()
    };
    let disk = SimDisk::with_dir(dir);
    let db = Db::open(dir, sim_options(&disk)).unwrap();
    db.set("a", "1", None).unwrap();
    db.close().unwrap();
    let before = rewrites(&disk);
    let db = Db::open(dir, sim_options(&disk)).unwrap();
    assert_eq!(
        rewrites(&disk),
        before,
        "a clean reopen rewrote the last segment"
    );
    db.set("b", "2", None).unwrap();
    // No close: a power loss leaves the marker of the first close, which no longer matches.
    let (image, _) = disk.power_loss(1, DirLoss::ForgetUnsynced);
    drop(db);
    let db = Db::open(dir, sim_options(&image)).unwrap();
    assert_eq!(rewrites(&image), 1, "a reopen after a crash must rewrite");
    assert_eq!(db.get("b"), Some(b"2".to_vec()));
    db.close().unwrap();
}
