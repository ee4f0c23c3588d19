//! The fused ops (RMSNorm, RoPE with the split into heads, SwiGLU, lm_head + cross-entropy) equal
//! the composed candle ops they replace, in values and in gradients (candle's backward through
//! the composed ops against the fused op's own), on odd sizes, one position and strided inputs;
//! their gradients agree with f64 finite differences; and a model and a 20-step heal give the
//! same losses through either set of kernels.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use common::{stderr, surgery};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use surgery::model::fused::{linear, norm, rope, swiglu, xent};
use surgery::model::params::Train;
use surgery::model::{composed, InitialState, Kernels, Mix, Model, Teacher};
use surgery::source::SourceModel;
use surgery::synth::{self, SynthSpec};

const TOLERANCE: f64 = 1e-5;

/// Uniform values in [-1, 1) of `dims`, from `seed`, as a Var of `dtype`.
fn random(dims: &[usize], seed: u64, dtype: DType) -> Var {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    let t = Tensor::from_vec(values, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap();
    Var::from_tensor(&t).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// max |a - b| <= TOLERANCE x max |b|: equal up to rounding, relative to the reference's scale.
fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (a, b) = (values(a), values(b));
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(scale > 0.0, "{what}: an all-zero reference proves nothing");
    assert!(
        diff <= TOLERANCE * scale,
        "{what}: max difference {diff:e} against a scale of {scale:e}"
    );
}

/// sum(f(inputs) * probe): a scalar whose gradient reaches every output with its own weight.
fn probed(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    probe: &Tensor,
) -> Tensor {
    (f(inputs).unwrap() * probe).unwrap().sum_all().unwrap()
}

/// The fused and composed versions of one op give the same values and the same gradients for
/// every input in `wanted`.
fn assert_same_op(
    what: &str,
    fused: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Var],
    wanted: &[usize],
) {
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (yf, yr) = (fused(&tensors).unwrap(), reference(&tensors).unwrap());
    assert_close(&format!("{what}: values"), &yf, &yr);
    let probe = random(yr.dims(), 99, yr.dtype());
    let gf = probed(fused, &tensors, probe.as_tensor())
        .backward()
        .unwrap();
    let gr = probed(reference, &tensors, probe.as_tensor())
        .backward()
        .unwrap();
    for &i in wanted {
        let v = inputs[i].as_tensor();
        assert_close(
            &format!("{what}: gradient of input {i}"),
            gf.get(v).expect("a fused gradient"),
            gr.get(v).expect("a composed gradient"),
        );
    }
}

/// The fused op's gradient of every element of each input in `wanted` against central
/// differences of sum(f * probe), in f64.
fn assert_finite_differences(
    what: &str,
    fused: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Var],
    wanted: &[usize],
) {
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let probe = random(fused(&tensors).unwrap().dims(), 98, DType::F64);
    let grads = probed(fused, &tensors, probe.as_tensor())
        .backward()
        .unwrap();
    let eps = 1e-6;
    for &i in wanted {
        let analytic = values(grads.get(inputs[i].as_tensor()).unwrap());
        let base = values(inputs[i].as_tensor());
        let dims = inputs[i].dims().to_vec();
        let at = |j: usize, delta: f64| -> f64 {
            let mut moved = base.clone();
            moved[j] += delta;
            let mut ts = tensors.clone();
            ts[i] = Tensor::from_vec(moved, dims.as_slice(), &Device::Cpu).unwrap();
            probed(fused, &ts, probe.as_tensor())
                .to_scalar::<f64>()
                .unwrap()
        };
        for (j, &a) in analytic.iter().enumerate() {
            let numeric = (at(j, eps) - at(j, -eps)) / (2.0 * eps);
            assert!(
                (numeric - a).abs() <= 1e-6 * (1.0 + a.abs()),
                "{what}: input {i}[{j}] analytic {a:e}, numeric {numeric:e}"
            );
        }
    }
}

/// The columns `start..start + width` of a wider (.., total) tensor: rows with a stride, as q and
/// k are slices of the fused projection.
fn columns(t: &Tensor, start: usize, width: usize) -> candle_core::Result<Tensor> {
    t.narrow(D::Minus1, start, width)
}

