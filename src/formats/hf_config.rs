//! `config.json` of the source families (Llama, OLMo-2, Qwen2, Qwen3) and of the recurrent layout
//! (`model_type: huginn_raven`): raw serde structs, then one validated [`ModelConfig`]; and what a
//! recurrent checkpoint's config.json needs to be loaded by Hugging Face transformers and
//! published: the Python files beside it (`auto_map`), no local paths (issue 20).

use serde::Deserialize;
use serde_json::Value;

/// sigma of the initial state s_0 in the reference (inherited from Huginn; REFERENCE.md).
pub const REFERENCE_STATE_STD: f64 = 0.008703882797784892;

/// Whether `v` can scale values drawn in f32 (an init's noise, the initial state's std): finite,
/// not negative, and not past f32's largest number, which would make every draw Inf.
pub(crate) fn f32_scale(v: f64) -> bool {
    v.is_finite() && v >= 0.0 && v <= f64::from(f32::MAX)
}

/// The Python files (integrations/transformers/) that let transformers load a recurrent
/// checkpoint with `trust_remote_code=True`: written beside every recurrent output's config.json,
/// which names their classes in [`auto_map`]. Embedded, so the binary is all a user needs.
pub const TRANSFORMERS_FILES: [(&str, &str); 2] = [
    (
        "configuration_huginn_raven.py",
        include_str!("../../integrations/transformers/configuration_huginn_raven.py"),
    ),
    (
        "modeling_huginn_raven.py",
        include_str!("../../integrations/transformers/modeling_huginn_raven.py"),
    ),
];

/// config.json's `auto_map`: where transformers' Auto classes find ours in [`TRANSFORMERS_FILES`].
pub fn auto_map() -> Value {
    serde_json::json!({
        "AutoConfig": "configuration_huginn_raven.RavenConfig",
        "AutoModelForCausalLM": "modeling_huginn_raven.RavenForCausalLM",
    })
}

/// The files a checkpoint with this config.json gets beside it for transformers, as (name, bytes):
/// [`TRANSFORMERS_FILES`] for a recurrent one, none for a family transformers knows.
pub fn transformers_files(config: &Value) -> Vec<(String, Vec<u8>)> {
    if !is_recurrent_json(config) {
        return vec![];
    }
    TRANSFORMERS_FILES
        .iter()
        .map(|(name, text)| (name.to_string(), text.as_bytes().to_vec()))
        .collect()
}

/// Whether a config.json (as JSON) is a recurrent checkpoint's: one that gets [`TRANSFORMERS_FILES`].
pub fn is_recurrent_json(config: &Value) -> bool {
    config.get("model_type").and_then(Value::as_str) == Some("huginn_raven")
}

/// Makes a config.json fit to publish (issue 20): a recurrent one gets [`auto_map`], and no string
/// anywhere in it stays an absolute local path (they would leak the machine's folders into a Hub
/// upload), each becoming its last component. `surgery.source` keeps the source's name, format,
/// family, layer count and files (relative paths, sizes, sha256): its `root` is dropped and its
/// `path` becomes `name`. plan.json keeps the full paths: `apply` reads its source from there.
pub fn publishable(config: &mut Value) {
    if is_recurrent_json(config) {
        if let Some(map) = config.as_object_mut() {
            map.insert("auto_map".into(), auto_map());
        }
    }
    if let Some(source) = config
        .pointer_mut("/surgery/source")
        .and_then(Value::as_object_mut)
    {
        source.shift_remove("root");
        if let Some(path) = source.shift_remove("path") {
            // First, where `path` was; a hub model's snapshot is its commit.
            let revision = path.as_str().and_then(hub_snapshot).map(|(_, r)| r);
            let rest = std::mem::take(source);
            source.insert("name".into(), path);
            if let Some(revision) = revision {
                source.insert("revision".into(), revision.into());
            }
            source.extend(rest);
        }
    }
    local_paths_to_names(config);
}

