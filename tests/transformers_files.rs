//! Issue 20: every recurrent output loads in Hugging Face transformers. `apply`, `heal` and
//! `export safetensors` write the Python files of integrations/transformers/ beside config.json,
//! byte for byte, and name them in its `auto_map`; config.json holds no absolute local path (the
//! source is recorded by name and by its files' relative paths and sha256), which `heal --distill`
//! still compares a teacher with. The losses transformers computes from these files are checked
//! against `surgery eval` by scripts/check-transformers.sh (it needs torch).

mod common;

use std::path::Path;

use common::{stderr, surgery};
use serde_json::{json, Value};
use surgery::formats::hf_config::TRANSFORMERS_FILES;

const TEXT: &str = "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep.";

fn ok(dir: &Path, args: &[&str]) {
    let o = surgery(dir, args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
}

fn config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// Every string in `v` that looks like an absolute path, with where it is.
fn absolute_paths(v: &Value, at: &str, found: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            let b = s.as_bytes();
            let drive = b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':';
            if s.starts_with('/') || s.starts_with('\\') || drive {
                found.push(format!("{at} = {s}"));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                absolute_paths(item, &format!("{at}[{i}]"), found);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                absolute_paths(item, &format!("{at}.{k}"), found);
            }
        }
        _ => {}
    }
}

/// `dir` holds the transformers files, byte-identical to the repository's (which the binary
/// embeds), listed in its manifest and named by its config's `auto_map`; its config holds no
/// absolute path; `verify` passes where there is a manifest.
fn assert_loadable(dir: &Path) {
    let repo = common::root().join("integrations/transformers");
    for (name, text) in TRANSFORMERS_FILES {
        let written = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(written, std::fs::read(repo.join(name)).unwrap(), "{name}");
        assert_eq!(written, text.as_bytes(), "{name}");
    }
    let config = config(dir);
    assert_eq!(
        config["auto_map"],
        json!({
            "AutoConfig": "configuration_huginn_raven.RavenConfig",
            "AutoModelForCausalLM": "modeling_huginn_raven.RavenForCausalLM",
        }),
        "{}",
        dir.display()
    );
    let mut found = Vec::new();
    absolute_paths(&config, "config", &mut found);
    assert!(found.is_empty(), "{}: {found:?}", dir.display());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let listed: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    for (name, _) in TRANSFORMERS_FILES {
        assert!(listed.contains(&name), "{name} not in {listed:?}");
    }
    ok(dir, &["verify", ".", "-q"]);
}

/// The synthetic source `m`, its (2,2,2) cut `rec` applied from its absolute path (which config.json
/// used to record), training text.
fn setup(d: &Path) {
    let m = d.join("m");
    surgery::synth::write_hf(&m, &surgery::synth::SynthSpec::llama(6), 5).unwrap();
    surgery::synth::write_byte_tokenizer(&m).unwrap();
    let text: Vec<String> = (0..30).map(|i| format!("{i}. {TEXT}")).collect();
    std::fs::write(d.join("train.txt"), text.join("\n\n")).unwrap();
    let m = m.to_str().unwrap();
    let out = d.join("rec");
    ok(
        d,
        &[
            "apply",
            m,
            "--shape",
            "2,2,2",
            "--adapter-noise",
            "0.3",
            "--out",
            out.to_str().unwrap(),
            "-q",
        ],
    );
}

fn heal_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "heal",
        "rec",
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "1",
        "--seq-len",
        "24",
        "--batch",
        "2",
        "--max-mean-recurrence",
        "2",
        "--holdout",
        "0.1",
        "--eval-tokens",
        "48",
        "--checkpoint-every",
        "0",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn apply_records_the_source_by_name_and_relative_files_and_ships_the_modeling_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let rec = d.join("rec");
    assert_loadable(&rec);
    let source = &config(&rec)["surgery"]["source"];
    assert_eq!(source["name"], "m");
    assert!(
        source.get("path").is_none() && source.get("root").is_none(),
        "{source}"
    );
    let names: Vec<&str> = source["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let sha = surgery::manifest::sha256_file(&d.join("m/model.safetensors"), |_| {}).unwrap();
    assert_eq!(source["files"][1]["sha256"], sha.as_str());
    common::validate_against_schema(&rec.join("config.json"), "recurrent-config");
    // plan.json keeps the absolute paths: apply reads its source from there.
    let plan: Value =
        serde_json::from_slice(&std::fs::read(rec.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["source"]["root"], d.join("m").to_str().unwrap());
}

#[test]
fn heal_and_export_safetensors_ship_them_too_and_static_exports_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let data = d.join("train.txt");
    let healed = d.join("healed");
    ok(
        d,
        &heal_args(data.to_str().unwrap(), healed.to_str().unwrap(), &["-q"]),
    );
    assert_loadable(&healed);
    let recorded = &config(&healed)["surgery"]["heal"]["config"];
    assert_eq!(recorded["data"], json!(["train.txt"]), "{recorded}");
    assert_eq!(recorded["out"], "healed");
    common::validate_against_schema(&healed.join("config.json"), "recurrent-config");

    ok(
        d,
        &["export", "safetensors", "healed", "--out", "exported", "-q"],
    );
    assert_loadable(&d.join("exported"));
    // Through our recurrent GGUF and back.
    ok(
        d,
        &[
            "export",
            "gguf",
            "healed",
            "--type",
            "f32",
            "--out",
            "healed.gguf",
            "-q",
        ],
    );
    ok(
        d,
        &[
            "export",
            "safetensors",
            "healed.gguf",
            "--out",
            "from-gguf",
            "-q",
        ],
    );
    assert_loadable(&d.join("from-gguf"));

    // A static model is transformers' own Llama: no files of ours, no auto_map.
    ok(d, &["export", "safetensors", "m", "--out", "static", "-q"]);
    for (name, _) in TRANSFORMERS_FILES {
        assert!(!d.join("static").join(name).exists(), "{name}");
    }
    assert!(config(&d.join("static")).get("auto_map").is_none());
}

#[test]
fn distillation_still_tells_the_recorded_source_from_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let m = d.join("m");
    let o = surgery(
        d,
        &heal_args(
            "train.txt",
            "from-source",
            &["--distill", m.to_str().unwrap()],
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("is not the source"), "{}", stderr(&o));
    let other = d.join("other");
    surgery::synth::write_hf(&other, &surgery::synth::SynthSpec::llama(6), 9).unwrap();
    surgery::synth::write_byte_tokenizer(&other).unwrap();
    let o = surgery(
        d,
        &heal_args("train.txt", "from-other", &["--distill", "other"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "note: the teacher other is not the source this checkpoint was cut from (m, as its \
             config.json records it)"
        ),
        "{}",
        stderr(&o)
    );
}
