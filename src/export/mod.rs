//! Export: a checkpoint to GGUF (our recurrent architecture, or stock llama.cpp `llama`) and to
//! the Hugging Face safetensors layout.

pub mod spec;
