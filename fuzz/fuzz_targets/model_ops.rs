//! Semantics: arbitrary bytes decoded into operations and clock advances, run on a
//! memory-only store and on a `BTreeMap` model, which must agree on every result.
//! The checks live in `engine/tests/support/fuzz.rs`, shared with the regression test that
//! replays every input in `fuzz/regressions/model_ops/`.
#![no_main]

#[path = "../../engine/tests/support/fuzz.rs"]
mod fuzz;
#[path = "../../engine/tests/support/model.rs"]
mod model;
#[path = "../../engine/tests/support/sim.rs"]
mod sim;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz::model_ops(data));
