//! The adversarial corpus (issue 8, docs/RELIABILITY.md): malformed safetensors files, configs,
//! GGUF files, plans and training data, each made by corrupting a valid synthetic file in a temp
//! dir, and each answered through the real binary with exit code 1, one line naming the problem,
//! no panic, and nothing written (neither the output nor an `OUT.partial-*` sibling).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_refused, stderr, surgery};
use serde_json::{json, Map, Value};
use surgery::dtype::DType;
use surgery::synth::{self, SynthSpec};

/// Runs `args` in `d` and asserts the refusal: exit 1, one line containing `want`, no panic or
/// backtrace, and `d` exactly as it was (so no output, and no partial directory or file).
fn refused(d: &Path, args: &[&str], want: &str) {
    assert_refused(d, args, want);
}

/// A 4-layer synthetic llama (F32, untied) in `d/src`, with a byte-level tokenizer.
fn source(d: &Path) -> PathBuf {
    let src = d.join("src");
    synth::write_hf(&src, &SynthSpec::llama(4), 1).unwrap();
    synth::write_byte_tokenizer(&src).unwrap();
    src
}

/// `apply src --shape 1,2,1 --out out`: reads the config and every safetensors header.
fn apply_src(d: &Path, want: &str) {
    refused(
        d,
        &["apply", "src", "--shape", "1,2,1", "--out", "out"],
        want,
    );
}

// ---------------------------------------------------------------- safetensors

/// The header length, the header JSON (in file order) and the data of a safetensors file.
fn split(path: &Path) -> (Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Writes `header` (raw bytes, length prefixed) and `data`.
fn join(path: &Path, header: &[u8], data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Rewrites the header of `path` through `edit`, keeping the data.
fn edit_header(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let (mut header, data) = split(path);
    edit(&mut header);
    join(path, &serde_json::to_vec(&header).unwrap(), &data);
}

/// The names of the tensors of `header` in data order.
fn by_offset(header: &Map<String, Value>) -> Vec<String> {
    let mut names: Vec<(u64, String)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (v["data_offsets"][0].as_u64().unwrap(), k.clone()))
        .collect();
    names.sort();
    names.into_iter().map(|(_, n)| n).collect()
}

fn shift(header: &mut Map<String, Value>, name: &str, ds: i64, de: i64) {
    let o = &mut header[name]["data_offsets"];
    let (s, e) = (o[0].as_i64().unwrap(), o[1].as_i64().unwrap());
    *o = json!([s + ds, e + de]);
}

fn st_model(d: &Path) -> PathBuf {
    source(d).join("model.safetensors")
}

#[test]
fn safetensors_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    apply_src(
        dir.path(),
        "invalid safetensors file: tensor data does not end at the end of the file",
    );
}

#[test]
fn safetensors_shorter_than_the_length_prefix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(st_model(dir.path()), [7, 0, 0]).unwrap();
    apply_src(dir.path(), "file is shorter than the 8-byte header length");
}

#[test]
fn safetensors_header_length_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    apply_src(dir.path(), "header length points past the end of the file");
}

#[test]
fn safetensors_header_over_100_mb() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    apply_src(dir.path(), "header length is larger than 100 MB");
}

#[test]
fn safetensors_header_not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    let (header, data) = split(&path);
    let mut raw = serde_json::to_vec(&header).unwrap();
    raw[3] = 0xff;
    join(&path, &raw, &data);
    apply_src(dir.path(), "header is not valid UTF-8");
}

#[test]
fn safetensors_header_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    let (header, data) = split(&path);
    let raw = serde_json::to_vec(&header).unwrap();
    join(&path, &raw[..raw.len() - 1], &data);
    apply_src(dir.path(), "header is not valid JSON");
}

#[test]
fn safetensors_overlapping_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    edit_header(&path, |h| {
        let second = by_offset(h)[1].clone();
        shift(h, &second, -4, -4);
    });
    apply_src(
        dir.path(),
        "has offsets that overlap, leave a gap or run backwards",
    );
}

#[test]
fn safetensors_gapped_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    edit_header(&path, |h| {
        let second = by_offset(h)[1].clone();
        shift(h, &second, 4, 4);
    });
    apply_src(
        dir.path(),
        "has offsets that overlap, leave a gap or run backwards",
    );
}

#[test]
fn safetensors_reversed_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    edit_header(&path, |h| {
        let first = by_offset(h)[0].clone();
        let o = h[&first]["data_offsets"].clone();
        h[&first]["data_offsets"] = json!([o[1], o[0]]);
    });
    apply_src(dir.path(), "invalid safetensors file");
}

#[test]
fn safetensors_offsets_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    edit_header(&path, |h| {
        let end = by_offset(h)
            .iter()
            .map(|n| h[n]["data_offsets"][1].as_u64().unwrap())
            .max()
            .unwrap();
        h.insert(
            "extra".into(),
            json!({"dtype": "F32", "shape": [2], "data_offsets": [end, end + 8]}),
        );
    });
    apply_src(
        dir.path(),
        "tensor data does not end at the end of the file",
    );
}

#[test]
fn safetensors_shape_disagrees_with_byte_range() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    edit_header(&path, |h| {
        h["model.embed_tokens.weight"]["shape"] = json!([256, 63]);
    });
    apply_src(
        dir.path(),
        "a tensor's shape and dtype do not match its byte range",
    );
}

#[test]
fn safetensors_unknown_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    edit_header(&path, |h| {
        h["model.norm.weight"]["dtype"] = json!("F33");
    });
    apply_src(
        dir.path(),
        "header is not valid JSON: unknown variant `F33`",
    );
}

#[test]
fn safetensors_unsupported_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    edit_header(&path, |h| {
        h["model.norm.weight"]["dtype"] = json!("I32");
    });
    apply_src(
        dir.path(),
        r#"tensor "model.norm.weight" has unsupported dtype I32"#,
    );
}

#[test]
fn safetensors_duplicate_name_within_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    let (header, data) = split(&path);
    let mut raw = String::from_utf8(serde_json::to_vec(&header).unwrap()).unwrap();
    // The same name twice with the same entry: a JSON map would silently keep one.
    let entry = format!(
        r#""model.norm.weight":{}"#,
        serde_json::to_string(&header["model.norm.weight"]).unwrap()
    );
    raw.insert_str(raw.len() - 1, &format!(",{entry}"));
    join(&path, raw.as_bytes(), &data);
    apply_src(
        dir.path(),
        r#"tensor "model.norm.weight" is named twice in the header"#,
    );
}

#[test]
fn safetensors_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    let (mut header, data) = split(&path);
    let name = by_offset(&header).last().unwrap().clone();
    let start = header[&name]["data_offsets"][0].as_u64().unwrap() as usize;
    header.remove(&name);
    join(&path, &serde_json::to_vec(&header).unwrap(), &data[..start]);
    apply_src(dir.path(), "missing");
}

/// A 4-layer llama in 2 shards with an index.
fn sharded(d: &Path) -> PathBuf {
    let src = d.join("src");
    let spec = SynthSpec {
        shards: 2,
        ..SynthSpec::llama(4)
    };
    synth::write_hf(&src, &spec, 1).unwrap();
    src
}

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

fn edit_index(src: &Path, edit: impl FnOnce(&mut Value)) {
    let path = src.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut index);
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn safetensors_duplicate_name_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let src = sharded(dir.path());
    // Shard 2 also holds a tensor of shard 1 (same name, its own bytes).
    let (h1, _) = split(&src.join(SHARD1));
    let name = by_offset(&h1)[0].clone();
    let path2 = src.join(SHARD2);
    let (mut h2, mut data2) = split(&path2);
    let end = data2.len();
    h2.insert(
        name.clone(),
        json!({"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}),
    );
    data2.extend_from_slice(&[0; 4]);
    join(&path2, &serde_json::to_vec(&h2).unwrap(), &data2);
    apply_src(dir.path(), &format!("tensor {name:?} appears in both"));
}

#[test]
fn safetensors_index_names_a_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    let src = sharded(dir.path());
    std::fs::remove_file(src.join(SHARD2)).unwrap();
    apply_src(
        dir.path(),
        &format!("names shard {SHARD2:?}, which does not exist"),
    );
}

