#!/usr/bin/env bash
# The main job, end to end on one machine: builds a signed update image from the sample payload,
# serves it with update-server, starts a sandboxed box-updater, and updates the box through the
# same API the page's Update Box button uses, showing the progress and the new version.
#
#   scripts/demo.sh [--keep | --no-keep]
#     --keep      keep the update server and the box running at the end, until Ctrl-C, so that
#                 the box's page can be opened in a browser (asked when stdin is a terminal)
#     --no-keep   stop everything at the end without asking
# OPQ_DEMO_BIN=DIR runs prebuilt binaries from DIR instead of building them (the tests do), and
# OPQ_DEMO_MIB=N sets the size of the second image's sample firmware (default 24 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
keep=ask
case ${1:-} in
    --keep) keep=yes ;;
    --no-keep) keep=no ;;
    "") ;;
    *) echo "demo.sh: unknown argument '$1' (usage: scripts/demo.sh [--keep | --no-keep])" >&2; exit 2 ;;
esac
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost RUST_LOG=${RUST_LOG:-warn}
for tool in curl python3; do
    command -v $tool >/dev/null && continue
    echo "demo.sh: installing $tool (Debian package $tool)" >&2
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $tool >/dev/null; } ||
        { echo "demo.sh: cannot install $tool with apt-get; install it by hand" >&2; exit 1; }
done
if [ -n "${OPQ_DEMO_BIN:-}" ]; then
    bin=$OPQ_DEMO_BIN
else
    cargo build --quiet --bins
    bin=target/debug
fi
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
work=$(mktemp -d "${TMPDIR:-/tmp}/opq-demo.XXXXXX")
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. a signing key and two images (the box runs the first, the server offers the second)"
"$bin/build-update" keygen --secret-key "$work/demo.key" --public-key "$work/demo.pub"
mkdir -p "$work/updates" "$work/box/root"
now=$(date +%s)
v1=$((now - 60)) v2=$now
"$bin/build-update" --out "$work/updates" --version "$v1" --sign-key "$work/demo.key" scripts/demo-payload/box-config-daemon 2>/dev/null
# The second image also carries measurement firmware (24 MiB), so that its progress shows.
mkdir -p "$work/box-firmware"
head -c $((${OPQ_DEMO_MIB:-24} << 20)) /dev/urandom >"$work/box-firmware/firmware.bin"
image=$("$bin/build-update" --out "$work/staging" --version "$v2" --sign-key "$work/demo.key" scripts/demo-payload/box-config-daemon "$work/box-firmware" 2>/dev/null | tail -n 1)
tar tvjf "$image"

say "2. update-server over $work/updates"
sport=$(free_port)
"$bin/update-server" --dir "$work/updates" --bind 127.0.0.1 --port "$sport" 2>"$work/server.log" &
pids+=($!)
wait_http "http://127.0.0.1:$sport/version"
echo "newest version on the server: $(curl -s "http://127.0.0.1:$sport/version")"

say "3. a sandboxed box, installed with version $v1"
echo "{\"updates_ep\": \"http://127.0.0.1:$sport\", \"box_id\": 1}" >"$work/box/box_config.json"
box_args=(--root "$work/box/root" --box-config "$work/box/box_config.json" --public-key "$work/demo.pub"
    --reboot-command "echo \"\$(date +%T) reboot\" >> '$work/box/reboots'")
"$bin/box-updater" update "${box_args[@]}"
"$bin/box-updater" confirm "${box_args[@]}"
bport=$(free_port)
start_box() {
    "$bin/box-updater" serve "${box_args[@]}" --listen "127.0.0.1:$bport" 2>>"$work/box.log" &
    box_pid=$!
    pids+=("$box_pid")
    wait_http "http://127.0.0.1:$bport/version"
}
start_box
echo "the box's page: http://127.0.0.1:$bport/   installed: $(curl -s "http://127.0.0.1:$bport/version")"

say "4. publish version $v2 (sidecars first, image last, each by rename)"
for f in "$image.sha256" "$image.minisig" "$image"; do mv "$f" "$work/updates/"; done
for _ in $(seq 100); do [ "$(curl -s "http://127.0.0.1:$sport/version")" = "$v2" ] && break; sleep 0.05; done
curl -s "http://127.0.0.1:$bport/box_update/check"; echo

say "5. press Update Box (POST /box_update) and follow the progress"
curl -s -X POST -H 'Content-Type: application/json' -d '{}' "http://127.0.0.1:$bport/box_update"; echo
# One line per step, and per tenth of the way through a download or an unpacking; bytes only
# where a step counts them, against the image's size.
show_status='
import json, sys
s = json.load(sys.stdin)
state, done, total = s["state"], s["bytes_done"], s.get("bytes_total")
mib = lambda n: "%.1f MiB" % (n / 1048576)
progress, tenth = "", ""
if state in ("downloading", "unpacking") and total:
    progress = "%s of %s (%d%%)" % (mib(done), mib(total), done * 100 // total)
    tenth = str(done * 10 // total)
elif state == "downloading":
    progress = mib(done)
print("%s %s\t%-12s %-26s %s" % (state, tenth, state, progress, s["message"]))'
last=""
for _ in $(seq 600); do
    st=$(curl -s "http://127.0.0.1:$bport/box_update/status")
    out=$(python3 -c "$show_status" <<<"$st")
    key=${out%%$'\t'*} line=${out#*$'\t'}
    [ "$key" != "$last" ] && echo "  $line" && last=$key
    case $key in rebooting*|failed*|up_to_date*) break ;; esac
    sleep 0.05
done
echo "reboots recorded so far:"; sed "s/^/  /" "$work/box/reboots"

say "6. the box 'reboots': box-updater starts again, confirms the new release"
kill "$box_pid"; wait "$box_pid" 2>/dev/null || true
start_box
echo "installed now: $(curl -s "http://127.0.0.1:$bport/version")"
curl -s "http://127.0.0.1:$bport/box_update/status" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("state:", s["state"], "-", s["message"])
for h in s["history"]:
    print("  history: %-10s %s -> %s: %s" % (h["result"], h["from"] or "nothing", h["to"] or "nothing", h["message"]))'
ls -l "$work/box/root/opt/opq" "$work/box/root/opt/opq/releases"

if [ "$keep" = ask ] && [ -t 0 ]; then
    read -r -p "Keep the update server and the box running so that you can open the box's page? [y/N] " answer
    case $answer in [yY]*) keep=yes ;; esac
fi
if [ "$keep" = yes ]; then
    say "running until Ctrl-C"
    echo "the box's page:      http://127.0.0.1:$bport/"
    echo "the update server:   http://127.0.0.1:$sport/ls   (drop images into $work/updates)"
    echo "press Ctrl-C to stop"
    # Ends at Ctrl-C (or if the box stops); the exit trap stops the rest and removes $work.
    wait "$box_pid" || true
fi
say "done: stopping what the demo started"
