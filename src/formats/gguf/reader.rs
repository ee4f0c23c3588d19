//! The GGUF reader: parses and validates the whole header of a memory-mapped v2/v3 file at open,
//! then hands out tensor data as slices of the map (zero-copy).
//!
//! Parsing follows ggml/src/gguf.cpp (`gguf_init_from_file_impl`) and its checks: magic, version,
//! duplicate keys and tensor names, `general.alignment` a power of two, at most `GGML_MAX_DIMS`
//! dimensions, rows a whole number of blocks, offsets multiples of the alignment, data inside the
//! file. We add what a mapped reader needs on top: every count is bounded by the bytes left in
//! the file before anything is allocated, and tensors must not overlap.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::{GgufError, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::dtype::DType;

/// One metadata value. The variant order and ids are gguf's `enum gguf_type` (gguf.h).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// All elements have the same type, and none is an array.
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
    /// An array under a key this tool never reads (not `tokenizer.*` or `general.*`): checked
    /// element by element at open, but not kept, so that a file with a 40M-element array does
    /// not cost 32 bytes of memory per element (issue 18). The writer refuses it.
    Unread {
        elem_type: u32,
        len: u64,
    },
}

/// Arrays are kept only under these key prefixes: the tokenizer (converted and carried into
/// exports) and `general.*` (carried into exports).
const KEPT_ARRAY_PREFIXES: [&str; 2] = ["tokenizer.", "general."];
/// The most elements of an array that is kept: 4M, 16 times the largest vocabulary published
/// (Gemma's 262k) and above any SentencePiece charsmap seen. A kept element takes 32 bytes (plus
/// its text for a string), so this bounds one array at about 130 MB plus its strings.
pub(crate) const MAX_KEPT_ARRAY: usize = 1 << 22;

/// gguf's type id of arrays (`GGUF_TYPE_ARRAY`).
pub(crate) const ARRAY_TYPE_ID: u32 = 9;
/// gguf's type id of strings (`GGUF_TYPE_STRING`).
const STRING_TYPE_ID: u32 = 8;

impl Value {
    /// gguf's type id of this value (`enum gguf_type`).
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => STRING_TYPE_ID,
            Value::Array(_) | Value::Unread { .. } => ARRAY_TYPE_ID,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Any unsigned integer, or a signed one that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer that fits in an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float (f32 or f64). Integers are not converted: a float key stored as an integer is a
    /// writer bug worth seeing.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file, validated at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// Row-major (outermost first): ggml's `ne` reversed, so the last entry is ggml's `ne[0]`,
    /// the row length.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The number of elements (the product of `shape`, checked at open).
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open, fully validated GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    /// In file order, which exporters preserve.
    pub metadata: Vec<(String, Value)>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section (the end of the header, aligned up).
    pub data_start: u64,
    keys: HashMap<String, usize>,
    names: HashMap<String, usize>,
}

impl GgufFile {
    /// Maps `path` and validates its whole header; see the module docs for what is checked.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = crate::paths::open_file(&path).map_err(io)?;
        // SAFETY: the map is read-only; like candle and safetensors we accept that another
        // process truncating or rewriting the file while it is mapped is undefined behaviour.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse(&mmap)?;
        Ok(GgufFile {
            path,
            mmap,
            version: header.version,
            keys: index(header.metadata.iter().map(|(k, _)| k)),
            names: index(header.tensors.iter().map(|t| &t.name)),
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_start: header.data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells the kernel bytes `start..end` of the file are not needed now.
    pub fn release(&self, start: u64, end: u64) {
        crate::formats::release_range(&self.mmap, start, end);
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// The value of `key`. The fields are public, so the index built at open is checked against
    /// them and a linear search covers a caller that edited `metadata`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let indexed = self.keys.get(key).and_then(|&i| self.metadata.get(i));
        indexed
            .filter(|(k, _)| k == key)
            .or_else(|| self.metadata.iter().find(|(k, _)| k == key))
            .map(|(_, v)| v)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    pub(crate) fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    pub fn get_array(&self, key: &str) -> Option<&[Value]> {
        self.get(key)?.as_array()
    }

    /// The info of tensor `name`, looked up like [`GgufFile::get`].
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let indexed = self.names.get(name).and_then(|&i| self.tensors.get(i));
        indexed
            .filter(|t| t.name == name)
            .or_else(|| self.tensors.iter().find(|t| t.name == name))
    }

    /// The raw data of `info`, borrowed from the map. Infos of this file were bounds-checked at
    /// open; an info that did not come from this file and points outside it gets an empty slice.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let range = usize::try_from(info.offset).ok().and_then(|start| {
            let end = start.checked_add(usize::try_from(info.n_bytes).ok()?)?;
            Some(start..end)
        });
        range.and_then(|r| self.mmap.get(r)).unwrap_or(&[])
    }
}

