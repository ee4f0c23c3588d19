//! `surgery plan MODEL --shape P,C,K`: the layer map, its costs, and the plan file `apply` runs;
//! with `--calibrate FILE`, per-layer scores and core placements ranked on that text (issue 10).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use surgery::eval::calibrate::{self as measure, CalibrateOptions, Timings};
use surgery::eval::plan_calibrated::{candidates, plan_calibrated, Outcome, Request};
use surgery::manifest::sha256_file;
use surgery::plan::calibrate::{self, Calibration, Placement};
use surgery::plan::{
    self, AdapterInit, DtypeChoice, Injection, LayerRange, LayerRequest, Plan, PlanOptions,
    PlanRequest, Shape, StateInit,
};
use surgery::source::SourceModel;

use super::{named, si, thousands, Global, Meter, Unit};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// A Hugging Face directory, a .safetensors file with config.json beside it, or a .gguf file.
    pub model: PathBuf,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Write the plan here (nothing is written without it).
    #[arg(long, short = 'o', value_name = "plan.json")]
    pub out: Option<PathBuf>,
    /// Overwrite an existing --out file.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub calibrate: CalibrateArgs,
}

/// `--calibrate` and its options.
#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// Score every layer and rank core placements of each --shape on this text (.txt, or .jsonl
    /// with --field): block influence, relative update, perplexity without each layer, and the
    /// perplexity of each placement's pruned model.
    #[arg(long, value_name = "FILE")]
    pub calibrate: Option<PathBuf>,
    /// The JSONL field holding the calibration text [default: text].
    #[arg(long)]
    pub field: Option<String>,
    /// Tokens of the calibration text scored by the base pass and the re-scoring [default: 16384].
    #[arg(long, value_name = "N")]
    pub calibrate_tokens: Option<usize>,
    /// The first tokens of those that single-layer removal and the first ranking pass score
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    pub calibrate_subset: Option<usize>,
    /// Tokens per calibration window; each starts without context [default: 512].
    #[arg(long, value_name = "T")]
    pub calibrate_seq_len: Option<usize>,
    /// Best placements of each shape re-scored on all --calibrate-tokens after the first pass;
    /// the paper's rule placement always is [default: 2].
    #[arg(long, value_name = "K")]
    pub rescore: Option<usize>,
    /// best: write the plan of the best ranked placement a plan can hold (a contiguous core).
    #[arg(long, value_enum)]
    pub pick: Option<Pick>,
}

/// Which ranked placement becomes the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pick {
    Best,
}

impl CalibrateArgs {
    fn options(&self) -> CalibrateOptions {
        CalibrateOptions {
            tokens: self.calibrate_tokens.unwrap_or(16384),
            subset: self.calibrate_subset.unwrap_or(1024),
            seq_len: self.calibrate_seq_len.unwrap_or(512),
            rescore: self.rescore.unwrap_or(2),
        }
    }

    /// The first calibration option given without --calibrate, by its flag.
    fn stray(&self) -> Option<&'static str> {
        [
            ("--field", self.field.is_some()),
            ("--calibrate-tokens", self.calibrate_tokens.is_some()),
            ("--calibrate-subset", self.calibrate_subset.is_some()),
            ("--calibrate-seq-len", self.calibrate_seq_len.is_some()),
            ("--rescore", self.rescore.is_some()),
            ("--pick", self.pick.is_some()),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    }
}

