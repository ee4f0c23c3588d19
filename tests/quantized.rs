//! Quantized GGUF weights kept as stored (`Weights::Stored`, the default of eval and generate):
//! they must multiply as ggml does, activations rounded to Q8_0 blocks first (checked against
//! llama.cpp's Python `gguf` package), and a model loaded that way must be the same model as the
//! dequantized one: the same values when made dense, logits that differ only by that rounding.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use surgery::dtype::DType;
use surgery::formats::gguf::{dequantize, quantize};
use surgery::model::{kept_as_stored, last_logits, InitialState, Model, Part, Weight, Weights};
use surgery::source::SourceModel;
use surgery::synth::SplitMix64;

const CPU: Device = Device::Cpu;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n)
        .map(|_| (rng.uniform() * 2.0 - 1.0) * scale)
        .collect()
}

fn write_f32(path: &Path, values: &[f32]) {
    std::fs::write(
        path,
        values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .as_chunks::<4>()
        .0
        .iter()
        .map(|w| f32::from_le_bytes(*w))
        .collect()
}

/// rows (m x k) @ cols (n x k)^T in f64.
fn matmul_t(rows: &[f32], cols: &[f32], k: usize) -> Vec<f64> {
    rows.chunks(k)
        .flat_map(|x| {
            cols.chunks(k).map(move |w| {
                x.iter()
                    .zip(w)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
            })
        })
        .collect()
}

fn max_abs(a: &[f64], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, &y)| (x - f64::from(y)).abs())
        .fold(0.0, f64::max)
}

