#!/usr/bin/env bash
# The box's story on a virtual OPQ Box: Debian bookworm with systemd under qemu (plain emulation),
# driven from the host through its pages, its serial console and qemu itself (tests/system/).
# Installs what it needs (qemu, debootstrap), builds the test bed once (cached under
# target/system/, keyed by its recipe), builds box-updater for the guest, runs the story and ends
# with `N passed, N failed`. Needs root (debootstrap, mkfs.ext4 -d with file owners).
# Usage: scripts/system-test.sh [--arch x86_64|aarch64]
set -euo pipefail
cd "$(dirname "$0")/.."
arch=x86_64
while [ $# -gt 0 ]; do
    case $1 in
        --arch) arch=${2:?--arch needs x86_64 or aarch64}; shift 2 ;;
        *) echo "usage: $0 [--arch x86_64|aarch64]" >&2; exit 2 ;;
    esac
done
case $arch in
    x86_64) debian=amd64 qemu=qemu-system-x86_64:qemu-system-x86 ;;
    aarch64) debian=arm64 qemu=qemu-system-aarch64:qemu-system-arm ;;
    *) echo "system-test: --arch must be x86_64 or aarch64" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "system-test: run as root (debootstrap, file owners in the disk image)" >&2; exit 2; }

need_apt=()
for pair in "$qemu" debootstrap:debootstrap mkfs.ext4:e2fsprogs debugfs:e2fsprogs; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "system-test: installing ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

t0=$(date +%s)
vm_dir=$(bash tests/system/build-rootfs.sh "$debian")
echo "system-test: test bed $vm_dir ($(( $(date +%s) - t0 )) s)" >&2

# The guest's box-updater: an optimised build (fast under emulation; the `guest` profile skips
# the release profile's whole-program LTO, which costs minutes on 2 cores).
t0=$(date +%s)
if [ "$arch" = x86_64 ]; then
    cargo build --profile guest --quiet --bin box-updater
    guest_updater=$PWD/target/guest/box-updater
else
    bash scripts/build-pi.sh aarch64 >/dev/null
    guest_updater=$PWD/target/aarch64-unknown-linux-gnu/release/box-updater
fi
echo "system-test: guest box-updater $guest_updater ($(( $(date +%s) - t0 )) s)" >&2

export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
cargo test --quiet --features system-test --test system -- \
    --arch "$arch" --vm-dir "$vm_dir" --guest-updater "$guest_updater"
