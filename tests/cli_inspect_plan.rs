//! `surgery inspect` and `surgery plan` through the built binary: real SmolLM2 numbers, plans on
//! every kind of synthetic checkpoint (checked against schemas/plan.schema.json and a golden plan),
//! and every refusal with its one-line message and nothing written.

mod common;

use std::path::Path;

use common::{stderr, stdout, surgery};
use serde_json::Value;
use surgery::dtype::DType;
use surgery::synth::{self, SynthSpec};

fn json_of(dir: &Path, args: &[&str]) -> Value {
    let out = surgery(dir, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&out)))
}

fn tensor_elements(plan: &Value) -> u64 {
    plan["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum()
}

#[test]
fn inspect_smollm2_reports_its_published_architecture() {
    let Some(model) = common::smollm2() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let r = json_of(dir.path(), &["inspect", model.to_str().unwrap(), "--json"]);
    assert_eq!(r["family"], "llama");
    assert_eq!(r["layers"], 30);
    assert_eq!(r["hidden"], 576);
    assert_eq!(
        (r["heads"].as_u64(), r["kv_heads"].as_u64()),
        (Some(9), Some(3))
    );
    assert_eq!(r["ffn"], 1536);
    assert_eq!(r["vocab"], 49152);
    assert_eq!(r["tied_embeddings"], true);
    assert_eq!(r["rope_theta"], 100000.0);
    // About 134.5M: 49152 x 576 embeddings + 30 layers of 3,540,096 + the final norm.
    assert_eq!(r["params"]["total"], 134_515_008);
    assert_eq!(r["tokenizer"]["kind"], "gguf gpt2");

    let table = surgery(dir.path(), &["inspect", model.to_str().unwrap()]);
    let text = stdout(&table);
    assert!(text.contains("134,515,008 total"), "{text}");
    assert!(
        text.contains("9 (3 key-value heads, head_dim 64)"),
        "{text}"
    );
}

#[test]
fn plan_smollm2_4_8_4_follows_the_default_rule_and_its_counts_add_up() {
    let Some(model) = common::smollm2() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = surgery(
        dir.path(),
        &[
            "plan",
            model.to_str().unwrap(),
            "--shape",
            "4,8,4",
            "--out",
            "plan.json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("4       dropped") && text.contains("17      dropped"),
        "{text}"
    );
    assert!(text.contains("18      core     core_block.0"), "{text}");
    let plan: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["layers"]["prelude"], "0..4");
    assert_eq!(plan["layers"]["core"], "18..26");
    assert_eq!(plan["layers"]["coda"], "26..30");

    let (embed, layer, adapter, norm) = (49152 * 576u64, 3_540_096u64, 2 * 576 * 576u64, 576u64);
    let costs = &plan["costs"];
    // Embeddings + the untied lm_head copy + 16 layers + adapter + final norm ...
    assert_eq!(
        costs["recurrent_params"],
        2 * embed + 16 * layer + adapter + norm
    );
    // ... which is exactly what the listed tensors hold.
    assert_eq!(
        tensor_elements(&plan),
        2 * embed + 16 * layer + adapter + norm
    );
    assert_eq!(
        costs["at_r"][1]["effective_params"],
        (4 + 4 * 8 + 4) * layer
    );

    let tensors = plan["tensors"].as_array().unwrap();
    let find = |name: &str| {
        tensors
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    // A tied source: lm_head is a second copy of the embeddings.
    assert_eq!(
        find("lm_head.weight")["sources"][0]["tensor"],
        "token_embd.weight"
    );
    let qkv = find("transformer.core_block.0.attn.Wqkv.weight");
    assert_eq!(qkv["shape"], serde_json::json!([576 + 2 * 192, 576]));
    assert_eq!(qkv["transform"], "dequantize");
    let parts: Vec<&str> = qkv["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tensor"].as_str().unwrap())
        .collect();
    assert_eq!(
        parts,
        [
            "blk.18.attn_q.weight",
            "blk.18.attn_k.weight",
            "blk.18.attn_v.weight"
        ]
    );
    assert_eq!(qkv["sources"][0]["unpermute_heads"], 9);
    assert_eq!(qkv["sources"][1]["unpermute_heads"], 3);
    assert!(qkv["sources"][2].get("unpermute_heads").is_none());
    assert_eq!(
        find("transformer.coda.3.norm_2.weight")["transform"],
        "copy"
    );
    assert_eq!(
        find("transformer.coda.3.norm_2.weight")["sources"][0]["tensor"],
        "blk.29.ffn_norm.weight"
    );
    let a = find("transformer.adapter.weight");
    assert_eq!(a["init"]["kind"], "identity");
    assert_eq!(plan["config"]["n_layers_in_recurrent_block"], 8);
    assert_eq!(
        plan["source"]["files"][0]["sha256"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    common::validate_against_schema(&dir.path().join("plan.json"), "plan");
    let files: Vec<&str> = plan["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["from"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["gguf_tokenizer", "gguf_tokenizer_config"]);
}

#[test]
fn plans_every_kind_of_checkpoint_and_each_matches_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, SynthSpec, Option<DType>)> = vec![
        ("llama-f32", SynthSpec::llama(6), None),
        (
            "llama-tied-sharded-bf16",
            SynthSpec {
                tied: true,
                shards: 3,
                dtype: DType::BF16,
                ..SynthSpec::llama(8)
            },
            None,
        ),
        (
            "olmo2-f16",
            SynthSpec {
                dtype: DType::F16,
                ..SynthSpec::olmo2(6)
            },
            None,
        ),
        (
            "llama3-rope",
            SynthSpec {
                llama3_rope: true,
                ..SynthSpec::llama(6)
            },
            None,
        ),
        ("gguf-q8_0", SynthSpec::llama(6), Some(DType::Q8_0)),
        (
            "gguf-f16-tied",
            SynthSpec {
                tied: true,
                ..SynthSpec::llama(6)
            },
            Some(DType::F16),
        ),
    ];
    for (name, spec, gguf) in cases {
        let model = match gguf {
            Some(t) => {
                let p = dir.path().join(format!("{name}.gguf"));
                synth::write_gguf(&p, &spec, 1, t).unwrap();
                p
            }
            None => {
                let p = dir.path().join(name);
                synth::write_hf(&p, &spec, 1).unwrap();
                p
            }
        };
        let out_name = format!("{name}.plan.json");
        let out = surgery(
            dir.path(),
            &[
                "plan",
                model.to_str().unwrap(),
                "--shape",
                "2,2,2",
                "--out",
                &out_name,
                "--quiet",
            ],
        );
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let plan: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(&out_name)).unwrap()).unwrap();
        let c = spec.config();
        let per_layer = plan["costs"]["params_per_layer"].as_u64().unwrap();
        let (h, v) = (c.hidden as u64, c.vocab as u64);
        assert_eq!(
            tensor_elements(&plan),
            2 * v * h + 6 * per_layer + 2 * h * h + h,
            "{name}"
        );
        assert_eq!(plan["config"]["block_type"], c.family.name(), "{name}");
        if spec.llama3_rope {
            assert_eq!(plan["config"]["rope_scaling"]["rope_type"], "llama3");
        }
        if spec.shards > 1 {
            let files = plan["source"]["files"].as_array().unwrap();
            assert_eq!(
                files.len(),
                2 + spec.shards,
                "{name}: config, index and shards"
            );
        }
        common::validate_against_schema(&dir.path().join(&out_name), "plan");
        if gguf.is_some() {
            // The fixture's vocabulary has no merges, so no tokenizer can be built: said, not hidden.
            assert!(
                plan["notes"][0]
                    .as_str()
                    .unwrap()
                    .contains("the output gets no tokenizer"),
                "{name}"
            );
            assert_eq!(plan["files"], serde_json::json!([]));
        }
    }
}

