//! `surgery heal --lora RANK[:ALPHA]` (issue 17): at step 0 the model is the base model bit for
//! bit; after training, zeroing the updates gives the base back bit for bit (the bases never
//! moved) and merging them gives the unmerged model's logits; checkpoints hold only what trains,
//! the output has the input's tensors with the updates merged, and a resumed run ends bitwise
//! where an uninterrupted one does.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{assert_refused, metrics, noisy_recurrent_cut, stderr, surgery};
use serde_json::Value;
use surgery::formats::safetensors::SafetensorsFile;
use surgery::heal::optim::{Optimizer, ParamGroup};
use surgery::model::params::{Lora, Train};
use surgery::model::{InitialState, Model};
use surgery::source::SourceModel;

fn logits(model: &Model, ids: &Tensor) -> Vec<f32> {
    model
        .forward(ids, None, 3, InitialState::Seeded(7), None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn tokens(n: usize, seed: u32) -> Tensor {
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + seed * 11) % 256).collect();
    Tensor::from_vec(ids, (2, n / 2), &Device::Cpu).unwrap()
}

#[test]
fn the_updates_start_at_zero_leave_the_bases_alone_and_merge_exactly() {
    let dir = tempfile::tempdir().unwrap();
    noisy_recurrent_cut(dir.path(), 5);
    let source = SourceModel::open(&dir.path().join("rec")).unwrap();
    let mut model = Model::load(&source, &Device::Cpu).unwrap();
    let (ids, next) = (tokens(24, 1), tokens(24, 2));
    let base = logits(&model, &ids);

    let lora = Lora {
        rank: 4,
        alpha: 8.0,
    };
    let params = model.trainable_lora(Train::All, lora, 0, false).unwrap();
    // Four matrices in each of the 6 blocks, two factors each, and the adapter whole.
    assert_eq!(params.len(), 6 * 4 * 2 + 1);
    for p in &params {
        assert!(
            p.name.ends_with(".lora_a")
                || p.name.ends_with(".lora_b")
                || p.name == "transformer.adapter.weight",
            "{} trains",
            p.name
        );
    }
    assert_eq!(logits(&model, &ids), base, "step 0 is not the base model");

    let vars = params
        .iter()
        .map(|p| (p.name.clone(), p.var.clone()))
        .collect();
    let mut group = ParamGroup::adamw("all", vars);
    group.lr = 1e-2;
    let mut optimizer = Optimizer::new(vec![group]).unwrap();
    for step in 0..5 {
        let loss = model
            .loss(&ids, &next, 3, 1, InitialState::Seeded(step))
            .unwrap();
        optimizer.step(&loss.backward().unwrap(), 1.0).unwrap();
    }
    let trained = logits(&model, &ids);
    assert_ne!(trained, base, "five steps changed nothing");

    // B = 0 again (and the adapter as loaded): the bases give the base model's logits exactly.
    let saved: Vec<Tensor> = params
        .iter()
        .map(|p| p.var.as_tensor().copy().unwrap())
        .collect();
    let mut original = Model::load(&source, &Device::Cpu).unwrap();
    let adapter = original
        .named_tensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "transformer.adapter.weight")
        .unwrap()
        .1;
    for p in &params {
        if p.name.ends_with(".lora_b") {
            p.var.set(&p.var.as_tensor().zeros_like().unwrap()).unwrap();
        } else if !p.name.ends_with(".lora_a") {
            p.var.set(&adapter).unwrap();
        }
    }
    assert_eq!(logits(&model, &ids), base, "a frozen base moved");
    for (p, v) in params.iter().zip(&saved) {
        p.var.set(v).unwrap();
    }
    assert_eq!(logits(&model, &ids), trained);

    // Merged (what the written checkpoint holds): the unmerged logits within 1e-5.
    let merged_weights = model.named_tensors().unwrap();
    assert!(merged_weights.iter().all(|(n, _)| !n.contains("lora")));
    let merged = logits(&model, &ids);
    let scale = trained.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = merged
        .iter()
        .zip(&trained)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-5 * scale,
        "merged differs by {diff:e} (scale {scale:e})"
    );
}

fn train_text(d: &Path) {
    let line = "And God said, Let there be light: and there was light. And God saw the light.";
    let text: Vec<String> = (0..30).map(|i| format!("{i}. {line}")).collect();
    std::fs::write(d.join("train.txt"), text.join("\n\n")).unwrap();
}

