//! Rotary position embeddings, rotate-half convention (Hugging Face Llama), with Llama-3 frequency
//! scaling; computed in f32 as transformers does, from plain ops so they are differentiable.

use candle_core::{DType, Tensor, D};

use crate::formats::hf_config::ModelConfig;

/// The inverse frequencies of one head's rotary dimensions.
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(c: &ModelConfig) -> Rope {
        let dim = c.head_dim;
        // transformers: 1 / base^(arange(0, dim, 2) / dim), in f32.
        let mut inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / (c.rope_theta as f32).powf(i as f32 / dim as f32))
            .collect();
        if let Some(s) = c.rope_scaling {
            // transformers' _compute_llama3_parameters: long wavelengths are divided by `factor`,
            // short ones kept, the band between interpolated smoothly.
            let old = s.original_max_position_embeddings as f32;
            let (factor, low, high) = (
                s.factor as f32,
                s.low_freq_factor as f32,
                s.high_freq_factor as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        Rope { inv_freq }
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
