#!/usr/bin/env bash
# Issue 12's HTTP-layer decision, measured: update-server (the project's core: mio event loops +
# httparse), option (a) hyper 1.x + tokio (./hyper, multi-thread and current-thread runtimes) and
# nginx as the yardstick, side by side in one run on the same files:
#   1. wrk on /version, 64 connections;
#   2. 16 parallel downloads of a 512 MiB image;
#   3. IDLE connections that say nothing plus SLOW slowloris connections (scripts/bench/http_load.rs),
#      then 2000 /version probes on new connections: p99 and the server's peak RSS;
# and each server's binary size, with the same minimal server built on each HTTP layer
# (./core includes src/http as it is). Prints a markdown table.
#
#   scripts/bench/http-options/compare.sh        # env: SECS (wrk, 5), MIB (512), IDLE, SLOW (10000 each,
#                                                 # fewer when the open-file limit is lower)
set -euo pipefail
cd "$(dirname "$0")/../../.."
secs=${SECS:-5}
mib=${MIB:-512}
version=1700000000
image=opq-box-update-$version.tar.bz2

echo "compare.sh: building update-server, http-load and the hyper option (release)" >&2
cargo build --release --quiet --bin update-server --bin http-load
(cd scripts/bench/http-options/hyper && cargo build --release --quiet)
# The same minimal server on the project's core, to weigh what each layer adds to a binary.
(cd scripts/bench/http-options/core && cargo build --release --quiet)
core_min=scripts/bench/http-options/core/target/release/core-option
ours_bin=target/release/update-server
hyper_bin=scripts/bench/http-options/hyper/target/release/hyper-option
load=target/release/http-load
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

# Every server holds IDLE + SLOW connections, the load tool's two processes half each.
hard=$(ulimit -Hn)
ulimit -n "$hard"
fit=$(((hard - 100) / 2))
idle=${IDLE:-$((fit < 10000 ? fit : 10000))}
slow=${SLOW:-$idle}

