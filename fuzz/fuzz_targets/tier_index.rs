#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvferry_core::fuzzing::tier_index(data));
