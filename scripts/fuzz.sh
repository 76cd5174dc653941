#!/usr/bin/env bash
# Runs each fuzz target (cargo fuzz, libFuzzer) for a given time and prints its executions.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default: 15 s, every target)
# New crashes land in fuzz/artifacts/<target>/; turn each into a regression test.
#
# What it needs, and installs when missing:
#   - cargo-fuzz (cargo install, from crates.io);
#   - a C++ compiler (Debian's g++), which builds libFuzzer itself.
# Without a sanitizer (the default) the stable toolchain builds the targets: every flag cargo fuzz
# passes then is a stable -C flag. FUZZ_SANITIZER=address (for long runs) needs -Zsanitizer, so a
# nightly toolchain (`rustup toolchain install nightly`); that is not installed here by itself.
# No `rustup target add` is needed: the targets are built for this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15}
shift || true
targets=("$@")
all=0
[ ${#targets[@]} -gt 0 ] || { all=1; targets=(image_name sha256sums unpack http_request fleet_report bunzip bzenc); }
say() { echo "fuzz.sh: $*" >&2; }

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    say "installing cargo-fuzz (cargo install --locked cargo-fuzz, from crates.io)"
    cargo install --locked --quiet cargo-fuzz || {
        say "cannot install cargo-fuzz; install it by hand (cargo install cargo-fuzz) or skip fuzzing with FUZZ_SECONDS=0"
        exit 1
    }
fi
if ! command -v c++ >/dev/null 2>&1; then
    say "installing g++ (Debian), which cargo fuzz needs to build libFuzzer"
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends g++ >/dev/null; } || {
        say "cannot install g++ with apt-get; install a C++ compiler by hand or skip fuzzing with FUZZ_SECONDS=0"
        exit 1
    }
fi
san=${FUZZ_SANITIZER:-none}
toolchain=()
if [ "$san" != none ]; then
    toolchain=(+nightly)
    cargo +nightly --version >/dev/null 2>&1 || {
        say "FUZZ_SANITIZER=$san needs a nightly toolchain: rustup toolchain install nightly (or leave FUZZ_SANITIZER unset)"
        exit 1
    }
fi
mkdir -p fuzz/artifacts
# Every target in one cargo run (side by side on the cores), before the first one runs.
if [ $all = 1 ]; then
    say "building the fuzz targets (cargo fuzz build; release, instrumented)"
    cargo "${toolchain[@]}" fuzz build --fuzz-dir fuzz -s "$san" || {
        say "building the fuzz targets failed (above); fix the build or skip fuzzing with FUZZ_SECONDS=0"
        exit 1
    }
fi
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log=$(mktemp)
    if cargo "${toolchain[@]}" fuzz run --fuzz-dir fuzz -s "$san" "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1; then
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
