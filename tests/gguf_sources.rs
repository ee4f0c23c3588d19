//! GGUF sources made by llama.cpp's own converter (tests/data/gguf/, see its README): a Llama-3
//! model with `rope_freqs`, whose scaling is read back from the stored divisors, and an OLMo-2
//! model, each against its safetensors twin and transformers' logits; and Q2_K / Q3_K blocks
//! against the `gguf` package's dequantization.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{golden_ids, load_tensors, max_abs_diff};
use surgery::formats::gguf::{dequantize, GgufFile};
use surgery::model::{InitialState, Model};
use surgery::source::SourceModel;

fn data(name: &str) -> PathBuf {
    common::root().join("tests/data/gguf").join(name)
}

/// The logits of the model at `path` for `ids`.
fn logits(path: &Path, ids: &Tensor) -> Tensor {
    let source = SourceModel::open(path).unwrap();
    let model = Model::load(&source, &Device::Cpu).unwrap();
    model
        .forward(ids, None, 1, InitialState::Seeded(0), None)
        .unwrap()
}

/// The GGUF `gguf`, its safetensors twin `twin` and transformers' logits of the twin (`golden`)
/// agree within 1e-4; returns (GGUF vs twin, GGUF vs transformers).
fn assert_same_logits(gguf: &Path, twin: &Path, golden_file: &Path) -> (f32, f32) {
    let g = load_tensors(golden_file);
    let ids = golden_ids(&g);
    let from_gguf = logits(gguf, &ids);
    let from_twin = logits(twin, &ids);
    let twin_diff = max_abs_diff(&from_gguf, &from_twin);
    let hf_diff = max_abs_diff(&from_gguf, &g["logits"]);
    eprintln!(
        "{}: max abs difference {twin_diff:.2e} to the safetensors twin, {hf_diff:.2e} to \
         transformers",
        gguf.display()
    );
    assert!(twin_diff <= 1e-4, "{}: {twin_diff}", gguf.display());
    assert!(hf_diff <= 1e-4, "{}: {hf_diff}", gguf.display());
    // The logits are far from zero, so agreement is not an accident of a dead model.
    let spread = g["logits"].abs().unwrap().max_all().unwrap();
    assert!(spread.to_scalar::<f32>().unwrap() > 0.5);
    (twin_diff, hf_diff)
}

#[test]
fn llama3_gguf_with_rope_freqs_reads_back_its_scaling_and_logits() {
    let gguf = data("tiny-llama3-tied.f32.gguf");
    let twin = common::root().join("tests/golden/tiny-llama3-tied");
    let from_gguf = SourceModel::open(&gguf).unwrap();
    let from_twin = SourceModel::open(&twin).unwrap();
    // factor 8, low 1, high 4, original context 32: the twin's own parameters.
    assert_eq!(from_gguf.config.rope_scaling, from_twin.config.rope_scaling);
    assert!(from_gguf.config.tied);
    assert_same_logits(&gguf, &twin, &twin.join("golden_hf_logits.safetensors"));
}

#[test]
fn olmo2_gguf_reads_back_as_olmo2_with_its_logits() {
    let gguf = data("tiny-olmo2.f32.gguf");
    let twin = data("tiny-olmo2");
    let source = SourceModel::open(&gguf).unwrap();
    assert_eq!(
        source.config.family,
        surgery::formats::hf_config::Family::Olmo2
    );
    assert_eq!(source.config, SourceModel::open(&twin).unwrap().config);
    // No row of q or k is permuted (llama.cpp's converter keeps OLMo-2's rows).
    assert!(source.tensors.values().all(|t| t.unpermute_heads.is_none()));
    assert_same_logits(&gguf, &twin, &twin.join("golden_hf_logits.safetensors"));
}

/// `bytes` of a GGUF with rope_freqs value `index` replaced by `value`.
fn with_rope_freq(path: &Path, index: usize, value: f32) -> Vec<u8> {
    let file = GgufFile::open(path).unwrap();
    let info = file.tensor("rope_freqs.weight").unwrap();
    let at = usize::try_from(info.offset).unwrap() + 4 * index;
    let mut bytes = std::fs::read(path).unwrap();
    assert_eq!(
        bytes[at..at + 4],
        8f32.to_le_bytes(),
        "a long-wavelength divisor"
    );
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    bytes
}

