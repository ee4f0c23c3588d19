//! Tokenizers, in both directions between the two formats a model carries them in: a GGUF's
//! `tokenizer.ggml.*` metadata and Hugging Face's `tokenizer.json`.
//!
//! - [`gguf`]: a GGUF's vocabulary to `tokenizer.json` and `tokenizer_config.json` (apply, export
//!   to safetensors);
//! - [`vocab`]: `tokenizer.json` to GGUF metadata (export to GGUF);
//! - [`spm`]: SentencePiece's scores and merges, which both directions convert;
//! - [`text`]: text to token ids for any model `surgery` reads (eval, heal, generate, calibrate);
//! - [`chat`]: the model's chat template, rendering a conversation as transformers does.

pub mod chat;
pub mod gguf;
pub(crate) mod spm;
pub mod text;
pub mod vocab;