/// A path inside a Hugging Face hub cache snapshot, `.../models--ORG--NAME/snapshots/REV/rest`:
/// `ORG/NAME` (with `/rest` when the path names something inside), and REV.
fn hub_snapshot(path: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = path.split(['/', '\\']).filter(|p| !p.is_empty()).collect();
    let at = parts.iter().position(|&p| p == "snapshots")?;
    let repo = parts.get(at.checked_sub(1)?)?.strip_prefix("models--")?;
    let revision = parts.get(at + 1)?;
    let mut name = repo.replace("--", "/");
    for rest in &parts[at + 2..] {
        name.push('/');
        name.push_str(rest);
    }
    Some((name, revision.to_string()))
}

/// Every string in `v` that is an absolute path (Unix, Windows drive or UNC) becomes its last
/// component, or the hub repository it is in ([`hub_snapshot`]).
fn local_paths_to_names(v: &mut Value) {
    match v {
        Value::String(s) if is_absolute_path(s) => {
            if let Some((repo, _)) = hub_snapshot(s) {
                *s = repo;
                return;
            }
            let name = s
                .trim_end_matches(['/', '\\'])
                .rsplit(['/', '\\'])
                .next()
                .unwrap_or_default();
            *s = name.to_string();
        }
        Value::Array(items) => items.iter_mut().for_each(local_paths_to_names),
        Value::Object(map) => map.values_mut().for_each(local_paths_to_names),
        _ => {}
    }
}

/// An absolute path on any system: `/...`, `\\...` (UNC), or a drive letter (`C:\\`, `C:/`).
pub fn is_absolute_path(s: &str) -> bool {
    match s.as_bytes() {
        [b'/' | b'\\', ..] => true,
        [drive, b':', b'/' | b'\\', ..] => drive.is_ascii_alphabetic(),
        _ => false,
    }
}

/// Largest sizes we accept. Far above any real model, far below anything that overflows the
/// parameter arithmetic (checked anyway).
const MAX_LAYERS: usize = 4096;
const MAX_WIDTH: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;
/// `v` as a person would write it in a message: 1e-300 and 1e39 in exponent form, 0.02 as is.
pub fn show(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e16).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// The most core iterations a config may ask for by default (the paper evaluates up to 128).
const MAX_RECURRENCE: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not JSON, or a field of the wrong type, or a required field missing. (The messages name
    /// no file: the caller puts the path in front.)
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A `model_type` this tool has no blocks for.
    #[error(
        "unsupported model_type {0:?} (supported: llama, mistral, olmo2, qwen2, qwen3, huginn_raven)"
    )]
    UnsupportedFamily(String),
    /// A value outside what any real model has, or inconsistent with another value.
    #[error("{0}")]
    Invalid(String),
}

/// The block architecture of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Pre-norm blocks: `x += attn(norm1(x)); x += mlp(norm2(x))`.
    Llama,
    /// Post-sublayer norms and q/k RMSNorm: `x += norm1(attn(x)); x += norm2(mlp(x))`.
    Olmo2,
    /// Qwen2 / Qwen2.5: Llama's pre-norm blocks with biases on the q, k and v projections.
    Qwen2,
    /// Qwen3: Llama's pre-norm blocks with RMSNorm over each head of q and k (weights
    /// [head_dim], shared by the heads) before RoPE.
    Qwen3,
}

impl Family {
    /// The family's `model_type` (and our `block_type`).
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Olmo2 => "olmo2",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// Whether the q, k and v projections carry biases (Qwen2).
    pub fn qkv_bias(self) -> bool {
        self == Family::Qwen2
    }

    /// Whether q and k are RMS-normed per head before RoPE (Qwen3; OLMo-2 norms the full width).
    pub fn head_qk_norm(self) -> bool {
        self == Family::Qwen3
    }
}

/// Llama-3 RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    /// transformers' llama3 rule divides by `factor`, by `high - low` and by the original context:
    /// each must be a positive, finite f32 and `high_freq_factor` above `low_freq_factor`, or the
    /// frequencies come out NaN or Inf (issue 18).
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(format!("rope_scaling: {msg}")));
        let f32_positive = |v: f64| v > 0.0 && v <= f64::from(f32::MAX);
        if !(self.factor >= 1.0 && f32_positive(self.factor)) {
            return bad(format!(
                "factor {} must be at least 1 and finite",
                show(self.factor)
            ));
        }
        if !(f32_positive(self.low_freq_factor) && f32_positive(self.high_freq_factor)) {
            return bad(format!(
                "low_freq_factor {} and high_freq_factor {} must be positive and finite",
                show(self.low_freq_factor),
                show(self.high_freq_factor)
            ));
        }
        if (self.high_freq_factor as f32) <= (self.low_freq_factor as f32) {
            return bad(format!(
                "high_freq_factor {} must be greater than low_freq_factor {}",
                show(self.high_freq_factor),
                show(self.low_freq_factor)
            ));
        }
        if self.original_max_position_embeddings == 0 {
            return bad("original_max_position_embeddings must be at least 1".into());
        }
        Ok(())
    }
}

