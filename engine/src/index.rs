//! The in-memory index: the store's whole state. Keys are spread over power-of-two many
//! shards by a fixed-seed ahash; each shard is an ordered map behind a reader-writer lock, so
//! point operations on different shards never contend and a prefix scan can resume after any
//! key (the cursor) in every shard.

mod slot;

use std::collections::BTreeSet;
use std::ops::Bound;

use parking_lot::RwLock;

pub(crate) use slot::Slot;

/// Accounted overhead of one entry beyond its key and value bytes: the entry's allocation
/// header (4 bytes, 8 for keys over 255 bytes or values over 64 KiB) and malloc's own 8 bytes
/// and rounding (a 16-byte key and 100-byte value take a 128-byte chunk: 12 B), the 8-byte
/// pointer in a B-tree leaf (104-byte leaves of 11 pointers, about 60% full after ordered
/// inserts: ~16 B) and the internal nodes (~4 B). Measured as RSS growth for 1,000,000 keys of
/// 16 bytes with 100-byte values in a memory-only store (`benches/reopen.rs`): 149.6 B per
/// entry, of which 116 B are key and value, so `max_memory` counts what the process really
/// uses. An expiry adds 8 bytes to an entry's allocation and an LRU stamp 4 (up to 16 more
/// after malloc's rounding), which this average does not separate.
pub(crate) const ENTRY_OVERHEAD_BYTES: u64 = 34;

/// Granularity of [`Slot::touched`]: 16 ms units cover 2 years in a `u32`.
pub(crate) const TOUCH_UNIT_MS: u64 = 16;

impl Slot {
    #[inline]
    pub(crate) fn is_live(&self, now_ms: u64) -> bool {
        let at = self.expires_at_ms();
        at == 0 || at > now_ms
    }

    pub(crate) fn expiry(&self) -> Option<u64> {
        let at = self.expires_at_ms();
        (at != 0).then_some(at)
    }
}

/// Bytes accounted to an entry.
#[inline]
pub(crate) fn entry_bytes(key_len: usize, value_len: usize) -> u64 {
    key_len as u64 + value_len as u64 + ENTRY_OVERHEAD_BYTES
}

#[derive(Default)]
pub(crate) struct Shard {
    /// The entries, ordered (and looked up) by key bytes.
    pub(crate) map: BTreeSet<Slot>,
    /// Where the active expirer resumes in this shard.
    pub(crate) expire_cursor: Option<Box<[u8]>>,
    /// Where eviction sampling resumes in this shard.
    pub(crate) evict_cursor: Option<Box<[u8]>>,
}

/// Builds an empty index's shards from entries that hold each key once (a snapshot's): the
/// entries are collected per shard and each shard's tree is built in one go. A snapshot lists
/// each shard's keys in order, so the build is a (nearly free) sort check and a bottom-up
/// fill of full nodes, with no search per entry: faster than inserting one by one, and the
/// full leaves take less memory than the half-full ones ordered inserts leave behind.
pub(crate) struct Loader {
    shards: Vec<Vec<Slot>>,
    stamp: Option<u32>,
    /// Accounted bytes of the pushed entries.
    memory: u64,
}

impl Loader {
    pub(crate) fn new(index: &Index) -> Self {
        Loader {
            shards: (0..index.shard_count()).map(|_| Vec::new()).collect(),
            stamp: index.stamp(0),
            memory: 0,
        }
    }

    #[inline]
    pub(crate) fn push(&mut self, index: &Index, key: &[u8], value: &[u8], expires_at_ms: u64) {
        let slot = Slot::new(key, value, expires_at_ms, self.stamp);
        self.memory += entry_bytes(key.len(), value.len());
        self.shards[index.shard_of(key)].push(slot);
    }

    /// Installs the collected entries in `index` (whose shards must be empty: a key pushed
    /// twice keeps only one entry) and returns their accounted bytes.
    pub(crate) fn finish(self, index: &Index) -> u64 {
        let mut pushed = 0;
        let mut kept = 0;
        for (i, slots) in self.shards.into_iter().enumerate() {
            let mut shard = index.shard(i).write();
            debug_assert!(shard.map.is_empty(), "the loader fills empty shards only");
            pushed += slots.len();
            shard.map = slots.into_iter().collect();
            kept += shard.map.len();
        }
        if pushed == kept {
            return self.memory;
        }
        // A key was pushed twice (never from a snapshot this engine wrote): count what stayed.
        let mut memory = 0;
        for i in 0..index.shard_count() {
            for slot in &index.shard(i).read().map {
                memory += entry_bytes(slot.key().len(), slot.value().len());
            }
        }
        memory
    }
}

