#!/usr/bin/env bash
# Runs every fuzz target for N seconds each (default 60), starting from its stored regression
# inputs. A crash input is written to fuzz/artifacts/<target>/; copy it to
# fuzz/regressions/<target>/ so engine/tests/fuzz_regressions.rs replays it from then on.
#
# Usage: fuzz/run.sh [seconds-per-target] [target...]
set -euo pipefail

cd "$(dirname "$0")"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(wal_record_decode wal_replay snapshot_decode model_ops)
fi

# The fuzzing flags are unstable compiler options; this lets a stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

failed=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "regressions/$target"
    echo "== $target: ${seconds}s"
    start=$(date +%s)
    if cargo fuzz run "$target" "corpus/$target" "regressions/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1; then
        echo "== $target: ran clean for $(( $(date +%s) - start ))s"
    else
        echo "== $target: FAILED after $(( $(date +%s) - start ))s (see fuzz/artifacts/$target/)"
        failed+=("$target")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "failing targets: ${failed[*]}"
    exit 1
fi
