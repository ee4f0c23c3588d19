//! Executes a [`Plan`]: streams the source tensors into the recurrent layout (DESIGN.md decisions
//! 4-6). Copies are byte copies out of the memory map; fused tensors are byte concatenations; only
//! conversions and new tensors are computed, a bounded chunk of rows at a time. Everything is
//! written into `OUT.partial-<pid>/` and renamed to OUT at the end, manifest last.

pub mod check;
pub mod init;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::dtype::DType;
use crate::formats::gguf::GgufFile;
use crate::formats::hf_config;
use crate::formats::safetensors::{Entry, Shards};
use crate::manifest::{self, HashingWriter, ManifestEntry};
use crate::plan::{OutputFile, Plan, PlanError, SourceRef, TensorSpec, Transform};
use crate::progress::Progress;
use crate::source::decode_rows;

use check::SourceFiles;

/// Bytes per chunk when copying or converting: bounds memory whatever the tensor's size.
const CHUNK_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The plan is incomplete or inconsistent.
    #[error("invalid plan: {0}")]
    Plan(#[from] PlanError),
    /// A source file is not the one the plan was made from.
    #[error("source file {path} changed since the plan was made: {reason}")]
    SourceChanged { path: PathBuf, reason: String },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A path the plan or the user gave is not allowed (outside the source, overlapping it, an
    /// existing output without --force).
    #[error(transparent)]
    Path(#[from] crate::paths::PathError),
    /// A conversion failed (a corrupt quantized block, a tokenizer that cannot be built).
    #[error("{0}")]
    Convert(String),
    /// A source tensor holds NaN or Inf values and `strict` was asked for.
    #[error("tensor {tensor:?} would receive {count} non-finite values (NaN or Inf) from the source; refusing under --strict")]
    NonFinite { tensor: String, count: u64 },
}

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Largest shard in bytes (tensor data); above it the checkpoint is sharded.
    pub max_shard_bytes: u64,
    /// Replace an existing output.
    pub force: bool,
    /// Refuse a source whose tensors hold NaN or Inf (else they are copied and reported).
    pub strict: bool,
}

/// An output tensor that received NaN or Inf values from its source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NonFinite {
    pub tensor: String,
    pub count: u64,
}

/// What `apply` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyReport {
    pub out: PathBuf,
    pub shards: usize,
    pub tensors: usize,
    pub tensor_bytes: u64,
    pub files: Vec<ManifestEntry>,
    /// Output tensors holding NaN or Inf copied from the source (refused under `strict`).
    pub nonfinite: Vec<NonFinite>,
}

/// Applies `plan` (whose exact bytes are `plan_bytes`, recorded as plan.json) into `out`.
pub fn apply(
    plan: &Plan,
    plan_bytes: &[u8],
    out: &Path,
    opts: &ApplyOptions,
    progress: &mut dyn Progress,
) -> Result<ApplyReport, ApplyError> {
    plan.validate()?;
    crate::paths::check_new_output(out, &check::inputs(plan), opts.force)?;
    let sources = check::source(plan)?;
    let io = |path, source| ApplyError::Io { path, source };
    // The source's sha256 is checked on the second core while the output is written; nothing is
    // published unless it matches.
    let report = crate::atomic::Staging::write_dir(out, opts.force, io, |partial| {
        std::thread::scope(|scope| {
            let hashes = scope.spawn(|| check::source_hashes(plan));
            let written = write_all(plan, plan_bytes, &sources, partial, opts, progress);
            let hashed = hashes.join().unwrap_or_else(|_| {
                Err(ApplyError::Convert(
                    "the source hashing thread panicked".into(),
                ))
            });
            hashed.and(written)
        })
    })?;
    Ok(ApplyReport {
        out: out.to_path_buf(),
        ..report
    })
}

fn tensor_bytes(t: &TensorSpec) -> u64 {
    entry(t).bytes()
}

fn entry(t: &TensorSpec) -> Entry {
    Entry {
        name: t.name.clone(),
        dtype: t.dtype.0,
        shape: t.shape.clone(),
    }
}

/// Writes the shards, then the files that describe them ([`write_small_files`]), into `dir`.
fn write_all(
    plan: &Plan,
    plan_bytes: &[u8],
    sources: &SourceFiles,
    dir: &Path,
    opts: &ApplyOptions,
    progress: &mut dyn Progress,
) -> Result<ApplyReport, ApplyError> {
    let shards = Shards::new(
        plan.tensors.iter().map(entry).collect(),
        opts.max_shard_bytes,
    );
    let total = shards.total_bytes();
    let mut files = Vec::new();
    progress.start("writing", total);
    let mut writer = ShardWriter {
        sources,
        strict: opts.strict,
        progress,
        done: 0,
        nonfinite: Vec::new(),
    };
    for i in 0..shards.len() {
        files.push(writer.shard(dir, &shards, i, &plan.tensors[shards.range(i)])?);
    }
    let nonfinite = writer.nonfinite;
    progress.finish();
    write_small_files(plan, plan_bytes, &shards, dir, &mut files)?;
    Ok(ApplyReport {
        out: dir.to_path_buf(),
        shards: shards.len(),
        tensors: plan.tensors.len(),
        tensor_bytes: total,
        files,
        nonfinite,
    })
}

