//! Tiny synthetic checkpoints, built deterministically from a seed: Llama, OLMo-2, Qwen2 and Qwen3
//! in Hugging Face
//! layout (single or sharded safetensors, F32/F16/BF16, tied or untied) and Llama as GGUF (any
//! supported tensor type, Q/K rows permuted as llama.cpp's converter does). For tests, the demo's
//! scaffolding and benchmarks; the values are random, not trained.

use std::path::Path;

use serde_json::{json, Value};

use crate::arch::{self, LayerRole, Naming, Role};
use crate::dtype::DType;
use crate::formats::gguf::{self, Value as GValue};
use crate::formats::hf_config::{Family, ModelConfig};
use crate::formats::safetensors;

/// The shape and storage of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    pub family: Family,
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub tied: bool,
    /// Llama-3 RoPE scaling in the config (safetensors only).
    pub llama3_rope: bool,
    /// Float dtype of the safetensors weights.
    pub dtype: DType,
    /// Number of safetensors shards (1: a single `model.safetensors`).
    pub shards: usize,
}

impl SynthSpec {
    /// A small Llama: hidden 64, 4 heads, 2 KV heads, FFN 160, vocabulary 256.
    pub fn llama(n_layers: usize) -> SynthSpec {
        SynthSpec {
            family: Family::Llama,
            n_layers,
            hidden: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn: 160,
            vocab: 256,
            tied: false,
            llama3_rope: false,
            dtype: DType::F32,
            shards: 1,
        }
    }

    /// A small OLMo-2 of the same size.
    pub fn olmo2(n_layers: usize) -> SynthSpec {
        SynthSpec {
            family: Family::Olmo2,
            ..SynthSpec::llama(n_layers)
        }
    }

    /// A small Qwen2 of the same size, tied as the small Qwen2.5 releases are.
    pub fn qwen2(n_layers: usize) -> SynthSpec {
        SynthSpec {
            family: Family::Qwen2,
            tied: true,
            ..SynthSpec::llama(n_layers)
        }
    }

    /// A small Qwen3 of the same size.
    pub fn qwen3(n_layers: usize) -> SynthSpec {
        SynthSpec {
            family: Family::Qwen3,
            ..SynthSpec::llama(n_layers)
        }
    }

    /// The Hugging Face config.json.
    pub fn config_json(&self) -> Value {
        let (model_type, arch) = match self.family {
            Family::Llama => ("llama", "LlamaForCausalLM"),
            Family::Olmo2 => ("olmo2", "Olmo2ForCausalLM"),
            Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Family::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        };
        let rope_scaling = self.llama3_rope.then(|| {
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        });
        let mut config = json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn,
            "vocab_size": self.vocab,
            "rope_theta": 10000.0,
            "rope_scaling": rope_scaling,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": self.tied,
            "max_position_embeddings": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": self.dtype.torch_name(),
        });
        // The keys the Qwen releases write (the others' fixtures stay byte for byte as they were).
        if let (Family::Qwen2 | Family::Qwen3, Some(map)) = (self.family, config.as_object_mut()) {
            map.insert("attention_bias".into(), json!(false));
            map.insert("use_sliding_window".into(), json!(false));
        }
        config
    }

    pub fn config(&self) -> ModelConfig {
        let bytes = serde_json::to_vec(&self.config_json()).unwrap_or_default();
        match crate::formats::hf_config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => panic!("synthetic spec {self:?} is invalid: {e}"),
        }
    }

    /// Every tensor in Hugging Face convention: (role, shape, values), in storage order.
    pub fn tensors(&self, seed: u64) -> Vec<(Role, Vec<usize>, Vec<f32>)> {
        let config = self.config();
        let mut rng = SplitMix64(seed);
        arch::required_roles(&config)
            .into_iter()
            .map(|role| {
                let shape = arch::expected_shape(&config, role);
                let n: usize = shape.iter().product();
                let bias = matches!(
                    role,
                    Role::Layer(_, LayerRole::QBias | LayerRole::KBias | LayerRole::VBias)
                );
                let values = if bias {
                    (0..n).map(|_| 0.1 * rng.uniform()).collect()
                } else if shape.len() == 1 {
                    // Norm weights: around 1, as trained models have.
                    (0..n).map(|_| 1.0 + 0.1 * rng.uniform()).collect()
                } else {
                    let scale = 1.0 / (shape[1] as f32).sqrt();
                    (0..n).map(|_| scale * rng.uniform()).collect()
                };
                (role, shape, values)
            })
            .collect()
    }
}

