//! `surgery eval MODEL --data FILE... --recurrence 1,2,4,8`: perplexity against test-time
//! recurrence (loss, perplexity and tokens/s per r), optionally plotted; `--task FILE.jsonl`:
//! a multiple-choice task's accuracies per r; `--baseline SOURCE`: the source and the pruned
//! source measured the same way, as baseline rows.

use std::path::PathBuf;

use anyhow::bail;
use candle_core::Device;

use surgery::eval::baseline::{self, Baseline};
use surgery::eval::data::{read_tokens, strided_windows, windows, TokenStream, Windows};
use surgery::eval::perplexity::{rows as perplexity_rows, EvalRow};
use surgery::eval::plot::plot_perplexity;
use surgery::eval::task::{read_task, requests, rows as task_rows, Requests, TaskRow};
use surgery::model::{Kernels, Model};
use surgery::plan::LayerRange;
use surgery::source::SourceModel;
use surgery::tokenizer::text::TextTokenizer;

use super::{Global, Runtime};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A recurrent checkpoint, or any source model (then r is ignored).
    pub model: PathBuf,
    /// Held-out text: .txt (documents separated by a blank line) or .jsonl.
    #[arg(long, required_unless_present = "task", conflicts_with = "task", num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// A multiple-choice task instead of text, one JSON object a line: {"context": "...",
    /// "choices": ["...", "..."], "gold": 0}. Each choice (after a " ", lm-eval's target
    /// delimiter) is scored by its log-likelihood after the context, as lm-evaluation-harness
    /// scores it; prints acc, acc_norm (per character) and acc_bytes (per byte) at each r.
    #[arg(long, value_name = "FILE.jsonl")]
    pub task: Option<PathBuf>,
    /// With --task: score only the first N examples (lm-eval's --limit).
    #[arg(long, value_name = "N", requires = "task")]
    pub limit: Option<usize>,
    /// The JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub field: String,
    /// Test-time recurrences to evaluate, e.g. 1,2,4,8,16,32.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub recurrence: Vec<usize>,
    /// Tokens per window (each window starts without context); with --task, the most tokens a
    /// request may have (longer ones lose their first tokens).
    #[arg(long, short = 'c', default_value_t = 1024)]
    pub seq_len: usize,
    /// Strided perplexity: windows of --seq-len tokens start every S tokens (1 <= S <= seq-len),
    /// each scoring only the tokens no earlier window scored, the rest being context. Every token
    /// is still scored once; after the first window each has at least seq-len - S tokens of
    /// context. S = seq-len is the default windows. llama-perplexity --ppl-stride S -c T scores
    /// the same windows, except that its first one scores only its last S tokens; its default
    /// (no --ppl-stride) is no stride: the second half of non-overlapping chunks of -c tokens.
    #[arg(long, value_name = "S", conflicts_with = "task")]
    pub stride: Option<usize>,
    /// Score at most this many tokens.
    #[arg(long, short = 'n', conflicts_with = "task")]
    pub max_tokens: Option<usize>,
    /// Windows (with --task: choices) per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Seed of the initial states.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// For a static model: run only these source layers, e.g. 0..4,18..30 (the pruned model).
    #[arg(long, value_delimiter = ',', value_name = "a..b,...")]
    pub layers: Option<Vec<LayerRange>>,
    /// Also measure the source this recurrent checkpoint was cut from, and the pruned source (the
    /// layers the checkpoint kept, run once), as baseline rows and plot lines. SOURCE must be the
    /// source its config.json records: the same files, sizes and sha256.
    #[arg(long, value_name = "SOURCE")]
    pub baseline: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: Runtime,
    /// Dequantize a quantized GGUF's weights to f32 (its exact values) instead of multiplying
    /// with its blocks as llama.cpp does (more memory, no rounding of activations).
    #[arg(long)]
    pub dequantize: bool,
    /// Write a PNG of perplexity against r.
    #[arg(long, value_name = "FILE.png", conflicts_with = "task")]
    pub plot: Option<PathBuf>,
}

/// What is measured: perplexity over windows of text, or a task's accuracies.
enum Job {
    Text { docs: TokenStream, windows: Windows },
    Task(Requests),
}

/// One model's rows.
enum Rows {
    Text(Vec<EvalRow>),
    Task(Vec<TaskRow>),
}

impl Rows {
    /// The perplexity rows (none for a task's).
    fn text(&self) -> &[EvalRow] {
        match self {
            Rows::Text(rows) => rows,
            Rows::Task(_) => &[],
        }
    }

