//! The GGUF header reader on arbitrary bytes: it may refuse, never panic or allocate by a count
//! read from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use surgery::formats::gguf::reader;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = reader::parse(data) {
        // What the reader promises its callers: every tensor's data lies inside the file.
        for t in &header.tensors {
            let end = t.offset.checked_add(t.n_bytes).expect("end fits");
            assert!(end <= data.len() as u64, "{t:?}");
        }
    }
});
