//! Values of new tensors (the adapter), drawn from a seeded ChaCha8 generator so an init is
//! reproducible from the seed recorded in the plan (DESIGN.md decision 8).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::plan::{Init, InitKind};

/// The values of a [rows, cols] tensor initialized as `init` says, row-major.
///
/// `identity` on [h, 2h] is `[0 | I]`: columns 0..h read the state, h..2h read the prelude output
/// `e` (REFERENCE.md), so adapter(concat(s, e)) = e and the model computes the pruned source at
/// any r; seeded N(0, scale^2) noise goes on the state half only.
pub fn values(init: &Init, rows: usize, cols: usize) -> Result<Vec<f32>, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(init.seed);
    let n = rows.checked_mul(cols).ok_or("adapter size overflows")?;
    match init.kind {
        InitKind::Identity => {
            if cols != 2 * rows {
                return Err(format!(
                    "identity init needs a [h, 2h] tensor, not [{rows}, {cols}]"
                ));
            }
            let mut w = vec![0f32; n];
            if init.scale > 0.0 {
                let noise = Normal::new(0.0, init.scale).map_err(|e| e.to_string())?;
                for r in 0..rows {
                    for v in &mut w[r * cols..r * cols + rows] {
                        *v = noise.sample(&mut rng) as f32;
                    }
                }
            }
            for r in 0..rows {
                w[r * cols + rows + r] = 1.0;
            }
            Ok(w)
        }
        InitKind::Uniform => {
            let dist =
                Uniform::new_inclusive(-init.scale, init.scale).map_err(|e| e.to_string())?;
            Ok((0..n).map(|_| dist.sample(&mut rng) as f32).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_zero_then_identity_and_noise_stays_in_the_state_half() {
        let exact = Init {
            kind: InitKind::Identity,
            scale: 0.0,
            seed: 1,
        };
        let w = values(&exact, 3, 6).unwrap();
        #[rustfmt::skip]
        assert_eq!(w, [0., 0., 0., 1., 0., 0.,
                       0., 0., 0., 0., 1., 0.,
                       0., 0., 0., 0., 0., 1.]);
        let noisy = Init {
            scale: 0.1,
            ..exact.clone()
        };
        let w = values(&noisy, 64, 128).unwrap();
        let state: Vec<f32> = (0..64)
            .flat_map(|r| w[r * 128..r * 128 + 64].to_vec())
            .collect();
        let std = (state.iter().map(|v| v * v).sum::<f32>() / state.len() as f32).sqrt();
        assert!((std - 0.1).abs() < 0.01, "{std}");
        for r in 0..64 {
            for c in 64..128 {
                assert_eq!(w[r * 128 + c], if c - 64 == r { 1.0 } else { 0.0 });
            }
        }
        // Same seed, same values; another seed, others.
        assert_eq!(w, values(&noisy, 64, 128).unwrap());
        assert_ne!(w, values(&Init { seed: 2, ..noisy }, 64, 128).unwrap());
    }

    #[test]
    fn uniform_stays_in_bounds() {
        let init = Init {
            kind: InitKind::Uniform,
            scale: 0.25,
            seed: 3,
        };
        let w = values(&init, 16, 32).unwrap();
        assert!(w.iter().all(|v| v.abs() <= 0.25));
        assert!(w.iter().any(|v| v.abs() > 0.2));
    }
}
