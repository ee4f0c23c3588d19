//! Atomic output directories (DESIGN.md decision 5): everything is written into
//! `OUT.partial-<pid>/` next to OUT (same filesystem, so the final rename is atomic) and renamed
//! at the end; with `force`, an existing OUT is moved aside and removed only once the new one is in
//! place.

use std::path::{Path, PathBuf};

/// `OUT.partial-<pid>` beside OUT.
pub fn partial_dir(out: &Path) -> PathBuf {
    sibling(out, "partial")
}

fn sibling(out: &Path, what: &str) -> PathBuf {
    let name = out
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    out.with_file_name(format!("{name}.{what}-{}", std::process::id()))
}

/// Renames the finished `partial` directory to `out`. On failure, the path that failed and why.
pub fn publish(partial: &Path, out: &Path, force: bool) -> Result<(), (PathBuf, std::io::Error)> {
    let at = |p: &Path| {
        let p = p.to_path_buf();
        move |e| (p, e)
    };
    if force && out.exists() {
        let old = sibling(out, "old");
        std::fs::rename(out, &old).map_err(at(out))?;
        std::fs::rename(partial, out).map_err(at(out))?;
        let removed = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
        return removed.map_err(at(&old));
    }
    std::fs::rename(partial, out).map_err(at(out))
}