/// Writes the shards of the output, each hashed on another thread as it is written, with the
/// progress of the bytes written and the tensors that received NaN or Inf.
struct ShardWriter<'a> {
    sources: &'a SourceFiles,
    /// Refuse NaN or Inf from the source rather than report it.
    strict: bool,
    progress: &'a mut dyn Progress,
    /// Tensor bytes written so far, over all shards.
    done: u64,
    nonfinite: Vec<NonFinite>,
}

impl<'a> ShardWriter<'a> {
    /// Writes shard `i` of `shards`, which holds `tensors`, into `dir`; returns its manifest
    /// entry.
    fn shard(
        &mut self,
        dir: &Path,
        shards: &Shards,
        i: usize,
        tensors: &'a [TensorSpec],
    ) -> Result<ManifestEntry, ApplyError> {
        let name = shards.name(i);
        let path = dir.join(&name);
        let io = |source| ApplyError::Io {
            path: path.clone(),
            source,
        };
        let file = File::create(&path).map_err(io)?;
        let sources = self.sources;
        let (bytes, sha256) = std::thread::scope(|scope| -> Result<(u64, String), ApplyError> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(4);
            let hasher = scope.spawn(move || hash_chunks(rx, sources));
            let mut sink = Sink {
                file: BufWriter::with_capacity(1 << 20, file),
                hasher: tx,
                written: 0,
            };
            sink.owned(shards.header(i)).map_err(io)?;
            for t in tensors {
                self.tensor(t, &mut sink).map_err(|e| match e {
                    ApplyError::Io { source, .. } => io(source),
                    other => other,
                })?;
            }
            let Sink {
                file,
                hasher: tx,
                written,
            } = sink;
            drop(tx);
            file.into_inner()
                .map_err(|e| io(e.into_error()))?
                .sync_all()
                .map_err(io)?;
            let sha = hasher
                .join()
                .map_err(|_| ApplyError::Convert("the output hashing thread panicked".into()))?;
            Ok((written, sha))
        })?;
        Ok(ManifestEntry {
            path: name,
            bytes,
            sha256,
        })
    }

    /// Writes tensor `t` into `sink`, and checks that it wrote the bytes `t` takes. NaN or Inf
    /// taken from the source is refused under `strict`, else reported.
    fn tensor(&mut self, t: &'a TensorSpec, sink: &mut Sink<'a>) -> Result<(), ApplyError> {
        let before = sink.written;
        let bad = write_tensor(t, self.sources, sink, &mut |n| {
            self.progress.advance(self.done + n)
        })?;
        if bad > 0 {
            let tensor = t.name.clone();
            if self.strict {
                return Err(ApplyError::NonFinite { tensor, count: bad });
            }
            self.nonfinite.push(NonFinite { tensor, count: bad });
        }
        let wrote = sink.written - before;
        if wrote != tensor_bytes(t) {
            return Err(ApplyError::Convert(format!(
                "tensor {:?}: wrote {wrote} bytes, expected {}",
                t.name,
                tensor_bytes(t)
            )));
        }
        self.done += wrote;
        Ok(())
    }
}

/// Writes the files that describe the tensors, after them ([`manifest::write_described`]):
/// config.json recording the plan's sha256 (made publishable: `auto_map`, no local paths, which
/// plan.json keeps), the Python files that load it in transformers, the plan's other files and
/// plan.json. Their entries join `files`.
fn write_small_files(
    plan: &Plan,
    plan_bytes: &[u8],
    shards: &Shards,
    dir: &Path,
    files: &mut Vec<ManifestEntry>,
) -> Result<(), ApplyError> {
    let mut config = plan.config.clone();
    config["surgery"]["plan_sha256"] = json!(manifest::sha256_bytes(plan_bytes));
    hf_config::publishable(&mut config);
    let mut small = vec![("config.json".to_string(), manifest::pretty_json(&config))];
    small.extend(hf_config::transformers_files(&config));
    for f in &plan.files {
        small.push((f.name().to_string(), output_file(plan, f)?));
    }
    small.push(("plan.json".into(), plan_bytes.to_vec()));
    manifest::write_described(dir, shards, small, files)
        .map_err(|(path, source)| ApplyError::Io { path, source })
}

