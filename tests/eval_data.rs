//! Evaluation data end to end: documents from .txt and .jsonl files (and every refusal), the
//! token stream on SmolLM2's real tokenizer, window arithmetic, and the perplexity plot.

mod common;

use std::path::{Path, PathBuf};

use surgery::eval::data::{
    read_documents, read_tokens, read_training_tokens, token_stream, windows, DataError, Documents,
    LossOn,
};
use surgery::eval::plot::{plot_perplexity, PlotError};
use surgery::source::SourceModel;
use surgery::tokenizer::text::TextTokenizer;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn read_err(dir: &Path, name: &str, bytes: &[u8], field: Option<&str>) -> (PathBuf, DataError) {
    let path = write(dir, name, bytes);
    let err = read_documents(std::slice::from_ref(&path), field).unwrap_err();
    (path, err)
}

#[test]
fn txt_documents_are_split_on_runs_of_blank_lines_and_trimmed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a.txt",
        b"\n\n  First line.\nSecond line.  \n\n\n \t \nSecond document.\r\n\r\nThird.",
    );
    let docs = read_documents(&[path], None).unwrap();
    assert_eq!(
        docs.texts,
        ["First line.\nSecond line.", "Second document.", "Third."]
    );
    assert_eq!((docs.files, docs.skipped_invalid_utf8), (1, 0));
}

#[test]
fn txt_paragraph_with_invalid_utf8_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a.txt",
        b"good\n\nbad \xC3\x28 bytes\n\nalso good",
    );
    let docs = read_documents(&[path], None).unwrap();
    assert_eq!(docs.texts, ["good", "also good"]);
    assert_eq!(docs.skipped_invalid_utf8, 1);
}

#[test]
fn leading_byte_order_mark_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.txt", b"\xEF\xBB\xBFhello");
    assert_eq!(read_documents(&[path], None).unwrap().texts, ["hello"]);
}

#[test]
fn jsonl_reads_the_chosen_field_and_skips_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a.jsonl",
        b"{\"id\": 1, \"document\": \"  one\\ntwo \"}\n\n  \r\n{\"document\": \"three\"}\r\n{\"document\": \" \"}\n",
    );
    let docs = read_documents(&[path], Some("document")).unwrap();
    // JSONL text is kept as written; only an all-whitespace one is dropped.
    assert_eq!(docs.texts, ["  one\ntwo ", "three"]);
}

#[test]
fn jsonl_default_field_is_text_and_files_are_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(
        dir.path(),
        "a.jsonl",
        b"{\"text\": \"a1\"}\n{\"text\": \"a2\"}",
    );
    let b = write(dir.path(), "b.txt", b"b1\n\nb2\n");
    let docs = read_documents(&[a, b], None).unwrap();
    assert_eq!(docs.texts, ["a1", "a2", "b1", "b2"]);
    assert_eq!(docs.files, 2);
}

#[test]
fn jsonl_line_with_invalid_utf8_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a.jsonl",
        b"{\"text\": \"ok\"}\n{\"text\": \"\xFF\"}\n",
    );
    let docs = read_documents(&[path], None).unwrap();
    assert_eq!((docs.texts.len(), docs.skipped_invalid_utf8), (1, 1));
}

#[test]
fn bad_json_line_is_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, err) = read_err(
        dir.path(),
        "a.jsonl",
        b"{\"text\": \"a\"}\n\n{\"text\": oops}\n",
        None,
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}:3: not valid JSON (expected value at column 10)",
            path.display()
        )
    );
}

#[test]
fn json_that_is_not_an_object_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, err) = read_err(dir.path(), "a.jsonl", b"[\"text\"]\n", None);
    assert_eq!(
        err.to_string(),
        format!(
            "{}:1: expected a JSON object, found an array",
            path.display()
        )
    );
}

#[test]
fn missing_field_is_named_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let (path, err) = read_err(
        dir.path(),
        "a.jsonl",
        b"{\"document\": \"a\"}\n{\"text\": \"b\"}\n",
        Some("document"),
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2: no field `document` (choose the text field with --field)",
            path.display()
        )
    );
}

