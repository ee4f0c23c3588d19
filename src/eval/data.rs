//! Evaluation data: text files read into documents, documents tokenized into one stream, and the
//! stream cut into windows for next-token perplexity.
//!
//! Formats, chosen by extension:
//! - `.txt`: documents separated by one or more blank lines (lines of only whitespace), each
//!   trimmed; empty ones dropped.
//! - `.jsonl`: one JSON object per line, the document in a string field (`text` unless told);
//!   blank lines skipped; the text kept as written, dropped only when it is all whitespace.
//! - `.json`: an array of such objects ([`super::records`]); errors name the element as its line.
//! - `.parquet`: a table whose column (`text` unless told) holds the documents, one a row, nulls
//!   skipped ([`super::records`]); snappy, gzip, lz4 and zstd pages are read.
//! - `.txt.gz`, `.jsonl.gz`, `.json.gz`: the same, gzip-compressed (decompressed as read).
//!
//! Chat data: a record whose text field is a list of `{"role", "content"}` turns (in `.jsonl` or
//! `.json`, or a Parquet list of such structs, as chat datasets store `messages`) is one
//! document: the conversation rendered with the model's chat template and tokenized as
//! transformers' `apply_chat_template(tokenize=True)` does. Only a reader with the model's
//! tokenizer can do that ([`read_tokens`]). Training reads with [`read_training_tokens`], which
//! under [`LossOn::Assistant`] also marks which tokens are the assistant's turns (the paper's
//! trainer takes its loss on those alone); evaluation scores every token.
//!
//! A path that does not exist and holds `*`, `?` or `[` is a glob (`shards/train-*.parquet`),
//! expanded in sorted order; a glob that matches nothing is refused.
//!
//! Invalid UTF-8: a document (a `.txt` paragraph or a `.jsonl` line) that is not valid UTF-8 is
//! skipped and counted in [`Documents::skipped_invalid_utf8`], for the caller to report. Scraped
//! corpora carry the odd bad byte, and one should not stop an evaluation; replacing it with U+FFFD
//! instead would score tokens that were never in the data. A file where nothing is valid, or that
//! holds a NUL byte (which no text file has; ripgrep uses the same test), is refused as not text.
//!
//! Bounded memory (issue 18): files are read in pieces of [`READ_BYTES`], never whole, and
//! [`read_tokens`] stops reading once it holds the tokens asked for, so `eval --max-tokens 64` on a
//! 50 MB document reads a few kilobytes. A document longer than [`PIECE_BYTES`] is tokenized in
//! pieces of at most that size (the tokenizers crate takes about 200 bytes of memory per byte of
//! text), cut before a whitespace character that starts a word so that the pieces tokenize as
//! the whole would with pre-tokenizers that split on whitespace (byte-level BPE, Metaspace); the
//! special tokens the post-processor adds (BOS) go around the whole document, not each piece. A
//! `.jsonl` line up to [`LINE_BYTES`] is parsed whole by serde_json; a longer one is scanned as a
//! stream ([`super::jsonl`]), its text field decoded piece by piece.
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::named::named;
use crate::tokenizer::chat::Message;
use crate::tokenizer::text::{TextTokenizer, TextTokenizerError};

use super::records::read_parquet;

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
    /// The extension is none of the formats read.
    #[error("{path}: unknown data format (expected .txt, .jsonl, .json or .parquet; the first three may be .gz)")]
    UnknownExtension { path: PathBuf },
    /// A glob matches no file.
    #[error("{pattern}: no file matches")]
    NoMatch { pattern: String },
    /// A Parquet file could not be read, or has no such text column.
    #[error("{path}: {reason}")]
    Parquet { path: PathBuf, reason: String },
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
    /// A record's conversation could not be rendered or tokenized.
    #[error("{path}:{line}: {reason}")]
    Chat {
        path: PathBuf,
        line: usize,
        reason: String,
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

/// A file is read this many bytes at a time.
pub(crate) const READ_BYTES: usize = 64 << 10;
/// A document longer than this is tokenized in pieces of at most this many bytes.
pub(crate) const PIECE_BYTES: usize = 64 << 10;
/// A `.jsonl` line up to this long is parsed whole; a longer one is scanned as a stream.
pub(crate) const LINE_BYTES: usize = 1 << 20;
/// Whitespace held back (a `.txt` paragraph's possible trailing whitespace, a `.jsonl` text's
/// possibly all-blank start) is passed on as text past this many bytes, to stay bounded.
const HOLD_BYTES: usize = 64 << 10;

/// Documents read from one or more files, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Documents {
    pub texts: Vec<String>,
    /// Documents left out because they were not valid UTF-8.
    pub skipped_invalid_utf8: usize,
    /// Number of files read.
    pub files: usize,
}

