//! Healing: the recurrence-curriculum fine-tune (REFERENCE.md, "Training").

pub mod checkpoint;
pub mod data;
pub mod distill;
mod inplace;
pub mod optim;
pub mod output;
pub mod place;
pub mod sampler;
pub mod schedule;
pub mod train;
