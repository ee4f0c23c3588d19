//! The steps of fixtures/tiny/make.sh that no `surgery` command does: the KJV text split into
//! training and held-out books, the byte-level BPE tokenizer trained on the training books, the
//! random-init Llama checkpoint that `surgery apply` and `surgery heal --init random` start from,
//! and the unigram baseline the trained model is compared with.
//!
//! ```sh
//! cargo run --release --example tiny_fixture -- text kjv.jsonl OUT_DIR            # train.txt, heldout.txt
//! cargo run --release --example tiny_fixture -- tokenizer train.txt tokenizer.json --vocab 4096
//! cargo run --release --example tiny_fixture -- init DIR tokenizer.json --layers 10 --hidden 128
//! cargo run --release --example tiny_fixture -- unigram tokenizer.json train.txt heldout.txt
//! ```

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use surgery::demo::{unigram_perplexity, TINY_EOS, TINY_HELDOUT_BOOKS};
use surgery::dtype::DType;
use surgery::eval::data::{read_documents, token_stream};
use surgery::synth::{self, SynthSpec};
use surgery::tokenizer::text::TextTokenizer;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: tiny_fixture text KJV.jsonl OUT_DIR | tokenizer TRAIN.txt OUT.json [--vocab N] \
                 | init DIR TOKENIZER.json [--layers N] [--hidden H] [--ffn F] | unigram TOKENIZER.json TRAIN.txt HELDOUT.txt";
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["text", kjv, out] => text(Path::new(kjv), Path::new(out)),
        ["tokenizer", train, out, rest @ ..] => {
            let vocab = flag(rest, "--vocab")?.unwrap_or(4096);
            tokenizer(Path::new(train), Path::new(out), vocab)
        }
        ["init", dir, tok, rest @ ..] => {
            let layers = flag(rest, "--layers")?.unwrap_or(10);
            let hidden = flag(rest, "--hidden")?.unwrap_or(128);
            let ffn = flag(rest, "--ffn")?.unwrap_or(3 * hidden);
            init(Path::new(dir), Path::new(tok), layers, hidden, ffn)
        }
        ["unigram", tok, train, heldout] => {
            unigram(Path::new(tok), Path::new(train), Path::new(heldout))
        }
        _ => Err(usage.into()),
    }
}

fn flag(rest: &[&str], name: &str) -> Result<Option<usize>, Error> {
    match rest.iter().position(|a| *a == name) {
        None => Ok(None),
        Some(i) => {
            let v = rest.get(i + 1).ok_or(format!("{name} needs a value"))?;
            Ok(Some(v.parse()?))
        }
    }
}

/// One document per chapter (its verses, one per line), documents separated by a blank line;
/// the books of `TINY_HELDOUT_BOOKS` go to heldout.txt, the rest to train.txt.
fn text(kjv: &Path, out: &Path) -> Result<(), Error> {
    let mut chapters: Vec<(String, u64, Vec<String>)> = Vec::new();
    for line in std::fs::read_to_string(kjv)?.lines() {
        let v: Value = serde_json::from_str(line)?;
        let book = v["book"]
            .as_str()
            .ok_or("a verse without a book")?
            .to_string();
        let chapter = v["chapter"].as_u64().ok_or("a verse without a chapter")?;
        let verse = v["text"]
            .as_str()
            .ok_or("a verse without text")?
            .trim()
            .to_string();
        match chapters.last_mut() {
            Some((b, c, verses)) if *b == book && *c == chapter => verses.push(verse),
            _ => chapters.push((book, chapter, vec![verse])),
        }
    }
    let (mut train, mut heldout) = (String::new(), String::new());
    for (book, _, verses) in &chapters {
        let target = if TINY_HELDOUT_BOOKS.contains(&book.as_str()) {
            &mut heldout
        } else {
            &mut train
        };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(&verses.join("\n"));
        target.push('\n');
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("train.txt"), &train)?;
    std::fs::write(out.join("heldout.txt"), &heldout)?;
    println!(
        "{} chapters; train.txt {} bytes, heldout.txt {} bytes ({})",
        chapters.len(),
        train.len(),
        heldout.len(),
        TINY_HELDOUT_BOOKS.join(", ")
    );
    Ok(())
}

/// A byte-level BPE (GPT-2's pre-tokenizer, no prefix space, as llama.cpp's `gpt-2`) with
/// `<|endoftext|>` as token 0, trained on the documents of `train`.
fn tokenizer(train: &Path, out: &Path, vocab: usize) -> Result<(), Error> {
    let docs = read_documents(&[train.to_path_buf()], None)?;
    let byte_level = ByteLevel::new(false, true, true);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(TINY_EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    let mut tok =
        TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(byte_level))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()?;
    tok.train(&mut trainer, docs.texts.iter())?;
    tok.save(out, false)?;
    println!("{}: vocabulary {}", out.display(), tok.get_vocab_size(true));
    Ok(())
}

/// A Llama Hugging Face directory with random f32 weights and the tokenizer: the starting point
/// `surgery apply` turns into a recurrent layout that `surgery heal --static --init random` trains.
fn init(dir: &Path, tok: &Path, layers: usize, hidden: usize, ffn: usize) -> Result<(), Error> {
    let tokenizer = tokenizers::Tokenizer::from_file(tok)?;
    let vocab = tokenizer.get_vocab_size(true);
    let eos = tokenizer
        .token_to_id(TINY_EOS)
        .ok_or("the tokenizer has no <|endoftext|>")?;
    let spec = SynthSpec {
        hidden,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: hidden / 4,
        ffn,
        vocab,
        dtype: DType::F32,
        ..SynthSpec::llama(layers)
    };
    synth::write_hf(dir, &spec, 0)?;
    let mut config = spec.config_json();
    config["bos_token_id"] = eos.into();
    config["eos_token_id"] = eos.into();
    config["max_position_embeddings"] = 2048.into();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    std::fs::copy(tok, dir.join("tokenizer.json"))?;
    println!(
        "{}: {layers} layers, hidden {hidden}, FFN {ffn}, vocabulary {vocab}",
        dir.display()
    );
    Ok(())
}

/// The add-one-smoothed unigram model of train.txt's tokens (EOS after each document, as `surgery
/// eval` and `heal` pack them), evaluated on every token of heldout.txt.
fn unigram(tok: &Path, train: &Path, heldout: &Path) -> Result<(), Error> {
    let json = std::fs::read_to_string(tok)?;
    let probe = TextTokenizer::from_json(&json, None, None)?;
    let eos = probe
        .token_to_id(TINY_EOS)
        .ok_or("the tokenizer has no <|endoftext|>")?;
    let tokenizer = TextTokenizer::from_json(&json, None, Some(eos))?;
    let stream = |p: &Path| -> Result<Vec<u32>, Error> {
        let docs = read_documents(&[p.to_path_buf()], None)?;
        Ok(token_stream(&docs, &tokenizer, None)?)
    };
    let (a, b) = (stream(train)?, stream(heldout)?);
    let vocab = tokenizer.vocab_size();
    let ppl = unigram_perplexity(&a, &b, vocab);
    println!(
        "unigram baseline: {} training tokens, {} held-out tokens, vocabulary {vocab}: perplexity {ppl:.2}",
        a.len(),
        b.len()
    );
    Ok(())
}
