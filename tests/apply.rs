//! `surgery apply` and `surgery verify` through the built binary: the real SmolLM2 cut, byte-exact
//! reproducibility, sharding, integrity checks, refusals, a SIGKILL halfway, a full disk.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{listing, stderr, stdout, surgery};
use serde_json::Value;
use surgery::arch::{LayerRole, Role};
use surgery::dtype::DType;
use surgery::source::SourceModel;
use surgery::synth::{self, SynthSpec};

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = surgery(dir, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn read(m: &SourceModel, role: Role) -> Vec<f32> {
    m.read_f32(m.tensor(role).unwrap_or_else(|| panic!("{role}")))
        .unwrap()
}

#[test]
fn smollm2_4_8_4_is_a_verified_recurrent_checkpoint_holding_the_source_values() {
    let Some(model) = common::smollm2() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    ok(
        dir.path(),
        &[
            "plan",
            model.to_str().unwrap(),
            "--shape",
            "4,8,4",
            "--out",
            "plan.json",
            "-q",
        ],
    );
    ok(dir.path(), &["apply", "plan.json", "--out", "rec", "-q"]);
    let info: Value = serde_json::from_str(&ok(dir.path(), &["inspect", "rec", "--json"])).unwrap();
    assert_eq!(info["recurrent"]["prelude"], 4);
    assert_eq!(info["recurrent"]["core"], 8);
    assert_eq!(info["recurrent"]["coda"], 4);
    assert_eq!(info["recurrent"]["adapter_max_abs_from_identity"], 0.0);
    assert!(ok(dir.path(), &["verify", "rec"]).contains("ok"));

    let src = SourceModel::open(&model).unwrap();
    let out = SourceModel::open(&dir.path().join("rec")).unwrap();
    let embed = read(&src, Role::Embed);
    assert_eq!(bits(&read(&out, Role::Embed)), bits(&embed));
    // The tied source's embeddings become the untied lm_head.
    assert_eq!(bits(&read(&out, Role::LmHead)), bits(&embed));
    assert_eq!(
        bits(&read(&out, Role::FinalNorm)),
        bits(&read(&src, Role::FinalNorm))
    );
    let source_layers: Vec<usize> = (0..4).chain(18..30).collect();
    for (slot, &layer) in source_layers.iter().enumerate() {
        let concat = |parts: &[LayerRole]| -> Vec<u32> {
            bits(
                &parts
                    .iter()
                    .flat_map(|&p| read(&src, Role::Layer(layer, p)))
                    .collect::<Vec<_>>(),
            )
        };
        use LayerRole::*;
        assert_eq!(
            bits(&read(&out, Role::Layer(slot, Qkv))),
            concat(&[Q, K, V]),
            "layer {layer} Wqkv"
        );
        assert_eq!(
            bits(&read(&out, Role::Layer(slot, GateUp))),
            concat(&[Gate, Up]),
            "layer {layer} fc"
        );
        for role in [AttnNorm, O, MlpNorm, Down] {
            assert_eq!(
                bits(&read(&out, Role::Layer(slot, role))),
                concat(&[role]),
                "layer {layer} {role:?}"
            );
        }
    }
    let config: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("rec/config.json")).unwrap())
            .unwrap();
    let plan_sha = surgery::manifest::sha256_file(&dir.path().join("plan.json"), |_| {}).unwrap();
    assert_eq!(config["surgery"]["plan_sha256"], plan_sha.as_str());
    assert_eq!(
        config["surgery"]["source"]["files"][0]["sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    common::validate_against_schema(&dir.path().join("rec/config.json"), "recurrent-config");
    common::validate_against_schema(&dir.path().join("rec/manifest.json"), "manifest");
    // The plan applied is kept byte for byte.
    assert_eq!(
        std::fs::read(dir.path().join("plan.json")).unwrap(),
        std::fs::read(dir.path().join("rec/plan.json")).unwrap()
    );
}

fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    listing(dir)
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap()))
        .collect()
}

