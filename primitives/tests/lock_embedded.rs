//! Fencing tokens on the embedded engine survive the store being closed and reopened, and a
//! simulated crash of a store running with relaxed durability (`Durability::Periodic`): the
//! token comes from `incr_durable`, which is on disk before it is handed out.
//!
//! The crash is simulated through the engine's storage seam: a wrapper around the real file
//! system records how much of each file has been fsynced, and the "disk after a crash" is a
//! copy of the store directory with every file cut back to its fsynced length. In-process this
//! is as close to pulling the plug as we can get (the engine's own `kill -9` test covers real
//! process death); a clean drop alone would prove nothing, since closing syncs everything.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_engine::storage::{DirLock, FsStorage, LockError, Storage, WritableFile};
use keel_engine::{Db, Durability, LOCK_FILE, Options};
use keel_primitives::lock::Lock;
use keel_primitives::{Backend, Embedded};

const TTL: Duration = Duration::from_secs(60);

async fn take_tokens(backend: Arc<dyn Backend>, n: usize) -> Vec<u64> {
    let lock = Lock::new(backend);
    let mut tokens = Vec::new();
    for _ in 0..n {
        let lease = lock
            .try_acquire("job", TTL)
            .await
            .unwrap()
            .expect("the lock is free");
        tokens.push(lease.fencing_token());
        assert!(lease.release().await.unwrap());
    }
    tokens
}

#[tokio::test]
async fn fencing_tokens_keep_increasing_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = Embedded::open(dir.path()).unwrap();
        take_tokens(Arc::new(store), 3).await
    };
    assert_eq!(before, vec![1, 2, 3]);
    let store = Embedded::open(dir.path()).unwrap();
    let after = take_tokens(Arc::new(store), 3).await;
    assert_eq!(
        after,
        vec![4, 5, 6],
        "a token was handed out twice after reopening"
    );
}

/// A file system that remembers how much of each file written through it is fsynced.
#[derive(Clone, Default)]
struct CrashableDisk {
    synced: Arc<Mutex<HashMap<PathBuf, u64>>>,
}

struct TrackedFile {
    inner: Box<dyn WritableFile>,
    path: PathBuf,
    len: u64,
    disk: CrashableDisk,
}

impl WritableFile for TrackedFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.inner.sync_data()?;
        self.disk
            .synced
            .lock()
            .unwrap()
            .insert(self.path.clone(), self.len);
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)?;
        self.len = len;
        let mut synced = self.disk.synced.lock().unwrap();
        if let Some(s) = synced.get_mut(&self.path) {
            *s = (*s).min(len);
        }
        Ok(())
    }
}

impl CrashableDisk {
    fn track(
        &self,
        path: &Path,
        inner: Box<dyn WritableFile>,
        len: u64,
        synced: u64,
    ) -> Box<dyn WritableFile> {
        self.synced
            .lock()
            .unwrap()
            .insert(path.to_path_buf(), synced);
        Box::new(TrackedFile {
            inner,
            path: path.to_path_buf(),
            len,
            disk: self.clone(),
        })
    }

    /// What the disk would hold after a power cut now: `live` copied into `image`, every file
    /// written through this disk cut back to its fsynced length.
    fn image_after_crash(&self, live: &Path, image: &Path) {
        std::fs::create_dir_all(image).unwrap();
        let synced = self.synced.lock().unwrap().clone();
        for name in FsStorage.list(live).unwrap() {
            if name == LOCK_FILE {
                continue;
            }
            let path = live.join(&name);
            let mut bytes = std::fs::read(&path).unwrap();
            if let Some(&len) = synced.get(&path) {
                bytes.truncate(usize::try_from(len).unwrap());
            }
            std::fs::write(image.join(&name), bytes).unwrap();
        }
    }
}

impl Storage for CrashableDisk {
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
        let file = FsStorage.create(path)?;
        Ok(self.track(path, file, 0, 0))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        // What was there before this store opened it counts as durable.
        let len = FsStorage.len(path)?;
        let file = FsStorage.open_append(path)?;
        Ok(self.track(path, file, len, len))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        FsStorage.rename(from, to)?;
        let mut synced = self.synced.lock().unwrap();
        if let Some(len) = synced.remove(from) {
            synced.insert(to.to_path_buf(), len);
        }
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.synced.lock().unwrap().remove(path);
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

#[tokio::test]
async fn incr_durable_keeps_fencing_tokens_through_a_crash_under_periodic_durability() {
    let live = tempfile::tempdir().unwrap();
    let disk = CrashableDisk::default();
    // Background fsync at most once an hour: nothing but explicit durability reaches the disk
    // during this test.
    let options = Options::default()
        .durability(Durability::Periodic(Duration::from_secs(3600)))
        .storage(Arc::new(disk.clone()));
    let store = Embedded::new(Db::open(live.path(), options).unwrap());
    let backend: Arc<dyn Backend> = Arc::new(store.clone());
    let tokens = take_tokens(Arc::clone(&backend), 3).await;
    assert_eq!(tokens, vec![1, 2, 3]);
    // An ordinary write after the last token: acknowledged, but only in the OS's hands.
    backend.set(b"unsynced", b"v", None).await.unwrap();

    let crashed = tempfile::tempdir().unwrap();
    disk.image_after_crash(live.path(), crashed.path());
    drop(backend);
    drop(store);

    let recovered: Arc<dyn Backend> = Arc::new(Embedded::open(crashed.path()).unwrap());
    assert_eq!(
        recovered.get(b"unsynced").await.unwrap(),
        None,
        "the simulated crash must lose unsynced writes, or this test proves nothing"
    );
    assert_eq!(
        recovered
            .get(&keel_primitives::lock::fence_counter_key(b"job"))
            .await
            .unwrap(),
        Some(b"3".to_vec()),
        "every token handed out is on disk"
    );
    // The last holder's release was an ordinary write and did not survive, but its
    // acquisition was synced along with its token: the lock is held again after the crash,
    // until its TTL runs out (the delete stands in for that).
    assert!(recovered.get(b"lock:{job}").await.unwrap().is_some());
    assert!(recovered.delete(b"lock:{job}").await.unwrap());
    let after = take_tokens(recovered, 2).await;
    assert_eq!(
        after,
        vec![4, 5],
        "a token was handed out twice after the crash"
    );
}