#[test]
fn field_that_is_not_a_string_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, err) = read_err(dir.path(), "a.jsonl", b"{\"text\": 5}\n", None);
    assert_eq!(
        err.to_string(),
        format!(
            "{}:1: field `text` is a number, not a string",
            path.display()
        )
    );
}

#[test]
fn binary_garbage_is_not_text() {
    let dir = tempfile::tempdir().unwrap();
    // Deterministic noise: every byte value, scrambled; it holds NUL bytes.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for name in ["g.txt", "g.jsonl"] {
        let (path, err) = read_err(dir.path(), name, &garbage, None);
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!(
                "{}: not a text file (NUL byte at offset",
                path.display()
            )),
            "{msg}"
        );
    }
}

#[test]
fn file_with_no_valid_utf8_is_not_text() {
    let dir = tempfile::tempdir().unwrap();
    let (path, err) = read_err(dir.path(), "g.txt", b"\xFF\xFE\x80\n\n\xC0\xC1", None);
    assert_eq!(
        err.to_string(),
        format!(
            "{}: not a text file (none of its 2 documents is valid UTF-8)",
            path.display()
        )
    );
}

#[test]
fn empty_files_have_no_documents() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("e.txt", &b""[..]),
        ("w.txt", b" \n\t\n\r\n"),
        ("e.jsonl", b""),
        ("w.jsonl", b"\n\n{\"text\": \"  \"}\n"),
    ] {
        let (path, err) = read_err(dir.path(), name, bytes, None);
        assert_eq!(
            err.to_string(),
            format!("no documents in {}", path.display())
        );
    }
}

#[test]
fn one_empty_file_among_good_ones_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "a.txt", b"text");
    let empty = write(dir.path(), "b.txt", b"");
    let err = read_documents(&[good, empty.clone()], None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("no documents in {}", empty.display())
    );
}

#[test]
fn unknown_extension_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.csv", "a", "a.gz", "a.parquet.gz", "a.jsonl.zip"] {
        let (path, err) = read_err(dir.path(), name, b"text", None);
        assert_eq!(
            err.to_string(),
            format!(
                "{}: unknown data format (expected .txt, .jsonl, .json or .parquet; the first three may be .gz)",
                path.display()
            )
        );
    }
}

#[test]
fn missing_file_and_no_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.txt");
    let err = read_documents(std::slice::from_ref(&path), None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}: ", path.display())),
        "{err}"
    );
    assert_eq!(
        read_documents(&[], None).unwrap_err().to_string(),
        "no data files given"
    );
}

#[test]
fn windows_shift_targets_by_one_and_keep_the_last_partial_window() {
    let stream: Vec<u32> = (100..111).collect(); // 11 tokens: 10 targets
    let w = windows(&stream, 4, None);
    assert_eq!(w.seq_len, 4);
    let got: Vec<(Vec<u32>, Vec<u32>)> = w
        .windows
        .iter()
        .map(|w| (w.inputs.clone(), w.targets.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (vec![100, 101, 102, 103], vec![101, 102, 103, 104]),
            (vec![104, 105, 106, 107], vec![105, 106, 107, 108]),
            (vec![108, 109], vec![109, 110]),
        ]
    );
    assert_eq!(w.n_targets(), 10);
}

#[test]
fn windows_of_an_exact_multiple_have_no_empty_tail() {
    let stream: Vec<u32> = (0..9).collect(); // 8 targets
    let w = windows(&stream, 4, None);
    assert_eq!(w.windows.len(), 2);
    assert_eq!(w.windows[1].targets, [5, 6, 7, 8]);
    assert_eq!(w.n_targets(), 8);
}

#[test]
fn max_tokens_cuts_the_last_window() {
    let stream: Vec<u32> = (0..11).collect();
    let w = windows(&stream, 4, Some(6));
    assert_eq!(w.n_targets(), 6);
    assert_eq!(w.windows.len(), 2);
    assert_eq!(w.windows[1].inputs, [4, 5]);
    assert_eq!(w.windows[1].targets, [5, 6]);
    assert_eq!(windows(&stream, 4, Some(8)).windows.len(), 2);
    assert_eq!(windows(&stream, 4, Some(1000)), windows(&stream, 4, None));
}

#[test]
fn windows_of_a_too_short_stream_are_empty() {
    assert_eq!(windows(&[7], 4, None).n_targets(), 0);
    assert_eq!(windows(&[], 4, None).n_targets(), 0);
    assert_eq!(windows(&[1, 2], 1, None).n_targets(), 1);
}

