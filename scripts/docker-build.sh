#!/usr/bin/env bash
# Builds the update-server container image (update-server/Dockerfile): first the static musl
# binary with cargo, then the image FROM scratch around it, from a build context of two files
# staged under target/docker/<profile>/ (the binary, and state.tar: the empty state directory).
# Nothing is pulled from a registry.
#
#   scripts/docker-build.sh [--profile P] [TAG]            default tag: opq-update-server
#   scripts/docker-build.sh [--profile P] --binary-only    the static binary alone (no Docker)
#       --profile P   the cargo profile of the binary: `release` (the default: fat LTO, one
#                     codegen unit, the smallest and fastest binary, minutes to build) or
#                     `docker-test` (optimised without LTO, what the container test runs;
#                     Cargo.toml says why); default: $DOCKER_BUILD_PROFILE, else release
#                     (so scripts/docker-run.sh, which calls this script, can be told too)
#
# Needs: the rustup target x86_64-unknown-linux-musl and Debian's musl-tools (the C parts of
# `ring` and SQLite are compiled with musl-gcc); both are installed when missing. Honours
# DOCKER_HOST.
set -euo pipefail
cd "$(dirname "$0")/.."

binary_only=0 profile=${DOCKER_BUILD_PROFILE:-release} tag=
while [ $# -gt 0 ]; do
    case $1 in
        --binary-only) binary_only=1 ;;
        --profile) profile=${2:?--profile needs a cargo profile: release or docker-test}; shift ;;
        -*) echo "docker-build.sh: unknown option $1 (usage: scripts/docker-build.sh [--profile P] [--binary-only] [TAG])" >&2; exit 2 ;;
        *) tag=$1 ;;
    esac
    shift
done
tag=${tag:-opq-update-server}
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
    say "installing musl-tools (musl-gcc, for the C code of ring and SQLite in the static build)"
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends musl-tools >/dev/null; } || {
        say "cannot install musl-tools with apt-get; install it by hand"
        exit 1
    }
fi

say "building the static update-server ($triple, profile $profile)"
env "CC_${triple//-/_}=musl-gcc" cargo build --quiet --profile "$profile" --locked --target "$triple" --bin update-server
[ $binary_only = 1 ] && exit 0

# The build context: the binary and the state directory as a tar archive, nothing else. ADD
# unpacks the archive with its owner and mode (uid 8151, 0775: writable for the image's group,
# which scripts/docker-run.sh adds when it runs as the update directory's owner), which COPY
# can't give a directory without BuildKit.
case $profile in dev | test) out=debug ;; bench) out=release ;; *) out=$profile ;; esac
context=target/docker/$profile
rm -rf "$context"
mkdir -p "$context/tree/var/lib/opq-update-server"
chmod 0775 "$context/tree/var/lib/opq-update-server"
tar -C "$context/tree" --numeric-owner --owner=8151 --group=8151 -cf "$context/state.tar" var/lib/opq-update-server
rm -rf "$context/tree"
cp "target/$triple/$out/update-server" "$context/update-server"
say "building the image $tag"
docker build --quiet -f update-server/Dockerfile -t "$tag" "$context" >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$tag")
say "$tag: $((size / 1024)) KiB"
