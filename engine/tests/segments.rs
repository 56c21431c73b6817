//! The WAL's segments over time: rolling before a segment passes its size, compaction freeing
//! the WAL even when it all sits in the active segment, and the `Periodic` fdatasync schedule.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_engine::storage::{DirLock, FsStorage, LockError, Storage, WritableFile};
use keel_engine::{Db, Durability, Error, Options};

fn wal_files(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("wal-"))
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn periodic_with_a_zero_interval_is_refused_at_open() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("store");
    let options = Options::default().durability(Durability::Periodic(Duration::ZERO));
    match Db::open(&dir, options) {
        Err(Error::InvalidOption { option, .. }) => assert_eq!(option, "durability"),
        other => panic!("expected InvalidOption, got {other:?}"),
    }
    assert!(!dir.exists());
}

#[test]
fn a_segment_rolls_before_a_write_would_take_it_past_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let segment = 4096u64;
    let options = Options::default().wal_segment_bytes(segment);
    let db = Db::open(dir.path(), options.clone()).unwrap();
    // Records of about 330 bytes: a 4 KiB segment fills up unevenly, so a roll that waits
    // until the segment is over its size would leave most segments above 4 KiB.
    for i in 0..200u32 {
        db.set(format!("k{i:04}"), vec![b'v'; 300], None).unwrap();
    }
    db.close().unwrap();
    let files = wal_files(dir.path());
    assert!(files.len() > 10, "{files:?}");
    for (name, len) in &files {
        assert!(*len <= segment, "{name} is {len} bytes, over {segment}");
    }
    let db = Db::open(dir.path(), options).unwrap();
    assert_eq!(db.get("k0199"), Some(vec![b'v'; 300]));
    assert_eq!(db.stats().recovery.unwrap().records, 200);
}

/// `keel compact` on a store whose whole WAL is the active segment: many overwrites of few
/// keys (a 2.7 MB WAL over 300 live keys) must shrink to about the live data.
#[test]
fn compact_rolls_the_active_segment_so_the_wal_it_covers_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options::default()
        .durability(Durability::Buffered)
        .snapshot_after_wal_bytes(u64::MAX);
    let db = Db::open(dir.path(), options.clone()).unwrap();
    for round in 0..60u32 {
        for k in 0..300u32 {
            db.set(format!("key{k:03}"), format!("{round:0100}"), None)
                .unwrap();
        }
    }
    // Everything written and synced, the store idle: the case `keel compact` met.
    db.with_durability(Durability::Immediate)
        .set("key000", format!("{:0100}", 59), None)
        .unwrap();
    let before = db.stats();
    assert_eq!(
        before.wal_segments, 1,
        "everything is in the active segment"
    );
    assert!(before.wal_bytes > 2_500_000, "{}", before.wal_bytes);
    let report = db.compact().unwrap().unwrap();
    assert_eq!(report.entries, 300);
    assert!(report.segments_deleted >= 1, "{report:?}");
    let after = db.stats();
    let on_disk: u64 = wal_files(dir.path()).iter().map(|(_, len)| len).sum();
    assert!(
        after.wal_bytes < 4096 && on_disk < 4096,
        "WAL after compaction: {} bytes counted, {on_disk} on disk",
        after.wal_bytes
    );
    // The store keeps working and recovers from the snapshot and the new segment.
    db.set("key000", "after", None).unwrap();
    db.close().unwrap();
    let db = Db::open(dir.path(), options).unwrap();
    let r = db.stats().recovery.unwrap();
    assert_eq!((r.snapshot_lsn, r.records, r.keys), (report.lsn, 1, 300));
    assert_eq!(db.get("key000").as_deref(), Some(&b"after"[..]));
    assert_eq!(db.get("key299"), Some(format!("{:0100}", 59).into_bytes()));
}

/// (started, ended, true for an fdatasync / false for a write) of every WAL segment call.
type Events = Arc<Mutex<Vec<(Instant, Instant, bool)>>>;

/// A storage that records when each WAL segment is written and fdatasynced.
#[derive(Clone, Default)]
struct Recording {
    events: Events,
}

