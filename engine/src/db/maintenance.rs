//! The maintenance side of a store: the maintenance thread (active expirer, durable clock
//! floor, automatic and overdue snapshots), snapshots and WAL truncation, eviction under
//! `max_memory`, and the clean-close marker written at close.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;

/// The maintenance thread's loop: runs until `stop` is disconnected (the store closing). Every
/// `interval` it runs the active expirer and makes the clock floor durable if due; after every
/// wake-up (a tick or a `kick` from an async writer waiting for an overdue snapshot) it takes
/// a snapshot if one is due, and wakes the writers waiting for one.
pub(super) fn run(
    core: &Core,
    stop: &crossbeam_channel::Receiver<()>,
    kick: &crossbeam_channel::Receiver<()>,
    interval: Duration,
) {
    let mut floor_synced: Option<Instant> = None;
    let mut next_tick = Instant::now() + interval;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        crossbeam_channel::select! {
            recv(stop) -> _ => break,
            recv(kick) -> _ => {}
            default(wait) => {}
        }
        if Instant::now() >= next_tick {
            core.expire_tick();
            core.persist_floor(&mut floor_synced);
            next_tick = Instant::now() + interval;
        }
        if core.snapshot_due() {
            // A failure poisons nothing: the WAL still holds everything, and the next tick
            // tries again. Callers see errors through `Db::compact`.
            let _ = core.compact_when(Core::snapshot_due);
            core.snapshot_attempts.fetch_add(1, Ordering::AcqRel);
        }
        core.wake_snapshot_waiters();
    }
    core.wake_snapshot_waiters();
}

/// Candidates eviction examines per shard visit (like Redis's `maxmemory-samples`).
const EVICTION_SAMPLE: usize = 16;

impl Core {
    /// Wakes every async writer waiting for an overdue snapshot.
    pub(super) fn wake_snapshot_waiters(&self) {
        let wakers = std::mem::take(&mut *self.snapshot_wakers.lock());
        for w in wakers {
            w.wake();
        }
    }

    /// Makes the clock floor durable past every expiry seen so far, at most once per
    /// `FLOOR_SYNC_INTERVAL` (the maintenance thread calls it every tick). A record's time is
    /// the floor a reopen restores, so: if no record appended yet carries a time at or past
    /// the latest expiry seen, log an empty record stamped "now" (which is past it); then make
    /// the WAL durable. On an idle store where nothing expires, it does nothing.
    pub(super) fn persist_floor(&self, last_sync: &mut Option<Instant>) {
        let (Some(disk), Some(wal)) = (&self.disk, &self.wal) else {
            return;
        };
        let seen = self.expired_seen_ms.load(Ordering::Relaxed);
        if seen <= disk.durable_floor_ms.load(Ordering::Relaxed)
            || last_sync.is_some_and(|t| t.elapsed() < FLOOR_SYNC_INTERVAL)
        {
            return;
        }
        *last_sync = Some(Instant::now());
        let wal = wal.shared();
        let now = self.clock.now_ms();
        if wal.max_appended_time_ms() < seen && wal.append(now, &[], Durability::Buffered).is_err()
        {
            return; // poisoned or closing: nothing more can be made durable
        }
        if wal.sync_all().is_ok() {
            disk.durable_floor_ms.fetch_max(seen, Ordering::Relaxed);
            tracing::trace!(floor_ms = seen, "keel-engine: clock floor made durable");
        }
    }

    /// Writes the clean-close marker (best effort: without it the next open rewrites the
    /// last segment and takes the floor from the log). Called once the WAL writer has written
    /// and fdatasynced everything and stopped.
    pub(super) fn mark_clean_close(&self) {
        let (Some(disk), Some(wal)) = (&self.disk, &self.wal) else {
            return;
        };
        let (segment_first_lsn, segment_bytes) = wal.shared().active_segment();
        let m = CleanClose {
            last_lsn: wal.shared().last_appended_lsn(),
            floor_ms: self.clock.now_ms(),
            segment_first_lsn,
            segment_bytes,
        };
        let _ = marker::write(&*disk.storage, &disk.dir, m);
    }