#[test]
fn rms_norm_equals_the_composed_op_and_finite_differences() {
    let eps = 1e-5;
    let fused = |t: &[Tensor]| norm::rms_norm(&t[0], &t[1], eps);
    let reference = |t: &[Tensor]| composed::rms_norm(&t[0], &t[1], eps);
    for (dims, seed) in [(vec![3, 5, 7], 1), (vec![1, 1, 9], 2), (vec![2, 17], 3)] {
        let n = *dims.last().unwrap();
        let inputs = [
            random(&dims, seed, DType::F32),
            random(&[n], seed + 10, DType::F32),
        ];
        assert_same_op(
            &format!("rms_norm {dims:?}"),
            &fused,
            &reference,
            &inputs,
            &[0, 1],
        );
    }
    // Strided rows: 5 columns from the middle of (2, 3, 12).
    let strided_fused = |t: &[Tensor]| norm::rms_norm(&columns(&t[0], 4, 5)?, &t[1], eps);
    let strided_reference = |t: &[Tensor]| composed::rms_norm(&columns(&t[0], 4, 5)?, &t[1], eps);
    let inputs = [
        random(&[2, 3, 12], 4, DType::F32),
        random(&[5], 5, DType::F32),
    ];
    assert_same_op(
        "rms_norm of a column slice",
        &strided_fused,
        &strided_reference,
        &inputs,
        &[0, 1],
    );
    let inputs = [
        random(&[2, 3, 12], 6, DType::F64),
        random(&[5], 7, DType::F64),
    ];
    assert_finite_differences("rms_norm", &strided_fused, &inputs, &[0, 1]);
}

/// cos and sin (B, 1, T, D) of random angles per batch row and position, halves repeated as
/// `Rope::cos_sin` makes them.
fn tables(b: usize, t: usize, d: usize, seed: u64, dtype: DType) -> (Tensor, Tensor) {
    // Detached: the tables are constants of the positions, as in the model.
    let angles = (random(&[b, 1, t, d / 2], seed, DType::F64)
        .as_tensor()
        .detach()
        * 3.0)
        .unwrap();
    let emb = Tensor::cat(&[&angles, &angles], D::Minus1).unwrap();
    (
        emb.cos().unwrap().to_dtype(dtype).unwrap(),
        emb.sin().unwrap().to_dtype(dtype).unwrap(),
    )
}

#[test]
fn rope_with_the_split_into_heads_equals_the_composed_op_and_finite_differences() {
    // (B, T, heads, D, columns before the slice, width of the fused projection)
    for (b, t, heads, d, start, total, seed) in [
        (2, 3, 3, 6, 0, 18, 1),
        (1, 1, 2, 4, 0, 8, 2),
        (2, 5, 1, 8, 8, 24, 3),
        (3, 2, 3, 10, 30, 70, 4),
    ] {
        let (cos, sin) = tables(b, t, d, seed + 20, DType::F32);
        let fused =
            |x: &[Tensor]| rope::rope_heads(&columns(&x[0], start, heads * d)?, heads, &cos, &sin);
        let reference = |x: &[Tensor]| {
            let x = columns(&x[0], start, heads * d)?
                .reshape((b, t, heads, d))?
                .transpose(1, 2)?
                .contiguous()?;
            composed::rope(&x, &cos, &sin)
        };
        let inputs = [random(&[b, t, total], seed, DType::F32)];
        assert_same_op(
            &format!("rope ({b}, {t}, {heads}, {d}) from column {start}"),
            &fused,
            &reference,
            &inputs,
            &[0],
        );
    }
    let (cos, sin) = tables(2, 3, 6, 30, DType::F64);
    let fused = |x: &[Tensor]| rope::rope_heads(&columns(&x[0], 6, 12)?, 2, &cos, &sin);
    let inputs = [random(&[2, 3, 20], 31, DType::F64)];
    assert_finite_differences("rope", &fused, &inputs, &[0]);
}