struct RecordingFile {
    inner: Box<dyn WritableFile>,
    events: Option<Events>,
}

impl WritableFile for RecordingFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let started = Instant::now();
        self.inner.write_all(buf)?;
        if let Some(e) = &self.events {
            e.lock().unwrap().push((started, Instant::now(), false));
        }
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        let started = Instant::now();
        self.inner.sync_data()?;
        if let Some(e) = &self.events {
            e.lock().unwrap().push((started, Instant::now(), true));
        }
        Ok(())
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}

impl Recording {
    fn wrap(&self, path: &Path, inner: Box<dyn WritableFile>) -> Box<dyn WritableFile> {
        let is_wal = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".log"));
        Box::new(RecordingFile {
            inner,
            events: is_wal.then(|| Arc::clone(&self.events)),
        })
    }
}

impl Storage for Recording {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        FsStorage.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        FsStorage.list(dir)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        FsStorage.read(path)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        Ok(self.wrap(path, FsStorage.create(path)?))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        Ok(self.wrap(path, FsStorage.open_append(path)?))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        FsStorage.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        FsStorage.remove(path)
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        FsStorage.len(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        FsStorage.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> Result<Box<dyn DirLock>, LockError> {
        FsStorage.lock(path)
    }
}

/// `Periodic(interval)`: while written data waits for its fdatasync, the next fdatasync starts
/// at most the interval (plus scheduling slack) after the previous one ended, whoever wrote the
/// data (a lone
/// blocking writer leads its own commits; async-style writers leave them to the writer
/// thread). Writes are spread out so that most of them land while nothing else is pending.
#[test]
fn periodic_fdatasyncs_are_at_most_the_interval_apart_while_data_is_unsynced() {
    const INTERVAL: Duration = Duration::from_millis(100);
    const SLACK: Duration = Duration::from_millis(40);
    let dir = tempfile::tempdir().unwrap();
    let storage = Recording::default();
    let db = Db::open(
        dir.path(),
        Options::default()
            .storage(Arc::new(storage.clone()))
            .durability(Durability::Periodic(INTERVAL)),
    )
    .unwrap();
    storage.events.lock().unwrap().clear();
    let started = Instant::now();
    let mut i = 0u32;
    while started.elapsed() < Duration::from_millis(1500) {
        db.set(format!("k{i}"), "v", None).unwrap();
        i += 1;
        // Pace the load (this is the workload's shape, not synchronisation): a write about
        // every 37 ms, so writes fall at every phase of the interval.
        let next = started + Duration::from_millis(37) * i;
        while Instant::now() < next {
            std::thread::yield_now();
        }
    }
    let ended = Instant::now();
    let events = storage.events.lock().unwrap().clone();
    db.close().unwrap();
    // Walk the events: from the first write after a sync, the next sync must start within
    // the interval of the end of the previous sync (or of the first write, if the store was
    // idle longer). An fdatasync's own duration (tens of ms on a busy disk) is not counted.
    let mut last_sync: Option<Instant> = None;
    let mut pending_since: Option<Instant> = None;
    let mut worst = Duration::ZERO;
    for (started, ended, is_sync) in &events {
        if *is_sync {
            if let Some(first_write) = pending_since.take() {
                let from = last_sync.map_or(first_write, |s| s.max(first_write - INTERVAL));
                worst = worst.max(started.saturating_duration_since(from));
            }
            last_sync = Some(*ended);
        } else if pending_since.is_none() {
            pending_since = Some(*ended);
        }
    }
    if let Some(first_write) = pending_since {
        // Unsynced data at the end of the load (close syncs it) must not be overdue either.
        let from = last_sync.map_or(first_write, |s| s.max(first_write - INTERVAL));
        worst = worst.max(ended.saturating_duration_since(from).min(INTERVAL));
    }
    assert!(
        worst <= INTERVAL + SLACK,
        "an fdatasync started {worst:?} after the previous one ended, with data pending ({} \
         writes)",
        i
    );
}
