//! Conversions between f32 values and the bytes of every tensor type we support, and the Q/K row
//! permutation llama.cpp applies to attention weights.
//!
//! The float types are plain little-endian conversions (half crate; f32 -> bf16 rounds to nearest
//! even and makes NaNs quiet, as ggml-impl.h `ggml_compute_fp32_to_bf16`; bf16 -> f32 is a
//! shift). The block types use
//! candle's CPU kernels (candle-core `quantized::k_quants`), whose `to_float` are line-by-line
//! ports of ggml-quants.c `dequantize_row_*`; tests/gguf_reference.rs checks them bit for bit
//! against the Python `gguf` package. candle casts raw bytes to block structs, so every length
//! and alignment is checked here first.

use std::borrow::Cow;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
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
        DType::F16 => le_words(bytes)
            .map(|b| f16::from_le_bytes(b).to_f32())
            .collect(),
        // ggml-impl.h `ggml_compute_bf16_to_fp32` is a plain shift; half's `to_f32` would set
        // the quiet bit of signalling NaNs.
        DType::BF16 => le_words(bytes)
            .map(|b| f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16))
            .collect(),
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
pub(crate) fn permute_rows_hf_to_gguf(
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
    let expected = dtype.size_of(n_elements as u64).unwrap_or(u64::MAX);
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
        DType::Q2K => GgmlDType::Q2K,
        DType::Q3K => GgmlDType::Q3K,
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
        DType::Q2K => align_of::<BlockQ2K>(),
        DType::Q3K => align_of::<BlockQ3K>(),
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

/// The blocks of a block-quantized tensor of row-major `shape`, as candle's quantized tensor on
/// `device`.
pub(crate) fn qtensor(
    dtype: DType,
    bytes: &[u8],
    shape: &[usize],
    device: &Device,
) -> Result<QTensor, GgufError> {
    let mut scratch = Vec::new();
    let data = checked_blocks(dtype, bytes, shape.iter().product(), &mut scratch)?;
    let storage = QStorage::from_data(Cow::Borrowed(data), device, ggml_dtype(dtype))?;
    Ok(QTensor::new(storage, shape)?)
}

/// The blocks of `n_elements` values of a block-quantized type, as candle's CPU block storage
/// (whose `matmul_t` is ggml's `vec_dot` rule).
pub(crate) fn cpu_blocks(
    dtype: DType,
    bytes: &[u8],
    n_elements: usize,
) -> Result<Box<dyn QuantizedType>, GgufError> {
    let mut scratch = Vec::new();
    let data = checked_blocks(dtype, bytes, n_elements, &mut scratch)?;
    Ok(ggml_dtype(dtype).from_data(Cow::Borrowed(data)))
}

/// `bytes`, checked to hold exactly `n_elements` values of `dtype`, aligned for candle's block
/// structs (copied into `scratch` when they are not).
fn checked_blocks<'a>(
    dtype: DType,
    bytes: &'a [u8],
    n_elements: usize,
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], GgufError> {
    check_byte_len(dtype, bytes.len(), n_elements)?;
    Ok(aligned(bytes, block_align(dtype), scratch))
}