#[test]
fn two_applies_are_byte_identical_and_sharding_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spec = SynthSpec {
        dtype: DType::BF16,
        tied: true,
        ..SynthSpec::llama(6)
    };
    synth::write_hf(&d.join("m"), &spec, 3).unwrap();
    std::fs::write(
        d.join("m/tokenizer_config.json"),
        r#"{"add_bos_token": true}"#,
    )
    .unwrap();
    let args = [
        "--shape",
        "2,2,2",
        "--adapter-init",
        "reference",
        "--seed",
        "9",
        "--max-shard-size",
        "300kB",
        "-q",
    ];
    ok(d, &[&["apply", "m", "--out", "a"][..], &args].concat());
    ok(d, &[&["apply", "m", "--out", "b"][..], &args].concat());
    assert_eq!(dir_bytes(&d.join("a")), dir_bytes(&d.join("b")));
    let names = listing(&d.join("a"));
    assert!(
        names.contains(&"model.safetensors.index.json".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"tokenizer_config.json".to_string()),
        "{names:?}"
    );
    let shards = names.iter().filter(|n| n.ends_with(".safetensors")).count();
    assert!(shards >= 3, "{names:?}");
    assert!(names.contains(&format!("model-00001-of-{shards:05}.safetensors")));
    ok(d, &["verify", "a"]);
    common::validate_against_schema(&d.join("a/config.json"), "recurrent-config");
    common::validate_against_schema(&d.join("a/manifest.json"), "manifest");
    let m = SourceModel::open(&d.join("a")).unwrap();
    assert_eq!(m.tensor(Role::Embed).unwrap().dtype, DType::BF16);
    // Every shard says format pt, as transformers expects.
    for f in names.iter().filter(|n| n.ends_with(".safetensors")) {
        let st =
            surgery::formats::safetensors::SafetensorsFile::open(&d.join("a").join(f)).unwrap();
        assert_eq!(st.metadata.get("format").map(String::as_str), Some("pt"));
    }
    // A different seed gives a different adapter, and nothing else differs.
    ok(
        d,
        &[
            "apply",
            "m",
            "--out",
            "c",
            "--shape",
            "2,2,2",
            "--adapter-init",
            "reference",
            "--seed",
            "10",
            "-q",
        ],
    );
    let c = SourceModel::open(&d.join("c")).unwrap();
    assert_ne!(read(&m, Role::Adapter), read(&c, Role::Adapter));
    assert_eq!(
        read(&m, Role::Layer(3, LayerRole::Qkv)),
        read(&c, Role::Layer(3, LayerRole::Qkv))
    );
    let bound = 1.0 / (128f32).sqrt();
    assert!(read(&c, Role::Adapter)
        .iter()
        .all(|v| v.abs() <= bound * 1.01));
}

#[test]
fn verify_names_the_file_with_a_flipped_byte_and_other_damage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth::write_hf(&d.join("m"), &SynthSpec::llama(4), 1).unwrap();
    ok(
        d,
        &[
            "apply",
            "m",
            "--shape",
            "1,2,1",
            "--max-shard-size",
            "100kB",
            "--out",
            "r",
            "-q",
        ],
    );
    let shard = listing(&d.join("r"))
        .into_iter()
        .find(|n| n.starts_with("model-00002"))
        .unwrap();
    let path = d.join("r").join(&shard);
    let mut bytes = std::fs::read(&path).unwrap();
    let original = bytes.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let out = surgery(d, &["verify", "r"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&shard) && err.contains("does not match manifest.json"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1);
    std::fs::write(&path, &original).unwrap();
    ok(d, &["verify", "r"]);

    std::fs::write(d.join("r/extra.txt"), "x").unwrap();
    let err = stderr(&surgery(d, &["verify", "r"]));
    assert!(
        err.contains("extra.txt: not listed in manifest.json"),
        "{err}"
    );
    std::fs::remove_file(d.join("r/extra.txt")).unwrap();
    std::fs::remove_file(d.join("r/config.json")).unwrap();
    let err = stderr(&surgery(d, &["verify", "r"]));
    assert!(
        err.contains("config.json: missing (listed in manifest.json)"),
        "{err}"
    );
    let err = stderr(&surgery(d, &["verify", "m"]));
    assert!(err.contains("no manifest.json"), "{err}");
}

