//! `--type`: the tensor type of every exported tensor, chosen per tensor as llama.cpp's
//! llama-quantize chooses it (src/llama-quant.cpp `llama_tensor_get_type`), for the single types
//! and the mixes we support.
//!
//! The rules, in order:
//!
//! 1. 1-D tensors (norms, `rope_freqs`) are F32: ggml's norm and rope kernels read F32, and
//!    llama-quantize never quantizes them.
//! 2. A float type (`f32`, `f16`, `bf16`) is used for every other tensor.
//! 3. Otherwise the base type is the type named (`q8_0`, `q4_0`, ..., `q6_k`), or Q4_K for
//!    `q4_k_m` and Q5_K for `q5_k_m`. The mixes then raise some tensors to Q6_K as llama-quantize
//!    does: `output` (and `token_embd` when the output is tied to it), and `attn_v` and
//!    `ffn_down` of the blocks `use_more_bits` picks (the first and last eighth, and every third
//!    one between). `q6_k` is Q6_K everywhere.
//! 4. The recurrent adapter is Q8_0 under every block type: it is applied r times per token, so
//!    its error compounds with the recurrence (our rule; llama.cpp has no adapter).
//! 5. A row length that is not a multiple of the chosen type's block falls back as
//!    llama-quantize's `convert_incompatible_tensor` does: Q4_K -> Q5_0, Q5_K -> Q5_1,
//!    Q6_K -> Q8_0, and to F16 when the row is not a multiple of 32 either (SmolLM2's width 576
//!    is a multiple of 32, not of 256).

use std::fmt;
use std::str::FromStr;

use crate::dtype::DType;

/// A `--type`: one tensor type for all 2-D weights, or a llama-quantize mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// Every weight matrix of this type (the mixes `q8_0` and `q6_k` are this too).
    Single(DType),
    /// llama-quantize's Q4_K_M: Q4_K, with Q6_K where it matters most.
    Q4KM,
    /// llama-quantize's Q5_K_M: Q5_K, with Q6_K where it matters most.
    Q5KM,
}

/// The names `--type` accepts, in the order help lists them.
pub const TYPE_NAMES: &[&str] = &[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_k", "q4_k", "q5_1", "q5_0",
    "q4_1", "q4_0",
];

impl FromStr for QuantType {
    type Err = String;

    fn from_str(s: &str) -> Result<QuantType, String> {
        match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Ok(QuantType::Q4KM),
            "q5_k_m" => Ok(QuantType::Q5KM),
            // The read-only types (Q2_K, Q3_K) are not among them.
            other => DType::from_name(other)
                .filter(|_| TYPE_NAMES.contains(&other))
                .map(QuantType::Single)
                .ok_or_else(|| {
                    format!(
                        "unknown --type {s:?} (expected one of {})",
                        TYPE_NAMES.join(", ")
                    )
                }),
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantType::Single(d) => f.write_str(&d.name().to_ascii_lowercase()),
            QuantType::Q4KM => f.write_str("q4_k_m"),
            QuantType::Q5KM => f.write_str("q5_k_m"),
        }
    }
}

/// What a tensor is, as far as the choice of its type goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// Any 1-D tensor.
    Vector,
    /// `token_embd`; `tied` when no `output` is written and it serves as the output too.
    Embed {
        tied: bool,
    },
    Output,
    /// `attn_v` of block `block` out of `n_blocks`.
    AttnV {
        block: usize,
        n_blocks: usize,
    },
    /// `ffn_down` of block `block` out of `n_blocks`.
    FfnDown {
        block: usize,
        n_blocks: usize,
    },
    Adapter,
    /// Every other weight matrix.
    Matrix,
}

/// llama-quant.cpp `use_more_bits`: the first and last eighth of the blocks, and every third
/// block in between.
pub fn use_more_bits(block: usize, n_blocks: usize) -> bool {
    let eighth = n_blocks / 8;
    block < eighth || block >= 7 * n_blocks / 8 || (block - eighth) % 3 == 2
}

