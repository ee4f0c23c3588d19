//! `surgery heal MODEL --data FILE... --out DIR`: the recurrence-curriculum fine-tune, with
//! checkpoints and `--resume`.

use std::path::PathBuf;

use anyhow::{bail, Context};

use surgery::eval::data::LossOn;
use surgery::heal::distill::DistillConfig;
use surgery::heal::train::{
    run, CurriculumKind, Estimate, HealConfig, Observer, OptimizerKind, SamplerKind, StepMetrics,
};
use surgery::heal::{output, place};
use surgery::model::params::{Lora, Train};

use super::{named, Global, Meter, Unit};

#[derive(clap::Args)]
pub struct HealArgs {
    /// A recurrent checkpoint (from `apply` or an earlier `heal`).
    #[arg(required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// Training text: .txt (documents separated by a blank line) or .jsonl.
    #[arg(long, num_args = 1.., required_unless_present = "resume")]
    pub data: Vec<PathBuf>,
    /// The JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Held-out text for evaluation (else --holdout of the training windows).
    #[arg(long, num_args = 1..)]
    pub eval_data: Vec<PathBuf>,
    /// Share of the training windows held out for evaluation when --eval-data is not given.
    #[arg(long, default_value_t = 0.05)]
    pub holdout: f64,
    /// The output directory.
    #[arg(long, short = 'o', required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Tokens per training sequence (windows of seq-len + 1 packed from documents + EOS).
    #[arg(long, short = 'c', default_value_t = 1024)]
    pub seq_len: usize,
    /// Sequences per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Sequences per forward/backward pass (gradients accumulate over batch / micro-batch).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Shape of the mean-recurrence curriculum.
    #[arg(long, value_parser = named::<CurriculumKind>(), default_value = "1-sqrt")]
    pub curriculum: CurriculumKind,
    /// Share of the steps over which the mean recurrence rises to its maximum.
    #[arg(long, default_value_t = 0.75)]
    pub curriculum_warmup: f64,
    /// The mean recurrence m reached by the curriculum.
    #[arg(long, default_value_t = 4)]
    pub max_mean_recurrence: usize,
    /// The mean recurrence the curriculum starts at.
    #[arg(long, default_value_t = 1)]
    pub curriculum_start: usize,
    /// Iterations that carry gradient (truncated backpropagation), k = min(this, m).
    #[arg(long, default_value_t = 8)]
    pub backprop_depth: usize,
    /// How each micro-step's core iterations are drawn: the paper's Poisson-lognormal, or fixed
    /// (exactly m, the first m - k without gradient; for measurements).
    #[arg(long, value_parser = named::<SamplerKind>(), default_value = "poisson-lognormal")]
    pub sampler: SamplerKind,
    /// muon: Muon on matrices and the adapter, AdamW on embeddings and norms; adamw: AdamW on all
    /// [default: muon; adamw with --lora, as the paper's LoRA healing].
    #[arg(long, value_parser = named::<OptimizerKind>())]
    pub optimizer: Option<OptimizerKind>,
    /// Learning rate of the matrices [default: 1e-3 with muon, 5e-5 with adamw].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of embeddings, lm_head and norms under muon.
    #[arg(long, default_value_t = 5e-5)]
    pub adam_lr: f64,
    /// Decoupled weight decay (not on norm gains).
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Gradient clipping: the global norm is scaled down to this.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Share of the steps of linear LR warmup from 0.001 x LR.
    #[arg(long, default_value_t = 0.005)]
    pub warmup: f64,
    /// Share of the steps of cosine LR decay to 0.001 x LR at the end.
    #[arg(long, default_value_t = 0.6)]
    pub cooldown: f64,
    /// What trains; the rest is frozen.
    #[arg(long, value_parser = named::<Train>(), default_value = "all")]
    pub train: Train,
    /// Train the static model instead (r = 1, adapter frozen): the paper's static baseline.
    #[arg(long = "static")]
    pub static_baseline: bool,
    /// keep: start from the checkpoint's weights; random: re-initialize them (random-init baseline).
    #[arg(long, value_parser = ["keep", "random"], default_value = "keep")]
    pub init: String,
    /// Seed of data order, recurrence draws, initial states and a random init.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate on held-out text every N steps (and at the end) at r = 1, m_max, 2 m_max; 0: at the end only.
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Held-out tokens per evaluation.
    #[arg(long, default_value_t = 4096)]
    pub eval_tokens: usize,
    /// Write a checkpoint (weights, optimizer, position) every N steps into OUT.checkpoints/; 0: never.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
    /// Continue a run from one of its checkpoints (OUT.checkpoints/step-N); the run's settings come from it.
    #[arg(long, value_name = "CHECKPOINT")]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: super::Runtime,
    /// Distill from this teacher (any model `surgery` reads, normally the source the checkpoint
    /// was cut from): the loss becomes alpha CE + (1 - alpha) T^2 KL(teacher_T || student_T).
    #[arg(long, value_name = "TEACHER")]
    pub distill: Option<PathBuf>,
    /// alpha: the weight of cross-entropy in the distillation loss.
    #[arg(long, default_value_t = 0.5, requires = "distill")]
    pub distill_alpha: f64,
    /// T: the temperature both models' predictions are softened by.
    #[arg(long, default_value_t = 2.0, requires = "distill")]
    pub distill_temperature: f64,
    /// Train low-rank updates (rank RANK, scaled by ALPHA / RANK; ALPHA defaults to RANK) of the
    /// block matrices --train selects, their weights and the embeddings and norms frozen (the
    /// adapter still trains whole); the written checkpoint has the updates merged in.
    #[arg(long, value_name = "RANK[:ALPHA]")]
    pub lora: Option<Lora>,
    /// Which tokens carry the loss: a conversation's assistant turns only (as the paper's
    /// trainer), or every token; plain-text documents train on every token either way.
    #[arg(long, value_parser = named::<LossOn>(), default_value = "assistant")]
    pub loss_on: LossOn,
}