    /// The task rows (none for perplexity's).
    fn task(&self) -> &[TaskRow] {
        match self {
            Rows::Task(rows) => rows,
            Rows::Text(_) => &[],
        }
    }
}

/// A baseline's name, the source layers it runs (None: all) and its one row.
struct BaselineRows {
    name: &'static str,
    layers: Option<Vec<usize>>,
    rows: Rows,
}

pub fn run(args: EvalArgs, global: Global) -> anyhow::Result<()> {
    check_numbers(&args)?;
    let source = SourceModel::open(&args.model)?;
    let tokenizer = TextTokenizer::for_model(&source)?;
    let job = match &args.task {
        Some(path) => {
            let task = read_task(path, args.limit)?;
            Job::Task(requests(task, &tokenizer, args.seq_len)?)
        }
        None => text_job(&args, &tokenizer)?,
    };
    let baseline = match &args.baseline {
        Some(path) => Some(baseline::open(&source, path)?),
        None => None,
    };
    if let Some(path) = &args.plot {
        let mut inputs = source.inputs();
        inputs.extend(args.data.iter().cloned());
        surgery::paths::check_output(path, &inputs)?;
    }
    let device = args.runtime.device()?;
    job.check_memory(&source, args.batch, args.runtime.kernels, &device)?;
    let model = load(&args, &source, &device)?;
    let rs: Vec<usize> = if model.is_recurrent() {
        args.recurrence.clone()
    } else {
        if !global.quiet && args.recurrence != [1, 2, 4, 8] {
            eprintln!("note: a static model has no recurrence; --recurrence is ignored");
        }
        vec![1]
    };
    if let Job::Text { docs, .. } = &job {
        if !global.quiet && docs.skipped_invalid_utf8 > 0 {
            eprintln!(
                "note: skipped {} document(s) that are not valid UTF-8",
                docs.skipped_invalid_utf8
            );
        }
    }
    let mut progress = super::BarProgress::tokens(global);
    let rows = job.measure(&model, &rs, &args, "", &mut progress)?;
    drop(model);
    let baselines = match baseline {
        Some(b) => measure_baselines(&args, &job, &b, &device, &mut progress)?,
        None => vec![],
    };
    report(
        &args,
        global,
        &model_name(&args),
        &job,
        &rs,
        &rows,
        &baselines,
    )
}

/// The refusals of numbers no run can use.
fn check_numbers(args: &EvalArgs) -> anyhow::Result<()> {
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
    if args.limit == Some(0) {
        bail!("--limit 0 scores no example; it must be at least 1");
    }
    if let Some(stride) = args.stride {
        if stride == 0 || stride > args.seq_len {
            bail!(
                "--stride {stride} must be from 1 to --seq-len ({}): a larger one would skip \
                 tokens",
                args.seq_len
            );
        }
    }
    Ok(())
}

/// The text's tokens and windows (strided with --stride).
fn text_job(args: &EvalArgs, tokenizer: &TextTokenizer) -> anyhow::Result<Job> {
    // One token more than scored: the last target needs its input. Reading stops there.
    let limit = args.max_tokens.map(|m| m.saturating_add(1));
    let docs = read_tokens(&args.data, Some(&args.field), tokenizer, limit)?;
    let windows = match args.stride {
        Some(stride) => strided_windows(&docs.tokens, args.seq_len, stride, args.max_tokens),
        None => windows(&docs.tokens, args.seq_len, args.max_tokens),
    };
    Ok(Job::Text { docs, windows })
}

impl Job {
    /// Refuses a pass the machine's memory cannot hold, for a model of `source`'s shape.
    fn check_memory(
        &self,
        source: &SourceModel,
        batch: usize,
        kernels: Kernels,
        device: &Device,
    ) -> anyhow::Result<()> {
        let (longest, n, kernels) = match self {
            // The longest pass is the first batch (every window but the last has seq-len tokens).
            Job::Text { windows, .. } => (
                windows.windows.first().map_or(0, |w| w.inputs.len()),
                windows.windows.len(),
                kernels,
            ),
            // A task's pass holds the whole logits whatever the kernels: the composed bound.
            Job::Task(requests) => (
                requests.longest(),
                requests.windows.len(),
                Kernels::Composed,
            ),
        };
        let per_pass = batch.min(n);
        surgery::model::memory::check_pass(&source.config, per_pass, longest, kernels, device)?;
        Ok(())
    }