fn index<'a>(names: impl Iterator<Item = &'a String>) -> HashMap<String, usize> {
    names.enumerate().map(|(i, n)| (n.clone(), i)).collect()
}

/// The parsed and validated header of a GGUF file.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_start: u64,
}

/// Smallest encodings, to bound counts by the bytes left before allocating: a key/value pair is
/// at least a key length (8), a type (4) and a u8 (1); a tensor info at least a name length (8),
/// n_dims (4), a type (4) and an offset (8).
const MIN_KV_BYTES: u64 = 13;
const MIN_TENSOR_INFO_BYTES: u64 = 24;

/// Parses then validates a whole GGUF file held in `buf` (what [`GgufFile::open`] does over its
/// map; public as the entry point of the fuzz target in fuzz/).
pub fn parse(buf: &[u8]) -> Result<Header, GgufError> {
    let mut cur = Cursor { buf, pos: 0 };
    let magic = cur.array::<4>(&|| "magic".into())?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = cur.u32(&|| "version".into())?;
    // gguf.cpp: v1 (32-bit counts) is "no longer supported"; 3 is the current GGUF_VERSION.
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = cur.u64(&|| "tensor count".into())?;
    let n_kv = cur.u64(&|| "key/value count".into())?;
    let n_kv = cur.bound(n_kv, MIN_KV_BYTES, &|| "key/value count".into())?;
    let n_tensors = cur.bound(n_tensors, MIN_TENSOR_INFO_BYTES, &|| "tensor count".into())?;

    let mut metadata = Vec::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = cur.string(&|| "metadata key".into())?;
        let type_id = cur.u32(&|| format!("value type of key {key:?}"))?;
        let value = read_value(&mut cur, type_id, &key)?;
        metadata.push((key, value));
    }
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        raw.push(RawTensorInfo::read(&mut cur)?);
    }
    let header_end = cur.pos as u64;
    let file_len = buf.len() as u64;

    check_unique_keys(&metadata)?;
    let alignment = alignment(&metadata)?;
    let data_start = align_up(header_end, alignment).ok_or_else(|| GgufError::Truncated {
        what: "data section".into(),
        offset: header_end,
        needed: alignment,
        len: file_len,
    })?;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = HashSet::with_capacity(raw.len());
    for r in raw {
        let t = r.validate(data_start, alignment, file_len)?;
        if !seen.insert(t.name.clone()) {
            return Err(GgufError::DuplicateTensor { tensor: t.name });
        }
        tensors.push(t);
    }
    check_no_overlap(&tensors)?;
    check_packed(&tensors, data_start, alignment)?;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

