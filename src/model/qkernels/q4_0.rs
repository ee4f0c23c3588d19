//! Q4_0 weights x Q8_0 activations (ggml's `ggml_vec_dot_q4_0_q8_0`): per block, the 32 products
//! of (nibble - 8) and a signed byte, summed four at a time into eight i32 lanes.

use super::{act::ActRow, Isa, Kind};

/// `out[i]` = row i of `w` dotted with `y`, on `isa` (which the CPU must run), `G` rows at a
/// time.
pub(super) fn rows_dot<const G: usize>(isa: Isa, w: &[u8], y: &ActRow, out: &mut [f32]) {
    let block = Kind::Q4_0.block_bytes();
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only chosen where `x86::has_avx2` holds.
        Isa::Avx2 => unsafe { simd::rows_avx2::<G>(w, block, y, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512Vnni` is only chosen where `x86::has_avx512_vnni` holds.
        Isa::Avx512Vnni => unsafe { simd::rows_vnni::<G>(w, block, y, out) },
        _ => super::rows_dot_scalar(Kind::Q4_0, w, y, out),
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::super::x86::{nibbles_32, row_driver};

    /// The nibbles n (0..16) as unsigned bytes times y (`vpmaddubsw`, at most 2 * 15 * 127, so
    /// never saturating), pairs of those (`vpmaddwd`), minus 8 * (the lane's sum of y): exactly
    /// sum (n - 8) * y, without ggml's sign trick.
    ///
    /// # Safety
    /// `p` must point to 16 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn lanes_avx2(p: *const u8, qy: __m256i, sums: __m256i) -> __m256i {
        // SAFETY: the caller promises 16 readable bytes.
        let n = unsafe { nibbles_32(p) };
        let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(n, qy), _mm256_set1_epi16(1));
        _mm256_sub_epi32(dot, _mm256_slli_epi32::<3>(sums))
    }

    /// VNNI: the nibbles times y four at a time into each lane (`vpdpbusd`), starting from
    /// -8 * (the lane's sum of y): exactly sum (n - 8) * y.
    ///
    /// # Safety
    /// `p` must point to 16 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn lanes_vnni(p: *const u8, qy: __m256i, sums: __m256i) -> __m256i {
        // SAFETY: the caller promises 16 readable bytes.
        let n = unsafe { nibbles_32(p) };
        let start = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<3>(sums));
        _mm256_dpbusd_epi32(start, n, qy)
    }

    row_driver!(rows_avx2, "avx2,fma,f16c", lanes_avx2);
    row_driver!(
        rows_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        lanes_vnni
    );
}
