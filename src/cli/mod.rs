//! Command-line arguments, one file per subcommand: argument structs and printing, no domain logic.

/// `println!` that returns the write's error instead of panicking: output piped into a reader
/// that stops early (`surgery inspect M | head -1`) ends the command quietly (issue 18) through
/// [`StdoutClosed`], which `main` turns into exit code 0.
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod apply;
mod demo;
mod eval;
mod export;
mod generate;
mod heal;
mod inspect;
mod plan;
mod progress;
mod verify;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
pub use progress::{BarProgress, Meter, Unit};
use surgery::named::Named;
pub use surgery::units::{si, thousands};

#[derive(Parser)]
#[command(
    name = "surgery",
    version,
    arg_required_else_help = true,
    about = "Retrofit recurrence into pretrained language models: cut a model into prelude, looped core and coda; heal, evaluate, export"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub hub: Hub,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Args, Clone, Copy)]
pub struct Global {
    /// Print machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars or notes on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// CPU threads (default: all cores).
    #[arg(long, short = 't', global = true, value_name = "N")]
    pub threads: Option<usize>,
}

impl Global {
    /// Sizes the CPU thread pools from --threads. candle's kernels and rayon read
    /// RAYON_NUM_THREADS when their pools start, so this runs before any tensor work, while the
    /// process has one thread.
    pub fn set_threads(&self) {
        if let Some(n) = self.threads {
            std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
        }
    }
}

/// Which revision a hub MODEL is read at.
#[derive(Args)]
pub struct Hub {
    /// The revision (branch, tag or commit hash) of every MODEL given as a hub id (ORG/NAME) or a
    /// cache folder (models--ORG--NAME), read from the local Hugging Face cache [default: main].
    #[arg(long, global = true, value_name = "REV")]
    pub revision: Option<String>,
}

