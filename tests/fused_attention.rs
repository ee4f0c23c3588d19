//! The fused attention (src/model/fused/attention.rs) against the composed candle ops it replaces
//! and against f64 finite differences: values and the gradients of q, k and v, over odd sizes,
//! grouped-query ratios 1 and 3, left and right padding (rows with no real key included), T = 1,
//! T past the tile sizes, a KV cache (past > 0), D = 64 and odd D; then whole models, fused
//! against composed kernels, with padding and with a KV cache.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use surgery::model::fused::attention::{composed, fused, Mask};
use surgery::model::{InitialState, Kernels, KvCache, Model};
use surgery::source::SourceModel;
use surgery::synth::{self, SynthSpec};
use tempfile::TempDir;

const CPU: Device = Device::Cpu;

/// Which of a batch row's T new tokens are padding.
#[derive(Debug, Clone, Copy)]
enum Pad {
    None,
    /// The first n.
    Left(usize),
    /// The last n.
    Right(usize),
    /// Token n only (a hole inside the row).
    Hole(usize),
}

#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    heads: usize,
    kv_heads: usize,
    t: usize,
    past: usize,
    d: usize,
    /// One per batch row.
    pads: Vec<Pad>,
}

impl Case {
    fn new(
        name: &'static str,
        (heads, kv_heads): (usize, usize),
        t: usize,
        past: usize,
        d: usize,
    ) -> Case {
        Case {
            name,
            heads,
            kv_heads,
            t,
            past,
            d,
            pads: vec![Pad::None],
        }
    }

    fn pads(self, pads: &[Pad]) -> Case {
        Case {
            pads: pads.to_vec(),
            ..self
        }
    }

    fn b(&self) -> usize {
        self.pads.len()
    }

    fn keys(&self) -> usize {
        self.past + self.t
    }

    /// [B * Tk]: whether each key is a real token (cached keys always are).
    fn valid(&self) -> Vec<bool> {
        let mut valid = Vec::new();
        for pad in &self.pads {
            valid.extend(std::iter::repeat_n(true, self.past));
            valid.extend((0..self.t).map(|i| match *pad {
                Pad::None => true,
                Pad::Left(n) => i >= n,
                Pad::Right(n) => i < self.t - n,
                Pad::Hole(n) => i != n,
            }));
        }
        valid
    }

    /// The model's additive bias [B, 1, T, Tk]: 0 where causal and real, else -1e9.
    fn bias(&self, dtype: DType) -> Tensor {
        let (keys, valid) = (self.keys(), self.valid());
        let mut bias = Vec::new();
        for b in 0..self.b() {
            for i in 0..self.t {
                for j in 0..keys {
                    let seen = j <= self.past + i && valid[b * keys + j];
                    bias.push(if seen { 0.0f32 } else { -1e9 });
                }
            }
        }
        let bias = Tensor::from_vec(bias, (self.b(), 1, self.t, keys), &CPU).unwrap();
        bias.to_dtype(dtype).unwrap()
    }

    fn causal(&self) -> Mask {
        Mask::Causal {
            past: self.past,
            valid: Arc::from(self.valid()),
        }
    }

    /// q [B, H, T, D], k and v [B, KV, Tk, D], and weights w [B, H, T, D] of the loss sum(w * out).
    fn inputs(&self, dtype: DType, seed: u64) -> [Tensor; 4] {
        let (b, d) = (self.b(), self.d);
        let q = randn((b, self.heads, self.t, d), 1.5, seed, dtype);
        let k = randn((b, self.kv_heads, self.keys(), d), 1.5, seed + 1, dtype);
        let v = randn((b, self.kv_heads, self.keys(), d), 1.0, seed + 2, dtype);
        let w = randn((b, self.heads, self.t, d), 1.0, seed + 3, dtype);
        [q, k, v, w]
    }
}

fn randn(shape: (usize, usize, usize, usize), sigma: f64, seed: u64, dtype: DType) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let values: Vec<f64> = (0..n)
        .map(|_| {
            let x: f64 = StandardNormal.sample(&mut rng);
            sigma * x
        })
        .collect();
    Tensor::from_vec(values, shape, &CPU)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// max |a - b| / max |b|.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let a = a.to_vec1::<f64>().unwrap();
    let b = b.to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff.is_finite(), "non-finite values");
    diff / scale.max(1e-30)
}

/// The output and the gradients of sum(w * out) in q, k and v.
fn run(
    attention: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
    [q, k, v, w]: &[Tensor; 4],
) -> [Tensor; 4] {
    let vars = [q, k, v].map(|x| Var::from_tensor(x).unwrap());
    let out = attention(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )
    .unwrap();
    let grads = (&out * w).unwrap().sum_all().unwrap().backward().unwrap();
    let [dq, dk, dv] = vars.map(|x| grads.get(x.as_tensor()).unwrap().clone());
    [out, dq, dk, dv]
}

