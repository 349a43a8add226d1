#![no_main]

#[allow(dead_code)] // each target uses one of the shared bodies
#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::content_address(data));
