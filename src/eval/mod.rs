//! Evaluation: data, perplexity over recurrences, plots, and `plan --calibrate`'s measuring.

pub mod calibrate;
pub mod data;
mod jsonl;
pub mod perplexity;
pub mod plan_calibrated;
pub mod plot;
mod records;
