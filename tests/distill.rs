//! `surgery heal --distill TEACHER` through the binary: alpha 1 is the cross-entropy run bit for
//! bit, the student as its own teacher at alpha 0 has a zero loss and gradient, the metrics carry
//! both parts, and teachers that cannot teach this student are refused (issue 17).

mod common;

use std::path::Path;

use common::{assert_refused, metrics, noisy_recurrent_cut, stderr, surgery};
use serde_json::Value;

const TEXT: &str = "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep.";

/// The (2,2,2) cut at `d/rec` of the synthetic source `d/m`, and training text.
fn setup(d: &Path) {
    noisy_recurrent_cut(d, 3);
    let text: Vec<String> = (0..30).map(|i| format!("{i}. {TEXT}")).collect();
    std::fs::write(d.join("train.txt"), text.join("\n\n")).unwrap();
}

/// Args of a heal of `rec` into `out` of `steps`, `extra` appended.
fn args<'a>(out: &'a str, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "heal",
        "rec",
        "--data",
        "train.txt",
        "--out",
        out,
        "--steps",
        steps,
        "--seq-len",
        "24",
        "--batch",
        "2",
        "--max-mean-recurrence",
        "3",
        "--holdout",
        "0.1",
        "--eval-tokens",
        "96",
        "--checkpoint-every",
        "0",
    ];
    args.extend_from_slice(extra);
    args
}

fn heal(d: &Path, out: &str, steps: &str, extra: &[&str]) -> Vec<Value> {
    let mut a = args(out, steps, extra);
    a.push("-q");
    let o = surgery(d, &a);
    assert!(o.status.success(), "{a:?}: {}", stderr(&o));
    metrics(&d.join(out))
}

#[test]
fn alpha_one_gives_exactly_the_cross_entropy_runs_losses_and_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let ce = heal(d, "ce", "4", &[]);
    let mixed = heal(d, "mixed", "4", &["--distill", "m", "--distill-alpha", "1"]);
    assert_eq!(ce.len(), 4);
    for (a, b) in ce.iter().zip(&mixed) {
        for key in ["loss", "grad_norm", "eval"] {
            assert_eq!(a[key], b[key], "step {}: {key}", a["step"]);
        }
        assert!(a.get("kl").is_none(), "no KL without a teacher");
        // The parts: the CE is the loss (in f64, the loss in f32), the KL is measured anyway.
        let (loss, part) = (b["loss"].as_f64().unwrap(), b["ce"].as_f64().unwrap());
        assert_eq!(part as f32, loss as f32);
        assert!(b["kl"].as_f64().unwrap() > 0.0, "{b}");
    }
    // The written weights are the same bytes.
    let weights = |run: &str| std::fs::read(d.join(run).join("model.safetensors")).unwrap();
    assert!(weights("ce") == weights("mixed"));
    let config: Value =
        serde_json::from_slice(&std::fs::read(d.join("mixed/config.json")).unwrap()).unwrap();
    let recorded = &config["surgery"]["heal"]["config"]["distill"];
    assert_eq!(recorded["teacher"], "m");
    assert_eq!(recorded["alpha"], 1.0);
    assert_eq!(recorded["temperature"], 2.0);
}

#[test]
fn the_student_as_its_own_teacher_at_alpha_zero_has_zero_loss_and_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    std::fs::create_dir(d.join("copy")).unwrap();
    for entry in std::fs::read_dir(d.join("rec")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), d.join("copy").join(entry.file_name())).unwrap();
    }
    let m = heal(
        d,
        "self",
        "1",
        &["--distill", "copy", "--distill-alpha", "0"],
    );
    assert_eq!(m[0]["loss"], 0.0, "{}", m[0]);
    assert_eq!(m[0]["kl"], 0.0, "{}", m[0]);
    assert_eq!(m[0]["grad_norm"], 0.0, "{}", m[0]);
    assert!(m[0]["ce"].as_f64().unwrap() > 1.0, "{}", m[0]);
}

#[test]
fn teachers_that_cannot_teach_are_refused_and_a_foreign_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let tiny = common::root().join("fixtures/tiny/model");
    let tiny = tiny.to_str().unwrap();
    let refusals: [(&str, &[&str], &str); 5] = [
        (
            "out",
            &["--distill", tiny],
            "the teacher's tokenizer is not the student's (4096 tokens against 256",
        ),
        (
            "out",
            &["--distill", "m", "--distill-alpha", "1.5"],
            "--distill-alpha 1.5 must be a fraction between 0 and 1",
        ),
        (
            "out",
            &["--distill", "m", "--distill-temperature", "0"],
            "--distill-temperature 0 must be a positive number",
        ),
        ("out", &["--distill", "absent"], "absent"),
        (
            "m/healed",
            &["--distill", "m"],
            "choose an --out apart from the inputs",
        ),
    ];
    for (out, extra, want) in refusals {
        assert_refused(d, &args(out, "4", extra), want);
    }

    // The source itself: no note. Another model with the same tokenizer: taught, and named.
    let o = surgery(d, &args("from-source", "1", &["--distill", "m"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("is not the source"), "{}", stderr(&o));
    let other = d.join("other");
    surgery::synth::write_hf(&other, &surgery::synth::SynthSpec::llama(3), 9).unwrap();
    surgery::synth::write_byte_tokenizer(&other).unwrap();
    let o = surgery(d, &args("from-other", "1", &["--distill", "other"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("note: the teacher other is not the source this checkpoint was cut from"),
        "{}",
        stderr(&o)
    );
}
