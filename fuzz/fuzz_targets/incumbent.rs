#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| handoff_fuzz::incumbent::run(data));