#[test]
fn batches_group_windows() {
    let stream: Vec<u32> = (0..12).collect(); // 11 targets: windows of 3, 3, 3, 2
    let w = windows(&stream, 3, None);
    let sizes = |b| w.batches(b).map(<[_]>::len).collect::<Vec<_>>();
    assert_eq!(sizes(3), [3, 1]);
    assert_eq!(sizes(4), [4]);
    assert_eq!(sizes(0), [1, 1, 1, 1]);
}

/// A word-level tokenizer with no BOS: "a" is one token.
fn word_tokenizer(eos: Option<u32>) -> TextTokenizer {
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<unk>",
                  "vocab": {"<unk>": 0, "</s>": 1, "a": 2, "b": 3}}
    });
    TextTokenizer::from_json(&json.to_string(), None, eos).unwrap()
}

fn documents(texts: &[&str]) -> Documents {
    Documents {
        texts: texts.iter().map(|t| t.to_string()).collect(),
        skipped_invalid_utf8: 0,
        files: 1,
    }
}

#[test]
fn token_stream_appends_eos_after_each_document() {
    let stream = token_stream(&documents(&["a b", "b"]), &word_tokenizer(Some(1)), None).unwrap();
    assert_eq!(stream, [2, 3, 1, 3, 1]);
    let stream = token_stream(&documents(&["a b", "b"]), &word_tokenizer(None), None).unwrap();
    assert_eq!(stream, [2, 3, 3]);
}

#[test]
fn token_stream_stops_encoding_at_the_limit() {
    let docs = documents(&["a b", "b a", "a a"]);
    let all = token_stream(&docs, &word_tokenizer(Some(1)), None).unwrap();
    let limited = token_stream(&docs, &word_tokenizer(Some(1)), Some(4)).unwrap();
    // Whole documents: the first two (3 tokens each with EOS) reach the limit of 4.
    assert_eq!(limited, all[..6]);
}

#[test]
fn token_stream_too_short_to_score_is_refused() {
    let err = token_stream(&documents(&["a"]), &word_tokenizer(None), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the data is 1 token(s) long; at least 2 are needed to score a prediction"
    );
    assert!(token_stream(&documents(&["a"]), &word_tokenizer(Some(1)), None).is_ok());
}

#[test]
fn smollm2_token_stream_is_each_document_then_eos() {
    let (Some(model), Some(xsum)) = (common::smollm2(), common::asset("xsum-test.jsonl")) else {
        return;
    };
    let model = SourceModel::open(&model).unwrap();
    let tok = TextTokenizer::for_model(&model).unwrap();
    // tokenizer.ggml.eos_token_id = 2 (`<|im_end|>`); add_bos_token is false, so the
    // tokenizer adds nothing and BOS never appears in the stream.
    assert_eq!(tok.eos, Some(2));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.vocab_size(), 49152);
    let all = read_documents(&[xsum], Some("document")).unwrap();
    assert!(all.texts.len() > 100, "{}", all.texts.len());
    assert_eq!(all.skipped_invalid_utf8, 0);
    let docs = Documents {
        texts: all.texts[..3].to_vec(),
        ..all
    };
    let stream = token_stream(&docs, &tok, None).unwrap();
    let mut want = Vec::new();
    for text in &docs.texts {
        let ids = tok.encode(text).unwrap();
        assert!(ids.len() > 20);
        if let Some(bos) = tok.bos {
            assert_ne!(ids[0], bos, "the SmolLM2 GGUF does not add BOS");
        }
        want.extend(ids);
        want.push(2);
    }
    assert_eq!(stream, want);
    // The first document starts as it reads.
    let first = tok.decode(&stream[..5]).unwrap();
    assert!(docs.texts[0].starts_with(&first), "{first:?}");
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    assert!(!Path::new(&partial).exists(), "PATH.partial left behind");
}

