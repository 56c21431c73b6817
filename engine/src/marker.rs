//! The clean-close marker: a small file (`CLOSED`) that a store writes when it closes cleanly,
//! after its WAL writer has written and fdatasynced everything. It carries two facts:
//!
//! - `last_lsn` and the last segment (first LSN, length): every record up to `last_lsn` was
//!   fdatasynced by a store that saw no I/O failure, and that segment was its active one. If
//!   recovery later finds exactly that log (same last LSN, same last segment and length, no
//!   torn tail), what it reads is what is on disk, and the open-time rewrite of the last
//!   segment can be skipped.
//! - `floor_ms`: the store's clock when it closed, so a clock stepped back across a restart
//!   cannot bring back a key that was already seen expired.
//!
//! The file is replaced through a temporary file, fdatasynced, renamed and the directory
//! fsynced; a damaged or missing marker is simply ignored (the rewrite runs, the floor comes
//! from the log). Layout (56 bytes, little-endian): magic `KEELCLSD`, version `u32` (1),
//! reserved `u32`, `last_lsn: u64`, `floor_ms: u64`, `segment_first_lsn: u64`,
//! `segment_bytes: u64`, checksum `u64` = BLAKE3-64 of bytes 0..48.

use std::path::Path;

use crate::storage::{Storage, join};

/// File name of the marker inside a store directory.
pub(crate) const MARKER_FILE: &str = "CLOSED";
/// Its temporary name while it is being replaced (deleted at open if a crash left it).
pub(crate) const MARKER_TMP_FILE: &str = "CLOSED.tmp";

const MAGIC: [u8; 8] = *b"KEELCLSD";
const VERSION: u32 = 1;
const MARKER_BYTES: usize = 56;
const SUMMED_BYTES: usize = MARKER_BYTES - 8;

const _: () = assert!(MARKER_BYTES == 8 + 4 + 4 + 8 + 8 + 8 + 8 + 8);

/// What a clean close recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CleanClose {
    /// Every record up to this LSN was fdatasynced before the marker was written.
    pub(crate) last_lsn: u64,
    /// The store's clock at close (Unix ms).
    pub(crate) floor_ms: u64,
    /// First LSN (the name) of the segment the store appended to.
    pub(crate) segment_first_lsn: u64,
    /// That segment's length at close.
    pub(crate) segment_bytes: u64,
}

fn checksum(bytes: &[u8]) -> u64 {
    let hash = blake3::hash(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

fn encode(m: CleanClose) -> [u8; MARKER_BYTES] {
    let mut out = [0u8; MARKER_BYTES];
    out[..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_le_bytes());
    out[16..24].copy_from_slice(&m.last_lsn.to_le_bytes());
    out[24..32].copy_from_slice(&m.floor_ms.to_le_bytes());
    out[32..40].copy_from_slice(&m.segment_first_lsn.to_le_bytes());
    out[40..48].copy_from_slice(&m.segment_bytes.to_le_bytes());
    let sum = checksum(&out[..SUMMED_BYTES]);
    out[SUMMED_BYTES..].copy_from_slice(&sum.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<CleanClose> {
    if bytes.len() != MARKER_BYTES || bytes[..8] != MAGIC {
        return None;
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION || u64_at(SUMMED_BYTES) != checksum(&bytes[..SUMMED_BYTES]) {
        return None;
    }
    Some(CleanClose {
        last_lsn: u64_at(16),
        floor_ms: u64_at(24),
        segment_first_lsn: u64_at(32),
        segment_bytes: u64_at(40),
    })
}

/// Reads the marker in `dir`, if there is a valid one. A damaged marker is ignored: it only
/// ever lets recovery skip work, so without it recovery does the full work.
pub(crate) fn read(storage: &dyn Storage, dir: &Path) -> Option<CleanClose> {
    let bytes = storage.read(&join(dir, MARKER_FILE)).ok()?;
    decode(&bytes)
}

/// Replaces the marker in `dir` with `m`: temp file, fdatasync, rename, directory fsync.
pub(crate) fn write(storage: &dyn Storage, dir: &Path, m: CleanClose) -> std::io::Result<()> {
    let tmp = join(dir, MARKER_TMP_FILE);
    let mut file = storage.create(&tmp)?;
    file.write_all(&encode(m))?;
    file.sync_data()?;
    drop(file);
    storage.rename(&tmp, &join(dir, MARKER_FILE))?;
    // fsync the directory so the rename survives power loss.
    storage.sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_any_damage() {
        let m = CleanClose {
            last_lsn: 42,
            floor_ms: 1_700_000_000_000,
            segment_first_lsn: 7,
            segment_bytes: 4096,
        };
        let bytes = encode(m);
        assert_eq!(decode(&bytes), Some(m));
        for bit in 0..MARKER_BYTES * 8 {
            let mut b = bytes;
            b[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode(&b), None, "bit {bit} flipped");
        }
        assert_eq!(decode(&bytes[..MARKER_BYTES - 1]), None);
    }
}
