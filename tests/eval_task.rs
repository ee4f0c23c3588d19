//! `surgery eval --task` (multiple-choice accuracy by log-likelihood, as lm-evaluation-harness
//! scores it), `--stride` (strided perplexity) and `--baseline` (the source and pruned rows),
//! through the built binary, against direct computations from the library's logits on the tiny
//! pretrained fixture (fixtures/tiny).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, IndexOp, Tensor};
use common::{assert_refused, root, stderr, stdout, surgery};
use serde_json::Value;
use surgery::eval::task::{log_likelihoods, read_task, requests};
use surgery::model::{log_softmax, InitialState, Model};
use surgery::source::SourceModel;
use surgery::tokenizer::text::TextTokenizer;

fn tiny() -> PathBuf {
    root().join("fixtures/tiny/model")
}

fn tiny_arg() -> String {
    tiny().display().to_string()
}

fn eval_json(d: &Path, args: &[&str]) -> Value {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    all.extend(["--json", "-q"]);
    let o = surgery(d, &all);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).unwrap()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Log-probabilities [T, V] of the model's next-token predictions after each of `ids`.
fn log_probs(model: &Model, ids: &[u32]) -> Tensor {
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let logits = model
        .forward(&input, None, 1, InitialState::Seeded(0), None)
        .unwrap();
    log_softmax(&logits).unwrap().i(0).unwrap()
}

fn at(lp: &Tensor, j: usize, token: u32) -> f64 {
    lp.i((j, token as usize))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

/// The summed log-probability of `continuation`'s tokens after `context`, computed here from the
/// model's logits over the whole sequence, one sequence a pass (no batching, padding or sorting):
/// the context's tokens, then those of context + continuation past the context's length.
fn direct_ll(model: &Model, tok: &TextTokenizer, context: &str, continuation: &str) -> f64 {
    let ctx = tok.encode(context).unwrap();
    let whole = tok.encode(&format!("{context}{continuation}")).unwrap();
    let ids: Vec<u32> = ctx.iter().chain(&whole[ctx.len()..]).copied().collect();
    let lp = log_probs(model, &ids[..ids.len() - 1]);
    (ctx.len() - 1..ids.len() - 1)
        .map(|j| at(&lp, j, ids[j + 1]))
        .sum()
}

/// Hand-checked on the fixture (a 10-layer Llama trained on the King James Bible): in the first
/// five, the Bible's continuation beats a modern word by 11 to 41 nats, in total and per
/// character; the sixth's gold names the modern word (by 18 nats the less likely). So acc,
/// acc_norm and acc_bytes are all 5/6.
const TASK: &str = r#"{"context": "In the beginning God created the", "choices": ["heaven and the earth.", "car and the bus."], "gold": 0}
{"context": "And God said, Let there be light: and there was", "choices": ["light.", "computers."], "gold": 0}
{"context": "And the LORD spake unto Moses, saying,", "choices": ["Speak unto the children of Israel,", "Buy a new phone today,"], "gold": 0}

{"context": "And it came to", "choices": ["pass", "Paris"], "gold": 0}
{"context": "And the sons of", "choices": ["Israel", "Microsoft"], "gold": 0}
{"context": "Thus saith the", "choices": ["LORD", "computer"], "gold": 1}
"#;

/// Gold is the long verse: its total log-likelihood is far below the short word's (-110 against
/// -8, -97 against -8), its per-character one far above (-1.0 against -2.8): acc 0, acc_norm 1.
const LONG_GOLD: &str = r#"{"context": "In the beginning God created the", "choices": ["car", "heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep."], "gold": 1}
{"context": "And God said, Let there be light: and there was", "choices": ["war", "light. And God saw the light, that it was good: and God divided the light from the darkness."], "gold": 1}
"#;

/// Each example's choices' direct log-likelihoods (with lm-eval's " " delimiter).
fn direct_lls(task: &str) -> Vec<Vec<f64>> {
    let source = SourceModel::open(&tiny()).unwrap();
    let tok = TextTokenizer::for_model(&source).unwrap();
    // The fixture's tokenizer adds no special tokens, so encode is lm-eval's encoding too.
    assert_eq!(tok.encode("And").unwrap().len(), 1);
    let model = Model::load(&source, &Device::Cpu).unwrap();
    task.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let ex: Value = serde_json::from_str(line).unwrap();
            let context = ex["context"].as_str().unwrap();
            (ex["choices"].as_array().unwrap().iter())
                .map(|c| direct_ll(&model, &tok, context, &format!(" {}", c.as_str().unwrap())))
                .collect()
        })
        .collect()
}

