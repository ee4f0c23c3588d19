//! safetensors: memory-mapped reader for single files and sharded checkpoints
//! (`model.safetensors.index.json`), validated by the `safetensors` crate; the layout every
//! writer of weights follows ([`Shards`]), and a small writer of in-memory tensors.
//!
//! Nothing is loaded: a tensor is a file, a byte range and a dtype until someone asks for its bytes.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use crate::dtype::DType;

/// Name of the index of a sharded checkpoint.
pub(crate) const INDEX_NAME: &str = "model.safetensors.index.json";

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// The file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The header is malformed or disagrees with the file (the `safetensors` crate's validation).
    #[error("{path}: invalid safetensors file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// A dtype we do not read (only F32, F16 and BF16 are model weights here).
    #[error("{path}: tensor {tensor:?} has unsupported dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// The index of a sharded checkpoint is malformed or names a missing shard or tensor.
    #[error("{path}: {reason}")]
    Index { path: PathBuf, reason: String },
    /// The same tensor name appears in two shards.
    #[error("tensor {tensor:?} appears in both {first} and {second}")]
    Duplicate {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SafetensorsError + '_ {
    move |source| SafetensorsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One tensor of a safetensors file, located by absolute byte offsets within that file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (header included in the offset).
    pub start: u64,
    pub end: u64,
}

/// A memory-mapped, validated safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    /// Tensors in data order.
    pub tensors: Vec<StTensor>,
    /// The `__metadata__` map, if any.
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile, SafetensorsError> {
        let file = crate::paths::open_file(path).map_err(io_err(path))?;
        // SAFETY: the map is read-only; a source file changed underneath us while we run is
        // caught by the sha256 recorded in the plan, not by this reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let (tensors, metadata) = parse(&mmap, path)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            tensors,
            metadata,
        })
    }

    /// The bytes of a tensor of this file (validated in bounds at open).
    pub fn bytes(&self, t: &StTensor) -> &[u8] {
        self.bytes_at(t.start, t.end)
    }

    /// Bytes `start..end` of the file; empty when the range is not within it.
    pub(crate) fn bytes_at(&self, start: u64, end: u64) -> &[u8] {
        usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| self.mmap.get(s..e))
            .unwrap_or(&[])
    }

    /// Tells the kernel bytes `start..end` of the file are not needed now.
    pub fn release(&self, start: u64, end: u64) {
        super::release_range(&self.mmap, start, end);
    }

    pub fn len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }
}

/// Parses and validates a whole safetensors file held in `buf` (`path` only names it in errors):
/// its tensors in data order and its `__metadata__`. What [`SafetensorsFile::open`] does over its
/// map; public as the entry point of the fuzz target in fuzz/.
pub fn parse(
    buf: &[u8],
    path: &Path,
) -> Result<(Vec<StTensor>, BTreeMap<String, String>), SafetensorsError> {
    let invalid = |reason: String| SafetensorsError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    // The header's keys are counted and checked before the crate parses it: the crate reads
    // the header into a map, so a name given twice silently keeps one entry (and its offsets
    // then leave a gap), and it spends about 1 kB and 10 us per entry, so a 99 MB header of
    // 1.65M empty entries took 1.4 GB and 14 s (issue 18). Syntax errors are left to the crate,
    // whose messages the readers' tests know.
    if let Some(header) = header_json(buf) {
        if let Err(e) = serde_json::from_slice::<UniqueKeys>(header) {
            if e.is_data() {
                return Err(invalid(e.to_string()));
            }
        }
    }
    let (header_len, meta) =
        safetensors::SafeTensors::read_metadata(buf).map_err(|e| invalid(describe(&e)))?;
    let data_start = 8 + header_len as u64;
    let mut tensors = Vec::new();
    for name in meta.offset_keys() {
        let info = meta
            .info(&name)
            .ok_or_else(|| invalid(format!("tensor {name:?} vanished from the header")))?;
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(SafetensorsError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    tensor: name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (s, e) = info.data_offsets;
        tensors.push(StTensor {
            name,
            dtype,
            shape: info.shape.clone(),
            start: data_start + s as u64,
            end: data_start + e as u64,
        });
    }
    let metadata = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok((tensors, metadata))
}

/// The most entries a header may list (tensors and `__metadata__`): 16 times the tensors of the
/// largest published checkpoints in one file.
pub(crate) const MAX_HEADER_ENTRIES: usize = 1 << 16;

/// The header's JSON text when its length prefix is plausible (the crate checks it properly).
fn header_json(buf: &[u8]) -> Option<&[u8]> {
    let len = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let end = usize::try_from(len).ok()?.checked_add(8)?;
    buf.get(8..end)
}

/// A JSON object whose keys are all different and at most [`MAX_HEADER_ENTRIES`] (the values
/// are skipped).
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if seen.len() == MAX_HEADER_ENTRIES {
                        return Err(serde::de::Error::custom(format!(
                            "the header lists more than {MAX_HEADER_ENTRIES} entries"
                        )));
                    }
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "tensor {key:?} is named twice in the header"
                        )));
                    }
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(UniqueKeys)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// One line for each of the crate's validation errors.
fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "file is shorter than the 8-byte header length".into(),
        E::HeaderTooLarge => "header length is larger than 100 MB".into(),
        E::InvalidHeaderLength => "header length points past the end of the file".into(),
        E::InvalidHeader(_) => "header is not valid UTF-8".into(),
        E::InvalidHeaderDeserialization(e) => format!("header is not valid JSON: {e}"),
        E::InvalidOffset(t) => {
            format!("tensor {t:?} has offsets that overlap, leave a gap or run backwards")
        }
        E::TensorInvalidInfo => "a tensor's shape and dtype do not match its byte range".into(),
        E::MetadataIncompleteBuffer => {
            "tensor data does not end at the end of the file (truncated, or trailing bytes)".into()
        }
        E::ValidationOverflow => "a tensor's size overflows".into(),
        other => other.to_string(),
    }
}

