//! `surgery export gguf MODEL --type T --out FILE` and `surgery export safetensors MODEL --out DIR`:
//! a checkpoint to llama.cpp's GGUF (our recurrent architecture or stock `llama`) or to the
//! Hugging Face layout.

use std::path::PathBuf;
use std::time::Instant;

use surgery::export::mix::TYPE_NAMES;
use surgery::export::safetensors::OutDType;
use surgery::export::{
    export_gguf, export_safetensors, GgufArch, GgufOptions, QuantType, SafetensorsOptions,
};
use surgery::source::SourceModel;

use super::apply::parse_size;
use super::{si, BarProgress, Global};

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub format: ExportFormat,
}

#[derive(clap::Subcommand)]
pub enum ExportFormat {
    /// A GGUF file for llama.cpp: our recurrent architecture, or stock `llama` where exact.
    Gguf(GgufArgs),
    /// A Hugging Face directory (config.json, safetensors shards, tokenizer, manifest).
    Safetensors(SafetensorsArgs),
}

impl ExportFormat {
    /// The MODEL argument, whichever the format.
    pub fn model(&mut self) -> &mut PathBuf {
        match self {
            ExportFormat::Gguf(a) => &mut a.model,
            ExportFormat::Safetensors(a) => &mut a.model,
        }
    }
}

#[derive(clap::Args)]
pub struct GgufArgs {
    /// Any checkpoint: Hugging Face directory, .safetensors, .gguf, or a recurrent checkpoint.
    pub model: PathBuf,
    /// The output file.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
    /// Tensor types: f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q5_k, q4_k, q5_1, q5_0, q4_1,
    /// q4_0 (the mixes follow llama-quantize; norms stay F32).
    #[arg(long = "type", value_name = "T", default_value = "f16", value_parser = parse_type)]
    pub quant: QuantType,
    /// recurrent (our huginn_raven architecture; the default for recurrent checkpoints) or llama
    /// (stock llama.cpp; the default for static models, refused where it would not be exact).
    #[arg(long, value_parser = parse_arch)]
    pub arch: Option<GgufArch>,
    /// --arch llama: core passes to unroll (a core without injection). --arch recurrent: the
    /// default test-time recurrence written into the file.
    #[arg(long, value_name = "R")]
    pub recurrence: Option<usize>,
    /// Replace an existing FILE.
    #[arg(long)]
    pub force: bool,
}

#[derive(clap::Args)]
pub struct SafetensorsArgs {
    /// Any checkpoint: a .gguf (llama or huginn_raven), a Hugging Face directory, ...
    pub model: PathBuf,
    /// The output directory.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// auto (the source's float type; F32 for quantized GGUF weights), f32, f16 or bf16.
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    pub dtype: OutDType,
    /// Shard the weights above this size, in decimal units: 500MB, 5GB, or bytes.
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// Replace an existing DIR (the old one is removed only after the new one is in place).
    #[arg(long)]
    pub force: bool,
}

fn parse_type(s: &str) -> Result<QuantType, String> {
    s.parse()
        .map_err(|_| format!("expected one of {}", TYPE_NAMES.join(", ")))
}

fn parse_arch(s: &str) -> Result<GgufArch, String> {
    s.parse()
}

fn parse_dtype(s: &str) -> Result<OutDType, String> {
    s.parse()
}

pub fn run(args: ExportArgs, global: Global) -> anyhow::Result<()> {
    match args.format {
        ExportFormat::Gguf(a) => gguf(a, global),
        ExportFormat::Safetensors(a) => safetensors(a, global),
    }
}

fn notes(notes: &[String], global: Global) {
    if !global.quiet {
        for note in notes {
            eprintln!("note: {note}");
        }
    }
}

/// An export's report as JSON, with the seconds it took.
fn print_json(report: &impl serde::Serialize, seconds: f64) -> anyhow::Result<()> {
    let mut value = serde_json::to_value(report)?;
    value["seconds"] = serde_json::json!(seconds);
    outln!("{}", serde_json::to_string_pretty(&value)?)?;
    Ok(())
}

fn gguf(args: GgufArgs, global: Global) -> anyhow::Result<()> {
    surgery::paths::check_new_output(&args.out, std::slice::from_ref(&args.model), args.force)?;
    let source = SourceModel::open(&args.model)?;
    let opts = GgufOptions {
        quant: args.quant,
        arch: args.arch,
        recurrence: args.recurrence,
        force: args.force,
    };
    let started = Instant::now();
    let report = export_gguf(&source, &args.out, &opts, &mut BarProgress::new(global))?;
    let seconds = started.elapsed().as_secs_f64();
    notes(&report.notes, global);
    if global.json {
        return print_json(&report, seconds);
    }
    let types: Vec<String> = report
        .types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    outln!(
        "wrote {} ({} GGUF, --type {}): {} blocks, {} tensors ({}), {} from {} of source in \
         {seconds:.1} s ({}/s of source)",
        report.out.display(),
        report.arch,
        report.quant,
        report.block_count,
        report.tensors,
        types.join(", "),
        si(report.file_bytes as f64, "B"),
        si(report.source_bytes as f64, "B"),
        si(report.source_bytes as f64 / seconds.max(1e-9), "B"),
    )?;
    Ok(())
}

fn safetensors(args: SafetensorsArgs, global: Global) -> anyhow::Result<()> {
    surgery::paths::check_new_output(&args.out, std::slice::from_ref(&args.model), args.force)?;
    let source = SourceModel::open(&args.model)?;
    let opts = SafetensorsOptions {
        dtype: args.dtype,
        max_shard_bytes: args.max_shard_size,
        force: args.force,
    };
    let started = Instant::now();
    let report = export_safetensors(&source, &args.out, &opts, &mut BarProgress::new(global))?;
    let seconds = started.elapsed().as_secs_f64();
    notes(&report.notes, global);
    if global.json {
        return print_json(&report, seconds);
    }
    outln!(
        "wrote {} ({}, {}): {} tensors in {} shard(s), {} of tensor data in {seconds:.1} s",
        report.out.display(),
        report.model_type,
        report.dtype,
        report.tensors,
        report.shards,
        si(report.tensor_bytes as f64, "B"),
    )?;
    Ok(())
}