/// A logged change to one key, as recovery replays it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplayKind {
    /// The op's slot is the key's new entry.
    Put,
    /// The key is gone (the slot carries only the key).
    Delete,
    /// The key's entry, if any, takes the slot's expiry (the slot carries no value).
    Expire,
}

/// Fewest buffered changes per shard before a flush: below this a shard's buffer always
/// waits for more (or for the end of the log).
const REPLAY_BUFFER_MIN: usize = 1 << 16;

/// Accounted bytes all shards' buffers may hold before every buffer is flushed, unless the
/// index already holds more (then up to that much): replay's memory beyond the index stays
/// within max(this, the index), whatever the log holds (a few keys overwritten with large
/// values many times, say).
const REPLAY_BUFFER_BYTES_MIN: u64 = 256 << 20;

/// Replays the WAL's changes into an index, in order per key, without one tree search per
/// change: changes are buffered per shard, stably sorted by key (which keeps each key's
/// changes in log order; changes to different keys commute) and then either merged with the
/// shard's entries into a tree built bottom-up (many changes) or applied in key order (few).
/// A shard's buffer is flushed once it holds as many changes as its tree has entries (at least
/// [`REPLAY_BUFFER_MIN`]), and every buffer once they hold as many accounted bytes as the
/// index (at least [`REPLAY_BUFFER_BYTES_MIN`]): the buffers never hold much more than the
/// index itself, and the rebuilds cost O(1) amortized per change.
pub(crate) struct Replay {
    shards: Vec<Vec<(Slot, ReplayKind)>>,
    /// Per shard: whether the buffered changes are Puts of strictly ascending keys (then the
    /// flush needs no sort and no grouping). Checked as they arrive, against the previous
    /// change, which is still in cache.
    ascending: Vec<bool>,
    /// Per shard: accounted bytes of the buffered changes (a Delete or an Expire counts as an
    /// entry without value).
    pending_bytes: Vec<u64>,
    /// Sum of `pending_bytes`.
    buffered_bytes: u64,
    /// Per shard: buffered changes that trigger a flush.
    flush_at: Vec<usize>,
    /// Fewest buffered changes that trigger a shard's flush ([`REPLAY_BUFFER_MIN`]; tests
    /// lower it).
    buffer_min: usize,
    /// Fewest buffered bytes that trigger a flush of all ([`REPLAY_BUFFER_BYTES_MIN`]).
    bytes_min: u64,
    stamp: Option<u32>,
}

impl Replay {
    pub(crate) fn new(index: &Index) -> Self {
        Self::with_buffer_min(index, REPLAY_BUFFER_MIN, REPLAY_BUFFER_BYTES_MIN)
    }

    fn with_buffer_min(index: &Index, buffer_min: usize, bytes_min: u64) -> Self {
        let flush_at = (0..index.shard_count())
            .map(|i| index.shard(i).read().map.len().max(buffer_min))
            .collect();
        Replay {
            shards: (0..index.shard_count()).map(|_| Vec::new()).collect(),
            ascending: vec![true; index.shard_count()],
            pending_bytes: vec![0; index.shard_count()],
            buffered_bytes: 0,
            flush_at,
            buffer_min,
            bytes_min,
            stamp: index.stamp(0),
        }
    }

    /// `key` now holds `value`, expiring at `expires_at_ms` (0: never). Kept even if already
    /// expired: a later Expire may extend it (recovery purges what is still expired at the end).
    pub(crate) fn put(
        &mut self,
        index: &Index,
        key: &[u8],
        value: &[u8],
        expires_at_ms: u64,
        memory: &mut u64,
    ) {
        let slot = Slot::new(key, value, expires_at_ms, self.stamp);
        self.push(index, slot, ReplayKind::Put, memory);
    }

    /// `key` was deleted.
    pub(crate) fn delete(&mut self, index: &Index, key: &[u8], memory: &mut u64) {
        let slot = Slot::new(key, &[], 0, None);
        self.push(index, slot, ReplayKind::Delete, memory);
    }

