//! What each fuzz target checks, as plain functions over a byte string, so the fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) and the regression test that replays every stored crash input
//! (`engine/tests/fuzz_regressions.rs`) run exactly the same logic. Each function panics if
//! the engine misbehaves on the input; returning means the input was handled correctly.
//!
//! Needs the `sim` and `model` support modules declared next to it (`crate::sim`,
//! `crate::model`).
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_engine::record::{
    self, DecodeError, FRAME_HEADER_BYTES, RECORD_BODY_BYTES_MAX, SEGMENT_HEADER_BYTES,
};
use keel_engine::{Db, Error, Limits, ManualClock, Options, snapshot};

use crate::model::{BatchItem, Model, Op, Policy, T0_MS, TTL_MAX_MS, dump, run_on_db};
use crate::sim::SimDisk;

/// The store directory on the simulated disk.
const STORE: &str = "/fuzz/store";
/// Most operations one `model_ops` input is decoded into.
pub const MODEL_OPS_MAX: usize = 64;
/// The key limit of the `model_ops` store.
pub const MODEL_KEY_BYTES_LIMIT: usize = 8;
/// The value limit of the `model_ops` store.
pub const MODEL_VALUE_BYTES_LIMIT: usize = 24;
/// The batch limit of the `model_ops` store.
pub const MODEL_BATCH_OPS_LIMIT: usize = 4;

/// `record::decode_segment_header`, `decode_frame` and `decode_entries` on arbitrary bytes:
/// no panic, lengths consistent, and whatever decodes re-encodes to the very same bytes.
pub fn wal_record_decode(data: &[u8]) {
    match record::decode_segment_header(data) {
        Ok(header) => {
            assert!(data.len() >= SEGMENT_HEADER_BYTES);
            assert_eq!(
                record::encode_segment_header_version(header.first_lsn, header.version)[..],
                data[..SEGMENT_HEADER_BYTES]
            );
        }
        Err(DecodeError::Truncated { needed, have }) => {
            assert!(have < needed && have == data.len());
        }
        Err(DecodeError::Invalid(_)) => {}
    }
    // Walk the bytes as a sequence of frames, the way recovery does.
    let mut offset = 0;
    while offset < data.len() {
        let rest = &data[offset..];
        let (frame, used) = match record::decode_frame(rest) {
            Ok(ok) => ok,
            Err(DecodeError::Truncated { needed, have }) => {
                assert!(have < needed && have == rest.len());
                break;
            }
            Err(DecodeError::Invalid(_)) => break,
        };
        assert_eq!(used, FRAME_HEADER_BYTES + frame.body.len());
        assert!(used <= rest.len() && frame.body.len() <= RECORD_BODY_BYTES_MAX);
        if let Ok(Some(marker)) = record::commit_marker(&frame) {
            // A valid commit marker re-encodes to the very same bytes.
            let mut again = [0u8; record::COMMIT_MARKER_BYTES];
            record::encode_commit_marker(&mut again, marker);
            assert_eq!(
                again[..],
                rest[..used],
                "a decoded marker re-encodes differently"
            );
            assert!(marker.durable_lsn < marker.first_lsn);
        }
        if let Ok(entries) = record::decode_entries(frame.body) {
            let mut again = Vec::new();
            record::encode_record(&mut again, frame.lsn, frame.time_ms, &entries);
            assert_eq!(
                again,
                rest[..used],
                "a decoded record re-encodes differently"
            );
        }
        offset += used;
    }
    // The entry decoder on its own, on bytes no checksum vouches for.
    if let Ok(entries) = record::decode_entries(data) {
        assert!(entries.len() <= data.len() / 3);
        let encoded: usize = 4 + entries.iter().map(|e| e.encoded_len()).sum::<usize>();
        assert_eq!(encoded, data.len(), "entries account for every byte");
    }
}

/// `snapshot::decode` on arbitrary bytes: no panic, and a snapshot that decodes has as many
/// entries as its footer says, each within the file.
pub fn snapshot_decode(data: &[u8]) {
    let mut entries = 0u64;
    let mut bytes = 0usize;
    match snapshot::decode(data, |key, value, _expires| {
        entries += 1;
        bytes += 2 + key.len() + 8 + 4 + value.len();
    }) {
        Ok(header) => {
            assert_eq!(header.entries, entries);
            assert_eq!(
                bytes + snapshot::SNAPSHOT_HEADER_BYTES + snapshot::SNAPSHOT_FOOTER_BYTES,
                data.len()
            );
        }
        Err(DecodeError::Truncated { needed, have }) => assert!(have < needed),
        Err(DecodeError::Invalid(_)) => {}
    }
}

