#!/usr/bin/env bash
# update-server against nginx (Debian), side by side in one run, serving the same files:
#   1. wrk on /version, 64 connections (nginx serves a static `version` file);
#   2. 16 parallel downloads of a 512 MiB image to /dev/null;
# and the peak RSS (VmHWM) of each server. Each measurement runs in several rounds, alternating the
# two servers, and the best run counts, so that a burst of other work on the machine does not
# decide.
#
#   scripts/bench/server.sh [RESULTS.md]     # appends a markdown section to RESULTS.md (or stdout)
#
# Targets: /version >= 1.0x nginx's requests/s; download throughput >= 0.8x nginx's; peak RSS
# under 32 MiB. Env: BENCH_SECS (wrk duration, default 8), BENCH_MIB (image size, default 512),
# BENCH_DOWNLOADS (default 16), BENCH_ROUNDS (default 2), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."

results=${1:-}
secs=${BENCH_SECS:-8}
mib=${BENCH_MIB:-512}
downloads=${BENCH_DOWNLOADS:-16}
rounds=${BENCH_ROUNDS:-2}
version=1700000000
image=opq-box-update-$version.tar.bz2

nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
for tool in wrk curl "$nginx_bin"; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "server.sh: $tool is missing (Debian packages: wrk curl nginx-light)" >&2
        exit 1
    }
done

echo "server.sh: building update-server (release)" >&2
cargo build --release --quiet --bin update-server
server_bin=${CARGO_TARGET_DIR:-target}/release/update-server

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
work=$(mktemp -d /tmp/opq-bench-server.XXXXXX)
# nginx's workers drop root privileges: everything they read must be world-readable.
chmod 755 "$work"
mkdir -m 755 "$work/updates" "$work/nginx"

