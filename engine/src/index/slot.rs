//! One index entry in one heap allocation, behind an 8-byte (thin) pointer: a small header,
//! then the key, then the value. The B-tree stores only the pointer, so a leaf holds 11
//! entries in 104 bytes, and an entry costs one allocator header instead of two.
//!
//! This is the engine's only unsafe code outside memory-mapped files: a fat `Box<[u8]>` in
//! the tree (16 bytes) plus a second allocation per entry did not fit the memory budget
//! (DESIGN.md, "Memory"). The unsafe surface is the raw allocation, the reads of its header,
//! and the two slices and the atomic handed out; every other module sees a safe type.
//!
//! Layout (native endianness: it never leaves the process), allocated with alignment 4:
//!
//! ```text
//! short form (key < 256 B, value < 64 KiB):  flags u8 | key_len u8  | value_len u16   (4 B)
//! long form:                       flags u8 | pad u8 | key_len u16 | value_len u32   (8 B)
//! then, if FLAG_TOUCHED:  touched u32 (an `AtomicU32`, 4-aligned)
//! then, if FLAG_EXPIRES:  expires_at_ms u64 (unaligned)
//! then key bytes, then value bytes
//! ```
//!
//! A 16-byte key and a 100-byte value without TTL take 120 bytes, one 128-byte malloc chunk.
//! The LRU stamp is only allocated when the store evicts by LRU, and the expiry only when the
//! entry has one: an entry pays for what it uses.

#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::borrow::Borrow;
use std::cmp::Ordering as CmpOrdering;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

const FLAG_EXPIRES: u8 = 1;
const FLAG_TOUCHED: u8 = 2;
const FLAG_LONG: u8 = 4;

const SHORT_HEADER_BYTES: usize = 4;
const LONG_HEADER_BYTES: usize = 8;
const TOUCHED_BYTES: usize = 4;
const EXPIRES_BYTES: usize = 8;
/// Alignment of every allocation: what the `AtomicU32` stamp needs.
const ALIGN: usize = std::mem::align_of::<AtomicU32>();

// The stamp sits right after a header, so both header sizes keep it aligned.
const _: () = assert!(SHORT_HEADER_BYTES.is_multiple_of(ALIGN));
const _: () = assert!(LONG_HEADER_BYTES.is_multiple_of(ALIGN));
const _: () = assert!(ALIGN == 4);

/// Where the parts of one entry sit in its allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parts {
    flags: u8,
    key_len: usize,
    value_len: usize,
}

impl Parts {
    fn header_bytes(&self) -> usize {
        if self.flags & FLAG_LONG != 0 {
            LONG_HEADER_BYTES
        } else {
            SHORT_HEADER_BYTES
        }
    }

    fn touched_at(&self) -> Option<usize> {
        (self.flags & FLAG_TOUCHED != 0).then(|| self.header_bytes())
    }

    fn expires_at(&self) -> Option<usize> {
        let at = self.header_bytes() + self.touched_at().map_or(0, |_| TOUCHED_BYTES);
        (self.flags & FLAG_EXPIRES != 0).then_some(at)
    }

    fn key_at(&self) -> usize {
        self.header_bytes()
            + self.touched_at().map_or(0, |_| TOUCHED_BYTES)
            + self.expires_at().map_or(0, |_| EXPIRES_BYTES)
    }

    fn value_at(&self) -> usize {
        self.key_at() + self.key_len
    }

    fn total(&self) -> usize {
        self.value_at() + self.value_len
    }

    fn layout(&self) -> Layout {
        // Cannot fail: the total is at most 8 + 4 + 8 + u16::MAX + u32::MAX bytes, far below
        // isize::MAX on the 64-bit targets the engine supports, and ALIGN is a power of two.
        Layout::from_size_align(self.total(), ALIGN).expect("entry layout is valid")
    }
}

/// A stored entry: key, value, absolute expiry and (under LRU eviction) the last access
/// stamp, in one allocation. Ordered, compared and borrowed as its key bytes, so a
/// `BTreeSet<Slot>` is looked up and range-scanned with `&[u8]`.
pub(crate) struct Slot {
    ptr: NonNull<u8>,
}

// SAFETY: a `Slot` owns its allocation like a `Box` does. Its bytes are never written after
// construction except the touched stamp, which is an `AtomicU32`; so sending a `Slot` to
// another thread or sharing `&Slot` between threads is as safe as for `Box<(Box<[u8]>,
// AtomicU32)>`.
unsafe impl Send for Slot {}
// SAFETY: see `Send` above: shared access only reads immutable bytes or the atomic stamp.
unsafe impl Sync for Slot {}

