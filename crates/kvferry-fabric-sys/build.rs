//! Finds libfabric's headers (>= 1.17) with pkg-config and compiles the shim that exports
//! libfabric's inline data-path wrappers. Nothing links libfabric: `src/load.rs` opens it at run
//! time.

fn main() {
    println!("cargo:rerun-if-changed=shim/shim.c");
    println!("cargo:rerun-if-changed=shim/shim.h");
    // Only the include paths: pkg-config's link flags would put libfabric (and through it psm,
    // psm2, verbs and efa) into every binary's DT_NEEDED.
    let lib = match pkg_config::Config::new().atleast_version("1.17").cargo_metadata(false).probe("libfabric") {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!(
                "kvferry-fabric-sys needs libfabric >= 1.17's headers, found with pkg-config.\n\
                 On Debian/Ubuntu: apt-get install libfabric-dev pkg-config\n\
                 Elsewhere, point PKG_CONFIG_PATH at libfabric.pc.\n\
                 pkg-config said: {e}"
            );
            std::process::exit(1);
        }
    };
    let mut shim = cc::Build::new();
    shim.file("shim/shim.c").warnings(true).extra_warnings(true);
    for dir in &lib.include_paths {
        shim.include(dir);
    }
    shim.compile("kvferry_fabric_shim");
}
