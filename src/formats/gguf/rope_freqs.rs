//! Rotary frequencies, and Llama-3 scaling read back from llama.cpp's `rope_freqs.weight`.
//!
//! [`inv_freqs`] is the one computation of a head's rotary inverse frequencies (transformers'
//! `_compute_llama3_parameters`, in f32): the runtime (`model::rope`) uses it, and the GGUF reader
//! checks a file's stored divisors against it. It lives here, below both, because the reader
//! (layer `source`) may not import the runtime.
//!
//! llama.cpp stores Llama-3 scaling as one divisor per rotary frequency (convert_hf_to_gguf.py
//! `LlamaModel.generate_extra_tensors`): 1 for wavelengths shorter than
//! `original_context / high_freq_factor`, `factor` for wavelengths longer than
//! `original_context / low_freq_factor`, and `1 / ((1 - s) / factor + s)` between, with
//! `s = (original_context / wavelength - low) / (high - low)`. [`llama3_from_divisors`] finds
//! parameters that reproduce a file's divisors.

use crate::formats::hf_config::RopeScaling;

/// How far a rotary frequency may be from `theta-frequency / stored divisor`, relative: 8 units in
/// the last place of an f32 (8 * 2^-23, about 9.5e-7). Both sides are a handful of f32
/// operations (a power, a division, the interpolation), each rounded once, and two `powf`
/// implementations (ours, torch's in the converter) may differ in the last place: a few units
/// apart is f32 rounding; a wrong band boundary or factor moves a frequency by percents.
pub const FREQ_TOLERANCE: f32 = 8.0 * f32::EPSILON;

/// The inverse frequencies of one head's rotary dimensions (`head_dim / 2` of them), with
/// Llama-3 scaling when `scaling` is set: long wavelengths divided by `factor`, short ones kept,
/// the band between interpolated smoothly. In f32, as transformers computes them.
pub fn inv_freqs(theta: f64, head_dim: usize, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let dim = head_dim;
    // transformers: 1 / base^(arange(0, dim, 2) / dim), in f32.
    let mut inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / (theta as f32).powf(i as f32 / dim as f32))
        .collect();
    if let Some(s) = scaling {
        let old = s.original_max_position_embeddings as f32;
        let (factor, low, high) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
        );
        let low_wavelen = old / low;
        let high_wavelen = old / high;
        for f in &mut inv_freq {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= factor;
            } else if wavelen >= high_wavelen {
                let smooth = (old / wavelen - low) / (high - low);
                *f = (1.0 - smooth) * *f / factor + smooth * *f;
            }
        }
    }
    inv_freq
}

/// Whether `scaling` (None: no scaling) gives, for every rotary dimension, the frequency
/// `theta-frequency / divisor` within [`FREQ_TOLERANCE`]; the first dimension that does not, as
/// (index, ours, theirs), otherwise.
pub fn check_divisors(
    theta: f64,
    head_dim: usize,
    scaling: Option<&RopeScaling>,
    divisors: &[f32],
) -> Result<(), (usize, f32, f32)> {
    let base = inv_freqs(theta, head_dim, None);
    let ours = inv_freqs(theta, head_dim, scaling);
    if divisors.len() != base.len() {
        return Err((divisors.len().min(base.len()), f32::NAN, f32::NAN));
    }
    for (i, ((&b, &d), &o)) in base.iter().zip(divisors).zip(&ours).enumerate() {
        let theirs = b / d;
        let close = (o - theirs).abs() <= FREQ_TOLERANCE * theirs.abs();
        if !close || !theirs.is_finite() {
            return Err((i, o, theirs));
        }
    }
    Ok(())
}

/// Llama-3 scaling parameters that reproduce `divisors` (llama.cpp's `rope_freqs`, one per rotary
/// dimension) for `theta` and `head_dim`, as [`check_divisors`] checks them; `Some(None)` when
/// every divisor is 1 (no scaling), `None` when no parameters reproduce them.
///
/// Only `factor` (the largest divisor) and the two band boundaries, the wavelengths
/// `original_context / low_freq_factor` and `original_context / high_freq_factor`, shape the
/// frequencies: scaling all three of `original_context`, `low` and `high` by one number changes
/// nothing. So `low_freq_factor` is taken as 1 (Llama 3.1 and 3.2's value), which makes
/// `original_context` the long boundary itself. The divisors pin the boundaries down only to the
/// gap between two rotary wavelengths unless two or more fall inside the band (then the band's
/// line gives both); inside that gap the candidates are tried roundest first (most trailing zero
/// bits: context lengths are powers of two), each with the `high_freq_factor` its first in-band
/// divisor implies, itself rounded to the fewest significant digits that still reproduce all
/// divisors. The first candidate that reproduces them all is taken.
pub fn llama3_from_divisors(
    theta: f64,
    head_dim: usize,
    divisors: &[f32],
) -> Option<Option<RopeScaling>> {
    if check_divisors(theta, head_dim, None, divisors).is_ok() {
        return Some(None);
    }
    let bands = Bands::new(theta, head_dim, divisors)?;
    let found = bands
        .contexts()
        .find_map(|old| bands.scaling_at(old, theta, head_dim, divisors));
    found.map(Some)
}

