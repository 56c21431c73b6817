//! A simulated disk for crash and fault tests: an in-memory [`Storage`] that keeps, for every
//! file and directory, a *live* image (what reads see) and a *durable* image (what survives a
//! power loss). File contents become durable on `sync_data`; directory entries (create,
//! rename, remove) become durable on `sync_dir` of their directory. [`SimDisk::power_loss`]
//! builds the disk a machine would find after losing power: for each file the unsynced bytes
//! are dropped, kept, cut to a prefix or cut and followed by garbage (a torn write), chosen by
//! a seeded generator, and directory operations never followed by `sync_dir` are forgotten
//! ([`DirLoss::ForgetUnsynced`]) or, in the stricter mode, a prefix of them survives
//! ([`DirLoss::KeepPrefix`]). A failed `sync_data` either leaves its bytes dirty or loses them
//! for good ([`FsyncFailure`]). Directories themselves are always durable.
//!
//! Two ways to make the engine fail, both deterministic:
//! - a *crash point*: every mutating call (`create`, `write_all`, `sync_data`, `truncate`,
//!   `rename`, `remove`, `sync_dir`) is numbered; with [`SimDisk::crash_at`] set to `k`, call
//!   `k` and every storage call after it fail, as if the machine had stopped there. A
//!   `write_all` that is the crash point leaves a random prefix of its bytes in the live image.
//! - a *fault*: [`SimDisk::inject`] makes the Nth call of one kind fail (once, or from then on),
//!   the way SQLite's I/O error tests do.
//!
//! Shared by several test binaries (and the fuzz targets), each of which uses a subset.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use keel_engine::storage::{DirLock, LockError, Storage, WritableFile};

/// A small deterministic generator (SplitMix64): the same seed gives the same run, on every
/// platform and whatever crate versions are locked.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x6b65_656c_5f73_696d)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0) has no value");
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// The kinds of storage call, for crash points, fault injection and traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    /// `Storage::create_dir_all`.
    CreateDir,
    /// `Storage::list`.
    List,
    /// `Storage::read`.
    Read,
    /// `Storage::create`.
    Create,
    /// `Storage::open_append`.
    OpenAppend,
    /// `Storage::rename`.
    Rename,
    /// `Storage::remove`.
    Remove,
    /// `Storage::len`.
    Len,
    /// `Storage::sync_dir`.
    SyncDir,
    /// `Storage::lock`.
    Lock,
    /// `WritableFile::write_all`.
    Write,
    /// `WritableFile::sync_data`.
    SyncData,
    /// `WritableFile::truncate`.
    Truncate,
}

impl OpKind {
    /// Every kind, for sweeps.
    pub const ALL: [OpKind; 13] = [
        OpKind::CreateDir,
        OpKind::List,
        OpKind::Read,
        OpKind::Create,
        OpKind::OpenAppend,
        OpKind::Rename,
        OpKind::Remove,
        OpKind::Len,
        OpKind::SyncDir,
        OpKind::Lock,
        OpKind::Write,
        OpKind::SyncData,
        OpKind::Truncate,
    ];

    /// True for the calls that change the disk: each is a crash point (the crash happens just
    /// before it, so "before call k+1" is also "after call k").
    pub fn is_crash_point(self) -> bool {
        matches!(
            self,
            OpKind::Create
                | OpKind::Write
                | OpKind::SyncData
                | OpKind::Truncate
                | OpKind::Rename
                | OpKind::Remove
                | OpKind::SyncDir
        )
    }
}

/// One mutating call, as recorded in the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What the call was.
    pub kind: OpKind,
    /// The file (or directory) it was about; for a rename, the source.
    pub path: PathBuf,
    /// Bytes written, for `write_all`; the new length, for `truncate`.
    pub len: u64,
}

impl Event {
    /// The event's file name (or directory name).
    pub fn name(&self) -> &str {
        self.path.file_name().and_then(|n| n.to_str()).unwrap_or("")
    }
}

