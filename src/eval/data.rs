//! Evaluation data: text files read into documents, documents tokenized into one stream, and the
//! stream cut into windows for next-token perplexity.
//!
//! Formats, chosen by extension:
//! - `.txt`: documents separated by one or more blank lines (lines of only whitespace), each
//!   trimmed; empty ones dropped.
//! - `.jsonl`: one JSON object per line, the document in a string field (`text` unless told);
//!   blank lines skipped; the text kept as written, dropped only when it is all whitespace.
//!
//! Invalid UTF-8: a document (a `.txt` paragraph or a `.jsonl` line) that is not valid UTF-8 is
//! skipped and counted in [`Documents::skipped_invalid_utf8`], for the caller to report. Scraped
//! corpora carry the odd bad byte, and one should not stop an evaluation; replacing it with U+FFFD
//! instead would score tokens that were never in the data. A file where nothing is valid, or that
//! holds a NUL byte (which no text file has; ripgrep uses the same test), is refused as not text.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::formats::text_tokenizer::{TextTokenizer, TextTokenizerError};

/// Why data could not be read or prepared.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// No data file was given.
    #[error("no data files given")]
    NoFiles,
    /// A data file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The extension is neither `.txt` nor `.jsonl`.
    #[error("{path}: unknown data format (expected a .txt or .jsonl file)")]
    UnknownExtension { path: PathBuf },
    /// The file holds a NUL byte, or no valid UTF-8 document at all.
    #[error("{path}: not a text file ({reason})")]
    NotText { path: PathBuf, reason: String },
    /// A `.jsonl` line is not a JSON document.
    #[error("{path}:{line}: not valid JSON ({reason})")]
    BadJson {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A `.jsonl` line is JSON, but not an object.
    #[error("{path}:{line}: expected a JSON object, found {found}")]
    NotAnObject {
        path: PathBuf,
        line: usize,
        found: &'static str,
    },
    /// A `.jsonl` object lacks the text field.
    #[error("{path}:{line}: no field `{field}` (choose the text field with --field)")]
    MissingField {
        path: PathBuf,
        line: usize,
        field: String,
    },
    /// A `.jsonl` object's text field is not a string.
    #[error("{path}:{line}: field `{field}` is {found}, not a string")]
    NotAString {
        path: PathBuf,
        line: usize,
        field: String,
        found: &'static str,
    },
    /// A file yields no document.
    #[error("no documents in {path}")]
    NoDocuments { path: PathBuf },
    /// The tokenizer failed on a document.
    #[error("document {index}: {source}")]
    Tokenize {
        index: usize,
        source: TextTokenizerError,
    },
    /// Too few tokens to score even one next-token prediction.
    #[error("the data is {tokens} token(s) long; at least 2 are needed to score a prediction")]
    TooShort { tokens: usize },
}

/// Documents read from one or more files, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Documents {
    pub texts: Vec<String>,
    /// Documents left out because they were not valid UTF-8.
    pub skipped_invalid_utf8: usize,
    /// Number of files read.
    pub files: usize,
}

/// Reads documents from `.txt` and `.jsonl` files; `field` names the `.jsonl` text field
/// (default `text`). Every file must yield at least one document.
pub fn read_documents(paths: &[PathBuf], field: Option<&str>) -> Result<Documents, DataError> {
    if paths.is_empty() {
        return Err(DataError::NoFiles);
    }
    let field = field.unwrap_or("text");
    let mut docs = Documents::default();
    for path in paths {
        let before = (docs.texts.len(), docs.skipped_invalid_utf8);
        read_file(path, field, &mut docs)?;
        docs.files += 1;
        if docs.texts.len() == before.0 {
            let skipped = docs.skipped_invalid_utf8 - before.1;
            return Err(if skipped > 0 {
                DataError::NotText {
                    path: path.clone(),
                    reason: format!("none of its {skipped} documents is valid UTF-8"),
                }
            } else {
                DataError::NoDocuments { path: path.clone() }
            });
        }
    }
    Ok(docs)
}

