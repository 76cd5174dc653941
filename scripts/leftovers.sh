#!/usr/bin/env bash
# Finds the processes a test run left behind, and with --kill stops them. scripts/test.sh runs
# the tests with OPQ_TEST_RUN=ID in their environment and TMPDIR=DIR; a process of that run still
# alive carries the marker in its environment (everything the tests exec inherits it), or points
# into DIR (its working directory, program, arguments or an open file: nginx's workers rewrite
# their environment for their title but keep their logs open).
#
#   scripts/leftovers.sh [--kill] ID DIR      exit 0: none; 1: some (listed on stderr)
# LEFTOVERS_WAIT=SECONDS: how long processes on their way out get first (default 10).
set -uo pipefail

kill=0
if [ "${1:-}" = --kill ]; then
    kill=1
    shift
fi
if [ $# -ne 2 ] || [ -z "$1" ] || [ -z "$2" ]; then
    echo "usage: scripts/leftovers.sh [--kill] ID DIR" >&2
    exit 2
fi
id=$1 dir=$2

# One pass over /proc: the pids that match, one a line.
find_them() {
    {
        grep -lzx "OPQ_TEST_RUN=$id" /proc/[0-9]*/environ
        grep -lzF -- "$dir" /proc/[0-9]*/cmdline
        find /proc/[0-9]*/cwd /proc/[0-9]*/exe /proc/[0-9]*/fd -maxdepth 1 -lname "$dir*"
    } 2>/dev/null | cut -d/ -f3 | sort -un | while read -r p; do
        # Not this script, nor the subshells running this function (they name DIR too).
        [ "$p" = "$$" ] || [ "$p" = "$BASHPID" ] || [ "$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ')" = "$$" ] && continue
        [ -d "/proc/$p" ] && echo "$p"
    done
}

# Processes on their way out (a container's shim, a browser's helpers) get a few seconds.
deadline=$((SECONDS + ${LEFTOVERS_WAIT:-10}))
while :; do
    left=$(find_them)
    [ -z "$left" ] && exit 0
    [ $SECONDS -ge $deadline ] && break
    sleep 0.5
done
echo "leftovers.sh: these processes of the test run are still running:" >&2
for p in $left; do
    echo "  $(ps -o pid=,ppid=,etime=,args= -p "$p" 2>/dev/null || echo "$p (gone)")   cwd $(readlink "/proc/$p/cwd" 2>/dev/null)" >&2
done
if [ $kill = 1 ]; then
    # They are this run's own (the marker or its temp dir says so): stopped by their ids.
    for p in $left; do kill -TERM "$p" 2>/dev/null; done
    sleep 2
    for p in $left; do kill -KILL "$p" 2>/dev/null; done
    echo "leftovers.sh: stopped them" >&2
fi
exit 1
