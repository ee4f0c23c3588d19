//! [`SourceModel`]: any checkpoint we read (Hugging Face directory, single safetensors file, GGUF,
//! or a recurrent `huginn_raven` directory) as a config plus an index of tensors by canonical role.
//! No tensor data is loaded until asked for.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::arch::spec;
use crate::arch::{self, LayerRole, Naming, Role};
use crate::dtype::DType;
use crate::formats::gguf::{self, rope_freqs, GgufFile};
use crate::formats::hf_config::{
    self, ConfigError, Family, ModelConfig, RecurrentShape, RopeScaling,
};
use crate::formats::safetensors::{Checkpoint, SafetensorsError, INDEX_NAME};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The path does not exist.
    #[error("{0}: no such file or directory")]
    NotFound(PathBuf),
    /// The path exists but is not a model we can read.
    #[error("{path}: {reason}")]
    NotAModel { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("{path}: {source}")]
    Gguf {
        path: PathBuf,
        source: gguf::GgufError,
    },
    /// A tensor the family needs is absent.
    #[error("{path}: missing tensor {name:?} ({role})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        role: Role,
    },
    /// A tensor whose shape disagrees with the config.
    #[error("{path}: tensor {name:?} has shape {got:?}, but the config implies {want:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    /// A tokenizer with ids past the embedding's rows: they would index outside it in the
    /// forward pass, far from the file that caused it (issue 18).
    #[error(
        "{path}: the tokenizer has token ids up to {max_id}, but the embedding has {rows} rows \
         (vocab_size); ids from {rows} on would index past it"
    )]
    TokenizerTooLarge {
        path: PathBuf,
        max_id: usize,
        rows: usize,
    },
    /// A tensor this family does not have: refusing is safer than dropping it silently.
    #[error("{path}: unexpected tensor {name:?}, which a {family} model does not have")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        family: &'static str,
    },
}

/// How the checkpoint is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Safetensors,
    Gguf,
}

/// One file that makes up the checkpoint (weights, config, index), relative to `root`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceFile {
    pub path: String,
    pub bytes: u64,
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub name: String,
    /// Index into [`SourceModel::files`].
    pub file: usize,
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Absolute byte range within the file.
    pub start: u64,
    pub end: u64,
    /// Set for GGUF Q and K: llama.cpp stores their rows permuted per head (for its RoPE layout);
    /// reading undoes it with this many heads.
    pub unpermute_heads: Option<usize>,
    /// Non-empty for a fused role (`Wqkv`, `fc`) of a recurrent GGUF, which stores q, k, v (and
    /// gate, up) as separate tensors: the tensor is these parts' rows, in order. Its own byte
    /// range is then empty, and [`SourceModel::read_f32`] concatenates the parts.
    pub parts: Vec<TensorRef>,
}

impl TensorRef {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The GGUF tensor `info`, stored under `name` (the only file, index 0).
    fn gguf(
        name: String,
        info: &crate::formats::gguf::TensorInfo,
        unpermute_heads: Option<usize>,
    ) -> TensorRef {
        TensorRef {
            name,
            file: 0,
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: info.offset,
            end: info.offset + info.n_bytes,
            unpermute_heads,
            parts: Vec::new(),
        }
    }

    /// A fused tensor of `parts`' rows, in order (see [`TensorRef::parts`]): its name joins
    /// theirs, and it has no bytes of its own.
    fn rows_of(parts: Vec<TensorRef>) -> TensorRef {
        let cols = parts
            .first()
            .and_then(|p| p.shape.get(1))
            .copied()
            .unwrap_or(0);
        let rows = parts
            .iter()
            .map(|p| p.shape.first().copied().unwrap_or(0))
            .sum();
        TensorRef {
            name: parts
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            file: 0,
            dtype: parts.first().map_or(DType::F32, |p| p.dtype),
            shape: vec![rows, cols],
            start: 0,
            end: 0,
            unpermute_heads: None,
            parts,
        }
    }
}

/// The tokenizer that came with the checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenizerInfo {
    /// e.g. "tokenizer.json (BPE)", "sentencepiece", "gguf gpt2".
    pub kind: String,
    pub vocab: Option<usize>,
    /// Files to copy into an output directory.
    pub files: Vec<String>,
}

/// A stored tensor and its bytes, rows in the Hugging Face order.
pub(crate) type StoredRows<'a> = (&'a TensorRef, std::borrow::Cow<'a, [u8]>);

enum Storage {
    /// `first_file`: the index in [`SourceModel::files`] of the checkpoint's first weight file.
    Safetensors {
        checkpoint: Checkpoint,
        first_file: usize,
    },
    Gguf(Box<GgufFile>),
}

