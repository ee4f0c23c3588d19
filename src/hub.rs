//! Hub models, offline (issue 20): a hub id (`org/name`) or a hub cache folder
//! (`models--org--name`) resolved to its snapshot folder in the local Hugging Face cache. Nothing
//! is fetched; a model that is not cached is refused with the command that fetches it.
//!
//! The cache layout is the one huggingface_hub documents ("Understand caching"):
//!
//! ```text
//! CACHE/models--{org}--{name}/refs/{revision}        a commit hash
//! CACHE/models--{org}--{name}/snapshots/{hash}/...   the files, usually symlinks into blobs/
//! CACHE/models--{org}--{name}/blobs/{etag}           the contents
//! ```
//!
//! CACHE is `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE` (its older name), else `HF_HOME/hub`,
//! else `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`, as huggingface_hub
//! reads them. Not the `hf-hub` crate's `Cache`: it reads `HF_HOME` only, panics without a home
//! directory, and joins a ref's content into a path unchecked.
//!
//! Everything read from the cache is untrusted (a cache may be shared, or unpacked from an
//! archive): a revision or a ref that is not a plain name or hash is refused before it becomes a
//! path, and so is a snapshot, or a link inside it, that resolves outside its repository folder.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The revision read when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// A hub model that cannot be resolved, or a cache that is not what it should be.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A hub id that is neither a local path nor in the cache.
    #[error("{model}: no such file or directory, and {id} at revision {revision} is not in the Hugging Face cache {cache} ({missing} is missing); fetch it with `huggingface-cli download {id}{flag}`, or point HF_HUB_CACHE at the cache that holds it", flag = revision_flag(revision))]
    NotCached {
        model: PathBuf,
        id: String,
        revision: String,
        cache: PathBuf,
        missing: String,
    },
    /// A cache folder given by its path that does not hold the revision.
    #[error("{folder}: revision {revision} of {id} is not in this cache folder ({missing} is missing); fetch it with `huggingface-cli download {id}{flag}`", flag = revision_flag(revision))]
    NotInFolder {
        folder: PathBuf,
        id: String,
        revision: String,
        missing: String,
    },
    /// `--revision` is not a branch, tag or commit hash.
    #[error("--revision {0:?} is not a branch, tag or commit hash (letters, digits, '.', '_', '-' in '/'-separated parts)")]
    BadRevision(String),
    /// A ref file that does not hold a plain commit hash.
    #[error("{path} does not hold a commit hash (it holds {content:?}); the cache is damaged or not a Hugging Face cache: refused")]
    BadRef { path: PathBuf, content: String },
    /// A snapshot, or a link inside it, that resolves outside its repository folder.
    #[error("{path} resolves to {resolved}, outside the cache folder {repo}: refused")]
    Escapes {
        path: PathBuf,
        resolved: PathBuf,
        repo: PathBuf,
    },
    /// A link inside a snapshot whose target is missing (an interrupted download).
    #[error("{0} is a link to a file that is not there (an interrupted download?); fetch the model again")]
    BrokenLink(PathBuf),
    /// No cache folder can be named: no variable is set and there is no home directory.
    #[error("no Hugging Face cache folder: HF_HUB_CACHE, HF_HOME and HOME are all unset")]
    NoCache,
    /// Reading the cache failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// ` --revision REV` for the fetch advice, nothing for the default revision.
