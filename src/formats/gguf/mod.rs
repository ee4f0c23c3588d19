//! GGUF, llama.cpp's model file format: a validating zero-copy reader ([`reader`]), the block
//! (de)quantization of every tensor type we support ([`quant`]), the Q/K row permutation that
//! llama.cpp's converter applies to attention weights ([`quant::permute_rows_hf_to_gguf`]), and a
//! streaming writer ([`writer`]).
//!
//! The layout followed here is the one in ggml/docs/gguf.md and ggml/src/gguf.cpp
//! (`gguf_init_from_file_impl`): magic `GGUF`, a u32 version, u64 tensor and key/value counts,
//! the key/value pairs, the tensor infos, then the tensor data, padded to `general.alignment`
//! (32 by default). All integers are little-endian.

pub mod quant;
pub mod reader;
pub mod rope_freqs;
pub mod writer;

use std::path::PathBuf;

use crate::dtype::DType;

pub(crate) use quant::{cpu_blocks, permute_rows_hf_to_gguf, qtensor};
pub use quant::{dequantize, quantize, unpermute_rows_gguf_to_hf};
pub(crate) use reader::TensorInfo;
pub use reader::{GgufFile, Value};
pub use writer::{write_gguf, TensorData};
pub(crate) use writer::{GgufWriter, TensorHeader};

/// The magic bytes every GGUF file starts with.
pub(crate) const MAGIC: [u8; 4] = *b"GGUF";

/// The version [`write_gguf`] writes.
pub(crate) const VERSION: u32 = 3;

/// The data alignment when `general.alignment` is absent (gguf.cpp `GGUF_DEFAULT_ALIGNMENT`).
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;

/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub(crate) const ALIGNMENT_KEY: &str = "general.alignment";

/// ggml's `GGML_MAX_DIMS`: a tensor has 1 to 4 dimensions.
pub(crate) const MAX_DIMS: usize = 4;

