#!/usr/bin/env bash
# The tier store's DRAM tier through the C ABI next to the Rust API, in one run: alternates
# `kvferry bench tier --tiers host` (Rust) with c-api/bench/store.c (the same puts and gets, 64
# blocks per call, through libkvferry), each next to its own single-thread memcpy of the same blocks.
# Usage: c-api/bench-store.sh [MiB per pass] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-256}
rounds=${2:-2}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
bash c-api/install.sh "$out/prefix" >/dev/null
cargo build --release -q -p kvferry-cli
# shellcheck disable=SC2046 # pkg-config's output is a list of flags
cc -std=c11 -O2 c-api/bench/store.c $(PKG_CONFIG_PATH="$out/prefix/lib/pkgconfig" pkg-config --cflags --libs kvferry) \
    -Wl,-rpath,"$out/prefix/lib" -o "$out/store"

for round in $(seq "$rounds"); do
    echo "round $round, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "Rust:"
    target/release/kvferry bench tier --tiers host --block-sizes 64K,1M --bytes "${mib}M" --repeats 5
    echo "C:"
    "$out/store" "$mib" 5
done
