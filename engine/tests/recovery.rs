//! Recovery: a torn last record is truncated and counted, damage followed by valid records is
//! a typed `Corruption` naming the file and offset (and nothing is modified), and an I/O
//! failure poisons the store without losing acknowledged writes.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keel_engine::record::{self, Entry, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use keel_engine::storage::{DirLock, FsStorage, LockError, Storage, WritableFile};
use keel_engine::{Db, Durability, Error, Options};

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
    // A clean close vouches for every record: a cut record is then damage, not a torn write.
    std::fs::write(&seg, &full[..full.len() - 1]).unwrap();
    assert!(matches!(
        Db::open(dir.path(), Options::default()),
        Err(Error::Corruption { .. })
    ));
    std::fs::write(&seg, &full).unwrap();
    assert!(Db::open(dir.path(), Options::default()).is_ok());
    // A crash leaves no clean-close marker.
    std::fs::remove_file(dir.path().join("CLOSED")).unwrap();
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

/// The frames of segment `bytes` after its header: (offset, LSN; 0 for a commit marker).
fn frames(bytes: &[u8]) -> Vec<(usize, u64)> {
    let mut out = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES;
    while offset < bytes.len() {
        let (frame, used) = record::decode_frame(&bytes[offset..]).expect("a whole frame");
        out.push((offset, frame.lsn));
        offset += used;
    }
    out
}

/// The offset of the record with `lsn` in `bytes`.
fn record_offset(bytes: &[u8], lsn: u64) -> usize {
    frames(bytes)
        .into_iter()
        .find(|(_, l)| *l == lsn)
        .map(|(offset, _)| offset)
        .expect("the record is in the segment")
}

/// Writes `a` durably (LSN 1), then `b`, `c`, `d` (LSNs 2-4) through a `Periodic` handle with
/// an interval longer than the test, each acknowledged once written, so each is a batch of its
/// own written after `a`'s fdatasync and before any other: their commit markers say only LSN 1
/// was durable. Closes the store (which fdatasyncs everything).
fn write_synced_then_unsynced(dir: &Path) {
    let db = Db::open(dir, Options::default()).unwrap();
    db.set("a", "1", None).unwrap();
    let written = db.with_durability(Durability::Periodic(Duration::from_secs(3600)));
    for key in ["b", "c", "d"] {
        written.set(key, "1", None).unwrap();
    }
    drop(written);
    db.close().unwrap();
}

/// A power loss during an unsynced write can keep a later page and lose an earlier one (page
/// write-back order): the damaged record was never durable (no marker after it says so), so
/// this is a torn tail, not corruption. Before commit markers, the valid record after the hole
/// made the open fail with `Corruption` although nothing acknowledged as durable was lost.
#[test]
fn a_hole_in_an_unsynced_batch_is_a_torn_tail_and_the_records_after_it_are_discarded() {
    let dir = tempfile::tempdir().unwrap();
    write_synced_then_unsynced(dir.path());
    // As after a crash: no clean-close marker vouches for the log.
    std::fs::remove_file(dir.path().join("CLOSED")).unwrap();
    let seg = segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let victim = record_offset(&bytes, 3);
    bytes[victim + FRAME_HEADER_BYTES + 5] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();

    // Valid data ends before the damaged record, or before its batch's marker if the batch
    // starts with it (the writer may have batched b, c and d together, or not).
    let layout = frames(&std::fs::read(&seg).unwrap()[..victim]);
    let valid_len = match layout.last() {
        Some((marker, 0)) => *marker,
        _ => victim,
    };
    let report = Db::verify(dir.path(), &FsStorage).expect("verify sees a torn tail");
    let torn = report.wal.torn_tail.expect("a torn tail");
    assert_eq!(torn.valid_len, valid_len as u64);
    assert_eq!(
        torn.records_discarded, 1,
        "record 4 is discarded with the hole"
    );

    let db = Db::open(dir.path(), Options::default()).unwrap();
    let r = db.stats().recovery.unwrap();
    assert_eq!((r.records, r.last_lsn, r.records_discarded), (2, 2, 1));
    assert_eq!(r.bytes_truncated, (bytes.len() - valid_len) as u64);
    assert_eq!(db.get("a"), Some(b"1".to_vec()));
    assert_eq!(db.get("b"), Some(b"1".to_vec()));
    assert_eq!(db.get("c"), None);
    assert_eq!(db.get("d"), None, "nothing after the hole is replayed");
    db.set("e", "after", None).unwrap();
    db.close().unwrap();
    let db = Db::open(dir.path(), Options::default()).unwrap();
    assert_eq!(db.get("e"), Some(b"after".to_vec()));
    assert_eq!(db.get("d"), None);
    assert_eq!(db.stats().recovery.unwrap().bytes_truncated, 0);
}