    /// `model`'s rows at each r.
    fn measure(
        &self,
        model: &Model,
        rs: &[usize],
        args: &EvalArgs,
        label: &str,
        progress: &mut super::BarProgress,
    ) -> anyhow::Result<Rows> {
        let (batch, seed) = (args.batch, args.seed);
        Ok(match self {
            Job::Text { windows, .. } => Rows::Text(perplexity_rows(
                model, windows, rs, batch, seed, label, progress,
            )?),
            Job::Task(requests) => Rows::Task(task_rows(
                model, requests, rs, batch, seed, label, progress,
            )?),
        })
    }
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
    load_layers(args, source, layers.as_deref(), device)
}

/// `source` with only `layers` (all when None), as --dequantize and --kernels ask.
fn load_layers(
    args: &EvalArgs,
    source: &SourceModel,
    layers: Option<&[usize]>,
    device: &Device,
) -> anyhow::Result<Model> {
    let mut model = Model::load_as(source, layers, device, super::weights(args.dequantize))?;
    model.set_kernels(args.runtime.kernels);
    Ok(model)
}

/// The source and the pruned source, each loaded in turn and measured once (no recurrence).
fn measure_baselines(
    args: &EvalArgs,
    job: &Job,
    baseline: &Baseline,
    device: &Device,
    progress: &mut super::BarProgress,
) -> anyhow::Result<Vec<BaselineRows>> {
    let mut out = Vec::with_capacity(2);
    for (name, layers) in [("source", None), ("pruned", Some(baseline.kept.clone()))] {
        job.check_memory(&baseline.source, args.batch, args.runtime.kernels, device)?;
        let model = load_layers(args, &baseline.source, layers.as_deref(), device)?;
        let rows = job.measure(&model, &[1], args, &format!("{name} "), progress)?;
        out.push(BaselineRows { name, layers, rows });
    }
    Ok(out)
}

/// The model's name for the plot: its file or folder name.
fn model_name(args: &EvalArgs) -> String {
    args.model
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}

/// The plot (when asked), then the table or the JSON.
fn report(
    args: &EvalArgs,
    global: Global,
    name: &str,
    job: &Job,
    rs: &[usize],
    rows: &Rows,
    baselines: &[BaselineRows],
) -> anyhow::Result<()> {
    match (job, rows) {
        (Job::Text { docs, windows }, Rows::Text(rows)) => {
            if let Some(path) = &args.plot {
                plot(path, name, rs, rows, baselines)?;
            }
            let text = Text {
                docs,
                scored: windows.n_targets(),
                rows,
                baselines,
            };
            if global.json {
                text.json(args)
            } else {
                text.table(args)
            }
        }
        (Job::Task(requests), Rows::Task(rows)) => {
            let task = TaskReport {
                requests,
                rows,
                baselines,
            };
            if global.json {
                task.json(args)
            } else {
                task.table(args)
            }
        }
        _ => bail!("internal: rows of another kind than the job"),
    }
}

/// Perplexity against r, with each baseline as a flat line over the same r.
fn plot(
    path: &std::path::Path,
    name: &str,
    rs: &[usize],
    rows: &[EvalRow],
    baselines: &[BaselineRows],
) -> anyhow::Result<()> {
    let points = rows
        .iter()
        .map(|row| (row.r.unwrap_or(1) as u32, row.perplexity))
        .collect();
    let mut series = Vec::with_capacity(baselines.len() + 1);
    for b in baselines {
        if let Some(row) = b.rows.text().first() {
            let flat = rs.iter().map(|&r| (r as u32, row.perplexity)).collect();
            series.push((b.name.to_string(), flat));
        }
    }
    // The model last, drawn over a baseline it equals (the pruned source, before healing).
    series.push((name.to_string(), points));
    plot_perplexity(
        path,
        &format!("{name}: perplexity against test-time recurrence"),
        &series,
    )?;
    Ok(())
}

/// The baselines' rows of one kind (`pick`), each with its name and layers.
fn named<T: serde::Serialize>(
    baselines: &[BaselineRows],
    pick: impl Fn(&Rows) -> &[T],
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for b in baselines {
        for row in pick(&b.rows) {
            let mut value = serde_json::to_value(row).unwrap_or_default();
            if let Some(object) = value.as_object_mut() {
                object.insert("name".into(), b.name.into());
                object.insert("layers".into(), serde_json::json!(b.layers));
            }
            out.push(value);
        }
    }
    out
}

