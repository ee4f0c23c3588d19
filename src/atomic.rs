//! Atomic outputs (DESIGN.md decision 5): everything is written under a temporary name next to OUT
//! (same filesystem, so the final rename is atomic) and renamed at the end; with `force`, an
//! existing OUT is moved aside and removed only once the new one is in place.
//!
//! The temporary name is `OUT.partial-<pid>` (a directory or a file). A name can be 255 bytes,
//! so when that would not fit, OUT's name is cut and a hash of the whole name keeps it apart from
//! others: `<prefix>~<hash>.partial-<pid>` (issue 18). A run killed with SIGKILL cannot remove its
//! own partial output; the next run that stages an output in the same directory removes every
//! `*.partial-<pid>` there whose process no longer exists (no `/proc/<pid>`).

use std::io;
use std::path::{Path, PathBuf};

/// The longest file name most filesystems accept (ext4, xfs, btrfs, tmpfs: 255 bytes).
const NAME_MAX: usize = 255;

/// `OUT.partial-<pid>` beside OUT (shortened to fit a file name).
pub(crate) fn partial_dir(out: &Path) -> PathBuf {
    sibling(out, "partial")
}

/// `FILE.partial-<pid>` beside FILE (shortened to fit a file name).
pub(crate) fn partial_file(out: &Path) -> PathBuf {
    sibling(out, "partial")
}

fn sibling(out: &Path, what: &str) -> PathBuf {
    let name = out
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let suffix = format!(".{what}-{}", std::process::id());
    out.with_file_name(short_name(&name, &suffix))
}

/// `name + suffix`, or, when that exceeds [`NAME_MAX`] bytes, a prefix of `name` (cut on a
/// character boundary), `~`, the FNV-1a hash of the whole name in hex, then `suffix`.
fn short_name(name: &str, suffix: &str) -> String {
    if name.len() + suffix.len() <= NAME_MAX {
        return format!("{name}{suffix}");
    }
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let tag = format!("~{hash:016x}");
    let mut keep = NAME_MAX.saturating_sub(tag.len() + suffix.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{tag}{suffix}", &name[..keep])
}

/// The process id in a `*.partial-<pid>` name.
fn partial_pid(name: &str) -> Option<u32> {
    let (_, pid) = name.rsplit_once(".partial-")?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes the `*.partial-<pid>` entries of `dir` whose process is gone. Only where `/proc`
/// lists processes (Linux); elsewhere nothing is removed, since a live run cannot be told from
/// a dead one. Best effort: an entry that cannot be removed is left for the next run.
pub(crate) fn remove_stale_partials(dir: &Path) {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = partial_pid(&name.to_string_lossy()) else {
            continue;
        };
        if pid == me || proc.join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        // Not following a symlink: only our own directories and files are removed.
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            Ok(t) if t.is_file() => std::fs::remove_file(&path),
            _ => continue,
        };
    }
}

/// An output being written: its temporary path, and the parent directories made for it (removed
/// again if the output is abandoned, so a refused run leaves nothing).
#[derive(Debug)]
pub struct Staging {
    partial: PathBuf,
    dir: bool,
    /// Directories created for OUT, deepest first.
    made: Vec<PathBuf>,
}

impl Staging {
    /// Stages the directory OUT: creates its missing parents, removes stale partial outputs
    /// beside it, and creates an empty `OUT.partial-<pid>/`.
    pub fn dir(out: &Path) -> Result<Staging, (PathBuf, io::Error)> {
        let staging = Staging::begin(out, partial_dir(out), true)?;
        std::fs::create_dir(&staging.partial).map_err(|e| {
            let path = staging.partial.clone();
            staging.abandon();
            (path, e)
        })?;
        Ok(staging)
    }

    /// Stages the file OUT: creates its missing parents and removes stale partial outputs beside
    /// it; the caller writes [`Staging::path`].
    pub fn file(out: &Path) -> Result<Staging, (PathBuf, io::Error)> {
        Staging::begin(out, partial_file(out), false)
    }

    fn begin(out: &Path, partial: PathBuf, dir: bool) -> Result<Staging, (PathBuf, io::Error)> {
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let made = make_parents(&parent)?;
        let staging = Staging { partial, dir, made };
        remove_stale_partials(&parent);
        // Our own pid on a leftover means a dead process had it before us.
        staging.remove_partial().map_err(|e| {
            let path = staging.partial.clone();
            staging.abandon();
            (path, e)
        })?;
        Ok(staging)
    }