impl HealArgs {
    fn config(&self) -> anyhow::Result<HealConfig> {
        let optimizer = self.optimizer.unwrap_or(if self.lora.is_some() {
            OptimizerKind::Adamw
        } else {
            OptimizerKind::Muon
        });
        let lr = self.lr.unwrap_or(match optimizer {
            OptimizerKind::Muon => 1e-3,
            OptimizerKind::Adamw => 5e-5,
        });
        Ok(HealConfig {
            model: self.model.clone().context("MODEL is required")?,
            data: self.data.clone(),
            field: self.field.clone(),
            eval_data: self.eval_data.clone(),
            holdout: self.holdout,
            out: self.out.clone().context("--out is required")?,
            steps: self.steps,
            seq_len: self.seq_len,
            batch: self.batch,
            micro_batch: self.micro_batch.unwrap_or(self.batch),
            curriculum: self.curriculum,
            curriculum_warmup: self.curriculum_warmup,
            max_mean_recurrence: self.max_mean_recurrence,
            curriculum_start: self.curriculum_start,
            backprop_depth: self.backprop_depth,
            sampler: self.sampler,
            optimizer,
            lr,
            adam_lr: self.adam_lr,
            weight_decay: self.weight_decay,
            clip: self.clip,
            warmup: self.warmup,
            cooldown: self.cooldown,
            train: self.train,
            static_baseline: self.static_baseline,
            init_random: self.init == "random",
            seed: self.seed,
            eval_every: self.eval_every,
            eval_tokens: self.eval_tokens,
            checkpoint_every: self.checkpoint_every,
            kernels: self.runtime.kernels,
            lora: self.lora,
            loss_on: self.loss_on,
            distill: self.distill.clone().map(|teacher| DistillConfig {
                teacher,
                alpha: self.distill_alpha,
                temperature: self.distill_temperature,
            }),
        })
    }
}