#[test]
fn refusals_say_why_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth::write_hf(&d.join("m"), &SynthSpec::llama(4), 1).unwrap();
    ok(
        d,
        &["plan", "m", "--shape", "1,2,1", "--out", "plan.json", "-q"],
    );
    std::fs::create_dir(d.join("existing")).unwrap();
    let plan: Value = serde_json::from_slice(&std::fs::read(d.join("plan.json")).unwrap()).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut p = plan.clone();
        edit(&mut p);
        std::fs::write(d.join(name), serde_json::to_vec(&p).unwrap()).unwrap();
    };
    variant("unknown-key.json", &|p| p["surprise"] = 1.into());
    variant("unknown-tensor-key.json", &|p| {
        p["tensors"][0]["note"] = "x".into()
    });
    variant("version.json", &|p| p["plan_version"] = 2.into());
    variant("bad-range.json", &|p| p["layers"]["coda"] = "3..9".into());
    variant("bad-bytes.json", &|p| {
        p["tensors"][1]["sources"][0]["byte_range"][1] = 5.into()
    });
    variant("bad-shape.json", &|p| {
        p["tensors"][0]["shape"] = serde_json::json!([256, 65])
    });
    variant("dropped-tensor.json", &|p| {
        p["tensors"].as_array_mut().unwrap().remove(3);
    });
    variant("bad-dtype.json", &|p| {
        p["tensors"][0]["dtype"] = "Q4_0".into()
    });
    variant("bad-transform.json", &|p| {
        p["tensors"][0]["transform"] = "concat_rows".into()
    });
    variant("wrong-offset.json", &|p| {
        let r = &mut p["tensors"][0]["sources"][0]["byte_range"];
        r[0] = (r[0].as_u64().unwrap() + 4).into();
        r[1] = (r[1].as_u64().unwrap() + 4).into();
    });
    std::fs::write(d.join("not-json.json"), "{").unwrap();
    // A source changed after planning: same size, other bytes.
    ok(
        d,
        &[
            "plan",
            "m",
            "--shape",
            "1,2,1",
            "--out",
            "plan-changed.json",
            "-q",
        ],
    );

    let cases: &[(&[&str], &str)] = &[
        (
            &["apply", "plan.json", "--out", "existing"],
            "existing already exists; pass --force",
        ),
        (
            &["apply", "unknown-key.json", "--out", "o"],
            "unknown field `surprise`",
        ),
        (
            &["apply", "unknown-tensor-key.json", "--out", "o"],
            "unknown field `note`",
        ),
        (
            &["apply", "version.json", "--out", "o"],
            "plan_version 2 is not supported",
        ),
        (
            &["apply", "bad-range.json", "--out", "o"],
            "disagree with the config's (1,2,1)",
        ),
        (&["apply", "bad-bytes.json", "--out", "o"], "does not hold"),
        (
            &["apply", "bad-shape.json", "--out", "o"],
            "has shape [256, 65], but the config implies [256, 64]",
        ),
        (
            &["apply", "dropped-tensor.json", "--out", "o"],
            "is missing from the plan",
        ),
        (
            &["apply", "bad-dtype.json", "--out", "o"],
            "output dtype Q4_0 is not a float type",
        ),
        (
            &["apply", "bad-transform.json", "--out", "o"],
            "transform ConcatRows does not fit",
        ),
        (
            &["apply", "wrong-offset.json", "--out", "o"],
            "source tensor \"model.embed_tokens.weight\" in model.safetensors is not F32 [256, 64]",
        ),
        (
            &["apply", "not-json.json", "--out", "o"],
            "plan is not JSON",
        ),
        (
            &["apply", "plan.json", "--shape", "1,2,1", "--out", "o"],
            "--shape and the other plan options apply to a MODEL",
        ),
        (&["apply", "m", "--out", "o"], "no layer map: pass --shape"),
        (
            &[
                "apply",
                "m",
                "--shape",
                "1,2,1",
                "--max-shard-size",
                "5GiB",
                "--out",
                "o",
            ],
            "invalid size \"5GiB\"",
        ),
    ];
    for (args, want) in cases {
        common::assert_refused(d, args, want);
        assert!(listing(&d.join("existing")).is_empty());
    }
    // Changing the source after planning is caught by its sha256.
    let st = d.join("m/model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x40;
    std::fs::write(&st, &bytes).unwrap();
    common::assert_refused(
        d,
        &["apply", "plan-changed.json", "--out", "o"],
        "model.safetensors changed since the plan was made: sha256",
    );
}