#[test]
fn a_tampered_rope_freqs_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = data("tiny-llama3-tied.f32.gguf");
    // [1, 3.2995, 8, 8, ...]: a divisor of 5 between 3.3 and 8 fits no Llama-3 band, and neither
    // does a 7 among the 8s.
    for (index, value) in [(2, 5.0), (7, 7.0)] {
        std::fs::write(
            dir.path().join("t.gguf"),
            with_rope_freq(&src, index, value),
        )
        .unwrap();
        common::assert_refused(
            dir.path(),
            &["inspect", "t.gguf"],
            "rope_freqs.weight: no Llama-3 RoPE scaling",
        );
        common::assert_refused(
            dir.path(),
            &["apply", "t.gguf", "--shape", "2,2,2", "--out", "o"],
            "rope_freqs.weight",
        );
    }
}

/// `surgery args` in `dir`, which must succeed; its stdout.
fn run(dir: &Path, args: &[&str]) -> String {
    let out = common::surgery(dir, args);
    assert!(out.status.success(), "{args:?}: {}", common::stderr(&out));
    common::stdout(&out)
}

/// (loss, tokens scored) of each row of `surgery eval MODEL --json` on tests/data/docs.jsonl.
fn eval_rows(dir: &Path, model: &str, recurrence: &str) -> Vec<(f64, u64)> {
    let docs = common::root().join("tests/data/docs.jsonl");
    let args = [
        "eval",
        model,
        "--data",
        docs.to_str().unwrap(),
        "-c",
        "32",
        "--recurrence",
        recurrence,
        "--json",
        "-q",
    ];
    let json: serde_json::Value = serde_json::from_str(&run(dir, &args)).unwrap();
    json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["loss"].as_f64().unwrap(), r["tokens"].as_u64().unwrap()))
        .collect()
}

#[test]
fn apply_and_eval_run_from_the_llama3_gguf() {
    let gguf = data("tiny-llama3-tied.f32.gguf");
    let twin = common::root().join("tests/golden/tiny-llama3-tied");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (from, out) in [(&gguf, "from-gguf"), (&twin, "from-twin")] {
        identity_cut(d, from, "2,2,2", out);
    }
    // The same cut, whichever file it came from: the very same weights, and the same scaling.
    let read = |out: &str, file: &str| std::fs::read(d.join(out).join(file)).unwrap();
    assert!(read("from-gguf", "model.safetensors") == read("from-twin", "model.safetensors"));
    let scaling = |out: &str| {
        let config: serde_json::Value = serde_json::from_slice(&read(out, "config.json")).unwrap();
        config["rope_scaling"].clone()
    };
    assert_eq!(scaling("from-gguf"), scaling("from-twin"));
    assert_eq!(scaling("from-gguf")["original_max_position_embeddings"], 32);
    // The cut (identity adapter, no layer dropped) computes the source at any r; the GGUF's own
    // tokenizer, which the cut carries, tokenizes the text for both.
    let source = eval_rows(d, gguf.to_str().unwrap(), "1");
    let cut = eval_rows(d, "from-gguf", "1,2");
    assert_eq!(source.len(), 1);
    assert!(source[0].0.is_finite() && source[0].0 > 0.0);
    for row in &cut {
        assert!((row.0 - source[0].0).abs() < 1e-4, "{cut:?} vs {source:?}");
        assert_eq!(row.1, source[0].1);
    }
}

#[test]
fn eval_runs_from_the_olmo2_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let olmo2 = eval_rows(d, data("tiny-olmo2.f32.gguf").to_str().unwrap(), "1");
    let llama3 = eval_rows(d, data("tiny-llama3-tied.f32.gguf").to_str().unwrap(), "1");
    // Both files carry the same tokenizer: the same tokens are scored, by different models.
    assert_eq!(olmo2[0].1, llama3[0].1);
    assert!(olmo2[0].0.is_finite() && olmo2[0].0 > 0.0 && olmo2[0].0 != llama3[0].0);
}

