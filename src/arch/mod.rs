//! Canonical tensor roles and the naming schemes that map them to tensor names: Hugging Face
//! (Llama, OLMo-2, Qwen2, Qwen3), llama.cpp's GGUF names, and the published recurrent layout (`huginn_raven`).

pub mod spec;

use std::fmt;

use crate::formats::hf_config::{Family, ModelConfig, RecurrentShape};

/// What a tensor of one transformer block is, independent of any naming scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerRole {
    /// Llama: RMSNorm before attention.
    AttnNorm,
    Q,
    K,
    V,
    /// Attention output projection.
    O,
    /// OLMo-2: RMSNorm over the full projected queries / keys, before RoPE ([q], [kv]). Qwen3:
    /// RMSNorm over each head of the queries / keys, before RoPE ([head_dim], shared by heads).
    QNorm,
    KNorm,
    /// OLMo-2: RMSNorm applied to the attention output, inside the residual.
    PostAttnNorm,
    /// Llama: RMSNorm before the MLP.
    MlpNorm,
    Gate,
    Up,
    Down,
    /// OLMo-2: RMSNorm applied to the MLP output, inside the residual.
    PostMlpNorm,
    /// Recurrent layout: rows of Q, then K, then V.
    Qkv,
    /// Recurrent layout: rows of gate, then up.
    GateUp,
    /// Qwen2: the biases of the q, k and v projections.
    QBias,
    KBias,
    VBias,
    /// Recurrent layout: the q, k and v biases, concatenated as `Qkv`'s rows are.
    QkvBias,
}

impl LayerRole {
    /// The roles of a plain block whose rows make up this role of the recurrent layout, in row
    /// order: Q, K, V for `Qkv`; gate, up for `GateUp`; the role itself otherwise.
    pub fn parts(self) -> Vec<LayerRole> {
        match self {
            LayerRole::Qkv => vec![LayerRole::Q, LayerRole::K, LayerRole::V],
            LayerRole::GateUp => vec![LayerRole::Gate, LayerRole::Up],
            LayerRole::QkvBias => vec![LayerRole::QBias, LayerRole::KBias, LayerRole::VBias],
            role => vec![role],
        }
    }
}

/// Where a tensor sits in a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Embed,
    /// Block `i` (for a recurrent checkpoint: prelude, then core, then coda, counted together).
    Layer(usize, LayerRole),
    Adapter,
    FinalNorm,
    LmHead,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Layer(i, r) => write!(f, "layer {i} {r:?}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// The tensors of one block of a source (non-recurrent) model, in the order they are stored.
pub(crate) fn source_layer_roles(family: Family) -> &'static [LayerRole] {
    use LayerRole::*;
    match family {
        Family::Llama => &[AttnNorm, Q, K, V, O, MlpNorm, Gate, Up, Down],
        Family::Olmo2 => &[
            Q,
            K,
            V,
            O,
            QNorm,
            KNorm,
            PostAttnNorm,
            Gate,
            Up,
            Down,
            PostMlpNorm,
        ],
        Family::Qwen2 => &[
            AttnNorm, Q, QBias, K, KBias, V, VBias, O, MlpNorm, Gate, Up, Down,
        ],
        Family::Qwen3 => &[AttnNorm, Q, K, V, O, QNorm, KNorm, MlpNorm, Gate, Up, Down],
    }
}

/// The tensors of one block in the recurrent layout, in output order.
pub(crate) fn recurrent_layer_roles(family: Family) -> &'static [LayerRole] {
    use LayerRole::*;
    match family {
        Family::Llama => &[AttnNorm, Qkv, O, MlpNorm, GateUp, Down],
        Family::Olmo2 => &[
            Qkv,
            QNorm,
            KNorm,
            O,
            PostAttnNorm,
            GateUp,
            Down,
            PostMlpNorm,
        ],
        Family::Qwen2 => &[AttnNorm, Qkv, QkvBias, O, MlpNorm, GateUp, Down],
        Family::Qwen3 => &[AttnNorm, Qkv, QNorm, KNorm, O, MlpNorm, GateUp, Down],
    }
}

