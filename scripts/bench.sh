#!/usr/bin/env bash
# Runs every benchmark side by side against its real peer (Debian's tar/bzip2, wget, nginx) and
# writes docs/benchmarks.md. Usage: scripts/bench.sh [part...]   (parts: build update server fleet)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

need=()
for pair in wrk:wrk nginx:nginx-light wget:wget curl:curl bzip2:bzip2 /usr/bin/time:time; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bins
export BIN="$root/target/release" NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
export BENCH_WORK=${BENCH_WORK:-$(mktemp -d /tmp/opq-bench.XXXXXX)}
trap 'rm -rf "$BENCH_WORK"' EXIT

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(build update server fleet)
results="$BENCH_WORK/results.md"
: >"$results"
for part in "${parts[@]}"; do
    echo "== bench: $part" >&2
    bash "scripts/bench/$part.sh" "$results"
done

{
    echo "# Benchmarks"
    echo
    echo "Written by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d): $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')."
    echo "Each comparison runs both sides in the same run on the same files; ratios are ours / peer's."
    echo
    cat "$results"
} >docs/benchmarks.md
cat docs/benchmarks.md