impl QuantType {
    /// The type of a tensor of `kind` whose rows (ggml `ne[0]`) have `row_len` elements.
    pub fn tensor_type(self, kind: TensorKind, row_len: usize) -> DType {
        if kind == TensorKind::Vector {
            return DType::F32;
        }
        let chosen = match self {
            QuantType::Single(d) if !d.is_quantized() => return d,
            QuantType::Single(_) | QuantType::Q4KM | QuantType::Q5KM
                if kind == TensorKind::Adapter =>
            {
                DType::Q8_0
            }
            QuantType::Single(d) => d,
            QuantType::Q4KM | QuantType::Q5KM => {
                let base = if self == QuantType::Q4KM {
                    DType::Q4K
                } else {
                    DType::Q5K
                };
                match kind {
                    TensorKind::Output | TensorKind::Embed { tied: true } => DType::Q6K,
                    TensorKind::AttnV { block, n_blocks }
                    | TensorKind::FfnDown { block, n_blocks }
                        if use_more_bits(block, n_blocks) =>
                    {
                        DType::Q6K
                    }
                    _ => base,
                }
            }
        };
        fallback(chosen, row_len)
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` of this type (llama.h).
    pub fn file_type(self) -> u32 {
        match self {
            QuantType::Q4KM => 15,
            QuantType::Q5KM => 17,
            QuantType::Single(d) => match d {
                DType::F32 => 0,
                DType::F16 => 1,
                DType::Q4_0 => 2,
                DType::Q4_1 => 3,
                DType::Q8_0 => 7,
                DType::Q5_0 => 8,
                DType::Q5_1 => 9,
                // Every weight one type is what llama.cpp calls the "small" K mixes.
                DType::Q4K => 14,
                DType::Q5K => 16,
                DType::Q6K => 18,
                DType::BF16 => 32,
                // Never chosen (`--type` does not take them); llama.h's MOSTLY_Q2_K, MOSTLY_Q3_K_S.
                DType::Q2K => 10,
                DType::Q3K => 11,
            },
        }
    }
}

/// llama-quantize's fallback for rows that are not whole blocks of `dtype`.
fn fallback(dtype: DType, row_len: usize) -> DType {
    if row_len.is_multiple_of(dtype.block_size()) {
        return dtype;
    }
    let next = match dtype {
        DType::Q4K => DType::Q5_0,
        DType::Q5K => DType::Q5_1,
        DType::Q6K => DType::Q8_0,
        _ => DType::F16,
    };
    if row_len.is_multiple_of(next.block_size()) {
        next
    } else {
        DType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> QuantType {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_listed_name_and_prints_it_back() {
        for name in TYPE_NAMES {
            assert_eq!(t(name).to_string(), *name);
        }
        assert_eq!(t("Q4_K_M"), QuantType::Q4KM);
        let err = "q2_k".parse::<QuantType>().unwrap_err();
        assert!(err.contains("unknown --type \"q2_k\""), "{err}");
    }

    #[test]
    fn q4_k_m_follows_llama_quantize() {
        let q = t("q4_k_m");
        assert_eq!(q.tensor_type(TensorKind::Vector, 4096), DType::F32);
        assert_eq!(q.tensor_type(TensorKind::Matrix, 4096), DType::Q4K);
        assert_eq!(q.tensor_type(TensorKind::Output, 4096), DType::Q6K);
        assert_eq!(
            q.tensor_type(TensorKind::Embed { tied: false }, 4096),
            DType::Q4K
        );
        assert_eq!(
            q.tensor_type(TensorKind::Embed { tied: true }, 4096),
            DType::Q6K
        );
        assert_eq!(q.tensor_type(TensorKind::Adapter, 4096), DType::Q8_0);
        // 32 blocks: more bits for 0..4, 28..32, and 6, 9, 12, ... in between.
        let more: Vec<usize> = (0..32)
            .filter(|&b| {
                q.tensor_type(
                    TensorKind::AttnV {
                        block: b,
                        n_blocks: 32,
                    },
                    4096,
                ) == DType::Q6K
            })
            .collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn rows_of_576_fall_back_to_block_32_types() {
        assert_eq!(
            t("q4_k_m").tensor_type(TensorKind::Matrix, 576),
            DType::Q5_0
        );
        assert_eq!(
            t("q5_k_m").tensor_type(TensorKind::Matrix, 576),
            DType::Q5_1
        );
        assert_eq!(
            t("q4_k_m").tensor_type(TensorKind::Output, 576),
            DType::Q8_0
        );
        assert_eq!(t("q6_k").tensor_type(TensorKind::Matrix, 1536), DType::Q6K);
        assert_eq!(t("q4_0").tensor_type(TensorKind::Matrix, 40), DType::F16);
        assert_eq!(t("q4_k").tensor_type(TensorKind::Matrix, 48), DType::F16);
        assert_eq!(t("bf16").tensor_type(TensorKind::Adapter, 7), DType::BF16);
    }

    #[test]
    fn file_types_are_llama_cpp_s() {
        assert_eq!(t("q8_0").file_type(), 7);
        assert_eq!(t("q4_k_m").file_type(), 15);
        assert_eq!(t("bf16").file_type(), 32);
    }
}