/// Everything that can go wrong reading, writing or converting GGUF data.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, mapped, written or renamed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("bad magic {found:02x?}: not a GGUF file (expected \"GGUF\")")]
    BadMagic { found: [u8; 4] },
    /// A version other than 2 or 3 (v1 used 32-bit counts and is gone from llama.cpp).
    #[error("unsupported GGUF version {0}: only versions 2 and 3 are supported")]
    UnsupportedVersion(u32),
    /// The header ends before a field it promises.
    #[error(
        "truncated: {what} at byte {offset} needs {needed} bytes, but the file ends at byte {len}"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },
    /// A count or length read from the file cannot fit in the bytes left after it.
    #[error("{what} {count} cannot fit in the {remaining} bytes left in the file")]
    CountTooLarge {
        what: String,
        count: u64,
        remaining: u64,
    },
    /// A string (key, tensor name or value) is not valid UTF-8.
    #[error("invalid UTF-8 in {what}")]
    InvalidUtf8 { what: String },
    /// A metadata value type id outside gguf's 0..=12.
    #[error("key {key:?} has unknown value type {type_id} (gguf knows 0..=12)")]
    UnknownValueType { key: String, type_id: u32 },
    /// An array of arrays, which llama.cpp never writes for the keys we use.
    #[error("key {key:?} holds an array of arrays, which is not supported")]
    NestedArray { key: String },
    /// An array whose elements do not all have the same type (writer input only).
    #[error("key {key:?} holds an array mixing value types, which GGUF cannot store")]
    MixedArray { key: String },
    /// The same metadata key twice.
    #[error("duplicate metadata key {key:?}")]
    DuplicateKey { key: String },
    /// `general.alignment` is not a u32 power of two of at least 4.
    #[error("general.alignment {value} is invalid: it must be a u32 power of two >= 4")]
    BadAlignment { value: String },
    /// A tensor type that ggml does not define or that we do not support.
    #[error(
        "tensor {tensor:?} has ggml type {type_id}, which is unknown or unsupported \
         (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
    )]
    UnsupportedTensorType { tensor: String, type_id: u32 },
    /// A tensor with no dimensions or more than ggml's four.
    #[error("tensor {tensor:?} has {n_dims} dimensions; ggml allows 1 to 4")]
    BadRank { tensor: String, n_dims: u64 },
    /// A tensor with a zero-length dimension.
    #[error("tensor {tensor:?} has a zero dimension in shape {shape:?}")]
    ZeroDimension { tensor: String, shape: Vec<u64> },
    /// A tensor whose element count or byte size overflows.
    #[error("tensor {tensor:?} with shape {shape:?}: element count or byte size overflows")]
    SizeOverflow { tensor: String, shape: Vec<u64> },
    /// A row (ggml `ne[0]`) that is not a whole number of quantization blocks.
    #[error(
        "tensor {tensor:?} of type {dtype} has rows of {row} elements, \
         not a multiple of the block size {block}"
    )]
    RowNotWholeBlocks {
        tensor: String,
        dtype: DType,
        row: u64,
        block: usize,
    },
    /// The same tensor name twice.
    #[error("duplicate tensor name {tensor:?}")]
    DuplicateTensor { tensor: String },
    /// A tensor data offset that is not a multiple of the file's alignment.
    #[error(
        "tensor {tensor:?} has data offset {offset}, not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    /// Tensor data that ends past the end of the file.
    #[error(
        "tensor {tensor:?} data spans bytes {start}..{end}, past the end of the file ({len} bytes)"
    )]
    TensorOutOfBounds {
        tensor: String,
        start: u64,
        end: u64,
        len: u64,
    },
    /// Two tensors whose data share bytes.
    #[error("tensors {first:?} and {second:?} overlap in the data section")]
    TensorOverlap { first: String, second: String },
    /// Tensor data that does not start where the previous tensor's (padded to the alignment)
    /// ends: gguf.cpp refuses such a file.
    #[error(
        "tensor {tensor:?} has data offset {offset}, expected {expected}: GGUF tensor data \
         follows the previous tensor's, padded to the alignment, with no gap"
    )]
    TensorGap {
        tensor: String,
        offset: u64,
        expected: u64,
    },
    /// A tensor handed to the writer whose byte length does not match its shape and type.
    #[error(
        "tensor {tensor:?} ({dtype}, shape {shape:?}) needs {expected} bytes but has {actual}"
    )]
    TensorByteLength {
        tensor: String,
        dtype: DType,
        shape: Vec<usize>,
        expected: u64,
        actual: usize,
    },
    /// A kept metadata array longer than [`reader::MAX_KEPT_ARRAY`].
    #[error("key {key:?} holds an array of {count} elements; at most {max} are read")]
    ArrayTooLong {
        key: String,
        count: usize,
        max: usize,
    },
    /// An array that was checked but not kept at open, handed to the writer.
    #[error("key {key:?} holds an array that was not read from its file, and cannot be written")]
    UnreadArray { key: String },
    /// Finite values that a conversion turned into NaN or Inf (out of the target type's range):
    /// refused rather than written (issue 18).
    #[error(
        "tensor {tensor:?}: {count} finite values become NaN or Inf as {dtype} (out of its range)"
    )]
    Overflow {
        tensor: String,
        dtype: DType,
        count: usize,
    },
    /// A buffer handed to (de)quantization whose length does not match the element count.
    #[error("{dtype} data for {n_elements} elements must be {expected} bytes, got {actual}")]
    ByteLength {
        dtype: DType,
        n_elements: usize,
        expected: u64,
        actual: usize,
    },
    /// An element count that is not a whole number of blocks of the type.
    #[error("{n_elements} elements is not a whole number of {dtype} blocks of {block}")]
    NotWholeBlocks {
        dtype: DType,
        n_elements: usize,
        block: usize,
    },
    /// A NaN or infinity given to a block quantizer, whose scales it would poison.
    #[error("cannot quantize to {dtype}: element {index} is {value}")]
    NonFinite {
        dtype: DType,
        index: usize,
        value: f32,
    },
    /// Rows that cannot be split into heads of an even size for the Q/K permutation.
    #[error("cannot permute {n_rows} rows of {n_bytes} bytes for {n_heads} heads: {reason}")]
    BadPermute {
        n_rows: usize,
        n_heads: usize,
        n_bytes: usize,
        reason: &'static str,
    },
    /// candle's quantization kernels refused the data.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}
