#!/usr/bin/env bash
# Makes a deterministic ~100 MiB mixed payload (shared libraries and log-like text) in $1.
set -euo pipefail
out=$1
[ -d "$out" ] && exit 0
mkdir -p "$out/bin" "$out/text"
total=0
for f in $(find /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib -maxdepth 1 -name '*.so*' -type f -size +200k -size -8M 2>/dev/null | sort); do
    cp "$f" "$out/bin/"
    total=$((total + $(stat -c %s "$f")))
    [ "$total" -lt $((60 << 20)) ] || break
done
python3 - "$out/text" <<'PY'
import random, sys, os
random.seed(42)
words = "voltage frequency thd transient sag swell harmonic sample box measurement event trigger rms phase".split()
for i in range(40):
    with open(os.path.join(sys.argv[1], f"log{i:02}.txt"), "w") as f:
        n = 0
        while n < 1 << 20:
            line = f"{1700000000 + n} box{random.randint(1, 99)} " + " ".join(random.choice(words) for _ in range(8)) + f" {random.random():.6f}\n"
            f.write(line)
            n += len(line)
PY
