//! The building blocks of healing against the reference's numbers: recurrence sampling
//! statistics, the curriculum against golden/curriculum.json (transformers' WSD scheduler as the
//! paper's train.py drives it), the learning-rate schedule's boundaries, and the optimizers
//! (a hand-computed AdamW step, Newton-Schulz singular values, bit-identical resume).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use surgery::heal::optim::{self, clip_grad_norm, newton_schulz, Optimizer, ParamGroup};
use surgery::heal::sampler::{self, draw};
use surgery::heal::schedule::{learning_rate, mean_recurrence, Curriculum, MIN_LR_RATIO};

// ---------------------------------------------------------------------------------------------
// Recurrence sampling

fn mean_total(m: usize, k: usize) -> f64 {
    let n = 10_000u64;
    let sum: usize = (0..n).map(|step| draw(m, k, 1234, step, 0).total()).sum();
    sum as f64 / n as f64
}

#[test]
fn sampler_mean_is_m_plus_one() {
    // E[p] = E[Poisson(lambda)] + 1 = E[lambda] + 1 = exp(mu + sigma^2 / 2) + 1 = m + 1.
    for m in [4, 32] {
        let mean = mean_total(m, 8);
        let want = (m + 1) as f64;
        assert!(
            (mean - want).abs() <= 0.02 * want,
            "m = {m}: mean p {mean}, want {want} within 2%"
        );
    }
}

#[test]
fn sampler_splits_p_into_no_grad_then_grad() {
    for (m, k) in [(1, 8), (4, 8), (8, 8), (32, 8), (32, 1)] {
        let depth = k.min(m);
        for micro in 0..2_000 {
            let d = draw(m, k, 99, 17, micro);
            let p = d.total();
            assert!(p >= 1 && p <= sampler::max_total(m), "m {m}: p = {p}");
            assert!(d.with_grad <= depth, "m {m} k {k}: {d:?}");
            assert_eq!(d.with_grad, depth.min(p), "m {m} k {k}: {d:?}");
            assert_eq!(
                d.without_grad,
                p.saturating_sub(depth),
                "m {m} k {k}: {d:?}"
            );
        }
    }
}

#[test]
fn sampler_is_a_function_of_seed_step_micro() {
    // A resumed run calls draw with the same (seed, step, micro) and nothing else.
    let run = |seed| -> Vec<sampler::Draw> {
        (0..50)
            .flat_map(|step| (0..4).map(move |micro| draw(32, 8, seed, step, micro)))
            .collect()
    };
    let first = run(5);
    assert_eq!(first, run(5));
    // Resuming at step 30 reproduces the tail.
    let resumed: Vec<_> = (30..50)
        .flat_map(|step| (0..4).map(move |micro| draw(32, 8, 5, step, micro)))
        .collect();
    assert_eq!(&first[30 * 4..], &resumed[..]);
    // Other seeds, steps and micro-steps give other draws.
    assert_ne!(first, run(6));
    let by_micro: Vec<_> = (0..50).map(|micro| draw(32, 8, 5, 0, micro)).collect();
    assert!(by_micro.iter().any(|d| *d != by_micro[0]));
}

// ---------------------------------------------------------------------------------------------
// Curriculum against golden/curriculum.json

#[derive(serde::Deserialize)]
struct Golden {
    curricula: Vec<GoldenCurriculum>,
}

#[derive(serde::Deserialize)]
struct GoldenCurriculum {
    schedule: String,
    warmup_fraction: f64,
    max_mean_recurrence: usize,
    total_steps: u64,
    change_steps: Vec<u64>,
    values_at_change: Vec<usize>,
    first: usize,
    last: usize,
}

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/curriculum.json")
}

