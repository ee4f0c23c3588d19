//! The runtime against logits nobody here computed: Hugging Face transformers' Llama on the tiny
//! golden models (plain and with tied embeddings and llama3 RoPE scaling), and the paper's own
//! modeling code on their recurrent cuts at r = 1, 2, 4 with a non-trivial adapter.

mod common;

use std::path::PathBuf;

use candle_core::Device;
use common::{golden_ids, load_tensors, max_abs_diff};
use surgery::model::{InitialState, Model};
use surgery::source::SourceModel;

fn golden_dir(name: &str) -> Option<PathBuf> {
    let path = common::root().join("tests/golden").join(name);
    if path.is_dir() {
        Some(path)
    } else {
        eprintln!("NOTICE: skipping: {} is missing", path.display());
        None
    }
}

#[test]
fn static_models_match_transformers() {
    for name in ["tiny-llama", "tiny-llama3-tied"] {
        let Some(dir) = golden_dir(name) else { return };
        let g = load_tensors(&dir.join("golden_hf_logits.safetensors"));
        let model = Model::load(&SourceModel::open(&dir).unwrap(), &Device::Cpu).unwrap();
        let logits = model
            .forward(&golden_ids(&g), None, 1, InitialState::Seeded(0), None)
            .unwrap();
        let diff = max_abs_diff(&logits, &g["logits"]);
        eprintln!("{name}: max abs difference to transformers {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: max abs difference {diff}");
    }
}

#[test]
fn recurrent_models_match_the_papers_code_at_r_1_2_4() {
    for name in [
        "tiny-llama-recurrent-1-2-1",
        "tiny-llama-recurrent-2-2-2",
        "tiny-llama3-tied-recurrent-1-2-1",
        "tiny-llama3-tied-recurrent-2-2-2",
    ] {
        let Some(dir) = golden_dir(name) else { return };
        let g = load_tensors(&dir.join("golden_reference_logits.safetensors"));
        let model = Model::load(&SourceModel::open(&dir).unwrap(), &Device::Cpu).unwrap();
        let state = &g["input_states"];
        for r in [1, 2, 4] {
            let logits = model
                .forward(&golden_ids(&g), None, r, InitialState::Given(state), None)
                .unwrap();
            let diff = max_abs_diff(&logits, &g[&format!("logits_r{r}")]);
            eprintln!("{name} r={r}: max abs difference to the reference {diff:.2e}");
            assert!(diff <= 1e-4, "{name} r={r}: max abs difference {diff}");
        }
        // The golden values differ a lot between r, so agreement is not an accident.
        let spread = max_abs_diff(&g["logits_r1"], &g["logits_r4"]);
        assert!(spread > 1.0, "{name}: {spread}");
    }
}

/// Our own apply with the identity adapter reproduces the reference's identity-adapter logits,
/// which (for 2-2-2, no layer dropped) are transformers' logits of the source.
#[test]
fn applied_identity_cut_matches_the_reference_identity_logits() {
    for (source, cut, core, coda) in [
        ("tiny-llama", "tiny-llama-recurrent-1-2-1", "3..5", "5..6"),
        (
            "tiny-llama3-tied",
            "tiny-llama3-tied-recurrent-2-2-2",
            "2..4",
            "4..6",
        ),
    ] {
        let (Some(src), Some(golden_cut)) = (golden_dir(source), golden_dir(cut)) else {
            return;
        };
        let g = load_tensors(&golden_cut.join("golden_reference_logits.safetensors"));
        let work = tempfile::tempdir().unwrap();
        let prelude = if cut.ends_with("1-2-1") {
            "0..1"
        } else {
            "0..2"
        };
        let out = common::surgery(
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
                "rec",
                "-q",
            ],
        );
        assert!(out.status.success(), "{}", common::stderr(&out));
        let model = Model::load(
            &SourceModel::open(&work.path().join("rec")).unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        for r in [1, 3] {
            let logits = model
                .forward(&golden_ids(&g), None, r, InitialState::Seeded(7), None)
                .unwrap();
            // r = 3 too: with [0 | I] the state is discarded, so every r computes the pruned model.
            let diff = max_abs_diff(&logits, &g["logits_identity_r1"]);
            assert!(diff <= 1e-4, "{cut} r={r}: max abs difference {diff}");
        }
    }
}
