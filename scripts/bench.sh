#!/usr/bin/env bash
# Measures kvferry's transports next to this machine's limits, in one run: iperf3 on loopback (one
# stream and two), single-thread memcpy, then `kvferry bench` (TCP, shared memory, and the fabric
# transport over libfabric's tcp and shm providers; needs libfabric-dev); then the tier store next
# to fio (io_uring, O_DIRECT) at the same block sizes and queue depths, and memcpy. Prints a
# Markdown summary for docs/benchmarks.md. `remote` measures the remote tier instead: against a
# one-node Garage on loopback (scripts/garage.sh) and a directory, each next to the object_store
# client's raw loop, then the disk tier next to fio at the same block sizes.
# Usage: scripts/bench.sh [seconds per row] [all|tcp|tier|remote]   (tcp: the transport rows)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-2}
what=${2:-all}

missing=()
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v fio >/dev/null || missing+=(fio)
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi
cargo build --release -q -p kvferry-cli --features fabric
kvferry=${CARGO_TARGET_DIR:-target}/release/kvferry
out=$(mktemp -d)

if [ "$what" = remote ]; then
remote_sizes=256K,1M,4M
garage_dir="$out/garage"
bash scripts/garage.sh start "$garage_dir" 1 >/dev/null
(set -a; source "$garage_dir/env"; set +a
 $kvferry bench tier --tier remote --remote-url "s3://$KVFERRY_S3_BUCKET/bench" --block-sizes $remote_sizes \
     --repeats 5 --json >"$out/remote-s3.json")
bash scripts/garage.sh stop "$garage_dir"
$kvferry bench tier --tier remote --remote-path "$out/shared" --block-sizes $remote_sizes --repeats 5 --json \
    >"$out/remote-dir.json"
