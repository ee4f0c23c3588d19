//! `surgery eval` through the built binary: rows per r, JSON, the static case, the plot, and its
//! refusals.

mod common;

use std::path::Path;

use common::{assert_refused, stderr, stdout, surgery};
use serde_json::Value;
use surgery::synth::{self, SynthSpec};

/// A synthetic source with a byte-level tokenizer, a (2,2,2) identity cut and a noisy cut of it,
/// and some text.
fn setup(d: &Path) {
    synth::write_hf(&d.join("m"), &SynthSpec::llama(6), 4).unwrap();
    synth::write_byte_tokenizer(&d.join("m")).unwrap();
    for (out, extra) in [("id", vec![]), ("noisy", vec!["--adapter-noise", "0.3"])] {
        let mut args = vec!["apply", "m", "--shape", "2,2,2", "--out", out, "-q"];
        args.extend(extra);
        let o = surgery(d, &args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    std::fs::write(
        d.join("held.txt"),
        "In the beginning was the word.\n\nAnd the word was with the text, and the text was long enough to score.\n\nA third paragraph, for good measure.\n",
    )
    .unwrap();
}

fn eval_json(d: &Path, args: &[&str]) -> Value {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    all.push("--json");
    let o = surgery(d, &all);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

#[test]
fn reports_one_row_per_recurrence_and_identity_cuts_do_not_depend_on_r() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let v = eval_json(
        d,
        &[
            "id",
            "--data",
            "held.txt",
            "--recurrence",
            "1,2,4",
            "--seq-len",
            "32",
            "--batch",
            "3",
        ],
    );
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r["r"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 4]
    );
    // Three documents of 30, 70 and 36 bytes, one token a byte, each followed by EOS: 139 tokens,
    // of which all but the first are scored.
    assert!(rows.iter().all(|r| r["tokens"] == 138), "{rows:?}");
    // With the identity adapter every r computes the pruned model: the same loss.
    let loss = |i: usize| rows[i]["loss"].as_f64().unwrap();
    assert!((loss(0) - loss(2)).abs() < 1e-5, "{rows:?}");
    // A random model over 256 tokens: loss near ln(256) = 5.55.
    assert!((4.5..7.0).contains(&loss(0)), "{rows:?}");
    assert!((rows[0]["perplexity"].as_f64().unwrap() - loss(0).exp()).abs() < 1e-6);

    // (2,2,2) of 6 layers drops nothing: the static source over the same layers gives the same loss.
    let s = eval_json(
        d,
        &[
            "m",
            "--data",
            "held.txt",
            "--seq-len",
            "32",
            "--layers",
            "0..2,2..6",
        ],
    );
    assert!(s["rows"][0]["r"].is_null());
    assert!(
        (s["rows"][0]["loss"].as_f64().unwrap() - loss(0)).abs() < 1e-4,
        "{s}"
    );

    // A noisy adapter makes r matter; the same seed gives the same numbers.
    let a = eval_json(
        d,
        &[
            "noisy",
            "--data",
            "held.txt",
            "--recurrence",
            "1,4",
            "--seq-len",
            "32",
            "--max-tokens",
            "100",
        ],
    );
    let b = eval_json(
        d,
        &[
            "noisy",
            "--data",
            "held.txt",
            "--recurrence",
            "1,4",
            "--seq-len",
            "32",
            "--max-tokens",
            "100",
        ],
    );
    assert_eq!(a["rows"][0]["loss"], b["rows"][0]["loss"]);
    assert_eq!(a["rows"][0]["tokens"], 100);
    assert_ne!(a["rows"][0]["loss"], a["rows"][1]["loss"]);
}

#[test]
fn table_plot_and_static_note() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let o = surgery(
        d,
        &[
            "eval",
            "id",
            "--data",
            "held.txt",
            "--recurrence",
            "1,2",
            "--seq-len",
            "16",
            "--plot",
            "ppl.png",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("perplexity") && text.contains("plot written to ppl.png"),
        "{text}"
    );
    let png = std::fs::read(d.join("ppl.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(!d.join("ppl.png.partial").exists());
    let o = surgery(
        d,
        &[
            "eval",
            "m",
            "--data",
            "held.txt",
            "--recurrence",
            "1,32",
            "--seq-len",
            "16",
        ],
    );
    assert!(stderr(&o).contains("a static model has no recurrence; --recurrence is ignored"));
    assert_eq!(
        stdout(&o)
            .lines()
            .filter(|l| l.trim_start().starts_with('-'))
            .count(),
        1,
        "{}",
        stdout(&o)
    );
}

#[test]
fn refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    std::fs::write(d.join("empty.txt"), "\n\n").unwrap();
    std::fs::write(d.join("held.csv"), "a,b").unwrap();
    synth::write_hf(&d.join("notok"), &SynthSpec::llama(2), 1).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["eval", "id", "--data", "held.txt", "--recurrence", "0,1"],
            "--recurrence 0 is not a recurrence",
        ),
        (&["eval", "id", "--data", "nothing.txt"], "nothing.txt"),
        (&["eval", "id", "--data", "empty.txt"], "no documents in"),
        (&["eval", "id", "--data", "held.csv"], "held.csv"),
        (
            &["eval", "id", "--data", "held.txt", "--layers", "0..2"],
            "--layers selects layers of a static model",
        ),
        (
            &["eval", "m", "--data", "held.txt", "--layers", "0..9"],
            "layer 6 is out of range",
        ),
        (&["eval", "notok", "--data", "held.txt"], "no tokenizer"),
        (
            &["eval", "id", "--data", "held.txt", "--seq-len", "0"],
            "--seq-len and --batch must be at least 1",
        ),
    ];
    for (args, want) in cases {
        assert_refused(d, args, want);
    }
}
