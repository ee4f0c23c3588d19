//! `surgery export safetensors`: any checkpoint (a GGUF of either architecture, or a Hugging Face
//! directory) to the Hugging Face layout: `config.json`, `model.safetensors` (sharded with
//! `model.safetensors.index.json` above the shard size), the tokenizer files (built from the
//! GGUF vocabulary for a GGUF source) and `manifest.json`.
//!
//! A static model gets `LlamaForCausalLM` / `Olmo2ForCausalLM` names; a recurrent one the
//! published `huginn_raven` layout (fused `Wqkv` and `fc`). Q/K rows go back to Hugging Face's
//! order, and a tensor already in the output type is copied byte for byte, so
//! safetensors -> GGUF (f32) -> safetensors gives the original tensors bit for bit. Written into
//! `DIR.partial-<pid>/` and renamed at the end.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{json, Value as Json};

use crate::arch::{required_roles, Naming, Role};
use crate::atomic::Staging;
use crate::dtype::DType;
use crate::export::rows::{chunks, rows_cols, source_bytes, stream_rows, RowOrder};
use crate::export::ExportError;
use crate::formats::hf_config::{self, Family, ModelConfig};
use crate::formats::safetensors::{Entry, Shards};
use crate::manifest::{self, HashingWriter, ManifestEntry};
use crate::progress::Progress;
use crate::source::{SourceFormat, SourceModel};
use crate::tokenizer::gguf::{tokenizer_config_json_from_gguf, tokenizer_json_from_gguf};

/// `--dtype` of `export safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDType {
    /// The source's main type when it is a float type, else F32 (quantized GGUF weights).
    Auto,
    Float(DType),
}

impl FromStr for OutDType {
    type Err = String;