named! {
    /// Which tokens of the training data carry the loss.
    #[derive(Default)]
    pub enum LossOn {
        /// Every token (what runs recorded before the choice existed did).
        [default]
        All = "all",
        /// A conversation's assistant turns only, as the paper's trainer; plain-text documents,
        /// which have no roles, keep every token.
        Assistant = "assistant",
    }
}

/// The token stream of one or more files, and what reading them found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenStream {
    pub tokens: Vec<u32>,
    /// Under [`LossOn::Assistant`], whether each token carries the loss (as a target); None when
    /// every token does.
    pub trained: Option<Vec<bool>>,
    /// Documents tokenized (the last one possibly in part, when the limit cut it).
    pub documents: usize,
    /// Documents left out because they were not valid UTF-8.
    pub skipped_invalid_utf8: usize,
}

/// Where the reader sends a document's text.
pub(crate) trait Sink {
    /// More of the current document's text.
    fn text(&mut self, text: &str) -> Result<(), DataError>;
    /// The current document is complete.
    fn end(&mut self) -> Result<(), DataError>;
    /// The current document turned out not to be valid UTF-8: forget what it sent.
    fn discard(&mut self);
    /// Enough has been read; the reader stops.
    fn full(&self) -> bool;
    /// A conversation as one whole document (see [`Conversation`]).
    fn conversation(&mut self, messages: &[Message]) -> Result<(), Conversation>;
}

/// Why a conversation could not become a document.
#[derive(Debug)]
pub(crate) enum Conversation {
    /// Rendering or tokenizing it failed.
    Failed(String),
    /// The reader has no tokenizer (documents are read as text alone).
    NoTokenizer,
}

/// Reads documents from data files (see the formats above); `field` names the records' text
/// field (default `text`). Every file must yield at least one document. Holds every text in memory:
/// for inspecting data; evaluation and training read with [`read_tokens`].
pub fn read_documents(paths: &[PathBuf], field: Option<&str>) -> Result<Documents, DataError> {
    let mut sink = Collect::default();
    let report = read_into(paths, field, &mut sink)?;
    Ok(Documents {
        texts: sink.texts,
        skipped_invalid_utf8: report.skipped_invalid_utf8,
        files: report.files,
    })
}

/// Reads and tokenizes data files into one stream (see [`token_stream`] for its
/// layout), in bounded memory: reading stops once the stream holds `limit` tokens. Every file
/// read to its end must yield at least one document; fewer than 2 tokens in all is an error.
pub fn read_tokens(
    paths: &[PathBuf],
    field: Option<&str>,
    tok: &TextTokenizer,
    limit: Option<usize>,
) -> Result<TokenStream, DataError> {
    read_training_tokens(paths, field, tok, limit, LossOn::All)
}

/// [`read_tokens`] for training: under [`LossOn::Assistant`], [`TokenStream::trained`] marks the
/// tokens of the conversations' assistant turns and every token of plain-text documents (the EOS
/// after a conversation is not trained: the template's own end-of-turn text is).
pub fn read_training_tokens(
    paths: &[PathBuf],
    field: Option<&str>,
    tok: &TextTokenizer,
    limit: Option<usize>,
    loss_on: LossOn,
) -> Result<TokenStream, DataError> {
    let mut sink = Tokens::new(tok, limit);
    if loss_on == LossOn::Assistant {
        sink.trained = Some(Vec::new());
    }
    let report = read_into(paths, field, &mut sink)?;
    sink.finish(report.skipped_invalid_utf8)
}

/// All documents as one token stream: each encoded as the tokenizer does (BOS when its
/// post-processor adds one), followed by EOS when the model has one, so that a document's first
/// tokens are predicted after an end of text and never from the previous document's words alone.
/// Fewer than 2 tokens in all is an error: nothing could be scored. With `limit`, encoding stops
/// once the stream holds that many tokens (so `--max-tokens` does not pay for tokenizing a whole
/// corpus).
pub fn token_stream(
    docs: &Documents,
    tok: &TextTokenizer,
    limit: Option<usize>,
) -> Result<Vec<u32>, DataError> {
    let mut sink = Tokens::new(tok, limit);
    for text in &docs.texts {
        if sink.full() {
            break;
        }
        sink.text(text)?;
        sink.end()?;
    }
    Ok(sink.finish(docs.skipped_invalid_utf8)?.tokens)
}

