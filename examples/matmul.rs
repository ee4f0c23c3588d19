//! The machine's f32 matmul rate through candle's CPU kernels, for scale in benchmarks:
//! `cargo run --release --example matmul -- [N] [REPEATS]` prints GFLOP/s of (N x N) @ (N x N).
//! Threads follow RAYON_NUM_THREADS, as in `surgery eval --threads`.

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(1024), |a| a.parse())?;
    let repeats: usize = args.next().map_or(Ok(20), |a| a.parse())?;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    a.matmul(&b)?; // warm up
    let started = Instant::now();
    for _ in 0..repeats {
        a.matmul(&b)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let flops = 2.0 * (n as f64).powi(3) * repeats as f64;
    println!("{:.1}", flops / seconds / 1e9);
    Ok(())
}
