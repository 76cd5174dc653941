#!/usr/bin/env bash
# Runs the whole test suite. Installs what the tests need (Debian packages, playwright-core) when
# it is missing, so it works on a fresh machine: README's second command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in minisign:minisign shellcheck:shellcheck bunzip2:bzip2 wget:wget nginx:nginx-light \
    chromium:chromium wrk:wrk; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_apt[*]}" >&2
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ -f tests/browser/package.json ] && [ ! -d tests/browser/node_modules/playwright-core ]; then
    echo "test.sh: installing playwright-core" >&2
    (cd tests/browser && npm install --no-audit --no-fund --silent)
fi

export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
cargo fmt --check
cargo clippy --all-targets --all-features --quiet -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --all-targets --features fault-injection --no-fail-fast "$@"
else
    cargo test --all-targets --features fault-injection --no-fail-fast "$@"
fi
