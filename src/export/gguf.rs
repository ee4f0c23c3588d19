//! `surgery export gguf`: any checkpoint [`SourceModel`] opens to a GGUF v3 file, streamed one
//! chunk of one tensor at a time through [`GgufWriter`].
//!
//! Two architectures (DESIGN.md decision 10):
//!
//! - `huginn_raven`, ours (schemas/gguf-recurrent.md): the unique prelude, core and coda blocks
//!   as `blk.N`, the adapter, and the keys that say how to loop them. Our runtime reads it back.
//! - `llama`, stock llama.cpp's, written only where it is exact: any static Llama-family model;
//!   a recurrent model without injection, its core unrolled `--recurrence` times; a recurrent
//!   model whose adapter is exactly `[0 | I]` (the state is ignored, so every r computes the
//!   pruned model), its core written once. Anything else is refused with the reason.
//!
//! Both use llama.cpp's tensor names, its Q/K row order for Llama blocks, llama-quantize's
//! choice of types per tensor ([`QuantType`]) and `rope_freqs.weight` for Llama-3 RoPE scaling.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::arch::{expected_shape, spec, LayerRole, Role};
use crate::dtype::DType;
use crate::export::mix::{QuantType, TensorKind};
use crate::export::rows::{chunks, rows_cols, source_bytes, stream_rows, RowOrder};
use crate::export::ExportError;
use crate::formats::gguf::{GgufError, GgufWriter, TensorHeader, Value};
use crate::formats::hf_config::{Family, ModelConfig, RecurrentShape};
use crate::progress::Progress;
use crate::source::SourceModel;
use crate::tokenizer::vocab::tokenizer_metadata;

/// `general.quantization_version`: ggml's `GGML_QNT_VERSION`.
const QUANTIZATION_VERSION: u32 = 2;
/// `context_length` when the source does not say (llama.cpp requires the key).
const DEFAULT_CONTEXT: usize = 4096;

/// The GGUF architecture to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GgufArch {
    /// Ours: `huginn_raven` (schemas/gguf-recurrent.md).
    Recurrent,
    /// Stock llama.cpp `llama`.
    Llama,
}

impl FromStr for GgufArch {
    type Err = String;

