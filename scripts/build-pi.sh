#!/usr/bin/env bash
# Binaries for Raspberry Pi OS (bookworm): 64-bit (aarch64) and 32-bit (armv7 hard-float).
# Release builds are small (LTO, stripped). Installs the rustup targets and Debian's cross
# compilers (and qemu-user-static, to run them here) when missing.
# Output: target/<triple>/{release,debug}/{build-update,update-server,box-updater}.
# Usage: scripts/build-pi.sh [--debug] [--bin NAME] [aarch64|armv7]...
set -euo pipefail
cd "$(dirname "$0")/.."

profile=(--release) dir=release bins=(--bins) archs=()
while [ $# -gt 0 ]; do
    case $1 in
        --debug) profile=() dir=debug ;;
        --bin) bins=(--bin "$2"); shift ;;
        aarch64 | armv7) archs+=("$1") ;;
        *) echo "build-pi: unknown argument $1 (see the usage line in this script)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#archs[@]} -gt 0 ] || archs=(aarch64 armv7)

SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
# Every architecture in one cargo run: it builds both dependency graphs side by side, so that
# neither core waits on one crate's long compile or a link.
targets=() linkers=() triples=()
for arch in "${archs[@]}"; do
    case $arch in
        aarch64) triple=aarch64-unknown-linux-gnu gcc=aarch64-linux-gnu-gcc pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
        armv7) triple=armv7-unknown-linux-gnueabihf gcc=arm-linux-gnueabihf-gcc pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
    esac
    if ! command -v "$gcc" >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
        echo "build-pi: installing ${pkgs[*]} qemu-user-static" >&2
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" qemu-user-static >/dev/null
    fi
    rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"
    upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    linkers+=("CARGO_TARGET_${upper}_LINKER=$gcc" "CC_${triple//-/_}=$gcc")
    targets+=(--target "$triple")
    triples+=("$triple")
done
env "${linkers[@]}" cargo build --quiet "${profile[@]}" "${targets[@]}" "${bins[@]}"
for triple in "${triples[@]}"; do
    for b in build-update update-server box-updater; do
        f="target/$triple/$dir/$b"
        [ -f "$f" ] && echo "build-pi: $f ($(du -h "$f" | cut -f1))" >&2
    done
done
exit 0