fn heal_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "heal",
        "rec",
        "--data",
        "train.txt",
        "--out",
        out,
        "--seq-len",
        "24",
        "--batch",
        "2",
        "--max-mean-recurrence",
        "3",
        "--holdout",
        "0",
        "--lr",
        "0.01",
        "-q",
    ];
    args.extend_from_slice(extra);
    args
}

fn heal(d: &Path, out: &str, extra: &[&str]) {
    let args = heal_args(out, extra);
    let o = surgery(d, &args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
}

fn names(path: &Path) -> BTreeSet<String> {
    SafetensorsFile::open(path)
        .unwrap()
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .collect()
}

fn bytes_of(path: &Path, name: &str) -> Vec<u8> {
    let f = SafetensorsFile::open(path).unwrap();
    let t = f.tensors.iter().find(|t| t.name == name).unwrap();
    f.bytes(t).to_vec()
}

fn first_loss(d: &Path, run: &str) -> Value {
    metrics(&d.join(run))[0]["loss"].clone()
}

#[test]
fn a_lora_heal_checkpoints_what_trains_merges_on_output_and_resumes_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    noisy_recurrent_cut(d, 6);
    train_text(d);
    heal(
        d,
        "lora",
        &["--lora", "4:8", "--steps", "6", "--checkpoint-every", "3"],
    );
    heal(d, "full", &["--steps", "1", "--checkpoint-every", "0"]);
    // The same first batch, the same model at step 0.
    assert_eq!(first_loss(d, "lora"), first_loss(d, "full"));

    let ckpt = d.join("lora.checkpoints/step-000003");
    let saved = names(&ckpt.join("weights.safetensors"));
    assert_eq!(saved.len(), 6 * 4 * 2 + 1);
    assert!(saved.contains("transformer.adapter.weight"));
    assert!(saved
        .iter()
        .all(|n| n.contains(".lora_") || n.contains("adapter")));

    // The output: the input's tensors, the block matrices merged, everything else as it was.
    let (input, output) = (
        d.join("rec/model.safetensors"),
        d.join("lora/model.safetensors"),
    );
    assert_eq!(names(&input), names(&output));
    for name in names(&input) {
        let same = bytes_of(&input, &name) == bytes_of(&output, &name);
        let trained = name.contains("Wqkv")
            || name.contains("attn.proj")
            || name.contains("mlp")
            || name.contains("adapter");
        assert_eq!(same, !trained, "{name}: changed {}", !same);
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(d.join("lora/config.json")).unwrap()).unwrap();
    assert_eq!(
        config["surgery"]["heal"]["config"]["lora"],
        serde_json::json!({"rank": 4, "alpha": 8.0})
    );
    // The paper's LoRA healing runs AdamW alone: --lora's default optimizer.
    assert_eq!(config["surgery"]["heal"]["config"]["optimizer"], "adamw");

    // Resumed from step 3 after a crash: the same bytes as the uninterrupted run.
    heal(
        d,
        "part",
        &["--lora", "4:8", "--steps", "6", "--checkpoint-every", "3"],
    );
    std::fs::remove_dir_all(d.join("part")).unwrap();
    let ckpt = d.join("part.checkpoints/step-000003");
    let o = surgery(d, &["heal", "--resume", ckpt.to_str().unwrap(), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        std::fs::read(&output).unwrap() == std::fs::read(d.join("part/model.safetensors")).unwrap()
    );
}

#[test]
fn lora_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    noisy_recurrent_cut(d, 7);
    train_text(d);
    for (extra, want) in [
        (
            &["--lora", "0"][..],
            "RANK must be a whole number of at least 1",
        ),
        (&["--lora", "4:-1"], "ALPHA must be a positive number"),
        (
            &["--lora", "four"],
            "RANK must be a whole number of at least 1",
        ),
        (
            &["--lora", "4", "--train", "adapter"],
            "--train adapter trains none",
        ),
        (
            &["--lora", "4", "--init", "random"],
            "--init random redraws them",
        ),
        (
            &["--lora", "65"],
            "--lora 65: the rank exceeds the hidden size 64",
        ),
    ] {
        assert_refused(d, &heal_args("out", extra), want);
    }
}