    fn from_str(s: &str) -> Result<GgufArch, String> {
        match s {
            "recurrent" => Ok(GgufArch::Recurrent),
            "llama" => Ok(GgufArch::Llama),
            _ => Err(format!(
                "unknown --arch {s:?} (expected recurrent or llama)"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GgufOptions {
    pub quant: QuantType,
    /// None: `recurrent` for a recurrent checkpoint, `llama` for a static one.
    pub arch: Option<GgufArch>,
    /// `--arch llama`: how many times to unroll a core without injection. `--arch recurrent`:
    /// the file's default test-time recurrence (else the checkpoint's mean recurrence).
    pub recurrence: Option<usize>,
    /// Replace an existing output file.
    pub force: bool,
}

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufReport {
    pub out: PathBuf,
    pub arch: String,
    #[serde(rename = "type")]
    pub quant: String,
    pub tensors: usize,
    pub block_count: usize,
    /// Tensors per type name.
    pub types: BTreeMap<String, usize>,
    pub file_bytes: u64,
    /// Bytes of source tensor data read (a core unrolled r times is read r times).
    pub source_bytes: u64,
    pub notes: Vec<String>,
}

/// One output tensor: its header, and where its rows come from.
struct Job {
    header: TensorHeader,
    src: JobSource,
}

enum JobSource {
    /// Rows `start..start + rows` of the source tensor of `role`, in `order`.
    Rows {
        role: Role,
        start: usize,
        order: RowOrder,
    },
    /// Values computed here (`rope_freqs`).
    Values(Vec<f32>),
}

/// The output blocks, each the index of a source block, and the metadata that depends on them.
struct Layout {
    arch: GgufArch,
    blocks: Vec<usize>,
    /// Whether source blocks store fused `Qkv` / `GateUp` (the recurrent layout).
    fused: bool,
    recurrent: Option<(RecurrentShape, usize)>,
    notes: Vec<String>,
}

/// Writes `source` as a GGUF file at `out` (through `out.partial`, renamed at the end).
pub fn export_gguf(
    source: &SourceModel,
    out: &Path,
    opts: &GgufOptions,
    progress: &mut dyn Progress,
) -> Result<GgufReport, ExportError> {
    let c = &source.config;
    refuse_unsupported_family(c)?;
    crate::paths::check_new_output(out, &source.inputs(), opts.force)?;
    let layout = layout(source, opts)?;
    let jobs = jobs(source, &layout, opts.quant)?;
    let (tokenizer, mut notes) = tokenizer_metadata(source, c.vocab)?;
    notes.splice(0..0, layout.notes.iter().cloned());
    notes.extend(requantize_note(source, &jobs));
    if c.max_position.is_none() {
        notes.push(format!(
            "the source does not give its context length; {DEFAULT_CONTEXT} is written"
        ));
    }
    let metadata = metadata(source, &layout, opts.quant, tokenizer);
    let headers: Vec<TensorHeader> = jobs.iter().map(|j| j.header.clone()).collect();

    let total: u64 = jobs.iter().map(|j| job_source_bytes(source, j)).sum();
    progress.start("exporting", total);
    // Missing parents are made (as apply and heal make them) and removed again on failure.
    let staging = crate::atomic::Staging::file(out)
        .map_err(|(path, source)| ExportError::Io { path, source })?;
    let written = (|| {
        let mut writer = GgufWriter::create(out, &metadata, &headers)?;
        let mut done = 0u64;
        for job in &jobs {
            write_job(source, job, &mut writer, &mut |n| {
                progress.advance(done + n)
            })?;
            done += job_source_bytes(source, job);
        }
        Ok::<_, ExportError>(writer.finish()?)
    })();
    if written.is_err() {
        staging.abandon();
    }
    let file_bytes = written?;
    progress.finish();

    let mut types = BTreeMap::new();
    for h in &headers {
        *types.entry(h.dtype.name().to_string()).or_insert(0) += 1;
    }
    Ok(GgufReport {
        out: out.to_path_buf(),
        arch: arch_name(layout.arch).into(),
        quant: opts.quant.to_string(),
        tensors: headers.len(),
        block_count: layout.blocks.len(),
        types,
        file_bytes,
        source_bytes: total,
        notes,
    })
}

/// The note for a source whose quantized tensors are quantized again to another type (a
/// quantized GGUF exported with `--type q8_0`): each is dequantized and rounded anew, so the
/// output's error is the source's plus the new type's. Tensors already of the wanted type are
/// copied as stored and not counted.
fn requantize_note(source: &SourceModel, jobs: &[Job]) -> Option<String> {
    let mut pairs: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for job in jobs {
        let want = job.header.dtype;
        let JobSource::Rows { role, .. } = &job.src else {
            continue;
        };
        let Some(t) = source.tensor(*role) else {
            continue;
        };
        let leaves = if t.parts.is_empty() {
            std::slice::from_ref(t)
        } else {
            &t.parts[..]
        };
        let from = leaves
            .iter()
            .map(|p| p.dtype)
            .find(|&d| d.is_quantized() && d != want);
        if let (Some(from), true) = (from, want.is_quantized()) {
            *pairs.entry((from.name(), want.name())).or_insert(0) += 1;
        }
    }
    if pairs.is_empty() {
        return None;
    }
    let total: usize = pairs.values().sum();
    let each: Vec<String> = pairs
        .iter()
        .map(|((from, to), n)| format!("{n} {from} to {to}"))
        .collect();
    Some(format!(
        "the source is already quantized: {total} tensors are requantized ({}), each \
         dequantized and rounded again, so their error adds to the source's; export from an \
         unquantized checkpoint where there is one",
        each.join(", ")
    ))
}

fn arch_name(arch: GgufArch) -> &'static str {
    match arch {
        GgufArch::Recurrent => spec::ARCH,
        GgufArch::Llama => "llama",
    }
}

/// Which blocks go out, or why the request cannot be met exactly.
fn layout(source: &SourceModel, opts: &GgufOptions) -> Result<Layout, ExportError> {
    let c = &source.config;
    let arch = opts.arch.unwrap_or(match c.recurrent {
        Some(_) => GgufArch::Recurrent,
        None => GgufArch::Llama,
    });
    if opts.recurrence == Some(0) {
        return Err(ExportError::Refused(
            "--recurrence 0 is not a recurrence: the core runs r >= 1 times".into(),
        ));
    }
    let Some(shape) = c.recurrent else {
        return static_layout(source, arch, opts.recurrence);
    };
    if arch == GgufArch::Recurrent {
        let r = opts.recurrence.unwrap_or(shape.mean_recurrence);
        return Ok(Layout {
            arch,
            blocks: (0..c.n_layers).collect(),
            fused: true,
            recurrent: Some((shape, r)),
            notes: Vec::new(),
        });
    }
    refuse_non_llama(c, "this recurrent")?;
    let (blocks, notes) = llama_blocks(source, shape, opts.recurrence)?;
    Ok(Layout {
        arch,
        blocks,
        fused: true,
        recurrent: None,
        notes,
    })
}

/// A static model's blocks, all of them: only `llama` can hold them.
fn static_layout(
    source: &SourceModel,
    arch: GgufArch,
    recurrence: Option<usize>,
) -> Result<Layout, ExportError> {
    let c = &source.config;
    if arch == GgufArch::Recurrent {
        return Err(ExportError::Refused(format!(
            "{} is a static model; --arch recurrent needs a recurrent checkpoint (make one \
             with `surgery apply`), and --arch llama exports this one as it is",
            source.path.display()
        )));
    }
    refuse_non_llama(c, "a static")?;
    let mut notes = Vec::new();
    if recurrence.is_some() {
        notes.push("a static model has no recurrence; --recurrence is ignored".into());
    }
    Ok(Layout {
        arch,
        blocks: (0..c.n_layers).collect(),
        fused: false,
        recurrent: None,
        notes,
    })
}

/// The static stack of blocks that computes a recurrent model of `shape` exactly, as `llama`
/// needs, and notes for the user; refused where there is none.
fn llama_blocks(
    source: &SourceModel,
    shape: RecurrentShape,
    recurrence: Option<usize>,
) -> Result<(Vec<usize>, Vec<String>), ExportError> {
    let (p, k) = (shape.prelude, shape.coda);
    let core = p..p + shape.core;
    let coda = p + shape.core..p + shape.core + k;
    let mut notes = Vec::new();
    let blocks: Vec<usize> = if !shape.adapter {
        // No injection: s_0 = e and s_i = core(s_{i-1}), a plain stack of P + r C + K blocks.
        let Some(r) = recurrence else {
            return Err(ExportError::Refused(
                "--arch llama unrolls a core without injection into a static stack: give \
                 --recurrence R, the number of core passes to write"
                    .into(),
            ));
        };
        (0..p)
            .chain((0..r).flat_map(|_| core.clone()))
            .chain(coda)
            .collect()
    } else {
        let distance = adapter_distance_from_identity(source)?;
        if distance != 0.0 {
            return Err(ExportError::Refused(format!(
                "--arch llama cannot express this model exactly: its adapter is not [0 | I] \
                 (largest |W - [0 | I]| = {distance:e}), so its output depends on the state and \
                 on r; stock llama.cpp has no looped architecture. Export with --arch recurrent \
                 (schemas/gguf-recurrent.md), which our runtime serves"
            )));
        }
        // [0 | I] ignores the state: s_i = core(e) for every i >= 1, whatever r is.
        if recurrence.is_some() {
            notes.push(
                "the adapter is exactly [0 | I], so every r computes the same model; the core \
                 is written once and --recurrence is ignored"
                    .into(),
            );
        }
        (0..p).chain(core).chain(coda).collect()
    };
    Ok((blocks, notes))
}

/// Refuses the families neither GGUF architecture we write (llama.cpp's `llama`, our recurrent
/// one) nor our llama.cpp patch has blocks for: Qwen2's q/k/v biases and Qwen3's per-head q/k
/// norms would be dropped, and the file would compute another model.
fn refuse_unsupported_family(c: &ModelConfig) -> Result<(), ExportError> {
    match c.family {
        Family::Llama | Family::Olmo2 => Ok(()),
        Family::Qwen2 | Family::Qwen3 => Err(ExportError::Refused(format!(
            "GGUF export of {} blocks is not supported (our GGUF architectures and llama.cpp              patch have Llama and OLMo-2 blocks only); export safetensors instead",
            c.family.name()
        ))),
    }
}

fn refuse_non_llama(c: &ModelConfig, what: &str) -> Result<(), ExportError> {
    if c.family == Family::Llama {
        return Ok(());
    }
    Err(ExportError::Refused(format!(
        "--arch llama needs Llama blocks, and {what} model has {} blocks (post-norms and q/k \
         norms, which llama.cpp's `llama` architecture does not have)",
        c.family.name()
    )))
}

/// Largest |W - [0 | I]| of the adapter, over its exact f32 values.
fn adapter_distance_from_identity(source: &SourceModel) -> Result<f64, ExportError> {
    let t = source
        .tensor(Role::Adapter)
        .ok_or_else(|| ExportError::Convert("the checkpoint has no adapter tensor".into()))?;
    let h = source.config.hidden;
    let w = source.read_f32(t)?;
    Ok(w.iter()
        .enumerate()
        .map(|(i, &v)| {
            let (row, col) = (i / (2 * h), i % (2 * h));
            let target = if col == h + row { 1.0 } else { 0.0 };
            (f64::from(v) - target).abs()
        })
        .fold(0.0, f64::max))
}

/// The blocks' tensors in llama.cpp's names and order.
fn block_roles(family: Family) -> &'static [LayerRole] {
    use LayerRole::*;
    match family {
        Family::Llama => &[AttnNorm, Q, K, V, O, MlpNorm, Gate, Up, Down],
        Family::Olmo2 => &[
            Q,
            K,
            V,
            QNorm,
            KNorm,
            O,
            PostAttnNorm,
            Gate,
            Up,
            Down,
            PostMlpNorm,
        ],
        // Refused before any layout is made (refuse_unsupported_family).
        Family::Qwen2 | Family::Qwen3 => &[],
    }
}

/// Whether the output is the embedding: no lm_head, or one holding the embedding's bytes (a
/// recurrent checkpoint of a tied source stores two equal copies).
fn output_is_tied(source: &SourceModel) -> bool {
    let (Some(embed), Some(head)) = (source.tensor(Role::Embed), source.tensor(Role::LmHead))
    else {
        return true;
    };
    if embed.name == head.name {
        return true;
    }
    let (a, b) = (source.bytes(embed), source.bytes(head));
    embed.dtype == head.dtype && embed.shape == head.shape && !a.is_empty() && a == b
}

/// The output tensors, in llama.cpp's order, each with where its rows come from.
fn jobs(source: &SourceModel, layout: &Layout, quant: QuantType) -> Result<Vec<Job>, ExportError> {
    let c = &source.config;
    let tied = output_is_tied(source);
    let mut list = JobList {
        c,
        quant,
        jobs: Vec::new(),
    };
    list.whole(spec::TOKEN_EMBD, Role::Embed, TensorKind::Embed { tied });
    list.blocks(layout);
    if layout.recurrent.is_some_and(|(s, _)| s.adapter) {
        list.whole(spec::ADAPTER, Role::Adapter, TensorKind::Adapter);
    }
    list.whole(spec::OUTPUT_NORM, Role::FinalNorm, TensorKind::Vector);
    if !tied {
        list.whole(spec::OUTPUT, Role::LmHead, TensorKind::Output);
    }
    let mut jobs = list.jobs;
    if let Some(factors) = llama3_rope_factors(c) {
        // After token_embd, where llama.cpp's converter puts it.
        jobs.insert(
            1,
            Job {
                header: TensorHeader {
                    name: spec::ROPE_FREQS.into(),
                    dtype: DType::F32,
                    shape: vec![factors.len()],
                },
                src: JobSource::Values(factors),
            },
        );
    }
    for job in &jobs {
        if let JobSource::Rows { role, .. } = job.src {
            if source.tensor(role).is_none() {
                return Err(ExportError::Convert(format!(
                    "the checkpoint has no tensor for {role}"
                )));
            }
        }
    }
    Ok(jobs)
}

/// The output tensors read from source rows, as they are listed.
struct JobList<'a> {
    c: &'a ModelConfig,
    quant: QuantType,
    jobs: Vec<Job>,
}

impl JobList<'_> {
    /// Adds tensor `name` of `shape`, read from `src`: a vector stays f32, a matrix gets the type
    /// `quant` picks for its `kind` and width.
    fn push(&mut self, name: String, shape: Vec<usize>, kind: TensorKind, src: JobSource) {
        let (_, cols) = rows_cols(&shape);
        let dtype = if shape.len() == 1 {
            DType::F32
        } else {
            self.quant.tensor_type(kind, cols)
        };
        self.jobs.push(Job {
            header: TensorHeader { name, dtype, shape },
            src,
        });
    }

    /// Adds tensor `name`: the whole tensor of `role`, rows in the Hugging Face order.
    fn whole(&mut self, name: &str, role: Role, kind: TensorKind) {
        let src = JobSource::Rows {
            role,
            start: 0,
            order: RowOrder::Hf,
        };
        self.push(name.into(), expected_shape(self.c, role), kind, src);
    }

    /// Adds the tensors of the output blocks, each read from its source block (from the rows of
    /// a fused `Qkv` / `GateUp` in the recurrent layout).
    fn blocks(&mut self, layout: &Layout) {
        use LayerRole::*;
        let c = self.c;
        let n_blocks = layout.blocks.len();
        // llama.cpp's RoPE rotates adjacent pairs; Llama blocks are permuted into that order.
        let permute = c.family == Family::Llama;
        let head_order = RowOrder::Gguf {
            head_rows: c.head_dim,
        };
        for (out, &src) in layout.blocks.iter().enumerate() {
            for &role in block_roles(c.family) {
                let shape = expected_shape(c, Role::Layer(src, role));
                let (source_role, start) = match (layout.fused, role) {
                    (true, Q) => (Qkv, 0),
                    (true, K) => (Qkv, c.q_dim()),
                    (true, V) => (Qkv, c.q_dim() + c.kv_dim()),
                    (true, Gate) => (GateUp, 0),
                    (true, Up) => (GateUp, c.ffn),
                    (_, r) => (r, 0),
                };
                let order = match role {
                    Q | K if permute => head_order,
                    _ => RowOrder::Hf,
                };
                let kind = match role {
                    V => TensorKind::AttnV {
                        block: out,
                        n_blocks,
                    },
                    Down => TensorKind::FfnDown {
                        block: out,
                        n_blocks,
                    },
                    _ => TensorKind::Matrix,
                };
                let name = spec::block_tensor(out, role).unwrap_or_default();
                let rows = JobSource::Rows {
                    role: Role::Layer(src, source_role),
                    start,
                    order,
                };
                self.push(name, shape, kind, rows);
            }
        }
    }
}

/// Llama-3 RoPE scaling as llama.cpp applies it: one divisor per rotary frequency
/// (convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors`): 1 for short wavelengths,
/// `factor` for long ones, and the smooth interpolation between, `1 / ((1 - s) / factor + s)`.
/// The frequencies are transformers' `_compute_llama3_parameters`, in f32.
pub(crate) fn llama3_rope_factors(c: &ModelConfig) -> Option<Vec<f32>> {
    let s = c.rope_scaling?;
    let dim = c.head_dim;
    let old = s.original_max_position_embeddings as f32;
    let (factor, low, high) = (
        s.factor as f32,
        s.low_freq_factor as f32,
        s.high_freq_factor as f32,
    );
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    let factors = (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / (c.rope_theta as f32).powf(i as f32 / dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    Some(factors)
}

fn job_source_bytes(source: &SourceModel, job: &Job) -> u64 {
    match &job.src {
        JobSource::Rows { role, start, .. } => source.tensor(*role).map_or(0, |t| {
            let (rows, _) = rows_cols(&job.header.shape);
            source_bytes(t, &(*start..start + rows))
        }),
        JobSource::Values(v) => 4 * v.len() as u64,
    }
}

/// Streams one tensor into the writer, a chunk of whole heads (or rows) at a time.
fn write_job(
    source: &SourceModel,
    job: &Job,
    writer: &mut GgufWriter,
    advance: &mut dyn FnMut(u64),
) -> Result<(), ExportError> {
    let (role, start, order) = match &job.src {
        JobSource::Values(values) => {
            let bytes = crate::formats::gguf::quantize(job.header.dtype, values)?;
            writer.write(&bytes)?;
            return Ok(());
        }
        JobSource::Rows { role, start, order } => (*role, *start, *order),
    };
    let t = source
        .tensor(role)
        .ok_or_else(|| ExportError::Convert(format!("the checkpoint has no tensor for {role}")))?;
    let (rows, cols) = rows_cols(&job.header.shape);
    let ranges: Vec<_> = chunks(rows, cols, order.unit())
        .into_iter()
        .map(|c| start + c.start..start + c.end)
        .collect();
    let mut read = 0;
    stream_rows(
        source,
        t,
        &ranges,
        job.header.dtype,
        order,
        &mut |bytes, n| {
            writer.write(bytes)?;
            read += n;
            advance(read);
            Ok::<(), ExportError>(())
        },
    )
    .map_err(|e| match e {
        // A failed write (a full disk) stays an I/O error: exit code 2, not "invalid input".
        ExportError::Gguf(GgufError::Io { path, source }) => ExportError::Io { path, source },
        ExportError::Gguf(e) => {
            ExportError::Convert(format!("tensor {} (from {}): {e}", job.header.name, t.name))
        }
        other => other,
    })
}

/// Every key of the file: `general.*`, the architecture's hyperparameters, the tokenizer.
fn metadata(
    source: &SourceModel,
    layout: &Layout,
    quant: QuantType,
    tokenizer: Vec<(String, Value)>,
) -> Vec<(String, Value)> {
    let c = &source.config;
    let arch = arch_name(layout.arch);
    let mut m = general_metadata(source, arch, quant);
    m.extend(hyperparameters(c, arch, layout.blocks.len()));
    if let Some((shape, r)) = layout.recurrent {
        m.extend(recurrent_metadata(c, shape, r));
    }
    m.extend(tokenizer);
    m
}

/// A count as GGUF stores it (u32, saturating).
fn u32v(n: usize) -> Value {
    Value::U32(u32::try_from(n).unwrap_or(u32::MAX))
}

/// A GGUF string value.
fn string(s: &str) -> Value {
    Value::String(s.to_string())
}

/// The `general.*` keys: ours, and a GGUF source's own description (author, license, ...), which
/// travels with it.
fn general_metadata(source: &SourceModel, arch: &str, quant: QuantType) -> Vec<(String, Value)> {
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), string(arch)),
        ("general.type".into(), string("model")),
        ("general.name".into(), string(&model_name(source))),
    ];
    if let Some(g) = source.gguf() {
        const OURS: &[&str] = &[
            "general.architecture",
            "general.type",
            "general.name",
            "general.file_type",
            "general.quantization_version",
            "general.alignment",
        ];
        m.extend(
            g.metadata
                .iter()
                .filter(|(k, _)| k.starts_with("general.") && !OURS.contains(&k.as_str()))
                .cloned(),
        );
    }
    m.push(("general.file_type".into(), Value::U32(quant.file_type())));
    m.push((
        "general.quantization_version".into(),
        Value::U32(QUANTIZATION_VERSION),
    ));
    m
}

