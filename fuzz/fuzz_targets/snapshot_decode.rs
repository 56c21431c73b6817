//! Snapshot decoding: `snapshot::decode` on arbitrary bytes never panics and
//! reports entries consistent with its footer.
//! The checks live in `engine/tests/support/fuzz.rs`, shared with the regression test that
//! replays every input in `fuzz/regressions/snapshot_decode/`.
#![no_main]

#[path = "../../engine/tests/support/fuzz.rs"]
mod fuzz;
#[path = "../../engine/tests/support/model.rs"]
mod model;
#[path = "../../engine/tests/support/sim.rs"]
mod sim;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::snapshot_decode(data));
