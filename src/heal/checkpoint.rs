//! Training checkpoints: `OUT.checkpoints/step-NNNNNN/` with the weights of every trained
//! parameter, the optimizer's state and the run's position (step, data cursor, configuration),
//! written atomically; and metrics.jsonl beside them, one line per finished step.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::model::params::Param;

use super::optim::Optimizer;
use super::train::{CheckpointState, HealError, Result, StepMetrics};

/// How many checkpoints are kept (the newest ones).
const KEEP: usize = 2;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HealError + '_ {
    move |source| HealError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a checkpoint for `state` and removes all but the newest [`KEEP`]; returns its directory.
pub fn save(
    root: &Path,
    state: &CheckpointState,
    params: &[Param],
    optimizer: &Optimizer,
) -> Result<PathBuf> {
    let dir = root.join(format!("step-{:06}", state.step));
    let partial = root.join(format!("step-{:06}.partial", state.step));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    let weights: HashMap<String, Tensor> = params
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&weights, partial.join("weights.safetensors"))?;
    let moments: HashMap<String, Tensor> = optimizer.state_tensors()?.into_iter().collect();
    candle_core::safetensors::save(&moments, partial.join("optimizer.safetensors"))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| HealError::Invalid(e.to_string()))?;
    std::fs::write(partial.join("state.json"), json).map_err(io(&partial))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&partial, &dir).map_err(io(&dir))?;
    let old = existing(root)?;
    for stale in old.iter().take(old.len().saturating_sub(KEEP)) {
        std::fs::remove_dir_all(stale).map_err(io(stale))?;
    }
    Ok(dir)
}

/// The checkpoints under `root` (`step-NNNNNN`, finished ones), oldest first; none when `root`
/// does not exist.
pub fn existing(root: &Path) -> Result<Vec<PathBuf>> {
    let mut steps: Vec<PathBuf> = step_dirs(root)?
        .into_iter()
        .filter(|p| !p.to_string_lossy().ends_with(".partial"))
        .collect();
    steps.sort();
    Ok(steps)
}

/// Every `step-*` directory under `root`, finished or partial; none when `root` does not exist.
fn step_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(root)(e)),
    };
    Ok(entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect())
}

/// Removes every checkpoint under `root`, finished or partial (a fresh run replacing an earlier
/// one: otherwise the earlier run's later steps would outlive this run's, which [`save`] prunes
/// as the oldest).
pub fn clear(root: &Path) -> Result<()> {
    for path in step_dirs(root)? {
        std::fs::remove_dir_all(&path).map_err(io(&path))?;
    }
    Ok(())
}

/// After a run's output is written: removes `root` when it holds no checkpoint (a run with
/// `--checkpoint-every 0`, or one shorter than its interval), so that no `OUT.checkpoints/` is
/// left holding only the metrics.jsonl the output has a copy of. A folder holding anything else
/// is left as it is.
pub fn tidy(root: &Path) -> Result<()> {
    if !step_dirs(root)?.is_empty() {
        return Ok(());
    }
    let metrics = root.join("metrics.jsonl");
    match std::fs::remove_file(&metrics) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&metrics)(e)),
    }
    match std::fs::remove_dir(root) {
        // Gone already, or holding something of the user's: nothing more to do.
        Err(e)
            if !matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Err(io(root)(e))
        }
        _ => Ok(()),
    }
}

/// Reads a checkpoint's state (the run's configuration and position) without loading tensors,
/// and validates it with [`parse_state`].
pub(crate) fn read_state(dir: &Path) -> Result<CheckpointState> {
    let path = dir.join("state.json");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    parse_state(&bytes).map_err(|e| HealError::Invalid(format!("{}: {e}", path.display())))
}

