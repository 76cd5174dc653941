#!/usr/bin/env bash
# Assembles the box-updater payload directory of a box image: the ARM binary, its systemd unit and
# the public key that later images must be signed with (the key the box will trust next).
# Usage: scripts/make-box-payload.sh aarch64|armv7 PUBLIC_KEY OUT_DIR
#   then: build-update --sign-key KEY --out UPDATES OUT_DIR/box-updater your-services...
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { echo "usage: $0 aarch64|armv7 PUBLIC_KEY OUT_DIR" >&2; exit 2; }
arch=$1 key=$2 out=$3
case $arch in
    aarch64) triple=aarch64-unknown-linux-gnu ;;
    armv7) triple=armv7-unknown-linux-gnueabihf ;;
    *) echo "make-box-payload: arch must be aarch64 (64-bit Raspberry Pi OS) or armv7 (32-bit)" >&2; exit 2 ;;
esac
[ -f "$key" ] || { echo "make-box-payload: no public key at $key (build-update keygen makes one)" >&2; exit 2; }
bin="target/$triple/release/box-updater"
[ -f "$bin" ] || bash scripts/build-pi.sh "$arch"
mkdir -p "$out/box-updater"
cp "$bin" "$out/box-updater/box-updater"
cp box-updater/box-updater.service box-updater/box-updater-guard.service "$out/box-updater/"
cp "$key" "$out/box-updater/box-update.pub"
chmod 0755 "$out/box-updater/box-updater"
echo "$out/box-updater"
