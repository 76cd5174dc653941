#!/usr/bin/env bash
# Runs every benchmark side by side against its real peer (Debian's tar/bzip2, lbzip2, wget, nginx) and
# writes docs/benchmarks.md. Usage: scripts/bench.sh [part...]   (parts: build update server fleet)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

need=()
for pair in wrk:wrk nginx:nginx-light wget:wget curl:curl bzip2:bzip2 lbzip2:lbzip2 /usr/bin/time:time; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "bench.sh: installing ${need[*]} (Debian)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bins
export BIN="$root/target/release" NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
export BENCH_WORK=${BENCH_WORK:-$(mktemp -d /tmp/opq-bench.XXXXXX)}
trap 'rm -rf "$BENCH_WORK"' EXIT

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(build update server fleet)
for part in "${parts[@]}"; do
    echo "== bench: $part" >&2
    : >"$BENCH_WORK/$part.md"
    bash "scripts/bench/$part.sh" "$BENCH_WORK/$part.md"
done

# Each part's section sits between markers: a part not run this time keeps its last figures.
python3 - docs/benchmarks.md "$BENCH_WORK" "$(date -u +%Y-%m-%d)" "$(nproc)" \
    "$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)" "$(uname -m)" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" <<'PY'
import os, re, sys
doc, work, day, cores, mem, arch, cpu = sys.argv[1:]
old = open(doc).read() if os.path.exists(doc) else ""
out = ["# Benchmarks", "",
       f"Written by `scripts/bench.sh` ({cores} cores, {mem}, {arch}, {cpu}); each section says when it was run.",
       "Each comparison runs both sides in the same run on the same files; ratios are ours / peer's.", ""]
# "profile" (where the time and memory go) and "http-options" (the HTTP layer's decision, from
# scripts/bench/http-options/compare.sh) are written by hand, and kept.
for part in ["build", "update", "profile", "server", "http-options", "fleet"]:
    fresh = os.path.join(work, part + ".md")
    if os.path.exists(fresh):
        body = f"_Run on {day}._\n\n" + open(fresh).read().strip() + "\n"
    else:
        m = re.search(rf"<!-- part: {part} -->\n(.*?)<!-- end: {part} -->", old, re.S)
        if not m:
            continue
        body = m.group(1)
    out += [f"<!-- part: {part} -->", body.rstrip("\n"), f"<!-- end: {part} -->", ""]
open(doc, "w").write("\n".join(out))
PY
cat docs/benchmarks.md