#[test]
fn swiglu_equals_the_composed_op_and_finite_differences() {
    let fused = |t: &[Tensor]| swiglu::swiglu(&t[0]);
    let reference = |t: &[Tensor]| composed::swiglu(&t[0]);
    for (dims, seed) in [(vec![2, 3, 14], 1), (vec![1, 1, 10], 2), (vec![5, 2], 3)] {
        // Gates over [-4, 4): both tails of the sigmoid.
        let x = random(&dims, seed, DType::F32);
        let inputs = [Var::from_tensor(&(x.as_tensor() * 4.0).unwrap()).unwrap()];
        assert_same_op(
            &format!("swiglu {dims:?}"),
            &fused,
            &reference,
            &inputs,
            &[0],
        );
    }
    let strided_fused = |t: &[Tensor]| swiglu::swiglu(&columns(&t[0], 3, 8)?);
    let strided_reference = |t: &[Tensor]| composed::swiglu(&columns(&t[0], 3, 8)?);
    let inputs = [random(&[3, 2, 13], 4, DType::F32)];
    assert_same_op(
        "swiglu of a column slice",
        &strided_fused,
        &strided_reference,
        &inputs,
        &[0],
    );
    let inputs = [random(&[3, 2, 13], 5, DType::F64)];
    assert_finite_differences("swiglu", &strided_fused, &inputs, &[0]);
}