/// The layer map and options of a plan; shared by `plan` and `apply MODEL`.
#[derive(clap::Args, Default)]
pub struct LayoutArgs {
    /// Layer counts P,C,K of prelude, core and coda; the paper's rule picks the layers: the first
    /// P, the last K, and the C just before the coda. `plan --calibrate` takes several.
    #[arg(long, value_name = "P,C,K")]
    pub shape: Vec<Shape>,
    /// Source layers of the prelude (end excluded), instead of the rule's.
    #[arg(long, value_name = "a..b")]
    pub prelude: Option<LayerRange>,
    /// Source layers of the core, looped r times.
    #[arg(long, value_name = "a..b")]
    pub core: Option<LayerRange>,
    /// Source layers of the coda.
    #[arg(long, value_name = "a..b")]
    pub coda: Option<LayerRange>,
    /// Allow a layer in two parts (e.g. a core that overlaps the prelude).
    #[arg(long)]
    pub allow_reuse: bool,
    /// identity (default): [0 | I], the output computes exactly the pruned model; reference: the
    /// paper's uniform +-1/sqrt(2h).
    #[arg(long, value_parser = named::<AdapterInit>())]
    pub adapter_init: Option<AdapterInit>,
    /// Std of seeded Gaussian noise added to the state half of an identity adapter [default: 0].
    #[arg(long, value_name = "STD", allow_negative_numbers = true)]
    pub adapter_noise: Option<f64>,
    /// Initial state s_0: truncated normal with the reference's sigma (default), or zero.
    #[arg(long, value_parser = named::<StateInit>())]
    pub state_init: Option<StateInit>,
    /// linear (default): adapter(concat(state, e)); none: no adapter, the core loops on e.
    #[arg(long, value_parser = named::<Injection>())]
    pub injection: Option<Injection>,
    /// Seed of every random draw (adapter, initial state) [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output dtype; keep (default): the source's (quantized GGUF tensors become F32, exactly).
    #[arg(long, value_parser = named::<DtypeChoice>())]
    pub dtype: Option<DtypeChoice>,
    /// Context length for the attention term of the FLOPs [default: 2048].
    #[arg(long, short = 'c', value_name = "T")]
    pub context: Option<u64>,
}

impl LayoutArgs {
    /// True when no plan option was given (so a plan file, not a model, may be the input).
    pub fn is_empty(&self) -> bool {
        let LayoutArgs {
            shape,
            prelude,
            core,
            coda,
            allow_reuse,
            adapter_init,
            adapter_noise,
            state_init,
            injection,
            seed,
            dtype,
            context,
        } = self;
        shape.is_empty()
            && prelude.is_none()
            && core.is_none()
            && coda.is_none()
            && !allow_reuse
            && adapter_init.is_none()
            && adapter_noise.is_none()
            && state_init.is_none()
            && injection.is_none()
            && seed.is_none()
            && dtype.is_none()
            && context.is_none()
    }

    pub fn request(&self) -> PlanRequest {
        let defaults = PlanOptions::default();
        PlanRequest {
            layers: LayerRequest {
                shape: self.shape.first().copied(),
                prelude: self.prelude,
                core: self.core,
                coda: self.coda,
                allow_reuse: self.allow_reuse,
            },
            options: PlanOptions {
                adapter_init: self.adapter_init.unwrap_or(defaults.adapter_init),
                adapter_noise: self.adapter_noise.unwrap_or(defaults.adapter_noise),
                state_init: self.state_init.unwrap_or(defaults.state_init),
                state_std: defaults.state_std,
                injection: self.injection.unwrap_or(defaults.injection),
                seed: self.seed.unwrap_or(defaults.seed),
                dtype: self.dtype.unwrap_or(defaults.dtype),
                allow_reuse: self.allow_reuse,
            },
            context: self.context.unwrap_or(2048),
        }
    }
}

/// Opens MODEL, validates the request, hashes the source and makes the plan.
pub fn make_plan(
    model: &Path,
    layout: &LayoutArgs,
    global: Global,
) -> anyhow::Result<(SourceModel, Plan)> {
    if layout.shape.len() > 1 {
        bail!(
            "--shape is given {} times; several shapes are for `surgery plan --calibrate FILE`",
            layout.shape.len()
        );
    }
    let model = SourceModel::open(model)?;
    let request = layout.request();
    // Validate the layer map before hashing gigabytes.
    request.layers.resolve(model.config.n_layers)?;
    let hashes = hash_files(&model, global)?;
    let plan = plan::make(&model, &request, &hashes)?;
    Ok((model, plan))
}

pub fn run(args: PlanArgs, global: Global) -> anyhow::Result<()> {
    if let Some(out) = &args.out {
        surgery::paths::check_new_output(out, &args.inputs(None), args.force)?;
    }
    let Some(data) = args.calibrate.calibrate.clone() else {
        if let Some(flag) = args.calibrate.stray() {
            bail!("{flag} is an option of --calibrate FILE, which is not given");
        }
        return plan_only(&args, global);
    };
    run_calibrated(&args, &data, global)
}

fn plan_only(args: &PlanArgs, global: Global) -> anyhow::Result<()> {
    let (model, plan) = make_plan(&args.model, &args.layout, global)?;
    super::print_notes(&plan, global);
    if let Some(out) = &args.out {
        write_atomically(out, &plan, &args.inputs(Some(&model)))?;
    }
    if global.json {
        let mut value = serde_json::to_value(&plan)?;
        value["written_to"] = serde_json::json!(args.out.as_ref().map(|p| p.display().to_string()));
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        print_plan(&plan, &model)?;
        if let Some(out) = &args.out {
            outln!("\nplan written to {}", out.display())?;
        }
    }
    Ok(())
}