/// What reading found besides the documents.
struct Report {
    /// Files, globs expanded.
    files: usize,
    skipped_invalid_utf8: usize,
}

fn read_into(
    paths: &[PathBuf],
    field: Option<&str>,
    sink: &mut dyn Sink,
) -> Result<Report, DataError> {
    if paths.is_empty() {
        return Err(DataError::NoFiles);
    }
    let field = field.unwrap_or("text");
    // Every file is checked and opened first, so a wrong name is found even when the data
    // before it is enough.
    let paths = expand(paths)?;
    let mut files = Vec::with_capacity(paths.len());
    for path in &paths {
        let format = Format::of(path)?;
        let file = crate::paths::open_file(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        files.push((path, file, format));
    }
    let mut report = Report {
        files: files.len(),
        skipped_invalid_utf8: 0,
    };
    for (path, file, format) in files {
        let mut counted = Counted {
            sink: &mut *sink,
            documents: 0,
            skipped: 0,
        };
        match format {
            Format::Text(text, gzip) => {
                let input: Box<dyn std::io::Read> = if gzip {
                    Box::new(flate2::read::MultiGzDecoder::new(file))
                } else {
                    Box::new(file)
                };
                let mut reader = Reader::new(path, input);
                match text {
                    Text::Txt => read_txt(&mut reader, &mut counted)?,
                    Text::Jsonl => read_jsonl(&mut reader, field, &mut counted)?,
                    Text::Json => read_json(&mut reader, field, &mut counted)?,
                }
            }
            Format::Parquet => read_parquet(path, file, field, &mut counted)?,
        }
        let (documents, skipped) = (counted.documents, counted.skipped);
        report.skipped_invalid_utf8 += skipped;
        if sink.full() {
            break;
        }
        if documents == 0 {
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
    Ok(report)
}

/// A sink that counts the documents of one file.
pub(crate) struct Counted<'a> {
    pub(crate) sink: &'a mut dyn Sink,
    pub(crate) documents: usize,
    pub(crate) skipped: usize,
}

/// A file read in pieces of [`READ_BYTES`]: the byte-order mark dropped, NUL bytes refused.
struct Reader<'a> {
    path: &'a Path,
    inner: std::io::BufReader<Box<dyn std::io::Read>>,
    /// Why the last [`std::io::Read::read`] failed, when it was the data, not the file.
    failed: Option<DataError>,
    /// Bytes of the file consumed so far (for the offset of a NUL byte).
    offset: u64,
    started: bool,
}

impl<'a> Reader<'a> {
    fn new(path: &'a Path, input: Box<dyn std::io::Read>) -> Reader<'a> {
        Reader {
            path,
            inner: std::io::BufReader::with_capacity(READ_BYTES, input),
            failed: None,
            offset: 0,
            started: false,
        }
    }

    /// The next bytes of the file (empty at the end); pass how many were used to [`Self::consume`].
    fn fill(&mut self) -> Result<&[u8], DataError> {
        use std::io::BufRead;
        let path = self.path;
        if !self.started {
            self.started = true;
            let buf = self.inner.fill_buf().map_err(|source| DataError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            // Editors on Windows start UTF-8 files with a byte-order mark; it is not text.
            if buf.starts_with(b"\xEF\xBB\xBF") {
                self.inner.consume(3);
                self.offset = 3;
            }
        }
        let offset = self.offset;
        let buf = self.inner.fill_buf().map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(i) = buf.iter().position(|&b| b == 0) {
            return Err(DataError::NotText {
                path: path.to_path_buf(),
                reason: format!("NUL byte at offset {}", offset + i as u64),
            });
        }
        Ok(buf)
    }

    fn consume(&mut self, n: usize) {
        use std::io::BufRead;
        self.inner.consume(n);
        self.offset += n as u64;
    }
}

/// The reader's bytes for a parser that reads (a JSON array), with the same checks.
impl std::io::Read for Reader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let buf = match self.fill() {
            Ok(buf) => buf,
            Err(e) => {
                self.failed = Some(e);
                return Err(std::io::Error::other("the data file could not be read"));
            }
        };
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// The data formats, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// A text format, and whether it is gzip-compressed.
    Text(Text, bool),
    /// Parquet (which compresses its own pages).
    Parquet,
}

/// The formats read as a stream of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Text {
    Txt,
    Jsonl,
    Json,
}

impl Format {
    /// The format of `path`: `.txt`, `.jsonl`, `.json` (each possibly `.gz`) or `.parquet`.
    fn of(path: &Path) -> Result<Format, DataError> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let (name, gzip) = match name.strip_suffix(".gz") {
            Some(inner) => (inner, true),
            None => (name, false),
        };
        Ok(match name.rsplit_once('.').map(|(_, ext)| ext) {
            Some("txt") => Format::Text(Text::Txt, gzip),
            Some("jsonl") => Format::Text(Text::Jsonl, gzip),
            Some("json") => Format::Text(Text::Json, gzip),
            Some("parquet") if !gzip => Format::Parquet,
            _ => {
                return Err(DataError::UnknownExtension {
                    path: path.to_path_buf(),
                })
            }
        })
    }
}

