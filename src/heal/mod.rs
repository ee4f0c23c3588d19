//! Healing: the recurrence-curriculum fine-tune (REFERENCE.md, "Training").

pub mod data;
pub mod optim;
pub mod sampler;
pub mod schedule;