/// A checkpoint, opened and validated, with no tensor data loaded.
pub struct SourceModel {
    /// The path the user gave.
    pub path: PathBuf,
    /// The directory every [`SourceFile`] path is relative to.
    pub root: PathBuf,
    pub format: SourceFormat,
    pub config: ModelConfig,
    /// Weights, index and config files, in a stable order.
    pub files: Vec<SourceFile>,
    pub tensors: BTreeMap<Role, TensorRef>,
    pub tokenizer: Option<TokenizerInfo>,
    storage: Storage,
}

/// The tokenizer files a Hugging Face checkpoint may have (copied into outputs).
pub(crate) const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
];

impl SourceModel {
    /// Opens a Hugging Face directory, a `.safetensors` file with a `config.json` beside it, or a
    /// `.gguf` file.
    pub fn open(path: &Path) -> Result<SourceModel, SourceError> {
        if !path.exists() {
            return Err(SourceError::NotFound(path.to_path_buf()));
        }
        let is = |ext: &str| path.extension().is_some_and(|e| e == ext);
        if path.is_dir() {
            open_hf(path, path, None)
        } else if is("gguf") {
            open_gguf(path)
        } else if is("safetensors") {
            open_hf(path, &folder_of(path), Some(path))
        } else {
            Err(SourceError::NotAModel {
                path: path.to_path_buf(),
                reason: "not a directory, .safetensors or .gguf file".into(),
            })
        }
    }

    /// Everything this model reads: the model as named (a directory, or a file) and, for a file,
    /// the files read beside it (config, tokenizer). No output may be, contain or lie inside one
    /// of them (crate::paths::check_output).
    pub fn inputs(&self) -> Vec<PathBuf> {
        let mut inputs = vec![self.path.clone()];
        if !self.path.is_dir() {
            let beside = self.files.iter().map(|f| f.path.as_str());
            let tokenizer = self.tokenizer.iter().flat_map(|t| t.files.iter());
            inputs.extend(
                beside
                    .chain(tokenizer.map(String::as_str))
                    .map(|f| self.root.join(f)),
            );
        }
        inputs
    }

    /// The raw bytes of a tensor, as stored.
    pub fn bytes(&self, t: &TensorRef) -> &[u8] {
        match &self.storage {
            Storage::Safetensors {
                checkpoint,
                first_file,
            } => t
                .file
                .checked_sub(*first_file)
                .and_then(|i| checkpoint.files.get(i))
                .map_or(&[], |f| f.bytes_at(t.start, t.end)),
            Storage::Gguf(g) => g.tensor(&t.name).map_or(&[], |info| g.bytes(info)),
        }
    }

    /// Lets the kernel drop the pages of bytes `start..end` (file offsets) of stored tensor `t`'s
    /// file once they have been read: a model streamed through does not stay resident.
    pub fn release(&self, t: &TensorRef, start: u64, end: u64) {
        match &self.storage {
            Storage::Safetensors {
                checkpoint,
                first_file,
            } => {
                if let Some(f) = t
                    .file
                    .checked_sub(*first_file)
                    .and_then(|i| checkpoint.files.get(i))
                {
                    f.release(start, end);
                }
            }
            Storage::Gguf(g) => g.release(start, end),
        }
    }

    /// A tensor's values as f32 in the Hugging Face convention (dequantized, rows un-permuted).
    pub fn read_f32(&self, t: &TensorRef) -> Result<Vec<f32>, gguf::GgufError> {
        if !t.parts.is_empty() {
            let mut values = Vec::with_capacity(t.n_elements());
            for part in &t.parts {
                values.extend(self.read_f32(part)?);
            }
            return Ok(values);
        }
        let rows = t.shape.first().copied().unwrap_or(1);
        decode_rows(t.dtype, self.bytes(t), rows, t.unpermute_heads)
    }

    /// A tensor's stored bytes with its rows in the Hugging Face order (llama.cpp's Q/K row
    /// permutation undone: rows are whole blocks), with its reference; a fused role gives one
    /// per part, in order.
    pub(crate) fn stored_rows<'a>(
        &'a self,
        t: &'a TensorRef,
    ) -> Result<Vec<StoredRows<'a>>, gguf::GgufError> {
        if !t.parts.is_empty() {
            let mut parts = Vec::with_capacity(t.parts.len());
            for part in &t.parts {
                parts.extend(self.stored_rows(part)?);
            }
            return Ok(parts);
        }
        let rows = t.shape.first().copied().unwrap_or(1);
        Ok(vec![(
            t,
            unpermuted(self.bytes(t), rows, t.unpermute_heads)?,
        )])
    }

    /// The GGUF file, when the source is one (for its tokenizer metadata).
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.storage {
            Storage::Gguf(g) => Some(g),
            Storage::Safetensors { .. } => None,
        }
    }

    pub fn tensor(&self, role: Role) -> Option<&TensorRef> {
        self.tensors.get(&role)
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// Number of elements of each dtype among the tensors.
    pub fn dtype_histogram(&self) -> BTreeMap<DType, (usize, u64)> {
        let mut hist = BTreeMap::new();
        for t in self.tensors.values() {
            let e = hist.entry(t.dtype).or_insert((0usize, 0u64));
            e.0 += 1;
            e.1 += t.n_elements() as u64;
        }
        hist
    }

    /// The most common dtype by element count.
    pub(crate) fn main_dtype(&self) -> DType {
        self.dtype_histogram()
            .into_iter()
            .max_by_key(|(_, (_, n))| *n)
            .map_or(DType::F32, |(d, _)| d)
    }
}

