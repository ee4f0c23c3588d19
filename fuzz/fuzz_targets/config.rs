//! config.json parsing and validation on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use surgery::formats::hf_config;

fuzz_target!(|data: &[u8]| {
    let _ = hf_config::parse(data);
});
