//! `surgery verify DIR`: re-hash every file against manifest.json and check the tensors against
//! the index and config.json. Exit 0 when all holds, 1 at the first mismatch.

use std::path::PathBuf;

use surgery::manifest::verify;

use super::{si, Global};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// A directory written by `surgery apply` (or `heal`).
    pub dir: PathBuf,
}

pub fn run(args: VerifyArgs, global: Global) -> anyhow::Result<()> {
    let bar = super::Meter::new(global, 0, "verifying", super::Unit::Bytes);
    let report = verify(&args.dir, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish();
    if global.json {
        let mut value = serde_json::to_value(&report)?;
        value["ok"] = serde_json::json!(true);
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        outln!(
            "{}: ok ({} files, {}, {} tensors match manifest.json, the index and config.json)",
            args.dir.display(),
            report.files,
            si(report.bytes as f64, "B"),
            report.tensors
        )?;
    }
    Ok(())
}