#[test]
fn stored_blocks_multiply_as_ggml_with_activations_rounded_to_q8_0() {
    let Some(python) = common::python_with_gguf() else {
        return;
    };
    let (m, n, k) = (7, 48, 256);
    // Rows of very different magnitudes, so each row gets its own block scales.
    let x: Vec<f32> = (0..m)
        .flat_map(|i| values(k, 100 + i as u64, 0.01 * 10f32.powi(i as i32 % 4)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_f32(&dir.path().join("x.f32"), &x);
    let o = Command::new(&python)
        .arg(common::root().join("scripts/gguf_q8_0_rows.py"))
        .args([dir.path().join("x.f32"), dir.path().join("xq.f32")])
        .arg(k.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let xq = read_f32(&dir.path().join("xq.f32"));
    assert_ne!(xq, x, "the reference rounds the activations");

    let input = Tensor::from_vec(x.clone(), (m, k), &CPU).unwrap();
    // Q8_0 and Q4_0 both take Q8_0 activations in ggml (their vec_dot_type).
    for dtype in [DType::Q8_0, DType::Q4_0] {
        assert!(kept_as_stored(dtype));
        let bytes = quantize(dtype, &values(n * k, 7, 0.5)).unwrap();
        let w = dequantize(dtype, &bytes, n * k).unwrap();
        let weight = Weight::Quantized(vec![Part::new(dtype, &bytes, (n, k), &CPU).unwrap()]);
        let ours = weight.forward(&input).unwrap();
        assert_eq!(ours.dims(), [m, n]);
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();

        let reference = matmul_t(&xq, &w, k);
        let unrounded = matmul_t(&x, &w, k);
        // Per row, relative to the row's largest output (rows differ by 1000x in scale).
        for row in 0..m {
            let span = row * n..(row + 1) * n;
            let scale = reference[span.clone()]
                .iter()
                .fold(0f64, |a, v| a.max(v.abs()));
            let err = max_abs(&reference[span.clone()], &ours[span.clone()]) / scale;
            let rounding = max_abs(&unrounded[span.clone()], &ours[span]) / scale;
            assert!(err < 5e-7, "{dtype:?} row {row}: {err:e} from ggml's rule");
            // The check can tell the rule apart from an f32 product of the same weights.
            assert!(
                rounding > 1000.0 * err,
                "{dtype:?} row {row}: rounding {rounding:e} vs {err:e}"
            );
        }
        // Made dense, a stored weight is its exact values.
        let mut weight = weight;
        let dense = weight.dense().unwrap().flatten_all().unwrap();
        assert_eq!(dense.to_vec1::<f32>().unwrap(), w, "{dtype:?}");
    }
}

/// A recurrent (2,2,2) cut of a synthetic Llama with a noisy adapter, exported as a q8_0 GGUF: its
/// q, k, v (Q and K rows permuted by llama.cpp's convention) are separate stored tensors that the
/// model fuses.
fn recurrent_q8_0(dir: &Path) -> SourceModel {
    common::noisy_recurrent_cut(dir, 3);
    let args = [
        "export", "gguf", "rec", "--type", "q8_0", "--out", "rec.gguf", "-q",
    ];
    let o = common::surgery(dir, &args);
    assert!(o.status.success(), "{args:?}: {}", common::stderr(&o));
    SourceModel::open(&dir.join("rec.gguf")).unwrap()
}

#[test]
fn a_stored_model_is_the_dequantized_model_up_to_activation_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let source = recurrent_q8_0(dir.path());
    let exact = Model::load(&source, &CPU).unwrap();
    let mut stored = Model::load_as(&source, None, &CPU, Weights::Stored).unwrap();
    let ids = Tensor::new(&[[3u32, 7, 1, 200, 9, 41, 88]], &CPU).unwrap();
    for r in [1, 3] {
        let logits = |m: &Model| {
            let out = m
                .forward(&ids, None, r, InitialState::Seeded(0), None)
                .unwrap();
            last_logits(&out).unwrap()
        };
        let (a, b) = (logits(&exact), logits(&stored));
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff > 0.0,
            "r = {r}: the stored model rounds its activations"
        );
        // A wrong row order (Q/K permutation, q/k/v parts) would change the logits wholesale.
        assert!(diff < 0.03 * scale, "r = {r}: {diff} of {scale}");
    }
    // Made dense (to train or save), it holds exactly the dequantized values.
    let (a, b) = (
        Model::load(&source, &CPU).unwrap().named_tensors().unwrap(),
        stored.named_tensors().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let (va, vb) = (
            ta.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            tb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(va, vb, "{na}");
    }
}

#[test]
fn stored_k_quants_keep_their_row_layout() {
    // ggml rounds activations to Q8_K (one scale per 256 values) for the k-quants; the Python
    // package has no Q8_K, so this checks the layout against the f32 product of the same weights,
    // within that rounding, and that every row and column lands where it belongs.
    let (m, n, k) = (3, 32, 512);
    let x = values(m * k, 5, 1.0);
    let input = Tensor::from_vec(x.clone(), (m, k), &CPU).unwrap();
    for dtype in [DType::Q4K, DType::Q5K, DType::Q6K] {
        assert!(kept_as_stored(dtype));
        let bytes = quantize(dtype, &values(n * k, 9, 0.5)).unwrap();
        let w = dequantize(dtype, &bytes, n * k).unwrap();
        let weight = Weight::Quantized(vec![Part::new(dtype, &bytes, (n, k), &CPU).unwrap()]);
        let ours = weight.forward(&input).unwrap();
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let exact = matmul_t(&x, &w, k);
        let scale = exact.iter().fold(0f64, |a, v| a.max(v.abs()));
        let err = max_abs(&exact, &ours) / scale;
        assert!(err > 0.0 && err < 3e-3, "{dtype:?}: {err:e}");
    }
    for dtype in [DType::Q4_1, DType::Q5_0, DType::Q5_1, DType::F16] {
        assert!(!kept_as_stored(dtype), "{dtype:?} is dequantized at load");
    }
}

#[test]
fn eval_and_generate_take_dequantize() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    recurrent_q8_0(d);
    std::fs::write(
        d.join("held.txt"),
        "Some held-out text to score with the model, long enough for a few windows of tokens.\n",
    )
    .unwrap();
    let ppl = |extra: &[&str]| -> Vec<f64> {
        let mut args = vec![
            "eval",
            "rec.gguf",
            "--data",
            "held.txt",
            "--recurrence",
            "1,3",
        ];
        args.extend_from_slice(&["--seq-len", "16", "--json", "-q"]);
        args.extend_from_slice(extra);
        let o = common::surgery(d, &args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&common::stdout(&o)).unwrap();
        let rows = v["rows"].as_array().unwrap();
        rows.iter()
            .map(|r| r["perplexity"].as_f64().unwrap())
            .collect()
    };
    let (stored, exact) = (ppl(&[]), ppl(&["--dequantize"]));
    for (a, b) in stored.iter().zip(&exact) {
        assert_ne!(a, b, "the default rounds activations");
        assert!((a - b).abs() / b < 0.01, "{a} vs {b}");
    }
    let o = common::surgery(
        d,
        &[
            "generate",
            "rec.gguf",
            "--prompt",
            "Some",
            "--max-tokens",
            "4",
            "--dequantize",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
}

#[test]
fn stored_blocks_of_the_wrong_length_are_refused() {
    // Q8_0 and Q4_0 run on our kernels (issue 22), which check the bytes themselves: the same
    // errors as the rest of the GGUF reader, naming the type, the count and both lengths.
    for (dtype, block) in [(DType::Q8_0, 34), (DType::Q4_0, 18)] {
        let short = vec![0u8; 3 * block - 1];
        let Err(e) = Part::new(dtype, &short, (3, 32), &CPU) else {
            panic!("{dtype:?}: a short buffer was accepted");
        };
        let want = format!(
            "{dtype} data for 96 elements must be {} bytes, got {}",
            3 * block,
            3 * block - 1
        );
        assert_eq!(e.to_string(), want);
        let Err(e) = Part::new(dtype, &vec![0u8; 3 * block], (2, 48), &CPU) else {
            panic!("{dtype:?}: rows of 48 values are not whole blocks");
        };
        assert!(e.to_string().contains("not a whole number of"), "{e}");
    }
}
