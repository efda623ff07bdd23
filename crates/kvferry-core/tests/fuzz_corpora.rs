//! CI replays the fuzzers' corpora (fuzz/corpus/<target>/, kept by libFuzzer and minimised) as
//! ordinary tests: every input each target ever kept runs through its decoder again, without a
//! panic. Needs the `fuzzing` feature (and `fabric` for the fabric target's corpus).
#![cfg(feature = "fuzzing")]

use std::path::{Path, PathBuf};

use kvferry_core::fuzzing;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

#[test]
fn every_corpus_replays_without_a_panic() {
    for (target, run) in fuzzing::targets() {
        let dir = corpus(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        let mut replayed = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            run(&std::fs::read(&path).unwrap());
            replayed += 1;
        }
        // An empty or missing corpus would make this test pass without testing anything.
        assert!(replayed > 0, "{} is empty", dir.display());
        fuzzing::seeds(target).iter().for_each(|seed| run(seed));
    }
}

#[test]
fn every_target_has_seeds() {
    for (target, _) in fuzzing::targets() {
        assert!(!fuzzing::seeds(target).is_empty(), "{target} has no seeds");
    }
}

/// Writes each target's seeds into its corpus directory (run once by hand when a format changes:
/// `cargo test -p kvferry-core --features fuzzing,fabric --test fuzz_corpora -- --ignored`).
#[test]
#[ignore]
fn write_seeds() {
    for (target, _) in fuzzing::targets() {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in fuzzing::seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).unwrap();
        }
    }
}
