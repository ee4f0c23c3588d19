//! The Qwen2 and Qwen3 block families against an implementation nobody here wrote: transformers'
//! own `Qwen2ForCausalLM` / `Qwen3ForCausalLM` on tiny random models with non-zero q/k/v biases
//! and q/k norm weights far from 1 (tests/golden/tiny-qwen{2,3}/, made by
//! scripts/golden_families.py); `apply` with the identity adapter reproduces the source; healing
//! reaches every bias and norm; inspect and plan name the family; GGUF export refuses them.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_refused, golden_ids, load_tensors, max_abs_diff, stderr, stdout, surgery};
use serde_json::Value;
use surgery::arch::{LayerRole, Role};
use surgery::model::params::Train;
use surgery::model::{mean_cross_entropy, InitialState, Kernels, Model};
use surgery::source::SourceModel;
use surgery::synth::{self, SynthSpec};

const FAMILIES: [(&str, &str); 2] = [("tiny-qwen2", "qwen2"), ("tiny-qwen3", "qwen3")];

fn golden_dir(name: &str) -> Option<PathBuf> {
    let path = common::root().join("tests/golden").join(name);
    if path.is_dir() {
        Some(path)
    } else if std::env::var_os("SURGERY_REQUIRE_ASSETS").is_some() {
        panic!("{} is missing", path.display());
    } else {
        eprintln!("NOTICE: skipping: {} is missing", path.display());
        None
    }
}

fn golden(dir: &Path) -> HashMap<String, Tensor> {
    load_tensors(&dir.join("golden_hf_logits.safetensors"))
}

fn logits(model: &Model, ids: &Tensor, r: usize) -> Tensor {
    model
        .forward(ids, None, r, InitialState::Seeded(7), None)
        .unwrap()
}

#[test]
fn qwen_models_match_transformers() {
    for (name, family) in FAMILIES {
        let Some(dir) = golden_dir(name) else { return };
        let g = golden(&dir);
        let source = SourceModel::open(&dir).unwrap();
        assert_eq!(source.config.family.name(), family);
        let mut model = Model::load(&source, &Device::Cpu).unwrap();
        // The fused ops (the default on the CPU) and the composed reference ops.
        for kernels in [Kernels::Fused, Kernels::Composed] {
            model.set_kernels(kernels);
            let diff = max_abs_diff(&logits(&model, &golden_ids(&g), 1), &g["logits"]);
            eprintln!("{name} {kernels:?}: max abs difference to transformers {diff:.2e}");
            assert!(
                diff <= 1e-4,
                "{name} {kernels:?}: max abs difference {diff}"
            );
        }
    }
}

/// `apply` with the identity adapter: with no layer dropped every r computes the source, which
/// is transformers' logits; with layers dropped, the pruned source run as a static model.
#[test]
fn applied_identity_cuts_reproduce_the_source() {
    for (name, _) in FAMILIES {
        let Some(src) = golden_dir(name) else { return };
        let g = golden(&src);
        let work = tempfile::tempdir().unwrap();
        let source = SourceModel::open(&src).unwrap();
        let cases = [
            (["0..2", "2..4", "4..6"], vec![0, 1, 2, 3, 4, 5]),
            (["0..1", "3..5", "5..6"], vec![0, 3, 4, 5]),
        ];
        for (i, ([prelude, core, coda], layers)) in cases.into_iter().enumerate() {
            let out = format!("rec{i}");
            let o = surgery(
                work.path(),
                &[
                    "apply",
                    src.to_str().unwrap(),
                    "--prelude",
                    prelude,
                    "--core",
                    core,
                    "--coda",
                    coda,
                    "--out",
                    &out,
                    "-q",
                ],
            );
            assert!(o.status.success(), "{}", stderr(&o));
            let config = work.path().join(&out).join("config.json");
            common::validate_against_schema(&config, "recurrent-config");
            let rec = SourceModel::open(&work.path().join(&out)).unwrap();
            let model = Model::load(&rec, &Device::Cpu).unwrap();
            let pruned = Model::load_static(&source, &layers, &Device::Cpu).unwrap();
            let want = if layers.len() == 6 {
                g["logits"].clone()
            } else {
                logits(&pruned, &golden_ids(&g), 1)
            };
            for r in [1, 3] {
                let diff = max_abs_diff(&logits(&model, &golden_ids(&g), r), &want);
                eprintln!("{name} {prelude} {core} {coda} r={r}: {diff:.2e}");
                assert!(
                    diff <= 1e-4,
                    "{name} cut {i} r={r}: max abs difference {diff}"
                );
            }
        }
    }
}

