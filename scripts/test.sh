#!/usr/bin/env bash
# Runs the whole test suite: README's second command, and what CI runs on a fresh Debian machine.
# It installs what the tests need when it is missing, saying what and why, and stops with a clear
# message when it can't. Order: set-up, lints, builds, the tests, then a short fuzzing pass
# (FUZZ_SECONDS=0 skips it), the virtual box's story (as root), then a check that no test left a
# process behind. The virtual box's test bed (a debootstrap: network and disk, minutes on a fresh
# machine) is built in the background from the start, while the compiles run. Each phase's time
# is printed at the end.
# Arguments go to cargo nextest (e.g. -E 'test(docker)'). SYSTEM_TEST=0 skips the virtual box
# (for a quick run of a few tests; CI runs it), FUZZ_SECONDS=0 the fuzzing.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "test.sh: $*" >&2; }
fail() { say "$*"; exit 1; }
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo

# Phases and their wall-clock times, printed when the script ends, however it ends.
started=$(date +%s) phase_name='' phase_start=$started timings=()
phase() {
    local now
    now=$(date +%s)
    [ -z "$phase_name" ] || timings+=("$(printf '%5d s  %s' $((now - phase_start)) "$phase_name")")
    phase_name=$1 phase_start=$now
    [ -z "$1" ] || say "$1"
}
rootfs_pid='' rootfs_log=''
# shellcheck disable=SC2317 # run by the EXIT trap
finish() {
    local code=$?
    phase ""
    if [ -n "$rootfs_pid" ] && kill -0 "$rootfs_pid" 2>/dev/null; then
        say "stopping the test bed's build in the background (process group $rootfs_pid)"
        kill -TERM -- "-$rootfs_pid" 2>/dev/null || true
        wait "$rootfs_pid" 2>/dev/null || true
    fi
    [ -z "$rootfs_log" ] || rm -f "$rootfs_log"
    say "times (wall clock, $(nproc) cores):"
    printf '  %s\n' "${timings[@]}" >&2
    printf '%7d s  total\n' $(($(date +%s) - started)) >&2
    exit "$code"
}
trap finish EXIT
phase "installing what the tests need"

system_test=1
if [ "$(id -u)" -ne 0 ]; then
    system_test=0
    say "NOTE: not root: the container test (a Docker engine of its own) will be SKIPPED; CI runs as root"
elif [ "${SYSTEM_TEST:-1}" = 0 ]; then
    system_test=0
    say "NOTE: SYSTEM_TEST=0: the virtual box's story (scripts/system-test.sh) will be SKIPPED"
fi

# Debian packages: "command:package", one a line, with what needs them.
apt_needs=(
    minisign:minisign                             # signatures checked with the reference tool
    shellcheck:shellcheck                         # the scripts' lint test
    bunzip2:bzip2                                 # images open with the stock tools
    lbzip2:lbzip2                                 # ... lbzip2 too (our encoder's tests)
    wget:wget                                     # the old boxes' updater
    curl:curl                                     # the demo and script tests
    python3:python3                               # the demo and scripts/lib.sh
    nginx:nginx-light                             # scale-out: images served by nginx
    chromium:chromium                             # the page in a real browser
    node:nodejs                                   # ... driven by playwright-core
    npm:npm                                       # ... installed with npm
    wrk:wrk                                       # load tests
    qemu-aarch64-static:qemu-user-static          # the Pi builds run under qemu
    aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu   # ... cross-built for 64-bit Pi OS
    arm-linux-gnueabihf-gcc:gcc-arm-linux-gnueabihf # ... and 32-bit Pi OS
    setpriv:util-linux                            # running the server as nobody
    dockerd:docker.io                             # the update-server container, run for real
    musl-gcc:musl-tools                           # ... its static (musl) build
    c++:g++                                       # libFuzzer, for the fuzzing pass
)
if [ $system_test = 1 ]; then
    apt_needs+=(
        qemu-system-x86_64:qemu-system-x86        # the virtual box (scripts/system-test.sh)
        debootstrap:debootstrap                   # ... its Debian root file system
        mkfs.ext4:e2fsprogs                       # ... its disks (and debugfs to read them)
        cpio:cpio                                 # ... its initrd
        useradd:passwd                            # ... its user pi
    )
fi
missing=()
for pair in "${apt_needs[@]}"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
done
[ -d /usr/aarch64-linux-gnu/lib ] || missing+=(libc6-dev-arm64-cross)
[ -d /usr/arm-linux-gnueabihf/lib ] || missing+=(libc6-dev-armhf-cross)
# REDbot's virtual environment needs venv (and its ensurepip), a package of its own on Debian.
[ -x target/redbot-venv/bin/redbot ] || python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# The fleet's tests start a PostgreSQL server of their own with initdb and pg_ctl.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    { $SUDO apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
        fail "apt-get could not install ${missing[*]}; install them by hand (apt-get install ${missing[*]}) and run again"
