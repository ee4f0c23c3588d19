//! Fused CPU ops with hand-written backward passes (DESIGN decision 12): the hot paths of the
//! forward pass (RMSNorm, RoPE, attention, SwiGLU, lm_head with cross-entropy) as candle custom
//! ops, multi-threaded over rows, f32 (and f64, for finite-difference checks) with f32 or wider
//! accumulation. The composed differentiable ops in `block.rs` and `rope.rs` stay as the
//! reference: every fused op is proved equal to them, and they remain the path on other devices.
//!
//! This file holds what the ops share: the kernel switch, the float types they run in, the row
//! walk over a strided layout, and a bounds-checked matrix product on slices (the `gemm` crate
//! candle itself multiplies with).

pub mod linear;
pub mod norm;
pub mod rope;
pub mod swiglu;
pub mod xent;

use candle_core::{bail, CpuStorage, DType, Layout, Tensor, WithDType};

pub mod attention;

crate::named::named! {
    /// Which implementation of the hot ops a pass uses.
    #[derive(Default)]
    pub enum Kernels {
        /// The fused ops where they apply (CPU, f32 or f64); the composed ops elsewhere.
        [default]
        Fused = "fused",
        /// The composed differentiable candle ops: the reference the fused ones are proved
        /// against.
        Composed = "composed",
    }
}

impl Kernels {
    /// Whether the fused ops serve `x`: fused kernels chosen, `x` on the CPU, in f32 or f64.
    /// Everything else (CUDA, other dtypes) takes the composed ops.
    pub(crate) fn fused_for(self, x: &Tensor) -> bool {
        self.fused_on(x.device(), x.dtype())
    }

    /// Whether the fused ops serve tensors on `device` in `dtype`.
    pub(crate) fn fused_on(self, device: &candle_core::Device, dtype: DType) -> bool {
        self == Kernels::Fused && device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
    }
}

