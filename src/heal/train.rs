//! The training loop: recurrence curriculum and sampling, truncated backpropagation, gradient
//! accumulation and clipping, Muon/AdamW, evaluation, metrics, checkpoints and resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::eval::data::{read_tokens, read_training_tokens, LossOn};
use crate::eval::perplexity::perplexity;
use crate::model::params::{Lora, Param, ParamKind, Train};
use crate::model::{InitialState, Kernels, Mix, Model, IGNORED};
use crate::named::named;
use crate::source::SourceModel;
use crate::tokenizer::text::TextTokenizer;

use super::data::TrainData;
use super::distill::{load_teacher, DistillConfig};
use super::optim::{clip_grad_norm, Kind, Optimizer, ParamGroup};
use super::sampler;
use super::schedule::{learning_rate, mean_recurrence, Curriculum};

#[derive(Debug, thiserror::Error)]
pub enum HealError {
    /// Bad options or data.
    #[error("{0}")]
    Invalid(String),
    /// The loss or the gradient stopped being finite.
    #[error("non-finite {what} at step {step}; {checkpoint}")]
    NonFinite {
        what: &'static str,
        step: u64,
        checkpoint: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Data(#[from] crate::eval::data::DataError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::text::TextTokenizerError),
    #[error(transparent)]
    Optim(#[from] super::optim::OptimError),
}

pub type Result<T> = std::result::Result<T, HealError>;

named! {
    /// The curriculum's shape, as flags and config files name it.
    pub enum CurriculumKind {
        Linear = "linear",
        OneMinusSqrt = "1-sqrt",
        Constant = "constant",
    }
}

impl From<CurriculumKind> for Curriculum {
    fn from(k: CurriculumKind) -> Curriculum {
        match k {
            CurriculumKind::Linear => Curriculum::Linear,
            CurriculumKind::OneMinusSqrt => Curriculum::OneMinusSqrt,
            CurriculumKind::Constant => Curriculum::Constant,
        }
    }
}

named! {
    /// How the core iterations of a micro-step are drawn.
    #[derive(Default)]
    pub enum SamplerKind {
        /// The paper's: p = Poisson(LogNormal rate of mean m) + 1, the last min(k, p) with
        /// gradient.
        [default]
        PoissonLognormal = "poisson-lognormal",
        /// Exactly m iterations every micro-step, the first m - k without gradient
        /// (measurements).
        Fixed = "fixed",
    }
}

named! {
    /// Which optimizer trains the matrices.
    pub enum OptimizerKind {
        /// Muon on every 2-D block matrix and the adapter, AdamW on embeddings, lm_head and
        /// norms.
        Muon = "muon",
        /// AdamW on everything.
        Adamw = "adamw",
    }
}

/// Everything that defines a run; recorded in checkpoints and in the output's config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealConfig {
    pub model: PathBuf,
    pub data: Vec<PathBuf>,
    pub field: String,
    pub eval_data: Vec<PathBuf>,
    pub holdout: f64,
    pub out: PathBuf,
    pub steps: u64,
    pub seq_len: usize,
    pub batch: usize,
    pub micro_batch: usize,
    pub curriculum: CurriculumKind,
    pub curriculum_warmup: f64,
    pub max_mean_recurrence: usize,
    pub curriculum_start: usize,
    pub backprop_depth: usize,
    /// Absent in checkpoints written before it existed: the paper's sampler.
    #[serde(default)]
    pub sampler: SamplerKind,
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub adam_lr: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub warmup: f64,
    pub cooldown: f64,
    pub train: Train,
    pub static_baseline: bool,
    pub init_random: bool,
    pub seed: u64,
    pub eval_every: u64,
    pub eval_tokens: usize,
    pub checkpoint_every: u64,
    /// Fused ops (the default) or the composed reference ops; checkpoints written before the
    /// switch existed load as fused.
    #[serde(default)]
    pub kernels: Kernels,
    /// `--distill`: the teacher and the mix; absent, cross-entropy alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
    /// `--lora`: low-rank updates of the block matrices, their bases frozen; absent, the
    /// selected weights train whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<Lora>,
    /// `--loss-on`: which tokens carry the loss; runs recorded before the choice trained on all.
    #[serde(default)]
    pub loss_on: LossOn,
}

/// Corpora of up to this many tokens (16 MiB of token ids, about 16 MB of English text) are read
/// whole by `heal`, however few windows the run needs: its windows are then drawn from the whole
/// corpus, not from its first pages.
pub(crate) const READ_WHOLE: usize = 1 << 22;

impl HealConfig {
    /// Where checkpoints of this run go: `OUT.checkpoints/` beside OUT.
    pub fn checkpoint_root(&self) -> PathBuf {
        let name = self
            .out
            .file_name()
            .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
        self.out.with_file_name(format!("{name}.checkpoints"))
    }

    /// The training tokens `heal` reads at most: every token of a corpus of up to
    /// [`READ_WHOLE`] tokens, so that the run's windows are drawn from all of it; past that, enough
    /// windows of `seq_len + 1` for every step to read windows it has not read before, plus the
    /// held-out share of them. Reading stops there, so a corpus larger than the run needs costs
    /// neither the time nor the memory of tokenizing all of it (issue 18), and is read as a
    /// stream is: from its start. A smaller one is read whole and repeated in epochs.
    pub(crate) fn data_tokens(&self, holdout: f64) -> usize {
        let train = (self.steps as f64) * (self.batch as f64);
        // With N windows read, ceil(N * holdout) <= N * holdout + 1 are held out, leaving at
        // least N (1 - holdout) - 1 >= train to train on.
        let windows = (train / (1.0 - holdout)).ceil() + 1.0;
        let tokens = windows * (self.seq_len as f64 + 1.0);
        // f64 -> usize saturates; a run too long to bound reads everything.
        (tokens as usize).max(READ_WHOLE)
    }

    /// Checks every number of the run (flags, or a checkpoint's state.json) before it is used.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(HealError::Invalid(m));
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.seq_len == 0 || self.batch == 0 || self.micro_batch == 0 {
            return bad("--seq-len, --batch and --micro-batch must be at least 1".into());
        }
        if !self.batch.is_multiple_of(self.micro_batch) {
            return bad(format!(
                "--batch {} is not a multiple of --micro-batch {}",
                self.batch, self.micro_batch
            ));
        }
        if self.max_mean_recurrence == 0 || self.backprop_depth == 0 || self.curriculum_start == 0 {
            return bad(
                "--max-mean-recurrence, --backprop-depth and --curriculum-start must be at least 1"
                    .into(),
            );
        }
        for (name, v) in [
            ("--curriculum-warmup", self.curriculum_warmup),
            ("--warmup", self.warmup),
            ("--cooldown", self.cooldown),
            ("--holdout", self.holdout),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} {v} must be a fraction between 0 and 1"));
            }
        }
        if self.holdout >= 1.0 {
            return bad(format!(
                "--holdout {} leaves no window to train on; it must be below 1",
                self.holdout
            ));
        }
        if self.warmup + self.cooldown > 1.0 {
            return bad(format!(
                "--warmup {} and --cooldown {} add up to more than the run",
                self.warmup, self.cooldown
            ));
        }
        for (name, v) in [
            ("--lr", self.lr),
            ("--adam-lr", self.adam_lr),
            ("--clip", self.clip),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{name} {v} must be a positive number"));
            }
        }
        if let Some(d) = &self.distill {
            d.validate()?;
        }
        if let Some(l) = self.lora {
            if l.rank == 0 || !(l.alpha.is_finite() && l.alpha > 0.0) {
                return bad(format!(
                    "--lora {}:{} needs a rank of at least 1 and a positive alpha",
                    l.rank, l.alpha
                ));
            }
            if self.train == Train::Adapter {
                return bad(
                    "--lora trains low-rank updates of block matrices, and --train adapter \
                     trains none; leave out --lora to train the adapter"
                        .into(),
                );
            }
            if self.init_random {
                return bad(
                    "--lora keeps the weights frozen, and --init random redraws them; \
                     a random-init baseline trains in full"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// One line of metrics.jsonl (schemas/metrics.schema.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    /// The training loss: mean cross-entropy, or with `--distill` the mix of `ce` and `kl`.
    pub loss: f64,
    /// With `--distill`: the step's mean cross-entropy and KL(teacher_T || student_T) (nats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    pub lr: f64,
    pub mean_recurrence: usize,
    pub iterations_without_grad: Vec<usize>,
    pub iterations_with_grad: Vec<usize>,
    pub tokens: usize,
    pub tokens_per_second: f64,
    pub grad_norm: f64,
    /// Where the step's time went.
    #[serde(default)]
    pub seconds: StepSeconds,
    /// The process's peak resident memory so far (Linux; absent elsewhere), MB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_mb: Option<f64>,
    /// Held-out loss by r, on evaluation steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eval: Vec<EvalLoss>,
}

/// Wall seconds of one step's phases: the forward passes with their loss, the backward passes
/// with the gradient accumulation, and clipping with the optimizer update.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StepSeconds {
    pub forward: f64,
    pub backward: f64,
    pub optimizer: f64,
}

/// The peak resident set size of this process (VmHWM), MB, where /proc tells it.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    // The kernel's "kB" are KiB; the field is in decimal MB, as every size the tool prints.
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0 / 1e6)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalLoss {
    pub r: usize,
    pub loss: f64,
}