/// Decodes whole rows of any supported dtype to f32, undoing llama.cpp's per-head Q/K row
/// permutation first when `unpermute_heads` is set (rows are whole blocks, so the permutation
/// applies to the stored bytes).
pub(crate) fn decode_rows(
    dtype: DType,
    bytes: &[u8],
    n_rows: usize,
    unpermute_heads: Option<usize>,
) -> Result<Vec<f32>, gguf::GgufError> {
    let bytes = unpermuted(bytes, n_rows, unpermute_heads)?;
    let per_block = dtype.type_size();
    let n_elements = bytes.len() / per_block * dtype.block_size();
    gguf::dequantize(dtype, &bytes, n_elements)
}

/// `bytes` in the Hugging Face row order: llama.cpp's per-head Q/K row permutation undone when
/// `unpermute_heads` is set.
fn unpermuted(
    bytes: &[u8],
    n_rows: usize,
    unpermute_heads: Option<usize>,
) -> Result<std::borrow::Cow<'_, [u8]>, gguf::GgufError> {
    Ok(match unpermute_heads {
        Some(heads) => {
            std::borrow::Cow::Owned(gguf::unpermute_rows_gguf_to_hf(bytes, n_rows, heads)?)
        }
        None => std::borrow::Cow::Borrowed(bytes),
    })
}

