//! Schedules of healing as functions of the 0-based optimizer step (REFERENCE.md, "Training"):
//! the curriculum of the mean recurrence m and the warmup-stable-decay learning rate.
//!
//! Both are transformers' `get_wsd_schedule` (`_get_wsd_scheduler_lambda`), which the paper's
//! `train.py` uses for the learning rate and, on a dummy optimizer whose lr is m_max, for the
//! curriculum (`new_mean_rec = ceil(get_last_lr())`, 1 when that is 0). The scheduler starts at
//! lambda(0) and is stepped after each optimizer step, so optimizer step i (0-based) runs with
//! lambda(i): that is the `step` taken here. Phase lengths are whole steps,
//! `math.ceil(fraction * total_steps)` as `train.py` computes them, and the arithmetic is the same
//! f64 operations in the same order, so the results are bit-for-bit the reference's
//! (golden/curriculum.json checks every change step of 16 curricula).

/// How the mean recurrence rises during its warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curriculum {
    /// f(x) = x.
    Linear,
    /// f(x) = 1 - sqrt(1 - x): fast at first, slow near m_max (the paper's math recipe).
    OneMinusSqrt,
    /// m_max from the first step.
    Constant,
}

/// The fraction of the base learning rate the schedule starts and ends at (REFERENCE.md: warmup
/// from 0.001 lr, decay to 0.001 lr); transformers' `min_lr_ratio`.
pub const MIN_LR_RATIO: f64 = 0.001;

/// A phase of `fraction` of `total_steps`, in whole steps: `math.ceil(fraction * total_steps)`
/// as `train.py` computes `num_warmup_steps` and `num_decay_steps`. A negative or NaN fraction
/// gives 0 (`as` on f64 saturates).
fn phase_steps(fraction: f64, total_steps: u64) -> u64 {
    (fraction * total_steps as f64).ceil() as u64
}

/// The mean recurrence m at 0-based optimizer step `step`:
///
/// ```text
/// W = ceil(warmup_fraction * total_steps)
/// m(step) = max(start, ceil(m_max * f(step / max(1, W))))   for step < W
///         = max(start, m_max)                              for step >= W
/// ```
///
/// with f(x) = x (linear) or 1 - sqrt(1 - x) (1-sqrt). This is transformers' WSD lambda with
/// `min_lr_ratio = 0` times a base "learning rate" of m_max, rounded up as the paper's `train.py`
/// does (`max(1, ceil(lr))`, i.e. `start = 1`). In particular m(0) = start, and m reaches m_max
/// at the first step where m_max * f(step / W) exceeds m_max - 1, not only at W: 1-sqrt, W =
/// 37,500, m_max 4 changes at 16,407 / 28,126 / 35,157; linear at 9,376 / 18,751 / 28,126 (the
/// first step whose product is strictly above 1, 2, 3). `Constant` is m_max at every step.
pub fn mean_recurrence(
    kind: Curriculum,
    step: u64,
    total_steps: u64,
    warmup_fraction: f64,
    m_max: usize,
    start: usize,
) -> usize {
    let warmup = phase_steps(warmup_fraction, total_steps);
    if kind == Curriculum::Constant || step >= warmup {
        return m_max.max(start);
    }
    let progress = step as f64 / warmup.max(1) as f64;
    let factor = match kind {
        Curriculum::Linear => progress,
        Curriculum::OneMinusSqrt => 1.0 - (1.0 - progress).sqrt(),
        Curriculum::Constant => 1.0,
    };
    // factor is in [0, 1), so the product is in [0, m_max) and the cast cannot truncate.
    let m = (m_max as f64 * factor).ceil() as usize;
    m.max(start)
}

