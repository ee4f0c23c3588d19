//! Rotary embeddings (rotate-half, as `rope::apply`) fused with the split into heads: the q or k
//! columns of the fused projection (B, T, H * D) become rotated heads (B, H, T, D), contiguous, as
//! attention takes them, in one pass. The backward is the rotation by the opposite angle, written
//! back into the (B, T, H * D) layout. cos and sin are constants of the positions (no gradient).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, row_starts, storage, with_float, Float};

/// x (B, T, heads * D), rows possibly strided (a slice of the fused projection), and cos, sin
/// (B, 1, T, D) from `Rope::cos_sin` -> (B, heads, T, D): x * cos + rotate_half(x) * sin per head.
pub fn rope_heads(
    x: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeHeads { heads })
}

struct RopeHeads {
    heads: usize,
}

/// (B, T, H, D) of a pass: x (B, T, H * D) against tables (B, 1, T, D).
fn dims(name: &str, x: &Layout, table: &Layout, heads: usize) -> candle_core::Result<[usize; 4]> {
    let (b, t, width) = x.shape().dims3()?;
    let (tb, one, tt, d) = table.shape().dims4()?;
    if heads == 0 || width != heads * d || (tb, one, tt) != (b, 1, t) || d % 2 != 0 {
        bail!(
            "{name}: x {:?} does not split into {heads} heads of the even size of cos/sin {:?}",
            x.shape(),
            table.shape()
        );
    }
    Ok([b, t, heads, d])
}

impl CustomOp3 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope_heads"
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
        let [b, t, h, d] = dims(self.name(), l1, l2, self.heads)?;
        if l3.shape() != l2.shape() {
            bail!("{}: cos and sin differ in shape", self.name());
        }
        let starts = row_starts(l1, self.name())?;
        let values = with_float!(self.name(), s1, [s1, s2, s3], |T| {
            let cos = contiguous(s2, l2, self.name())?;
            let sin = contiguous(s3, l3, self.name())?;
            storage(forward::<T>(s1, &starts, cos, sin, [b, t, h, d]))
        });
        Ok((values, Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if cos.track_op() || sin.track_op() {
            // candle would stop on a tracked input left without a gradient; say why instead.
            bail!(
                "{}: cos and sin are constants, with no gradient",
                self.name()
            );
        }
        let dx = grad
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &RopeHeadsBackward)?;
        Ok((Some(dx), None, None))
    }
}

/// One head-row: out = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1].
fn rotate<T: Float>(out: &mut [T], x: &[T], cos: &[T], sin: &[T]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (x1, x2) = (x[i], x[i + half]);
        out[i] = x1 * cos[i] - x2 * sin[i];
        out[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
}

/// (B, H, T, D), one (batch, head) plane per task.
fn forward<T: Float>(
    x: &[T],
    starts: &[usize],
    cos: &[T],
    sin: &[T],
    [_, t, h, d]: [usize; 4],
) -> Vec<T> {
    let mut y = vec![T::zero(); starts.len() * h * d];
    if y.is_empty() {
        return y;
    }
    y.par_chunks_mut(t * d)
        .enumerate()
        .for_each(|(plane, out)| {
            let (bi, hi) = (plane / h, plane % h);
            for (ti, out) in out.chunks_mut(d).enumerate() {
                let row = bi * t + ti;
                let start = starts[row] + hi * d;
                let table = row * d..(row + 1) * d;
                rotate(out, &x[start..start + d], &cos[table.clone()], &sin[table]);
            }
        });
    y
}

/// (dy (B, H, T, D) contiguous, cos, sin) -> dx (B, T, H * D): the transpose of the rotation,
/// which is the rotation by the opposite angle: dx1 = dy1 cos1 + dy2 sin2, dx2 = dy2 cos2 - dy1 sin1.
struct RopeHeadsBackward;

impl CustomOp3 for RopeHeadsBackward {
    fn name(&self) -> &'static str {
        "rope_heads_backward"
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
        let (b, h, t, d) = l1.shape().dims4()?;
        if l2.shape().dims() != [b, 1, t, d] || l3.shape() != l2.shape() {
            bail!(
                "{}: a gradient {:?} for cos/sin {:?}",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let values = with_float!(self.name(), s1, [s1, s2, s3], |T| {
            let dy = contiguous(s1, l1, self.name())?;
            let cos = contiguous(s2, l2, self.name())?;
            let sin = contiguous(s3, l3, self.name())?;
            storage(backward::<T>(dy, cos, sin, [b, t, h, d]))
        });
        Ok((values, Shape::from((b, t, h * d))))
    }
}

/// dx (B, T, H * D), one (batch, position) row per task.
fn backward<T: Float>(dy: &[T], cos: &[T], sin: &[T], [_, t, h, d]: [usize; 4]) -> Vec<T> {
    let mut dx = vec![T::zero(); dy.len()];
    if dx.is_empty() {
        return dx;
    }
    let half = d / 2;
    dx.par_chunks_mut(h * d).enumerate().for_each(|(row, out)| {
        let (bi, ti) = (row / t, row % t);
        let (c, s) = (&cos[row * d..(row + 1) * d], &sin[row * d..(row + 1) * d]);
        for (hi, out) in out.chunks_mut(d).enumerate() {
            let start = ((bi * h + hi) * t + ti) * d;
            let g = &dy[start..start + d];
            for i in 0..half {
                let (g1, g2) = (g[i], g[i + half]);
                out[i] = g1 * c[i] + g2 * s[i + half];
                out[i + half] = g2 * c[i + half] - g1 * s[i];
            }
        }
    });
    dx
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn a_quarter_turn_maps_each_pair_onto_its_partner() {
        // One head of D = 4: angle pi/2 in both pairs, so [x1, x2] -> [-x2, x1].
        let x = Tensor::new(&[[[1.0f32, 2.0, 3.0, 4.0]]], &Device::Cpu).unwrap();
        let cos = Tensor::zeros((1, 1, 1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let sin = Tensor::ones((1, 1, 1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = rope_heads(&x, 1, &cos, &sin).unwrap();
        assert_eq!(y.dims(), &[1, 1, 1, 4]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![-3.0, -4.0, 1.0, 2.0]
        );
    }

    #[test]
    fn heads_that_do_not_divide_the_width_are_refused() {
        let x = Tensor::zeros((1, 2, 10), candle_core::DType::F32, &Device::Cpu).unwrap();
        let cos = Tensor::zeros((1, 1, 2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = rope_heads(&x, 3, &cos, &cos).unwrap_err();
        assert!(
            err.to_string()
                .contains("rope_heads: x [1, 2, 10] does not split into 3 heads"),
            "{err}"
        );
    }
}
