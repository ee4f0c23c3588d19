//! Interrupted work (issue 8, docs/RELIABILITY.md): `apply`, `export` and `heal` are SIGKILLed at
//! ten seeded random points each. A killed `apply` or `export` never leaves its final output (only
//! its own `OUT.partial-<pid>` / `FILE.partial` may remain, which the promise allows: a killed
//! process cannot clean up), and a later run succeeds with the same bytes as an uninterrupted
//! one. A killed `heal` resumed from its last checkpoint ends with bit-identical weights (the
//! trainer is deterministic on the CPU: same data order, same recurrence draws, same reductions).

mod common;

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::{listing, stderr, surgery};
use surgery::synth::{self, SplitMix64, SynthSpec};

const KILLS: usize = 10;

/// A model big enough that `apply` and `export` take a measurable time on a debug build.
fn big_source(d: &Path) {
    common::medium_source(d, 7);
}

/// Runs `args` in `d` to the end; returns how long it took.
fn timed(d: &Path, args: &[&str]) -> Duration {
    let started = Instant::now();
    let o = surgery(d, args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    started.elapsed()
}

/// Starts `args` in `d` and SIGKILLs it after `delay`. Returns None when it had already exited
/// (then with this status), else Some(()) once the killed process is reaped.
fn kill_after(d: &Path, args: &[&str], delay: Duration) -> Result<(), ExitStatus> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_surgery"))
        .args(args)
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    if let Some(status) = child.try_wait().unwrap() {
        return Err(status);
    }
    // Child::kill sends SIGKILL on Unix.
    child.kill().unwrap();
    child.wait().unwrap();
    Ok(())
}

/// Ten delays drawn uniformly in [2%, 98%] of `full`, from a fixed seed.
fn delays(seed: u64, full: Duration) -> Vec<Duration> {
    let mut rng = SplitMix64(seed);
    (0..KILLS)
        .map(|_| full.mul_f64(0.02 + 0.96 * (rng.uniform() as f64 + 1.0) / 2.0))
        .collect()
}

/// The bytes that identify a finished output: a directory's manifest, or the file itself.
fn fingerprint(path: &Path) -> Vec<u8> {
    if path.is_dir() {
        std::fs::read(path.join("manifest.json")).unwrap()
    } else {
        std::fs::read(path).unwrap()
    }
}

/// Kills `args` (which writes `out` in `d`) at ten points; after each, `out` must either not
/// exist or be complete, identical to `reference` (the kill landed after the final rename, while
/// the process was still exiting). Returns how many runs were killed before their output appeared.
fn kill_ten_times(
    d: &Path,
    args: &[&str],
    out: &str,
    reference: &str,
    seed: u64,
    full: Duration,
) -> usize {
    let mut killed = 0;
    for delay in delays(seed, full) {
        let status = kill_after(d, args, delay);
        if let Err(status) = status {
            assert!(status.success(), "{args:?} failed on its own: {status}");
        }
        if d.join(out).exists() {
            assert_eq!(
                fingerprint(&d.join(out)),
                fingerprint(&d.join(reference)),
                "{out} after a SIGKILL at {delay:?} differs from an uninterrupted run"
            );
            std::fs::remove_dir_all(d.join(out))
                .or_else(|_| std::fs::remove_file(d.join(out)))
                .unwrap();
        } else {
            killed += 1;
        }
        // Anything left is the killed process's own partial output.
        for name in listing(d) {
            assert!(
                ["src", "rec", "reference", "reference.gguf"].contains(&name.as_str())
                    || name.starts_with(&format!("{out}.partial")),
                "unexpected leftover {name}"
            );
        }
    }
    killed
}

#[test]
fn killed_apply_never_leaves_its_output_and_a_later_run_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    big_source(d);
    // Small shards, so the kills land in different files and phases.
    let args = |out: &'static str| {
        vec![
            "apply",
            "src",
            "--shape",
            "2,4,2",
            "--max-shard-size",
            "2MB",
            "--out",
            out,
            "-q",
        ]
    };
    let full = timed(d, &args("reference"));
    let killed = kill_ten_times(d, &args("out"), "out", "reference", 1, full);
    eprintln!("apply: {killed} of {KILLS} runs killed mid-way (a full run takes {full:?})");
    assert!(killed >= 3, "only {killed} kills landed mid-run");
    timed(d, &args("out"));
    assert_eq!(
        std::fs::read(d.join("out/manifest.json")).unwrap(),
        std::fs::read(d.join("reference/manifest.json")).unwrap(),
        "the run after the kills wrote other bytes than the uninterrupted one"
    );
    assert!(surgery(d, &["verify", "out"]).status.success());
}

