//! The cost model: parameter counts, forward and training FLOPs per token, KV-cache bytes
//! (REFERENCE.md, "Cost accounting"). Sizes are bounded by config validation, so parameter counts
//! fit in u64 exactly; FLOPs saturate rather than overflow for absurd contexts.

use crate::formats::hf_config::{Family, ModelConfig};

use super::range::Shape;

/// Parameters of one transformer block of `config`'s family (norms and biases included).
pub fn layer_params(c: &ModelConfig) -> u64 {
    let (h, q, kv, f) = (
        c.hidden as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
        c.ffn as u64,
    );
    let attention = h * q + 2 * h * kv + q * h;
    let mlp = 3 * h * f;
    let d = c.head_dim as u64;
    let norms = match c.family {
        Family::Llama => 2 * h,
        // Post-attention and post-MLP norms, plus q/k norms over the full projections.
        Family::Olmo2 => 2 * h + q + kv,
        // Pre-norms plus the q, k and v biases.
        Family::Qwen2 => 2 * h + q + 2 * kv,
        // Pre-norms plus q/k norms of one head each (shared by the heads).
        Family::Qwen3 => 2 * h + 2 * d,
    };
    attention + mlp + norms
}

/// Parameters of one embedding matrix (vocabulary x hidden).
pub fn embedding_params(c: &ModelConfig) -> u64 {
    c.vocab as u64 * c.hidden as u64
}

/// Parameters of the adapter: a linear map from 2h to h, no bias.
pub fn adapter_params(c: &ModelConfig) -> u64 {
    2 * c.hidden as u64 * c.hidden as u64
}

/// The source model's parameters: embeddings (lm_head counted once more when untied), all
/// layers, the final norm.
pub fn source_params(c: &ModelConfig) -> u64 {
    let heads = if c.tied { 1 } else { 2 };
    heads * embedding_params(c) + c.n_layers as u64 * layer_params(c) + c.hidden as u64
}

/// Parameters stored by the recurrent checkpoint: untied `wte` and `lm_head`, P + C + K layers,
/// the adapter, the final norm.
pub fn recurrent_params(c: &ModelConfig, s: Shape, adapter: bool) -> u64 {
    let layers = (s.prelude + s.core + s.coda) as u64;
    2 * embedding_params(c)
        + layers * layer_params(c)
        + if adapter { adapter_params(c) } else { 0 }
        + c.hidden as u64
}

/// The reference's "effective parameters" at recurrence r: (P + r C + K) layers.
pub fn effective_params(c: &ModelConfig, s: Shape, r: u64) -> u64 {
    (s.prelude as u64 + r * s.core as u64 + s.coda as u64) * layer_params(c)
}

/// Forward FLOPs per token at recurrence r over a context of `context` tokens: 2 per weight
/// multiply-add (layers run, adapter r times, lm_head) plus attention scores and values,
/// 2 * context * q_dim per layer run (the causal average of 4 * position * q_dim).
pub(crate) fn forward_flops(c: &ModelConfig, s: Shape, adapter: bool, r: u64, context: u64) -> u64 {
    let runs = s.prelude as u64 + r * s.core as u64 + s.coda as u64;
    let weights = effective_params(c, s, r)
        + if adapter { r * adapter_params(c) } else { 0 }
        + embedding_params(c);
    2u64.saturating_mul(weights).saturating_add(
        2u64.saturating_mul(runs)
            .saturating_mul(context)
            .saturating_mul(c.q_dim() as u64),
    )
}

/// The static source model's forward FLOPs per token, by the same accounting.
pub(crate) fn source_forward_flops(c: &ModelConfig, context: u64) -> u64 {
    let shape = Shape {
        prelude: c.n_layers,
        core: 0,
        coda: 0,
    };
    forward_flops(c, shape, false, 0, context)
}