impl Slot {
    /// A new entry. `expires_at_ms` 0 means no expiry; `touched` is `Some` only when the store
    /// keeps LRU stamps.
    ///
    /// # Panics
    /// If `key` is longer than `u16::MAX` bytes or `value` longer than `u32::MAX` bytes (the
    /// engine's limits are far below: `KEY_BYTES_CEILING`, `VALUE_BYTES_CEILING`), or if the
    /// allocation fails (as `Box` does).
    pub(crate) fn new(key: &[u8], value: &[u8], expires_at_ms: u64, touched: Option<u32>) -> Self {
        let key_len = u16::try_from(key.len()).expect("key length fits the entry header");
        let value_len = u32::try_from(value.len()).expect("value length fits the entry header");
        let short = key_len <= u16::from(u8::MAX) && value_len <= u32::from(u16::MAX);
        let mut flags = 0;
        if !short {
            flags |= FLAG_LONG;
        }
        if touched.is_some() {
            flags |= FLAG_TOUCHED;
        }
        if expires_at_ms != 0 {
            flags |= FLAG_EXPIRES;
        }
        let parts = Parts {
            flags,
            key_len: key.len(),
            value_len: value.len(),
        };
        let layout = parts.layout();
        // SAFETY: the layout is never zero-sized (the header alone is at least 4 bytes).
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        let mut header = [0u8; LONG_HEADER_BYTES];
        header[0] = flags;
        if short {
            header[1] = key_len as u8;
            header[2..4].copy_from_slice(&(value_len as u16).to_ne_bytes());
        } else {
            header[2..4].copy_from_slice(&key_len.to_ne_bytes());
            header[4..8].copy_from_slice(&value_len.to_ne_bytes());
        }
        // SAFETY: every write below stays inside the allocation of `parts.total()` bytes
        // (offsets come from `parts`, which sums exactly these pieces); the sources are
        // separate Rust values or slices, so they cannot overlap the fresh allocation; the
        // stamp is written at a 4-aligned offset of a 4-aligned allocation.
        unsafe {
            let base = ptr.as_ptr();
            std::ptr::copy_nonoverlapping(header.as_ptr(), base, parts.header_bytes());
            if let (Some(at), Some(stamp)) = (parts.touched_at(), touched) {
                base.add(at)
                    .cast::<AtomicU32>()
                    .write(AtomicU32::new(stamp));
            }
            if let Some(at) = parts.expires_at() {
                let bytes = expires_at_ms.to_ne_bytes();
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(at), EXPIRES_BYTES);
            }
            std::ptr::copy_nonoverlapping(key.as_ptr(), base.add(parts.key_at()), key.len());
            std::ptr::copy_nonoverlapping(value.as_ptr(), base.add(parts.value_at()), value.len());
        }
        let slot = Slot { ptr };
        debug_assert_eq!(slot.parts(), parts);
        slot
    }

    /// This entry with another expiry (0: none), keeping its key, value and stamp.
    pub(crate) fn with_expiry(&self, expires_at_ms: u64) -> Slot {
        let touched = self.touched_stamp().map(|t| t.load(Ordering::Relaxed));
        Slot::new(self.key(), self.value(), expires_at_ms, touched)
    }

    fn parts(&self) -> Parts {
        let base = self.ptr.as_ptr();
        // SAFETY: every allocation starts with a header of at least 4 bytes, and its first
        // byte says whether it is 8; the header bytes are never written after construction.
        unsafe {
            let flags = base.read();
            if flags & FLAG_LONG == 0 {
                let value_len = u16::from_ne_bytes([base.add(2).read(), base.add(3).read()]);
                Parts {
                    flags,
                    key_len: usize::from(base.add(1).read()),
                    value_len: usize::from(value_len),
                }
            } else {
                let mut h = [0u8; LONG_HEADER_BYTES];
                std::ptr::copy_nonoverlapping(base, h.as_mut_ptr(), LONG_HEADER_BYTES);
                Parts {
                    flags,
                    key_len: usize::from(u16::from_ne_bytes([h[2], h[3]])),
                    value_len: u32::from_ne_bytes([h[4], h[5], h[6], h[7]]) as usize,
                }
            }
        }
    }

    /// The key bytes.
    #[inline]
    pub(crate) fn key(&self) -> &[u8] {
        let parts = self.parts();
        // SAFETY: `key_at .. key_at + key_len` lies inside the allocation, was initialised by
        // `new`, is never written again, and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(parts.key_at()), parts.key_len) }
    }

    /// The value bytes.
    #[inline]
    pub(crate) fn value(&self) -> &[u8] {
        let parts = self.parts();
        // SAFETY: as for `key`, with the value's range.
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr().add(parts.value_at()), parts.value_len)
        }
    }

    /// Unix ms; 0 = no expiry.
    #[inline]
    pub(crate) fn expires_at_ms(&self) -> u64 {
        match self.parts().expires_at() {
            None => 0,
            Some(at) => {
                let mut bytes = [0u8; EXPIRES_BYTES];
                // SAFETY: `at .. at + 8` lies inside the allocation, initialised by `new` and
                // never written again; the copy has no alignment requirement.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.ptr.as_ptr().add(at),
                        bytes.as_mut_ptr(),
                        EXPIRES_BYTES,
                    );
                }
                u64::from_ne_bytes(bytes)
            }
        }
    }

    fn touched_stamp(&self) -> Option<&AtomicU32> {
        let at = self.parts().touched_at()?;
        // SAFETY: a 4-aligned offset of a 4-aligned allocation, initialised with an
        // `AtomicU32` by `new`, only ever accessed through this `&AtomicU32` (no byte slice
        // covers it), and it lives as long as `self`.
        Some(unsafe { &*self.ptr.as_ptr().add(at).cast::<AtomicU32>() })
    }

    /// Last access, in units of [`TOUCH_UNIT_MS`](super::TOUCH_UNIT_MS) since the store
    /// opened, for approximate LRU eviction; 0 when the store keeps no stamps.
    pub(crate) fn touched(&self) -> u32 {
        self.touched_stamp()
            .map_or(0, |t| t.load(Ordering::Relaxed))
    }

    /// Records an access (a no-op when the store keeps no stamps).
    pub(crate) fn touch(&self, at: u32) {
        if let Some(t) = self.touched_stamp() {
            t.store(at, Ordering::Relaxed);
        }
    }

    /// Bytes of the allocation (for tests and the memory budget's comment).
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.parts().total()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let layout = self.parts().layout();
        // SAFETY: `ptr` was allocated by `new` with exactly this layout (the header it is
        // computed from is never modified) and is freed once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl Borrow<[u8]> for Slot {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

