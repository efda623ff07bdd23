#!/usr/bin/env bash
# Compares two builds of `kvferry` on this machine in one run: for each transport (TCP, shared
# memory over a memfd and over cross-memory attach), op, block size and batch size, the two
# binaries run back to back, so both see the same load; iperf3 on loopback and memcpy are measured
# in the same run for the machine's own limits. Prints a Markdown table.
# Usage: scripts/bench-ab.sh OLD_KVFERRY NEW_KVFERRY [seconds per row]
set -euo pipefail
old=$1
new=$2
secs=${3:-1}
command -v iperf3 >/dev/null || { echo "needs iperf3 (apt-get install iperf3)" >&2; exit 1; }
out=$(mktemp -d)
port=5298
iperf3 -s -1 -p $port >/dev/null 2>&1 &
sleep 0.5
iperf3 -c 127.0.0.1 -p $port -t 3 -J >"$out/iperf.json"
"$new" bench --transport memcpy --block-sizes 4K,64K,1M --batch-sizes 1,64 --min-time "$secs" --json >"$out/memcpy.json"
for mover in "tcp" "shm --memory shared" "shm --memory private"; do
    for op in read write; do
        for which in old new; do
            bin=$old
            [ "$which" = new ] && bin=$new
            # shellcheck disable=SC2086 # the mover's words are separate arguments
            "$bin" bench --transport $mover --op $op --block-sizes 4K,64K,1M --batch-sizes 1,64 \
                --min-time "$secs" --json >"$out/${mover// /_}-$op-$which.json"
        done
    done
done
python3 - "$out" <<'PY'
import json, os, sys
d = sys.argv[1]
load = lambda n: json.load(open(os.path.join(d, n)))
iperf = load("iperf.json")["end"]["sum_received"]["bits_per_second"] / 8e9
def rows(name):
    return {(r["op"], r["block_size"], r["batch"]): r for r in load(name)}
memcpy = rows("memcpy.json")
print(f"iperf3 loopback (1 stream): {iperf:.2f} GB/s\n")
print("| transport | op | block × batch | memcpy GB/s | before GB/s | after GB/s | after/before | before µs | after µs |")
print("|---|---|---|---|---|---|---|---|---|")
for mover in ["tcp", "shm --memory shared", "shm --memory private"]:
    for op in ["read", "write"]:
        before = rows(f"{mover.replace(' ', '_')}-{op}-old.json")
        after = rows(f"{mover.replace(' ', '_')}-{op}-new.json")
        for key in sorted(after, key=lambda k: (k[1], k[2])):
            if key not in before:
                continue
            b, a = before[key], after[key]
            m = memcpy.get(key)
            mg = f"{m['gbps']:.2f}" if m else ""
            print(f"| {mover} | {op} | {key[1] // 1024} KiB × {key[2]} | {mg} | {b['gbps']:.2f} | {a['gbps']:.2f} | "
                  f"{a['gbps'] / b['gbps']:.2f} | {b['lat_avg_us']:.1f} | {a['lat_avg_us']:.1f} |")
PY
