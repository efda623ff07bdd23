#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvferry_core::fuzzing::remote_object(data));
