//! The WAL's byte format: segment headers and framed records. Pure functions, no I/O, so the
//! decoders can be fuzzed directly. Layouts are documented in `engine/DESIGN.md`; every
//! integer is fixed-width little-endian.
//!
//! Decoders never panic and never allocate from a length they have not checked against the
//! bytes actually present.

/// Magic bytes at the start of every WAL segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"KEELWAL\0";
/// The WAL format version written by this build (see the format log in DESIGN.md). Version 2
/// adds a commit marker in front of every batch; version 1 segments (no markers) are still read.
pub const WAL_FORMAT_VERSION: u32 = 2;
/// The oldest WAL format version this build reads.
pub const WAL_FORMAT_VERSION_MIN: u32 = 1;
/// Bytes in a segment header.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Bytes in a record frame header (length, checksum, LSN, time).
pub const FRAME_HEADER_BYTES: usize = 28;
/// Bytes in a commit marker: a frame header whose LSN is 0 and a 16-byte body (the LSN that was
/// durable when the batch was written, and the batch's first LSN).
pub const COMMIT_MARKER_BYTES: usize = FRAME_HEADER_BYTES + 16;
/// The largest record body accepted by the decoder: 1 GiB.
pub const RECORD_BODY_BYTES_MAX: usize = 1 << 30;

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_EXPIRE: u8 = 3;

/// Expiry encoded as 0 means "no expiry"; every real expiry is a Unix time in ms > 0.
const NO_EXPIRY: u64 = 0;

const _: () = assert!(SEGMENT_HEADER_BYTES == 8 + 4 + 4 + 8 + 8);
const _: () = assert!(FRAME_HEADER_BYTES == 4 + 8 + 8 + 8);
const _: () = assert!(RECORD_BODY_BYTES_MAX <= u32::MAX as usize);

/// One change, as an after-image: replaying it twice leaves the same state as once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    /// The key now holds `value`, expiring at `expires_at_ms` (Unix ms) if set.
    Put {
        /// Key bytes.
        key: &'a [u8],
        /// Value bytes.
        value: &'a [u8],
        /// Absolute expiry, Unix milliseconds.
        expires_at_ms: Option<u64>,
    },
    /// The key no longer exists.
    Delete {
        /// Key bytes.
        key: &'a [u8],
    },
    /// The key keeps its value; its expiry is now `expires_at_ms` (`None`: no expiry).
    Expire {
        /// Key bytes.
        key: &'a [u8],
        /// Absolute expiry, Unix milliseconds.
        expires_at_ms: Option<u64>,
    },
}

impl Entry<'_> {
    /// Bytes this entry takes in a record body.
    pub fn encoded_len(&self) -> usize {
        match self {
            Entry::Put { key, value, .. } => 1 + 2 + key.len() + 8 + 4 + value.len(),
            Entry::Delete { key } => 1 + 2 + key.len(),
            Entry::Expire { key, .. } => 1 + 2 + key.len() + 8,
        }
    }

    /// The entry's key.
    pub fn key(&self) -> &[u8] {
        match self {
            Entry::Put { key, .. } | Entry::Delete { key } | Entry::Expire { key, .. } => key,
        }
    }
}

