//! Rows of a source tensor in the type and row order an output wants: the one primitive both
//! exporters stream with. Bytes are copied as they are whenever the type and the row order
//! already match (a Q8_0 tensor exported as Q8_0 is not requantized; an F32 Q/K is only
//! reordered); otherwise the rows are decoded to f32 and encoded again, one chunk at a time.

use std::borrow::Cow;
use std::ops::Range;

use crate::dtype::DType;
use crate::formats::gguf::{self, GgufError};
use crate::source::{decode_rows, SourceModel, TensorRef};

/// Rows per chunk are chosen so that a chunk holds about this many f32 values (1 MiB): small
/// enough that even a small model's tensors split into chunks for every core.
pub(crate) const CHUNK_VALUES: usize = 1 << 18;

/// (rows, elements per row) of a tensor: a 1-D tensor is one row.
pub(crate) fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (0, 0),
        [n] => (1, *n),
        [rows, rest @ ..] => (*rows, rest.iter().product()),
    }
}

/// Row order of a Q or K matrix: Hugging Face's (rotate-half), or llama.cpp's, which interleaves
/// the two halves of every head of `head_rows` rows (see [`gguf::permute_rows_hf_to_gguf`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowOrder {
    Hf,
    Gguf { head_rows: usize },
}

impl RowOrder {
    /// Rows per unit that must stay together in a chunk (a whole head when permuted).
    pub fn unit(self) -> usize {
        match self {
            RowOrder::Hf => 1,
            RowOrder::Gguf { head_rows } => head_rows.max(1),
        }
    }
}

/// The row order `t` is stored in.
fn stored_order(t: &TensorRef) -> RowOrder {
    match t.unpermute_heads {
        Some(heads) => RowOrder::Gguf {
            head_rows: rows_cols(&t.shape).0 / heads.max(1),
        },
        None => RowOrder::Hf,
    }
}

/// Splits `0..n_rows` into chunks of whole units of about [`CHUNK_VALUES`] values.
pub fn chunks(n_rows: usize, cols: usize, unit: usize) -> Vec<Range<usize>> {
    let unit = unit.max(1);
    let per = (CHUNK_VALUES / cols.max(1) / unit).max(1) * unit;
    (0..n_rows)
        .step_by(per)
        .map(|a| a..(a + per).min(n_rows))
        .collect()
}

/// Rows `rows` of `t` as (stored tensor, its rows): the parts of a fused tensor that the rows
/// fall in, or `t` itself.
fn stored_parts(t: &TensorRef, rows: Range<usize>) -> Vec<(&TensorRef, Range<usize>)> {
    if t.parts.is_empty() {
        return vec![(t, rows)];
    }
    let mut out = Vec::new();
    let mut base = 0;
    for p in &t.parts {
        let n = rows_cols(&p.shape).0;
        let (lo, hi) = (rows.start.max(base), rows.end.min(base + n));
        if lo < hi {
            out.push((p, lo - base..hi - base));
        }
        base += n;
    }
    out
}

/// The file offsets of rows `rows` of a stored (not fused) tensor.
fn byte_range(t: &TensorRef, rows: &Range<usize>) -> (u64, u64) {
    let row_bytes = (t.end - t.start) / rows_cols(&t.shape).0.max(1) as u64;
    (
        t.start + rows.start as u64 * row_bytes,
        t.start + rows.end as u64 * row_bytes,
    )
}

/// The bytes of source tensor `t` read for rows `rows` (what the progress counts).
pub fn source_bytes(t: &TensorRef, rows: &Range<usize>) -> u64 {
    stored_parts(t, rows.clone())
        .iter()
        .map(|(p, r)| {
            let (start, end) = byte_range(p, r);
            end - start
        })
        .sum()
}

/// Where [`stream_rows`] hands each chunk: its bytes and the source bytes it was read from.
pub(crate) type Sink<'a, E> = dyn FnMut(&[u8], u64) -> Result<(), E> + 'a;

