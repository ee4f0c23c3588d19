//! The safetensors header reader and the sharded-checkpoint index parser, on arbitrary bytes:
//! either may refuse, neither may panic or allocate by a size read from the input.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use surgery::formats::safetensors;

fuzz_target!(|data: &[u8]| {
    if let Ok((tensors, _)) = safetensors::parse(data, Path::new("fuzz.safetensors")) {
        // What the reader promises its callers: every tensor's bytes lie inside the file.
        for t in &tensors {
            assert!(t.start <= t.end && t.end <= data.len() as u64, "{t:?}");
        }
    }
    let _ = safetensors::parse_index(data);
});
