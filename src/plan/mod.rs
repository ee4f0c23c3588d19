//! The plan: pure data naming every output tensor of the recurrent checkpoint, where its bytes come
//! from or how it is initialized, the output config and the source's identity (DESIGN.md
//! decision 1). `surgery plan` writes it; `surgery apply` executes exactly it.

pub mod calibrate;
pub mod cost;
pub mod range;
mod validate;

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::arch::{self, Naming, Role};
use crate::dtype::DType;
use crate::formats::hf_config::{f32_scale, Family, RecurrentShape, REFERENCE_STATE_STD};
use crate::named::named;
use crate::source::{SourceFile, SourceFormat, SourceModel, TensorRef};

pub use range::{LayerRange, LayerRequest, Layers, Shape};

/// Version of the plan format; bumped on any incompatible change.
pub(crate) const PLAN_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Neither `--shape` nor all three ranges were given.
    #[error("no layer map: pass --shape P,C,K (optionally with --prelude/--core/--coda a..b), or all of --prelude, --core and --coda")]
    NoShape,
    /// A range reaches past the model's last layer.
    #[error("--{part} {range} is out of bounds: the model has {n_layers} layers (0..{n_layers})")]
    OutOfBounds {
        part: &'static str,
        range: LayerRange,
        n_layers: usize,
    },
    /// The core would have no layer to loop.
    #[error("the core is empty: it needs at least one layer")]
    EmptyCore,
    /// An explicit range disagrees with the shape's count for that part.
    #[error("--{part} {range} has {} layers, but --shape {shape} asks for {want}", range.len())]
    LengthMismatch {
        part: &'static str,
        range: LayerRange,
        want: usize,
        shape: Shape,
    },
    /// The shape needs more layers than the model has.
    #[error("--shape {shape} needs {} layers, but the model has {n_layers}", shape.prelude + shape.core + shape.coda)]
    ShapeTooDeep { shape: Shape, n_layers: usize },
    /// A layer in two parts without `--allow-reuse`.
    #[error("layer {layer} is used by both {first} ({first_range}) and {second} ({second_range}); pass --allow-reuse to loop a layer that also runs elsewhere")]
    Reused {
        layer: usize,
        first: &'static str,
        first_range: LayerRange,
        second: &'static str,
        second_range: LayerRange,
    },
    /// An option value out of range.
    #[error("{0}")]
    Invalid(String),
    /// A source tensor the plan needs is absent.
    #[error("the source has no tensor for {0}")]
    MissingTensor(Role),
}

named! {
    /// How the adapter is initialized (DESIGN.md decision 3).
    pub enum AdapterInit {
        /// [0 | I]: the retrofitted model computes exactly the pruned model at every r.
        Identity = "identity",
        /// Uniform in +-1/sqrt(2h), as the paper's conversion leaves it.
        Reference = "reference",
    }
}

named! {
    /// How the initial state s_0 is drawn.
    pub enum StateInit {
        /// Truncated normal, std sigma, cut at +-3 sigma, from a seeded generator.
        Normal = "normal",
        Zero = "zero",
    }
}

named! {
    /// How the prelude output enters each recurrence.
    pub enum Injection {
        /// adapter(concat(state, e)).
        Linear = "linear",
        /// No adapter: the state starts as e and the core is applied r times.
        None = "none",
    }
}

named! {
    /// Output dtype choice.
    pub enum DtypeChoice {
        /// The source's float dtype; quantized GGUF tensors become F32 (exact).
        Keep = "keep",
        Bf16 = "bf16",
        F16 = "f16",
        F32 = "f32",
    }
}

/// Everything the user chose, recorded in the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanOptions {
    pub adapter_init: AdapterInit,
    pub adapter_noise: f64,
    pub state_init: StateInit,
    pub state_std: f64,
    pub injection: Injection,
    pub seed: u64,
    pub dtype: DtypeChoice,
    pub allow_reuse: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            adapter_init: AdapterInit::Identity,
            adapter_noise: 0.0,
            state_init: StateInit::Normal,
            state_std: REFERENCE_STATE_STD,
            injection: Injection::Linear,
            seed: 0,
            dtype: DtypeChoice::Keep,
            allow_reuse: false,
        }
    }
}

