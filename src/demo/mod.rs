//! `surgery demo`: the whole method on the small pretrained model in fixtures/tiny/, offline:
//! inspect -> plan -> apply -> eval at r = 1, 2, 4, 8 -> heal -> eval again -> export GGUF q8_0 ->
//! generate from the GGUF. Each stage calls the same library functions as its command; a
//! [`Narrator`] is told what each stage does and why, and draws the progress.

mod fixture;

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

pub use fixture::*;

use crate::dtype::DType;
use crate::eval::data::{read_tokens, windows, Windows};
use crate::eval::perplexity::{rows, EvalRow};
use crate::export::{export_gguf, GgufOptions, QuantType};
use crate::formats::hf_config::Family;
use crate::heal::train::{self, CurriculumKind, HealConfig, Observer, OptimizerKind, SamplerKind};
use crate::manifest::sha256_file;
use crate::model::params::Train;
use crate::model::{generate, Exit, GenerateOptions, Model, Weights};
use crate::plan::{self, LayerRequest, PlanOptions, PlanRequest, Shape};
use crate::progress::Progress;
use crate::source::SourceModel;
use crate::surgery::{apply, ApplyOptions};
use crate::tokenizer::text::TextTokenizer;
use crate::units::si;

/// The shape the demo cuts the 10-layer fixture into: layers 1..7 are dropped, layers 7..9 looped
/// (a milder cut costs this model too little for its loop to have anything to win back within
/// the demo's heal: docs/RESULTS.md, "The demo's heal").
const SHAPE: Shape = Shape {
    prelude: 1,
    core: 2,
    coda: 1,
};
/// Test-time recurrences of the perplexity table.
const RS: [usize; 4] = [1, 2, 4, 8];
/// The mean recurrence the heal's curriculum reaches; the GGUF and the generation run at it.
const HEALED_R: usize = 4;
/// Held-out tokens scored per evaluation, in windows of `EVAL_SEQ_LEN`.
const EVAL_TOKENS: usize = 2048;
const EVAL_SEQ_LEN: usize = 256;
/// The prompt the healed GGUF continues.
pub const PROMPT: &str = "And the LORD said unto Moses,";

/// Why a stage failed, with the stage's own error.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `heal_steps` is 0.
    #[error("--heal-steps must be at least 1")]
    NoHealSteps,
    /// Writing the fixture, the plan or the summary.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    /// Serializing the plan or the summary.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::text::TextTokenizerError),
    #[error(transparent)]
    Data(#[from] crate::eval::data::DataError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error(transparent)]
    Apply(#[from] crate::surgery::ApplyError),
    #[error(transparent)]
    Heal(#[from] crate::heal::train::HealError),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error(transparent)]
    Eval(#[from] crate::eval::perplexity::EvalError),
}

pub type Result<T> = std::result::Result<T, DemoError>;

/// What the demo tells its user while it runs.
pub trait Narrator {
    /// A stage begins: its title ("3/8 apply") and a paragraph on what it does and why.
    fn stage(&mut self, title: &str, text: &str);
    /// Progress in bytes: apply and export.
    fn bytes(&mut self) -> &mut dyn Progress;
    /// Progress in scored tokens: the evaluations.
    fn tokens(&mut self) -> &mut dyn Progress;
    /// The heal's steps.
    fn heal(&mut self) -> &mut dyn Observer;
    /// The heal is over (its progress may be cleared).
    fn heal_finished(&mut self);
}

/// The demo's results, written to summary.json and printed by `surgery demo --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub model: ModelFacts,
    /// "P,C,K".
    pub shape: String,
    pub layers: LayerMap,
    /// Held-out tokens scored by every evaluation.
    pub eval_tokens: usize,
    pub full_model_perplexity: f64,
    pub heal: HealFacts,
    /// Perplexity at each r before and after the heal.
    pub table: Vec<TableRow>,
    pub gguf: GgufFacts,
    pub generated: Generated,
    pub artifacts: Artifacts,
    /// Wall time of the whole demo.
    pub seconds: f64,
}

/// The source model's size.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFacts {
    pub family: Family,
    pub layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub params: usize,
}

/// The cut, as ranges of source layers.
#[derive(Debug, Clone, Serialize)]
pub struct LayerMap {
    pub prelude: String,
    pub core: String,
    pub coda: String,
    pub dropped: Vec<String>,
}

/// What the heal ran.
#[derive(Debug, Clone, Serialize)]
pub struct HealFacts {
    pub steps: u64,
    pub max_mean_recurrence: usize,
    /// Time spent in optimizer steps.
    pub seconds: f64,
}

/// One r of the perplexity table.
#[derive(Debug, Clone, Serialize)]
pub struct TableRow {
    pub r: usize,
    pub before: f64,
    pub after: f64,
}

/// The exported GGUF and its perplexity at the healed r.
#[derive(Debug, Clone, Serialize)]
pub struct GgufFacts {
    #[serde(rename = "type")]
    pub quant: String,
    pub bytes: u64,
    pub r: usize,
    pub perplexity: f64,
}

/// The greedy continuation of the prompt by the GGUF.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    pub prompt: &'static str,
    pub r: usize,
    pub text: String,
}