fn read_file(path: &Path, field: &str, docs: &mut Documents) -> Result<(), DataError> {
    let ext = path.extension().and_then(|e| e.to_str());
    if !matches!(ext, Some("txt" | "jsonl")) {
        return Err(DataError::UnknownExtension {
            path: path.to_path_buf(),
        });
    }
    let bytes = crate::paths::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some(offset) = bytes.iter().position(|&b| b == 0) {
        return Err(DataError::NotText {
            path: path.to_path_buf(),
            reason: format!("NUL byte at offset {offset}"),
        });
    }
    // Editors on Windows start UTF-8 files with a byte-order mark; it is not text.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    if ext == Some("txt") {
        read_txt(bytes, docs);
        Ok(())
    } else {
        read_jsonl(path, bytes, field, docs)
    }
}

fn is_blank(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok_and(|s| s.trim().is_empty())
}

/// Splits on blank lines. Each paragraph is a slice of the file, so its line breaks are kept as
/// written; it is validated as UTF-8 on its own, so a bad byte costs one document, not the file.
fn read_txt(bytes: &[u8], docs: &mut Documents) {
    let mut push = |paragraph: &[u8]| match std::str::from_utf8(paragraph) {
        Ok(text) if !text.trim().is_empty() => docs.texts.push(text.trim().to_string()),
        Ok(_) => {}
        Err(_) => docs.skipped_invalid_utf8 += 1,
    };
    // `start` is the byte offset of the paragraph being collected, if any.
    let mut start: Option<usize> = None;
    let mut offset = 0;
    for line in bytes.split(|&b| b == b'\n') {
        let end = offset + line.len();
        match (is_blank(line), start) {
            (true, Some(s)) => {
                push(&bytes[s..offset]);
                start = None;
            }
            (false, None) => start = Some(offset),
            _ => {}
        }
        // The line and its `\n`; past the end only after the last line, where it is unused.
        offset = end + 1;
    }
    if let Some(s) = start {
        push(&bytes[s..]);
    }
}

fn read_jsonl(
    path: &Path,
    bytes: &[u8],
    field: &str,
    docs: &mut Documents,
) -> Result<(), DataError> {
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let number = i + 1;
        if is_blank(line) {
            continue;
        }
        let Ok(line) = std::str::from_utf8(line) else {
            docs.skipped_invalid_utf8 += 1;
            continue;
        };
        let value: Json = serde_json::from_str(line).map_err(|e| DataError::BadJson {
            path: path.to_path_buf(),
            line: number,
            reason: json_reason(&e),
        })?;
        let Json::Object(object) = value else {
            return Err(DataError::NotAnObject {
                path: path.to_path_buf(),
                line: number,
                found: json_type(&value),
            });
        };
        let text = match object.get(field) {
            None => {
                return Err(DataError::MissingField {
                    path: path.to_path_buf(),
                    line: number,
                    field: field.to_string(),
                })
            }
            Some(Json::String(text)) => text,
            Some(other) => {
                return Err(DataError::NotAString {
                    path: path.to_path_buf(),
                    line: number,
                    field: field.to_string(),
                    found: json_type(other),
                })
            }
        };
        if !text.trim().is_empty() {
            docs.texts.push(text.clone());
        }
    }
    Ok(())
}

/// serde_json's message with the column, without its "at line 1" (each line is parsed alone;
/// the file's line number is in the error already).
fn json_reason(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m);
    format!("{message} at column {}", e.column())
}

