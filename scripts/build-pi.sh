#!/usr/bin/env bash
# Release binaries for Raspberry Pi OS (bookworm): 64-bit (aarch64) and 32-bit (armv7 hard-float),
# small (LTO, stripped). Installs the rustup targets and Debian's cross compilers when missing.
# Output: target/<triple>/release/{build-update,update-server,box-updater}.
# Usage: scripts/build-pi.sh [aarch64|armv7]...
set -euo pipefail
cd "$(dirname "$0")/.."

archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(aarch64 armv7)
for arch in "${archs[@]}"; do
    case $arch in
        aarch64) triple=aarch64-unknown-linux-gnu gcc=aarch64-linux-gnu-gcc pkg=gcc-aarch64-linux-gnu ;;
        armv7) triple=armv7-unknown-linux-gnueabihf gcc=arm-linux-gnueabihf-gcc pkg=gcc-arm-linux-gnueabihf ;;
        *) echo "build-pi: unknown arch $arch (aarch64 or armv7)" >&2; exit 2 ;;
    esac
    if ! command -v "$gcc" >/dev/null; then
        echo "build-pi: installing $pkg" >&2
        SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$pkg" libc6-dev-"${pkg#gcc-}"-cross >/dev/null 2>&1 ||
            DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
    fi
    rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"
    upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    env "CARGO_TARGET_${upper}_LINKER=$gcc" "CC_${triple//-/_}=$gcc" \
        cargo build --release --quiet --target "$triple" --bins
    ls -l "target/$triple/release/"{build-update,update-server,box-updater} >&2
done