#[test]
fn safetensors_index_maps_a_tensor_to_the_wrong_shard() {
    let dir = tempfile::tempdir().unwrap();
    let src = sharded(dir.path());
    edit_index(&src, |i| {
        i["weight_map"]["model.norm.weight"] = json!(SHARD1);
    });
    apply_src(
        dir.path(),
        &format!(r#"maps tensor "model.norm.weight" to {SHARD1:?}, which does not hold it"#),
    );
}

#[test]
fn safetensors_index_names_a_path_outside_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let src = sharded(dir.path());
    edit_index(&src, |i| {
        i["weight_map"]["model.norm.weight"] = json!("../model.safetensors");
    });
    apply_src(
        dir.path(),
        r#"shard name "../model.safetensors" is not a plain file name"#,
    );
}

#[test]
fn safetensors_index_total_size_disagrees() {
    let dir = tempfile::tempdir().unwrap();
    let src = sharded(dir.path());
    edit_index(&src, |i| i["metadata"]["total_size"] = json!(12));
    apply_src(dir.path(), "metadata.total_size is 12, but the shards hold");
}

#[test]
fn safetensors_index_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let src = sharded(dir.path());
    std::fs::write(
        src.join("model.safetensors.index.json"),
        b"{\"weight_map\": [",
    )
    .unwrap();
    apply_src(dir.path(), "model.safetensors.index.json: invalid index");
}

/// Sets element 5 of `model.layers.1.mlp.up_proj.weight` (copied as is by apply) to `value`.
fn poison(d: &Path, value: f32) {
    let path = st_model(d);
    let (header, mut data) = split(&path);
    let s = header["model.layers.1.mlp.up_proj.weight"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    data[s + 20..s + 24].copy_from_slice(&value.to_le_bytes());
    let raw = serde_json::to_vec(&header).unwrap();
    join(&path, &raw, &data);
}

#[test]
fn safetensors_nan_is_refused_with_strict() {
    let dir = tempfile::tempdir().unwrap();
    poison(dir.path(), f32::NAN);
    refused(
        dir.path(),
        &[
            "apply", "src", "--shape", "1,2,1", "--strict", "--out", "out",
        ],
        r#"tensor "transformer.core_block.0.mlp.fc.weight" would receive 1 non-finite values (NaN or Inf) from the source; refusing under --strict"#,
    );
}

#[test]
fn safetensors_inf_is_copied_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    poison(d, f32::NEG_INFINITY);
    let o = surgery(
        d,
        &["apply", "src", "--shape", "1,2,1", "--out", "out", "-q"],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(
            r#"warning: tensor "transformer.core_block.0.mlp.fc.weight" holds 1 non-finite values (NaN or Inf) copied from the source; pass --strict to refuse such a source"#
        ),
        "{err}"
    );
    let o = surgery(
        d,
        &["apply", "src", "--shape", "1,2,1", "--out", "o2", "--json"],
    );
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        report["nonfinite"],
        json!([{"tensor": "transformer.core_block.0.mlp.fc.weight", "count": 1}])
    );
}

// ---------------------------------------------------------------- config.json

fn edit_config(d: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let path = source(d).join("config.json");
    let mut config: Map<String, Value> =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
}

#[test]
fn config_missing_field() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.remove("hidden_size");
    });
    apply_src(dir.path(), "config.json: missing field `hidden_size`");
}

#[test]
fn config_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.insert("num_attention_heads".into(), json!("4"));
    });
    apply_src(
        dir.path(),
        "config.json: invalid type: string \"4\", expected usize",
    );
}

#[test]
fn config_negative_size() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.insert("intermediate_size".into(), json!(-160));
    });
    apply_src(dir.path(), "config.json: invalid value: integer `-160`");
}

#[test]
fn config_a_trillion_layers() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.insert("num_hidden_layers".into(), json!(1_000_000_000_000u64));
    });
    apply_src(
        dir.path(),
        "number of layers 1000000000000 is out of range 1..=4096",
    );
}

#[test]
fn config_hidden_zero() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.insert("hidden_size".into(), json!(0));
    });
    apply_src(dir.path(), "hidden size 0 is out of range");
}

#[test]
fn config_heads_do_not_divide_hidden() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.remove("head_dim");
        c.insert("num_attention_heads".into(), json!(6));
        c.insert("num_key_value_heads".into(), json!(3));
    });
    apply_src(
        dir.path(),
        "hidden size 64 is not divisible by 6 attention heads",
    );
}

#[test]
fn config_kv_heads_do_not_divide_heads() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.insert("num_key_value_heads".into(), json!(3));
    });
    apply_src(
        dir.path(),
        "4 attention heads are not a multiple of 3 key-value heads",
    );
}

#[test]
fn config_unknown_architecture() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), json!("gpt2"));
    });
    apply_src(dir.path(), "config.json: unsupported model_type \"gpt2\"");
}

#[test]
fn config_not_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(source(dir.path()).join("config.json"), b"{\"model_type\": ").unwrap();
    apply_src(dir.path(), "config.json: EOF while parsing");
}

#[test]
fn config_disagrees_with_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.insert("intermediate_size".into(), json!(128));
    });
    apply_src(dir.path(), "[160, 64]");
}

// ---------------------------------------------------------------- GGUF

/// A synthetic GGUF (Q8_0 weights) at `d/m.gguf`.
fn gguf_model(d: &Path) -> PathBuf {
    let path = d.join("m.gguf");
    synth::write_gguf(&path, &SynthSpec::llama(2), 1, DType::Q8_0).unwrap();
    path
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut all = std::fs::read(path).unwrap();
    all[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, all).unwrap();
}

fn plan_gguf(d: &Path, file: &str, want: &str) {
    refused(
        d,
        &["plan", file, "--shape", "1,1,0", "--out", "plan.json"],
        want,
    );
}

#[test]
fn gguf_bad_magic() {
    let dir = tempfile::tempdir().unwrap();
    patch(&gguf_model(dir.path()), 0, b"GGML");
    plan_gguf(dir.path(), "m.gguf", "not a GGUF file");
}

#[test]
fn gguf_version_1() {
    let dir = tempfile::tempdir().unwrap();
    patch(&gguf_model(dir.path()), 4, &1u32.to_le_bytes());
    plan_gguf(
        dir.path(),
        "m.gguf",
        "unsupported GGUF version 1: only versions 2 and 3 are supported",
    );
}

#[test]
fn gguf_tensor_count_2_pow_60() {
    let dir = tempfile::tempdir().unwrap();
    patch(&gguf_model(dir.path()), 8, &(1u64 << 60).to_le_bytes());
    plan_gguf(
        dir.path(),
        "m.gguf",
        "tensor count 1152921504606846976 cannot fit in the",
    );
}

#[test]
fn gguf_key_count_2_pow_60() {
    let dir = tempfile::tempdir().unwrap();
    patch(&gguf_model(dir.path()), 16, &(1u64 << 60).to_le_bytes());
    plan_gguf(
        dir.path(),
        "m.gguf",
        "key/value count 1152921504606846976 cannot fit in the",
    );
}

#[test]
fn gguf_string_length_2_pow_50() {
    let dir = tempfile::tempdir().unwrap();
    // The first key's length.
    patch(&gguf_model(dir.path()), 24, &(1u64 << 50).to_le_bytes());
    plan_gguf(dir.path(), "m.gguf", "1125899906842624");
}

#[test]
fn gguf_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = gguf_model(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    plan_gguf(dir.path(), "m.gguf", "past the end of the file");
}

/// A GGUF file built byte by byte: a header, key/value pairs, tensor infos, then data.
struct Gguf {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_tensors: u64,
    data: usize,
}

impl Gguf {
    fn new() -> Gguf {
        Gguf {
            kv: vec![],
            n_kv: 0,
            infos: vec![],
            n_tensors: 0,
            data: 0,
        }
    }

    fn str(buf: &mut Vec<u8>, s: &str) {
        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    }

    /// A key of type `type_id` and its raw value bytes.
    fn kv(mut self, key: &str, type_id: u32, value: &[u8]) -> Gguf {
        Gguf::str(&mut self.kv, key);
        self.kv.extend_from_slice(&type_id.to_le_bytes());
        self.kv.extend_from_slice(value);
        self.n_kv += 1;
        self
    }