/// The (P, C, K) cut of a recurrent checkpoint and its recurrence settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecurrentShape {
    pub prelude: usize,
    pub core: usize,
    pub coda: usize,
    pub mean_recurrence: usize,
    pub mean_backprop_depth: usize,
    /// false when the checkpoint has no adapter (`injection_type: none`).
    pub adapter: bool,
    /// std of the initial state s_0 (`init_values.std`; 0 for a zero state).
    pub state_std: f64,
}

/// A validated model configuration, whatever file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    /// Number of transformer blocks stored (for a recurrent model: P + C + K).
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tied: bool,
    pub norm_eps: f64,
    pub max_position: Option<usize>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    /// `torch_dtype` as written, if any.
    pub torch_dtype: Option<String>,
    pub recurrent: Option<RecurrentShape>,
}

#[derive(Deserialize)]
struct RawModelType {
    model_type: Option<String>,
}

/// Hugging Face `LlamaConfig` / `Olmo2Config`, the fields we use.
#[derive(Deserialize)]
struct RawHf {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    torch_dtype: Option<String>,
    /// transformers 5 writes `rope_theta` and the scaling here instead.
    rope_parameters: Option<Value>,
    /// Qwen2 / Qwen3: sliding-window attention, which we do not run.
    #[serde(default)]
    use_sliding_window: bool,
    layer_types: Option<Vec<String>>,
    /// Qwen3: biases on q, k, v and o (false in every release).
    #[serde(default)]
    attention_bias: bool,
}

/// The published recurrent checkpoints' config (REFERENCE.md, "checkpoint format").
#[derive(Deserialize)]
struct RawRaven {
    n_embd: usize,
    n_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    intermediate_size: usize,
    n_layers_in_prelude: usize,
    n_layers_in_recurrent_block: usize,
    n_layers_in_coda: usize,
    #[serde(default = "default_mean_recurrence")]
    mean_recurrence: usize,
    #[serde(default = "default_backprop_depth")]
    mean_backprop_depth: usize,
    #[serde(default = "default_eps")]
    norm_eps: f64,
    rope_theta: Option<f64>,
    rope_base: Option<f64>,
    rope_scaling: Option<Value>,
    vocab_size: usize,
    padded_vocab_size: Option<usize>,
    #[serde(default)]
    tie_embeddings: bool,
    max_position_embeddings: Option<usize>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    torch_dtype: Option<String>,
    /// Ours: `llama` (default, the reference), `olmo2`, `qwen2` or `qwen3`.
    block_type: Option<Family>,
    /// Ours: `linear` (default, the reference) or `none`.
    injection_type: Option<String>,
    init_values: Option<RawInitValues>,
}

#[derive(Deserialize)]
struct RawInitValues {
    std: Option<f64>,
}

fn default_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-5
}
fn default_mean_recurrence() -> usize {
    32
}
fn default_backprop_depth() -> usize {
    8
}

/// Parses a `config.json` of any supported family.
pub fn parse(bytes: &[u8]) -> Result<ModelConfig, ConfigError> {
    let RawModelType { model_type } = serde_json::from_slice(bytes)?;
    let model_type = model_type.unwrap_or_default();
    match model_type.as_str() {
        "llama" | "mistral" => from_hf(serde_json::from_slice(bytes)?, Family::Llama),
        "olmo2" => from_hf(serde_json::from_slice(bytes)?, Family::Olmo2),
        "qwen2" => from_hf(serde_json::from_slice(bytes)?, Family::Qwen2),
        "qwen3" => from_hf(serde_json::from_slice(bytes)?, Family::Qwen3),
        "huginn_raven" => from_raven(serde_json::from_slice(bytes)?),
        "" => Err(ConfigError::Invalid("missing field `model_type`".into())),
        other => Err(ConfigError::UnsupportedFamily(other.into())),
    }
}