/// The whole plan for a fixed synthetic model, compared with tests/golden/plan-llama6-2-2-2.json
/// (machine-specific paths replaced by <ROOT>). Regenerate with UPDATE_GOLDEN=1.
#[test]
fn plan_output_matches_the_golden_file() {
    let dir = tempfile::tempdir().unwrap();
    synth::write_hf(&dir.path().join("model"), &SynthSpec::llama(6), 42).unwrap();
    let out = surgery(
        dir.path(),
        &[
            "plan",
            "model",
            "--shape",
            "2,2,2",
            "--adapter-noise",
            "0.01",
            "--seed",
            "5",
            "--out",
            "plan.json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("plan.json"))
        .unwrap()
        .replace(root.to_str().unwrap(), "<ROOT>")
        .replace(dir.path().to_str().unwrap(), "<ROOT>");
    let golden = common::root().join("tests/golden/plan-llama6-2-2-2.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &text).unwrap();
    }
    let want = std::fs::read_to_string(&golden).expect("golden plan (UPDATE_GOLDEN=1 writes it)");
    assert_eq!(text, want, "plan differs from {}", golden.display());
}

#[test]
fn every_refusal_is_one_line_exit_1_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth::write_hf(&d.join("m"), &SynthSpec::llama(6), 1).unwrap();
    // A checkpoint missing one tensor.
    synth::write_hf(&d.join("missing"), &SynthSpec::llama(2), 1).unwrap();
    let full =
        surgery::formats::safetensors::SafetensorsFile::open(&d.join("missing/model.safetensors"))
            .unwrap();
    let kept: Vec<(String, DType, Vec<usize>, Vec<u8>)> = full
        .tensors
        .iter()
        .filter(|t| t.name != "model.layers.1.mlp.up_proj.weight")
        .map(|t| {
            (
                t.name.clone(),
                t.dtype,
                t.shape.clone(),
                full.bytes(t).to_vec(),
            )
        })
        .collect();
    drop(full);
    surgery::formats::safetensors::write_file(&d.join("missing/model.safetensors"), &kept).unwrap();
    // An unsupported family.
    std::fs::create_dir(d.join("gpt2")).unwrap();
    std::fs::write(d.join("gpt2/config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    // Truncated and malformed files.
    synth::write_gguf(&d.join("ok.gguf"), &SynthSpec::llama(2), 1, DType::Q8_0).unwrap();
    let bytes = std::fs::read(d.join("ok.gguf")).unwrap();
    std::fs::write(d.join("truncated.gguf"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(d.join("garbage.gguf"), b"this is not a gguf file at all").unwrap();
    std::fs::create_dir(d.join("trunc")).unwrap();
    std::fs::copy(d.join("m/config.json"), d.join("trunc/config.json")).unwrap();
    let st = std::fs::read(d.join("m/model.safetensors")).unwrap();
    std::fs::write(d.join("trunc/model.safetensors"), &st[..st.len() - 10]).unwrap();
    std::fs::write(d.join("existing.json"), "{}").unwrap();

    let cases: &[(&[&str], &str)] = &[
        (
            &["plan", "m", "--shape", "2,2,2", "--core", "5..7"],
            "--core 5..7 is out of bounds",
        ),
        (
            &["plan", "m", "--shape", "2,2,2", "--coda", "5..7"],
            "--coda 5..7 is out of bounds: the model has 6 layers (0..6)",
        ),
        (
            &[
                "plan",
                "m",
                "--prelude",
                "0..2",
                "--core",
                "1..3",
                "--coda",
                "4..6",
            ],
            "layer 1 is used by both prelude (0..2) and core (1..3); pass --allow-reuse",
        ),
        (
            &[
                "plan",
                "m",
                "--prelude",
                "0..2",
                "--core",
                "3..3",
                "--coda",
                "4..6",
            ],
            "the core is empty",
        ),
        (&["plan", "m", "--shape", "2,0,2"], "the core is empty"),
        (
            &["plan", "m", "--shape", "4,4,4"],
            "--shape 4,4,4 needs 12 layers, but the model has 6",
        ),
        (
            &["plan", "m", "--shape", "2,2"],
            "invalid shape \"2,2\": expected P,C,K",
        ),
        (
            &["plan", "m", "--shape", "2,2,2", "--core", "3..1"],
            "invalid layer range \"3..1\"",
        ),
        (
            &["plan", "m", "--shape", "2,2,2", "--core", "1..2"],
            "--core 1..2 has 1 layers, but --shape 2,2,2 asks for 2",
        ),
        (
            &["plan", "m", "--core", "2..4"],
            "no layer map: pass --shape P,C,K",
        ),
        (
            &["plan", "m", "--shape", "2,2,2", "--adapter-noise", "-1"],
            "--adapter-noise -1 must be a finite number >= 0",
        ),
        (
            &[
                "plan",
                "m",
                "--shape",
                "2,2,2",
                "--injection",
                "none",
                "--adapter-noise",
                "0.1",
            ],
            "--adapter-noise needs an adapter",
        ),
        (
            &["plan", "missing", "--shape", "1,1,0"],
            "missing tensor \"model.layers.1.mlp.up_proj.weight\"",
        ),
        (
            &["plan", "gpt2", "--shape", "1,1,1"],
            "unsupported model_type \"gpt2\"",
        ),
        (
            &["plan", "truncated.gguf", "--shape", "1,1,0"],
            "truncated.gguf",
        ),
        (&["inspect", "garbage.gguf"], "garbage.gguf"),
        (
            &["plan", "trunc", "--shape", "2,2,2"],
            "invalid safetensors file: tensor data does not end at the end of the file",
        ),
        (
            &["inspect", "nowhere"],
            "nowhere: no such file or directory",
        ),
        (
            &["inspect", "existing.json"],
            "not a directory, .safetensors or .gguf file",
        ),
        (
            &["plan", "m", "--shape", "2,2,2", "--out", "existing.json"],
            "existing.json already exists; pass --force",
        ),
    ];
    for (args, want) in cases {
        let mut args = args.to_vec();
        if args[0] == "plan" && !args.contains(&"--out") {
            args.extend(["--out", "new-plan.json"]);
        }
        common::assert_refused(d, &args, want);
        assert_eq!(
            std::fs::read_to_string(d.join("existing.json")).unwrap(),
            "{}"
        );
    }
    // With --json, the error is also a JSON object on stdout.
    let out = surgery(d, &["inspect", "nowhere", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["exit_code"], 1);
    assert!(v["error"].as_str().unwrap().contains("no such file"));
}

#[test]
fn inspect_shows_a_recurrent_checkpoints_shape_and_adapter() {
    let golden = common::root().join("tests/golden/tiny-llama-recurrent-1-2-1");
    if !golden.is_dir() {
        eprintln!("NOTICE: skipping: {} is missing", golden.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = json_of(dir.path(), &["inspect", golden.to_str().unwrap(), "--json"]);
    assert_eq!(
        (
            r["recurrent"]["prelude"].as_u64(),
            r["recurrent"]["core"].as_u64(),
            r["recurrent"]["coda"].as_u64()
        ),
        (Some(1), Some(2), Some(1))
    );
    // [0 | I] + N(0, 0.05): clearly not the identity, and within a few sigma of it.
    let d = r["recurrent"]["adapter_max_abs_from_identity"]
        .as_f64()
        .unwrap();
    assert!(d > 0.1 && d < 0.4, "{d}");
    let text = stdout(&surgery(dir.path(), &["inspect", golden.to_str().unwrap()]));
    assert!(text.contains("(1,2,1) prelude, core, coda"), "{text}");
    // A recurrent checkpoint is not planned again.
    let out = surgery(
        dir.path(),
        &["plan", golden.to_str().unwrap(), "--shape", "1,1,1"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already recurrent"),
        "{}",
        stderr(&out)
    );
}