fn revision_flag(revision: &str) -> String {
    if revision == DEFAULT_REVISION {
        String::new()
    } else {
        format!(" --revision {revision}")
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The folder `model` names: itself when it exists and is not a cache folder, else the snapshot
/// of `revision` (default `main`) of the hub id or cache folder it names, found through the
/// process's environment ([`resolve_with`]).
pub fn resolve(model: &Path, revision: Option<&str>) -> Result<PathBuf, HubError> {
    resolve_with(model, revision, |name| std::env::var_os(name))
}

/// [`resolve`] with the environment read through `env` (a test passes its own).
pub fn resolve_with(
    model: &Path,
    revision: Option<&str>,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<PathBuf, HubError> {
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    // A local path that exists always wins (a dangling link exists too: it is refused as such
    // when read, not looked up on the hub).
    if model.symlink_metadata().is_ok() {
        let Some(id) = cache_folder_id(model).filter(|_| model.join("snapshots").is_dir()) else {
            return Ok(model.to_path_buf());
        };
        check_revision(revision)?;
        return match snapshot(model, revision)? {
            Lookup::Found(path) => Ok(path),
            Lookup::Missing(missing) => Err(HubError::NotInFolder {
                folder: model.to_path_buf(),
                id,
                revision: revision.to_string(),
                missing,
            }),
        };
    }
    let (id, folder) = if let Some(id) = hub_id(model) {
        let folder = format!("models--{}", id.replace('/', "--"));
        (id, folder)
    } else if let Some(id) = cache_folder_id(model).filter(|_| single_name(model)) {
        (id, model.display().to_string())
    } else {
        // Not a hub model: the reader names the missing path.
        return Ok(model.to_path_buf());
    };
    check_revision(revision)?;
    let cache = cache_root(env)?;
    match snapshot(&cache.join(&folder), revision)? {
        Lookup::Found(path) => Ok(path),
        Lookup::Missing(missing) => Err(HubError::NotCached {
            model: model.to_path_buf(),
            id,
            revision: revision.to_string(),
            missing: if missing.is_empty() {
                folder
            } else {
                format!("{folder}/{missing}")
            },
            cache,
        }),
    }
}

/// The cache folder, from the variables huggingface_hub reads, in its order.
pub fn cache_root(env: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, HubError> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(hub) = set("HF_HUB_CACHE").or_else(|| set("HUGGINGFACE_HUB_CACHE")) {
        return Ok(hub);
    }
    if let Some(home) = set("HF_HOME") {
        return Ok(home.join("hub"));
    }
    let cache = set("XDG_CACHE_HOME")
        .or_else(|| set("HOME").map(|home| home.join(".cache")))
        .ok_or(HubError::NoCache)?;
    Ok(cache.join("huggingface").join("hub"))
}

/// `org/name` when `model` is a hub id: two plain parts of letters, digits, `-`, `_` and `.`
/// (the hub's own rule: no `--` or `..` inside, no `-` or `.` at either end, at most 96 each).
fn hub_id(model: &Path) -> Option<String> {
    let text = model.to_str()?;
    let (org, name) = text.split_once('/')?;
    [org, name]
        .iter()
        .all(|part| hub_name(part))
        .then(|| text.to_string())
}

fn hub_name(part: &str) -> bool {
    let edge = |c: char| c == '-' || c == '.';
    !part.is_empty()
        && part.len() <= 96
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !part.contains("--")
        && !part.contains("..")
        && !part.starts_with(edge)
        && !part.ends_with(edge)
}

/// `org/name` when the last part of `model` is a cache folder's name, `models--org--name`.
fn cache_folder_id(model: &Path) -> Option<String> {
    let name = model.file_name()?.to_str()?;
    let (org, repo) = name.strip_prefix("models--")?.split_once("--")?;
    (hub_name(org) && hub_name(repo)).then(|| format!("{org}/{repo}"))
}

/// True when `model` is one plain name (looked up in the cache rather than as a path).
fn single_name(model: &Path) -> bool {
    let mut parts = model.components();
    matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none()
}

/// Refuses a revision that is not plain names joined by `/` (so `../../x` never becomes a path).
fn check_revision(revision: &str) -> Result<(), HubError> {
    let plain = revision.len() <= 256
        && revision.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if plain {
        Ok(())
    } else {
        Err(HubError::BadRevision(revision.to_string()))
    }
}

/// A git commit hash: 40 (SHA-1) or 64 (SHA-256) lowercase hex digits.
fn is_commit_hash(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What a repository folder holds for a revision.
enum Lookup {
    /// The snapshot folder, checked.
    Found(PathBuf),
    /// What is missing, relative to the repository folder (empty: the folder itself).
    Missing(String),
}

/// The snapshot folder of `revision` in the repository folder `repo`: by its ref, or by itself
/// when it is a commit hash with a snapshot.
fn snapshot(repo: &Path, revision: &str) -> Result<Lookup, HubError> {
    if !repo.is_dir() {
        return Ok(Lookup::Missing(String::new()));
    }
    let by_hash = format!("snapshots/{revision}");
    let hash = if is_commit_hash(revision) && repo.join(&by_hash).is_dir() {
        revision.to_string()
    } else {
        let name = format!("refs/{revision}");
        let path = repo.join(&name);
        if path.symlink_metadata().is_err() {
            return Ok(Lookup::Missing(if is_commit_hash(revision) {
                by_hash
            } else {
                name
            }));
        }
        read_ref(&path)?
    };
    let folder = format!("snapshots/{hash}");
    let path = repo.join(&folder);
    if !path.is_dir() {
        return Ok(Lookup::Missing(folder));
    }
    check_inside(repo, &path)?;
    Ok(Lookup::Found(path))
}

/// The commit hash a ref file holds (a trailing newline allowed), refused when it holds
/// anything else. At most 128 bytes are read: a ref is 40 or 64.
fn read_ref(path: &Path) -> Result<String, HubError> {
    let file = crate::paths::open_file(path).map_err(io(path))?;
    let mut bytes = Vec::new();
    file.take(128).read_to_end(&mut bytes).map_err(io(path))?;
    let text = String::from_utf8_lossy(&bytes);
    let hash = text.strip_suffix('\n').unwrap_or(&text);
    if is_commit_hash(hash) {
        Ok(hash.to_string())
    } else {
        Err(HubError::BadRef {
            path: path.to_path_buf(),
            content: text.chars().take(64).collect(),
        })
    }
}

/// The most entries of a snapshot checked: a model's snapshot holds tens.
const MAX_ENTRIES: usize = 100_000;

/// Refuses a snapshot that, or any link inside which, resolves outside the repository folder
/// `repo` (links into `repo/blobs/` are the layout), or a link whose target is missing.
fn check_inside(repo: &Path, snapshot: &Path) -> Result<(), HubError> {
    let root = repo.canonicalize().map_err(io(repo))?;
    let inside = |path: &Path| -> Result<(), HubError> {
        let resolved = path.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => HubError::BrokenLink(path.to_path_buf()),
            _ => io(path)(e),
        })?;
        if resolved.starts_with(&root) {
            Ok(())
        } else {
            Err(HubError::Escapes {
                path: path.to_path_buf(),
                resolved,
                repo: repo.to_path_buf(),
            })
        }
    };
    inside(snapshot)?;
    // Depth first over real folders; a link is checked where it points and not followed.
    let mut pending = vec![snapshot.to_path_buf()];
    let mut seen = 0usize;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            seen += 1;
            if seen > MAX_ENTRIES {
                return Ok(());
            }
            let path = entry.path();
            let kind = entry.file_type().map_err(io(&path))?;
            if kind.is_symlink() {
                inside(&path)?;
            } else if kind.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_follow_the_hubs_naming_rule() {
        let id = |s: &str| hub_id(Path::new(s));
        assert_eq!(
            id("HuggingFaceTB/SmolLM2-135M").as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M")
        );
        assert_eq!(id("org/model.v1_2").as_deref(), Some("org/model.v1_2"));
        for not in [
            "model",
            "/abs/path",
            "a/b/c",
            "./a",
            "a/",
            "../x",
            "a/..",
            "a--b/c",
            "a/b..c",
            "-a/b",
            "a/b.",
            "a b/c",
        ] {
            assert_eq!(id(not), None, "{not}");
        }
        assert_eq!(
            cache_folder_id(Path::new("x/models--org--name")).as_deref(),
            Some("org/name")
        );
        assert_eq!(cache_folder_id(Path::new("models--org")), None);
        assert_eq!(cache_folder_id(Path::new("datasets--org--name")), None);
    }

    #[test]
    fn revisions_and_refs_are_plain() {
        for ok in ["main", "v1.0", "refs/pr/1", &"a".repeat(40)] {
            assert!(check_revision(ok).is_ok(), "{ok}");
        }
        for bad in ["", "../../etc", "a/../b", "/abs", "a//b", "x y", "a\\b"] {
            assert!(check_revision(bad).is_err(), "{bad}");
        }
        assert!(is_commit_hash(&"0123456789abcdef".repeat(4)[..40]));
        assert!(is_commit_hash(&"f".repeat(64)));
        assert!(!is_commit_hash(&"F".repeat(40)));
        assert!(!is_commit_hash(&"a".repeat(41)));
    }

    #[test]
    fn the_cache_root_follows_huggingface_hubs_order() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = [
            ("HF_HUB_CACHE", "/hub"),
            ("HUGGINGFACE_HUB_CACHE", "/old"),
            ("HF_HOME", "/hf"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        let root = |n: usize| cache_root(env(Box::leak(Box::new(all[n..].to_vec())))).unwrap();
        assert_eq!(root(0), Path::new("/hub"));
        assert_eq!(root(1), Path::new("/old"));
        assert_eq!(root(2), Path::new("/hf/hub"));
        assert_eq!(root(3), Path::new("/xdg/huggingface/hub"));
        assert_eq!(root(4), Path::new("/home/u/.cache/huggingface/hub"));
        // An empty variable counts as unset.
        let empty = cache_root(env(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/hf")])).unwrap();
        assert_eq!(empty, Path::new("/hf/hub"));
        assert!(matches!(cache_root(env(&[])), Err(HubError::NoCache)));
    }
}