/// Streams rows `ranges` of `t` as `want` in `order` into `sink`, in order, with the bytes of
/// source data each chunk read. Chunks that need decoding and encoding are converted on all
/// cores, a group of chunks at a time, so memory stays at a few chunks per core.
pub(crate) fn stream_rows<E: From<GgufError>>(
    source: &SourceModel,
    t: &TensorRef,
    ranges: &[Range<usize>],
    want: DType,
    order: RowOrder,
    sink: &mut Sink<'_, E>,
) -> Result<(), E> {
    let converts = std::iter::once(t)
        .chain(&t.parts)
        .any(|p| p.parts.is_empty() && p.dtype != want);
    let threads = if converts {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        1
    };
    for group in ranges.chunks(threads) {
        let results: Vec<Result<Cow<'_, [u8]>, GgufError>> = if group.len() == 1 {
            group
                .iter()
                .map(|r| read_rows(source, t, r.clone(), want, order))
                .collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = group
                    .iter()
                    .map(|r| scope.spawn(move || read_rows(source, t, r.clone(), want, order)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(GgufError::Io {
                                path: source.path.clone(),
                                source: std::io::Error::other("a conversion thread panicked"),
                            })
                        })
                    })
                    .collect()
            })
        };
        for (range, bytes) in group.iter().zip(results) {
            sink(&bytes?, source_bytes(t, range))?;
            for (p, r) in stored_parts(t, range.clone()) {
                let (start, end) = byte_range(p, &r);
                source.release(p, start, end);
            }
        }
    }
    Ok(())
}

/// Rows `rows` of `t` as `want` in row order `order`. When `order` is llama.cpp's, `rows` must be
/// whole heads (and so must any stored permutation).
pub(crate) fn read_rows<'a>(
    source: &'a SourceModel,
    t: &'a TensorRef,
    rows: Range<usize>,
    want: DType,
    order: RowOrder,
) -> Result<Cow<'a, [u8]>, GgufError> {
    if !t.parts.is_empty() {
        let mut out = Vec::new();
        for (p, r) in stored_parts(t, rows) {
            out.extend_from_slice(&read_rows(source, p, r, want, order)?);
        }
        return Ok(Cow::Owned(out));
    }
    let (n_rows, _) = rows_cols(&t.shape);
    let bytes = source.bytes(t);
    let row_bytes = bytes.len() / n_rows.max(1);
    let slice = bytes
        .get(rows.start * row_bytes..rows.end * row_bytes)
        .filter(|_| row_bytes * n_rows == bytes.len() && row_bytes > 0)
        .ok_or_else(|| GgufError::ByteLength {
            dtype: t.dtype,
            n_elements: t.n_elements(),
            expected: t.dtype.size_of(t.n_elements() as u64).unwrap_or(0),
            actual: bytes.len(),
        })?;
    let n = rows.len();
    let stored = stored_order(t);
    let heads = |head_rows: usize| n / head_rows.max(1);
    if t.dtype == want {
        match (stored, order) {
            (a, b) if a == b => return Ok(Cow::Borrowed(slice)),
            (RowOrder::Hf, RowOrder::Gguf { head_rows }) => {
                return gguf::permute_rows_hf_to_gguf(slice, n, heads(head_rows)).map(Cow::Owned)
            }
            (RowOrder::Gguf { head_rows }, RowOrder::Hf) => {
                return gguf::unpermute_rows_gguf_to_hf(slice, n, heads(head_rows)).map(Cow::Owned)
            }
            _ => {}
        }
    }
    let unpermute = match stored {
        RowOrder::Hf => None,
        RowOrder::Gguf { head_rows } => Some(heads(head_rows)),
    };
    let values = decode_rows(t.dtype, slice, n, unpermute)?;
    let encoded = gguf::quantize(want, &values)?;
    check_finite(t, want, &values, &encoded, n)?;
    match order {
        RowOrder::Hf => Ok(Cow::Owned(encoded)),
        RowOrder::Gguf { head_rows } => {
            gguf::permute_rows_hf_to_gguf(&encoded, n, heads(head_rows)).map(Cow::Owned)
        }
    }
}

/// Refuses a conversion that made finite values non-finite: an F32 weight past F16's 65504, or a
/// block whose scale overflows its F16 field. Values already NaN or Inf in the source were
/// counted when they were copied in (`apply` warns about them); only new ones are refused.
fn check_finite(
    t: &TensorRef,
    want: DType,
    values: &[f32],
    encoded: &[u8],
    n_rows: usize,
) -> Result<(), GgufError> {
    let before = values.iter().filter(|v| !v.is_finite()).count();
    let after = decode_rows(want, encoded, n_rows, None)?
        .iter()
        .filter(|v| !v.is_finite())
        .count();
    if after > before {
        return Err(GgufError::Overflow {
            tensor: t.name.clone(),
            dtype: want,
            count: after - before,
        });
    }
    Ok(())
}