/// A small, fast, seedable generator (splitmix64): fixtures must not depend on a crate's stream.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Writes `spec` as a Hugging Face directory: config.json and `spec.shards` safetensors files
/// (with `model.safetensors.index.json` when more than one).
pub fn write_hf(dir: &Path, spec: &SynthSpec, seed: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let naming = Naming::HuggingFace(spec.family);
    let tensors: Vec<(String, DType, Vec<usize>, Vec<u8>)> = spec
        .tensors(seed)
        .into_iter()
        .map(|(role, shape, values)| {
            (
                naming.name(role).unwrap_or_default(),
                spec.dtype,
                shape,
                spec.dtype.encode_f32(&values).unwrap_or_default(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&spec.config_json())?,
    )?;
    if spec.shards > 1 {
        safetensors::write_sharded(dir, &tensors, spec.shards).map_err(other)
    } else {
        safetensors::write_file(&dir.join("model.safetensors"), &tensors).map_err(other)
    }
}

/// Writes a Llama `spec` as a GGUF file the way llama.cpp's converter does: llama.* metadata,
/// llama.cpp tensor names, Q and K rows permuted per head; 2-D weights stored as `weight_type`
/// (when their rows are a whole number of its blocks, else F32), norms as F32.
pub fn write_gguf(
    path: &Path,
    spec: &SynthSpec,
    seed: u64,
    weight_type: DType,
) -> std::io::Result<()> {
    if spec.family != Family::Llama || spec.llama3_rope {
        return Err(other(
            "GGUF fixtures are plain llama (no OLMo-2, no llama3 scaling)",
        ));
    }
    let c = spec.config();
    let mut tensors = Vec::new();
    for (role, shape, values) in spec.tensors(seed) {
        let dtype = if shape.len() == 2 && shape[1] % weight_type.block_size() == 0 {
            weight_type
        } else {
            DType::F32
        };
        let mut bytes = gguf::quantize(dtype, &values).map_err(other)?;
        let heads = match role {
            Role::Layer(_, LayerRole::Q) => Some(c.n_heads),
            Role::Layer(_, LayerRole::K) => Some(c.n_kv_heads),
            _ => None,
        };
        if let Some(heads) = heads {
            bytes = gguf::permute_rows_hf_to_gguf(&bytes, shape[0], heads).map_err(other)?;
        }
        tensors.push((
            Naming::Gguf.name(role).unwrap_or_default(),
            dtype,
            shape,
            bytes,
        ));
    }
    let u32v = |v: usize| GValue::U32(v as u32);
    let tokens: Vec<GValue> = (0..spec.vocab)
        .map(|i| GValue::String(format!("<t{i}>")))
        .collect();
    let metadata = vec![
        (
            "general.architecture".to_string(),
            GValue::String("llama".into()),
        ),
        ("general.name".into(), GValue::String("synthetic".into())),
        ("llama.block_count".into(), u32v(c.n_layers)),
        ("llama.context_length".into(), u32v(256)),
        ("llama.embedding_length".into(), u32v(c.hidden)),
        ("llama.feed_forward_length".into(), u32v(c.ffn)),
        ("llama.attention.head_count".into(), u32v(c.n_heads)),
        ("llama.attention.head_count_kv".into(), u32v(c.n_kv_heads)),
        (
            "llama.rope.freq_base".into(),
            GValue::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GValue::F32(c.norm_eps as f32),
        ),
        ("llama.rope.dimension_count".into(), u32v(c.head_dim)),
        ("llama.vocab_size".into(), u32v(c.vocab)),
        ("tokenizer.ggml.model".into(), GValue::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), GValue::Array(tokens)),
        ("tokenizer.ggml.bos_token_id".into(), u32v(1)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(2)),
    ];
    gguf::write_gguf(path, &metadata, &tensors).map_err(other)
}

/// GPT-2's byte-to-character table (the ByteLevel pre-tokenizer's alphabet): printable bytes map to
/// themselves, the others to U+0100 onwards in order.
fn byte_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('?')
            }
        })
        .collect()
}

/// Writes a byte-level BPE `tokenizer.json` with no merges: token id = byte value, so any text
/// tokenizes within a vocabulary of 256 (the synthetic models' size), plus `tokenizer_config.json`
/// naming byte 2 as EOS.
pub fn write_byte_tokenizer(dir: &Path) -> std::io::Result<()> {
    let vocab: serde_json::Map<String, Value> = byte_alphabet()
        .into_iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), json!(id)))
        .collect();
    let eos = byte_alphabet()[2].to_string();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tokenizer)?)?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec(&json!({"eos_token": eos, "add_bos_token": false}))?,
    )
}
