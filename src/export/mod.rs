//! Export: any checkpoint to GGUF (our recurrent architecture, or stock llama.cpp `llama` where
//! that is exact) and to the Hugging Face safetensors layout, streamed a chunk at a time.

pub mod gguf;
pub mod mix;
pub mod rows;
pub mod safetensors;

use std::path::PathBuf;

pub use gguf::{export_gguf, GgufArch, GgufOptions};
pub use mix::QuantType;
pub use safetensors::{export_safetensors, SafetensorsOptions};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The model cannot be exported as asked; the message says why and what to do instead.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Gguf(#[from] crate::formats::gguf::GgufError),
    /// The output overlaps the model it is made from, or exists without --force.
    #[error(transparent)]
    Path(#[from] crate::paths::PathError),
    #[error(transparent)]
    Vocab(#[from] crate::tokenizer::vocab::VocabError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::gguf::TokenizerError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A tensor that could not be read or converted.
    #[error("{0}")]
    Convert(String),
}
