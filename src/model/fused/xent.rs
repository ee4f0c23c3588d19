//! lm_head and next-token cross-entropy as one op that never holds the [tokens, vocabulary]
//! logits (for SmolLM2, 8 x 1024 tokens x 49152 entries would be 1.6 GB of f32, and the composed
//! loss keeps several such tensors for its backward).
//!
//! Rows of hidden states go through lm_head a block at a time, the block sized so that its logits
//! (rows, V) = h_rows @ W^T stay within [`LOGITS_BUDGET`] values. Each row's log-sum-exp and target
//! logit give its loss; when a gradient is wanted, the block's logits then become dlogits =
//! c (softmax - onehot) in place, and dh_rows = dlogits @ W, dW += dlogits^T @ h_rows. The
//! gradients are formed in the forward, as Liger-Kernel's fused linear cross-entropy does: the
//! loss is a scalar, so its backward only scales them by the incoming gradient. The op then costs
//! the three matmuls of lm_head's forward and backward (the `gemm` crate, as candle's own) and one
//! exp per logit; recomputing the logits in the backward instead would add a fourth matmul, the
//! largest cost of the whole head (measured: slower than the composed loss).

use std::sync::OnceLock;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{matmul, storage, with_float, Float, Mat, LANES};

/// Logits formed at once: a block of rows x the vocabulary (32 MB of f32; 170 rows of SmolLM2).
const LOGITS_BUDGET: usize = 1 << 23;
/// The fewest rows per block, so that a block's matmuls stay wide for any vocabulary.
const MIN_BLOCK_ROWS: usize = 16;

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
            want_dh: h.track_op(),
            want_dw: w.track_op(),
            grads: OnceLock::new(),
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

/// What a pass computes besides each row's loss.
#[derive(Clone, Copy)]
struct Wanted {
    /// d loss / d nll of every row (the incoming gradient taken as 1).
    coef: f64,
    dh: bool,
    dw: bool,
}

/// Each row's -log softmax(h @ w^T)[target], and [dh (N or 0 rows); dW (V or 0 rows)] of
/// `wanted` (empty without), h (N, d), w (V, d).
fn pass<T: Float>(
    h: Mat<T>,
    w: Mat<T>,
    targets: &[u32],
    wanted: Option<Wanted>,
) -> candle_core::Result<(Vec<f64>, Vec<T>)> {
    let (n, v, d) = (h.rows, w.rows, h.cols);
    let block = block_rows(n, v);
    let mut nll = vec![0f64; n];
    let dh_len = if wanted.is_some_and(|g| g.dh) {
        n * d
    } else {
        0
    };
    let dw_len = if wanted.is_some_and(|g| g.dw) {
        v * d
    } else {
        0
    };
    let mut grads = vec![T::zero(); dh_len + dw_len];
    let (dh, dw) = grads.split_at_mut(dh_len);
    let mut buf = vec![T::zero(); block.min(n) * v];
    for r0 in (0..n).step_by(block) {
        let nr = block.min(n - r0);
        let hb = h.narrow_rows(r0, nr);
        let logits = &mut buf[..nr * v];
        // (nr, d) @ (d, V) -> (nr, V)
        matmul(logits, hb, w.t(), false)?;
        let coef = wanted.map(|g| T::from_f64(g.coef));
        logits
            .par_chunks_mut(v)
            .zip(nll[r0..r0 + nr].par_iter_mut())
            .zip(targets[r0..r0 + nr].par_iter())
            .for_each(|((row, nll), &t)| *nll = row_loss(row, t as usize, coef));
        let Some(wanted) = wanted else { continue };
        let dl = Mat::row_major(&*logits, nr, v);
        if wanted.dh {
            // (nr, V) @ (V, d) -> (nr, d): the block's rows of dh
            matmul(&mut dh[r0 * d..(r0 + nr) * d], dl, w, false)?;
        }
        if wanted.dw {
            // (V, nr) @ (nr, d) -> (V, d), added to dW
            matmul(dw, dl.t(), hb, true)?;
        }
    }
    Ok((nll, grads))
}

