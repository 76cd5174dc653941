#!/usr/bin/env bash
# Shared by scripts/demo.sh and scripts/bench/*.sh (sourced): on exit, stop the processes a
# script put in `pids` and remove its `work` directory; find a free port; wait for a server.
pids=()
work=
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "$work" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
# Ctrl-C or a stop ends the script through its exit trap, with the usual status.
trap 'exit 130' INT
trap 'exit 143' TERM

# A loopback port nothing listens on right now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 10 s for URL to answer with a success status; exits the script otherwise.
wait_http() {
    for _ in $(seq 200); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.05
    done
    echo "$(basename "$0"): $1 never answered" >&2
    exit 1
}
