//! Micro-benchmark of the fused ops against the composed ones they replace, on SmolLM2-135M's
//! shapes: 512 rows (2 x 256 tokens), hidden 576, 9 query and 3 key-value heads of 64, FFN 1536,
//! vocabulary 49152. Forward alone and forward + backward, median of the repeats, in ms.
//!
//!   cargo run --release --example fused_ops [REPEATS]

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use surgery::model::composed;
use surgery::model::fused::{norm, rope, swiglu, xent};

const B: usize = 2;
const T: usize = 256;
const ROWS: usize = B * T;
const HIDDEN: usize = 576;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const FFN: usize = 1536;
const VOCAB: usize = 49152;

type Op<'a> = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor> + 'a>;

fn random(dims: &[usize], scale: f64) -> candle_core::Result<Var> {
    let t = (Tensor::rand(-1f32, 1f32, dims, &Device::Cpu)? * scale)?;
    Var::from_tensor(&t)
}

/// The median of `repeats` timings of `f`, in ms, after one warm-up run.
fn median_ms(repeats: usize, f: &dyn Fn() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Forward, and forward + backward of the output's sum, in ms.
fn measure(repeats: usize, op: &Op, inputs: &[Var]) -> candle_core::Result<(f64, f64)> {
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let forward = median_ms(repeats, &|| op(&tensors).map(drop))?;
    let both = median_ms(repeats, &|| op(&tensors)?.sum_all()?.backward().map(drop))?;
    Ok((forward, both))
}

fn main() -> candle_core::Result<()> {
    let repeats = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    let eps = 1e-5;
    let width = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
    let angles =
        (Tensor::rand(0f32, 6.0, (B, 1, T, HEAD_DIM / 2), &Device::Cpu)?).to_dtype(DType::F32)?;
    let emb = Tensor::cat(&[&angles, &angles], D::Minus1)?;
    let (cos, sin) = (emb.cos()?, emb.sin()?);
    let targets: Vec<u32> = (0..ROWS).map(|i| (i * 7919 % VOCAB) as u32).collect();
    let target_tensor = Tensor::from_vec(targets.clone(), (1, ROWS), &Device::Cpu)?;
    let q = |x: &Tensor| x.narrow(D::Minus1, 0, HEADS * HEAD_DIM);

    let cases: Vec<(&str, Vec<Var>, Op, Op)> = vec![
        (
            "RMSNorm (512, 576)",
            vec![random(&[ROWS, HIDDEN], 1.0)?, random(&[HIDDEN], 1.0)?],
            Box::new(move |t| norm::rms_norm(&t[0], &t[1], eps)),
            Box::new(move |t| composed::rms_norm(&t[0], &t[1], eps)),
        ),
        (
            "RoPE q (2, 256, 9 x 64) -> heads",
            vec![random(&[B, T, width], 1.0)?],
            Box::new(|t| rope::rope_heads(&q(&t[0])?, HEADS, &cos, &sin)),
            Box::new(|t| {
                let x = q(&t[0])?
                    .reshape((B, T, HEADS, HEAD_DIM))?
                    .transpose(1, 2)?
                    .contiguous()?;
                composed::rope(&x, &cos, &sin)
            }),
        ),
        (
            "SwiGLU (512, 2 x 1536)",
            vec![random(&[ROWS, 2 * FFN], 3.0)?],
            Box::new(|t| swiglu::swiglu(&t[0])),
            Box::new(|t| composed::swiglu(&t[0])),
        ),
        (
            "lm_head + cross-entropy (512, 576) x (49152, 576)",
            vec![
                random(&[ROWS, HIDDEN], 1.0)?,
                random(&[VOCAB, HIDDEN], 0.1)?,
            ],
            Box::new(|t| xent::linear_cross_entropy(&t[0], &t[1], &targets, 1.0 / ROWS as f64)),
            Box::new(|t| {
                // (512, 576) @ (576, 49152) -> (1, 512, 49152)
                let logits = t[0].matmul(&t[1].t()?)?.unsqueeze(0)?;
                composed::mean_cross_entropy(&logits, &target_tensor)
            }),
        ),
    ];
    println!("threads: {}", rayon::current_num_threads());
    println!("| op | fused fwd ms | composed fwd ms | fused fwd+bwd ms | composed fwd+bwd ms | speed-up fwd+bwd |");
    println!("|---|---|---|---|---|---|");
    for (name, inputs, fused, reference) in &cases {
        let (ff, fb) = measure(repeats, fused, inputs)?;
        let (cf, cb) = measure(repeats, reference, inputs)?;
        println!(
            "| {name} | {ff:.2} | {cf:.2} | {fb:.2} | {cb:.2} | {:.1}x |",
            cb / fb
        );
    }
    Ok(())
}
