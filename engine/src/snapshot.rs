//! Snapshots (checkpoints): every live entry of the store written to one checksummed file, so
//! the WAL segments it covers can be deleted and reopening reads one sequential file plus a
//! short WAL tail instead of the whole history.
//!
//! A snapshot is *fuzzy*: it is taken while writes continue. It is stamped with `lsn`, the last
//! LSN appended before copying began; every record up to `lsn` is in it, and some later states
//! may be too. Recovery loads it and replays the WAL from `lsn + 1`. That is correct because
//! records are after-images (see DESIGN.md, "Snapshots"). Before a snapshot is installed the
//! WAL is made durable up to the last LSN appended when copying ended, so the snapshot never
//! holds a state whose record could be lost (which would make part of a batch visible).
//!
//! Byte layout (little-endian): a 40-byte header (`KEELSNAP`, version, reserved, lsn, time_ms,
//! header checksum), the body (entries: `key_len u16, key, expires_at_ms u64, value_len u32,
//! value`), and a 24-byte footer (entry count, body length, body checksum). Checksums are the
//! first 8 bytes of BLAKE3. The counts sit in the footer so the file can be written as a stream.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::record::DecodeError;
use crate::storage::{Storage, WritableFile, join};

/// Magic bytes at the start of every snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"KEELSNAP";
/// The snapshot format version written by this build.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;
/// Bytes in the snapshot header.
pub const SNAPSHOT_HEADER_BYTES: usize = 40;
/// Bytes in the snapshot footer.
pub const SNAPSHOT_FOOTER_BYTES: usize = 24;

const PREFIX: &str = "snapshot-";
const SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".snap.tmp";

const _: () = assert!(SNAPSHOT_HEADER_BYTES == 8 + 4 + 4 + 8 + 8 + 8);
const _: () = assert!(SNAPSHOT_FOOTER_BYTES == 8 + 8 + 8);

/// The file name of the snapshot covering records up to `lsn`.
pub(crate) fn snapshot_name(lsn: u64) -> String {
    format!("{PREFIX}{lsn:020}{SUFFIX}")
}

