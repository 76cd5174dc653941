#!/usr/bin/env bash
# One update of a ~100 MiB-payload image: `box-updater update` against the old way (wget to a
# file, then tar xjf), from the same update-server in the same run: wall time and peak RSS.
set -euo pipefail
results=$1
w="$BENCH_WORK/update"
mkdir -p "$w/updates"
bash "$(dirname "$0")/payload.sh" "$BENCH_WORK/build/payload"
"$BIN/build-update" --out "$w/updates" --version 1700000000 "$BENCH_WORK/build/payload" >/dev/null 2>&1
img_size=$(stat -c %s "$w"/updates/*.tar.bz2)
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../lib.sh"
port=$(free_port)
RUST_LOG=warn "$BIN/update-server" --dir "$w/updates" --bind 127.0.0.1 --port "$port" &
pids+=($!)
wait_http "http://127.0.0.1:$port/version"

best_ours=999999; best_old=999999; rss_ours=0; rss_old=0
for _ in 1 2 3; do
    rm -rf "$w/box" "$w/old"; mkdir -p "$w/box/root" "$w/old"
    echo "{\"updates_ep\": \"http://127.0.0.1:$port\"}" >"$w/box/config.json"
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "%e %M" -o "$w/t_old" sh -c "cd '$w/old' && wget -q -O image.tar.bz2 http://127.0.0.1:$port/latest && tar xjf image.tar.bz2"
    sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "%e %M" -o "$w/t_ours" "$BIN/box-updater" update --root "$w/box/root" \
        --box-config "$w/box/config.json" --reboot-command true >/dev/null 2>"$w/err" || { cat "$w/err" >&2; exit 1; }
    read -r t_old r_old <"$w/t_old"
    read -r t_ours r_ours <"$w/t_ours"
    best_ours=$(python3 -c "print(min($best_ours, $t_ours))")
    best_old=$(python3 -c "print(min($best_old, $t_old))")
    rss_ours=$(( r_ours > rss_ours ? r_ours : rss_ours ))
    rss_old=$(( r_old > rss_old ? r_old : rss_old ))
done
test -f "$w/box/root/opt/opq/current/VERSION"
python3 - "$results" "$img_size" "$best_ours" "$best_old" "$rss_ours" "$rss_old" <<'PY'
import sys
res, size = sys.argv[1], int(sys.argv[2])
t_o, t_w = float(sys.argv[3]), float(sys.argv[4])
r_o, r_w = int(sys.argv[5]), int(sys.argv[6])
ratio = t_o / t_w
lines = [
    "## box-updater update vs the old way (wget, then tar xjf)",
    "",
    f"Image: {size / 2**20:.1f} MiB (the build benchmark's payload), from update-server on loopback. Best of 3 runs each.",
    "box-updater also checks the sha256 sidecar, SHA256SUMS of every file, runs install_update.sh and fsyncs before switching; the old way does none of that.",
    "",
    "| | box-updater | wget + tar xjf | ratio | target |",
    "|---|---|---|---|---|",
    f"| wall time | {t_o:.2f} s | {t_w:.2f} s | {ratio:.2f}× | ≤ 0.7× {'✅' if ratio <= 0.7 else '❌'} |",
    f"| peak RSS | {r_o / 1024:.1f} MiB | {r_w / 1024:.1f} MiB | | < 32 MiB {'✅' if r_o < 32 * 1024 else '❌'} |",
    "",
]
print("\n".join(lines))
open(res, "a").write("\n".join(lines) + "\n")
PY
