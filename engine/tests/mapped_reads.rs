//! Recovery reads the snapshot and the WAL segments through `Storage::read_mapped`, which
//! `FsStorage` answers with a memory map: the map must hold exactly the file's bytes, reopen
//! must go through it, and `Db::verify` (which runs without the lock) must not.

use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use keel_engine::storage::{DirLock, FileBytes, FsStorage, LockError, Storage, WritableFile};
use keel_engine::{Db, Options};

#[test]
fn fs_read_mapped_returns_the_same_bytes_as_read() {
    let dir = tempfile::tempdir().unwrap();
    // Empty (cannot be mapped: an owned empty buffer), under a page, and several pages with a
    // partial last one.
    for (name, len) in [("empty", 0usize), ("small", 100), ("pages", 3 * 4096 + 123)] {
        let path = dir.path().join(name);
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let mapped = FsStorage.read_mapped(&path).unwrap();
        assert_eq!(&mapped[..], &FsStorage.read(&path).unwrap()[..], "{name}");
        assert_eq!(&mapped[..], &bytes[..], "{name}");
        assert_eq!(mapped.is_mapped(), len > 0, "{name}");
    }
    let missing = FsStorage
        .read_mapped(&dir.path().join("missing"))
        .unwrap_err();
    assert_eq!(missing.kind(), io::ErrorKind::NotFound);
}

/// `FsStorage`, noting each whole-file read: its name and whether it came back mapped.
#[derive(Clone, Default)]
struct Noting {
    reads: Arc<Mutex<Vec<(String, bool)>>>,
}

impl Noting {
    fn note(&self, path: &Path, mapped: bool) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        self.reads.lock().unwrap().push((name, mapped));
    }

    fn take(&self) -> Vec<(String, bool)> {
        std::mem::take(&mut *self.reads.lock().unwrap())
    }
}

impl Storage for Noting {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        FsStorage.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        FsStorage.list(dir)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.note(path, false);
        FsStorage.read(path)
    }
    fn read_mapped(&self, path: &Path) -> io::Result<FileBytes> {
        let bytes = FsStorage.read_mapped(path)?;
        self.note(path, bytes.is_mapped());
        Ok(bytes)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        FsStorage.create(path)
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        FsStorage.open_append(path)
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

fn mapped_names(reads: &[(String, bool)], prefix: &str) -> usize {
    reads
        .iter()
        .filter(|(name, mapped)| *mapped && name.starts_with(prefix))
        .count()
}

#[test]
fn reopen_reads_the_snapshot_and_the_wal_through_a_map_and_verify_copies() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Noting::default();
    let options = Options::default().storage(Arc::new(storage.clone()));
    let db = Db::open(dir.path(), options.clone()).unwrap();
    for i in 0..1000u32 {
        db.set(format!("key{i:04}"), format!("value{i}"), None)
            .unwrap();
    }
    db.compact().unwrap().unwrap();
    for i in 0..100u32 {
        db.set(format!("key{i:04}"), format!("after{i}"), None)
            .unwrap();
    }
    db.delete("key0999").unwrap();
    db.close().unwrap();

    storage.take();
    let db = Db::open(dir.path(), options.clone()).unwrap();
    let reads = storage.take();
    assert_eq!(mapped_names(&reads, "snapshot-"), 1, "{reads:?}");
    assert!(mapped_names(&reads, "wal-") >= 1, "{reads:?}");
    assert_eq!(db.get("key0000").as_deref(), Some(&b"after0"[..]));
    assert_eq!(db.get("key0500").as_deref(), Some(&b"value500"[..]));
    assert_eq!(db.get("key0999"), None);
    assert_eq!(db.stats().keys, 999);
    db.close().unwrap();

    // A torn tail: recovery truncates the segment it scanned through a map (the map is gone
    // by then) and the store keeps working.
    let last = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("wal-"))
        .max()
        .unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap()
        .write_all(&[0xAB; 37])
        .unwrap();
    let db = Db::open(dir.path(), options).unwrap();
    let reads = storage.take();
    assert!(mapped_names(&reads, "wal-") >= 1, "{reads:?}");
    assert_eq!(db.stats().recovery.unwrap().bytes_truncated, 37);
    assert_eq!(std::fs::metadata(&last).unwrap().len(), len);
    db.set("key1000", "new", None).unwrap();
    db.close().unwrap();

    // Verify runs without the lock: it copies every file and never maps one.
    let report = Db::verify(dir.path(), &storage).unwrap();
    assert_eq!(report.wal.torn_tail, None);
    let reads = storage.take();
    assert!(reads.iter().all(|(_, mapped)| !mapped), "{reads:?}");
    assert!(
        reads.iter().any(|(name, _)| name.starts_with("wal-")),
        "{reads:?}"
    );
    assert!(
        reads.iter().any(|(name, _)| name.starts_with("snapshot-")),
        "{reads:?}"
    );
}