    fn from_str(s: &str) -> Result<OutDType, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(OutDType::Auto),
            "f32" => Ok(OutDType::Float(DType::F32)),
            "f16" => Ok(OutDType::Float(DType::F16)),
            "bf16" => Ok(OutDType::Float(DType::BF16)),
            _ => Err(format!(
                "unknown --dtype {s:?} (expected auto, f32, f16 or bf16)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SafetensorsOptions {
    pub dtype: OutDType,
    /// Largest shard in bytes of tensor data.
    pub max_shard_bytes: u64,
    pub force: bool,
}

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SafetensorsReport {
    pub out: PathBuf,
    /// `llama`, `olmo2` or `huginn_raven`.
    pub model_type: String,
    pub dtype: String,
    pub shards: usize,
    pub tensors: usize,
    pub tensor_bytes: u64,
    pub source_bytes: u64,
    pub files: Vec<ManifestEntry>,
    pub notes: Vec<String>,
}

/// One output tensor.
struct OutTensor {
    name: String,
    role: Role,
    shape: Vec<usize>,
}

/// Writes `source` in the Hugging Face layout into the directory `out`.
pub fn export_safetensors(
    source: &SourceModel,
    out: &Path,
    opts: &SafetensorsOptions,
    progress: &mut dyn Progress,
) -> Result<SafetensorsReport, ExportError> {
    crate::paths::check_new_output(out, &source.inputs(), opts.force)?;
    let dtype = match opts.dtype {
        OutDType::Float(d) => d,
        OutDType::Auto => Some(source.main_dtype())
            .filter(|d| !d.is_quantized())
            .unwrap_or(DType::F32),
    };
    let tensors = out_tensors(source)?;
    let io = |path, source| ExportError::Io { path, source };
    let report = Staging::write_dir(out, opts.force, io, |dir| {
        write_dir(source, &tensors, dtype, dir, opts, progress)
    })?;
    Ok(SafetensorsReport {
        out: out.to_path_buf(),
        ..report
    })
}

fn out_tensors(source: &SourceModel) -> Result<Vec<OutTensor>, ExportError> {
    let c = &source.config;
    let naming = match c.recurrent {
        Some(shape) => Naming::Raven(c.family, shape),
        None => Naming::HuggingFace(c.family),
    };
    required_roles(c)
        .into_iter()
        .map(|role| {
            let t = source.tensor(role).ok_or_else(|| {
                ExportError::Convert(format!("the checkpoint has no tensor for {role}"))
            })?;
            let name = naming
                .name(role)
                .ok_or_else(|| ExportError::Convert(format!("no output name for {role}")))?;
            Ok(OutTensor {
                name,
                role,
                shape: t.shape.clone(),
            })
        })
        .collect()
}

/// Writes the shards, then the files that describe them ([`write_small_files`]), into `dir`.
fn write_dir(
    source: &SourceModel,
    tensors: &[OutTensor],
    dtype: DType,
    dir: &Path,
    opts: &SafetensorsOptions,
    progress: &mut dyn Progress,
) -> Result<SafetensorsReport, ExportError> {
    let total_source: u64 = tensors
        .iter()
        .filter_map(|t| {
            let s = source.tensor(t.role)?;
            Some(source_bytes(s, &(0..rows_cols(&s.shape).0)))
        })
        .sum();
    progress.start("exporting", total_source);
    let entries = tensors
        .iter()
        .map(|t| Entry {
            name: t.name.clone(),
            dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let shards = Shards::new(entries, opts.max_shard_bytes);
    let mut writer = ShardWriter {
        source,
        dtype,
        progress,
        done: 0,
    };
    let mut files = Vec::new();
    for i in 0..shards.len() {
        files.push(writer.shard(dir, &shards, i, &tensors[shards.range(i)])?);
    }
    progress.finish();
    let notes = write_small_files(source, dtype, &shards, dir, &mut files)?;
    let model_type = match source.config.recurrent {
        Some(_) => "huginn_raven",
        None => source.config.family.name(),
    };
    Ok(SafetensorsReport {
        out: dir.to_path_buf(),
        model_type: model_type.into(),
        dtype: dtype.name().into(),
        shards: shards.len(),
        tensors: tensors.len(),
        tensor_bytes: shards.total_bytes(),
        source_bytes: total_source,
        files,
        notes,
    })
}

/// Streams tensors into shard files as `dtype`, with the progress of the source bytes read.
struct ShardWriter<'a> {
    source: &'a SourceModel,
    dtype: DType,
    progress: &'a mut dyn Progress,
    /// Source bytes read so far, over all shards.
    done: u64,
}

impl ShardWriter<'_> {
    /// Writes shard `i` of `shards`, which holds `tensors`, into `dir`; returns its manifest
    /// entry (hashed as it is written, not read back).
    fn shard(
        &mut self,
        dir: &Path,
        shards: &Shards,
        i: usize,
        tensors: &[OutTensor],
    ) -> Result<ManifestEntry, ExportError> {
        let name = shards.name(i);
        let path = dir.join(&name);
        let io = |source| ExportError::Io {
            path: path.clone(),
            source,
        };
        let file = File::create(&path).map_err(io)?;
        let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        w.write_all(&shards.header(i)).map_err(io)?;
        for t in tensors {
            self.tensor(t, &mut w, &path)?;
        }
        let (buf, bytes, sha256) = w.finish();
        buf.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        Ok(ManifestEntry {
            path: name,
            bytes,
            sha256,
        })
    }

    /// Streams tensor `t` into `w`, the shard at `path`, a chunk of whole heads (or rows) at a
    /// time: rows permuted per head, or parts of a fused tensor, are never split.
    fn tensor(
        &mut self,
        t: &OutTensor,
        w: &mut impl Write,
        path: &Path,
    ) -> Result<(), ExportError> {
        let s = self.source.tensor(t.role).ok_or_else(|| {
            ExportError::Convert(format!("the checkpoint has no tensor for {}", t.role))
        })?;
        let (rows, cols) = rows_cols(&s.shape);
        let unit = s
            .unpermute_heads
            .map_or(1, |heads| rows / heads.max(1))
            .max(if s.parts.is_empty() {
                1
            } else {
                self.source.config.head_dim
            });
        let ranges = chunks(rows, cols, unit);
        stream_rows(
            self.source,
            s,
            &ranges,
            self.dtype,
            RowOrder::Hf,
            &mut |bytes, n| {
                w.write_all(bytes).map_err(|source| ExportError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                self.done += n;
                self.progress.advance(self.done);
                Ok::<(), ExportError>(())
            },
        )
        .map_err(|e| match e {
            ExportError::Gguf(e) => {
                ExportError::Convert(format!("tensor {} (from {}): {e}", t.name, s.name))
            }
            other => other,
        })
    }
}

/// The files written after the tensors they describe ([`manifest::write_described`]):
/// config.json, for a recurrent model the Python files that load it in transformers (named by
/// its `auto_map`), and the tokenizer files. Their entries join `files`; returns notes for the
/// user.
fn write_small_files(
    source: &SourceModel,
    dtype: DType,
    shards: &Shards,
    dir: &Path,
    files: &mut Vec<ManifestEntry>,
) -> Result<Vec<String>, ExportError> {
    let mut config = config_json(&source.config, dtype);
    hf_config::publishable(&mut config);
    let mut small = vec![("config.json".to_string(), manifest::pretty_json(&config))];
    small.extend(hf_config::transformers_files(&config));
    let mut notes = Vec::new();
    small.extend(tokenizer_files(source, &mut notes)?);
    manifest::write_described(dir, shards, small, files)
        .map_err(|(path, source)| ExportError::Io { path, source })?;
    Ok(notes)
}

/// The tokenizer files: copied from a Hugging Face source, built from a GGUF's vocabulary.
fn tokenizer_files(
    source: &SourceModel,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, Vec<u8>)>, ExportError> {
    match source.format {
        SourceFormat::Safetensors => {
            let names = source.tokenizer.as_ref().map_or(&[][..], |t| &t.files[..]);
            names
                .iter()
                .map(|name| {
                    let path = source.root.join(name);
                    crate::paths::read(&path)
                        .map(|b| (name.clone(), b))
                        .map_err(|source| ExportError::Io { path, source })
                })
                .collect()
        }
        SourceFormat::Gguf => {
            let Some(g) = source.gguf() else {
                return Ok(vec![]);
            };
            if g.get("tokenizer.ggml.tokens").is_none() {
                notes.push("the GGUF has no vocabulary: no tokenizer files written".into());
                return Ok(vec![]);
            }
            match tokenizer_json_from_gguf(g) {
                Ok(t) => Ok(vec![
                    ("tokenizer.json".into(), manifest::pretty_json(&t)),
                    (
                        "tokenizer_config.json".into(),
                        manifest::pretty_json(&tokenizer_config_json_from_gguf(g)),
                    ),
                ]),
                Err(e) => {
                    notes.push(format!("no tokenizer.json written: {e}"));
                    Ok(vec![])
                }
            }
        }
    }
}

fn rope_scaling_json(c: &ModelConfig) -> Json {
    c.rope_scaling.map_or(Json::Null, |r| {
        json!({
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        })
    })
}

/// config.json: transformers' Llama / OLMo-2 / Qwen2 / Qwen3 config for a static model, the published
/// `huginn_raven` keys (REFERENCE.md) for a recurrent one.
fn config_json(c: &ModelConfig, dtype: DType) -> Json {
    let Some(s) = c.recurrent else {
        let (model_type, arch) = match c.family {
            Family::Llama => ("llama", "LlamaForCausalLM"),
            Family::Olmo2 => ("olmo2", "Olmo2ForCausalLM"),
            Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Family::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        };
        return json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": c.hidden,
            "intermediate_size": c.ffn,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "vocab_size": c.vocab,
            "rope_theta": c.rope_theta,
            "rope_scaling": rope_scaling_json(c),
            "rms_norm_eps": c.norm_eps,
            "tie_word_embeddings": c.tied,
            "max_position_embeddings": c.max_position,
            // Qwen2 has its q/k/v biases whatever this says; Qwen3 and Llama read it.
            "attention_bias": false,
            "use_sliding_window": false,
            "mlp_bias": false,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "torch_dtype": dtype.torch_name(),
        });
    };
    json!({
        "architectures": ["RavenForCausalLM"],
        "model_type": "huginn_raven",
        "block_type": c.family,
        "injection_type": if s.adapter { "linear" } else { "none" },
        "n_embd": c.hidden,
        "n_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.ffn,
        "n_layers": c.n_layers,
        "n_layers_in_prelude": s.prelude,
        "n_layers_in_recurrent_block": s.core,
        "n_layers_in_coda": s.coda,
        "mean_recurrence": s.mean_recurrence,
        "mean_backprop_depth": s.mean_backprop_depth,
        "norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling_json(c),
        "vocab_size": c.vocab,
        "padded_vocab_size": c.vocab,
        "max_position_embeddings": c.max_position,
        "tie_embeddings": false,
        "bias": false,
        "qk_bias": false,
        "init_values": {"std": s.state_std, "embed_scale": 1.0},
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "torch_dtype": dtype.torch_name(),
    })
}