/// Where everything is: `dir` as the caller named it, the rest relative to it.
#[derive(Debug, Clone, Serialize)]
pub struct Artifacts {
    pub dir: String,
    pub model: &'static str,
    pub train_text: &'static str,
    pub heldout_text: &'static str,
    pub plan: &'static str,
    pub recurrent: &'static str,
    pub healed: &'static str,
    pub metrics: &'static str,
    pub gguf: &'static str,
    pub summary: &'static str,
}

impl Artifacts {
    /// The demo's layout in `dir`.
    fn in_dir(dir: &Path) -> Artifacts {
        Artifacts {
            dir: dir.display().to_string(),
            model: "tiny",
            train_text: "text/train.txt",
            heldout_text: "text/heldout.txt",
            plan: "plan.json",
            recurrent: "recurrent",
            healed: "healed",
            metrics: "healed/metrics.jsonl",
            gguf: "healed-q8_0.gguf",
            summary: "summary.json",
        }
    }
}

/// Runs every stage in `dir` (which becomes `shown` once published) and writes summary.json.
pub fn run(
    dir: &Path,
    shown: &Path,
    heal_steps: u64,
    narrator: &mut dyn Narrator,
) -> Result<Summary> {
    if heal_steps == 0 {
        return Err(DemoError::NoHealSteps);
    }
    let started = Instant::now();
    let files = Artifacts::in_dir(shown);
    let fixture = write_fixture(dir).map_err(io("writing the embedded fixture"))?;

    let (source, facts) = inspect(&fixture.model, narrator)?;
    let tokenizer = TextTokenizer::for_model(&source)?;
    let held = held_out(&fixture, &tokenizer)?;
    let full = {
        let model = Model::load(&source, &Device::Cpu)?;
        eval_rows(&model, &held, &[1], narrator, "full model")?[0].perplexity
    };

    let (plan, plan_bytes, layers) = make_plan(&source, narrator)?;
    std::fs::write(dir.join(files.plan), &plan_bytes).map_err(io("writing plan.json"))?;

    let recurrent = dir.join(files.recurrent);
    let before = apply_and_eval(
        &plan,
        &plan_bytes,
        &recurrent,
        &held,
        (&facts, full),
        narrator,
    )?;

    let healed = dir.join(files.healed);
    let (after, heal) = heal(&recurrent, &fixture, &healed, heal_steps, &held, narrator)?;

    let gguf = dir.join(files.gguf);
    let (gguf_facts, text) = export_and_generate(&healed, &gguf, &held, narrator)?;

    let summary = Summary {
        model: facts,
        shape: SHAPE.to_string(),
        layers,
        eval_tokens: held.n_targets(),
        full_model_perplexity: full,
        heal,
        table: RS
            .iter()
            .zip(before.iter().zip(&after))
            .map(|(&r, (b, a))| TableRow {
                r,
                before: b.perplexity,
                after: a.perplexity,
            })
            .collect(),
        gguf: gguf_facts,
        generated: Generated {
            prompt: PROMPT,
            r: HEALED_R,
            text,
        },
        artifacts: files,
        seconds: started.elapsed().as_secs_f64(),
    };
    let mut bytes = serde_json::to_vec_pretty(&summary)?;
    bytes.push(b'\n');
    let summary_path = dir.join(summary.artifacts.summary);
    std::fs::write(summary_path, bytes).map_err(io("writing summary.json"))?;
    Ok(summary)
}

