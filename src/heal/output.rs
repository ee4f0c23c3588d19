//! The healed checkpoint: the input's layout and tokenizer, the trained weights (in the input's
//! dtype), a config recording the whole heal configuration, metrics.jsonl, a PNG of the curves and
//! a manifest, written into `OUT.partial-<pid>/` and renamed at the end. A recurrent one also gets
//! the Python files that load it in transformers, named by its config's `auto_map` (issue 20).

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::dtype::DType;
use crate::eval::plot::plot_curves;
use crate::formats::hf_config;
use crate::formats::safetensors::write_file;
use crate::manifest::{self, ManifestEntry};
use crate::model::Model;
use crate::source::SourceModel;

use super::train::{HealConfig, HealError, Result, StepMetrics, Trained};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HealError + '_ {
    move |source| HealError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `trained` as a checkpoint at its config's `out`; returns the files written.
pub fn write(trained: &mut Trained, force: bool) -> Result<Vec<ManifestEntry>> {
    let out = trained.config.out.clone();
    crate::paths::refuse_existing(&out, force).map_err(|e| HealError::Invalid(e.to_string()))?;
    let io = |path, source| HealError::Io { path, source };
    crate::atomic::Staging::write_dir(&out, force, io, |dir| write_into(trained, dir))
}

/// Writes the checkpoint's files into the staging `dir`; returns its manifest's entries.
fn write_into(trained: &mut Trained, dir: &Path) -> Result<Vec<ManifestEntry>> {
    let source = SourceModel::open(&trained.config.model)?;
    let dtype = write_weights(&mut trained.model, &source, dir)?;
    write_config(trained, dtype, dir)?;
    copy_inputs(&trained.config, &source, dir)?;
    plot(&trained.metrics, dir)?;
    manifest_of(dir)
}

/// Writes `model`'s weights as model.safetensors in the dtype of `source`'s first tensor (f32
/// for a quantized source); returns that dtype.
fn write_weights(model: &mut Model, source: &SourceModel, dir: &Path) -> Result<DType> {
    let dtype = source
        .tensors
        .values()
        .next()
        .map_or(DType::F32, |t| t.dtype);
    let dtype = if dtype.is_quantized() {
        DType::F32
    } else {
        dtype
    };
    let mut tensors = Vec::new();
    for (name, t) in model.named_tensors()? {
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        let bytes = dtype.encode_f32(&values).unwrap_or_default();
        tensors.push((name, dtype, t.dims().to_vec(), bytes));
    }
    let weights = dir.join("model.safetensors");
    write_file(&weights, &tensors).map_err(|e| HealError::Invalid(e.to_string()))?;
    Ok(dtype)
}

/// Writes the input's config.json with the weights' `dtype`, the healed recurrence as its
/// `mean_recurrence`, and the heal run recorded under `surgery.heal`, made publishable ([`hf_config::publishable`]: `auto_map`, no local paths);
/// for a recurrent model, the transformers files it names beside it.
fn write_config(trained: &Trained, dtype: DType, dir: &Path) -> Result<()> {
    let cfg = &trained.config;
    let config_path = cfg.model.join("config.json");
    let text = crate::paths::read(&config_path).map_err(io(&config_path))?;
    let mut config: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| HealError::Invalid(format!("{}: {e}", config_path.display())))?;
    let last = trained.metrics.last();
    config["surgery"]["heal"] = json!({
        "tool_version": env!("CARGO_PKG_VERSION"),
        "config": cfg,
        "steps": trained.metrics.len(),
        "final_loss": last.map(|m| m.loss),
        "final_eval": last.map(|m| &m.eval),
    });
    config["torch_dtype"] = json!(dtype.torch_name());
    // The r the model runs at unless told (transformers' num_steps, GGUF's default recurrence):
    // the one it was healed at, not the reference's 32 that `apply` wrote before any training.
    if config.get("mean_recurrence").is_some() {
        let healed = if cfg.static_baseline {
            1
        } else {
            cfg.max_mean_recurrence
        };
        config["mean_recurrence"] = json!(healed);
    }
    hf_config::publishable(&mut config);
    for (name, bytes) in hf_config::transformers_files(&config) {
        std::fs::write(dir.join(name), bytes).map_err(io(dir))?;
    }
    let mut pretty =
        serde_json::to_vec_pretty(&config).map_err(|e| HealError::Invalid(e.to_string()))?;
    pretty.push(b'\n');
    std::fs::write(dir.join("config.json"), pretty).map_err(io(dir))
}

/// Copies the input's tokenizer files and plan.json, and the run's metrics.jsonl, where they
/// exist.
fn copy_inputs(cfg: &HealConfig, source: &SourceModel, dir: &Path) -> Result<()> {
    // The tokenizer and the plan that made the input travel with it.
    let mut extra: Vec<String> = source
        .tokenizer
        .iter()
        .flat_map(|t| t.files.clone())
        .collect();
    extra.push("plan.json".into());
    for f in extra {
        let from = cfg.model.join(&f);
        if from.is_file() {
            std::fs::copy(&from, dir.join(&f)).map_err(io(&from))?;
        }
    }
    let metrics = cfg.checkpoint_root().join("metrics.jsonl");
    if metrics.is_file() {
        std::fs::copy(&metrics, dir.join("metrics.jsonl")).map_err(io(&metrics))?;
    }
    Ok(())
}

/// Draws curves.png: the training loss and the held-out loss at each evaluated r, by step.
fn plot(metrics: &[StepMetrics], dir: &Path) -> Result<()> {
    let train: Vec<(f64, f64)> = metrics
        .iter()
        .map(|m| (m.step as f64 + 1.0, m.loss))
        .collect();
    let mut series = vec![("training loss".to_string(), train)];
    let mut rs: Vec<usize> = metrics
        .iter()
        .flat_map(|m| m.eval.iter().map(|e| e.r))
        .collect();
    rs.sort();
    rs.dedup();
    for r in rs {
        let points = metrics
            .iter()
            .flat_map(|m| {
                m.eval
                    .iter()
                    .filter(|e| e.r == r)
                    .map(move |e| (m.step as f64 + 1.0, e.loss))
            })
            .collect();
        series.push((format!("held-out loss, r = {r}"), points));
    }
    plot_curves(
        &dir.join("curves.png"),
        "healing",
        ("optimizer step", "loss (nats/token)"),
        &series,
    )
    .map_err(|e| HealError::Invalid(e.to_string()))
}

/// Hashes every file of `dir` into its manifest.json; returns the entries.
fn manifest_of(dir: &Path) -> Result<Vec<ManifestEntry>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    let mut files = Vec::new();
    for path in names {
        let bytes = std::fs::metadata(&path).map_err(io(&path))?.len();
        let sha256 = manifest::sha256_file(&path, |_| {}).map_err(io(&path))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        files.push(ManifestEntry {
            path: name,
            bytes,
            sha256,
        });
    }
    manifest::write_manifest(dir, &mut files)
        .map_err(|(path, source)| HealError::Io { path, source })?;
    Ok(files)
}
