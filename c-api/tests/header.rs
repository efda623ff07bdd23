//! The committed `src/codes.rs` must be exactly what kvferry's `ErrorCode` generates, and the
//! committed `include/kvferry.h` exactly what cbindgen generates from the sources.

use std::path::Path;

/// `PeerDisconnected` → `KVFERRY_ERR_PEER_DISCONNECTED`.
fn c_name(code: kvferry_core::ErrorCode) -> String {
    let mut out = String::from("KVFERRY_ERR");
    for c in code.name().chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// `src/codes.rs`: a constant per library code, with the code's documentation, and its name.
fn generated_codes() -> String {
    let mut out = String::from(
        "//! kvferry's error codes as C constants, generated from `kvferry_core::ErrorCode` by\n\
         //! `tests/header.rs`; do not edit. Regenerate with\n\
         //! `KVFERRY_REGENERATE_HEADER=1 cargo test -p kvferry-c --test header`.\n\n\
         use kvferry_core::ErrorCode;\n\n\
         use crate::status::kvferry_status;\n",
    );
    let mut hundreds = None;
    for &code in kvferry_core::ErrorCode::ALL {
        // A blank line between groups of hundreds and before a documented code.
        if hundreds != Some(code.as_u32() / 100) || !code.doc_lines().is_empty() {
            out.push('\n');
        }
        hundreds = Some(code.as_u32() / 100);
        for line in code.doc_lines() {
            out.push_str(&format!("///{line}\n"));
        }
        out.push_str(&format!("pub const {}: kvferry_status = {};\n", c_name(code), code.as_u32()));
    }
    out.push_str("\n/// The name of a library code, as `kvferry_status_name` returns it.\n");
    out.push_str("pub(crate) fn name(code: ErrorCode) -> &'static str {\n    match code {\n");
    for &code in kvferry_core::ErrorCode::ALL {
        out.push_str(&format!("        ErrorCode::{:?} => \"{}\\0\",\n", code, c_name(code)));
    }
    out.push_str("        _ => \"KVFERRY_ERR_UNKNOWN\\0\",\n    }\n}\n");
    out
}

/// Write `generated` to `path` when regenerating, else require that the committed file equals it.
fn current(path: &Path, generated: &[u8]) {
    if std::env::var_os("KVFERRY_REGENERATE_HEADER").is_some() {
        std::fs::write(path, generated).expect("writing a generated file");
        return;
    }
    let committed = std::fs::read(path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is out of date; regenerate it with \
         `KVFERRY_REGENERATE_HEADER=1 cargo test -p kvferry-c --test header` and commit it",
        path.display()
    );
}

/// One test, so that the header is generated from the codes file just written.
#[test]
fn the_codes_and_the_header_are_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    current(&crate_dir.join("src/codes.rs"), generated_codes().as_bytes());
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut header = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut header);
    current(&crate_dir.join("include/kvferry.h"), &header);
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