/// A decoded record frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Log sequence number: consecutive across the whole log.
    pub lsn: u64,
    /// The store's clock when the record was written (Unix ms).
    pub time_ms: u64,
    /// The encoded entries.
    pub body: &'a [u8],
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the frame needs: a torn write if at the end of the log.
    Truncated {
        /// Bytes needed for the whole frame.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// The bytes are complete but wrong.
    Invalid(&'static str),
}

fn checksum(parts: &[&[u8]]) -> u64 {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Encodes a segment header (current format) for a segment whose first record has `first_lsn`.
pub fn encode_segment_header(first_lsn: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    encode_segment_header_version(first_lsn, WAL_FORMAT_VERSION)
}

/// Encodes a segment header of format `version` (for tests of older formats and the fuzzer).
pub fn encode_segment_header_version(first_lsn: u64, version: u32) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut out = [0u8; SEGMENT_HEADER_BYTES];
    out[0..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..12].copy_from_slice(&version.to_le_bytes());
    // bytes 12..16 reserved, zero.
    out[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    let sum = checksum(&[&out[0..24]]);
    out[24..32].copy_from_slice(&sum.to_le_bytes());
    out
}

/// A decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// LSN of the segment's first record.
    pub first_lsn: u64,
    /// Format version of the segment (`WAL_FORMAT_VERSION_MIN..=WAL_FORMAT_VERSION`).
    pub version: u32,
}

impl SegmentHeader {
    /// Whether the segment's batches start with commit markers (format 2 and later).
    pub fn has_commit_markers(&self) -> bool {
        self.version >= 2
    }
}

/// Decodes a segment header.
pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, DecodeError> {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(DecodeError::Truncated {
            needed: SEGMENT_HEADER_BYTES,
            have: bytes.len(),
        });
    }
    if bytes[0..8] != SEGMENT_MAGIC {
        return Err(DecodeError::Invalid("not a keel WAL segment (bad magic)"));
    }
    if checksum(&[&bytes[0..24]]) != read_u64(&bytes[24..32]) {
        return Err(DecodeError::Invalid("segment header checksum mismatch"));
    }
    let version = read_u32(&bytes[8..12]);
    if !(WAL_FORMAT_VERSION_MIN..=WAL_FORMAT_VERSION).contains(&version) {
        return Err(DecodeError::Invalid("unsupported WAL format version"));
    }
    Ok(SegmentHeader {
        first_lsn: read_u64(&bytes[16..24]),
        version,
    })
}

/// A commit marker: the frame the WAL writer puts in front of every batch it writes (format 2).
/// It says which LSNs were already durable (fdatasynced) when the batch was written, so recovery
/// can tell damage inside the synced part of the log (corruption) from damage in a part that
/// was never synced (a torn tail, which a power loss may leave with holes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitMarker {
    /// Every record with an LSN up to this one was durable when the batch was written.
    pub durable_lsn: u64,
    /// LSN of the batch's first record (the record right after the marker).
    pub first_lsn: u64,
}

/// Writes a commit marker into `out` (exactly [`COMMIT_MARKER_BYTES`] long): a frame whose
/// LSN field is 0 (no record has LSN 0) and whose body is the two LSNs.
pub fn encode_commit_marker(out: &mut [u8], marker: CommitMarker) {
    assert_eq!(out.len(), COMMIT_MARKER_BYTES, "commit marker buffer");
    out[0..4].copy_from_slice(&16u32.to_le_bytes());
    out[12..20].copy_from_slice(&0u64.to_le_bytes());
    out[20..28].copy_from_slice(&0u64.to_le_bytes());
    out[28..36].copy_from_slice(&marker.durable_lsn.to_le_bytes());
    out[36..44].copy_from_slice(&marker.first_lsn.to_le_bytes());
    let sum = checksum(&[&out[0..4], &out[12..]]);
    out[4..12].copy_from_slice(&sum.to_le_bytes());
}

/// The commit marker a decoded frame holds, if it is one (`Ok(None)`: a record). A frame with
/// LSN 0 whose body is not a well-formed marker is invalid.
pub fn commit_marker(frame: &Frame<'_>) -> Result<Option<CommitMarker>, DecodeError> {
    if frame.lsn != 0 {
        return Ok(None);
    }
    if frame.body.len() != 16 || frame.time_ms != 0 {
        return Err(DecodeError::Invalid("malformed commit marker"));
    }
    let marker = CommitMarker {
        durable_lsn: read_u64(&frame.body[0..8]),
        first_lsn: read_u64(&frame.body[8..16]),
    };
    if marker.first_lsn == 0 || marker.durable_lsn >= marker.first_lsn {
        return Err(DecodeError::Invalid(
            "commit marker claims its own batch was already durable",
        ));
    }
    Ok(Some(marker))
}