/// The bytes of a non-weight output file.
fn output_file(plan: &Plan, f: &OutputFile) -> Result<Vec<u8>, ApplyError> {
    let root = PathBuf::from(&plan.source.root);
    match f {
        OutputFile::Copy { source, .. } => {
            let path = root.join(source);
            crate::paths::read(&path).map_err(|source| ApplyError::Io { path, source })
        }
        OutputFile::GgufTokenizer { .. } | OutputFile::GgufTokenizerConfig { .. } => {
            let path = root.join(plan.source.files.first().map_or("", |f| f.path.as_str()));
            let g = GgufFile::open(&path)
                .map_err(|e| ApplyError::Convert(format!("{}: {e}", path.display())))?;
            let value = match f {
                OutputFile::GgufTokenizer { .. } => {
                    crate::tokenizer::gguf::tokenizer_json_from_gguf(&g)
                        .map_err(|e| ApplyError::Convert(format!("{}: {e}", path.display())))?
                }
                _ => crate::tokenizer::gguf::tokenizer_config_json_from_gguf(&g),
            };
            Ok(manifest::pretty_json(&value))
        }
    }
}

/// Bytes on their way into a shard: written by the main thread, hashed by another.
enum Chunk<'a> {
    /// Bytes of a source map, released once hashed (see [`SourceFiles::release`]).
    Mapped(&'a SourceRef, usize, &'a [u8]),
    Owned(Vec<u8>),
}

/// Hashes the chunks of one shard in order; returns the hex sha256.
fn hash_chunks(rx: std::sync::mpsc::Receiver<Chunk>, sources: &SourceFiles) -> String {
    let mut hasher = HashingWriter::new(std::io::sink());
    for chunk in rx {
        let bytes = match &chunk {
            Chunk::Mapped(_, _, bytes) => *bytes,
            Chunk::Owned(bytes) => bytes,
        };
        let _ = hasher.write_all(bytes);
        if let Chunk::Mapped(s, offset, bytes) = chunk {
            sources.release(s, offset, bytes.len());
        }
    }
    hasher.finish().2
}

/// The writing end of a shard: the file, and the channel to its hashing thread.
struct Sink<'a> {
    file: BufWriter<File>,
    hasher: std::sync::mpsc::SyncSender<Chunk<'a>>,
    written: u64,
}

impl<'a> Sink<'a> {
    fn mapped(&mut self, s: &'a SourceRef, offset: usize, bytes: &'a [u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.written += bytes.len() as u64;
        self.send(Chunk::Mapped(s, offset, bytes))
    }

    fn owned(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        self.file.write_all(&bytes)?;
        self.written += bytes.len() as u64;
        self.send(Chunk::Owned(bytes))
    }

    fn send(&self, chunk: Chunk<'a>) -> std::io::Result<()> {
        self.hasher
            .send(chunk)
            .map_err(|_| std::io::Error::other("the output hashing thread stopped"))
    }
}

/// Streams one tensor's bytes into `sink`, calling `advance` with the bytes written so far.
/// Returns how many of the values taken from the source are NaN or Inf.
fn write_tensor<'a>(
    t: &'a TensorSpec,
    sources: &'a SourceFiles,
    sink: &mut Sink<'a>,
    advance: &mut dyn FnMut(u64),
) -> Result<u64, ApplyError> {
    match t.transform {
        None => write_init(t, sink, advance).map(|()| 0),
        Some(Transform::Copy | Transform::ConcatRows) => copy_sources(t, sources, sink, advance),
        Some(Transform::Convert | Transform::Dequantize) => {
            convert_sources(t, sources, sink, advance)
        }
    }
}

/// A failed write into the sink; the caller names the shard.
fn sink_io(source: std::io::Error) -> ApplyError {
    ApplyError::Io {
        path: PathBuf::new(),
        source,
    }
}

/// Writes a new tensor (no source) from its init, computed here.
fn write_init(
    t: &TensorSpec,
    sink: &mut Sink<'_>,
    advance: &mut dyn FnMut(u64),
) -> Result<(), ApplyError> {
    let out = t.dtype.0;
    let start = sink.written;
    let init = t
        .init
        .as_ref()
        .ok_or_else(|| ApplyError::Convert(format!("tensor {:?} has no init", t.name)))?;
    let (rows, cols) = (
        t.shape.first().copied().unwrap_or(0),
        t.shape.get(1).copied().unwrap_or(1),
    );
    let values = init::values(init, rows, cols).map_err(ApplyError::Convert)?;
    let encoded = encode(out, &values)?;
    // A computed tensor is never written with NaN or Inf: an init scale that overflows
    // the output type is refused, not warned about (issue 18).
    let bad = count_nonfinite(out, &encoded);
    if bad > 0 {
        return Err(ApplyError::Convert(format!(
            "tensor {:?}: init scale {} gives {bad} values that are NaN or Inf as {out}",
            t.name,
            crate::formats::hf_config::show(init.scale)
        )));
    }
    sink.owned(encoded).map_err(sink_io)?;
    advance(sink.written - start);
    Ok(())
}

