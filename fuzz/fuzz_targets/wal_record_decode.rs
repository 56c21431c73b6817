//! WAL record decoding: `record::decode_segment_header`, `decode_frame` and
//! `decode_entries` on arbitrary bytes never panic, never allocate from an unchecked length,
//! and whatever decodes re-encodes to the same bytes.
//! The checks live in `engine/tests/support/fuzz.rs`, shared with the regression test that
//! replays every input in `fuzz/regressions/wal_record_decode/`.
#![no_main]

#[path = "../../engine/tests/support/fuzz.rs"]
mod fuzz;
#[path = "../../engine/tests/support/model.rs"]
mod model;
#[path = "../../engine/tests/support/sim.rs"]
mod sim;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::wal_record_decode(data));
