#!/usr/bin/env bash
# build-update against `tar cjf` on the same ~100 MiB mixed payload: wall time, size, peak RSS.
set -euo pipefail
results=$1
w="$BENCH_WORK/build"
mkdir -p "$w"
bash "$(dirname "$0")/payload.sh" "$w/payload"
size=$(du -sb "$w/payload" | cut -f1)

measure() { # label, command...: prints "seconds maxrss_kib"
    /usr/bin/time -f "%e %M" -o "$w/time" "$@" >/dev/null 2>"$w/err" || { cat "$w/err" >&2; exit 1; }
    cat "$w/time"
}
best_ours=999999; best_tar=999999
for _ in 1 2 3; do
    rm -rf "$w/out" "$w/tar.tar.bz2"; mkdir -p "$w/out"
    read -r t_ours rss_ours < <(measure "$BIN/build-update" --out "$w/out" --version 1700000000 "$w/payload")
    read -r t_tar rss_tar < <(measure tar cjf "$w/tar.tar.bz2" -C "$w" payload)
    best_ours=$(python3 -c "print(min($best_ours, $t_ours))")
    best_tar=$(python3 -c "print(min($best_tar, $t_tar))")
done
size_ours=$(stat -c %s "$w"/out/*.tar.bz2)
size_tar=$(stat -c %s "$w/tar.tar.bz2")
python3 - "$results" "$size" "$best_ours" "$best_tar" "$size_ours" "$size_tar" "$rss_ours" "$rss_tar" <<'PY'
import sys
res, payload, t_o, t_t, s_o, s_t, rss, rss_t = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:5]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
tr, sr = t_o / t_t, s_o / s_t
lines = [
    "## build-update vs `tar cjf`",
    "",
    f"Payload: {payload / 2**20:.0f} MiB of shared libraries and log-like text. Best of 3 runs each.",
    "",
    "| | build-update | tar cjf | ratio | target |",
    "|---|---|---|---|---|",
    f"| wall time | {t_o:.2f} s | {t_t:.2f} s | {tr:.2f}× | ≤ 0.6× {'✅' if tr <= 0.6 else '❌'} |",
    f"| output size | {s_o / 2**20:.2f} MiB | {s_t / 2**20:.2f} MiB | {sr:.3f}× | ≤ 1.02× {'✅' if sr <= 1.02 else '❌'} |",
    f"| peak RSS | {rss / 1024:.1f} MiB | {rss_t / 1024:.1f} MiB (tar + bzip2) | | bounded (a few 900 kB blocks per core) |",
    "",
]
print("\n".join(lines))
open(res, "a").write("\n".join(lines) + "\n")
PY
