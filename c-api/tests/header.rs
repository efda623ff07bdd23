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

/// `kvferry_store_stats` has a field for every count the store keeps (`TierStats::counts`, and
/// `RemoteStats::counts` after `remote_`), under the same names, and no other counter: a count
/// added in the core fails here until the C struct carries it.
#[test]
fn the_store_stats_struct_has_a_field_for_every_count_of_the_store() {
    let header = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/kvferry.h")).unwrap();
    let body = header
        .split_once("typedef struct kvferry_store_stats {")
        .and_then(|(_, rest)| rest.split_once('}'))
        .expect("the header defines kvferry_store_stats")
        .0;
    let fields: std::collections::BTreeSet<String> = body
        .lines()
        .filter_map(|line| line.trim().strip_prefix("uint64_t ")?.strip_suffix(';').map(str::to_string))
        .collect();
    let store = kvferry_core::tier::TierStats::default();
    let remote = kvferry_core::tier::RemoteStats::default();
    let counts: std::collections::BTreeSet<String> = std::iter::once("block_size".to_string())
        .chain(store.counts().iter().map(|(name, _)| name.to_string()))
        .chain(remote.counts().iter().map(|(name, _)| format!("remote_{name}")))
        .collect();
    assert_eq!(fields, counts);
}
