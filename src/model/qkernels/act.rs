//! Activations rounded to Q8_0 blocks, as ggml's `quantize_row_q8_0` rounds them (the rule of
//! the GGUF spec and of candle-core's `BlockQ8_0::from_float`): per block of 32 values,
//! `d = amax / 127`, stored as f16; each value becomes `round(x / d)` computed as
//! `round(x * (1 / d))`, rounded half away from zero, 0 for an all-zero block.

use half::f16;

use super::BLOCK;

/// One row of activations in Q8_0 blocks, with what the kernels need beside the values.
pub struct ActRow {
    /// The rounded values, a block of 32 at a time.
    pub qs: Vec<[i8; BLOCK]>,
    /// Each block's scale: its f16 value, widened (exactly) to f32.
    pub d: Vec<f32>,
    /// Per block, the sums of values 4j..4j+4 (j = 0..8): with them the kernels multiply
    /// unsigned-by-signed bytes and take the offset back out, exactly, in integers.
    pub sums: Vec<[i32; 8]>,
}

impl ActRow {
    /// Blocks in the row.
    pub fn blocks(&self) -> usize {
        self.d.len()
    }
}

/// An f16 (as its bits) widened to f32; exact.
pub(super) fn f16_bits_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// `x` (whole blocks of 32; a partial last block is dropped) rounded to Q8_0.
pub fn quantize_row_q8_0(x: &[f32]) -> ActRow {
    let n = x.len() / BLOCK;
    let mut row = ActRow {
        qs: Vec::with_capacity(n),
        d: Vec::with_capacity(n),
        sums: Vec::with_capacity(n),
    };
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let qs: [i8; BLOCK] = std::array::from_fn(|i| round_to_i8(block[i] * id));
        let sums =
            std::array::from_fn(|j| qs[4 * j..4 * j + 4].iter().map(|&q| i32::from(q)).sum());
        row.qs.push(qs);
        row.d.push(f16::from_f32(d).to_f32());
        row.sums.push(sums);
    }
    row
}

/// `v.round() as i8` (half away from zero, saturating, NaN to 0) without `roundf`: on x86-64's
/// baseline `f32::round` is a libm call per value (the gain did not show above the noise of the
/// loaded machine in examples/qkernels.rs; the call is simply not needed). The truncation
/// `as i32` is one instruction, and `v - t` is exact (`t` is `v` without its fraction).
fn round_to_i8(v: f32) -> i8 {
    let t = v as i32;
    let frac = v - t as f32;
    let r = if frac >= 0.5 {
        t.saturating_add(1)
    } else if frac <= -0.5 {
        t.saturating_sub(1)
    } else {
        t
    };
    r.clamp(i32::from(i8::MIN), i32::from(i8::MAX)) as i8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_away_from_zero_with_an_f16_scale() {
        // amax 127 gives d = 1 exactly: the values are rounded as they are.
        let mut x = [0f32; BLOCK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = -0.49;
        let row = quantize_row_q8_0(&x);
        assert_eq!(row.d, [1.0]);
        assert_eq!(row.qs[0][..4], [127, 3, -3, 0]);
        assert_eq!(row.sums[0][0], 127);
        // A zero block has scale 0 and values 0; an odd tail is not a block.
        let row = quantize_row_q8_0(&[0.0; BLOCK + 5]);
        assert_eq!((row.blocks(), row.d[0], row.qs[0]), (1, 0.0, [0; BLOCK]));
    }

    #[test]
    fn round_to_i8_is_round_then_a_saturating_cast() {
        let mut values = vec![
            0.5,
            -0.5,
            1.5,
            -1.5,
            126.5,
            127.49,
            127.5,
            -128.5,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            0.49999997,
            -0.49999997,
            8388609.0,
        ];
        values.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 0.013_7));
        for v in values {
            assert_eq!(round_to_i8(v), v.round() as i8, "{v}");
        }
    }

    #[test]
    fn the_scale_is_stored_in_f16() {
        let mut x = [0f32; BLOCK];
        x[7] = 0.1;
        let row = quantize_row_q8_0(&x);
        assert_eq!(row.d[0], f16::from_f32(0.1 / 127.0).to_f32());
        assert_ne!(row.d[0], 0.1 / 127.0);
        assert_eq!(row.qs[0][7], 127);
    }
}
