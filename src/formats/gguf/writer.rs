//! The GGUF v3 writer: the header (metadata and tensor infos) is validated and written first, then
//! tensor data is streamed in, one tensor after the other and in pieces of any size, so that an
//! exporter holds one chunk of one tensor at a time. Everything goes to `<path>.partial-<pid>`, which is
//! renamed to `<path>` by [`GgufWriter::finish`] and removed if the writer is dropped unfinished.
//!
//! The layout is the one gguf.cpp (`gguf_write_to_buf`) and gguf-py's `GGUFWriter` produce:
//! header, key/value pairs, tensor infos with dims in ggml order (innermost first) and offsets
//! equal to the running sum of the padded sizes, zero padding to the alignment, then each
//! tensor's data padded with zeros to the alignment, the last one included.
//!
//! [`write_gguf`] writes a file from tensors already in memory (tests and fixtures).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::reader::{align_up, alignment, check_shape, Value, ARRAY_TYPE_ID};
use super::{GgufError, MAGIC, VERSION};
use crate::dtype::DType;

/// A tensor to write: name, type, row-major shape (outermost first) and its raw bytes.
pub type TensorData = (String, DType, Vec<usize>, Vec<u8>);

/// What the header says about one tensor: its name, type and row-major shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorHeader {
    pub name: String,
    pub dtype: DType,
    /// Row-major, outermost first (the reverse of ggml's `ne`).
    pub shape: Vec<usize>,
}

/// Writes a GGUF v3 file at `path` holding `metadata` (in this order) and `tensors` (in this
/// order, data laid out back to back). The alignment is `general.alignment` when `metadata`
/// has it (a u32 power of two >= 4), else 32.
pub fn write_gguf(
    path: impl AsRef<Path>,
    metadata: &[(String, Value)],
    tensors: &[TensorData],
) -> Result<(), GgufError> {
    let headers: Vec<TensorHeader> = tensors
        .iter()
        .map(|(name, dtype, shape, _)| TensorHeader {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
        })
        .collect();
    // Lengths are checked before anything is created, so a bad tensor leaves no file behind.
    for ((name, dtype, shape, bytes), header) in tensors.iter().zip(&headers) {
        let n_bytes = tensor_bytes(header)?;
        if n_bytes != bytes.len() as u64 {
            return Err(GgufError::TensorByteLength {
                tensor: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
                expected: n_bytes,
                actual: bytes.len(),
            });
        }
    }
    let mut writer = GgufWriter::create(path, metadata, &headers)?;
    for (_, _, _, bytes) in tensors {
        writer.write(bytes)?;
    }
    writer.finish().map(|_| ())
}

/// A GGUF file being written: the header is on disk, tensor data is appended with
/// [`GgufWriter::write`] in header order, and [`GgufWriter::finish`] publishes the file.
#[derive(Debug)]
pub(crate) struct GgufWriter {
    path: PathBuf,
    partial: PathBuf,
    out: Option<BufWriter<File>>,
    tensors: Vec<TensorHeader>,
    /// Byte size of each tensor's data (unpadded).
    sizes: Vec<u64>,
    alignment: u64,
    /// The tensor being written, and how many of its bytes are written.
    current: usize,
    written: u64,
    /// Bytes in the file so far.
    len: u64,
}

impl GgufWriter {
    /// Validates `metadata` and `tensors` (unique keys and names, flat one-type arrays, a valid
    /// alignment, shapes ggml accepts for each type), then creates `<path>.partial-<pid>` and writes
    /// the header. Nothing is created when validation fails.
    pub(crate) fn create(
        path: impl AsRef<Path>,
        metadata: &[(String, Value)],
        tensors: &[TensorHeader],
    ) -> Result<GgufWriter, GgufError> {
        let path = path.as_ref().to_path_buf();
        let alignment = alignment(metadata)?;
        check_metadata(metadata)?;
        let sizes = check_tensors(tensors)?;
        let header = encode_header(metadata, tensors, &sizes, alignment)?;
        let partial = partial_path(&path);
        let file = File::create(&partial).map_err(io(&partial))?;
        let mut writer = GgufWriter {
            path,
            partial,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            tensors: tensors.to_vec(),
            sizes,
            alignment,
            current: 0,
            written: 0,
            len: 0,
        };
        writer.put(&header)?;
        writer.skip_empty();
        Ok(writer)
    }