/// The share of examples whose gold choice has the largest `ll / len(choice)`.
fn accuracy(task: &str, lls: &[Vec<f64>], len: impl Fn(&str) -> f64) -> f64 {
    let lines: Vec<&str> = task.lines().filter(|l| !l.trim().is_empty()).collect();
    let right = lines.iter().zip(lls).filter(|(line, lls)| {
        let ex: Value = serde_json::from_str(line).unwrap();
        let scores: Vec<f64> = (ex["choices"].as_array().unwrap().iter())
            .zip(lls.iter())
            .map(|(c, ll)| ll / len(c.as_str().unwrap()))
            .collect();
        let best = (0..scores.len())
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)))
            .unwrap();
        ex["gold"] == best
    });
    right.count() as f64 / lines.len() as f64
}

#[test]
fn task_accuracy_equals_a_direct_computation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("t.jsonl"), TASK).unwrap();
    let lls = direct_lls(TASK);
    let acc = accuracy(TASK, &lls, |_| 1.0);
    let acc_norm = accuracy(TASK, &lls, |c| c.chars().count() as f64);
    assert_eq!((acc, acc_norm), (5.0 / 6.0, 5.0 / 6.0), "{lls:?}");

    let v = eval_json(d, &[&tiny_arg(), "--task", "t.jsonl", "--batch", "3"]);
    let row = &v["rows"][0];
    assert_eq!(
        (v["examples"].clone(), v["choices"].clone()),
        (6.into(), 12.into())
    );
    assert_eq!(row["r"], Value::Null, "a static model has no r");
    assert_eq!(num(&row["acc"]), acc);
    assert_eq!(num(&row["acc_norm"]), acc_norm);
    assert_eq!(
        num(&row["acc_bytes"]),
        acc_norm,
        "ASCII: bytes are characters"
    );
    // lm-eval's stderr of a mean of 0/1 values: sqrt(p (1 - p) / (n - 1)).
    let p = 5.0 / 6.0;
    assert!((num(&row["acc_stderr"]) - (p * (1.0 - p) / 5.0f64).sqrt()).abs() < 1e-12);

    // The library's per-choice values (batched, sorted, padded) equal the direct ones.
    let source = SourceModel::open(&tiny()).unwrap();
    let tok = TextTokenizer::for_model(&source).unwrap();
    let model = Model::load(&source, &Device::Cpu).unwrap();
    let req = requests(read_task(&d.join("t.jsonl"), None).unwrap(), &tok, 1024).unwrap();
    let ours = log_likelihoods(&model, &req.windows, 3, 1, 0, &mut |_| {}).unwrap();
    let direct: Vec<f64> = lls.concat();
    for (a, b) in ours.iter().zip(&direct) {
        assert!((a - b).abs() < 1e-3, "{ours:?}\n{direct:?}");
    }
    assert_eq!(ours.len(), 12);
}

#[test]
fn acc_and_acc_norm_differ_when_the_gold_choice_is_long() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("long.jsonl"), LONG_GOLD).unwrap();
    let lls = direct_lls(LONG_GOLD);
    assert_eq!(accuracy(LONG_GOLD, &lls, |_| 1.0), 0.0, "{lls:?}");
    assert_eq!(
        accuracy(LONG_GOLD, &lls, |c| c.len() as f64),
        1.0,
        "{lls:?}"
    );
    let v = eval_json(d, &[&tiny_arg(), "--task", "long.jsonl"]);
    let row = &v["rows"][0];
    assert_eq!(
        (
            num(&row["acc"]),
            num(&row["acc_norm"]),
            num(&row["acc_bytes"])
        ),
        (0.0, 1.0, 1.0)
    );
    // --limit 1 scores the first example only.
    let v = eval_json(d, &[&tiny_arg(), "--task", "long.jsonl", "--limit", "1"]);
    assert_eq!(v["examples"], 1);
}

