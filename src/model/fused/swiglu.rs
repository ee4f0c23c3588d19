//! SwiGLU on the fused gate/up projection as one op: (.., 2f) [gate | up] -> silu(gate) * up
//! (.., f), and its backward straight into the fused (.., 2f) gradient (the composed reference in
//! `block.rs` keeps the sigmoid, the silu and both halves for candle's backward).

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, row_starts, storage, with_float, Float, ROWS_PER_TASK};

/// gu (.., 2f) -> (.., f): silu(gu[.., :f]) * gu[.., f:].
pub fn swiglu(gu: &Tensor) -> candle_core::Result<Tensor> {
    gu.apply_op1(SwiGlu)
}

struct SwiGlu;

/// The width f of the halves of a (.., 2f) layout.
fn half(name: &str, layout: &Layout) -> candle_core::Result<usize> {
    let width = layout.shape().dims().last().copied().unwrap_or(0);
    if width % 2 != 0 {
        bail!("{name}: the last axis ({width}) is not [gate | up] of equal halves");
    }
    Ok(width / 2)
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let f = half(self.name(), l1)?;
        let starts = row_starts(l1, self.name())?;
        let values = with_float!(self.name(), s1, [s1], |T| {
            storage(forward::<T>(s1, &starts, f))
        });
        let mut dims = l1.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = f;
        }
        Ok((values, Shape::from(dims)))
    }

    fn bwd(&self, gu: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            gu.apply_op2_no_bwd(&grad.contiguous()?, &SwiGluBackward)?,
        ))
    }
}

/// x / (1 + exp(-x)), as the composed `silu` computes it.
fn silu<T: Float>(x: T) -> T {
    x / ((-x).exp() + T::one())
}

/// (rows, f), a block of rows per task.
fn forward<T: Float>(gu: &[T], starts: &[usize], f: usize) -> Vec<T> {
    let mut y = vec![T::zero(); starts.len() * f];
    if f == 0 {
        return y;
    }
    y.par_chunks_mut(ROWS_PER_TASK * f)
        .zip(starts.par_chunks(ROWS_PER_TASK))
        .for_each(|(block, starts)| {
            for (out, &start) in block.chunks_mut(f).zip(starts) {
                let (gate, up) = gu[start..start + 2 * f].split_at(f);
                for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                    *o = silu(g) * u;
                }
            }
        });
    y
}

/// (gu (.., 2f), dy (.., f) contiguous) -> (.., 2f): with s = sigmoid(gate),
/// d gate = dy up s (1 + gate (1 - s)), d up = dy silu(gate).
struct SwiGluBackward;

impl CustomOp2 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu_backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let f = half(self.name(), l1)?;
        let starts = row_starts(l1, self.name())?;
        if l2.shape().elem_count() != starts.len() * f {
            bail!(
                "{}: a gradient {:?} for [gate | up] {:?}",
                self.name(),
                l2.shape(),
                l1.shape()
            );
        }
        let values = with_float!(self.name(), s1, [s1, s2], |T| {
            let dy = contiguous(s2, l2, self.name())?;
            storage(backward::<T>(s1, &starts, dy, f))
        });
        Ok((values, l1.shape().clone()))
    }
}

/// (rows, 2f), a block of rows per task, in the input's type (as candle's own backward).
fn backward<T: Float>(gu: &[T], starts: &[usize], dy: &[T], f: usize) -> Vec<T> {
    let mut dgu = vec![T::zero(); starts.len() * 2 * f];
    if f == 0 {
        return dgu;
    }
    dgu.par_chunks_mut(ROWS_PER_TASK * 2 * f)
        .enumerate()
        .for_each(|(task, block)| {
            for (i, out) in block.chunks_mut(2 * f).enumerate() {
                let row = task * ROWS_PER_TASK + i;
                let (gate, up) = gu[starts[row]..starts[row] + 2 * f].split_at(f);
                let dy = &dy[row * f..(row + 1) * f];
                let (dgate, dup) = out.split_at_mut(f);
                let one = T::one();
                let terms = gate.iter().zip(up).zip(dy);
                for ((dg, du), ((&g, &u), &d)) in dgate.iter_mut().zip(dup).zip(terms) {
                    let s = one / (one + (-g).exp());
                    *dg = d * u * s * (one + g * (one - s));
                    *du = d * g * s;
                }
            }
        });
    dgu
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn zero_gate_gives_zero_and_a_large_gate_passes_up_through() {
        // silu(0) = 0; silu(30) = 30 to f32 precision.
        let gu = Tensor::new(&[[0.0f32, 30.0, 5.0, 2.0]], &Device::Cpu).unwrap();
        let y = swiglu(&gu).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![0.0, 60.0]]);
    }

    #[test]
    fn an_odd_width_is_refused() {
        let gu = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = swiglu(&gu).unwrap_err();
        assert!(
            err.to_string()
                .contains("swiglu: the last axis (5) is not [gate | up] of equal halves"),
            "{err}"
        );
    }
}
