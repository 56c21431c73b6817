//! The in-memory index: the store's whole state. Keys are spread over power-of-two many
//! shards by a fixed-seed ahash; each shard is an ordered map behind a reader-writer lock, so
//! point operations on different shards never contend and a prefix scan can resume after any
//! key (the cursor) in every shard.

use std::collections::BTreeMap;
use std::ops::Bound;

use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::RwLock;

/// Accounted overhead of one entry beyond its key and value bytes: the B-tree leaf slot (a
/// 16-byte key box and a 32-byte `Slot`, leaves about 62% full: ~77 B), internal nodes (~14 B),
/// and the allocator headers and rounding of the key and value allocations (~30 B). Measured
/// with massif for 16-byte keys and 100-byte values (BENCHMARKS.md, memory): 237 B per entry
/// of which 116 B are key and value, so `max_memory` counts what the process really uses.
pub(crate) const ENTRY_OVERHEAD_BYTES: u64 = 121;

/// A stored value and its absolute expiry.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) value: Box<[u8]>,
    /// Unix ms; 0 = no expiry.
    pub(crate) expires_at_ms: u64,
    /// Last access, in units of [`TOUCH_UNIT_MS`] since the store opened (saturating), for
    /// approximate LRU eviction. Only maintained when the eviction policy needs it.
    pub(crate) touched: AtomicU32,
}

/// Granularity of [`Slot::touched`]: 16 ms units cover 2 years in a `u32`.
pub(crate) const TOUCH_UNIT_MS: u64 = 16;

impl Slot {
    pub(crate) fn new(value: Box<[u8]>, expires_at_ms: u64, touched: u32) -> Self {
        Slot {
            value,
            expires_at_ms,
            touched: AtomicU32::new(touched),
        }
    }

    pub(crate) fn touched(&self) -> u32 {
        self.touched.load(Ordering::Relaxed)
    }

    pub(crate) fn touch(&self, at: u32) {
        self.touched.store(at, Ordering::Relaxed);
    }
}

impl Slot {
    #[inline]
    pub(crate) fn is_live(&self, now_ms: u64) -> bool {
        self.expires_at_ms == 0 || self.expires_at_ms > now_ms
    }

    pub(crate) fn expiry(&self) -> Option<u64> {
        (self.expires_at_ms != 0).then_some(self.expires_at_ms)
    }
}

/// Bytes accounted to an entry.
#[inline]
pub(crate) fn entry_bytes(key_len: usize, value_len: usize) -> u64 {
    key_len as u64 + value_len as u64 + ENTRY_OVERHEAD_BYTES
}

#[derive(Default)]
pub(crate) struct Shard {
    pub(crate) map: BTreeMap<Box<[u8]>, Slot>,
    /// Where the active expirer resumes in this shard.
    pub(crate) expire_cursor: Option<Box<[u8]>>,
    /// Where eviction sampling resumes in this shard.
    pub(crate) evict_cursor: Option<Box<[u8]>>,
}

/// One scanned entry: key, value (if asked for) and expiry (if asked for).
pub(crate) type ScanRow = (Vec<u8>, Option<Vec<u8>>, Option<u64>);

pub(crate) struct Index {
    shards: Box<[RwLock<Shard>]>,
    mask: usize,
    hasher: ahash::RandomState,
}

impl Index {
    pub(crate) fn new(shards: usize) -> Self {
        debug_assert!(shards.is_power_of_two());
        Index {
            shards: (0..shards).map(|_| RwLock::new(Shard::default())).collect(),
            mask: shards - 1,
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
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(_, slot)| slot.is_live(now_ms))
                .take(limit);
            for (k, slot) in range {
                let (value, expiry) = match with_values {
                    true => (Some(slot.value.to_vec()), slot.expiry()),
                    false => (None, None),
                };
                found.push((k.to_vec(), value, expiry));
            }
        }
        found.sort_unstable_by(|a: &ScanRow, b| a.0.cmp(&b.0));
        found.truncate(limit);
        found
    }
}
