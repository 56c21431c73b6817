//! The operations: reads, the write path (`Db::submit`, `update_many`, batches: validate, take
//! the shard locks, read "now" under them, log the after-image, install it), the backpressure
//! a write meets before it is applied, and `Db::writable` for async callers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;

impl Db {
    /// The value of `key`, if it exists and has not expired.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
        self.get_with_ttl(key).map(|(v, _)| v)
    }

    /// The value of `key` with its remaining TTL (`None`: no expiry).
    pub fn get_with_ttl(&self, key: impl AsRef<[u8]>) -> Option<(Vec<u8>, Option<Duration>)> {
        let key = key.as_ref();
        let core = self.core();
        let now = core.clock.now_ms();
        let shard = core.index.shard(core.index.shard_of(key)).read();
        let slot = shard.map.get(key)?;
        if !slot.is_live(now) {
            core.saw_expired(slot.expires_at_ms());
            return None;
        }
        if core.eviction == EvictionPolicy::AllKeysLru {
            slot.touch(core.touch_at(now));
        }
        let ttl = slot.expiry().map(|at| Duration::from_millis(at - now));
        Some((slot.value().to_vec(), ttl))
    }

    /// Whether `key` exists, and if so its remaining time to live.
    pub fn ttl(&self, key: impl AsRef<[u8]>) -> Ttl {
        let key = key.as_ref();
        let core = self.core();
        let now = core.clock.now_ms();
        let shard = core.index.shard(core.index.shard_of(key)).read();
        let slot = shard.map.get(key);
        if let Some(expired) = slot.filter(|s| !s.is_live(now)) {
            core.saw_expired(expired.expires_at_ms());
        }
        match slot.filter(|s| s.is_live(now)) {
            None => Ttl::Missing,
            Some(slot) => match slot.expiry() {
                None => Ttl::NoExpiry,
                Some(at) => Ttl::Remaining(Duration::from_millis(at - now)),
            },
        }
    }

    /// One page of the live keys starting with `prefix`, in ascending byte order, after
    /// `cursor` (start with `None`). `limit` is capped at [`SCAN_LIMIT_MAX`] (and at least 1).
    ///
    /// Guarantee: a key that exists for the whole scan is returned exactly once; a key created
    /// or deleted during the scan may or may not be returned.
    pub fn scan(
        &self,
        prefix: impl AsRef<[u8]>,
        cursor: Option<&ScanCursor>,
        limit: usize,
        with_values: bool,
    ) -> ScanPage {
        let limit = limit.clamp(1, SCAN_LIMIT_MAX);
        let core = self.core();
        let now = core.clock.now_ms();
        let found = core.index.scan(
            prefix.as_ref(),
            cursor.map(|c| c.0.as_slice()),
            limit,
            now,
            with_values,
        );
        let next = (found.len() == limit).then(|| ScanCursor(found[limit - 1].0.clone()));
        ScanPage {
            entries: found
                .into_iter()
                .map(|(key, value, expires_at_ms)| ScanEntry {
                    key,
                    value,
                    expires_at_ms,
                })
                .collect(),
            next,
        }
    }

    /// Sets `key` to `value`, replacing any value and TTL; expires after `ttl` if given.
    ///
    /// # Errors
    /// `KeyTooLarge`, `ValueTooLarge`, `InvalidTtl` (nothing written); `Poisoned`, `Closed`,
    /// `Io` from the WAL.
    pub fn set(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.submit(Op::Set {
            key: key.as_ref(),
            value: value.as_ref(),
            ttl,
        })?
        .wait()
        .map(|_| ())
    }

    /// Sets `key` only if it is absent or expired. Returns whether it was set.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn set_nx(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: Option<Duration>,
    ) -> Result<bool> {
        self.submit(Op::SetNx {
            key: key.as_ref(),
            value: value.as_ref(),
            ttl,
        })?
        .wait()
        .map(outcome_bool)
    }

    /// Replaces the value of `key` with `new` only if it currently equals `expected`
    /// (`None`: only if the key is absent or expired). Returns whether it swapped. The TTL
    /// follows `ttl`.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expected: Option<&[u8]>,
        new: impl AsRef<[u8]>,
        ttl: TtlPolicy,
    ) -> Result<bool> {
        self.submit(Op::CompareAndSwap {
            key: key.as_ref(),
            expected,
            new: new.as_ref(),
            ttl,
        })?
        .wait()
        .map(outcome_bool)
    }

    /// Deletes `key` only if its value equals `expected`. Returns whether it deleted.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn compare_and_delete(
        &self,
        key: impl AsRef<[u8]>,
        expected: impl AsRef<[u8]>,
    ) -> Result<bool> {
        self.submit(Op::CompareAndDelete {
            key: key.as_ref(),
            expected: expected.as_ref(),
        })?
        .wait()
        .map(outcome_bool)
    }

    /// Deletes `key`. Returns whether a live key was deleted.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.submit(Op::Delete { key: key.as_ref() })?
            .wait()
            .map(outcome_bool)
    }

    /// Adds `delta` to the integer at `key` (a missing key counts as 0) and returns the new
    /// value. `ttl_on_create` is stamped only when this call creates the key; an existing
    /// key's TTL is never changed.
    ///
    /// # Errors
    /// `NotAnInteger` if the value is not a decimal i64 in Redis's grammar, `Overflow` if the
    /// result does not fit an i64 (both leave the value unchanged); `InvalidTtl`; as
    /// [`Db::set`].
    pub fn incr(
        &self,
        key: impl AsRef<[u8]>,
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        match self
            .submit(Op::Incr {
                key: key.as_ref(),
                delta,
                ttl_on_create,
            })?
            .wait()?
        {
            Outcome::Int(n) => Ok(n),
            other => unreachable!("incr yields Int, got {other:?}"),
        }
    }

    /// Sets the TTL of an existing key. Returns false if the key is missing.
    ///
    /// # Errors
    /// `InvalidTtl`; as [`Db::set`].
    pub fn expire(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<bool> {
        self.submit(Op::Expire {
            key: key.as_ref(),
            ttl,
        })?
        .wait()
        .map(outcome_bool)
    }

    /// Removes the TTL of a key. Returns true if the key exists and had a TTL.
    ///
    /// # Errors
    /// As [`Db::set`].
    pub fn persist(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.submit(Op::Persist { key: key.as_ref() })?
            .wait()
            .map(outcome_bool)
    }

    /// Applies every operation of `batch` or none: in memory (no reader sees part of it) and on
    /// disk (one WAL record).
    ///
    /// # Errors
    /// `BatchTooLarge`, and any per-key error of [`Db::set`]; nothing is written then.
    pub fn write_batch(&self, batch: &Batch) -> Result<()> {
        self.submit(Op::Batch(batch))?.wait().map(|_| ())
    }

    /// Applies `op` in memory, queues its WAL record, and returns without waiting for
    /// durability. `.wait()` or `.await` the result to get the acknowledgement: the write is
    /// acknowledged only then.
    ///
    /// # Errors
    /// Input errors, `Poisoned` and `Closed` are returned here, before anything is applied.
    pub fn submit(&self, op: Op<'_>) -> Result<Pending<Outcome>> {
        match op {
            Op::Set { key, value, ttl } => {
                self.check_value(value)?;
                let ttl = ttl.map(ttl_ms).transpose()?;
                self.mutate(key, |_, now| {
                    let expires_at_ms = ttl.map_or(0, |t| now.saturating_add(t));
                    Ok((
                        Change::Put {
                            value: value.into(),
                            expires_at_ms,
                        },
                        Outcome::Unit,
                    ))
                })
            }
            Op::SetNx { key, value, ttl } => {
                self.check_value(value)?;
                let ttl = ttl.map(ttl_ms).transpose()?;
                self.mutate(key, |current, now| {
                    if current.is_some() {
                        return Ok((Change::None, Outcome::Bool(false)));
                    }
                    let expires_at_ms = ttl.map_or(0, |t| now.saturating_add(t));
                    Ok((
                        Change::Put {
                            value: value.into(),
                            expires_at_ms,
                        },
                        Outcome::Bool(true),
                    ))
                })
            }
            Op::CompareAndSwap {
                key,
                expected,
                new,
                ttl,
            } => {
                self.check_value(new)?;
                let set_ms = match ttl {
                    TtlPolicy::Set(t) => Some(ttl_ms(t)?),
                    TtlPolicy::Keep | TtlPolicy::Clear => None,
                };
                self.mutate(key, |current, now| {
                    let matches = match (current, expected) {
                        (None, None) => true,
                        (Some(slot), Some(exp)) => slot.value() == exp,
                        _ => false,
                    };
                    if !matches {
                        return Ok((Change::None, Outcome::Bool(false)));
                    }
                    let expires_at_ms = match (ttl, set_ms) {
                        (TtlPolicy::Keep, _) => current.map_or(0, |s| s.expires_at_ms()),
                        (_, Some(ms)) => now.saturating_add(ms),
                        (_, None) => 0,
                    };
                    Ok((
                        Change::Put {
                            value: new.into(),
                            expires_at_ms,
                        },
                        Outcome::Bool(true),
                    ))
                })
            }
            Op::CompareAndDelete { key, expected } => self.mutate(key, |current, _| {
                Ok(match current {
                    Some(slot) if slot.value() == expected => (Change::Delete, Outcome::Bool(true)),
                    _ => (Change::None, Outcome::Bool(false)),
                })
            }),
            Op::Delete { key } => self.mutate(key, |current, _| {
                Ok(match current {
                    Some(_) => (Change::Delete, Outcome::Bool(true)),
                    None => (Change::None, Outcome::Bool(false)),
                })
            }),
            Op::Incr {
                key,
                delta,
                ttl_on_create,
            } => {
                let ttl = ttl_on_create.map(ttl_ms).transpose()?;
                self.mutate(key, |current, now| {
                    let (base, expires_at_ms) = match current {
                        Some(slot) => (
                            parse_i64(slot.value()).ok_or(Error::NotAnInteger)?,
                            slot.expires_at_ms(),
                        ),
                        None => (0, ttl.map_or(0, |t| now.saturating_add(t))),
                    };
                    let next = base.checked_add(delta).ok_or(Error::Overflow)?;
                    Ok((
                        Change::Put {
                            value: next.to_string().into_bytes().into_boxed_slice(),
                            expires_at_ms,
                        },
                        Outcome::Int(next),
                    ))
                })
            }
            Op::Expire { key, ttl } => {
                let ttl = ttl_ms(ttl)?;
                self.mutate(key, |current, now| {
                    Ok(match current {
                        Some(_) => (
                            Change::Expire {
                                expires_at_ms: now.saturating_add(ttl),
                            },
                            Outcome::Bool(true),
                        ),
                        None => (Change::None, Outcome::Bool(false)),
                    })
                })
            }
            Op::Persist { key } => self.mutate(key, |current, _| {
                Ok(match current {
                    Some(slot) if slot.expires_at_ms() != 0 => {
                        (Change::Expire { expires_at_ms: 0 }, Outcome::Bool(true))
                    }
                    _ => (Change::None, Outcome::Bool(false)),
                })
            }),
            Op::Batch(batch) => self.apply_batch(batch),
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        let max = self.core().limits.max_key_bytes;
        if key.len() > max {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max,
            });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        let max = self.core().limits.max_value_bytes;
        if value.len() > max {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max,
            });
        }
        Ok(())
    }

    fn before_write(&self) -> Result<()> {
        let core = self.core();
        if let Some(wal) = &core.wal {
            wal.shared().check_poison()?;
            if self.nonblocking {
                // The caller awaited `writable` (or chose not to wait): never block here.
                if core.snapshot_overdue() {
                    let _ = core.maintenance_kick.try_send(());
                }
                return Ok(());
            }
            if core.snapshot_overdue() {
                // Backpressure: the WAL is 4x past its snapshot threshold. Take the snapshot
                // here (no lock held; concurrent writers queue on the compaction mutex and
                // find it done). A failure is left to the maintenance thread to retry: the
                // write itself can still be made durable.
                let _ = core.compact_when(Core::snapshot_overdue);
            }
            wal.shared().throttle();
        }
        Ok(())
    }

    fn pending<T>(&self, value: T, lsn: Option<u64>) -> Pending<T> {
        match (lsn, &self.core().wal) {
            (Some(lsn), Some(wal)) if self.durability != Durability::Buffered => Pending {
                value: Some(value),
                wait: Some((crate::sync::Arc::clone(wal.shared()), lsn, self.durability)),
            },
            _ => Pending::ready(value),
        }
    }

    /// The result of a write that changed nothing. Under `Immediate` it is acknowledged only
    /// once every record appended so far is durable: the state it decided on may come from a
    /// write still waiting for its fdatasync, and a crash that lost that write would otherwise
    /// undo an acknowledged outcome (a delete that found the key gone would see it back).
    fn unchanged<T>(&self, outcome: T) -> Pending<T> {
        match &self.core().wal {
            Some(wal) if self.durability == Durability::Immediate => {
                let tail = wal.shared().undurable_tail();
                self.pending(outcome, tail)
            }
            _ => Pending::ready(outcome),
        }
    }

    /// Runs one single-key operation atomically: `decide` sees the key's live slot (if any)
    /// and "now", and returns the change to make and the caller's result.
    fn mutate(
        &self,
        key: &[u8],
        decide: impl FnOnce(Option<&Slot>, u64) -> Result<(Change, Outcome)>,
    ) -> Result<Pending<Outcome>> {
        self.check_key(key)?;
        self.before_write()?;
        let core = self.core();
        #[cfg(test)]
        if let Some(hook) = core.before_shard_lock.lock().clone() {
            hook(key);
        }
        let mut shard = core.index.shard(core.index.shard_of(key)).write();
        // "Now" is read under the shard lock, never before it: a writer preempted on its way
        // here must not decide on a time older than what a snapshot or a reader of this key
        // has already acted on (see DESIGN.md, "Time and expiry").
        let now = core.clock.now_ms();
        let current = shard.map.get(key);
        if let Some(expired) = current.filter(|s| !s.is_live(now)) {
            core.saw_expired(expired.expires_at_ms());
        }
        let (change, outcome) = decide(current.filter(|s| s.is_live(now)), now)?;
        let entry = match &change {
            Change::None => return Ok(self.unchanged(outcome)),
            Change::Put {
                value,
                expires_at_ms,
            } => Entry::Put {
                key,
                value,
                expires_at_ms: (*expires_at_ms != 0).then_some(*expires_at_ms),
            },
            Change::Delete => Entry::Delete { key },
            Change::Expire { expires_at_ms } => Entry::Expire {
                key,
                expires_at_ms: (*expires_at_ms != 0).then_some(*expires_at_ms),
            },
        };
        if let Change::Put { value, .. } = &change {
            let old = shard
                .map
                .get(key)
                .map_or(0, |s| entry_bytes(key.len(), s.value().len()));
            let new = entry_bytes(key.len(), value.len());
            core.make_room(
                Some(&mut shard),
                key,
                new.saturating_sub(old),
                now,
                self.durability,
            )?;
        }
        // WAL first, under the shard lock: if the append is refused nothing changes, and the
        // per-key order of records matches the order of states in memory.
        let lsn = match &core.wal {
            Some(wal) => Some(wal.shared().append(now, &[entry], self.durability)?),
            None => None,
        };
        core.install(&mut shard, key, change);
        drop(shard);
        Ok(self.pending(outcome, lsn))
    }

    /// Reads `keys` and writes some of them, atomically: `decide` sees every key's live value
    /// (or `None`) and "now", all under the keys' shard locks (taken in ascending order, as a
    /// batch takes them), and returns one optional write per key (a value and what happens to
    /// its TTL) with the caller's result. The writes are one WAL record, so they are recovered
    /// all or none; no reader sees some without the others. A read-modify-write over several
    /// keys in one call: the contract's rate-limit step runs on it.
    ///
    /// # Errors
    /// Input errors (a key or value over the limits, a bad TTL), `Poisoned`, `Closed`,
    /// `MemoryLimit`; `decide`'s own error. Nothing is written then.
    ///
    /// # Panics
    /// If `decide` returns a number of writes other than `keys.len()`.
    pub fn update_many<R>(
        &self,
        keys: &[&[u8]],
        decide: impl FnOnce(&[Option<&[u8]>], u64) -> Result<(Vec<Option<(Vec<u8>, TtlPolicy)>>, R)>,
    ) -> Result<Pending<R>> {
        for key in keys {
            self.check_key(key)?;
        }
        self.before_write()?;
        let core = self.core();
        let op_shards: Vec<usize> = keys.iter().map(|k| core.index.shard_of(k)).collect();
        let mut shard_ids = op_shards.clone();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: Vec<_> = shard_ids
            .iter()
            .map(|&i| core.index.shard(i).write())
            .collect();
        let guard_of = |shard_id: &usize| {
            shard_ids
                .binary_search(shard_id)
                .expect("shard was locked above")
        };
        let now = core.clock.now_ms();
        let current: Vec<Option<(&[u8], u64)>> = keys
            .iter()
            .zip(&op_shards)
            .map(|(key, shard_id)| {
                let slot = guards[guard_of(shard_id)].map.get(*key);
                if let Some(expired) = slot.filter(|s| !s.is_live(now)) {
                    core.saw_expired(expired.expires_at_ms());
                }
                slot.filter(|s| s.is_live(now))
                    .map(|s| (s.value(), s.expires_at_ms()))
            })
            .collect();
        let values: Vec<Option<&[u8]>> = current.iter().map(|c| c.map(|(v, _)| v)).collect();
        let (writes, result) = decide(&values, now)?;
        assert_eq!(
            writes.len(),
            keys.len(),
            "update_many: decide must return one optional write per key"
        );
        let mut planned: Vec<(usize, Vec<u8>, u64)> = Vec::new();
        for (i, write) in writes.into_iter().enumerate() {
            let Some((value, ttl)) = write else { continue };
            self.check_value(&value)?;
            let expires_at_ms = match ttl {
                TtlPolicy::Set(t) => now.saturating_add(ttl_ms(t)?),
                TtlPolicy::Keep => current[i].map_or(0, |(_, at)| at),
                TtlPolicy::Clear => 0,
            };
            planned.push((i, value, expires_at_ms));
        }
        drop(current);
        drop(values);
        if planned.is_empty() {
            return Ok(self.unchanged(result));
        }
        let entries: Vec<Entry<'_>> = planned
            .iter()
            .map(|(i, value, expires_at_ms)| Entry::Put {
                key: keys[*i],
                value,
                expires_at_ms: (*expires_at_ms != 0).then_some(*expires_at_ms),
            })
            .collect();
        // The writes are one record: held to the batch limits, so the record always fits the
        // format (`Options::validate` keeps `max_batch_bytes` under its ceiling).
        let bytes = 4 + entries.iter().map(Entry::encoded_len).sum::<usize>();
        let limits = core.limits;
        if entries.len() > limits.max_batch_ops || bytes > limits.max_batch_bytes {
            return Err(Error::BatchTooLarge {
                ops: entries.len(),
                bytes,
                max_ops: limits.max_batch_ops,
                max_bytes: limits.max_batch_bytes,
            });
        }
        if core.max_memory.is_some() {
            let mut growth = 0u64;
            for (i, value, _) in &planned {
                let key = keys[*i];
                let old = guards[guard_of(&op_shards[*i])]
                    .map
                    .get(key)
                    .map_or(0, |s| entry_bytes(key.len(), s.value().len()));
                growth += entry_bytes(key.len(), value.len()).saturating_sub(old);
            }
            // The keys' own shards are locked by this thread: eviction samples the others.
            core.make_room(None, &[], growth, now, self.durability)?;
        }
        let lsn = match &core.wal {
            Some(wal) => Some(wal.shared().append(now, &entries, self.durability)?),
            None => None,
        };
        drop(entries);
        for (i, value, expires_at_ms) in planned {
            let change = Change::Put {
                value: value.into(),
                expires_at_ms,
            };
            core.install(&mut guards[guard_of(&op_shards[i])], keys[i], change);
        }
        drop(guards);
        Ok(self.pending(result, lsn))
    }

    fn apply_batch(&self, batch: &Batch) -> Result<Pending<Outcome>> {
        let core = self.core();
        let limits = core.limits;
        let mut bytes = 4usize;
        let mut ttls = Vec::with_capacity(batch.ops.len());
        for op in &batch.ops {
            match op {
                BatchOp::Set { key, value, ttl } => {
                    self.check_key(key)?;
                    self.check_value(value)?;
                    ttls.push(ttl.map(ttl_ms).transpose()?);
                    bytes += 1 + 2 + key.len() + 8 + 4 + value.len();
                }
                BatchOp::SetAt { key, value, .. } => {
                    self.check_key(key)?;
                    self.check_value(value)?;
                    ttls.push(None);
                    bytes += 1 + 2 + key.len() + 8 + 4 + value.len();
                }
                BatchOp::Delete { key } => {
                    self.check_key(key)?;
                    ttls.push(None);
                    bytes += 1 + 2 + key.len();
                }
            }
        }
        if batch.ops.len() > limits.max_batch_ops || bytes > limits.max_batch_bytes {
            return Err(Error::BatchTooLarge {
                ops: batch.ops.len(),
                bytes,
                max_ops: limits.max_batch_ops,
                max_bytes: limits.max_batch_bytes,
            });
        }
        if batch.is_empty() {
            return Ok(Pending::ready(Outcome::Unit));
        }
        self.before_write()?;
        // Lock every shard the batch touches, in ascending order (no deadlock with another
        // batch), so no reader sees part of it.
        let mut shard_ids: Vec<usize> = batch
            .ops
            .iter()
            .map(|op| match op {
                BatchOp::Set { key, .. } | BatchOp::SetAt { key, .. } | BatchOp::Delete { key } => {
                    core.index.shard_of(key)
                }
            })
            .collect();
        let op_shards = shard_ids.clone();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: Vec<_> = shard_ids
            .iter()
            .map(|&i| core.index.shard(i).write())
            .collect();
        let now = core.clock.now_ms();
        let entries: Vec<Entry<'_>> = batch
            .ops
            .iter()
            .zip(&ttls)
            .map(|(op, ttl)| match op {
                BatchOp::Set { key, value, .. } => Entry::Put {
                    key,
                    value,
                    expires_at_ms: ttl.map(|t| now.saturating_add(t)),
                },
                BatchOp::SetAt {
                    key,
                    value,
                    expires_at_ms,
                } => match expires_at_ms {
                    Some(at) if *at <= now => Entry::Delete { key },
                    _ => Entry::Put {
                        key,
                        value,
                        expires_at_ms: *expires_at_ms,
                    },
                },
                BatchOp::Delete { key } => Entry::Delete { key },
            })
            .collect();
        if core.max_memory.is_some() {
            let mut growth = 0u64;
            for (entry, shard_id) in entries.iter().zip(&op_shards) {
                if let Entry::Put { key, value, .. } = entry {
                    let g = shard_ids
                        .binary_search(shard_id)
                        .expect("shard was locked above");
                    let old = guards[g]
                        .map
                        .get(*key)
                        .map_or(0, |s| entry_bytes(key.len(), s.value().len()));
                    growth += entry_bytes(key.len(), value.len()).saturating_sub(old);
                }
            }
            // The batch's own shards are locked by this thread: eviction samples the others.
            core.make_room(None, &[], growth, now, self.durability)?;
        }
        let lsn = match &core.wal {
            Some(wal) => Some(wal.shared().append(now, &entries, self.durability)?),
            None => None,
        };
        for (entry, shard_id) in entries.iter().zip(op_shards) {
            let g = shard_ids
                .binary_search(&shard_id)
                .expect("shard was locked above");
            let change = match entry {
                Entry::Put {
                    value,
                    expires_at_ms,
                    ..
                } => Change::Put {
                    value: (*value).into(),
                    expires_at_ms: expires_at_ms.unwrap_or(0),
                },
                _ => Change::Delete,
            };
            core.install(&mut guards[g], entry.key(), change);
        }
        drop(guards);
        Ok(self.pending(Outcome::Unit, lsn))
    }
}

