//! Opening a store: recovery from the snapshot and the WAL (the algorithm is in DESIGN.md,
//! "Recovery algorithm"), the clean-close fast path, the last segment's rewrite, and
//! `Db::verify`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::storage::ReadMode;

use super::*;

impl Db {
    /// Opens (creating if needed) the store in `dir`, recovering from its WAL.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] if `options` fail [`Options::validate`] (nothing is touched);
    /// [`Error::Locked`] if another `Db` has `dir` open; [`Error::Corruption`] if the WAL is
    /// damaged other than by a torn last write (nothing is modified then); [`Error::Io`].
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Db> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let storage = Arc::clone(&options.storage);
        if !options.create_if_missing && !is_store(&*storage, &dir) {
            return Err(Error::NotAStore { path: dir });
        }
        let existed = storage.list(&dir).is_ok();
        storage.create_dir_all(&dir)?;
        if !existed && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            // fsync the parent so a brand-new store directory survives power loss.
            storage.sync_dir(parent)?;
        }
        let lock_path = join(&dir, LOCK_FILE);
        let deadline = Instant::now() + options.lock_wait;
        let lock = loop {
            match storage.lock(&lock_path) {
                Ok(lock) => break lock,
                Err(LockError::Held { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(LockError::Held { pid }) => {
                    return Err(Error::Locked {
                        path: dir.clone(),
                        pid,
                    });
                }
                Err(LockError::Io(e)) => return Err(Error::Io(e)),
            }
        };
        let started = Instant::now();
        let index = Index::new(
            options.shards,
            options.eviction == EvictionPolicy::AllKeysLru,
        );
        let clock = MonotonicClock::new(Arc::clone(&options.clock));
        let mut memory = 0u64;
        for tmp in snapshot::list_tmp(&*storage, &dir)? {
            // A snapshot interrupted before its rename: never installed, never needed.
            storage.remove(&tmp)?;
        }
        for name in storage.list(&dir)? {
            if name.ends_with(wal::REWRITE_SUFFIX) || name == marker::MARKER_TMP_FILE {
                // A segment rewrite (or a clean-close marker) interrupted before its rename:
                // the original is intact.
                storage.remove(&join(&dir, &name))?;
            }
        }
        // The earliest expiry replayed: if it has passed by the end of replay, expired entries
        // must be dropped (one pass over the index); otherwise that pass is skipped.
        let mut earliest_expiry = u64::MAX;
        // A clean close recorded the clock then: a clock now behind it must not revive keys.
        let clean = marker::read(&*storage, &dir);
        if let Some(m) = &clean {
            clock.raise_floor(m.floor_ms);
        }
        let mut loader = Loader::new(&index);
        let snap = snapshot::load_newest(&*storage, &dir, |key, value, expires_at_ms| {
            if expires_at_ms != 0 {
                earliest_expiry = earliest_expiry.min(expires_at_ms);
            }
            loader.push(&index, key, value, expires_at_ms);
        })?;
        memory += loader.finish(&index);
        let snapshot_lsn = snap.as_ref().map_or(0, |(h, _)| h.lsn);
        if let Some((h, _)) = &snap {
            clock.raise_floor(h.time_ms);
        }
        // Every record up to a clean close's last LSN was fdatasynced: damage there is never a
        // torn tail.
        let known_durable = clean.as_ref().map_or(0, |m| m.last_lsn);
        let mut replay = Replay::new(&index);
        // Mapped: the lock is held, and `scan` drops each segment's map before returning, so
        // nothing below truncates or rewrites a mapped file.
        let scan = wal::scan(
            &*storage,
            &dir,
            ReadMode::Mapped,
            snapshot_lsn + 1,
            known_durable,
            |_lsn, _time, entries| {
                for entry in entries {
                    match *entry {
                        Entry::Put {
                            key,
                            value,
                            expires_at_ms,
                        } => {
                            let at = expires_at_ms.unwrap_or(0);
                            if at != 0 {
                                earliest_expiry = earliest_expiry.min(at);
                            }
                            replay.put(&index, key, value, at, &mut memory);
                        }
                        Entry::Delete { key } => replay.delete(&index, key, &mut memory),
                        Entry::Expire { key, expires_at_ms } => {
                            let at = expires_at_ms.unwrap_or(0);
                            if at != 0 {
                                earliest_expiry = earliest_expiry.min(at);
                            }
                            replay.expire(&index, key, at, &mut memory);
                        }
                    }
                }
            },
        )?;
        replay.finish(&index, &mut memory);
        clock.raise_floor(scan.max_time_ms);
        let durable_floor_ms = [
            clean.map_or(0, |m| m.floor_ms),
            snap.as_ref().map_or(0, |(h, _)| h.time_ms),
            scan.max_time_ms,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let now = clock.now_ms();
        let mut expired_seen_ms = 0;
        if earliest_expiry <= now {
            memory = purge_expired(&index, now, memory);
            // Dropped as expired at `now`: the floor must reach the disk past their expiry.
            expired_seen_ms = now;
        }
        let mut bytes_truncated = 0;
        let mut records_discarded = 0;
        let mut segments = wal::list_segments(&*storage, &dir)?;
        if let Some(torn) = &scan.torn_tail {
            bytes_truncated = torn.torn_bytes;
            records_discarded = torn.records_discarded;
            if records_discarded > 0 {
                tracing::warn!(
                    file = %torn.file.display(),
                    offset = torn.valid_len,
                    records_discarded,
                    "keel-engine: the unsynced end of the WAL reached the disk with a hole; \
                     the records after it were never acknowledged as durable and are discarded"
                );
            }
            if torn.header_torn {
                // The crash hit while the segment was being created: it holds no record.
                storage.remove(&torn.file)?;
                storage.sync_dir(&dir)?;
                segments.pop();
            } else {
                let mut file = storage.open_append(&torn.file)?;
                file.truncate(torn.valid_len)?;
                file.sync_data()?;
            }
        }
        let next_lsn = scan.last_lsn + 1;
        // Fast path: the log is exactly what a clean close left (same last record, same last
        // segment and length, nothing torn), so every byte read was fdatasynced by a store
        // that saw no failure, and the rewrite below has nothing to make durable.
        let closed_cleanly = match (&clean, segments.last()) {
            (Some(m), Some((first, path))) => {
                scan.torn_tail.is_none()
                    && m.last_lsn == scan.last_lsn
                    && m.segment_first_lsn == *first
                    && storage.len(path)? == m.segment_bytes
            }
            _ => false,
        };
        if let Some((_, path)) = segments.last()
            && !closed_cleanly
        {
            rewrite_segment(&*storage, path)?;
        }
        // A format 1 segment is appended to as format 1 (no commit markers) until it rolls.
        let (file, file_bytes, active_first, markers) = match segments.last() {
            Some((first, path)) => (
                storage.open_append(path)?,
                storage.len(path)?,
                *first,
                scan.last_segment_version >= 2,
            ),
            None => {
                let path = join(&dir, &wal::segment_name(next_lsn));
                let mut file = storage.create(&path)?;
                let header = record::encode_segment_header(next_lsn);
                file.write_all(&header)?;
                file.sync_data()?;
                // fsync the directory so the new segment's name survives power loss.
                storage.sync_dir(&dir)?;
                segments.push((next_lsn, path));
                (file, header.len() as u64, next_lsn, true)
            }
        };
        // fsync the directory: the segment this store appends to may have been created (or
        // rewritten) by an earlier open whose directory fsync never happened or failed; its
        // name must be durable before any write in it is acknowledged.
        storage.sync_dir(&dir)?;
        let mut wal_bytes = 0;
        for (_, path) in &segments {
            wal_bytes += storage.len(path)?;
        }
        let periodic = match options.durability {
            Durability::Periodic(iv) => Some(iv),
            _ => None,
        };
        let wal = Wal::start(WalStart {
            storage: Arc::clone(&storage),
            dir: dir.clone(),
            file,
            file_bytes,
            next_lsn,
            wal_bytes,
            segments: segments.len() as u64,
            segment_bytes: options.wal_segment_bytes,
            periodic,
            active_first_lsn: active_first,
            commit_markers: markers,
            queue_bytes_max: options.wal_queue_bytes,
        })?;
        let keys = (0..index.shard_count())
            .map(|i| index.shard(i).read().map.len() as u64)
            .sum();
        let recovery = RecoveryReport {
            snapshot_lsn,
            segments: scan.segments,
            records: scan.records,
            bytes_truncated,
            records_discarded,
            keys,
            last_lsn: scan.last_lsn,
            duration: started.elapsed(),
        };
        tracing::debug!(
            snapshot_lsn,
            segments = recovery.segments,
            records = recovery.records,
            bytes_truncated,
            keys,
            closed_cleanly,
            duration_ms = recovery.duration.as_millis() as u64,
            "keel-engine: recovered"
        );
        let disk = Disk {
            dir,
            storage,
            snapshot_after_bytes: options.snapshot_after_wal_bytes,
            compaction: Mutex::new(()),
            appended_at_last: AtomicU64::new(0),
            reports: Mutex::new((0, None)),
            durable_floor_ms: AtomicU64::new(durable_floor_ms),
            _lock: lock,
        };
        let db = Db::assemble(
            index,
            Some(wal),
            clock,
            &options,
            (memory, expired_seen_ms),
            Some(recovery),
            Some(disk),
        )?;
        // Delete what an interrupted compaction may have left: older snapshots and covered
        // segments.
        db.core().truncate_covered(snapshot_lsn)?;
        Ok(db)
    }

    /// Checks every WAL segment's checksums in `dir` without modifying anything and without
    /// taking the lock. A torn last record is reported in the result; real damage is an error.
    ///
    /// Reads every file into memory ([`Storage::read`]), never through a memory map: another
    /// process may be writing the store, and a segment it truncates under a live map would
    /// raise SIGBUS here.
    ///
    /// # Errors
    /// [`Error::NotAStore`] if `dir` holds no WAL segment or snapshot; [`Error::Corruption`]
    /// naming the file and offset; [`Error::Io`].
    pub fn verify(dir: impl AsRef<Path>, storage: &dyn Storage) -> Result<VerifyReport> {
        let dir = dir.as_ref();
        if !is_store(storage, dir) {
            return Err(Error::NotAStore {
                path: dir.to_path_buf(),
            });
        }
        let mut snapshots = Vec::new();
        for (_, path) in snapshot::list(storage, dir)? {
            let bytes = storage.read(&path)?;
            let header = snapshot::decode(&bytes, |_, _, _| {})
                .map_err(|e| Error::corruption(&path, 0, format!("snapshot is damaged: {e:?}")))?;
            snapshots.push((path, header));
        }
        let from = snapshots.first().map_or(0, |(_, h)| h.lsn) + 1;
        let known_durable = marker::read(storage, dir).map_or(0, |m| m.last_lsn);
        // Copied, not mapped: without the lock, another process may truncate a segment.
        let wal = wal::scan(
            storage,
            dir,
            ReadMode::Copied,
            from,
            known_durable,
            |_, _, _| {},
        )?;
        Ok(VerifyReport { snapshots, wal })
    }
}

/// True if `dir` exists and holds at least one WAL segment or snapshot.
fn is_store(storage: &dyn Storage, dir: &Path) -> bool {
    let has_wal = wal::list_segments(storage, dir).is_ok_and(|s| !s.is_empty());
    has_wal || snapshot::list(storage, dir).is_ok_and(|s| !s.is_empty())
}

/// Rewrites the segment at `path` from what a read of it returns, through a temporary file
/// (fdatasync, rename over, and the caller fsyncs the directory).
///
/// Why: after a failed fdatasync (which poisons the store), Linux may mark the unwritten pages
/// clean, so a reopen in the same boot reads records that never reached the disk, and a later
/// fdatasync of the same file will not write them either. Building on them and acknowledging
/// new writes would leave a hole after a power loss. Writing the bytes recovery replayed to a
/// new file makes them durable for real. The cost is one sequential write of the last segment
/// (at most one segment, 64 MiB by default) per open.
fn rewrite_segment(storage: &dyn Storage, path: &Path) -> Result<()> {
    let bytes = storage.read(path)?;
    // A segment holding only its header is rewritten too: its header's fdatasync may be the
    // one that failed (a roll that poisoned the store), and records appended after a header
    // the disk never got would be unreadable after a power loss.
    if bytes.is_empty() {
        return Ok(());
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".rewrite");
    let tmp = PathBuf::from(tmp);
    let mut file = storage.create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_data()?;
    drop(file);
    storage.rename(&tmp, path)?;
    Ok(())
}

/// Drops every entry expired at `now_ms` after replay; returns the updated memory account.
fn purge_expired(index: &Index, now_ms: u64, mut memory: u64) -> u64 {
    for i in 0..index.shard_count() {
        let mut shard = index.shard(i).write();
        shard.map.retain(|slot| {
            let live = slot.is_live(now_ms);
            if !live {
                memory -= entry_bytes(slot.key().len(), slot.value().len());
            }
            live
        });
    }
    memory
}
