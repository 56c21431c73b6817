//! The storage seam. Every byte the engine reads from or writes to disk goes through
//! [`Storage`], so tests can substitute a simulated disk that loses unsynced writes, tears the
//! last write or fails the Nth operation. [`FsStorage`] is the real, thin implementation.
//!
//! Contract an implementation must honour (the engine's crash safety rests on it):
//! - `WritableFile::sync_data` returns only when every byte written to that file before the
//!   call, and the file's length, survive power loss.
//! - A file created or renamed is durable in its directory only after `sync_dir` on that
//!   directory returns.
//! - `rename` replaces the destination atomically: after a crash, the destination holds the
//!   old or the new file, never a mix.
//! - An error from `write_all` or `sync_data` means the state of the file on disk is unknown.
//!
//! Recovery reads whole WAL segments and the snapshot through [`Storage::read_mapped`], which
//! [`FsStorage`] answers with a memory map (no copy into a fresh buffer); every other
//! implementation reads into memory unless it overrides the method.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A file open for appending.
pub trait WritableFile: Send {
    /// Appends all of `buf`.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable (fdatasync).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Cuts the file to `len` bytes and positions further writes at `len`.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
}

/// An exclusive lock on a store directory, released when dropped.
pub trait DirLock: Send + Sync {}

/// Why a directory lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another holder has it; `pid` is the process id it recorded, if readable.
    Held {
        /// Process id found in the lock file.
        pid: Option<u32>,
    },
    /// The lock file could not be opened.
    Io(io::Error),
}

/// File operations the engine needs. See the module docs for the durability contract.
pub trait Storage: Send + Sync + 'static {
    /// Creates `dir` and its parents if missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the regular files directly inside `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// The whole content of `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The whole content of `path`, possibly as a read-only memory map of the file rather
    /// than a copy. The default reads it with [`Storage::read`].
    ///
    /// The engine calls this only while it holds the store's `LOCK` and only for files nothing
    /// writes to or truncates while the returned bytes live: the newest snapshot (never
    /// changed once installed) and WAL segments during recovery, before recovery truncates or
    /// rewrites anything and before anything is appended. A file truncated under a live map
    /// makes reading the lost pages raise SIGBUS, so whatever reads without the lock (such as
    /// `Db::verify`, which may run beside another process writing the store) uses
    /// [`Storage::read`].
    ///
    /// # Errors
    /// As [`Storage::read`], plus a failed mapping.
    fn read_mapped(&self, path: &Path) -> io::Result<FileBytes> {
        self.read(path).map(FileBytes::from)
    }
    /// Creates `path` (failing if it exists) and opens it for appending.
    fn create(&self, path: &Path) -> io::Result<Box<dyn WritableFile>>;
    /// Opens an existing `path` for appending at its end.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file at `path`.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The length of the file at `path`, in bytes.
    fn len(&self, path: &Path) -> io::Result<u64>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `path`, recording this process's id in it.
    fn lock(&self, path: &Path) -> Result<Box<dyn DirLock>, LockError>;
}

/// The whole content of a file, returned by [`Storage::read_mapped`]: bytes read into memory
/// or a read-only memory map of the file. Dereferences to the bytes.
pub struct FileBytes(Repr);

enum Repr {
    Owned(Vec<u8>),
    Map(memmap2::Mmap),
}

impl FileBytes {
    /// True if the bytes are a memory map of the file rather than a copy.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Map(_))
    }
}

impl From<Vec<u8>> for FileBytes {
    fn from(bytes: Vec<u8>) -> Self {
        FileBytes(Repr::Owned(bytes))
    }
}

impl Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Owned(bytes) => bytes,
            Repr::Map(map) => map,
        }
    }
}

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBytes")
            .field("len", &self.len())
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

/// How a whole file is read: recovery, holding the lock, maps; `Db::verify`, without it, copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// [`Storage::read_mapped`]: only with the store's lock held (see its contract).
    Mapped,
    /// [`Storage::read`].
    Copied,
}

/// Reads the whole of `path` the way `mode` says.
pub(crate) fn read_whole(
    storage: &dyn Storage,
    path: &Path,
    mode: ReadMode,
) -> io::Result<FileBytes> {
    match mode {
        ReadMode::Mapped => storage.read_mapped(path),
        ReadMode::Copied => storage.read(path).map(FileBytes::from),
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

struct FsFile {
    file: File,
}

impl WritableFile for FsFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        // fdatasync: data plus the metadata needed to read it back (the length).
        self.file.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.file.seek(SeekFrom::Start(len))?;
        Ok(())
    }
}

struct FsLock {
    // Holding the open file keeps the flock; closing it releases it.
    _file: File,
}

impl DirLock for FsLock {}

impl Storage for FsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file()
                && let Some(name) = entry.file_name().to_str()
            {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    #[allow(unsafe_code)]
    fn read_mapped(&self, path: &Path) -> io::Result<FileBytes> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            // A zero-length file cannot be mapped.
            return Ok(FileBytes::from(Vec::new()));
        }
        // Populated: the whole file is read anyway, and faulting its pages in at the map
        // (MAP_POPULATE on Linux, ignored elsewhere) costs less than a fault per few pages
        // during the scan. `madvise(MADV_SEQUENTIAL)` measured no gain (DESIGN.md, "Recovery
        // algorithm").
        // SAFETY: a map is sound while no one modifies or truncates the file under it. The
        // engine maps only while it holds the store's `LOCK` flock, so no other keel process
        // writes to the store (`flock` is honoured by every process that opens it: DESIGN.md,
        // "Assumptions about the disk"). What it maps is the newest snapshot, which never
        // changes once installed (a new snapshot is a new file; an old one is only removed,
        // and removing a mapped file keeps its pages), and WAL segments during recovery, whose
        // maps `wal::scan` drops before recovery truncates a torn tail or rewrites the last
        // segment, and before the writer appends. `Db::verify`, which runs without the lock,
        // never comes here (see the trait method's contract).
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }?;
        Ok(FileBytes(Repr::Map(map)))
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(FsFile { file }))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let mut file = OpenOptions::new().write(true).open(path)?;
        file.seek(SeekFrom::End(0))?;
        Ok(Box::new(FsFile { file }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn lock(&self, path: &Path) -> Result<Box<dyn DirLock>, LockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(LockError::Io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held { pid });
            }
            Err(TryLockError::Error(e)) => return Err(LockError::Io(e)),
        }
        // Record who holds the lock so a refused opener can name the process.
        file.set_len(0).map_err(LockError::Io)?;
        file.seek(SeekFrom::Start(0)).map_err(LockError::Io)?;
        writeln!(file, "{}", std::process::id()).map_err(LockError::Io)?;
        Ok(Box::new(FsLock { _file: file }))
    }
}

/// Joins a directory and a file name.
pub(crate) fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