    /// Makes room for `growth` more accounted bytes under `max_memory`, evicting per the policy.
    /// `own` is the writer's locked shard (sampled first; `key` in it is never evicted); other
    /// shards are only tried, never waited for, so eviction cannot deadlock with writers.
    ///
    /// Each eviction is logged as a Delete with the writer's durability, before the writer's own
    /// record: when the write is acknowledged, its evictions are as durable as it is.
    pub(super) fn make_room(
        &self,
        mut own: Option<&mut Shard>,
        key: &[u8],
        growth: u64,
        now: u64,
        durability: Durability,
    ) -> Result<()> {
        let Some(limit) = self.max_memory else {
            return Ok(());
        };
        let over = |core: &Core| core.memory_bytes.load(Ordering::Relaxed) + growth > limit;
        if growth == 0 || !over(self) {
            return Ok(());
        }
        let refuse = || Error::MemoryLimit {
            used: self.memory_bytes.load(Ordering::Relaxed),
            limit,
        };
        if self.eviction == EvictionPolicy::NoEviction {
            return Err(refuse());
        }
        let shards = self.index.shard_count();
        let mut fruitless = 0;
        let evictions_before = self.evictions.load(Ordering::Relaxed);
        let evicted = |core: &Core| core.evictions.load(Ordering::Relaxed) - evictions_before;
        while over(self) {
            if fruitless > 2 * shards {
                tracing::debug!(
                    evicted = evicted(self),
                    growth,
                    "keel-engine: write refused, nothing left to evict"
                );
                return Err(refuse());
            }
            let evicted = match own.as_deref_mut().filter(|_| fruitless == 0) {
                Some(shard) => self.evict_one(shard, key, now, durability)?,
                None => {
                    let i =
                        self.evict_shard_cursor.fetch_add(1, Ordering::Relaxed) as usize % shards;
                    match self.index.shard(i).try_write() {
                        Some(mut shard) => self.evict_one(&mut shard, key, now, durability)?,
                        None => false,
                    }
                }
            };
            fruitless = if evicted { 0 } else { fruitless + 1 };
        }
        tracing::trace!(
            evicted = evicted(self),
            growth,
            "keel-engine: evicted to make room"
        );
        Ok(())
    }