    /// Writes the directory `out` atomically, as every command that makes one does: `write`
    /// fills a fresh partial directory; then it is synced and renamed to `out` (replacing an
    /// existing `out` only with `force`). On any error the partial directory and the parents made
    /// for it are removed, and `io` turns a failed path and its error into the caller's error.
    pub fn write_dir<T, E>(
        out: &Path,
        force: bool,
        io: impl Fn(PathBuf, io::Error) -> E,
        write: impl FnOnce(&Path) -> Result<T, E>,
    ) -> Result<T, E> {
        let staging = Staging::dir(out).map_err(|(path, e)| io(path, e))?;
        let result = write(staging.path()).and_then(|value| {
            std::fs::File::open(staging.path())
                .and_then(|d| d.sync_all())
                .map_err(|e| io(staging.path().to_path_buf(), e))?;
            staging
                .publish(out, force)
                .map_err(|(path, e)| io(path, e))?;
            Ok(value)
        });
        if result.is_err() {
            staging.abandon();
        }
        result
    }

    /// Where the output is written until it is published.
    pub fn path(&self) -> &Path {
        &self.partial
    }

    /// Renames the finished partial output to `out` (see [`publish`]).
    pub(crate) fn publish(&self, out: &Path, force: bool) -> Result<(), (PathBuf, io::Error)> {
        publish(&self.partial, out, force)
    }

    /// Removes the partial output and the directories made for it (those still empty).
    pub fn abandon(&self) {
        let _ = self.remove_partial();
        for dir in &self.made {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }

    fn remove_partial(&self) -> io::Result<()> {
        let gone = if self.dir {
            std::fs::remove_dir_all(&self.partial)
        } else {
            std::fs::remove_file(&self.partial)
        };
        match gone {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// Creates `dir` and its missing ancestors; returns the ones it created, deepest first.
fn make_parents(dir: &Path) -> Result<Vec<PathBuf>, (PathBuf, io::Error)> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.as_os_str().is_empty() && std::fs::symlink_metadata(at).is_err() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    let mut made = Vec::new();
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => made.push(d.clone()),
            // Another run made it meanwhile: not ours to remove.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                for m in made.iter().rev() {
                    let _ = std::fs::remove_dir(m);
                }
                return Err((d.clone(), e));
            }
        }
    }
    made.reverse();
    Ok(made)
}

/// Renames the finished `partial` directory or file to `out`. On failure, the path that failed
/// and why.
pub(crate) fn publish(partial: &Path, out: &Path, force: bool) -> Result<(), (PathBuf, io::Error)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_name_gets_a_short_partial_name() {
        let name = "é".repeat(122) + "x"; // 245 bytes: a legal name
        let out = Path::new("/tmp").join(&name);
        let partial = partial_dir(&out);
        let got = partial.file_name().unwrap().to_string_lossy().into_owned();
        assert!(got.len() <= NAME_MAX, "{}", got.len());
        assert!(got.ends_with(&format!(".partial-{}", std::process::id())));
        assert!(got.starts_with("éé"));
        assert_eq!(partial_pid(&got), Some(std::process::id()));
        // Two long names with the same prefix stay apart.
        let other = partial_dir(&Path::new("/tmp").join(name.clone() + "y"));
        assert_ne!(partial, other);
        // A short name is kept whole.
        assert_eq!(
            partial_dir(Path::new("d/out")),
            PathBuf::from(format!("d/out.partial-{}", std::process::id()))
        );
    }

    #[test]
    fn partial_pids_are_read_from_names() {
        assert_eq!(partial_pid("out.partial-123"), Some(123));
        assert_eq!(partial_pid("a.b.partial-7"), Some(7));
        for name in [
            "out.partial",
            "out.partial-",
            "out.partial-12x",
            "out",
            "x.old-12",
        ] {
            assert_eq!(partial_pid(name), None, "{name}");
        }
    }

    #[test]
    fn an_abandoned_output_removes_the_parents_it_made() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let out = dir.path().join("a/b/c/out");
        let staging = Staging::dir(&out).unwrap();
        assert!(staging.path().is_dir());
        staging.abandon();
        assert!(dir.path().join("a").is_dir());
        assert!(!dir.path().join("a/b").exists());
    }
}
