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
    // alone (4 heads, f32) take 2 x 4 x 10^10 x 4 bytes.
    let text = "abcdefgh ".repeat(120_000 / 9);
    eval_refused(
        dir.path(),
        "d.txt",
        text.as_bytes(),
        &["--seq-len", "100000"],
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