    fn arch(self) -> Gguf {
        let mut v = vec![];
        Gguf::str(&mut v, "llama");
        self.kv("general.architecture", 8, &v)
    }

    /// A tensor info: ggml dims (`ne`, innermost first), ggml type id, data offset.
    fn tensor(mut self, name: &str, ne: &[u64], type_id: u32, offset: u64) -> Gguf {
        Gguf::str(&mut self.infos, name);
        self.infos
            .extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in ne {
            self.infos.extend_from_slice(&d.to_le_bytes());
        }
        self.infos.extend_from_slice(&type_id.to_le_bytes());
        self.infos.extend_from_slice(&offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    fn data(mut self, n: usize) -> Gguf {
        self.data = n;
        self
    }

    fn write(self, path: &Path) {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&self.n_tensors.to_le_bytes());
        b.extend_from_slice(&self.n_kv.to_le_bytes());
        b.extend_from_slice(&self.kv);
        b.extend_from_slice(&self.infos);
        b.resize(b.len().div_ceil(32) * 32 + self.data, 0);
        std::fs::write(path, b).unwrap();
    }
}

const F32: u32 = 0;
const Q8_0: u32 = 8;

fn hand_made(d: &Path, g: Gguf, want: &str) {
    g.write(&d.join("h.gguf"));
    plan_gguf(d, "h.gguf", want);
}

#[test]
fn gguf_unknown_value_type() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(
        dir.path(),
        Gguf::new().arch().kv("x", 13, &[0; 8]),
        r#"key "x" has unknown value type 13"#,
    );
}

#[test]
fn gguf_nested_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = 9u32.to_le_bytes().to_vec();
    v.extend_from_slice(&1u64.to_le_bytes());
    hand_made(
        dir.path(),
        Gguf::new().arch().kv("nested", 9, &v),
        r#"key "nested" holds an array of arrays"#,
    );
}

#[test]
fn gguf_array_length_2_pow_60() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = 8u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(1u64 << 60).to_le_bytes());
    hand_made(
        dir.path(),
        Gguf::new().arch().kv("tokenizer.ggml.tokens", 9, &v),
        r#"array length of key "tokenizer.ggml.tokens" 1152921504606846976 cannot fit"#,
    );
}

#[test]
fn gguf_unknown_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(
        dir.path(),
        Gguf::new().arch().tensor("a", &[32], 77, 0).data(128),
        r#"tensor "a" has ggml type 77, which is unknown or unsupported"#,
    );
}

#[test]
fn gguf_offset_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(
        dir.path(),
        Gguf::new().arch().tensor("a", &[32], F32, 4096).data(128),
        r#"tensor "a""#,
    );
}

/// Tensor data must follow the infos' order, each tensor at the previous one's padded end.
#[test]
fn gguf_tensor_data_out_of_place() {
    // (first offset, second offset and element count, data bytes, message)
    let cases: [(u64, (u64, u64), usize, &str); 3] = [
        (96, (0, 64), 256, "overlap"),
        (
            128,
            (0, 32),
            256,
            r#"tensor "a" has data offset 128, expected 0"#,
        ),
        (
            0,
            (256, 32),
            512,
            r#"tensor "b" has data offset 256, expected 128"#,
        ),
    ];
    for (a, (b, b_len), data, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        hand_made(
            dir.path(),
            Gguf::new()
                .arch()
                .tensor("a", &[32], F32, a)
                .tensor("b", &[b_len], F32, b)
                .data(data),
            want,
        );
    }
}

#[test]
fn gguf_offset_not_aligned() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(
        dir.path(),
        Gguf::new().arch().tensor("a", &[32], F32, 4).data(256),
        r#"tensor "a" has data offset 4, not a multiple of the alignment 32"#,
    );
}

#[test]
fn gguf_row_not_a_multiple_of_the_block() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(
        dir.path(),
        Gguf::new().arch().tensor("a", &[48, 2], Q8_0, 0).data(256),
        r#"tensor "a" of type Q8_0 has rows of 48 elements, not a multiple of the block size 32"#,
    );
}

#[test]
fn gguf_duplicate_tensor_names() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(
        dir.path(),
        Gguf::new()
            .arch()
            .tensor("a", &[32], F32, 0)
            .tensor("a", &[32], F32, 128)
            .data(256),
        r#"duplicate tensor name "a""#,
    );
}

#[test]
fn gguf_duplicate_keys() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(
        dir.path(),
        Gguf::new().arch().arch(),
        r#"duplicate metadata key "general.architecture""#,
    );
}

#[test]
fn gguf_dimension_overflow() {
    let dir = tempfile::tempdir().unwrap();
    hand_made(
        dir.path(),
        Gguf::new()
            .arch()
            .tensor("a", &[1 << 40, 1 << 40], F32, 0)
            .data(64),
        r#"tensor "a" with shape"#,
    );
}

// ---------------------------------------------------------------- plan.json

/// A valid plan for a (1,2,1) cut of the source, at `d/plan.json`.
fn plan(d: &Path) -> Map<String, Value> {
    source(d);
    let o = surgery(
        d,
        &[
            "plan",
            "src",
            "--shape",
            "1,2,1",
            "--out",
            "plan.json",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&std::fs::read(d.join("plan.json")).unwrap()).unwrap()
}

fn edit_plan(d: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let mut p = plan(d);
    edit(&mut p);
    std::fs::write(d.join("plan.json"), serde_json::to_vec(&p).unwrap()).unwrap();
}

fn apply_plan(d: &Path, want: &str) {
    refused(d, &["apply", "plan.json", "--out", "out"], want);
}

#[test]
fn plan_wrong_version() {
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        p.insert("plan_version".into(), json!(99));
    });
    apply_plan(
        dir.path(),
        "plan_version 99 is not supported (this tool reads version 1)",
    );
}

#[test]
fn plan_without_a_version() {
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        p.remove("plan_version");
    });
    apply_plan(dir.path(), "plan has no plan_version");
}

#[test]
fn plan_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        p.insert("prelud".into(), json!("0..1"));
    });
    apply_plan(dir.path(), "unknown field `prelud`");
}

#[test]
fn plan_unknown_key_in_a_tensor() {
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        p["tensors"][0]["scale"] = json!(2.0);
    });
    apply_plan(dir.path(), "unknown field `scale`");
}

#[test]
fn plan_range_out_of_bounds() {
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        p["layers"]["coda"] = json!("7..8");
    });
    apply_plan(
        dir.path(),
        "--coda 7..8 is out of bounds: the model has 4 layers (0..4)",
    );
}

#[test]
fn plan_byte_range_outside_the_source() {
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        p["tensors"][1]["sources"][0]["byte_range"] = json!([1_000_000_000u64, 1_000_000_256u64]);
    });
    apply_plan(dir.path(), "byte");
}

#[test]
fn plan_tensor_listed_twice() {
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        let first = p["tensors"][0].clone();
        p["tensors"].as_array_mut().unwrap().push(first);
    });
    apply_plan(
        dir.path(),
        r#"tensor "transformer.wte.weight" is listed twice"#,
    );
}

// Edited by hand (issue 19): a plan whose entries disagree is refused naming the entry, not
// applied with other layers' weights than it claims.

#[test]
fn plan_core_moved_without_its_tensors() {
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        p["layers"]["core"] = json!("0..2");
    });
    apply_plan(
        dir.path(),
        r#"tensor "transformer.core_block.0.norm_1.weight" reads "model.layers.1.input_layernorm.weight", but layers.core 0..2 puts source layer 0 there ("model.layers.0.input_layernorm.weight")"#,
    );
}

#[test]
fn plan_config_records_another_layer_map() {
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        p["config"]["surgery"]["layers"]["core"] = json!("0..2");
    });
    apply_plan(
        dir.path(),
        "config.surgery.layers (prelude 0..1, core 0..2, coda 3..4) disagrees with the plan's layers (prelude 0..1, core 1..3, coda 3..4)",
    );
}

