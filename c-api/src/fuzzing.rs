//! The entry point of the fuzz target `c_options` (`fuzz/` at the repository root): the creation
//! options of `kvferry_agent_create` and `kvferry_store_create` as a C caller passes them, parsed
//! by the functions those entry points use. Built only with the `fuzzing` feature; not an API.

use std::ffi::{CString, c_char};

use crate::args::options_arg;

/// `bytes` split at NUL into C strings, passed as an options array to `options_arg` (which checks
/// UTF-8 and the `key=value` form), then to the agent's and the store's option parsers. Neither
/// creates anything: they only build configurations.
pub fn options(bytes: &[u8]) {
    let strings: Vec<CString> =
        bytes.split(|&b| b == 0).map(|s| CString::new(s).expect("split at every NUL")).collect();
    let pointers: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
    // SAFETY: `pointers` holds `pointers.len()` NUL-terminated strings that outlive the call.
    let Ok(options) = (unsafe { options_arg(pointers.as_ptr(), pointers.len()) }) else { return };
    let _ = crate::agent::agent_config("fuzz", &options);
    let _ = crate::store::store_options(&options);
}

/// Small valid inputs, for the corpus (options are NUL-separated).
pub fn seeds() -> Vec<Vec<u8>> {
    [
        &b"tcp=on\0tcp.listen=127.0.0.1:0\0tcp.streams=4\0tcp.connect_timeout_ms=500\0shm=off"[..],
        b"secret=a cluster secret of 32 bytes....\0auth=env\0tcp.min_frame_bytes=65536",
        b"block_size=8192\0host_capacity=65536\0policy=arc\0workers=3\0pin=off\0events=on",
        b"block_size=4096\0host_capacity=4096\0disk.dir=/tmp/kvferry-fuzz\0disk.capacity=8192\0disk.admit_after=0",
        b"block_size=4096\0host_capacity=4096\0remote.url=s3://kv/prefix\0remote.namespace=model/rank0\0\
          remote.timeout_ms=500\0remote.concurrency=4\0remote.option.aws_region=local",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// CI replays the fuzzer's corpus as an ordinary test: every input it kept parses without a
    /// panic, and so do the seeds.
    #[test]
    fn the_c_options_corpus_replays_without_a_panic() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/c_options");
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        let mut replayed = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            options(&std::fs::read(&path).unwrap());
            replayed += 1;
        }
        assert!(replayed > 0, "{} is empty", dir.display());
        seeds().iter().for_each(|s| options(s));
    }

    #[test]
    fn seeds_are_options_both_parsers_can_take() {
        // The first two seeds configure an agent, the others a store: the corpus starts inside
        // the parsers, not at their first error.
        let parse = |seed: &[u8]| {
            let strings: Vec<CString> = seed.split(|&b| b == 0).map(|s| CString::new(s).unwrap()).collect();
            let pointers: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
            let options = unsafe { options_arg(pointers.as_ptr(), pointers.len()) }.unwrap_or_else(|_| panic!());
            (crate::agent::agent_config("fuzz", &options).is_ok(), crate::store::store_options(&options).is_ok())
        };
        let seeds = seeds();
        assert_eq!(parse(&seeds[0]), (true, false));
        assert_eq!(parse(&seeds[1]), (true, false));
        assert_eq!(parse(&seeds[2]), (false, true));
        assert_eq!(parse(&seeds[3]), (false, true));
        assert_eq!(parse(&seeds[4]), (false, true));
    }
}
