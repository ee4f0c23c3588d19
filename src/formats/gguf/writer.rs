//! A small GGUF v3 writer for tests and fixtures: everything in memory, validated before the
//! first byte is written, written to `<path>.partial` and renamed last.
//!
//! The layout is the one gguf.cpp (`gguf_write_to_buf`) and gguf-py's `GGUFWriter` produce:
//! header, key/value pairs, tensor infos with dims in ggml order (innermost first), zero padding
//! to the alignment, then each tensor's data padded to the alignment, the last one included.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::reader::{align_up, alignment, check_shape, Value, ARRAY_TYPE_ID};
use super::{GgufError, MAGIC, VERSION};
use crate::dtype::DType;

/// A tensor to write: name, type, row-major shape (outermost first) and its raw bytes.
pub type TensorData = (String, DType, Vec<usize>, Vec<u8>);

/// Writes a GGUF v3 file at `path` holding `metadata` (in this order) and `tensors` (in this
/// order, data laid out back to back). The alignment is `general.alignment` when `metadata`
/// has it (a u32 power of two >= 4), else 32.
pub fn write_gguf(
    path: impl AsRef<Path>,
    metadata: &[(String, Value)],
    tensors: &[TensorData],
) -> Result<(), GgufError> {
    let path = path.as_ref();
    let alignment = alignment(metadata)?;
    check_metadata(metadata)?;
    let sizes = check_tensors(tensors)?;
    let header = encode_header(metadata, tensors, &sizes, alignment)?;

    let partial = partial_path(path);
    let result = write_file(&partial, &header, tensors, alignment)
        .and_then(|()| fs::rename(&partial, path).map_err(io(path)));
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&partial);
    }
    result
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> GgufError + '_ {
    move |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".partial");
    PathBuf::from(name)
}

fn write_file(
    path: &Path,
    header: &[u8],
    tensors: &[TensorData],
    alignment: u64,
) -> Result<(), GgufError> {
    let file = File::create(path).map_err(io(path))?;
    let mut out = BufWriter::new(file);
    out.write_all(header).map_err(io(path))?;
    for (_, _, _, bytes) in tensors {
        out.write_all(bytes).map_err(io(path))?;
        out.write_all(&padding(bytes.len() as u64, alignment))
            .map_err(io(path))?;
    }
    let file = out.into_inner().map_err(|e| io(path)(e.into_error()))?;
    file.sync_all().map_err(io(path))
}

/// Zeros taking `len` up to the next multiple of `alignment` (a power of two, at most 2^31).
fn padding(len: u64, alignment: u64) -> Vec<u8> {
    let pad = len.wrapping_neg() % alignment;
    vec![0u8; pad as usize]
}

/// Keys must be unique and arrays flat and of one type, as readers (ours, gguf.cpp) require.
fn check_metadata(metadata: &[(String, Value)]) -> Result<(), GgufError> {
    let mut seen = HashSet::with_capacity(metadata.len());
    for (key, value) in metadata {
        if !seen.insert(key.as_str()) {
            return Err(GgufError::DuplicateKey { key: key.clone() });
        }
        let Value::Array(items) = value else { continue };
        if items.iter().any(|v| matches!(v, Value::Array(_))) {
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

/// Checks names, shapes and byte lengths; returns each tensor's byte size.
fn check_tensors(tensors: &[TensorData]) -> Result<Vec<u64>, GgufError> {
    let mut seen = HashSet::with_capacity(tensors.len());
    let mut sizes = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, bytes) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(GgufError::DuplicateTensor {
                tensor: name.clone(),
            });
        }
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let (_, n_bytes) = check_shape(name, *dtype, &dims)?;
        if n_bytes != bytes.len() as u64 {
            return Err(GgufError::TensorByteLength {
                tensor: name.clone(),
                dtype: *dtype,
                shape: shape.clone(),
                expected: n_bytes,
                actual: bytes.len(),
            });
        }
        sizes.push(n_bytes);
    }
    Ok(sizes)
}

/// Everything before the data section, padded to `alignment`.
fn encode_header(
    metadata: &[(String, Value)],
    tensors: &[TensorData],
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
    for ((name, dtype, shape, _), &n_bytes) in tensors.iter().zip(sizes) {
        encode_string(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        // ggml order: ne[0] is the row length, the last row-major dim.
        for &d in shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&dtype.ggml_id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = offset
            .checked_add(n_bytes)
            .and_then(|end| align_up(end, alignment))
            .ok_or_else(|| GgufError::SizeOverflow {
                tensor: name.clone(),
                shape: shape.iter().map(|&d| d as u64).collect(),
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
                "g.strings",
                Value::Array(vec![
                    Value::String("a".into()),
                    Value::String(String::new()),
                ]),
            ),
            kv("t.i32s", Value::Array(vec![Value::I32(-1), Value::I32(2)])),
            kv(
                "h.bools",
                Value::Array(vec![Value::Bool(false), Value::Bool(true)]),
            ),
            kv("s.f64s", Value::Array(vec![Value::F64(1.5)])),
            kv("i.empty", Value::Array(vec![])),
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
        assert_eq!(f.get("g.strings"), Some(&metadata[13].1));
        assert_eq!(f.get_array("t.i32s").map(|a| a.len()), Some(2));
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
}