// Equality and order are the key's, consistent with `[u8]`'s (required by `Borrow`).
impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Slot {}

impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Slot {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.key().cmp(other.key())
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("key_len", &self.key().len())
            .field("value_len", &self.value().len())
            .field("expires_at_ms", &self.expires_at_ms())
            .field("touched", &self.touched())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn check(key: &[u8], value: &[u8], expires_at_ms: u64, touched: Option<u32>) {
        let slot = Slot::new(key, value, expires_at_ms, touched);
        assert_eq!(slot.key(), key);
        assert_eq!(slot.value(), value);
        assert_eq!(slot.expires_at_ms(), expires_at_ms);
        assert_eq!(slot.touched(), touched.unwrap_or(0));
        slot.touch(7);
        assert_eq!(slot.touched(), if touched.is_some() { 7 } else { 0 });
        assert_eq!(slot.key(), key, "touching wrote outside the stamp");
        assert_eq!(slot.value(), value, "touching wrote outside the stamp");
        let moved = slot.with_expiry(expires_at_ms ^ 5);
        assert_eq!(moved.key(), key);
        assert_eq!(moved.value(), value);
        assert_eq!(moved.expires_at_ms(), expires_at_ms ^ 5);
        assert_eq!(moved.touched(), slot.touched());
    }

    #[test]
    fn every_form_round_trips() {
        let long_key = vec![0xabu8; 300];
        let max_key = vec![0x01u8; u16::MAX as usize];
        let long_value = vec![0xcdu8; 70_000];
        let keys: [&[u8]; 5] = [b"", b"k", &[0u8; 16], &long_key, &max_key];
        let values: [&[u8]; 5] = [b"", b"v", &[0x61u8; 100], &[7u8; 65_535], &long_value];
        for key in keys {
            for value in values {
                for expires in [0, 1, u64::MAX, 0x0102_0304_0506_0708] {
                    for touched in [None, Some(0), Some(u32::MAX)] {
                        check(key, value, expires, touched);
                    }
                }
            }
        }
    }

    #[test]
    fn the_common_entry_fits_a_128_byte_malloc_chunk() {
        // 16-byte key, 100-byte value, no TTL, no LRU stamp: 4 + 116 = 120 bytes, which glibc
        // serves from a 128-byte chunk (request + 8, rounded up to 16).
        let slot = Slot::new(&[1u8; 16], &[2u8; 100], 0, None);
        assert_eq!(slot.allocated_bytes(), 120);
        assert_eq!(std::mem::size_of::<Slot>(), 8);
        assert_eq!(std::mem::size_of::<Option<Slot>>(), 8);
    }

    #[test]
    fn a_set_of_slots_orders_and_finds_by_key_bytes() {
        let keys: [&[u8]; 6] = [b"b", b"a", b"", b"ab", b"\xff", b"a\x00"];
        let set: BTreeSet<Slot> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| Slot::new(k, &[i as u8], i as u64, None))
            .collect();
        let mut sorted = keys.to_vec();
        sorted.sort();
        let got: Vec<&[u8]> = set.iter().map(Slot::key).collect();
        assert_eq!(got, sorted);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(set.get(*k).map(Slot::value), Some(&[i as u8][..]));
        }
        assert!(!set.contains(&b"zz"[..]));
        use std::ops::Bound;
        let after_a: Vec<&[u8]> = set
            .range::<[u8], _>((Bound::Excluded(&b"a"[..]), Bound::Unbounded))
            .map(Slot::key)
            .collect();
        assert_eq!(after_a, vec![&b"a\x00"[..], b"ab", b"b", b"\xff"]);
    }

    #[test]
    fn stamps_are_shared_across_threads() {
        let slot = std::sync::Arc::new(Slot::new(b"key", b"value", 0, Some(0)));
        let handles: Vec<_> = (1..=4u32)
            .map(|t| {
                let slot = std::sync::Arc::clone(&slot);
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        slot.touch(t * 1000 + i);
                        assert_eq!(slot.key(), b"key");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(slot.touched() >= 1000);
        assert_eq!(slot.value(), b"value");
    }
}
