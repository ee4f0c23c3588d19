//! Equivalence with an implementation nobody here wrote: llama.cpp's Python `gguf` package (run
//! through scripts/gguf_dequant.py) must see the same tensor types and shapes as our reader, and
//! dequantize to the same f32 bit patterns as our `dequantize`, on synthetic tensors of every
//! supported type and on the real SmolLM2 GGUF.

mod common;

use std::path::Path;
use std::process::Command;

use surgery::dtype::DType;
use surgery::formats::gguf::{dequantize, quantize, write_gguf, GgufFile, Value};

/// One line of the script's output: name, gguf type name, row-major shape.
struct Reference {
    name: String,
    type_name: String,
    shape: Vec<usize>,
}

/// Runs scripts/gguf_dequant.py on `gguf` for `names`, writing the values under `out`.
fn run_reference(python: &Path, gguf: &Path, out: &Path, names: &[String]) -> Vec<Reference> {
    let output = Command::new(python)
        .arg(common::root().join("scripts/gguf_dequant.py"))
        .arg(gguf)
        .arg(out)
        .args(names)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "gguf_dequant.py failed: {}",
        common::stderr(&output)
    );
    common::stdout(&output)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let [name, type_name, shape] = fields[..] else {
                panic!("unexpected line {line:?}");
            };
            Reference {
                name: name.to_string(),
                type_name: type_name.to_string(),
                shape: shape.split(',').map(|d| d.parse().unwrap()).collect(),
            }
        })
        .collect()
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let (words, rest) = bytes.as_chunks::<4>();
    assert!(rest.is_empty(), "{} is not whole f32s", path.display());
    words.iter().map(|w| f32::from_le_bytes(*w)).collect()
}

/// Asserts that gguf and we agree on the type, shape and every value's bits of each of
/// `names` in `path`; returns the number of values compared.
fn assert_matches_reference(python: &Path, path: &Path, names: &[String]) -> usize {
    let file = GgufFile::open(path).unwrap();
    let out = tempfile::tempdir().unwrap();
    let references = run_reference(python, path, out.path(), names);
    assert_eq!(references.len(), names.len());
    let mut compared = 0;
    for r in references {
        let info = file.tensor(&r.name).unwrap();
        assert_eq!(info.dtype.name(), r.type_name, "{}: type", r.name);
        assert_eq!(info.shape, r.shape, "{}: shape", r.name);
        let ours = dequantize(info.dtype, file.bytes(info), info.n_elements()).unwrap();
        let theirs = read_f32(&out.path().join(format!("{}.f32", r.name)));
        assert_eq!(ours.len(), theirs.len(), "{}: element count", r.name);
        let mismatch = ours
            .iter()
            .zip(&theirs)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(i) = mismatch {
            panic!(
                "{} ({}): first mismatch at element {i}: ours {} ({:#010x}), gguf {} ({:#010x})",
                r.name,
                info.dtype,
                ours[i],
                ours[i].to_bits(),
                theirs[i],
                theirs[i].to_bits()
            );
        }
        compared += ours.len();
    }
    compared
}

/// Deterministic values in (-1, 1), one decade of scale per row from 1e-4 to 1e3, with a run of
/// zeros (a block whose scale is 0) and a few outliers.
fn values(rows: usize, cols: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale = 10f32.powi(r as i32 - 4);
        for c in 0..cols {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let u = (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
            let x = match (r, c) {
                (0, 0..64) => 0.0,
                (_, c) if c % 101 == 7 => 8.0 * (2.0 * u - 1.0),
                _ => 2.0 * u - 1.0,
            };
            out.push(x * scale);
        }
    }
    out
}

#[test]
fn synthetic_tensors_of_every_type_match_gguf_bit_for_bit() {
    let Some(python) = common::python_with_gguf() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("every_type.gguf");
    // [8, 512]: two Q*_K super-blocks per row.
    let (rows, cols) = (8, 512);
    let tensors: Vec<_> = DType::ALL
        .into_iter()
        .map(|dtype| {
            let bytes = quantize(dtype, &values(rows, cols)).unwrap();
            (format!("t.{dtype}"), dtype, vec![rows, cols], bytes)
        })
        .collect();
    let metadata = vec![(
        "general.architecture".to_string(),
        Value::String("synthetic".into()),
    )];
    write_gguf(&path, &metadata, &tensors).unwrap();

    let names: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
    let compared = assert_matches_reference(&python, &path, &names);
    assert_eq!(compared, DType::ALL.len() * rows * cols);
}

/// Random bytes as a tensor of `dtype`, with every f16 field (block scales and minimums, F16
/// elements) forced finite: NaN payloads are not what this test is about.
fn random_bytes(dtype: DType, n_elements: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let n_bytes = dtype.size_of(n_elements as u64).unwrap() as usize;
    let mut bytes: Vec<u8> = (0..n_bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    // Byte offsets of the f16 fields in each block (ggml-common.h `block_*`).
    let f16_fields: &[usize] = match dtype {
        DType::F32 | DType::BF16 => &[],
        DType::F16 | DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K => &[0, 2],
        DType::Q6K => &[208],
        // Q2_K: scales[16], qs[64], then d, dmin; Q3_K: hmask[32], qs[64], scales[12], then d.
        DType::Q2K => &[80, 82],
        DType::Q3K => &[108],
    };
    for block in bytes.chunks_exact_mut(dtype.type_size()) {
        for &at in f16_fields {
            // An all-ones exponent is inf or NaN: clear its top bit.
            if block[at + 1] & 0x7c == 0x7c {
                block[at + 1] &= !0x40;
            }
        }
    }
    bytes
}

#[test]
fn random_bytes_of_every_type_match_gguf_bit_for_bit() {
    let Some(python) = common::python_with_gguf() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.gguf");
    let (rows, cols) = (16, 1024);
    let tensors: Vec<_> = DType::ALL
        .into_iter()
        .enumerate()
        .map(|(i, dtype)| {
            let bytes = random_bytes(dtype, rows * cols, 0x51_7cc1_b727_220a ^ i as u64);
            (format!("r.{dtype}"), dtype, vec![rows, cols], bytes)
        })
        .collect();
    write_gguf(&path, &[], &tensors).unwrap();

    let names: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
    let compared = assert_matches_reference(&python, &path, &names);
    assert_eq!(compared, DType::ALL.len() * rows * cols);
}

#[test]
fn smollm2_tensors_match_gguf_bit_for_bit() {
    let (Some(python), Some(model)) = (common::python_with_gguf(), common::smollm2()) else {
        return;
    };
    let file = GgufFile::open(&model).unwrap();
    assert_eq!(file.get_str("general.architecture"), Some("llama"));
    assert_eq!(file.get_u64("llama.block_count"), Some(30));
    assert_eq!(
        file.get_array("tokenizer.ggml.tokens").map(<[_]>::len),
        Some(49152)
    );
    assert_eq!(file.tensors.len(), 272);
    assert_eq!(file.alignment, 32);

    // The Q8_0 embedding, the final norm, and every tensor of the first and last blocks
    // (Q4_1 projections, F32 norms).
    let names: Vec<String> = file
        .tensors
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| {
            n == "token_embd.weight"
                || n == "output_norm.weight"
                || n.starts_with("blk.0.")
                || n.starts_with("blk.29.")
        })
        .collect();
    assert_eq!(names.len(), 20);
    let compared = assert_matches_reference(&python, &model, &names);
    assert!(compared > 49152 * 576, "compared {compared} values");
}
