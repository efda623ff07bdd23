#!/usr/bin/env bash
# Two hosts on one machine: network namespaces joined by a veth pair whose both ends are shaped
# with tc (a token bucket: the rate; kernels without netem add no delay), iperf3 across it for the
# link's own figure, then kvferry between
# a target in one namespace and an initiator in the other: the TCP transport and, if this build
# has it, libfabric's tcp provider. Prints a Markdown table. Needs root (ip netns, tc) and iperf3.
# Usage: scripts/two-hosts.sh KVFERRY [rate, default 2gbit] [seconds per row, default 2]
set -euo pipefail
bin=$(realpath "$1")
rate=${2:-2gbit}
secs=${3:-2}
command -v iperf3 >/dev/null || { echo "needs iperf3 (apt-get install iperf3)" >&2; exit 1; }
a=kvf-a-$$
b=kvf-b-$$
out=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    ip netns del "$a" 2>/dev/null || true
    ip netns del "$b" 2>/dev/null || true
    rm -rf "$out"
}
trap cleanup EXIT
ip netns add "$a"
ip netns add "$b"
ip link add kvf-va-$$ type veth peer name kvf-vb-$$
ip link set kvf-va-$$ netns "$a"
ip link set kvf-vb-$$ netns "$b"
ip -n "$a" addr add 10.77.0.1/24 dev kvf-va-$$
ip -n "$b" addr add 10.77.0.2/24 dev kvf-vb-$$
for ns in "$a" "$b"; do ip -n "$ns" link set lo up; done
ip -n "$a" link set kvf-va-$$ up
ip -n "$b" link set kvf-vb-$$ up
# Shaped both ways.
tc -n "$a" qdisc add dev kvf-va-$$ root tbf rate "$rate" burst 1mb latency 20ms
tc -n "$b" qdisc add dev kvf-vb-$$ root tbf rate "$rate" burst 1mb latency 20ms

ip netns exec "$a" iperf3 -s -1 -p 5299 >/dev/null 2>&1 &
pids+=($!)
# Until the port listens in the target's namespace (a probing connect would take iperf3's one client).
listening() {
    for _ in $(seq 300); do
        ip netns exec "$a" ss -ltnH "sport = :$1" | grep -q . && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1 in $a" >&2
    return 1
}
listening 5299
ip netns exec "$b" iperf3 -c 10.77.0.1 -p 5299 -t 3 -J >"$out/iperf.json"

# Both ends hold the same cluster secret.
export KVFERRY_SECRET="two hosts on one machine, one secret"
movers=("tcp")
fabric=$("$bin" info --json | python3 -c 'import json, sys; print(any(t["name"] == "fabric" and t["available"] for t in json.load(sys.stdin)["transports"]))')
[ "$fabric" = True ] && movers+=("fabric --provider tcp")
port=7100
for mover in "${movers[@]}"; do
    port=$((port + 1))
    # shellcheck disable=SC2086 # the mover's words are separate arguments
    ip netns exec "$a" "$bin" bench --role target --transport $mover --listen 10.77.0.1:$port \
        --max-transfer 64M >"$out/target-$port.log" 2>&1 &
    pids+=($!)
    listening $port
    for op in read write; do
        # shellcheck disable=SC2086
        ip netns exec "$b" "$bin" bench --role initiator --transport $mover --peer 10.77.0.1:$port --op $op \
            --block-sizes 64K,1M --batch-sizes 1,64 --min-time "$secs" --check --json \
            >"$out/${mover// /_}-$op.json"
    done
done

python3 - "$out" "$rate" "${movers[@]}" <<'PY'
import json, os, sys
d, rate, movers = sys.argv[1], sys.argv[2], sys.argv[3:]
iperf = json.load(open(os.path.join(d, "iperf.json")))["end"]["sum_received"]["bits_per_second"] / 8e9
print(f"link: tbf {rate} each way; iperf3 across it: {iperf:.3f} GB/s\n")
print("| transport | op | block × batch | GB/s | % of iperf3 | p50 µs |")
print("|---|---|---|---|---|---|")
for mover in movers:
    for op in ("read", "write"):
        for r in json.load(open(os.path.join(d, f"{mover.replace(' ', '_')}-{op}.json"))):
            bs, batch = r["block_size"], r["batch"]
            size = f"{bs >> 10} KiB" if bs < 1 << 20 else f"{bs >> 20} MiB"
            print(f"| {mover} | {op} | {size} × {batch} | {r['gbps']:.3f} | {100 * r['gbps'] / iperf:.0f}% | {r['lat_p50_us']:.0f} |")
PY