#[test]
fn continuations_are_spelled_and_tokenized_as_lm_eval_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = SourceModel::open(&tiny()).unwrap();
    let tok = TextTokenizer::for_model(&source).unwrap();
    let windows = |line: &str| {
        std::fs::write(d.join("one.jsonl"), line).unwrap();
        requests(read_task(&d.join("one.jsonl"), None).unwrap(), &tok, 1024)
            .unwrap()
            .windows
    };
    let plain =
        windows(r#"{"context": "And it came to", "choices": ["pass", "Paris"], "gold": 0}"#);
    // lm-eval's request spelling, the delimiter already in the choice: the same continuation.
    let spelled =
        windows(r#"{"context": "And it came to", "choices": [" pass", " Paris"], "gold": 0}"#);
    // A space at the context's end moves to the continuation (lm-eval's _encode_pair).
    let trailing = windows(
        r#"{"context": "And it came to ", "choices": ["pass", "Paris"], "gold": 0, "target_delimiter": ""}"#,
    );
    assert_eq!(plain, spelled);
    assert_eq!(plain, trailing);
    // Inputs: the context's tokens, then the continuation's but its last; targets: the
    // continuation's tokens.
    let ctx = tok.encode("And it came to").unwrap();
    let whole = tok.encode("And it came to pass").unwrap();
    assert_eq!(plain[0].targets, whole[ctx.len()..]);
    assert_eq!(plain[0].inputs, whole[..whole.len() - 1]);
    // --seq-len cuts the first inputs, never the continuation (" Paris" is 3 tokens here).
    let task = || read_task(&d.join("one.jsonl"), None).unwrap();
    let short = requests(task(), &tok, 3).unwrap().windows;
    assert_eq!(short[0].inputs, whole[whole.len() - 4..whole.len() - 1]);
    assert_eq!(short[1].targets.len(), 3);
    let too_short = requests(task(), &tok, 2).unwrap_err().to_string();
    assert!(
        too_short.ends_with("one.jsonl:1: choice 1 is 3 tokens long, more than --seq-len 2"),
        "{too_short}"
    );
    // An empty context is the BOS token (the fixture's is id 0).
    let empty = windows(r#"{"context": "", "choices": ["pass"], "gold": 0}"#);
    assert_eq!(empty[0].inputs[0], 0);
    assert_eq!(empty[0].targets, tok.encode(" pass").unwrap());
}

#[test]
fn bad_task_files_are_refused_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = r#"{"context": "And it came to", "choices": ["pass", "Paris"], "gold": 0}"#;
    let cases = [
        (r#"{"choices": ["a"], "gold": 0}"#, "no field `context`"),
        (r#"{"context": "a", "gold": 0}"#, "no field `choices`"),
        (r#"{"context": "a", "choices": ["b"]}"#, "no field `gold`"),
        (
            r#"{"context": "a", "choices": [], "gold": 0}"#,
            "`choices` is empty",
        ),
        (
            r#"{"context": "a", "choices": ["b", "c"], "gold": 2}"#,
            "`gold` is 2, but there are 2 choices",
        ),
        (
            r#"{"context": "a", "choices": ["b"], "gold": -1}"#,
            "`gold` is -1, not the index",
        ),
        (
            r#"{"context": "a", "choices": ["b"], "gold": "b"}"#,
            "`gold` is \"b\", not the index",
        ),
        (
            r#"{"context": "a", "choices": ["b", 3], "gold": 0}"#,
            "choice 1 is a number, not a string",
        ),
        (
            r#"{"context": "a", "choices": ["b", " "], "gold": 0}"#,
            "choice 1 is empty",
        ),
        (
            r#"{"context": 1, "choices": ["b"], "gold": 0}"#,
            "`context` is a number, not a string",
        ),
        (
            r#"{"context": "a", "choices": "b", "gold": 0}"#,
            "`choices` is a string, not an array",
        ),
        (r#"["a"]"#, "expected a JSON object, found an array"),
        (r#"{"context": "a", "#, "not valid JSON"),
    ];
    for (bad, want) in cases {
        std::fs::write(d.join("bad.jsonl"), format!("{good}\n\n{bad}\n")).unwrap();
        let args = [&tiny_arg(), "eval", "--task", "bad.jsonl"];
        let args = [args[1], args[0], args[2], args[3]];
        assert_refused(d, &args, &format!("bad.jsonl:3: {want}"));
    }
    std::fs::write(d.join("empty.jsonl"), "\n \n").unwrap();
    assert_refused(
        d,
        &["eval", &tiny_arg(), "--task", "empty.jsonl"],
        "no examples",
    );
    std::fs::write(d.join("ok.jsonl"), good).unwrap();
    assert_refused(
        d,
        &["eval", &tiny_arg(), "--task", "ok.jsonl", "--limit", "0"],
        "--limit 0",
    );
    assert_refused(
        d,
        &["eval", &tiny_arg(), "--task", "nowhere.jsonl"],
        "nowhere.jsonl",
    );
}

#[test]
fn a_recurrent_cut_reports_each_r_and_the_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = surgery(
        d,
        &[
            "apply",
            &tiny_arg(),
            "--shape",
            "2,4,2",
            "--out",
            "rec",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(d.join("t.jsonl"), TASK).unwrap();
    let v = eval_json(
        d,
        &[
            "rec",
            "--task",
            "t.jsonl",
            "--recurrence",
            "1,2",
            "--baseline",
            &tiny_arg(),
        ],
    );
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(
        (rows[0]["r"].clone(), rows[1]["r"].clone()),
        (1.into(), 2.into())
    );
    let baselines = v["baselines"].as_array().unwrap();
    let names: Vec<&str> = baselines
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["source", "pruned"]);
    // The source baseline is the source's own evaluation.
    let source = eval_json(d, &[&tiny_arg(), "--task", "t.jsonl"]);
    assert_eq!(baselines[0]["acc"], source["rows"][0]["acc"]);
    assert_eq!(baselines[0]["layers"], Value::Null);
    assert_eq!(
        baselines[1]["layers"],
        serde_json::json!([0, 1, 4, 5, 6, 7, 8, 9])
    );
}

/// The fixture's held-out text, tokenized as eval reads a .txt: each document, then EOS.
fn heldout_args() -> Vec<String> {
    let text = root().join("fixtures/tiny/text/heldout.txt");
    vec![tiny_arg(), "--data".into(), text.display().to_string()]
}

fn loss(v: &Value) -> f64 {
    num(&v["rows"][0]["loss"])
}

#[test]
fn stride_equal_to_seq_len_is_the_plain_windows_and_more_context_lowers_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = heldout_args();
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
        args.extend(["-c", "64", "-n", "2000"]);
        args.extend_from_slice(extra);
        eval_json(d, &args)
    };
    let plain = run(&[]);
    let same = run(&["--stride", "64"]);
    assert_eq!(loss(&plain), loss(&same));
    assert_eq!(same["stride"], 64);
    let strided = run(&["--stride", "16"]);
    // The same 2000 tokens scored, each with at least 48 tokens of context after the first window.
    assert_eq!(strided["rows"][0]["tokens"], 2000);
    assert!(
        loss(&strided) < loss(&plain) - 0.01,
        "{} against {}",
        loss(&strided),
        loss(&plain)
    );
    for (bad, want) in [
        ("0", "--stride 0 must be from 1"),
        ("65", "--stride 65 must be from 1"),
    ] {
        let mut args = vec!["eval"];
        args.extend(base.iter().map(String::as_str));
        args.extend(["-c", "64", "--stride", bad]);
        assert_refused(d, &args, want);
    }
}

#[test]
fn strided_loss_equals_a_direct_computation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = "In the beginning God created the heaven and the earth. And the earth was without form, and void.";
    std::fs::write(d.join("one.txt"), text).unwrap();
    let v = eval_json(
        d,
        &[
            &tiny_arg(),
            "--data",
            "one.txt",
            "-c",
            "8",
            "--stride",
            "3",
            "--batch",
            "2",
        ],
    );
    let source = SourceModel::open(&tiny()).unwrap();
    let tok = TextTokenizer::for_model(&source).unwrap();
    let model = Model::load(&source, &Device::Cpu).unwrap();
    let mut stream = tok.encode(text).unwrap();
    stream.push(tok.eos.unwrap());
    // Token i is scored by the first window of 8 (starting at 0, 3, 6, ...) that reaches it:
    // predicted from stream[start..i].
    let nll: Vec<f64> = (1..stream.len())
        .map(|i| {
            let start = (0..).step_by(3).find(|s| s + 8 >= i).unwrap();
            let lp = log_probs(&model, &stream[start..i]);
            -at(&lp, i - start - 1, stream[i])
        })
        .collect();
    let direct = nll.iter().sum::<f64>() / nll.len() as f64;
    assert_eq!(v["rows"][0]["tokens"], nll.len());
    assert!(
        (loss(&v) - direct).abs() < 1e-4,
        "{} against {direct}",
        loss(&v)
    );
}

#[test]
fn baselines_are_the_source_and_the_pruned_source_and_must_be_the_recorded_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = surgery(
        d,
        &[
            "apply",
            &tiny_arg(),
            "--shape",
            "2,4,2",
            "--out",
            "rec",
            "-q",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let tiny_path = tiny_arg();
    // The source's own evaluation, and the checkpoint's at r = 1 and 4 with `extra`.
    let mut own = heldout_args();
    own.extend(["-c", "64", "-n", "500"].map(String::from));
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    let with = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = own.iter().map(|s| s.to_string()).collect();
        a[0] = "rec".into();
        a.extend(
            ["--recurrence", "1,4"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string()),
        );
        a
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        eval_json(d, &a)
    };
    let mut asked = with(&["--plot", "p.png", "--baseline"]);
    asked.push(tiny_path.clone());
    let v = run(asked);
    assert!(d.join("p.png").is_file());
    let b = v["baselines"].as_array().unwrap();
    assert_eq!(
        (b[0]["name"].as_str(), b[1]["name"].as_str()),
        (Some("source"), Some("pruned"))
    );
    // The source row is the source's own evaluation; the pruned row that of its kept layers.
    assert_eq!(b[0]["loss"], eval_json(d, &own)["rows"][0]["loss"]);
    let mut pruned = own.clone();
    pruned.extend(["--layers", "0..2,4..10"]);
    assert_eq!(b[1]["loss"], eval_json(d, &pruned)["rows"][0]["loss"]);
    // The cut keeps every layer but 2..4 with an identity adapter: each r computes the pruned
    // model.
    assert!(
        (num(&v["rows"][1]["loss"]) - num(&b[1]["loss"])).abs() < 1e-4,
        "{v}"
    );

    // The table names the baselines in the r column.
    let mut table = vec!["eval".to_string()];
    table.extend(with(&["--baseline"]));
    table.push(tiny_path.clone());
    let table: Vec<&str> = table.iter().map(String::as_str).collect();
    let o = surgery(d, &table);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("source ")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("pruned ")),
        "{out}"
    );

    // An identical copy of the source is the source; with one byte changed it is not.
    let copy = d.join("copy");
    std::fs::create_dir(&copy).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny().join(f), copy.join(f)).unwrap();
    }
    let identical = run(with(&["--baseline", "copy"]));
    let losses = |v: &Value| -> Vec<Value> {
        (v["baselines"].as_array().unwrap().iter())
            .map(|b| b["loss"].clone())
            .collect()
    };
    assert_eq!(losses(&identical), losses(&v));
    let mut bytes = std::fs::read(copy.join("model.safetensors")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(copy.join("model.safetensors"), bytes).unwrap();
    let mut refused = vec!["eval".to_string()];
    refused.extend(with(&["--baseline", "copy"]));
    let refused: Vec<&str> = refused.iter().map(String::as_str).collect();
    assert_refused(
        d,
        &refused,
        "--baseline copy is not the source the checkpoint was cut from: model.safetensors's sha256",
    );
    // A static model records no source.
    let mut static_model = vec!["eval"];
    static_model.extend(own.iter().copied());
    static_model.extend(["--baseline", "copy"]);
    assert_refused(d, &static_model, "not a recurrent checkpoint");
}
