#!/usr/bin/env bash
# The main job, end to end on one machine: builds a signed update image from the sample payload
# and shows what it made. (Grows into build -> serve -> update as the other programs land.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bins
bin=target/release
work=$(mktemp -d /tmp/opq-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "== keys"
"$bin/build-update" keygen --secret-key "$work/demo.key" --public-key "$work/demo.pub"
echo "== build"
image=$("$bin/build-update" --out "$work/updates" --sign-key "$work/demo.key" scripts/demo-payload/box-config-daemon | tail -n 1)
ls -l "$work/updates"
echo "== contents"
tar tvjf "$image"
echo "== checks"
(cd "$work/updates" && sha256sum -c ./*.sha256)
if command -v minisign >/dev/null; then minisign -V -p "$work/demo.pub" -m "$image"; fi