/// Appends a record frame holding `entries` to `out`.
pub fn encode_record(out: &mut Vec<u8>, lsn: u64, time_ms: u64, entries: &[Entry<'_>]) {
    let body_len: usize = 4 + entries.iter().map(Entry::encoded_len).sum::<usize>();
    debug_assert!(body_len <= RECORD_BODY_BYTES_MAX);
    let start = out.len();
    out.reserve(FRAME_HEADER_BYTES + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]); // checksum, filled below
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&time_ms.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for entry in entries {
        encode_entry(out, entry);
    }
    debug_assert_eq!(out.len() - start, FRAME_HEADER_BYTES + body_len);
    let sum = checksum(&[&out[start..start + 4], &out[start + 12..]]);
    out[start + 4..start + 12].copy_from_slice(&sum.to_le_bytes());
}

fn encode_entry(out: &mut Vec<u8>, entry: &Entry<'_>) {
    let key = entry.key();
    let key_len = u16::try_from(key.len()).expect("key length checked against KEY_BYTES_CEILING");
    match entry {
        Entry::Put {
            value,
            expires_at_ms,
            ..
        } => {
            out.push(TAG_PUT);
            out.extend_from_slice(&key_len.to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&expires_at_ms.unwrap_or(NO_EXPIRY).to_le_bytes());
            let value_len = u32::try_from(value.len())
                .expect("value length checked against VALUE_BYTES_CEILING");
            out.extend_from_slice(&value_len.to_le_bytes());
            out.extend_from_slice(value);
        }
        Entry::Delete { .. } => {
            out.push(TAG_DELETE);
            out.extend_from_slice(&key_len.to_le_bytes());
            out.extend_from_slice(key);
        }
        Entry::Expire { expires_at_ms, .. } => {
            out.push(TAG_EXPIRE);
            out.extend_from_slice(&key_len.to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&expires_at_ms.unwrap_or(NO_EXPIRY).to_le_bytes());
        }
    }
}

/// Decodes the frame at the start of `bytes`, verifying its checksum. Returns the frame and the
/// number of bytes it occupies.
pub fn decode_frame(bytes: &[u8]) -> Result<(Frame<'_>, usize), DecodeError> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err(DecodeError::Truncated {
            needed: FRAME_HEADER_BYTES,
            have: bytes.len(),
        });
    }
    let body_len = read_u32(&bytes[0..4]) as usize;
    if body_len > RECORD_BODY_BYTES_MAX {
        return Err(DecodeError::Invalid("record length exceeds the maximum"));
    }
    let total = FRAME_HEADER_BYTES + body_len;
    if bytes.len() < total {
        return Err(DecodeError::Truncated {
            needed: total,
            have: bytes.len(),
        });
    }
    let stored = read_u64(&bytes[4..12]);
    if checksum(&[&bytes[0..4], &bytes[12..total]]) != stored {
        return Err(DecodeError::Invalid("record checksum mismatch"));
    }
    let frame = Frame {
        lsn: read_u64(&bytes[12..20]),
        time_ms: read_u64(&bytes[20..28]),
        body: &bytes[FRAME_HEADER_BYTES..total],
    };
    Ok((frame, total))
}

/// Decodes the entries of a record body (whose checksum was already verified).
pub fn decode_entries(body: &[u8]) -> Result<Vec<Entry<'_>>, DecodeError> {
    let mut cur = Cursor { bytes: body };
    let count = cur.u32()? as usize;
    // Every entry takes at least 3 bytes, so a count larger than that is a lie: never allocate
    // from it unchecked.
    if count > body.len() / 3 {
        return Err(DecodeError::Invalid("entry count larger than the record"));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let tag = cur.u8()?;
        let key_len = cur.u16()? as usize;
        let key = cur.take(key_len)?;
        let entry = match tag {
            TAG_PUT => {
                let expires_at_ms = expiry(cur.u64()?);
                let value_len = cur.u32()? as usize;
                let value = cur.take(value_len)?;
                Entry::Put {
                    key,
                    value,
                    expires_at_ms,
                }
            }
            TAG_DELETE => Entry::Delete { key },
            TAG_EXPIRE => Entry::Expire {
                key,
                expires_at_ms: expiry(cur.u64()?),
            },
            _ => return Err(DecodeError::Invalid("unknown entry tag")),
        };
        entries.push(entry);
    }
    if !cur.bytes.is_empty() {
        return Err(DecodeError::Invalid("trailing bytes after the last entry"));
    }
    Ok(entries)
}