/// The float types the fused ops run in: f32, and f64 for finite-difference checks.
pub(crate) trait Float:
    WithDType + Copy + Send + Sync + std::ops::Neg<Output = Self>
{
    const NEG_INFINITY: Self;
    fn exp(self) -> Self;
    /// e^x for the x <= 0 of a softmax (a score less the row's max), in straight-line arithmetic
    /// that a loop over a slice vectorizes: [`exp_nonpositive`] for f32, `exp` for f64.
    fn softmax_exp(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Float for f32 {
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    #[inline(always)]
    fn softmax_exp(self) -> f32 {
        exp_nonpositive(self)
    }
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
}

impl Float for f64 {
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn softmax_exp(self) -> f64 {
        f64::exp(self)
    }
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
}

/// e^x for x <= 0, within 2 ulp of `f32::exp` (tested), with no call and no branch, so that
/// loops of it vectorize (libm's `expf` is a call per element: 6% of an eval window's time).
/// x = n ln 2 + r with n = round(x / ln 2) and |r| <= ln 2 / 2 (ln 2 split in two parts, the
/// first exact in n times it, after Cody and Waite); e^r by its Taylor series to r^7 (remainder
/// below 6e-9 relative); 2^n put into the exponent bits. Below -87 (where e^x is subnormal)
/// the result is 0, so -inf gives exactly 0; NaN stays NaN. Positive x is outside its contract:
/// it is correct up to about 88, then wrong.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOWEST: f32 = -87.0;
    // ln 2 = LN2_HI + LN2_LO; LN2_HI = 355 / 512, so n * LN2_HI is exact for |n| < 2^15.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Rounds to nearest when added and taken away (no `floor`: without SSE4.1 that is a call per
    // element too).
    const ROUND: f32 = 12_582_912.0;
    // A select, not `max`: NaN must not become LOWEST.
    let xc = if x < LOWEST { LOWEST } else { x };
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n is in -125..=128 here (NaN casts to 0): 2^n as the exponent field n + 127.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < LOWEST {
        0.0
    } else {
        poly * scale
    }
}

/// Whether this CPU runs the kernels' AVX2 builds: x86-64 with AVX2 and FMA, detected at run time
/// (the machines change between CPUs with and without them; the build targets the baseline).
/// An AVX2 build performs the same operations in the same order as the baseline's (Rust never
/// fuses a multiply and an add by itself), in twice the vector width: the same bits.
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `$body` with `$T` bound to the element type of the first storage (f32 or f64) and each
/// `$s` rebound to its slice of that type; another dtype is an error naming the op.
macro_rules! with_float {
    ($name:expr, $first:expr, [$($s:ident),+], |$T:ident| $body:expr) => {
        match $first {
            candle_core::CpuStorage::F32(_) => {
                type $T = f32;
                $(let $s = $s.as_slice::<$T>()?;)+
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $T = f64;
                $(let $s = $s.as_slice::<$T>()?;)+
                $body
            }
            other => candle_core::bail!("{} runs in f32 or f64, not {:?}", $name, candle_core::backend::BackendStorage::dtype(other)),
        }
    };
}
pub(crate) use with_float;

/// The storage of `values` in their type.
pub(crate) fn storage<T: Float>(values: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(values)
}

/// The start offset of every row (the last axis) of `layout`, in row-major order. Each row must
/// be contiguous (last stride 1); the rows themselves may be strided, as in a slice of a fused
/// projection's columns.
pub(crate) fn row_starts(layout: &Layout, op: &str) -> candle_core::Result<Vec<usize>> {
    let dims = layout.dims();
    let stride = layout.stride();
    let Some((&n, lead)) = dims.split_last() else {
        bail!("{op} takes a tensor with at least one axis");
    };
    if n > 1 && stride.last() != Some(&1) {
        bail!("{op} takes rows with unit stride");
    }
    let rows: usize = lead.iter().product();
    let mut starts = Vec::with_capacity(rows);
    let mut index = vec![0usize; lead.len()];
    for _ in 0..rows {
        let offset: usize = index.iter().zip(stride).map(|(i, s)| i * s).sum();
        starts.push(layout.start_offset() + offset);
        // The next row: an odometer over the leading axes, last axis fastest.
        for axis in (0..lead.len()).rev() {
            index[axis] += 1;
            if index[axis] < lead[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Ok(starts)
}

/// The contiguous values of `layout` in `data`, or an error naming `op`.
pub(crate) fn contiguous<'a, T>(
    data: &'a [T],
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op} takes a contiguous tensor"),
    }
}

/// A matrix inside a slice: element (i, j) at `offset + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major (rows, cols) matrix at the start of `data`.
    pub(crate) fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            offset: 0,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The 2-D tensor of `layout` over `data`, any strides.
    pub(crate) fn of_layout(data: &'a [T], layout: &Layout) -> candle_core::Result<Self> {
        let (rows, cols) = layout.shape().dims2()?;
        let &[row_stride, col_stride] = layout.stride() else {
            bail!("a matrix has two strides");
        };
        Ok(Mat {
            data,
            offset: layout.start_offset(),
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// Rows `start..start + n`.
    pub(crate) fn narrow_rows(self, start: usize, n: usize) -> Self {
        Mat {
            offset: self.offset + start * self.row_stride,
            rows: n,
            ..self
        }
    }

    /// The transpose: a view, nothing moves.
    pub fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return self.offset <= self.data.len();
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .and_then(|r| Some(r + (self.cols - 1).checked_mul(self.col_stride)?))
            .and_then(|o| o.checked_add(self.offset));
        last.is_some_and(|l| l < self.data.len())
    }
}

/// dst (m, n) row-major = a (m, k) @ b (k, n), or `+=` with `accumulate`: the `gemm` crate's
/// kernels (the ones candle's own matmul calls), on candle's thread pool. The split of the work
/// over threads never splits the k sum, so the result does not depend on the thread count.
pub(crate) fn matmul<T: Float>(
    dst: &mut [T],
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
) -> candle_core::Result<()> {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_on(dst, a, b, accumulate, parallelism)
}

/// [`matmul`] on the calling thread alone: for small products inside a task that is itself one
/// of many running in parallel.
pub(crate) fn matmul_here<T: Float>(
    dst: &mut [T],
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
) -> candle_core::Result<()> {
    gemm_on(dst, a, b, accumulate, gemm::Parallelism::None)
}

fn gemm_on<T: Float>(
    dst: &mut [T],
    a: Mat<T>,
    b: Mat<T>,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) -> candle_core::Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || dst.len() != m * n || !a.in_bounds() || !b.in_bounds() {
        bail!(
            "matmul of ({m}, {k}) by ({}, {n}) into {} values: shapes or bounds disagree",
            b.rows,
            dst.len()
        );
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return Ok(());
    }
    // SAFETY: every element gemm reads lies inside `a.data` and `b.data` (checked by
    // `in_bounds` above) and every element it writes inside `dst` (m * n values, row-major,
    // checked above); `T` is f32 or f64, which gemm supports; `dst` is borrowed mutably, so it
    // aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr().add(b.offset),
            b.col_stride as isize,
            b.row_stride as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Lanes of a reduction: independent running values the compiler keeps in vector registers (it
/// may not reorder one float sum, or one chain of compares, by itself).
pub(crate) const LANES: usize = 8;

/// Rows per task when a pass over rows is split over threads: a fixed size, so sums formed per
/// task and reduced in order do not depend on the thread count.
pub(crate) const ROWS_PER_TASK: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpositive_is_within_2_ulp_of_libm_and_exact_at_the_ends() {
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let mut worst = 0;
        // Every 97th f32 bit pattern from -87 to -0.
        let (lo, hi) = ((-87.0f32).to_bits(), (-0.0f32).to_bits());
        for bits in (hi..=lo).step_by(97) {
            let x = f32::from_bits(bits);
            worst = worst.max(ulps(exp_nonpositive(x), x.exp()));
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-1e9), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn row_starts_walk_a_column_slice_of_a_fused_projection() {
        // (2, 3, 10) narrowed to columns 4..7 of the last axis.
        let t = Tensor::zeros((2, 3, 10), DType::F32, &candle_core::Device::Cpu)
            .and_then(|t| t.narrow(2, 4, 3))
            .unwrap();
        let starts = row_starts(t.layout(), "test").unwrap();
        assert_eq!(starts, vec![4, 14, 24, 34, 44, 54]);
    }

    #[test]
    fn row_starts_refuse_a_strided_last_axis() {
        let t = Tensor::zeros((3, 4), DType::F32, &candle_core::Device::Cpu)
            .and_then(|t| t.t())
            .unwrap();
        let err = row_starts(t.layout(), "rms_norm").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("rms_norm takes rows with unit stride"),
            "{err}"
        );
    }

    #[test]
    fn matmul_matches_a_hand_product_with_strides_and_accumulation() {
        // a (2, 3) row-major, b = c^T with c (2, 3): b (3, 2).
        let a = [1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0];
        let c = [1.0f64, 0.0, -1.0, 2.0, 1.0, 0.0];
        let mut dst = vec![10.0f64; 4];
        matmul(
            &mut dst,
            Mat::row_major(&a, 2, 3),
            Mat::row_major(&c, 2, 3).t(),
            true,
        )
        .unwrap();
        // rows of a dotted with rows of c: [1-3, 2+2] = [-2, 4]; [4-6, 8+5] = [-2, 13]
        assert_eq!(dst, vec![8.0, 14.0, 8.0, 23.0]);
        matmul(
            &mut dst,
            Mat::row_major(&a, 2, 3),
            Mat::row_major(&c, 2, 3).t(),
            false,
        )
        .unwrap();
        assert_eq!(dst, vec![-2.0, 4.0, -2.0, 13.0]);
    }

    #[test]
    fn matmul_refuses_a_view_past_its_slice() {
        let a = [1.0f32; 5];
        let mut dst = vec![0.0f32; 4];
        let err = matmul(
            &mut dst,
            Mat::row_major(&a, 2, 3),
            Mat::row_major(&a, 3, 2),
            false,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("shapes or bounds disagree"),
            "{err}"
        );
    }
}