/// `paths` with each glob (a path that does not exist and holds `*`, `?` or `[`) replaced by the
/// files it matches, sorted.
fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::with_capacity(paths.len());
    for path in paths {
        let text = path.to_string_lossy();
        if path.exists() || !text.contains(['*', '?', '[']) {
            out.push(path.clone());
            continue;
        }
        let bad = |reason: String| DataError::NotText {
            path: path.clone(),
            reason,
        };
        let matches = glob::glob(&text).map_err(|e| bad(format!("not a valid glob: {e}")))?;
        let mut found: Vec<PathBuf> = matches.filter_map(Result::ok).collect();
        if found.is_empty() {
            return Err(DataError::NoMatch {
                pattern: text.into_owned(),
            });
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// A `.json` array, read through `reader`'s checks (a NUL byte is refused as in any text file).
fn read_json(reader: &mut Reader, field: &str, sink: &mut Counted) -> Result<(), DataError> {
    let path = reader.path;
    let read = super::records::read_json_array(path, &mut *reader, field, sink);
    match reader.failed.take() {
        Some(e) => Err(e),
        None => read,
    }
}

fn is_blank(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok_and(|s| s.trim().is_empty())
}

/// Splits on blank lines. A paragraph's lines are passed on with their line breaks as written,
/// and validated as UTF-8 as one document, so a bad byte costs one document, not the file. A line
/// longer than [`READ_BYTES`] is passed on in parts as it is read (it is taken as not blank).
fn read_txt(reader: &mut Reader, sink: &mut Counted) -> Result<(), DataError> {
    let mut doc: Option<Doc> = None;
    // The current line's bytes not yet passed on, and whether earlier parts of it were.
    let mut line: Vec<u8> = Vec::new();
    let mut long = false;
    loop {
        let buf = reader.fill()?;
        if buf.is_empty() {
            break;
        }
        let (used, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                (i + 1, true)
            }
            None => {
                line.extend_from_slice(buf);
                (buf.len(), false)
            }
        };
        reader.consume(used);
        if complete {
            if long || !is_blank(&line) {
                let d = doc.get_or_insert_with(|| Doc::new(true));
                d.feed(&line, sink)?;
                d.feed(b"\n", sink)?;
            } else if let Some(d) = doc.take() {
                d.finish(sink)?;
            }
            line.clear();
            long = false;
        } else if line.len() >= READ_BYTES {
            doc.get_or_insert_with(|| Doc::new(true))
                .feed(&line, sink)?;
            line.clear();
            long = true;
        }
        if sink.sink.full() {
            return Ok(());
        }
    }
    if long || !is_blank(&line) {
        doc.get_or_insert_with(|| Doc::new(true))
            .feed(&line, sink)?;
    }
    if let Some(d) = doc {
        d.finish(sink)?;
    }
    Ok(())
}

/// One JSON object per line. A line up to [`LINE_BYTES`] is parsed whole by serde_json; a longer
/// one goes through the streaming scanner, which passes its text on as it is decoded.
fn read_jsonl(reader: &mut Reader, field: &str, sink: &mut Counted) -> Result<(), DataError> {
    let path = reader.path;
    let mut line: Vec<u8> = Vec::new();
    let mut number = 1;
    loop {
        let buf = reader.fill()?;
        if buf.is_empty() {
            break;
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                reader.consume(i + 1);
                jsonl_line(path, number, &line, field, sink)?;
                line.clear();
                number += 1;
            }
            None => {
                let n = buf.len();
                line.extend_from_slice(buf);
                reader.consume(n);
                if line.len() > LINE_BYTES {
                    let mut scan = super::jsonl::Scan::new(path, number, field);
                    scan.feed(&line, sink)?;
                    line.clear();
                    // The rest of the line, as it is read.
                    loop {
                        if sink.sink.full() {
                            return Ok(());
                        }
                        let buf = reader.fill()?;
                        let newline = buf.iter().position(|&b| b == b'\n');
                        let used = newline.unwrap_or(buf.len());
                        let end = newline.is_some() || buf.is_empty();
                        scan.feed(&buf[..used], sink)?;
                        // The line's bytes and its newline, if any.
                        reader.consume(used + usize::from(newline.is_some()));
                        if end {
                            break;
                        }
                    }
                    scan.finish(sink)?;
                    number += 1;
                }
            }
        }
        if sink.sink.full() {
            return Ok(());
        }
    }
    if !line.is_empty() {
        jsonl_line(path, number, &line, field, sink)?;
    }
    Ok(())
}