/// The same damage is corruption when the log shows the record was durable: a later batch's
/// commit marker says so (each `Immediate` write below is fdatasynced before the next batch is
/// written), or the clean-close marker does.
#[test]
fn damage_to_a_record_a_later_marker_or_a_clean_close_vouches_for_is_corruption() {
    // A later marker.
    let dir = tempfile::tempdir().unwrap();
    write_keys(dir.path(), 4);
    std::fs::remove_file(dir.path().join("CLOSED")).unwrap();
    let seg = segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let victim = record_offset(&bytes, 2);
    bytes[victim + FRAME_HEADER_BYTES + 5] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    match Db::open(dir.path(), Options::default()) {
        Err(Error::Corruption {
            file,
            offset,
            reason,
        }) => {
            assert_eq!((file, offset), (seg.clone(), victim as u64));
            assert!(reason.contains("commit marker"), "{reason}");
        }
        other => panic!("expected Corruption, got {other:?}"),
    }
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing was modified");

    // The clean-close marker: the unsynced-then-closed layout, marker kept.
    let dir = tempfile::tempdir().unwrap();
    write_synced_then_unsynced(dir.path());
    let seg = segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let victim = record_offset(&bytes, 3);
    bytes[victim + FRAME_HEADER_BYTES + 5] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    match Db::open(dir.path(), Options::default()) {
        Err(Error::Corruption { offset, reason, .. }) => {
            assert_eq!(offset, victim as u64);
            assert!(reason.contains("clean close"), "{reason}");
        }
        other => panic!("expected Corruption, got {other:?}"),
    }
    assert!(matches!(
        Db::verify(dir.path(), &FsStorage),
        Err(Error::Corruption { .. })
    ));
}

/// Every batch the writer writes starts with a commit marker naming its first record and
/// claiming only what an earlier fdatasync made durable.
#[test]
fn every_batch_starts_with_a_commit_marker_claiming_only_synced_records() {
    let dir = tempfile::tempdir().unwrap();
    write_synced_then_unsynced(dir.path());
    let bytes = std::fs::read(segment(dir.path())).unwrap();
    let mut last_record = 0;
    let mut expect_record_after_marker = None;
    for (offset, lsn) in frames(&bytes) {
        if lsn == 0 {
            let (frame, _) = record::decode_frame(&bytes[offset..]).unwrap();
            let marker = record::commit_marker(&frame).unwrap().expect("a marker");
            assert_eq!(marker.first_lsn, last_record + 1);
            assert!(marker.durable_lsn <= last_record);
            // `a` (LSN 1) was fdatasynced before `b`'s batch; b, c, d were not until close.
            if marker.first_lsn > 1 {
                assert_eq!(marker.durable_lsn, 1, "{marker:?}");
            }
            expect_record_after_marker = Some(marker.first_lsn);
        } else {
            if let Some(first) = expect_record_after_marker.take() {
                assert_eq!(lsn, first);
            }
            assert_eq!(lsn, last_record + 1);
            last_record = lsn;
        }
    }
    assert_eq!(last_record, 4);
}

/// A store written by the previous format (1: no commit markers) opens, keeps taking writes in
/// its last segment in that format, and the next segment is written in the current format.
#[test]
fn a_format_1_log_opens_and_the_next_segment_is_current() {
    let dir = tempfile::tempdir().unwrap();
    let mut seg = record::encode_segment_header_version(1, 1).to_vec();
    for lsn in 1..=3u64 {
        let key = format!("old{lsn}");
        record::encode_record(
            &mut seg,
            lsn,
            1_800_000_000_000,
            &[Entry::Put {
                key: key.as_bytes(),
                value: b"v1",
                expires_at_ms: None,
            }],
        );
    }
    std::fs::write(dir.path().join("wal-00000000000000000001.log"), &seg).unwrap();
    let options = Options::default().wal_segment_bytes(4096);
    let db = Db::open(dir.path(), options.clone()).unwrap();
    assert_eq!(db.get("old3"), Some(b"v1".to_vec()));
    db.set("new", "v2", None).unwrap();
    // Still format 1 in the old segment: the record follows without a marker.
    let old = std::fs::read(dir.path().join("wal-00000000000000000001.log")).unwrap();
    assert_eq!(
        frames(&old).into_iter().map(|(_, l)| l).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let value = vec![b'x'; 1000];
    for i in 0..10 {
        db.set(format!("fill{i}"), &value, None).unwrap();
    }
    db.close().unwrap();
    let newest = segment(dir.path());
    assert_ne!(newest, dir.path().join("wal-00000000000000000001.log"));
    let bytes = std::fs::read(&newest).unwrap();
    let header = record::decode_segment_header(&bytes).unwrap();
    assert_eq!(header.version, record::WAL_FORMAT_VERSION);
    assert_eq!(
        frames(&bytes)[0].1,
        0,
        "the new segment starts with a marker"
    );
    let db = Db::open(dir.path(), options).unwrap();
    assert_eq!(db.get("old1"), Some(b"v1".to_vec()));
    assert_eq!(db.get("new"), Some(b"v2".to_vec()));
    assert_eq!(db.get("fill9"), Some(value));
}
