#!/usr/bin/env bash
# Measures kvferry's TCP transport next to this machine's limits, in one run: iperf3 on loopback
# (one stream and two), single-thread memcpy, then `kvferry bench` (TCP, and the fabric transport
# over libfabric's tcp and shm providers; needs libfabric-dev). Prints a Markdown summary for
# docs/benchmarks.md. Usage: scripts/bench.sh [seconds per row]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-2}

if ! command -v iperf3 >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q iperf3
fi
cargo build --release -q -p kvferry-cli --features fabric
kvferry=target/release/kvferry
out=$(mktemp -d)

port=5299
iperf3 -s -1 -p $port >/dev/null 2>&1 &
sleep 0.5
iperf3 -c 127.0.0.1 -p $port -t 5 -J >"$out/iperf1.json"
iperf3 -s -1 -p $port >/dev/null 2>&1 &
sleep 0.5
iperf3 -c 127.0.0.1 -p $port -t 5 -P 2 -J >"$out/iperf2.json"

sizes=16K,128K,1M
$kvferry bench --transport memcpy --block-sizes $sizes --batch-sizes 64 --min-time "$secs" --json >"$out/memcpy.json"
$kvferry bench --streams 1 --block-sizes $sizes --batch-sizes 64 --min-time "$secs" --json >"$out/tcp1.json"
$kvferry bench --streams 2 --block-sizes $sizes --batch-sizes 64 --min-time "$secs" --json >"$out/tcp2.json"
$kvferry bench --streams 2 --block-sizes 4K,16K --batch-sizes 1,64 --min-time "$secs" --json >"$out/post.json"
$kvferry bench --transport fabric --provider tcp --block-sizes $sizes --batch-sizes 64 --min-time "$secs" --json >"$out/fabric_tcp.json"
$kvferry bench --transport fabric --provider shm --block-sizes $sizes --batch-sizes 64 --min-time "$secs" --json >"$out/fabric_shm.json"

python3 - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
load = lambda n: json.load(open(os.path.join(d, n)))
iperf = lambda n: load(n)["end"]["sum_received"]["bits_per_second"] / 8e9
i1, i2 = iperf("iperf1.json"), iperf("iperf2.json")
print(f"iperf3 loopback: 1 stream {i1:.2f} GB/s, 2 streams {i2:.2f} GB/s\n")
rows = {}
for name in ["memcpy", "tcp1", "tcp2", "fabric_tcp", "fabric_shm"]:
    for r in load(name + ".json"):
        rows[(name, r["op"], r["block_size"])] = r
print("| op | block × 64 | memcpy GB/s | tcp 1 stream GB/s | % of iperf3 ×1 | tcp 2 streams GB/s | % of iperf3 ×1 | % of iperf3 ×2 | p99 µs (2 streams) |")
print("|---|---|---|---|---|---|---|---|---|")
for op in ["read", "write"]:
    for block in [16384, 131072, 1048576]:
        m, t1, t2 = (rows[(n, op, block)] for n in ["memcpy", "tcp1", "tcp2"])
        print(f"| {op} | {block // 1024} KiB | {m['gbps']:.2f} | {t1['gbps']:.2f} | {100 * t1['gbps'] / i1:.0f}% "
              f"| {t2['gbps']:.2f} | {100 * t2['gbps'] / i1:.0f}% | {100 * t2['gbps'] / i2:.0f}% | {t2['lat_p99_us']:.0f} |")
print("\n| op | block × 64 | memcpy GB/s | kvferry tcp (2 streams) GB/s | fabric/tcp GB/s | % of kvferry tcp | fabric/shm GB/s | % of memcpy | p99 µs fabric/tcp / shm |")
print("|---|---|---|---|---|---|---|---|---|")
for op in ["read", "write"]:
    for block in [16384, 131072, 1048576]:
        m, t2, ft, fs = (rows[(n, op, block)] for n in ["memcpy", "tcp2", "fabric_tcp", "fabric_shm"])
        print(f"| {op} | {block // 1024} KiB | {m['gbps']:.2f} | {t2['gbps']:.2f} | {ft['gbps']:.2f} | {100 * ft['gbps'] / t2['gbps']:.0f}% "
              f"| {fs['gbps']:.2f} | {100 * fs['gbps'] / m['gbps']:.0f}% | {ft['lat_p99_us']:.0f} / {fs['lat_p99_us']:.0f} |")
print("\n| op | block | batch | post µs (avg) | latency µs (avg / p99) | GB/s |")
print("|---|---|---|---|---|---|")
for r in load("post.json"):
    print(f"| {r['op']} | {r['block_size'] // 1024} KiB | {r['batch']} | {r['post_avg_us']:.1f} "
          f"| {r['lat_avg_us']:.0f} / {r['lat_p99_us']:.0f} | {r['gbps']:.2f} |")
PY
rm -rf "$out"