#[test]
fn plan_tensor_reads_another_layer() {
    // Names and byte ranges moved together, so every source header entry still matches.
    let dir = tempfile::tempdir().unwrap();
    edit_plan(dir.path(), |p| {
        let tensors = p["tensors"].as_array_mut().unwrap();
        let at = |name: &str| tensors.iter().position(|t| t["name"] == name).unwrap();
        let (to, from) = (
            at("transformer.core_block.0.attn.Wqkv.weight"),
            at("transformer.core_block.1.attn.Wqkv.weight"),
        );
        tensors[to]["sources"] = tensors[from]["sources"].clone();
    });
    apply_plan(
        dir.path(),
        r#"tensor "transformer.core_block.0.attn.Wqkv.weight" reads "model.layers.2.self_attn.q_proj.weight", but layers.core 1..3 puts source layer 1 there ("model.layers.1.self_attn.q_proj.weight")"#,
    );
}

#[test]
fn plan_not_json() {
    let dir = tempfile::tempdir().unwrap();
    plan(dir.path());
    std::fs::write(dir.path().join("plan.json"), b"{\"plan_version\": 1,").unwrap();
    apply_plan(dir.path(), "plan is not JSON");
}

#[test]
fn plan_source_hash_no_longer_matches() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    plan(d);
    // Same size, one byte of tensor data changed.
    let path = d.join("src/model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    apply_plan(d, "changed since the plan was made: sha256");
}

#[test]
fn plan_source_size_changed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    plan(d);
    let path = d.join("src/tokenizer_config.json");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.push(b' ');
    std::fs::write(&path, bytes).unwrap();
    apply_plan(d, "changed since the plan was made");
}

// ---------------------------------------------------------------- heal data

/// A (1,2,1) recurrent checkpoint `d/rec` with a byte-level tokenizer.
fn recurrent(d: &Path) {
    source(d);
    let o = surgery(
        d,
        &["apply", "src", "--shape", "1,2,1", "--out", "rec", "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

fn heal_data(d: &Path, file: &str, bytes: &[u8], want: &str) {
    recurrent(d);
    std::fs::write(d.join(file), bytes).unwrap();
    refused(
        d,
        &[
            "heal",
            "rec",
            "--data",
            file,
            "--out",
            "healed",
            "--steps",
            "2",
            "--seq-len",
            "32",
        ],
        want,
    );
}

#[test]
fn heal_data_empty() {
    let dir = tempfile::tempdir().unwrap();
    heal_data(dir.path(), "empty.txt", b"", "empty.txt");
}

#[test]
fn heal_data_binary_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    heal_data(
        dir.path(),
        "garbage.txt",
        &garbage,
        "garbage.txt: not a text file",
    );
}

#[test]
fn heal_data_shorter_than_one_window() {
    let dir = tempfile::tempdir().unwrap();
    heal_data(
        dir.path(),
        "short.txt",
        b"In the beginning.",
        "the data holds 18 tokens, not enough for one training window of --seq-len 32 + 1",
    );
}

#[test]
fn heal_data_all_invalid_utf8() {
    let dir = tempfile::tempdir().unwrap();
    heal_data(
        dir.path(),
        "latin1.txt",
        b"caf\xe9 au lait\n\nna\xefve",
        "latin1.txt: not a text file (none of its 2 documents is valid UTF-8)",
    );
}

#[test]
fn heal_data_jsonl_line_not_json() {
    let dir = tempfile::tempdir().unwrap();
    heal_data(
        dir.path(),
        "d.jsonl",
        b"{\"text\": \"fine\"}\n{\"text\": \n",
        "d.jsonl:2: not valid JSON",
    );
}

#[test]
fn heal_data_jsonl_without_the_text_field() {
    let dir = tempfile::tempdir().unwrap();
    heal_data(
        dir.path(),
        "d.jsonl",
        b"{\"body\": \"fine\"}\n",
        "d.jsonl:1: no field `text`",
    );
}

/// Not a refusal: a paragraph that is not UTF-8 among valid ones is skipped, counted and noted.
#[test]
fn heal_data_skips_an_invalid_utf8_paragraph_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    let mut text = b"caf\xe9 au lait".to_vec();
    for i in 0..20 {
        text.extend_from_slice(
            format!("\n\n{i}. And God saw the light, that it was good.").as_bytes(),
        );
    }
    std::fs::write(d.join("mixed.txt"), text).unwrap();
    let args = [
        "heal",
        "rec",
        "--data",
        "mixed.txt",
        "--out",
        "healed",
        "--steps",
        "1",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--micro-batch",
        "2",
        "--holdout",
        "0",
    ];
    let o = surgery(d, &args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("note: skipped 1 document(s) that are not valid UTF-8"),
        "{err}"
    );
}

/// With --json a refusal is also a JSON object on stdout.
#[test]
fn refusals_are_json_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patch(&gguf_model(d), 4, &1u32.to_le_bytes());
    let o = surgery(
        d,
        &[
            "plan",
            "m.gguf",
            "--shape",
            "1,1,0",
            "--out",
            "plan.json",
            "--json",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["exit_code"], 1);
    assert_eq!(
        v["error"],
        "m.gguf: unsupported GGUF version 1: only versions 2 and 3 are supported"
    );
    assert!(!d.join("plan.json").exists());
}

// ---------------------------------------------------------------- paths (issue 18)
//
// Where a plan may read, where a resume may write, outputs apart from inputs, only regular files
// read as files, exit codes and the names of partial outputs, and a closed stdout.

/// Makes a FIFO at `path` (a named pipe: opening or reading it blocks until a writer comes).
fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

/// Edits the plan so that the output's `tokenizer.json` is copied from source file `file`
/// (added to `source.files` with a made-up size and hash: the path is refused before either
/// is compared).
fn plan_reading(d: &Path, file: &str) {
    let path = d.join("plan.json");
    let mut p: Map<String, Value> = if path.exists() {
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    } else {
        plan(d)
    };
    let files = p["source"]["files"].as_array_mut().unwrap();
    // An entry added by an earlier call goes: one bad path at a time.
    files.retain(|f| f["sha256"] != json!("0".repeat(64)));
    files.push(json!({"path": file, "bytes": 6, "sha256": "0".repeat(64)}));
    for f in p["files"].as_array_mut().unwrap() {
        if f["name"] == "tokenizer.json" {
            f["source"] = json!(file);
        }
    }
    std::fs::write(path, serde_json::to_vec(&p).unwrap()).unwrap();
}

#[test]
fn plan_source_file_outside_the_folder_through_dotdot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("secret.txt"), b"secret").unwrap();
    plan_reading(d, "../secret.txt");
    apply_plan(
        d,
        r#"source file "../secret.txt" is not a relative path inside the source folder"#,
    );
    plan_reading(d, "sub/../../secret.txt");
    apply_plan(d, "is not a relative path inside the source folder");
}

#[test]
fn plan_source_file_as_an_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("secret.txt"), b"secret").unwrap();
    let abs = d.join("secret.txt").to_string_lossy().into_owned();
    plan_reading(d, &abs);
    apply_plan(d, "is not a relative path inside the source folder");
    plan_reading(d, "/dev/zero");
    apply_plan(
        d,
        r#"source file "/dev/zero" is not a relative path inside the source folder"#,
    );
}

#[test]
fn plan_source_file_inside_the_folder_that_no_model_has() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    source(d);
    std::fs::write(d.join("src/notes.txt"), b"private").unwrap();
    plan_reading(d, "notes.txt");
    apply_plan(
        d,
        r#"source file "notes.txt" is not a file a model is made of"#,
    );
}

#[test]
fn plan_source_file_through_a_symlink_out_of_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    plan(d);
    std::fs::write(d.join("secret.txt"), b"secret").unwrap();
    std::fs::remove_file(d.join("src/tokenizer.json")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", d.join("src/tokenizer.json")).unwrap();
    apply_plan(
        d,
        r#"source file "tokenizer.json" lies outside the source folder"#,
    );
    // /dev/zero never ends: refused by where it is, before a byte is read.
    std::fs::remove_file(d.join("src/tokenizer.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.join("src/tokenizer.json")).unwrap();
    apply_plan(
        d,
        r#"source file "tokenizer.json" lies outside the source folder"#,
    );
}

#[test]
fn plan_source_root_moved_away_from_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    edit_plan(d, |p| p["source"]["root"] = json!("/"));
    apply_plan(d, "source.root / is neither the model");
}

#[test]
fn plan_source_file_that_is_a_fifo_or_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    plan(d);
    std::fs::remove_file(d.join("src/tokenizer.json")).unwrap();
    mkfifo(&d.join("src/tokenizer.json"));
    apply_plan(d, "is a FIFO (named pipe), not a regular file");
    std::fs::remove_file(d.join("src/tokenizer.json")).unwrap();
    std::fs::create_dir(d.join("src/tokenizer.json")).unwrap();
    apply_plan(d, "tokenizer.json: is a directory, not a regular file");
}

