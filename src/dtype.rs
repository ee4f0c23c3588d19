//! Element types of tensors in every format we read or write: the float types of safetensors and
//! the block-quantized types of GGUF (ggml), with their sizes.

use std::fmt;

/// A tensor element type. Quantized types store `block_size` elements in `type_size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    /// Read only (dequantized at load); `export gguf` does not write it.
    Q2K,
    /// Read only (dequantized at load); `export gguf` does not write it.
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl DType {
    pub const ALL: [DType; 13] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2K,
        DType::Q3K,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];

    /// `config.json`'s `torch_dtype` for weights stored in this type: bfloat16, float16, or
    /// float32 for every other (f32, and quantized weights, which load as f32).
    pub(crate) fn torch_name(self) -> &'static str {
        match self {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }
    }

    /// The name used in safetensors headers, GGUF tooling and our plan files.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q2K => "Q2_K",
            DType::Q3K => "Q3_K",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(name))
    }

    /// ggml's type id (ggml.h `enum ggml_type`).
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q2K => 10,
            DType::Q3K => 11,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::BF16 => 30,
        }
    }

    pub(crate) fn from_ggml_id(id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.ggml_id() == id)
    }

    /// Elements per block (1 for plain float types).
    pub(crate) fn block_size(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => 256,
        }
    }

    /// Bytes per block (ggml's `type_size`).
    pub fn type_size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            // ggml-common.h: scales[16], qs[64], d, dmin.
            DType::Q2K => 84,
            // hmask[32], qs[64], scales[12], d.
            DType::Q3K => 110,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes taken by `n_elements` elements, or None when `n_elements` is not a whole number of
    /// blocks or the size overflows.
    pub fn size_of(self, n_elements: u64) -> Option<u64> {
        let block = self.block_size() as u64;
        if !n_elements.is_multiple_of(block) {
            return None;
        }
        (n_elements / block).checked_mul(self.type_size() as u64)
    }
}

impl DType {
    /// Little-endian bytes of `values` in this float dtype (rounded to nearest even); None for a
    /// quantized type, whose encoding is GGUF's business.
    pub fn encode_f32(self, values: &[f32]) -> Option<Vec<u8>> {
        use half::{bf16, f16};
        match self {
            DType::F32 => Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F16 => Some(
                values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => Some(
                values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::from_ggml_id(d.ggml_id()), Some(d));
        }
        assert_eq!(DType::from_ggml_id(15), None); // Q8_K: no file type (ggml cannot dequantize it)
        assert_eq!(DType::from_ggml_id(9), None); // Q8_1: likewise
    }

    #[test]
    fn sizes_follow_ggml() {
        assert_eq!(DType::Q4_1.size_of(64), Some(40));
        assert_eq!(DType::Q6K.size_of(512), Some(420));
        assert_eq!(DType::Q2K.size_of(512), Some(168));
        assert_eq!(DType::Q3K.size_of(256), Some(110));
        assert_eq!(DType::Q8_0.size_of(33), None);
        assert_eq!(DType::F32.size_of(u64::MAX), None);
    }
}