#[test]
fn plot_writes_a_png_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let unhealed: Vec<(u32, f64)> = [1, 2, 4, 8, 16, 32]
        .iter()
        .zip([9800.0, 2100.0, 340.0, 120.0, 95.0, 180.0])
        .map(|(&r, p)| (r, p))
        .collect();
    let healed: Vec<(u32, f64)> = [
        (32, 21.5),
        (1, 40.2),
        (4, 24.9),
        (2, 30.1),
        (16, 21.9),
        (8, 22.7),
    ]
    .to_vec();
    let series = vec![
        ("unhealed".to_string(), unhealed),
        ("healed (2000 steps)".to_string(), healed.clone()),
    ];
    let log = dir.path().join("log.png");
    plot_perplexity(&log, "SmolLM2-135M, core 10..22: perplexity vs r", &series).unwrap();
    assert_png(&log);
    let linear = dir.path().join("linear.png");
    plot_perplexity(&linear, "healed only", &[("healed".to_string(), healed)]).unwrap();
    assert_png(&linear);
    let single = dir.path().join("single.png");
    plot_perplexity(
        &single,
        "one point",
        &[("r=1".to_string(), vec![(1, 12.0)])],
    )
    .unwrap();
    assert_png(&single);
    if let Some(keep) = std::env::var_os("SURGERY_KEEP_PLOTS") {
        for name in ["log.png", "linear.png", "single.png"] {
            std::fs::copy(dir.path().join(name), Path::new(&keep).join(name)).unwrap();
        }
    }
}

/// One line of the plot: a name and its (r, perplexity) points.
type Series = (String, Vec<(u32, f64)>);

#[test]
fn plot_refuses_bad_values_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.png");
    let cases: Vec<(Vec<Series>, &str)> = vec![
        (vec![], "nothing to plot: no perplexity values"),
        (
            vec![("a".into(), vec![])],
            "nothing to plot: no perplexity values",
        ),
        (
            vec![("a".into(), vec![(0, 3.0)])],
            "series `a`: r = 0 cannot be placed on a log2 axis",
        ),
        (
            vec![("a".into(), vec![(4, f64::INFINITY)])],
            "series `a`: perplexity at r = 4 is inf, not a finite positive number",
        ),
    ];
    for (series, want) in cases {
        let err = plot_perplexity(&path, "t", &series).unwrap_err();
        assert!(!matches!(err, PlotError::Io { .. }));
        assert_eq!(err.to_string(), want);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

#[test]
fn plot_into_a_missing_directory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/p.png");
    let err = plot_perplexity(&path, "t", &[("a".into(), vec![(1, 3.0)])]).unwrap_err();
    assert!(matches!(err, PlotError::Io { .. }), "{err}");
}

/// tests/data/: Parquet tables written by pyarrow (tests/data/make_parquet.py) and docs.jsonl, the
/// same documents as JSON Lines.
fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn parquet_json_and_gzip_give_the_documents_and_tokens_of_the_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = data("docs.jsonl");
    let want = read_documents(std::slice::from_ref(&jsonl), None).unwrap();
    assert_eq!(want.texts.len(), 5);
    let lines = std::fs::read(&jsonl).unwrap();
    let values: Vec<serde_json::Value> = lines
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let array = serde_json::to_vec_pretty(&values).unwrap();
    let mut files = vec![
        write(dir.path(), "docs.json", &array),
        write(dir.path(), "docs.json.gz", &gzip(&array)),
        write(dir.path(), "docs.jsonl.gz", &gzip(&lines)),
    ];
    for codec in ["snappy", "zstd", "gzip", "none"] {
        files.push(data(&format!("docs-{codec}.parquet")));
    }
    let model =
        SourceModel::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/model"))
            .unwrap();
    let tok = TextTokenizer::for_model(&model).unwrap();
    let tokens = read_tokens(std::slice::from_ref(&jsonl), None, &tok, None).unwrap();
    assert!(tokens.tokens.len() > 3000, "{}", tokens.tokens.len());
    for file in &files {
        let docs = read_documents(std::slice::from_ref(file), None).unwrap();
        assert_eq!(docs.texts, want.texts, "{}", file.display());
        let got = read_tokens(std::slice::from_ref(file), None, &tok, None).unwrap();
        assert_eq!(got, tokens, "{}", file.display());
        // Reading stops at a limit inside the long fourth document, as for the jsonl.
        let limited = read_tokens(std::slice::from_ref(file), None, &tok, Some(40)).unwrap();
        let want = read_tokens(std::slice::from_ref(&jsonl), None, &tok, Some(40)).unwrap();
        assert_eq!(limited, want, "{}", file.display());
    }
    // A .txt.gz reads as its .txt.
    let txt = b"First.\n\nSecond paragraph,\ntwo lines.\n";
    let gz = write(dir.path(), "a.txt.gz", &gzip(txt));
    let plain = write(dir.path(), "a.txt", txt);
    assert_eq!(
        read_documents(&[gz], None).unwrap().texts,
        read_documents(&[plain], None).unwrap().texts
    );
}

