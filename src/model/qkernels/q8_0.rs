//! Q8_0 weights x Q8_0 activations (ggml's `ggml_vec_dot_q8_0_q8_0`): per block, the 32 products
//! of signed bytes summed four at a time into eight i32 lanes.

use super::{act::ActRow, Isa, Kind};

/// `out[i]` = row i of `w` dotted with `y`, on `isa` (which the CPU must run), `G` rows at a
/// time.
pub(super) fn rows_dot<const G: usize>(isa: Isa, w: &[u8], y: &ActRow, out: &mut [f32]) {
    let block = Kind::Q8_0.block_bytes();
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only chosen where `x86::has_avx2` holds.
        Isa::Avx2 => unsafe { simd::rows_avx2::<G>(w, block, y, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512Vnni` is only chosen where `x86::has_avx512_vnni` holds.
        Isa::Avx512Vnni => unsafe { simd::rows_vnni::<G>(w, block, y, out) },
        _ => super::rows_dot_scalar(Kind::Q8_0, w, y, out),
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::super::x86::row_driver;

    /// ggml's AVX2 way: |x| times y with x's sign (`vpsignb`), unsigned-by-signed pairs
    /// (`vpmaddubsw`, which cannot saturate here: |x| <= 128, |y| <= 127), then pairs of those.
    ///
    /// # Safety
    /// `p` must point to 32 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn lanes_avx2(p: *const u8, qy: __m256i, _sums: __m256i) -> __m256i {
        // SAFETY: the caller promises 32 readable bytes; `loadu` takes any alignment.
        let x = unsafe { _mm256_loadu_si256(p.cast()) };
        let dot = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(qy, x));
        _mm256_madd_epi16(dot, _mm256_set1_epi16(1))
    }

    /// VNNI: (x + 128) as unsigned bytes times y, four at a time into each lane (`vpdpbusd`,
    /// never saturating), starting from -128 * (the lane's sum of y): exactly sum x * y.
    ///
    /// # Safety
    /// `p` must point to 32 readable bytes.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn lanes_vnni(p: *const u8, qy: __m256i, sums: __m256i) -> __m256i {
        // SAFETY: the caller promises 32 readable bytes; `loadu` takes any alignment.
        let x = unsafe { _mm256_loadu_si256(p.cast()) };
        let xu = _mm256_xor_si256(x, _mm256_set1_epi8(i8::MIN));
        let start = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<7>(sums));
        _mm256_dpbusd_epi32(start, xu, qy)
    }

    row_driver!(rows_avx2, "avx2,fma,f16c", lanes_avx2);
    row_driver!(
        rows_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        lanes_vnni
    );
}