#[test]
fn plan_version_that_is_not_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (version, want) in [
        (
            json!(-1),
            "plan_version -1 is not supported (this tool reads version 1)",
        ),
        (json!(1.5), "plan_version 1.5 is not supported"),
        (json!("1"), r#"plan_version "1" is not a version number"#),
        (json!(null), "plan_version null is not a version number"),
    ] {
        edit_plan(d, |p| p["plan_version"] = version);
        apply_plan(d, want);
        std::fs::remove_dir_all(d.join("src")).unwrap();
        std::fs::remove_file(d.join("plan.json")).unwrap();
    }
}

// Outputs that are, contain or lie inside an input.

/// Asserts the refusal of `args` and that `input` (a file or a directory's manifest-free
/// listing) is exactly as before.
fn refused_keeping(d: &Path, args: &[&str], want: &str, input: &str) {
    let snapshot = |p: &Path| -> Vec<(String, Vec<u8>)> {
        if p.is_dir() {
            let mut all = vec![];
            for name in common::listing(p) {
                let f = p.join(&name);
                all.push((
                    name,
                    if f.is_file() {
                        std::fs::read(f).unwrap()
                    } else {
                        vec![]
                    },
                ));
            }
            all
        } else {
            vec![(String::new(), std::fs::read(p).unwrap())]
        }
    };
    let before = snapshot(&d.join(input));
    refused(d, args, want);
    assert_eq!(snapshot(&d.join(input)), before, "{args:?} changed {input}");
}

#[test]
fn output_is_its_own_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    source(d);
    let cut = ["apply", "src", "--shape", "1,2,1", "--force", "--out"];
    refused_keeping(
        d,
        &[&cut[..], &["src"]].concat(),
        "the output src is the input src",
        "src",
    );
    refused_keeping(
        d,
        &[&cut[..], &["src/"]].concat(),
        "is the input src",
        "src",
    );
    refused_keeping(
        d,
        &[&cut[..], &["src/rec"]].concat(),
        "the output src/rec lies inside the input src",
        "src",
    );
    refused_keeping(
        d,
        &[&cut[..], &["."]].concat(),
        "the output . contains the input src",
        "src",
    );
    // After symlinks: an output named through a link to the source.
    std::os::unix::fs::symlink("src", d.join("link")).unwrap();
    refused_keeping(
        d,
        &[&cut[..], &["link"]].concat(),
        "the output link is the input src",
        "src",
    );
    std::fs::remove_file(d.join("link")).unwrap();
    // Without --force the refusal is the same: "pass --force" would be the wrong advice.
    refused_keeping(
        d,
        &["apply", "src", "--shape", "1,2,1", "--out", "src"],
        "the output src is the input src",
        "src",
    );
}

#[test]
fn output_overwrites_a_plan_or_a_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    plan(d);
    refused_keeping(
        d,
        &["apply", "plan.json", "--out", "plan.json", "--force"],
        "the output plan.json is the input plan.json",
        "plan.json",
    );
    // The plan's source, named by the plan: an output inside the source folder.
    refused_keeping(
        d,
        &["apply", "plan.json", "--out", "src/out", "--force"],
        "lies inside the input",
        "src",
    );
    // A model file and the config beside it.
    refused_keeping(
        d,
        &[
            "plan",
            "src/model.safetensors",
            "--shape",
            "1,2,1",
            "--out",
            "src/config.json",
            "--force",
        ],
        "the output src/config.json is the input src/config.json",
        "src",
    );
    gguf_model(d);
    refused_keeping(
        d,
        &[
            "plan", "m.gguf", "--shape", "1,1,0", "--out", "m.gguf", "--force",
        ],
        "the output m.gguf is the input m.gguf",
        "m.gguf",
    );
    std::fs::write(d.join("cal.txt"), "In the beginning.\n").unwrap();
    refused_keeping(
        d,
        &[
            "plan",
            "src",
            "--shape",
            "1,2,1",
            "--calibrate",
            "cal.txt",
            "--out",
            "cal.txt",
            "--force",
        ],
        "the output cal.txt is the input cal.txt",
        "cal.txt",
    );
}

#[test]
fn export_over_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    refused_keeping(
        d,
        &["export", "gguf", "rec", "--out", "rec", "--force"],
        "the output rec is the input rec",
        "rec",
    );
    refused_keeping(
        d,
        &["export", "safetensors", "rec", "--out", "rec/hf", "--force"],
        "the output rec/hf lies inside the input rec",
        "rec",
    );
    refused_keeping(
        d,
        &[
            "export",
            "gguf",
            "rec",
            "--out",
            "rec/model.safetensors",
            "--force",
        ],
        "lies inside the input rec",
        "rec",
    );
}

#[test]
fn heal_output_over_its_model_or_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    std::fs::write(d.join("train.txt"), "In the beginning.\n").unwrap();
    let heal = |out: &str| -> Vec<String> {
        [
            "heal",
            "rec",
            "--data",
            "train.txt",
            "--steps",
            "1",
            "--seq-len",
            "8",
            "--force",
            "--out",
            out,
        ]
        .map(String::from)
        .to_vec()
    };
    for (out, want, input) in [
        (
            "train.txt",
            "the output train.txt is the input train.txt",
            "train.txt",
        ),
        ("rec", "the output rec is the input rec", "rec"),
        (
            "rec/healed",
            "the output rec/healed lies inside the input rec",
            "rec",
        ),
        (".", "the output . contains the input rec", "rec"),
    ] {
        let args = heal(out);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused_keeping(d, &args, want, input);
    }
    // The checkpoints go to OUT.checkpoints, which --force clears: not over the model either.
    std::fs::rename(d.join("rec"), d.join("x.checkpoints")).unwrap();
    refused_keeping(
        d,
        &[
            "heal",
            "x.checkpoints",
            "--data",
            "train.txt",
            "--force",
            "--out",
            "x",
        ],
        "the output x.checkpoints is the input x.checkpoints",
        "x.checkpoints",
    );
}

// Resume writes only where its run was started for.

/// A finished 3-step heal run `d/run` from `d/rec`, with checkpoints at steps 1 and 2 in
/// `d/run.checkpoints`.
fn healed_run(d: &Path) {
    recurrent(d);
    let text: Vec<String> = (0..20)
        .map(|i| format!("{i}. In the beginning God created the heaven and the earth."))
        .collect();
    std::fs::write(d.join("train.txt"), text.join("\n\n")).unwrap();
    let o = surgery(
        d,
        &[
            "heal",
            "rec",
            "--data",
            "train.txt",
            "--out",
            "run",
            "--steps",
            "3",
            "--checkpoint-every",
            "1",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--holdout",
            "0",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

const STEP2: &str = "run.checkpoints/step-000002";

fn edit_state(d: &Path, edit: impl FnOnce(&mut Value)) {
    let path = d.join(STEP2).join("state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut state);
    std::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
}

#[test]
fn resume_refuses_a_state_naming_another_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    healed_run(d);
    std::fs::remove_dir_all(d.join("run")).unwrap();
    // A directory the edited checkpoint would have replaced.
    std::fs::create_dir(d.join("victim")).unwrap();
    std::fs::write(d.join("victim/keep.txt"), b"mine").unwrap();
    for said in [
        json!("victim"),
        json!(d.join("victim")),
        json!("../run"),
        json!("/"),
    ] {
        edit_state(d, |s| s["config"]["out"] = said.clone());
        refused_keeping(
            d,
            &["heal", "--resume", STEP2, "--force"],
            &format!(
                "run.checkpoints/step-000002/state.json says the run writes {}, but the checkpoint \
                 lies in the run of run; refusing to write elsewhere than run",
                said.as_str().unwrap()
            ),
            "victim",
        );
    }
}

#[test]
fn resume_refuses_to_replace_a_finished_run_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    healed_run(d);
    refused_keeping(
        d,
        &["heal", "--resume", STEP2],
        "run already exists (the finished output of this run); pass --force to replace it",
        "run",
    );
    // Something else where the output would go.
    std::fs::remove_dir_all(d.join("run")).unwrap();
    std::fs::write(d.join("run"), b"not a run").unwrap();
    refused_keeping(
        d,
        &["heal", "--resume", STEP2],
        "run already exists; pass --force to replace it",
        "run",
    );
}

#[test]
fn resume_refuses_what_is_not_a_checkpoint_of_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    healed_run(d);
    std::fs::remove_dir_all(d.join("run")).unwrap();
    // A copy of the checkpoint outside its run: no run to derive.
    let o = std::process::Command::new("cp")
        .args(["-r", STEP2, "ckpt"])
        .current_dir(d)
        .status()
        .unwrap();
    assert!(o.success());
    refused(
        d,
        &["heal", "--resume", "ckpt"],
        "ckpt is not a checkpoint of a heal run (expected OUT.checkpoints/step-N, a directory)",
    );
    std::fs::remove_dir_all(d.join("ckpt")).unwrap();
    // The weights as a FIFO: refused before anything is loaded.
    let weights = d.join(STEP2).join("weights.safetensors");
    std::fs::remove_file(&weights).unwrap();
    mkfifo(&weights);
    refused(
        d,
        &["heal", "--resume", STEP2],
        "weights.safetensors: is a FIFO (named pipe), not a regular file",
    );
}

#[test]
fn resume_refuses_inputs_inside_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    healed_run(d);
    std::fs::remove_dir_all(d.join("run")).unwrap();
    // The state names data inside the run's checkpoints, which a resumed run rewrites.
    std::fs::copy(d.join("train.txt"), d.join("run.checkpoints/train.txt")).unwrap();
    edit_state(d, |s| {
        s["config"]["data"] = json!(["run.checkpoints/train.txt"])
    });
    refused(
        d,
        &["heal", "--resume", STEP2],
        "the output run.checkpoints contains the input run.checkpoints/train.txt",
    );
}