/// Stages 3 and 4: the plan applied into `recurrent`, and its perplexity at each r before the
/// heal (`full`: the source's, of `facts`).
fn apply_and_eval(
    plan: &plan::Plan,
    plan_bytes: &[u8],
    recurrent: &Path,
    held: &Windows,
    (facts, full): (&ModelFacts, f64),
    narrator: &mut dyn Narrator,
) -> Result<Vec<EvalRow>> {
    narrator.stage(
        "3/8 apply",
        "The plan is executed: copied tensors go byte for byte from the source, each layer's \
         Q/K/V and gate/up matrices are fused as the published recurrent models store them, \
         and the adapter is initialized. The result is a Hugging Face checkpoint of model_type \
         huginn_raven with a manifest of sha256 hashes.",
    );
    let opts = ApplyOptions {
        max_shard_bytes: 5_000_000_000,
        force: false,
        strict: true,
    };
    apply(plan, plan_bytes, recurrent, &opts, narrator.bytes())?;

    narrator.stage(
        "4/8 eval before healing",
        &format!(
            "Perplexity on {EVAL_TOKENS} tokens of held-out books (never trained on) at test-time \
             recurrence r = 1, 2, 4, 8. The full {}-layer model scores {full:.2}. With the \
             identity adapter every r gives the pruned model's perplexity: dropping layers cost \
             something, and looping the core does not help yet, because the model never learned \
             to use a state.",
            facts.layers
        ),
    );
    let model = Model::load(&SourceModel::open(recurrent)?, &Device::Cpu)?;
    eval_rows(&model, held, &RS, narrator, "before heal")
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DemoError {
    move |source| DemoError::Io { what, source }
}

/// Stage 1: the source model and its facts.
fn inspect(model: &Path, narrator: &mut dyn Narrator) -> Result<(SourceModel, ModelFacts)> {
    let source = SourceModel::open(model)?;
    let c = &source.config;
    let facts = ModelFacts {
        family: c.family,
        layers: c.n_layers,
        hidden: c.hidden,
        vocab: c.vocab,
        params: source.tensors.values().map(|t| t.n_elements()).sum(),
    };
    narrator.stage(
        "1/8 inspect",
        &format!(
            "The model is a small Llama ({} layers, hidden {}, {} heads with {} key-value heads, \
             FFN {}, vocabulary {}, {} parameters in {}) pretrained from scratch by `surgery heal \
             --static --init random` on the King James Bible (fixtures/tiny/README.md). Like \
             any Hugging Face checkpoint it is a fixed stack of layers: each token passes through \
             every layer exactly once.",
            c.n_layers,
            c.hidden,
            c.n_heads,
            c.n_kv_heads,
            c.ffn,
            c.vocab,
            si(facts.params as f64, ""),
            source.main_dtype().name(),
        ),
    );
    Ok((source, facts))
}

/// Stage 2: the plan of `SHAPE`, its JSON, and its layer map.
fn make_plan(
    source: &SourceModel,
    narrator: &mut dyn Narrator,
) -> Result<(plan::Plan, Vec<u8>, LayerMap)> {
    let request = PlanRequest {
        layers: LayerRequest {
            shape: Some(SHAPE),
            ..Default::default()
        },
        options: PlanOptions::default(),
        context: 2048,
    };
    let hashes = source
        .files
        .iter()
        .map(|f| sha256_file(&source.root.join(&f.path), |_| {}))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io("hashing the fixture"))?;
    let plan = plan::make(source, &request, &hashes)?;
    let layers = &plan.layers;
    let dropped: Vec<String> = (0..source.config.n_layers)
        .filter(|i| !layers.output_order().any(|j| j == *i))
        .map(|i| i.to_string())
        .collect();
    narrator.stage(
        "2/8 plan",
        &format!(
            "Surgery cuts the stack into a prelude (layers {}), a core (layers {}) that will be \
             looped r times, and a coda (layers {}); layers {} are dropped. A linear adapter \
             feeds the core its own previous output (the recurrent state) together with the \
             prelude's output. It starts as [0 | I]: it ignores the state, so at every r the \
             recurrent model computes exactly the pruned model. The plan is data: every output \
             tensor, where its bytes come from, and the costs ({} parameters instead of {}).",
            layers.prelude,
            layers.core,
            layers.coda,
            dropped.join(", "),
            si(plan.costs.recurrent_params as f64, ""),
            si(plan.costs.source_params as f64, ""),
        ),
    );
    let map = LayerMap {
        prelude: layers.prelude.to_string(),
        core: layers.core.to_string(),
        coda: layers.coda.to_string(),
        dropped,
    };
    let mut bytes = serde_json::to_vec_pretty(&plan)?;
    bytes.push(b'\n');
    Ok((plan, bytes, map))
}