/// The reference's training FLOPs per token at mean recurrence m with backprop depth k:
/// 6 (N_prelude + min(m, k) N_core + N_coda) + 2 max(m - k, 0) N_core, non-embedding parameters.
/// The adapter runs with every core pass, so it is counted in N_core.
pub(crate) fn train_flops(c: &ModelConfig, s: Shape, adapter: bool, m: u64, k: u64) -> u64 {
    let per = layer_params(c);
    let n_core = s.core as u64 * per + if adapter { adapter_params(c) } else { 0 };
    let n_outer = (s.prelude + s.coda) as u64 * per;
    6 * (n_outer + m.min(k) * n_core) + 2 * m.saturating_sub(k) * n_core
}

/// KV-cache bytes per token at recurrence r: one slot per (recurrence, core layer), so
/// P + r C + K slots of keys and values.
pub(crate) fn kv_bytes(c: &ModelConfig, s: Shape, r: u64, element_bytes: u64) -> u64 {
    let slots = s.prelude as u64 + r * s.core as u64 + s.coda as u64;
    slots * 2 * c.kv_dim() as u64 * element_bytes
}

/// The recurrence counts every cost table reports.
pub(crate) const REPORTED_R: [u64; 5] = [1, 4, 8, 16, 32];

/// The costs `surgery plan` reports and records in the plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Costs {
    pub params_per_layer: u64,
    pub source_params: u64,
    pub recurrent_params: u64,
    /// Context length the attention term of the FLOPs assumes.
    pub context: u64,
    pub source_forward_flops_per_token: u64,
    /// One row per r in [`REPORTED_R`].
    pub at_r: Vec<CostAtR>,
    /// Bytes of tensor data the output will hold.
    pub output_tensor_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostAtR {
    pub r: u64,
    pub effective_params: u64,
    pub forward_flops_per_token: u64,
    /// Training FLOPs per token at mean recurrence m = r, backprop depth 8.
    pub train_flops_per_token: u64,
    pub kv_bytes_per_token: u64,
}

impl Costs {
    pub fn new(
        c: &ModelConfig,
        s: Shape,
        adapter: bool,
        context: u64,
        kv_element_bytes: u64,
        output_tensor_bytes: u64,
    ) -> Costs {
        Costs {
            params_per_layer: layer_params(c),
            source_params: source_params(c),
            recurrent_params: recurrent_params(c, s, adapter),
            context,
            source_forward_flops_per_token: source_forward_flops(c, context),
            at_r: REPORTED_R
                .iter()
                .map(|&r| CostAtR {
                    r,
                    effective_params: effective_params(c, s, r),
                    forward_flops_per_token: forward_flops(c, s, adapter, r, context),
                    train_flops_per_token: train_flops(c, s, adapter, r, 8),
                    kv_bytes_per_token: kv_bytes(c, s, r, kv_element_bytes),
                })
                .collect(),
            output_tensor_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::hf_config;

    fn config(name: &str) -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/configs")
            .join(name);
        hf_config::parse(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn reproduces_the_reference_per_layer_counts() {
        assert_eq!(
            layer_params(&config("tinyllama-1.1b-3t.config.json")),
            44_044_288
        );
        assert_eq!(
            layer_params(&config("llama-3.2-1b.config.json")),
            60_821_504
        );
        assert_eq!(
            layer_params(&config("olmo-2-0425-1b.config.json")),
            67_117_056
        );
    }

    #[test]
    fn reproduces_tinyllama_effective_parameters() {
        let c = config("tinyllama-1.1b-3t.config.json");
        let s: Shape = "4,8,4".parse().unwrap();
        assert_eq!(effective_params(&c, s, 4), 1_761_771_520);
        // TinyLlama-1.1B: 1,100,048,384 parameters.
        assert_eq!(source_params(&c), 1_100_048_384);
    }

    #[test]
    fn training_flops_follow_the_reference_formula() {
        let c = config("tinyllama-1.1b-3t.config.json");
        let s: Shape = "4,8,4".parse().unwrap();
        let per = layer_params(&c);
        assert_eq!(train_flops(&c, s, false, 4, 8), 6 * (8 + 4 * 8) * per);
        assert_eq!(
            train_flops(&c, s, false, 32, 8),
            6 * (8 + 8 * 8) * per + 2 * 24 * 8 * per
        );
        assert_eq!(kv_bytes(&c, s, 4, 2), 40 * 2 * 256 * 2);
    }
}