/// The row-major shape a tensor of `role` has under `config`.
pub(crate) fn expected_shape(config: &ModelConfig, role: Role) -> Vec<usize> {
    use LayerRole::*;
    let (h, q, kv, f) = (config.hidden, config.q_dim(), config.kv_dim(), config.ffn);
    let per_head = config.family.head_qk_norm();
    match role {
        Role::Embed | Role::LmHead => vec![config.vocab, h],
        Role::FinalNorm => vec![h],
        Role::Adapter => vec![h, 2 * h],
        Role::Layer(_, r) => match r {
            AttnNorm | MlpNorm | PostAttnNorm | PostMlpNorm => vec![h],
            QNorm | KNorm if per_head => vec![config.head_dim],
            QNorm => vec![q],
            KNorm => vec![kv],
            QBias => vec![q],
            KBias | VBias => vec![kv],
            QkvBias => vec![q + 2 * kv],
            Q => vec![q, h],
            K | V => vec![kv, h],
            O => vec![h, q],
            Gate | Up => vec![f, h],
            Down => vec![h, f],
            Qkv => vec![q + 2 * kv, h],
            GateUp => vec![2 * f, h],
        },
    }
}

/// A naming scheme: the tensor names of one file layout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Naming {
    /// Hugging Face `LlamaForCausalLM` / `Olmo2ForCausalLM` / `Qwen2ForCausalLM` /
    /// `Qwen3ForCausalLM`.
    HuggingFace(Family),
    /// llama.cpp's GGUF names (`llama.cpp/src/llama-arch.cpp`, LLM_ARCH_LLAMA).
    Gguf,
    /// The published recurrent checkpoints (`model_type: huginn_raven`) and our outputs.
    Raven(Family, RecurrentShape),
}

impl Naming {
    /// The tensor name of `role`, or None when this scheme has no such tensor.
    pub fn name(self, role: Role) -> Option<String> {
        match self {
            Naming::HuggingFace(family) => hf_name(family, role),
            Naming::Gguf => gguf_name(role),
            Naming::Raven(family, shape) => raven_name(family, shape, role),
        }
    }
}

