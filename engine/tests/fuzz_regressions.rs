//! Every input stored under `fuzz/regressions/<target>/` (crash inputs the fuzzers found, and
//! seeds: valid, truncated and bit-flipped segments and snapshots, operation sequences at the
//! edges of `incr` and batch limits) replayed through the same checks the fuzz targets run
//! (`support/fuzz.rs`), so a fixed crash stays fixed without running a fuzzer.

#[path = "support/fuzz.rs"]
mod fuzz;
#[path = "support/model.rs"]
mod model;
#[path = "support/sim.rs"]
mod sim;

use std::path::PathBuf;

/// Runs `check` on every stored input of `target`; there must be at least one.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no stored inputs in {}", dir.display());
    for path in inputs {
        let bytes = std::fs::read(&path).expect("a stored input");
        // Name the input if the check fails.
        let result = std::panic::catch_unwind(|| check(&bytes));
        if let Err(panic) = result {
            eprintln!("fuzz regression {} failed", path.display());
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn wal_record_decode_inputs_stay_fixed() {
    replay("wal_record_decode", fuzz::wal_record_decode);
}

#[test]
fn wal_replay_inputs_stay_fixed() {
    replay("wal_replay", fuzz::wal_replay);
}

#[test]
fn snapshot_decode_inputs_stay_fixed() {
    replay("snapshot_decode", fuzz::snapshot_decode);
}

#[test]
fn model_ops_inputs_stay_fixed() {
    replay("model_ops", fuzz::model_ops);
}
