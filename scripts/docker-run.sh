#!/usr/bin/env bash
# Builds the update-server image and runs it with a host directory of images mounted at the
# container's /var/opq/box-updates (read-only: the server never writes there), and the fleet's
# database in FLEET_DIR (default: DIR.fleet beside it) at /var/lib/opq-fleet. Pass the operator's
# token for /fleet as FLEET_TOKEN.
#
#   scripts/docker-run.sh [DIR] [PORT]        default: /var/opq/box-updates 8151
#
# The container runs as the owner of DIR, so that it can read what is published there and tell
# files still being written from complete ones.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:-/var/opq/box-updates}
port=${2:-8151}
if [ ! -d "$dir" ]; then
    echo "docker-run.sh: $dir is not a directory" >&2
    exit 1
fi
dir=$(realpath "$dir")
fleet_dir=${FLEET_DIR:-$dir.fleet}
mkdir -p "$fleet_dir"
chown "$(stat -c %u:%g "$dir")" "$fleet_dir"
command -v docker >/dev/null 2>&1 || {
    echo "docker-run.sh: docker is not installed" >&2
    exit 1
}

DOCKER_BUILDKIT=1 docker build -f update-server/Dockerfile -t opq-update-server .
exec docker run --rm --name opq-update-server \
    --user "$(stat -c %u:%g "$dir")" \
    -p "$port:8151" \
    -v "$dir:/var/opq/box-updates:ro" \
    -v "$fleet_dir:/var/lib/opq-fleet" \
    opq-update-server ${FLEET_TOKEN:+--fleet-token "$FLEET_TOKEN"}
