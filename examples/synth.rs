//! Writes a synthetic checkpoint (random weights, real layout) for benchmarks and experiments:
//!
//! ```sh
//! cargo run --release --example synth -- OUT_DIR --preset tinyllama --layers 22 --dtype bf16
//! cargo run --release --example synth -- model.gguf --preset tiny --gguf Q8_0
//! cargo run --release --example synth -- DIR --preset tiny --byte-tokenizer   # with a tokenizer
//! ```

use std::path::PathBuf;

use surgery::dtype::DType;
use surgery::synth::{self, SynthSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: synth OUT [--preset tiny|tinyllama] [--layers N] [--dtype f32|f16|bf16] [--shards N] [--gguf TYPE] [--seed N] [--byte-tokenizer]")?);
    let mut spec = SynthSpec::llama(6);
    let (mut seed, mut gguf, mut tokenizer) = (0u64, None, false);
    while let Some(flag) = args.next() {
        if flag == "--byte-tokenizer" {
            tokenizer = true;
            continue;
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--preset" => {
                let layers = spec.n_layers;
                spec = match value.as_str() {
                    "tiny" => SynthSpec::llama(layers),
                    // TinyLlama-1.1B's shape (shared/configs/tinyllama-1.1b-3t.config.json).
                    "tinyllama" => SynthSpec {
                        hidden: 2048,
                        n_heads: 32,
                        n_kv_heads: 4,
                        head_dim: 64,
                        ffn: 5632,
                        vocab: 32000,
                        ..SynthSpec::llama(22)
                    },
                    other => return Err(format!("unknown preset {other:?}").into()),
                };
            }
            "--layers" => spec.n_layers = value.parse()?,
            "--dtype" => spec.dtype = DType::from_name(&value).ok_or("bad --dtype")?,
            "--shards" => spec.shards = value.parse()?,
            "--seed" => seed = value.parse()?,
            "--gguf" => gguf = Some(DType::from_name(&value).ok_or("bad --gguf type")?),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    match gguf {
        Some(t) => synth::write_gguf(&out, &spec, seed, t)?,
        None => synth::write_hf(&out, &spec, seed)?,
    }
    if tokenizer {
        synth::write_byte_tokenizer(&out)?;
    }
    println!("wrote {}", out.display());
    Ok(())
}
