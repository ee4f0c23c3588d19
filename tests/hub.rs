//! Hub models, offline (issue 20): hub ids and cache folders resolved in a fake Hugging Face cache
//! built here (refs, snapshots, links into blobs), the variables that name the cache, the
//! refusals (not cached, a malicious ref or revision, a link out of the cache), and real commands
//! on the tiny fixture model read from the cache.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use surgery::hub::{resolve_with, HubError};

const HASH: &str = "0123456789abcdef0123456789abcdef01234567";
const OTHER: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// The tiny fixture model.
fn fixture() -> PathBuf {
    common::root().join("fixtures/tiny/model")
}

/// `cache/models--org--tiny` as huggingface_hub lays it out: each file of the fixture as a blob,
/// `snapshots/HASH/` of links into `blobs/`, `refs/main` holding HASH. Returns the repo folder.
fn fake_cache(cache: &Path) -> PathBuf {
    let repo = cache.join("models--org--tiny");
    let snap = repo.join("snapshots").join(HASH);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (i, entry) in std::fs::read_dir(fixture()).unwrap().enumerate() {
        let entry = entry.unwrap();
        let blob = format!("blob{i:02}");
        std::fs::copy(entry.path(), repo.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(&blob),
            snap.join(entry.file_name()),
        )
        .unwrap();
    }
    std::fs::write(repo.join("refs/main"), HASH).unwrap();
    repo
}

/// An environment of only `vars` (the host's Hugging Face variables must not leak in).
fn env(vars: &[(&str, &Path)]) -> impl Fn(&str) -> Option<OsString> {
    let vars: Vec<(String, OsString)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_os_str().to_owned()))
        .collect();
    move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// Runs the binary in `dir` with the Hugging Face variables set to `vars` only.
fn run(dir: &Path, vars: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_surgery"));
    cmd.args(args).current_dir(dir).env_remove("RUST_BACKTRACE");
    for name in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(name);
    }
    cmd.env("HOME", dir.join("no-home"));
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A refusal: exit 1, one line on stderr holding every piece of `want`.
fn assert_refused(out: &Output, want: &[&str]) {
    let err = common::stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for w in want {
        assert!(err.contains(w), "want {w:?} in: {err}");
    }
}

#[test]
fn hub_ids_and_cache_folders_resolve_to_their_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let repo = fake_cache(&cache);
    let snap = repo.join("snapshots").join(HASH);
    let vars = env(&[("HF_HUB_CACHE", &cache)]);
    let id = Path::new("org/tiny");
    assert_eq!(resolve_with(id, None, &vars).unwrap(), snap);
    assert_eq!(resolve_with(id, Some("main"), &vars).unwrap(), snap);
    // The cache folder by its path, and by its name alone (looked up in the cache).
    assert_eq!(resolve_with(&repo, None, &vars).unwrap(), snap);
    let by_name = Path::new("models--org--tiny");
    assert_eq!(resolve_with(by_name, None, &vars).unwrap(), snap);
    // A revision given as a commit hash needs no ref; a tag is a ref like a branch.
    let other = repo.join("snapshots").join(OTHER);
    std::fs::create_dir_all(&other).unwrap();
    assert_eq!(resolve_with(id, Some(OTHER), &vars).unwrap(), other);
    std::fs::write(repo.join("refs/v1.0"), format!("{OTHER}\n")).unwrap();
    assert_eq!(resolve_with(id, Some("v1.0"), &vars).unwrap(), other);
    // A local path that exists is kept, even one shaped like a hub id.
    std::fs::create_dir_all(d.path().join("org/tiny")).unwrap();
    let local = d.path().join("org/tiny");
    assert_eq!(resolve_with(&local, None, &vars).unwrap(), local);
    // A path that is not a hub id is left for the reader to refuse.
    let missing = Path::new("nowhere");
    assert_eq!(resolve_with(missing, None, &vars).unwrap(), missing);
}