/// The source, identified by its files' sizes and sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSource {
    /// The model path as given, made absolute.
    pub path: String,
    /// The directory file paths are relative to.
    pub root: String,
    pub format: String,
    pub family: Family,
    pub n_layers: usize,
    pub files: Vec<HashedFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashedFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// What happens to the source bytes of an output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// One source, same dtype: bytes copied as they are.
    Copy,
    /// Several sources, same dtype: their bytes concatenated (rows of the first, then the next).
    ConcatRows,
    /// Float sources decoded, rows reordered where a source says so, encoded in the output dtype,
    /// rows concatenated.
    Convert,
    /// Quantized sources dequantized to f32 (then as `convert`).
    Dequantize,
}

/// One source tensor read by an output tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRef {
    /// Path of the file, relative to the source root (as in `source.files`).
    pub file: String,
    pub tensor: String,
    pub dtype: DTypeName,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub byte_range: [u64; 2],
    /// llama.cpp's per-head Q/K row permutation to undo, with this many heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpermute_heads: Option<usize>,
}

/// How a new tensor is initialized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Init {
    pub kind: InitKind,
    /// For `identity`: std of the Gaussian noise added to the state half (0 for none).
    /// For `uniform`: the bound of the interval.
    pub scale: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    /// [0 | I] plus seeded N(0, scale^2) noise on the state half.
    Identity,
    /// Uniform in +-scale, seeded.
    Uniform,
}

/// One output tensor: from source bytes, or initialized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DTypeName,
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<Init>,
}

/// A dtype by name in plan files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DTypeName(pub DType);

impl Serialize for DTypeName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for DTypeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DType::from_name(&s)
            .map(DTypeName)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown dtype {s:?}")))
    }
}

/// A file of the output directory besides the weights, config, plan and manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case", deny_unknown_fields)]
pub enum OutputFile {
    /// A copy of a source file (a path in `source.files`).
    Copy { name: String, source: String },
    /// `tokenizer.json` built from the GGUF source's `tokenizer.ggml.*` metadata.
    GgufTokenizer { name: String },
    /// `tokenizer_config.json` built from the GGUF source's metadata.
    GgufTokenizerConfig { name: String },
}

impl OutputFile {
    pub fn name(&self) -> &str {
        match self {
            OutputFile::Copy { name, .. }
            | OutputFile::GgufTokenizer { name }
            | OutputFile::GgufTokenizerConfig { name } => name,
        }
    }
}

/// The plan file (schemas/plan.schema.json).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub plan_version: u32,
    pub tool_version: String,
    pub source: PlanSource,
    pub options: PlanOptions,
    pub layers: Layers,
    /// The output's config.json, without the plan's own sha256 (apply adds it).
    pub config: Value,
    pub tensors: Vec<TensorSpec>,
    /// Other files of the output: the tokenizer.
    pub files: Vec<OutputFile>,
    /// What the user should know about this plan (e.g. why the output has no tokenizer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Informational: what the output costs (not read by apply).
    pub costs: cost::Costs,
    /// Informational: per-layer scores and ranked core placements from `plan --calibrate` (not
    /// read by apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<calibrate::Calibration>,
}

impl Plan {
    /// Reads a plan file: its version first (so an old or new plan says so), then every field,
    /// refusing unknown ones, then [`Plan::validate`]: a plan edited by hand is either
    /// consistent, and applied as edited, or refused here naming the entry that disagrees.
    pub fn from_json(bytes: &[u8]) -> Result<Plan, PlanError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| PlanError::Invalid(format!("plan is not JSON: {e}")))?;
        match value.get("plan_version") {
            Some(v) if v.as_u64() == Some(u64::from(PLAN_VERSION)) => {}
            // A number of another version, or something that is no version at all (-1, "1",
            // 1.5): said as it is written, not as missing.
            Some(v) if v.is_number() => {
                return Err(PlanError::Invalid(format!(
                    "plan_version {v} is not supported (this tool reads version {PLAN_VERSION})"
                )))
            }
            Some(v) => {
                return Err(PlanError::Invalid(format!(
                "plan_version {v} is not a version number (this tool reads version {PLAN_VERSION})"
            )))
            }
            None => return Err(PlanError::Invalid("plan has no plan_version".into())),
        }
        let plan: Plan =
            serde_json::from_value(value).map_err(|e| PlanError::Invalid(format!("plan: {e}")))?;
        plan.validate()?;
        Ok(plan)
    }
}