/// The progress display: step, loss, LR, m, tokens/s, ETA (also `demo`'s).
pub(super) struct Bar {
    pub(super) bar: Meter,
}

impl Bar {
    pub(super) fn new(global: Global, steps: u64) -> Bar {
        Bar {
            bar: Meter::new(global, steps, "healing", Unit::Steps),
        }
    }
}

impl Observer for Bar {
    fn start(&mut self, steps: u64, first: u64) {
        self.bar.set_length(steps);
        self.bar.set_position(first);
    }

    fn step(&mut self, m: &StepMetrics) {
        let parts = match (m.ce, m.kl) {
            (Some(ce), Some(kl)) => format!(" (ce {ce:.4} kl {kl:.4})"),
            _ => String::new(),
        };
        // The message first: a progress line off a terminal is printed by set_position.
        self.bar.set_message(format!(
            "loss {:.4}{parts} lr {:.2e} m {} {:.0} tok/s",
            m.loss, m.lr, m.mean_recurrence, m.tokens_per_second
        ));
        self.bar.set_position(m.step + 1);
        if !m.eval.is_empty() {
            let evals: Vec<String> = m
                .eval
                .iter()
                .map(|e| format!("r={}: {:.4}", e.r, e.loss))
                .collect();
            self.bar.println(&format!(
                "step {}: held-out loss {}",
                m.step + 1,
                evals.join(", ")
            ));
        }
    }

    fn note(&mut self, text: &str) {
        self.bar.println(&format!("note: {text}"));
    }

    fn estimate(&mut self, e: &Estimate) {
        use std::time::Duration;
        let time = |s: f64| {
            super::progress::clock(Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
        };
        self.bar.println(&format!(
            "note: estimated wall time {} for {} steps (measured: the first step's {:.2} s, \
             scaled by each step's training FLOPs at the curriculum's mean recurrence; held-out \
             evaluation and checkpoints not included)",
            time(e.seconds),
            e.steps,
            e.first_step_seconds
        ));
    }
}

pub fn run_cli(args: HealArgs, global: Global) -> anyhow::Result<()> {
    let device = args.runtime.device()?;
    let (config, resume) = match &args.resume {
        Some(dir) => (place::resume_config(dir, args.force)?, Some(dir.as_path())),
        None => (args.config()?, None),
    };
    if resume.is_none() {
        // Before the existence check, whose advice (--force) would replace an input.
        place::check_inputs(&config)?;
        surgery::paths::refuse_existing(&config.out, args.force)?;
        // An earlier run's checkpoints: resume them, or --force removes them.
        let root = config.checkpoint_root();
        if let Some(latest) = surgery::heal::checkpoint::existing(&root)?.last() {
            if !args.force {
                bail!(
                    "{} holds checkpoints of an earlier run; pass --resume {} to continue it, or \
                     --force to start over (they are removed)",
                    root.display(),
                    latest.display()
                );
            }
            surgery::heal::checkpoint::clear(&root)?;
        }
    }
    let mut observer = Bar::new(global, config.steps);
    let mut trained = run(&config, resume, &device, &mut observer)?;
    observer.bar.finish();
    let files = output::write(&mut trained, args.force)?;
    surgery::heal::checkpoint::tidy(&config.checkpoint_root())?;
    let last = trained.metrics.last();
    if global.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "out": config.out.display().to_string(),
                "steps": trained.metrics.len(),
                "final": last,
                "files": files,
            }))?
        )?;
    } else {
        outln!(
            "healed {} -> {} in {} steps; final training loss {:.4}",
            config.model.display(),
            config.out.display(),
            trained.metrics.len(),
            last.map_or(f64::NAN, |m| m.loss)
        )?;
        if let Some(m) = last {
            for e in &m.eval {
                outln!(
                    "  held-out loss at r = {}: {:.4} (perplexity {:.2})",
                    e.r,
                    e.loss,
                    e.loss.exp()
                )?;
            }
        }
    }
    Ok(())
}
