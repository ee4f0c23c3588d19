//! Everything checked before `apply` writes a byte: the plan against itself (names, shapes, byte
//! counts, transforms; the output config it implies) and against the source files as they are now
//! (sizes, sha256, and each source tensor's header entry).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::arch::{self, Naming, Role};
use crate::dtype::DType;
use crate::formats::gguf::GgufFile;
use crate::formats::hf_config::{self, ModelConfig};
use crate::formats::safetensors::SafetensorsFile;
use crate::manifest::sha256_file;
use crate::plan::{Plan, PlanError, SourceRef, TensorSpec, Transform, PLAN_VERSION};

use super::ApplyError;

fn invalid(msg: String) -> PlanError {
    PlanError::Invalid(msg)
}

/// Checks that the plan is complete and consistent, and returns the output config it describes.
pub fn plan(plan: &Plan) -> Result<ModelConfig, PlanError> {
    if plan.plan_version != PLAN_VERSION {
        return Err(invalid(format!(
            "plan_version {} is not supported (this tool reads version {PLAN_VERSION})",
            plan.plan_version
        )));
    }
    let config_bytes = serde_json::to_vec(&plan.config).map_err(|e| invalid(e.to_string()))?;
    let config =
        hf_config::parse(&config_bytes).map_err(|e| invalid(format!("the plan's config: {e}")))?;
    let Some(shape) = config.recurrent else {
        return Err(invalid(
            "plan config: model_type must be huginn_raven".into(),
        ));
    };
    let layers = plan.layers.shape();
    if (layers.prelude, layers.core, layers.coda) != (shape.prelude, shape.core, shape.coda) {
        return Err(invalid(format!(
            "plan layers ({layers}) disagree with the config's ({},{},{})",
            shape.prelude, shape.core, shape.coda
        )));
    }
    for (name, range) in plan.layers.named() {
        if range.end > plan.source.n_layers {
            return Err(PlanError::OutOfBounds {
                part: name,
                range,
                n_layers: plan.source.n_layers,
            });
        }
    }

    let naming = Naming::Raven(config.family, shape);
    let mut want: BTreeMap<String, (Role, Vec<usize>)> = BTreeMap::new();
    for role in arch::required_roles(&config) {
        let name = naming.name(role).unwrap_or_default();
        want.insert(name, (role, arch::expected_shape(&config, role)));
    }
    let mut seen = HashSet::new();
    let files: HashSet<&str> = plan.source.files.iter().map(|f| f.path.as_str()).collect();
    for t in &plan.tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(invalid(format!("tensor {:?} is listed twice", t.name)));
        }
        let Some((role, shape)) = want.get(&t.name) else {
            return Err(invalid(format!(
                "tensor {:?} is not part of a ({}) {} model",
                t.name,
                layers,
                config.family.name()
            )));
        };
        if &t.shape != shape {
            return Err(invalid(format!(
                "tensor {:?} has shape {:?}, but the config implies {shape:?}",
                t.name, t.shape
            )));
        }
        tensor(t, *role, &files)?;
    }
    if let Some(missing) = want.keys().find(|n| !seen.contains(n.as_str())) {
        return Err(invalid(format!(
            "tensor {missing:?} is missing from the plan"
        )));
    }
    let mut names = HashSet::new();
    for f in &plan.files {
        let name = f.name();
        let plain = !name.is_empty() && !name.contains(['/', '\\']) && !name.starts_with('.');
        let reserved = ["config.json", "plan.json", crate::manifest::MANIFEST_NAME];
        if !plain
            || reserved.contains(&name)
            || name.ends_with(".safetensors")
            || !names.insert(name)
        {
            return Err(invalid(format!("output file name {name:?} is not allowed")));
        }
        if let crate::plan::OutputFile::Copy { source, .. } = f {
            if !files.contains(source.as_str()) {
                return Err(invalid(format!(
                    "output file {name:?} copies {source:?}, which is not in source.files"
                )));
            }
        }
    }
    Ok(config)
}

fn tensor(t: &TensorSpec, role: Role, files: &HashSet<&str>) -> Result<(), PlanError> {
    let out = t.dtype.0;
    if out.is_quantized() {
        return Err(invalid(format!(
            "tensor {:?}: output dtype {out} is not a float type",
            t.name
        )));
    }
    match (&t.init, t.transform, t.sources.is_empty()) {
        (Some(init), None, true) => {
            if role != Role::Adapter {
                return Err(invalid(format!(
                    "tensor {:?} cannot be initialized: only the adapter is new",
                    t.name
                )));
            }
            if !crate::plan::f32_scale(init.scale) {
                return Err(invalid(format!(
                    "tensor {:?}: init scale {} must be finite, >= 0 and at most f32's {:e}",
                    t.name,
                    crate::formats::hf_config::show(init.scale),
                    f32::MAX
                )));
            }
            Ok(())
        }
        (None, Some(transform), false) => sources(t, transform, files),
        _ => Err(invalid(format!(
            "tensor {:?} needs either `init`, or `transform` with `sources`",
            t.name
        ))),
    }
}