#[derive(Subcommand)]
pub enum Command {
    /// What is this checkpoint: family, layers, sizes, dtypes, parameters, tokenizer.
    Inspect(inspect::InspectArgs),
    /// Preview and validate the layer map and costs; write the plan that `apply` executes.
    Plan(plan::PlanArgs),
    /// Write the recurrent checkpoint a plan describes (or plan and apply in one go).
    Apply(apply::ApplyArgs),
    /// Re-hash a checkpoint against its manifest and check its tensors; exit 1 on any mismatch.
    Verify(verify::VerifyArgs),
    /// Perplexity on held-out text against test-time recurrence r.
    Eval(eval::EvalArgs),
    /// Export to GGUF (llama.cpp) or to the Hugging Face safetensors layout.
    Export(export::ExportArgs),
    /// Generate text from a prompt, streaming tokens; optionally with adaptive recurrence.
    Generate(generate::GenerateArgs),
    /// Fine-tune a recurrent checkpoint under the recurrence curriculum (with checkpoints, --resume).
    Heal(heal::HealArgs),
    /// The whole method on the small model in fixtures/, offline: plan, apply, eval, heal, export, generate.
    Demo(demo::DemoArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let mut command = cli.command;
    resolve_models(&mut command, cli.hub.revision.as_deref(), cli.global)?;
    match command {
        Command::Inspect(args) => inspect::run(args, cli.global),
        Command::Plan(args) => plan::run(args, cli.global),
        Command::Apply(args) => apply::run(args, cli.global),
        Command::Verify(args) => verify::run(args, cli.global),
        Command::Eval(args) => eval::run(args, cli.global),
        Command::Export(args) => export::run(args, cli.global),
        Command::Generate(args) => generate::run(args, cli.global),
        Command::Heal(args) => heal::run_cli(args, cli.global),
        Command::Demo(args) => demo::run(args, cli.global),
    }
}

/// Every model argument of `command` (MODEL, heal's --distill teacher) that names a hub model
/// replaced by its snapshot folder in the local Hugging Face cache, each noted on stderr. A
/// local path that exists is kept; `--revision` is refused when no argument is a hub model.
fn resolve_models(
    command: &mut Command,
    revision: Option<&str>,
    global: Global,
) -> anyhow::Result<()> {
    let models: Vec<&mut PathBuf> = match command {
        Command::Inspect(a) => vec![&mut a.model],
        Command::Plan(a) => vec![&mut a.model],
        Command::Apply(a) => vec![&mut a.input],
        Command::Verify(a) => vec![&mut a.dir],
        Command::Eval(a) => std::iter::once(&mut a.model)
            .chain(a.baseline.iter_mut())
            .collect(),
        Command::Export(a) => vec![a.format.model()],
        Command::Generate(a) => vec![&mut a.model],
        Command::Heal(a) => a.model.iter_mut().chain(a.distill.iter_mut()).collect(),
        Command::Demo(_) => vec![],
    };
    let mut any_hub = false;
    for model in models {
        let resolved = surgery::hub::resolve(model, revision)?;
        if resolved != *model {
            any_hub = true;
            if !global.quiet {
                let at = revision.unwrap_or(surgery::hub::DEFAULT_REVISION);
                eprintln!(
                    "note: {} at revision {at} is {}",
                    model.display(),
                    resolved.display()
                );
            }
            *model = resolved;
        }
    }
    if let (Some(rev), false) = (revision, any_hub) {
        anyhow::bail!(
            "--revision {rev} picks the revision of a hub model (ORG/NAME or a models--ORG--NAME \
             cache folder); this command names none"
        );
    }
    Ok(())
}

/// The reader of stdout has gone: the output ends here, which is not a failure.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// Writes `args` to stdout (what [`outln!`] does).
pub fn write_stdout(args: std::fmt::Arguments) -> anyhow::Result<()> {
    use std::io::Write;
    std::io::stdout().lock().write_fmt(args).map_err(closed)
}

/// A failed write to stdout: [`StdoutClosed`] for a closed pipe, else the I/O error.
pub fn closed(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// 1 for invalid input (no I/O error in the chain, a path that does not exist, one that is not a
/// regular file or not a directory where one is expected, bytes that are not what they should
/// be), 2 for any other I/O failure: an unreadable file (permission denied), a full disk.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    use std::io::ErrorKind;
    let io = err.chain().find_map(|c| c.downcast_ref::<std::io::Error>());
    match io.map(std::io::Error::kind) {
        Some(
            ErrorKind::NotFound
            | ErrorKind::InvalidInput
            | ErrorKind::InvalidData
            | ErrorKind::NotADirectory
            | ErrorKind::IsADirectory,
        )
        | None => 1,
        Some(_) => 2,
    }
}

/// A plan's notes on stderr, unless --quiet.
pub fn print_notes(plan: &surgery::plan::Plan, global: Global) {
    if !global.quiet {
        for note in &plan.notes {
            eprintln!("note: {note}");
        }
    }
}

/// How eval and generate hold a quantized GGUF's weights: as stored unless `--dequantize`.
pub fn weights(dequantize: bool) -> surgery::model::Weights {
    if dequantize {
        surgery::model::Weights::F32
    } else {
        surgery::model::Weights::Stored
    }
}

/// `cpu`, `cuda` or `cuda:N`. A build without the `cuda` feature says so when CUDA is asked for.
/// The parser of a flag whose values are a library enum's names ([`Named`]): help lists each
/// with its doc comment, and anything else is refused with the list.
pub fn named<T: Named>() -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser;
    let values = T::NAMES.iter().zip(T::HELP).map(|(&name, &help)| {
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        clap::builder::PossibleValue::new(name).help(help)
    });
    clap::builder::PossibleValuesParser::new(values)
        .try_map(|name| T::from_name(&name).ok_or_else(|| format!("unknown value {name:?}")))
}

/// Where and how a model runs: the flags eval, generate and heal share.
#[derive(Args, Clone)]
pub struct Runtime {
    /// cpu, cuda or cuda:N (CUDA needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// fused: our fused ops, with their own backward (CPU, f32); composed: the plain candle ops
    /// they are proved against, the reference path (slower, more memory).
    #[arg(long, value_parser = named::<surgery::model::Kernels>(), default_value = "fused")]
    pub kernels: surgery::model::Kernels,
}

impl Runtime {
    /// The device --device names, refused with the reason when it is not available.
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        parse_device(&self.device)
    }
}

fn parse_device(name: &str) -> anyhow::Result<candle_core::Device> {
    let cuda = |n: usize| {
        candle_core::Device::new_cuda(n).map_err(|e| {
            anyhow::anyhow!(
                "--device {name} is not available: {e} (CUDA needs a build with `--features cuda`)"
            )
        })
    };
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => anyhow::bail!("--device {other} is not a device: expected cpu, cuda or cuda:N"),
        },
    }
}
