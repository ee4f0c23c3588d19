//! lm_head and next-token cross-entropy as one op that never holds the [tokens, vocabulary]
//! logits (for SmolLM2, 8 x 1024 tokens x 49152 entries would be 1.6 GB of f32, and the composed
//! loss keeps several such tensors for its backward).
//!
//! Forward: blocks of rows of hidden states go through the vocabulary in chunks; each chunk's
//! logits (rows, chunk) = h @ W_chunk^T update a per-row online log-sum-exp (the running max and
//! the sum of exp below it, as in the flash-attention softmax) and pick the target's logit. The
//! per-row log-sum-exp is kept for the backward (rows values, not rows x vocabulary).
//!
//! Backward: each chunk's logits are recomputed, turned into dlogits = c (softmax - onehot) with
//! the saved log-sum-exp, and accumulated into dh += dlogits @ W_chunk and dW_chunk += dlogits^T
//! @ h. Every product is a wide matmul (the `gemm` crate, as candle's own), so the op costs the
//! three matmuls of lm_head's forward and backward plus one more for the recomputation.

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{matmul, storage, with_float, Float, Mat};

/// Logits formed at once: rows x vocabulary entries (16 MB of f32).
const CHUNK: usize = 1 << 22;
/// Rows of hidden states per block: a vocabulary chunk's weights are packed once per block.
const ROW_BLOCK: usize = 1024;
/// The fewest vocabulary entries per chunk, so that a block's matmuls stay wide.
const MIN_VOCAB_CHUNK: usize = 256;

/// Rows per block and vocabulary entries per chunk for `n` rows and a vocabulary of `v`.
fn chunking(n: usize, v: usize) -> (usize, usize) {
    let rows = n.clamp(1, ROW_BLOCK);
    let vocab = (CHUNK / rows).max(MIN_VOCAB_CHUNK).min(v.max(1));
    (rows, vocab)
}

/// `scale` x the summed cross-entropy of the logits h @ w^T against `targets`: h (N, d) hidden
/// states after the final norm, w (V, d) lm_head -> a scalar. With `scale` 1 / N it is the mean
/// that `mean_cross_entropy` gives on the full logits. Differentiable in h and w.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    scale: f64,
) -> candle_core::Result<Tensor> {
    h.apply_op2(
        w,
        LinearCrossEntropy {
            targets: targets.to_vec(),
            scale,
            lse: OnceLock::new(),
        },
    )
}

/// -log softmax(h @ w^T)[target] of each row, in f64, without the logits or a gradient: h (N, d),
/// w (V, d) -> N values (what evaluation and calibration add up).
pub fn nll_rows(h: &Tensor, w: &Tensor, targets: &[u32]) -> candle_core::Result<Vec<f64>> {
    h.apply_op2_no_bwd(w, &NllRows { targets })?
        .to_vec1::<f64>()
}

/// The (N, d) and (V, d) matrices of a pass, and the targets checked against them.
fn operands<'a, T>(
    name: &str,
    h: &'a [T],
    lh: &Layout,
    w: &'a [T],
    lw: &Layout,
    targets: &[u32],
) -> candle_core::Result<(Mat<'a, T>, Mat<'a, T>)> {
    let (h, w) = (Mat::of_layout(h, lh)?, Mat::of_layout(w, lw)?);
    if h.cols != w.cols {
        bail!(
            "{name}: hidden states of width {} for an lm_head of width {}",
            h.cols,
            w.cols
        );
    }
    if targets.len() != h.rows {
        bail!(
            "{name}: {} targets for {} hidden states",
            targets.len(),
            h.rows
        );
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= w.rows) {
        bail!("target {t} is outside the vocabulary of {}", w.rows);
    }
    Ok((h, w))
}

/// A row's running log-sum-exp: max, the sum of exp(logit - max) so far, the target's logit.
#[derive(Clone, Copy)]
struct Online {
    max: f64,
    sum: f64,
    picked: f64,
}

impl Online {
    const START: Online = Online {
        max: f64::NEG_INFINITY,
        sum: 0.0,
        picked: f64::NAN,
    };