/// The divisors sorted into llama.cpp's three bands, by wavelength (2 pi / frequency, in f64).
struct Bands {
    /// The largest divisor: the long wavelengths' `factor`.
    factor: f32,
    /// The longest wavelength kept as it is (divisor 1), if any.
    longest_kept: Option<f64>,
    /// (wavelength, s) of each divisor strictly between 1 and `factor`: s is the weight of the
    /// unscaled frequency, `(1/d - 1/factor) / (1 - 1/factor)`.
    smooth: Vec<(f64, f64)>,
    /// The shortest wavelength divided by `factor`.
    shortest_scaled: f64,
}

impl Bands {
    /// None when the divisors cannot be Llama-3's: a non-finite one, one below 1, or none at
    /// `factor`.
    fn new(theta: f64, head_dim: usize, divisors: &[f32]) -> Option<Bands> {
        let base = inv_freqs(theta, head_dim, None);
        let factor = divisors.iter().copied().fold(1.0f32, f32::max);
        if base.len() != divisors.len()
            || divisors.iter().any(|d| !d.is_finite() || *d < 1.0)
            || factor <= 1.0
        {
            return None;
        }
        let inv_factor = 1.0 / f64::from(factor);
        let mut bands = Bands {
            factor,
            longest_kept: None,
            smooth: Vec::new(),
            shortest_scaled: f64::INFINITY,
        };
        for (&f, &d) in base.iter().zip(divisors) {
            let wavelen = 2.0 * std::f64::consts::PI / f64::from(f);
            if d == 1.0 {
                bands.longest_kept = Some(bands.longest_kept.map_or(wavelen, |w| w.max(wavelen)));
            } else if d == factor {
                bands.shortest_scaled = bands.shortest_scaled.min(wavelen);
            } else {
                let s = (1.0 / f64::from(d) - inv_factor) / (1.0 - inv_factor);
                bands.smooth.push((wavelen, s));
            }
        }
        Some(bands)
    }

    /// The candidate original contexts (the long boundary, with low = 1): the band's line's own
    /// when two or more divisors are in the band, then every integer of the gap the divisors
    /// leave, roundest first (at most 2^16 of them).
    fn contexts(&self) -> impl Iterator<Item = usize> + '_ {
        let in_band_max = self.smooth.iter().map(|p| p.0).fold(0.0, f64::max);
        let lower = in_band_max
            .max(self.longest_kept.unwrap_or(0.0))
            .ceil()
            .max(1.0);
        let upper = (self.shortest_scaled.ceil() - 1.0).min(1e15);
        let fitted = self
            .fitted_context()
            .filter(|c| (lower..=upper).contains(c));
        let (lower, upper) = (lower as u64, upper.max(0.0) as u64);
        let gap = (0..64u32).rev().flat_map(move |k| {
            let step = 1u64 << k;
            let first = lower.div_ceil(step).max(1).checked_mul(step);
            // Past `upper` (or overflowing) when this power of two has no multiple in the gap.
            let first = first.unwrap_or(u64::MAX).min(upper.saturating_add(1));
            (first..=upper)
                .step_by(usize::try_from(step).unwrap_or(usize::MAX))
                .filter(move |v| v.trailing_zeros() == k)
        });
        fitted
            .map(|c| c as u64)
            .into_iter()
            .chain(gap.take(1 << 16))
            .filter_map(|c| usize::try_from(c).ok())
    }

    /// With two or more divisors in the band, s is a line in 1/wavelength,
    /// s = (old / wavelength - 1) / (high - 1): its zero is the long boundary `old`, rounded.
    fn fitted_context(&self) -> Option<f64> {
        let (first, last) = (self.smooth.first()?, self.smooth.last()?);
        let (x0, x1) = (1.0 / first.0, 1.0 / last.0);
        if (x0 - x1).abs() < f64::EPSILON * x0 {
            return None;
        }
        let slope = (first.1 - last.1) / (x0 - x1);
        let zero = x0 - first.1 / slope;
        (zero > 0.0).then(|| (1.0 / zero).round())
    }

    /// The scaling with original context `old` (and low = 1) that reproduces the divisors, if any.
    fn scaling_at(
        &self,
        old: usize,
        theta: f64,
        head_dim: usize,
        divisors: &[f32],
    ) -> Option<RopeScaling> {
        let high = self.high_at(old as f64)?;
        let scaling = |high: f64| RopeScaling {
            factor: shortest(f64::from(self.factor)),
            low_freq_factor: 1.0,
            high_freq_factor: high,
            original_max_position_embeddings: old,
        };
        (1..=17)
            .map(|digits| round_to_digits(high, digits))
            .filter(|&h| h > 1.0 && h.is_finite())
            .map(scaling)
            .find(|s| check_divisors(theta, head_dim, Some(s), divisors).is_ok())
    }

    /// `high_freq_factor` for original context `old`: from the in-band divisor with the largest s
    /// (the best conditioned), or with none in the band, 4 (Llama-3's) when the short boundary
    /// `old / 4` then lies above every kept wavelength, else just above the longest kept one.
    fn high_at(&self, old: f64) -> Option<f64> {
        if let Some(&(wavelen, s)) = self.smooth.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
            return (s > 0.0).then(|| 1.0 + (old / wavelen - 1.0) / s);
        }
        match self.longest_kept {
            Some(kept) if old / 4.0 <= kept => Some(old / kept * (1.0 - 1e-3)),
            _ => Some(4.0),
        }
    }
}