/// Copies the bytes of `t`'s sources, in order, out of their maps; returns the NaN and Inf
/// values among them.
fn copy_sources<'a>(
    t: &'a TensorSpec,
    sources: &'a SourceFiles,
    sink: &mut Sink<'a>,
    advance: &mut dyn FnMut(u64),
) -> Result<u64, ApplyError> {
    let start = sink.written;
    let mut nonfinite = 0;
    for s in &t.sources {
        let base = SourceFiles::offset(s);
        for (k, chunk) in sources.bytes(s).chunks(CHUNK_BYTES).enumerate() {
            nonfinite += count_nonfinite(s.dtype.0, chunk);
            sink.mapped(s, base + k * CHUNK_BYTES, chunk)
                .map_err(sink_io)?;
            advance(sink.written - start);
        }
    }
    Ok(nonfinite)
}

/// Converts `t`'s sources, in order, to its dtype, a chunk of whole rows at a time; returns the
/// NaN and Inf values the source held. Finite values that the conversion overflows are refused.
fn convert_sources<'a>(
    t: &'a TensorSpec,
    sources: &'a SourceFiles,
    sink: &mut Sink<'a>,
    advance: &mut dyn FnMut(u64),
) -> Result<u64, ApplyError> {
    let out = t.dtype.0;
    let start = sink.written;
    let mut nonfinite = 0;
    for s in &t.sources {
        let bytes = sources.bytes(s);
        let rows = s.shape.first().copied().unwrap_or(1).max(1);
        let row_bytes = (bytes.len() / rows).max(1);
        // Whole heads per chunk, so the per-head un-permutation stays within a chunk.
        let unit = s.unpermute_heads.map_or(1, |heads| rows / heads.max(1));
        let per_chunk = (CHUNK_BYTES / row_bytes / unit).max(1) * unit;
        let base = SourceFiles::offset(s);
        for (k, chunk) in bytes.chunks(per_chunk * row_bytes).enumerate() {
            let chunk_rows = chunk.len() / row_bytes;
            let heads = s.unpermute_heads.map(|_| chunk_rows / unit);
            let values = decode_rows(s.dtype.0, chunk, chunk_rows, heads)
                .map_err(|e| ApplyError::Convert(format!("tensor {:?}: {e}", s.tensor)))?;
            let before = values.iter().filter(|v| !v.is_finite()).count() as u64;
            let encoded = encode(out, &values)?;
            // Values the source already held as NaN or Inf are counted (a warning, or a
            // refusal under --strict); finite ones the conversion overflows are refused.
            let after = count_nonfinite(out, &encoded);
            if after > before {
                return Err(ApplyError::Convert(format!(
                    "tensor {:?}: {} finite values of {} become NaN or Inf as {out} (out \
                     of its range)",
                    t.name,
                    after - before,
                    s.tensor
                )));
            }
            nonfinite += before;
            sink.owned(encoded).map_err(sink_io)?;
            sources.release(s, base + k * per_chunk * row_bytes, chunk.len());
            advance(sink.written - start);
        }
    }
    Ok(nonfinite)
}

/// NaN and Inf values among little-endian float `bytes` (all exponent bits set); 0 for other
/// dtypes, whose values are only ever decoded to f32 and counted there.
fn count_nonfinite(dtype: DType, bytes: &[u8]) -> u64 {
    let halves = |mask: u16| {
        bytes
            .chunks_exact(2)
            .filter(|b| u16::from_le_bytes([b[0], b[1]]) & mask == mask)
            .count() as u64
    };
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .filter(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
            .count() as u64,
        DType::F16 => halves(0x7c00),
        DType::BF16 => halves(0x7f80),
        _ => 0,
    }
}

fn encode(dtype: DType, values: &[f32]) -> Result<Vec<u8>, ApplyError> {
    dtype
        .encode_f32(values)
        .ok_or_else(|| ApplyError::Convert(format!("cannot write {dtype} tensors to safetensors")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_nan_and_inf_in_every_float_dtype() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN, f32::INFINITY, -0.0, f32::NEG_INFINITY]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_nonfinite(DType::F32, &f32s), 3);
        // f16 1.0, +Inf, NaN, max finite; bf16 1.0, -Inf, NaN, max finite.
        let f16s = [0x3c00u16, 0x7c00, 0x7e00, 0x7bff];
        let bf16s = [0x3f80u16, 0xff80, 0x7fc0, 0x7f7f];
        let le = |v: &[u16]| v.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(count_nonfinite(DType::F16, &le(&f16s)), 2);
        assert_eq!(count_nonfinite(DType::BF16, &le(&bf16s)), 2);
        assert_eq!(count_nonfinite(DType::Q8_0, &[0xff; 34]), 0);
    }
}
