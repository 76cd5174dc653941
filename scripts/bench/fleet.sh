#!/usr/bin/env bash
# The fleet's cost on update-server: 10 000 simulated boxes checking /version (with the fleet
# headers) and posting reports, with a 10 % rollout set, against plain /version (no headers, no
# rollout: what every request was before the fleet) on the same server in the same run; then
# /fleet.json for those 10 000 boxes, the time the database takes to catch up, and peak RSS.
#
#   scripts/bench/fleet.sh [RESULTS.md]     # appends a markdown section to RESULTS.md (or stdout)
#
# Targets: boxes' /version with reports and a rollout >= 0.5x plain /version; /fleet.json for
# 10 000 boxes under 0.2 s. Env: BENCH_SECS (wrk duration, default 8), BENCH_BOXES (10000),
# BENCH_REPORT_EVERY (one request in N is a report, default 16), BENCH_ROUNDS (2),
# BENCH_DATABASE (a postgres:// URL to measure with PostgreSQL instead of SQLite), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."

results=${1:-}
secs=${BENCH_SECS:-8}
boxes=${BENCH_BOXES:-10000}
every=${BENCH_REPORT_EVERY:-16}
rounds=${BENCH_ROUNDS:-2}
v1=1700000000 v2=1700000100
token=bench-token

for tool in wrk curl; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "fleet.sh: $tool is missing (Debian packages: wrk curl)" >&2
        exit 1
    }
done

echo "fleet.sh: building update-server (release)" >&2
cargo build --release --quiet --bin update-server
server_bin=${CARGO_TARGET_DIR:-target}/release/update-server

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
work=$(mktemp -d /tmp/opq-bench-fleet.XXXXXX)
mkdir "$work/updates"
# The index serves any file by its name: small stand-ins for the images are enough here.
for v in $v1 $v2; do
    head -c 4096 /dev/urandom >"$work/updates/opq-box-update-$v.tar.bz2"
done
database=${BENCH_DATABASE:-$work/fleet.sqlite}

"$server_bin" rollout $v2 --percent 10 --dir "$work/updates" --database "$database" >&2
start() { # database log -> started_pid, started_port: an update-server on it
    started_port=$(free_port)
    # As in server.sh, the server logs every request (RUST_LOG=info), in both halves alike.
    RUST_LOG=info "$server_bin" --dir "$work/updates" --bind 127.0.0.1 --port "$started_port" \
        --database "$1" --fleet-token "$token" 2>"$2" &
    started_pid=$!
    pids+=("$started_pid")
    wait_http "http://127.0.0.1:$started_port/version"
}
# Two servers on the same images: the boxes' with the rollout, and today's with an empty fleet
# of its own and no rollout. Each measurement runs alone.
start "$database" "$work/server.log"
pid=$started_pid port=$started_port
start "$work/plain.sqlite" "$work/plain.log"
plain_pid=$started_pid plain_port=$started_port

cat >"$work/boxes.lua" <<LUA
-- Box i of $boxes asks /version with the fleet headers; one request in $every is its report.
local threads = {}
local next_id = 0
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end
function init(args)
  n = tid * 7919
  ok, other, limited = 0, 0, 0
end
function request()
  n = n + 1
  local id = "bench-" .. (n % $boxes)
  local h = { ["X-OPQ-Box-Id"] = id, ["X-OPQ-Box-Version"] = "$v1", ["X-OPQ-Box-State"] = "idle",
              ["User-Agent"] = "box-updater/0.1.0 (bench)" }
  -- Shifted by one each pass over the boxes, so that every box reports in turn (not only
  -- those whose number shares a factor with $every).
  if (n + math.floor(n / $boxes)) % $every == 0 then
    h["Content-Type"] = "application/json"
    local outcome = (n % 64 == 0) and "failed" or "committed"
    local body = '{"v":1,"box_id":"' .. id .. '","outcome":"' .. outcome .. '","target_version":$v2,' ..
      '"running_version":$v1,"previous_version":$v1,"message":"bench","durations_ms":{"downloading":1200}}'
    return wrk.format("POST", "/report", h, body)
  end
  return wrk.format("GET", "/version", h)
end
function response(status, headers, body)
  if status == 200 or status == 202 then ok = ok + 1
  elseif status == 429 then limited = limited + 1
  else other = other + 1 end
end
function done(summary, latency, requests)
  local o, l, x = 0, 0, 0
  for _, t in ipairs(threads) do
    o = o + t:get("ok"); l = l + t:get("limited"); x = x + t:get("other")
  end
  io.write(string.format("answers: %d ok, %d rate-limited, %d other\n", o, l, x))
end
LUA