fn json_type(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// All documents as one token stream: each encoded as the tokenizer does (BOS when its
/// post-processor adds one), followed by EOS when the model has one, so that a document's first
/// tokens are predicted after an end of text and never from the previous document's words alone.
/// Fewer than 2 tokens in all is an error: nothing could be scored. With `limit`, documents stop
/// being encoded once the stream holds that many tokens (so `--max-tokens` does not pay for
/// tokenizing a whole corpus).
pub fn token_stream(
    docs: &Documents,
    tok: &TextTokenizer,
    limit: Option<usize>,
) -> Result<Vec<u32>, DataError> {
    let mut stream = Vec::new();
    for (index, text) in docs.texts.iter().enumerate() {
        if limit.is_some_and(|l| stream.len() >= l) {
            break;
        }
        let ids = tok
            .encode(text)
            .map_err(|source| DataError::Tokenize { index, source })?;
        stream.extend_from_slice(&ids);
        stream.extend(tok.eos);
    }
    if stream.len() < 2 {
        return Err(DataError::TooShort {
            tokens: stream.len(),
        });
    }
    Ok(stream)
}

/// One window of a token stream: `targets[j]` is the token that follows `inputs[j]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

/// Non-overlapping windows over a token stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    pub windows: Vec<Window>,
    /// The length of every window but possibly the last.
    pub seq_len: usize,
}

impl Windows {
    /// Number of scored tokens: every target of every window.
    pub fn n_targets(&self) -> usize {
        self.windows.iter().map(|w| w.targets.len()).sum()
    }

    /// The windows in groups of `batch` (the last group may be smaller); a batch of 0 is taken
    /// as 1.
    pub fn batches(&self, batch: usize) -> impl Iterator<Item = &[Window]> {
        self.windows.chunks(batch.max(1))
    }
}

/// Cuts `stream` into windows of `seq_len` inputs for next-token perplexity. Window `i` reads
/// `stream[i*T .. i*T+T]` and predicts `stream[i*T+1 .. i*T+T+1]`, so every token after the first
/// is scored exactly once (each window starts without context: the cheap, standard estimate).
/// The last window is shorter when the stream runs out. `max_tokens` caps the number of scored
/// tokens, cutting the last window short.
///
/// A stream of fewer than 2 tokens, `seq_len` 0 or `max_tokens` 0 gives no windows; callers that
/// need some check first ([`token_stream`] refuses a stream too short to score).
pub fn windows(stream: &[u32], seq_len: usize, max_tokens: Option<usize>) -> Windows {
    let available = stream.len().saturating_sub(1);
    let n_targets = max_tokens.map_or(available, |m| m.min(available));
    let mut windows = Vec::new();
    if seq_len > 0 {
        let mut start = 0;
        while start < n_targets {
            let end = start + seq_len.min(n_targets - start);
            windows.push(Window {
                inputs: stream[start..end].to_vec(),
                targets: stream[start + 1..end + 1].to_vec(),
            });
            start = end;
        }
    }
    Windows { windows, seq_len }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(text: &[u8]) -> Documents {
        let mut docs = Documents::default();
        read_txt(text, &mut docs);
        docs
    }

    #[test]
    fn txt_splits_on_runs_of_blank_lines_and_keeps_inner_line_breaks() {
        let docs = txt(b"  one\ntwo  \n\n \t\r\n\nthree\r\n\n\n");
        assert_eq!(docs.texts, ["one\ntwo", "three"]);
    }

    #[test]
    fn txt_skips_an_invalid_utf8_paragraph_only() {
        let docs = txt(b"good\n\nbad \xFF byte\n\nalso good");
        assert_eq!(docs.texts, ["good", "also good"]);
        assert_eq!(docs.skipped_invalid_utf8, 1);
    }

    #[test]
    fn windows_cover_every_target_once() {
        let stream: Vec<u32> = (0..10).collect();
        let w = windows(&stream, 4, None);
        assert_eq!(w.n_targets(), 9);
        assert_eq!(w.windows[2].inputs, [8]);
        assert_eq!(w.windows[2].targets, [9]);
    }

    #[test]
    fn degenerate_windows_are_empty() {
        assert!(windows(&[1], 4, None).windows.is_empty());
        assert!(windows(&[], 4, None).windows.is_empty());
        assert!(windows(&[1, 2, 3], 0, None).windows.is_empty());
        assert!(windows(&[1, 2, 3], 2, Some(0)).windows.is_empty());
    }

    #[test]
    fn json_reason_drops_serde_json_line() {
        let e = serde_json::from_str::<Json>("{\"a\": }").unwrap_err();
        assert_eq!(json_reason(&e), "expected value at column 7");
    }
}
