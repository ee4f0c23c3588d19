//! The x86 side of the kernels: run-time detection, and one driver per instruction set that walks
//! rows and blocks, calling a type's integer block product (`q8_0.rs`, `q4_0.rs`) and doing ggml's
//! float steps (`_mm256_fmadd_ps` per block, `hsum_float_8` at the end of a row).

use std::arch::x86_64::*;

/// AVX2 with FMA and F16C, what the AVX2 kernels use.
pub(super) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// AVX-512 VNNI on 256-bit registers (needs AVX512VL), on top of [`has_avx2`].
pub(super) fn has_avx512_vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// ggml's `hsum_float_8`: high half plus low half, then lanes 0+2 / 1+3, then those two.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hsum_float_8(x: __m256) -> f32 {
    let res = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    let res = _mm_add_ss(res, _mm_movehdup_ps(res));
    _mm_cvtss_f32(res)
}

/// The f16 at `p` (two little-endian bytes), widened exactly.
///
/// # Safety
/// `p` must point to two readable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn load_f16(p: *const u8) -> f32 {
    // SAFETY: the caller promises two readable bytes; `read_unaligned` takes any alignment.
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le(
        bits,
    )))))
}

/// 16 bytes of nibbles at `p` as 32 bytes: the low nibbles, then the high ones (candle's and
/// ggml's `bytes_from_nibbles_32`).
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn nibbles_32(p: *const u8) -> __m256i {
    // SAFETY: the caller promises 16 readable bytes; `loadu` takes any alignment.
    let tmp = unsafe { _mm_loadu_si128(p.cast()) };
    let bytes = _mm256_insertf128_si256::<1>(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4));
    _mm256_and_si256(bytes, _mm256_set1_epi8(0x0f))
}

/// Defines a row driver for one instruction set: `$lanes(p, qy, sums)` gives the eight i32 lane
/// sums of the weight block whose quants start at `p` with the activation block `qy` (lane sums
/// `sums`). Rows go `G` at a time (sharing each activation block), then one at a time; per row,
/// ggml's float steps. `G` = 4 pays when the rows are in cache (a tile of a matrix-matrix
/// product); streaming rows from memory, one row at a time is faster (2.5x at decode on an EPYC:
/// four interleaved row streams defeat the prefetchers).
macro_rules! row_driver {
    ($name:ident, $features:literal, $lanes:path) => {
        /// Row `i` of `w` (rows of `y.blocks()` blocks of `block` bytes) dotted with `y`, into
        /// `out[i]`, for every `i < out.len()`; `G` rows at a time.
        #[target_feature(enable = $features)]
        pub(super) fn $name<const G: usize>(
            w: &[u8],
            block: usize,
            y: &$crate::model::qkernels::ActRow,
            out: &mut [f32],
        ) {
            use std::arch::x86_64::*;
            use $crate::model::qkernels::x86::{hsum_float_8, load_f16};

            /// `R` rows from row `r` into `out[..R]`.
            ///
            /// # Safety
            /// Rows `r..r + R` must lie inside `w`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn rows<const R: usize>(
                w: &[u8],
                r: usize,
                block: usize,
                y: &$crate::model::qkernels::ActRow,
                out: &mut [f32],
            ) {
                let row_bytes = y.blocks() * block;
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..y.blocks() {
                    // SAFETY: activation blocks are 32 bytes and 8 i32, read whole.
                    let (qy, sums) = unsafe {
                        (
                            _mm256_loadu_si256(y.qs[b].as_ptr().cast()),
                            _mm256_loadu_si256(y.sums[b].as_ptr().cast()),
                        )
                    };
                    let dy = y.d[b];
                    for (i, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: block b of row r + i lies inside `w` (the caller's promise),
                        // and the type's block is its 2-byte scale then its quants.
                        let (dw, lanes) = unsafe {
                            let p = w.as_ptr().add((r + i) * row_bytes + b * block);
                            (load_f16(p), $lanes(p.add(2), qy, sums))
                        };
                        let d = _mm256_set1_ps(dw * dy);
                        *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), *acc);
                    }
                }
                for (o, acc) in out.iter_mut().zip(acc) {
                    *o = hsum_float_8(acc);
                }
            }

            let row_bytes = y.blocks() * block;
            // The only bound the pointer reads rely on.
            assert!(w.len() >= out.len() * row_bytes, "rows out of range");
            let groups = out.len() / G * G;
            for r in (0..groups).step_by(G) {
                // SAFETY: rows r..r+G are inside `w` (asserted above).
                unsafe { rows::<G>(w, r, block, y, &mut out[r..]) };
            }
            for r in groups..out.len() {
                // SAFETY: row r is inside `w` (asserted above).
                unsafe { rows::<1>(w, r, block, y, &mut out[r..]) };
            }
        }
    };
}
pub(super) use row_driver;