fn outcome_bool(o: Outcome) -> bool {
    match o {
        Outcome::Bool(b) => b,
        other => unreachable!("operation yields Bool, got {other:?}"),
    }
}

/// The future of [`Db::writable`].
#[must_use = "a future does nothing unless awaited"]
pub struct Writable {
    pub(super) db: Db,
    /// `snapshot_attempts` when an overdue snapshot was first seen.
    pub(super) attempts_at_start: Option<u64>,
}

impl Future for Writable {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = &mut *self;
        let core = this.db.core();
        let Some(wal) = &core.wal else {
            return Poll::Ready(Ok(()));
        };
        if let Err(e) = wal.shared().check_poison() {
            return Poll::Ready(Err(e));
        }
        if core.closing.load(Ordering::Acquire) {
            return Poll::Ready(Err(Error::Closed));
        }
        if core.snapshot_overdue() {
            let attempts = core.snapshot_attempts.load(Ordering::Acquire);
            let start = *this.attempts_at_start.get_or_insert(attempts);
            if attempts == start {
                // Register first, then ask and re-check: an attempt that ends after the
                // re-check wakes this waker (it is in the list before the check).
                {
                    let mut wakers = core.snapshot_wakers.lock();
                    if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                        wakers.push(cx.waker().clone());
                    }
                }
                let _ = core.maintenance_kick.try_send(());
                if core.snapshot_overdue()
                    && core.snapshot_attempts.load(Ordering::Acquire) == start
                    && !core.closing.load(Ordering::Acquire)
                {
                    return Poll::Pending;
                }
            }
        }
        if !wal.shared().poll_space(cx.waker()) {
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl Core {
    /// Notes that a key expiring at `expires_at_ms` was found expired (its expiry has passed).
    pub(super) fn saw_expired(&self, expires_at_ms: u64) {
        if expires_at_ms > self.expired_seen_ms.load(Ordering::Relaxed) {
            self.expired_seen_ms
                .fetch_max(expires_at_ms, Ordering::Relaxed);
        }
    }

    /// `Slot::touched` for the time `now_ms`.
    pub(super) fn touch_at(&self, now_ms: u64) -> u32 {
        u32::try_from(now_ms.saturating_sub(self.touch_base_ms) / TOUCH_UNIT_MS).unwrap_or(u32::MAX)
    }

    /// The LRU stamp a new entry starts with (`None` unless the policy is AllKeysLru).
    pub(super) fn touch_now(&self) -> Option<u32> {
        if self.eviction == EvictionPolicy::AllKeysLru {
            Some(self.touch_at(self.clock.now_ms()))
        } else {
            None
        }
    }

    /// Installs `change` for `key` in its (locked) shard and keeps the memory account.
    pub(super) fn install(&self, shard: &mut Shard, key: &[u8], change: Change) {
        match change {
            Change::None => {}
            Change::Put {
                value,
                expires_at_ms,
            } => {
                let added = entry_bytes(key.len(), value.len());
                let slot = Slot::new(key, &value, expires_at_ms, self.touch_now());
                self.memory_bytes.fetch_add(added, Ordering::Relaxed);
                if let Some(old) = shard.put(slot) {
                    let removed = entry_bytes(key.len(), old.value().len());
                    self.memory_bytes.fetch_sub(removed, Ordering::Relaxed);
                }
            }
            Change::Delete => {
                if let Some(old) = shard.map.take(key) {
                    self.memory_bytes
                        .fetch_sub(entry_bytes(key.len(), old.value().len()), Ordering::Relaxed);
                }
            }
            Change::Expire { expires_at_ms } => shard.set_expiry(key, expires_at_ms),
        }
    }
}