/// One whole `.jsonl` line, parsed by serde_json.
fn jsonl_line(
    path: &Path,
    number: usize,
    line: &[u8],
    field: &str,
    sink: &mut Counted,
) -> Result<(), DataError> {
    if is_blank(line) {
        return Ok(());
    }
    let Ok(line) = std::str::from_utf8(line) else {
        sink.skipped += 1;
        return Ok(());
    };
    let value: Json = serde_json::from_str(line).map_err(|e| DataError::BadJson {
        path: path.to_path_buf(),
        line: number,
        reason: json_reason(&e),
    })?;
    object_text(path, number, value, field, sink)
}

/// A record's text field as one document: `value` (from line or element `number`) must be an
/// object whose `field` is a string.
pub(crate) fn object_text(
    path: &Path,
    number: usize,
    value: Json,
    field: &str,
    sink: &mut Counted,
) -> Result<(), DataError> {
    let Json::Object(mut object) = value else {
        return Err(DataError::NotAnObject {
            path: path.to_path_buf(),
            line: number,
            found: json_type(&value),
        });
    };
    match object.remove(field) {
        None => Err(DataError::MissingField {
            path: path.to_path_buf(),
            line: number,
            field: field.to_string(),
        }),
        Some(Json::String(text)) => {
            let mut doc = Doc::new(false);
            doc.feed(text.as_bytes(), sink)?;
            doc.finish(sink)
        }
        Some(turns @ Json::Array(_)) => conversation(path, number, field, turns, sink),
        Some(other) => Err(DataError::NotAString {
            path: path.to_path_buf(),
            line: number,
            field: field.to_string(),
            found: json_type(&other),
        }),
    }
}

/// A record's list of `{"role", "content"}` turns as one document, rendered with the model's chat
/// template.
fn conversation(
    path: &Path,
    number: usize,
    field: &str,
    turns: Json,
    sink: &mut Counted,
) -> Result<(), DataError> {
    let chat = |reason: String| DataError::Chat {
        path: path.to_path_buf(),
        line: number,
        reason,
    };
    let messages: Vec<Message> = serde_json::from_value(turns).map_err(|e| {
        chat(format!(
            "field `{field}` is not a list of {{\"role\", \"content\"}} turns with text content ({})",
            json_reason(&e)
        ))
    })?;
    send_conversation(&messages, sink).map_err(chat)
}

/// `messages` to the sink as one document, counted; the reason when it cannot be.
pub(crate) fn send_conversation(messages: &[Message], sink: &mut Counted) -> Result<(), String> {
    match sink.sink.conversation(messages) {
        Ok(()) => {
            sink.documents += 1;
            Ok(())
        }
        Err(Conversation::Failed(reason)) => Err(reason),
        Err(Conversation::NoTokenizer) => {
            Err("a conversation, which only a model's tokenizer can render".into())
        }
    }
}

/// One document's text on its way to the sink: validated as UTF-8 as it comes (a character may
/// straddle two parts), trimmed (`.txt`) or dropped when all whitespace (`.jsonl`), with the
/// whitespace whose fate is not known yet held back (at most [`HOLD_BYTES`]).
pub(crate) struct Doc {
    trim: bool,
    /// A non-whitespace character has been passed on.
    started: bool,
    hold: String,
    /// The start of a character whose other bytes have not arrived yet.
    carry: Vec<u8>,
    bad: bool,
}

impl Doc {
    pub(crate) fn new(trim: bool) -> Doc {
        Doc {
            trim,
            started: false,
            hold: String::new(),
            carry: Vec::new(),
            bad: false,
        }
    }