/// The folder of a model file: its parent, `.` for a bare file name (whose parent is empty).
fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn file_entry(root: &Path, path: &Path) -> Result<SourceFile, SourceError> {
    let bytes = std::fs::metadata(path)
        .map_err(|source| SourceError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let rel = path.strip_prefix(root).unwrap_or(path);
    Ok(SourceFile {
        path: rel.to_string_lossy().into_owned(),
        bytes,
    })
}

/// A Hugging Face checkpoint: `root`'s config.json, and the weights of the whole directory or
/// of `single` (a `.safetensors` file the user named); `path` is what the user gave.
fn open_hf(path: &Path, root: &Path, single: Option<&Path>) -> Result<SourceModel, SourceError> {
    let config = read_hf_config(path, root)?;
    let checkpoint = match single {
        Some(file) => {
            Checkpoint::from_files(vec![crate::formats::safetensors::SafetensorsFile::open(
                file,
            )?])?
        }
        None => Checkpoint::open_dir(root)?,
    };
    let mut files = vec![file_entry(root, &root.join("config.json"))?];
    if single.is_none() && root.join(INDEX_NAME).is_file() {
        files.push(file_entry(root, &root.join(INDEX_NAME))?);
    }
    let weights_start = files.len();
    for f in &checkpoint.files {
        files.push(file_entry(root, &f.path)?);
    }
    let tensors = hf_tensors(path, &config, &checkpoint, weights_start)?;
    check_shapes(path, &config, &tensors)?;
    let tokenizer = hf_tokenizer(root);
    check_tokenizer(&root.join("tokenizer.json"), &config, tokenizer.as_ref())?;
    if let Some(t) = &tokenizer {
        for f in &t.files {
            files.push(file_entry(root, &root.join(f))?);
        }
    }
    Ok(SourceModel {
        path: path.to_path_buf(),
        root: root.to_path_buf(),
        format: SourceFormat::Safetensors,
        config,
        files,
        tensors,
        tokenizer,
        storage: Storage::Safetensors {
            checkpoint,
            first_file: weights_start,
        },
    })
}

/// `root`'s config.json, read and parsed; without one, `path` is not a model we can read.
fn read_hf_config(path: &Path, root: &Path) -> Result<ModelConfig, SourceError> {
    let config_path = root.join("config.json");
    // Not `is_file`: a config.json that is a FIFO or a directory is named as such when read.
    if !config_path.exists() {
        return Err(SourceError::NotAModel {
            path: path.to_path_buf(),
            reason: format!("no config.json in {}", root.display()),
        });
    }
    let config_bytes = crate::paths::read(&config_path).map_err(|source| SourceError::Io {
        path: config_path.clone(),
        source,
    })?;
    hf_config::parse(&config_bytes).map_err(|source| SourceError::Config {
        path: config_path,
        source,
    })
}

/// The tensor of each role `config` needs, found in `checkpoint` under its Hugging Face name (the
/// recurrent layout's for a recurrent config); `weights_start` is the index in
/// [`SourceModel::files`] of the checkpoint's first file. A missing tensor is refused, and then
/// any stored tensor that no role takes: dropping it silently would lose part of the model.
fn hf_tensors(
    path: &Path,
    config: &ModelConfig,
    checkpoint: &Checkpoint,
    weights_start: usize,
) -> Result<BTreeMap<Role, TensorRef>, SourceError> {
    let naming = match config.recurrent {
        Some(shape) => Naming::Raven(config.family, shape),
        None => Naming::HuggingFace(config.family),
    };
    let mut tensors = BTreeMap::new();
    let mut seen = HashSet::new();
    for role in arch::required_roles(config) {
        let name = naming.name(role).unwrap_or_default();
        let Some((_, t)) = checkpoint.get(&name) else {
            return Err(SourceError::MissingTensor {
                path: path.to_path_buf(),
                name,
                role,
            });
        };
        let file = weights_start + checkpoint.file_index(&name).unwrap_or(0);
        seen.insert(name.clone());
        tensors.insert(
            role,
            TensorRef {
                name,
                file,
                dtype: t.dtype,
                shape: t.shape.clone(),
                start: t.start,
                end: t.end,
                unpermute_heads: None,
                parts: Vec::new(),
            },
        );
    }
    for name in checkpoint.names() {
        // A tied source may still store lm_head; old checkpoints store RoPE's inverse frequencies.
        let ignorable =
            (config.tied && name == "lm_head.weight") || name.ends_with("rotary_emb.inv_freq");
        if !seen.contains(name) && !ignorable {
            let mut extra: Vec<&str> = checkpoint.names().filter(|n| !seen.contains(*n)).collect();
            extra.sort();
            return Err(SourceError::UnexpectedTensor {
                path: path.to_path_buf(),
                name: extra.first().copied().unwrap_or(name).to_string(),
                family: config.family.name(),
            });
        }
    }
    Ok(tensors)
}

fn check_shapes(
    path: &Path,
    config: &ModelConfig,
    tensors: &BTreeMap<Role, TensorRef>,
) -> Result<(), SourceError> {
    for (&role, t) in tensors {
        let want = arch::expected_shape(config, role);
        if t.shape != want {
            return Err(SourceError::ShapeMismatch {
                path: path.to_path_buf(),
                name: t.name.clone(),
                got: t.shape.clone(),
                want,
            });
        }
    }
    Ok(())
}

/// Refuses a tokenizer whose ids do not all have a row of the embedding (`config.vocab`, which
/// [`check_shapes`] has matched to the embedding tensor). Fewer ids than rows is common (rows
/// padded to a multiple of 64 or 128) and fine.
fn check_tokenizer(
    path: &Path,
    config: &ModelConfig,
    tokenizer: Option<&TokenizerInfo>,
) -> Result<(), SourceError> {
    match tokenizer.and_then(|t| t.vocab) {
        Some(tokens) if tokens > config.vocab => Err(SourceError::TokenizerTooLarge {
            path: path.to_path_buf(),
            max_id: tokens - 1,
            rows: config.vocab,
        }),
        _ => Ok(()),
    }
}

fn hf_tokenizer(root: &Path) -> Option<TokenizerInfo> {
    let files: Vec<String> = TOKENIZER_FILES
        .iter()
        .filter(|f| root.join(f).is_file())
        .map(|f| f.to_string())
        .collect();
    let json = crate::paths::read(&root.join("tokenizer.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    if files.is_empty() {
        return None;
    }
    let kind = match (&json, root.join("tokenizer.model").is_file()) {
        (Some(j), _) => format!(
            "tokenizer.json ({})",
            j.pointer("/model/type")
                .and_then(Value::as_str)
                .unwrap_or("unknown model")
        ),
        (None, true) => "sentencepiece (tokenizer.model)".into(),
        (None, false) => "no vocabulary file (tokenizer.json or tokenizer.model)".into(),
    };
    // Added tokens usually repeat ids of the vocabulary: count ids, not entries.
    let vocab = json.as_ref().and_then(|j| {
        let vocab = j.pointer("/model/vocab").and_then(Value::as_object)?;
        let added = j.get("added_tokens").and_then(Value::as_array);
        let ids = vocab.values().filter_map(Value::as_u64).chain(
            added
                .into_iter()
                .flatten()
                .filter_map(|t| t.get("id")?.as_u64()),
        );
        ids.max().map(|m| m as usize + 1)
    });
    Some(TokenizerInfo { kind, vocab, files })
}

/// GGUF stores these floats as f32: 1e-5 reads back as 9.999999747378752e-6 in f64. Take the
/// shortest decimal that round-trips through f32, which is what the converter was given.
fn shortest_f32(v: f64) -> f64 {
    (v as f32).to_string().parse().unwrap_or(v)
}

/// A GGUF file: stock llama.cpp `llama` (Llama-3 RoPE scaling read back from `rope_freqs`) or
/// `olmo2`, or our recurrent architecture ([`open_recurrent_gguf`]).
fn open_gguf(path: &Path) -> Result<SourceModel, SourceError> {
    let g = GgufFile::open(path).map_err(|source| SourceError::Gguf {
        path: path.to_path_buf(),
        source,
    })?;
    let arch_name = g.get_str("general.architecture").unwrap_or("");
    if arch_name == spec::ARCH {
        return open_recurrent_gguf(path, g);
    }
    let (arch, family) = match arch_name {
        "llama" => ("llama", Family::Llama),
        "olmo2" => ("olmo2", Family::Olmo2),
        _ => ("", Family::Llama),
    };
    let keys = GgufKeys { g: &g, path, arch };
    if arch.is_empty() {
        return Err(keys.bad(format!(
            "GGUF architecture {arch_name:?} is not supported (supported: llama, olmo2, {})",
            spec::ARCH
        )));
    }
    let tokens = g.get_array("tokenizer.ggml.tokens").map(|a| a.len());
    let config = keys.stock_config(family, tokens)?;
    let tensors = GgufTensors::new(&g, path).stock(&config)?;
    gguf_source(path, config, tensors, g, tokens)
}

/// A GGUF of the recurrent architecture (schemas/gguf-recurrent.md): prelude, core and coda
/// blocks as `blk.N`, the adapter, and the recurrence keys. Its q/k/v and gate/up tensors become
/// the fused `Qkv` and `GateUp` roles of the recurrent layout (see [`TensorRef::parts`]), so the
/// model loads from it as from a Hugging Face recurrent checkpoint.
fn open_recurrent_gguf(path: &Path, g: GgufFile) -> Result<SourceModel, SourceError> {
    let keys = GgufKeys {
        g: &g,
        path,
        arch: spec::ARCH,
    };
    let config = keys.recurrent_config()?;
    let tokens = g.get_array("tokenizer.ggml.tokens").map(|a| a.len());
    let tensors = GgufTensors::new(&g, path).recurrent(&config)?;
    gguf_source(path, config, tensors, g, tokens)
}

/// The keys of a GGUF being opened, read into a [`ModelConfig`]. `arch` is the prefix of the
/// architecture's own keys (`llama.block_count`, `olmo2.block_count`); every architecture we read
/// shares their spelling.
struct GgufKeys<'a> {
    g: &'a GgufFile,
    path: &'a Path,
    arch: &'a str,
}

impl GgufKeys<'_> {
    /// The file is not a model we can read, for `reason`.
    fn bad(&self, reason: String) -> SourceError {
        SourceError::NotAModel {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    /// The full name of the architecture's key `suffix`.
    fn key(&self, suffix: &str) -> String {
        spec::key(self.arch, suffix)
    }

    /// Key `key` (a full name), which must be there and a non-negative integer.
    fn int(&self, key: &str) -> Result<usize, SourceError> {
        self.g
            .get_u64(key)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.bad(format!("missing or non-integer GGUF key {key}")))
    }

    /// The architecture's key `suffix`, which must be there and a non-negative integer.
    fn need(&self, suffix: &str) -> Result<usize, SourceError> {
        self.int(&self.key(suffix))
    }

    /// The architecture's key `suffix`, when it is there and a non-negative integer.
    fn optional(&self, suffix: &str) -> Option<usize> {
        self.g
            .get_u64(&self.key(suffix))
            .and_then(|v| usize::try_from(v).ok())
    }

    /// The architecture's float key `suffix` as the converter was given it ([`shortest_f32`]),
    /// or `default` when it is absent.
    fn float_or(&self, suffix: &str, default: f64) -> f64 {
        self.g
            .get_f64(&self.key(suffix))
            .map_or(default, shortest_f32)
    }

    /// A token id key (`tokenizer.ggml.bos_token_id`), as config.json would give it.
    fn token_id(&self, key: &str) -> Option<Value> {
        self.g.get_u64(key).map(Value::from)
    }

    /// `config`, once [`ModelConfig::validated`] accepts it.
    fn validated(&self, config: ModelConfig) -> Result<ModelConfig, SourceError> {
        config.validated().map_err(|source| SourceError::Config {
            path: self.path.to_path_buf(),
            source,
        })
    }

    /// The config of a stock `llama` or `olmo2` GGUF (`family`). `tokens`, the vocabulary's
    /// length, stands in for a missing `{arch}.vocab_size`; a GGUF without `output.weight` is
    /// tied. A `llama` file's `rope_freqs` gives its Llama-3 RoPE scaling ([`Self::rope_freqs`]).
    fn stock_config(
        &self,
        family: Family,
        tokens: Option<usize>,
    ) -> Result<ModelConfig, SourceError> {
        let hidden = self.need("embedding_length")?;
        let n_heads = self.need("attention.head_count")?;
        let vocab = self.optional("vocab_size").or(tokens).ok_or_else(|| {
            self.bad(format!(
                "no {} and no tokenizer.ggml.tokens",
                self.key("vocab_size")
            ))
        })?;
        let tied = self.g.tensor("output.weight").is_none();
        let mut config = ModelConfig {
            family,
            n_layers: self.need("block_count")?,
            hidden,
            n_heads,
            n_kv_heads: self.optional("attention.head_count_kv").unwrap_or(n_heads),
            head_dim: match self.g.get_u64(&self.key("attention.key_length")) {
                Some(d) => usize::try_from(d).map_err(|_| self.bad("head dim overflows".into()))?,
                None if n_heads > 0 => hidden / n_heads,
                None => 0,
            },
            ffn: self.need("feed_forward_length")?,
            vocab,
            rope_theta: self.float_or("rope.freq_base", 10000.0),
            rope_scaling: None,
            tied,
            norm_eps: self.float_or("attention.layer_norm_rms_epsilon", 1e-5),
            max_position: self.optional("context_length"),
            bos_token_id: self.token_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: self.token_id("tokenizer.ggml.eos_token_id"),
            torch_dtype: None,
            recurrent: None,
        };
        if family == Family::Llama {
            config.rope_scaling = self.rope_freqs(&config)?;
        }
        self.validated(config)
    }

    /// The Llama-3 RoPE scaling that `rope_freqs.weight` (llama.cpp's divisor of each rotary
    /// frequency; absent: no scaling) stands for, given `config`'s theta and head dim: parameters
    /// whose frequencies equal theta-frequency / stored divisor for every rotary dimension within
    /// f32 rounding ([`rope_freqs::FREQ_TOLERANCE`], relative), so the model computes what
    /// llama.cpp does. The file is refused when no parameters do.
    fn rope_freqs(&self, config: &ModelConfig) -> Result<Option<RopeScaling>, SourceError> {
        let Some(info) = self.g.tensor(spec::ROPE_FREQS) else {
            return Ok(None);
        };
        let half = config.head_dim / 2;
        if info.dtype != DType::F32 || info.shape != [half] {
            return Err(self.bad(format!(
                "{} is {} of shape {:?}; expected F32 of shape [{half}] (head_dim / 2)",
                spec::ROPE_FREQS,
                info.dtype,
                info.shape
            )));
        }
        let divisors =
            gguf::dequantize(DType::F32, self.g.bytes(info), half).map_err(|source| {
                SourceError::Gguf {
                    path: self.path.to_path_buf(),
                    source,
                }
            })?;
        rope_freqs::llama3_from_divisors(config.rope_theta, config.head_dim, &divisors).ok_or_else(
            || {
                self.bad(format!(
                    "{}: no Llama-3 RoPE scaling (factor, low/high frequency factors, original \
                     context) reproduces its {half} divisors {} .. {} with theta {} and head dim \
                     {}; its frequencies cannot be run exactly",
                    spec::ROPE_FREQS,
                    divisors.first().copied().unwrap_or(f32::NAN),
                    divisors.last().copied().unwrap_or(f32::NAN),
                    config.rope_theta,
                    config.head_dim
                ))
            },
        )
    }

    /// The config of a recurrent GGUF: the block type, the recurrence keys and Llama-3 RoPE
    /// scaling first, then the keys it shares with `llama` (which must be integers when present).
    fn recurrent_config(&self) -> Result<ModelConfig, SourceError> {
        let family = self.block_type()?;
        let (n_layers, recurrent) = self.recurrent_shape()?;
        let rope_scaling = self.llama3_scaling()?;
        let hidden = self.need("embedding_length")?;
        let n_heads = self.need("attention.head_count")?;
        let config = ModelConfig {
            family,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads: match self.g.get(&self.key("attention.head_count_kv")) {
                None => n_heads,
                Some(_) => self.need("attention.head_count_kv")?,
            },
            head_dim: match self.g.get(&self.key("attention.key_length")) {
                None if n_heads > 0 => hidden / n_heads,
                _ => self.need("attention.key_length")?,
            },
            ffn: self.need("feed_forward_length")?,
            vocab: self.need("vocab_size")?,
            rope_theta: self.float_or("rope.freq_base", 10000.0),
            rope_scaling,
            tied: false,
            norm_eps: self.float_or("attention.layer_norm_rms_epsilon", 1e-5),
            max_position: self.optional("context_length"),
            bos_token_id: self.token_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: self.token_id("tokenizer.ggml.eos_token_id"),
            torch_dtype: None,
            recurrent: Some(recurrent),
        };
        self.validated(config)
    }

    /// The family of a recurrent GGUF's blocks.
    fn block_type(&self) -> Result<Family, SourceError> {
        match self.g.get_str(spec::KEY_BLOCK_TYPE) {
            Some("llama") => Ok(Family::Llama),
            Some("olmo2") => Ok(Family::Olmo2),
            other => Err(self.bad(format!(
                "{} is {other:?}; expected \"llama\" or \"olmo2\"",
                spec::KEY_BLOCK_TYPE
            ))),
        }
    }

    /// The block count and recurrent shape of a recurrent GGUF: injection, prelude, core and
    /// coda (which must add up to the block count, with a core), state noise and recurrence.
    fn recurrent_shape(&self) -> Result<(usize, RecurrentShape), SourceError> {
        let adapter = match self.g.get_str(spec::KEY_INJECTION) {
            Some("linear") => true,
            Some("none") => false,
            other => {
                return Err(self.bad(format!(
                    "{} is {other:?}; expected \"linear\" or \"none\"",
                    spec::KEY_INJECTION
                )))
            }
        };
        let (prelude, core, coda) = (
            self.int(spec::KEY_PRELUDE)?,
            self.int(spec::KEY_CORE)?,
            self.int(spec::KEY_CODA)?,
        );
        let n_layers = self.need("block_count")?;
        if core == 0
            || prelude.checked_add(core).and_then(|n| n.checked_add(coda)) != Some(n_layers)
        {
            return Err(self.bad(format!(
                "block counts prelude {prelude} + core {core} + coda {coda} must be block_count \
                 {n_layers}, with a core of at least one block"
            )));
        }
        let state_std = match self.g.get(spec::KEY_STATE_SIGMA) {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .map(shortest_f32)
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| {
                    self.bad(format!("{} must be a float >= 0", spec::KEY_STATE_SIGMA))
                })?,
        };
        let shape = RecurrentShape {
            prelude,
            core,
            coda,
            mean_recurrence: self
                .g
                .get_u64(spec::KEY_RECURRENCE)
                .map_or(32, |r| r as usize),
            mean_backprop_depth: 8,
            adapter,
            state_std,
        };
        Ok((n_layers, shape))
    }

    /// Llama-3 RoPE scaling, which is there when its factor is (spec section 2.2).
    fn llama3_scaling(&self) -> Result<Option<RopeScaling>, SourceError> {
        if self.g.get(spec::KEY_ROPE_LLAMA3_FACTOR).is_none() {
            return Ok(None);
        }
        let float = |k: &str| {
            self.g
                .get_f64(k)
                .map(shortest_f32)
                .ok_or_else(|| self.bad(format!("missing or non-float GGUF key {k}")))
        };
        Ok(Some(RopeScaling {
            factor: float(spec::KEY_ROPE_LLAMA3_FACTOR)?,
            low_freq_factor: float(spec::KEY_ROPE_LLAMA3_LOW)?,
            high_freq_factor: float(spec::KEY_ROPE_LLAMA3_HIGH)?,
            original_max_position_embeddings: self.int(spec::KEY_ROPE_LLAMA3_ORIG_CTX)?,
        }))
    }
}

