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

use std::sync::{Arc, OnceLock};

use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::{matmul, storage, with_float, Float, Mat, LANES};

/// Logits formed at once: a block of rows x the vocabulary (32 MB of f32; 170 rows of SmolLM2).
const LOGITS_BUDGET: usize = 1 << 23;
/// The fewest rows per block, so that a block's matmuls stay wide for any vocabulary.
const MIN_BLOCK_ROWS: usize = 16;

/// A target that is not scored (PyTorch's `ignore_index`): its row adds nothing to the loss and
/// gets no gradient, as the positions outside the assistant's turns under `heal --loss-on
/// assistant`. The caller's `scale` counts the scored rows only.
pub const IGNORED: u32 = u32::MAX;

/// `scale` x the summed cross-entropy of the logits h @ w^T against `targets`: h (N, d) hidden
/// states after the final norm, w (V, d) lm_head -> a scalar. With `scale` 1 / N it is the mean
/// that `mean_cross_entropy` gives on the full logits. Differentiable in h and w.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    scale: f64,
) -> candle_core::Result<Tensor> {
    h.apply_op2(w, LinearCrossEntropy::new(h, w, targets, scale, None))
}

/// Logit distillation (Hinton et al. 2015) mixed with cross-entropy: the teacher's normed hidden
/// states and lm_head, and the mix.
#[derive(Clone)]
pub struct Teacher {
    /// (N, d_t): the teacher's hidden states after its final norm, for the student's N rows.
    pub h: Tensor,
    /// (V, d_t): the teacher's lm_head, over the student's vocabulary.
    pub w: Tensor,
    pub mix: Mix,
}

/// How the two losses mix: alpha CE + (1 - alpha) T^2 KL(teacher_T || student_T).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    pub alpha: f64,
    pub temperature: f64,
}

/// The two parts of a distillation loss, each `scale` x its sum over rows (nats).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Parts {
    pub ce: f64,
    pub kl: f64,
}