fn expiry(raw: u64) -> Option<u64> {
    (raw != NO_EXPIRY).then_some(raw)
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Invalid(
                "entry runs past the end of the record",
            ));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(read_u32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(read_u64(self.take(8)?))
    }
}

fn read_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_every_entry_kind() {
        let entries = [
            Entry::Put {
                key: b"k\0\xff",
                value: b"",
                expires_at_ms: Some(42),
            },
            Entry::Delete { key: b"gone" },
            Entry::Expire {
                key: b"k",
                expires_at_ms: None,
            },
        ];
        let mut buf = Vec::new();
        encode_record(&mut buf, 7, 99, &entries);
        let (frame, used) = decode_frame(&buf).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!((frame.lsn, frame.time_ms), (7, 99));
        assert_eq!(decode_entries(frame.body).unwrap(), entries);
    }

    #[test]
    fn any_flipped_bit_is_detected() {
        let mut buf = Vec::new();
        encode_record(
            &mut buf,
            1,
            2,
            &[Entry::Put {
                key: b"key",
                value: b"value",
                expires_at_ms: None,
            }],
        );
        for i in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode_frame(&bad).is_err(), "bit {i} flip went unnoticed");
        }
    }

    #[test]
    fn every_prefix_is_truncated_not_invalid() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 1, 2, &[Entry::Delete { key: b"abc" }]);
        for n in 0..buf.len() {
            assert!(matches!(
                decode_frame(&buf[..n]),
                Err(DecodeError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn huge_entry_count_does_not_allocate() {
        let body = [0xff, 0xff, 0xff, 0xff, 1, 0];
        assert!(decode_entries(&body).is_err());
    }

    #[test]
    fn commit_marker_round_trips_and_every_flipped_bit_is_detected() {
        let marker = CommitMarker {
            durable_lsn: 41,
            first_lsn: 42,
        };
        let mut buf = [0u8; COMMIT_MARKER_BYTES];
        encode_commit_marker(&mut buf, marker);
        let (frame, used) = decode_frame(&buf).unwrap();
        assert_eq!(used, COMMIT_MARKER_BYTES);
        assert_eq!(commit_marker(&frame), Ok(Some(marker)));
        for i in 0..buf.len() * 8 {
            let mut bad = buf;
            bad[i / 8] ^= 1 << (i % 8);
            let decoded = decode_frame(&bad).map(|(f, _)| commit_marker(&f));
            assert!(
                !matches!(decoded, Ok(Ok(Some(m))) if m == marker),
                "bit {i} flip went unnoticed"
            );
        }
        // A marker claiming its own batch is refused even with a valid checksum.
        encode_commit_marker(
            &mut buf,
            CommitMarker {
                durable_lsn: 42,
                first_lsn: 42,
            },
        );
        let (frame, _) = decode_frame(&buf).unwrap();
        assert!(commit_marker(&frame).is_err());
    }

    #[test]
    fn segment_header_round_trips_and_rejects_damage() {
        let h = encode_segment_header(123);
        assert_eq!(
            decode_segment_header(&h),
            Ok(SegmentHeader {
                first_lsn: 123,
                version: WAL_FORMAT_VERSION
            })
        );
        let v1 = encode_segment_header_version(7, 1);
        assert_eq!(decode_segment_header(&v1).map(|h| h.version), Ok(1));
        let v3 = encode_segment_header_version(7, WAL_FORMAT_VERSION + 1);
        assert!(decode_segment_header(&v3).is_err());
        let mut bad = h;
        bad[17] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
        assert!(decode_segment_header(&h[..10]).is_err());
    }
}