    /// `key`'s expiry became `expires_at_ms` (0: none).
    pub(crate) fn expire(
        &mut self,
        index: &Index,
        key: &[u8],
        expires_at_ms: u64,
        memory: &mut u64,
    ) {
        let slot = Slot::new(key, &[], expires_at_ms, None);
        self.push(index, slot, ReplayKind::Expire, memory);
    }

    #[inline]
    fn push(&mut self, index: &Index, slot: Slot, kind: ReplayKind, memory: &mut u64) {
        let i = index.shard_of(slot.key());
        let bytes = entry_bytes(slot.key().len(), slot.value().len());
        self.pending_bytes[i] += bytes;
        self.buffered_bytes += bytes;
        let buffer = &mut self.shards[i];
        if self.ascending[i] {
            self.ascending[i] = kind == ReplayKind::Put
                && buffer
                    .last()
                    .is_none_or(|(last, _)| last.key() < slot.key());
        }
        buffer.push((slot, kind));
        if self.shards[i].len() >= self.flush_at[i] {
            self.flush(index, i, memory);
        } else if self.buffered_bytes >= self.bytes_min.max(*memory) {
            self.flush_all(index, memory);
        }
    }

    /// Applies every buffered change; `memory` is the accounted bytes of the index.
    pub(crate) fn finish(mut self, index: &Index, memory: &mut u64) {
        self.flush_all(index, memory);
    }

    fn flush_all(&mut self, index: &Index, memory: &mut u64) {
        for i in 0..self.shards.len() {
            self.flush(index, i, memory);
        }
    }

    fn flush(&mut self, index: &Index, i: usize, memory: &mut u64) {
        let mut ops = std::mem::take(&mut self.shards[i]);
        let ascending = std::mem::replace(&mut self.ascending[i], true);
        let pending_bytes = std::mem::replace(&mut self.pending_bytes[i], 0);
        self.buffered_bytes -= pending_bytes;
        if ops.is_empty() {
            return;
        }
        if !ascending {
            // Stable: a key's changes stay in log order.
            ops.sort_by(|a, b| a.0.key().cmp(b.0.key()));
        }
        let mut shard = index.shard(i).write();
        if ascending && shard.map.is_empty() {
            // Distinct keys in order, nothing to merge with (a log replayed from scratch):
            // the buffer is the tree, and its bytes are all Puts'.
            *memory += pending_bytes;
            shard.map = ops.into_iter().map(|(slot, _)| slot).collect();
        } else if ops.len() * 8 < shard.map.len() {
            // Few changes into a large tree: apply them one by one, in key order.
            for (slot, kind) in ops {
                let key_len = slot.key().len();
                match kind {
                    ReplayKind::Put => {
                        *memory += entry_bytes(key_len, slot.value().len());
                        if let Some(old) = shard.put(slot) {
                            *memory -= entry_bytes(key_len, old.value().len());
                        }
                    }
                    ReplayKind::Delete => {
                        if let Some(old) = shard.map.take(slot.key()) {
                            *memory -= entry_bytes(key_len, old.value().len());
                        }
                    }
                    ReplayKind::Expire => shard.set_expiry(slot.key(), slot.expires_at_ms()),
                }
            }
        } else {
            let old = std::mem::take(&mut shard.map);
            let mut old = old.into_iter().peekable();
            let mut merged = Vec::with_capacity(old.len() + ops.len());
            let mut ops = ops.into_iter().peekable();
            while let Some((first, kind)) = ops.next() {
                while let Some(before) = old.next_if(|o| o.key() < first.key()) {
                    merged.push(before);
                }
                let mut state = old.next_if(|o| o.key() == first.key());
                if let Some(s) = &state {
                    *memory -= entry_bytes(s.key().len(), s.value().len());
                }
                state = apply(state, first, kind, &mut ops);
                if let Some(s) = state {
                    *memory += entry_bytes(s.key().len(), s.value().len());
                    merged.push(s);
                }
            }
            merged.extend(old);
            // Sorted and unique: the build only checks the order and fills full nodes.
            shard.map = merged.into_iter().collect();
        }
        self.flush_at[i] = shard.map.len().max(self.buffer_min);
    }
}