/// Stages 5 and 6: the heal (its checkpoint written to `out`) and the evaluation after it.
fn heal(
    recurrent: &Path,
    fixture: &FixturePaths,
    out: &Path,
    steps: u64,
    held: &Windows,
    narrator: &mut dyn Narrator,
) -> Result<(Vec<EvalRow>, HealFacts)> {
    narrator.stage(
        "5/8 heal",
        &format!(
            "A short fine-tune heals the cut model: {steps} steps of 4 sequences of 128 tokens \
             from the training books, each step running the core exactly {HEALED_R} times with \
             gradients through all of them (`heal --sampler fixed`), Muon on the matrices and \
             AdamW on embeddings and norms. The paper draws a random number of iterations each \
             step, their mean rising under a curriculum (`heal`'s default); in this minute that \
             teaches the tiny model to tolerate its loop, while a fixed count teaches it to use \
             one."
        ),
    );
    let config = heal_config(recurrent, fixture, out, steps);
    let mut trained = train::run(&config, None, &Device::Cpu, narrator.heal())?;
    narrator.heal_finished();
    crate::heal::output::write(&mut trained, false)?;
    let seconds = trained
        .metrics
        .iter()
        .map(|m| m.tokens as f64 / m.tokens_per_second)
        .sum::<f64>();

    narrator.stage(
        "6/8 eval after healing",
        &format!(
            "The same held-out tokens, the same recurrences. Now the adapter mixes the state into \
             every iteration, so r matters: the model learned to refine its state over \
             {HEALED_R} iterations, and at r = 1 it stops before it is done, so its perplexity \
             at r = {HEALED_R} is lower than at r = 1. Past the trained r, more iterations change \
             little: a heal this short teaches the model to use its loop, not to go on \
             improving with it."
        ),
    );
    let after = eval_rows(&trained.model, held, &RS, narrator, "after heal")?;
    let facts = HealFacts {
        steps,
        max_mean_recurrence: HEALED_R,
        seconds,
    };
    Ok((after, facts))
}

/// Stages 7 and 8: the healed model as GGUF q8_0 at `gguf`, evaluated and continuing `PROMPT`.
fn export_and_generate(
    healed: &Path,
    gguf: &Path,
    held: &Windows,
    narrator: &mut dyn Narrator,
) -> Result<(GgufFacts, String)> {
    narrator.stage(
        "7/8 export GGUF q8_0",
        &format!(
            "The healed model is written as a GGUF file for llama.cpp-style runtimes, weights \
             quantized to 8 bits (q8_0), in the recurrent architecture specified in \
             schemas/gguf-recurrent.md (default recurrence {HEALED_R}). It is read back and \
             evaluated at r = {HEALED_R}."
        ),
    );
    let opts = GgufOptions {
        quant: QuantType::Single(DType::Q8_0),
        arch: None,
        recurrence: Some(HEALED_R),
        force: false,
    };
    let exported = export_gguf(&SourceModel::open(healed)?, gguf, &opts, narrator.bytes())?;
    let source = SourceModel::open(gguf)?;
    let model = Model::load_as(&source, None, &Device::Cpu, Weights::Stored)?;
    let row = eval_rows(&model, held, &[HEALED_R], narrator, "GGUF")?.remove(0);
    let facts = GgufFacts {
        quant: exported.quant,
        bytes: exported.file_bytes,
        r: HEALED_R,
        perplexity: row.perplexity,
    };

    narrator.stage(
        "8/8 generate",
        &format!(
            "A greedy continuation of {PROMPT:?} from the GGUF file at r = {HEALED_R}, with a \
             key-value cache per (recurrence, layer), up to the end of the line."
        ),
    );
    Ok((facts, generate_line(&source, &model)?))
}

