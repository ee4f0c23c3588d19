//! x @ w^T for a frozen w. candle's matmul backward forms the gradient of both operands whether
//! or not they track one, so a frozen matrix in a trained pass (a LoRA base, the blocks that
//! `--train core` leaves out) costs its full-size dW product and memory on every backward. This
//! op forms dx alone. Its forward is the same `gemm` product candle's matmul runs, on the same
//! strides, so it gives the same values.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::{matmul, storage, with_float, Float, Mat};

/// x (n, in) @ w^T for w (out, in) that takes no gradient: (n, out), differentiable in x only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.apply_op2(w, FrozenLinear)
}

struct FrozenLinear;

/// x (n, in) @ w^T for w (out, in): (n, out) row-major.
fn product<T: Float>(x: Mat<T>, w: Mat<T>) -> candle_core::Result<Vec<T>> {
    if x.cols != w.cols {
        bail!(
            "frozen_linear: rows of {} for a matrix of width {}",
            x.cols,
            w.cols
        );
    }
    let mut y = vec![T::zero(); x.rows * w.rows];
    // (n, in) @ (in, out) -> (n, out)
    matmul(&mut y, x, w.t(), false)?;
    Ok(y)
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen_linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, out) = (l1.dims()[0], l2.dims()[0]);
        let values = with_float!(self.name(), s1, [s1, s2], |T| {
            storage(product::<T>(
                Mat::of_layout(s1, l1)?,
                Mat::of_layout(s2, l2)?,
            )?)
        });
        Ok((values, Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // (n, out) @ (out, in) -> (n, in)
        Ok((Some(grad.matmul(w)?), None))
    }
}