#[test]
fn resume_from_another_directory_writes_beside_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    healed_run(d);
    let reference = std::fs::read(d.join("run/model.safetensors")).unwrap();
    std::fs::remove_dir_all(d.join("run")).unwrap();
    // The run moved into a sub-directory; its state still says `run`.
    std::fs::create_dir(d.join("moved")).unwrap();
    for name in ["rec", "train.txt"] {
        std::fs::rename(d.join(name), d.join("moved").join(name)).unwrap();
    }
    std::fs::rename(d.join("run.checkpoints"), d.join("moved/run.checkpoints")).unwrap();
    let o = surgery(
        &d.join("moved"),
        &["heal", "--resume", "run.checkpoints/step-000001", "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(d.join("moved/run/model.safetensors")).unwrap(),
        reference
    );
    assert!(!d.join("run").exists());
}

// Only regular files are read as files.

#[test]
fn weights_that_are_a_fifo_or_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let st = st_model(d);
    std::fs::remove_file(&st).unwrap();
    mkfifo(&st);
    apply_src(
        d,
        "src/model.safetensors: is a FIFO (named pipe), not a regular file",
    );
    refused(
        d,
        &["inspect", "src"],
        "is a FIFO (named pipe), not a regular file",
    );
    std::fs::remove_file(&st).unwrap();
    // Was "No such device (os error 19)" from mapping a directory.
    std::fs::create_dir(&st).unwrap();
    apply_src(
        d,
        "src/model.safetensors: is a directory, not a regular file",
    );
    std::fs::remove_dir(&st).unwrap();
    std::fs::remove_file(d.join("src/config.json")).unwrap();
    mkfifo(&d.join("src/config.json"));
    apply_src(
        d,
        "src/config.json: is a FIFO (named pipe), not a regular file",
    );
    mkfifo(&d.join("m.gguf"));
    refused(
        d,
        &["inspect", "m.gguf"],
        "m.gguf: is a FIFO (named pipe), not a regular file",
    );
}

#[test]
fn data_that_is_a_fifo_or_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    mkfifo(&d.join("fifo.txt"));
    std::os::unix::fs::symlink("/dev/zero", d.join("zero.jsonl")).unwrap();
    std::fs::create_dir(d.join("dir.txt")).unwrap();
    for (file, what) in [
        ("fifo.txt", "a FIFO (named pipe)"),
        ("zero.jsonl", "a character device"),
        ("dir.txt", "a directory"),
    ] {
        let want = format!("{file}: is {what}, not a regular file");
        let heal = [
            "heal", "rec", "--data", file, "--out", "healed", "--steps", "1",
        ];
        refused(d, &heal, &want);
        refused(d, &["eval", "rec", "--data", file], &want);
        refused(
            d,
            &["plan", "src", "--shape", "1,2,1", "--calibrate", file],
            &want,
        );
    }
    // A plan that is a FIFO.
    mkfifo(&d.join("p.json"));
    refused(
        d,
        &["apply", "p.json", "--out", "o"],
        "p.json: is a FIFO (named pipe), not a regular file",
    );
}

// Exit codes and names.

#[test]
fn an_unreadable_file_exits_with_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let st = st_model(d);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(d.join("src"), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Root reads anything: run as nobody when we are root.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    let mut cmd = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_surgery"));
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_surgery"))
    };
    let o = cmd
        .args(["apply", "src", "--shape", "1,2,1", "--out", "out"])
        .current_dir(d)
        .output()
        .unwrap();
    let err = stderr(&o);
    if root && err.contains("setpriv") {
        eprintln!("NOTICE: skipping: setpriv cannot drop to nobody here: {err}");
        return;
    }
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("src/model.safetensors: Permission denied (os error 13)"),
        "{err}"
    );
    assert_eq!(common::listing(d), ["src"]);
}