/// A planned failure: call number `nth` (0-based) of `kind` fails; with `persistent`, so does
/// every later call of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Which calls.
    pub kind: OpKind,
    /// The first failing call of that kind, counting from 0.
    pub nth: u64,
    /// Whether every later call of the kind fails too.
    pub persistent: bool,
}

/// What happens to directory operations that no `sync_dir` made durable when power is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirLoss {
    /// They are all forgotten: a created file disappears, a rename reverts, a removed file
    /// comes back. What the storage contract promises at least.
    ForgetUnsynced,
    /// A random prefix of them (in the order they happened) survives, as on a file system
    /// whose journal commits metadata on its own schedule. The contract allows this too: an
    /// entry is guaranteed durable *after* `sync_dir`, not forgotten without it.
    KeepPrefix,
}

/// What a power loss did to one file, for failure messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFate {
    /// The file name.
    pub name: String,
    /// Durable bytes before the loss.
    pub durable: u64,
    /// Live bytes before the loss.
    pub live: u64,
    /// Bytes after the loss.
    pub after: u64,
    /// How the unsynced part was treated.
    pub how: &'static str,
}

#[derive(Debug, Clone, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Byte ranges whose write-back failed under `FsyncFailure::LosesPages`: reads still see
    /// the new bytes, but no later `sync_data` writes them (they are marked clean).
    lost: Vec<(usize, usize)>,
}

impl Inode {
    fn from_content(content: Vec<u8>) -> Self {
        Inode {
            live: content.clone(),
            durable: content,
            lost: Vec::new(),
        }
    }
}

/// What a failed `sync_data` does to the bytes it was writing back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncFailure {
    /// They stay dirty: a later successful `sync_data` writes them.
    #[default]
    KeepsPages,
    /// They are marked clean but never reach the disk, as Linux does after a write-back
    /// error: reads (in this boot) still see them, no later `sync_data` writes them.
    LosesPages,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link(String, u64),
    Unlink(String),
    /// A rename within one directory: atomic, as the contract requires.
    Move(String, String, u64),
}

#[derive(Debug, Clone, Default)]
struct Dir {
    live: BTreeMap<String, u64>,
    durable: BTreeMap<String, u64>,
    /// Operations on `live` since the last `sync_dir`, oldest first.
    pending: Vec<DirOp>,
}

impl Dir {
    fn apply(map: &mut BTreeMap<String, u64>, op: &DirOp) {
        match op {
            DirOp::Link(name, ino) => {
                map.insert(name.clone(), *ino);
            }
            DirOp::Unlink(name) => {
                map.remove(name);
            }
            DirOp::Move(from, to, ino) => {
                map.remove(from);
                map.insert(to.clone(), *ino);
            }
        }
    }

    fn record(&mut self, op: DirOp) {
        Dir::apply(&mut self.live, &op);
        self.pending.push(op);
    }
}

#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    dirs: BTreeMap<PathBuf, Dir>,
    locks: HashSet<PathBuf>,
    /// Crash-point calls performed so far.
    crash_points: u64,
    crash_at: Option<u64>,
    crashed: bool,
    trace: Vec<Event>,
    calls: HashMap<OpKind, u64>,
    fault: Option<Fault>,
    injected: Vec<Event>,
    /// Decides how much of a write cut by a crash or a fault reaches the live image.
    rng: Option<Rng>,
    fsync_failure: FsyncFailure,
}

enum Gate {
    Proceed,
    /// This call is the crash point or an injected fault: it fails after, for a write,
    /// leaving part of its bytes behind.
    Fail(io::Error),
}