for bs in ${remote_sizes//,/ }; do
    for run in 1 2 3; do
        for rw in write read; do
            fio --name=tier --filename="$out/fio-data" --size=256M --bs="$bs" --iodepth=32 --rw=$rw \
                --ioengine=io_uring --direct=1 --fixedbufs --registerfiles --output-format=json \
                >"$out/fio-$bs-$rw-$run.json"
        done
    done
    rm -f "$out/fio-data"
    $kvferry bench tier --dir "$out/tier" --bytes 256M --repeats 3 --json --tiers disk --block-sizes "$bs" \
        --queue-depths 32 >"$out/disk-$bs.json"
done
python3 - "$out" "$remote_sizes" <<'PY'
import json, os, sys
d, sizes = sys.argv[1], sys.argv[2].split(",")
load = lambda name: json.load(open(os.path.join(d, name)))
label = lambda n: f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
print("| back end | op | block | kvferry GB/s | raw object_store GB/s | % of raw |\n|---|---|---|---|---|---|")
for name, back_end in [("remote-s3.json", "S3 (Garage)"), ("remote-dir.json", "directory")]:
    for r in load(name):
        print(f"| {back_end} | {r['op']} | {label(r['block_size'])} | {r['gbps']:.2f} | {r['raw_gbps']:.2f} "
              f"| {100 * r['gbps'] / r['raw_gbps']:.0f}% |")
print("\n| op | block | disk tier GB/s | fio GB/s | % of fio |\n|---|---|---|---|---|")
for bs in sizes:
    for r in load(f"disk-{bs}.json"):
        rw = "write" if r["op"] == "put" else "read"
        fio = sorted(load(f"fio-{bs}-{rw}-{run}.json")["jobs"][0][rw]["bw_bytes"] / 1e9 for run in (1, 2, 3))[1]
        print(f"| {r['op']} | {label(r['block_size'])} | {r['gbps']:.2f} | {fio:.2f} | {100 * r['gbps'] / fio:.0f}% |")
PY
rm -rf "$out"
exit 0
fi

if [ "$what" != tier ]; then
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
# Shared memory is compared with memcpy measured just before it, block size by block size, so that
# both see the same load on a shared machine.
for size in ${sizes//,/ }; do
    n=0
    for mover in "memcpy" "shm --memory shared" "shm --memory private"; do
        n=$((n + 1))
        # shellcheck disable=SC2086 # the mover's words are separate arguments
        $kvferry bench --transport $mover --block-sizes "$size" --batch-sizes 64 --min-time "$secs" --json \
            >"$out/near-$size-$n.json"
    done
done
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
print("\n| op | block × 64 | memcpy GB/s (just before) | tcp 2 streams GB/s | shm mapped GB/s | % of memcpy | shm cross-memory GB/s | % of memcpy | p99 µs (mapped) |")
print("|---|---|---|---|---|---|---|---|---|")
near = {(r["path"], r["op"], r["block_size"]): r for n in sorted(os.listdir(d)) if n.startswith("near-") for r in load(n)}
assert all(p in ("memcpy", "shm/mapped", "shm/cross-memory") for p, _, _ in near), "shm fell back to tcp"
for op in ["read", "write"]:
    for block in [16384, 131072, 1048576]:
        t2 = rows[("tcp2", op, block)]
        m, sm, sc = (near[(n, op, block)] for n in ["memcpy", "shm/mapped", "shm/cross-memory"])
        print(f"| {op} | {block // 1024} KiB | {m['gbps']:.2f} | {t2['gbps']:.2f} | {sm['gbps']:.2f} "
              f"| {100 * sm['gbps'] / m['gbps']:.0f}% | {sc['gbps']:.2f} | {100 * sc['gbps'] / m['gbps']:.0f}% "
              f"| {sm['lat_p99_us']:.0f} |")
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
fi

if [ "$what" != tcp ]; then
# The tier store next to its limits, each measured right before it on the same file system (the
# tier's directory is next to fio's file), at the same block size, queue depth and bytes: memcpy for
# DRAM, fio (io_uring, O_DIRECT, registered files and buffers) for the disk; medians of three.
tier_bytes=512M
tier_sizes=(64K 1M)
tier_depths=(1 32)
tier="$kvferry bench tier --dir $out/tier --bytes $tier_bytes --repeats 3 --json"
for bs in "${tier_sizes[@]}"; do
    $tier --tiers host --block-sizes "$bs" >"$out/tier-$bs-host.json"
    for qd in "${tier_depths[@]}"; do
        # Three runs of each, like the store's three passes: the shared disk's speed wanders.
        for run in 1 2 3; do
            for rw in write read; do
                fio --name=tier --filename="$out/fio-data" --size=$tier_bytes --bs="$bs" --iodepth="$qd" --rw=$rw \
                    --ioengine=io_uring --direct=1 --fixedbufs --registerfiles --output-format=json \
                    >"$out/fio-$bs-$qd-$rw-$run.json"
            done
        done
        rm -f "$out/fio-data"
        $tier --tiers disk --block-sizes "$bs" --queue-depths "$qd" >"$out/tier-$bs-$qd.json"
    done
done
python3 - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
rows = [r for name in sorted(os.listdir(d)) if name.startswith("tier-") for r in json.load(open(os.path.join(d, name)))]
rows.sort(key=lambda r: (r["block_size"], r["tier"] != "host", r["queue_depth"] or 0, r["op"] != "put"))
def size_name(n):
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K"
def fio(bs, qd, rw):
    runs = sorted(json.load(open(os.path.join(d, f"fio-{bs}-{qd}-{rw}-{run}.json")))["jobs"][0][rw]["bw_bytes"] / 1e9
                  for run in (1, 2, 3))
    return runs[1]
print("\n| tier | op | block | queue depth | kvferry GB/s | limit GB/s | % of limit |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    bs = size_name(r["block_size"])
    if r["tier"] == "host":
        limit, name, qd = r["memcpy_gbps"], "memcpy", "-"
    else:
        limit = fio(bs, r["queue_depth"], "write" if r["op"] == "put" else "read")
        name, qd = "fio", r["queue_depth"]
    print(f"| {r['tier']} | {r['op']} | {bs} | {qd} | {r['gbps']:.2f} | {name} {limit:.2f} | {100 * r['gbps'] / limit:.0f}% |")
PY
fi
rm -rf "$out"
