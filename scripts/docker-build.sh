#!/usr/bin/env bash
# Builds the update-server container image (update-server/Dockerfile): first the static musl
# binary with cargo, then the image FROM scratch around it. Nothing is pulled from a registry.
#
#   scripts/docker-build.sh [TAG]            default tag: opq-update-server
#   scripts/docker-build.sh --binary-only    the static binary alone (scripts/test.sh builds it
#                                            before the tests; no Docker needed)
#
# Needs: the rustup target x86_64-unknown-linux-musl and Debian's musl-tools (the C parts of
# `ring` are compiled with musl-gcc); both are installed when missing. Honours DOCKER_HOST.
set -euo pipefail
cd "$(dirname "$0")/.."

binary_only=0
if [ "${1:-}" = --binary-only ]; then
    binary_only=1
    shift
fi
tag=${1:-opq-update-server}
triple=x86_64-unknown-linux-musl
say() { echo "docker-build.sh: $*" >&2; }

if [ $binary_only = 0 ] && ! command -v docker >/dev/null 2>&1; then
    say "docker is not installed (Debian: apt-get install docker.io)"
    exit 1
fi
if ! rustup target list --installed | grep -qx "$triple"; then
    say "installing the Rust target $triple (rustup target add)"
    rustup target add "$triple" || {
        say "cannot add the Rust target $triple; run 'rustup target add $triple' by hand"
        exit 1
    }
fi
if ! command -v musl-gcc >/dev/null 2>&1; then
    say "installing musl-tools (musl-gcc, for ring's C code in the static build)"
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends musl-tools >/dev/null; } || {
        say "cannot install musl-tools with apt-get; install it by hand"
        exit 1
    }
fi

say "building the static update-server ($triple, release)"
env "CC_${triple//-/_}=musl-gcc" cargo build --quiet --release --locked --target "$triple" --bin update-server
[ $binary_only = 1 ] && exit 0
say "building the image $tag"
docker build --quiet -f update-server/Dockerfile -t "$tag" . >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$tag")
say "$tag: $((size / 1024)) KiB"