/// The tensors of a GGUF being opened, taken one role at a time: a missing one is refused, and
/// once every role has its tensor, so is any tensor that none took (dropping it silently would
/// lose part of the model).
struct GgufTensors<'a> {
    g: &'a GgufFile,
    path: &'a Path,
    /// The names of the tensors taken so far.
    seen: HashSet<String>,
}

impl<'a> GgufTensors<'a> {
    /// None taken yet.
    fn new(g: &'a GgufFile, path: &'a Path) -> GgufTensors<'a> {
        GgufTensors {
            g,
            path,
            seen: HashSet::new(),
        }
    }

    /// Tensor `name` for `role`; `unpermute_heads` as in [`TensorRef::unpermute_heads`].
    fn take(
        &mut self,
        name: String,
        role: Role,
        unpermute_heads: Option<usize>,
    ) -> Result<TensorRef, SourceError> {
        let Some(info) = self.g.tensor(&name) else {
            return Err(SourceError::MissingTensor {
                path: self.path.to_path_buf(),
                name,
                role,
            });
        };
        self.seen.insert(name.clone());
        Ok(TensorRef::gguf(name, info, unpermute_heads))
    }

    /// Refuses the first tensor of the file that no role took, other than `allowed`; `family`
    /// names the architecture in the error.
    fn refuse_untaken(
        &self,
        allowed: Option<&str>,
        family: &'static str,
    ) -> Result<(), SourceError> {
        let untaken = |name: &String| !self.seen.contains(name) && Some(name.as_str()) != allowed;
        match self.g.tensors.iter().find(|t| untaken(&t.name)) {
            Some(extra) => Err(SourceError::UnexpectedTensor {
                path: self.path.to_path_buf(),
                name: extra.name.clone(),
                family,
            }),
            None => Ok(()),
        }
    }

    /// The tensors of a stock `llama` or `olmo2` GGUF: each role under llama.cpp's name. A
    /// `llama` file's Q and K rows are in llama.cpp's order (undone when read) and its
    /// `rope_freqs`, already read into the config's RoPE scaling, is allowed beside them; an
    /// `olmo2` file's are not permuted: convert_hf_to_gguf.py's `Olmo2Model` keeps the Hugging
    /// Face rows, and llama.cpp runs OLMo-2 with NEOX-style RoPE, which is that order.
    fn stock(mut self, config: &ModelConfig) -> Result<BTreeMap<Role, TensorRef>, SourceError> {
        let permuted = config.family == Family::Llama;
        let mut tensors = BTreeMap::new();
        for role in arch::required_roles(config) {
            let name = match role {
                Role::Layer(i, r) => spec::block_tensor(i, r),
                _ => Naming::Gguf.name(role),
            };
            let unpermute_heads = match role {
                Role::Layer(_, LayerRole::Q) if permuted => Some(config.n_heads),
                Role::Layer(_, LayerRole::K) if permuted => Some(config.n_kv_heads),
                _ => None,
            };
            tensors.insert(
                role,
                self.take(name.unwrap_or_default(), role, unpermute_heads)?,
            );
        }
        let rope_freqs = permuted.then_some(spec::ROPE_FREQS);
        self.refuse_untaken(rope_freqs, config.family.name())?;
        Ok(tensors)
    }

    /// The tensors of a recurrent GGUF (see [`open_recurrent_gguf`]); `rope_freqs` is allowed
    /// beside them when the config has Llama-3 RoPE scaling, which the reader computes.
    fn recurrent(mut self, config: &ModelConfig) -> Result<BTreeMap<Role, TensorRef>, SourceError> {
        let mut tensors = BTreeMap::new();
        for role in arch::required_roles(config) {
            let t = match role {
                Role::Embed => self.take(spec::TOKEN_EMBD.into(), role, None)?,
                Role::FinalNorm => self.take(spec::OUTPUT_NORM.into(), role, None)?,
                Role::Adapter => self.take(spec::ADAPTER.into(), role, None)?,
                // No output.weight: the output shares token_embd (tied), as in llama.cpp.
                Role::LmHead if self.g.tensor(spec::OUTPUT).is_none() => {
                    self.take(spec::TOKEN_EMBD.into(), role, None)?
                }
                Role::LmHead => self.take(spec::OUTPUT.into(), role, None)?,
                Role::Layer(i, fused @ (LayerRole::Qkv | LayerRole::GateUp)) => {
                    self.fused(config, i, fused)?
                }
                Role::Layer(i, r) => {
                    self.take(spec::block_tensor(i, r).unwrap_or_default(), role, None)?
                }
            };
            tensors.insert(role, t);
        }
        let rope_freqs = config.rope_scaling.is_some().then_some(spec::ROPE_FREQS);
        self.refuse_untaken(rope_freqs, spec::ARCH)?;
        Ok(tensors)
    }

    /// Fused role `fused` of block `i`: its parts' tensors (q, k, v or gate, up), each of the
    /// shape the config implies, as one tensor of their rows.
    fn fused(
        &mut self,
        config: &ModelConfig,
        i: usize,
        fused: LayerRole,
    ) -> Result<TensorRef, SourceError> {
        // Llama blocks are stored with llama.cpp's Q/K row order; OLMo-2 blocks are not permuted
        // (llama.cpp runs OLMo-2 with NEOX-style RoPE, which is the Hugging Face order).
        let permuted = config.family == Family::Llama;
        let mut parts = Vec::new();
        for part in fused.parts() {
            let heads = match part {
                LayerRole::Q if permuted => Some(config.n_heads),
                LayerRole::K if permuted => Some(config.n_kv_heads),
                _ => None,
            };
            let name = spec::block_tensor(i, part).unwrap_or_default();
            let t = self.take(name, Role::Layer(i, part), heads)?;
            let want = arch::expected_shape(config, Role::Layer(i, part));
            if t.shape != want {
                return Err(SourceError::ShapeMismatch {
                    path: self.path.to_path_buf(),
                    name: t.name,
                    got: t.shape,
                    want,
                });
            }
            parts.push(t);
        }
        Ok(TensorRef::rows_of(parts))
    }
}

/// The SourceModel of a GGUF file whose config and tensor index are built and checked.
fn gguf_source(
    path: &Path,
    config: ModelConfig,
    tensors: BTreeMap<Role, TensorRef>,
    g: GgufFile,
    tokens: Option<usize>,
) -> Result<SourceModel, SourceError> {
    check_shapes(path, &config, &tensors)?;
    let root = folder_of(path);
    let files = vec![file_entry(&root, path)?];
    let tokenizer = g
        .get_str("tokenizer.ggml.model")
        .map(|model| TokenizerInfo {
            kind: format!("gguf {model}"),
            vocab: tokens,
            files: vec![],
        });
    check_tokenizer(path, &config, tokenizer.as_ref())?;
    Ok(SourceModel {
        path: path.to_path_buf(),
        root,
        format: SourceFormat::Gguf,
        config,
        files,
        tensors,
        tokenizer,
        storage: Storage::Gguf(Box::new(g)),
    })
}
