#!/usr/bin/env bash
# One install of a signed image of the ~100 MiB mixed payload, from the same update-server, side
# by side in each round:
#   ours    box-updater update --public-key: sha256 sidecar, minisign signature (both before
#           anything is unpacked), SHA256SUMS of every file, install_update.sh, fsync, switch;
#   old     the old shell updater's way: wget to a file, then tar xjf (bzip2 -d, one core);
#   lbzip2  wget -O- | lbzip2 -d -n2 | tar x: no checks, no fsync, download and unpack overlapped.
# Wall time and peak RSS (of the largest process of a pipeline). Before each run the previous run's
# files are synced and the page cache dropped (where allowed), so no run pays for another's
# writes. The order of the three changes from round to round.
#
#   scripts/bench/update.sh RESULTS.md   (from scripts/bench.sh; env: BENCH_ROUNDS, default 3)
#   BENCH_BASELINE=DIR adds DIR/box-updater (an older build) as a fourth contender, "before".
#
# Targets: ours <= 0.55x the old way and <= 1.0x the lbzip2 pipeline, peak RSS < 32 MiB.
set -euo pipefail
results=$1
rounds=${BENCH_ROUNDS:-3}
w="$BENCH_WORK/update"
mkdir -p "$w/updates"
command -v lbzip2 >/dev/null || {
    echo "update.sh: lbzip2 is missing (Debian package lbzip2; scripts/bench.sh installs it)" >&2
    exit 1
}
bash "$(dirname "$0")/payload.sh" "$BENCH_WORK/build/payload"
rm -f "$w/key" "$w/key.pub"
"$BIN/build-update" keygen --secret-key "$w/key" --public-key "$w/key.pub" >/dev/null
"$BIN/build-update" --out "$w/updates" --version 1700000000 --sign-key "$w/key" \
    "$BENCH_WORK/build/payload" >/dev/null 2>&1
img_size=$(stat -c %s "$w"/updates/*.tar.bz2)
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/../lib.sh"
port=$(free_port)
RUST_LOG=warn "$BIN/update-server" --dir "$w/updates" --bind 127.0.0.1 --port "$port" &
pids+=($!)
wait_http "http://127.0.0.1:$port/version"
url="http://127.0.0.1:$port"

settle() {
    rm -rf "$w/box" "$w/old" "$w/lbz"
    mkdir -p "$w/box/root" "$w/old" "$w/lbz"
    echo "{\"updates_ep\": \"$url\"}" >"$w/box/config.json"
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
}
run() { # name: one timed run, appends "round name seconds max_rss_kib" to $w/times
    local name=$1
    settle
    case $name in
    ours | before)
        local bin=$BIN
        [ "$name" = ours ] || bin=$BENCH_BASELINE
        /usr/bin/time -f "%e %M" -o "$w/t" "$bin/box-updater" update --root "$w/box/root" \
            --box-config "$w/box/config.json" --public-key "$w/key.pub" --reboot-command true \
            >/dev/null 2>"$w/err" || { cat "$w/err" >&2; exit 1; }
        test -f "$w/box/root/opt/opq/current/VERSION"
        ;;
    old)
        /usr/bin/time -f "%e %M" -o "$w/t" sh -c \
            "cd '$w/old' && wget -q -O image.tar.bz2 $url/latest && tar xjf image.tar.bz2"
        ;;
    lbzip2)
        # time(1)'s peak RSS is that of the largest process of the pipeline it waited for.
        /usr/bin/time -f "%e %M" -o "$w/t" sh -c \
            "wget -q -O- $url/latest | lbzip2 -d -n2 | tar x -C '$w/lbz'"
        ;;
    esac
    echo "$round $name $(cat "$w/t")" >>"$w/times"
}

: >"$w/times"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
names=(ours old lbzip2)
[ -z "${BENCH_BASELINE:-}" ] || names+=(before)
for round in $(seq "$rounds"); do
    # Each round starts one further along the list, so no contender always runs first.
    k=$(( (round - 1) % ${#names[@]} ))
    for name in "${names[@]:k}" "${names[@]:0:k}"; do
        run "$name"
    done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
rm -rf "$w/box" "$w/old" "$w/lbz"

python3 - "$results" "$w/times" "$img_size" "$load_start" "$load_end" <<'PY'
import statistics, sys
res, times, size, load_start, load_end = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
runs = {}
for line in open(times):
    rnd, name, secs, rss = line.split()
    runs.setdefault(name, {})[int(rnd)] = (float(secs), int(rss))
rounds = sorted(runs["ours"])
def col(name):
    t = [runs[name][r][0] for r in rounds]
    return min(t), max(t), max(runs[name][r][1] for r in rounds) / 1024
def ratios(peer):
    rs = [runs["ours"][r][0] / runs[peer][r][0] for r in rounds]
    return statistics.median(rs), min(rs), max(rs)
o, old, lbz = col("ours"), col("old"), col("lbzip2")
r_old, r_lbz = ratios("old"), ratios("lbzip2")
ok = lambda c: "✅" if c else "❌"
before = "before" in runs
b = col("before") if before else None
r_b = ratios("before") if before else None
head = "| | box-updater update | old way: `wget; tar xjf` | `wget -O- \\| lbzip2 -d -n2 \\| tar x` |"
if before:
    head += " box-updater before this change |"
extra = lambda cell: f" {cell} |" if before else ""
lines = [
    "## box-updater update vs the old way and vs lbzip2",
    "",
    f"Image: {size / 2**20:.1f} MiB, signed (the build benchmark's payload), from update-server on loopback. "
    f"{len(rounds)} rounds; in each, the contenders run one after the other on a synced disk with the page cache dropped. "
    f"Load average (1, 5, 15 min) at the start: {load_start}; at the end: {load_end}.",
    "box-updater checks the sha256 sidecar and the minisign signature before unpacking, SHA256SUMS of every file while "
    "unpacking, runs install_update.sh and makes the release durable (syncfs) before switching; neither peer checks or syncs anything.",
    "",
    head,
    "|---|---|---|---|" + ("---|" if before else ""),
    f"| wall time, best (worst) | {o[0]:.2f} s ({o[1]:.2f} s) | {old[0]:.2f} s ({old[1]:.2f} s) | {lbz[0]:.2f} s ({lbz[1]:.2f} s) |"
    + extra(f"{b[0]:.2f} s ({b[1]:.2f} s)" if before else ""),
    f"| peak RSS | {o[2]:.1f} MiB {ok(o[2] < 32)} < 32 MiB | {old[2]:.1f} MiB | {lbz[2]:.1f} MiB |"
    + extra(f"{b[2]:.1f} MiB" if before else ""),
    f"| box-updater / peer, same round: median (range) | | {r_old[0]:.2f}× ({r_old[1]:.2f}–{r_old[2]:.2f}) {ok(r_old[0] <= 0.55)} ≤ 0.55× "
    f"| {r_lbz[0]:.2f}× ({r_lbz[1]:.2f}–{r_lbz[2]:.2f}) {ok(r_lbz[0] <= 1.0)} ≤ 1.0× |"
    + extra(f"{r_b[0]:.2f}× ({r_b[1]:.2f}–{r_b[2]:.2f})" if before else ""),
    "",
]
if before:
    rb = lambda peer: statistics.median(runs["before"][r][0] / runs[peer][r][0] for r in rounds)
    lines.insert(-1, f"| before / peer, same round: median | | {rb('old'):.2f}× | {rb('lbzip2'):.2f}× | |")
print("\n".join(lines))
open(res, "a").write("\n".join(lines) + "\n")
PY
