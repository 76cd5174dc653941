#!/usr/bin/env bash
# The box's story on a virtual OPQ Box: Debian bookworm with systemd under qemu (plain emulation),
# driven from the host through its pages, its serial console and qemu itself (tests/system/).
# Installs what it needs (qemu, debootstrap, cpio), builds the test bed once (cached under
# target/system/, keyed by its recipe), runs the story and ends with `N passed, N failed`.
# The guest's box-updater is the tests' own build (target/debug, `--features fault-injection`,
# as scripts/test.sh builds it; its bzip2 and hashing are optimised, see Cargo.toml), stripped.
# Needs root (debootstrap, mkfs.ext4 -d with file owners).
# --powercut N cuts the power (SIGKILL of qemu) N times during updates instead of the story
# (--long: 200 cuts), --replay records one update through dm-log-writes and checks the box at
# every flush point of it (tests/system/README.md); --steps rollback,confirm aims the cuts at
# those steps only (to chase one kind of cut).
# Usage: scripts/system-test.sh [--arch x86_64|aarch64] [--smp N] [--boot-only] [--powercut N|--long] [--lanes N] [--seed N] [--steps S,S] [--replay]
set -euo pipefail
cd "$(dirname "$0")/.."
arch=x86_64 extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --arch) arch=${2:?--arch needs x86_64 or aarch64}; shift 2 ;;
        --smp) extra+=(--smp "${2:?--smp needs a number}"); shift 2 ;;
        --boot-only) extra+=(--boot-only); shift ;;
        --powercut) extra+=(--powercut "${2:?--powercut needs a number of cuts}"); shift 2 ;;
        --long) extra+=(--powercut 200); shift ;;
        --lanes) extra+=(--lanes "${2:?--lanes needs a number}"); shift 2 ;;
        --steps) extra+=(--steps "${2:?--steps needs step names, e.g. rollback,confirm}"); shift 2 ;;
        --seed) extra+=(--seed "${2:?--seed needs a number}"); shift 2 ;;
        --replay) extra+=(--replay); shift ;;
        *) echo "usage: $0 [--arch x86_64|aarch64] [--smp N] [--boot-only] [--powercut N|--long] [--lanes N] [--seed N] [--steps S,S] [--replay]" >&2; exit 2 ;;
    esac
done
case $arch in
    x86_64) debian=amd64 qemu=qemu-system-x86_64:qemu-system-x86 strip=strip ;;
    aarch64) debian=arm64 qemu=qemu-system-aarch64:qemu-system-arm strip=aarch64-linux-gnu-strip ;;
    *) echo "system-test: --arch must be x86_64 or aarch64" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "system-test: run as root (debootstrap, file owners in the disk image)" >&2; exit 2; }

need_apt=()
for pair in "$qemu" debootstrap:debootstrap mkfs.ext4:e2fsprogs debugfs:e2fsprogs cpio:cpio useradd:passwd; do
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

# The harness and the guest's box-updater: the same build as the other tests (no rebuild after
# scripts/test.sh), the box-updater stripped of its debug information for the image.
t0=$(date +%s)
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
# (Building a test target builds the binaries too.)
cargo test --quiet --features fault-injection --test system --no-run
if [ "$arch" = x86_64 ]; then
    built=target/debug/box-updater
else
    bash scripts/build-pi.sh --debug --bin box-updater aarch64 >/dev/null
    built=target/aarch64-unknown-linux-gnu/debug/box-updater
fi
guest_updater=$PWD/target/system/guest-$debian/box-updater
mkdir -p "${guest_updater%/*}"
"$strip" -o "$guest_updater.tmp" "$built"
mv "$guest_updater.tmp" "$guest_updater"
echo "system-test: guest box-updater $built, stripped: $(du -h "$guest_updater" | cut -f1) ($(( $(date +%s) - t0 )) s)" >&2

cargo test --quiet --features fault-injection --test system -- \
    --arch "$arch" --vm-dir "$vm_dir" --guest-updater "$guest_updater" "${extra[@]}"
