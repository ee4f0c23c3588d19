//! A weight matrix [out, in] as the model multiplies with it: f32 values, or the blocks of a
//! block-quantized GGUF tensor kept as stored.
//!
//! Quantized weights multiply by ggml's rule: each row of activations is rounded to the blocks'
//! dot type (Q8_0 for Q8_0 and Q4_0, Q8_K for the k-quants), then integer dot products are scaled
//! per block. A GGUF then computes what llama.cpp computes, in its own memory, instead of an f32
//! copy of itself.
//!
//! On the CPU, Q8_0 and Q4_0 run on our own kernels ([`super::qkernels`], issue 22: row-parallel,
//! AVX2 / AVX-512 VNNI chosen at run time, the same bits as ggml's x86 kernels); the k-quants on
//! candle's `k_quants::matmul` (ports of ggml's `vec_dot` kernels), called directly: candle's
//! `QMatMul` repacks Q8_0 weights on CPUs with VNNI and then rounds the activations in blocks of
//! 256 (Q8_K), which llama.cpp does not (on the unhealed SmolLM2 (4,8,4) cut that moved
//! perplexity by 1.3% at r = 1). On other devices it is candle's `QMatMul`.
//!
//! Only the types with SIMD kernels on ggml's rule are kept as stored (see [`kept_as_stored`]);
//! the others are dequantized at load.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor, QuantizedType};
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Module, Shape, Tensor, D};

use super::qkernels::{self, QMatrix, QkError};
use super::{block, Result};
use crate::dtype::DType;
use crate::formats::gguf;

/// Whether a model loaded with [`super::Weights::Stored`] keeps a tensor of this type as stored:
/// Q4_0, Q8_0 and the k-quants. Q4_1, Q5_0 and Q5_1 are dequantized instead: candle's kernels for
/// them are scalar (SmolLM2's Q4_1 ran 8.6 times slower than in f32), and for Q4_1/Q5_1 candle
/// rounds the Q8_1 block sum in f16 arithmetic where ggml rounds once.
pub fn kept_as_stored(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q4_0 | DType::Q8_0 | DType::Q4K | DType::Q5K | DType::Q6K
    )
}

pub enum Weight {
    /// f32 values (or f64 for gradient checks); trainable.
    Dense(Tensor),
    /// The stored tensors whose rows make up the matrix, in order (q, k, v for a fused
    /// projection; one tensor otherwise), each multiplied on its own.
    Quantized(Vec<Part>),
    /// A frozen base and a trainable low-rank update (`heal --lora`): base + scale B A.
    LowRank(Box<LowRank>),
}

/// W x + scale B (A x): LoRA (Hu et al. 2021) over any base weight, dense or block-quantized.
pub struct LowRank {
    pub base: Weight,
    /// (rank, in)
    pub a: Tensor,
    /// (out, rank); zeros at the start, so that the update is exactly 0 there.
    pub b: Tensor,
    pub scale: f64,
}

pub enum Part {
    Cpu(Arc<CpuBlocks>),
    Device(Arc<QTensor>),
}

/// Rows of blocks in CPU memory: `rows` x `cols` values.
pub struct CpuBlocks {
    kernel: CpuKernel,
    rows: usize,
    cols: usize,
}

/// Whose kernel multiplies a CPU matrix.
enum CpuKernel {
    /// Q8_0 and Q4_0: ours.
    Ours(QMatrix),
    /// The k-quants: candle's.
    Candle(Box<dyn QuantizedType>),
}

impl CpuKernel {
    /// The stored bytes of a `rows` x `cols` matrix of `dtype`, with the kernel that multiplies it.
    fn new(
        dtype: DType,
        bytes: &[u8],
        (rows, cols): (usize, usize),
    ) -> std::result::Result<CpuKernel, gguf::GgufError> {
        let kind = match dtype {
            DType::Q8_0 => qkernels::Kind::Q8_0,
            DType::Q4_0 => qkernels::Kind::Q4_0,
            _ => {
                return Ok(CpuKernel::Candle(gguf::cpu_blocks(
                    dtype,
                    bytes,
                    rows * cols,
                )?))
            }
        };
        let n_elements = rows.saturating_mul(cols);
        QMatrix::new(kind, bytes, rows, cols)
            .map(CpuKernel::Ours)
            .map_err(|e| match e {
                QkError::ByteLength {
                    expected, actual, ..
                } => gguf::GgufError::ByteLength {
                    dtype,
                    n_elements,
                    expected: expected as u64,
                    actual,
                },
                _ => gguf::GgufError::NotWholeBlocks {
                    dtype,
                    n_elements,
                    block: qkernels::BLOCK,
                },
            })
    }
}

