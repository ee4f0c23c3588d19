//! Evaluation: data, perplexity over recurrences, plots.

pub mod data;
pub mod perplexity;
pub mod plot;