fn from_hf(raw: RawHf, family: Family) -> Result<ModelConfig, ConfigError> {
    check_attention(&raw, family)?;
    // transformers 5 nests theta and the scaling in `rope_parameters`; the top-level keys win.
    let nested = raw.rope_parameters.as_ref().filter(|v| v.is_object());
    let rope_theta = match (raw.rope_theta, nested) {
        (Some(theta), _) => theta,
        (None, Some(p)) => match p.get("rope_theta") {
            Some(v) => v.as_f64().ok_or_else(|| {
                ConfigError::Invalid(format!("rope_parameters.rope_theta {v} is not a number"))
            })?,
            None => default_theta(),
        },
        (None, None) => default_theta(),
    };
    ModelConfig {
        family,
        n_layers: raw.num_hidden_layers,
        hidden: raw.hidden_size,
        n_heads: raw.num_attention_heads,
        n_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
        head_dim: head_dim(raw.head_dim, raw.hidden_size, raw.num_attention_heads)?,
        ffn: raw.intermediate_size,
        vocab: raw.vocab_size,
        rope_theta,
        rope_scaling: rope_scaling(raw.rope_scaling.as_ref().or(nested))?,
        tied: raw.tie_word_embeddings,
        norm_eps: raw.rms_norm_eps,
        max_position: raw.max_position_embeddings,
        bos_token_id: raw.bos_token_id,
        eos_token_id: raw.eos_token_id,
        torch_dtype: raw.torch_dtype,
        recurrent: None,
    }
    .validated()
}

/// Refuses attention we do not run: sliding windows (Qwen2 / Qwen3 with `use_sliding_window`, or
/// any `sliding_attention` layer), and Qwen3's `attention_bias`, which also biases o_proj.
/// transformers ignores `sliding_window` itself unless `use_sliding_window` is true.
fn check_attention(raw: &RawHf, family: Family) -> Result<(), ConfigError> {
    let sliding = raw
        .layer_types
        .iter()
        .flatten()
        .any(|t| t == "sliding_attention");
    if raw.use_sliding_window || sliding {
        return Err(ConfigError::Invalid(format!(
            "{} with sliding-window attention is not supported (use_sliding_window must be false)",
            family.name()
        )));
    }
    if family == Family::Qwen3 && raw.attention_bias {
        return Err(ConfigError::Invalid(
            "qwen3 with attention_bias: true is not supported (no released Qwen3 has it)".into(),
        ));
    }
    Ok(())
}

fn from_raven(raw: RawRaven) -> Result<ModelConfig, ConfigError> {
    let shape = RecurrentShape {
        prelude: raw.n_layers_in_prelude,
        core: raw.n_layers_in_recurrent_block,
        coda: raw.n_layers_in_coda,
        mean_recurrence: raw.mean_recurrence,
        mean_backprop_depth: raw.mean_backprop_depth,
        adapter: match raw.injection_type.as_deref() {
            None | Some("linear") => true,
            Some("none") => false,
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "unknown injection_type {other:?} (expected linear or none)"
                )))
            }
        },
        state_std: raw
            .init_values
            .and_then(|v| v.std)
            .unwrap_or(REFERENCE_STATE_STD),
    };
    if !f32_scale(shape.state_std) {
        return Err(ConfigError::Invalid(format!(
            "init_values.std {} must be finite, >= 0 and at most f32's {:e}",
            show(shape.state_std),
            f32::MAX
        )));
    }
    if shape.core == 0 {
        return Err(ConfigError::Invalid(
            "n_layers_in_recurrent_block must be at least 1".into(),
        ));
    }
    let n_layers = shape
        .prelude
        .checked_add(shape.core)
        .and_then(|n| n.checked_add(shape.coda))
        .ok_or_else(|| ConfigError::Invalid("layer counts overflow".into()))?;
    ModelConfig {
        family: raw.block_type.unwrap_or(Family::Llama),
        n_layers,
        hidden: raw.n_embd,
        n_heads: raw.n_heads,
        n_kv_heads: raw.num_key_value_heads.unwrap_or(raw.n_heads),
        head_dim: head_dim(raw.head_dim, raw.n_embd, raw.n_heads)?,
        ffn: raw.intermediate_size,
        vocab: raw.padded_vocab_size.unwrap_or(raw.vocab_size),
        rope_theta: raw.rope_theta.or(raw.rope_base).unwrap_or(default_theta()),
        rope_scaling: rope_scaling(raw.rope_scaling.as_ref())?,
        tied: raw.tie_embeddings,
        norm_eps: raw.norm_eps,
        max_position: raw.max_position_embeddings,
        bos_token_id: raw.bos_token_id,
        eos_token_id: raw.eos_token_id,
        torch_dtype: raw.torch_dtype,
        recurrent: Some(shape),
    }
    .validated()
}

