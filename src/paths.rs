//! Paths that come from the user or from files someone else may have written (a shared plan, an
//! edited checkpoint): what may be read and where output may go (DESIGN.md decision 13, issue 18).
//!
//! - Only regular files are read as files. A FIFO blocks `open` or `read` forever and a device
//!   such as `/dev/zero` never ends, so anything else is refused by its kind before a byte is read
//!   ([`open_file`], [`read`], [`require_file`]).
//! - A plan reads only inside its source folder, after symlinks ([`file_inside`]).
//! - No output is, contains or lies inside an input ([`check_output`]), compared on canonical
//!   paths; an output that does not exist yet is placed by its nearest existing ancestor
//!   ([`resolve`]).

use std::fs::{File, FileType};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

/// A path refused by the rules of this module.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// A plan names a source file outside the source model's folder.
    #[error("source file {file:?} lies outside the source folder {root} (resolved to {resolved}); a plan may only read inside its model's folder")]
    Outside {
        file: String,
        root: PathBuf,
        resolved: PathBuf,
    },
    /// A plan's source file is not a plain relative path.
    #[error("source file {0:?} is not a relative path inside the source folder")]
    NotRelative(String),
    /// An output is, contains or lies inside an input.
    #[error("the output {out} {how} the input {input}; choose an --out apart from the inputs")]
    Overlap {
        out: PathBuf,
        input: PathBuf,
        how: &'static str,
    },
    /// The output exists and `--force` was not given.
    #[error("{0} already exists; pass --force to replace it")]
    Exists(PathBuf),
    /// Resolving a path failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// What a file type is, for a refusal.
fn kind_name(t: FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

/// The refusal of a path that is not a regular file: `InvalidInput`, so it exits with 1 like
/// any invalid input (src/cli/mod.rs), and its message says what the path is.
fn not_regular(t: FileType) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {}, not a regular file", kind_name(t)),
    )
}

/// Ok when `path` (after symlinks) is a regular file; else the refusal, without opening it.
pub(crate) fn require_file(path: &Path) -> io::Result<()> {
    let t = std::fs::metadata(path)?.file_type();
    if t.is_file() {
        Ok(())
    } else {
        Err(not_regular(t))
    }
}

/// Ok when `path` (after symlinks) is a directory.
pub(crate) fn require_dir(path: &Path) -> io::Result<()> {
    let t = std::fs::metadata(path)?.file_type();
    if t.is_dir() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "is {}, not a directory",
                if t.is_file() { "a file" } else { kind_name(t) }
            ),
        ))
    }
}

/// Opens `path` for reading if it is a regular file. The type is checked before opening (for
/// the message) and again on the open handle (the path may have been swapped in between); the
/// open itself does not block, since opening a FIFO that has no writer waits for one.
pub(crate) fn open_file(path: &Path) -> io::Result<File> {
    require_file(path)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // No effect on a regular file's reads (Linux open(2)); only the open of a FIFO changes.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path)?;
    let t = file.metadata()?.file_type();
    if t.is_file() {
        Ok(file)
    } else {
        Err(not_regular(t))
    }
}

/// The bytes of the regular file `path` (what `std::fs::read` does, refusing anything else).
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = open_file(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Where `path` is, or would be once created: its nearest existing ancestor with symlinks
/// resolved, and the rest of the path appended (`..` taken lexically: the rest does not exist
/// yet, so no symlink can hide in it).
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut base = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = base.canonicalize() {
            let mut out = canonical;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::Normal(name) => out.push(name),
                    _ => {}
                }
            }
            return Ok(out);
        }
        let (Some(parent), Some(last)) = (base.parent(), base.components().next_back()) else {
            return Ok(absolute);
        };
        rest.push(last);
        base = parent;
    }
}

