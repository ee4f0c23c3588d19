//! Our own CPU products of block-quantized weights (as a GGUF stores them) with f32 activations,
//! on ggml's rule: each row of activations is rounded to Q8_0 blocks ([`act`]), each weight block
//! is multiplied with its activation block in integers, and the 32-value block sums are scaled by
//! `d_w * d_a` into eight f32 lanes, then summed across the lanes, in the order of ggml's x86
//! kernels (`ggml_vec_dot_q8_0_q8_0` / `ggml_vec_dot_q4_0_q8_0` with AVX2, which candle-core's
//! `k_quants` ports). Every instruction-set path gives the same bits: the integer sums are exact
//! whichever instructions form them, and the float steps are the same in all.
//!
//! Why not candle's kernels: they stream a Q8_0 matrix at about a third of the machine's copy rate
//! at decode and run whole windows slower than the f32 path (issue 22). Here rows are split over
//! rayon's threads (one row at a time when streaming them from memory), tiles of 16 rows serve
//! every activation row while in cache (repacked into 512-bit row pairs on AVX-512 VNNI, [`tile`]),
//! and the integer part uses VNNI (`vpdpbusd`) when the CPU has it, chosen at run time.

mod act;
mod q4_0;
mod q8_0;
#[cfg(target_arch = "x86_64")]
mod tile;
#[cfg(target_arch = "x86_64")]
mod x86;

use rayon::prelude::*;

pub use act::{quantize_row_q8_0, ActRow};

/// Values per block in every type here (ggml's `QK8_0`, `QK4_0`).
pub const BLOCK: usize = 32;

/// Weight rows per work item of a matrix-matrix product: a tile that stays in the L1 cache while
/// every activation row passes over it.
const ROW_TILE: usize = 16;

/// Everything that can go wrong building or multiplying a quantized matrix.
#[derive(Debug, thiserror::Error)]
pub enum QkError {
    /// The rows are not made of whole blocks.
    #[error("{cols} columns are not whole blocks of {BLOCK}")]
    NotWholeBlocks { cols: usize },
    /// The bytes do not hold exactly `rows` x `cols` values of the type.
    #[error("{kind:?} {rows}x{cols} takes {expected} bytes, got {actual}")]
    ByteLength {
        kind: Kind,
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
    /// Activations whose length is not `m` rows of the matrix's width.
    #[error("{len} activations are not {m} rows of {cols}")]
    Activations { len: usize, m: usize, cols: usize },
}

/// The block types with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// f16 scale, 32 signed bytes: value = d * q.
    Q8_0,
    /// f16 scale, 16 bytes of nibbles (low nibbles are values 0..16, high nibbles 16..32):
    /// value = d * (q - 8).
    Q4_0,
}

impl Kind {
    /// Bytes of one block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            Kind::Q8_0 => 34,
            Kind::Q4_0 => 18,
        }
    }
}

/// Which instructions run a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, the same float steps one lane at a time.
    Scalar,
    /// AVX2 + FMA + F16C (`vpmaddubsw` / `vpmaddwd` for the integer part).
    Avx2,
    /// AVX-512 VNNI on 256-bit registers (`vpdpbusd`; needs AVX512VL too).
    Avx512Vnni,
}

impl Isa {
    /// The fastest instruction set this CPU runs, detected at run time (never at build time:
    /// the binary runs on whatever CPU it lands on).
    pub fn best() -> Isa {
        *Isa::available().last().unwrap_or(&Isa::Scalar)
    }

    /// Every instruction set this CPU runs, slowest (the scalar fallback) first.
    pub fn available() -> Vec<Isa> {
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if x86::has_avx2() {
                isas.push(Isa::Avx2);
            }
            if x86::has_avx512_vnni() {
                isas.push(Isa::Avx512Vnni);
            }
        }
        isas
    }
}

/// A `rows` x `cols` matrix of blocks, as a GGUF stores it: rows of `cols / 32` blocks.
pub struct QMatrix {
    kind: Kind,
    bytes: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl QMatrix {
    /// A copy of `bytes`, checked to hold exactly `rows` x `cols` values of `kind`.
    pub fn new(kind: Kind, bytes: &[u8], rows: usize, cols: usize) -> Result<QMatrix, QkError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(QkError::NotWholeBlocks { cols });
        }
        let expected = rows
            .checked_mul(cols / BLOCK)
            .and_then(|n| n.checked_mul(kind.block_bytes()))
            .unwrap_or(usize::MAX);
        if bytes.len() != expected {
            return Err(QkError::ByteLength {
                kind,
                rows,
                cols,
                expected,
                actual: bytes.len(),
            });
        }
        Ok(QMatrix {
            kind,
            bytes: bytes.to_vec(),
            rows,
            cols,
        })
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The values, `rows` x `cols` row-major (ggml's `dequantize_row_*`).
    pub fn dequantize(&self) -> Vec<f32> {
        let block = self.kind.block_bytes();
        self.bytes
            .chunks_exact(block)
            .flat_map(|b| {
                let d = act::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
                (0..BLOCK).map(move |i| d * weight_q(self.kind, &b[2..], i) as f32)
            })
            .collect()
    }

    /// `x` (m rows of `cols`) times the transposed matrix: (m, cols) -> (m, rows), on the
    /// fastest instruction set of this CPU.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Result<Vec<f32>, QkError> {
        self.matmul_t_on(Isa::best(), x, m)
    }