#[test]
fn killed_export_never_leaves_its_output_and_a_later_run_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    big_source(d);
    let o = surgery(
        d,
        &["apply", "src", "--shape", "2,4,2", "--out", "rec", "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let args = |out: &'static str| {
        vec![
            "export", "gguf", "rec", "--type", "q4_k_m", "--out", out, "-q",
        ]
    };
    let full = timed(d, &args("reference.gguf"));
    let killed = kill_ten_times(d, &args("out.gguf"), "out.gguf", "reference.gguf", 2, full);
    eprintln!("export: {killed} of {KILLS} runs killed mid-way (a full run takes {full:?})");
    assert!(killed >= 3, "only {killed} kills landed mid-run");
    timed(d, &args("out.gguf"));
    assert_eq!(
        std::fs::read(d.join("out.gguf")).unwrap(),
        std::fs::read(d.join("reference.gguf")).unwrap()
    );
}

const TEXT: &str = "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.";

fn heal_args(out: &str) -> Vec<&str> {
    vec![
        "heal",
        "rec",
        "--data",
        "train.txt",
        "--out",
        out,
        "--steps",
        "16",
        "--checkpoint-every",
        "2",
        "--seq-len",
        "32",
        "--batch",
        "4",
        "--micro-batch",
        "2",
        "--max-mean-recurrence",
        "3",
        "--holdout",
        "0.1",
        "--eval-tokens",
        "128",
        "-q",
    ]
}

/// The newest complete checkpoint of run `out`, if any.
fn last_checkpoint(d: &Path, out: &str) -> Option<String> {
    let root = d.join(format!("{out}.checkpoints"));
    let mut steps: Vec<String> = std::fs::read_dir(&root)
        .ok()?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") && !n.ends_with(".partial"))
        .collect();
    steps.sort();
    steps
        .pop()
        .map(|s| root.join(s).to_string_lossy().into_owned())
}

#[test]
fn killed_heal_resumed_from_its_last_checkpoint_ends_with_identical_weights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth::write_hf(&d.join("src"), &SynthSpec::llama(4), 3).unwrap();
    synth::write_byte_tokenizer(&d.join("src")).unwrap();
    let o = surgery(
        d,
        &[
            "apply",
            "src",
            "--shape",
            "1,2,1",
            "--adapter-noise",
            "0.05",
            "--out",
            "rec",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text: Vec<String> = (0..30).map(|i| format!("{i}. {TEXT}")).collect();
    std::fs::write(d.join("train.txt"), text.join("\n\n")).unwrap();

    let full = timed(d, &heal_args("reference"));
    let reference = std::fs::read(d.join("reference/model.safetensors")).unwrap();
    let (mut killed, mut resumed) = (0, 0);
    // Writing the output and its curves takes the last part of a run; aim before it.
    for delay in delays(3, full.mul_f64(0.8)) {
        let _ = std::fs::remove_dir_all(d.join("run"));
        let _ = std::fs::remove_dir_all(d.join("run.checkpoints"));
        if kill_after(d, &heal_args("run"), delay).is_err() {
            continue;
        }
        if d.join("run").exists() {
            // Killed after the output was published, while exiting: it must be complete.
            assert!(fingerprint(&d.join("run/model.safetensors")) == reference);
            continue;
        }
        killed += 1;
        let o = match last_checkpoint(d, "run") {
            Some(ckpt) => {
                resumed += 1;
                surgery(d, &["heal", "--resume", &ckpt, "-q"])
            }
            // Killed before the first checkpoint: the run starts again from the beginning.
            None => surgery(d, &heal_args("run")),
        };
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            std::fs::read(d.join("run/model.safetensors")).unwrap() == reference,
            "killed at {delay:?}, resumed: the weights differ from the uninterrupted run"
        );
    }
    eprintln!(
        "heal: {killed} of {KILLS} runs killed mid-way, {resumed} resumed from a checkpoint \
         (a full run takes {full:?})"
    );
    assert!(
        killed >= 3 && resumed >= 2,
        "{killed} killed, {resumed} resumed"
    );
}