fn targets(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

#[test]
fn linear_cross_entropy_equals_the_composed_loss_and_finite_differences() {
    // (rows, hidden, vocabulary); the last is two blocks of rows (2041 and 9: 2^23 logits a block).
    for (n, h, v, seed) in [(7, 5, 11, 1), (1, 3, 4, 2), (2050, 3, 4109, 3)] {
        let tg = targets(n, v, seed + 10);
        let tg_tensor = Tensor::from_vec(tg.clone(), (1, n), &Device::Cpu).unwrap();
        let fused = |t: &[Tensor]| xent::linear_cross_entropy(&t[0], &t[1], &tg, 1.0 / n as f64);
        let reference = |t: &[Tensor]| {
            // (n, h) @ (h, V) -> (1, n, V)
            let logits = t[0].matmul(&t[1].t()?)?.unsqueeze(0)?;
            composed::mean_cross_entropy(&logits, &tg_tensor)
        };
        // Logits of a few units, as a trained head gives.
        let hidden = random(&[n, h], seed, DType::F32);
        let hidden = Var::from_tensor(&(hidden.as_tensor() * 3.0).unwrap()).unwrap();
        let inputs = [hidden, random(&[v, h], seed + 20, DType::F32)];
        assert_same_op(
            &format!("linear_cross_entropy ({n}, {h}) x ({v}, {h})"),
            &fused,
            &reference,
            &inputs,
            &[0, 1],
        );
        let nll = xent::nll_rows(inputs[0].as_tensor(), inputs[1].as_tensor(), &tg).unwrap();
        let mean = nll.iter().sum::<f64>() / n as f64;
        let want = reference(&[inputs[0].as_tensor().clone(), inputs[1].as_tensor().clone()])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(
            (mean - want).abs() <= TOLERANCE * want.abs(),
            "nll_rows {mean} vs {want}"
        );
    }
    let tg = targets(6, 9, 40);
    let fused = |t: &[Tensor]| xent::linear_cross_entropy(&t[0], &t[1], &tg, 0.5);
    let inputs = [
        random(&[6, 4], 41, DType::F64),
        random(&[9, 4], 42, DType::F64),
    ];
    assert_finite_differences("linear_cross_entropy", &fused, &inputs, &[0, 1]);
}

#[test]
fn linear_distillation_equals_the_composed_loss_and_finite_differences() {
    // (rows, student width, teacher width, vocabulary); the last is two blocks of rows.
    for (n, h, ht, v, seed) in [(7, 5, 3, 11, 1), (1, 3, 4, 4, 2), (2050, 3, 2, 4109, 3)] {
        for mix in [
            Mix {
                alpha: 0.3,
                temperature: 2.0,
            },
            Mix {
                alpha: 0.0,
                temperature: 0.7,
            },
        ] {
            let tg = targets(n, v, seed + 10);
            let tg_tensor = Tensor::from_vec(tg.clone(), n, &Device::Cpu).unwrap();
            let teacher_h = (random(&[n, ht], seed + 30, DType::F32).as_tensor() * 3.0).unwrap();
            let teacher_w = random(&[v, ht], seed + 40, DType::F32).as_tensor().clone();
            let teacher = Teacher {
                h: teacher_h.clone(),
                w: teacher_w.clone(),
                mix,
            };
            let fused = |t: &[Tensor]| {
                Ok(xent::linear_distillation(&t[0], &t[1], &teacher, &tg, 1.0 / n as f64)?.0)
            };
            let reference = |t: &[Tensor]| {
                // (n, h) @ (h, V) -> (n, V), and the teacher's likewise
                let logits = t[0].matmul(&t[1].t()?)?;
                let teacher_logits = teacher_h.matmul(&teacher_w.t()?)?;
                let (loss, _) =
                    composed::mean_distillation(&logits, &teacher_logits, &tg_tensor, mix)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                Ok(loss)
            };
            let hidden = (random(&[n, h], seed, DType::F32).as_tensor() * 3.0).unwrap();
            let inputs = [
                Var::from_tensor(&hidden).unwrap(),
                random(&[v, h], seed + 20, DType::F32),
            ];
            let what = format!("linear_distillation ({n}, {h}) x ({v}, {h}), {mix:?}");
            assert_same_op(&what, &fused, &reference, &inputs, &[0, 1]);
            // The parts: each against the composed one.
            let (_, parts) = xent::linear_distillation(
                &hidden,
                inputs[1].as_tensor(),
                &teacher,
                &tg,
                1.0 / n as f64,
            )
            .unwrap();
            let logits = hidden.matmul(&inputs[1].as_tensor().t().unwrap()).unwrap();
            let teacher_logits = teacher_h.matmul(&teacher_w.t().unwrap()).unwrap();
            let (_, want) =
                composed::mean_distillation(&logits, &teacher_logits, &tg_tensor, mix).unwrap();
            for (name, got, want) in [("ce", parts.ce, want.ce), ("kl", parts.kl, want.kl)] {
                assert!(
                    (got - want).abs() <= TOLERANCE * want.abs().max(1.0),
                    "{what}: {name} {got} vs {want}"
                );
            }
            assert!(parts.kl > 0.0, "{what}: different models, a positive KL");
        }
    }
    // f64 finite differences of the KL's gradient alone (alpha 0) and of the mix.
    for alpha in [0.0, 0.4] {
        let tg = targets(6, 9, 40);
        let teacher = Teacher {
            h: random(&[6, 3], 43, DType::F64).as_tensor().clone(),
            w: random(&[9, 3], 44, DType::F64).as_tensor().clone(),
            mix: Mix {
                alpha,
                temperature: 1.5,
            },
        };
        let fused =
            |t: &[Tensor]| Ok(xent::linear_distillation(&t[0], &t[1], &teacher, &tg, 0.5)?.0);
        let inputs = [
            random(&[6, 4], 41, DType::F64),
            random(&[9, 4], 42, DType::F64),
        ];
        assert_finite_differences("linear_distillation", &fused, &inputs, &[0, 1]);
    }
}

/// Targets 1, 4, 5 and 8 of 9 ignored (`heal --loss-on assistant` outside the assistant's turns).
fn partly_ignored(v: usize) -> (Vec<u32>, Vec<u32>) {
    let mut tg = targets(9, v, 50);
    for i in [1, 4, 5, 8] {
        tg[i] = xent::IGNORED;
    }
    let kept = (0..9u32)
        .filter(|&i| tg[i as usize] != xent::IGNORED)
        .collect();
    (tg, kept)
}

#[test]
fn ignored_targets_add_no_loss_and_no_gradient_fused_and_composed() {
    let (n, h, v) = (9, 5, 11);
    let (tg, kept) = partly_ignored(v);
    let scale = 1.0 / kept.len() as f64;
    let kept = Tensor::new(kept.as_slice(), &Device::Cpu).unwrap();
    let kept_tg: Vec<u32> = tg.iter().copied().filter(|&t| t != xent::IGNORED).collect();
    let hidden =
        Var::from_tensor(&(random(&[n, h], 51, DType::F32).as_tensor() * 3.0).unwrap()).unwrap();
    let w = random(&[v, h], 52, DType::F32);
    // The loss over all rows, ignored ones included, is the loss over the kept rows alone; the
    // ignored rows get a zero gradient and the kept ones theirs.
    let all = xent::linear_cross_entropy(hidden.as_tensor(), w.as_tensor(), &tg, scale).unwrap();
    let only = xent::linear_cross_entropy(
        &hidden.as_tensor().index_select(&kept, 0).unwrap(),
        w.as_tensor(),
        &kept_tg,
        scale,
    )
    .unwrap();
    assert_eq!(
        all.to_scalar::<f32>().unwrap(),
        only.to_scalar::<f32>().unwrap()
    );
    let grads = all.backward().unwrap();
    let dh = grads.get(hidden.as_tensor()).unwrap();
    for i in [1, 4, 5, 8] {
        assert!(
            values(&dh.get(i).unwrap()).iter().all(|&x| x == 0.0),
            "row {i}"
        );
    }
    let hidden_kept =
        Var::from_tensor(&hidden.as_tensor().index_select(&kept, 0).unwrap()).unwrap();
    let only = xent::linear_cross_entropy(hidden_kept.as_tensor(), w.as_tensor(), &kept_tg, scale)
        .unwrap();
    let only_grads = only.backward().unwrap();
    assert_close(
        "dh of the kept rows",
        &dh.index_select(&kept, 0).unwrap(),
        only_grads.get(hidden_kept.as_tensor()).unwrap(),
    );
    assert_close(
        "dW",
        grads.get(w.as_tensor()).unwrap(),
        only_grads.get(w.as_tensor()).unwrap(),
    );
    // The composed references skip the same rows: cross-entropy, and distillation's both parts.
    let tg_tensor = Tensor::from_vec(tg.clone(), n, &Device::Cpu).unwrap();
    let inputs = [hidden, w];
    let fused = |t: &[Tensor]| xent::linear_cross_entropy(&t[0], &t[1], &tg, scale);
    let reference = |t: &[Tensor]| {
        composed::mean_cross_entropy(
            &t[0].matmul(&t[1].t()?)?.unsqueeze(0)?,
            &tg_tensor.unsqueeze(0)?,
        )
    };
    assert_same_op(
        "cross-entropy, 4 of 9 ignored",
        &fused,
        &reference,
        &inputs,
        &[0, 1],
    );
    let teacher = Teacher {
        h: random(&[n, 3], 53, DType::F32).as_tensor().clone(),
        w: random(&[v, 3], 54, DType::F32).as_tensor().clone(),
        mix: Mix {
            alpha: 0.4,
            temperature: 2.0,
        },
    };
    let fused = |t: &[Tensor]| Ok(xent::linear_distillation(&t[0], &t[1], &teacher, &tg, scale)?.0);
    let reference = |t: &[Tensor]| {
        let teacher_logits = teacher.h.matmul(&teacher.w.t()?)?;
        composed::mean_distillation(
            &t[0].matmul(&t[1].t()?)?,
            &teacher_logits,
            &tg_tensor,
            teacher.mix,
        )
        .map(|(loss, _)| loss)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
    };
    assert_same_op(
        "distillation, 4 of 9 ignored",
        &fused,
        &reference,
        &inputs,
        &[0, 1],
    );
}

#[test]
fn distillation_with_alpha_one_is_the_cross_entropy_and_from_itself_is_zero() {
    let (n, h, v) = (37, 6, 53);
    let tg = targets(n, v, 7);
    let hidden = random(&[n, h], 8, DType::F32);
    let w = random(&[v, h], 9, DType::F32);
    let (hs, ws) = (hidden.as_tensor(), w.as_tensor());
    let grads_of = |loss: &Tensor| {
        let g = loss.backward().unwrap();
        [hs, ws].map(|t| values(g.get(t).unwrap()))
    };
    let ce = xent::linear_cross_entropy(hs, ws, &tg, 1.0 / n as f64).unwrap();
    // Another teacher, alpha 1: bitwise the cross-entropy, in value and gradient.
    let other = Teacher {
        h: random(&[n, 4], 10, DType::F32).as_tensor().clone(),
        w: random(&[v, 4], 11, DType::F32).as_tensor().clone(),
        mix: Mix {
            alpha: 1.0,
            temperature: 2.0,
        },
    };
    let (mixed, parts) = xent::linear_distillation(hs, ws, &other, &tg, 1.0 / n as f64).unwrap();
    assert_eq!(values(&mixed), values(&ce));
    assert_eq!(grads_of(&mixed), grads_of(&ce));
    // The part in f64, the loss rounded to f32.
    assert_eq!(parts.ce as f32 as f64, values(&ce)[0]);
    // The student as its own teacher, alpha 0: exactly 0, and so is every gradient.
    let itself = Teacher {
        h: hs.detach(),
        w: ws.detach(),
        mix: Mix {
            alpha: 0.0,
            temperature: 2.0,
        },
    };
    let (zero, parts) = xent::linear_distillation(hs, ws, &itself, &tg, 1.0 / n as f64).unwrap();
    assert_eq!(values(&zero), vec![0.0]);
    assert_eq!(parts.kl, 0.0);
    for g in grads_of(&zero) {
        assert!(g.iter().all(|&x| x == 0.0), "a non-zero gradient");
    }
}

#[test]
fn frozen_linear_equals_the_matmul_and_forms_no_gradient_for_the_matrix() {
    for (n, i, o, seed) in [(7, 5, 11, 1), (1, 3, 4, 2), (130, 64, 96, 3)] {
        let x = random(&[n, i], seed, DType::F32);
        let w = random(&[o, i], seed + 1, DType::F32).as_tensor().detach();
        let fused = |t: &[Tensor]| linear::frozen_linear(&t[0], &w);
        let reference = |t: &[Tensor]| t[0].matmul(&w.t()?);
        let inputs = [x];
        assert_same_op(
            &format!("frozen_linear ({n}, {i}) x ({o}, {i})"),
            &fused,
            &reference,
            &inputs,
            &[0],
        );
        // The same values bit for bit: the same gemm product on the same strides.
        let t = [inputs[0].as_tensor().clone()];
        assert_eq!(values(&fused(&t).unwrap()), values(&reference(&t).unwrap()));
        let grads = fused(&t).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none(), "a gradient for the frozen matrix");
    }
    let w = random(&[3, 4], 9, DType::F64).as_tensor().detach();
    let fused = |t: &[Tensor]| linear::frozen_linear(&t[0], &w);
    assert_finite_differences(
        "frozen_linear",
        &fused,
        &[random(&[5, 4], 8, DType::F64)],
        &[0],
    );
}

