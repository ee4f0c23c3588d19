//! Evaluation: data, perplexity over recurrences, multiple-choice tasks, baselines, plots, and
//! `plan --calibrate`'s measuring.

pub mod baseline;
pub mod calibrate;
pub mod data;
mod jsonl;
pub mod perplexity;
pub mod plan_calibrated;
pub mod plot;
mod records;
pub mod task;
