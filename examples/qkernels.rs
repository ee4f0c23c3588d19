//! Our quantized kernels (`surgery::model::qkernels`) against candle-core's `k_quants`, an f32
//! matrix product (candle's gemm, what `--dequantize` runs) and a plain memory copy, on the
//! matrices of SmolLM2-135M (30 layers of q 576x576, k/v 192x576, o 576x576, gate/up 1536x576,
//! down 576x1536, and the 49152x576 output matrix; 135 M weights, more than any cache).
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release --example qkernels -- [REPEATS]
//! ```
//!
//! Prints one line per measurement, `name value unit`: matrix-vector products over the whole
//! stack (one decoded token's weights) as GB/s of weight bytes streamed, and 511-row products
//! over one layer (a window of `eval`) as rows/s. Best of REPEATS (default 5). Threads follow
//! RAYON_NUM_THREADS, for candle and for us.

use std::borrow::Cow;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QuantizedType};
use candle_core::{Device, Tensor};
use surgery::dtype::DType;
use surgery::formats::gguf::quantize;
use surgery::model::qkernels::{Isa, Kind, QMatrix};
use surgery::synth::SplitMix64;

/// (rows, cols) of one SmolLM2-135M layer's matrices.
const LAYER: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];

/// One matrix in every form measured.
struct Matrix {
    ours: QMatrix,
    candle: Box<dyn QuantizedType>,
    dense: Tensor,
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect()
}

fn matrix(
    kind: Kind,
    (rows, cols): (usize, usize),
    seed: u64,
) -> Result<Matrix, Box<dyn std::error::Error>> {
    let (dtype, ggml) = match kind {
        Kind::Q8_0 => (DType::Q8_0, GgmlDType::Q8_0),
        Kind::Q4_0 => (DType::Q4_0, GgmlDType::Q4_0),
    };
    let w = values(rows * cols, seed);
    let bytes = quantize(dtype, &w)?;
    Ok(Matrix {
        ours: QMatrix::new(kind, &bytes, rows, cols)?,
        candle: ggml.from_data(Cow::Borrowed(&bytes)),
        dense: Tensor::from_vec(w, (rows, cols), &Device::Cpu)?,
    })
}

/// A product of every matrix of a stack with its activations, timed.
type Run<'a> = Box<dyn Fn() -> Result<(), Box<dyn std::error::Error>> + 'a>;

/// Best seconds of each run over `repeats` rounds, the runs interleaved within each round, so
/// that a machine whose load changes (other engineers compiling) slows them alike.
fn best_interleaved(repeats: usize, runs: &[Run]) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let mut best = vec![f64::MAX; runs.len()];
    for round in 0..=repeats {
        for (run, best) in runs.iter().zip(&mut best) {
            let t = Instant::now();
            run()?;
            // Round 0 warms up (pages touched, threads started).
            if round > 0 {
                *best = best.min(t.elapsed().as_secs_f64());
            }
        }
    }
    Ok(best)
}

/// m rows of activations times every matrix of `stack`: ours on every instruction set this CPU
/// runs, candle's `k_quants`, candle's f32 matmul; prints `label name per/seconds unit` lines.
fn products(
    stack: &[Matrix],
    m: usize,
    repeats: usize,
    label: &str,
    per: f64,
    unit: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let xs: Vec<Vec<f32>> = stack.iter().map(|w| values(m * w.ours.cols(), 3)).collect();
    let xt: Vec<Tensor> = stack
        .iter()
        .zip(&xs)
        .map(|(w, x)| Tensor::from_slice(x, (m, w.ours.cols()), &Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    let (xs, xt) = (&xs, &xt);
    let mut names = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    for isa in Isa::available() {
        names.push(format!("ours-{isa:?}"));
        runs.push(Box::new(move || {
            for (w, x) in stack.iter().zip(xs) {
                std::hint::black_box(w.ours.matmul_t_on(isa, x, m)?);
            }
            Ok(())
        }));
    }
    names.push("candle".into());
    runs.push(Box::new(move || {
        for (w, x) in stack.iter().zip(xs) {
            let mut out = vec![0f32; m * w.ours.rows()];
            w.candle
                .matmul_t((m, w.ours.cols(), w.ours.rows()), x, &mut out)?;
            std::hint::black_box(out);
        }
        Ok(())
    }));
    names.push("f32".into());
    runs.push(Box::new(move || {
        for (w, x) in stack.iter().zip(xt) {
            // (m, cols) @ (cols, rows) -> (m, rows)
            std::hint::black_box(x.matmul(&w.dense.t()?)?);
        }
        Ok(())
    }));
    for (name, t) in names.iter().zip(best_interleaved(repeats, &runs)?) {
        println!("{label} {name} {:.2} {unit}", per / t);
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let repeats = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5);
    let copy_src = vec![1f32; 1 << 27];
    let mut copy_dst = vec![0f32; 1 << 27];
    let mut copy = f64::MAX;
    for _ in 0..=repeats {
        let t = Instant::now();
        copy_dst.copy_from_slice(std::hint::black_box(&copy_src));
        std::hint::black_box(&mut copy_dst);
        copy = copy.min(t.elapsed().as_secs_f64());
    }
    println!("copy {:.2} GB/s", (copy_src.len() * 4) as f64 / copy / 1e9);
    drop((copy_src, copy_dst));
    for kind in [Kind::Q8_0, Kind::Q4_0] {
        let mut stack = Vec::new();
        for layer in 0..30 {
            for (i, &shape) in LAYER.iter().enumerate() {
                stack.push(matrix(kind, shape, (layer * 10 + i) as u64)?);
            }
        }
        stack.push(matrix(kind, (49152, 576), 999)?);
        let weights: usize = stack.iter().map(|w| w.ours.rows() * w.ours.cols()).sum();
        let q_bytes = (weights / 32 * kind.block_bytes()) as f64 / 1e9;
        println!("# {kind:?}: {weights} weights, {q_bytes:.3} GB as blocks");
        // GB/s of the quantized bytes for ours and candle's; the f32 line is rescaled below.
        products(
            &stack,
            1,
            repeats,
            &format!("matvec-{kind:?}"),
            q_bytes,
            "GB/s",
        )?;
        println!(
            "# f32 matvec streams {:.3} GB: multiply its line by {:.2} for its own GB/s",
            weights as f64 * 4e-9,
            weights as f64 * 4e-9 / q_bytes
        );
        products(
            &stack[..7],
            511,
            repeats,
            &format!("matmul511-{kind:?}"),
            511.0,
            "rows/s",
        )?;
    }
    Ok(())
}