impl State {
    /// Decides the fate of a call before it touches anything.
    fn gate(&mut self, kind: OpKind, path: &Path, len: u64) -> Result<Gate, io::Error> {
        if self.crashed {
            return Err(io::Error::other("simulated crash: the machine is down"));
        }
        let event = Event {
            kind,
            path: path.to_path_buf(),
            len,
        };
        let n = self.calls.entry(kind).or_insert(0);
        let nth = *n;
        *n += 1;
        if let Some(f) = self.fault
            && f.kind == kind
            && (nth == f.nth || (f.persistent && nth > f.nth))
        {
            self.injected.push(event);
            return Ok(Gate::Fail(io::Error::other(format!(
                "injected {kind:?} failure (call {nth})"
            ))));
        }
        if kind.is_crash_point() {
            self.trace.push(event);
            if self.crash_at == Some(self.crash_points) {
                self.crashed = true;
                return Ok(Gate::Fail(io::Error::other(
                    "simulated crash: power lost during this call",
                )));
            }
            self.crash_points += 1;
        }
        Ok(Gate::Proceed)
    }

    fn dir_of(&mut self, path: &Path) -> io::Result<(&mut Dir, String)> {
        let parent = path.parent().unwrap_or(Path::new(""));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?
            .to_owned();
        let dir = self.dirs.get_mut(parent).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no directory {parent:?}"))
        })?;
        Ok((dir, name))
    }

    fn inode_of(&mut self, path: &Path) -> io::Result<u64> {
        let (dir, name) = self.dir_of(path)?;
        dir.live
            .get(&name)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no file {path:?}")))
    }

    fn partial_write(&mut self, ino: u64, buf: &[u8]) {
        let keep = match &mut self.rng {
            Some(rng) => rng.below(buf.len() as u64 + 1) as usize,
            None => buf.len() / 2,
        };
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.live.extend_from_slice(&buf[..keep]);
        }
    }
}

/// The simulated disk. Clones share the same disk.
#[derive(Clone, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock_state();
        f.debug_struct("SimDisk")
            .field("dirs", &st.dirs.keys().collect::<Vec<_>>())
            .field("crash_points", &st.crash_points)
            .field("crashed", &st.crashed)
            .finish_non_exhaustive()
    }
}