/// The state of one key after its buffered changes: `first` and every following change with
/// the same key (consumed from `rest`), applied in order to `state`.
fn apply(
    mut state: Option<Slot>,
    first: Slot,
    kind: ReplayKind,
    rest: &mut std::iter::Peekable<std::vec::IntoIter<(Slot, ReplayKind)>>,
) -> Option<Slot> {
    let step = |state: Option<Slot>, slot: Slot, kind: ReplayKind| match kind {
        ReplayKind::Put => Some(slot),
        ReplayKind::Delete => None,
        ReplayKind::Expire => state.map(|s| s.with_expiry(slot.expires_at_ms())),
    };
    // Each change's slot holds the key, so the group's key is compared against the next
    // change's before that change is consumed.
    let mut current = first;
    let mut current_kind = kind;
    while let Some((next, next_kind)) = rest.next_if(|(n, _)| n.key() == current.key()) {
        state = step(state, current, current_kind);
        current = next;
        current_kind = next_kind;
    }
    step(state, current, current_kind)
}

/// One scanned entry: key, value (if asked for) and expiry (if asked for).
pub(crate) type ScanRow = (Vec<u8>, Option<Vec<u8>>, Option<u64>);

impl Shard {
    /// Installs `slot`, returning the entry it replaced.
    #[inline]
    pub(crate) fn put(&mut self, slot: Slot) -> Option<Slot> {
        self.map.replace(slot)
    }

    /// Changes the expiry of `key` (0: none), if it exists.
    pub(crate) fn set_expiry(&mut self, key: &[u8], expires_at_ms: u64) {
        if let Some(slot) = self.map.get(key)
            && slot.expires_at_ms() != expires_at_ms
        {
            let changed = slot.with_expiry(expires_at_ms);
            self.map.replace(changed);
        }
    }
}

pub(crate) struct Index {
    shards: Box<[RwLock<Shard>]>,
    mask: usize,
    hasher: ahash::RandomState,
    /// Whether entries carry an LRU stamp (only the AllKeysLru eviction policy reads it).
    stamps: bool,
}

impl Index {
    /// An empty index of `shards` shards (a power of two); `stamps`: whether entries keep
    /// an LRU access stamp.
    pub(crate) fn new(shards: usize, stamps: bool) -> Self {
        debug_assert!(shards.is_power_of_two());
        Index {
            shards: (0..shards).map(|_| RwLock::new(Shard::default())).collect(),
            mask: shards - 1,
            stamps,
            // Fixed seeds: shard placement only needs to spread keys, and a fixed layout keeps
            // runs reproducible.
            hasher: ahash::RandomState::with_seeds(0x6b65_656c, 0x7368_6172, 0x6473_0001, 0x0002),
        }
    }