/// The first `EVAL_TOKENS` tokens of the held-out books, in windows of `EVAL_SEQ_LEN`.
fn held_out(fixture: &FixturePaths, tokenizer: &TextTokenizer) -> Result<Windows> {
    let held = std::slice::from_ref(&fixture.heldout);
    let stream = read_tokens(held, None, tokenizer, Some(EVAL_TOKENS + 1))?;
    Ok(windows(&stream.tokens, EVAL_SEQ_LEN, Some(EVAL_TOKENS)))
}

/// Perplexity at each r (at r = 1 alone for a static model), each with its progress.
fn eval_rows(
    model: &Model,
    held: &Windows,
    rs: &[usize],
    narrator: &mut dyn Narrator,
    what: &str,
) -> Result<Vec<EvalRow>> {
    let rs = if model.is_recurrent() { rs } else { &[1] };
    Ok(rows(
        model,
        held,
        rs,
        4,
        0,
        &format!("{what}, "),
        narrator.tokens(),
    )?)
}

/// The heal of the demo: short, on the training books, the core run exactly `HEALED_R` times every
/// step with gradients through all of them: what teaches the tiny model to use its loop within the
/// demo (docs/RESULTS.md, "The demo's heal").
fn heal_config(model: &Path, fixture: &FixturePaths, out: &Path, steps: u64) -> HealConfig {
    HealConfig {
        model: model.to_path_buf(),
        data: vec![fixture.train.clone()],
        field: "text".into(),
        eval_data: vec![],
        holdout: 0.0,
        out: out.to_path_buf(),
        steps,
        seq_len: 128,
        batch: 4,
        micro_batch: 4,
        curriculum: CurriculumKind::Constant,
        curriculum_warmup: 0.75,
        max_mean_recurrence: HEALED_R,
        curriculum_start: 1,
        backprop_depth: HEALED_R,
        sampler: SamplerKind::Fixed,
        optimizer: OptimizerKind::Muon,
        lr: 3e-3,
        adam_lr: 5e-4,
        weight_decay: 1e-4,
        clip: 1.0,
        warmup: 0.05,
        cooldown: 0.3,
        train: Train::All,
        static_baseline: false,
        init_random: false,
        seed: 0,
        eval_every: 0,
        eval_tokens: EVAL_TOKENS,
        checkpoint_every: 0,
        kernels: Default::default(),
        distill: None,
        lora: None,
        loss_on: Default::default(),
    }
}

/// A greedy continuation of `PROMPT` up to the end of the line (or 32 tokens).
fn generate_line(source: &SourceModel, model: &Model) -> Result<String> {
    let tokenizer = TextTokenizer::for_model(source)?;
    let prompt = tokenizer.encode(PROMPT)?;
    // Byte-level BPE spells a newline "Ċ"; a run of them is one token too.
    let stop = tokenizer
        .eos
        .into_iter()
        .chain(["Ċ", "ĊĊ"].iter().filter_map(|t| tokenizer.token_to_id(t)))
        .collect();
    let opts = GenerateOptions {
        r: HEALED_R,
        max_tokens: 32,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        exit: Exit::Never,
        stop,
    };
    let report = generate(model, &prompt, &opts, &mut |_| Ok(()))?;
    Ok(tokenizer.decode(&report.tokens)?.trim().to_string())
}