/// How `wal_replay` lays the input out as a store.
fn replay_layout(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    let segment = |lsn: u64| format!("wal-{lsn:020}.log");
    let header = |lsn: u64| record::encode_segment_header(lsn).to_vec();
    let valid_record = |lsn: u64| {
        let mut out = Vec::new();
        record::encode_record(
            &mut out,
            lsn,
            T0_MS,
            &[record::Entry::Put {
                key: b"k",
                value: b"v",
                expires_at_ms: None,
            }],
        );
        out
    };
    match mode % 5 {
        // The bytes are the whole segment.
        0 => vec![(segment(1), rest.to_vec())],
        // After a valid header.
        1 => vec![(segment(1), [header(1), rest.to_vec()].concat())],
        // After a valid header and a valid record.
        2 => vec![(
            segment(1),
            [header(1), valid_record(1), rest.to_vec()].concat(),
        )],
        // As the second segment, after a sealed one holding record 1.
        3 => vec![
            (segment(1), [header(1), valid_record(1)].concat()),
            (segment(2), rest.to_vec()),
        ],
        // As a snapshot, with a valid empty WAL after it.
        _ => vec![
            (format!("snapshot-{:020}.snap", 1), rest.to_vec()),
            (segment(2), header(2)),
        ],
    }
}

/// Writes the input into a store directory on the simulated disk (see `replay_layout`) and
/// opens it: `Db::open` returns a store or a typed error and never panics; `Db::verify`
/// agrees with it; an opened store takes a write and opens again with it.
pub fn wal_replay(data: &[u8]) {
    let dir = Path::new(STORE);
    let disk = SimDisk::with_dir(dir);
    for (name, bytes) in replay_layout(data) {
        disk.put_file(&dir.join(name), &bytes);
    }
    let clock = ManualClock::new(T0_MS);
    let options = Options::default()
        .storage(Arc::new(disk.clone()))
        .clock(Arc::new(clock));
    let verified = Db::verify(dir, &disk);
    let db = match Db::open(dir, options.clone()) {
        Ok(db) => db,
        Err(e) => {
            assert!(
                matches!(e, Error::Corruption { .. }),
                "open failed with {e:?}, not a typed corruption"
            );
            assert!(
                verified.is_err(),
                "verify passed a store open refuses: {verified:?}"
            );
            return;
        }
    };
    if let Err(e) = verified {
        // An empty directory is not a store to verify, but open creates one.
        assert!(
            matches!(e, Error::NotAStore { .. }),
            "verify refused a store open accepts: {e:?}"
        );
    }
    let before = dump(&db);
    db.set("fuzz-probe", "after", None)
        .expect("a recovered store takes writes");
    db.close().expect("a recovered store closes");
    let db = Db::open(dir, options).expect("a recovered store reopens");
    let mut after = dump(&db);
    assert_eq!(
        after.remove(&b"fuzz-probe"[..]),
        Some((b"after".to_vec(), 0)),
        "the probe write was lost"
    );
    assert_eq!(after, before, "reopening changed the recovered state");
}

/// Reads an input byte by byte; past the end every read is 0.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | u64::from(self.byte()))
    }

    fn key(&mut self) -> Vec<u8> {
        const KEYS: [&[u8]; 8] = [b"a", b"ab", b"abc", b"b", b"b\0", b"\xff", b"", b"n"];
        KEYS[usize::from(self.byte()) % KEYS.len()].to_vec()
    }

    fn value(&mut self) -> Vec<u8> {
        const INTEGERS: [&[u8]; 8] = [
            b"0",
            b"-1",
            b"41",
            b"9223372036854775807",
            b"-9223372036854775808",
            b"01",
            b"-0",
            b"9223372036854775808",
        ];
        let b = self.byte();
        if b >= 0xf0 {
            return INTEGERS[usize::from(b) % INTEGERS.len()].to_vec();
        }
        let len = usize::from(b) % (MODEL_VALUE_BYTES_LIMIT + 1);
        (0..len).map(|_| self.byte()).collect()
    }

    fn ttl(&mut self) -> Option<u64> {
        match self.byte() % 3 {
            0 => None,
            _ => Some(1 + u64::from(self.byte()) * 4),
        }
    }

    fn delta(&mut self) -> i64 {
        match self.byte() {
            0xff => i64::MAX,
            0xfe => i64::MIN,
            b => i64::from(b % 11) - 5,
        }
    }
}

/// One decoded step: an operation or a clock advance (ms).
#[derive(Debug)]
enum Step {
    Op(Op),
    Advance(u64),
}

