//! `heal --distill TEACHER` (issue 17): logit distillation from a teacher, normally the source the
//! checkpoint was cut from, mixed with cross-entropy: alpha CE + (1 - alpha) T^2 KL(teacher_T ||
//! student_T) (Hinton et al. 2015; the paper's code base mixes 50/50 at T = 2). The teacher runs
//! without gradient on the same tokens in the same step; the fused loss consumes both models'
//! logits a block of rows at a time (`model::fused::xent`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::eval::baseline::same_files;
use crate::model::{Kernels, Mix, Model};
use crate::plan::HashedFile;
use crate::source::SourceModel;
use crate::tokenizer::text::TextTokenizer;

use super::train::{HealError, Result};

/// The teacher and the mix, as flags give them and checkpoints record them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    pub teacher: PathBuf,
    /// The weight of cross-entropy; 1 - alpha goes to the KL term.
    pub alpha: f64,
    pub temperature: f64,
}

impl DistillConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(HealError::Invalid(format!(
                "--distill-alpha {} must be a fraction between 0 and 1",
                self.alpha
            )));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(HealError::Invalid(format!(
                "--distill-temperature {} must be a positive number",
                self.temperature
            )));
        }
        Ok(())
    }

    pub fn mix(&self) -> Mix {
        Mix {
            alpha: self.alpha,
            temperature: self.temperature,
        }
    }
}

/// Opens and loads the teacher of `student` (the heal run's model, opened), refusing one whose
/// tokenizer or vocabulary is not the student's, or that cannot run a pass of `window` (micro
/// batch, sequence length). `note` hears when the teacher is not the source the student was cut
/// from, as its config.json records it.
pub(crate) fn load_teacher(
    cfg: &DistillConfig,
    student: &SourceModel,
    tokenizer: &TextTokenizer,
    window: (usize, usize),
    kernels: Kernels,
    device: &Device,
    note: &mut dyn FnMut(&str),
) -> Result<Model> {
    let path = cfg.teacher.display();
    let teacher = SourceModel::open(&cfg.teacher)?;
    let theirs = TextTokenizer::for_model(&teacher)?;
    if !theirs.same_vocabulary(tokenizer) {
        return Err(HealError::Invalid(format!(
            "--distill {path}: the teacher's tokenizer is not the student's ({} tokens against {}, \
             or the same number of other tokens); distillation compares the two models' \
             predictions token by token",
            theirs.vocab_size(),
            tokenizer.vocab_size()
        )));
    }
    if teacher.config.vocab != student.config.vocab {
        return Err(HealError::Invalid(format!(
            "--distill {path}: the teacher predicts over {} token ids, the student over {}",
            teacher.config.vocab, student.config.vocab
        )));
    }
    if let Some(recorded) = recorded_source(&student.root) {
        if same_files(&teacher, &recorded.files).is_err() {
            note(&format!(
                "the teacher {path} is not the source this checkpoint was cut from ({}, as its \
                 config.json records it): their files' sizes or sha256 differ",
                recorded.name
            ));
        }
    }
    crate::model::memory::check_pass(&teacher.config, window.0, window.1, kernels, device)?;
    let mut model = Model::load(&teacher, device)?;
    model.set_kernels(kernels);
    Ok(model)
}

/// The source a recurrent checkpoint's config.json records (`surgery.source`): its name and its
/// files, relative to it (issue 20: config.json holds no local path, which a published copy
/// would leak). Checkpoints written before then record `path` (absolute) instead of `name`.
#[derive(Debug, Deserialize)]
struct RecordedSource {
    #[serde(alias = "path")]
    name: String,
    files: Vec<HashedFile>,
}

/// The source a recurrent checkpoint records in its config.json, if any. Only compared with,
/// never opened: the config is a file anyone can edit.
fn recorded_source(root: &Path) -> Option<RecordedSource> {
    let bytes = crate::paths::read(&root.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    serde_json::from_value(config.get("surgery")?.get("source")?.clone()).ok()
}