fn sources(t: &TensorSpec, transform: Transform, files: &HashSet<&str>) -> Result<(), PlanError> {
    let bad = |msg: String| Err(invalid(format!("tensor {:?}: {msg}", t.name)));
    let mut rows = 0usize;
    for s in &t.sources {
        if !files.contains(s.file.as_str()) {
            return bad(format!("source file {:?} is not in source.files", s.file));
        }
        let n: u64 = s.shape.iter().map(|&d| d as u64).product();
        let size = s.dtype.0.size_of(n);
        let [start, end] = s.byte_range;
        if end < start || size != Some(end - start) {
            return bad(format!(
                "byte range {start}..{end} of {:?} does not hold {:?} {}",
                s.tensor, s.shape, s.dtype.0
            ));
        }
        if s.shape.len() != t.shape.len() || s.shape.get(1..) != t.shape.get(1..) {
            return bad(format!(
                "source {:?} of shape {:?} does not fit",
                s.tensor, s.shape
            ));
        }
        if let Some(heads) = s.unpermute_heads {
            let r = s.shape.first().copied().unwrap_or(0);
            if heads == 0 || r % heads != 0 || (r / heads) % 2 != 0 {
                return bad(format!("cannot un-permute {r} rows as {heads} heads"));
            }
        }
        rows += s.shape.first().copied().unwrap_or(0);
    }
    if t.shape.len() == 1 && t.sources.len() != 1 {
        return bad("a 1-D tensor has exactly one source".into());
    }
    if t.shape.first() != Some(&rows) {
        return bad(format!(
            "sources have {rows} rows in all, the tensor {:?}",
            t.shape.first()
        ));
    }
    let out = t.dtype.0;
    let same = t
        .sources
        .iter()
        .all(|s| s.dtype.0 == out && s.unpermute_heads.is_none());
    let quantized = t.sources.iter().any(|s| s.dtype.0.is_quantized());
    let ok = match transform {
        Transform::Copy => same && t.sources.len() == 1,
        Transform::ConcatRows => same && t.sources.len() > 1,
        Transform::Convert => !quantized,
        Transform::Dequantize => quantized,
    };
    if !ok {
        return bad(format!("transform {transform:?} does not fit its sources"));
    }
    Ok(())
}

/// The source files, memory-mapped, after checking they are the files the plan was made from.
pub struct SourceFiles {
    maps: BTreeMap<String, Mmap>,
}

impl SourceFiles {
    /// The bytes of a checked source tensor.
    pub fn bytes(&self, s: &SourceRef) -> &[u8] {
        let [start, end] = s.byte_range;
        self.maps
            .get(&s.file)
            .and_then(|m| m.get(start as usize..end as usize))
            .unwrap_or(&[])
    }

    /// Tells the kernel we are done with these pages of a source map, so copying a model through
    /// the map does not grow resident memory with the model's size.
    pub fn release(&self, s: &SourceRef, start: usize, len: usize) {
        if let Some(m) = self.maps.get(&s.file) {
            crate::formats::release_pages(m, start, len);
        }
    }

    /// Offset of a source tensor's bytes within its map.
    pub fn offset(s: &SourceRef) -> usize {
        s.byte_range[0] as usize
    }
}

/// What `apply` reads of the plan's source: the model as named (a directory, or a file), and
/// every source file. No output may be, contain or lie inside one of them.
pub fn inputs(plan: &Plan) -> Vec<PathBuf> {
    let root = PathBuf::from(&plan.source.root);
    let mut inputs = vec![PathBuf::from(&plan.source.path)];
    inputs.extend(plan.source.files.iter().map(|f| root.join(&f.path)));
    inputs
}

/// Checks that the plan reads only inside its model's folder: the root is the model itself (a
/// directory) or the folder of the model file, and every source file is a regular file inside
/// the root after symlinks (a shared plan naming `../secret.txt`, an absolute path or a device
/// is refused before anything is opened).
fn source_paths(plan: &Plan) -> Result<(), ApplyError> {
    let root = Path::new(&plan.source.root);
    let model = Path::new(&plan.source.path);
    if model != root && model.parent() != Some(root) {
        return Err(ApplyError::Plan(invalid(format!(
            "source.root {} is neither the model {} nor its folder",
            root.display(),
            model.display()
        ))));
    }
    for f in &plan.source.files {
        crate::paths::file_inside(root, &f.path)?;
        if !model_file_name(plan, &f.path) {
            return Err(ApplyError::Plan(invalid(format!(
                "source file {:?} is not a file a model is made of (config.json, the weights and \
                 their index, the tokenizer files)",
                f.path
            ))));
        }
    }
    Ok(())
}