#[test]
fn our_own_stock_export_with_llama3_scaling_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = surgery::synth::SynthSpec {
        llama3_rope: true,
        ..surgery::synth::SynthSpec::llama(2)
    };
    surgery::synth::write_hf(&d.join("m"), &spec, 5).unwrap();
    run(
        d,
        &[
            "export", "gguf", "m", "--type", "f32", "--out", "m.gguf", "-q",
        ],
    );
    let back = SourceModel::open(&d.join("m.gguf")).unwrap();
    assert!(back.config.rope_scaling.is_some());
    assert_eq!(back.config.rope_scaling, spec.config().rope_scaling);
}

#[test]
fn q2_k_and_q3_k_decode_as_the_gguf_package_does_bit_for_bit() {
    let file = GgufFile::open(data("q2k-q3k.gguf")).unwrap();
    for (name, dtype) in [
        ("q2_k", surgery::dtype::DType::Q2K),
        ("q3_k", surgery::dtype::DType::Q3K),
    ] {
        let info = file.tensor(name).unwrap();
        assert_eq!((info.dtype, info.shape.clone()), (dtype, vec![8, 512]));
        let ours = dequantize(dtype, file.bytes(info), info.n_elements()).unwrap();
        let reference = file.tensor(&format!("{name}.dequant")).unwrap();
        let theirs = dequantize(
            reference.dtype,
            file.bytes(reference),
            reference.n_elements(),
        )
        .unwrap();
        assert_eq!(ours.len(), 8 * 512);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours), bits(&theirs), "{name}");
        // Random blocks decode to a spread of values, not a constant.
        assert!(ours.iter().any(|v| *v != ours[0]));
        // Read only: `export gguf --type` does not take them.
        let err = name.parse::<surgery::export::QuantType>().unwrap_err();
        assert!(err.starts_with("unknown --type"), "{err}");
    }
}

#[test]
fn a_q3_k_gguf_applies_as_its_dequantized_values() {
    use surgery::dtype::DType as Stored;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Rows of 256 so the k-quants apply to every matrix.
    let spec = surgery::synth::SynthSpec {
        hidden: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        ffn: 512,
        ..surgery::synth::SynthSpec::llama(3)
    };
    surgery::synth::write_gguf(&d.join("m.gguf"), &spec, 3, Stored::Q3K).unwrap();
    let source = SourceModel::open(&d.join("m.gguf")).unwrap();
    assert!(source.dtype_histogram().contains_key(&Stored::Q3K));
    run(
        d,
        &["apply", "m.gguf", "--shape", "1,1,1", "--out", "o", "-q"],
    );
    // The cut's embedding is the source's, dequantized exactly (to F32).
    let embed = source.tensor(surgery::arch::Role::Embed).unwrap();
    let want = source.read_f32(embed).unwrap();
    let out = SourceModel::open(&d.join("o")).unwrap();
    let t = out.tensor(surgery::arch::Role::Embed).unwrap();
    assert_eq!(t.dtype, Stored::F32);
    let got = out.read_f32(t).unwrap();
    assert!(want.iter().any(|v| *v != want[0]));
    assert_eq!(got, want);
}

#[test]
fn apply_runs_from_the_olmo2_gguf() {
    let gguf = data("tiny-olmo2.f32.gguf");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (from, out) in [
        (gguf.clone(), "from-gguf"),
        (data("tiny-olmo2"), "from-twin"),
    ] {
        identity_cut(d, &from, "1,1,1", out);
    }
    let weights = |out: &str| std::fs::read(d.join(out).join("model.safetensors")).unwrap();
    assert!(weights("from-gguf") == weights("from-twin"));
    // No layer dropped and the identity adapter: the cut scores the text as the source does.
    let source = eval_rows(d, gguf.to_str().unwrap(), "1");
    for row in eval_rows(d, "from-gguf", "1,2") {
        assert!((row.0 - source[0].0).abs() < 1e-4, "{row:?} vs {source:?}");
        assert_eq!(row.1, source[0].1);
    }
}

/// `apply` of `from` at `shape` into `out` with the identity adapter and a zero state, whose
/// recurrent model is the pruned source at every r.
fn identity_cut(d: &Path, from: &Path, shape: &str, out: &str) {
    let args = [
        "apply",
        from.to_str().unwrap(),
        "--shape",
        shape,
        "--adapter-init",
        "identity",
        "--state-init",
        "zero",
        "--out",
        out,
        "-q",
    ];
    run(d, &args);
}