/// Everything `make` needs besides the source.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub layers: LayerRequest,
    pub options: PlanOptions,
    /// Context length for the attention term of the FLOPs.
    pub context: u64,
}

/// Builds and validates the plan for `source`. `hashes` are the sha256 of `source.files`, in order.
pub fn make(source: &SourceModel, req: &PlanRequest, hashes: &[String]) -> Result<Plan, PlanError> {
    let cfg = &source.config;
    let opts = &req.options;
    check_request(source, opts)?;
    let layers = req.layers.resolve(cfg.n_layers)?;
    let shape = layers.shape();
    let adapter = opts.injection == Injection::Linear;
    let (tensors, embed_dtype) = tensor_specs(source, &layers, opts, adapter)?;
    let plan_source = plan_source(source, hashes);
    let config = output_config(source, &plan_source, &layers, opts, embed_dtype);
    let mut notes = Vec::new();
    let files = output_files(source, &mut notes);
    let output_tensor_bytes = tensors
        .iter()
        .map(|t| {
            let n: u64 = t.shape.iter().map(|&d| d as u64).product();
            t.dtype.0.size_of(n).unwrap_or(0)
        })
        .sum();
    let costs = cost::Costs::new(
        cfg,
        shape,
        adapter,
        req.context,
        embed_dtype.type_size() as u64,
        output_tensor_bytes,
    );
    Ok(Plan {
        plan_version: PLAN_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        source: plan_source,
        options: opts.clone(),
        layers,
        config,
        tensors,
        files,
        notes,
        costs,
        calibration: None,
    })
}

/// Refuses a source that is already recurrent, and an `--adapter-noise` that is not a usable f32
/// scale or has no adapter to apply to.
fn check_request(source: &SourceModel, opts: &PlanOptions) -> Result<(), PlanError> {
    if source.config.recurrent.is_some() {
        return Err(PlanError::Invalid(
            "the model is already recurrent (huginn_raven); plan from its static source instead"
                .into(),
        ));
    }
    if !f32_scale(opts.adapter_noise) {
        return Err(PlanError::Invalid(format!(
            "--adapter-noise {} must be a finite number >= 0 and at most f32's {:e}",
            crate::formats::hf_config::show(opts.adapter_noise),
            f32::MAX
        )));
    }
    if opts.injection == Injection::None && opts.adapter_noise > 0.0 {
        return Err(PlanError::Invalid(
            "--adapter-noise needs an adapter, but --injection none has none".into(),
        ));
    }
    Ok(())
}

