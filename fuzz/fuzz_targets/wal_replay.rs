//! Recovery on arbitrary bytes: the input, laid out as a WAL segment (alone, after a
//! valid header or record, as a second segment) or as a snapshot on the simulated disk, either
//! opens or fails with a typed `Corruption`; it never panics, `Db::verify` agrees, and an
//! opened store takes a write and reopens.
//! The checks live in `engine/tests/support/fuzz.rs`, shared with the regression test that
//! replays every input in `fuzz/regressions/wal_replay/`.
#![no_main]

#[path = "../../engine/tests/support/fuzz.rs"]
mod fuzz;
#[path = "../../engine/tests/support/model.rs"]
mod model;
#[path = "../../engine/tests/support/sim.rs"]
mod sim;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::wal_replay(data));