/// The hyperparameters both architectures share, under `arch`'s prefix, for `n_blocks` blocks.
fn hyperparameters(c: &ModelConfig, arch: &str, n_blocks: usize) -> [(String, Value); 12] {
    let k = |suffix: &str| spec::key(arch, suffix);
    [
        (k("vocab_size"), u32v(c.vocab)),
        (
            k("context_length"),
            u32v(c.max_position.unwrap_or(DEFAULT_CONTEXT)),
        ),
        (k("embedding_length"), u32v(c.hidden)),
        (k("block_count"), u32v(n_blocks)),
        (k("feed_forward_length"), u32v(c.ffn)),
        (k("attention.head_count"), u32v(c.n_heads)),
        (k("attention.head_count_kv"), u32v(c.n_kv_heads)),
        (k("attention.key_length"), u32v(c.head_dim)),
        (k("attention.value_length"), u32v(c.head_dim)),
        (k("rope.dimension_count"), u32v(c.head_dim)),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.norm_eps as f32),
        ),
    ]
}

/// The recurrent architecture's own keys (schemas/gguf-recurrent.md): the block type, the
/// recurrent shape with default recurrence `r`, and Llama-3 RoPE scaling when there is some.
fn recurrent_metadata(c: &ModelConfig, shape: RecurrentShape, r: usize) -> Vec<(String, Value)> {
    let mut m = vec![
        (spec::KEY_BLOCK_TYPE.into(), string(c.family.name())),
        (spec::KEY_PRELUDE.into(), u32v(shape.prelude)),
        (spec::KEY_CORE.into(), u32v(shape.core)),
        (spec::KEY_CODA.into(), u32v(shape.coda)),
        (spec::KEY_RECURRENCE.into(), u32v(r)),
        (
            spec::KEY_INJECTION.into(),
            string(if shape.adapter { "linear" } else { "none" }),
        ),
        (
            spec::KEY_STATE_SIGMA.into(),
            Value::F32(shape.state_std as f32),
        ),
    ];
    if let Some(s) = c.rope_scaling {
        m.extend([
            (
                spec::KEY_ROPE_LLAMA3_FACTOR.into(),
                Value::F32(s.factor as f32),
            ),
            (
                spec::KEY_ROPE_LLAMA3_LOW.into(),
                Value::F32(s.low_freq_factor as f32),
            ),
            (
                spec::KEY_ROPE_LLAMA3_HIGH.into(),
                Value::F32(s.high_freq_factor as f32),
            ),
            (
                spec::KEY_ROPE_LLAMA3_ORIG_CTX.into(),
                u32v(s.original_max_position_embeddings),
            ),
        ]);
    }
    m
}

/// `general.name`: the source GGUF's, else the checkpoint's directory or file name.
fn model_name(source: &SourceModel) -> String {
    if let Some(name) = source.gguf().and_then(|g| g.get_str("general.name")) {
        return name.to_string();
    }
    let path = if source.path.is_dir() {
        source.path.as_path()
    } else {
        source.path.parent().unwrap_or(&source.path)
    };
    path.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into())
}