    pub(crate) fn feed(&mut self, mut bytes: &[u8], sink: &mut Counted) -> Result<(), DataError> {
        if self.bad {
            return Ok(());
        }
        // Complete a character begun in the previous part.
        while !self.carry.is_empty() && !bytes.is_empty() {
            self.carry.push(bytes[0]);
            bytes = &bytes[1..];
            match std::str::from_utf8(&self.carry) {
                Ok(s) => {
                    let s = s.to_string();
                    self.carry.clear();
                    self.text(&s, sink)?;
                }
                Err(e) if e.error_len().is_some() => {
                    self.reject(sink);
                    return Ok(());
                }
                Err(_) => {}
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(s) => self.text(s, sink),
            Err(e) if e.error_len().is_none() => {
                let (good, rest) = bytes.split_at(e.valid_up_to());
                self.carry.extend_from_slice(rest);
                // `good` is valid UTF-8 up to `valid_up_to`.
                self.text(std::str::from_utf8(good).unwrap_or_default(), sink)
            }
            Err(_) => {
                self.reject(sink);
                Ok(())
            }
        }
    }

    /// The document is not valid UTF-8: what it sent is discarded, and it is counted as skipped
    /// when it finishes.
    pub(crate) fn reject(&mut self, sink: &mut Counted) {
        if self.started && !self.bad {
            sink.sink.discard();
        }
        self.bad = true;
    }

    fn text(&mut self, mut s: &str, sink: &mut Counted) -> Result<(), DataError> {
        if !self.started {
            if self.trim {
                s = s.trim_start();
            } else if s.trim_start().is_empty() {
                return self.hold(s, sink);
            }
            if s.is_empty() {
                return Ok(());
            }
            self.started = true;
        }
        if !self.trim {
            if !self.hold.is_empty() {
                sink.sink.text(&std::mem::take(&mut self.hold))?;
            }
            return sink.sink.text(s);
        }
        // Trailing whitespace is held until text follows it (or dropped at the end).
        let body = s.trim_end();
        if !body.is_empty() {
            if !self.hold.is_empty() {
                sink.sink.text(&std::mem::take(&mut self.hold))?;
            }
            sink.sink.text(body)?;
        }
        self.hold(&s[body.len()..], sink)
    }

    fn hold(&mut self, s: &str, sink: &mut Counted) -> Result<(), DataError> {
        self.hold.push_str(s);
        if self.hold.len() > HOLD_BYTES {
            self.started = true;
            sink.sink.text(&std::mem::take(&mut self.hold))?;
        }
        Ok(())
    }

    pub(crate) fn finish(self, sink: &mut Counted) -> Result<(), DataError> {
        if self.bad || !self.carry.is_empty() {
            let mut doc = self;
            doc.reject(sink);
            sink.skipped += 1;
            return Ok(());
        }
        if self.started {
            sink.documents += 1;
            sink.sink.end()?;
        }
        Ok(())
    }
}

/// Collects whole texts ([`read_documents`]).
#[derive(Default)]
struct Collect {
    texts: Vec<String>,
    current: String,
}

impl Sink for Collect {
    fn text(&mut self, text: &str) -> Result<(), DataError> {
        self.current.push_str(text);
        Ok(())
    }

    fn end(&mut self) -> Result<(), DataError> {
        self.texts.push(std::mem::take(&mut self.current));
        Ok(())
    }

    fn discard(&mut self) {
        self.current.clear();
    }

    fn full(&self) -> bool {
        false
    }

    fn conversation(&mut self, _: &[Message]) -> Result<(), Conversation> {
        Err(Conversation::NoTokenizer)
    }
}

/// Tokenizes documents into one stream as their text arrives, in pieces of at most
/// [`PIECE_BYTES`] ([`read_tokens`], [`token_stream`]).
struct Tokens<'a> {
    tok: &'a TextTokenizer,
    limit: Option<usize>,
    stream: Vec<u32>,
    /// Where the current document's tokens start in `stream`.
    doc_start: usize,
    /// The current document's text not tokenized yet.
    pending: String,
    /// Pieces of the current document tokenized so far.
    pieces: usize,
    documents: usize,
    /// The special tokens the post-processor puts before and after a text, found on first need.
    specials: Option<(Vec<u32>, Vec<u32>)>,
    /// Whether each token of `stream` carries the loss, when that is asked ([`LossOn::Assistant`]).
    trained: Option<Vec<bool>>,
}

