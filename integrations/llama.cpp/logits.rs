//! Our runtime's logits for a prompt, to compare with llama.cpp's (build-and-check.sh): prints
//! JSON `{"tokens": [...], "logits": {"R": [V floats of the last token], ...}}`.
//!
//! ```sh
//! cargo run --release --example llama-cpp-logits -- MODEL.gguf "PROMPT" 1,4,8
//! ```
//!
//! The initial state is drawn as `surgery eval` draws it (seed 0); with a model of
//! `state.sigma = 0` it is zero, as in the llama.cpp patch. Quantized weights are kept as stored,
//! as `surgery eval` keeps them.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use surgery::model::{last_logits, InitialState, Model, Weights};
use surgery::source::SourceModel;
use surgery::tokenizer::text::TextTokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: llama-cpp-logits MODEL PROMPT R[,R...]";
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().ok_or(usage)?);
    let prompt = args.next().ok_or(usage)?;
    let rs = args
        .next()
        .ok_or(usage)?
        .split(',')
        .map(|r| r.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("recurrences: {e}"))?;

    let source = SourceModel::open(&path)?;
    let tokenizer = TextTokenizer::for_model(&source)?;
    let tokens = tokenizer.encode(&prompt)?;
    if tokens.is_empty() {
        return Err("the prompt tokenizes to nothing".into());
    }
    let device = Device::Cpu;
    let model = Model::load_as(&source, None, &device, Weights::Stored)?;
    let ids = Tensor::from_vec(tokens.clone(), (1, tokens.len()), &device)?;

    let mut logits = serde_json::Map::new();
    for r in rs {
        let out = model.forward(&ids, None, r, InitialState::Seeded(0), None)?;
        logits.insert(r.to_string(), serde_json::to_value(last_logits(&out)?)?);
    }
    let value = serde_json::json!({ "tokens": tokens, "logits": logits });
    println!("{}", serde_json::to_string(&value)?);
    Ok(())
}
