#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need (Debian packages, playwright-core, the
# ARM cross toolchain, cargo-fuzz) when it is missing, so it works on a fresh machine: README's
# second command, and what CI runs. FUZZ_SECONDS=0 skips the short fuzzing pass.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in minisign:minisign shellcheck:shellcheck bunzip2:bzip2 wget:wget curl:curl nginx:nginx-light \
    chromium:chromium wrk:wrk qemu-aarch64-static:qemu-user-static aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu \
    setpriv:util-linux node:nodejs npm:npm; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need_apt+=("${pair#*:}")
done
command -v arm-linux-gnueabihf-gcc >/dev/null 2>&1 || need_apt+=(gcc-arm-linux-gnueabihf)
[ -d /usr/aarch64-linux-gnu/lib ] || need_apt+=(libc6-dev-arm64-cross)
[ -d /usr/arm-linux-gnueabihf/lib ] || need_apt+=(libc6-dev-armhf-cross)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# REDbot's virtual environment needs venv (and its ensurepip), a package of its own on Debian.
[ -x target/redbot-venv/bin/redbot ] || python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_apt[*]}" >&2
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ ! -x target/redbot-venv/bin/redbot ]; then
    # REDbot (lint for HTTP) checks every endpoint of both servers (tests/integration/redbot.rs).
    echo "test.sh: installing redbot into target/redbot-venv" >&2
    rm -rf target/redbot-venv
    python3 -m venv target/redbot-venv
    target/redbot-venv/bin/pip install --quiet --disable-pip-version-check redbot==2.7.1
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
    echo "test.sh: installing playwright-core" >&2
    (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
cargo fmt --check
cargo clippy --all-targets --all-features --quiet -- -D warnings
# The end-to-end updates on a Pi run these ARM builds under qemu-user-static.
bash scripts/build-pi.sh --debug --bin box-updater aarch64 armv7
if [ "${FUZZ_SECONDS:-15}" != 0 ]; then
    bash scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
fi
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --all-targets --features fault-injection --no-fail-fast "$@"
else
    cargo test --all-targets --features fault-injection --no-fail-fast "$@"
fi
