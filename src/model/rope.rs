//! Rotary position embeddings, rotate-half convention (Hugging Face Llama), with Llama-3 frequency
//! scaling (the frequencies: [`inv_freqs`]); computed in f32 as transformers does, from plain ops so
//! they are differentiable.

use candle_core::{DType, Tensor, D};

use crate::formats::gguf::rope_freqs::inv_freqs;
use crate::formats::hf_config::ModelConfig;

/// The inverse frequencies of one head's rotary dimensions.
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The frequencies of `c`'s heads: [`inv_freqs`], shared with the GGUF reader, which checks
    /// a file's `rope_freqs` divisors against them.
    pub fn new(c: &ModelConfig) -> Rope {
        Rope {
            inv_freq: inv_freqs(c.rope_theta, c.head_dim, c.rope_scaling.as_ref()),
        }
    }

    /// cos and sin for `positions` [B, T] (u32): each [B, 1, T, head_dim], to broadcast over heads.
    pub fn cos_sin(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let device = positions.device();
        let half = self.inv_freq.len();
        let inv = Tensor::from_slice(&self.inv_freq, (1, 1, half), device)?;
        // (B, T, 1) * (1, 1, D/2) -> (B, T, D/2); then [freqs, freqs] -> (B, T, D)
        let freqs = positions
            .to_dtype(DType::F32)?
            .unsqueeze(D::Minus1)?
            .broadcast_mul(&inv)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok((emb.cos()?, emb.sin()?))
    }
}

/// x * cos + rotate_half(x) * sin, with rotate_half([x1, x2]) = [-x2, x1]; x is [B, H, T, D].
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}
