//! Helpers shared by the integration tests: the real assets fetched by scripts/fetch-assets.sh,
//! the Python reference tools, and running the built binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True when the README's test command runs us: then a missing asset is a failure, not a skip.
fn assets_required() -> bool {
    std::env::var_os("SURGERY_REQUIRE_ASSETS").is_some_and(|v| v == "1")
}

fn missing(what: &str) -> Option<PathBuf> {
    assert!(
        !assets_required(),
        "{what} is missing although SURGERY_REQUIRE_ASSETS=1: run scripts/fetch-assets.sh"
    );
    eprintln!(
        "NOTICE: skipping: {what} is missing (run scripts/fetch-assets.sh, or scripts/test.sh)"
    );
    None
}

/// A file under .cache/assets/, or None (with a visible notice) when it was not fetched.
pub fn asset(name: &str) -> Option<PathBuf> {
    let path = root().join(".cache/assets").join(name);
    if path.is_file() {
        Some(path)
    } else {
        missing(&format!(".cache/assets/{name}"))
    }
}

pub fn smollm2() -> Option<PathBuf> {
    asset("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A Python interpreter with the `gguf` package (llama.cpp's reference reader) and numpy:
/// `$SURGERY_PYTHON`, else the venv made by scripts/fetch-assets.sh.
pub fn python_with_gguf() -> Option<PathBuf> {
    let candidates = std::env::var_os("SURGERY_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([root().join(".cache/venv/bin/python")]);
    for python in candidates {
        let ok = Command::new(&python)
            .args(["-c", "import gguf, numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(python);
        }
    }
    missing("a Python with the gguf package")
}

/// Runs the built `surgery` binary with `args` in `dir`.
pub fn surgery(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_surgery"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the surgery binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Names of the entries of `dir`, sorted: to assert that a failed command wrote nothing.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("readable dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Validates a JSON file with the Python `jsonschema` package against schemas/NAME.schema.json.
pub fn validate_against_schema(plan: &Path, name: &str) {
    let Some(python) = python_with_gguf() else {
        return;
    };
    // A .jsonl file is validated line by line.
    let script = "import json,sys,jsonschema\n\
                  s=json.load(open(sys.argv[1])); f=sys.argv[2]\n\
                  docs=[json.loads(l) for l in open(f) if l.strip()] if f.endswith('.jsonl') else [json.load(open(f))]\n\
                  jsonschema.Draft202012Validator.check_schema(s)\n\
                  [jsonschema.validate(p, s, cls=jsonschema.Draft202012Validator) for p in docs]\n";
    let schema = root().join(format!("schemas/{name}.schema.json"));
    let out = Command::new(python)
        .args(["-c", script])
        .arg(&schema)
        .arg(plan)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} does not match the schema: {}",
        plan.display(),
        stderr(&out)
    );
}

/// The lines of a heal run's `metrics.jsonl` in `dir`, parsed.
pub fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `surgery args` in `dir` and asserts a refusal: exit code 1, one line on stderr containing
/// `want`, no panic, and nothing written (the listing of `dir` unchanged).
pub fn assert_refused(dir: &Path, args: &[&str], want: &str) {
    let before = listing(dir);
    let out = surgery(dir, args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}\n  got: {err}\n  want: {want}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(
        !err.contains("RUST_BACKTRACE") && !err.contains("stack backtrace"),
        "{args:?}: {err}"
    );
    assert_eq!(listing(dir), before, "{args:?} wrote something");
}

/// A synthetic source of about 12 MB in `d/src` (8 layers at hidden 256 in BF16, vocabulary
/// 1024, a byte-level tokenizer): big enough that `apply` and `export` take measurable time.
pub fn medium_source(d: &Path, seed: u64) {
    let spec = surgery::synth::SynthSpec {
        hidden: 256,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        ffn: 640,
        vocab: 1024,
        dtype: surgery::dtype::DType::BF16,
        ..surgery::synth::SynthSpec::llama(8)
    };
    surgery::synth::write_hf(&d.join("src"), &spec, seed).unwrap();
    surgery::synth::write_byte_tokenizer(&d.join("src")).unwrap();
}

/// A synthetic 6-layer Llama with a byte-level tokenizer at `d/m` (weights from `seed`), and its
/// (2,2,2) cut at `d/rec` with a noisy adapter (`--adapter-noise 0.3`), so the state and r matter.
pub fn noisy_recurrent_cut(d: &Path, seed: u64) {
    let m = d.join("m");
    surgery::synth::write_hf(&m, &surgery::synth::SynthSpec::llama(6), seed)
        .expect("synthetic model");
    surgery::synth::write_byte_tokenizer(&m).expect("synthetic tokenizer");
    let args = [
        "apply",
        "m",
        "--shape",
        "2,2,2",
        "--adapter-noise",
        "0.3",
        "--out",
        "rec",
        "-q",
    ];
    let o = surgery(d, &args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
}

/// The tensors of a safetensors file (golden logits and their inputs), on the CPU.
pub fn load_tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

/// A golden file's `input_ids` (I64) as the u32 ids the model takes.
pub fn golden_ids(
    g: &std::collections::HashMap<String, candle_core::Tensor>,
) -> candle_core::Tensor {
    g["input_ids"].to_dtype(candle_core::DType::U32).unwrap()
}

/// max |a - b| over two f32 tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
