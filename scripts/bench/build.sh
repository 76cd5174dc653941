#!/usr/bin/env bash
# build-update (signed) against `tar cjf` and against `tar cf - | lbzip2 -n2` on the same ~100 MiB
# mixed payload, side by side in each round: wall time, output size, peak RSS (of the largest
# process of a pipeline). The order of the three changes from round to round.
#
#   scripts/bench/build.sh RESULTS.md   (from scripts/bench.sh; env: BENCH_ROUNDS, default 3)
#
# Targets: <= 0.6x tar cjf at <= 1.02x its size; <= 1.0x lbzip2 at no more than its size.
set -euo pipefail
results=$1
rounds=${BENCH_ROUNDS:-3}
w="$BENCH_WORK/build"
mkdir -p "$w"
command -v lbzip2 >/dev/null || {
    echo "build.sh: lbzip2 is missing (Debian package lbzip2; scripts/bench.sh installs it)" >&2
    exit 1
}
bash "$(dirname "$0")/payload.sh" "$w/payload"
size=$(du -sb "$w/payload" | cut -f1)
rm -f "$w/key" "$w/key.pub"
"$BIN/build-update" keygen --secret-key "$w/key" --public-key "$w/key.pub" >/dev/null

run() { # name: one timed run, appends "round name seconds max_rss_kib output_bytes" to $w/times
    local name=$1 out
    rm -rf "$w/out" "$w/tar.tar.bz2" "$w/lbz.tar.bz2"
    mkdir -p "$w/out"
    sync
    case $name in
    ours)
        /usr/bin/time -f "%e %M" -o "$w/t" "$BIN/build-update" --out "$w/out" --version 1700000000 \
            --sign-key "$w/key" "$w/payload" >/dev/null 2>"$w/err" || { cat "$w/err" >&2; exit 1; }
        out=$(echo "$w"/out/*.tar.bz2)
        ;;
    tar)
        /usr/bin/time -f "%e %M" -o "$w/t" tar cjf "$w/tar.tar.bz2" -C "$w" payload
        out=$w/tar.tar.bz2
        ;;
    lbzip2)
        /usr/bin/time -f "%e %M" -o "$w/t" sh -c "tar cf - -C '$w' payload | lbzip2 -n2 >'$w/lbz.tar.bz2'"
        out=$w/lbz.tar.bz2
        ;;
    esac
    echo "$round $name $(cat "$w/t") $(stat -c %s "$out")" >>"$w/times"
}

: >"$w/times"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
orders=("ours tar lbzip2" "tar lbzip2 ours" "lbzip2 ours tar")
for round in $(seq "$rounds"); do
    for name in ${orders[$(( (round - 1) % 3 ))]}; do
        run "$name"
    done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$results" "$w/times" "$size" "$load_start" "$load_end" <<'PY'
import statistics, sys
res, times, payload, load_start, load_end = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
runs = {}
for line in open(times):
    rnd, name, secs, rss, out = line.split()
    runs.setdefault(name, {})[int(rnd)] = (float(secs), int(rss), int(out))
rounds = sorted(runs["ours"])
def col(name):
    t = [runs[name][r][0] for r in rounds]
    return min(t), max(t), max(runs[name][r][1] for r in rounds) / 1024, runs[name][rounds[0]][2]
def ratios(peer):
    rs = [runs["ours"][r][0] / runs[peer][r][0] for r in rounds]
    return statistics.median(rs), min(rs), max(rs)
o, tar, lbz = col("ours"), col("tar"), col("lbzip2")
r_tar, r_lbz = ratios("tar"), ratios("lbzip2")
s_tar, s_lbz = o[3] / tar[3], o[3] / lbz[3]
ok = lambda c: "✅" if c else "❌"
lines = [
    "## build-update vs `tar cjf` and vs lbzip2",
    "",
    f"Payload: {payload / 2**20:.0f} MiB of shared libraries and log-like text; build-update signs the image. "
    f"{len(rounds)} rounds; in each, the three run one after the other. "
    f"Load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_end}.",
    "",
    "| | build-update | `tar cjf` | `tar cf - \\| lbzip2 -n2` |",
    "|---|---|---|---|",
    f"| wall time, best (worst) | {o[0]:.2f} s ({o[1]:.2f} s) | {tar[0]:.2f} s ({tar[1]:.2f} s) | {lbz[0]:.2f} s ({lbz[1]:.2f} s) |",
    f"| output size | {o[3]:,} B | {tar[3]:,} B | {lbz[3]:,} B |",
    f"| peak RSS | {o[2]:.1f} MiB | {tar[2]:.1f} MiB | {lbz[2]:.1f} MiB |",
    f"| build-update / peer, time, same round: median (range) | | {r_tar[0]:.2f}× ({r_tar[1]:.2f}–{r_tar[2]:.2f}) {ok(r_tar[0] <= 0.6)} ≤ 0.6× "
    f"| {r_lbz[0]:.2f}× ({r_lbz[1]:.2f}–{r_lbz[2]:.2f}) {ok(r_lbz[0] <= 1.0)} ≤ 1.0× |",
    f"| build-update / peer, size | | {s_tar:.4f}× {ok(s_tar <= 1.02)} ≤ 1.02× | {s_lbz:.4f}× {ok(s_lbz <= 1.0)} ≤ 1.0× |",
    "",
]
print("\n".join(lines))
open(res, "a").write("\n".join(lines) + "\n")
PY
