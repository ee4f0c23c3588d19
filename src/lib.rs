//! `surgery`: retrofit recurrence into pretrained language models (McLeish et al., 2025).
//!
//! The library owns every domain step; `src/main.rs` and `src/cli/` only parse arguments and print.

pub mod arch;
pub mod atomic;
pub mod demo;
pub mod dtype;
pub mod eval;
pub mod export;
pub mod formats;
pub mod heal;
pub mod hub;
pub mod manifest;
pub mod model;
pub mod named;
pub mod paths;
pub mod plan;
pub mod progress;
pub mod source;
pub mod surgery;
pub mod synth;
pub mod tokenizer;
pub mod units;