#[test]
fn curriculum_matches_the_reference_at_every_change_step() {
    let path = golden_path();
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!(
            "NOTICE: {} absent; curriculum golden test skipped",
            path.display()
        );
        return;
    };
    let golden: Golden = serde_json::from_str(&text).unwrap();
    assert_eq!(golden.curricula.len(), 16);
    for c in &golden.curricula {
        let kind = match c.schedule.as_str() {
            "linear" => Curriculum::Linear,
            "1-sqrt" => Curriculum::OneMinusSqrt,
            other => panic!("unknown schedule {other}"),
        };
        let label = format!(
            "{} warmup {} m_max {} over {} steps",
            c.schedule, c.warmup_fraction, c.max_mean_recurrence, c.total_steps
        );
        let m = |step| {
            mean_recurrence(
                kind,
                step,
                c.total_steps,
                c.warmup_fraction,
                c.max_mean_recurrence,
                1,
            )
        };
        assert_eq!(c.change_steps.len(), c.values_at_change.len(), "{label}");
        let mut before = c.first;
        for (&step, &value) in c.change_steps.iter().zip(&c.values_at_change) {
            assert_eq!(m(step), value, "{label}: m at change step {step}");
            assert_eq!(m(step - 1), before, "{label}: m the step before {step}");
            before = value;
        }
        assert_eq!(m(0), c.first, "{label}: first");
        assert_eq!(m(c.total_steps - 1), c.last, "{label}: last");
        // Every step, from the note's rule: the value of the last change at or before it.
        let mut want = c.first;
        let mut changes = c.change_steps.iter().zip(&c.values_at_change).peekable();
        for step in 0..c.total_steps {
            while let Some((_, &value)) = changes.next_if(|(&s, _)| s <= step) {
                want = value;
            }
            assert_eq!(m(step), want, "{label}: step {step}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedule

#[test]
fn lr_schedule_boundaries() {
    // The paper's math run: 0.25% warmup, 60% cosine cooldown (shells of the reference).
    let (total, lr, warmup, cooldown) = (50_000u64, 1e-3, 0.0025, 0.6);
    let at = |step| learning_rate(step, total, lr, warmup, cooldown);
    let nw = 125; // ceil(0.0025 * 50,000)
    let decay_start = 20_000; // 50,000 - ceil(0.6 * 50,000)
    assert_eq!(at(0), lr * MIN_LR_RATIO, "step 0 starts at 0.001 lr");
    assert!(at(nw - 1) < lr && at(nw - 1) > 0.99 * lr);
    assert_eq!(at(nw), lr, "the first step after warmup is at lr");
    assert_eq!(at(decay_start - 1), lr);
    let first_decay = at(decay_start);
    assert!((first_decay - lr).abs() < 1e-15, "the decay starts at lr");
    let middle = at(decay_start + 15_000);
    assert!((middle - lr * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5)).abs() < 1e-15);
    let last = at(total - 1);
    assert!(
        last > lr * MIN_LR_RATIO && last < lr * MIN_LR_RATIO * 1.01,
        "last {last}"
    );
    assert_eq!(at(total), lr * MIN_LR_RATIO, "past the end: the floor");
    assert_eq!(at(total + 100), lr * MIN_LR_RATIO);
    // Rising in the warmup, falling in the decay.
    assert!((1..nw).all(|s| at(s) > at(s - 1)));
    assert!((decay_start + 1..total).all(|s| at(s) <= at(s - 1)));
}

#[test]
fn lr_schedule_without_warmup_or_cooldown_is_constant() {
    for step in [0, 1, 499, 999] {
        assert_eq!(learning_rate(step, 1000, 2e-4, 0.0, 0.0), 2e-4);
    }
}

// ---------------------------------------------------------------------------------------------
// Optimizers

fn randn(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// loss = 0.5 * sum((w - target)^2), gradient w - target.
fn quadratic_grads(w: &Var, target: &Tensor) -> candle_core::backprop::GradStore {
    let diff = w.as_tensor().broadcast_sub(target).unwrap();
    diff.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap()
        .backward()
        .unwrap()
}

#[test]
fn adamw_first_step_matches_hand_computation() {
    let (w0, target, lr, wd) = (1.5f64, 3.0f64, 1e-2, 0.1);
    let w = Var::new(&[w0 as f32], &Device::Cpu).unwrap();
    let target_t = Tensor::new(&[target as f32], &Device::Cpu).unwrap();
    let mut group = ParamGroup::adamw("a", vec![("w".into(), w.clone())]);
    group.lr = lr;
    group.weight_decay = wd;
    let mut opt = Optimizer::new(vec![group]).unwrap();
    opt.step(&quadratic_grads(&w, &target_t), 0.5).unwrap();
    // Step 1: m = 0.1 g, v = 0.05 g^2; bias-corrected m_hat = g, v_hat = g^2.
    let (b1, b2) = optim::ADAMW_BETAS;
    let g = w0 - target;
    let lr = lr * 0.5;
    let m_hat = (1.0 - b1) * g / (1.0 - b1);
    let v_hat = (1.0 - b2) * g * g / (1.0 - b2);
    let want = w0 - lr * wd * w0 - lr * m_hat / (v_hat.sqrt() + optim::ADAMW_EPS);
    let got = values(&w)[0] as f64;
    assert!((got - want).abs() < 1e-6, "got {got}, want {want}");
    assert_eq!(opt.step_count(), 1);
}

#[test]
fn adamw_converges_on_a_quadratic() {
    let w = Var::new(&[-2.0f32, 5.0, 0.0], &Device::Cpu).unwrap();
    let target = Tensor::new(&[3.0f32, -1.0, 0.5], &Device::Cpu).unwrap();
    let mut group = ParamGroup::adamw("a", vec![("w".into(), w.clone())]);
    group.lr = 0.05;
    group.weight_decay = 0.0;
    let mut opt = Optimizer::new(vec![group]).unwrap();
    let total = 1_000;
    for step in 0..total {
        let scale = learning_rate(step, total, 1.0, 0.01, 0.5);
        opt.step(&quadratic_grads(&w, &target), scale).unwrap();
    }
    for (got, want) in values(&w).iter().zip([3.0, -1.0, 0.5]) {
        assert!((got - want).abs() < 1e-2, "got {got}, want {want}");
    }
}

/// Eigenvalues of a symmetric matrix by cyclic Jacobi rotations (f64, n small).
fn symmetric_eigenvalues(mut a: Vec<Vec<f64>>) -> Vec<f64> {
    let n = a.len();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for row in a.iter_mut() {
                    let (akp, akq) = (row[p], row[q]);
                    row[p] = c * akp - s * akq;
                    row[q] = s * akp + c * akq;
                }
                let (row_p, row_q) = (a[p].clone(), a[q].clone());
                for (k, (apk, aqk)) in row_p.into_iter().zip(row_q).enumerate() {
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..n).map(|i| a[i][i]).collect()
}

fn to_rows(t: &Tensor) -> Vec<Vec<f64>> {
    t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
}

#[test]
fn newton_schulz_singular_values_are_near_one() {
    for (rows, cols, seed) in [(8, 16, 1), (16, 8, 2)] {
        let g = randn(rows, cols, seed);
        let o = newton_schulz(&g, optim::NS_STEPS).unwrap();
        assert_eq!(o.dims(), &[rows, cols]);
        // The Gram matrix of the short side: its eigenvalues are the squared singular values.
        let gram = if rows <= cols {
            o.matmul(&o.t().unwrap()).unwrap() // (r, c) @ (c, r) -> (r, r)
        } else {
            o.t().unwrap().matmul(&o).unwrap() // (c, r) @ (r, c) -> (c, c)
        };
        let sigmas: Vec<f64> = symmetric_eigenvalues(to_rows(&gram))
            .into_iter()
            .map(|e| e.max(0.0).sqrt())
            .collect();
        // The quintic's known band after 5 steps is about [0.68, 1.13] (not exactly 1).
        for s in &sigmas {
            assert!(
                (0.6..=1.2).contains(s),
                "{rows}x{cols}: singular values {sigmas:?}"
            );
        }
        // O = q(G G^T) G for a polynomial q, so O G^T is symmetric: same singular vectors as G.
        let ogt = to_rows(&o.matmul(&g.t().unwrap()).unwrap());
        let scale = ogt.iter().flatten().fold(0f64, |a, b| a.max(b.abs()));
        for (i, row) in ogt.iter().enumerate() {
            for (j, value) in row.iter().enumerate() {
                assert!((value - ogt[j][i]).abs() < 1e-4 * scale, "{rows}x{cols}");
            }
        }
    }
}

#[test]
fn muon_step_reduces_a_loss() {
    let w = Var::from_tensor(&randn(8, 16, 3)).unwrap();
    let target = randn(8, 16, 4);
    let loss = |w: &Var| {
        let d = w.as_tensor().sub(&target).unwrap();
        d.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let mut group = ParamGroup::muon("m", vec![("w".into(), w.clone())]);
    // Each Muon step moves w by lr times a matrix of singular values ~1 (Frobenius ~ lr sqrt(8)),
    // whatever the gradient's scale; ||w - target|| is ~16 here.
    group.lr = 0.5;
    let mut opt = Optimizer::new(vec![group]).unwrap();
    let start = loss(&w);
    let mut previous = start;
    for _ in 0..5 {
        opt.step(&quadratic_grads(&w, &target), 1.0).unwrap();
        let now = loss(&w);
        assert!(now < previous, "loss went from {previous} to {now}");
        previous = now;
    }
    assert!(previous < 0.7 * start, "{start} -> {previous}");
}

/// A small model with one Muon and one AdamW group and a loss that depends on all of it.
struct Toy {
    matrix: Var,
    bias: Var,
    x: Tensor,
    y: Tensor,
}

impl Toy {
    fn new() -> Self {
        Self {
            matrix: Var::from_tensor(&randn(6, 4, 10)).unwrap(),
            bias: Var::from_tensor(&randn(1, 6, 11).flatten_all().unwrap()).unwrap(),
            x: randn(4, 5, 12),
            y: randn(6, 5, 13),
        }
    }

    /// A copy whose variables hold other's current values.
    fn copy_of(other: &Toy) -> Self {
        Self {
            matrix: Var::from_tensor(&other.matrix.as_tensor().copy().unwrap()).unwrap(),
            bias: Var::from_tensor(&other.bias.as_tensor().copy().unwrap()).unwrap(),
            x: other.x.clone(),
            y: other.y.clone(),
        }
    }

    fn optimizer(&self) -> Optimizer {
        let mut muon = ParamGroup::muon("matrices", vec![("core.w".into(), self.matrix.clone())]);
        muon.lr = 0.02;
        let mut adamw = ParamGroup::adamw("vectors", vec![("core.b".into(), self.bias.clone())]);
        adamw.lr = 0.01;
        Optimizer::new(vec![muon, adamw]).unwrap()
    }

    fn grads(&self) -> candle_core::backprop::GradStore {
        // (6, 4) @ (4, 5) -> (6, 5), + bias (6, 1)
        let out = self.matrix.as_tensor().matmul(&self.x).unwrap();
        let out = out
            .broadcast_add(&self.bias.as_tensor().unsqueeze(1).unwrap())
            .unwrap();
        let d = out.sub(&self.y).unwrap();
        d.sqr().unwrap().sum_all().unwrap().backward().unwrap()
    }

    fn run(&self, opt: &mut Optimizer, steps: std::ops::Range<u64>) {
        for step in steps {
            let scale = learning_rate(step, 10, 1.0, 0.2, 0.5);
            opt.step(&self.grads(), scale).unwrap();
        }
    }

    fn bits(&self) -> Vec<u32> {
        let mut all = values(&self.matrix);
        all.extend(values(&self.bias));
        all.into_iter().map(f32::to_bits).collect()
    }
}

#[test]
fn optimizer_state_round_trip_continues_bit_identically() {
    // Uninterrupted: 10 steps.
    let straight = Toy::new();
    let mut opt = straight.optimizer();
    straight.run(&mut opt, 0..10);

    // Interrupted after 4 steps: save weights and state (through a safetensors file), rebuild
    // everything from them, continue to 10.
    let first = Toy::new();
    let mut opt_first = first.optimizer();
    first.run(&mut opt_first, 0..4);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("optimizer.safetensors");
    let state: HashMap<String, Tensor> = opt_first.state_tensors().unwrap().into_iter().collect();
    assert_eq!(
        state.len(),
        1 + 1 + 3,
        "step, Muon buffer, AdamW pair and count"
    );
    candle_core::safetensors::save(&state, &file).unwrap();
    let resumed = Toy::copy_of(&first);
    drop((first, opt_first));
    let mut opt_resumed = resumed.optimizer();
    let loaded = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    opt_resumed.load_state(loaded).unwrap();
    assert_eq!(opt_resumed.step_count(), 4);
    resumed.run(&mut opt_resumed, 4..10);

    assert_eq!(straight.bits(), resumed.bits());
    assert_eq!(opt.step_count(), opt_resumed.step_count());
    let a = opt.state_tensors().unwrap();
    let b = opt_resumed.state_tensors().unwrap();
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        let ta: Vec<u64> = ta
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
            .iter()
            .map(|v: &f64| v.to_bits())
            .collect();
        let tb: Vec<u64> = tb
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
            .iter()
            .map(|v: &f64| v.to_bits())
            .collect();
        assert_eq!(ta, tb, "{ka}");
    }
}

#[test]
fn without_state_the_continuation_differs() {
    // The round trip above is not passing by accident: dropping the state changes the result.
    let straight = Toy::new();
    let mut opt = straight.optimizer();
    straight.run(&mut opt, 0..10);
    let first = Toy::new();
    let mut opt_first = first.optimizer();
    first.run(&mut opt_first, 0..4);
    let mut fresh = first.optimizer();
    first.run(&mut fresh, 4..10);
    assert_ne!(straight.bits(), first.bits());
}

// ---------------------------------------------------------------------------------------------
// Gradient clipping

fn two_scalars() -> (Var, Var, candle_core::backprop::GradStore) {
    let a = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let b = Var::new(&[1.0f32], &Device::Cpu).unwrap();
    // loss = 3a + 4b: gradients 3 and 4, global norm 5.
    let loss = (a.as_tensor().affine(3.0, 0.0).unwrap() + b.as_tensor().affine(4.0, 0.0).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    (a, b, grads)
}

fn grad_of(grads: &candle_core::backprop::GradStore, v: &Var) -> f32 {
    grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0]
}

#[test]
fn clip_scales_to_max_norm_and_reports_the_norm_before() {
    let (a, b, mut grads) = two_scalars();
    let norm = clip_grad_norm(&mut grads, &[&a, &b], 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-12, "norm {norm}");
    let (ga, gb) = (grad_of(&grads, &a), grad_of(&grads, &b));
    assert!(
        (ga - 0.6).abs() < 1e-6 && (gb - 0.8).abs() < 1e-6,
        "{ga} {gb}"
    );
    let after = ((ga * ga + gb * gb) as f64).sqrt();
    assert!((after - 1.0).abs() < 1e-6, "norm after clipping {after}");
}

#[test]
fn clip_leaves_small_gradients_alone() {
    let (a, b, mut grads) = two_scalars();
    let norm = clip_grad_norm(&mut grads, &[&a, &b, &a], 10.0).unwrap();
    assert!(
        (norm - 5.0).abs() < 1e-12,
        "a variable listed twice counts once: {norm}"
    );
    assert_eq!((grad_of(&grads, &a), grad_of(&grads, &b)), (3.0, 4.0));
}

#[test]
fn clip_reports_a_non_finite_norm_untouched() {
    let a = Var::new(&[f32::INFINITY], &Device::Cpu).unwrap();
    let grads_loss = a.as_tensor().sqr().unwrap().sum_all().unwrap();
    let mut grads = grads_loss.backward().unwrap();
    let norm = clip_grad_norm(&mut grads, &[&a], 1.0).unwrap();
    assert!(!norm.is_finite());
    assert!(grad_of(&grads, &a).is_infinite());
}
