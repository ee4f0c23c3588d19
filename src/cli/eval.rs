//! `surgery eval MODEL --data FILE... --recurrence 1,2,4,8`: perplexity against test-time
//! recurrence (loss, perplexity and tokens/s per r), optionally plotted.

use std::path::PathBuf;

use anyhow::bail;
use candle_core::Device;

use surgery::eval::data::{read_tokens, windows, TokenStream};
use surgery::eval::perplexity::{rows, EvalRow};
use surgery::eval::plot::plot_perplexity;
use surgery::model::Model;
use surgery::plan::LayerRange;
use surgery::source::SourceModel;
use surgery::tokenizer::text::TextTokenizer;

use super::{Global, Runtime};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A recurrent checkpoint, or any source model (then r is ignored).
    pub model: PathBuf,
    /// Held-out text: .txt (documents separated by a blank line) or .jsonl.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// The JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Test-time recurrences to evaluate, e.g. 1,2,4,8,16,32.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub recurrence: Vec<usize>,
    /// Tokens per window (each window starts without context).
    #[arg(long, default_value_t = 1024)]
    pub seq_len: usize,
    /// Score at most this many tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Seed of the initial states.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// For a static model: run only these source layers, e.g. 0..4,18..30 (the pruned model).
    #[arg(long, value_delimiter = ',', value_name = "a..b,...")]
    pub layers: Option<Vec<LayerRange>>,
    #[command(flatten)]
    pub runtime: Runtime,
    /// Dequantize a quantized GGUF's weights to f32 (its exact values) instead of multiplying
    /// with its blocks as llama.cpp does (more memory, no rounding of activations).
    #[arg(long)]
    pub dequantize: bool,
    /// Write a PNG of perplexity against r.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
}

pub fn run(args: EvalArgs, global: Global) -> anyhow::Result<()> {
    if args.recurrence.contains(&0) {
        bail!("--recurrence 0 is not a recurrence: the core runs r >= 1 times");
    }
    if args.seq_len == 0 || args.batch == 0 {
        bail!("--seq-len and --batch must be at least 1");
    }
    if args.max_tokens == Some(0) {
        // Nothing scored would print a NaN perplexity (0 / 0).
        bail!("--max-tokens 0 scores nothing; it must be at least 1");
    }
    let source = SourceModel::open(&args.model)?;
    let tokenizer = TextTokenizer::for_model(&source)?;
    // One token more than scored: the last target needs its input. Reading stops there.
    let limit = args.max_tokens.map(|m| m.saturating_add(1));
    let docs = read_tokens(&args.data, Some(&args.field), &tokenizer, limit)?;
    let windows = windows(&docs.tokens, args.seq_len, args.max_tokens);
    let device = args.runtime.device()?;
    // The longest pass is the first batch (every window but the last has seq-len tokens).
    let longest = windows.windows.first().map_or(0, |w| w.inputs.len());
    let per_pass = args.batch.min(windows.windows.len());
    surgery::model::memory::check_pass(
        &source.config,
        per_pass,
        longest,
        args.runtime.kernels,
        &device,
    )?;
    let model = load(&args, &source, &device)?;
    let rs: Vec<usize> = if model.is_recurrent() {
        args.recurrence.clone()
    } else {
        if !global.quiet && args.recurrence != [1, 2, 4, 8] {
            eprintln!("note: a static model has no recurrence; --recurrence is ignored");
        }
        vec![1]
    };
    if !global.quiet && docs.skipped_invalid_utf8 > 0 {
        eprintln!(
            "note: skipped {} document(s) that are not valid UTF-8",
            docs.skipped_invalid_utf8
        );
    }
    if let Some(path) = &args.plot {
        let mut inputs = source.inputs();
        inputs.extend(args.data.iter().cloned());
        surgery::paths::check_output(path, &inputs)?;
    }
    let mut progress = super::BarProgress::tokens(global);
    let rows = rows(
        &model,
        &windows,
        &rs,
        args.batch,
        args.seed,
        "",
        &mut progress,
    )?;
    report(&args, global, &model, &docs, windows.n_targets(), &rows)
}

/// The model as --layers, --dequantize and --kernels ask.
fn load(args: &EvalArgs, source: &SourceModel, device: &Device) -> anyhow::Result<Model> {
    if args.layers.is_some() && source.config.recurrent.is_some() {
        bail!(
            "--layers selects layers of a static model; {} is recurrent",
            args.model.display()
        )
    }
    let layers: Option<Vec<usize>> = args
        .layers
        .as_ref()
        .map(|ranges| ranges.iter().flat_map(|r| r.iter()).collect());
    let mut model = Model::load_as(
        source,
        layers.as_deref(),
        device,
        super::weights(args.dequantize),
    )?;
    model.set_kernels(args.runtime.kernels);
    Ok(model)
}

/// The plot (when asked), then the table or the JSON.
fn report(
    args: &EvalArgs,
    global: Global,
    model: &Model,
    docs: &TokenStream,
    scored: usize,
    rows: &[EvalRow],
) -> anyhow::Result<()> {
    if let Some(path) = &args.plot {
        let points = rows
            .iter()
            .map(|row| (row.r.unwrap_or(1) as u32, row.perplexity))
            .collect();
        let name = args
            .model
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        plot_perplexity(
            path,
            &format!("{name}: perplexity against test-time recurrence"),
            &[(name, points)],
        )?;
    }
    if global.json {
        let value = serde_json::json!({
            "model": args.model.display().to_string(),
            "recurrent": model.is_recurrent(),
            "documents": docs.documents,
            "skipped_invalid_utf8": docs.skipped_invalid_utf8,
            "seq_len": args.seq_len,
            "rows": rows,
            "plot": args.plot.as_ref().map(|p| p.display().to_string()),
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        outln!(
            "{}: {} documents, {} tokens scored in windows of {}",
            args.model.display(),
            docs.documents,
            scored,
            args.seq_len
        )?;
        outln!(
            "{:>4} {:>8} {:>12} {:>10}",
            "r",
            "loss",
            "perplexity",
            "tokens/s"
        )?;
        for row in rows {
            let r = row.r.map_or_else(|| "-".into(), |r| r.to_string());
            outln!(
                "{r:>4} {:>8.4} {:>12.3} {:>10.1}",
                row.loss,
                row.perplexity,
                row.tokens_per_second
            )?;
        }
        if let Some(path) = &args.plot {
            outln!("plot written to {}", path.display())?;
        }
    }
    Ok(())
}
