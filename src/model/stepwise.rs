//! A static model's forward in pieces (embed, any blocks in any order, head), for callers that keep
//! the hidden state at every layer boundary and rerun only what changes: `plan --calibrate`
//! removes one layer, or runs a candidate's core and coda, from a cached state (issue 10). The
//! pieces are the ones [`Model::forward`] uses, so a full run through them gives its logits.

use candle_core::{DType, Tensor, D};

use super::{fused, Model, ModelError, Result};

/// Rows of the final norm and lm_head per step: the logits of one step are rows x vocabulary f32
/// (512 x 49152 x 4 B = 100 MB for SmolLM2), which bounds the memory of a long window.
const HEAD_ROWS: usize = 512;

impl Model {
    /// Number of blocks of a static model (its layers, in the order it was loaded).
    pub(crate) fn n_blocks(&self) -> usize {
        self.prelude.len()
    }

    /// Runs the blocks `blocks` (indices into a static model's layers, in the given order) on the
    /// hidden states `x` (B, T, h) of tokens at positions 0..T, causal, no padding:
    /// (B, T, h) -> (B, T, h). No blocks: `x` itself.
    pub(crate) fn run_blocks(&self, x: &Tensor, blocks: &[usize]) -> Result<Tensor> {
        if self.is_recurrent() {
            return Err(ModelError::Invalid(
                "run_blocks runs the layers of a static model".into(),
            ));
        }
        let (b, t, _) = x.dims3()?;
        let dtype = x.dtype();
        let frame = self.frame(None, b, t, 0, dtype)?;
        let ctx = frame.context(&self.config, self.kernels);
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
    /// against `targets` (B, T) u32, and the number of tokens: the final norm, then lm_head and
    /// the loss in the fused op (`fused::xent`), or else lm_head a few hundred rows at a time and
    /// each row's log-sum-exp on every core (candle's elementwise ops run on one thread, and over
    /// a 49k vocabulary they would cost more than the matmul). Rows are summed in order in f64,
    /// so the result does not depend on the thread count.
    pub(crate) fn head_nll(&self, x: &Tensor, targets: &Tensor) -> Result<(f64, usize)> {
        let h = x.dim(D::Minus1)?;
        let x = x.reshape(((), h))?;
        let targets = targets.flatten_all()?.to_vec1::<u32>()?;
        let rows = x.dim(0)?;
        if targets.len() != rows {
            return Err(ModelError::Invalid(format!(
                "{} targets for {rows} hidden states",
                targets.len()
            )));
        }
        let normed = self.normed(&x)?;
        if let Some(w) = self.fused_head(&normed) {
            // The fused head never holds more than a chunk of logits; rows summed in order.
            let nll = fused::xent::nll_rows(&normed, w, &targets)?;
            return Ok((nll.iter().sum(), rows));
        }
        let (mut nll, mut start) = (0.0, 0);
        while start < rows {
            let n = HEAD_ROWS.min(rows - start);
            let chunk = normed.narrow(0, start, n)?;
            // (n, h) @ (h, V) -> (n, V)
            let logits = self.lm_head.forward(&chunk)?;
            let vocab = logits.dim(1)?;
            let logits = logits
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let rows_nll = row_nll(&logits, vocab, &targets[start..start + n])?;
            nll += rows_nll.iter().sum::<f64>();
            start += n;
        }
        Ok((nll, rows))
    }
}

/// -log softmax(row)[target] of each row of `logits` (rows x vocab, row-major), the rows split
/// over the available cores.
fn row_nll(logits: &[f32], vocab: usize, targets: &[u32]) -> Result<Vec<f64>> {
    let one = |(row, &target): (&[f32], &u32)| -> Result<f64> {
        let picked = *row.get(target as usize).ok_or_else(|| {
            ModelError::Invalid(format!(
                "target {target} is outside the vocabulary of {vocab}"
            ))
        })?;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| f64::from((v - max).exp())).sum();
        Ok(sum.ln() + f64::from(max) - f64::from(picked))
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = targets.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = logits
            .chunks(per * vocab)
            .zip(targets.chunks(per))
            .map(|(l, t)| {
                scope.spawn(move || {
                    l.chunks(vocab)
                        .zip(t)
                        .map(one)
                        .collect::<Result<Vec<f64>>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(targets.len());
        for handle in handles {
            let part = handle
                .join()
                .map_err(|_| ModelError::Invalid("a cross-entropy thread panicked".into()))?;
            out.extend(part?);
        }
        Ok(out)
    })
}