/// Every output tensor, in output order: the embeddings, each layer's tensors (the `adapter`
/// before the core's first), the final norm and lm_head; and the embeddings' output dtype.
fn tensor_specs(
    source: &SourceModel,
    layers: &Layers,
    opts: &PlanOptions,
    adapter: bool,
) -> Result<(Vec<TensorSpec>, DType), PlanError> {
    let cfg = &source.config;
    let shape = layers.shape();
    let out_shape = RecurrentShape {
        prelude: shape.prelude,
        core: shape.core,
        coda: shape.coda,
        mean_recurrence: 32,
        mean_backprop_depth: 8,
        adapter,
        state_std: opts.state_std,
    };
    let naming = Naming::Raven(cfg.family, out_shape);
    let name_of = |role: Role| naming.name(role).unwrap_or_default();
    let source_ref = |role: Role| -> Result<&TensorRef, PlanError> {
        source.tensor(role).ok_or(PlanError::MissingTensor(role))
    };

    let mut tensors = Vec::new();
    let mut push = |name: String, sources: Vec<&TensorRef>| {
        tensors.push(copy_spec(source, name, &sources, opts.dtype));
    };
    push(name_of(Role::Embed), vec![source_ref(Role::Embed)?]);
    let embed_dtype = out_dtype(&[source_ref(Role::Embed)?], opts.dtype);
    for (slot, layer) in layers.output_order().enumerate() {
        if slot == shape.prelude && adapter {
            tensors.push(adapter_spec(
                cfg.hidden,
                embed_dtype,
                opts,
                name_of(Role::Adapter),
            ));
        }
        for &role in arch::recurrent_layer_roles(cfg.family) {
            let sources = role
                .parts()
                .into_iter()
                .map(|p| source_ref(Role::Layer(layer, p)))
                .collect::<Result<Vec<_>, _>>()?;
            tensors.push(copy_spec(
                source,
                name_of(Role::Layer(slot, role)),
                &sources,
                opts.dtype,
            ));
        }
    }
    tensors.push(copy_spec(
        source,
        name_of(Role::FinalNorm),
        &[source_ref(Role::FinalNorm)?],
        opts.dtype,
    ));
    // A tied source gets a second copy of the embeddings as lm_head (REFERENCE.md).
    let head = source
        .tensor(Role::LmHead)
        .unwrap_or(source_ref(Role::Embed)?);
    tensors.push(copy_spec(
        source,
        name_of(Role::LmHead),
        &[head],
        opts.dtype,
    ));
    Ok((tensors, embed_dtype))
}

/// The source's identity as the plan records it: its absolute paths, format, family, layer
/// count, and each file with its size and `hashes`' sha256.
fn plan_source(source: &SourceModel, hashes: &[String]) -> PlanSource {
    let cfg = &source.config;
    let files = source
        .files
        .iter()
        .zip(hashes)
        .map(|(SourceFile { path, bytes }, sha)| HashedFile {
            path: path.clone(),
            bytes: *bytes,
            sha256: sha.clone(),
        })
        .collect();
    PlanSource {
        path: absolute(&source.path),
        root: absolute(&source.root),
        format: match source.format {
            SourceFormat::Safetensors => "safetensors".into(),
            SourceFormat::Gguf => "gguf".into(),
        },
        family: cfg.family,
        n_layers: cfg.n_layers,
        files,
    }
}

/// The tokenizer files the output gets: copies of the source's, or built from a GGUF's vocabulary
/// when that conversion works (else a note says why there is none).
fn output_files(source: &SourceModel, notes: &mut Vec<String>) -> Vec<OutputFile> {
    if let Some(g) = source.gguf() {
        if g.get("tokenizer.ggml.model").is_none() {
            return vec![];
        }
        if let Err(e) = crate::tokenizer::gguf::tokenizer_json_from_gguf(g) {
            notes.push(format!("the output gets no tokenizer: {e}"));
            return vec![];
        }
        return vec![
            OutputFile::GgufTokenizer {
                name: "tokenizer.json".into(),
            },
            OutputFile::GgufTokenizerConfig {
                name: "tokenizer_config.json".into(),
            },
        ];
    }
    source
        .tokenizer
        .iter()
        .flat_map(|t| &t.files)
        .map(|f| OutputFile::Copy {
            name: f.clone(),
            source: f.clone(),
        })
        .collect()
}

fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// The output dtype of a tensor made from `sources`.
fn out_dtype(sources: &[&TensorRef], choice: DtypeChoice) -> DType {
    match choice {
        DtypeChoice::Bf16 => DType::BF16,
        DtypeChoice::F16 => DType::F16,
        DtypeChoice::F32 => DType::F32,
        DtypeChoice::Keep => {
            let first = sources.first().map_or(DType::F32, |t| t.dtype);
            let same = sources.iter().all(|t| t.dtype == first);
            if same && !first.is_quantized() {
                first
            } else {
                DType::F32
            }
        }
    }
}