/// A (1,2,1) recurrent cut of a 4-layer synthetic model of `spec`'s family with a noisy adapter,
/// a byte-level tokenizer and some training text, in `d/rec`.
fn recurrent_cut(d: &Path, spec: &SynthSpec) {
    synth::write_hf(&d.join("src"), spec, 3).unwrap();
    synth::write_byte_tokenizer(&d.join("src")).unwrap();
    let o = surgery(
        d,
        &[
            "apply",
            "src",
            "--shape",
            "1,2,1",
            "--adapter-noise",
            "0.05",
            "--out",
            "rec",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text: Vec<String> = (0..40)
        .map(|i| format!("{i}. In the beginning God created the heaven and the earth."))
        .collect();
    std::fs::write(d.join("train.txt"), text.join("\n\n")).unwrap();
}

#[test]
fn every_qwen_parameter_gets_a_finite_nonzero_gradient() {
    // Per block: 4 matrices and 2 norms, plus the q/k/v bias (Qwen2) or the q and k norms (Qwen3).
    for (spec, per_block, extra) in [
        (SynthSpec::qwen2(4), 7, "attn.Wqkv.bias"),
        (SynthSpec::qwen3(4), 8, "attn.q_norm.weight"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        recurrent_cut(dir.path(), &spec);
        let source = SourceModel::open(&dir.path().join("rec")).unwrap();
        let mut model = Model::load(&source, &Device::Cpu).unwrap();
        let params = model.trainable(Train::All, false).unwrap();
        // wte, ln_f, lm_head, adapter, and 4 blocks.
        assert_eq!(params.len(), 4 + 4 * per_block, "{:?}", spec.family);
        assert_eq!(
            params.iter().filter(|p| p.name.ends_with(extra)).count(),
            4,
            "{extra}"
        );
        let ids: Vec<u32> = "In the beginning God created the heaven and the ea"
            .bytes()
            .map(u32::from)
            .collect();
        let inputs = Tensor::from_vec(ids[..32].to_vec(), (1, 32), &Device::Cpu).unwrap();
        let targets = Tensor::from_vec(ids[1..33].to_vec(), (1, 32), &Device::Cpu).unwrap();
        let out = model
            .forward_detached(&inputs, None, 3, 1, InitialState::Seeded(5), None)
            .unwrap();
        let grads = mean_cross_entropy(&out, &targets)
            .unwrap()
            .backward()
            .unwrap();
        for p in &params {
            let g = grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {}", p.name));
            let max = g.abs().unwrap().max_all().unwrap();
            let max = max.to_scalar::<f32>().unwrap();
            assert!(max.is_finite() && max > 0.0, "{}: {max}", p.name);
        }
    }
}

/// A few heal steps through the binary train the biases and per-head norms too.
#[test]
fn a_short_heal_of_a_qwen_cut_changes_its_biases_and_head_norms() {
    // (1,2,1): global block 1 is core_block.0, block 2 core_block.1.
    for (spec, role) in [
        (SynthSpec::qwen2(4), Role::Layer(1, LayerRole::QkvBias)),
        (SynthSpec::qwen3(4), Role::Layer(2, LayerRole::KNorm)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        recurrent_cut(d, &spec);
        let o = surgery(
            d,
            &[
                "heal",
                "rec",
                "--data",
                "train.txt",
                "--out",
                "healed",
                "--steps",
                "3",
                "--seq-len",
                "32",
                "--batch",
                "2",
                "--max-mean-recurrence",
                "2",
                "--checkpoint-every",
                "0",
                "-q",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let read = |dir: &str| {
            let files = SourceModel::open(&d.join(dir)).unwrap();
            let t = files
                .tensor(role)
                .unwrap_or_else(|| panic!("{dir}: no {role}"));
            files.read_f32(t).unwrap()
        };
        let (before, after) = (read("rec"), read("healed"));
        assert_eq!(before.len(), after.len());
        assert!(before != after, "{role} did not train");
    }
}

#[test]
fn inspect_and_plan_name_the_family() {
    for (name, family) in FAMILIES {
        let Some(src) = golden_dir(name) else { return };
        let work = tempfile::tempdir().unwrap();
        let o = surgery(work.path(), &["inspect", src.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let line = stdout(&o)
            .lines()
            .find(|l| l.starts_with("family"))
            .map(str::to_string);
        assert_eq!(line, Some(format!("family      {family}")));
        // The cost model counts what is stored: the biases and per-head norms included.
        let stored: usize = load_tensors(&src.join("model.safetensors"))
            .values()
            .map(Tensor::elem_count)
            .sum();
        let total = stored.to_string();
        let total = total
            .as_bytes()
            .rchunks(3)
            .rev()
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(",");
        assert!(
            stdout(&o).contains(&format!("parameters  {total} total")),
            "{name}: {}",
            stdout(&o)
        );
        let o = surgery(
            work.path(),
            &[
                "plan",
                src.to_str().unwrap(),
                "--shape",
                "2,2,2",
                "--out",
                "plan.json",
                "-q",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let plan: Value =
            serde_json::from_slice(&std::fs::read(work.path().join("plan.json")).unwrap()).unwrap();
        assert_eq!(plan["config"]["block_type"], family);
        assert_eq!(plan["source"]["family"], family);
        common::validate_against_schema(&work.path().join("plan.json"), "plan");
    }
}

#[test]
fn a_static_export_keeps_the_family_and_the_logits() {
    for (name, family) in FAMILIES {
        let Some(src) = golden_dir(name) else { return };
        let work = tempfile::tempdir().unwrap();
        let o = surgery(
            work.path(),
            &[
                "export",
                "safetensors",
                src.to_str().unwrap(),
                "--out",
                "out",
                "-q",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let config: Value =
            serde_json::from_slice(&std::fs::read(work.path().join("out/config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], family);
        let arch = format!("{}ForCausalLM", family.replace('q', "Q"));
        assert_eq!(config["architectures"], serde_json::json!([arch]));
        let g = golden(&src);
        let exported = SourceModel::open(&work.path().join("out")).unwrap();
        let model = Model::load(&exported, &Device::Cpu).unwrap();
        let diff = max_abs_diff(&logits(&model, &golden_ids(&g), 1), &g["logits"]);
        assert!(diff <= 1e-4, "{name}: {diff}");
    }
}

#[test]
fn gguf_export_of_a_qwen_model_is_refused_naming_the_family() {
    for (name, family) in FAMILIES {
        let Some(src) = golden_dir(name) else { return };
        let work = tempfile::tempdir().unwrap();
        let want = format!("GGUF export of {family} blocks is not supported");
        let src = src.to_str().unwrap();
        assert_refused(
            work.path(),
            &["export", "gguf", src, "--out", "x.gguf"],
            &want,
        );
        let o = surgery(
            work.path(),
            &["apply", src, "--shape", "2,2,2", "--out", "rec", "-q"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert_refused(
            work.path(),
            &["export", "gguf", "rec", "--out", "y.gguf"],
            &want,
        );
    }
}

/// Element `i` of a parameter's values, in f64.
fn element(var: &candle_core::Var, i: usize) -> f64 {
    let v = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    v[i]
}

/// Sets element `i` of a parameter.
fn set_element(var: &candle_core::Var, i: usize, value: f64) {
    let mut v = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    v[i] = value;
    let t = Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap();
    var.set(&t).unwrap();
}

/// In f64, the gradients of the q/k/v bias and of the per-head q/k norms (the fused ops'
/// backward included) agree with central differences of the loss.
#[test]
fn qwen_gradients_agree_with_finite_differences_in_f64() {
    for (spec, names) in [
        (
            SynthSpec::qwen2(4),
            vec!["transformer.core_block.0.attn.Wqkv.bias"],
        ),
        (
            SynthSpec::qwen3(4),
            vec![
                "transformer.core_block.1.attn.q_norm.weight",
                "transformer.prelude.0.attn.k_norm.weight",
            ],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        recurrent_cut(dir.path(), &spec);
        let source = SourceModel::open(&dir.path().join("rec")).unwrap();
        let mut model = Model::load(&source, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let params = model.trainable(Train::All, false).unwrap();
        let ids: Vec<u32> = "And God said, Let there be light: and there was light. And God"
            .bytes()
            .map(u32::from)
            .collect();
        let inputs = Tensor::from_vec(ids[..32].to_vec(), (1, 32), &Device::Cpu).unwrap();
        let targets = Tensor::from_vec(ids[1..33].to_vec(), (1, 32), &Device::Cpu).unwrap();
        let loss = |model: &Model| {
            let out = model
                .forward_detached(&inputs, None, 2, 0, InitialState::Seeded(5), None)
                .unwrap();
            mean_cross_entropy(&out, &targets).unwrap()
        };
        let grads = loss(&model).backward().unwrap();
        let h = 1e-5;
        for name in names {
            let p = params.iter().find(|p| p.name == name).unwrap();
            let g = grads.get(p.var.as_tensor()).unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let mut order: Vec<usize> = (0..g.len()).collect();
            order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            for &i in &order[..3] {
                let w = element(&p.var, i);
                set_element(&p.var, i, w + h);
                let up = loss(&model).to_scalar::<f64>().unwrap();
                set_element(&p.var, i, w - h);
                let down = loss(&model).to_scalar::<f64>().unwrap();
                set_element(&p.var, i, w);
                let numeric = (up - down) / (2.0 * h);
                let rel = (numeric - g[i]).abs() / g[i].abs().max(1e-12);
                eprintln!("{name}[{i}]: analytic {:.6e}, numeric {numeric:.6e}", g[i]);
                assert!(rel < 1e-3, "{name}[{i}]: {} vs {numeric}", g[i]);
            }
        }
    }
}