    #[inline]
    pub(crate) fn shard_of(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) & self.mask
    }

    #[inline]
    pub(crate) fn shard(&self, i: usize) -> &RwLock<Shard> {
        &self.shards[i]
    }

    /// The stamp a new entry starts with: `Some(touched)` when entries keep LRU stamps.
    #[inline]
    pub(crate) fn stamp(&self, touched: u32) -> Option<u32> {
        self.stamps.then_some(touched)
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Up to `limit` live entries with `prefix`, strictly after `after`, in key order, merged
    /// across shards. Cost: O(shards × limit) per page.
    pub(crate) fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        now_ms: u64,
        with_values: bool,
    ) -> Vec<ScanRow> {
        let lower = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read();
            let range = shard
                .map
                .range::<[u8], _>((lower, Bound::Unbounded))
                .take_while(|slot| slot.key().starts_with(prefix))
                .filter(|slot| slot.is_live(now_ms))
                .take(limit);
            for slot in range {
                let (value, expiry) = match with_values {
                    true => (Some(slot.value().to_vec()), slot.expiry()),
                    false => (None, None),
                };
                found.push((slot.key().to_vec(), value, expiry));
            }
        }
        found.sort_unstable_by(|a: &ScanRow, b| a.0.cmp(&b.0));
        found.truncate(limit);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    /// Keys drawn from a small space, so changes to one key pile up.
    const KEY_SPACE: u8 = 24;
    /// Changes per generated log.
    const LOG_LEN_MAX: usize = 300;

    #[derive(Debug, Clone)]
    enum Change {
        Put(u8, u8, u64),
        Delete(u8),
        Expire(u8, u64),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            4 => (0..KEY_SPACE, any::<u8>(), 0..3u64).prop_map(|(k, v, e)| Change::Put(k, v, e)),
            2 => (0..KEY_SPACE).prop_map(Change::Delete),
            2 => (0..KEY_SPACE, 0..3u64).prop_map(|(k, e)| Change::Expire(k, e)),
        ]
    }

    fn key(k: u8) -> Vec<u8> {
        // Varying lengths, and one key a prefix of another.
        format!("k{}", "x".repeat(usize::from(k % 3)) + &k.to_string()).into_bytes()
    }

    type Model = BTreeMap<Vec<u8>, (Vec<u8>, u64)>;

    fn contents(index: &Index) -> (Model, u64) {
        let mut model = BTreeMap::new();
        let mut memory = 0;
        for i in 0..index.shard_count() {
            for slot in &index.shard(i).read().map {
                memory += entry_bytes(slot.key().len(), slot.value().len());
                model.insert(
                    slot.key().to_vec(),
                    (slot.value().to_vec(), slot.expires_at_ms()),
                );
            }
        }
        (model, memory)
    }

    proptest! {
        /// Whatever the flush path (bottom-up build, merge, one by one) and however often the
        /// buffers flush, replay leaves the index (and the memory account) exactly where
        /// applying the changes one at a time in log order does.
        #[test]
        fn replay_matches_applying_changes_in_order(
            base in proptest::collection::vec((0..KEY_SPACE, any::<u8>()), 0..40),
            log in proptest::collection::vec(change(), 0..LOG_LEN_MAX),
            sorted_log in any::<bool>(),
            buffer_min in 1usize..64,
            bytes_min in prop_oneof![Just(0u64), Just(500), Just(u64::MAX)],
            shards in prop_oneof![Just(1usize), Just(4)],
        ) {
            let mut log = log;
            if sorted_log {
                // Ordered logs take the no-sort paths.
                log.sort_by_key(|c| match c {
                    Change::Put(k, ..) | Change::Delete(k) | Change::Expire(k, _) => *k,
                });
            }
            let index = Index::new(shards, false);
            let mut model: Model = BTreeMap::new();
            let mut loader = Loader::new(&index);
            let mut seen = std::collections::BTreeSet::new();
            for (k, v) in &base {
                if seen.insert(*k) {
                    loader.push(&index, &key(*k), &[*v], 0);
                    model.insert(key(*k), (vec![*v], 0));
                }
            }
            let mut memory = loader.finish(&index);
            let mut replay = Replay::with_buffer_min(&index, buffer_min, bytes_min);
            for c in &log {
                match *c {
                    Change::Put(k, v, e) => {
                        replay.put(&index, &key(k), &[v, v], e, &mut memory);
                        model.insert(key(k), (vec![v, v], e));
                    }
                    Change::Delete(k) => {
                        replay.delete(&index, &key(k), &mut memory);
                        model.remove(&key(k));
                    }
                    Change::Expire(k, e) => {
                        replay.expire(&index, &key(k), e, &mut memory);
                        if let Some(entry) = model.get_mut(&key(k)) {
                            entry.1 = e;
                        }
                    }
                }
            }
            replay.finish(&index, &mut memory);
            let (got, counted) = contents(&index);
            prop_assert_eq!(got, model);
            prop_assert_eq!(memory, counted);
        }
    }

    #[test]
    fn a_large_ordered_log_builds_the_tree_bottom_up() {
        let index = Index::new(2, true);
        let mut memory = 0;
        let mut replay = Replay::with_buffer_min(&index, 100, u64::MAX);
        for i in 0..1_000u32 {
            let k = format!("key:{i:06}");
            replay.put(&index, k.as_bytes(), &i.to_le_bytes(), 0, &mut memory);
        }
        replay.finish(&index, &mut memory);
        let (got, counted) = contents(&index);
        assert_eq!(got.len(), 1_000);
        assert_eq!(memory, counted);
        // Entries of an LRU store carry a stamp.
        let shard = index.shard(0).read();
        let first = shard.map.first().unwrap();
        first.touch(9);
        assert_eq!(first.touched(), 9);
    }
}
