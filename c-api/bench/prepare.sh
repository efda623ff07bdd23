# Sourced by the C bench scripts with the names of the benches they run: installs the release
# library into a temporary prefix (removed on exit), builds the kvferry CLI, and compiles each
# c-api/bench/NAME.c with `cc -O2` against the installed library into "$out/NAME". The CLI is
# "$kvferry", under CARGO_TARGET_DIR when that is set, as the library is.
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
bash c-api/install.sh "$out/prefix" >/dev/null
cargo build --release -q -p kvferry-cli
kvferry="${CARGO_TARGET_DIR:-target}/release/kvferry"
for name in "$@"; do
    # shellcheck disable=SC2046 # pkg-config's output is a list of flags
    cc -std=c11 -O2 "c-api/bench/$name.c" $(PKG_CONFIG_PATH="$out/prefix/lib/pkgconfig" pkg-config --cflags --libs kvferry) \
        -Wl,-rpath,"$out/prefix/lib" -o "$out/$name"
done