/// Rows of logits per block for `n` rows and a vocabulary of `v`.
fn block_rows(n: usize, v: usize) -> usize {
    (LOGITS_BUDGET / v.max(1)).max(MIN_BLOCK_ROWS).min(n.max(1))
}

/// One row's -log softmax(row)[target]; with `coef`, the row becomes coef (softmax - onehot).
/// The max is taken and exp summed in f64 over exp(x - max), one exp per logit.
fn row_loss<T: Float>(row: &mut [T], target: usize, coef: Option<T>) -> f64 {
    let Some(&head) = row.first() else {
        return f64::NAN;
    };
    let picked = row[target].to_f64();
    // A NaN logit is never the max, but it makes the sum NaN, so the loss says so.
    let top = lane_max(row, head);
    row.iter_mut().for_each(|x| *x = (*x - top).softmax_exp());
    let sum = lane_sum(row);
    if let Some(c) = coef {
        let scale = c / T::from_f64(sum);
        for x in row.iter_mut() {
            *x *= scale;
        }
        row[target] -= c;
    }
    top.to_f64() + sum.ln() - picked
}

/// The largest of `row` and `start` by `>` (so never a NaN), in [`LANES`] running maxima: one
/// chain of compares waits on each.
fn lane_max<T: Float>(row: &[T], start: T) -> T {
    let larger = |m: T, x: T| if x > m { x } else { m };
    let (blocks, rest) = row.as_chunks::<LANES>();
    let mut acc = [start; LANES];
    for block in blocks {
        for (m, &x) in acc.iter_mut().zip(block) {
            *m = larger(*m, x);
        }
    }
    acc.into_iter()
        .chain(rest.iter().copied())
        .fold(start, larger)
}

/// The sum of `row` in f64, in [`LANES`] running sums added in a fixed order at the end: one
/// chain of adds waits on each.
fn lane_sum<T: Float>(row: &[T]) -> f64 {
    let (blocks, rest) = row.as_chunks::<LANES>();
    let mut acc = [0f64; LANES];
    for block in blocks {
        for (s, &x) in acc.iter_mut().zip(block) {
            *s += x.to_f64();
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|x| x.to_f64()).sum::<f64>()
}

struct LinearCrossEntropy {
    targets: Vec<u32>,
    scale: f64,
    want_dh: bool,
    want_dw: bool,
    /// [dh; dW] from the forward, for the backward to scale.
    grads: OnceLock<Tensor>,
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
        let wanted = (self.want_dh || self.want_dw).then_some(Wanted {
            coef: self.scale,
            dh: self.want_dh,
            dw: self.want_dw,
        });
        let value = with_float!(self.name(), s1, [s1, s2], |T| {
            let (h, w) = operands(self.name(), s1, l1, s2, l2, &self.targets)?;
            let (nll, grads) = pass::<T>(h, w, &self.targets, wanted)?;
            if wanted.is_some() {
                let rows = grads.len() / h.cols.max(1);
                let grads = Tensor::from_vec(grads, (rows, h.cols), &Device::Cpu)?;
                // candle runs an op's forward once; a second run would find the same values.
                let _ = self.grads.set(grads);
            }
            // Summed in row order in f64: the same bits whatever the thread count.
            let total: f64 = nll.iter().sum();
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
        let Some(both) = self.grads.get() else {
            bail!("{}: backward before forward", self.name());
        };
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // (N or 0 rows of dh, then V or 0 rows of dW, d)
        let both = if g == 1.0 { both.clone() } else { (both * g)? };
        let n = if self.want_dh { h.dim(0)? } else { 0 };
        let dh = self.want_dh.then(|| both.narrow(0, 0, n)).transpose()?;
        let dw = self
            .want_dw
            .then(|| both.narrow(0, n, w.dim(0)?))
            .transpose()?;
        Ok((dh, dw))
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
            pass::<T>(h, w, self.targets, None)?.0
        });
        let n = nll.len();
        Ok((CpuStorage::F64(nll), Shape::from(n)))
    }
}
