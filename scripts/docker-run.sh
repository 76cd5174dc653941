#!/usr/bin/env bash
# Builds the update-server image (scripts/docker-build.sh) and runs it with a host directory of
# images mounted read-only at the container's /var/opq/box-updates.
#
#   scripts/docker-run.sh [-d] [DIR] [PORT] [BIND]
#       DIR   the update directory            default /var/opq/box-updates
#       PORT  the port to serve on            default 8151
#       BIND  the host address to listen on   default 0.0.0.0 (127.0.0.1: this machine only)
#       -d    in the background, restarted by Docker unless stopped (`docker stop
#             opq-update-server`, then `docker rm opq-update-server`); otherwise in the
#             foreground until Ctrl-C, and removed when it ends.
#
# The container shares the host's network (--network host): the server listens on BIND:PORT
# itself and sees the boxes' own addresses, and it works on engines without a bridge network.
# It runs as the owner of DIR (so that it can tell files still being written from complete
# ones), never as root, with a read-only root file system and no capabilities. Honours
# DOCKER_HOST.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=(--rm)
if [ "${1:-}" = -d ]; then
    mode=(--detach --restart unless-stopped)
    shift
fi
dir=${1:-/var/opq/box-updates}
port=${2:-8151}
bind=${3:-0.0.0.0}
say() { echo "docker-run.sh: $*" >&2; }

if [ ! -d "$dir" ]; then
    say "$dir is not a directory (give the update directory: scripts/docker-run.sh DIR [PORT] [BIND])"
    exit 2
fi
case $port in '' | *[!0-9]*)
    say "PORT must be a number, not '$port'"
    exit 2
    ;;
esac
dir=$(realpath "$dir")
user=$(stat -c %u:%g "$dir")
if [ "${user%%:*}" = 0 ]; then
    # Never root in the container: the image's own user can read a world-readable directory,
    # but only inotify's events tell it which files are complete.
    say "$dir belongs to root; running as the image's user 8151 instead (chown -R 8151:8151 $dir lets it also check for files still being written)"
    user=8151:8151
fi

bash scripts/docker-build.sh opq-update-server
settings=$(printf '{"port": %s, "updates_dir": "/var/opq/box-updates", "bind": "%s"}' "$port" "$bind")
say "serving $dir on $bind:$port"
exec docker run --name opq-update-server "${mode[@]}" \
    --network host \
    --user "$user" \
    --read-only --cap-drop ALL --security-opt no-new-privileges \
    -e BOX_UPDATE_SERVER_SETTINGS="$settings" \
    -v "$dir:/var/opq/box-updates:ro" \
    opq-update-server