fn hf_name(family: Family, role: Role) -> Option<String> {
    use LayerRole::*;
    let (i, r) = match role {
        Role::Embed => return Some("model.embed_tokens.weight".into()),
        Role::FinalNorm => return Some("model.norm.weight".into()),
        Role::LmHead => return Some("lm_head.weight".into()),
        Role::Adapter => return None,
        Role::Layer(i, r) => (i, r),
    };
    let pre_norm = matches!(family, Family::Llama | Family::Qwen2 | Family::Qwen3);
    let qk_norm = matches!(family, Family::Olmo2 | Family::Qwen3);
    let suffix = match (family, r) {
        (_, AttnNorm) if pre_norm => "input_layernorm",
        (_, MlpNorm) if pre_norm => "post_attention_layernorm",
        // OLMo-2 reuses the Llama name for a norm that now sits after attention.
        (Family::Olmo2, PostAttnNorm) => "post_attention_layernorm",
        (Family::Olmo2, PostMlpNorm) => "post_feedforward_layernorm",
        (_, QNorm) if qk_norm => "self_attn.q_norm",
        (_, KNorm) if qk_norm => "self_attn.k_norm",
        (Family::Qwen2, QBias) => return Some(format!("model.layers.{i}.self_attn.q_proj.bias")),
        (Family::Qwen2, KBias) => return Some(format!("model.layers.{i}.self_attn.k_proj.bias")),
        (Family::Qwen2, VBias) => return Some(format!("model.layers.{i}.self_attn.v_proj.bias")),
        (_, Q) => "self_attn.q_proj",
        (_, K) => "self_attn.k_proj",
        (_, V) => "self_attn.v_proj",
        (_, O) => "self_attn.o_proj",
        (_, Gate) => "mlp.gate_proj",
        (_, Up) => "mlp.up_proj",
        (_, Down) => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{i}.{suffix}.weight"))
}

/// llama.cpp's name of `role` in a stock GGUF: per-block tensors as [`spec::block_tensor`] names
/// them (OLMo-2's q/k and post norms included).
fn gguf_name(role: Role) -> Option<String> {
    match role {
        Role::Embed => Some(spec::TOKEN_EMBD.into()),
        Role::FinalNorm => Some(spec::OUTPUT_NORM.into()),
        Role::LmHead => Some(spec::OUTPUT.into()),
        Role::Adapter => None,
        Role::Layer(i, r) => spec::block_tensor(i, r),
    }
}

/// The part ("prelude", "core_block", "coda") and the index within it of global block `i`.
pub(crate) fn raven_part(shape: &RecurrentShape, i: usize) -> Option<(&'static str, usize)> {
    if i < shape.prelude {
        Some(("prelude", i))
    } else if i < shape.prelude + shape.core {
        Some(("core_block", i - shape.prelude))
    } else if i < shape.prelude + shape.core + shape.coda {
        Some(("coda", i - shape.prelude - shape.core))
    } else {
        None
    }
}

fn raven_name(family: Family, shape: RecurrentShape, role: Role) -> Option<String> {
    use LayerRole::*;
    let (i, r) = match role {
        Role::Embed => return Some("transformer.wte.weight".into()),
        Role::FinalNorm => return Some("transformer.ln_f.weight".into()),
        Role::LmHead => return Some("lm_head.weight".into()),
        Role::Adapter => return shape.adapter.then(|| "transformer.adapter.weight".into()),
        Role::Layer(i, r) => (i, r),
    };
    let pre_norm = matches!(family, Family::Llama | Family::Qwen2 | Family::Qwen3);
    let qk_norm = matches!(family, Family::Olmo2 | Family::Qwen3);
    let (part, j) = raven_part(&shape, i)?;
    let suffix = match (family, r) {
        (_, AttnNorm) if pre_norm => "norm_1",
        (_, MlpNorm) if pre_norm => "norm_2",
        // Not in the published (Llama-only) checkpoints: our names, documented in
        // schemas/recurrent-config.schema.json.
        (Family::Olmo2, PostAttnNorm) => "post_attn_norm",
        (Family::Olmo2, PostMlpNorm) => "post_mlp_norm",
        (_, QNorm) if qk_norm => "attn.q_norm",
        (_, KNorm) if qk_norm => "attn.k_norm",
        (Family::Qwen2, QkvBias) => return Some(format!("transformer.{part}.{j}.attn.Wqkv.bias")),
        (_, Qkv) => "attn.Wqkv",
        (_, O) => "attn.proj",
        (_, GateUp) => "mlp.fc",
        (_, Down) => "mlp.proj",
        _ => return None,
    };
    Some(format!("transformer.{part}.{j}.{suffix}.weight"))
}

/// Every tensor a model of `config` must have under its own layout, with its role.
pub(crate) fn required_roles(config: &ModelConfig) -> Vec<Role> {
    let recurrent = config.recurrent.is_some();
    let per_layer = if recurrent {
        recurrent_layer_roles(config.family)
    } else {
        source_layer_roles(config.family)
    };
    let mut roles = vec![Role::Embed];
    for i in 0..config.n_layers {
        roles.extend(per_layer.iter().map(|&r| Role::Layer(i, r)));
    }
    if config.recurrent.is_some_and(|s| s.adapter) {
        roles.push(Role::Adapter);
    }
    roles.push(Role::FinalNorm);
    // The recurrent layout always stores lm_head (REFERENCE.md: untied in the output).
    if recurrent || !config.tied {
        roles.push(Role::LmHead);
    }
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_each_scheme() {
        let shape = RecurrentShape {
            prelude: 2,
            core: 4,
            coda: 2,
            mean_recurrence: 32,
            mean_backprop_depth: 8,
            adapter: true,
            state_std: 0.0,
        };
        let raven = Naming::Raven(Family::Llama, shape);
        assert_eq!(
            raven.name(Role::Layer(3, LayerRole::Qkv)).as_deref(),
            Some("transformer.core_block.1.attn.Wqkv.weight")
        );
        assert_eq!(
            raven.name(Role::Layer(7, LayerRole::MlpNorm)).as_deref(),
            Some("transformer.coda.1.norm_2.weight")
        );
        assert_eq!(raven.name(Role::Layer(8, LayerRole::Down)), None);
        assert_eq!(
            Naming::Gguf.name(Role::Layer(0, LayerRole::O)).as_deref(),
            Some("blk.0.attn_output.weight")
        );
        assert_eq!(
            Naming::HuggingFace(Family::Olmo2)
                .name(Role::Layer(5, LayerRole::PostAttnNorm))
                .as_deref(),
            Some("model.layers.5.post_attention_layernorm.weight")
        );
        assert_eq!(
            Naming::HuggingFace(Family::Llama).name(Role::Layer(0, LayerRole::QNorm)),
            None
        );
    }

    #[test]
    fn qwen_roles_names_and_shapes() {
        use LayerRole::*;
        let shape = RecurrentShape {
            prelude: 1,
            core: 2,
            coda: 1,
            mean_recurrence: 4,
            mean_backprop_depth: 2,
            adapter: true,
            state_std: 0.0,
        };
        let hf = Naming::HuggingFace(Family::Qwen2);
        let raven = Naming::Raven(Family::Qwen2, shape);
        assert_eq!(
            hf.name(Role::Layer(3, KBias)).as_deref(),
            Some("model.layers.3.self_attn.k_proj.bias")
        );
        assert_eq!(
            raven.name(Role::Layer(2, QkvBias)).as_deref(),
            Some("transformer.core_block.1.attn.Wqkv.bias")
        );
        assert_eq!(
            raven.name(Role::Layer(0, AttnNorm)).as_deref(),
            Some("transformer.prelude.0.norm_1.weight")
        );
        assert_eq!(
            Naming::Raven(Family::Llama, shape).name(Role::Layer(0, QkvBias)),
            None
        );
        assert_eq!(
            Naming::HuggingFace(Family::Qwen3)
                .name(Role::Layer(1, QNorm))
                .as_deref(),
            Some("model.layers.1.self_attn.q_norm.weight")
        );
        assert_eq!(QkvBias.parts(), [QBias, KBias, VBias]);
        let config = |family| ModelConfig {
            family,
            ..crate::synth::SynthSpec::llama(2).config()
        };
        // hidden 64, 4 heads, 2 KV heads, head_dim 16.
        let qwen3 = config(Family::Qwen3);
        assert_eq!(expected_shape(&qwen3, Role::Layer(0, QNorm)), [16]);
        assert_eq!(expected_shape(&qwen3, Role::Layer(0, KNorm)), [16]);
        let olmo2 = config(Family::Olmo2);
        assert_eq!(expected_shape(&olmo2, Role::Layer(0, KNorm)), [32]);
        let qwen2 = config(Family::Qwen2);
        assert_eq!(expected_shape(&qwen2, Role::Layer(0, QkvBias)), [128]);
        assert_eq!(expected_shape(&qwen2, Role::Layer(0, VBias)), [32]);
        for family in [Family::Qwen2, Family::Qwen3] {
            let fused: Vec<LayerRole> = recurrent_layer_roles(family)
                .iter()
                .flat_map(|r| r.parts())
                .collect();
            let mut plain = source_layer_roles(family).to_vec();
            plain.sort();
            let mut fused = fused;
            fused.sort();
            assert_eq!(plain, fused, "{family:?}: the same tensors in both layouts");
        }
    }
}