    /// Folds in the logits of vocabulary entries `first..first + row.len()`.
    fn update<T: Float>(&mut self, row: &[T], first: usize, target: u32) {
        let Some(&head) = row.first() else { return };
        let top = row.iter().fold(head, |m, &x| if x > m { x } else { m });
        let sum: f64 = row.iter().map(|&x| (x - top).exp().to_f64()).sum();
        let top = top.to_f64();
        if top > self.max {
            self.sum = self.sum * (self.max - top).exp() + sum;
            self.max = top;
        } else {
            // Also the NaN case: a NaN logit makes the sum NaN, so the loss says so.
            self.sum += sum * (top - self.max).exp();
        }
        if let Some(&x) = (target as usize)
            .checked_sub(first)
            .and_then(|i| row.get(i))
        {
            self.picked = x.to_f64();
        }
    }

    fn lse(&self) -> f64 {
        self.max + self.sum.ln()
    }
}

/// The log-sum-exp of each row of h @ w^T and its target's logit.
fn forward<T: Float>(h: Mat<T>, w: Mat<T>, targets: &[u32]) -> candle_core::Result<Vec<Online>> {
    let (n, v) = (h.rows, w.rows);
    let (block_rows, chunk) = chunking(n, v);
    let mut rows = vec![Online::START; n];
    let mut buf = vec![T::zero(); block_rows * chunk];
    for r0 in (0..n).step_by(block_rows) {
        let nr = block_rows.min(n - r0);
        let hb = h.narrow_rows(r0, nr);
        for v0 in (0..v).step_by(chunk) {
            let nv = chunk.min(v - v0);
            let logits = &mut buf[..nr * nv];
            // (nr, d) @ (d, nv) -> (nr, nv)
            matmul(logits, hb, w.narrow_rows(v0, nv).t(), false)?;
            logits
                .par_chunks(nv)
                .zip(rows[r0..r0 + nr].par_iter_mut())
                .zip(targets[r0..r0 + nr].par_iter())
                .for_each(|((row, online), &t)| online.update(row, v0, t));
        }
    }
    Ok(rows)
}

/// dh (N, d) and dW (V, d) (each left out when not wanted) for dlogits = coef_i (softmax - onehot).
struct Backward<'a> {
    targets: &'a [u32],
    lse: &'a [f64],
    /// Per row: d loss / d nll_i.
    coef: &'a [f64],
    want_dh: bool,
    want_dw: bool,
}

impl Backward<'_> {
    /// [dh; dW] as one (N or 0 + V or 0, d) buffer, so the two need no copy into one tensor.
    fn run<T: Float>(&self, h: Mat<T>, w: Mat<T>) -> candle_core::Result<Vec<T>> {
        let (n, v, d) = (h.rows, w.rows, h.cols);
        let dh_len = if self.want_dh { n * d } else { 0 };
        let dw_len = if self.want_dw { v * d } else { 0 };
        let mut out = vec![T::zero(); dh_len + dw_len];
        let (dh, dw) = out.split_at_mut(dh_len);
        let (block_rows, chunk) = chunking(n, v);
        let mut buf = vec![T::zero(); block_rows * chunk];
        for r0 in (0..n).step_by(block_rows) {
            let nr = block_rows.min(n - r0);
            let hb = h.narrow_rows(r0, nr);
            for v0 in (0..v).step_by(chunk) {
                let nv = chunk.min(v - v0);
                let wc = w.narrow_rows(v0, nv);
                let logits = &mut buf[..nr * nv];
                // (nr, d) @ (d, nv) -> (nr, nv)
                matmul(logits, hb, wc.t(), false)?;
                let rows = r0..r0 + nr;
                logits
                    .par_chunks_mut(nv)
                    .zip(self.lse[rows.clone()].par_iter())
                    .zip(self.coef[rows.clone()].par_iter())
                    .zip(self.targets[rows].par_iter())
                    .for_each(|(((row, &lse), &c), &t)| {
                        let (lse, c) = (T::from_f64(lse), T::from_f64(c));
                        for x in row.iter_mut() {
                            *x = (*x - lse).exp() * c;
                        }
                        if let Some(x) = (t as usize).checked_sub(v0).and_then(|i| row.get_mut(i)) {
                            *x -= c;
                        }
                    });
                let dl = Mat::row_major(&*logits, nr, nv);
                if self.want_dh {
                    // (nr, nv) @ (nv, d) -> (nr, d), added to the block's rows of dh
                    matmul(&mut dh[r0 * d..(r0 + nr) * d], dl, wc, true)?;
                }
                if self.want_dw {
                    // (nv, nr) @ (nr, d) -> (nv, d), added to the chunk's rows of dW
                    matmul(&mut dw[v0 * d..(v0 + nv) * d], dl.t(), hb, true)?;
                }
            }
        }
        Ok(out)
    }
}

