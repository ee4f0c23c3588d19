//! The fused attention (src/model/fused/attention.rs) against the composed candle ops on SmolLM2's
//! attention shapes (9 query heads, 3 key-value heads, head_dim 64), in f32 on the CPU: seconds per
//! call (median), forward and forward + backward, and the memory a forward keeps alive for its
//! backward (resident-set growth while the output, and so its graph, is held; measured first, in
//! a fresh process, and only indicative: the allocator may reuse pages it already holds).
//!
//! ```sh
//! cargo run --release --example attention -- [REPEATS]
//! ```
//!
//! Threads follow RAYON_NUM_THREADS. Default 10 repeats.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use surgery::model::fused::attention::{composed, fused, Mask};

type Attention = dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;

/// Pages resident now, in bytes (Linux).
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn time(
    repeats: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

struct Shape {
    b: usize,
    t: usize,
    backward: bool,
}

fn main() -> candle_core::Result<()> {
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let (h, kv, d) = (9, 3, 64);
    println!(
        "threads {}, load average {}",
        rayon::current_num_threads(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for shape in [
        Shape {
            b: 2,
            t: 256,
            backward: true,
        },
        Shape {
            b: 1,
            t: 512,
            backward: false,
        },
    ] {
        let (b, t) = (shape.b, shape.t);
        let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1.0, (b, kv, t, d), &Device::Cpu)?;
        let v = Tensor::randn(0f32, 1.0, (b, kv, t, d), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (b, h, t, d), &Device::Cpu)?;
        // Causal, no padding: the same mask in both forms.
        let mut bias = vec![0f32; b * t * t];
        for (n, x) in bias.iter_mut().enumerate() {
            if n % t > (n / t) % t {
                *x = -1e9;
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, t), &Device::Cpu)?.to_dtype(DType::F32)?;
        let mask = Mask::Causal {
            past: 0,
            valid: Arc::from(vec![true; b * t]),
        };
        let ours: Box<Attention> = Box::new(move |q, k, v| fused(q, k, v, &mask));
        let theirs: Box<Attention> = Box::new(move |q, k, v| composed(q, k, v, &bias));
        println!("B {b}, H {h}, KV {kv}, T {t}, D {d}:");
        if shape.backward {
            // Before any timing, so that the allocator has no freed pages to hand back (those
            // would not show as growth); the composed op first, its large buffers freed last.
            let (qv, kv, vv) = (
                Var::from_tensor(&q)?,
                Var::from_tensor(&k)?,
                Var::from_tensor(&v)?,
            );
            for (name, attention) in [("composed", &theirs), ("fused", &ours)] {
                let before = resident();
                let out = attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;
                let kept = resident().saturating_sub(before);
                drop(out);
                println!(
                    "  {name:>8}: resident growth while the output (and its graph) lives {:6.2} MiB",
                    kept as f64 / (1 << 20) as f64
                );
            }
        }
        let mut forward = Vec::new();
        let mut both = Vec::new();
        for (name, attention) in [("fused", &ours), ("composed", &theirs)] {
            let fwd = time(repeats, || attention(&q, &k, &v).map(|_| ()))?;
            forward.push(fwd);
            let mut line = format!("  {name:>8}: forward {:7.2} ms", fwd * 1e3);
            if shape.backward {
                let (qv, kv, vv) = (
                    Var::from_tensor(&q)?,
                    Var::from_tensor(&k)?,
                    Var::from_tensor(&v)?,
                );
                let fwd_bwd = time(repeats, || {
                    let out = attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor())?;
                    (out * &w)?.sum_all()?.backward().map(|_| ())
                })?;
                both.push(fwd_bwd);
                line += &format!(", forward + backward {:7.2} ms", fwd_bwd * 1e3);
            }
            println!("{line}");
        }
        print!("  fused speed-up: forward {:.2}x", forward[1] / forward[0]);
        if let [ours, theirs] = both[..] {
            print!(", forward + backward {:.2}x", theirs / ours);
        }
        println!();
    }
    Ok(())
}