# shellcheck source=scripts/lib.sh
. scripts/lib.sh
work=$(mktemp -d /tmp/opq-http-options.XXXXXX)
chmod 755 "$work"
mkdir -m 755 "$work/updates" "$work/nginx"
head -c $((mib << 20)) /dev/urandom >"$work/updates/$image"
printf '%s' "$version" >"$work/updates/version"
chmod 644 "$work/updates"/*
cat "$work/updates/$image" >/dev/null

start() { # name -> pid, port (globals)
    port=$(free_port)
    case $1 in
    ours) "$ours_bin" --dir "$work/updates" --bind 127.0.0.1 --port "$port" 2>"$work/$1.log" & ;;
    hyper-mt) "$hyper_bin" "127.0.0.1:$port" "$work/updates" --threads 2 2>"$work/$1.log" & ;;
    hyper-ct) "$hyper_bin" "127.0.0.1:$port" "$work/updates" --threads 1 2>"$work/$1.log" & ;;
    nginx)
        nginx_conf "$work/nginx" "$work/updates" "$port" "$hard" backlog=4096 >"$work/nginx/nginx.conf"
        "$nginx_bin" -c "$work/nginx/nginx.conf" -e "$work/nginx/error.log" 2>"$work/nginx/stderr.log" &
        ;;
    esac
    pid=$!
    pids+=("$pid")
    wait_http "http://127.0.0.1:$port/version"
}
stop() { # name pid: SIGQUIT lets nginx's master take its workers down with it; the others
    # ignore it (a background job of a script inherits SIGQUIT ignored), so they get SIGTERM.
    if [ "$1" = nginx ]; then kill -QUIT "$2" 2>/dev/null || true; else kill "$2" 2>/dev/null || true; fi
    wait "$2" 2>/dev/null || true
}
rss_kib() { # pid [children too] -> KiB of the field $2 (VmRSS, VmHWM)
    local t=0 q
    for q in "$1" $(pgrep -P "$1" || true); do
        t=$((t + $(awk -v f="$2:" '$1 == f {print $2}' "/proc/$q/status")))
    done
    echo "$t"
}
rps() { wrk -t2 -c64 -d"${secs}s" "http://127.0.0.1:$1/version" | awk '/^Requests\/sec:/ {printf "%.0f", $2}'; }
downloads() { # port -> MiB/s of 16 parallel downloads
    local t0 t1 ps=()
    t0=$(date +%s.%N)
    for _ in $(seq 16); do
        curl -s -f -o /dev/null "http://127.0.0.1:$1/update/$image" &
        ps+=($!)
    done
    for p in "${ps[@]}"; do wait "$p"; done
    t1=$(date +%s.%N)
    awk -v t0="$t0" -v t1="$t1" -v mib="$mib" 'BEGIN { printf "%.0f", 16 * mib / (t1 - t0) }'
}
held() { # port pid -> "RSS-idle RSS-both p99 peak failed"
    local port=$1 pid=$2 a b r1 r2 p
    mkfifo "$work/fa" "$work/fb"
    "$load" hold "127.0.0.1:$port" --idle "$idle" --source 127.0.0.2 <"$work/fa" >"$work/ha" &
    a=$!
    exec 7>"$work/fa"
    for _ in $(seq 600); do grep -q ready "$work/ha" && break; sleep 0.1; done
    r1=$(rss_kib "$pid" VmRSS)
    "$load" hold "127.0.0.1:$port" --slow "$slow" --source 127.0.0.3 <"$work/fb" >"$work/hb" &
    b=$!
    exec 8>"$work/fb"
    for _ in $(seq 600); do grep -q ready "$work/hb" && break; sleep 0.1; done
    r2=$(rss_kib "$pid" VmRSS)
    p=$("$load" probe "127.0.0.1:$port" --count 2000)
    exec 7>&- 8>&-
    wait "$a" "$b" 2>/dev/null || true
    rm -f "$work/fa" "$work/fb"
    echo "$r1 $r2 $(awk '{print $12}' <<<"$p") $(rss_kib "$pid" VmHWM) $(awk '{print $6}' <<<"$p")"
}
mib_of() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

rows=()
for s in ours hyper-mt hyper-ct nginx; do
    echo "compare.sh: $s" >&2
    start "$s"
    base=$(rss_kib "$pid" VmRSS)
    r=$(rps "$port")
    d=$(downloads "$port")
    read -r r1 r2 p99 peak failed < <(held "$port" "$pid")
    case $s in
    ours) size=$(stat -c %s "$ours_bin") ;;
    hyper-*) size=$(stat -c %s "$hyper_bin") ;;
    nginx) size=$(stat -c %s "$nginx_bin") ;;
    esac
    rows+=("| $s | $r | $d | $(mib_of "$base") | $(mib_of "$r1") | $(mib_of "$r2") | $(mib_of "$peak") | $p99 | $failed | $(mib_of $((size / 1024))) |")
    stop "$s" "$pid"
done

cat <<EOF

### HTTP layer options ($(date -u +%Y-%m-%d), $(nproc) cores, load average $(cut -d' ' -f1 /proc/loadavg) at the end)

$idle idle + $slow slowloris connections; 2000 \`/version\` probes on new connections under that load.

| Server | /version req/s (wrk, 64 conn) | 16 × $mib MiB downloads, MiB/s | RSS at rest, MiB | RSS + $idle idle | RSS + $slow slow too | peak RSS | probe p99 ms | probes failed | binary MiB |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
$(printf '%s\n' "${rows[@]}")

The same minimal server (\`/version\` and \`/update/<name>\`, LTO, stripped) is $(mib_of $(($(stat -c %s "$core_min") / 1024))) MiB on
the project's core (scripts/bench/http-options/core) and $(mib_of $(($(stat -c %s "$hyper_bin") / 1024))) MiB on hyper + tokio; update-server's
binary is the whole program.
EOF