struct LinearCrossEntropy {
    targets: Vec<u32>,
    scale: f64,
    /// Each row's log-sum-exp, from the forward, for the backward.
    lse: OnceLock<Vec<f64>>,
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "linear_cross_entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let value = with_float!(self.name(), s1, [s1, s2], |T| {
            let (h, w) = operands(self.name(), s1, l1, s2, l2, &self.targets)?;
            let rows = forward::<T>(h, w, &self.targets)?;
            // Summed in row order in f64: the same bits whatever the thread count.
            let total: f64 = rows.iter().map(|r| r.lse() - r.picked).sum();
            // A second forward of the same op (none in candle) would find the same values.
            let _ = self.lse.set(rows.iter().map(Online::lse).collect());
            storage(vec![<T as candle_core::WithDType>::from_f64(
                total * self.scale,
            )])
        });
        Ok((value, Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else {
            bail!("{}: backward before forward", self.name());
        };
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let coef = vec![g * self.scale; self.targets.len()];
        let (want_dh, want_dw) = (h.track_op(), w.track_op());
        let op = BackwardOp(Backward {
            targets: &self.targets,
            lse,
            coef: &coef,
            want_dh,
            want_dw,
        });
        // (N or 0 rows of dh, then V or 0 rows of dW, d)
        let both = h.apply_op2_no_bwd(w, &op)?;
        let n = if want_dh { h.dim(0)? } else { 0 };
        let dh = want_dh.then(|| both.narrow(0, 0, n)).transpose()?;
        let dw = want_dw.then(|| both.narrow(0, n, w.dim(0)?)).transpose()?;
        Ok((dh, dw))
    }
}

/// The backward as an op without a gradient of its own: (h, w) -> [dh; dW].
struct BackwardOp<'a>(Backward<'a>);

impl CustomOp2 for BackwardOp<'_> {
    fn name(&self) -> &'static str {
        "linear_cross_entropy_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = &self.0;
        with_float!(self.name(), s1, [s1, s2], |T| {
            let (h, w) = operands(self.name(), s1, l1, s2, l2, b.targets)?;
            if b.lse.len() != h.rows || b.coef.len() != h.rows {
                bail!("{}: saved rows do not match the inputs", self.name());
            }
            let both = b.run::<T>(h, w)?;
            let rows = both.len() / h.cols.max(1);
            Ok((storage(both), Shape::from((rows, h.cols))))
        })
    }
}

/// -log softmax(h @ w^T)[target] per row, as an f64 tensor (N).
struct NllRows<'a> {
    targets: &'a [u32],
}

impl CustomOp2 for NllRows<'_> {
    fn name(&self) -> &'static str {
        "nll_rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let nll = with_float!(self.name(), s1, [s1, s2], |T| {
            let (h, w) = operands(self.name(), s1, l1, s2, l2, self.targets)?;
            forward::<T>(h, w, self.targets)?
                .iter()
                .map(|r| r.lse() - r.picked)
                .collect::<Vec<f64>>()
        });
        let n = nll.len();
        Ok((CpuStorage::F64(nll), Shape::from(n)))
    }
}