#[test]
fn hf_hub_cache_comes_before_hf_home() {
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("hf-home");
    let snap = fake_cache(&home.join("hub")).join("snapshots").join(HASH);
    let empty = d.path().join("empty-cache");
    std::fs::create_dir_all(&empty).unwrap();
    let id = Path::new("org/tiny");
    let found = resolve_with(id, None, env(&[("HF_HOME", &home)])).unwrap();
    assert_eq!(found, snap);
    let both = env(&[("HF_HOME", &home), ("HF_HUB_CACHE", &empty)]);
    match resolve_with(id, None, both) {
        Err(HubError::NotCached { cache, .. }) => assert_eq!(cache, empty),
        other => panic!("expected NotCached in HF_HUB_CACHE, got {other:?}"),
    }
    // Through the binary: the same two environments.
    let tiny = run(d.path(), &[("HF_HOME", &home)], &["inspect", "org/tiny"]);
    assert_eq!(tiny.status.code(), Some(0), "{}", common::stderr(&tiny));
    let not = run(
        d.path(),
        &[("HF_HOME", &home), ("HF_HUB_CACHE", &empty)],
        &["inspect", "org/tiny"],
    );
    assert_refused(&not, &[&empty.display().to_string()]);
    // Neither set: ~/.cache/huggingface/hub.
    let default = d.path().join("no-home/.cache/huggingface/hub");
    fake_cache(&default);
    let tiny = run(d.path(), &[], &["inspect", "org/tiny"]);
    assert_eq!(tiny.status.code(), Some(0), "{}", common::stderr(&tiny));
}

#[test]
fn a_model_that_is_not_cached_is_refused_with_how_to_fetch_it() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    fake_cache(&cache);
    let vars = [("HF_HUB_CACHE", cache.as_path())];
    let cache_text = cache.display().to_string();
    let out = run(d.path(), &vars, &["inspect", "HuggingFaceTB/SmolLM2-135M"]);
    assert_refused(
        &out,
        &[
            "HuggingFaceTB/SmolLM2-135M at revision main",
            &cache_text,
            "models--HuggingFaceTB--SmolLM2-135M is missing",
            "`huggingface-cli download HuggingFaceTB/SmolLM2-135M`",
        ],
    );
    // The repository is there but not the revision.
    let out = run(
        d.path(),
        &vars,
        &["inspect", "org/tiny", "--revision", "v2"],
    );
    assert_refused(
        &out,
        &[
            "org/tiny at revision v2",
            "refs/v2 is missing",
            "`huggingface-cli download org/tiny --revision v2`",
        ],
    );
    // A cache folder given by its path names itself.
    let repo = cache.join("models--org--tiny");
    let out = run(
        d.path(),
        &vars,
        &["inspect", repo.to_str().unwrap(), "--revision", OTHER],
    );
    assert_refused(
        &out,
        &[
            &format!("revision {OTHER} of org/tiny is not in this cache folder"),
            &format!("snapshots/{OTHER} is missing"),
        ],
    );
    assert_eq!(common::listing(d.path()), ["cache"], "nothing written");
}

#[test]
fn malicious_refs_revisions_and_links_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let repo = fake_cache(&cache);
    let vars = [("HF_HUB_CACHE", cache.as_path())];
    // A ref that names a path instead of a hash.
    std::fs::write(repo.join("refs/main"), "../../etc").unwrap();
    let out = run(d.path(), &vars, &["inspect", "org/tiny"]);
    assert_refused(
        &out,
        &["refs/main does not hold a commit hash", "\"../../etc\""],
    );
    std::fs::write(repo.join("refs/main"), HASH).unwrap();
    // A revision that climbs out of refs/.
    let out = run(
        d.path(),
        &vars,
        &["inspect", "org/tiny", "--revision", "../../etc"],
    );
    assert_refused(
        &out,
        &["--revision \"../../etc\" is not a branch, tag or commit hash"],
    );
    // A link in the snapshot that leads out of the repository folder.
    let secret = d.path().join("secret.json");
    std::fs::write(&secret, "{}").unwrap();
    let snap = repo.join("snapshots").join(HASH);
    std::os::unix::fs::symlink(&secret, snap.join("extra.json")).unwrap();
    let out = run(d.path(), &vars, &["inspect", "org/tiny"]);
    assert_refused(
        &out,
        &["extra.json resolves to", "outside the cache folder"],
    );
    std::fs::remove_file(snap.join("extra.json")).unwrap();
    // A snapshot folder that is itself a link out of the cache.
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let linked = repo.join("snapshots").join(OTHER);
    std::os::unix::fs::symlink(&elsewhere, &linked).unwrap();
    let out = run(
        d.path(),
        &vars,
        &["inspect", "org/tiny", "--revision", OTHER],
    );
    assert_refused(&out, &["outside the cache folder"]);
    // A link to a blob that is not there (an interrupted download).
    std::os::unix::fs::symlink("../../blobs/gone", snap.join("gone.json")).unwrap();
    let out = run(d.path(), &vars, &["inspect", "org/tiny"]);
    assert_refused(&out, &["gone.json is a link to a file that is not there"]);
}

