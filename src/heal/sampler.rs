//! Recurrence sampling per micro-step (REFERENCE.md, "Training"): how many times the core runs in
//! one forward pass of healing, and how many of those iterations are backpropagated through.
//!
//! For mean recurrence m and backprop depth k = min(backprop_depth, m), the reference
//! (`randomized_iteration_sampler` in the paper's `raven_modeling_minimal_llama.py`) draws
//!
//! ```text
//! t      = max(m - k, 0)
//! lambda ~ LogNormal(mu = ln(t + k) - sigma^2 / 2, sigma = 0.5)
//! p      = Poisson(lambda) + 1
//! n      = max(p - k, 0)   iterations without gradient (run first)
//! g      = min(k, p)       iterations with gradient (run last: truncated backpropagation)
//! ```
//!
//! Since k <= m, t + k = m and E[lambda] = exp(mu + sigma^2 / 2) = m, so E[p] = m + 1.
//!
//! The draw is a pure function of (seed, step, micro): a run resumed at step s draws exactly what
//! the uninterrupted run drew there, and nothing is carried between calls.
//!
//! [`fixed`] is the other sampler, for measurements and ablations: exactly p = m iterations every
//! micro-step, the first m - k without gradient.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Poisson};

/// sigma of the log-normal rate (the reference's constant).
pub(crate) const SIGMA: f64 = 0.5;

/// Domain tag mixed into the seed, so this stream never coincides with another ChaCha8 stream of
/// the crate seeded from the same user seed (the adapter init, the initial state s_0).
const DOMAIN: [u8; 8] = *b"recur-r\0";

/// One draw: the core runs `without_grad` times under no-grad, then `with_grad` times with
/// gradient. `total()` is the reference's p.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    pub without_grad: usize,
    pub with_grad: usize,
}

impl Draw {
    /// p: all iterations of the core in this forward pass (at least 1).
    pub fn total(&self) -> usize {
        self.without_grad + self.with_grad
    }
}

/// The largest p drawn for mean recurrence m: 16 m + 64.
///
/// A log-normal rate has a heavy tail; without a cap one unlucky draw would run the core thousands
/// of times (hours, and out of memory for the no-grad part's activations on the device). The cap
/// is out of reach in practice: a rate of 16 m is a log-normal deviation of (ln 16 + 0.125) / 0.5
/// ≈ 5.8 sigma at any m (probability about 3e-9 per draw; the Poisson tail beyond it is of the
/// same order), so the cap does not move the mean m + 1 measurably.
pub fn max_total(m: usize) -> usize {
    m.max(1).saturating_mul(16).saturating_add(64)
}

/// Draws the iteration counts of micro-step `micro` of optimizer step `step` for mean recurrence
/// `m` and backprop depth `backprop_depth` (the reference's `mean_backprop_depth`, 8).
///
/// `m = 0` is treated as 1 (the curriculum never yields 0; a loop of zero iterations is not a
/// recurrent model). `backprop_depth = 0` is allowed: every iteration then runs without gradient,
/// so only the coda and what follows it (final norm, lm_head) learn.
pub fn draw(m: usize, backprop_depth: usize, seed: u64, step: u64, micro: u64) -> Draw {
    let m = m.max(1);
    let k = backprop_depth.min(m);
    let p = sample_total(m, k, seed, step, micro);
    Draw {
        without_grad: p.saturating_sub(k),
        with_grad: k.min(p),
    }
}

/// The fixed sampler: p = m (at least 1) every time, the first p - k without gradient, k =
/// min(backprop_depth, m). With m = 5 and k = 4: 1 iteration without gradient, then 4 with.
pub fn fixed(m: usize, backprop_depth: usize) -> Draw {
    let m = m.max(1);
    let k = backprop_depth.min(m);
    Draw {
        without_grad: m - k,
        with_grad: k,
    }
}

/// p = min(Poisson(lambda) + 1, max_total(m)), lambda ~ LogNormal(ln(t + k) - sigma^2 / 2, sigma).
fn sample_total(m: usize, k: usize, seed: u64, step: u64, micro: u64) -> usize {
    let mut rng = ChaCha8Rng::from_seed(seed_bytes(seed, step, micro));
    let t = m.saturating_sub(k);
    let mu = ((t + k) as f64).ln() - SIGMA * SIGMA / 2.0;
    let cap = max_total(m);
    // Both constructors only fail on non-finite or non-positive parameters; mu is finite for
    // m >= 1 and SIGMA is a positive constant, so the fallback p = 1 is unreachable.
    let Ok(rate) = LogNormal::new(mu, SIGMA) else {
        return 1;
    };
    // Clamping lambda keeps Poisson::new inside its domain (finite, positive, <= MAX_LAMBDA)
    // whatever the tail gives, and costs nothing: above the cap p is clamped anyway.
    let lambda = rate.sample(&mut rng).clamp(f64::MIN_POSITIVE, cap as f64);
    let Ok(poisson) = Poisson::new(lambda) else {
        return 1;
    };
    let count: f64 = poisson.sample(&mut rng);
    // count is a non-negative integer-valued float; `as` saturates, the cap bounds it.
    (count as usize).saturating_add(1).min(cap)
}

/// The 32-byte ChaCha8 seed of one draw: seed, step and micro as little-endian u64 plus a tag.
/// Every distinct (seed, step, micro) is a distinct key, so no two micro-steps share a stream.
fn seed_bytes(seed: u64, step: u64, micro: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&step.to_le_bytes());
    key[16..24].copy_from_slice(&micro.to_le_bytes());
    key[24..32].copy_from_slice(&DOMAIN);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn m_one_with_depth_one() {
        for micro in 0..200 {
            let d = draw(1, 8, 7, 0, micro);
            assert!(d.with_grad <= 1);
            assert!(d.total() >= 1 && d.total() <= max_total(1));
        }
    }

    #[test]
    fn fixed_runs_m_with_the_last_k_backpropagated() {
        let d = fixed(5, 4);
        assert_eq!((d.without_grad, d.with_grad), (1, 4));
        assert_eq!(
            fixed(3, 8),
            Draw {
                without_grad: 0,
                with_grad: 3
            }
        );
        assert_eq!(fixed(0, 8), fixed(1, 8));
        assert_eq!(
            fixed(4, 0),
            Draw {
                without_grad: 4,
                with_grad: 0
            }
        );
    }

    #[test]
    fn zero_m_is_one() {
        assert_eq!(draw(0, 8, 1, 2, 3), draw(1, 8, 1, 2, 3));
    }

    #[test]
    fn zero_depth_runs_everything_without_grad() {
        let d = draw(4, 0, 1, 2, 3);
        assert_eq!(d.with_grad, 0);
        assert!(d.without_grad >= 1);
    }

    #[test]
    fn seed_bytes_are_injective_in_each_field() {
        let a = seed_bytes(1, 2, 3);
        assert_ne!(a, seed_bytes(2, 2, 3));
        assert_ne!(a, seed_bytes(1, 3, 3));
        assert_ne!(a, seed_bytes(1, 2, 4));
        // Fields cannot slide into each other.
        assert_ne!(seed_bytes(0, 1, 0), seed_bytes(0, 0, 1));
    }

    #[test]
    fn cap_bounds_every_draw() {
        for micro in 0..2_000 {
            let d = draw(32, 8, 11, 5, micro);
            assert!(d.total() <= max_total(32));
            assert!(d.with_grad <= 8);
        }
    }
}