fn tmp_name(lsn: u64) -> String {
    format!("{PREFIX}{lsn:020}{TMP_SUFFIX}")
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Snapshots in `dir`, newest first.
pub(crate) fn list(storage: &dyn Storage, dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut snaps: Vec<(u64, PathBuf)> = storage
        .list(dir)?
        .into_iter()
        .filter_map(|n| parse_name(&n).map(|lsn| (lsn, join(dir, &n))))
        .collect();
    snaps.sort_by_key(|s| std::cmp::Reverse(s.0));
    Ok(snaps)
}

/// Leftover temporary files from a snapshot interrupted by a crash.
pub(crate) fn list_tmp(storage: &dyn Storage, dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(storage
        .list(dir)?
        .into_iter()
        .filter(|n| n.starts_with(PREFIX) && n.ends_with(TMP_SUFFIX))
        .map(|n| join(dir, &n))
        .collect())
}

fn checksum(bytes: &[u8]) -> u64 {
    let hash = blake3::hash(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Appends one entry to a body chunk.
pub(crate) fn encode_entry(chunk: &mut Vec<u8>, key: &[u8], value: &[u8], expires_at_ms: u64) {
    chunk.extend_from_slice(&(key.len() as u16).to_le_bytes());
    chunk.extend_from_slice(key);
    chunk.extend_from_slice(&expires_at_ms.to_le_bytes());
    chunk.extend_from_slice(&(value.len() as u32).to_le_bytes());
    chunk.extend_from_slice(value);
}

/// Writes a snapshot file as a stream: header, body chunks, footer. The body is hashed as it
/// goes, so a snapshot of any size needs only one chunk in memory at a time.
pub(crate) struct SnapshotWriter {
    file: Box<dyn WritableFile>,
    tmp: PathBuf,
    path: PathBuf,
    hasher: blake3::Hasher,
    body_len: u64,
    entries: u64,
}

impl SnapshotWriter {
    /// Starts the temporary file for the snapshot covering records up to `lsn`.
    pub(crate) fn create(
        storage: &dyn Storage,
        dir: &Path,
        lsn: u64,
        time_ms: u64,
    ) -> Result<Self> {
        let tmp = join(dir, &tmp_name(lsn));
        let _ = storage.remove(&tmp);
        let mut file = storage.create(&tmp)?;
        let mut header = Vec::with_capacity(SNAPSHOT_HEADER_BYTES);
        header.extend_from_slice(&SNAPSHOT_MAGIC);
        header.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&lsn.to_le_bytes());
        header.extend_from_slice(&time_ms.to_le_bytes());
        let sum = checksum(&header);
        header.extend_from_slice(&sum.to_le_bytes());
        file.write_all(&header)?;
        Ok(SnapshotWriter {
            file,
            tmp,
            path: join(dir, &snapshot_name(lsn)),
            hasher: blake3::Hasher::new(),
            body_len: 0,
            entries: 0,
        })
    }

    /// Appends a chunk of `entries` encoded entries.
    pub(crate) fn write_chunk(&mut self, chunk: &[u8], entries: u64) -> Result<()> {
        self.file.write_all(chunk)?;
        self.hasher.update(chunk);
        self.body_len += chunk.len() as u64;
        self.entries += entries;
        Ok(())
    }

    /// Writes the footer, fdatasyncs, renames into place and fsyncs the directory.
    pub(crate) fn install(mut self, storage: &dyn Storage, dir: &Path) -> Result<(PathBuf, u64)> {
        let mut footer = Vec::with_capacity(SNAPSHOT_FOOTER_BYTES);
        footer.extend_from_slice(&self.entries.to_le_bytes());
        footer.extend_from_slice(&self.body_len.to_le_bytes());
        let hash = self.hasher.finalize();
        footer.extend_from_slice(&hash.as_bytes()[..8]);
        self.file.write_all(&footer)?;
        self.file.sync_data()?;
        drop(self.file);
        storage.rename(&self.tmp, &self.path)?;
        // fsync the directory so the rename (the snapshot's existence) survives power loss.
        storage.sync_dir(dir)?;
        Ok((self.path, self.entries))
    }
}

/// A decoded snapshot header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Every WAL record up to this LSN is contained in the snapshot.
    pub lsn: u64,
    /// The store's clock when the snapshot was taken (Unix ms).
    pub time_ms: u64,
    /// Number of entries.
    pub entries: u64,
}

/// Verifies a snapshot's checksums and calls `apply(key, value, expires_at_ms)` per entry.
/// Never panics and never allocates from an unchecked length.
pub fn decode(
    bytes: &[u8],
    mut apply: impl FnMut(&[u8], &[u8], u64),
) -> std::result::Result<SnapshotHeader, DecodeError> {
    if bytes.len() < SNAPSHOT_HEADER_BYTES + SNAPSHOT_FOOTER_BYTES {
        return Err(DecodeError::Truncated {
            needed: SNAPSHOT_HEADER_BYTES + SNAPSHOT_FOOTER_BYTES,
            have: bytes.len(),
        });
    }
    if bytes[..8] != SNAPSHOT_MAGIC {
        return Err(DecodeError::Invalid("not a keel snapshot (bad magic)"));
    }
    if checksum(&bytes[..32]) != u64_at(bytes, 32) {
        return Err(DecodeError::Invalid("snapshot header checksum mismatch"));
    }
    if u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) != SNAPSHOT_FORMAT_VERSION {
        return Err(DecodeError::Invalid("unsupported snapshot format version"));
    }
    let footer = bytes.len() - SNAPSHOT_FOOTER_BYTES;
    let header = SnapshotHeader {
        lsn: u64_at(bytes, 16),
        time_ms: u64_at(bytes, 24),
        entries: u64_at(bytes, footer),
    };
    let body_len = u64_at(bytes, footer + 8);
    if body_len != (footer - SNAPSHOT_HEADER_BYTES) as u64 {
        return Err(DecodeError::Invalid(
            "snapshot length does not match its footer",
        ));
    }
    let body = &bytes[SNAPSHOT_HEADER_BYTES..footer];
    if checksum(body) != u64_at(bytes, footer + 16) {
        return Err(DecodeError::Invalid("snapshot body checksum mismatch"));
    }
    let mut rest = body;
    let mut seen = 0u64;
    while !rest.is_empty() {
        let (key, after_key) = take_len_prefixed(rest, 2)?;
        if after_key.len() < 8 {
            return Err(DecodeError::Invalid("snapshot entry cut short"));
        }
        let expires = u64_at(after_key, 0);
        let (value, after_value) = take_len_prefixed(&after_key[8..], 4)?;
        apply(key, value, expires);
        rest = after_value;
        seen += 1;
    }
    if seen != header.entries {
        return Err(DecodeError::Invalid("snapshot entry count mismatch"));
    }
    Ok(header)
}