/// The tensors of a checkpoint, from one file or from the shards an index names.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    pub files: Vec<SafetensorsFile>,
    /// Tensor name -> (file index, tensor index in that file).
    by_name: HashMap<String, (usize, usize)>,
}

/// `model.safetensors.index.json`: which shard holds each tensor.
#[derive(Debug, Deserialize)]
pub struct RawIndex {
    #[serde(default)]
    pub metadata: RawIndexMetadata,
    pub weight_map: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
pub struct RawIndexMetadata {
    pub total_size: Option<u64>,
}

/// Parses an index and checks that every shard it names is a plain file name (no path that
/// could leave the checkpoint's directory). Public as the entry point of the fuzz target.
pub fn parse_index(bytes: &[u8]) -> Result<RawIndex, String> {
    let raw: RawIndex = serde_json::from_slice(bytes).map_err(|e| format!("invalid index: {e}"))?;
    for shard in raw.weight_map.values() {
        if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
            return Err(format!("shard name {shard:?} is not a plain file name"));
        }
    }
    Ok(raw)
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` and its shards if `dir` has one, else
    /// `model.safetensors`, else the only `*.safetensors` file in `dir`.
    pub(crate) fn open_dir(dir: &Path) -> Result<Checkpoint, SafetensorsError> {
        let index = dir.join(INDEX_NAME);
        if index.is_file() {
            return Checkpoint::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Checkpoint::from_files(vec![SafetensorsFile::open(&single)?]);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        found.sort();
        match found.as_slice() {
            [one] => Checkpoint::from_files(vec![SafetensorsFile::open(one)?]),
            [] => Err(SafetensorsError::Index {
                path: dir.to_path_buf(),
                reason: "no .safetensors file in this directory".into(),
            }),
            _ => Err(SafetensorsError::Index {
                path: dir.to_path_buf(),
                reason: format!(
                    "{} .safetensors files but no {INDEX_NAME} to say which to use",
                    found.len()
                ),
            }),
        }
    }

    fn open_index(index: &Path) -> Result<Checkpoint, SafetensorsError> {
        let bad = |reason: String| SafetensorsError::Index {
            path: index.to_path_buf(),
            reason,
        };
        let text = crate::paths::read(index).map_err(io_err(index))?;
        let raw = parse_index(&text).map_err(bad)?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<&String> = raw.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        let mut files = Vec::new();
        for shard in shards {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(bad(format!("names shard {shard:?}, which does not exist")));
            }
            files.push(SafetensorsFile::open(&path)?);
        }
        let checkpoint = Checkpoint::from_files(files)?;
        if let Some(total) = raw.metadata.total_size {
            let sum: u64 = checkpoint
                .files
                .iter()
                .flat_map(|f| f.tensors.iter().map(|t| t.end - t.start))
                .sum();
            if sum != total {
                return Err(bad(format!(
                    "metadata.total_size is {total}, but the shards hold {sum} bytes of tensors"
                )));
            }
        }
        for (tensor, shard) in &raw.weight_map {
            match checkpoint.get(tensor) {
                Some((file, _)) if file.path.file_name() == Some(shard.as_ref()) => {}
                _ => {
                    return Err(bad(format!(
                        "maps tensor {tensor:?} to {shard:?}, which does not hold it"
                    )))
                }
            }
        }
        Ok(checkpoint)
    }

    /// A checkpoint over already opened files; a tensor name in two files is an error.
    pub(crate) fn from_files(files: Vec<SafetensorsFile>) -> Result<Checkpoint, SafetensorsError> {
        let mut by_name: HashMap<String, (usize, usize)> = HashMap::new();
        for (fi, file) in files.iter().enumerate() {
            for (ti, t) in file.tensors.iter().enumerate() {
                if let Some(&(other, _)) = by_name.get(&t.name) {
                    return Err(SafetensorsError::Duplicate {
                        tensor: t.name.clone(),
                        first: files[other].path.clone(),
                        second: file.path.clone(),
                    });
                }
                by_name.insert(t.name.clone(), (fi, ti));
            }
        }
        Ok(Checkpoint { files, by_name })
    }

    /// The file holding `name` and the tensor's entry.
    pub fn get(&self, name: &str) -> Option<(&SafetensorsFile, &StTensor)> {
        let &(fi, ti) = self.by_name.get(name)?;
        let file = &self.files[fi];
        Some((file, &file.tensors[ti]))
    }

    /// Index of the file holding `name` in `files`.
    pub(crate) fn file_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).map(|&(fi, _)| fi)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// A tensor of a safetensors file about to be written: its name, dtype and shape.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl Entry {
    /// Bytes of its data.
    pub fn bytes(&self) -> u64 {
        let n: u64 = self.shape.iter().map(|&d| d as u64).product();
        self.dtype.size_of(n).unwrap_or(0)
    }
}

/// The layout of a checkpoint about to be written, fixed before its first byte, for every writer
/// of weights (apply, export, heal, the synthetic models): which tensors go in which file (in
/// order, at most `max_bytes` of data a file, a bigger tensor alone), the files' names
/// (`model.safetensors`, or `model-00001-of-0000N.safetensors`), their headers and the index. A
/// writer streams each file's header, then its tensors' data in order.
pub(crate) struct Shards {
    entries: Vec<Entry>,
    ranges: Vec<std::ops::Range<usize>>,
}

impl Shards {
    pub fn new(entries: Vec<Entry>, max_bytes: u64) -> Shards {
        let mut ranges = Vec::new();
        let (mut start, mut size) = (0, 0u64);
        for (i, e) in entries.iter().enumerate() {
            let b = e.bytes();
            if i > start && size.saturating_add(b) > max_bytes {
                ranges.push(start..i);
                (start, size) = (i, 0);
            }
            size = size.saturating_add(b);
        }
        if start < entries.len() {
            ranges.push(start..entries.len());
        }
        Shards { entries, ranges }
    }

    /// `n` files (at least 1) of about as many tensors each, in order: the synthetic sharded
    /// checkpoints of the tests.
    pub(crate) fn by_count(entries: Vec<Entry>, n: usize) -> Shards {
        let per = entries.len().div_ceil(n.max(1)).max(1);
        let ranges = (0..entries.len())
            .step_by(per)
            .map(|start| start..(start + per).min(entries.len()))
            .collect();
        Shards { entries, ranges }
    }

    /// How many files.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The indices (in the entries given) of file `i`'s tensors.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.ranges.get(i).cloned().unwrap_or(0..0)
    }

    /// The name of file `i`.
    pub fn name(&self, i: usize) -> String {
        match self.ranges.len() {
            1 => "model.safetensors".into(),
            n => format!("model-{:05}-of-{:05}.safetensors", i + 1, n),
        }
    }

    /// The first bytes of file `i`: the header's length (u64, little-endian), then the header
    /// (`__metadata__ {"format": "pt"}`, each tensor's dtype, shape and offsets) padded with
    /// spaces so that the data starts 8-byte aligned, as the reference writer does.
    pub fn header(&self, i: usize) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0u64;
        for e in &self.entries[self.range(i)] {
            let end = offset + e.bytes();
            header.insert(
                e.name.clone(),
                serde_json::json!({"dtype": e.dtype.name(), "shape": e.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut json = serde_json::to_vec(&header).unwrap_or_default();
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend(json);
        bytes
    }

    /// Bytes of all tensors' data.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(Entry::bytes).sum()
    }

    /// The index ([`INDEX_NAME`]) a checkpoint of several files needs: the total size and each
    /// tensor's file.
    pub fn index(&self) -> Option<serde_json::Value> {
        if self.ranges.len() < 2 {
            return None;
        }
        let mut weight_map = serde_json::Map::new();
        for i in 0..self.ranges.len() {
            for e in &self.entries[self.range(i)] {
                weight_map.insert(e.name.clone(), self.name(i).into());
            }
        }
        Some(serde_json::json!({
            "metadata": {"total_size": self.total_bytes()},
            "weight_map": weight_map,
        }))
    }
}

/// A tensor held in memory for [`write_file`] and [`write_sharded`]: name, dtype, shape, bytes.
pub(crate) type InMemory = (String, DType, Vec<usize>, Vec<u8>);

/// Writes one safetensors file from in-memory tensors, in the given order, with `__metadata__
/// {"format": "pt"}`; through `PATH.partial-<pid>`, renamed at the end.
pub fn write_file(path: &Path, tensors: &[InMemory]) -> Result<(), SafetensorsError> {
    let shards = Shards::new(entries(path, tensors)?, u64::MAX);
    write_part(path, &shards, 0, tensors)
}

/// Writes in-memory tensors into `dir` as `n` files of about as many tensors each and their
/// index, each through a partial name.
pub(crate) fn write_sharded(
    dir: &Path,
    tensors: &[InMemory],
    n: usize,
) -> Result<(), SafetensorsError> {
    let shards = Shards::by_count(entries(dir, tensors)?, n);
    for i in 0..shards.len() {
        write_part(&dir.join(shards.name(i)), &shards, i, tensors)?;
    }
    if let Some(index) = shards.index() {
        let path = dir.join(INDEX_NAME);
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| SafetensorsError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&path, bytes).map_err(io_err(&path))?;
    }
    Ok(())
}