impl CustomOp1 for CpuBlocks {
    fn name(&self) -> &'static str {
        "ggml-matmul"
    }

    /// (m, cols) f32 -> (m, rows) f32.
    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("a quantized matmul takes f32 activations");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("a quantized matmul takes contiguous activations");
        };
        if k != self.cols {
            candle_core::bail!(
                "activations of width {k} for a matrix of {} columns",
                self.cols
            );
        }
        let values = &values[start..end];
        let out = match &self.kernel {
            CpuKernel::Ours(q) => q
                .matmul_t(values, m)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            CpuKernel::Candle(blocks) => {
                let mut out = vec![0f32; m * self.rows];
                blocks.matmul_t((m, k, self.rows), values, &mut out)?;
                out
            }
        };
        Ok((CpuStorage::F32(out), Shape::from((m, self.rows))))
    }
}

impl Part {
    /// The stored bytes of a `rows` x `cols` block-quantized tensor, on `device`.
    pub fn new(
        dtype: DType,
        bytes: &[u8],
        (rows, cols): (usize, usize),
        device: &Device,
    ) -> std::result::Result<Part, gguf::GgufError> {
        Ok(if device.is_cpu() {
            Part::Cpu(Arc::new(CpuBlocks {
                kernel: CpuKernel::new(dtype, bytes, (rows, cols))?,
                rows,
                cols,
            }))
        } else {
            Part::Device(Arc::new(gguf::qtensor(
                dtype,
                bytes,
                &[rows, cols],
                device,
            )?))
        })
    }

    fn rows(&self) -> usize {
        match self {
            Part::Cpu(b) => b.rows,
            Part::Device(q) => q.shape().dims()[0],
        }
    }

    fn cols(&self) -> usize {
        match self {
            Part::Cpu(b) => b.cols,
            Part::Device(q) => q.shape().dims()[1],
        }
    }

    /// (m, cols) -> (m, rows)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Part::Cpu(blocks) => x.apply_op1_no_bwd(blocks.as_ref()),
            Part::Device(q) => QMatMul::QTensor(q.clone()).forward(x),
        }
    }

    fn dequantize(&self) -> candle_core::Result<Tensor> {
        match self {
            Part::Cpu(b) => {
                let values = match &b.kernel {
                    CpuKernel::Ours(q) => q.dequantize(),
                    CpuKernel::Candle(blocks) => {
                        let CpuStorage::F32(values) = blocks.dequantize(b.rows * b.cols)? else {
                            candle_core::bail!("block dequantization gave a non-f32 tensor");
                        };
                        values
                    }
                };
                Tensor::from_vec(values, (b.rows, b.cols), &Device::Cpu)
            }
            Part::Device(q) => q.dequantize(&q.device()),
        }
    }
}

impl Weight {
    /// x @ w^T: (..., in) -> (..., out).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(w) => block::linear(x, w),
            Weight::Quantized(parts) => block::on_rows(x, self.dim(0)?, |rows| {
                let rows = rows.contiguous()?;
                let outs = parts
                    .iter()
                    .map(|p| p.forward(&rows))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&outs, D::Minus1)
            }),
            Weight::LowRank(l) => {
                // (.., in) -> (.., rank) -> (.., out)
                let update = block::linear(&block::linear(x, &l.a)?, &l.b)?;
                l.base.forward(x)? + (update * l.scale)?
            }
        }
    }

    /// Rows (out, axis 0) or columns (in, axis 1) of the matrix.
    pub(crate) fn dim(&self, axis: usize) -> candle_core::Result<usize> {
        match self {
            Weight::Dense(w) => w.dim(axis),
            Weight::Quantized(parts) if axis == 0 => Ok(parts.iter().map(Part::rows).sum()),
            Weight::Quantized(parts) => Ok(parts.first().map_or(0, Part::cols)),
            Weight::LowRank(l) => l.base.dim(axis),
        }
    }

    /// The values, dequantizing a quantized weight in place first (to train or save it), and
    /// merging a low-rank update into its base (the merged values become the weight).
    pub fn dense(&mut self) -> Result<&mut Tensor> {
        match self {
            Weight::Dense(_) => {}
            Weight::Quantized(parts) => {
                let values = parts
                    .iter()
                    .map(Part::dequantize)
                    .collect::<candle_core::Result<Vec<_>>>()?;
                *self = Weight::Dense(Tensor::cat(&values, 0)?);
            }
            Weight::LowRank(l) => {
                // (out, rank) @ (rank, in) -> (out, in)
                let update = (l.b.matmul(&l.a)? * l.scale)?;
                let merged = (&*l.base.dense()? + update)?.detach();
                *self = Weight::Dense(merged);
            }
        }
        match self {
            Weight::Dense(w) => Ok(w),
            _ => unreachable!("made dense above"),
        }
    }
}