/// Whether `file` (a path in `source.files`) names a file `plan` (made by `plan::make` from a
/// `SourceModel`) can read: the GGUF itself, or a Hugging Face checkpoint's config, weights,
/// index and tokenizer files, each directly in the root.
fn model_file_name(plan: &Plan, file: &str) -> bool {
    if plan.source.format == "gguf" {
        return Path::new(&plan.source.path).file_name() == Some(std::ffi::OsStr::new(file));
    }
    file == "config.json"
        || file == crate::formats::safetensors::INDEX_NAME
        || crate::source::TOKENIZER_FILES.contains(&file)
        || (file.ends_with(".safetensors") && !file.contains(['/', '\\']))
}

/// Checks that every source file has the size the plan recorded and that each source tensor is
/// where the plan says in its file's header, and maps the files.
pub fn source(plan: &Plan) -> Result<SourceFiles, ApplyError> {
    source_paths(plan)?;
    let root = PathBuf::from(&plan.source.root);
    for f in &plan.source.files {
        let path = root.join(&f.path);
        let len = std::fs::metadata(&path)
            .map_err(|source| ApplyError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if len != f.bytes {
            return Err(ApplyError::SourceChanged {
                path,
                reason: format!("{len} bytes, the plan recorded {}", f.bytes),
            });
        }
    }
    let used: HashSet<&str> = plan
        .tensors
        .iter()
        .flat_map(|t| t.sources.iter().map(|s| s.file.as_str()))
        .collect();
    let mut maps = BTreeMap::new();
    for file in used {
        let path = root.join(file);
        let headers = headers(&plan.source.format, &path)?;
        for s in plan
            .tensors
            .iter()
            .flat_map(|t| &t.sources)
            .filter(|s| s.file == file)
        {
            let entry = headers.get(&s.tensor);
            if entry != Some(&(s.dtype.0, s.shape.clone(), s.byte_range)) {
                return Err(ApplyError::Plan(invalid(format!(
                    "source tensor {:?} in {file} is not {} {:?} at bytes {}..{}",
                    s.tensor, s.dtype.0, s.shape, s.byte_range[0], s.byte_range[1]
                ))));
            }
        }
        let f = crate::paths::open_file(&path).map_err(|source| ApplyError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: read-only map of a file whose sha256 was just checked; see SafetensorsFile::open.
        let map = unsafe { Mmap::map(&f) }.map_err(|source| ApplyError::Io {
            path: path.clone(),
            source,
        })?;
        maps.insert(file.to_string(), map);
    }
    Ok(SourceFiles { maps })
}

/// Re-hashes every source file against the sha256 the plan recorded. `apply` runs this on its
/// second core while it writes, and discards the output on a mismatch.
pub fn source_hashes(plan: &Plan) -> Result<(), ApplyError> {
    let root = PathBuf::from(&plan.source.root);
    for f in &plan.source.files {
        let path = root.join(&f.path);
        let sha = sha256_file(&path, |_| {}).map_err(|source| ApplyError::Io {
            path: path.clone(),
            source,
        })?;
        if sha != f.sha256 {
            return Err(ApplyError::SourceChanged {
                path,
                reason: format!("sha256 {sha}, the plan recorded {}", f.sha256),
            });
        }
    }
    Ok(())
}

type Header = BTreeMap<String, (DType, Vec<usize>, [u64; 2])>;

fn headers(format: &str, path: &Path) -> Result<Header, ApplyError> {
    let source_err = |reason: String| ApplyError::SourceChanged {
        path: path.to_path_buf(),
        reason,
    };
    Ok(match format {
        "gguf" => GgufFile::open(path)
            .map_err(|e| source_err(e.to_string()))?
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    (t.dtype, t.shape.clone(), [t.offset, t.offset + t.n_bytes]),
                )
            })
            .collect(),
        "safetensors" => SafetensorsFile::open(path)
            .map_err(|e| source_err(e.to_string()))?
            .tensors
            .iter()
            .map(|t| (t.name.clone(), (t.dtype, t.shape.clone(), [t.start, t.end])))
            .collect(),
        other => {
            return Err(ApplyError::Plan(invalid(format!(
                "unknown source format {other:?}"
            ))))
        }
    })
}
