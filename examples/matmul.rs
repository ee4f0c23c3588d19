//! The machine's matmul rate through candle's kernels, for scale in benchmarks: prints GFLOP/s of
//! (N x N) @ (N x N).
//!
//! ```sh
//! cargo run --release --example matmul -- [N] [REPEATS] [--device cpu|cuda[:N]] [--dtype f32|tf32|bf16|f16]
//! ```
//!
//! Defaults: 1024, 20 repeats, cpu, f32. `tf32` is f32 with cuBLAS allowed to use TF32 tensor
//! cores (candle's CUDA backend does not by default, nor does `surgery`). CPU threads follow RAYON_NUM_THREADS, as in
//! `surgery eval --threads`. On CUDA (a build with `--features cuda`) the timing waits for the
//! device before and after, so it counts the kernels, not their launches; scripts/gpu-check.sh uses
//! the bf16 rate as the denominator of MFU.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

fn device(name: &str) -> candle_core::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::new_cuda(n),
            _ => Err(candle_core::Error::Msg(format!(
                "--device {other}: expected cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// f32 tensors whose CUDA matmuls may use TF32 tensor cores (a process-wide cuBLAS setting).
#[cfg(feature = "cuda")]
fn allow_tf32() -> Result<DType, String> {
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(true);
    Ok(DType::F32)
}

#[cfg(not(feature = "cuda"))]
fn allow_tf32() -> Result<DType, String> {
    Err("--dtype tf32 needs a build with `--features cuda`".into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut positional, mut dev, mut dtype) = (Vec::new(), Device::Cpu, DType::F32);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--device" => dev = device(&args.next().ok_or("--device needs a value")?)?,
            "--dtype" => {
                dtype = match args.next().ok_or("--dtype needs a value")?.as_str() {
                    "f32" => DType::F32,
                    "tf32" => allow_tf32()?,
                    "bf16" => DType::BF16,
                    "f16" => DType::F16,
                    other => {
                        return Err(
                            format!("--dtype {other}: expected f32, tf32, bf16 or f16").into()
                        )
                    }
                }
            }
            _ => positional.push(arg.parse::<usize>()?),
        }
    }
    let n = positional.first().copied().unwrap_or(1024);
    let repeats = positional.get(1).copied().unwrap_or(20);
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &dev)?.to_dtype(dtype)?;
    a.matmul(&b)?; // warm up (on CUDA: cuBLAS handle and heuristics)
    dev.synchronize()?;
    let started = Instant::now();
    for _ in 0..repeats {
        a.matmul(&b)?;
    }
    dev.synchronize()?;
    let seconds = started.elapsed().as_secs_f64();
    let flops = 2.0 * (n as f64).powi(3) * repeats as f64;
    println!("{:.1}", flops / seconds / 1e9);
    Ok(())
}