/// Reads one value of gguf type `type_id` (the value of `key`, or an element of it).
fn read_value(cur: &mut Cursor<'_>, type_id: u32, key: &str) -> Result<Value, GgufError> {
    let what = || format!("value of key {key:?}");
    Ok(match type_id {
        0 => Value::U8(u8::from_le_bytes(cur.array(&what)?)),
        1 => Value::I8(i8::from_le_bytes(cur.array(&what)?)),
        2 => Value::U16(u16::from_le_bytes(cur.array(&what)?)),
        3 => Value::I16(i16::from_le_bytes(cur.array(&what)?)),
        4 => Value::U32(u32::from_le_bytes(cur.array(&what)?)),
        5 => Value::I32(i32::from_le_bytes(cur.array(&what)?)),
        6 => Value::F32(f32::from_le_bytes(cur.array(&what)?)),
        // gguf.cpp reads a bool as an int8 and takes any non-zero byte as true.
        7 => Value::Bool(cur.array::<1>(&what)? != [0]),
        STRING_TYPE_ID => Value::String(cur.string(&what)?),
        ARRAY_TYPE_ID => read_array(cur, key)?,
        10 => Value::U64(u64::from_le_bytes(cur.array(&what)?)),
        11 => Value::I64(i64::from_le_bytes(cur.array(&what)?)),
        12 => Value::F64(f64::from_le_bytes(cur.array(&what)?)),
        _ => {
            return Err(GgufError::UnknownValueType {
                key: key.to_owned(),
                type_id,
            })
        }
    })
}

fn read_array(cur: &mut Cursor<'_>, key: &str) -> Result<Value, GgufError> {
    let elem_type = cur.u32(&|| format!("array element type of key {key:?}"))?;
    let min_elem_bytes = match elem_type {
        ARRAY_TYPE_ID => return Err(GgufError::NestedArray { key: key.into() }),
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        STRING_TYPE_ID | 10..=12 => 8,
        _ => {
            return Err(GgufError::UnknownValueType {
                key: key.into(),
                type_id: elem_type,
            })
        }
    };
    let count = cur.u64(&|| format!("array length of key {key:?}"))?;
    let count = cur.bound(count, min_elem_bytes, &|| {
        format!("array length of key {key:?}")
    })?;
    if !KEPT_ARRAY_PREFIXES.iter().any(|p| key.starts_with(p)) {
        return skip_array(cur, key, elem_type, count);
    }
    if count > MAX_KEPT_ARRAY {
        return Err(GgufError::ArrayTooLong {
            key: key.into(),
            count,
            max: MAX_KEPT_ARRAY,
        });
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        items.push(read_value(cur, elem_type, key)?);
    }
    Ok(Value::Array(items))
}

/// Checks an array that is not kept (see [`Value::Unread`]) as [`read_array`] would, element by
/// element, without allocating: fixed-size elements are in bounds, strings in bounds and UTF-8.
fn skip_array(
    cur: &mut Cursor<'_>,
    key: &str,
    elem_type: u32,
    count: usize,
) -> Result<Value, GgufError> {
    let what = || format!("value of key {key:?}");
    if elem_type == STRING_TYPE_ID {
        for _ in 0..count {
            let len_what = || format!("length of {}", what());
            let len = cur.u64(&len_what)?;
            let len = cur.bound(len, 1, &len_what)?;
            let bytes = cur.take(len as u64, &what)?;
            std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { what: what() })?;
        }
    } else {
        let size: u64 = match elem_type {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            _ => 8,
        };
        // `bound` checked count * size against the bytes left.
        cur.take(count as u64 * size, &what)?;
    }
    Ok(Value::Unread {
        elem_type,
        len: count as u64,
    })
}

fn check_unique_keys(metadata: &[(String, Value)]) -> Result<(), GgufError> {
    let mut seen = HashSet::with_capacity(metadata.len());
    for (key, _) in metadata {
        if !seen.insert(key.as_str()) {
            return Err(GgufError::DuplicateKey { key: key.clone() });
        }
    }
    Ok(())
}

/// The data alignment: `general.alignment` when present, which gguf.cpp reads as a u32 and
/// requires to be a power of two. We also require at least 4 so that every tensor's data is
/// aligned for candle's block structs (f16 fields) and f32 views; the map itself is
/// page-aligned.
pub(crate) fn alignment(metadata: &[(String, Value)]) -> Result<u64, GgufError> {
    let Some((_, value)) = metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match *value {
        Value::U32(a) if a.is_power_of_two() && a >= 4 => Ok(a.into()),
        _ => Err(GgufError::BadAlignment {
            value: format!("{value:?}"),
        }),
    }
}

