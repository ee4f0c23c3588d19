//! `surgery apply plan.json --out DIR`, or `surgery apply MODEL --shape P,C,K --out DIR`: write the
//! recurrent checkpoint a plan describes.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};

use surgery::plan::Plan;
use surgery::surgery::{apply, ApplyOptions};

use super::plan::{make_plan, LayoutArgs};
use super::{si, BarProgress, Global};

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// A plan file written by `surgery plan --out`, or a MODEL (then give --shape and the other
    /// plan options, and the plan is made on the fly).
    pub input: PathBuf,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// The output directory (Hugging Face layout, model_type huginn_raven).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Replace an existing DIR (the old one is removed only after the new one is in place).
    #[arg(long)]
    pub force: bool,
    /// Shard the weights above this size, in decimal units: 500MB, 5GB, or bytes.
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// Refuse a source whose tensors hold NaN or Inf (by default they are copied with a warning).
    #[arg(long)]
    pub strict: bool,
}

/// "5GB" -> 5_000_000_000; units B, kB, MB, GB, TB (decimal, as Hugging Face's `max_shard_size`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "invalid size {s:?}: expected a number with B, kB, MB, GB or TB"
            ))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            format!("invalid size {s:?}: expected a positive number with B, kB, MB, GB or TB")
        })
}

pub fn run(args: ApplyArgs, global: Global) -> anyhow::Result<()> {
    // The plan's source files are checked once the plan is read.
    surgery::paths::check_new_output(&args.out, std::slice::from_ref(&args.input), args.force)?;
    // By its name: a plan that is not a regular file (a FIFO) is then refused as such when read.
    let is_plan = !args.input.is_dir() && args.input.extension().is_some_and(|e| e == "json");
    let (plan, plan_bytes) = if is_plan {
        if !args.layout.is_empty() {
            bail!(
                "--shape and the other plan options apply to a MODEL; {} is a plan file",
                args.input.display()
            );
        }
        let bytes = surgery::paths::read(&args.input)
            .with_context(|| format!("reading {}", args.input.display()))?;
        let plan = Plan::from_json(&bytes).with_context(|| format!("{}", args.input.display()))?;
        (plan, bytes)
    } else {
        let (_, plan) = make_plan(&args.input, &args.layout, global)?;
        let mut bytes = serde_json::to_vec_pretty(&plan)?;
        bytes.push(b'\n');
        (plan, bytes)
    };
    super::print_notes(&plan, global);
    let opts = ApplyOptions {
        max_shard_bytes: args.max_shard_size,
        force: args.force,
        strict: args.strict,
    };
    let started = Instant::now();
    let report = apply(
        &plan,
        &plan_bytes,
        &args.out,
        &opts,
        &mut BarProgress::new(global),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    for bad in &report.nonfinite {
        eprintln!(
            "warning: tensor {:?} holds {} non-finite values (NaN or Inf) copied from the source; \
             pass --strict to refuse such a source",
            bad.tensor, bad.count
        );
    }
    if global.json {
        let mut value = serde_json::to_value(&report)?;
        value["seconds"] = serde_json::json!(seconds);
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        outln!(
            "wrote {}: {} tensors in {} shard(s), {} of tensor data in {seconds:.1} s ({}/s)",
            report.out.display(),
            report.tensors,
            report.shards,
            si(report.tensor_bytes as f64, "B"),
            si(report.tensor_bytes as f64 / seconds.max(1e-9), "B"),
        )?;
        for f in &report.files {
            outln!(
                "  {:<40} {:>12}  sha256 {}",
                f.path,
                si(f.bytes as f64, "B"),
                &f.sha256[..16]
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_decimal() {
        assert_eq!(super::parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(super::parse_size("500MB"), Ok(500_000_000));
        assert_eq!(super::parse_size("64kB"), Ok(64_000));
        assert_eq!(super::parse_size("123"), Ok(123));
        for bad in ["", "GB", "5 GiB", "-1MB", "0", "99999999999999TB"] {
            assert!(super::parse_size(bad).is_err(), "{bad}");
        }
    }
}
