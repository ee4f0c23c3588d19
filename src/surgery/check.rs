//! What `apply` checks of the source files before it writes a byte, once the plan has checked
//! itself (`Plan::validate`): the files are where the plan may read and are as they were when it
//! was made (sizes, sha256, and each source tensor's header entry).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::dtype::DType;
use crate::formats::gguf::GgufFile;
use crate::formats::safetensors::SafetensorsFile;
use crate::manifest::sha256_file;
use crate::plan::{Plan, PlanError, SourceRef};

use super::ApplyError;

fn invalid(msg: String) -> PlanError {
    PlanError::Invalid(msg)
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
pub(crate) fn source_hashes(plan: &Plan) -> Result<(), ApplyError> {
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