#[test]
fn parquet_skips_nulls_and_refuses_a_missing_or_non_text_column() {
    let docs = read_documents(&[data("docs-null.parquet")], None).unwrap();
    let all = read_documents(&[data("docs.jsonl")], None).unwrap();
    assert_eq!(docs.texts, [all.texts[0].clone(), all.texts[4].clone()]);

    let path = data("docs-snappy.parquet");
    let err = read_documents(std::slice::from_ref(&path), Some("body")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: no column `body` (columns: id, text; choose one with --field)",
            path.display()
        )
    );
    let path = data("numbers.parquet");
    let err = read_documents(std::slice::from_ref(&path), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: row 1: column `text` holds numbers, not text",
            path.display()
        )
    );
    // Not Parquet at all, and a Parquet file cut short.
    let dir = tempfile::tempdir().unwrap();
    let (path, err) = read_err(dir.path(), "a.parquet", b"text, not a table", None);
    assert!(
        err.to_string()
            .starts_with(&format!("{}: ", path.display())),
        "{err}"
    );
    let whole = std::fs::read(data("docs-snappy.parquet")).unwrap();
    let (path, err) = read_err(dir.path(), "cut.parquet", &whole[..whole.len() / 2], None);
    assert!(
        err.to_string()
            .starts_with(&format!("{}: ", path.display())),
        "{err}"
    );
}

#[test]
fn json_array_errors_name_the_element_or_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let (path, err) = read_err(
        dir.path(),
        "a.json",
        br#"[{"text": "a"}, {"body": "b"}]"#,
        None,
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2: no field `text` (choose the text field with --field)",
            path.display()
        )
    );
    let (path, err) = read_err(dir.path(), "b.json", b"[{\"text\": \"a\"},\n  \"b\"]", None);
    assert_eq!(
        err.to_string(),
        format!(
            "{}:2: expected a JSON object, found a string",
            path.display()
        )
    );
    let (path, err) = read_err(
        dir.path(),
        "c.json",
        b"[{\"text\": \"a\"},\n {\"text\": ]",
        None,
    );
    assert!(
        err.to_string()
            .starts_with(&format!("{}:2: not valid JSON", path.display())),
        "{err}"
    );
    let (path, err) = read_err(dir.path(), "d.json", br#"{"text": "not an array"}"#, None);
    assert!(
        err.to_string()
            .starts_with(&format!("{}:1: not valid JSON", path.display())),
        "{err}"
    );
    let (path, err) = read_err(dir.path(), "e.json", b"[{\"text\": \"a\"}] trailing", None);
    assert!(
        err.to_string()
            .starts_with(&format!("{}:1: not valid JSON", path.display())),
        "{err}"
    );
    let (path, err) = read_err(dir.path(), "f.json", b"[{\"text\": \"a\0\"}]", None);
    assert_eq!(
        err.to_string(),
        format!(
            "{}: not a text file (NUL byte at offset 12)",
            path.display()
        )
    );
}

#[test]
fn globs_expand_sorted_and_one_matching_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.txt", b"second");
    write(dir.path(), "a.txt", b"first");
    write(dir.path(), "c.jsonl", b"{\"text\": \"third\"}\n");
    let pattern = dir.path().join("*.txt");
    let docs = read_documents(std::slice::from_ref(&pattern), None).unwrap();
    assert_eq!(
        (docs.texts.as_slice(), docs.files),
        (&["first".to_string(), "second".to_string()][..], 2)
    );
    let both = [pattern, dir.path().join("c.json?")];
    assert_eq!(
        read_documents(&both, None).unwrap().texts,
        ["first", "second", "third"]
    );
    let none = dir.path().join("*.parquet");
    let err = read_documents(std::slice::from_ref(&none), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: no file matches", none.display())
    );
}

