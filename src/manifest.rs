//! sha256 of files and the manifest of an output directory (schemas/manifest.schema.json):
//! written last by `apply`, checked by `verify`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::formats::safetensors::{Shards, INDEX_NAME};

pub(crate) const MANIFEST_NAME: &str = "manifest.json";
pub(crate) const MANIFEST_VERSION: u32 = 1;

/// Size and sha256 of every file of a directory but the manifest itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub manifest_version: u32,
    pub tool_version: String,
    pub files: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The lowercase hex sha256 of a file, calling `progress` with the bytes hashed so far.
pub fn sha256_file(path: &Path, mut progress: impl FnMut(u64)) -> std::io::Result<String> {
    let mut file = crate::paths::open_file(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hex(&hasher.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `v` as pretty JSON with a final newline, the form of every small JSON file we write.
pub(crate) fn pretty_json(v: &serde_json::Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Writes a small file into `dir`, fsynced, and returns its manifest entry; on failure, the path.
pub(crate) fn write_entry(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<ManifestEntry, (PathBuf, std::io::Error)> {
    use std::io::Write as _;
    let path = dir.join(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| (path.clone(), e))?;
    Ok(ManifestEntry {
        path: name.into(),
        bytes: bytes.len() as u64,
        sha256: sha256_bytes(bytes),
    })
}

/// Writes the files that describe a folder's weights, after them (STYLE.md principle 5): the
/// index of `shards` when there are several, then `small` in order, then, last, the manifest of
/// all files. `files` holds the entries of the shards already written; every new entry joins it,
/// and it ends sorted by path, as the manifest lists them.
pub(crate) fn write_described(
    dir: &Path,
    shards: &Shards,
    small: Vec<(String, Vec<u8>)>,
    files: &mut Vec<ManifestEntry>,
) -> Result<(), (PathBuf, std::io::Error)> {
    if let Some(index) = shards.index() {
        files.push(write_entry(dir, INDEX_NAME, &pretty_json(&index))?);
    }
    for (name, bytes) in small {
        files.push(write_entry(dir, &name, &bytes)?);
    }
    write_manifest(dir, files)
}

/// Writes `dir`'s manifest.json listing `files`, which it sorts by path first.
pub(crate) fn write_manifest(
    dir: &Path,
    files: &mut [ManifestEntry],
) -> Result<(), (PathBuf, std::io::Error)> {
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        files: files.to_vec(),
    };
    let json = serde_json::to_value(&manifest).unwrap_or_default();
    write_entry(dir, MANIFEST_NAME, &pretty_json(&json))?;
    Ok(())
}

/// A writer that hashes and counts what passes through it, so outputs are hashed as they are
/// written instead of read back.
pub(crate) struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The inner writer, the byte count and the hex sha256.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.written, hex(&self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&p, |_| {}).unwrap(), want);
        assert_eq!(sha256_bytes(b"abc"), want);
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"ab").unwrap();
        w.write_all(b"c").unwrap();
        let (inner, n, sha) = w.finish();
        assert_eq!((inner, n, sha.as_str()), (b"abc".to_vec(), 3, want));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The directory has no manifest.json.
    #[error("{0}: no manifest.json (not written by `surgery apply`, or not finished)")]
    NoManifest(PathBuf),
    /// manifest.json is not a manifest.
    #[error("{path}: invalid manifest: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    /// A listed file is absent.
    #[error("{0}: missing (listed in manifest.json)")]
    Missing(PathBuf),
    /// A listed file has another size.
    #[error("{path}: {got} bytes, manifest.json says {want}")]
    Size { path: PathBuf, want: u64, got: u64 },
    /// A listed file has another sha256.
    #[error("{path}: sha256 {got} does not match manifest.json ({want})")]
    Hash {
        path: PathBuf,
        want: String,
        got: String,
    },
    /// A file in the directory that the manifest does not list.
    #[error("{0}: not listed in manifest.json")]
    Unlisted(PathBuf),
    /// The tensors disagree with the index or the config.
    #[error(transparent)]
    Structure(#[from] crate::source::SourceError),
    /// The checkpoint is not a recurrent one.
    #[error("{0}: config.json is not a recurrent (huginn_raven) model")]
    NotRecurrent(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `verify` checked.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub files: usize,
    pub bytes: u64,
    pub tensors: usize,
}

/// Re-hashes every file of `dir` against its manifest, then checks the index against the shard
/// headers and the tensor set and shapes against config.json. The first mismatch is the error.
pub fn verify(dir: &Path, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport, VerifyError> {
    let path = dir.join(MANIFEST_NAME);
    if !path.is_file() {
        return Err(VerifyError::NoManifest(dir.to_path_buf()));
    }
    let bytes = crate::paths::read(&path).map_err(|source| VerifyError::Io {
        path: path.clone(),
        source,
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| VerifyError::BadManifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let listed: std::collections::HashSet<&str> =
        manifest.files.iter().map(|f| f.path.as_str()).collect();
    let entries = std::fs::read_dir(dir).map_err(|source| VerifyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut present: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST_NAME)
        .collect();
    present.sort();
    if let Some(extra) = present.iter().find(|n| !listed.contains(n.as_str())) {
        return Err(VerifyError::Unlisted(dir.join(extra)));
    }
    let total: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    let mut done = 0;
    for f in &manifest.files {
        let file = dir.join(&f.path);
        if f.path.contains(['/', '\\']) || !file.is_file() {
            return Err(VerifyError::Missing(file));
        }
        let io = |source| VerifyError::Io {
            path: file.clone(),
            source,
        };
        let len = std::fs::metadata(&file).map_err(io)?.len();
        if len != f.bytes {
            return Err(VerifyError::Size {
                path: file,
                want: f.bytes,
                got: len,
            });
        }
        let sha = sha256_file(&file, |n| progress(done + n, total)).map_err(io)?;
        if sha != f.sha256 {
            return Err(VerifyError::Hash {
                path: file,
                want: f.sha256.clone(),
                got: sha,
            });
        }
        done += f.bytes;
    }
    let model = crate::source::SourceModel::open(dir)?;
    if model.config.recurrent.is_none() {
        return Err(VerifyError::NotRecurrent(dir.to_path_buf()));
    }
    Ok(VerifyReport {
        files: manifest.files.len(),
        bytes: total,
        tensors: model.tensors.len(),
    })
}
