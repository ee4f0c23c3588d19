//! Evaluation: data, perplexity over recurrences, plots.

pub mod calibrate;
pub mod data;
mod jsonl;
pub mod perplexity;
pub mod plot;
