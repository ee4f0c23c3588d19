//! `surgery plan --calibrate` through the built binary (issue 10): an exact identity layer scores
//! zero block influence and is dropped first, scores are bitwise deterministic, the ranking's best
//! has the lowest perplexity and matches `surgery eval` of the same pruned model, `--pick best`
//! writes a plan `apply` accepts, and bad inputs are refused.

mod common;

use std::path::Path;

use common::{assert_refused, stderr, stdout, surgery, validate_against_schema};
use serde_json::Value;
use surgery::arch::{LayerRole, Naming, Role};
use surgery::formats::safetensors;
use surgery::synth::{self, SynthSpec};

/// The layer of the synthetic model whose output projections are zero: it computes x exactly.
const IDENTITY: usize = 2;

/// A 6-layer synthetic Llama with a byte-level tokenizer whose layer 2 has zero `o_proj` and
/// `down_proj` (so x + attn(x) + mlp(x) = x exactly), and a calibration text of 426 tokens.
fn setup(d: &Path) {
    let m = d.join("m");
    let spec = SynthSpec::llama(6);
    synth::write_hf(&m, &spec, 7).unwrap();
    synth::write_byte_tokenizer(&m).unwrap();
    let naming = Naming::HuggingFace(spec.family);
    let tensors: Vec<_> = spec
        .tensors(7)
        .into_iter()
        .map(|(role, shape, mut values)| {
            if matches!(role, Role::Layer(IDENTITY, LayerRole::O | LayerRole::Down)) {
                values.fill(0.0);
            }
            let bytes = spec.dtype.encode_f32(&values).unwrap();
            (naming.name(role).unwrap(), spec.dtype, shape, bytes)
        })
        .collect();
    safetensors::write_file(&m.join("model.safetensors"), &tensors).unwrap();
    let paragraph = "The quick brown fox jumps over the lazy dog, and the dog sleeps on.";
    let text: Vec<String> = (0..6).map(|i| format!("{i}. {paragraph}")).collect();
    std::fs::write(d.join("cal.txt"), text.join("\n\n")).unwrap();
}

const CALIBRATE: [&str; 6] = [
    "--calibrate",
    "cal.txt",
    "--calibrate-tokens",
    "400",
    "--calibrate-seq-len",
    "64",
];