pub(crate) fn align_up(n: u64, alignment: u64) -> Option<u64> {
    n.checked_next_multiple_of(alignment)
}

/// Tensors sorted by offset must each end before the next starts.
fn check_no_overlap(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        if let [a, b] = pair {
            // Cannot overflow: both ends were checked against the file length.
            if b.offset < a.offset.saturating_add(a.n_bytes) {
                return Err(GgufError::TensorOverlap {
                    first: a.name.clone(),
                    second: b.name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Tensor data in the order of the tensor infos, each tensor starting where the previous one
/// ends padded to the alignment (the first at the data section's start), as gguf.cpp requires:
/// no gap, and so no other order. Checked after [`check_no_overlap`], so an overlap is reported
/// as such.
fn check_packed(tensors: &[TensorInfo], data_start: u64, alignment: u64) -> Result<(), GgufError> {
    let mut expected = data_start;
    for t in tensors {
        if t.offset != expected {
            return Err(GgufError::TensorGap {
                tensor: t.name.clone(),
                offset: t.offset - data_start,
                expected: expected - data_start,
            });
        }
        // Cannot overflow: the tensor's end was checked against the file length.
        expected = align_up(t.offset + t.n_bytes, alignment).unwrap_or(u64::MAX);
    }
    Ok(())
}

/// A tensor info as stored: ggml order dims, raw type id, offset relative to the data section.
struct RawTensorInfo {
    name: String,
    ne: Vec<u64>,
    type_id: u32,
    offset: u64,
}

impl RawTensorInfo {
    fn read(cur: &mut Cursor<'_>) -> Result<RawTensorInfo, GgufError> {
        let name = cur.string(&|| "tensor name".into())?;
        let n_dims = cur.u32(&|| format!("n_dims of tensor {name:?}"))?;
        // Checked before reading the dims, so this also bounds the allocation below.
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(GgufError::BadRank {
                tensor: name,
                n_dims: n_dims.into(),
            });
        }
        let mut ne = Vec::with_capacity(MAX_DIMS);
        for _ in 0..n_dims {
            ne.push(cur.u64(&|| format!("dimensions of tensor {name:?}"))?);
        }
        let type_id = cur.u32(&|| format!("type of tensor {name:?}"))?;
        let offset = cur.u64(&|| format!("offset of tensor {name:?}"))?;
        Ok(RawTensorInfo {
            name,
            ne,
            type_id,
            offset,
        })
    }

    fn validate(self, data_start: u64, alignment: u64, len: u64) -> Result<TensorInfo, GgufError> {
        let RawTensorInfo {
            name,
            ne,
            type_id,
            offset,
        } = self;
        let Some(dtype) = DType::from_ggml_id(type_id) else {
            return Err(GgufError::UnsupportedTensorType {
                tensor: name,
                type_id,
            });
        };
        let shape: Vec<u64> = ne.iter().rev().copied().collect();
        let (shape, n_bytes) = check_shape(&name, dtype, &shape)?;
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedTensor {
                tensor: name,
                offset,
                alignment,
            });
        }
        // Saturation lands past any real file length, so it is reported as out of bounds.
        let start = data_start.saturating_add(offset);
        let end = start.saturating_add(n_bytes);
        if end > len {
            return Err(GgufError::TensorOutOfBounds {
                tensor: name,
                start,
                end,
                len,
            });
        }
        Ok(TensorInfo {
            name,
            dtype,
            shape,
            offset: start,
            n_bytes,
        })
    }
}

/// Checks a row-major `shape` of `dtype` (1 to 4 non-zero dims, rows of whole blocks, sizes that
/// fit in u64 and usize) and returns it as usizes with its byte size. Shared with the writer.
pub(crate) fn check_shape(
    name: &str,
    dtype: DType,
    shape: &[u64],
) -> Result<(Vec<usize>, u64), GgufError> {
    if shape.is_empty() || shape.len() > MAX_DIMS {
        return Err(GgufError::BadRank {
            tensor: name.into(),
            n_dims: shape.len() as u64,
        });
    }
    if shape.contains(&0) {
        return Err(GgufError::ZeroDimension {
            tensor: name.into(),
            shape: shape.to_vec(),
        });
    }
    let overflow = || GgufError::SizeOverflow {
        tensor: name.into(),
        shape: shape.to_vec(),
    };
    let row = shape.last().copied().unwrap_or(0);
    // gguf.cpp: "tensor of type ... has ... elements per row, not a multiple of block size".
    if !row.is_multiple_of(dtype.block_size() as u64) {
        return Err(GgufError::RowNotWholeBlocks {
            tensor: name.into(),
            dtype,
            row,
            block: dtype.block_size(),
        });
    }
    let n_elements = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| usize::try_from(n).is_ok())
        .ok_or_else(overflow)?;
    let n_bytes = dtype.size_of(n_elements).ok_or_else(overflow)?;
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| overflow()))
        .collect::<Result<Vec<usize>, _>>()?;
    Ok((dims, n_bytes))
}