    /// Samples up to `EVICTION_SAMPLE` entries of `shard` and evicts the best candidate: an
    /// already-expired entry first, else (AllKeysLru) the least recently touched or
    /// (VolatileTtl) the soonest to expire among entries with a TTL. Returns whether it evicted.
    pub(super) fn evict_one(
        &self,
        shard: &mut Shard,
        protect: &[u8],
        now: u64,
        durability: Durability,
    ) -> Result<bool> {
        use std::ops::Bound;
        let start = match &shard.evict_cursor {
            Some(c) => Bound::Excluded(&**c),
            None => Bound::Unbounded,
        };
        let mut best: Option<(&[u8], (u8, u64))> = None;
        let mut last: Option<&[u8]> = None;
        let sample = shard
            .map
            .range::<[u8], _>((start, Bound::Unbounded))
            .chain(shard.map.iter())
            .take(EVICTION_SAMPLE);
        for slot in sample {
            let k = slot.key();
            last = Some(k);
            if k == protect {
                continue;
            }
            // Lower ranks evict first: (class, tiebreak).
            let rank = if !slot.is_live(now) {
                (0, 0)
            } else {
                match self.eviction {
                    EvictionPolicy::AllKeysLru => (1, u64::from(slot.touched())),
                    EvictionPolicy::VolatileTtl if slot.expires_at_ms() != 0 => {
                        (1, slot.expires_at_ms())
                    }
                    _ => continue,
                }
            };
            if best.is_none_or(|(_, r)| rank < r) {
                best = Some((k, rank));
            }
        }
        let next_cursor = last.map(Box::<[u8]>::from);
        let victim = best.map(|(k, _)| Box::<[u8]>::from(k));
        shard.evict_cursor = next_cursor;
        let Some(victim) = victim else {
            return Ok(false);
        };
        if let Some(wal) = &self.wal {
            wal.shared()
                .append(now, &[Entry::Delete { key: &victim }], durability)?;
        }
        self.install(shard, &victim, Change::Delete);
        self.evictions.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// WAL bytes appended since the last snapshot started, and the automatic threshold.
    pub(super) fn wal_growth(&self) -> Option<(u64, u64)> {
        match (&self.disk, &self.wal) {
            (Some(disk), Some(wal)) if !wal.shared().is_poisoned() => {
                let appended = wal.shared().appended_bytes();
                let since = appended.saturating_sub(disk.appended_at_last.load(Ordering::Relaxed));
                Some((since, disk.snapshot_after_bytes))
            }
            _ => None,
        }
    }

    /// True when enough WAL has been appended since the last snapshot (the maintenance thread
    /// then takes one).
    pub(super) fn snapshot_due(&self) -> bool {
        self.wal_growth()
            .is_some_and(|(since, limit)| since >= limit)
    }

    /// True when the maintenance thread has fallen far behind (4x the threshold): writers
    /// then take the snapshot themselves before writing, so the WAL stays bounded whatever the
    /// write rate and however the threads are scheduled.
    pub(super) fn snapshot_overdue(&self) -> bool {
        self.wal_growth()
            .is_some_and(|(since, limit)| since >= limit.saturating_mul(WAL_OVERDUE_FACTOR))
    }

    /// Takes a snapshot if `needed` still holds once no other compaction is running.
    pub(super) fn compact_when(
        &self,
        needed: impl Fn(&Core) -> bool,
    ) -> Result<Option<SnapshotReport>> {
        let (Some(disk), Some(wal)) = (&self.disk, &self.wal) else {
            return Ok(None);
        };
        let wal = wal.shared();
        wal.check_poison()?;
        // One compaction at a time; a caller that waited here may find the work done.
        let _one_at_a_time = disk.compaction.lock();
        if !needed(self) {
            return Ok(None);
        }
        let started = Instant::now();
        let appended_before = wal.appended_bytes();
        // Every record up to `lsn` is installed in memory before its shard lock is released,
        // and each shard is copied under its lock: the copy contains all of them.
        let lsn = wal.last_appended_lsn();
        wal.request_roll();
        let now = self.clock.now_ms();
        let mut writer = SnapshotWriter::create(&*disk.storage, &disk.dir, lsn, now)?;
        let mut chunk = Vec::new();
        for i in 0..self.index.shard_count() {
            chunk.clear();
            let mut n = 0;
            {
                let shard = self.index.shard(i).read();
                for slot in shard.map.iter() {
                    if slot.is_live(now) {
                        snapshot::encode_entry(
                            &mut chunk,
                            slot.key(),
                            slot.value(),
                            slot.expires_at_ms(),
                        );
                        n += 1;
                    }
                }
            }
            writer.write_chunk(&chunk, n)?;
        }
        // The copy may hold states newer than `lsn`; make their records durable before the
        // snapshot exists, so it never shows a write (or part of a batch) a crash could lose.
        wal.sync_all()?;
        // If the active segment still holds records the snapshot covers (an idle store: no
        // commit ran since the roll was requested), roll now: a covered segment can only be
        // deleted once it is no longer the active one.
        wal.roll_now(lsn)?;
        let (_, entries) = writer.install(&*disk.storage, &disk.dir)?;
        disk.appended_at_last
            .store(appended_before, Ordering::Relaxed);
        let segments_deleted = self.truncate_covered_locked(disk, lsn)?;
        let report = SnapshotReport {
            lsn,
            entries,
            segments_deleted,
            duration: started.elapsed(),
        };
        tracing::debug!(
            lsn,
            entries,
            segments_deleted,
            duration_ms = report.duration.as_millis() as u64,
            "keel-engine: snapshot taken"
        );
        metrics::histogram!(crate::METRIC_SNAPSHOT_SECONDS).record(report.duration.as_secs_f64());
        let mut reports = disk.reports.lock();
        reports.0 += 1;
        reports.1 = Some(report.clone());
        Ok(Some(report))
    }

    /// Deletes snapshots older than the one at `lsn` and WAL segments whose records are all
    /// `<= lsn`. The segment being appended to is never deleted.
    pub(super) fn truncate_covered(&self, lsn: u64) -> Result<u64> {
        match &self.disk {
            Some(disk) => {
                let _one_at_a_time = disk.compaction.lock();
                self.truncate_covered_locked(disk, lsn)
            }
            None => Ok(0),
        }
    }

    pub(super) fn truncate_covered_locked(&self, disk: &Disk, lsn: u64) -> Result<u64> {
        let Some(wal) = &self.wal else { return Ok(0) };
        let storage = &*disk.storage;
        let mut removed_any = false;
        for (snap_lsn, path) in snapshot::list(storage, &disk.dir)? {
            if snap_lsn < lsn {
                storage.remove(&path)?;
                removed_any = true;
            }
        }
        let segments = wal::list_segments(storage, &disk.dir)?;
        let active = wal.shared().active_first_lsn();
        let mut deleted = 0;
        for pair in segments.windows(2) {
            let ((first, path), (next_first, _)) = (&pair[0], &pair[1]);
            // Every record of this segment is below the next segment's first LSN.
            if *next_first <= lsn + 1 && *first < active {
                let bytes = storage.len(path)?;
                storage.remove(path)?;
                wal.shared().segment_removed(bytes);
                deleted += 1;
            }
        }
        if removed_any || deleted > 0 {
            // fsync the directory so the deletions are durable (not required for safety: a
            // resurrected covered file is ignored or deleted again at the next open).
            storage.sync_dir(&disk.dir)?;
        }
        Ok(deleted)
    }

    /// One tick of the active expirer: in each shard, examine at most
    /// `expire_scan_per_shard` entries from where the last tick stopped and reclaim the expired
    /// ones, logging their deletion (buffered) so they cannot reappear after a restart. The
    /// bound keeps every shard-lock hold short whatever expires at once.
    pub(super) fn expire_tick(&self) {
        let now = self.clock.now_ms();
        let reclaimed_before = self.expired_reclaimed.load(Ordering::Relaxed);
        for i in 0..self.index.shard_count() {
            let mut shard = self.index.shard(i).write();
            let lower = match &shard.expire_cursor {
                Some(c) => std::ops::Bound::Excluded(&**c),
                None => std::ops::Bound::Unbounded,
            };
            let mut examined = 0;
            let mut last: Option<&[u8]> = None;
            let mut expired: Vec<Box<[u8]>> = Vec::new();
            for slot in shard
                .map
                .range::<[u8], _>((lower, std::ops::Bound::Unbounded))
                .take(self.expire_scan_per_shard)
            {
                examined += 1;
                last = Some(slot.key());
                if !slot.is_live(now) {
                    self.saw_expired(slot.expires_at_ms());
                    expired.push(slot.key().into());
                }
            }
            let next_cursor = if examined < self.expire_scan_per_shard {
                None
            } else {
                last.map(Box::from)
            };
            if !expired.is_empty() {
                if let Some(wal) = &self.wal {
                    let entries: Vec<Entry<'_>> =
                        expired.iter().map(|k| Entry::Delete { key: k }).collect();
                    if wal
                        .shared()
                        .append(now, &entries, Durability::Buffered)
                        .is_err()
                    {
                        // Poisoned or closing: leave the entries; they are invisible anyway.
                        return;
                    }
                }
                for k in &expired {
                    self.install(&mut shard, k, Change::Delete);
                }
                self.expired_reclaimed
                    .fetch_add(expired.len() as u64, Ordering::Relaxed);
            }
            shard.expire_cursor = next_cursor;
        }
        let reclaimed = self.expired_reclaimed.load(Ordering::Relaxed) - reclaimed_before;
        if reclaimed > 0 {
            tracing::debug!(reclaimed, "keel-engine: expirer reclaimed keys");
        }
    }
}
