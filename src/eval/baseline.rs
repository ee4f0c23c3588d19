//! What a recurrent checkpoint is measured against (`eval --baseline SOURCE`): the source it was
//! cut from, all its layers run once, and the pruned source, the layers the checkpoint kept
//! (prelude, core, coda) run once with no recurrence and no adapter.
//!
//! The source is the one the user names, opened only when it is the one the checkpoint's
//! config.json records (`surgery.source`: the same file names, sizes and sha256): a config is a
//! file anyone can edit, so the path it may record is never opened, and a source the checkpoint
//! was not cut from would give baselines that compare nothing.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::manifest::sha256_file;
use crate::plan::{HashedFile, Layers};
use crate::source::{SourceError, SourceModel};

/// Why a baseline could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    /// The checkpoint is not a recurrent one whose config.json records its source and layers.
    #[error("--baseline: {checkpoint}: {reason}")]
    NoRecord { checkpoint: PathBuf, reason: String },
    /// The source could not be opened.
    #[error("--baseline: {0}")]
    Source(#[from] SourceError),
    /// The source is not the one the checkpoint records.
    #[error("--baseline {path} is not the source the checkpoint was cut from: {reason}")]
    NotTheSource { path: PathBuf, reason: String },
}

/// The source, verified, and the layers the checkpoint kept.
pub struct Baseline {
    pub source: SourceModel,
    /// Source layers in the checkpoint's order: prelude, core, coda (the pruned model).
    pub kept: Vec<usize>,
}

/// config.json's record of the source, the part read here.
#[derive(Deserialize)]
struct Recorded {
    files: Vec<HashedFile>,
}

/// Opens `source` as the baseline of `checkpoint`, after checking that it is the source
/// `checkpoint`'s config.json records (file names and sizes, then sha256).
pub fn open(checkpoint: &SourceModel, source: &Path) -> Result<Baseline, BaselineError> {
    let (recorded, layers) = record(checkpoint)?;
    let opened = SourceModel::open(source)?;
    let not_it = |reason: String| BaselineError::NotTheSource {
        path: source.to_path_buf(),
        reason,
    };
    same_files(&opened, &recorded.files).map_err(not_it)?;
    if opened.config.vocab != checkpoint.config.vocab {
        return Err(not_it(format!(
            "it predicts over {} token ids, the checkpoint over {}",
            opened.config.vocab, checkpoint.config.vocab
        )));
    }
    let kept: Vec<usize> = layers.output_order().collect();
    if let Some(beyond) = kept.iter().find(|&&l| l >= opened.config.n_layers) {
        return Err(not_it(format!(
            "the checkpoint kept layer {beyond}, and it has {} layers",
            opened.config.n_layers
        )));
    }
    Ok(Baseline {
        source: opened,
        kept,
    })
}

/// The checkpoint's record of its source's files and of the layers it kept.
fn record(checkpoint: &SourceModel) -> Result<(Recorded, Layers), BaselineError> {
    let no_record = |reason: String| BaselineError::NoRecord {
        checkpoint: checkpoint.path.clone(),
        reason,
    };
    if checkpoint.config.recurrent.is_none() {
        return Err(no_record(
            "not a recurrent checkpoint (a baseline is the source a recurrent one was cut from)"
                .into(),
        ));
    }
    let path = checkpoint.root.join("config.json");
    let bytes = crate::paths::read(&path).map_err(|e| {
        no_record(format!(
            "{}: {e} (its source is recorded there)",
            path.display()
        ))
    })?;
    let config: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| no_record(format!("{}: not valid JSON ({e})", path.display())))?;
    let surgery = config.get("surgery");
    let field = |name: &str| {
        surgery.and_then(|s| s.get(name)).ok_or_else(|| {
            no_record(format!(
                "{} records no surgery.{name} (written by apply and heal)",
                path.display()
            ))
        })
    };
    let recorded = Recorded::deserialize(field("source")?)
        .map_err(|e| no_record(format!("{}: surgery.source: {e}", path.display())))?;
    let layers = Layers::deserialize(field("layers")?)
        .map_err(|e| no_record(format!("{}: surgery.layers: {e}", path.display())))?;
    Ok((recorded, layers))
}

/// Whether `source`'s files are the `recorded` ones: the same names and sizes, then the same
/// sha256 (hashed only when everything else agrees); why not, if not. Shared with heal's check of
/// a distillation teacher.
pub(crate) fn same_files(source: &SourceModel, recorded: &[HashedFile]) -> Result<(), String> {
    let names = |files: &mut dyn Iterator<Item = &str>| files.collect::<Vec<_>>().join(", ");
    let (ours, theirs) = (&source.files, recorded);
    if ours.len() != theirs.len() || ours.iter().zip(theirs).any(|(a, b)| a.path != b.path) {
        return Err(format!(
            "its files are {}; the checkpoint records {}",
            names(&mut ours.iter().map(|f| f.path.as_str())),
            names(&mut theirs.iter().map(|f| f.path.as_str()))
        ));
    }
    for (a, b) in ours.iter().zip(theirs) {
        if a.bytes != b.bytes {
            return Err(format!(
                "{} is {} bytes; the checkpoint records {}",
                a.path, a.bytes, b.bytes
            ));
        }
    }
    for (a, b) in ours.iter().zip(theirs) {
        let sha = sha256_file(&source.root.join(&a.path), |_| {})
            .map_err(|e| format!("{}: {e}", a.path))?;
        if sha != b.sha256 {
            return Err(format!(
                "{}'s sha256 is not the one the checkpoint records",
                a.path
            ));
        }
    }
    Ok(())
}