fn decode_steps(data: &[u8]) -> Vec<Step> {
    let mut input = Input { data };
    let mut steps = Vec::new();
    while !input.data.is_empty() && steps.len() < MODEL_OPS_MAX {
        let code = input.byte();
        let step = match code % 20 {
            0 => Step::Op(Op::Set {
                key: input.key(),
                value: input.value(),
                ttl_ms: input.ttl(),
            }),
            1 => Step::Op(Op::SetNx {
                key: input.key(),
                value: input.value(),
                ttl_ms: input.ttl(),
            }),
            2 => {
                let key = input.key();
                let expected = input.byte().is_multiple_of(2).then(|| input.value());
                let new = input.value();
                let ttl = match input.byte() % 3 {
                    0 => Policy::Keep,
                    1 => Policy::Set(1 + u64::from(input.byte()) * 4),
                    _ => Policy::Clear,
                };
                Step::Op(Op::Cas {
                    key,
                    expected,
                    new,
                    ttl,
                })
            }
            3 => Step::Op(Op::CompareAndDelete {
                key: input.key(),
                expected: input.value(),
            }),
            4 => Step::Op(Op::Delete { key: input.key() }),
            5 => Step::Op(Op::Incr {
                key: input.key(),
                delta: input.delta(),
                ttl_ms: input.ttl(),
            }),
            6 => Step::Op(Op::Expire {
                key: input.key(),
                ttl_ms: 1 + u64::from(input.byte()) * 4,
            }),
            7 => Step::Op(Op::Persist { key: input.key() }),
            8 => {
                let n = usize::from(input.byte()) % (MODEL_BATCH_OPS_LIMIT + 2);
                let items = (0..n)
                    .map(|_| match input.byte() % 3 {
                        0 => BatchItem::Set {
                            key: input.key(),
                            value: input.value(),
                            ttl_ms: input.ttl(),
                        },
                        1 => BatchItem::SetAt {
                            key: input.key(),
                            value: input.value(),
                            expires_at_ms: input
                                .byte()
                                .is_multiple_of(2)
                                .then(|| T0_MS + u64::from(input.byte()) * 100),
                        },
                        _ => BatchItem::Delete { key: input.key() },
                    })
                    .collect();
                Step::Op(Op::Batch(items))
            }
            9 => Step::Op(Op::Get { key: input.key() }),
            10 => Step::Op(Op::GetWithTtl { key: input.key() }),
            11 => Step::Op(Op::Ttl { key: input.key() }),
            12 => Step::Op(Op::Scan {
                prefix: input.key(),
                limit: usize::from(input.byte() % 5),
                with_values: input.byte().is_multiple_of(2),
            }),
            // Exactly one invalid input each.
            13 => Step::Op(Op::Set {
                key: vec![b'k'; MODEL_KEY_BYTES_LIMIT + 1],
                value: input.value(),
                ttl_ms: None,
            }),
            14 => Step::Op(Op::Set {
                key: input.key(),
                value: vec![b'v'; MODEL_VALUE_BYTES_LIMIT + 1],
                ttl_ms: None,
            }),
            15 => Step::Op(Op::Expire {
                key: input.key(),
                ttl_ms: match input.byte() % 2 {
                    0 => 0,
                    _ => TTL_MAX_MS + 1,
                },
            }),
            16 => Step::Op(Op::Incr {
                key: input.key(),
                delta: 1,
                ttl_ms: Some(0),
            }),
            _ => Step::Advance(input.u64() % 1_000),
        };
        steps.push(step);
    }
    steps
}

/// The limits of the `model_ops` store.
pub fn model_limits() -> Limits {
    Limits {
        max_key_bytes: MODEL_KEY_BYTES_LIMIT,
        max_value_bytes: MODEL_VALUE_BYTES_LIMIT,
        max_batch_ops: MODEL_BATCH_OPS_LIMIT,
        max_batch_bytes: 1 << 20,
    }
}

/// Decodes the input into operations and clock advances, runs them on a memory-only store
/// and on the model, and requires the same result from every operation and the same final
/// state.
pub fn model_ops(data: &[u8]) {
    let clock = ManualClock::new(T0_MS);
    let db = Db::memory(
        Options::default()
            .clock(Arc::new(clock.clone()))
            .limits(model_limits()),
    );
    let mut model = Model::new(model_limits());
    let now = |clock: &ManualClock| keel_engine::Clock::now_ms(clock);
    for (i, step) in decode_steps(data).iter().enumerate() {
        match step {
            Step::Op(op) => {
                let want = model.apply(op, now(&clock));
                let got = run_on_db(&db, op);
                assert_eq!(got, want, "step {i}: {op:?}");
            }
            Step::Advance(ms) => clock.advance(Duration::from_millis(*ms)),
        }
    }
    assert_eq!(dump(&db), model.visible(now(&clock)), "final state");
}