echo "server.sh: writing a $mib MiB image" >&2
head -c $((mib << 20)) /dev/urandom >"$work/updates/$image"
(cd "$work/updates" && sha256sum "$image" >"$image.sha256")
printf '%s' "$version" >"$work/updates/version"
chmod 644 "$work/updates"/*

RUST_LOG=info "$server_bin" --dir "$work/updates" --bind 127.0.0.1 --port 0 2>"$work/ours.log" &
ours_pid=$!
pids+=("$ours_pid")
ours_port=
for _ in $(seq 200); do
    ours_port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/ours.log")
    [ -n "$ours_port" ] && break
    sleep 0.05
done
[ -n "$ours_port" ] || { echo "server.sh: update-server did not start:" >&2; cat "$work/ours.log" >&2; exit 1; }

nginx_port=$(free_port)
nginx_conf "$work/nginx" "$work/updates" "$nginx_port" 1024 >"$work/nginx/nginx.conf"
"$nginx_bin" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" 2>"$work/nginx/stderr.log" &
nginx_pid=$!
pids+=("$nginx_pid")

wait_http "http://127.0.0.1:$ours_port/version"
wait_http "http://127.0.0.1:$nginx_port/version"

load0=$(cut -d' ' -f1 /proc/loadavg)
# Both read the image from the page cache.
cat "$work/updates/$image" >/dev/null

rps() { # port -> requests/s
    wrk -t2 -c64 -d"${secs}s" "http://127.0.0.1:$1/version" | awk '/^Requests\/sec:/ {print $2}'
}
cpu_ticks() { # pids -> user + system clock ticks of them and their children (nginx's workers)
    local t=0 p q
    for p in "$@"; do
        for q in "$p" $(pgrep -P "$p" || true); do
            t=$((t + $(awk '{print $14 + $15}' "/proc/$q/stat")))
        done
    done
    echo "$t"
}
download() { # port server-pids... -> "MiB/s CPU-s-per-GiB" for $downloads parallel downloads
    local port=$1 t0 t1 c0 c1 clients
    shift
    c0=$(cpu_ticks "$@")
    t0=$(date +%s.%N)
    # `times` in the subshell gives the CPU time of the downloads it waited for.
    clients=$(
        curls=()
        for _ in $(seq "$downloads"); do
            curl -s -f -o /dev/null "http://127.0.0.1:$port/update/$image" &
            curls+=($!)
        done
        for p in "${curls[@]}"; do wait "$p" || echo "failed"; done
        times
    )
    t1=$(date +%s.%N)
    c1=$(cpu_ticks "$@")
    case $clients in *failed*) echo "server.sh: a download from port $port failed" >&2; exit 1 ;; esac
    clients=${clients##*$'\n'}
    awk -v t0="$t0" -v t1="$t1" -v n="$downloads" -v mib="$mib" -v c0="$c0" -v c1="$c1" \
        -v hz="$(getconf CLK_TCK)" -v cl="$clients" 'BEGIN {
            split(cl, a, " "); client = 0
            for (i = 1; i <= 2; i++) { split(a[i], ms, /[ms]/); client += ms[1] * 60 + ms[2] }
            printf "%.0f %.3f\n", n * mib / (t1 - t0), ((c1 - c0) / hz + client) / (n * mib / 1024)
        }'
}
hwm_kib() { # pid -> VmHWM in KiB
    awk '/^VmHWM:/ {print $2}' "/proc/$1/status"
}
max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a > b ? a : b) }'; }
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b ? a : b) }'; }

ours_rps=0 nginx_rps=0 ours_dl=0 nginx_dl=0 ours_cpu=1e9 nginx_cpu=1e9
for round in $(seq "$rounds"); do
    echo "server.sh: round $round: wrk on /version, ${secs}s, 64 connections" >&2
    ours_rps=$(max "$ours_rps" "$(rps "$ours_port")")
    nginx_rps=$(max "$nginx_rps" "$(rps "$nginx_port")")
    echo "server.sh: round $round: $downloads parallel downloads of $mib MiB" >&2
    read -r dl cpu < <(download "$ours_port" "$ours_pid")
    ours_dl=$(max "$ours_dl" "$dl") ours_cpu=$(min "$ours_cpu" "$cpu")
    read -r dl cpu < <(download "$nginx_port" "$nginx_pid")
    nginx_dl=$(max "$nginx_dl" "$dl") nginx_cpu=$(min "$nginx_cpu" "$cpu")
done

ours_hwm=$(hwm_kib "$ours_pid")
# nginx's memory is its master and workers together.
nginx_hwm=0
for p in "$nginx_pid" $(pgrep -P "$nginx_pid" || true); do
    nginx_hwm=$((nginx_hwm + $(hwm_kib "$p")))
done
ours_threads=$(awk '/^Threads:/ {print $2}' "/proc/$ours_pid/status")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t ? "met" : "MISSED") }'; }
rps_ratio=$(ratio "$ours_rps" "$nginx_rps")
dl_ratio=$(ratio "$ours_dl" "$nginx_dl")
cpu_ratio=$(ratio "$ours_cpu" "$nginx_cpu")
hwm_mib=$(awk -v k="$ours_hwm" 'BEGIN { printf "%.1f", k / 1024 }')
nginx_hwm_mib=$(awk -v k="$nginx_hwm" 'BEGIN { printf "%.1f", k / 1024 }')
rss_verdict=$(awk -v m="$hwm_mib" 'BEGIN { print (m < 32 ? "met" : "MISSED") }')

echo "update-server vs nginx: /version ${ours_rps} vs ${nginx_rps} req/s (${rps_ratio}x), downloads ${ours_dl} vs ${nginx_dl} MiB/s (${dl_ratio}x) at ${ours_cpu} vs ${nginx_cpu} CPU s/GiB, peak RSS ${hwm_mib} MiB (nginx ${nginx_hwm_mib} MiB)"

section=$(
    cat <<EOF

## update-server vs nginx ($(date -u +%Y-%m-%d), $(nproc) cores, nginx $("$nginx_bin" -v 2>&1 | sed 's|.*/||'))

| Measure | update-server | nginx | ours / nginx | Target | |
|---|---:|---:|---:|---|---|
| \`/version\`, wrk 64 connections, ${secs} s (req/s) | ${ours_rps} | ${nginx_rps} | ${rps_ratio} | >= 1.0 | $(verdict "$rps_ratio" 1.0) |
| ${downloads} parallel downloads of ${mib} MiB (MiB/s, total) | ${ours_dl} | ${nginx_dl} | ${dl_ratio} | >= 0.8 | $(verdict "$dl_ratio" 0.8) |
| CPU per GiB downloaded, server + clients (s) | ${ours_cpu} | ${nginx_cpu} | ${cpu_ratio} | | |
| Peak RSS, VmHWM (MiB) | ${hwm_mib} | ${nginx_hwm_mib} (master + workers) | | < 32 | ${rss_verdict} |

Best of ${rounds} alternating rounds (load average at the start: ${load0}); both servers log every
request; nginx as Debian configures it (sendfile, tcp_nopush). The CPU time per GiB counts the
servers and the curl clients together, as loopback splits the kernel's work between them; it
depends far less than the throughput on what else runs on the machine. update-server had
${ours_threads} threads at the end.
EOF
)
if [ -n "$results" ]; then
    printf '%s\n' "$section" >>"$results"
    echo "server.sh: appended to $results" >&2
else
    printf '%s\n' "$section"
fi
