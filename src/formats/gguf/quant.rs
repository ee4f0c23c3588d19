//! Conversions between f32 values and the bytes of every tensor type we support, and the Q/K row
//! permutation llama.cpp applies to attention weights.
//!
//! The float types are plain little-endian conversions (half crate; f32 -> bf16 rounds to nearest
//! even and keeps NaNs quiet, as ggml-impl.h `ggml_compute_fp32_to_bf16`). The block types use
//! candle's CPU kernels (candle-core `quantized::k_quants`), whose `to_float` are line-by-line
//! ports of ggml-quants.c `dequantize_row_*`; tests/gguf_reference.rs checks them bit for bit
//! against the Python `gguf` package. candle casts raw bytes to block structs, so every length
//! and alignment is checked here first.

use std::borrow::Cow;

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0,
};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};

use super::GgufError;
use crate::dtype::DType;

/// Decodes `n_elements` values of `dtype` from `bytes`, which must be exactly their size.
pub fn dequantize(dtype: DType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, GgufError> {
    check_byte_len(dtype, bytes.len(), n_elements)?;
    if n_elements == 0 {
        return Ok(Vec::new());
    }
    Ok(match dtype {
        DType::F32 => le_words(bytes).map(f32::from_le_bytes).collect(),
        DType::F16 => le_words(bytes).map(|b| f16::from_le_bytes(b).to_f32()).collect(),
        DType::BF16 => le_words(bytes).map(|b| bf16::from_le_bytes(b).to_f32()).collect(),
        _ => dequantize_blocks(dtype, bytes, n_elements)?,
    })
}

/// Encodes `values` as `dtype`. Block types need a whole number of blocks and finite values.
pub fn quantize(dtype: DType, values: &[f32]) -> Result<Vec<u8>, GgufError> {
    let block = dtype.block_size();
    if !values.len().is_multiple_of(block) {
        return Err(GgufError::NotWholeBlocks {
            dtype,
            n_elements: values.len(),
            block,
        });
    }
    match dtype {
        DType::F32 => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::F16 => Ok(values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect()),
        DType::BF16 => Ok(values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect()),
        _ => quantize_blocks(dtype, values),
    }
}

/// Reorders the rows of an HF `q_proj`/`k_proj` weight into llama.cpp's order, as
/// convert_hf_to_gguf.py `LlamaModel.permute` does:
/// `w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(w.shape)`.
/// GGUF row `h*hd + 2*j + t` holds HF row `h*hd + t*(hd/2) + j` (hd = `n_rows / n_heads`): HF
/// rotates the two halves of each head (rotate_half), ggml's rope rotates adjacent pairs.
///
/// Rows are whole blocks, so this works on any dtype's raw bytes. For K, `n_heads` is the number
/// of KV heads.
pub fn permute_rows_hf_to_gguf(
    bytes: &[u8],
    n_rows: usize,
    n_heads: usize,
) -> Result<Vec<u8>, GgufError> {
    let (row_bytes, half) = head_geometry(bytes.len(), n_rows, n_heads)?;
    let mut out = Vec::with_capacity(bytes.len());
    // Per head: (2, hd/2, row) -> (hd/2, 2, row), i.e. interleave the two halves.
    for head in bytes.chunks_exact(2 * half * row_bytes) {
        let (first, second) = head.split_at(half * row_bytes);
        for (a, b) in first
            .chunks_exact(row_bytes)
            .zip(second.chunks_exact(row_bytes))
        {
            out.extend_from_slice(a);
            out.extend_from_slice(b);
        }
    }
    Ok(out)
}

/// The inverse of [`permute_rows_hf_to_gguf`]: llama.cpp's row order back to HF's.
pub fn unpermute_rows_gguf_to_hf(
    bytes: &[u8],
    n_rows: usize,
    n_heads: usize,
) -> Result<Vec<u8>, GgufError> {
    let (row_bytes, _) = head_geometry(bytes.len(), n_rows, n_heads)?;
    let mut out = Vec::with_capacity(bytes.len());
    // Per head: (hd/2, 2, row) -> (2, hd/2, row): even rows first, then odd rows.
    for head in bytes.chunks_exact(bytes.len() / n_heads) {
        for parity in 0..2 {
            for pair in head.chunks_exact(2 * row_bytes) {
                let (even, odd) = pair.split_at(row_bytes);
                out.extend_from_slice(if parity == 0 { even } else { odd });
            }
        }
    }
    Ok(out)
}

/// Checks that `n_bytes` are `n_rows` non-empty rows splitting into `n_heads` heads of an even
/// number of rows; returns (bytes per row, rows per half head).
fn head_geometry(
    n_bytes: usize,
    n_rows: usize,
    n_heads: usize,
) -> Result<(usize, usize), GgufError> {
    let bad = |reason| GgufError::BadPermute {
        n_rows,
        n_heads,
        n_bytes,
        reason,
    };
    if n_rows == 0 || n_heads == 0 || n_bytes == 0 {
        return Err(bad("rows, heads and bytes must all be non-zero"));
    }
    if !n_bytes.is_multiple_of(n_rows) {
        return Err(bad("the bytes are not a whole number of rows"));
    }
    if !n_rows.is_multiple_of(n_heads) {
        return Err(bad("the rows do not split evenly into heads"));
    }
    let head_dim = n_rows / n_heads;
    if !head_dim.is_multiple_of(2) {
        return Err(bad("the head dimension is odd"));
    }
    Ok((n_bytes / n_rows, head_dim / 2))
}

fn check_byte_len(dtype: DType, actual: usize, n_elements: usize) -> Result<(), GgufError> {
    let block = dtype.block_size();
    if !n_elements.is_multiple_of(block) {
        return Err(GgufError::NotWholeBlocks {
            dtype,
            n_elements,
            block,
        });
    }
    let expected = dtype
        .size_of(n_elements as u64)
        .unwrap_or(u64::MAX);
    if expected != actual as u64 {
        return Err(GgufError::ByteLength {
            dtype,
            n_elements,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Little-endian words of `N` bytes; the caller checked that `bytes` holds whole words.
fn le_words<const N: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    bytes.as_chunks::<N>().0.iter().copied()
}

fn ggml_dtype(dtype: DType) -> GgmlDType {
    match dtype {
        DType::F32 => GgmlDType::F32,
        DType::F16 => GgmlDType::F16,
        DType::BF16 => GgmlDType::BF16,
        DType::Q4_0 => GgmlDType::Q4_0,
        DType::Q4_1 => GgmlDType::Q4_1,
        DType::Q5_0 => GgmlDType::Q5_0,
        DType::Q5_1 => GgmlDType::Q5_1,
        DType::Q8_0 => GgmlDType::Q8_0,
        DType::Q4K => GgmlDType::Q4K,
        DType::Q5K => GgmlDType::Q5K,
        DType::Q6K => GgmlDType::Q6K,
    }
}

/// The alignment of candle's block struct for `dtype` (2 for all of them today: f16 fields).
fn block_align(dtype: DType) -> usize {
    use std::mem::align_of;
    match dtype {
        DType::F32 => align_of::<f32>(),
        DType::F16 => align_of::<f16>(),
        DType::BF16 => align_of::<bf16>(),
        DType::Q4_0 => align_of::<BlockQ4_0>(),
        DType::Q4_1 => align_of::<BlockQ4_1>(),
        DType::Q5_0 => align_of::<BlockQ5_0>(),
        DType::Q5_1 => align_of::<BlockQ5_1>(),
        DType::Q8_0 => align_of::<BlockQ8_0>(),
        DType::Q4K => align_of::<BlockQ4K>(),
        DType::Q5K => align_of::<BlockQ5K>(),
        DType::Q6K => align_of::<BlockQ6K>(),
    }
}

/// `bytes`, or a copy of them in `scratch` when they are not aligned to `align`: candle
/// reinterprets them as `&[Block]` and asserts the alignment (quantized/mod.rs `as_t_slice`).
fn aligned<'a>(bytes: &'a [u8], align: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
    if (bytes.as_ptr() as usize).is_multiple_of(align) {
        return bytes;
    }
    // Over-allocate and copy to the first aligned address inside the buffer; `start < align`,
    // so the range is inside it.
    *scratch = vec![0u8; bytes.len() + align];
    let start = (align - (scratch.as_ptr() as usize) % align) % align;
    let copy = &mut scratch[start..start + bytes.len()];
    copy.copy_from_slice(bytes);
    copy
}

fn dequantize_blocks(
    dtype: DType,
    bytes: &[u8],
    n_elements: usize,
) -> Result<Vec<f32>, GgufError> {
    let mut scratch = Vec::new();
    let data = aligned(bytes, block_align(dtype), &mut scratch);
    let storage = QStorage::from_data(Cow::Borrowed(data), &Device::Cpu, ggml_dtype(dtype))?;
    let tensor = QTensor::new(storage, (n_elements,))?;
    Ok(tensor.dequantize(&Device::Cpu)?.to_vec1::<f32>()?)
}

fn quantize_blocks(dtype: DType, values: &[f32]) -> Result<Vec<u8>, GgufError> {
    // A NaN or infinity would poison the block's scale (and candle's k-quant search indexes
    // tables with values derived from it).
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(GgufError::NonFinite {
            dtype,
            index,
            value,
        });
    }
    if values.is_empty() {
        return Ok(Vec::new());
    }
    let tensor = Tensor::from_slice(values, values.len(), &Device::Cpu)?;
    let q = QTensor::quantize(&tensor, ggml_dtype(dtype))?;
    Ok(q.data()?.into_owned())
}
