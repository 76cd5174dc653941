#!/usr/bin/env bash
# Runs each fuzz target (cargo fuzz, nightly) for a given time and prints its executions.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default: 15 s, every target)
# New crashes land in fuzz/artifacts/<target>/; turn each into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(image_name sha256sums unpack http_request fleet_report)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked --quiet cargo-fuzz
toolchain=+nightly
# Without a sanitizer the build takes half the time; FUZZ_SANITIZER=address for long runs.
san=${FUZZ_SANITIZER:-none}
cargo $toolchain --version >/dev/null 2>&1 || { echo "fuzz.sh: a nightly toolchain is needed (rustup toolchain install nightly)" >&2; exit 1; }
mkdir -p fuzz/artifacts
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log=$(mktemp)
    if cargo $toolchain fuzz run --fuzz-dir fuzz -s "$san" "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1; then
        execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
        echo "fuzz: $t: ${execs:-?} executions in ${secs} s, no crash"
    else
        echo "fuzz: $t: FAILED (see fuzz/artifacts/$t/)" >&2
        tail -40 "$log" >&2
        status=1
    fi
    rm -f "$log"
done
exit $status