/// The state a checkpoint restores besides the weights and optimizer moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// The next step to run.
    pub step: u64,
    /// Training windows read so far.
    pub cursor: u64,
    pub config: HealConfig,
}

/// Callbacks for progress and step lines.
pub trait Observer {
    fn start(&mut self, steps: u64, first: u64);
    fn step(&mut self, m: &StepMetrics);
    fn note(&mut self, text: &str);
    /// The run's wall time, estimated once its first step is measured.
    fn estimate(&mut self, _estimate: &Estimate) {}
}

/// heal's wall time, estimated after its first step ([`estimate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Seconds the steps this process runs will take, the first one included.
    pub seconds: f64,
    /// The first step's measured seconds.
    pub first_step_seconds: f64,
    /// The steps this process runs (all of them, or those left after --resume).
    pub steps: u64,
}

/// The wall time of steps `first..cfg.steps` from the measured `seconds` of step `first`
/// (`line`): each step costs the training FLOPs per token of its iterations
/// ([`crate::plan::cost::train_flops`], plus lm_head's forward and backward), the first at the
/// iterations it drew, the others at the curriculum's mean recurrence m with min(m, k) of them
/// carrying gradient. Held-out evaluation, checkpoints and a distillation teacher's pass are
/// not in it: they do not grow with m.
pub fn estimate(
    cfg: &HealConfig,
    source: &SourceModel,
    line: &StepMetrics,
    first: u64,
    seconds: f64,
) -> Option<Estimate> {
    let c = &source.config;
    let s = c.recurrent?;
    let shape = crate::plan::Shape {
        prelude: s.prelude,
        core: s.core,
        coda: s.coda,
    };
    let lm_head = 6 * crate::plan::cost::embedding_params(c);
    let flops = |iterations: usize, with_grad: usize| {
        let (m, k) = (iterations as u64, with_grad as u64);
        (crate::plan::cost::train_flops(c, shape, s.adapter, m, k) + lm_head) as f64
    };
    let drawn = line
        .iterations_without_grad
        .iter()
        .zip(&line.iterations_with_grad);
    let micro = line.iterations_with_grad.len().max(1) as f64;
    let measured = drawn.map(|(&w, &g)| flops(w + g, g)).sum::<f64>() / micro;
    let later: f64 = (first + 1..cfg.steps)
        .map(|step| {
            let m = step_recurrence(cfg, step);
            flops(m, m.min(cfg.backprop_depth))
        })
        .sum();
    (measured > 0.0).then(|| Estimate {
        seconds: seconds * (1.0 + later / measured),
        first_step_seconds: seconds,
        steps: cfg.steps.saturating_sub(first),
    })
}

