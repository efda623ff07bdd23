#!/usr/bin/env bash
# Measures what the C ABI adds to the Rust API, in one run: `kvferry bench` (Rust, in-process TCP
# loopback) and c-api/bench/post.c (the same rows through libkvferry from C), alternating for a few
# rounds and keeping each row's best round (a shared machine's noise only ever slows a row down),
# then prints a Markdown comparison for docs/benchmarks.md.
# Usage: c-api/bench.sh [seconds per row] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-1}
rounds=${2:-3}

# shellcheck source=c-api/bench/prepare.sh
source c-api/bench/prepare.sh post

for round in $(seq "$rounds"); do
    "$kvferry" bench --streams 2 --block-sizes 4K,16K,1M --batch-sizes 1,64 --min-time "$secs" \
        --json >"$out/rust.$round.json"
    "$out/post" "$secs" >"$out/c.$round.json"
done

python3 - "$out" "$rounds" <<'PY'
import json, os, sys
d, rounds = sys.argv[1], int(sys.argv[2])
load = lambda name: json.load(open(os.path.join(d, name)))
key = lambda r: (r["op"], r["block_size"], r["batch"])

def best(rows):
    """Per row, the round with the highest bandwidth."""
    out = {}
    for r in rows:
        if key(r) not in out or r["gbps"] > out[key(r)]["gbps"]:
            out[key(r)] = r
    return out

rust = best(r for i in range(1, rounds + 1) for r in load(f"rust.{i}.json"))
c_runs = [load(f"c.{i}.json") for i in range(1, rounds + 1)]
c = best(r for run in c_runs for r in run["rows"])
ok_ns = min(run["call_ns"]["transfer_bytes"] for run in c_runs)
err_ns = min(run["call_ns"]["invalid_handle"] for run in c_runs)
print(f"one C call on a live handle: {ok_ns:.0f} ns; on an invalid handle (error + message): {err_ns:.0f} ns\n")
print("| op | block | batch | post µs Rust / C | latency µs Rust / C | GB/s Rust / C | C ÷ Rust GB/s | destroy µs (C) |")
print("|---|---|---|---|---|---|---|---|")
for r in c.values():
    k = rust[key(r)]
    block = f"{r['block_size'] // 1024} KiB"
    print(f"| {r['op']} | {block} | {r['batch']} | {k['post_avg_us']:.1f} / {r['post_avg_us']:.1f} "
          f"| {k['lat_avg_us']:.0f} / {r['lat_avg_us']:.0f} | {k['gbps']:.2f} / {r['gbps']:.2f} "
          f"| {100 * r['gbps'] / k['gbps']:.0f}% | {r['destroy_avg_us']:.1f} |")
PY
