//! A static model's forward in pieces (embed, any blocks in any order, head), for callers that keep
//! the hidden state at every layer boundary and rerun only what changes: `plan --calibrate`
//! removes one layer, or runs a candidate's core and coda, from a cached state (issue 10). The
//! pieces are the ones [`Model::forward`] uses, so a full run through them gives its logits.

use candle_core::{Tensor, D};

use super::{block, cross_entropy_sum, positions_and_bias, Model, ModelError, Result};

/// Rows of the final norm and lm_head per step: the logits of one step are rows x vocabulary f32
/// (512 x 49152 x 4 B = 100 MB for SmolLM2), which bounds the memory of a long window.
const HEAD_ROWS: usize = 512;

impl Model {
    /// Number of blocks of a static model (its layers, in the order it was loaded).
    pub fn n_blocks(&self) -> usize {
        self.prelude.len()
    }

    /// Token embeddings: ids (B, T) u32 -> (B, T, h).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden))?)
    }

    /// Runs the blocks `blocks` (indices into a static model's layers, in the given order) on the
    /// hidden states `x` (B, T, h) of tokens at positions 0..T, causal, no padding:
    /// (B, T, h) -> (B, T, h). No blocks: `x` itself.
    pub fn run_blocks(&self, x: &Tensor, blocks: &[usize]) -> Result<Tensor> {
        if self.is_recurrent() {
            return Err(ModelError::Invalid(
                "run_blocks runs the layers of a static model".into(),
            ));
        }
        let (b, t, _) = x.dims3()?;
        let dtype = x.dtype();
        let (positions, bias) = positions_and_bias(None, b, t, 0, &self.device)?;
        let bias = bias.to_dtype(dtype)?;
        let (cos, sin) = self.rope.cos_sin(&positions)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let ctx = block::Context {
            bias: &bias,
            cos: &cos,
            sin: &sin,
            config: &self.config,
        };
        let mut x = x.clone();
        for &i in blocks {
            let block = self.prelude.get(i).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "block {i} is out of range: the model has {} layers",
                    self.prelude.len()
                ))
            })?;
            x = block.forward(&x, &ctx, None)?;
        }
        Ok(x)
    }

    /// The summed next-token cross-entropy (nats) of the final hidden states `x` (B, T, h)
    /// against `targets` (B, T) u32, and the number of tokens: final norm and lm_head, a few
    /// hundred rows at a time.
    pub fn head_nll(&self, x: &Tensor, targets: &Tensor) -> Result<(f64, usize)> {
        let h = x.dim(D::Minus1)?;
        let x = x.reshape(((), h))?;
        let targets = targets.flatten_all()?;
        let rows = x.dim(0)?;
        if targets.dim(0)? != rows {
            return Err(ModelError::Invalid(format!(
                "{} targets for {rows} hidden states",
                targets.dim(0)?
            )));
        }
        let (mut nll, mut start) = (0.0, 0);
        while start < rows {
            let n = HEAD_ROWS.min(rows - start);
            let chunk = block::rms_norm(
                &x.narrow(0, start, n)?,
                &self.final_norm,
                self.config.norm_eps,
            )?;
            // (n, h) @ (h, V) -> (1, n, V)
            let logits = block::linear(&chunk, &self.lm_head)?.unsqueeze(0)?;
            let chunk_targets = targets.narrow(0, start, n)?.unsqueeze(0)?;
            let weights = Tensor::ones((1, n), logits.dtype(), &self.device)?;
            let (sum, _) = cross_entropy_sum(&logits, &chunk_targets, &weights)?;
            nll += sum;
            start += n;
        }
        Ok((nll, rows))
    }
}