/// `v` rounded to `digits` significant decimal digits.
fn round_to_digits(v: f64, digits: i32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// The shortest decimal that is the same f32 as `v`: a stored 8.0 reads back as 8.
fn shortest(v: f64) -> f64 {
    (v as f32).to_string().parse().unwrap_or(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The divisors convert_hf_to_gguf.py writes for `s` (its formula, in f32).
    fn divisors(theta: f64, head_dim: usize, s: &RopeScaling) -> Vec<f32> {
        let old = s.original_max_position_embeddings as f32;
        let (factor, low, high) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
        );
        inv_freqs(theta, head_dim, None)
            .into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < old / high {
                    1.0
                } else if wavelen > old / low {
                    factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect()
    }

    fn llama3(factor: f64, low: f64, high: f64, old: usize) -> RopeScaling {
        RopeScaling {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: old,
        }
    }

    #[test]
    fn real_llama3_parameters_are_recovered_exactly() {
        // Llama 3.1 8B (7 dimensions in the band), Llama 3.2 1B (factor 32, head_dim 64), and
        // the golden tiny model (one dimension in the band).
        for (theta, dim, s) in [
            (500000.0, 128, llama3(8.0, 1.0, 4.0, 8192)),
            (500000.0, 64, llama3(32.0, 1.0, 4.0, 8192)),
            (10000.0, 16, llama3(8.0, 1.0, 4.0, 32)),
        ] {
            let d = divisors(theta, dim, &s);
            assert_eq!(llama3_from_divisors(theta, dim, &d), Some(Some(s)), "{s:?}");
        }
    }

    #[test]
    fn an_undetermined_low_factor_is_taken_as_one() {
        // low 2, old 8192: the long boundary is 4096; so is low 1, old 4096 (same divisors).
        let d = divisors(500000.0, 128, &llama3(8.0, 2.0, 8.0, 8192));
        let got = llama3_from_divisors(500000.0, 128, &d).unwrap().unwrap();
        assert_eq!(got, llama3(8.0, 1.0, 4.0, 4096));
        assert!(check_divisors(500000.0, 128, Some(&got), &d).is_ok());
    }

    #[test]
    fn all_ones_is_no_scaling_and_broken_divisors_are_refused() {
        assert_eq!(llama3_from_divisors(10000.0, 16, &[1.0; 8]), Some(None));
        let good = divisors(10000.0, 16, &llama3(8.0, 1.0, 4.0, 32));
        for (i, v) in [(7, 7.0), (0, 1.5), (2, 5.0), (3, f32::NAN), (4, 0.5)] {
            let mut d = good.clone();
            d[i] = v;
            assert_eq!(llama3_from_divisors(10000.0, 16, &d), None, "[{i}] = {v}");
        }
        assert_eq!(llama3_from_divisors(10000.0, 16, &good[..7]), None);
    }

    #[test]
    fn check_names_the_first_dimension_off() {
        let s = llama3(8.0, 1.0, 4.0, 32);
        let mut d = divisors(10000.0, 16, &s);
        assert!(check_divisors(10000.0, 16, Some(&s), &d).is_ok());
        d[1] *= 1.0 + 1e-5;
        let (i, ours, theirs) = check_divisors(10000.0, 16, Some(&s), &d).unwrap_err();
        assert_eq!(i, 1);
        assert!((ours / theirs - 1.0).abs() > FREQ_TOLERANCE);
    }
}
