//! fixtures/tiny/: the small Llama pretrained on the King James Bible (fixtures/tiny/README.md) is
//! a plain Llama checkpoint, its tokenizer stays within 4096 tokens, and it has learned more than
//! token frequencies: its held-out perplexity, measured by our runtime, is far below the unigram
//! baseline of the same tokenizer.

mod common;

use std::path::PathBuf;

use common::{root, stderr, stdout, surgery};
use serde_json::Value;
use surgery::demo::unigram_perplexity;
use surgery::eval::data::{read_documents, token_stream};
use surgery::source::SourceModel;
use surgery::tokenizer::text::TextTokenizer;

fn tiny() -> PathBuf {
    root().join("fixtures/tiny")
}

fn json(args: &[&str]) -> Value {
    let o = surgery(&root(), args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn inspect_reports_a_plain_llama() {
    let v = json(&["inspect", "fixtures/tiny/model", "--json"]);
    assert_eq!(v["family"], "llama");
    assert_eq!(v["recurrent"], Value::Null, "no recurrence: {v}");
    assert_eq!(v["layers"], 10);
    assert_eq!(v["hidden"], 128);
    assert_eq!(v["heads"], 4);
    assert_eq!(v["kv_heads"], 2);
    assert_eq!(v["head_dim"], 32);
    assert_eq!(v["ffn"], 320);
    assert_eq!(v["vocab"], 4096);
    assert_eq!(v["tied_embeddings"], false);
    assert_eq!(v["params"]["total"], 2_771_584);
    let dtypes = v["dtypes"].as_array().unwrap();
    assert!(
        dtypes.iter().all(|d| d["dtype"] == "BF16"),
        "weights stored in bf16: {dtypes:?}"
    );
}

#[test]
fn tokenizer_has_at_most_4096_tokens_and_end_of_text_first() {
    let tok = tokenizers::Tokenizer::from_file(tiny().join("model/tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 4096);
    assert_eq!(tok.token_to_id(surgery::demo::TINY_EOS), Some(0));
    // Byte-level: any text round-trips, bytes outside the training text included.
    let text = "In the beginning — ünïcödé 123\n";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(ids.get_ids(), false).unwrap(), text);
}

#[test]
fn fixture_stays_within_its_size_budget() {
    let size = |p: &str| std::fs::metadata(tiny().join(p)).unwrap().len();
    let model: u64 = ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .map(|f| size(&format!("model/{f}")))
        .sum();
    let text = size("text/train.txt") + size("text/heldout.txt");
    assert!(text <= 5_000_000, "text {text} bytes");
    assert!(
        model + text <= 10_000_000,
        "model {model} + text {text} bytes"
    );
}

/// The runtime's perplexity on the first 4096 held-out tokens against the add-one unigram model
/// of the training books, both on the fixture's tokenizer.
#[test]
fn held_out_perplexity_is_far_below_the_unigram_baseline() {
    let v = json(&[
        "eval",
        "fixtures/tiny/model",
        "--data",
        "fixtures/tiny/text/heldout.txt",
        "--max-tokens",
        "4096",
        "--seq-len",
        "256",
        "--json",
    ]);
    let row = &v["rows"][0];
    assert_eq!(row["tokens"], 4096);
    let ppl = row["perplexity"].as_f64().unwrap();

    let source = SourceModel::open(&tiny().join("model")).unwrap();
    let tokenizer = TextTokenizer::for_model(&source).unwrap();
    let stream = |name: &str, limit| {
        let docs = read_documents(&[tiny().join("text").join(name)], None).unwrap();
        token_stream(&docs, &tokenizer, limit).unwrap()
    };
    let train = stream("train.txt", None);
    let held = stream("heldout.txt", Some(4097));
    // The same 4096 targets eval scored: every token after the first.
    let unigram = unigram_perplexity(&train, &held[1..4097], tokenizer.vocab_size());
    eprintln!("held-out perplexity {ppl:.2}, unigram {unigram:.2}");
    assert!(
        (UNIGRAM_4096 - unigram).abs() < 0.01,
        "unigram baseline {unigram}"
    );
    assert!(
        (ppl / MODEL_4096 - 1.0).abs() < 0.01,
        "held-out perplexity {ppl}, recorded {MODEL_4096}"
    );
    assert!(
        ppl * 3.0 < unigram,
        "held-out perplexity {ppl} not 3x below the unigram baseline {unigram}"
    );
}

/// Measured when the fixture was made (fixtures/tiny/README.md), on the first 4096 held-out
/// tokens.
const MODEL_4096: f64 = 161.315;
const UNIGRAM_4096: f64 = 531.766;