impl<'a> Tokens<'a> {
    fn new(tok: &'a TextTokenizer, limit: Option<usize>) -> Tokens<'a> {
        Tokens {
            tok,
            limit,
            stream: Vec::new(),
            doc_start: 0,
            pending: String::new(),
            pieces: 0,
            documents: 0,
            specials: None,
            trained: None,
        }
    }

    /// Marks the tokens added to the stream since the last mark as trained or not.
    fn mark(&mut self, trained: bool) {
        let len = self.stream.len();
        if let Some(t) = &mut self.trained {
            t.resize(len, trained);
        }
    }

    fn encode_error(&self, source: TextTokenizerError) -> DataError {
        DataError::Tokenize {
            index: self.documents,
            source,
        }
    }

    /// The ids the post-processor adds before and after a text: a probe encoded with and
    /// without them, the plain ids located inside the full ones.
    fn specials(&mut self) -> Result<(Vec<u32>, Vec<u32>), DataError> {
        if let Some(s) = &self.specials {
            return Ok(s.clone());
        }
        let probe = "a";
        let full = self.tok.encode(probe).map_err(|e| self.encode_error(e))?;
        let plain = self
            .tok
            .encode_plain(probe)
            .map_err(|e| self.encode_error(e))?;
        let found = (0..=full.len().saturating_sub(plain.len()))
            .find(|&i| full.get(i..i + plain.len()) == Some(&plain[..]))
            .map(|i| (full[..i].to_vec(), full[i + plain.len()..].to_vec()))
            .unwrap_or_default();
        self.specials = Some(found.clone());
        Ok(found)
    }

    /// Tokenizes the pending text's first piece.
    fn piece(&mut self) -> Result<(), DataError> {
        let cut = cut_point(&self.pending, PIECE_BYTES);
        if self.pieces == 0 {
            let (before, _) = self.specials()?;
            self.stream.extend_from_slice(&before);
        }
        let ids = self
            .tok
            .encode_plain(&self.pending[..cut])
            .map_err(|e| self.encode_error(e))?;
        self.stream.extend_from_slice(&ids);
        self.mark(true);
        self.pending.drain(..cut);
        self.pieces += 1;
        Ok(())
    }

    fn finish(self, skipped_invalid_utf8: usize) -> Result<TokenStream, DataError> {
        if self.stream.len() < 2 {
            return Err(DataError::TooShort {
                tokens: self.stream.len(),
            });
        }
        Ok(TokenStream {
            tokens: self.stream,
            trained: self.trained,
            documents: self.documents + usize::from(self.pieces > 0),
            skipped_invalid_utf8,
        })
    }
}

impl Sink for Tokens<'_> {
    fn text(&mut self, text: &str) -> Result<(), DataError> {
        // Past the limit the rest of a document is not kept, let alone tokenized.
        if self.full() {
            return Ok(());
        }
        self.pending.push_str(text);
        while self.pending.len() > PIECE_BYTES && !self.full() {
            self.piece()?;
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), DataError> {
        let text = std::mem::take(&mut self.pending);
        if self.full() {
            // The limit was reached inside this document: what is left of it is not needed
            // (tokenizing a 1 MB remainder whole would cost 200 MB).
            self.documents += usize::from(self.pieces > 0);
            self.pieces = 0;
            self.doc_start = self.stream.len();
            return Ok(());
        }
        if self.pieces == 0 {
            // A document of one piece is encoded whole, exactly as `tokenizer(text)` does.
            let ids = self.tok.encode(&text).map_err(|e| self.encode_error(e))?;
            self.stream.extend_from_slice(&ids);
        } else {
            let ids = self
                .tok
                .encode_plain(&text)
                .map_err(|e| self.encode_error(e))?;
            self.stream.extend_from_slice(&ids);
            let (_, after) = self.specials()?;
            self.stream.extend_from_slice(&after);
        }
        self.stream.extend(self.tok.eos);
        self.mark(true);
        self.pieces = 0;
        self.documents += 1;
        self.doc_start = self.stream.len();
        Ok(())
    }

    fn discard(&mut self) {
        self.stream.truncate(self.doc_start);
        if let Some(t) = &mut self.trained {
            t.truncate(self.doc_start);
        }
        self.pending.clear();
        self.pieces = 0;
    }

    fn full(&self) -> bool {
        self.limit.is_some_and(|l| self.stream.len() >= l)
    }

    /// Tokenized as [`TextTokenizer::encode_chat`] does; EOS follows, as after every document.
    fn conversation(&mut self, messages: &[Message]) -> Result<(), Conversation> {
        if self.full() {
            return Ok(());
        }
        let failed = |e: crate::tokenizer::chat::ChatError| Conversation::Failed(e.to_string());
        if let Some(trained) = &mut self.trained {
            let (ids, assistant) = self.tok.encode_chat_assistant(messages).map_err(failed)?;
            self.stream.extend_from_slice(&ids);
            trained.extend(assistant);
        } else {
            let ids = self.tok.encode_chat(messages, false).map_err(failed)?;
            self.stream.extend_from_slice(&ids);
        }
        self.stream.extend(self.tok.eos);
        self.mark(false);
        self.documents += 1;
        self.doc_start = self.stream.len();
        Ok(())
    }
}

/// Where to end a piece of at most `max` bytes of `text`: before the last whitespace character
/// that is followed by a non-whitespace one in the second half (where the word-splitting
/// pre-tokenizers split anyway), else at the last character boundary.
fn cut_point(text: &str, max: usize) -> usize {
    let bytes = text.as_bytes();
    let end = max.min(bytes.len().saturating_sub(1));
    let at_word = (max / 2..end)
        .rev()
        .find(|&i| bytes[i].is_ascii_whitespace() && !bytes[i + 1].is_ascii_whitespace());
    match at_word {
        Some(i) if i > 0 => i,
        _ => {
            let mut i = max.min(bytes.len());
            while i > 0 && !text.is_char_boundary(i) {
                i -= 1;
            }
            i.max(text.chars().next().map_or(0, char::len_utf8))
        }
    }
}

/// serde_json's message with the column, without its "at line 1" (each line is parsed alone;
/// the file's line number is in the error already).
pub(crate) fn json_reason(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let message = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m);
    format!("{message} at column {}", e.column())
}