#[test]
fn commands_read_the_fixture_from_the_cache() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let repo = fake_cache(&cache);
    let vars = [("HF_HUB_CACHE", cache.as_path())];
    let fixture = fixture();
    // inspect: the same report as the folder itself gives, but for the path.
    let json = |out: &Output| {
        assert_eq!(out.status.code(), Some(0), "{}", common::stderr(out));
        let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let path = v["path"].take();
        (v, path)
    };
    let (cached, path) = json(&run(d.path(), &vars, &["inspect", "org/tiny", "--json"]));
    let (direct, _) = json(&run(
        d.path(),
        &vars,
        &["inspect", fixture.to_str().unwrap(), "--json"],
    ));
    assert_eq!(cached, direct);
    let snap = repo.join("snapshots").join(HASH);
    assert_eq!(path, Value::from(snap.display().to_string()));
    let out = run(d.path(), &vars, &["inspect", "org/tiny"]);
    let note = format!("note: org/tiny at revision main is {}", snap.display());
    assert!(
        common::stderr(&out).contains(&note),
        "{}",
        common::stderr(&out)
    );
    // apply from the cache: the plan reads the snapshot's links into blobs/ and the output
    // equals the one made from the folder itself.
    let shape = ["--shape", "2,2,2"];
    let from_cache = d.path().join("from-cache");
    let out = run(
        d.path(),
        &vars,
        &[
            &["apply", "org/tiny", "--out", from_cache.to_str().unwrap()][..],
            &shape,
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    let direct = d.path().join("direct");
    let out = run(
        d.path(),
        &vars,
        &[
            &[
                "apply",
                fixture.to_str().unwrap(),
                "--out",
                direct.to_str().unwrap(),
            ][..],
            &shape,
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(weights(&from_cache), weights(&direct));
    // Its config.json names the source by its repository and commit, not the snapshot folder.
    let config: Value =
        serde_json::from_slice(&std::fs::read(from_cache.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["surgery"]["source"]["name"], "org/tiny");
    assert_eq!(config["surgery"]["source"]["revision"], HASH);
    // eval --baseline names the source by its hub id too: the same rows as by its folder.
    let text = d.path().join("t.txt");
    std::fs::write(
        &text,
        "And God said, Let there be light: and there was light.\n",
    )
    .unwrap();
    let rows = |baseline: &str| {
        let args = [
            "eval",
            "direct",
            "--data",
            "t.txt",
            "--recurrence",
            "1",
            "--json",
            "--baseline",
            baseline,
        ];
        let out = run(d.path(), &vars, &args);
        assert_eq!(out.status.code(), Some(0), "{}", common::stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let losses: Vec<Value> = (v["baselines"].as_array().unwrap().iter())
            .map(|r| r["loss"].clone())
            .collect();
        assert_eq!(losses.len(), 2, "{v}");
        losses
    };
    assert_eq!(rows("org/tiny"), rows(fixture.to_str().unwrap()));
}

#[test]
fn revision_without_a_hub_model_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let fixture = fixture();
    let out = run(
        d.path(),
        &[],
        &["inspect", fixture.to_str().unwrap(), "--revision", "v1"],
    );
    assert_refused(
        &out,
        &[
            "--revision v1 picks the revision of a hub model",
            "names none",
        ],
    );
}