fn hash_files(model: &SourceModel, global: Global) -> anyhow::Result<Vec<String>> {
    let bar = Meter::new(global, model.total_bytes(), "hashing source", Unit::Bytes);
    let mut done = 0;
    let mut hashes = Vec::new();
    for f in &model.files {
        let path = model.root.join(&f.path);
        let sha = sha256_file(&path, |n| bar.set_position(done + n))
            .with_context(|| format!("hashing {}", path.display()))?;
        done += f.bytes;
        hashes.push(sha);
    }
    bar.finish();
    Ok(hashes)
}

impl PlanArgs {
    /// What this command reads: MODEL (and, once opened, the files beside a model file) and the
    /// calibration text. The plan may not be written over or into any of them.
    fn inputs(&self, model: Option<&SourceModel>) -> Vec<PathBuf> {
        let mut inputs = model.map_or_else(|| vec![self.model.clone()], SourceModel::inputs);
        inputs.extend(self.calibrate.calibrate.clone());
        inputs
    }
}

/// Writes the plan through `OUT.partial-<pid>` (parents made as needed), renamed at the end.
fn write_atomically(out: &Path, plan: &Plan, inputs: &[PathBuf]) -> anyhow::Result<()> {
    surgery::paths::check_output(out, inputs)?;
    let text = serde_json::to_string_pretty(plan)? + "\n";
    let staging = surgery::atomic::Staging::file(out)
        .map_err(|(path, e)| anyhow::Error::new(e).context(path.display().to_string()))?;
    std::fs::write(staging.path(), text)
        .and_then(|_| std::fs::rename(staging.path(), out))
        .inspect_err(|_| staging.abandon())
        .with_context(|| format!("writing {}", out.display()))
}

/// `dropped 2..6, 9..10`: the source layers no part uses, as ranges; or `nothing dropped`.
fn dropped(layers: &plan::Layers, n_layers: usize) -> String {
    let ranges: Vec<String> = layers
        .dropped(n_layers)
        .iter()
        .map(ToString::to_string)
        .collect();
    if ranges.is_empty() {
        "nothing dropped".into()
    } else {
        format!("dropped {}", ranges.join(", "))
    }
}

fn print_plan(plan: &Plan, model: &SourceModel) -> anyhow::Result<()> {
    let layers = &plan.layers;
    let shape = layers.shape();
    outln!(
        "source  {} ({}, {} layers)",
        model.path.display(),
        model.config.family.name(),
        model.config.n_layers
    )?;
    outln!(
        "shape   ({shape}): prelude {}, core {}, coda {}, {}\n",
        layers.prelude,
        layers.core,
        layers.coda,
        dropped(layers, model.config.n_layers)
    )?;
    outln!("{:<7} {:<8} slot", "layer", "role")?;
    for l in 0..model.config.n_layers {
        let mut roles = Vec::new();
        for (name, range) in layers.named() {
            if range.contains(l) {
                let key = if name == "core" { "core_block" } else { name };
                roles.push((name, format!("{key}.{}", l - range.start)));
            }
        }
        if roles.is_empty() {
            outln!("{l:<7} dropped")?;
        }
        for (name, slot) in roles {
            outln!("{l:<7} {name:<8} {slot}")?;
        }
    }
    let c = &plan.costs;
    outln!("\nparameters")?;
    outln!("  source             {:>16}", thousands(c.source_params))?;
    outln!(
        "  recurrent (stored) {:>16}  (embeddings + untied lm_head + {} layers + adapter + final norm)",
        thousands(c.recurrent_params),
        shape.prelude + shape.core + shape.coda
    )?;
    outln!("  per layer          {:>16}", thousands(c.params_per_layer))?;
    outln!(
        "\n{:>4} {:>16} {:>14} {:>14} {:>14}",
        "r",
        "effective params",
        "fwd FLOPs/tok",
        "train FLOPs/tok",
        "KV bytes/tok"
    )?;
    for row in &c.at_r {
        outln!(
            "{:>4} {:>16} {:>14} {:>14} {:>14}",
            row.r,
            thousands(row.effective_params),
            si(row.forward_flops_per_token as f64, ""),
            si(row.train_flops_per_token as f64, ""),
            si(row.kv_bytes_per_token as f64, "B")
        )?;
    }
    outln!(
        "(forward FLOPs at context {}; the source model: {}; training at mean recurrence m = r, backprop depth 8)",
        c.context,
        si(c.source_forward_flops_per_token as f64, "")
    )?;
    outln!(
        "\noutput  {} tensors, {} of tensor data",
        plan.tensors.len(),
        si(c.output_tensor_bytes as f64, "B")
    )?;
    Ok(())
}

