//! A heal checkpoint's state.json: parsing and the validation `heal --resume` runs on it before
//! it opens the model, the data or the checkpoint's tensors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = surgery::heal::checkpoint::parse_state(data) {
        // What validation promises the trainer: a step inside the run, whole batches of whole
        // micro-batches, and the cursor that step implies.
        let c = &state.config;
        assert!(state.step >= 1 && state.step < c.steps);
        assert!(c.seq_len >= 1 && c.micro_batch >= 1 && c.batch % c.micro_batch == 0);
        assert_eq!(Some(state.cursor), state.step.checked_mul(c.batch as u64));
    }
});
