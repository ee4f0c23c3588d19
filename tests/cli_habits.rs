//! The command-line habits of the field (issue 20, part 6), each through the real binary: clap's
//! whole message on one line, bare `surgery` prints the help, the short flags, generate's default
//! recurrence, progress lines off a terminal, heal's time estimate, no checkpoints folder without
//! checkpoints, plan's dropped ranges, one size unit, and the note on requantizing.

mod common;

use std::path::Path;

use common::{stderr, stdout, surgery};

#[test]
fn a_usage_error_is_clap_s_whole_message_on_one_line() {
    let d = tempfile::tempdir().unwrap();
    // A missing required argument is named (clap's first line alone does not name it).
    let o = surgery(d.path(), &["generate", "m"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        "error: the following required arguments were not provided: --prompt <PROMPT>; \
         Usage: surgery generate --prompt <PROMPT> <MODEL>; For more information, try '--help'.\n"
    );
    // Several missing arguments: a list, then the usage.
    let o = surgery(d.path(), &["heal"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "error: the following required arguments were not provided: --data <DATA>..., \
             --out <OUT>, <MODEL>; Usage: surgery heal"
        ),
        "{err}"
    );
    // An unknown flag keeps clap's tip and usage.
    let o = surgery(d.path(), &["inspect", "--bogus"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("unexpected argument '--bogus' found; tip:"),
        "{err}"
    );
    assert!(
        err.contains("; Usage: surgery inspect [OPTIONS] <MODEL>"),
        "{err}"
    );
    assert!(common::listing(d.path()).is_empty(), "nothing written");
}

#[test]
fn bare_surgery_prints_the_help_and_succeeds() {
    let d = tempfile::tempdir().unwrap();
    let o = surgery(d.path(), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let help = stdout(&surgery(d.path(), &["--help"]));
    assert_eq!(stdout(&o), help);
    assert!(
        help.contains("Usage: surgery [OPTIONS] <COMMAND>"),
        "{help}"
    );
    assert_eq!(stderr(&o), "");
}

/// The tiny fixture model.
fn fixture() -> String {
    common::root()
        .join("fixtures/tiny/model")
        .display()
        .to_string()
}

/// A (1,2,1) recurrent cut of a 4-layer synthetic llama at `d/rec` and training text at
/// `d/train.txt`, for the heal habits.
fn recurrent(d: &Path) {
    use surgery::synth::{write_byte_tokenizer, write_hf, SynthSpec};
    write_hf(&d.join("src"), &SynthSpec::llama(4), 3).unwrap();
    write_byte_tokenizer(&d.join("src")).unwrap();
    let o = surgery(d, &["apply", "src", "--shape", "1,2,1", "-o", "rec", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text: Vec<String> = (0..40)
        .map(|i| format!("{i}. The quick brown fox jumps over the lazy dog, again and again."))
        .collect();
    std::fs::write(d.join("train.txt"), text.join("\n\n")).unwrap();
}

#[test]
fn short_flags_do_what_their_long_names_do() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    let model = fixture();
    // generate: -p, -n, and the global -t.
    let run = |args: &[&str]| {
        let o = surgery(d, &[&["generate", &model, "--json"][..], args].concat());
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (v["text"].clone(), v["report"]["tokens"].clone())
    };
    let short = run(&["-p", "Once upon", "-n", "5", "-t", "1"]);
    let long = run(&[
        "--prompt",
        "Once upon",
        "--max-tokens",
        "5",
        "--threads",
        "1",
    ]);
    assert_eq!(short, long);
    assert_eq!(
        short.1.as_array().map(Vec::len),
        Some(5),
        "-n 5 is 5 tokens"
    );
    // plan: -c (the FLOPs' context) and -o; the same plan as the long names write.
    let plan = |args: &[&str]| {
        let o = surgery(
            d,
            &[&["plan", &model, "--shape", "2,2,2", "-q"][..], args].concat(),
        );
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    plan(&["-c", "512", "-o", "short.json"]);
    plan(&["--context", "512", "--out", "long.json"]);
    let short = std::fs::read(d.join("short.json")).unwrap();
    assert_eq!(short, std::fs::read(d.join("long.json")).unwrap());
    let v: serde_json::Value = serde_json::from_slice(&short).unwrap();
    assert_eq!(v["costs"]["context"], 512);
    // apply and export: -o.
    let o = surgery(d, &["apply", "short.json", "-o", "rec", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("rec/config.json").is_file());
    let o = surgery(d, &["export", "gguf", "rec", "-o", "rec.gguf", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("rec.gguf").is_file());
    let o = surgery(
        d,
        &["export", "safetensors", "rec.gguf", "-o", "back", "-q"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(d.join("back/config.json").is_file());
    // heal: -c is --seq-len, -o is --out (refused before anything is read or written).
    common::assert_refused(
        d,
        &["heal", "rec", "--data", "x.txt", "-o", "healed", "-c", "0"],
        "--seq-len, --batch and --micro-batch must be at least 1",
    );
    // demo: -o is --out (the demo itself takes minutes; its help names the flag).
    let help = stdout(&surgery(d, &["demo", "--help"]));
    assert!(help.contains("-o, --out <DIR>"), "{help}");
}

/// `heal rec` for a few steps of 16 tokens into `out`, with `extra` flags; returns the output.
fn heal(d: &Path, out: &str, extra: &[&str]) -> std::process::Output {
    let args = [
        &[
            "heal",
            "rec",
            "--data",
            "train.txt",
            "-o",
            out,
            "--steps",
            "3",
            "-c",
            "16",
            "--batch",
            "2",
        ][..],
        extra,
    ]
    .concat();
    let o = surgery(d, &args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

/// The r `generate --json` ran `model` at, and its stderr.
fn generated_r(d: &Path, model: &str, extra: &[&str]) -> (serde_json::Value, String) {
    let args = [
        &["generate", model, "-p", "The", "-n", "2", "--json"][..],
        extra,
    ]
    .concat();
    let o = surgery(d, &args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (v["r"].clone(), stderr(&o))
}

#[test]
fn generate_runs_at_the_recurrence_the_model_was_healed_at() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    recurrent(d);
    heal(d, "healed", &["--max-mean-recurrence", "3", "-q"]);
    heal(d, "static", &["--static", "-q"]);
    // apply's output has no heal record: its config's mean_recurrence (32, the reference's).
    let (r, err) = generated_r(d, "rec", &[]);
    assert_eq!(r, 32);
    assert!(!err.contains("healed at"), "{err}");
    let (r, err) = generated_r(d, "healed", &[]);
    assert_eq!(r, 3);
    assert!(
        err.contains("note: r = 3, the mean recurrence this model was healed at"),
        "{err}"
    );
    assert_eq!(
        generated_r(d, "static", &[]).0,
        1,
        "a --static run trains at r = 1"
    );
    // --recurrence still decides, without the note.
    let (r, err) = generated_r(d, "healed", &["--recurrence", "5"]);
    assert_eq!(r, 5);
    assert!(!err.contains("healed at"), "{err}");
    // A record that is not what heal writes is refused, naming the field.
    let config = d.join("healed/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let bad = text.replace("\"max_mean_recurrence\": 3", "\"max_mean_recurrence\": 0");
    assert_ne!(bad, text);
    std::fs::write(&config, bad).unwrap();
    common::assert_refused(
        d,
        &["generate", "healed", "-p", "The", "-n", "2"],
        "surgery.heal.config.max_mean_recurrence is not a recurrence",
    );
}

/// Runs the binary in `d` with SURGERY_PROGRESS_SECONDS set to `seconds` (None: unset).
fn with_progress(d: &Path, seconds: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_surgery"));
    cmd.args(args)
        .current_dir(d)
        .env_remove("SURGERY_PROGRESS_SECONDS");
    if let Some(s) = seconds {
        cmd.env("SURGERY_PROGRESS_SECONDS", s);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

#[test]
fn off_a_terminal_long_commands_print_progress_lines() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    recurrent(d);
    // stderr is a pipe here. With an interval of 0 every update is a line; heal's name the step.
    let o = with_progress(
        d,
        Some("0"),
        &[
            "heal",
            "rec",
            "--data",
            "train.txt",
            "-o",
            "healed",
            "--steps",
            "3",
            "-c",
            "16",
            "--batch",
            "2",
            "--eval-every",
            "2",
        ],
    );
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("healing:")).collect();
    assert_eq!(lines.len(), 5, "the start, three steps and the end: {err}");
    assert_eq!(lines[0], "healing: step 0/3 (0%)");
    for (i, line) in lines[1..4].iter().enumerate() {
        let step = format!("healing: step {}/3 ({}%), loss ", i + 1, (i + 1) * 100 / 3);
        assert!(line.starts_with(&step), "{line}");
    }
    assert!(lines[1].contains(", ETA "), "{}", lines[1]);
    assert!(lines[4].contains(", done in "), "{}", lines[4]);
    // The held-out losses reach the log too (a hidden bar used to swallow them).
    assert!(err.contains("step 2: held-out loss r=1: "), "{err}");
    // apply: bytes hashed and written, in decimal units.
    let o = with_progress(
        d,
        Some("0"),
        &["apply", "src", "--shape", "1,2,1", "-o", "rec2"],
    );
    let err = stderr(&o);
    assert!(err.contains("hashing source: "), "{err}");
    let done = err
        .lines()
        .rfind(|l| l.starts_with("writing: "))
        .unwrap_or_else(|| panic!("no writing line: {err}"));
    assert!(
        done.contains(" kB of 854.27 kB (100%), ") && done.contains(" MB/s, done in "),
        "{done}"
    );
    // With the default interval (10 s) a command that ends sooner prints no progress at all,
    // and --quiet none whatever the interval.
    let o = with_progress(d, None, &["apply", "src", "--shape", "1,2,1", "-o", "rec3"]);
    assert_eq!(stderr(&o), "");
    let o = with_progress(
        d,
        Some("0"),
        &["apply", "src", "--shape", "1,2,1", "-o", "r4", "-q"],
    );
    assert_eq!(stderr(&o), "");
}

#[test]
fn heal_estimates_its_wall_time_from_its_first_step() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    recurrent(d);
    let args = [
        "heal",
        "rec",
        "--data",
        "train.txt",
        "-o",
        "healed",
        "--steps",
        "3",
        "-c",
        "16",
        "--batch",
        "2",
    ];
    let o = with_progress(d, Some("0"), &args);
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("note: estimated wall time "))
        .unwrap_or_else(|| panic!("no estimate: {err}"));
    // Once the first step is measured, before the second starts.
    assert!(lines[at - 1].starts_with("healing: step 0/3"), "{err}");
    assert!(lines[at + 1].starts_with("healing: step 1/3"), "{err}");
    let note = lines[at];
    assert!(
        note.contains(" for 3 steps (measured: the first step's ")
            && note.ends_with(
                " s, scaled by each step's training FLOPs at the curriculum's mean recurrence; \
                 held-out evaluation and checkpoints not included)"
            ),
        "{note}"
    );
    let seconds = note.split("the first step's ").nth(1).unwrap();
    let seconds: f64 = seconds.split(' ').next().unwrap().parse().unwrap();
    assert!(seconds > 0.0, "{note}");
    // --quiet: no note.
    let o = heal(d, "quiet", &["-q"]);
    assert_eq!(stderr(&o), "");
}

#[test]
fn no_checkpoints_folder_is_left_without_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    recurrent(d);
    heal(d, "none", &["--checkpoint-every", "0", "-q"]);
    assert!(
        d.join("none/metrics.jsonl").is_file(),
        "the output keeps the metrics"
    );
    assert_eq!(common::metrics(&d.join("none")).len(), 3);
    assert!(!d.join("none.checkpoints").exists());
    // A run with checkpoints keeps them (for --resume), with their metrics.
    heal(d, "kept", &["--checkpoint-every", "2", "-q"]);
    assert_eq!(
        common::listing(&d.join("kept.checkpoints")),
        ["metrics.jsonl", "step-000002"]
    );
}

#[test]
fn plans_summary_names_the_dropped_ranges() {
    let d = tempfile::tempdir().unwrap();
    let model = fixture();
    let shape_line = |args: &[&str]| {
        let o = surgery(d.path(), &[&["plan", &model][..], args].concat());
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let out = stdout(&o);
        out.lines()
            .find(|l| l.starts_with("shape "))
            .unwrap_or_else(|| panic!("no shape line: {out}"))
            .to_string()
    };
    assert_eq!(
        shape_line(&["--shape", "2,2,2"]),
        "shape   (2,2,2): prelude 0..2, core 6..8, coda 8..10, dropped 2..6"
    );
    let ranges = ["--prelude", "0..3", "--core", "5..7", "--coda", "8..10"];
    assert_eq!(
        shape_line(&ranges),
        "shape   (3,2,2): prelude 0..3, core 5..7, coda 8..10, dropped 3..5, 7..8"
    );
    assert_eq!(
        shape_line(&["--shape", "4,2,4"]),
        "shape   (4,2,4): prelude 0..4, core 4..6, coda 6..10, nothing dropped"
    );
}

/// `n` bytes as the tool prints sizes: decimal units, three significant decimals.
fn decimal(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB"];
    let (mut v, mut i) = (n as f64, 0);
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", units[i])
    }
}

#[test]
fn sizes_are_decimal_megabytes_in_every_message() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    let model = fixture();
    // inspect: the files' total.
    let total: u64 = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let out = stdout(&surgery(d, &["inspect", &model]));
    let want = format!("format      safetensors, 3 file(s), {}\n", decimal(total));
    assert!(out.contains(&want), "want {want:?} in {out}");
    // apply: the summary, each file, and the progress lines off a terminal, in the same units.
    let o = with_progress(
        d,
        Some("0"),
        &["apply", &model, "--shape", "2,2,2", "-o", "rec"],
    );
    let (out, err) = (stdout(&o), stderr(&o));
    let weights = std::fs::metadata(d.join("rec/model.safetensors"))
        .unwrap()
        .len();
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("model.safetensors "))
        .unwrap_or_else(|| panic!("no weights line: {out}"));
    assert!(
        line.contains(&format!(" {}  sha256 ", decimal(weights))),
        "{line}"
    );
    let data = out.split(" of tensor data").next().unwrap();
    let data = data.rsplit(", ").next().unwrap();
    let written = format!("writing: {data} of {data} (100%), ");
    assert!(err.contains(&written), "want {written:?} in {err}");
    for text in [&out, &err] {
        assert!(!text.contains("MiB") && !text.contains("KiB"), "{text}");
    }
}

#[test]
fn requantizing_a_quantized_source_says_so() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    let export = |from: &str, to: &str, out: &str| {
        let o = surgery(d, &["export", "gguf", from, "--type", to, "-o", out]);
        assert!(o.status.success(), "{to}: {}", stderr(&o));
        stderr(&o)
    };
    assert_eq!(
        export(&fixture(), "q8_0", "q8.gguf"),
        "",
        "a float source: no note"
    );
    assert_eq!(
        export("q8.gguf", "q4_0", "q4.gguf"),
        "note: the source is already quantized: 72 tensors are requantized (72 Q8_0 to Q4_0), \
         each dequantized and rounded again, so their error adds to the source's; export from \
         an unquantized checkpoint where there is one\n"
    );
    // The same type is copied as stored, and a float type is not a requantization.
    assert_eq!(export("q8.gguf", "q8_0", "again.gguf"), "");
    assert_eq!(export("q8.gguf", "f16", "f16.gguf"), "");
    assert_eq!(
        std::fs::read(d.join("again.gguf")).unwrap(),
        std::fs::read(d.join("q8.gguf")).unwrap(),
        "copied as stored"
    );
}
