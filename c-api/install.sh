#!/usr/bin/env bash
# Builds and installs kvferry's C library under PREFIX:
#   PREFIX/lib/libkvferry.so.ABI (+ libkvferry.so link), PREFIX/lib/libkvferry.a,
#   PREFIX/include/kvferry.h, PREFIX/lib/pkgconfig/kvferry.pc and kvferry-static.pc, and the
#   CMake package PREFIX/lib/cmake/kvferry/kvferryConfig.cmake (+ kvferryConfigVersion.cmake).
# Usage: c-api/install.sh PREFIX [--profile release|dev]   (default: release)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
    echo "usage: $0 PREFIX [--profile release|dev]" >&2
    exit 2
fi
prefix=$(realpath -m "$1")
profile=release
if [ "${2:-}" = "--profile" ]; then
    profile=${3:?--profile needs a value}
fi
case "$profile" in
    release) out=release ;;
    dev) out=debug ;;
    *) echo "unknown profile $profile (release or dev)" >&2; exit 2 ;;
esac

cargo build -q -p kvferry-c --profile "$profile"
lib_dir="${CARGO_TARGET_DIR:-target}/$out"
version=$(cargo pkgid -p kvferry-c | sed 's/.*[@#]//')
abi=$(awk '/^#define KVFERRY_ABI_VERSION / { print $3 }' c-api/include/kvferry.h)
# What a program linking libkvferry.a needs besides it (rustc --print native-static-libs on Linux).
native_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

install -d "$prefix/lib/pkgconfig" "$prefix/lib/cmake/kvferry" "$prefix/include"
install -m 0755 "$lib_dir/libkvferry.so" "$prefix/lib/libkvferry.so.$abi"
ln -sfn "libkvferry.so.$abi" "$prefix/lib/libkvferry.so"
install -m 0644 "$lib_dir/libkvferry.a" "$prefix/lib/libkvferry.a"
install -m 0644 c-api/include/kvferry.h "$prefix/include/kvferry.h"
for pc in kvferry kvferry-static; do
    sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@NATIVE_LIBS@|$native_libs|" \
        "c-api/$pc.pc.in" >"$prefix/lib/pkgconfig/$pc.pc"
done
# CMake wants library names, not linker flags.
cmake_libs=$(printf '%s\n' $native_libs | sed 's/^-l//' | paste -sd ';')
for cmake in kvferryConfig kvferryConfigVersion; do
    sed -e "s|@VERSION@|$version|" -e "s|@ABI@|$abi|" -e "s|@NATIVE_LIBS@|$cmake_libs|" \
        "c-api/$cmake.cmake.in" >"$prefix/lib/cmake/kvferry/$cmake.cmake"
done
echo "installed kvferry $version (ABI $abi) under $prefix"