fi
# The virtual box's test bed, in the background while everything below compiles; it is waited
# for before the system test. Cached under target/system/ (keyed by its recipe): a second run
# finds it at once.
if [ $system_test = 1 ]; then
    rootfs_log=$(mktemp /tmp/opq-build-rootfs.XXXXXX)
    say "building the virtual box's test bed in the background (tests/system/build-rootfs.sh; log $rootfs_log)"
    setsid bash tests/system/build-rootfs.sh amd64 >/dev/null 2>"$rootfs_log" </dev/null &
    rootfs_pid=$!
fi
if [ ! -x target/redbot-venv/bin/redbot ]; then
    say "installing REDbot 2.7.1 from PyPI into target/redbot-venv, for the HTTP lint test"
    rm -rf target/redbot-venv
    { python3 -m venv target/redbot-venv &&
        target/redbot-venv/bin/pip install --quiet --disable-pip-version-check redbot==2.7.1; } ||
        fail "could not install redbot into target/redbot-venv; is PyPI reachable? (pip config list)"
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
    say "installing playwright-core from npm (tests/browser/package-lock.json), for the browser test"
    (cd tests/browser && npm ci --no-audit --no-fund --silent) ||
        fail "npm ci failed in tests/browser; is the npm registry reachable? (npm config get registry)"
fi
for triple in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl; do
    rustup target list --installed | grep -qx "$triple" && continue
    say "installing the Rust target $triple (rustup target add), for the Pi and container builds"
    rustup target add "$triple" || fail "rustup target add $triple failed; run it by hand and run again"
done

export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
phase "checking formatting and lints"
cargo fmt --check
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings
phase "building the ARM box-updater for the Pi tests under qemu"
bash scripts/build-pi.sh --debug --bin box-updater aarch64 armv7
phase "building the static update-server for the container test (profile docker-test)"
bash scripts/docker-build.sh --binary-only --profile docker-test
phase "building the tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-targets --features fault-injection --no-run "$@"
else
    cargo test --workspace --all-targets --features fault-injection --no-run "$@"
fi

# Every process the tests start inherits this marker, and their temp files live under run_tmp:
# whatever still carries either after the tests is a process a test left behind.
run_id=$$-$(date +%s)
run_tmp=$(mktemp -d /tmp/opq-tests.XXXXXX)
chmod 755 "$run_tmp"
export OPQ_TEST_RUN=$run_id TMPDIR=$run_tmp

status=0
phase "running the tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --all-targets --features fault-injection --no-fail-fast "$@" || status=1
else
    cargo test --workspace --all-targets --features fault-injection --no-fail-fast "$@" || status=1
fi
if [ "${FUZZ_SECONDS:-15}" != 0 ]; then
    phase "fuzzing each target for ${FUZZ_SECONDS:-15} s (scripts/fuzz.sh)"
    bash scripts/fuzz.sh "${FUZZ_SECONDS:-15}" || status=1
fi

# The box's story on a virtual box (qemu, systemd, real reboots); root for its test bed.
if [ $system_test = 1 ]; then
    phase "waiting for the virtual box's test bed (tests/system/build-rootfs.sh)"
    rootfs_ok=1
    wait "$rootfs_pid" || rootfs_ok=0
    rootfs_pid=''
    if [ $rootfs_ok = 1 ]; then
        sed 's/^/  build-rootfs: /' "$rootfs_log" >&2
        phase "the box's story on a virtual box (scripts/system-test.sh)"
        bash scripts/system-test.sh || status=1
        phase "power cuts during updates on the virtual box (scripts/system-test.sh --powercut ${POWERCUTS:-40})"
        bash scripts/system-test.sh --powercut "${POWERCUTS:-40}" || status=1
        phase "one update through dm-log-writes, checked at every flush point (scripts/system-test.sh --replay)"
        bash scripts/system-test.sh --replay || status=1
    else
        cat "$rootfs_log" >&2
        say "FAILED: building the virtual box's test bed failed (its log is above); the system test did not run. Run tests/system/build-rootfs.sh amd64 alone to retry"
        status=1
    fi
else
    say "NOTE: the virtual box's story (scripts/system-test.sh) is SKIPPED (not root, or SYSTEM_TEST=0); CI runs it"
fi

phase "checking that no test left a process behind"
if ! env -u OPQ_TEST_RUN bash scripts/leftovers.sh --kill "$run_id" "$run_tmp"; then
    say "FAILED: the tests left processes behind (listed above, now stopped); a test must stop everything it starts"
    status=1
fi
rm -rf "$run_tmp" || say "could not remove $run_tmp (something of the tests is still mounted there?)"
phase ""
if [ $status = 0 ]; then say "all passed"; else say "FAILED (see above)"; fi
exit $status