fn cases() -> Vec<Case> {
    use Pad::*;
    vec![
        Case::new("odd sizes, ratio 1, odd D", (3, 3), 7, 0, 5),
        Case::new(
            "ratio 3, D 64, right and left padded rows",
            (6, 2),
            13,
            0,
            64,
        )
        .pads(&[None, Right(4), Left(3)]),
        Case::new(
            "T past both tiles, ratio 3, left padded",
            (3, 1),
            150,
            0,
            64,
        )
        .pads(&[Left(9), Right(11)]),
        Case::new("T = 1, nothing cached", (2, 2), 1, 0, 3),
        Case::new("T = 1 against a cache (decoding)", (6, 2), 1, 45, 64).pads(&[None, None]),
        Case::new("a few tokens against a long cache", (3, 3), 5, 67, 7),
        Case::new("a hole in a row, odd D 33", (6, 2), 21, 2, 33).pads(&[Hole(6), None]),
    ]
}

#[test]
fn fused_attention_equals_the_composed_ops_in_values_and_gradients() {
    for case in cases() {
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::F64, 1e-9)] {
            let inputs = case.inputs(dtype, 7);
            let bias = case.bias(dtype);
            let reference = run(|q, k, v| composed(q, k, v, &bias), &inputs);
            let masks = [
                ("compact mask", case.causal()),
                ("bias", Mask::Bias(bias.clone())),
            ];
            for (form, mask) in masks {
                let ours = run(|q, k, v| fused(q, k, v, &mask), &inputs);
                for (what, (a, b)) in ["out", "dq", "dk", "dv"]
                    .iter()
                    .zip(ours.iter().zip(&reference))
                {
                    let rel = relative(a, b);
                    assert!(
                        rel <= tolerance,
                        "{} ({dtype:?}, {form}): {what} differs by {rel:.2e} relative",
                        case.name
                    );
                }
            }
        }
    }
}

#[test]
fn rows_with_no_real_key_match_the_composed_ops_and_are_finite() {
    // Left padding without a cache: the first rows see no real key. The bias then adds -1e9 to
    // every key, which in f32 leaves every score equal: uniform weights over all keys.
    let case = Case::new("left padded", (2, 1), 6, 0, 4).pads(&[Pad::Left(3)]);
    let inputs = case.inputs(DType::F32, 3);
    let ours = run(|q, k, v| fused(q, k, v, &case.causal()), &inputs);
    let bias = case.bias(DType::F32);
    let reference = run(|q, k, v| composed(q, k, v, &bias), &inputs);
    let mean_v = inputs[2].mean_keepdim(2).unwrap(); // [1, 1, 1, D]
    let first = ours[0].narrow(2, 0, 1).unwrap(); // head 0, query 0: [1, 1, 1, D]
    let first = first.narrow(1, 0, 1).unwrap();
    assert!(relative(&first, &mean_v) <= 1e-6, "{first} vs {mean_v}");
    for (a, b) in ours.iter().zip(&reference) {
        assert!(relative(a, b) <= 1e-5);
    }
}

