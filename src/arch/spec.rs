//! The names of the recurrent GGUF architecture specified in schemas/gguf-recurrent.md: its
//! architecture string, its own metadata keys and its tensor names. The exporter writes them and
//! [`crate::source`] reads them, so both sides use these constants.
//!
//! Per-block tensors use llama.cpp's names (src/llama-arch.cpp `LLM_TENSOR_NAMES`): the llama
//! block's `attn_norm`, `attn_q`, ... and OLMo-2's `attn_q_norm`, `post_attention_norm`,
//! `post_ffw_norm`.

use super::LayerRole;

/// `general.architecture` of the recurrent GGUF.
pub(crate) const ARCH: &str = "huginn_raven";

/// The block family: `llama` or `olmo2` (string).
pub(crate) const KEY_BLOCK_TYPE: &str = "huginn_raven.block_type";
/// Number of prelude blocks P (u32): `blk.0` .. `blk.{P-1}`.
pub(crate) const KEY_PRELUDE: &str = "huginn_raven.prelude_block_count";
/// Number of core blocks C (u32): `blk.P` .. `blk.{P+C-1}`, run r times.
pub(crate) const KEY_CORE: &str = "huginn_raven.core_block_count";
/// Number of coda blocks K (u32): `blk.{P+C}` .. `blk.{P+C+K-1}`.
pub(crate) const KEY_CODA: &str = "huginn_raven.coda_block_count";
/// Test-time recurrence r used when the user gives none (u32).
pub(crate) const KEY_RECURRENCE: &str = "huginn_raven.recurrence.default";
/// How e enters the core: `linear` (through `adapter.weight`) or `none` (string).
pub(crate) const KEY_INJECTION: &str = "huginn_raven.injection";
/// sigma of the initial state s_0 (f32; 0 means s_0 = 0).
pub(crate) const KEY_STATE_SIGMA: &str = "huginn_raven.state.sigma";
/// Llama-3 RoPE scaling parameters, as transformers' `rope_scaling` (f32s and a u32; present
/// means Llama-3 scaling), so that a reader rebuilds the exact frequencies; `rope_freqs.weight`
/// holds the same scaling as llama.cpp's per-frequency divisors. Not under `rope.scaling.*`,
/// which llama.cpp's loader reads for every architecture (spec section 2.2).
pub(crate) const KEY_ROPE_LLAMA3_FACTOR: &str = "huginn_raven.rope.llama3.factor";
pub(crate) const KEY_ROPE_LLAMA3_LOW: &str = "huginn_raven.rope.llama3.low_freq_factor";
pub(crate) const KEY_ROPE_LLAMA3_HIGH: &str = "huginn_raven.rope.llama3.high_freq_factor";
pub(crate) const KEY_ROPE_LLAMA3_ORIG_CTX: &str =
    "huginn_raven.rope.llama3.original_context_length";

/// The adapter [h, 2h] (ggml ne = [2h, h]): columns 0..h read the state, h..2h read e.
pub(crate) const ADAPTER: &str = "adapter.weight";
/// Llama-3 RoPE frequency divisors (llama.cpp `LLM_TENSOR_ROPE_FREQS`), head_dim / 2 values.
pub(crate) const ROPE_FREQS: &str = "rope_freqs.weight";
pub(crate) const TOKEN_EMBD: &str = "token_embd.weight";
pub(crate) const OUTPUT_NORM: &str = "output_norm.weight";
pub(crate) const OUTPUT: &str = "output.weight";

/// `{arch}.{suffix}`: the llama-style keys both architectures share.
pub fn key(arch: &str, suffix: &str) -> String {
    format!("{arch}.{suffix}")
}

/// llama.cpp's name of tensor `role` of block `i`; None for the fused roles of the Hugging Face
/// recurrent layout (`Qkv`, `GateUp`), which GGUF stores as separate tensors.
pub(crate) fn block_tensor(i: usize, role: LayerRole) -> Option<String> {
    use LayerRole::*;
    let suffix = match role {
        AttnNorm => "attn_norm",
        Q => "attn_q",
        K => "attn_k",
        V => "attn_v",
        O => "attn_output",
        QNorm => "attn_q_norm",
        KNorm => "attn_k_norm",
        PostAttnNorm => "post_attention_norm",
        MlpNorm => "ffn_norm",
        Gate => "ffn_gate",
        Up => "ffn_up",
        Down => "ffn_down",
        PostMlpNorm => "post_ffw_norm",
        // Biases are not `.weight`s, and no GGUF we read or write has Qwen2's.
        Qkv | GateUp | QBias | KBias | VBias | QkvBias => return None,
    };
    Some(format!("blk.{i}.{suffix}.weight"))
}
