//! `surgery plan MODEL --shape P,C,K`: the layer map, its costs, and the plan file `apply` runs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use surgery::manifest::sha256_file;
use surgery::plan::{
    self, AdapterInit, DtypeChoice, Injection, LayerRange, LayerRequest, Plan, PlanOptions,
    PlanRequest, Shape, StateInit,
};
use surgery::source::SourceModel;

use super::{byte_progress, si, thousands, Global};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// A Hugging Face directory, a .safetensors file with config.json beside it, or a .gguf file.
    pub model: PathBuf,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Write the plan here (nothing is written without it).
    #[arg(long, value_name = "plan.json")]
    pub out: Option<PathBuf>,
    /// Overwrite an existing --out file.
    #[arg(long)]
    pub force: bool,
}

/// The layer map and options of a plan; shared by `plan` and `apply MODEL`.
#[derive(clap::Args, Default)]
pub struct LayoutArgs {
    /// Layer counts P,C,K of prelude, core and coda; the paper's rule picks the layers: the first
    /// P, the last K, and the C just before the coda.
    #[arg(long, value_name = "P,C,K")]
    pub shape: Option<Shape>,
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
    #[arg(long, value_enum)]
    pub adapter_init: Option<AdapterInit>,
    /// Std of seeded Gaussian noise added to the state half of an identity adapter [default: 0].
    #[arg(long, value_name = "STD", allow_negative_numbers = true)]
    pub adapter_noise: Option<f64>,
    /// Initial state s_0: truncated normal with the reference's sigma (default), or zero.
    #[arg(long, value_enum)]
    pub state_init: Option<StateInit>,
    /// linear (default): adapter(concat(state, e)); none: no adapter, the core loops on e.
    #[arg(long, value_enum)]
    pub injection: Option<Injection>,
    /// Seed of every random draw (adapter, initial state) [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output dtype; keep (default): the source's (quantized GGUF tensors become F32, exactly).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeChoice>,
    /// Context length for the attention term of the FLOPs [default: 2048].
    #[arg(long)]
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
        shape.is_none()
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
                shape: self.shape,
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
        if out.exists() && !args.force {
            bail!(
                "{} already exists; pass --force to overwrite it",
                out.display()
            );
        }
    }
    let (model, plan) = make_plan(&args.model, &args.layout, global)?;
    super::print_notes(&plan, global);
    if let Some(out) = &args.out {
        write_atomically(out, &plan)?;
    }
    if global.json {
        let mut value = serde_json::to_value(&plan)?;
        value["written_to"] = serde_json::json!(args.out.as_ref().map(|p| p.display().to_string()));
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_plan(&plan, &model);
        if let Some(out) = &args.out {
            println!("\nplan written to {}", out.display());
        }
    }
    Ok(())
}

fn hash_files(model: &SourceModel, global: Global) -> anyhow::Result<Vec<String>> {
    let bar = byte_progress(global, model.total_bytes(), "hashing source");
    let mut done = 0;
    let mut hashes = Vec::new();
    for f in &model.files {
        let path = model.root.join(&f.path);
        let sha = sha256_file(&path, |n| bar.set_position(done + n))
            .with_context(|| format!("hashing {}", path.display()))?;
        done += f.bytes;
        hashes.push(sha);
    }
    bar.finish_and_clear();
    Ok(hashes)
}

fn write_atomically(out: &std::path::Path, plan: &Plan) -> anyhow::Result<()> {
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let text = serde_json::to_string_pretty(plan)? + "\n";
    std::fs::write(&partial, text)
        .and_then(|_| std::fs::rename(&partial, out))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })
        .with_context(|| format!("writing {}", out.display()))
}

fn print_plan(plan: &Plan, model: &SourceModel) {
    let layers = &plan.layers;
    let shape = layers.shape();
    println!(
        "source  {} ({}, {} layers)",
        model.path.display(),
        model.config.family.name(),
        model.config.n_layers
    );
    println!(
        "shape   ({shape}): prelude {}, core {}, coda {}\n",
        layers.prelude, layers.core, layers.coda
    );
    println!("{:<7} {:<8} slot", "layer", "role");
    for l in 0..model.config.n_layers {
        let mut roles = Vec::new();
        for (name, range) in layers.named() {
            if range.contains(l) {
                let key = if name == "core" { "core_block" } else { name };
                roles.push((name, format!("{key}.{}", l - range.start)));
            }
        }
        if roles.is_empty() {
            println!("{l:<7} dropped");
        }
        for (name, slot) in roles {
            println!("{l:<7} {name:<8} {slot}");
        }
    }
    let c = &plan.costs;
    println!("\nparameters");
    println!("  source             {:>16}", thousands(c.source_params));
    println!(
        "  recurrent (stored) {:>16}  (embeddings + untied lm_head + {} layers + adapter + final norm)",
        thousands(c.recurrent_params),
        shape.prelude + shape.core + shape.coda
    );
    println!("  per layer          {:>16}", thousands(c.params_per_layer));
    println!(
        "\n{:>4} {:>16} {:>14} {:>14} {:>14}",
        "r", "effective params", "fwd FLOPs/tok", "train FLOPs/tok", "KV bytes/tok"
    );
    for row in &c.at_r {
        println!(
            "{:>4} {:>16} {:>14} {:>14} {:>14}",
            row.r,
            thousands(row.effective_params),
            si(row.forward_flops_per_token as f64, ""),
            si(row.train_flops_per_token as f64, ""),
            si(row.kv_bytes_per_token as f64, "B")
        );
    }
    println!(
        "(forward FLOPs at context {}; the source model: {}; training at mean recurrence m = r, backprop depth 8)",
        c.context,
        si(c.source_forward_flops_per_token as f64, "")
    );
    println!(
        "\noutput  {} tensors, {} of tensor data",
        plan.tensors.len(),
        si(c.output_tensor_bytes as f64, "B")
    );
}
