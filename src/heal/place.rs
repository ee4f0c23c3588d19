//! Where a heal run may write (issue 18): a fresh run writes OUT and `OUT.checkpoints/`, neither
//! of which may be, contain or lie inside what it reads (the model, the data). A resumed run
//! writes only where the run was started for, and that is taken from where its checkpoint lies,
//! `OUT.checkpoints/step-N/`, never from the `config.out` its `state.json` says (the state is a
//! file anyone can edit; trusting it would let a checkpoint name any directory to replace). A
//! state whose `config.out` disagrees is refused, naming both; and a finished output is not
//! replaced without `--force`.

use std::path::{Component, Path, PathBuf};

use crate::manifest::MANIFEST_NAME;
use crate::paths::{check_output, require_dir, require_file, resolve, PathError};

use super::checkpoint::read_state;
use super::train::{HealConfig, HealError};

/// Why a heal run may not write where it would.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// `--resume` does not name `OUT.checkpoints/step-N`.
    #[error(
        "{0} is not a checkpoint of a heal run (expected OUT.checkpoints/step-N, a directory)"
    )]
    NotACheckpoint(PathBuf),
    /// The state's `config.out` is not the run the checkpoint belongs to.
    #[error("{state} says the run writes {said}, but the checkpoint lies in the run of {derived}; refusing to write elsewhere than {derived}")]
    Elsewhere {
        state: PathBuf,
        said: PathBuf,
        derived: PathBuf,
    },
    /// The run's output exists: a finished run, or something else at that path.
    #[error("{out} already exists{what}; pass --force to replace it")]
    Exists { out: PathBuf, what: &'static str },
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Heal(#[from] HealError),
}

/// Refuses a run whose output or checkpoints would be, contain or lie inside one of its inputs.
pub fn check_inputs(cfg: &HealConfig) -> Result<(), PlaceError> {
    let mut inputs = vec![cfg.model.clone()];
    inputs.extend(cfg.data.iter().cloned());
    inputs.extend(cfg.eval_data.iter().cloned());
    inputs.extend(cfg.distill.iter().map(|d| d.teacher.clone()));
    check_output(&cfg.out, &inputs)?;
    check_output(&cfg.checkpoint_root(), &inputs)?;
    Ok(())
}

/// The configuration to resume from checkpoint `dir`, with `out` set to the run the checkpoint
/// directory belongs to. Refused: a `dir` that is not `OUT.checkpoints/step-N` with its three
/// files, a state naming another output, an output that exists (unless `force`), and inputs the
/// output would overlap.
pub fn resume_config(dir: &Path, force: bool) -> Result<HealConfig, PlaceError> {
    let not_checkpoint = || PlaceError::NotACheckpoint(dir.to_path_buf());
    require_dir(dir).map_err(|source| PathError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for name in ["state.json", "weights.safetensors", "optimizer.safetensors"] {
        let path = dir.join(name);
        require_file(&path).map_err(|source| PathError::Io { path, source })?;
    }
    let derived = run_of(dir).ok_or_else(not_checkpoint)?;
    let state_path = dir.join("state.json");
    let mut cfg = read_state(dir)?.config;
    if !same_run(&cfg.out, &derived) {
        return Err(PlaceError::Elsewhere {
            state: state_path,
            said: cfg.out,
            derived,
        });
    }
    cfg.out = derived;
    if cfg.out.exists() && !force {
        let what = if cfg.out.join(MANIFEST_NAME).is_file() {
            " (the finished output of this run)"
        } else {
            ""
        };
        return Err(PlaceError::Exists { out: cfg.out, what });
    }
    check_inputs(&cfg)?;
    Ok(cfg)
}

/// OUT for a checkpoint at `OUT.checkpoints/step-N` (N digits), as the user named it; a path
/// without those names (`.`, a symlink's own name) is taken after symlinks.
fn run_of(dir: &Path) -> Option<PathBuf> {
    let from = |dir: &Path| -> Option<PathBuf> {
        let step = dir.file_name()?.to_str()?.strip_prefix("step-")?;
        if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let root = dir.parent()?;
        let run = root.file_name()?.to_str()?.strip_suffix(".checkpoints")?;
        (!run.is_empty()).then(|| root.with_file_name(run))
    };
    from(dir).or_else(|| from(&dir.canonicalize().ok()?))
}

/// Whether `said` (a state's `config.out`, relative to wherever the run was started) names
/// `derived`: the same place from here, or a relative path of plain names that `derived` ends
/// with (the run was started from another directory).
fn same_run(said: &Path, derived: &Path) -> bool {
    let (Ok(a), Ok(b)) = (resolve(said), resolve(derived)) else {
        return false;
    };
    if a == b {
        return true;
    }
    let plain = said.is_relative()
        && said.components().all(|c| matches!(c, Component::Normal(_)))
        && said.components().next().is_some();
    plain && b.ends_with(said)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_names_its_run() {
        assert_eq!(
            run_of(Path::new("a/run.checkpoints/step-000004")),
            Some(PathBuf::from("a/run"))
        );
        assert_eq!(
            run_of(Path::new("run.checkpoints/step-12")),
            Some(PathBuf::from("run"))
        );
        for bad in [
            "a/run/step-1",
            "a/.checkpoints/step-1",
            "a/r.checkpoints/step-",
            "x",
        ] {
            assert_eq!(run_of(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn the_state_must_name_the_same_run() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().canonicalize().unwrap();
        let derived = d.join("sub/run");
        assert!(same_run(&d.join("sub/run"), &derived));
        assert!(same_run(Path::new("run"), &derived));
        assert!(same_run(Path::new("sub/run"), &derived));
        assert!(!same_run(Path::new("other"), &derived));
        assert!(!same_run(Path::new("../run"), &derived));
        assert!(!same_run(&d.join("run"), &derived));
        assert!(!same_run(Path::new("/"), &derived));
    }
}