fn plan_json(d: &Path, args: &[&str]) -> Value {
    let mut all = vec!["plan", "m"];
    all.extend_from_slice(args);
    all.extend_from_slice(&CALIBRATE);
    all.push("--json");
    let o = surgery(d, &all);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn an_identity_layer_has_zero_block_influence_and_is_dropped_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let v = plan_json(d, &["--shape", "2,2,1"]);
    let c = &v["calibration"];
    assert_eq!(c["tokens"], 400);
    // The subset (default 1024) is larger than the text: everything is measured on all tokens.
    assert_eq!(c["subset_tokens"], 400);
    let layers = c["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 6);
    for l in layers {
        let bi = f(&l["block_influence"]);
        if l["layer"] == IDENTITY {
            assert!(bi.abs() < 1e-6, "identity layer: block influence {bi}");
            assert_eq!(f(&l["relative_update"]), 0.0);
            // Without the identity layer the model computes exactly the same thing.
            assert_eq!(l["removal_perplexity"], c["source_subset_perplexity"]);
        } else {
            assert!(bi > 1e-3, "layer {}: block influence {bi}", l["layer"]);
            assert_ne!(l["removal_perplexity"], c["source_subset_perplexity"]);
        }
    }
    assert_eq!(c["drop_order"][0], IDENTITY);
    // The placement that drops exactly the identity layer is the source model itself. (It need
    // not rank first: on random weights, dropping another layer may well lower the perplexity.)
    let same = c["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["dropped"] == serde_json::json!(["2..3"]))
        .unwrap();
    assert_eq!(same["perplexity"], c["source_perplexity"]);
    assert_eq!(same["core_range"], "3..5");
    assert_eq!(same["placement"], "rule");
}

#[test]
fn scores_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let args = ["--shape", "2,2,1", "--calibrate-subset", "200"];
    let a = plan_json(d, &args);
    let b = plan_json(d, &args);
    // Bitwise: serde_json writes every f64 so that it reads back exactly.
    assert_eq!(a["calibration"].to_string(), b["calibration"].to_string());
    assert_eq!(a["calibration"]["subset_tokens"], 200);
}

#[test]
fn the_best_candidate_has_the_lowest_perplexity_and_pick_best_plans_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let v = plan_json(
        d,
        &[
            "--shape",
            "1,2,1",
            "--shape",
            "1,3,1",
            "--pick",
            "best",
            "--out",
            "plan.json",
        ],
    );
    let c = &v["calibration"];
    let candidates = c["candidates"].as_array().unwrap();
    // (1,2,1): cores 1..3, 2..4, 3..5 and the evenly spaced 1,4; (1,3,1): 1..4, 2..5 and 1,3,4.
    assert_eq!(candidates.len(), 7);
    let best = f(&candidates[0]["perplexity"]);
    for (i, cand) in candidates.iter().enumerate() {
        assert_eq!(cand["rank"], i + 1);
        assert!(best <= f(&cand["perplexity"]), "{cand}");
    }
    // The plan is the best placement a plan can hold; its file carries the scores.
    let pick = candidates
        .iter()
        .find(|c| c.get("core_range").is_some())
        .unwrap();
    assert_eq!(v["picked_rank"], pick["rank"]);
    assert_eq!(v["layers"]["core"], pick["core_range"]);
    assert_eq!(v["layers"]["prelude"], pick["prelude"]);
    let written: Value =
        serde_json::from_slice(&std::fs::read(d.join("plan.json")).unwrap()).unwrap();
    assert_eq!(written["layers"], v["layers"]);
    assert_eq!(written["calibration"], v["calibration"]);
    validate_against_schema(&d.join("plan.json"), "plan");

    // apply accepts it, and the recurrent model with its identity adapter has, at r = 1, the
    // perplexity the ranking measured (eval is an independent path: whole logits, no cache).
    let o = surgery(d, &["apply", "plan.json", "--out", "out", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let eval = |args: &[&str]| -> f64 {
        let mut all = vec!["eval"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[
            "--data",
            "cal.txt",
            "--seq-len",
            "64",
            "--max-tokens",
            "400",
            "--batch",
            "1",
            "--json",
        ]);
        let o = surgery(d, &all);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        f(&v["rows"][0]["perplexity"])
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * b;
    let applied = eval(&["out", "--recurrence", "1"]);
    assert!(
        close(applied, f(&pick["perplexity"])),
        "{applied} vs {pick}"
    );
    // A placement no plan holds is measured the same way: eval --layers of its layer list.
    let even = candidates
        .iter()
        .find(|c| c["placement"] == "evenly_spaced")
        .unwrap();
    let ranges: Vec<String> = even_layers(even)
        .iter()
        .map(|l| format!("{l}..{}", l + 1))
        .collect();
    let pruned = eval(&["m", "--layers", &ranges.join(",")]);
    assert!(close(pruned, f(&even["perplexity"])), "{pruned} vs {even}");
}

/// Source layers of a candidate's pruned model: prelude, core, coda.
fn even_layers(c: &Value) -> Vec<u64> {
    let range = |v: &Value| -> std::ops::Range<u64> {
        let (a, b) = v.as_str().unwrap().split_once("..").unwrap();
        a.parse().unwrap()..b.parse().unwrap()
    };
    let core = c["core"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap());
    range(&c["prelude"])
        .chain(core)
        .chain(range(&c["coda"]))
        .collect()
}

#[test]
fn the_terminal_shows_the_table_the_bars_and_the_ranking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let mut args = vec!["plan", "m", "--shape", "2,2,1"];
    args.extend_from_slice(&CALIBRATE);
    let o = surgery(d, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "400 tokens in windows of 64",
        "block influence",
        "drop order by block influence (ShortGPT, lowest first): 2, ",
        "rank  shape",
        "evenly spaced  2,4 *",
        "not contiguous",
        "shape   (2,2,1): prelude 0..2, core 3..5, coda 5..6",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    // The identity layer's row has an empty block-influence bar; the others are drawn in blocks.
    let row = out
        .lines()
        .find(|l| l.starts_with("    2  "))
        .unwrap_or_else(|| panic!("no row of layer 2 in\n{out}"));
    assert!(row.starts_with("    2  0.0000   "), "{row}");
    assert!(out.contains('█'));
}

#[test]
fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let cal = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut a = vec!["plan", "m", "--calibrate", "cal.txt"];
        a.extend_from_slice(extra);
        a
    };
    assert_refused(
        d,
        &[
            "plan",
            "m",
            "--shape",
            "2,2,1",
            "--calibrate",
            "missing.txt",
        ],
        "--calibrate: missing.txt: No such file or directory",
    );
    assert_refused(
        d,
        &cal(&["--shape", "2,2,1", "--calibrate-tokens", "100000"]),
        "--calibrate cal.txt: the text has 426 tokens, but --calibrate-tokens 100000 needs 100001",
    );
    assert_refused(
        d,
        &cal(&["--shape", "4,4,4"]),
        "--shape 4,4,4 needs 12 layers, but the model has 6",
    );
    assert_refused(
        d,
        &cal(&["--shape", "2,2,1", "--calibrate-tokens", "0"]),
        "must be at least 1",
    );
    assert_refused(
        d,
        &["plan", "m", "--shape", "2,2,1", "--pick", "best"],
        "--pick is an option of --calibrate FILE, which is not given",
    );
    assert_refused(
        d,
        &cal(&["--shape", "2,2,1", "--shape", "1,2,1", "--out", "p.json"]),
        "several --shape values: pass --pick best",
    );
    assert_refused(
        d,
        &cal(&["--shape", "2,2,1", "--shape", "1,2,1", "--core", "2..4"]),
        "give one --shape with them",
    );
    assert_refused(
        d,
        &["plan", "m", "--shape", "2,2,1", "--shape", "1,2,1"],
        "several shapes are for `surgery plan --calibrate FILE`",
    );
    assert_refused(
        d,
        &[
            "apply", "m", "--shape", "2,2,1", "--shape", "1,2,1", "--out", "o",
        ],
        "--shape is given 2 times",
    );
}
