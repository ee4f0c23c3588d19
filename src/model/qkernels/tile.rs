//! The matrix-matrix kernel on AVX-512 VNNI: a tile of 16 weight rows is repacked once (per
//! product) into pairs of rows, so that one 512-bit register holds the same block of two rows and
//! each activation block, read once, serves 16 rows. Row A of a pair takes lanes 0..8 and row B
//! lanes 8..16, so each row keeps its own eight lanes and ggml's float order (`fma` per block in
//! block order, then `hsum_float_8`), and the result has the same bits as the other kernels.

use std::arch::x86_64::*;

use super::act::ActRow;
use super::x86::hsum_float_8;
use super::{weight_q, Kind, BLOCK};

/// Row pairs in a tile (the tile's 16 rows).
const PAIRS: usize = 8;

/// A tile of up to 16 weight rows, repacked: for block b and pair p (index b * 8 + p), the
/// unsigned quants (value + offset) of row 2p then row 2p+1, and their scales, each eight times.
/// Rows past the tile's end are zeros (their outputs are dropped).
pub(super) struct Tile {
    u: Vec<[u8; 2 * BLOCK]>,
    d: Vec<[f32; 16]>,
    blocks: usize,
}

/// The offset that makes a type's quants unsigned bytes: 128 for Q8_0 (-128..128), 8 for Q4_0
/// (its stored nibbles).
pub(super) fn offset(kind: Kind) -> i32 {
    match kind {
        Kind::Q8_0 => 128,
        Kind::Q4_0 => 8,
    }
}

impl Tile {
    /// `w`: up to 16 whole rows of `blocks` blocks of `kind`.
    pub(super) fn new(kind: Kind, w: &[u8], blocks: usize) -> Tile {
        let size = kind.block_bytes();
        let n = PAIRS * blocks;
        let mut tile = Tile {
            u: vec![[0; 2 * BLOCK]; n],
            d: vec![[0.0; 16]; n],
            blocks,
        };
        for (r, row) in w.chunks_exact(blocks * size).take(2 * PAIRS).enumerate() {
            let (p, half) = (r / 2, r % 2);
            for (b, block) in row.chunks_exact(size).enumerate() {
                let d = super::act::f16_bits_to_f32(u16::from_le_bytes([block[0], block[1]]));
                let i = b * PAIRS + p;
                tile.d[i][8 * half..8 * half + 8].fill(d);
                for (j, u) in tile.u[i][BLOCK * half..BLOCK * (half + 1)]
                    .iter_mut()
                    .enumerate()
                {
                    // In 0..256 for Q8_0 and 0..16 for Q4_0.
                    *u = (weight_q(kind, &block[2..], j) + offset(kind)) as u8;
                }
            }
        }
        tile
    }

    /// `out[i]` (i < 16, as many as `out` holds) = tile row i dotted with `y`; `S` is log2 of
    /// the type's [`offset`], taken back out of each lane as `offset * (sum of y)`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub(super) fn dot<const S: u32>(&self, y: &ActRow, out: &mut [f32]) {
        let mut acc = [_mm512_setzero_ps(); PAIRS];
        for b in 0..self.blocks.min(y.blocks()) {
            // SAFETY: whole activation blocks (32 bytes, 8 i32) are read through their arrays.
            let (qy, sums) = unsafe {
                (
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(y.qs[b].as_ptr().cast())),
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(y.sums[b].as_ptr().cast())),
                )
            };
            let start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<S>(sums));
            let dy = _mm512_set1_ps(y.d[b]);
            for (p, acc) in acc.iter_mut().enumerate() {
                let i = b * PAIRS + p;
                // SAFETY: `u[i]` is 64 bytes and `d[i]` 16 f32, read whole.
                let (u, dw) = unsafe {
                    (
                        _mm512_loadu_si512(self.u[i].as_ptr().cast()),
                        _mm512_loadu_ps(self.d[i].as_ptr()),
                    )
                };
                let q = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, u, qy));
                *acc = _mm512_fmadd_ps(_mm512_mul_ps(dw, dy), q, *acc);
            }
        }
        for (o, acc) in out.chunks_mut(2).zip(acc) {
            let low = _mm512_castps512_ps256(acc);
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
            for (o, half) in o.iter_mut().zip([low, high]) {
                *o = hsum_float_8(half);
            }
        }
    }
}