/// The mean recurrence of step `step`: the curriculum's, or 1 for the static baseline.
fn step_recurrence(cfg: &HealConfig, step: u64) -> usize {
    if cfg.static_baseline {
        return 1;
    }
    mean_recurrence(
        cfg.curriculum.into(),
        step,
        cfg.steps,
        cfg.curriculum_warmup,
        cfg.max_mean_recurrence,
        cfg.curriculum_start,
    )
}

/// The trained model, its run's metrics, and where the checkpoints are.
pub struct Trained {
    pub model: Model,
    pub metrics: Vec<StepMetrics>,
    pub config: HealConfig,
}

/// A deterministic seed for the initial state of (step, micro-step).
fn state_seed(seed: u64, step: u64, micro: u64) -> u64 {
    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// The composed training loss on full logits (moved to the model, beside its fused version).
pub use crate::model::mean_cross_entropy;

fn groups(params: &[Param], cfg: &HealConfig) -> Vec<ParamGroup> {
    let (mut matrices, mut others) = (Vec::new(), Vec::new());
    for p in params {
        let entry = (p.name.clone(), p.var.clone());
        match (cfg.optimizer, p.kind) {
            (OptimizerKind::Muon, ParamKind::Matrix) => matrices.push(entry),
            _ => others.push((entry, p.kind)),
        }
    }
    let (lr_others, muon) = match cfg.optimizer {
        OptimizerKind::Muon => (cfg.adam_lr, true),
        OptimizerKind::Adamw => (cfg.lr, false),
    };
    // Weight decay on matrices and embeddings, not on norm gains (decaying a gain towards 0
    // rescales the layer instead of regularizing it) nor on biases (offsets, as is usual).
    let (norms, decayed): (Vec<_>, Vec<_>) = others
        .into_iter()
        .partition(|(_, k)| matches!(k, ParamKind::Norm | ParamKind::Bias));
    let mut out = Vec::new();
    if muon && !matrices.is_empty() {
        out.push(ParamGroup {
            name: "muon".into(),
            vars: matrices,
            kind: Kind::Muon,
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
        });
    }
    if !decayed.is_empty() {
        out.push(ParamGroup {
            name: "adamw".into(),
            vars: decayed.into_iter().map(|(e, _)| e).collect(),
            kind: Kind::AdamW,
            lr: lr_others,
            weight_decay: cfg.weight_decay,
        });
    }
    if !norms.is_empty() {
        out.push(ParamGroup {
            name: "adamw-norms".into(),
            vars: norms.into_iter().map(|(e, _)| e).collect(),
            kind: Kind::AdamW,
            lr: lr_others,
            weight_decay: 0.0,
        });
    }
    out
}

/// Loads the model and data of `cfg`, restores `resume` if given, and trains to `cfg.steps`.
pub fn run(
    cfg: &HealConfig,
    resume: Option<&Path>,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<Trained> {
    cfg.validate()?;
    let source = SourceModel::open(&cfg.model)?;
    check_source(cfg, &source)?;
    let tokenizer = TextTokenizer::for_model(&source)?;
    let data = read_data(cfg, &tokenizer, observer)?;
    check_fit(cfg, &source, device)?;
    let window = (cfg.micro_batch, cfg.seq_len);
    let teacher = match &cfg.distill {
        Some(d) => {
            let mut note = |text: &str| observer.note(text);
            let kernels = cfg.kernels;
            let t = load_teacher(d, &source, &tokenizer, window, kernels, device, &mut note)?;
            Some((t, d.mix()))
        }
        None => None,
    };
    let mut training = Training::new(cfg, resume, device, &source, data, teacher)?;
    // The metrics of the steps before this one; a fresh run (--force over an earlier one) cuts
    // the earlier run's lines.
    let mut metrics = super::checkpoint::read_metrics(&cfg.checkpoint_root(), training.step)?;
    observer.start(cfg.steps, training.step);
    let first = training.step;
    while training.step < cfg.steps {
        let started = Instant::now();
        let mut line = training.train_step()?;
        if training.step == first {
            let seconds = started.elapsed().as_secs_f64();
            if let Some(e) = estimate(cfg, &source, &line, first, seconds) {
                observer.estimate(&e);
            }
        }
        training.step += 1;
        let last = training.step == cfg.steps;
        training.evaluate(&mut line, last)?;
        observer.step(&line);
        super::checkpoint::append_metrics(&cfg.checkpoint_root(), &line)?;
        metrics.push(line);
        training.checkpoint(last)?;
    }
    Ok(Trained {
        model: training.model,
        metrics,
        config: cfg.clone(),
    })
}

/// Refuses a source `heal` cannot train: one without recurrence, or one with no adapter for
/// `--train adapter` to train.
fn check_source(cfg: &HealConfig, source: &SourceModel) -> Result<()> {
    let Some(shape) = source.config.recurrent else {
        return Err(HealError::Invalid(format!(
            "{} is not a recurrent checkpoint; make one with `surgery apply MODEL --shape P,C,K` first",
            cfg.model.display()
        )));
    };
    if cfg.train == Train::Adapter && (!shape.adapter || cfg.static_baseline) {
        return Err(HealError::Invalid(
            "--train adapter needs an adapter to train (not --injection none, not --static)".into(),
        ));
    }
    Ok(())
}

/// Reads the training windows of `cfg.data`, holding out a `--holdout` share of them, or the
/// first `--eval-tokens` of `--eval-data` when that is given.
fn read_data(
    cfg: &HealConfig,
    tokenizer: &TextTokenizer,
    observer: &mut dyn Observer,
) -> Result<TrainData> {
    let holdout = if cfg.eval_data.is_empty() {
        cfg.holdout
    } else {
        0.0
    };
    let stream = read_training_tokens(
        &cfg.data,
        Some(&cfg.field),
        tokenizer,
        Some(cfg.data_tokens(holdout)),
        cfg.loss_on,
    )?;
    if stream.skipped_invalid_utf8 > 0 {
        observer.note(&format!(
            "skipped {} document(s) that are not valid UTF-8",
            stream.skipped_invalid_utf8
        ));
    }
    let trained = stream.trained.as_deref();
    let mut data = TrainData::new(&stream.tokens, trained, cfg.seq_len, holdout, cfg.seed)
        .ok_or_else(|| {
            HealError::Invalid(format!(
                "the data holds {} tokens, not enough for one training window of --seq-len {} + 1",
                stream.tokens.len(),
                cfg.seq_len
            ))
        })?;
    drop(stream);
    note_trained_share(&data, observer)?;
    data.limit_held_out(cfg.eval_tokens);
    if !cfg.eval_data.is_empty() {
        let limit = cfg.eval_tokens.saturating_add(1);
        let eval = read_tokens(&cfg.eval_data, Some(&cfg.field), tokenizer, Some(limit))?;
        data.held_out =
            crate::eval::data::windows(&eval.tokens, cfg.seq_len, Some(cfg.eval_tokens));
    }
    Ok(data)
}

/// Under `--loss-on assistant`, says what share of the training targets carries the loss; none
/// at all is an error (chat data whose template marks no assistant turn, say).
fn note_trained_share(data: &TrainData, observer: &mut dyn Observer) -> Result<()> {
    let (trained, all) = data.trained_targets();
    if trained == all {
        return Ok(());
    }
    if trained == 0 {
        return Err(HealError::Invalid(
            "--loss-on assistant: no training token is in an assistant's turn; \
             pass --loss-on all to train on every token"
                .into(),
        ));
    }
    observer.note(&format!(
        "--loss-on assistant: {trained} of {all} training targets ({:.1}%) carry the loss",
        100.0 * trained as f64 / all as f64
    ));
    Ok(())
}

/// Refuses, before any weights load, a micro-batch window that cannot fit one pass and a
/// `--lora` rank above the hidden size.
fn check_fit(cfg: &HealConfig, source: &SourceModel, device: &Device) -> Result<()> {
    // Training keeps more than one pass's activations for the backward; the bound of one pass
    // at least refuses a window that cannot fit at all before the weights are loaded.
    let window = (cfg.micro_batch, cfg.seq_len);
    crate::model::memory::check_pass(&source.config, window.0, window.1, cfg.kernels, device)?;
    if let Some(lora) = cfg.lora.filter(|l| l.rank > source.config.hidden) {
        return Err(HealError::Invalid(format!(
            "--lora {}: the rank exceeds the hidden size {}; a full heal (no --lora) trains \
             fewer numbers",
            lora.rank, source.config.hidden
        )));
    }
    Ok(())
}

/// A run under way: the student and its optimizer, the teacher, the data, and where it stands.
struct Training<'a> {
    cfg: &'a HealConfig,
    device: &'a Device,
    /// The checkpoint the run resumed from: the last good one until the run writes its own.
    resume: Option<&'a Path>,
    data: TrainData,
    teacher: Option<(Model, Mix)>,
    model: Model,
    params: Vec<Param>,
    optimizer: Optimizer,
    /// Micro-steps per step.
    n_micro: u64,
    /// The next step to run.
    step: u64,
    /// Training windows read so far.
    cursor: u64,
    last_checkpoint: Option<PathBuf>,
}

/// One micro-step's windows: input ids and next-token targets [micro-batch, seq-len] (u32,
/// [`IGNORED`] where no loss is taken), and how many targets are scored.
struct Batch {
    ids: Tensor,
    targets: Tensor,
    scored: usize,
}

/// What the micro-steps of one step add up: gradients, losses, tokens, draws and time.
#[derive(Default)]
struct Tally {
    grads: Option<GradStore>,
    loss: f64,
    ce: f64,
    kl: f64,
    tokens: usize,
    without: Vec<usize>,
    with: Vec<usize>,
    seconds: StepSeconds,
}

impl<'a> Training<'a> {
    /// Loads the student (redrawn with `--init random`), its trainable parameters and their
    /// optimizer, and restores the optimizer, weights and data position of `resume` if given.
    fn new(
        cfg: &'a HealConfig,
        resume: Option<&'a Path>,
        device: &'a Device,
        source: &SourceModel,
        data: TrainData,
        teacher: Option<(Model, Mix)>,
    ) -> Result<Self> {
        let mut model = Model::load(source, device)?;
        model.set_kernels(cfg.kernels);
        if cfg.init_random {
            model.reinitialize(cfg.seed, cfg.static_baseline)?;
        }
        let params = match cfg.lora {
            Some(lora) => model.trainable_lora(cfg.train, lora, cfg.seed, cfg.static_baseline)?,
            None => model.trainable(cfg.train, cfg.static_baseline)?,
        };
        let mut optimizer = Optimizer::new(groups(&params, cfg))?;
        let (step, cursor) = match resume {
            Some(dir) => {
                let restored = super::checkpoint::load(dir, &params, &mut optimizer, device)?;
                (restored.step, restored.cursor)
            }
            None => (0, 0),
        };
        Ok(Training {
            cfg,
            device,
            resume,
            data,
            teacher,
            model,
            params,
            optimizer,
            n_micro: (cfg.batch / cfg.micro_batch) as u64,
            step,
            cursor,
            last_checkpoint: None,
        })
    }

    /// Runs the current step's micro-steps, clips their summed gradient and updates the
    /// parameters; returns the step's metrics, without held-out losses.
    fn train_step(&mut self) -> Result<StepMetrics> {
        let cfg = self.cfg;
        let started = Instant::now();
        let m = step_recurrence(cfg, self.step);
        let lr_scale = learning_rate(self.step, cfg.steps, 1.0, cfg.warmup, cfg.cooldown);
        let mut tally = Tally::default();
        let batches = (0..self.n_micro)
            .map(|_| self.batch())
            .collect::<Result<Vec<_>>>()?;
        let step_scored: usize = batches.iter().map(|b| b.scored).sum();
        for (micro, batch) in (0..).zip(batches) {
            self.micro_step(m, micro, batch, step_scored, &mut tally)?;
        }
        let phase = Instant::now();
        let mut grads = tally
            .grads
            .ok_or_else(|| HealError::Invalid("no micro-step ran".into()))?;
        let vars: Vec<&Var> = self.params.iter().map(|p| &p.var).collect();
        let grad_norm = clip_grad_norm(&mut grads, &vars, cfg.clip)?;
        if !grad_norm.is_finite() {
            return Err(self.non_finite("gradient"));
        }
        self.optimizer.step(&grads, lr_scale)?;
        tally.seconds.optimizer = phase.elapsed().as_secs_f64();
        let elapsed = started.elapsed().as_secs_f64();
        let distilled = self.teacher.is_some();
        Ok(StepMetrics {
            step: self.step,
            loss: tally.loss,
            ce: distilled.then_some(tally.ce),
            kl: distilled.then_some(tally.kl),
            lr: lr_scale * cfg.lr,
            mean_recurrence: m,
            iterations_without_grad: tally.without,
            iterations_with_grad: tally.with,
            tokens: tally.tokens,
            tokens_per_second: tally.tokens as f64 / elapsed.max(1e-9),
            grad_norm,
            seconds: tally.seconds,
            peak_rss_mb: peak_rss_mb(),
            eval: vec![],
        })
    }

    /// Runs micro-step `micro` of the current step at mean recurrence `m` on `batch`: draws its
    /// iterations and adds its loss, gradients and time to `tally`. Its mean loss weighs in by
    /// its share of the step's `step_scored` targets, so the step's loss is the mean over all of
    /// them (with every target scored, each micro-step weighs 1 / micro-steps).
    fn micro_step(
        &mut self,
        m: usize,
        micro: u64,
        batch: Batch,
        step_scored: usize,
        tally: &mut Tally,
    ) -> Result<()> {
        let cfg = self.cfg;
        let draw = self.draw(m, micro);
        tally.without.push(draw.without_grad);
        tally.with.push(draw.with_grad);
        let Batch {
            ids,
            targets,
            scored,
        } = batch;
        let phase = Instant::now();
        let r = draw.without_grad + draw.with_grad;
        let state = InitialState::Seeded(state_seed(cfg.seed, self.step, micro));
        // A recurrent teacher (a copy of the student, in tests) runs the student's r and s_0.
        let taught = match &mut self.teacher {
            Some((t, mix)) => Some(t.teacher(&ids, r, state, *mix)?),
            None => None,
        };
        let (loss, parts) =
            self.model
                .loss_parts(&ids, &targets, r, draw.without_grad, state, taught.as_ref())?;
        drop(taught);
        // step_scored / scored is the micro-step count when every target is scored.
        let divisor = if scored == 0 {
            1.0
        } else {
            step_scored as f64 / scored as f64
        };
        if let Some(parts) = parts {
            tally.ce += parts.ce / divisor;
            tally.kl += parts.kl / divisor;
        }
        let loss = (loss / divisor)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(self.non_finite("loss"));
        }
        tally.loss += value;
        tally.tokens += cfg.micro_batch * cfg.seq_len;
        tally.seconds.forward += phase.elapsed().as_secs_f64();
        let phase = Instant::now();
        let grads = loss.backward()?;
        tally.grads = Some(accumulate(tally.grads.take(), grads, &self.params)?);
        tally.seconds.backward += phase.elapsed().as_secs_f64();
        Ok(())
    }

    /// The core iterations of micro-step `micro` at mean recurrence `m`: one, with gradient, for
    /// the static baseline; else the configured sampler's.
    fn draw(&self, m: usize, micro: u64) -> sampler::Draw {
        let cfg = self.cfg;
        if cfg.static_baseline {
            return sampler::Draw {
                without_grad: 0,
                with_grad: 1,
            };
        }
        match cfg.sampler {
            SamplerKind::PoissonLognormal => {
                sampler::draw(m, cfg.backprop_depth, cfg.seed, self.step, micro)
            }
            SamplerKind::Fixed => sampler::fixed(m, cfg.backprop_depth),
        }
    }

    /// The next `--micro-batch` training windows.
    fn batch(&mut self) -> Result<Batch> {
        let cfg = self.cfg;
        let (mut ids, mut targets) = (Vec::new(), Vec::new());
        for _ in 0..cfg.micro_batch {
            let (inputs, next) = self.data.inputs_targets(self.cursor);
            ids.extend_from_slice(inputs);
            targets.extend(next);
            self.cursor += 1;
        }
        let scored = targets.iter().filter(|&&t| t != IGNORED).count();
        let shape = (cfg.micro_batch, cfg.seq_len);
        Ok(Batch {
            ids: Tensor::from_vec(ids, shape, self.device)?,
            targets: Tensor::from_vec(targets, shape, self.device)?,
            scored,
        })
    }

    /// On the last step and every `--eval-every` steps, adds the held-out loss at each evaluated
    /// recurrence to `line` (when anything is held out).
    fn evaluate(&self, line: &mut StepMetrics, last: bool) -> Result<()> {
        let cfg = self.cfg;
        let due = last || (cfg.eval_every > 0 && self.step.is_multiple_of(cfg.eval_every));
        if self.data.held_out.windows.is_empty() || !due {
            return Ok(());
        }
        for r in self.evaluated_recurrences() {
            let row = perplexity(
                &self.model,
                &self.data.held_out,
                cfg.micro_batch,
                r,
                cfg.seed,
                &mut |_| {},
            )?;
            line.eval.push(EvalLoss { r, loss: row.loss });
        }
        Ok(())
    }

    /// The recurrences held-out loss is measured at: 1, the curriculum's top mean and twice it;
    /// the static baseline, 1 alone.
    fn evaluated_recurrences(&self) -> Vec<usize> {
        if self.cfg.static_baseline {
            return vec![1];
        }
        let m_max = self.cfg.max_mean_recurrence;
        let mut rs = vec![1, m_max, 2 * m_max];
        rs.dedup();
        rs
    }

    /// Every `--checkpoint-every` steps but the last (the output is written then), saves the
    /// weights, optimizer moments and position in the data.
    fn checkpoint(&mut self, last: bool) -> Result<()> {
        let cfg = self.cfg;
        if last || cfg.checkpoint_every == 0 || !self.step.is_multiple_of(cfg.checkpoint_every) {
            return Ok(());
        }
        let state = CheckpointState {
            step: self.step,
            cursor: self.cursor,
            config: cfg.clone(),
        };
        self.last_checkpoint = Some(super::checkpoint::save(
            &cfg.checkpoint_root(),
            &state,
            &self.params,
            &self.optimizer,
        )?);
        Ok(())
    }

    /// The error of the current step's non-finite `what`, naming the last good checkpoint.
    fn non_finite(&self, what: &'static str) -> HealError {
        let checkpoint = match self.last_checkpoint.as_deref().or(self.resume) {
            Some(dir) => format!("the last good checkpoint is {}", dir.display()),
            None => "no checkpoint was written yet".into(),
        };
        HealError::NonFinite {
            what,
            step: self.step,
            checkpoint,
        }
    }
}