/// `scale` x the summed alpha CE + (1 - alpha) T^2 KL(softmax(z_t / T) || softmax(z_s / T)) of
/// the student's logits z_s = h @ w^T against `targets` and the teacher's z_t = teacher.h @
/// teacher.w^T, a block of rows at a time as [`linear_cross_entropy`]: neither model's
/// [tokens, vocabulary] logits are ever held whole. Differentiable in h and w (the teacher gets no
/// gradient); the scalar, and its two parts.
pub fn linear_distillation(
    h: &Tensor,
    w: &Tensor,
    teacher: &Teacher,
    targets: &[u32],
    scale: f64,
) -> candle_core::Result<(Tensor, Parts)> {
    let Mix { alpha, temperature } = teacher.mix;
    if !((0.0..=1.0).contains(&alpha) && temperature.is_finite() && temperature > 0.0) {
        bail!("distillation needs alpha in [0, 1] and a positive temperature, not {alpha} and {temperature}");
    }
    let op = LinearCrossEntropy::new(h, w, targets, scale, Some(teacher.clone()));
    let parts = op.parts.clone();
    let loss = h.apply_op2(w, op)?;
    let parts = parts.get().copied().unwrap_or_default();
    Ok((loss, parts))
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
    if let Some(&t) = targets
        .iter()
        .find(|&&t| t != IGNORED && t as usize >= w.rows)
    {
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

/// Each row's (cross-entropy, KL) in nats.
type RowLosses = Vec<(f64, f64)>;

/// The teacher's two matrices in a pass, (N, d_t) and (V, d_t), and the mix.
type TeacherMats<'a, T> = (Mat<'a, T>, Mat<'a, T>, Mix);

/// Each row's -log softmax(h @ w^T)[target] and, with a teacher, its KL(teacher_T ||
/// student_T) (else 0); and [dh (N or 0 rows); dW (V or 0 rows)] of `wanted` (empty without),
/// h (N, d), w (V, d).
fn pass<T: Float>(
    h: Mat<T>,
    w: Mat<T>,
    targets: &[u32],
    wanted: Option<Wanted>,
    teacher: Option<TeacherMats<T>>,
) -> candle_core::Result<(RowLosses, Vec<T>)> {
    let (n, v, d) = (h.rows, w.rows, h.cols);
    let block = block_rows(n, v);
    let mut nll = vec![(0f64, 0f64); n];
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
    let teacher_rows = if teacher.is_some() { block.min(n) } else { 0 };
    let mut teacher_buf = vec![T::zero(); teacher_rows * v];
    for r0 in (0..n).step_by(block) {
        let nr = block.min(n - r0);
        let hb = h.narrow_rows(r0, nr);
        let logits = &mut buf[..nr * v];
        // (nr, d) @ (d, V) -> (nr, V)
        matmul(logits, hb, w.t(), false)?;
        let coef = wanted.map(|g| g.coef);
        let rows = nll[r0..r0 + nr]
            .par_iter_mut()
            .zip(targets[r0..r0 + nr].par_iter());
        match teacher {
            None => logits
                .par_chunks_mut(v)
                .zip(rows)
                .for_each(|(row, (nll, &t))| {
                    *nll = match t {
                        IGNORED => ignored(row),
                        t => (row_loss(row, t as usize, coef.map(T::from_f64)), 0.0),
                    }
                }),
            Some((th, tw, mix)) => {
                let teacher_logits = &mut teacher_buf[..nr * v];
                // (nr, d_t) @ (d_t, V) -> (nr, V)
                matmul(teacher_logits, th.narrow_rows(r0, nr), tw.t(), false)?;
                logits
                    .par_chunks_mut(v)
                    .zip(teacher_logits.par_chunks_mut(v))
                    .zip(rows)
                    .for_each(|((row, teacher_row), (nll, &t))| {
                        *nll = match t {
                            IGNORED => ignored(row),
                            t => row_distill(row, teacher_row, t as usize, coef, mix),
                        }
                    });
            }
        }
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

/// The losses of a row whose target is [`IGNORED`]: none; its logits become a zero gradient.
fn ignored<T: Float>(row: &mut [T]) -> (f64, f64) {
    row.fill(T::zero());
    (0.0, 0.0)
}

/// Rows of logits per block for `n` rows and a vocabulary of `v`.
pub(crate) fn block_rows(n: usize, v: usize) -> usize {
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

/// One row's cross-entropy -log softmax(s)[target] and KL(softmax(t / T) || softmax(s / T)),
/// the student's logits `s` and the teacher's `t` (overwritten); with `coef`, `s` becomes coef x
/// the gradient of alpha CE + (1 - alpha) T^2 KL: coef (alpha (softmax(s) - onehot) + (1 - alpha)
/// T (softmax(s / T) - softmax(t / T))). With alpha 1 the CE and its gradient are bitwise those
/// of [`row_loss`]; with t = s the KL and its gradient are exactly 0 (both softmaxes at T are
/// formed and summed the same way).
fn row_distill<T: Float>(
    s: &mut [T],
    t: &mut [T],
    target: usize,
    coef: Option<f64>,
    mix: Mix,
) -> (f64, f64) {
    let (Some(&s0), Some(&t0)) = (s.first(), t.first()) else {
        return (f64::NAN, f64::NAN);
    };
    let picked = s[target].to_f64();
    let (top, teacher_top) = (lane_max(s, s0), lane_max(t, t0));
    let inv_t = T::from_f64(1.0 / mix.temperature);
    let at_t = |x: T, top: T| ((x - top) * inv_t).softmax_exp();
    // The teacher at T in place, and sum_i e_i (t_i - s_i) for the KL's first term.
    let mut cross = 0f64;
    for (t, &s) in t.iter_mut().zip(s.iter()) {
        let e = at_t(*t, teacher_top);
        cross += e.to_f64() * (*t - s).to_f64();
        *t = e;
    }
    let teacher_sum = lane_sum(t);
    let mut scratch: Vec<T> = s.iter().map(|&x| at_t(x, top)).collect();
    let student_sum_t = lane_sum(&scratch);
    scratch
        .iter_mut()
        .zip(s.iter())
        .for_each(|(e, &x)| *e = (x - top).softmax_exp());
    let sum = lane_sum(&scratch);
    let ce = top.to_f64() + sum.ln() - picked;
    // sum_i p_i (log p_i - log q_i), log p_i = (t_i - t_top) / T - ln teacher_sum and log q_i =
    // (s_i - top) / T - ln student_sum_t.
    let kl = cross / (teacher_sum * mix.temperature)
        - (teacher_top - top).to_f64() / mix.temperature
        + student_sum_t.ln()
        - teacher_sum.ln();
    if let Some(c) = coef {
        let ca = T::from_f64(c * mix.alpha);
        let scale = ca / T::from_f64(sum);
        let kd = T::from_f64(c * (1.0 - mix.alpha) * mix.temperature);
        let (inv_q, inv_p) = (
            T::from_f64(1.0 / student_sum_t),
            T::from_f64(1.0 / teacher_sum),
        );
        for ((x, &e), &p) in s.iter_mut().zip(&scratch).zip(t.iter()) {
            *x = e * scale + kd * (at_t(*x, top) * inv_q - p * inv_p);
        }
        s[target] -= ca;
    }
    (ce, kl)
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
    teacher: Option<Teacher>,
    /// The loss's parts, from the forward, for the caller.
    parts: Arc<OnceLock<Parts>>,
}

impl LinearCrossEntropy {
    fn new(h: &Tensor, w: &Tensor, targets: &[u32], scale: f64, teacher: Option<Teacher>) -> Self {
        LinearCrossEntropy {
            targets: targets.to_vec(),
            scale,
            want_dh: h.track_op(),
            want_dw: w.track_op(),
            grads: OnceLock::new(),
            teacher,
            parts: Arc::default(),
        }
    }
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
        // The teacher's storages, read-locked for the pass (the student's `s1` stands in).
        let teacher = self.teacher.as_ref().map(|t| {
            let ((hs, hl), (ws, wl)) = (t.h.storage_and_layout(), t.w.storage_and_layout());
            (hs, hl.clone(), ws, wl.clone(), t.mix)
        });
        let (th, tw) = match &teacher {
            Some((hs, _, ws, _, _)) => match (&**hs, &**ws) {
                (Storage::Cpu(h), Storage::Cpu(w)) => (h, w),
                _ => bail!("{}: the teacher is not on the CPU", self.name()),
            },
            None => (s1, s2),
        };
        let value = with_float!(self.name(), s1, [s1, s2, th, tw], |T| {
            let (h, w) = operands(self.name(), s1, l1, s2, l2, &self.targets)?;
            let teacher_mats = match &teacher {
                Some((_, hl, _, wl, mix)) => {
                    let (th, tw) = operands(self.name(), th, hl, tw, wl, &self.targets)?;
                    if tw.rows != w.rows {
                        bail!(
                            "the teacher's vocabulary of {} is not the student's {}",
                            tw.rows,
                            w.rows
                        );
                    }
                    Some((th, tw, *mix))
                }
                None => None,
            };
            let (rows, grads) = pass::<T>(h, w, &self.targets, wanted, teacher_mats)?;
            if wanted.is_some() {
                let rows = grads.len() / h.cols.max(1);
                let grads = Tensor::from_vec(grads, (rows, h.cols), &Device::Cpu)?;
                // candle runs an op's forward once; a second run would find the same values.
                let _ = self.grads.set(grads);
            }
            // Summed in row order in f64: the same bits whatever the thread count.
            let (ce, kl) = rows
                .iter()
                .fold((0f64, 0f64), |(a, b), (ce, kl)| (a + ce, b + kl));
            let total = match &self.teacher {
                None => ce,
                Some(t) => {
                    let (alpha, tt) = (t.mix.alpha, t.mix.temperature);
                    rows.iter()
                        .map(|(ce, kl)| alpha * ce + (1.0 - alpha) * tt * tt * kl)
                        .sum()
                }
            };
            let _ = self.parts.set(Parts {
                ce: ce * self.scale,
                kl: kl * self.scale,
            });
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
            let rows = pass::<T>(h, w, self.targets, None, None)?.0;
            rows.into_iter().map(|(nll, _)| nll).collect::<Vec<f64>>()
        });
        let n = nll.len();
        Ok((CpuStorage::F64(nll), Shape::from(n)))
    }
}
