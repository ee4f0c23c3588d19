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
        // `as i8` saturates, as C's cast of an in-range value would not need to.
        let qs: [i8; BLOCK] = std::array::from_fn(|i| (block[i] * id).round() as i8);
        let sums =
            std::array::from_fn(|j| qs[4 * j..4 * j + 4].iter().map(|&q| i32::from(q)).sum());
        row.qs.push(qs);
        row.d.push(f16::from_f32(d).to_f32());
        row.sums.push(sums);
    }
    row
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
    fn the_scale_is_stored_in_f16() {
        let mut x = [0f32; BLOCK];
        x[7] = 0.1;
        let row = quantize_row_q8_0(&x);
        assert_eq!(row.d[0], f16::from_f32(0.1 / 127.0).to_f32());
        assert_ne!(row.d[0], 0.1 / 127.0);
        assert_eq!(row.qs[0][7], 127);
    }
}
