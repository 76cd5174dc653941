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

# nginx.conf for serving ROOT the way update-server does (`/version`, `/update/<name>`), as
# Debian's nginx.conf ships (sendfile, TCP_CORK, an access log line per request), its files under
# DIR: nginx_conf DIR ROOT PORT CONNECTIONS [LISTEN_OPTIONS]. CONNECTIONS is each worker's
# connection limit and its open-file limit.
nginx_conf() {
    local dir=$1 root=$2 port=$3 conns=$4 listen_opts=${5:-}
    cat <<CONF
daemon off;
worker_processes auto;
worker_rlimit_nofile $conns;
pid $dir/nginx.pid;
error_log $dir/error.log;
events { worker_connections $conns; }
http {
    sendfile on;
    tcp_nopush on;
    access_log $dir/access.log;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$port${listen_opts:+ $listen_opts};
        root $root;
        location = /version { default_type text/plain; }
        location /update/ { alias $root/; }
    }
}
CONF
}
