//! File formats, one module each. None of them knows about the CLI.

pub mod gguf;
pub mod hf_config;
pub mod safetensors;
pub mod spm;
pub mod text_tokenizer;
pub mod tokenizer;
