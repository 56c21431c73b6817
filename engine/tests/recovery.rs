//! Recovery: a torn last record is truncated and counted, damage followed by valid records is
//! a typed `Corruption` naming the file and offset (and nothing is modified), and an I/O
//! failure poisons the store without losing acknowledged writes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel_engine::record::FRAME_HEADER_BYTES;
use keel_engine::storage::{DirLock, FsStorage, LockError, Storage, WritableFile};
use keel_engine::{Db, Error, Options};

fn segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("wal-"))
        .collect();
    segs.sort();
    segs.pop().expect("a WAL segment")
}

/// Writes `n` keys `k0..k{n-1}` (value = index) and returns the offsets of each record.
fn write_keys(dir: &Path, n: u32) -> Vec<u64> {
    let db = Db::open(dir, Options::default()).unwrap();
    let mut offsets = Vec::new();
    for i in 0..n {
        offsets.push(db.stats().wal_bytes);
        db.set(format!("k{i}"), i.to_string(), None).unwrap();
    }
    db.close().unwrap();
    offsets
}

#[test]
fn every_torn_prefix_of_the_last_record_is_truncated_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = write_keys(dir.path(), 20);
    let seg = segment(dir.path());
    let full = std::fs::read(&seg).unwrap();
    let last = offsets[19] as usize;
    for cut in last + 1..full.len() {
        std::fs::write(&seg, &full[..cut]).unwrap();
        let db = Db::open(dir.path(), Options::default()).unwrap();
        let r = db.stats().recovery.unwrap();
        assert_eq!(r.bytes_truncated, (cut - last) as u64, "cut at {cut}");
        assert_eq!(r.records, 19);
        assert_eq!(db.get("k18"), Some(b"18".to_vec()));
        assert_eq!(db.get("k19"), None, "a torn record is not half-visible");
        drop(db);
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len(),
            last as u64,
            "tail cut back"
        );
    }
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail_and_writes_continue() {
    let dir = tempfile::tempdir().unwrap();
    write_keys(dir.path(), 50);
    let seg = segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0xAB; 300]);
    std::fs::write(&seg, &bytes).unwrap();
    let db = Db::open(dir.path(), Options::default()).unwrap();
    assert_eq!(db.stats().recovery.unwrap().bytes_truncated, 300);
    assert_eq!(db.stats().keys, 50);
    db.set("after", "recovery", None).unwrap();
    db.close().unwrap();
    let db = Db::open(dir.path(), Options::default()).unwrap();
    let r = db.stats().recovery.unwrap();
    assert_eq!((r.records, r.bytes_truncated), (51, 0));
    assert_eq!(db.get("after"), Some(b"recovery".to_vec()));
}

#[test]
fn damage_followed_by_valid_records_is_corruption_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = write_keys(dir.path(), 100);
    let seg = segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let victim = offsets[10] as usize;
    bytes[victim + FRAME_HEADER_BYTES + 3] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    match Db::open(dir.path(), Options::default()) {
        Err(Error::Corruption { file, offset, .. }) => {
            assert_eq!(file, seg);
            assert_eq!(offset, victim as u64);
        }
        other => panic!("expected Corruption, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bytes,
        "a corrupt store is not modified"
    );
    match Db::verify(dir.path(), &FsStorage) {
        Err(Error::Corruption { offset, .. }) => assert_eq!(offset, victim as u64),
        other => panic!("verify should report corruption, got {other:?}"),
    }
}

#[test]
fn a_segment_whose_header_was_torn_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    write_keys(dir.path(), 5);
    let torn = dir.path().join("wal-00000000000000000006.log");
    std::fs::write(&torn, b"KEELW").unwrap();
    let db = Db::open(dir.path(), Options::default()).unwrap();
    assert_eq!(db.stats().keys, 5);
    assert_eq!(db.stats().recovery.unwrap().bytes_truncated, 5);
    assert!(!torn.exists());
    db.set("k5", "5", None).unwrap();
    db.close().unwrap();
    assert_eq!(
        Db::open(dir.path(), Options::default()).unwrap().get("k5"),
        Some(b"5".to_vec())
    );
}

#[test]
fn a_bad_segment_header_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    write_keys(dir.path(), 5);
    let seg = segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[2] = b'X';
    std::fs::write(&seg, &bytes).unwrap();
    assert!(matches!(
        Db::open(dir.path(), Options::default()),
        Err(Error::Corruption { offset: 0, .. })
    ));
}

/// A real file system that fails the Nth `sync_data` (and every one after it).
#[derive(Clone)]
struct FailingSync {
    syncs: Arc<AtomicUsize>,
    fail_from: usize,
}

struct FailingFile {
    inner: Box<dyn WritableFile>,
    owner: FailingSync,
}

impl WritableFile for FailingFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        let n = self.owner.syncs.fetch_add(1, Ordering::SeqCst);
        if n >= self.owner.fail_from {
            return Err(io::Error::other("injected fdatasync failure"));
        }
        self.inner.sync_data()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}

impl Storage for FailingSync {
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
        Ok(Box::new(FailingFile {
            inner: FsStorage.create(path)?,
            owner: self.clone(),
        }))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        Ok(Box::new(FailingFile {
            inner: FsStorage.open_append(path)?,
            owner: self.clone(),
        }))
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

#[test]
fn a_failed_fsync_poisons_writes_keeps_reads_and_reopen_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FailingSync {
        syncs: Arc::new(AtomicUsize::new(0)),
        fail_from: 11,
    };
    // The first sync creates the initial segment; ten acknowledged writes follow.
    let db = Db::open(dir.path(), Options::default().storage(Arc::new(storage))).unwrap();
    for i in 0..10 {
        db.set(format!("ok{i}"), "v", None).unwrap();
    }
    let err = db.set("doomed", "v", None).unwrap_err();
    assert!(matches!(err, Error::Poisoned(_)), "{err:?}");
    assert!(
        err.to_string().contains("reopen"),
        "the error says what to do: {err}"
    );
    assert!(
        matches!(db.set("later", "v", None), Err(Error::Poisoned(_))),
        "every later write refused"
    );
    assert!(matches!(db.incr("n", 1, None), Err(Error::Poisoned(_))));
    assert_eq!(db.get("ok9"), Some(b"v".to_vec()), "reads keep working");
    assert!(db.stats().poisoned);
    assert!(matches!(db.close(), Err(Error::Poisoned(_))));
    let db = Db::open(dir.path(), Options::default()).unwrap();
    for i in 0..10 {
        assert_eq!(
            db.get(format!("ok{i}")),
            Some(b"v".to_vec()),
            "acknowledged write ok{i} lost"
        );
    }
    assert_eq!(db.get("later"), None);
    db.set("fresh", "v", None).unwrap();
}