fn take_len_prefixed(
    bytes: &[u8],
    width: usize,
) -> std::result::Result<(&[u8], &[u8]), DecodeError> {
    if bytes.len() < width {
        return Err(DecodeError::Invalid("snapshot entry cut short"));
    }
    let len = if width == 2 {
        u16::from_le_bytes([bytes[0], bytes[1]]) as usize
    } else {
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
    };
    let rest = &bytes[width..];
    if rest.len() < len {
        return Err(DecodeError::Invalid("snapshot entry runs past the end"));
    }
    Ok(rest.split_at(len))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Loads the newest snapshot in `dir`, if any, via `apply`. A damaged newest snapshot is
/// `Corruption` (it was installed whole, so damage is real, not a torn write).
///
/// Reads the file through [`Storage::read_mapped`]: the caller holds the store's lock, and an
/// installed snapshot never changes. The map is dropped before this returns.
pub(crate) fn load_newest(
    storage: &dyn Storage,
    dir: &Path,
    apply: impl FnMut(&[u8], &[u8], u64),
) -> Result<Option<(SnapshotHeader, PathBuf)>> {
    let Some((lsn, path)) = list(storage, dir)?.into_iter().next() else {
        return Ok(None);
    };
    let bytes = storage.read_mapped(&path)?;
    let header = decode(&bytes, apply)
        .map_err(|e| Error::corruption(&path, 0, format!("snapshot cannot be loaded: {e:?}")))?;
    if header.lsn != lsn {
        return Err(Error::corruption(
            &path,
            16,
            format!("header says LSN {}, file name says {lsn}", header.lsn),
        ));
    }
    Ok(Some((header, path)))
}

/// The index build recovery runs on a snapshot's entries, on its own: `benches/reopen.rs`
/// times it behind each snapshot format it compares. Not part of the supported API.
#[doc(hidden)]
pub struct IndexBuild {
    index: crate::index::Index,
    loader: crate::index::Loader,
}

impl IndexBuild {
    /// An empty index of `shards` shards, without LRU stamps.
    ///
    /// # Panics
    /// If `shards` is not a power of two.
    pub fn new(shards: usize) -> Self {
        assert!(shards.is_power_of_two(), "shards must be a power of two");
        let index = crate::index::Index::new(shards, false);
        let loader = crate::index::Loader::new(&index);
        IndexBuild { index, loader }
    }

    /// Adds one entry (each key at most once).
    #[inline]
    pub fn push(&mut self, key: &[u8], value: &[u8], expires_at_ms: u64) {
        self.loader.push(&self.index, key, value, expires_at_ms);
    }

    /// Builds the shards' trees; returns the entries and their accounted bytes. Dropping the
    /// result frees the index.
    pub fn finish(self) -> (u64, u64, impl Sized) {
        let memory = self.loader.finish(&self.index);
        let entries = (0..self.index.shard_count())
            .map(|i| self.index.shard(i).read().map.len() as u64)
            .sum();
        (entries, memory, self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::FsStorage;
        let mut w = SnapshotWriter::create(&storage, dir.path(), 7, 1234).unwrap();
        let mut chunk = Vec::new();
        encode_entry(&mut chunk, b"a", b"1", 0);
        encode_entry(&mut chunk, b"\x00\xff", b"", 99);
        w.write_chunk(&chunk, 2).unwrap();
        let (path, entries) = w.install(&storage, dir.path()).unwrap();
        assert_eq!(entries, 2);
        std::fs::read(path).unwrap()
    }

    #[test]
    fn round_trips() {
        let mut got = Vec::new();
        let h = decode(&sample(), |k, v, e| got.push((k.to_vec(), v.to_vec(), e))).unwrap();
        assert_eq!(
            h,
            SnapshotHeader {
                lsn: 7,
                time_ms: 1234,
                entries: 2
            }
        );
        assert_eq!(
            got,
            vec![
                (b"a".to_vec(), b"1".to_vec(), 0),
                (b"\x00\xff".to_vec(), vec![], 99)
            ]
        );
    }

    #[test]
    fn any_flipped_bit_or_truncation_is_rejected() {
        let good = sample();
        for i in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode(&bad, |_, _, _| {}).is_err(), "bit {i}");
        }
        for n in 0..good.len() {
            assert!(decode(&good[..n], |_, _, _| {}).is_err(), "prefix {n}");
        }
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(parse_name(&snapshot_name(42)), Some(42));
        assert_eq!(parse_name(&tmp_name(42)), None);
    }
}