/// sum(w * fused(q, k, v)) in f64.
fn loss(case: &Case, [q, k, v, w]: &[Tensor; 4]) -> f64 {
    let out = fused(q, k, v, &case.causal()).unwrap();
    (&out * w)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// `x` with element `at` (flat) moved by `delta`.
fn nudged(x: &Tensor, at: usize, delta: f64) -> Tensor {
    let mut values = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    values[at] += delta;
    Tensor::from_vec(values, x.shape(), &CPU).unwrap()
}

#[test]
fn fused_attention_gradients_agree_with_f64_finite_differences() {
    use Pad::*;
    let cases = [
        Case::new("ratio 3, padded, cached", (6, 2), 9, 3, 5).pads(&[Right(2), Hole(4)]),
        Case::new("ratio 1, past the tiles", (2, 2), 150, 0, 8).pads(&[Right(5)]),
    ];
    let eps = 1e-5;
    for case in cases {
        let inputs = case.inputs(DType::F64, 11);
        let grads = run(|q, k, v| fused(q, k, v, &case.causal()), &inputs);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (which, name) in ["q", "k", "v"].iter().enumerate() {
            let grad = grads[which + 1]
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for _ in 0..12 {
                let at = rng.random_range(0..grad.len());
                let at_input = |delta| {
                    let mut moved = inputs.clone();
                    moved[which] = nudged(&inputs[which], at, delta);
                    loss(&case, &moved)
                };
                let numeric = (at_input(eps) - at_input(-eps)) / (2.0 * eps);
                let err = (numeric - grad[at]).abs();
                assert!(
                    err <= 1e-7 + 1e-6 * numeric.abs(),
                    "{}: d{name}[{at}] = {} analytic, {numeric} numeric",
                    case.name,
                    grad[at]
                );
            }
        }
    }
}

#[test]
fn bad_shapes_and_masks_are_refused_with_their_sizes() {
    let case = Case::new("small", (4, 2), 3, 0, 8);
    let [q, k, v, _] = case.inputs(DType::F32, 1);
    let err = fused(&q, &k.narrow(1, 0, 1).unwrap(), &v, &case.causal()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "fused attention wants q [B, H, T, D], k and v [B, KV, Tk, D] with H a multiple of KV, \
         got q [1, 4, 3, 8], k [1, 1, 3, 8], v [1, 2, 3, 8]"
    );
    let three = Case::new("three heads", (3, 2), 3, 0, 8);
    let [q3, ..] = three.inputs(DType::F32, 1);
    let err = fused(&q3, &k, &v, &case.causal()).unwrap_err();
    assert!(err.to_string().contains("H a multiple of KV"), "{err}");
    let wrong = Mask::Causal {
        past: 1,
        valid: Arc::from(vec![true; 3]),
    };
    let err = fused(&q, &k, &v, &wrong).unwrap_err();
    assert_eq!(
        err.to_string(),
        "fused attention over 3 queries and 3 keys in 1 rows got a causal mask of 1 past keys and 3 flags"
    );
    let err = fused(
        &q,
        &k,
        &v,
        &Mask::Bias(case.bias(DType::F32).narrow(3, 0, 2).unwrap()),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("got a bias of shape [1, 1, 3, 2]"),
        "{err}"
    );
    let half = q.to_dtype(DType::BF16).unwrap();
    let err = fused(&half, &k, &v, &case.causal()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "fused attention runs on the CPU in f32 or f64, not Cpu BF16"
    );
}

// ---------------------------------------------------------------------------------------------
// Whole models: the fused kernels against the composed ones

fn synth_model(work: &Path, spec: &SynthSpec, kernels: Kernels) -> Model {
    let dir = work.join("model");
    if !dir.exists() {
        synth::write_hf(&dir, spec, 42).unwrap();
    }
    let mut model = Model::load(&SourceModel::open(&dir).unwrap(), &CPU).unwrap();
    model.set_kernels(kernels);
    model
}

fn ids(b: usize, t: usize) -> Tensor {
    let ids: Vec<u32> = (0..b * t).map(|i| (i as u32 * 37 + 11) % 256).collect();
    Tensor::from_vec(ids, (b, t), &CPU).unwrap()
}

#[test]
fn models_give_the_same_logits_with_fused_and_composed_kernels() {
    let work = TempDir::new().unwrap();
    for spec in [SynthSpec::llama(2), SynthSpec::olmo2(2)] {
        let fused = synth_model(work.path(), &spec, Kernels::Fused);
        let composed = synth_model(work.path(), &spec, Kernels::Composed);
        // Left padding on one row, right padding on another.
        let (b, t) = (3, 40);
        let mut mask = vec![1u32; b * t];
        mask[t..t + 7].fill(0);
        mask[3 * t - 5..].fill(0);
        let mask = Tensor::from_vec(mask, (b, t), &CPU).unwrap();
        let state = InitialState::Seeded(1);
        let ours = fused
            .forward(&ids(b, t), Some(&mask), 0, state, None)
            .unwrap();
        let theirs = composed
            .forward(&ids(b, t), Some(&mask), 0, state, None)
            .unwrap();
        let rel = relative(&ours, &theirs);
        assert!(rel <= 1e-5, "{:?} padded batch: {rel:.2e}", spec.family);

        // A prefill of 5 tokens, then one at a time through the KV cache.
        let (mut fused_cache, mut composed_cache) = (KvCache::new(), KvCache::new());
        let row = ids(1, 12);
        let mut start = 0;
        for n in [5, 1, 1, 1, 4] {
            let step = row.narrow(1, start, n).unwrap();
            let ours = fused
                .forward(&step, None, 0, state, Some(&mut fused_cache))
                .unwrap();
            let theirs = composed
                .forward(&step, None, 0, state, Some(&mut composed_cache))
                .unwrap();
            let rel = relative(&ours, &theirs);
            assert!(
                rel <= 1e-5,
                "{:?} cached at {start}: {rel:.2e}",
                spec.family
            );
            start += n;
        }
        std::fs::remove_dir_all(work.path().join("model")).unwrap();
    }
}