pub(crate) fn json_type(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// One window of a token stream, scoring the next tokens of its last `targets.len()` inputs:
/// `targets[j]` is the token that follows `inputs[context() + j]`. The first [`Window::context`]
/// inputs are context only (strided windows, a task's context); in [`windows`]' windows there are
/// none, and `targets[j]` follows `inputs[j]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Window {
    /// The number of leading inputs whose next token is not scored.
    pub fn context(&self) -> usize {
        self.inputs.len().saturating_sub(self.targets.len())
    }
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

/// Strided windows (`eval --stride`), the standard strided perplexity: windows of `seq_len`
/// inputs starting every `stride` tokens, each scoring only the targets no earlier window scored,
/// with the tokens before them as context. Window `k` reads `stream[k*S .. k*S+T]` (shorter at
/// the end) and scores the targets after `stream[(k-1)*S+T ..]`, so every token after the first
/// is scored exactly once, as by [`windows`], but with at least `T - S` tokens of context after
/// the first window (which scores all of its `T`). `stride == seq_len` gives [`windows`]'
/// windows; `stride` is clamped to `1..=seq_len` (callers refuse other values first).
/// `max_tokens` caps the scored tokens.
///
/// llama.cpp's `llama-perplexity --ppl-stride S -c T` scores the same targets with the same
/// context, except that its first window scores only its last S targets; its default mode (no
/// `--ppl-stride`) is not a stride: non-overlapping chunks of T tokens whose second half is
/// scored with the first half as context.
pub fn strided_windows(
    stream: &[u32],
    seq_len: usize,
    stride: usize,
    max_tokens: Option<usize>,
) -> Windows {
    let available = stream.len().saturating_sub(1);
    let n_targets = max_tokens.map_or(available, |m| m.min(available));
    let stride = stride.clamp(1, seq_len.max(1));
    let mut windows = Vec::new();
    // Targets after stream[..scored] have not been scored yet.
    let (mut start, mut scored) = (0, 0);
    while seq_len > 0 && scored < n_targets {
        let end = (start + seq_len).min(n_targets);
        windows.push(Window {
            inputs: stream[start..end].to_vec(),
            targets: stream[scored + 1..end + 1].to_vec(),
        });
        scored = end;
        start += stride;
    }
    Windows { windows, seq_len }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txt(text: &[u8]) -> Documents {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, text).unwrap();
        read_documents(&[path], None).unwrap()
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
    fn strided_windows_score_each_target_once_with_context() {
        let stream: Vec<u32> = (0..10).collect();
        let w = strided_windows(&stream, 4, 2, None);
        let parts: Vec<(&[u32], &[u32])> = w
            .windows
            .iter()
            .map(|w| (&w.inputs[..], &w.targets[..]))
            .collect();
        // Window 0 scores all of its 4 targets; each later one its last 2, after 2 of context;
        // the last one is cut short where the stream ends.
        assert_eq!(
            parts,
            [
                (&[0, 1, 2, 3][..], &[1, 2, 3, 4][..]),
                (&[2, 3, 4, 5][..], &[5, 6][..]),
                (&[4, 5, 6, 7][..], &[7, 8][..]),
                (&[6, 7, 8][..], &[9][..]),
            ]
        );
        assert_eq!(w.windows[1].context(), 2);
        assert_eq!(w.n_targets(), 9);
        assert_eq!(
            strided_windows(&stream, 4, 4, None),
            windows(&stream, 4, None)
        );
        assert_eq!(strided_windows(&stream, 4, 1, Some(5)).n_targets(), 5);
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