impl SimDisk {
    /// An empty disk holding the (durable) directory `dir`. Directories themselves are
    /// assumed durable: the store directory exists before the store is opened, as it does for
    /// a service whose data directory is provisioned.
    pub fn with_dir(dir: &Path) -> Self {
        let disk = SimDisk::default();
        disk.lock_state()
            .dirs
            .insert(dir.to_path_buf(), Dir::default());
        disk
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A failed assertion elsewhere must not hide behind a poisoned mutex.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Crash just before crash-point call `k` (0-based): it and every later call fail.
    pub fn crash_at(&self, k: u64) {
        self.lock_state().crash_at = Some(k);
    }

    /// Crash-point calls performed so far (the next crash point's number).
    pub fn crash_points(&self) -> u64 {
        self.lock_state().crash_points
    }

    /// Whether the crash point has been reached.
    pub fn crashed(&self) -> bool {
        self.lock_state().crashed
    }

    /// Every crash-point call attempted so far, in order (the crashing one included).
    pub fn trace(&self) -> Vec<Event> {
        self.lock_state().trace.clone()
    }

    /// Calls of `kind` so far (successful or not).
    pub fn calls(&self, kind: OpKind) -> u64 {
        self.lock_state().calls.get(&kind).copied().unwrap_or(0)
    }

    /// Plans a fault (replacing any earlier plan).
    pub fn inject(&self, fault: Fault) {
        self.lock_state().fault = Some(fault);
    }

    /// Removes the planned fault: the disk is healthy from now on.
    pub fn heal(&self) {
        self.lock_state().fault = None;
    }

    /// Every call that failed by injection, in order.
    pub fn injected(&self) -> Vec<Event> {
        self.lock_state().injected.clone()
    }

    /// Chooses what a failed `sync_data` does to the bytes it was writing back.
    pub fn on_fsync_failure(&self, behaviour: FsyncFailure) {
        self.lock_state().fsync_failure = behaviour;
    }

    /// Seeds the choice of how much of a cut write reaches the live image (default: half).
    pub fn seed_cut_writes(&self, seed: u64) {
        self.lock_state().rng = Some(Rng::new(seed));
    }

    /// Creates or replaces `dir/name` with `bytes`, durably (entry and content): for tests
    /// that craft files.
    pub fn put_file(&self, path: &Path, bytes: &[u8]) {
        let mut st = self.lock_state();
        let ino = st.next_inode;
        st.next_inode += 1;
        st.inodes.insert(ino, Inode::from_content(bytes.to_vec()));
        let (dir, name) = st.dir_of(path).expect("put_file into a known directory");
        dir.live.insert(name.clone(), ino);
        dir.durable.insert(name, ino);
    }

    /// The live content of `path`, if it exists.
    pub fn file(&self, path: &Path) -> Option<Vec<u8>> {
        let mut st = self.lock_state();
        let ino = st.inode_of(path).ok()?;
        st.inodes.get(&ino).map(|i| i.live.clone())
    }

    /// Live file names in `dir`, with their live and durable lengths.
    pub fn listing(&self, dir: &Path) -> Vec<(String, u64, u64)> {
        let st = self.lock_state();
        let Some(d) = st.dirs.get(dir) else {
            return Vec::new();
        };
        d.live
            .iter()
            .map(|(name, ino)| {
                let inode = &st.inodes[ino];
                (
                    name.clone(),
                    inode.live.len() as u64,
                    inode.durable.len() as u64,
                )
            })
            .collect()
    }

    /// A copy of the disk as a restarted process finds it (the machine kept running): the
    /// same live and durable images, unsynced data still unsynced. The copy has no crash
    /// point, no fault and no lock held; what happens to it does not affect this disk.
    pub fn restart(&self) -> SimDisk {
        let st = self.lock_state();
        let next = State {
            inodes: st.inodes.clone(),
            next_inode: st.next_inode,
            dirs: st.dirs.clone(),
            fsync_failure: st.fsync_failure,
            ..State::default()
        };
        SimDisk {
            state: Arc::new(Mutex::new(next)),
        }
    }

    /// The disk after a power loss at this moment, decided by `seed`: see the module docs.
    /// Returns the new disk (no crash point, no fault, no lock held) and what happened to each
    /// file.
    pub fn power_loss(&self, seed: u64, dir_loss: DirLoss) -> (SimDisk, Vec<FileFate>) {
        let st = self.lock_state();
        let mut rng = Rng::new(seed);
        let mut next = State {
            next_inode: st.next_inode,
            ..State::default()
        };
        let mut fates = Vec::new();
        for (path, dir) in &st.dirs {
            let mut entries = dir.durable.clone();
            if dir_loss == DirLoss::KeepPrefix {
                let keep = rng.below(dir.pending.len() as u64 + 1) as usize;
                for op in &dir.pending[..keep] {
                    Dir::apply(&mut entries, op);
                }
            }
            for (name, ino) in &entries {
                if next.inodes.contains_key(ino) {
                    continue;
                }
                let inode = &st.inodes[ino];
                let (content, how) = settle(inode, &mut rng);
                fates.push(FileFate {
                    name: name.clone(),
                    durable: inode.durable.len() as u64,
                    live: inode.live.len() as u64,
                    after: content.len() as u64,
                    how,
                });
                next.inodes.insert(*ino, Inode::from_content(content));
            }
            next.dirs.insert(
                path.clone(),
                Dir {
                    live: entries.clone(),
                    durable: entries,
                    pending: Vec::new(),
                },
            );
        }
        let disk = SimDisk {
            state: Arc::new(Mutex::new(next)),
        };
        (disk, fates)
    }
}

/// What a power loss leaves of one file: its durable bytes, with the unsynced difference
/// dropped, kept whole, cut to a prefix, or cut and followed by garbage.
fn settle(inode: &Inode, rng: &mut Rng) -> (Vec<u8>, &'static str) {
    let (live, durable) = (&inode.live, &inode.durable);
    if live == durable {
        return (durable.clone(), "synced");
    }
    let common = live
        .iter()
        .zip(durable.iter())
        .take_while(|(a, b)| a == b)
        .count();
    if live.len() <= common {
        // Only an unsynced truncation: it happened or it did not.
        return match rng.chance(1, 2) {
            true => (durable.clone(), "truncation lost"),
            false => (live.clone(), "truncation kept"),
        };
    }
    let unsynced = (live.len() - common) as u64;
    match rng.below(5) {
        0 => (durable.clone(), "unsynced dropped"),
        1 => (live.clone(), "unsynced kept"),
        2 => {
            let keep = common + rng.below(unsynced + 1) as usize;
            (live[..keep].to_vec(), "unsynced prefix")
        }
        4 => (
            lose_pages(live, durable, common, rng),
            "unsynced pages in any order",
        ),
        _ => {
            // The garbage runs to the full length half the time: the file's new length
            // reached the disk, some of its data did not.
            let keep = common + rng.below(unsynced) as usize;
            let room = (live.len() - keep) as u64;
            let garbage = match rng.chance(1, 2) {
                true => room,
                false => rng.range(1, room),
            } as usize;
            let mut out = live[..keep].to_vec();
            out.extend(rng.bytes(garbage));
            (out, "torn with garbage")
        }
    }
}

/// The unsynced part of a file written back page by page in no particular order, cut off by
/// the power loss: each page from `common` on independently reached the disk, or did not
/// (it holds what the disk had before: the durable bytes, or zeros past the durable length),
/// or was torn (garbage). The file keeps its new length (its size reached the disk). So a
/// later page of an unsynced write can survive while an earlier one is lost: a hole followed
/// by valid data. Pages are small (64 B to 4 KiB, chosen per loss) so the workload's small
/// batches span several.
fn lose_pages(live: &[u8], durable: &[u8], common: usize, rng: &mut Rng) -> Vec<u8> {
    const PAGE_SIZES: [usize; 4] = [64, 512, 1024, 4096];
    let page = PAGE_SIZES[rng.below(PAGE_SIZES.len() as u64) as usize];
    let mut out = live.to_vec();
    let mut start = common;
    while start < live.len() {
        let end = ((start / page + 1) * page).min(live.len());
        match rng.below(3) {
            0 => {} // written back
            1 => {
                for (i, byte) in out.iter_mut().enumerate().take(end).skip(start) {
                    *byte = durable.get(i).copied().unwrap_or(0);
                }
            }
            _ => {
                let garbage = rng.bytes(end - start);
                out[start..end].copy_from_slice(&garbage);
            }
        }
        start = end;
    }
    out
}

struct SimFile {
    disk: SimDisk,
    ino: u64,
    path: PathBuf,
}

impl WritableFile for SimFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut st = self.disk.lock_state();
        match st.gate(OpKind::Write, &self.path, buf.len() as u64)? {
            Gate::Proceed => {}
            Gate::Fail(e) => {
                st.partial_write(self.ino, buf);
                return Err(e);
            }
        }
        let inode = st
            .inodes
            .get_mut(&self.ino)
            .ok_or_else(|| io::Error::other("file vanished"))?;
        inode.live.extend_from_slice(buf);
        Ok(())
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut st = self.disk.lock_state();
        let loses_pages = st.fsync_failure == FsyncFailure::LosesPages;
        let failed = match st.gate(OpKind::SyncData, &self.path, 0)? {
            Gate::Proceed => None,
            Gate::Fail(e) => Some(e),
        };
        let inode = st
            .inodes
            .get_mut(&self.ino)
            .ok_or_else(|| io::Error::other("file vanished"))?;
        if let Some(e) = failed {
            if loses_pages {
                let synced = inode
                    .live
                    .iter()
                    .zip(&inode.durable)
                    .take_while(|(a, b)| a == b)
                    .count();
                inode.lost.push((synced, inode.live.len()));
            }
            return Err(e);
        }
        let mut durable = inode.live.clone();
        for &(from, to) in &inode.lost {
            for (i, byte) in durable.iter_mut().enumerate().take(to).skip(from) {
                *byte = inode.durable.get(i).copied().unwrap_or(0);
            }
        }
        inode.durable = durable;
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let mut st = self.disk.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::Truncate, &self.path, len)? {
            return Err(e);
        }
        let inode = st
            .inodes
            .get_mut(&self.ino)
            .ok_or_else(|| io::Error::other("file vanished"))?;
        let len = len as usize;
        inode.live.resize(len, 0);
        inode.lost.retain_mut(|(from, to)| {
            *to = (*to).min(len);
            from < to
        });
        Ok(())
    }
}