/// The canonical path of `rel` (a source file named by a plan) under `root`, refused unless it
/// is a relative path that, after symlinks, lies inside `root` and is a regular file. The one
/// exception is the Hugging Face cache, whose `snapshots/<revision>/` folders hold symlinks into
/// the repository's `blobs/`: a root named `<repo>/snapshots/<revision>` may also read
/// `<repo>/blobs/`.
pub(crate) fn file_inside(root: &Path, rel: &str) -> Result<PathBuf, PathError> {
    let relative = Path::new(rel);
    let plain = !rel.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(PathError::NotRelative(rel.to_string()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PathError::Io { path, source }
    };
    let joined = root.join(relative);
    let canonical_root = root.canonicalize().map_err(io(root))?;
    let resolved = joined.canonicalize().map_err(io(&joined))?;
    let blobs = canonical_root
        .parent()
        .filter(|snapshots| snapshots.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .map(|repo| repo.join("blobs"));
    let inside =
        resolved.starts_with(&canonical_root) || blobs.is_some_and(|b| resolved.starts_with(b));
    if !inside {
        return Err(PathError::Outside {
            file: rel.to_string(),
            root: root.to_path_buf(),
            resolved,
        });
    }
    require_file(&resolved).map_err(io(&joined))?;
    Ok(resolved)
}

/// Where a command may write `out`: apart from its `inputs` ([`check_output`], checked first, so
/// that the advice to pass --force never points at an input), and only over an existing `out`
/// with `force`.
pub fn check_new_output(out: &Path, inputs: &[PathBuf], force: bool) -> Result<(), PathError> {
    check_output(out, inputs)?;
    refuse_existing(out, force)
}

/// Refuses an existing `out` without `force`.
pub fn refuse_existing(out: &Path, force: bool) -> Result<(), PathError> {
    if out.exists() && !force {
        return Err(PathError::Exists(out.to_path_buf()));
    }
    Ok(())
}

/// Refuses an output that is, contains or lies inside one of `inputs`: writing it would replace
/// or remove what is being read (`apply SRC --out SRC --force`), or make the output part of its
/// input. Paths are compared after symlinks, the output by its nearest existing ancestor.
pub fn check_output(out: &Path, inputs: &[PathBuf]) -> Result<(), PathError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PathError::Io { path, source }
    };
    let o = resolve(out).map_err(io(out))?;
    for input in inputs {
        let i = resolve(input).map_err(io(input))?;
        let how = if o == i {
            "is"
        } else if i.starts_with(&o) {
            "contains"
        } else if o.starts_with(&i) {
            "lies inside"
        } else {
            continue;
        };
        return Err(PathError::Overlap {
            out: out.to_path_buf(),
            input: input.clone(),
            how,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_places_a_missing_path_under_its_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir(base.join("a")).unwrap();
        assert_eq!(resolve(&base.join("a/b/c")).unwrap(), base.join("a/b/c"));
        assert_eq!(resolve(&base.join("a/x/../y")).unwrap(), base.join("a/y"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(base.join("a"), base.join("link")).unwrap();
            assert_eq!(resolve(&base.join("link/new")).unwrap(), base.join("a/new"));
        }
    }

    #[test]
    fn an_output_may_not_be_contain_or_lie_inside_an_input() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("src")).unwrap();
        let inputs = [d.join("src")];
        for (out, how) in [("src", "is"), ("src/rec", "lies inside"), ("", "contains")] {
            let err = check_output(&d.join(out), &inputs).unwrap_err().to_string();
            assert!(err.contains(&format!(" {how} the input ")), "{out}: {err}");
        }
        assert!(check_output(&d.join("src2"), &inputs).is_ok());
        assert!(check_output(&d.join("rec"), &inputs).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let err = read(&fifo).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            err.to_string(),
            "is a FIFO (named pipe), not a regular file"
        );
        let err = read(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(err.to_string(), "is a character device, not a regular file");
        let err = read(dir.path()).unwrap_err();
        assert_eq!(err.to_string(), "is a directory, not a regular file");
        std::fs::write(dir.path().join("f"), b"abc").unwrap();
        assert_eq!(read(&dir.path().join("f")).unwrap(), b"abc");
    }

    #[test]
    fn a_plan_reads_only_inside_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("m")).unwrap();
        std::fs::write(d.join("m/a.json"), b"{}").unwrap();
        std::fs::write(d.join("secret.txt"), b"s").unwrap();
        assert!(file_inside(&d.join("m"), "a.json").is_ok());
        for bad in ["../secret.txt", "/etc/passwd", "", "./a.json"] {
            assert!(file_inside(&d.join("m"), bad).is_err(), "{bad}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.join("secret.txt"), d.join("m/link.json")).unwrap();
            let err = file_inside(&d.join("m"), "link.json").unwrap_err();
            assert!(matches!(err, PathError::Outside { .. }), "{err}");
            // The Hugging Face cache: snapshots/<rev>/f -> ../../blobs/<sha>.
            let snap = d.join("repo/snapshots/abc");
            std::fs::create_dir_all(&snap).unwrap();
            std::fs::create_dir_all(d.join("repo/blobs")).unwrap();
            std::fs::write(d.join("repo/blobs/123"), b"w").unwrap();
            std::os::unix::fs::symlink("../../blobs/123", snap.join("w.json")).unwrap();
            assert!(file_inside(&snap, "w.json").is_ok());
        }
    }
}