fn copy_spec(
    source: &SourceModel,
    name: String,
    sources: &[&TensorRef],
    choice: DtypeChoice,
) -> TensorSpec {
    let dtype = out_dtype(sources, choice);
    let mut shape = sources.first().map_or(vec![], |t| t.shape.clone());
    if let Some(rows) = shape.first_mut() {
        *rows = sources
            .iter()
            .map(|t| t.shape.first().copied().unwrap_or(0))
            .sum();
    }
    let transform = if sources.iter().any(|t| t.dtype.is_quantized()) {
        Transform::Dequantize
    } else if sources
        .iter()
        .any(|t| t.dtype != dtype || t.unpermute_heads.is_some())
    {
        Transform::Convert
    } else if sources.len() > 1 {
        Transform::ConcatRows
    } else {
        Transform::Copy
    };
    let refs = sources
        .iter()
        .map(|t| SourceRef {
            file: source
                .files
                .get(t.file)
                .map_or_else(String::new, |f| f.path.clone()),
            tensor: t.name.clone(),
            dtype: DTypeName(t.dtype),
            shape: t.shape.clone(),
            byte_range: [t.start, t.end],
            unpermute_heads: t.unpermute_heads,
        })
        .collect();
    TensorSpec {
        name,
        dtype: DTypeName(dtype),
        shape,
        transform: Some(transform),
        sources: refs,
        init: None,
    }
}

fn adapter_spec(hidden: usize, dtype: DType, opts: &PlanOptions, name: String) -> TensorSpec {
    let init = match opts.adapter_init {
        AdapterInit::Identity => Init {
            kind: InitKind::Identity,
            scale: opts.adapter_noise,
            seed: opts.seed,
        },
        // torch.nn.Linear's default init, which the reference leaves in place: U(+-1/sqrt(in)).
        AdapterInit::Reference => Init {
            kind: InitKind::Uniform,
            scale: 1.0 / ((2 * hidden) as f64).sqrt(),
            seed: opts.seed,
        },
    };
    TensorSpec {
        name,
        dtype: DTypeName(dtype),
        shape: vec![hidden, 2 * hidden],
        transform: None,
        sources: vec![],
        init: Some(init),
    }
}

/// The output config.json: the reference's keys (REFERENCE.md) plus our `surgery` object.
fn output_config(
    source: &SourceModel,
    plan_source: &PlanSource,
    layers: &Layers,
    opts: &PlanOptions,
    dtype: DType,
) -> Value {
    let c = &source.config;
    let s = layers.shape();
    let rope_scaling = c.rope_scaling.map(|r| {
        json!({
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        })
    });
    json!({
        "architectures": ["RavenForCausalLM"],
        "model_type": "huginn_raven",
        "block_type": c.family,
        "injection_type": opts.injection,
        "n_embd": c.hidden,
        "n_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.ffn,
        "n_layers": s.prelude + s.core + s.coda,
        "n_layers_in_prelude": s.prelude,
        "n_layers_in_recurrent_block": s.core,
        "n_layers_in_coda": s.coda,
        "mean_recurrence": 32,
        "mean_backprop_depth": 8,
        "norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "vocab_size": c.vocab,
        "padded_vocab_size": c.vocab,
        "max_position_embeddings": c.max_position,
        "tie_embeddings": false,
        "bias": false,
        "qk_bias": false,
        // A zero initial state is a normal of std 0, which the reference code also reads so.
        "init_values": {"std": if opts.state_init == StateInit::Zero { 0.0 } else { opts.state_std }, "embed_scale": 1.0},
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": dtype.torch_name(),
        "surgery": {
            "tool_version": env!("CARGO_PKG_VERSION"),
            "source": plan_source,
            "layers": layers,
            "adapter_init": opts.adapter_init,
            "adapter_noise": opts.adapter_noise,
            "state_init": opts.state_init,
            "state_std": opts.state_std,
            "injection": opts.injection,
            "seed": opts.seed,
        },
    })
}
