//! plan.json parsing and the checks `apply` runs on a plan before it opens any source file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use surgery::plan::Plan;

fuzz_target!(|data: &[u8]| {
    if let Ok(plan) = Plan::from_json(data) {
        let _ = plan.validate();
    }
});
