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