    /// [`QMatrix::matmul_t`] on the given instruction set. It must be one of
    /// [`Isa::available`]; another falls back to the scalar kernel.
    pub fn matmul_t_on(&self, isa: Isa, x: &[f32], m: usize) -> Result<Vec<f32>, QkError> {
        if m.checked_mul(self.cols) != Some(x.len()) {
            return Err(QkError::Activations {
                len: x.len(),
                m,
                cols: self.cols,
            });
        }
        let isa = if Isa::available().contains(&isa) {
            isa
        } else {
            Isa::Scalar
        };
        let acts: Vec<ActRow> = x
            .par_chunks(self.cols.max(1))
            .map(quantize_row_q8_0)
            .collect();
        Ok(match acts.as_slice() {
            [] => Vec::new(),
            [y] => self.matvec(isa, y),
            _ => self.matmat(isa, &acts),
        })
    }

    /// Bytes of one row.
    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.kind.block_bytes()
    }

    /// One activation row: output rows in chunks over rayon's threads.
    fn matvec(&self, isa: Isa, y: &ActRow) -> Vec<f32> {
        let mut out = vec![0f32; self.rows];
        let threads = rayon::current_num_threads().max(1);
        // Several chunks a thread (rows cost the same, but threads are shared with others), each
        // a multiple of 4 rows, the kernel's group.
        let chunk = (self.rows / (threads * 4)).max(16).next_multiple_of(4);
        let row_bytes = self.row_bytes();
        out.par_chunks_mut(chunk)
            .zip(self.bytes.par_chunks(chunk * row_bytes.max(1)))
            .for_each(|(out, w)| self.rows_dot::<1>(isa, w, y, out));
        out
    }

    /// Several activation rows: tiles of [`ROW_TILE`] weight rows over the threads, each tile
    /// multiplied with every activation row while it is in cache.
    fn matmat(&self, isa: Isa, acts: &[ActRow]) -> Vec<f32> {
        let m = acts.len();
        let row_bytes = self.row_bytes();
        // (tiles, m, ROW_TILE): each tile's outputs contiguous, for the threads to own.
        let mut tiles = vec![0f32; self.rows.div_ceil(ROW_TILE) * m * ROW_TILE];
        tiles
            .par_chunks_mut(m * ROW_TILE)
            .zip(self.bytes.par_chunks(ROW_TILE * row_bytes.max(1)))
            .for_each(|(out, w)| self.tile_dot(isa, w, acts, out));
        // (tiles, m, ROW_TILE) -> (m, rows)
        let mut out = vec![0f32; m * self.rows];
        for (t, tile) in tiles.chunks(m * ROW_TILE).enumerate() {
            let start = t * ROW_TILE;
            let n = ROW_TILE.min(self.rows - start);
            for (row, values) in out.chunks_mut(self.rows).zip(tile.chunks(ROW_TILE)) {
                row[start..start + n].copy_from_slice(&values[..n]);
            }
        }
        out
    }

    /// One tile `w` (up to [`ROW_TILE`] whole rows) times every activation row, into `out`
    /// (m, ROW_TILE): repacked for the 512-bit kernel on AVX-512 VNNI, four rows at a time else.
    fn tile_dot(&self, isa: Isa, w: &[u8], acts: &[ActRow], out: &mut [f32]) {
        let n = w.len() / self.row_bytes().max(1);
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Vnni {
            let tile = tile::Tile::new(self.kind, w, self.cols / BLOCK);
            for (y, out) in acts.iter().zip(out.chunks_mut(ROW_TILE)) {
                // SAFETY: `Isa::Avx512Vnni` is only chosen where `x86::has_avx512_vnni` holds.
                unsafe {
                    match self.kind {
                        Kind::Q8_0 => tile.dot::<7>(y, &mut out[..n]),
                        Kind::Q4_0 => tile.dot::<3>(y, &mut out[..n]),
                    }
                }
            }
            return;
        }
        for (y, out) in acts.iter().zip(out.chunks_mut(ROW_TILE)) {
            self.rows_dot::<4>(isa, w, y, &mut out[..n]);
        }
    }

    /// `out[i]` = row i of `w` (whole rows, `out.len()` of them) dotted with `y`, `G` rows at a
    /// time (sharing each activation block: for rows in cache).
    fn rows_dot<const G: usize>(&self, isa: Isa, w: &[u8], y: &ActRow, out: &mut [f32]) {
        match self.kind {
            Kind::Q8_0 => q8_0::rows_dot::<G>(isa, w, y, out),
            Kind::Q4_0 => q4_0::rows_dot::<G>(isa, w, y, out),
        }
    }
}

