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
/// u8: its element type cannot be known from a `Value` and no reader can observe it.
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