fn dequantize_blocks(dtype: DType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, GgufError> {
    let tensor = qtensor(dtype, bytes, &[n_elements], &Device::Cpu)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A ramp over [-1, 1] with a few larger values, `n` long.
    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = 2.0 * i as f32 / (n - 1) as f32 - 1.0;
                if i % 97 == 0 {
                    4.0 * x
                } else {
                    x
                }
            })
            .collect()
    }

    #[test]
    fn quantize_then_dequantize_stays_close() {
        let values = ramp(1024);
        // Max error allowed, in units of the largest |value| (4.0): a few quantization steps.
        for (dtype, tol) in [
            (DType::F32, 0.0),
            (DType::F16, 1e-3),
            (DType::BF16, 1e-2),
            (DType::Q8_0, 1e-2),
            (DType::Q5_0, 4e-2),
            (DType::Q5_1, 4e-2),
            (DType::Q4_0, 8e-2),
            (DType::Q4_1, 8e-2),
            (DType::Q6K, 2e-2),
            (DType::Q5K, 4e-2),
            (DType::Q4K, 8e-2),
            (DType::Q3K, 0.2),
            (DType::Q2K, 0.4),
        ] {
            let bytes = quantize(dtype, &values).unwrap();
            assert_eq!(Some(bytes.len() as u64), dtype.size_of(1024), "{dtype}");
            let back = dequantize(dtype, &bytes, values.len()).unwrap();
            let max_err = values
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(max_err <= tol * 4.0, "{dtype}: max error {max_err}");
        }
    }

    #[test]
    fn float_types_are_little_endian() {
        assert_eq!(quantize(DType::F16, &[1.0]).unwrap(), vec![0x00, 0x3c]);
        assert_eq!(quantize(DType::BF16, &[1.0]).unwrap(), vec![0x80, 0x3f]);
        assert_eq!(
            dequantize(DType::BF16, &[0x80, 0xbf], 1).unwrap(),
            vec![-1.0]
        );
        assert_eq!(
            dequantize(DType::F32, &2.5f32.to_le_bytes(), 1).unwrap(),
            vec![2.5]
        );
    }

    #[test]
    fn misaligned_input_is_copied_not_rejected() {
        let bytes = quantize(DType::Q8_0, &ramp(64)).unwrap();
        let expected = dequantize(DType::Q8_0, &bytes, 64).unwrap();
        for shift in 0..2 {
            let mut buf = vec![0u8; shift];
            buf.extend_from_slice(&bytes);
            let got = dequantize(DType::Q8_0, &buf[shift..], 64).unwrap();
            assert_eq!(got, expected, "shift {shift}");
        }
    }

    #[test]
    fn aligned_copies_only_when_needed() {
        let bytes: Vec<u8> = (0..18).collect();
        let mut scratch = Vec::new();
        for start in 0..2 {
            let input = &bytes[start..start + 16];
            let out = aligned(input, 2, &mut scratch);
            assert_eq!(out, input);
            assert!((out.as_ptr() as usize).is_multiple_of(2));
            assert_eq!(
                out.as_ptr() == input.as_ptr(),
                (input.as_ptr() as usize).is_multiple_of(2)
            );
        }
    }

    #[test]
    fn dequantize_checks_lengths() {
        let msg = dequantize(DType::Q4_0, &[0; 17], 32)
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "Q4_0 data for 32 elements must be 18 bytes, got 17");
        let msg = dequantize(DType::Q4K, &[0; 144], 128)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "128 elements is not a whole number of Q4_K blocks of 256"
        );
        let msg = dequantize(DType::F16, &[0; 3], 1).unwrap_err().to_string();
        assert_eq!(msg, "F16 data for 1 elements must be 2 bytes, got 3");
        assert_eq!(dequantize(DType::Q6K, &[], 0).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn quantize_checks_its_input() {
        let msg = quantize(DType::Q8_0, &[0.0; 31]).unwrap_err().to_string();
        assert_eq!(
            msg,
            "31 elements is not a whole number of Q8_0 blocks of 32"
        );
        let mut values = vec![0.5; 32];
        values[3] = f32::NAN;
        let msg = quantize(DType::Q4_1, &values).unwrap_err().to_string();
        assert_eq!(msg, "cannot quantize to Q4_1: element 3 is NaN");
        // Float types store non-finite values as they are.
        assert_eq!(
            quantize(DType::F16, &[f32::INFINITY]).unwrap(),
            vec![0x00, 0x7c]
        );
    }

    #[test]
    fn permutation_matches_llama_cpp_on_a_tiny_example() {
        // 2 heads of head_dim 4, rows of 2 bytes: HF row r is [r, 100 + r].
        let hf: Vec<u8> = (0..8u8).flat_map(|r| [r, 100 + r]).collect();
        let gguf = permute_rows_hf_to_gguf(&hf, 8, 2).unwrap();
        // GGUF row h*4 + 2j + t holds HF row h*4 + 2t + j.
        let rows: Vec<u8> = gguf.chunks(2).map(|r| r[0]).collect();
        assert_eq!(rows, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(gguf[1], 100);
        assert_eq!(gguf[3], 102);
        assert_eq!(unpermute_rows_gguf_to_hf(&gguf, 8, 2).unwrap(), hf);
    }

    #[test]
    fn unpermute_inverts_permute_on_quantized_rows() {
        // 3 KV heads of head_dim 8, rows of 64 Q4_1 elements (two blocks).
        let bytes = quantize(DType::Q4_1, &ramp(24 * 64)).unwrap();
        let permuted = permute_rows_hf_to_gguf(&bytes, 24, 3).unwrap();
        assert_ne!(permuted, bytes);
        assert_eq!(unpermute_rows_gguf_to_hf(&permuted, 24, 3).unwrap(), bytes);
        let round =
            permute_rows_hf_to_gguf(&unpermute_rows_gguf_to_hf(&bytes, 24, 3).unwrap(), 24, 3);
        assert_eq!(round.unwrap(), bytes);
    }

    #[test]
    fn permutation_rejects_bad_geometry() {
        let msg = |r: Result<Vec<u8>, GgufError>| r.unwrap_err().to_string();
        assert!(
            msg(permute_rows_hf_to_gguf(&[0; 12], 6, 4)).contains("do not split evenly into heads")
        );
        assert!(msg(permute_rows_hf_to_gguf(&[0; 6], 6, 2)).contains("head dimension is odd"));
        assert!(
            msg(unpermute_rows_gguf_to_hf(&[0; 7], 4, 2)).contains("not a whole number of rows")
        );
        assert!(msg(unpermute_rows_gguf_to_hf(&[], 4, 2)).contains("must all be non-zero"));
        assert!(msg(permute_rows_hf_to_gguf(&[0; 4], 4, 0)).contains("must all be non-zero"));
    }
}