/// Adds a micro-step's `grads` of `params` to the sum of the step's earlier micro-steps (`acc`;
/// none before the first).
fn accumulate(acc: Option<GradStore>, grads: GradStore, params: &[Param]) -> Result<GradStore> {
    let Some(mut acc) = acc else {
        return Ok(grads);
    };
    for v in params.iter().map(|p| &p.var) {
        if let Some(g) = grads.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's settings as heal records them, with `optimizer`.
    fn config(optimizer: &str) -> HealConfig {
        serde_json::from_value(serde_json::json!({
            "model": "m", "data": ["d"], "field": "text", "eval_data": [], "holdout": 0.0,
            "out": "o", "steps": 1, "seq_len": 8, "batch": 1, "micro_batch": 1,
            "curriculum": "1-sqrt", "curriculum_warmup": 0.75, "max_mean_recurrence": 4,
            "curriculum_start": 1, "backprop_depth": 8, "optimizer": optimizer, "lr": 1e-3,
            "adam_lr": 5e-5, "weight_decay": 0.1, "clip": 1.0, "warmup": 0.0, "cooldown": 0.0,
            "train": "all", "static_baseline": false, "init_random": false, "seed": 0,
            "eval_every": 0, "eval_tokens": 8, "checkpoint_every": 0,
        }))
        .unwrap()
    }

    #[test]
    fn matrices_and_embeddings_decay_and_norm_gains_and_biases_do_not() {
        let var = || Var::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        let params: Vec<Param> = [
            ParamKind::Matrix,
            ParamKind::Embedding,
            ParamKind::Norm,
            ParamKind::Bias,
        ]
        .into_iter()
        .map(|kind| Param {
            name: format!("{kind:?}"),
            kind,
            var: var(),
        })
        .collect();
        for (optimizer, matrices) in [("muon", "muon"), ("adamw", "adamw")] {
            let decay: Vec<(String, f64)> = groups(&params, &config(optimizer))
                .iter()
                .flat_map(|g| g.vars.iter().map(|(n, _)| (n.clone(), g.weight_decay)))
                .collect();
            let of = |name: &str| decay.iter().find(|(n, _)| n == name).unwrap().1;
            assert_eq!(
                [of("Matrix"), of("Embedding"), of("Norm"), of("Bias")],
                [0.1, 0.1, 0.0, 0.0],
                "{optimizer}"
            );
            let first = groups(&params, &config(optimizer))[0].name.clone();
            assert_eq!(first, matrices);
        }
    }
}