#[test]
fn force_replaces_an_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth::write_hf(&d.join("m"), &SynthSpec::olmo2(4), 1).unwrap();
    std::fs::create_dir(d.join("o")).unwrap();
    std::fs::write(d.join("o/old.txt"), "old").unwrap();
    ok(
        d,
        &[
            "apply", "m", "--shape", "1,2,1", "--out", "o", "--force", "-q",
        ],
    );
    assert!(!d.join("o/old.txt").exists());
    ok(d, &["verify", "o"]);
    let m = SourceModel::open(&d.join("o")).unwrap();
    assert_eq!(
        m.tensor(Role::Layer(1, LayerRole::PostMlpNorm))
            .unwrap()
            .name,
        "transformer.core_block.0.post_mlp_norm.weight"
    );
    assert_eq!(listing(d), ["m", "o"]);
}

#[test]
fn injection_none_writes_no_adapter_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth::write_hf(&d.join("m"), &SynthSpec::llama(4), 1).unwrap();
    ok(
        d,
        &[
            "apply",
            "m",
            "--shape",
            "1,2,1",
            "--injection",
            "none",
            "--state-init",
            "zero",
            "--out",
            "o",
            "-q",
        ],
    );
    let m = SourceModel::open(&d.join("o")).unwrap();
    assert!(m.tensor(Role::Adapter).is_none());
    assert!(!m.config.recurrent.unwrap().adapter);
    let config: Value =
        serde_json::from_slice(&std::fs::read(d.join("o/config.json")).unwrap()).unwrap();
    assert_eq!(config["injection_type"], "none");
    assert_eq!(config["surgery"]["state_init"], "zero");
    let text = ok(d, &["inspect", "o"]);
    assert!(
        text.contains("adapter     none (injection: none)"),
        "{text}"
    );
    ok(d, &["verify", "o"]);
}

/// A checkpoint big enough that apply takes a while (about 230 MB of f32).
fn big_model(d: &Path) -> PathBuf {
    let spec = SynthSpec {
        hidden: 512,
        n_heads: 8,
        n_kv_heads: 8,
        head_dim: 64,
        ffn: 2048,
        vocab: 8192,
        ..SynthSpec::llama(12)
    };
    let path = d.join("big");
    synth::write_hf(&path, &spec, 5).unwrap();
    path
}

#[test]
fn a_sigkill_halfway_leaves_no_output_and_a_rerun_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    big_model(d);
    // F16 output makes apply convert every tensor, so it runs long enough to be killed.
    let args = [
        "apply", "big", "--shape", "3,6,3", "--dtype", "f16", "--out", "out", "-q",
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_surgery"))
        .args(args)
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let partial = d.join(format!("out.partial-{}", child.id()));
    let shard = partial.join("model.safetensors");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::metadata(&shard).map_or(0, |m| m.len()) < 20_000_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "apply never got going"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "apply finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!d.join("out").exists(), "a killed apply left its output");
    ok(d, &args);
    ok(d, &["verify", "out"]);
}

#[test]
fn a_full_disk_ends_with_a_clear_error_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    big_model(d);
    // A file-size limit of 50 MB stands in for a full filesystem: writes past it fail with EFBIG.
    // SIGXFSZ is ignored so the write returns the error instead of killing the process.
    let surgery_bin = env!("CARGO_BIN_EXE_surgery");
    let script = format!(
        "trap '' XFSZ; ulimit -f 51200; exec {surgery_bin} apply big --shape 3,6,3 --out out -q"
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .current_dir(d)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("model.safetensors") && err.contains("File too large"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(listing(d), ["big"], "nothing is left behind");
}
