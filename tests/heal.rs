//! `surgery heal`: gradients reach every trainable parameter and agree with finite differences;
//! frozen parameters stay put; runs are deterministic, resumable bit for bit, reduce the loss,
//! and stop cleanly on a non-finite loss.

mod common;

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use common::{assert_refused, listing, metrics, stderr, stdout, surgery};
use serde_json::Value;
use surgery::heal::train::mean_cross_entropy;
use surgery::model::params::{Param, Train};
use surgery::model::{InitialState, Mix, Model};
use surgery::source::SourceModel;
use surgery::synth::{self, SynthSpec};

const TEXT: &str = "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God said, Let there be light: and there was light. And God saw the light, that it was good: and God divided the light from the darkness.";

/// A (1,2,1) recurrent cut of a 4-layer synthetic llama with a noisy adapter, a byte-level
/// tokenizer, and training text of 40 paragraphs.
fn setup(d: &Path) {
    synth::write_hf(&d.join("src"), &SynthSpec::llama(4), 3).unwrap();
    synth::write_byte_tokenizer(&d.join("src")).unwrap();
    cut(d, "rec", &[]);
    let text: Vec<String> = (0..40).map(|i| format!("{i}. {TEXT}")).collect();
    std::fs::write(d.join("train.txt"), text.join("\n\n")).unwrap();
}

/// The (1,2,1) cut of `src` with a noisy adapter into `out`, with `extra` apply options.
fn cut(d: &Path, out: &str, extra: &[&str]) {
    let mut args = vec![
        "apply",
        "src",
        "--shape",
        "1,2,1",
        "--adapter-noise",
        "0.05",
        "--out",
        out,
        "-q",
    ];
    args.extend_from_slice(extra);
    let o = surgery(d, &args);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn batch() -> (Tensor, Tensor) {
    let ids: Vec<u32> = TEXT.bytes().take(33).map(u32::from).collect();
    let inputs = Tensor::from_vec(ids[..32].to_vec(), (1, 32), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(ids[1..].to_vec(), (1, 32), &Device::Cpu).unwrap();
    (inputs, targets)
}

fn loss_of(model: &Model, r: usize, without: usize) -> Tensor {
    let (ids, targets) = batch();
    let logits = model
        .forward_detached(&ids, None, r, without, InitialState::Seeded(5), None)
        .unwrap();
    mean_cross_entropy(&logits, &targets).unwrap()
}

#[test]
fn every_trainable_parameter_gets_a_finite_nonzero_gradient_and_frozen_ones_none() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let source = SourceModel::open(&dir.path().join("rec")).unwrap();
    for (train, expected) in [
        (Train::All, 1 + 1 + 1 + 1 + 4 * 6),
        (Train::Core, 2 * 6),
        (Train::Adapter, 1),
    ] {
        let mut model = Model::load(&source, &Device::Cpu).unwrap();
        let all: Vec<String> = model
            .named_tensors()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let params = model.trainable(train, false).unwrap();
        assert_eq!(params.len(), expected, "{train:?}");
        // r = 3 with one iteration detached: truncated backpropagation still reaches everything.
        let grads = loss_of(&model, 3, 1).backward().unwrap();
        for p in &params {
            let g = grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{train:?}: no gradient for {}", p.name));
            let max = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                max.is_finite() && max > 0.0,
                "{train:?}: {} gradient max {max}",
                p.name
            );
        }
        // Frozen parameters are not Vars: nothing can update them.
        let trained: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        let frozen = all
            .iter()
            .filter(|n| !trained.contains(&n.as_str()))
            .count();
        assert_eq!(frozen + params.len(), all.len());
        if train == Train::Core {
            assert!(
                trained
                    .iter()
                    .all(|n| n.starts_with("transformer.core_block.")),
                "{trained:?}"
            );
        }
    }
}

