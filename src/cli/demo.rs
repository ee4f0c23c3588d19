//! `surgery demo [--out DIR] [--heal-steps N]`: the whole method on the small pretrained model in
//! fixtures/tiny/ (embedded in the binary), offline: inspect -> plan -> apply -> eval at r = 1, 2,
//! 4, 8 -> heal -> eval again -> export GGUF q8_0 -> generate from the GGUF. Each stage calls the
//! same library functions as its command; a paragraph on stderr says what it does and why.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use surgery::demo::{write_fixture, FixturePaths};
use surgery::eval::data::{read_tokens, windows, Windows};
use surgery::eval::perplexity::EvalRow;
use surgery::export::{export_gguf, GgufOptions, QuantType};
use surgery::heal::train::{run as heal, CurriculumKind, HealConfig, OptimizerKind, SamplerKind};
use surgery::manifest::sha256_file;
use surgery::model::params::Train;
use surgery::model::{generate, Exit, GenerateOptions, Model, Weights};
use surgery::plan::{self, LayerRequest, PlanOptions, PlanRequest, Shape};
use surgery::source::SourceModel;
use surgery::surgery::{apply, ApplyOptions};
use surgery::tokenizer::text::TextTokenizer;

use super::{si, BarProgress, Global};

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
const PROMPT: &str = "And the LORD said unto Moses,";

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keep the artifacts in DIR (written atomically); default: a new temporary folder.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Replace an existing DIR.
    #[arg(long)]
    pub force: bool,
    /// Optimizer steps of the heal (4 sequences of 128 tokens each).
    #[arg(long, default_value_t = 450)]
    pub heal_steps: u64,
}