/// Parses a checkpoint's state.json and validates every number in it, as `heal --resume` does
/// before it touches anything: the run's configuration passes the same checks as the flags of a
/// fresh run, the step lies inside the run, and the data cursor is the one that step implies
/// (every step reads `batch` windows). Pure, so that the fuzzer can call it on raw bytes.
pub fn parse_state(bytes: &[u8]) -> Result<CheckpointState> {
    let state: CheckpointState =
        serde_json::from_slice(bytes).map_err(|e| HealError::Invalid(e.to_string()))?;
    state.config.validate()?;
    let config = &state.config;
    // A checkpoint is written after a step and never after the last one (the output is).
    if state.step == 0 || state.step >= config.steps {
        return Err(HealError::Invalid(format!(
            "step {} is outside the run of {} steps",
            state.step, config.steps
        )));
    }
    let expected = state.step.checked_mul(config.batch as u64);
    if expected != Some(state.cursor) {
        return Err(HealError::Invalid(format!(
            "cursor {} does not match step {} of batches of {}",
            state.cursor, state.step, config.batch
        )));
    }
    Ok(state)
}

/// Restores the trained parameters and the optimizer from a checkpoint; returns its state.
pub fn load(
    dir: &Path,
    params: &[Param],
    optimizer: &mut Optimizer,
    device: &Device,
) -> Result<CheckpointState> {
    let state = read_state(dir)?;
    let weights = candle_core::safetensors::load(dir.join("weights.safetensors"), device)?;
    for p in params {
        let t = weights.get(&p.name).ok_or_else(|| {
            HealError::Invalid(format!("{}: no weights for {}", dir.display(), p.name))
        })?;
        if t.dims() != p.var.dims() {
            return Err(HealError::Invalid(format!(
                "{}: {} has shape {:?}, the model {:?}",
                dir.display(),
                p.name,
                t.dims(),
                p.var.dims()
            )));
        }
        p.var.set(t)?;
    }
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
    optimizer.load_state(moments)?;
    Ok(state)
}

/// Appends one step's metrics to `root/metrics.jsonl`.
pub(crate) fn append_metrics(root: &Path, line: &StepMetrics) -> Result<()> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let path = root.join("metrics.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io(&path))?;
    let text = serde_json::to_string(line).map_err(|e| HealError::Invalid(e.to_string()))?;
    writeln!(f, "{text}").map_err(io(&path))
}

/// The metrics of steps before `step`, and the file cut back to them (a resumed run appends the
/// lines of the steps it redoes).
pub(crate) fn read_metrics(root: &Path, step: u64) -> Result<Vec<StepMetrics>> {
    let path = root.join("metrics.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io(&path)(e)),
    };
    let kept: Vec<StepMetrics> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
        .filter(|m| m.step < step)
        .collect();
    let mut out = String::new();
    for m in &kept {
        out.push_str(&serde_json::to_string(m).map_err(|e| HealError::Invalid(e.to_string()))?);
        out.push('\n');
    }
    std::fs::write(&path, out).map_err(io(&path))?;
    Ok(kept)
}

/// The most recurrence a heal record may name (what a config's `mean_recurrence` may be).
const MAX_HEALED_RECURRENCE: u64 = 1 << 16;

/// The mean recurrence the heal output in `dir` was trained at, from the run `heal` records in
/// its config.json (`surgery.heal.config`, written by `super::output`): the curriculum's
/// `max_mean_recurrence`, or 1 for a `--static` run. None when the config holds no heal record
/// (an `apply` output, a published checkpoint); refused when the record is not what heal writes.
pub fn healed_recurrence(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join("config.json");
    let bytes = crate::paths::read(&path).map_err(io(&path))?;
    let config: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| HealError::Invalid(format!("{}: {e}", path.display())))?;
    let Some(run) = config.pointer("/surgery/heal/config") else {
        return Ok(None);
    };
    if run.get("static_baseline") == Some(&serde_json::Value::Bool(true)) {
        return Ok(Some(1));
    }
    let m = run
        .get("max_mean_recurrence")
        .and_then(serde_json::Value::as_u64)
        .filter(|m| (1..=MAX_HEALED_RECURRENCE).contains(m))
        .ok_or_else(|| {
            HealError::Invalid(format!(
                "{}: surgery.heal.config.max_mean_recurrence is not a recurrence in \
                 1..={MAX_HEALED_RECURRENCE}",
                path.display()
            ))
        })?;
    // At most 2^16: fits any usize.
    Ok(Some(m as usize))
}