    /// The tensor the next bytes belong to, or None once every tensor is complete.
    #[cfg(test)]
    fn next_tensor(&self) -> Option<&TensorHeader> {
        self.tensors.get(self.current)
    }

    /// Appends `bytes` to the data of the current tensor; a tensor is complete (and padded)
    /// once it has all its bytes, and the next bytes go to the next tensor. A piece may not run
    /// past the end of its tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let Some(header) = self.tensors.get(self.current) else {
            return Err(GgufError::Io {
                path: self.partial.clone(),
                source: std::io::Error::other(format!(
                    "{} more bytes after the last tensor",
                    bytes.len()
                )),
            });
        };
        let size = self.sizes[self.current];
        let after = self.written.saturating_add(bytes.len() as u64);
        if after > size {
            return Err(GgufError::TensorByteLength {
                tensor: header.name.clone(),
                dtype: header.dtype,
                shape: header.shape.clone(),
                expected: size,
                actual: usize::try_from(after).unwrap_or(usize::MAX),
            });
        }
        self.put(bytes)?;
        self.written = after;
        if after == size {
            let pad = padding(size, self.alignment);
            self.put(&pad)?;
            self.current += 1;
            self.written = 0;
            self.skip_empty();
        }
        Ok(())
    }

    /// Checks that every tensor is complete, flushes and fsyncs the file and renames it to its
    /// final name (replacing any file there). Returns the file's length.
    pub fn finish(mut self) -> Result<u64, GgufError> {
        if let Some(header) = self.tensors.get(self.current) {
            return Err(GgufError::TensorByteLength {
                tensor: header.name.clone(),
                dtype: header.dtype,
                shape: header.shape.clone(),
                expected: self.sizes[self.current],
                actual: usize::try_from(self.written).unwrap_or(usize::MAX),
            });
        }
        let Some(out) = self.out.take() else {
            return Err(GgufError::Io {
                path: self.partial.clone(),
                source: std::io::Error::other("the writer was already closed"),
            });
        };
        let published = out
            .into_inner()
            .map_err(|e| io(&self.partial)(e.into_error()))
            .and_then(|file| file.sync_all().map_err(io(&self.partial)))
            .and_then(|()| fs::rename(&self.partial, &self.path).map_err(io(&self.path)));
        if published.is_err() {
            // Best effort: the original error is the one worth reporting.
            let _ = fs::remove_file(&self.partial);
        }
        published.map(|()| self.len)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        let out = self.out.as_mut().ok_or_else(|| GgufError::Io {
            path: self.partial.clone(),
            source: std::io::Error::other("the writer was already closed"),
        })?;
        out.write_all(bytes).map_err(io(&self.partial))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Tensors of zero bytes cannot exist (ggml has no zero dimension), but stay safe.
    fn skip_empty(&mut self) {
        while self.sizes.get(self.current) == Some(&0) {
            self.current += 1;
        }
    }
}

impl Drop for GgufWriter {
    /// An unfinished file is removed: nothing half-written stays behind.
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = fs::remove_file(&self.partial);
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> GgufError + '_ {
    move |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `<path>.partial-<pid>` (shortened to fit a file name), next to the final file so that the
/// rename stays on one filesystem.
pub(crate) fn partial_path(path: &Path) -> PathBuf {
    crate::atomic::partial_file(path)
}

/// Zeros taking `len` up to the next multiple of `alignment` (a power of two, at most 2^31).
fn padding(len: u64, alignment: u64) -> Vec<u8> {
    let pad = len.wrapping_neg() % alignment;
    vec![0u8; pad as usize]
}

/// The byte size of a tensor's data, with its shape checked as the reader checks it.
pub fn tensor_bytes(t: &TensorHeader) -> Result<u64, GgufError> {
    let dims: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
    check_shape(&t.name, t.dtype, &dims).map(|(_, n_bytes)| n_bytes)
}

/// Keys must be unique and arrays flat and of one type, as readers (ours, gguf.cpp) require.
fn check_metadata(metadata: &[(String, Value)]) -> Result<(), GgufError> {
    let mut seen = HashSet::with_capacity(metadata.len());
    for (key, value) in metadata {
        if !seen.insert(key.as_str()) {
            return Err(GgufError::DuplicateKey { key: key.clone() });
        }
        if matches!(value, Value::Unread { .. }) {
            return Err(GgufError::UnreadArray { key: key.clone() });
        }
        let Value::Array(items) = value else { continue };
        if items
            .iter()
            .any(|v| matches!(v, Value::Array(_) | Value::Unread { .. }))
        {
            return Err(GgufError::NestedArray { key: key.clone() });
        }
        if items.windows(2).any(|w| match w {
            [a, b] => a.type_id() != b.type_id(),
            _ => false,
        }) {
            return Err(GgufError::MixedArray { key: key.clone() });
        }
    }
    Ok(())
}

/// Checks names and shapes; returns each tensor's byte size.
fn check_tensors(tensors: &[TensorHeader]) -> Result<Vec<u64>, GgufError> {
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(GgufError::DuplicateTensor {
                tensor: t.name.clone(),
            });
        }
        sizes.push(tensor_bytes(t)?);
    }
    Ok(sizes)
}