#[test]
fn a_target_outside_the_vocabulary_is_refused_by_name() {
    let h = random(&[2, 3], 1, DType::F32);
    let w = random(&[5, 3], 2, DType::F32);
    let err = xent::nll_rows(h.as_tensor(), w.as_tensor(), &[1, 5]).unwrap_err();
    assert!(
        err.to_string()
            .contains("target 5 is outside the vocabulary of 5"),
        "{err}"
    );
    let err = xent::linear_cross_entropy(h.as_tensor(), w.as_tensor(), &[1], 1.0).unwrap_err();
    assert!(
        err.to_string().contains("1 targets for 2 hidden states"),
        "{err}"
    );
}

/// A (1,2,1) cut with a noisy adapter of a 4-layer synthetic model of `spec` at `d/rec`.
fn recurrent_cut(d: &Path, spec: &SynthSpec) {
    synth::write_hf(&d.join("src"), spec, 3).unwrap();
    synth::write_byte_tokenizer(&d.join("src")).unwrap();
    let args = [
        "apply",
        "src",
        "--shape",
        "1,2,1",
        "--adapter-noise",
        "0.05",
        "--out",
        "rec",
        "-q",
    ];
    let o = surgery(d, &args);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn the_model_loss_and_every_gradient_equal_the_composed_path_for_llama_and_olmo2() {
    for spec in [SynthSpec::llama(4), SynthSpec::olmo2(4)] {
        let dir = tempfile::tempdir().unwrap();
        recurrent_cut(dir.path(), &spec);
        let source = SourceModel::open(&dir.path().join("rec")).unwrap();
        let mut model = Model::load(&source, &Device::Cpu).unwrap();
        let params = model.trainable(Train::All, false).unwrap();
        let ids = targets(2 * 9, 256, 5);
        let ids = Tensor::from_vec(ids, (2, 9), &Device::Cpu).unwrap();
        let next = Tensor::from_vec(targets(2 * 9, 256, 6), (2, 9), &Device::Cpu).unwrap();
        let mut run = |kernels: Kernels| {
            model.set_kernels(kernels);
            let loss = model
                .loss(&ids, &next, 3, 1, InitialState::Seeded(7))
                .unwrap();
            let grads = loss.backward().unwrap();
            let grads: Vec<Tensor> = params
                .iter()
                .map(|p| grads.get(p.var.as_tensor()).unwrap().clone())
                .collect();
            (loss, grads)
        };
        let (fused_loss, fused_grads) = run(Kernels::Fused);
        let (composed_loss, composed_grads) = run(Kernels::Composed);
        let family = format!("{:?}", spec.config().family);
        assert_close(&format!("{family}: loss"), &fused_loss, &composed_loss);
        for ((p, f), c) in params.iter().zip(&fused_grads).zip(&composed_grads) {
            assert_close(&format!("{family}: gradient of {}", p.name), f, c);
        }
    }
}

#[test]
fn the_evaluation_sum_honours_padding_and_weights_as_the_composed_path() {
    let dir = tempfile::tempdir().unwrap();
    recurrent_cut(dir.path(), &SynthSpec::llama(4));
    let source = SourceModel::open(&dir.path().join("rec")).unwrap();
    let mut model = Model::load(&source, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(targets(2 * 6, 256, 8), (2, 6), &Device::Cpu).unwrap();
    let next = Tensor::from_vec(targets(2 * 6, 256, 9), (2, 6), &Device::Cpu).unwrap();
    // Row 1 right-padded after 4 tokens; one real token weighted 0.5.
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let weights = Tensor::new(
        &[
            [1f32, 1.0, 0.5, 1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0, 1.0, 0.0, 0.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mut sum = |kernels: Kernels| {
        model.set_kernels(kernels);
        model
            .nll_sum(
                &ids,
                Some(&mask),
                &next,
                &weights,
                2,
                InitialState::Seeded(3),
            )
            .unwrap()
    };
    let (fused, fused_count) = sum(Kernels::Fused);
    let (composed, composed_count) = sum(Kernels::Composed);
    assert_eq!(fused_count, 9.5);
    assert_eq!(composed_count, 9.5);
    assert!(
        (fused - composed).abs() <= TOLERANCE * composed.abs(),
        "{fused} vs {composed}"
    );
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .flat_map(|l| {
            let m: Value = serde_json::from_str(l).unwrap();
            let mut out = vec![m["loss"].as_f64().unwrap()];
            if let Some(eval) = m["eval"].as_array() {
                out.extend(eval.iter().map(|e| e["loss"].as_f64().unwrap()));
            }
            out
        })
        .collect()
}

#[test]
fn twenty_heal_steps_on_the_tiny_fixture_give_the_composed_losses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fixture = common::root().join("fixtures/tiny");
    let model = fixture.join("model");
    let o = surgery(
        d,
        &[
            "apply",
            model.to_str().unwrap(),
            "--shape",
            "2,4,2",
            "--out",
            "rec",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let train = fixture.join("text/heldout.txt");
    for kernels in ["fused", "composed"] {
        let o = surgery(
            d,
            &[
                "heal",
                "rec",
                "--data",
                train.to_str().unwrap(),
                "--out",
                kernels,
                "--steps",
                "20",
                "--seq-len",
                "32",
                "--batch",
                "4",
                "--micro-batch",
                "2",
                "--max-mean-recurrence",
                "3",
                "--holdout",
                "0.05",
                "--eval-every",
                "10",
                "--eval-tokens",
                "256",
                "--checkpoint-every",
                "0",
                "--kernels",
                kernels,
                "-q",
            ],
        );
        assert!(o.status.success(), "{kernels}: {}", stderr(&o));
    }
    let (fused, composed) = (losses(&d.join("fused")), losses(&d.join("composed")));
    assert_eq!(
        fused.len(),
        20 + 2 * 3,
        "20 steps and two evaluations at 3 recurrences"
    );
    for (i, (f, c)) in fused.iter().zip(&composed).enumerate() {
        assert!(
            (f - c).abs() <= 1e-4 * c.abs(),
            "loss {i}: fused {f} vs composed {c}"
        );
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(d.join("composed/config.json")).unwrap()).unwrap();
    assert_eq!(config["surgery"]["heal"]["config"]["kernels"], "composed");
}
