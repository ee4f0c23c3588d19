//! RMSNorm with its gain as one op: y = x / sqrt(mean(x^2) + eps) * w over the last axis, one
//! pass per row. The backward is one pass too, giving dx and the gain's gradient dw summed over
//! rows (the composed reference is `block::rms_norm`: five ops and their saved temporaries).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, row_starts, storage, with_float, Float, ROWS_PER_TASK};

/// x (.., n) and w (n) -> (.., n): x / sqrt(mean(x^2) + eps) * w. `x`'s rows may be strided
/// (q and k sliced from the fused projection); the result is contiguous.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

/// 1 / sqrt(mean(row^2) + eps), summed in f64 (the backward's).
fn inverse_rms<T: Float>(row: &[T], eps: f64) -> f64 {
    let squares: f64 = row.iter().map(|&v| v.to_f64() * v.to_f64()).sum();
    1.0 / (squares / row.len() as f64 + eps).sqrt()
}

/// The gain as a slice of `n` values.
fn gain<'a, T>(w: &'a [T], layout: &Layout, n: usize, op: &str) -> candle_core::Result<&'a [T]> {
    let w = contiguous(w, layout, op)?;
    if w.len() != n {
        bail!("{op}: a gain of {} values for rows of {n}", w.len());
    }
    Ok(w)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms_norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l1.shape().dims().last().copied().unwrap_or(1);
        let starts = row_starts(l1, self.name())?;
        let values = with_float!(self.name(), s1, [s1, s2], |T| {
            let w = gain(s2, l2, n, self.name())?;
            storage(forward::<T>(s1, &starts, w, self.eps))
        });
        Ok((values, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // (rows + 1, n): the rows of dx, then dw.
        let both = x.apply_op3_no_bwd(w, &grad, &RmsNormBackward { eps: self.eps })?;
        let rows = both.dim(0)? - 1;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = if w.track_op() {
            Some(both.narrow(0, rows, 1)?.reshape(w.shape())?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// (x (.., n), w (n), dy (.., n) contiguous) -> (rows + 1, n): dx row by row, then dw.
/// With r = 1 / rms(x) and x^ = x r: dx = r (dy w - x^ mean(dy w x^)), dw = sum over rows of dy x^.
struct RmsNormBackward {
    eps: f64,
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms_norm_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l1.shape().dims().last().copied().unwrap_or(1);
        let starts = row_starts(l1, self.name())?;
        let rows = starts.len();
        if l3.shape() != l1.shape() {
            bail!(
                "{}: a gradient of shape {:?} for x of shape {:?}",
                self.name(),
                l3.shape(),
                l1.shape()
            );
        }
        let values = with_float!(self.name(), s1, [s1, s2, s3], |T| {
            let w = gain(s2, l2, n, self.name())?;
            let dy = contiguous(s3, l3, self.name())?;
            storage(backward::<T>(s1, &starts, w, dy, self.eps))
        });
        Ok((values, Shape::from((rows + 1, n))))
    }
}

/// The rows of x (at `starts`, `w.len()` values each) normalized and scaled: (rows, n).
fn forward<T: Float>(x: &[T], starts: &[usize], w: &[T], eps: f64) -> Vec<T> {
    let n = w.len();
    let mut y = vec![T::zero(); starts.len() * n];
    if n == 0 {
        return y;
    }
    let (inv_n, eps) = (T::from_f64(1.0 / n as f64), T::from_f64(eps));
    y.par_chunks_mut(n).zip(starts).for_each(|(out, &start)| {
        let x = &x[start..start + n];
        // In the input's type, in the composed op's order (sum, times 1/n, plus eps, sqrt,
        // divide, scale): thirty layers of the same rounding keep a deep model's logits where
        // the composed op and candle-transformers' put them (tests/model.rs bounds the gap).
        let squares = x.iter().fold(T::zero(), |s, &v| s + v * v);
        let rms = (squares * inv_n + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
            *o = v / rms * g;
        }
    });
    y
}

/// dx (rows, n) and dw (n) in one buffer of rows + 1 rows.
fn backward<T: Float>(x: &[T], starts: &[usize], w: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let (n, rows) = (w.len(), starts.len());
    let mut out = vec![T::zero(); (rows + 1) * n];
    if n == 0 {
        return out;
    }
    let (dx, dw) = out.split_at_mut(rows * n);
    // Each task's rows add into its own dw partial; the partials are summed in task order, so
    // dw does not depend on the thread count.
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .map(|(task, block)| {
            let mut partial = vec![0f64; n];
            for (i, dx_row) in block.chunks_mut(n).enumerate() {
                let row = task * ROWS_PER_TASK + i;
                let x = &x[starts[row]..starts[row] + n];
                let g = &dy[row * n..(row + 1) * n];
                let r = inverse_rms(x, eps);
                // mean(dy w x^)
                let mean = g
                    .iter()
                    .zip(w)
                    .zip(x)
                    .map(|((&g, &w), &x)| g.to_f64() * w.to_f64() * x.to_f64() * r)
                    .sum::<f64>()
                    / n as f64;
                let terms = x.iter().zip(g).zip(w).zip(partial.iter_mut());
                for (dx, (((&x, &g), &w), p)) in dx_row.iter_mut().zip(terms) {
                    let (xh, g) = (x.to_f64() * r, g.to_f64());
                    *dx = T::from_f64(r * (g * w.to_f64() - xh * mean));
                    *p += g * xh;
                }
            }
            partial
        })
        .collect();
    let mut sum = vec![0f64; n];
    for partial in &partials {
        for (s, p) in sum.iter_mut().zip(partial) {
            *s += p;
        }
    }
    for (d, s) in dw.iter_mut().zip(sum) {
        *d = T::from_f64(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn a_row_of_equal_values_becomes_the_gain() {
        // mean(x^2) = 4, eps 0: every x / 2 = 1, times the gain.
        let x = Tensor::new(&[[2.0f32, -2.0, 2.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let y = rms_norm(&x, &w, 0.0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![1.0, -2.0, 3.0]]);
    }

    #[test]
    fn other_dtypes_are_refused_by_name() {
        let x = Tensor::zeros((2, 3), DType::BF16, &Device::Cpu).unwrap();
        let w = Tensor::zeros(3, DType::BF16, &Device::Cpu).unwrap();
        let err = rms_norm(&x, &w, 1e-5).unwrap_err();
        assert!(
            err.to_string()
                .contains("rms_norm runs in f32 or f64, not BF16"),
            "{err}"
        );
    }
}