/// Everything before the data section, padded to `alignment`.
fn encode_header(
    metadata: &[(String, Value)],
    tensors: &[TensorHeader],
    sizes: &[u64],
    alignment: u64,
) -> Result<Vec<u8>, GgufError> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        encode_string(&mut out, key);
        out.extend_from_slice(&value.type_id().to_le_bytes());
        encode_value(&mut out, value);
    }
    let mut offset = 0u64;
    for (t, &n_bytes) in tensors.iter().zip(sizes) {
        encode_string(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // ggml order: ne[0] is the row length, the last row-major dim.
        for &d in t.shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = offset
            .checked_add(n_bytes)
            .and_then(|end| align_up(end, alignment))
            .ok_or_else(|| GgufError::SizeOverflow {
                tensor: t.name.clone(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
            })?;
    }
    let pad = padding(out.len() as u64, alignment);
    out.extend_from_slice(&pad);
    Ok(out)
}

fn encode_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The payload of `value`, without its type id. An empty array is written with element type
/// u8: a `Value` does not know it and no reader can observe it. (gguf-py's `GGUFWriter` refuses
/// empty arrays; gguf.cpp reads them, so a file we copy may hold one.)
fn encode_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => encode_string(out, s),
        Value::Array(items) => {
            let elem_type = items.first().map_or(0, Value::type_id);
            debug_assert_ne!(elem_type, ARRAY_TYPE_ID, "checked by check_metadata");
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                encode_value(out, item);
            }
        }
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        // Refused by check_metadata.
        Value::Unread { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::quant::quantize;
    use crate::formats::gguf::{GgufFile, ALIGNMENT_KEY};

    fn every_value_type() -> Vec<(String, Value)> {
        let kv = |k: &str, v| (k.to_string(), v);
        vec![
            kv("z.u8", Value::U8(255)),
            kv("a.i8", Value::I8(-128)),
            kv("m.u16", Value::U16(65535)),
            kv("b.i16", Value::I16(-32768)),
            kv("y.u32", Value::U32(u32::MAX)),
            kv("c.i32", Value::I32(i32::MIN)),
            kv("x.f32", Value::F32(1e-5)),
            kv("d.bool", Value::Bool(true)),
            kv("w.string", Value::String("héllo, 世界".into())),
            kv("e.empty_string", Value::String(String::new())),
            kv("v.u64", Value::U64(u64::MAX)),
            kv("f.i64", Value::I64(i64::MIN)),
            kv("u.f64", Value::F64(-0.1)),
            kv(
                "general.g.strings",
                Value::Array(vec![
                    Value::String("a".into()),
                    Value::String(String::new()),
                ]),
            ),
            kv(
                "general.t.i32s",
                Value::Array(vec![Value::I32(-1), Value::I32(2)]),
            ),
            kv(
                "general.h.bools",
                Value::Array(vec![Value::Bool(false), Value::Bool(true)]),
            ),
            kv("general.s.f64s", Value::Array(vec![Value::F64(1.5)])),
            kv("general.i.empty", Value::Array(vec![])),
        ]
    }

    /// One tensor per dtype, with shapes of 1 to 4 dims.
    fn every_dtype() -> Vec<TensorData> {
        DType::ALL
            .into_iter()
            .enumerate()
            .map(|(i, dtype)| {
                let row = dtype.block_size().max(3) * 2;
                let shape: Vec<usize> = [row, 2, 3, 1][..1 + i % 4].iter().rev().copied().collect();
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n)
                    .map(|j| (j as f32 * 0.37).sin() * (i + 1) as f32)
                    .collect();
                let bytes = quantize(dtype, &values).unwrap();
                (format!("t.{dtype}"), dtype, shape, bytes)
            })
            .collect()
    }

    #[test]
    fn round_trips_every_value_type_and_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("all.gguf");
        let metadata = every_value_type();
        let tensors = every_dtype();
        write_gguf(&path, &metadata, &tensors).unwrap();
        assert!(!partial_path(&path).exists());

        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.metadata, metadata, "metadata in file order");
        assert_eq!(f.alignment, 32);
        assert_eq!(f.tensors.len(), tensors.len());
        for (info, (name, dtype, shape, bytes)) in f.tensors.iter().zip(&tensors) {
            assert_eq!((&info.name, info.dtype, &info.shape), (name, *dtype, shape));
            assert_eq!(info.offset % 32, 0, "{name}");
            assert_eq!(f.bytes(info), &bytes[..], "{name}");
        }
        // Zero padding after the last tensor too.
        assert_eq!(f.len() % 32, 0);
        assert_eq!(f.get("general.g.strings"), Some(&metadata[13].1));
        assert_eq!(f.get_array("general.t.i32s").map(|a| a.len()), Some(2));
        assert_eq!(f.get_f64("u.f64"), Some(-0.1));
    }

    #[test]
    fn honours_general_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        let metadata = vec![(ALIGNMENT_KEY.to_string(), Value::U32(256))];
        let tensors = vec![
            ("a".to_string(), DType::F32, vec![3], vec![0; 12]),
            ("b".to_string(), DType::F16, vec![1, 5], vec![1; 10]),
        ];
        write_gguf(&path, &metadata, &tensors).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.alignment, 256);
        assert_eq!(f.tensors[1].offset - f.tensors[0].offset, 256);
        assert_eq!(f.len(), f.data_start + 512);
    }

    fn write_err(metadata: &[(String, Value)], tensors: &[TensorData]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gguf");
        let msg = write_gguf(&path, metadata, tensors)
            .unwrap_err()
            .to_string();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "wrote a file"
        );
        msg
    }

    #[test]
    fn rejects_invalid_input_before_writing() {
        let t = |name: &str, dtype, shape: Vec<usize>, n| {
            (name.to_string(), dtype, shape, vec![0u8; n])
        };
        let kv = |k: &str, v| vec![(k.to_string(), v)];
        let msg = write_err(&[], &[t("w", DType::Q8_0, vec![2, 32], 34)]);
        assert_eq!(
            msg,
            "tensor \"w\" (Q8_0, shape [2, 32]) needs 68 bytes but has 34"
        );
        let msg = write_err(
            &[],
            &[
                t("w", DType::F32, vec![1], 4),
                t("w", DType::F32, vec![1], 4),
            ],
        );
        assert_eq!(msg, "duplicate tensor name \"w\"");
        let msg = write_err(&[], &[t("w", DType::Q4K, vec![128], 72)]);
        assert!(
            msg.contains("not a multiple of the block size 256"),
            "{msg}"
        );
        let msg = write_err(&[], &[t("w", DType::F32, vec![], 4)]);
        assert!(msg.contains("has 0 dimensions"), "{msg}");
        let msg = write_err(&kv("k", Value::Array(vec![Value::Array(vec![])])), &[]);
        assert!(msg.contains("array of arrays"), "{msg}");
        let msg = write_err(
            &kv("k", Value::Array(vec![Value::U8(1), Value::I8(1)])),
            &[],
        );
        assert!(msg.contains("mixing value types"), "{msg}");
        let msg = write_err(&kv(ALIGNMENT_KEY, Value::U64(32)), &[]);
        assert!(
            msg.contains("general.alignment U64(32) is invalid"),
            "{msg}"
        );
        let mut dup = kv("k", Value::U8(1));
        dup.extend(kv("k", Value::U8(2)));
        assert_eq!(write_err(&dup, &[]), "duplicate metadata key \"k\"");
    }

    #[test]
    fn replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.gguf");
        std::fs::write(&path, b"old").unwrap();
        write_gguf(&path, &[], &[]).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert!(f.tensors.is_empty() && f.metadata.is_empty());
    }

    fn header(name: &str, dtype: DType, shape: Vec<usize>) -> TensorHeader {
        TensorHeader {
            name: name.into(),
            dtype,
            shape,
        }
    }

    #[test]
    fn streams_tensors_in_pieces_of_any_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.gguf");
        let tensors = every_dtype();
        let headers: Vec<TensorHeader> = tensors
            .iter()
            .map(|(n, d, s, _)| header(n, *d, s.clone()))
            .collect();
        let mut w = GgufWriter::create(&path, &every_value_type(), &headers).unwrap();
        assert!(partial_path(&path).exists() && !path.exists());
        // Pieces of 7 bytes, crossing no tensor boundary.
        for (name, _, _, bytes) in &tensors {
            assert_eq!(
                w.next_tensor().map(|t| t.name.as_str()),
                Some(name.as_str())
            );
            for piece in bytes.chunks(7) {
                w.write(piece).unwrap();
            }
        }
        assert!(w.next_tensor().is_none());
        let len = w.finish().unwrap();
        assert!(!partial_path(&path).exists());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        // Byte-identical to the in-memory path.
        let other = dir.path().join("m.gguf");
        write_gguf(&other, &every_value_type(), &tensors).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&other).unwrap()
        );
    }

    #[test]
    fn offsets_are_the_running_sum_of_padded_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.gguf");
        // 3 f32 (12 bytes -> 32), 40 f16 (80 bytes -> 96), one Q8_0 block (34 -> 64).
        let tensors = vec![
            ("a".to_string(), DType::F32, vec![3], vec![1u8; 12]),
            ("b".to_string(), DType::F16, vec![2, 20], vec![2u8; 80]),
            ("c".to_string(), DType::Q8_0, vec![32], vec![3u8; 34]),
        ];
        write_gguf(&path, &[], &tensors).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let offsets: Vec<u64> = f.tensors.iter().map(|t| t.offset - f.data_start).collect();
        assert_eq!(offsets, vec![0, 32, 128]);
        assert_eq!(f.len(), f.data_start + 192);
        let bytes = std::fs::read(&path).unwrap();
        let data = f.data_start as usize;
        assert!(bytes[data + 12..data + 32].iter().all(|&b| b == 0));
        assert!(
            bytes[data + 162..].iter().all(|&b| b == 0),
            "padding after the last tensor"
        );
    }

    #[test]
    fn a_piece_past_the_end_of_its_tensor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.gguf");
        let headers = [
            header("a", DType::F32, vec![2]),
            header("b", DType::F32, vec![1]),
        ];
        let mut w = GgufWriter::create(&path, &[], &headers).unwrap();
        let msg = w.write(&[0; 12]).unwrap_err().to_string();
        assert_eq!(
            msg,
            "tensor \"a\" (F32, shape [2]) needs 8 bytes but has 12"
        );
    }

    #[test]
    fn finishing_early_or_dropping_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.gguf");
        let headers = [
            header("a", DType::F32, vec![2]),
            header("b", DType::F32, vec![1]),
        ];
        let mut w = GgufWriter::create(&path, &[], &headers).unwrap();
        w.write(&[0; 8]).unwrap();
        let msg = w.finish().unwrap_err().to_string();
        assert_eq!(msg, "tensor \"b\" (F32, shape [1]) needs 4 bytes but has 0");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let w = GgufWriter::create(&path, &[], &headers).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // Bytes after the last tensor are refused.
        let mut w = GgufWriter::create(&path, &[], &headers[1..]).unwrap();
        w.write(&[0; 4]).unwrap();
        assert!(w
            .write(&[0])
            .unwrap_err()
            .to_string()
            .contains("after the last tensor"));
    }

    #[test]
    fn a_failed_rename_removes_the_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        std::fs::create_dir(path.join("inside").parent().unwrap()).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        let w = GgufWriter::create(&path, &[], &[]).unwrap();
        assert!(
            w.finish().is_err(),
            "a non-empty directory cannot be replaced"
        );
        assert!(!partial_path(&path).exists());
    }
}