struct SimLock {
    disk: SimDisk,
    path: PathBuf,
}

impl DirLock for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.disk.lock_state().locks.remove(&self.path);
    }
}

impl Storage for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::CreateDir, dir, 0)? {
            return Err(e);
        }
        st.dirs.entry(dir.to_path_buf()).or_default();
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut st = self.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::List, dir, 0)? {
            return Err(e);
        }
        let d = st
            .dirs
            .get(dir)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such directory"))?;
        Ok(d.live.keys().cloned().collect())
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut st = self.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::Read, path, 0)? {
            return Err(e);
        }
        let ino = st.inode_of(path)?;
        Ok(st.inodes[&ino].live.clone())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let mut st = self.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::Create, path, 0)? {
            return Err(e);
        }
        let ino = st.next_inode;
        let (dir, name) = st.dir_of(path)?;
        if dir.live.contains_key(&name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{path:?} exists"),
            ));
        }
        dir.record(DirOp::Link(name, ino));
        st.next_inode += 1;
        st.inodes.insert(ino, Inode::default());
        Ok(Box::new(SimFile {
            disk: self.clone(),
            ino,
            path: path.to_path_buf(),
        }))
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let mut st = self.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::OpenAppend, path, 0)? {
            return Err(e);
        }
        let ino = st.inode_of(path)?;
        Ok(Box::new(SimFile {
            disk: self.clone(),
            ino,
            path: path.to_path_buf(),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::Rename, from, 0)? {
            return Err(e);
        }
        let ino = st.inode_of(from)?;
        if from.parent() != to.parent() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the simulated disk renames within one directory only",
            ));
        }
        let (_, to_name) = st.dir_of(to)?;
        let (dir, from_name) = st.dir_of(from)?;
        dir.record(DirOp::Move(from_name, to_name, ino));
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::Remove, path, 0)? {
            return Err(e);
        }
        st.inode_of(path)?;
        let (dir, name) = st.dir_of(path)?;
        dir.record(DirOp::Unlink(name));
        Ok(())
    }

    fn len(&self, path: &Path) -> io::Result<u64> {
        let mut st = self.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::Len, path, 0)? {
            return Err(e);
        }
        let ino = st.inode_of(path)?;
        Ok(st.inodes[&ino].live.len() as u64)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock_state();
        if let Gate::Fail(e) = st.gate(OpKind::SyncDir, dir, 0)? {
            return Err(e);
        }
        let d = st
            .dirs
            .get_mut(dir)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such directory"))?;
        d.durable = d.live.clone();
        d.pending.clear();
        Ok(())
    }

    fn lock(&self, path: &Path) -> Result<Box<dyn DirLock>, LockError> {
        let mut st = self.lock_state();
        match st.gate(OpKind::Lock, path, 0) {
            Err(e) | Ok(Gate::Fail(e)) => return Err(LockError::Io(e)),
            Ok(Gate::Proceed) => {}
        }
        if !st.locks.insert(path.to_path_buf()) {
            return Err(LockError::Held {
                pid: Some(std::process::id()),
            });
        }
        Ok(Box::new(SimLock {
            disk: self.clone(),
            path: path.to_path_buf(),
        }))
    }
}

/// Counts panics on the engine's own threads (named `keel-…`), which a test thread would not
/// otherwise see: the engine joins them and ignores the result.
pub fn engine_thread_panics() -> usize {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("keel-"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
    PANICS.load(Ordering::SeqCst)
}