#[test]
fn chat_records_are_rendered_with_the_model_template_in_jsonl_and_parquet() {
    let Some(gguf) = common::smollm2() else {
        return;
    };
    let model = SourceModel::open(&gguf).unwrap();
    let tok = TextTokenizer::for_model(&model).unwrap();
    // jinja2 3.1.4's renderings of tests/data/chat.jsonl with SmolLM2's template, in
    // transformers' environment; tokenized without the post-processor's specials (as
    // apply_chat_template(tokenize=True) does; SmolLM2 adds none anyway), EOS after each.
    let rendered = [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n",
    ];
    let mut want = Vec::new();
    for text in rendered {
        want.extend(tok.encode(text).unwrap());
        want.extend(tok.eos);
    }
    assert!(want.len() > 40);
    for name in ["chat.jsonl", "chat.parquet"] {
        let got = read_tokens(&[data(name)], Some("messages"), &tok, None).unwrap();
        assert_eq!(
            (got.tokens.as_slice(), got.documents),
            (want.as_slice(), 2),
            "{name}"
        );
    }
    // Without a tokenizer the documents cannot be read as text; a malformed turn is named.
    let err = read_documents(&[data("chat.jsonl")], Some("messages")).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("chat.jsonl:1: a conversation, which only a model's tokenizer can render"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.jsonl",
        br#"{"messages": [{"role": "user"}]}"#,
    );
    let err = read_tokens(std::slice::from_ref(&bad), Some("messages"), &tok, None).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "{}:1: field `messages` is not a list of",
            bad.display()
        )),
        "{err}"
    );
    // A model without a chat template says so.
    let tiny =
        SourceModel::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/model"))
            .unwrap();
    let tiny = TextTokenizer::for_model(&tiny).unwrap();
    let err = read_tokens(&[data("chat.parquet")], Some("messages"), &tiny, None).unwrap_err();
    assert!(err.to_string().ends_with("chat.parquet: row 1: the model has no chat template (tokenizer_config.json's chat_template, or a GGUF's tokenizer.chat_template)"), "{err}");
}

#[test]
fn loss_on_assistant_marks_the_assistant_turns_of_chat_data_and_every_token_of_text() {
    let Some(gguf) = common::smollm2() else {
        return;
    };
    let model = SourceModel::open(&gguf).unwrap();
    let tok = TextTokenizer::for_model(&model).unwrap();
    // Conversations: the tokens marked are exactly the assistant turns with the template's
    // end-of-turn text, in JSONL and in Parquet alike; the stream is the one `all` reads.
    for name in ["chat.jsonl", "chat.parquet"] {
        let paths = [data(name)];
        let all = read_tokens(&paths, Some("messages"), &tok, None).unwrap();
        assert_eq!(all.trained, None);
        let got =
            read_training_tokens(&paths, Some("messages"), &tok, None, LossOn::Assistant).unwrap();
        assert_eq!(got.tokens, all.tokens, "{name}");
        let trained = got.trained.unwrap();
        assert_eq!(trained.len(), got.tokens.len());
        let mut runs = Vec::new();
        let mut run: Vec<u32> = Vec::new();
        for (&id, &on) in got.tokens.iter().zip(&trained) {
            if on {
                run.push(id);
            } else if !run.is_empty() {
                runs.push(tok.decode(&std::mem::take(&mut run)).unwrap());
            }
        }
        assert!(
            run.is_empty(),
            "{name}: the EOS after a conversation is not trained"
        );
        // decode leaves out the special <|im_end|>; its id is checked below.
        assert_eq!(runs, ["4.\n", "Hello.\n"], "{name}");
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        let marked_ends = got
            .tokens
            .iter()
            .zip(&trained)
            .filter(|&(&id, &on)| on && id == im_end)
            .count();
        assert_eq!(
            marked_ends, 2,
            "{name}: each assistant turn ends with its <|im_end|>"
        );
    }
    // Plain text has no roles: every token carries the loss.
    let text =
        read_training_tokens(&[data("docs.jsonl")], None, &tok, None, LossOn::Assistant).unwrap();
    assert_eq!(text.trained, Some(vec![true; text.tokens.len()]));
}