fn head_dim(explicit: Option<usize>, hidden: usize, heads: usize) -> Result<usize, ConfigError> {
    match explicit {
        Some(d) => Ok(d),
        None if heads > 0 && hidden.is_multiple_of(heads) => Ok(hidden / heads),
        None => Err(ConfigError::Invalid(format!(
            "hidden size {hidden} is not divisible by {heads} attention heads"
        ))),
    }
}

/// `rope_scaling`: absent, null, `{"rope_type": "default"}`, or llama3. Anything else would change
/// the positions the model was trained with, so it is refused rather than ignored.
pub fn rope_scaling(value: Option<&Value>) -> Result<Option<RopeScaling>, ConfigError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(serde_json::from_value(value.clone()).map_err(
            |e| ConfigError::Invalid(format!("rope_scaling of type llama3: {e}")),
        )?)),
        other => Err(ConfigError::Invalid(format!(
            "unsupported rope_scaling type {other:?} (supported: llama3)"
        ))),
    }
}

impl ModelConfig {
    /// The one place the structural invariants are checked.
    pub fn validated(self) -> Result<ModelConfig, ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.n_layers == 0 || self.n_layers > MAX_LAYERS {
            return bad(format!(
                "number of layers {} is out of range 1..={MAX_LAYERS}",
                self.n_layers
            ));
        }
        for (name, value, max) in [
            ("hidden size", self.hidden, MAX_WIDTH),
            ("attention heads", self.n_heads, MAX_WIDTH),
            ("key-value heads", self.n_kv_heads, MAX_WIDTH),
            ("head_dim", self.head_dim, MAX_WIDTH),
            ("intermediate size", self.ffn, MAX_WIDTH),
            ("vocabulary size", self.vocab, MAX_VOCAB),
        ] {
            if value == 0 || value > max {
                return bad(format!("{name} {value} is out of range 1..={max}"));
            }
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} key-value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd; rotary embeddings need an even head_dim",
                self.head_dim
            ));
        }
        // RoPE is computed in f32 (as transformers does): theta^(-i/d) must stay a finite,
        // positive frequency, which needs theta > 1 and finite as an f32 (issue 18: 1e-300
        // gave NaN perplexities).
        if !(self.rope_theta > 1.0 && self.rope_theta <= f64::from(f32::MAX)) {
            return bad(format!(
                "rope_theta {} must be greater than 1 and at most f32's {:e}",
                show(self.rope_theta),
                f32::MAX
            ));
        }
        if let Some(s) = &self.rope_scaling {
            s.validate()?;
        }
        if let Some(r) = &self.recurrent {
            for (name, value) in [
                ("mean_recurrence", r.mean_recurrence),
                ("mean_backprop_depth", r.mean_backprop_depth),
            ] {
                if value == 0 || value > MAX_RECURRENCE {
                    return bad(format!(
                        "{name} {value} is out of range 1..={MAX_RECURRENCE} (the core must run \
                         at least once)"
                    ));
                }
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad(format!("norm epsilon {} must be positive", self.norm_eps));
        }
        Ok(self)
    }

    /// Width of the concatenated query heads.
    pub(crate) fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub(crate) fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_config(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/configs")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn reads_llama32_with_llama3_scaling() {
        let c = parse(&shared_config("llama-3.2-1b.config.json")).unwrap();
        assert_eq!(c.family, Family::Llama);
        assert_eq!(
            (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads),
            (16, 2048, 32, 8)
        );
        assert!(c.tied);
        let s = c.rope_scaling.unwrap();
        assert_eq!((s.factor, s.original_max_position_embeddings), (32.0, 8192));
    }

    #[test]
    fn reads_olmo2() {
        let c = parse(&shared_config("olmo-2-0425-1b.config.json")).unwrap();
        assert_eq!(c.family, Family::Olmo2);
        assert_eq!((c.head_dim, c.n_kv_heads, c.norm_eps), (128, 16, 1e-6));
        assert!(!c.tied);
    }

    fn golden_config(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name)
            .join("config.json");
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn reads_qwen2_and_qwen3_as_transformers_5_writes_them() {
        // rope_theta is only in rope_parameters there.
        let c = parse(&golden_config("tiny-qwen2")).unwrap();
        assert_eq!(c.family, Family::Qwen2);
        assert_eq!((c.rope_theta, c.rope_scaling, c.tied), (1e6, None, true));
        assert_eq!((c.head_dim, c.n_kv_heads, c.norm_eps), (16, 2, 1e-6));
        let c = parse(&golden_config("tiny-qwen3")).unwrap();
        assert_eq!(c.family, Family::Qwen3);
        assert_eq!((c.rope_theta, c.tied), (1e6, false));
        assert!(Family::Qwen2.qkv_bias() && !Family::Qwen3.qkv_bias());
        assert!(Family::Qwen3.head_qk_norm() && !Family::Olmo2.head_qk_norm());
    }

    #[test]
    fn refuses_sliding_windows_and_qwen3_attention_bias() {
        let base = r#""hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":8,"vocab_size":9"#;
        let cases = [
            (
                r#""model_type":"qwen2","use_sliding_window":true,"sliding_window":4096"#,
                "qwen2 with sliding-window attention is not supported",
            ),
            (
                r#""model_type":"qwen3","layer_types":["full_attention","sliding_attention"]"#,
                "qwen3 with sliding-window attention is not supported",
            ),
            (
                r#""model_type":"qwen3","attention_bias":true"#,
                "qwen3 with attention_bias: true is not supported",
            ),
            (
                r#""model_type":"qwen2","rope_parameters":{"rope_type":"yarn","rope_theta":1e6}"#,
                "unsupported rope_scaling type \"yarn\"",
            ),
        ];
        for (keys, want) in cases {
            let json = format!("{{{keys},{base}}}");
            let err = parse(json.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{json}\n  gave: {err}\n  want: {want}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        // The released defaults: a sliding_window size that use_sliding_window leaves off.
        let json = format!(
            r#"{{"model_type":"qwen2","use_sliding_window":false,"sliding_window":32768,{base}}}"#
        );
        assert_eq!(parse(json.as_bytes()).unwrap().family, Family::Qwen2);
    }

    #[test]
    fn publishable_configs_name_files_instead_of_local_paths() {
        let mut config = serde_json::json!({
            "model_type": "huginn_raven",
            "_name_or_path": "C:\\Users\\me\\models\\cut",
            "surgery": {
                "source": {
                    "path": "/home/me/models/tiny/",
                    "root": "/home/me/models/tiny",
                    "format": "safetensors",
                    "files": [{"path": "model.safetensors", "bytes": 3, "sha256": "ab"}],
                },
                "layers": {"core": "7..9"},
                "heal": {"config": {"data": ["/data/kjv.txt", "rel/x.txt"], "out": "healed"}},
            },
        });
        publishable(&mut config);
        assert_eq!(
            config,
            serde_json::json!({
                "model_type": "huginn_raven",
                "_name_or_path": "cut",
                "surgery": {
                    "source": {
                        "name": "tiny",
                        "format": "safetensors",
                        "files": [{"path": "model.safetensors", "bytes": 3, "sha256": "ab"}],
                    },
                    "layers": {"core": "7..9"},
                    "heal": {"config": {"data": ["kjv.txt", "rel/x.txt"], "out": "healed"}},
                },
                "auto_map": auto_map(),
            })
        );
        let keys: Vec<&String> = config["surgery"]["source"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(keys, ["name", "format", "files"], "name where path was");
    }

    #[test]
    fn a_hub_snapshot_is_named_by_its_repository_and_commit() {
        let snapshot = "/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/93efa2f097d58c2a74874c7e644dbc9b0cee75a2";
        let mut config = serde_json::json!({
            "model_type": "llama",
            "surgery": {
                "source": {"path": format!("{snapshot}/"), "root": snapshot, "format": "safetensors"},
                "heal": {"config": {"distill": {"teacher": format!("{snapshot}/model.gguf")}}},
            },
        });
        publishable(&mut config);
        assert_eq!(
            config["surgery"],
            serde_json::json!({
                "source": {
                    "name": "HuggingFaceTB/SmolLM2-135M",
                    "revision": "93efa2f097d58c2a74874c7e644dbc9b0cee75a2",
                    "format": "safetensors",
                },
                "heal": {"config": {"distill": {"teacher": "HuggingFaceTB/SmolLM2-135M/model.gguf"}}},
            })
        );
        assert_eq!(
            hub_snapshot("/data/models/snapshots/x"),
            None,
            "not a hub repository"
        );
    }

    #[test]
    fn only_recurrent_configs_get_auto_map() {
        let mut config = serde_json::json!({"model_type": "llama", "x": "/tmp/a"});
        publishable(&mut config);
        assert_eq!(config, serde_json::json!({"model_type": "llama", "x": "a"}));
    }

    #[test]
    fn absolute_paths_of_every_system() {
        for s in ["/", "/a", "\\\\server\\share", "C:\\x", "c:/x", "Z:\\"] {
            assert!(is_absolute_path(s), "{s}");
        }
        for s in [
            "",
            "a/b",
            "./a",
            "../a",
            "C:",
            "C:x",
            "1:/x",
            "model.safetensors",
            "7..9",
        ] {
            assert!(!is_absolute_path(s), "{s}");
        }
    }

    #[test]
    fn embedded_transformers_files_are_the_integrations() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("integrations/transformers");
        for (name, text) in TRANSFORMERS_FILES {
            assert_eq!(
                std::fs::read_to_string(dir.join(name)).unwrap(),
                text,
                "{name}"
            );
        }
        let map = auto_map();
        for class in map.as_object().unwrap().values() {
            let (module, class) = class.as_str().unwrap().split_once('.').unwrap();
            let (_, text) = TRANSFORMERS_FILES
                .iter()
                .find(|(name, _)| *name == format!("{module}.py"))
                .unwrap();
            assert!(
                text.contains(&format!("class {class}(")),
                "{module}.{class}"
            );
        }
    }

    #[test]
    fn refuses_bad_values() {
        let cases = [
            (
                r#"{"model_type":"gpt2"}"#,
                "unsupported model_type \"gpt2\"",
            ),
            (r#"{"hidden_size":64}"#, "missing field `model_type`"),
            (
                r#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":8}"#,
                "missing field `vocab_size`",
            ),
            (
                r#"{"model_type":"llama","hidden_size":"64","num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":8,"vocab_size":9}"#,
                "invalid type: string \"64\", expected usize",
            ),
            (
                r#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":1000000000000,"num_attention_heads":4,"intermediate_size":8,"vocab_size":9}"#,
                "number of layers 1000000000000 is out of range",
            ),
            (
                r#"{"model_type":"llama","hidden_size":0,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":8,"vocab_size":9,"head_dim":16}"#,
                "hidden size 0 is out of range",
            ),
            (
                r#"{"model_type":"llama","hidden_size":65,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":8,"vocab_size":9}"#,
                "hidden size 65 is not divisible by 4 attention heads",
            ),
            (
                r#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3,"intermediate_size":8,"vocab_size":9}"#,
                "4 attention heads are not a multiple of 3 key-value heads",
            ),
            (
                r#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":8,"vocab_size":9,"rope_scaling":{"rope_type":"yarn","factor":4}}"#,
                "unsupported rope_scaling type \"yarn\"",
            ),
        ];
        for (json, want) in cases {
            let err = parse(json.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{json}\n  gave: {err}\n  want: {want}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}