/// The learning rate at 0-based optimizer step `step` of `total_steps`, warmup-stable-decay
/// (transformers' `get_wsd_schedule` with linear warmup, cosine decay, `min_lr_ratio` 0.001):
///
/// ```text
/// Nw = ceil(warmup_fraction * total), Nd = ceil(cooldown_fraction * total), D = total - Nd
/// r  = MIN_LR_RATIO
/// step < Nw:      lr * (r + (1 - r) * step / Nw)                            linear warmup
/// step < D:       lr                                                        stable
/// step < total:   lr * (r + (1 - r) * 0.5 * (1 + cos(pi * (step - D) / Nd)))  cosine decay
/// step >= total:  lr * r
/// ```
///
/// So step 0 runs at exactly 0.001 lr (when Nw > 0), step Nw is the first at lr, and the last
/// step (total - 1) is one decay step short of the floor: lr (r + (1 - r) 0.5 (1 + cos(pi (Nd - 1)
/// / Nd))), slightly above 0.001 lr, exactly as transformers computes it; steps past the end hold
/// 0.001 lr. With `base_lr = 1.0` the result is the factor [`Optimizer::step`] takes as `lr_scale`.
///
/// The decay always ends at `total_steps` (transformers' stable length is total - Nw - Nd, so its
/// decay starts at D = total - Nd): if the fractions sum past 1 there is no stable phase, and the
/// warmup, checked first, runs in full with the decay taking over part-way, as there; validating
/// the fractions is the training config's job.
///
/// [`Optimizer::step`]: crate::heal::optim::Optimizer::step
pub fn learning_rate(
    step: u64,
    total_steps: u64,
    base_lr: f64,
    warmup_fraction: f64,
    cooldown_fraction: f64,
) -> f64 {
    base_lr * lr_factor(step, total_steps, warmup_fraction, cooldown_fraction)
}

/// The multiplier of [`learning_rate`], transformers' `_get_wsd_scheduler_lambda`.
fn lr_factor(step: u64, total_steps: u64, warmup_fraction: f64, cooldown_fraction: f64) -> f64 {
    let warmup = phase_steps(warmup_fraction, total_steps);
    let decay = phase_steps(cooldown_fraction, total_steps);
    let decay_start = total_steps.saturating_sub(decay);
    let r = MIN_LR_RATIO;
    if step < warmup {
        let progress = step as f64 / warmup.max(1) as f64;
        return progress * (1.0 - r) + r;
    }
    if step < decay_start {
        return 1.0;
    }
    if step < total_steps {
        let progress = (step - decay_start) as f64 / decay.max(1) as f64;
        // transformers writes pi * num_cycles * 2.0 * progress with num_cycles = 0.5: the same
        // f64 value, since multiplying by 0.5 and 2.0 is exact.
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        return cosine * (1.0 - r) + r;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_is_m_max_everywhere() {
        for step in [0, 1, 500, 999, 5_000] {
            assert_eq!(
                mean_recurrence(Curriculum::Constant, step, 1000, 0.75, 32, 1),
                32
            );
        }
    }

    #[test]
    fn start_floors_the_curriculum() {
        assert_eq!(mean_recurrence(Curriculum::Linear, 0, 1000, 0.25, 4, 1), 1);
        assert_eq!(mean_recurrence(Curriculum::Linear, 0, 1000, 0.25, 4, 3), 3);
        assert_eq!(
            mean_recurrence(Curriculum::Linear, 999, 1000, 0.25, 4, 3),
            4
        );
    }

    #[test]
    fn no_warmup_is_constant() {
        assert_eq!(
            mean_recurrence(Curriculum::OneMinusSqrt, 0, 1000, 0.0, 8, 1),
            8
        );
        assert_eq!(mean_recurrence(Curriculum::Linear, 0, 0, 0.5, 8, 1), 8);
    }

    #[test]
    fn paper_change_steps() {
        let m = |kind, step| mean_recurrence(kind, step, 50_000, 0.75, 4, 1);
        for (step, want) in [(16_406, 1), (16_407, 2), (28_125, 2), (28_126, 3)] {
            assert_eq!(m(Curriculum::OneMinusSqrt, step), want, "step {step}");
        }
        for (step, want) in [(35_156, 3), (35_157, 4), (37_500, 4)] {
            assert_eq!(m(Curriculum::OneMinusSqrt, step), want, "step {step}");
        }
        for (step, want) in [(9_375, 1), (9_376, 2), (18_751, 3), (28_126, 4)] {
            assert_eq!(m(Curriculum::Linear, step), want, "step {step}");
        }
    }

    #[test]
    fn lr_phases() {
        let lr = |step| learning_rate(step, 1000, 1e-3, 0.1, 0.5);
        assert_eq!(lr(0), 1e-3 * MIN_LR_RATIO);
        assert!((lr(50) - 1e-3 * (0.5 * 0.999 + 0.001)).abs() < 1e-18);
        assert_eq!(lr(100), 1e-3);
        assert_eq!(lr(499), 1e-3);
        assert!((lr(500) - 1e-3).abs() < 1e-18);
        assert!((lr(750) - 1e-3 * (0.5 * 0.999 + 0.001)).abs() < 1e-15);
        assert!(lr(999) > 1e-3 * MIN_LR_RATIO && lr(999) < 1e-3 * 0.002);
        assert_eq!(lr(1000), 1e-3 * MIN_LR_RATIO);
    }
}