fn element(p: &Param, i: usize) -> f64 {
    p.var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .get(i)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn set_element(p: &Param, i: usize, value: f64) {
    let mut v = p
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    v[i] = value;
    p.var
        .set(&Tensor::from_vec(v, p.var.dims(), &Device::Cpu).unwrap())
        .unwrap();
}

/// The gradient in `grads` of three elements of each parameter named in `wanted` (the largest and
/// the next two) against central differences of `loss`, in f64.
fn assert_finite_differences(
    params: &[Param],
    grads: &GradStore,
    wanted: &[&str],
    loss: &mut dyn FnMut() -> f64,
) {
    let h = 1e-5;
    for &name in wanted {
        let p = params
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        let g = grads
            .get(p.var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // The largest-gradient element and two others (embedding: rows of tokens in the batch).
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in &order[..3] {
            let w = element(p, i);
            set_element(p, i, w + h);
            let up = loss();
            set_element(p, i, w - h);
            let down = loss();
            set_element(p, i, w);
            let numeric = (up - down) / (2.0 * h);
            let rel = (numeric - g[i]).abs() / g[i].abs().max(1e-12);
            eprintln!(
                "{name}[{i}]: analytic {:.6e}, numeric {numeric:.6e}, relative error {rel:.1e}",
                g[i]
            );
            assert!(
                rel < 1e-3,
                "{name}[{i}]: analytic {} vs numeric {numeric}",
                g[i]
            );
        }
    }
}

/// The f64 model of `d/rec`, and its trainable parameters.
fn f64_model(d: &Path, dir: &str) -> (Model, Vec<Param>) {
    let source = SourceModel::open(&d.join(dir)).unwrap();
    let mut model = Model::load(&source, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let params = model.trainable(Train::All, false).unwrap();
    (model, params)
}

const CHECKED: [&str; 4] = [
    "transformer.adapter.weight",
    "transformer.core_block.1.attn.Wqkv.weight",
    "transformer.core_block.0.norm_1.weight",
    "transformer.wte.weight",
];

#[test]
fn gradients_agree_with_finite_differences_in_f64() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let (model, params) = f64_model(dir.path(), "rec");
    let grads = loss_of(&model, 2, 0).backward().unwrap();
    let mut loss = || loss_of(&model, 2, 0).to_scalar::<f64>().unwrap();
    assert_finite_differences(&params, &grads, &CHECKED, &mut loss);
}

#[test]
fn the_distillation_gradient_agrees_with_finite_differences_in_f64() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    // The teacher: another cut of the same source, its adapter noisier.
    let args = [
        "apply",
        "src",
        "--shape",
        "1,2,1",
        "--adapter-noise",
        "0.3",
        "--out",
        "other",
        "-q",
    ];
    let o = surgery(dir.path(), &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (model, params) = f64_model(dir.path(), "rec");
    let (mut teacher, _) = f64_model(dir.path(), "other");
    let (ids, targets) = batch();
    for alpha in [0.0, 0.5] {
        let mix = Mix {
            alpha,
            temperature: 2.0,
        };
        let taught = teacher
            .teacher(&ids, 2, InitialState::Seeded(5), mix)
            .unwrap();
        let loss_parts = || {
            model
                .loss_parts(&ids, &targets, 2, 0, InitialState::Seeded(5), Some(&taught))
                .unwrap()
        };
        let (value, parts) = loss_parts();
        let parts = parts.expect("a teacher's loss has parts");
        assert!(parts.kl > 0.0, "{parts:?}");
        let grads = value.backward().unwrap();
        let mut loss = || loss_parts().0.to_scalar::<f64>().unwrap();
        assert_finite_differences(&params, &grads, &CHECKED, &mut loss);
    }
}

fn heal(d: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "heal",
        "rec",
        "--data",
        "train.txt",
        "--out",
        out,
        "--seq-len",
        "32",
        "--batch",
        "4",
        "--micro-batch",
        "2",
        "--max-mean-recurrence",
        "3",
        "--holdout",
        "0.1",
        "--eval-tokens",
        "256",
        "--lr",
        "0.02",
        "--adam-lr",
        "0.01",
        "-q",
    ];
    args.extend_from_slice(extra);
    surgery(d, &args)
}

#[test]
fn sixty_steps_reduce_the_loss_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    for out in ["a", "b"] {
        let o = heal(d, out, &["--steps", "60", "--eval-every", "30"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let (a, b) = (metrics(&d.join("a")), metrics(&d.join("b")));
    assert_eq!(a.len(), 60);
    let strip = |m: &[Value]| -> Vec<Value> {
        m.iter()
            .map(|l| {
                let mut l = l.clone();
                // Times and memory vary from run to run; everything else is deterministic.
                let l_obj = l.as_object_mut().unwrap();
                for timing in ["tokens_per_second", "seconds", "peak_rss_mb"] {
                    l_obj.remove(timing);
                }
                l
            })
            .collect()
    };
    assert_eq!(strip(&a), strip(&b), "two runs, identical metrics");
    let first = a[0]["loss"].as_f64().unwrap();
    let last: f64 = a[55..]
        .iter()
        .map(|m| m["loss"].as_f64().unwrap())
        .sum::<f64>()
        / 5.0;
    eprintln!("training loss {first:.4} -> {last:.4}");
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    assert_eq!(
        a[29]["eval"].as_array().unwrap().len(),
        3,
        "eval at r = 1, m_max, 2 m_max"
    );
    assert!(a.iter().all(|m| m["iterations_with_grad"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k.as_u64().unwrap() <= 3)));
    assert_eq!(
        std::fs::read(d.join("a/model.safetensors")).unwrap(),
        std::fs::read(d.join("b/model.safetensors")).unwrap()
    );
    assert!(stdout(&surgery(d, &["verify", "a"])).contains("ok"));
    let config: Value =
        serde_json::from_slice(&std::fs::read(d.join("a/config.json")).unwrap()).unwrap();
    assert_eq!(config["surgery"]["heal"]["config"]["steps"], 60);
    assert_eq!(
        config["mean_recurrence"], 3,
        "the healed m_max, not apply's 32"
    );
    assert_eq!(config["surgery"]["heal"]["config"]["seed"], 0);
    let png = std::fs::read(d.join("a/curves.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    common::validate_against_schema(&d.join("a/metrics.jsonl"), "metrics");
}

#[test]
fn an_interrupted_run_resumed_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let o = heal(d, "full", &["--steps", "12", "--checkpoint-every", "6"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same run stopped after step 6: a 12-step run whose checkpoint at 6 we resume, after
    // throwing its output away, as a crash after the checkpoint would have.
    let o = heal(d, "part", &["--steps", "12", "--checkpoint-every", "6"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(d.join("part")).unwrap();
    let ckpt = d.join("part.checkpoints/step-000006");
    assert!(ckpt.join("state.json").is_file());
    let o = surgery(d, &["heal", "--resume", ckpt.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(d.join("full/model.safetensors")).unwrap(),
        std::fs::read(d.join("part/model.safetensors")).unwrap(),
        "resumed weights differ from the uninterrupted run"
    );
    assert_eq!(metrics(&d.join("part")).len(), 12);
}

#[test]
fn a_nan_weight_stops_the_run_naming_the_step_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let o = heal(d, "run", &["--steps", "8", "--checkpoint-every", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(d.join("run")).unwrap();
    let ckpt = d.join("run.checkpoints/step-000004");
    // Poison one weight of the checkpoint, then resume from it.
    let path = ckpt.join("weights.safetensors");
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "transformer.core_block.0.mlp.proj.weight";
    let mut v = w[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[7] = f32::NAN;
    let dims = w[name].dims().to_vec();
    w.insert(
        name.into(),
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, &path).unwrap();
    let before = listing(&ckpt);
    let o = surgery(d, &["heal", "--resume", ckpt.to_str().unwrap(), "-q"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("non-finite loss at step 4") && err.contains("step-000004"),
        "{err}"
    );
    assert_eq!(listing(&ckpt), before, "the checkpoint is intact");
    assert!(!d.join("run").exists());
}

#[test]
fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    std::fs::write(d.join("tiny.txt"), "too short").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["heal", "src", "--data", "train.txt", "--out", "o"],
            "is not a recurrent checkpoint",
        ),
        (
            &[
                "heal",
                "rec",
                "--data",
                "tiny.txt",
                "--out",
                "o",
                "--seq-len",
                "64",
            ],
            "not enough for one training window",
        ),
        (
            &[
                "heal",
                "rec",
                "--data",
                "train.txt",
                "--out",
                "o",
                "--batch",
                "3",
                "--micro-batch",
                "2",
            ],
            "--batch 3 is not a multiple of --micro-batch 2",
        ),
        (
            &[
                "heal",
                "rec",
                "--data",
                "train.txt",
                "--out",
                "o",
                "--steps",
                "0",
            ],
            "--steps must be at least 1",
        ),
        (
            &[
                "heal",
                "rec",
                "--data",
                "train.txt",
                "--out",
                "o",
                "--warmup",
                "0.6",
                "--cooldown",
                "0.6",
            ],
            "add up to more than the run",
        ),
        (
            // The output over its own model: refused as such, not with "pass --force" (issue 18).
            &["heal", "rec", "--data", "train.txt", "--out", "rec"],
            "the output rec is the input rec",
        ),
        (
            &[
                "heal",
                "rec",
                "--data",
                "train.txt",
                "--out",
                "o",
                "--device",
                "cuda",
            ],
            "--device cuda is not available",
        ),
        (
            &[
                "heal",
                "rec",
                "--data",
                "train.txt",
                "--out",
                "o",
                "--device",
                "tpu",
            ],
            "--device tpu is not a device",
        ),
    ];
    for (args, want) in cases {
        assert_refused(d, args, want);
    }
}

/// The adapter of the checkpoint in `dir`, and its embedding, as f32.
fn adapter_and_embedding(dir: &Path) -> (Vec<f32>, Vec<f32>) {
    use surgery::arch::Role;
    let m = SourceModel::open(dir).unwrap();
    let read = |role: Role| m.read_f32(m.tensor(role).unwrap()).unwrap();
    (read(Role::Adapter), read(Role::Embed))
}

#[test]
fn a_random_init_redraws_the_adapter_except_for_the_static_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let (adapter, embedding) = adapter_and_embedding(&d.join("rec"));
    for (out, extra) in [("static", Some("--static")), ("recurrent", None)] {
        let mut args = vec!["--steps", "1", "--init", "random", "--eval-every", "0"];
        args.extend(extra);
        let o = heal(d, out, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        let (a, e) = adapter_and_embedding(&d.join(out));
        assert_ne!(e, embedding, "{out}: the embedding is redrawn");
        // The static model runs r = 1 through its frozen adapter: redrawn at random, it would put
        // a random matrix between the prelude and the core.
        assert_eq!(
            a == adapter,
            extra.is_some(),
            "{out}: adapter kept only when static"
        );
    }
}

#[test]
fn a_fresh_run_over_an_earlier_one_keeps_only_its_own_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    for steps in ["3", "2"] {
        let o = heal(
            d,
            "out",
            &["--steps", steps, "--eval-every", "0", "--force"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let lines = metrics(&d.join("out"));
    let steps: Vec<u64> = lines.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 1], "the second run's two steps only");
}

#[test]
fn a_fresh_run_over_an_earlier_runs_checkpoints_needs_force_and_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let steps = |extra: &[&str]| {
        let mut args = vec![
            "--steps",
            "4",
            "--checkpoint-every",
            "2",
            "--eval-every",
            "0",
        ];
        args.extend_from_slice(extra);
        heal(d, "out", &args)
    };
    // An earlier, longer run whose output is gone (as after a crash): its checkpoints remain.
    let o = heal(
        d,
        "out",
        &[
            "--steps",
            "8",
            "--checkpoint-every",
            "2",
            "--eval-every",
            "0",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(d.join("out")).unwrap();
    let before = listing(&d.join("out.checkpoints"));
    assert!(before.contains(&"step-000006".to_string()), "{before:?}");

    let o = steps(&[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("out.checkpoints holds checkpoints of an earlier run; pass --resume")
            && err.contains("step-000006"),
        "{err}"
    );
    assert_eq!(
        listing(&d.join("out.checkpoints")),
        before,
        "nothing removed"
    );
    assert!(!d.join("out").exists());

    // --force starts over: only this run's checkpoint remains (the earlier run's steps 4 and 6
    // would otherwise outlive it: the pruning keeps the two highest step numbers).
    let o = steps(&["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let after: Vec<String> = listing(&d.join("out.checkpoints"))
        .into_iter()
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(after, ["step-000002"]);
}

/// The fused kernels (the default) train as the composed ops they replace (issue 16): 20 steps on
/// the tiny fixture cut (2,2,2) give the same loss and gradient norm at every step, within 1e-4
/// relative.
#[test]
fn twenty_steps_on_the_tiny_fixture_match_the_composed_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tiny = common::root().join("fixtures/tiny");
    let text = std::fs::read_to_string(tiny.join("text/train.txt")).unwrap();
    let cut = text
        .char_indices()
        .nth(200_000)
        .map_or(text.len(), |(i, _)| i);
    std::fs::write(d.join("train.txt"), &text[..cut]).unwrap();
    let model = tiny.join("model");
    let model = model.to_str().unwrap();
    let o = surgery(
        d,
        &["apply", model, "--shape", "2,2,2", "--out", "rec", "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for kernels in ["fused", "composed"] {
        let o = surgery(
            d,
            &[
                "heal",
                "rec",
                "--data",
                "train.txt",
                "--out",
                kernels,
                "--kernels",
                kernels,
                "--steps",
                "20",
                "--seq-len",
                "64",
                "--batch",
                "2",
                "--holdout",
                "0",
                "--max-mean-recurrence",
                "3",
                "-q",
            ],
        );
        assert!(o.status.success(), "{kernels}: {}", stderr(&o));
    }
    let (fused, composed) = (metrics(&d.join("fused")), metrics(&d.join("composed")));
    assert_eq!(fused.len(), 20);
    for (f, c) in fused.iter().zip(&composed) {
        for key in ["loss", "grad_norm"] {
            let (a, b) = (f[key].as_f64().unwrap(), c[key].as_f64().unwrap());
            assert!(
                ((a - b) / b).abs() < 1e-4,
                "step {}: {key} {a} fused, {b} composed",
                f["step"]
            );
        }
        assert_eq!(f["iterations_with_grad"], c["iterations_with_grad"]);
    }
}

/// SmolLM2's ChatML template, for the byte-level tokenizer of [`setup`]'s model.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[test]
fn loss_on_assistant_takes_the_mean_over_assistant_targets_whatever_the_micro_batches() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    // A zero s_0 and exactly m iterations: micro-batches differ in nothing but their windows.
    cut(d, "zero", &["--state-init", "zero"]);
    let config = serde_json::json!({ "chat_template": CHATML });
    std::fs::write(d.join("zero/tokenizer_config.json"), config.to_string()).unwrap();
    // Short user turns and long answers of varying length: micro-batches hold unequal numbers
    // of assistant targets, so a mean of per-micro-batch means would differ.
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let answer = &TEXT[..20 + 7 * (i % 9)];
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("{i}?")},
                {"role": "assistant", "content": answer},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(d.join("chat.jsonl"), lines.join("\n")).unwrap();
    let run = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "heal",
            "zero",
            "--data",
            "chat.jsonl",
            "--field",
            "messages",
            "--out",
            out,
            "--seq-len",
            "32",
            "--batch",
            "4",
            "--steps",
            "2",
            "--holdout",
            "0",
            "--sampler",
            "fixed",
        ];
        args.extend_from_slice(extra);
        let o = surgery(d, &args);
        assert!(o.status.success(), "{}", stderr(&o));
        (metrics(&d.join(out)), stderr(&o))
    };
    let (whole, said) = run("whole", &["--micro-batch", "4"]);
    let (split, _) = run("split", &["--micro-batch", "1"]);
    let (all, said_all) = run("all", &["--micro-batch", "4", "--loss-on", "all"]);
    let loss = |m: &[Value], step: usize| m[step]["loss"].as_f64().unwrap();
    // The first step's loss (before any update) is the mean over the same targets either way.
    assert!(
        (loss(&whole, 0) - loss(&split, 0)).abs() <= 1e-5 * loss(&whole, 0),
        "{} vs {}",
        loss(&whole, 0),
        loss(&split, 0)
    );
    assert!(
        (loss(&whole, 0) - loss(&all, 0)).abs() > 1e-3,
        "other targets"
    );
    assert!(said.contains("--loss-on assistant: "), "{said}");
    assert!(said.contains(" training targets ("), "{said}");
    assert!(!said_all.contains("--loss-on"), "{said_all}");
    let recorded: Value =
        serde_json::from_slice(&std::fs::read(d.join("whole/config.json")).unwrap()).unwrap();
    assert_eq!(
        recorded["surgery"]["heal"]["config"]["loss_on"],
        "assistant"
    );
    // Plain text has no assistant turn; a template that names none leaves nothing to train on.
    let config = serde_json::json!({ "chat_template": "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}" });
    std::fs::write(d.join("zero/tokenizer_config.json"), config.to_string()).unwrap();
    assert_refused(
        d,
        &[
            "heal", "zero", "--data", "chat.jsonl", "--field", "messages", "--out", "none",
            "--seq-len", "32", "--batch", "4", "--steps", "2",
        ],
        "--loss-on assistant: no training token is in an assistant's turn; pass --loss-on all to train on every token",
    );
}
