#!/usr/bin/env bash
# The tier store's DRAM tier through the C ABI next to the Rust API, in one run: alternates
# `kvferry bench tier --tiers host` (Rust) with c-api/bench/store.c (the same puts and gets, 64
# blocks per call, through libkvferry), each next to its own single-thread memcpy of the same blocks.
# Usage: c-api/bench-store.sh [MiB per pass] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-256}
rounds=${2:-2}

# shellcheck source=c-api/bench/prepare.sh
source c-api/bench/prepare.sh store

for round in $(seq "$rounds"); do
    echo "round $round, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "Rust:"
    "$kvferry" bench tier --tiers host --block-sizes 64K,1M --bytes "${mib}M" --repeats 5
    echo "C:"
    "$out/store" "$mib" 5
done