/// `plan --calibrate FILE`: everything is checked (shapes, text, options) before the model is
/// loaded and the minutes of measurement start.
fn run_calibrated(args: &PlanArgs, data: &Path, global: Global) -> anyhow::Result<()> {
    let layout = &args.layout;
    let mut shapes: Vec<Shape> = Vec::new();
    for s in &layout.shape {
        if !shapes.contains(s) {
            shapes.push(*s);
        }
    }
    let request = layout.request();
    if request.layers.has_ranges() && shapes.len() > 1 {
        bail!("--prelude/--core/--coda fix one layer map; give one --shape with them");
    }
    if shapes.len() > 1 && args.out.is_some() && args.calibrate.pick.is_none() {
        bail!("several --shape values: pass --pick best to choose the plan --out writes");
    }
    let source = SourceModel::open(&args.model)?;
    let asked = Request {
        plan: &request,
        shapes: &shapes,
        pick_best: args.calibrate.pick == Some(Pick::Best),
        options: args.calibrate.options(),
    };
    let candidates = candidates(&source, &asked)?;
    let field = args.calibrate.field.as_deref().unwrap_or("text");
    let text = measure::read_text(&source, data, field, &asked.options)?;
    if !global.quiet && text.skipped_invalid_utf8 > 0 {
        eprintln!(
            "note: skipped {} calibration document(s) that are not valid UTF-8",
            text.skipped_invalid_utf8
        );
    }
    let hashes = hash_files(&source, global)?;
    let mut progress = super::BarProgress::counting(global);
    let outcome = plan_calibrated(&source, &text, &asked, candidates, &hashes, &mut progress)?;
    let Outcome {
        calibration,
        timings,
        plan,
        picked_rank,
    } = &outcome;
    if let Some(plan) = plan {
        super::print_notes(plan, global);
        if let Some(out) = &args.out {
            write_atomically(out, plan, &args.inputs(Some(&source)))?;
        }
    }
    if global.json {
        let mut value = match plan {
            Some(plan) => serde_json::to_value(plan)?,
            None => serde_json::json!({ "calibration": calibration }),
        };
        value["calibration_seconds"] = serde_json::to_value(timings)?;
        value["picked_rank"] = serde_json::json!(picked_rank);
        value["written_to"] = serde_json::json!(args.out.as_ref().map(|p| p.display().to_string()));
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    print_calibration(calibration, timings, request.context)?;
    match plan {
        Some(plan) => {
            outln!()?;
            if let Some(rank) = picked_rank {
                outln!("picked: rank {rank}, the best placement a plan can hold\n")?;
            }
            print_plan(plan, &source)?;
            if let Some(out) = &args.out {
                outln!("\nplan written to {}", out.display())?;
            }
        }
        None => outln!("\n(several shapes: pass --pick best to plan the best placement)")?,
    }
    Ok(())
}

/// `value / max` of `width` cells in Unicode eighth blocks.
fn bar(value: f64, max: f64, width: usize) -> String {
    const EIGHTHS: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];
    let frac = if max > 0.0 && value.is_finite() {
        (value / max).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let eighths = (frac * (width * 8) as f64).round() as usize;
    let mut s = "█".repeat(eighths / 8);
    s.push_str(EIGHTHS[eighths % 8]);
    let cells = eighths / 8 + usize::from(!eighths.is_multiple_of(8));
    s.push_str(&" ".repeat(width.saturating_sub(cells)));
    s
}

fn print_calibration(c: &Calibration, timings: &Timings, context: u64) -> anyhow::Result<()> {
    let tokens = thousands(c.tokens as u64);
    let subset = thousands(c.subset_tokens as u64);
    outln!(
        "calibration  {} (field {}, {} documents): {tokens} tokens in windows of {}, {:.0} s",
        c.data,
        c.field,
        c.documents,
        c.seq_len,
        timings.total
    )?;
    outln!(
        "source perplexity {:.3} on all {tokens} tokens, {:.3} on the first {subset}",
        c.source_perplexity,
        c.source_subset_perplexity
    )?;
    outln!(
        "block influence and update/input on all {tokens} tokens; perplexity without a layer on the first {subset}\n"
    )?;
    print_layer_scores(c)?;
    print_candidates(c, context)
}

/// The layer table: block influence, update/input, perplexity without each layer; the drop order.
fn print_layer_scores(c: &Calibration) -> anyhow::Result<()> {
    let max_bi = c
        .layers
        .iter()
        .map(|l| l.block_influence)
        .fold(0.0, f64::max);
    let cost = |l: &calibrate::LayerScore| (l.removal_perplexity / c.source_subset_perplexity).ln();
    let max_cost = c
        .layers
        .iter()
        .map(cost)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    outln!(
        "{:>5}  {:<27} {:>13}  {:<14} (its log ratio to the source's)",
        "layer",
        "block influence",
        "update/input",
        "ppl without it"
    )?;
    for l in &c.layers {
        outln!(
            "{:>5}  {:<8.4} {}  {:>13.4}  {:<14.3} {}",
            l.layer,
            l.block_influence,
            bar(l.block_influence, max_bi, 18),
            l.relative_update,
            l.removal_perplexity,
            bar(cost(l), max_cost, 18)
        )?;
    }
    let order: Vec<String> = c.drop_order.iter().map(ToString::to_string).collect();
    outln!(
        "\ndrop order by block influence (ShortGPT, lowest first): {}",
        order.join(", ")
    )?;
    Ok(())
}

/// The ranked core placements with their costs.
fn print_candidates(c: &Calibration, context: u64) -> anyhow::Result<()> {
    let tokens = thousands(c.tokens as u64);
    let subset = thousands(c.subset_tokens as u64);
    let rescored = if c.subset_tokens == c.tokens {
        format!("every placement on all {tokens} tokens")
    } else {
        format!(
            "all placements on the first {subset} tokens, the best {} of each shape and the rule again on all {tokens}",
            c.rescored_per_shape
        )
    };
    outln!(
        "\ncore placements ranked by the perplexity of the pruned model (prelude + core once + coda,\nwhat the identity adapter starts from): {rescored}\n"
    )?;
    outln!(
        "{:>4}  {:<8} {:<14} {:<24} {:>11} {:>11} {:>13} {:>10} {:>10} {:>10}",
        "rank",
        "shape",
        "placement",
        "core",
        format!("ppl {}", short(c.tokens)),
        format!("ppl {}", short(c.subset_tokens)),
        "params",
        "FLOPs r=1",
        "FLOPs r=8",
        "KV/tok r=8"
    )?;
    const SHOWN: usize = 20;
    let mut hidden = 0;
    for cand in &c.candidates {
        let show = cand.rank <= SHOWN || cand.placement == Placement::Rule;
        if !show {
            hidden += 1;
            continue;
        }
        let costs = c.shapes.iter().find(|s| s.shape == cand.shape);
        let at = |r: u64| costs.and_then(|s| s.at_r.iter().find(|a| a.r == r));
        let plannable = if cand.core_range.is_some() { "" } else { " *" };
        outln!(
            "{:>4}  {:<8} {:<14} {:<24} {:>11} {:>11.3} {:>13} {:>10} {:>10} {:>10}",
            cand.rank,
            cand.shape,
            cand.placement.name(),
            format!("{}{plannable}", cand.core_label()),
            cand.perplexity
                .map_or_else(|| "-".into(), |p| format!("{p:.3}")),
            cand.subset_perplexity,
            costs.map_or_else(String::new, |s| thousands(s.recurrent_params)),
            at(1).map_or_else(String::new, |a| si(a.forward_flops_per_token as f64, "")),
            at(8).map_or_else(String::new, |a| si(a.forward_flops_per_token as f64, "")),
            at(8).map_or_else(String::new, |a| si(a.kv_bytes_per_token as f64, "B")),
        )?;
    }
    if hidden > 0 {
        outln!("  ... {hidden} more (all of them in --json and in the plan file)")?;
    }
    if c.candidates.iter().any(|x| x.core_range.is_none()) {
        outln!("  * not contiguous: measured for comparison; a plan holds a contiguous core only")?;
    }
    outln!(
        "(params: stored by the recurrent checkpoint; forward FLOPs per token at context {context} and\nKV-cache bytes per token at recurrence r)"
    )?;
    Ok(())
}

/// 16384 -> "16k"; below 1000 as it is.
fn short(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1024) {
        format!("{}k", n / 1024)
    } else {
        n.to_string()
    }
}