/// A description of the field being read, built only when an error needs it.
type What<'w> = &'w dyn Fn() -> String;

/// A position in the header with bounds-checked little-endian reads.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: u64, what: What<'_>) -> Result<&'a [u8], GgufError> {
        let truncated = || GgufError::Truncated {
            what: what(),
            offset: self.pos as u64,
            needed: n,
            len: self.buf.len() as u64,
        };
        let n = usize::try_from(n).map_err(|_| truncated())?;
        let end = self.pos.checked_add(n).ok_or_else(truncated)?;
        let bytes = self.buf.get(self.pos..end).ok_or_else(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: What<'_>) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: What<'_>) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What<'_>) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// `count` items of at least `min_bytes` each must fit in the rest of the file; returns the
    /// count as a usize that is then safe to allocate for.
    fn bound(&self, count: u64, min_bytes: u64, what: What<'_>) -> Result<usize, GgufError> {
        let fits = count
            .checked_mul(min_bytes)
            .is_some_and(|n| n <= self.remaining());
        match usize::try_from(count) {
            Ok(n) if fits => Ok(n),
            _ => Err(GgufError::CountTooLarge {
                what: what(),
                count,
                remaining: self.remaining(),
            }),
        }
    }

    /// A gguf string: u64 length, then that many bytes of UTF-8 (no terminator).
    fn string(&mut self, what: What<'_>) -> Result<String, GgufError> {
        let len_what = || format!("length of {}", what());
        let len = self.u64(&len_what)?;
        let len = self.bound(len, 1, &len_what)?;
        let bytes = self.take(len as u64, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 { what: what() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds GGUF bytes by hand, so that tests can write what the writer refuses to.
    struct Raw(Vec<u8>);

    impl Raw {
        fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
            Raw(MAGIC.to_vec()).u32(version).u64(n_tensors).u64(n_kv)
        }
        fn u32(mut self, v: u32) -> Raw {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Raw {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn bytes(mut self, b: &[u8]) -> Raw {
            self.0.extend_from_slice(b);
            self
        }
        fn str(self, s: &str) -> Raw {
            self.u64(s.len() as u64).bytes(s.as_bytes())
        }
        fn kv_u32(self, key: &str, v: u32) -> Raw {
            self.str(key).u32(4).u32(v)
        }
        /// A tensor info; `ne` in ggml order.
        fn tensor(self, name: &str, ne: &[u64], type_id: u32, offset: u64) -> Raw {
            let mut r = self.str(name).u32(ne.len() as u32);
            for &d in ne {
                r = r.u64(d);
            }
            r.u32(type_id).u64(offset)
        }
        /// Pads to `align`, then appends `n` data bytes.
        fn data(mut self, align: usize, n: usize) -> Raw {
            while !self.0.len().is_multiple_of(align) {
                self.0.push(0);
            }
            self.0.resize(self.0.len() + n, 0x11);
            self
        }
    }

    fn err(raw: Raw) -> String {
        match parse(&raw.0) {
            Ok(h) => panic!("expected an error, parsed {h:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_err(raw: Raw, needle: &str) {
        let msg = err(raw);
        assert!(msg.contains(needle), "{msg:?} does not contain {needle:?}");
    }

    /// One key, two F32 tensors of 4 elements ([4] and [2, 2]).
    fn valid() -> Raw {
        Raw::header(3, 2, 1)
            .kv_u32("general.n", 7)
            .tensor("a", &[4], 0, 0)
            .tensor("b", &[2, 2], 0, 32)
            .data(32, 48)
    }

    #[test]
    fn parses_a_hand_made_file() {
        let bytes = valid().0;
        let h = parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata, vec![("general.n".to_string(), Value::U32(7))]);
        assert_eq!(h.alignment, 32);
        assert_eq!(h.data_start % 32, 0);
        let b = &h.tensors[1];
        assert_eq!(
            (b.name.as_str(), b.dtype, b.shape.clone()),
            ("b", DType::F32, vec![2, 2])
        );
        assert_eq!((b.offset, b.n_bytes), (h.data_start + 32, 16));
    }

    #[test]
    fn reverses_ggml_dims_into_row_major() {
        let bytes = Raw::header(2, 1, 0)
            .tensor("w", &[64, 3, 2], DType::Q8_0.ggml_id(), 0)
            .data(32, 6 * 2 * 34)
            .0;
        let h = parse(&bytes).unwrap();
        assert_eq!(h.tensors[0].shape, vec![2, 3, 64]);
        assert_eq!(h.tensors[0].n_bytes, 6 * 2 * 34);
    }

    #[test]
    fn bad_magic() {
        assert_err(Raw(b"GGML".to_vec()).u32(3).u64(0).u64(0), "bad magic");
    }

    #[test]
    fn unsupported_versions() {
        assert_err(Raw::header(1, 0, 0), "unsupported GGUF version 1");
        assert_err(Raw::header(4, 0, 0), "unsupported GGUF version 4");
        // A big-endian file reads as a huge version.
        assert_err(
            Raw::header(3u32.swap_bytes(), 0, 0),
            "unsupported GGUF version",
        );
    }

    #[test]
    fn truncated_header() {
        assert_err(Raw(b"GG".to_vec()), "truncated: magic");
        // Long names, so that the counts pass their lower bound and the reads run out.
        let raw = Raw::header(3, 0, 1).str("general.name");
        assert_err(
            raw,
            "truncated: value type of key \"general.name\" at byte 44 needs 4 bytes",
        );
        let raw = Raw::header(3, 1, 0).str("blk.0.w").u32(2).u64(4).u32(0);
        assert_err(raw, "truncated: dimensions of tensor \"blk.0.w\"");
    }

    #[test]
    fn every_prefix_of_a_valid_file_is_rejected() {
        let bytes = valid().0;
        for len in 0..bytes.len() {
            assert!(
                parse(&bytes[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
    }

    #[test]
    fn corrupted_files_never_panic() {
        let bytes = valid().0;
        // A deterministic LCG: each case flips a few bytes of the valid file.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) as usize
        };
        for _ in 0..20_000 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let i = next() % b.len();
                b[i] = next() as u8;
            }
            let _ = parse(&b);
        }
    }

    #[test]
    fn counts_are_bounded_by_the_file_before_allocating() {
        assert_err(
            Raw::header(3, u64::MAX, 0),
            "tensor count 18446744073709551615 cannot fit",
        );
        assert_err(
            Raw::header(3, 0, 1 << 40),
            "key/value count 1099511627776 cannot fit",
        );
        assert_err(
            Raw::header(3, 0, 1).str("k").u32(9).u32(4).u64(1 << 50),
            "array length of key \"k\" 1125899906842624 cannot fit",
        );
        assert_err(
            Raw::header(3, 0, 1).u64(u64::MAX).bytes(&[0; 8]),
            "length of metadata key 18446744073709551615 cannot fit in the 8 bytes",
        );
        assert_err(
            Raw::header(3, 0, 1)
                .str("k")
                .u32(8)
                .u64(100)
                .bytes(b"short"),
            "length of value of key \"k\" 100 cannot fit in the 5 bytes",
        );
    }

    #[test]
    fn invalid_utf8() {
        assert_err(
            Raw::header(3, 0, 1)
                .u64(2)
                .bytes(&[0xc3, 0x28])
                .u32(4)
                .u32(0),
            "invalid UTF-8 in metadata key",
        );
        assert_err(
            Raw::header(3, 1, 0).u64(1).bytes(&[0xff; 16]),
            "invalid UTF-8 in tensor name",
        );
    }

    #[test]
    fn unknown_value_type() {
        assert_err(
            Raw::header(3, 0, 1).str("k").u32(13).u32(0),
            "key \"k\" has unknown value type 13",
        );
        assert_err(
            Raw::header(3, 0, 1).str("k").u32(9).u32(99).u64(0),
            "unknown value type 99",
        );
    }

    #[test]
    fn nested_arrays() {
        let raw = Raw::header(3, 0, 1)
            .str("k")
            .u32(9)
            .u32(9)
            .u64(1)
            .u32(4)
            .u64(0);
        assert_err(raw, "key \"k\" holds an array of arrays");
    }

    #[test]
    fn duplicate_keys() {
        let raw = Raw::header(3, 0, 2).kv_u32("a", 1).kv_u32("a", 2);
        assert_err(raw, "duplicate metadata key \"a\"");
    }

    #[test]
    fn unsupported_tensor_type() {
        // IQ2_XXS: an importance-matrix type candle cannot decode.
        let raw = Raw::header(3, 1, 0)
            .tensor("iq2", &[256], 16, 0)
            .data(32, 66);
        assert_err(
            raw,
            "tensor \"iq2\" has ggml type 16, which is unknown or unsupported",
        );
    }

    #[test]
    fn bad_ranks() {
        let raw = Raw::header(3, 1, 0).tensor("s", &[], 0, 0).data(32, 4);
        assert_err(raw, "tensor \"s\" has 0 dimensions");
        let raw = Raw::header(3, 1, 0)
            .tensor("t", &[1, 1, 1, 1, 1], 0, 0)
            .data(32, 4);
        assert_err(raw, "tensor \"t\" has 5 dimensions");
    }

    #[test]
    fn zero_dimension() {
        let raw = Raw::header(3, 1, 0).tensor("z", &[4, 0], 0, 0).data(32, 4);
        assert_err(raw, "tensor \"z\" has a zero dimension in shape [0, 4]");
    }

    #[test]
    fn size_overflow() {
        let raw = Raw::header(3, 1, 0)
            .tensor("big", &[1 << 32, 1 << 32], 0, 0)
            .data(32, 4);
        assert_err(raw, "tensor \"big\" with shape [4294967296, 4294967296]: element count or byte size overflows");
        let raw = Raw::header(3, 1, 0)
            .tensor("big", &[1 << 62], 0, 0)
            .data(32, 4);
        assert_err(raw, "overflows");
    }

    #[test]
    fn rows_must_be_whole_blocks() {
        let raw = Raw::header(3, 1, 0)
            .tensor("q", &[16, 4], DType::Q4_0.ggml_id(), 0)
            .data(32, 72);
        assert_err(raw, "tensor \"q\" of type Q4_0 has rows of 16 elements, not a multiple of the block size 32");
    }

    #[test]
    fn duplicate_tensor_names() {
        let raw = Raw::header(3, 2, 0)
            .tensor("w", &[4], 0, 0)
            .tensor("w", &[4], 0, 32)
            .data(32, 48);
        assert_err(raw, "duplicate tensor name \"w\"");
    }

    #[test]
    fn alignment_must_be_a_u32_power_of_two_of_at_least_4() {
        for bad in [0, 2, 48] {
            let raw = Raw::header(3, 0, 1).kv_u32(ALIGNMENT_KEY, bad);
            assert_err(raw, &format!("general.alignment U32({bad}) is invalid"));
        }
        let raw = Raw::header(3, 0, 1).str(ALIGNMENT_KEY).u32(10).u64(64);
        assert_err(raw, "general.alignment U64(64) is invalid");
    }

    #[test]
    fn custom_alignment_moves_the_data_section() {
        let bytes = Raw::header(3, 1, 1)
            .kv_u32(ALIGNMENT_KEY, 64)
            .tensor("a", &[4], 0, 0)
            .data(64, 16)
            .0;
        let h = parse(&bytes).unwrap();
        assert_eq!((h.alignment, h.data_start % 64), (64, 0));
        assert_eq!(h.tensors[0].offset, h.data_start);
    }

    #[test]
    fn misaligned_tensor() {
        let raw = Raw::header(3, 1, 0).tensor("m", &[4], 0, 8).data(32, 24);
        assert_err(
            raw,
            "tensor \"m\" has data offset 8, not a multiple of the alignment 32",
        );
    }

    #[test]
    fn tensor_past_end_of_file() {
        let raw = Raw::header(3, 1, 0).tensor("e", &[8], 0, 0).data(32, 31);
        let msg = err(raw);
        assert!(msg.contains("tensor \"e\" data spans bytes"), "{msg}");
        assert!(msg.contains("past the end of the file"), "{msg}");
        let raw = Raw::header(3, 1, 0)
            .tensor("e", &[8], 0, u64::MAX - 31)
            .data(32, 32);
        assert_err(raw, "past the end of the file");
    }

    #[test]
    fn overlapping_tensors() {
        let raw = Raw::header(3, 2, 0)
            .tensor("b", &[16], 0, 32)
            .tensor("a", &[16], 0, 0)
            .data(32, 96);
        assert_err(raw, "tensors \"a\" and \"b\" overlap");
    }

    #[test]
    fn tensor_data_out_of_order_or_with_gaps() {
        let raw = Raw::header(3, 2, 0)
            .tensor("b", &[16], 0, 64)
            .tensor("a", &[16], 0, 0)
            .data(32, 128);
        assert_err(raw, "tensor \"b\" has data offset 64, expected 0");
        // In order, but with a gap between the two.
        let raw = Raw::header(3, 2, 0)
            .tensor("a", &[16], 0, 0)
            .tensor("b", &[16], 0, 96)
            .data(32, 160);
        assert_err(raw, "tensor \"b\" has data offset 96, expected 64");
    }

    #[test]
    fn value_accessors() {
        assert_eq!(Value::I32(5).as_u64(), Some(5));
        assert_eq!(Value::I8(-1).as_u64(), None);
        assert_eq!(Value::U64(u64::MAX).as_i64(), None);
        assert_eq!(Value::F32(0.5).as_f64(), Some(0.5));
        assert_eq!(Value::U32(1).as_f64(), None);
        assert_eq!(Value::String("x".into()).as_str(), Some("x"));
        assert_eq!(
            Value::Array(vec![Value::Bool(true)]).as_array(),
            Some(&[Value::Bool(true)][..])
        );
    }

    #[test]
    fn open_reports_io_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.gguf");
        let msg = GgufFile::open(&missing).unwrap_err().to_string();
        assert!(msg.contains("missing.gguf"), "{msg}");
        let empty = dir.path().join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        let msg = GgufFile::open(&empty).unwrap_err().to_string();
        assert!(msg.contains("truncated: magic"), "{msg}");
    }

    #[test]
    fn open_gives_zero_copy_tensor_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.gguf");
        std::fs::write(&path, valid().0).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_u64("general.n"), Some(7));
        assert_eq!(f.get_str("general.n"), None);
        let b = f.tensor("b").unwrap().clone();
        assert_eq!(f.bytes(&b), &[0x11; 16][..]);
        assert!(f.tensor("c").is_none());
        let mut f = f;
        f.metadata.clear();
        assert_eq!(
            f.get("general.n"),
            None,
            "the index follows edits of the public fields"
        );
        f.tensors.swap(0, 1);
        assert_eq!(f.tensor("b").map(|t| t.shape.clone()), Some(vec![2, 2]));
        let foreign = TensorInfo {
            offset: u64::MAX,
            ..b.clone()
        };
        assert!(f.bytes(&foreign).is_empty());
    }
}