#[test]
fn a_long_output_name_is_written_through_a_short_partial_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    // 245 bytes: a legal name, too long for `NAME.partial-<pid>`.
    let long = "r".repeat(245);
    let o = surgery(
        d,
        &["apply", "src", "--shape", "1,2,1", "--out", &long, "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(surgery(d, &["verify", &long]).status.success());
    let gguf = format!("{}.gguf", "g".repeat(250));
    let o = surgery(d, &["export", "gguf", "rec", "--out", &gguf, "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plan = format!("{}.json", "p".repeat(250));
    let o = surgery(
        d,
        &["plan", "src", "--shape", "1,2,1", "--out", &plan, "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let mut want = vec![long, gguf, plan, "rec".into(), "src".into()];
    want.sort();
    assert_eq!(common::listing(d), want);
}

#[test]
fn outputs_get_their_parents_and_a_refusal_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    let o = surgery(d, &["export", "gguf", "rec", "--out", "a/b/m.gguf", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("a/b/m.gguf").is_file());
    // A refusal after the output was staged (the source changed since the plan was made).
    let o = surgery(
        d,
        &[
            "plan",
            "src",
            "--shape",
            "1,2,1",
            "--out",
            "plan.json",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let path = d.join("src/model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    refused(
        d,
        &["apply", "plan.json", "--out", "new/dir/out"],
        "changed since the plan was made: sha256",
    );
    refused(
        d,
        &["apply", "plan.json", "--out", "a/b/c/out"],
        "changed since the plan was made: sha256",
    );
    assert_eq!(common::listing(&d.join("a/b")), ["m.gguf"]);
}

#[test]
fn stale_partial_outputs_of_dead_processes_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    source(d);
    // A pid that no process holds now.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    assert!(!Path::new(&format!("/proc/{dead}")).exists());
    let live = std::process::id();
    std::fs::create_dir(d.join(format!("out.partial-{dead}"))).unwrap();
    std::fs::write(
        d.join(format!("out.partial-{dead}/model.safetensors")),
        b"x",
    )
    .unwrap();
    std::fs::write(d.join(format!("old.gguf.partial-{dead}")), b"x").unwrap();
    std::fs::create_dir(d.join(format!("busy.partial-{live}"))).unwrap();
    std::fs::create_dir(d.join("notes.partial-x")).unwrap();
    let o = surgery(
        d,
        &["apply", "src", "--shape", "1,2,1", "--out", "out", "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        common::listing(d),
        [
            format!("busy.partial-{live}"),
            "notes.partial-x".into(),
            "out".into(),
            "src".into()
        ]
    );
}

// A closed stdout.

/// Runs `args` in `d` with stdout a pipe whose reader is already gone.
fn with_closed_stdout(d: &Path, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_surgery"))
        .args(args)
        .current_dir(d)
        .env_remove("RUST_BACKTRACE")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_ends_the_output_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    for args in [
        &["inspect", "src"][..],
        &["inspect", "rec", "--json"],
        &["plan", "src", "--shape", "1,2,1"],
        &["plan", "src", "--shape", "1,2,1", "--json"],
        &["verify", "rec"],
        &["verify", "rec", "--json"],
    ] {
        let o = with_closed_stdout(d, args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}");
    }
}

// ---------------------------------------------------------------- issue 18: bounded memory

/// Runs `eval src --data FILE` (the static synthetic source, byte tokenizer) with `extra`.
fn eval_refused(d: &Path, file: &str, bytes: &[u8], extra: &[&str], want: &str) {
    source(d);
    std::fs::write(d.join(file), bytes).unwrap();
    let mut args = vec!["eval", "src", "--data", file];
    args.extend_from_slice(extra);
    refused(d, &args, want);
}

/// A `.jsonl` line longer than the 1 MiB that is parsed whole: `before`, 1.2 MB of words, `after`.
fn long_line(before: &str, after: &str) -> Vec<u8> {
    let mut line = before.as_bytes().to_vec();
    while line.len() < 1_200_000 {
        line.extend_from_slice(b"In the beginning God created the heaven and the earth. ");
    }
    line.extend_from_slice(after.as_bytes());
    line.push(b'\n');
    line
}

#[test]
fn long_jsonl_line_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let line = long_line(r#"{"text": ""#, r#"", "n": tru}"#);
    let column = line.len() - 1;
    eval_refused(
        dir.path(),
        "d.jsonl",
        &line,
        &[],
        &format!("d.jsonl:1: not valid JSON (expected ident at column {column})"),
    );
}

#[test]
fn long_jsonl_line_unterminated() {
    let dir = tempfile::tempdir().unwrap();
    let mut line = long_line(r#"{"text": ""#, "");
    line.pop();
    eval_refused(
        dir.path(),
        "d.jsonl",
        &line,
        &[],
        "d.jsonl:1: not valid JSON (EOF while parsing a string at column",
    );
}

#[test]
fn long_jsonl_line_without_the_text_field() {
    let dir = tempfile::tempdir().unwrap();
    eval_refused(
        dir.path(),
        "d.jsonl",
        &long_line(r#"{"body": ""#, r#""}"#),
        &[],
        "d.jsonl:1: no field `text` (choose the text field with --field)",
    );
}

#[test]
fn long_jsonl_line_field_not_a_string() {
    let dir = tempfile::tempdir().unwrap();
    eval_refused(
        dir.path(),
        "d.jsonl",
        &long_line(r#"{"pad": ""#, r#"", "text": [1]}"#),
        &[],
        "d.jsonl:1: field `text` is an array, not a string",
    );
}

#[test]
fn long_jsonl_line_not_an_object() {
    let dir = tempfile::tempdir().unwrap();
    eval_refused(
        dir.path(),
        "d.jsonl",
        &long_line(r#"[""#, r#""]"#),
        &[],
        "d.jsonl:1: expected a JSON object, found an array",
    );
}

#[test]
fn long_jsonl_line_with_a_raw_control_character() {
    let dir = tempfile::tempdir().unwrap();
    eval_refused(
        dir.path(),
        "d.jsonl",
        &long_line(r#"{"text": "tab	"#, r#""}"#),
        &[],
        "d.jsonl:1: not valid JSON (control character (\\u0000-\\u001F) found while parsing a \
         string at column 14)",
    );
}

#[test]
fn eval_window_too_large_for_memory() {
    let dir = tempfile::tempdir().unwrap();
    // 120,000 bytes, one token each: a first window of 100,000 tokens, whose attention scores
    // alone (4 heads, f32) take 2 x 4 x 10^10 x 4 bytes through the composed ops. (The fused ones
    // hold no scores: for them this window fits, and would run.)
    let text = "abcdefgh ".repeat(120_000 / 9);
    eval_refused(
        dir.path(),
        "d.txt",
        text.as_bytes(),
        &["--seq-len", "100000", "--kernels", "composed"],
        "a forward pass over 2 sequence(s) of 100000 tokens needs at least",
    );
}

#[test]
fn eval_max_tokens_zero() {
    let dir = tempfile::tempdir().unwrap();
    eval_refused(
        dir.path(),
        "d.txt",
        b"In the beginning.",
        &["--max-tokens", "0"],
        "--max-tokens 0 scores nothing; it must be at least 1",
    );
}

#[test]
fn heal_holdout_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    std::fs::write(d.join("d.txt"), "And God saw the light. ".repeat(40)).unwrap();
    refused(
        d,
        &[
            "heal",
            "rec",
            "--data",
            "d.txt",
            "--out",
            "healed",
            "--steps",
            "1",
            "--holdout",
            "1",
        ],
        "--holdout 1 leaves no window to train on; it must be below 1",
    );
}

/// Not a refusal: `eval --max-tokens 64` and `heal` on one 3 MB document (a `.jsonl` line the
/// scanner streams, and the same text as one `.txt` paragraph) read only what they use.
#[test]
fn one_huge_document_is_read_in_bounded_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    let words = "In the beginning God created the heaven and the earth. ".repeat(55_000);
    let line = serde_json::to_vec(&json!({ "id": 1, "text": words })).unwrap();
    std::fs::write(d.join("big.jsonl"), &line).unwrap();
    std::fs::write(d.join("big.txt"), &words).unwrap();
    for file in ["big.jsonl", "big.txt"] {
        let o = surgery(
            d,
            &[
                "eval",
                "rec",
                "--data",
                file,
                "--max-tokens",
                "64",
                "--seq-len",
                "32",
                "--json",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["documents"], 1, "{v}");
        assert_eq!(v["rows"][0]["tokens"], 64, "{v}");
    }
    let o = surgery(
        d,
        &[
            "heal",
            "rec",
            "--data",
            "big.jsonl",
            "--out",
            "healed",
            "--steps",
            "1",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--micro-batch",
            "2",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `d/m.gguf` with one more key: a u8 array of at least `n` elements (padded so the header
/// grows by a whole number of 32-byte alignments, keeping the tensor data aligned: 5,000,000
/// becomes 5,000,021 under the key below).
fn gguf_with_array(d: &Path, key: &str, n: usize) {
    let path = gguf_model(d);
    let mut bytes = std::fs::read(&path).unwrap();
    let mut kv = (key.len() as u64).to_le_bytes().to_vec();
    kv.extend_from_slice(key.as_bytes());
    kv.extend_from_slice(&9u32.to_le_bytes()); // array
    kv.extend_from_slice(&0u32.to_le_bytes()); // of u8
    let n = n + (32 - (kv.len() + 8 + n) % 32) % 32;
    kv.extend_from_slice(&(n as u64).to_le_bytes());
    kv.resize(kv.len() + n, 7);
    let n_kv = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    bytes[16..24].copy_from_slice(&(n_kv + 1).to_le_bytes());
    bytes.splice(24..24, kv);
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn gguf_kept_array_too_long() {
    let dir = tempfile::tempdir().unwrap();
    gguf_with_array(dir.path(), "tokenizer.ggml.junk", 5_000_000);
    plan_gguf(
        dir.path(),
        "m.gguf",
        "key \"tokenizer.ggml.junk\" holds an array of 5000021 elements; at most 4194304 are read",
    );
}

#[test]
fn gguf_unread_array_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gguf_with_array(d, "junk.big", 1000);
    // The array claims 2^40 elements: bounded by the bytes left before anything is read.
    let path = d.join("m.gguf");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = 24 + 8 + "junk.big".len() + 8;
    bytes[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    plan_gguf(
        d,
        "m.gguf",
        "array length of key \"junk.big\" 1099511627776 cannot fit in the",
    );
}

/// Not a refusal: an array of 40M elements under a key nothing reads is checked, not kept.
#[test]
fn gguf_huge_unread_array_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gguf_with_array(d, "junk.big", 40_000_000);
    let o = surgery(d, &["inspect", "m.gguf", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn safetensors_header_with_too_many_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = st_model(dir.path());
    edit_header(&path, |h| {
        for i in 0..70_000 {
            h.insert(
                format!("e{i}"),
                json!({"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}),
            );
        }
    });
    apply_src(dir.path(), "the header lists more than 65536 entries");
}

// ---------------------------------------------------------------- issue 18: non-finite values

#[test]
fn adapter_noise_past_f32() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    source(d);
    refused(
        d,
        &[
            "plan",
            "src",
            "--shape",
            "1,2,1",
            "--adapter-noise",
            "1e39",
            "--out",
            "plan.json",
        ],
        "--adapter-noise 1e39 must be a finite number >= 0 and at most f32's 3.4028235e38",
    );
}

/// Sets the adapter's init in the plan.
fn adapter_init(d: &Path, init: Value) {
    edit_plan(d, |p| {
        let tensors = p["tensors"].as_array_mut().unwrap();
        let adapter = tensors
            .iter_mut()
            .find(|t| t.get("init").is_some())
            .unwrap();
        adapter["init"] = init;
    });
}

#[test]
fn plan_uniform_scale_past_f32() {
    let dir = tempfile::tempdir().unwrap();
    adapter_init(
        dir.path(),
        json!({"kind": "uniform", "scale": 1e39, "seed": 0}),
    );
    apply_plan(
        dir.path(),
        "init scale 1e39 must be finite, >= 0 and at most f32's",
    );
}

#[test]
fn plan_noise_that_overflows_when_drawn() {
    let dir = tempfile::tempdir().unwrap();
    // A finite f32 scale, but N(0, (3e38)^2) draws past f32's largest number about a quarter of
    // the time.
    adapter_init(
        dir.path(),
        json!({"kind": "identity", "scale": 3e38, "seed": 0}),
    );
    apply_plan(dir.path(), "init scale 3e38 gives");
}

#[test]
fn apply_conversion_that_overflows_f16() {
    let dir = tempfile::tempdir().unwrap();
    poison(dir.path(), 1e6);
    refused(
        dir.path(),
        &[
            "apply", "src", "--shape", "1,2,1", "--dtype", "f16", "--out", "out",
        ],
        "1 finite values of model.layers.1.mlp.up_proj.weight become NaN or Inf as F16",
    );
}

#[test]
fn export_conversion_that_overflows_f16() {
    let dir = tempfile::tempdir().unwrap();
    poison(dir.path(), 1e6);
    refused(
        dir.path(),
        &["export", "gguf", "src", "--type", "f16", "--out", "m.gguf"],
        "tensor \"model.layers.1.mlp.up_proj.weight\": 1 finite values become NaN or Inf as F16",
    );
}

#[test]
fn config_rope_theta_too_small() {
    let dir = tempfile::tempdir().unwrap();
    edit_config(dir.path(), |c| {
        c.insert("rope_theta".into(), json!(1e-300));
    });
    apply_src(dir.path(), "rope_theta 1e-300 must be greater than 1");
}

fn llama3_rope(d: &Path, factor: f64, low: f64, high: f64, original: u64) {
    edit_config(d, |c| {
        c.insert(
            "rope_scaling".into(),
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": original}),
        );
    });
}

#[test]
fn config_llama3_rope_factor_zero() {
    let dir = tempfile::tempdir().unwrap();
    llama3_rope(dir.path(), 0.0, 1.0, 4.0, 8192);
    apply_src(
        dir.path(),
        "rope_scaling: factor 0 must be at least 1 and finite",
    );
}

#[test]
fn config_llama3_rope_equal_frequency_factors() {
    let dir = tempfile::tempdir().unwrap();
    llama3_rope(dir.path(), 8.0, 4.0, 4.0, 8192);
    apply_src(
        dir.path(),
        "rope_scaling: high_freq_factor 4 must be greater than low_freq_factor 4",
    );
}

#[test]
fn config_llama3_rope_original_context_zero() {
    let dir = tempfile::tempdir().unwrap();
    llama3_rope(dir.path(), 8.0, 1.0, 4.0, 0);
    apply_src(
        dir.path(),
        "rope_scaling: original_max_position_embeddings must be at least 1",
    );
}

/// Edits `d/rec/config.json` (a recurrent checkpoint) and its manifest entry, so that only the
/// edit is wrong.
fn edit_recurrent_config(d: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    recurrent(d);
    let path = d.join("rec/config.json");
    let mut config: Map<String, Value> =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    let bytes = serde_json::to_vec(&config).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let manifest = d.join("rec/manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    for f in m["files"].as_array_mut().unwrap() {
        if f["path"] == "config.json" {
            f["bytes"] = json!(bytes.len());
            f["sha256"] = json!(surgery::manifest::sha256_bytes(&bytes));
        }
    }
    std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[test]
fn recurrent_config_mean_recurrence_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    edit_recurrent_config(d, |c| {
        c.insert("mean_recurrence".into(), json!(0));
    });
    let want = "mean_recurrence 0 is out of range 1..=65536";
    refused(d, &["verify", "rec"], want);
    refused(d, &["export", "gguf", "rec", "--out", "r.gguf"], want);
}

#[test]
fn recurrent_config_state_std_past_f32() {
    let dir = tempfile::tempdir().unwrap();
    edit_recurrent_config(dir.path(), |c| {
        c.insert(
            "init_values".into(),
            json!({"std": 1e39, "embed_scale": 1.0}),
        );
    });
    refused(
        dir.path(),
        &["verify", "rec"],
        "init_values.std 1e39 must be finite, >= 0 and at most f32's",
    );
}

// ---------------------------------------------------------------- issue 18: token ids

fn edit_tokenizer(d: &Path, edit: impl FnOnce(&mut Value)) {
    let path = source(d).join("tokenizer.json");
    let mut t: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut t);
    std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
}

#[test]
fn tokenizer_added_token_past_the_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    edit_tokenizer(d, |t| {
        t["added_tokens"] = json!([{"id": 300, "content": "<|x|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}]);
    });
    let want = "tokenizer.json: the tokenizer has token ids up to 300, but the embedding has 256 \
                rows (vocab_size); ids from 256 on would index past it";
    refused(d, &["inspect", "src"], want);
    apply_src(d, want);
}

#[test]
fn tokenizer_vocabulary_past_the_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    edit_tokenizer(d, |t| {
        t["model"]["vocab"]["zz"] = json!(4095);
    });
    refused(
        d,
        &["inspect", "src"],
        "the tokenizer has token ids up to 4095, but the embedding has 256 rows",
    );
}

// ---------------------------------------------------------------- issue 18: checkpoint state

/// A heal run of 4 steps with a checkpoint at step 2, then `edit` on its state.json; `heal
/// --resume` from it must refuse with `want`.
fn resume_refused(edit: impl FnOnce(&mut Value), want: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent(d);
    std::fs::write(
        d.join("d.txt"),
        "And God saw the light, that it was good. ".repeat(60),
    )
    .unwrap();
    let o = surgery(
        d,
        &[
            "heal",
            "rec",
            "--data",
            "d.txt",
            "--out",
            "healed",
            "--steps",
            "4",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--checkpoint-every",
            "2",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(d.join("healed")).unwrap();
    let ckpt = d.join("healed.checkpoints/step-000002");
    let path = ckpt.join("state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut state);
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    refused(
        d,
        &["heal", "--resume", "healed.checkpoints/step-000002"],
        &format!("healed.checkpoints/step-000002/state.json: {want}"),
    );
}

#[test]
fn checkpoint_cursor_does_not_match_the_step() {
    resume_refused(
        |s| s["cursor"] = json!(5),
        "cursor 5 does not match step 2 of batches of 2",
    );
}

#[test]
fn checkpoint_step_past_the_run() {
    resume_refused(
        |s| s["step"] = json!(9),
        "step 9 is outside the run of 4 steps",
    );
}

#[test]
fn checkpoint_negative_learning_rate() {
    resume_refused(
        |s| s["config"]["lr"] = json!(-1.0),
        "--lr -1 must be a positive number",
    );
}

#[test]
fn checkpoint_zero_sequence_length() {
    resume_refused(
        |s| s["config"]["seq_len"] = json!(0),
        "--seq-len, --batch and --micro-batch must be at least 1",
    );
}

#[test]
fn checkpoint_unknown_key() {
    resume_refused(|s| s["config"]["lrr"] = json!(1), "unknown field `lrr`");
}
