//! The committed `include/kvferry.h` must be exactly what cbindgen generates from the sources.

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = crate_dir.join("include/kvferry.h");
    if std::env::var_os("KVFERRY_REGENERATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("writing the header");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "c-api/include/kvferry.h is out of date; regenerate it with \
         `KVFERRY_REGENERATE_HEADER=1 cargo test -p kvferry-c --test header` and commit it"
    );
}