pub fn run(args: DemoArgs, global: Global) -> anyhow::Result<()> {
    if args.heal_steps == 0 {
        bail!("--heal-steps must be at least 1");
    }
    let Some(out) = &args.out else {
        let dir = std::env::temp_dir().join(format!("surgery-demo-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let summary = stages(&dir, &dir, &args, global)?;
        return report(&summary, global);
    };
    surgery::paths::refuse_existing(out, args.force)?;
    let io = |path: PathBuf, e| anyhow::Error::new(e).context(path.display().to_string());
    let summary = surgery::atomic::Staging::write_dir(out, args.force, io, |dir| {
        stages(dir, out, &args, global)
    })?;
    report(&summary, global)
}

/// A paragraph on stderr (unless --quiet): what a stage does and why.
fn explain(global: Global, title: &str, text: &str) {
    if !global.quiet {
        eprintln!("\n== {title}\n{text}");
    }
}

/// Runs every stage in `dir` (which becomes `shown` once published) and returns the summary.
fn stages(dir: &Path, shown: &Path, args: &DemoArgs, global: Global) -> anyhow::Result<Value> {
    let started = Instant::now();
    let device = candle_core::Device::Cpu;
    let fixture = write_fixture(dir).context("writing the embedded fixture")?;

    // 1. inspect
    let source = SourceModel::open(&fixture.model)?;
    let c = source.config.clone();
    let params: usize = source.tensors.values().map(|t| t.n_elements()).sum();
    explain(
        global,
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
            si(params as f64, ""),
            source.main_dtype().name(),
        ),
    );
    let tokenizer = TextTokenizer::for_model(&source)?;
    let held = held_out(&fixture, &tokenizer)?;
    let full = {
        let model = Model::load(&source, &device)?;
        eval_rows(&model, &held, &[1], global, "full model")?
            .remove(0)
            .perplexity
    };

    // 2. plan
    let request = PlanRequest {
        layers: LayerRequest {
            shape: Some(SHAPE),
            prelude: None,
            core: None,
            coda: None,
            allow_reuse: false,
        },
        options: PlanOptions::default(),
        context: 2048,
    };
    let hashes = source
        .files
        .iter()
        .map(|f| sha256_file(&source.root.join(&f.path), |_| {}))
        .collect::<std::io::Result<Vec<_>>>()
        .context("hashing the fixture")?;
    let plan = plan::make(&source, &request, &hashes)?;
    let layers = &plan.layers;
    let dropped: Vec<String> = (0..c.n_layers)
        .filter(|i| !layers.output_order().any(|j| j == *i))
        .map(|i| i.to_string())
        .collect();
    explain(
        global,
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
    let mut plan_bytes = serde_json::to_vec_pretty(&plan)?;
    plan_bytes.push(b'\n');
    std::fs::write(dir.join("plan.json"), &plan_bytes).context("writing plan.json")?;

    // 3. apply
    explain(
        global,
        "3/8 apply",
        "The plan is executed: copied tensors go byte for byte from the source, each layer's \
         Q/K/V and gate/up matrices are fused as the published recurrent models store them, \
         and the adapter is initialized. The result is a Hugging Face checkpoint of model_type \
         huginn_raven with a manifest of sha256 hashes.",
    );
    let recurrent = dir.join("recurrent");
    let opts = ApplyOptions {
        max_shard_bytes: 5_000_000_000,
        force: false,
        strict: true,
    };
    apply(
        &plan,
        &plan_bytes,
        &recurrent,
        &opts,
        &mut BarProgress::new(global),
    )?;

    // 4. eval before healing
    explain(
        global,
        "4/8 eval before healing",
        &format!(
            "Perplexity on {EVAL_TOKENS} tokens of held-out books (never trained on) at test-time \
             recurrence r = 1, 2, 4, 8. The full {}-layer model scores {full:.2}. With the \
             identity adapter every r gives the pruned model's perplexity: dropping layers cost \
             something, and looping the core does not help yet, because the model never learned \
             to use a state.",
            c.n_layers
        ),
    );
    let before = {
        let model = Model::load(&SourceModel::open(&recurrent)?, &device)?;
        eval_rows(&model, &held, &RS, global, "before heal")?
    };

    // 5. heal
    explain(
        global,
        "5/8 heal",
        &format!(
            "A short fine-tune heals the cut model: {} steps of 4 sequences of 128 tokens from \
             the training books, each step running the core exactly {HEALED_R} times with \
             gradients through all of them (`heal --sampler fixed`), Muon on the matrices and \
             AdamW on embeddings and norms. The paper draws a random number of iterations each \
             step, their mean rising under a curriculum (`heal`'s default); in this minute that \
             teaches the tiny model to tolerate its loop, while a fixed count teaches it to use \
             one.",
            args.heal_steps
        ),
    );
    let healed = dir.join("healed");
    let config = heal_config(&recurrent, &fixture, &healed, args.heal_steps);
    let mut observer = super::heal::Bar::new(global, args.heal_steps);
    let mut trained = heal(&config, None, &device, &mut observer)?;
    observer.bar.finish_and_clear();
    surgery::heal::output::write(&mut trained, false)?;
    let heal_seconds = trained
        .metrics
        .iter()
        .map(|m| m.tokens as f64 / m.tokens_per_second)
        .sum::<f64>();

    // 6. eval after healing
    explain(
        global,
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
    let after = eval_rows(&trained.model, &held, &RS, global, "after heal")?;
    drop(trained);

    // 7. export GGUF q8_0
    explain(
        global,
        "7/8 export GGUF q8_0",
        &format!(
            "The healed model is written as a GGUF file for llama.cpp-style runtimes, weights \
             quantized to 8 bits (q8_0), in the recurrent architecture specified in \
             schemas/gguf-recurrent.md (default recurrence {HEALED_R}). It is read back and \
             evaluated at r = {HEALED_R}."
        ),
    );
    let gguf = dir.join("healed-q8_0.gguf");
    let quant: QuantType = "q8_0".parse().map_err(anyhow::Error::msg)?;
    let gguf_opts = GgufOptions {
        quant,
        arch: None,
        recurrence: Some(HEALED_R),
        force: false,
    };
    let exported = export_gguf(
        &SourceModel::open(&healed)?,
        &gguf,
        &gguf_opts,
        &mut BarProgress::new(global),
    )?;
    let gguf_source = SourceModel::open(&gguf)?;
    let gguf_model = Model::load_as(&gguf_source, None, &device, Weights::Stored)?;
    let gguf_row = eval_rows(&gguf_model, &held, &[HEALED_R], global, "GGUF")?.remove(0);

    // 8. generate
    explain(
        global,
        "8/8 generate",
        &format!(
            "A greedy continuation of {PROMPT:?} from the GGUF file at r = {HEALED_R}, with a \
             key-value cache per (recurrence, layer), up to the end of the line."
        ),
    );
    let text = generate_line(&gguf_source, &gguf_model)?;

    let artifacts = json!({
        "dir": shown.display().to_string(),
        "model": "tiny",
        "train_text": "text/train.txt",
        "heldout_text": "text/heldout.txt",
        "plan": "plan.json",
        "recurrent": "recurrent",
        "healed": "healed",
        "metrics": "healed/metrics.jsonl",
        "gguf": "healed-q8_0.gguf",
        "summary": "summary.json",
    });
    let summary = json!({
        "model": {
            "family": c.family,
            "layers": c.n_layers,
            "hidden": c.hidden,
            "vocab": c.vocab,
            "params": params,
        },
        "shape": SHAPE.to_string(),
        "layers": {
            "prelude": layers.prelude.to_string(),
            "core": layers.core.to_string(),
            "coda": layers.coda.to_string(),
            "dropped": dropped,
        },
        "eval_tokens": held.n_targets(),
        "full_model_perplexity": full,
        "heal": {
            "steps": args.heal_steps,
            "max_mean_recurrence": HEALED_R,
            "seconds": heal_seconds,
        },
        "table": RS.iter().zip(before.iter().zip(&after)).map(|(r, (b, a))| json!({
            "r": r,
            "before": b.perplexity,
            "after": a.perplexity,
        })).collect::<Vec<_>>(),
        "gguf": {
            "type": exported.quant,
            "bytes": exported.file_bytes,
            "r": HEALED_R,
            "perplexity": gguf_row.perplexity,
        },
        "generated": { "prompt": PROMPT, "r": HEALED_R, "text": text },
        "artifacts": artifacts,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let mut bytes = serde_json::to_vec_pretty(&summary)?;
    bytes.push(b'\n');
    std::fs::write(dir.join("summary.json"), bytes).context("writing summary.json")?;
    Ok(summary)
}

/// The first `EVAL_TOKENS` tokens of the held-out books, in windows of `EVAL_SEQ_LEN`.
fn held_out(fixture: &FixturePaths, tokenizer: &TextTokenizer) -> anyhow::Result<Windows> {
    let held = std::slice::from_ref(&fixture.heldout);
    let stream = read_tokens(held, None, tokenizer, Some(EVAL_TOKENS + 1))?;
    Ok(windows(&stream.tokens, EVAL_SEQ_LEN, Some(EVAL_TOKENS)))
}

/// Perplexity at each r, with a progress bar over the scored tokens.
fn eval_rows(
    model: &Model,
    held: &Windows,
    rs: &[usize],
    global: Global,
    what: &str,
) -> anyhow::Result<Vec<EvalRow>> {
    let rs: Vec<usize> = if model.is_recurrent() {
        rs.to_vec()
    } else {
        vec![1]
    };
    super::eval::rows_with_progress(model, held, &rs, 4, 0, global, what)
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
    }
}

/// A greedy continuation of `PROMPT` up to the end of the line (or 32 tokens).
fn generate_line(source: &SourceModel, model: &Model) -> anyhow::Result<String> {
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
    let report = generate(model, &prompt, &opts, &mut |_| Ok(())).context("generating")?;
    Ok(tokenizer.decode(&report.tokens)?.trim().to_string())
}

/// The before/after table, the GGUF, the generated line and where everything is (or the JSON).
fn report(summary: &Value, global: Global) -> anyhow::Result<()> {
    if global.json {
        outln!("{}", serde_json::to_string_pretty(summary)?)?;
        return Ok(());
    }
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    outln!(
        "\nperplexity on {} held-out tokens (full {}-layer model: {:.2}); shape ({}), layers {} dropped",
        summary["eval_tokens"],
        summary["model"]["layers"],
        f(&summary["full_model_perplexity"]),
        summary["shape"].as_str().unwrap_or(""),
        summary["layers"]["dropped"]
            .as_array()
            .map(|d| d.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
    )?;
    outln!("{:>4} {:>12} {:>12}", "r", "before heal", "after heal")?;
    for row in summary["table"].as_array().into_iter().flatten() {
        outln!(
            "{:>4} {:>12.2} {:>12.2}",
            row["r"].as_u64().unwrap_or(0),
            f(&row["before"]),
            f(&row["after"])
        )?;
    }
    outln!(
        "GGUF {} at r = {}: perplexity {:.2}",
        summary["gguf"]["type"].as_str().unwrap_or(""),
        summary["gguf"]["r"],
        f(&summary["gguf"]["perplexity"])
    )?;
    outln!(
        "generated (GGUF, r = {}): {} {}",
        summary["generated"]["r"],
        PROMPT,
        summary["generated"]["text"].as_str().unwrap_or("")
    )?;
    let a = &summary["artifacts"];
    let dir = a["dir"].as_str().unwrap_or("");
    outln!("artifacts in {dir}:")?;
    for (key, what) in [
        ("model", "the fixture model (Hugging Face Llama)"),
        ("plan", "the plan apply executed"),
        ("recurrent", "the recurrent checkpoint before healing"),
        ("healed", "the healed checkpoint (metrics.jsonl, curves)"),
        ("gguf", "the healed model as GGUF q8_0"),
        ("summary", "this summary as JSON"),
    ] {
        outln!("  {:<18} {what}", a[key].as_str().unwrap_or(""))?;
    }
    outln!("done in {:.0} s", f(&summary["seconds"]))?;
    Ok(())
}