/// A label for the r column: the r, "-" for a static model.
fn r_label(r: Option<usize>) -> String {
    r.map_or_else(|| "-".into(), |r| r.to_string())
}

/// A perplexity run's report.
struct Text<'a> {
    docs: &'a TokenStream,
    scored: usize,
    rows: &'a [EvalRow],
    baselines: &'a [BaselineRows],
}

impl Text<'_> {
    fn json(&self, args: &EvalArgs) -> anyhow::Result<()> {
        let baselines = named(self.baselines, Rows::text);
        let value = serde_json::json!({
            "model": args.model.display().to_string(),
            "recurrent": self.rows.iter().any(|row| row.r.is_some()),
            "documents": self.docs.documents,
            "skipped_invalid_utf8": self.docs.skipped_invalid_utf8,
            "seq_len": args.seq_len,
            "stride": args.stride.unwrap_or(args.seq_len),
            "rows": self.rows,
            "baselines": baselines,
            "plot": args.plot.as_ref().map(|p| p.display().to_string()),
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        Ok(())
    }

    fn table(&self, args: &EvalArgs) -> anyhow::Result<()> {
        let stride = match args.stride {
            Some(s) if s < args.seq_len => format!(" starting every {s}"),
            _ => String::new(),
        };
        outln!(
            "{}: {} documents, {} tokens scored in windows of {}{stride}",
            args.model.display(),
            self.docs.documents,
            self.scored,
            args.seq_len
        )?;
        // The r column widens for the baselines' names only, so a plain table stays as it was.
        let w = if self.baselines.is_empty() { 4 } else { 6 };
        outln!(
            "{:>w$} {:>8} {:>12} {:>10}",
            "r",
            "loss",
            "perplexity",
            "tokens/s"
        )?;
        let baselines = (self.baselines.iter())
            .flat_map(|b| b.rows.text().iter().map(|row| (b.name.to_string(), row)));
        let own = self.rows.iter().map(|row| (r_label(row.r), row));
        for (label, row) in own.chain(baselines) {
            outln!(
                "{label:>w$} {:>8.4} {:>12.3} {:>10.1}",
                row.loss,
                row.perplexity,
                row.tokens_per_second
            )?;
        }
        if let Some(path) = &args.plot {
            outln!("plot written to {}", path.display())?;
        }
        Ok(())
    }
}

/// A task run's report.
struct TaskReport<'a> {
    requests: &'a Requests,
    rows: &'a [TaskRow],
    baselines: &'a [BaselineRows],
}

impl TaskReport<'_> {
    fn json(&self, args: &EvalArgs) -> anyhow::Result<()> {
        let baselines = named(self.baselines, Rows::task);
        let task = &self.requests.task;
        let value = serde_json::json!({
            "model": args.model.display().to_string(),
            "recurrent": self.rows.iter().any(|row| row.r.is_some()),
            "task": task.path.display().to_string(),
            "examples": task.examples.len(),
            "choices": task.n_choices(),
            "seq_len": args.seq_len,
            "rows": self.rows,
            "baselines": baselines,
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        Ok(())
    }

    fn table(&self, args: &EvalArgs) -> anyhow::Result<()> {
        let task = &self.requests.task;
        outln!(
            "{}: {}, {} examples, {} choices scored by log-likelihood",
            args.model.display(),
            task.path.display(),
            task.examples.len(),
            task.n_choices()
        )?;
        outln!(
            "{:>6} {:>7} {:>7} {:>9} {:>7} {:>9} {:>7} {:>9}",
            "r",
            "acc",
            "±",
            "acc_norm",
            "±",
            "acc_bytes",
            "±",
            "seconds"
        )?;
        let baselines = (self.baselines.iter())
            .flat_map(|b| b.rows.task().iter().map(|row| (b.name.to_string(), row)));
        let own = self.rows.iter().map(|row| (r_label(row.r), row));
        for (label, row) in own.chain(baselines) {
            outln!(
                "{label:>6} {:>7.4} {:>7.4} {:>9.4} {:>7.4} {:>9.4} {:>7.4} {:>9.1}",
                row.acc,
                row.acc_stderr,
                row.acc_norm,
                row.acc_norm_stderr,
                row.acc_bytes,
                row.acc_bytes_stderr,
                row.seconds
            )?;
        }
        Ok(())
    }
}