/// The entries of in-memory tensors, each checked to hold the bytes its dtype and shape need.
fn entries(path: &Path, tensors: &[InMemory]) -> Result<Vec<Entry>, SafetensorsError> {
    tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let e = Entry {
                name: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
            };
            if e.bytes() != bytes.len() as u64 {
                return Err(SafetensorsError::Invalid {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor {name:?}: {} bytes for {dtype} {shape:?}",
                        bytes.len()
                    ),
                });
            }
            Ok(e)
        })
        .collect()
}

/// File `i` of `shards` at `path`, its data from `tensors`, through a partial name.
fn write_part(
    path: &Path,
    shards: &Shards,
    i: usize,
    tensors: &[InMemory],
) -> Result<(), SafetensorsError> {
    let partial = crate::atomic::partial_file(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(File::create(&partial)?);
        f.write_all(&shards.header(i))?;
        for (_, _, _, bytes) in &tensors[shards.range(i)] {
            f.write_all(bytes)?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&partial, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        io_err(path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_in_order_and_oversized_tensors_stand_alone() {
        let entries: Vec<Entry> = [10, 10, 30, 5, 5]
            .iter()
            .enumerate()
            .map(|(i, &n)| Entry {
                name: format!("t{i}"),
                dtype: DType::F32,
                shape: vec![n],
            })
            .collect();
        let split = Shards::new(entries.clone(), 80);
        let ranges: Vec<_> = (0..split.len()).map(|i| split.range(i)).collect();
        assert_eq!(ranges, vec![0..2, 2..3, 3..5]);
        assert_eq!(split.name(1), "model-00002-of-00003.safetensors");
        assert_eq!(split.total_bytes(), 240);
        let index = split.index().unwrap();
        assert_eq!(index["metadata"]["total_size"], 240);
        assert_eq!(
            index["weight_map"]["t2"],
            "model-00002-of-00003.safetensors"
        );
        let whole = Shards::new(entries, 1000);
        assert_eq!(whole.len(), 1);
        assert_eq!(whole.name(0), "model.safetensors");
        assert_eq!(whole.index(), None);
        // The length prefix, then a header padded to 8 bytes that ends where the data starts.
        let h = whole.header(0);
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!((n % 8, h.len()), (0, 8 + n));
        let json: serde_json::Value = serde_json::from_slice(&h[8..]).unwrap();
        assert_eq!(json["t3"]["data_offsets"], serde_json::json!([200, 220]));
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn write_then_read_locates_every_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = vec![7u8, 8, 9, 10];
        write_file(
            &path,
            &[
                ("a".into(), DType::F32, vec![2, 3], a.clone()),
                ("b".into(), DType::BF16, vec![2], b.clone()),
            ],
        )
        .unwrap();
        let ck = Checkpoint::open_dir(dir.path()).unwrap();
        let (file, t) = ck.get("a").unwrap();
        assert_eq!((t.dtype, t.shape.clone()), (DType::F32, vec![2, 3]));
        assert_eq!(file.bytes(t), &a[..]);
        let (file, t) = ck.get("b").unwrap();
        assert_eq!(file.bytes(t), &b[..]);
        assert_eq!(t.start % 8, 0);
        assert_eq!(file.metadata.get("format").map(String::as_str), Some("pt"));
    }

    fn raw_file(dir: &Path, header: &str, data_len: usize) -> PathBuf {
        let path = dir.join("bad.safetensors");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn refuses_malformed_headers_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4,
                "tensor data does not end at the end of the file",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
                "shape and dtype do not match",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
                "overlap, leave a gap",
            ),
            (
                r#"{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
                8,
                "unsupported dtype I64",
            ),
            (
                r#"{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#,
                4,
                "header is not valid JSON",
            ),
            ("not json", 0, "header is not valid JSON"),
            // The crate's map keeps the last of two entries and would accept this file.
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                4,
                r#"tensor "a" is named twice in the header"#,
            ),
        ];
        for (header, len, want) in cases {
            let path = raw_file(dir.path(), header, len);
            let err = SafetensorsFile::open(&path).unwrap_err().to_string();
            assert!(err.contains(want), "{header}: {err}");
            assert!(!err.contains('\n'));
        }
        let path = dir.path().join("short.safetensors");
        std::fs::write(&path, [1, 2, 3]).unwrap();
        let err = SafetensorsFile::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("shorter than the 8-byte header length"),
            "{err}"
        );
    }

    #[test]
    fn sharded_index_is_checked_against_shards() {
        let dir = tempfile::tempdir().unwrap();
        let one = f32_bytes(&[1.0]);
        write_file(
            &dir.path().join("s1.safetensors"),
            &[("x".into(), DType::F32, vec![1], one.clone())],
        )
        .unwrap();
        write_file(
            &dir.path().join("s2.safetensors"),
            &[("y".into(), DType::F32, vec![1], one.clone())],
        )
        .unwrap();
        let index = dir.path().join(INDEX_NAME);
        std::fs::write(
            &index,
            r#"{"weight_map":{"x":"s1.safetensors","y":"s2.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open_dir(dir.path()).unwrap();
        assert_eq!(ck.files.len(), 2);
        assert_eq!(ck.file_index("y"), Some(1));

        std::fs::write(
            &index,
            r#"{"weight_map":{"x":"s1.safetensors","y":"s1.safetensors"}}"#,
        )
        .unwrap();
        let err = Checkpoint::open_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(r#"maps tensor "y" to "s1.safetensors", which does not hold it"#),
            "{err}"
        );

        std::fs::write(&index, r#"{"weight_map":{"x":"s3.safetensors"}}"#).unwrap();
        let err = Checkpoint::open_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(r#"names shard "s3.safetensors", which does not exist"#),
            "{err}"
        );

        write_file(
            &dir.path().join("s2.safetensors"),
            &[("x".into(), DType::F32, vec![1], one)],
        )
        .unwrap();
        std::fs::write(
            &index,
            r#"{"weight_map":{"x":"s1.safetensors","z":"s2.safetensors"}}"#,
        )
        .unwrap();
        let err = Checkpoint::open_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(r#"tensor "x" appears in both"#), "{err}");
    }
}