/// The integer value `i` (0..32) of a block whose quants (after the scale) are `qs`.
fn weight_q(kind: Kind, qs: &[u8], i: usize) -> i32 {
    match kind {
        Kind::Q8_0 => i32::from(qs[i] as i8),
        Kind::Q4_0 if i < 16 => i32::from(qs[i] & 0x0f) - 8,
        Kind::Q4_0 => i32::from(qs[i - 16] >> 4) - 8,
    }
}

/// ggml's float steps after the integer sums, shared by every scalar kernel: `lanes[j]` holds
/// the sum of products of values 4j..4j+4 of a block; each lane accumulates `d * lane` fused
/// (`_mm256_fmadd_ps`) over the blocks, in block order.
fn fma_lanes(acc: &mut [f32; 8], d: f32, lanes: &[i32; 8]) {
    for (a, &l) in acc.iter_mut().zip(lanes) {
        *a = d.mul_add(l as f32, *a);
    }
}

/// The sum of ggml's `hsum_float_8`: high half plus low half, then lanes 0+2 and 1+3, then those.
fn hsum8(acc: &[f32; 8]) -> f32 {
    let r: [f32; 4] = std::array::from_fn(|i| acc[i + 4] + acc[i]);
    (r[0] + r[2]) + (r[1] + r[3])
}

/// The scalar kernel for any type: integer sums per lane from [`weight_q`], then ggml's float
/// steps.
fn rows_dot_scalar(kind: Kind, w: &[u8], y: &ActRow, out: &mut [f32]) {
    let block = kind.block_bytes();
    let row_bytes = y.blocks() * block;
    for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes.max(1))) {
        let mut acc = [0f32; 8];
        for (b, wb) in row.chunks_exact(block).enumerate() {
            let dw = act::f16_bits_to_f32(u16::from_le_bytes([wb[0], wb[1]]));
            let qy = &y.qs[b];
            let lanes: [i32; 8] = std::array::from_fn(|j| {
                (4 * j..4 * j + 4)
                    .map(|i| weight_q(kind, &wb[2..], i) * i32::from(qy[i]))
                    .sum()
            });
            fma_lanes(&mut acc, dw * y.d[b], &lanes);
        }
        *o = hsum8(&acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsum8_adds_in_ggml_order() {
        // Half an ulp of 1.0 is rounded away (to even) unless the two halves meet first:
        // `hsum_float_8` pairs lane 2 with lane 6 before either meets lane 0.
        let e = f32::EPSILON / 2.0;
        let acc = [1.0, 0.0, e, 0.0, 0.0, 0.0, e, 0.0];
        assert_eq!(hsum8(&acc), 1.0 + f32::EPSILON);
        let flat: f32 = acc.iter().sum();
        assert_eq!(flat, 1.0, "a left-to-right sum rounds the e away");
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(matches!(
            QMatrix::new(Kind::Q8_0, &[0; 34], 1, 33),
            Err(QkError::NotWholeBlocks { cols: 33 })
        ));
        assert!(matches!(
            QMatrix::new(Kind::Q4_0, &[0; 35], 2, 32),
            Err(QkError::ByteLength { expected: 36, .. })
        ));
        let w = QMatrix::new(Kind::Q4_0, &[0; 36], 2, 32).unwrap();
        assert!(matches!(
            w.matmul_t(&[0.0; 33], 1),
            Err(QkError::Activations { len: 33, .. })
        ));
    }

    #[test]
    fn dequantize_reads_both_nibbles() {
        // d = 1.0 (f16 0x3c00); byte 0 holds value 0 (low nibble 9 -> 1) and value 16 (high 2 -> -6).
        let mut block = vec![0x00, 0x3c, 0x29];
        block.extend([0x88; 15]);
        let w = QMatrix::new(Kind::Q4_0, &block, 1, 32).unwrap();
        let v = w.dequantize();
        assert_eq!((v[0], v[1], v[16], v[17]), (1.0, 0.0, -6.0, 0.0));
    }
}