# Today's requests, through the same Lua machinery, so that both sides pay the same client cost
# on this machine's cores: the difference is the server's.
sed -e 's/^  local h = {.*/  local h = {}/' -e '/^              \["User-Agent"\]/d' \
    -e 's/^  if (n + .* == 0 then/  if false then/' "$work/boxes.lua" >"$work/plain.lua"

rps() { # port script -> requests/s (and the script's line on stderr)
    local out
    out=$(wrk -t2 -c64 -d"${secs}s" -s "$2" "http://127.0.0.1:$1/version")
    grep '^answers:' <<<"$out" >&2
    case $out in *" 0 other"*) ;; *) echo "fleet.sh: some answers were neither 200/202 nor 429" >&2; exit 1 ;; esac
    awk '/^Requests\/sec:/ {print $2}' <<<"$out"
}
max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b ? a : b) }'; }
load0=$(cut -d' ' -f1 /proc/loadavg)

plain=0 fleet=0
for round in $(seq "$rounds"); do
    echo "fleet.sh: round $round: plain /version, ${secs}s, 64 connections" >&2
    plain=$(max "$plain" "$(rps "$plain_port" "$work/plain.lua")")
    echo "fleet.sh: round $round: $boxes boxes with headers and reports, a 10 % rollout" >&2
    fleet=$(max "$fleet" "$(rps "$port" "$work/boxes.lua")")
done

# The database catches up: every box record written.
t0=$(date +%s.%N)
fleet_json() { curl -s -H "Authorization: Bearer $token" "http://127.0.0.1:$port/fleet.json"; }
for _ in $(seq 600); do
    pending=$(fleet_json | python3 -c 'import json,sys; print(json.load(sys.stdin)["store"]["pending"])')
    [ "$pending" = 0 ] && break
    sleep 0.1
done
t1=$(date +%s.%N)
catchup=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')

known=$(fleet_json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["boxes"]))')
[ "$known" -ge "$boxes" ] || { echo "fleet.sh: the fleet holds $known boxes, not $boxes" >&2; exit 1; }
best=9
for _ in $(seq 5); do
    t=$(curl -s -o "$work/fleet.json" -w '%{time_total}' -H "Authorization: Bearer $token" \
        "http://127.0.0.1:$port/fleet.json")
    best=$(awk -v a="$best" -v b="$t" 'BEGIN { print (b < a ? b : a) }')
done
size_kib=$(( $(stat -c %s "$work/fleet.json") / 1024 ))
hwm_mib=$(awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")
plain_hwm_mib=$(awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$plain_pid/status")
rows=$(python3 - "$work/fleet.sqlite" <<'PY' 2>/dev/null || echo "?"
import sqlite3, sys
print(sqlite3.connect(sys.argv[1]).execute("select count(*) from boxes").fetchone()[0])
PY
)

ratio=$(awk -v a="$fleet" -v b="$plain" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t ? "met" : "MISSED") }'; }
json_verdict=$(awk -v t="$best" 'BEGIN { print (t < 0.2 ? "met" : "MISSED") }')
kind=sqlite
case $database in postgres*) kind=postgresql ;; esac

echo "fleet: boxes' /version with reports and a rollout ${fleet} vs plain ${plain} req/s (${ratio}x); /fleet.json for ${known} boxes in ${best} s (${size_kib} KiB); database caught up in ${catchup} s; peak RSS ${hwm_mib} MiB (plain ${plain_hwm_mib} MiB)"

section=$(
    cat <<MD

## The fleet on update-server ($(date -u +%Y-%m-%d), $(nproc) cores, ${kind})

| Measure | Value | Target | |
|---|---:|---|---|
| plain \`/version\` (no headers, no rollout: as before the fleet), wrk 64 connections, ${secs} s (req/s) | ${plain} | | |
| ${boxes} boxes: \`/version\` with the fleet headers, 1 in ${every} a \`POST /report\`, a 10 % rollout (req/s) | ${fleet} | | |
| ratio | ${ratio} | >= 0.5 | $(verdict "$ratio" 0.5) |
| \`/fleet.json\` for ${known} boxes (best of 5, s; ${size_kib} KiB) | ${best} | < 0.2 | ${json_verdict} |
| database caught up after the load (s); rows | ${catchup}; ${rows} | | |
| peak RSS, VmHWM (MiB): the boxes' server; today's | ${hwm_mib}; ${plain_hwm_mib} | | |

Best of ${rounds} alternating rounds on one server (load average at the start: ${load0}); both
halves send their requests through the same wrk Lua script (the plain one without the fleet's
headers, reports and rollout), so that the client's cost on these cores is the same. Requests
only touch memory; the fleet thread writes changed boxes in batches every 250 ms, so the
database's speed shows in the catch-up time, never in the answers.
MD
)
if [ -n "$results" ]; then
    printf '%s\n' "$section" >>"$results"
    echo "fleet.sh: appended to $results" >&2
else
    printf '%s\n' "$section"
fi
