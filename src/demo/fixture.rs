//! The small pretrained model in fixtures/tiny/, embedded in the binary so the demo runs from any
//! directory, offline, and the fixture's facts that the recipe in fixtures/tiny/make.sh and the
//! tests share.

use std::path::{Path, PathBuf};

/// The tokenizer's end-of-text token (id 0), which separates documents.
pub const TINY_EOS: &str = "<|endoftext|>";

/// The books of the King James Bible kept out of training (fixtures/tiny/text/heldout.txt): the
/// last nine, Hebrews to Revelation.
pub const TINY_HELDOUT_BOOKS: &[&str] = &[
    "Hebrews",
    "James",
    "1 Peter",
    "2 Peter",
    "1 John",
    "2 John",
    "3 John",
    "Jude",
    "Revelation",
];

/// Perplexity on `heldout` of the add-one-smoothed unigram model of `train` over a vocabulary of
/// `vocab` ids: the baseline a language model must beat to have learned anything beyond token
/// frequencies.
pub fn unigram_perplexity(train: &[u32], heldout: &[u32], vocab: usize) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for &t in train {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let nll: f64 = heldout
        .iter()
        .map(|&t| -(counts.get(t as usize).copied().unwrap_or(1.0) / total).ln())
        .sum();
    (nll / heldout.len().max(1) as f64).exp()
}

/// The fixture model's files (fixtures/tiny/model/), embedded so the demo needs no checkout.
pub(crate) const TINY_MODEL_FILES: [(&str, &[u8]); 3] = [
    (
        "config.json",
        include_bytes!("../../fixtures/tiny/model/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../fixtures/tiny/model/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../fixtures/tiny/model/tokenizer.json"),
    ),
];

/// The books the fixture was trained on (fixtures/tiny/text/train.txt): the demo heals on them.
pub(crate) const TINY_TRAIN_TEXT: &[u8] = include_bytes!("../../fixtures/tiny/text/train.txt");

/// The held-out books (fixtures/tiny/text/heldout.txt): the demo evaluates on them.
pub(crate) const TINY_HELDOUT_TEXT: &[u8] = include_bytes!("../../fixtures/tiny/text/heldout.txt");

/// Where [`write_fixture`] put the fixture.
#[derive(Debug, Clone)]
pub(crate) struct FixturePaths {
    pub model: PathBuf,
    pub train: PathBuf,
    pub heldout: PathBuf,
}

/// Writes the embedded fixture under `dir`: `tiny/` (the model) and `text/` (train.txt,
/// heldout.txt).
pub(crate) fn write_fixture(dir: &Path) -> std::io::Result<FixturePaths> {
    let model = dir.join("tiny");
    let text = dir.join("text");
    std::fs::create_dir_all(&model)?;
    std::fs::create_dir_all(&text)?;
    for (name, bytes) in TINY_MODEL_FILES {
        std::fs::write(model.join(name), bytes)?;
    }
    let (train, heldout) = (text.join("train.txt"), text.join("heldout.txt"));
    std::fs::write(&train, TINY_TRAIN_TEXT)?;
    std::fs::write(&heldout, TINY_HELDOUT_TEXT)?;
    Ok(FixturePaths {
        model,
        train,
        heldout,
    })
}
