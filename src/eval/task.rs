//! Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness scores its
//! `multiple_choice` tasks: each choice's continuation is scored after the context, and an example
//! counts as right when the gold choice has the highest summed log-likelihood (`acc`), the highest
//! per character of the choice (`acc_norm`) or per UTF-8 byte (`acc_bytes`).
//!
//! The task file, one JSON object a line (blank lines skipped, other fields ignored):
//!
//! ```text
//! {"context": "The capital of France is", "choices": ["Paris", "London"], "gold": 0}
//! ```
//!
//! `gold` is the index of the right choice. The continuation scored is `target_delimiter` (a
//! field, `" "` unless given, lm-eval's default) followed by the choice; a choice that already
//! starts with the delimiter (the spelling of lm-eval's requests, `" Paris"`) is taken as is, so
//! `"Paris"` and `" Paris"` are the same choice. The lengths `acc_norm` and `acc_bytes` divide by
//! are the choice's without the delimiter (lm-eval's `len(choice)` and `len(choice.encode())`).
//!
//! Tokens, as lm-eval's Hugging Face model does (`HFLM._encode_pair` and `loglikelihood`):
//! whitespace at the end of the context is moved to the start of the continuation; the context
//! and context + continuation are encoded apart, without the special tokens of the tokenizer's
//! post-processor (lm-eval's default for causal models), and the continuation's tokens are those
//! of the whole past the context's length. The model reads the context's tokens, then the
//! continuation's, and the log-probabilities of the continuation's tokens are summed. An empty
//! context is the model's BOS token (its EOS if it has none). A request longer than `max_len`
//! tokens loses its first tokens, as lm-eval truncates to the model's length.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use serde_json::{Map, Value as Json};

use crate::model::{log_softmax, InitialState, Model, ModelError};
use crate::progress::Progress;
use crate::tokenizer::text::{TextTokenizer, TextTokenizerError};

use super::data::{json_type, Window, LINE_BYTES};
use super::perplexity::EvalError;

/// Why a task file could not be read or turned into requests.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line is not a valid example: bad JSON, a missing or mistyped field, no choices, an empty
    /// choice, gold out of range.
    #[error("{path}:{line}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// The file holds no example.
    #[error("{path}: no examples (one JSON object a line: context, choices, gold)")]
    NoExamples { path: PathBuf },
    /// The tokenizer failed on a line's text.
    #[error("{path}:{line}: {source}")]
    Tokenize {
        path: PathBuf,
        line: usize,
        source: TextTokenizerError,
    },
    /// A choice's continuation has more tokens than the model may read at once.
    #[error(
        "{path}:{line}: choice {choice} is {tokens} tokens long, more than --seq-len {max_len}"
    )]
    TooLong {
        path: PathBuf,
        line: usize,
        choice: usize,
        tokens: usize,
        max_len: usize,
    },
    /// A choice adds no token of its own to the context (it merges into the context's last).
    #[error("{path}:{line}: choice {choice} has no token of its own after the context")]
    NoOwnTokens {
        path: PathBuf,
        line: usize,
        choice: usize,
    },
    /// The context is empty and the model has neither a BOS nor an EOS token to stand for it.
    #[error(
        "{path}:{line}: the context is empty and the model has no BOS or EOS token to begin with"
    )]
    NoPrefix { path: PathBuf, line: usize },
}

/// One choice of an example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The text scored after the context: the delimiter, then the choice.
    pub continuation: String,
    /// The choice's length without the delimiter in characters (`acc_norm`'s divisor).
    pub chars: usize,
    /// The same in UTF-8 bytes (`acc_bytes`'s divisor).
    pub bytes: usize,
}

/// One line of a task file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The line of the file (from 1), for messages.
    pub line: usize,
    pub context: String,
    pub choices: Vec<Choice>,
    /// The index of the right choice.
    pub gold: usize,
}

/// A task file's examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub path: PathBuf,
    pub examples: Vec<Example>,
}

impl Task {
    /// Number of choices in all.
    pub fn n_choices(&self) -> usize {
        self.examples.iter().map(|e| e.choices.len()).sum()
    }
}

/// Reads a task file's examples, the first `limit` of them if given (lm-eval's `--limit`); lines
/// past those are not read.
pub fn read_task(path: &Path, limit: Option<usize>) -> Result<Task, TaskError> {
    let io = |source| TaskError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(crate::paths::open_file(path).map_err(io)?);
    let (mut examples, mut buf, mut line) = (Vec::new(), Vec::new(), 0);
    while limit.is_none_or(|limit| examples.len() < limit) {
        buf.clear();
        // One byte more than a line may hold tells a long line from a full one.
        let read = (&mut reader)
            .take(LINE_BYTES as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if read == 0 {
            break;
        }
        line += 1;
        let at = At { path, line };
        let text = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if text.len() > LINE_BYTES {
            return Err(at.invalid(format!("longer than {} bytes", LINE_BYTES)));
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        examples.push(parse_example(text, &at)?);
    }
    if examples.is_empty() {
        return Err(TaskError::NoExamples {
            path: path.to_path_buf(),
        });
    }
    Ok(Task {
        path: path.to_path_buf(),
        examples,
    })
}

/// Where a line is, for its errors.
struct At<'a> {
    path: &'a Path,
    line: usize,
}

impl At<'_> {
    fn invalid(&self, reason: String) -> TaskError {
        TaskError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line,
            reason,
        }
    }
}

/// One line's example, every field checked.
fn parse_example(text: &[u8], at: &At) -> Result<Example, TaskError> {
    let value: Json = serde_json::from_slice(text).map_err(|e| {
        let message = e.to_string();
        let message = message.rsplit_once(" at line ").map_or(&*message, |m| m.0);
        at.invalid(format!(
            "not valid JSON ({message} at column {})",
            e.column()
        ))
    })?;
    let Json::Object(object) = &value else {
        return Err(at.invalid(format!(
            "expected a JSON object, found {}",
            json_type(&value)
        )));
    };
    let context = string_field(object, "context", at)?.to_string();
    let delimiter = match object.get("target_delimiter") {
        None => " ",
        Some(_) => string_field(object, "target_delimiter", at)?,
    };
    let choices = match object.get("choices") {
        None => return Err(at.invalid("no field `choices`".into())),
        Some(Json::Array(items)) if items.is_empty() => {
            return Err(at.invalid("`choices` is empty: nothing to choose from".into()))
        }
        Some(Json::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(k, item)| choice(item, k, delimiter, at))
            .collect::<Result<Vec<Choice>, TaskError>>()?,
        Some(other) => {
            return Err(at.invalid(format!(
                "`choices` is {}, not an array of strings",
                json_type(other)
            )))
        }
    };
    let gold = gold(object.get("gold"), choices.len(), at)?;
    Ok(Example {
        line: at.line,
        context,
        choices,
        gold,
    })
}

/// A string field that must be there.
fn string_field<'a>(
    object: &'a Map<String, Json>,
    name: &str,
    at: &At,
) -> Result<&'a str, TaskError> {
    match object.get(name) {
        Some(Json::String(s)) => Ok(s),
        Some(other) => Err(at.invalid(format!("`{name}` is {}, not a string", json_type(other)))),
        None => Err(at.invalid(format!("no field `{name}`"))),
    }
}

/// Choice `k`: the delimiter, then its text (less a leading delimiter it already has).
fn choice(item: &Json, k: usize, delimiter: &str, at: &At) -> Result<Choice, TaskError> {
    let Json::String(text) = item else {
        return Err(at.invalid(format!("choice {k} is {}, not a string", json_type(item))));
    };
    let text = text.strip_prefix(delimiter).unwrap_or(text);
    if text.is_empty() {
        // Its length would divide acc_norm's log-likelihood by zero.
        return Err(at.invalid(format!("choice {k} is empty")));
    }
    Ok(Choice {
        continuation: format!("{delimiter}{text}"),
        chars: text.chars().count(),
        bytes: text.len(),
    })
}

/// `gold`: an index into the `n` choices.
fn gold(value: Option<&Json>, n: usize, at: &At) -> Result<usize, TaskError> {
    let value = value.ok_or_else(|| at.invalid("no field `gold`".into()))?;
    let index = value
        .as_u64()
        .and_then(|g| usize::try_from(g).ok())
        .ok_or_else(|| {
            at.invalid(format!(
                "`gold` is {value}, not the index of a choice (an integer from 0)"
            ))
        })?;
    if index >= n {
        return Err(at.invalid(format!(
            "`gold` is {index}, but there are {n} choices (indices 0 to {})",
            n - 1
        )));
    }
    Ok(index)
}

/// A task, and every choice of every example as a window to score, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requests {
    pub task: Task,
    /// Example i's choices, in order, at `windows[starts[i]..]`.
    pub windows: Vec<Window>,
    starts: Vec<usize>,
}

impl Requests {
    /// The longest window's inputs (the pass the memory check needs).
    pub fn longest(&self) -> usize {
        self.windows
            .iter()
            .map(|w| w.inputs.len())
            .max()
            .unwrap_or(0)
    }
}

/// The requests of `task`: each choice a window whose inputs are the context's and the
/// continuation's tokens (less the last), whose targets are the continuation's, at most
/// `max_len` inputs (the first ones dropped).
pub fn requests(task: Task, tok: &TextTokenizer, max_len: usize) -> Result<Requests, TaskError> {
    let mut windows = Vec::with_capacity(task.n_choices());
    let mut starts = Vec::with_capacity(task.examples.len());
    for example in &task.examples {
        starts.push(windows.len());
        for (k, choice) in example.choices.iter().enumerate() {
            let at = |e: PairError| e.at(&task.path, example.line, k, max_len);
            let (context, continuation) =
                encode_pair(tok, &example.context, &choice.continuation).map_err(at)?;
            windows.push(window(context, continuation, max_len).map_err(at)?);
        }
    }
    Ok(Requests {
        task,
        windows,
        starts,
    })
}

/// Why one (context, continuation) pair gave no request.
#[derive(Debug)]
pub enum PairError {
    /// The tokenizer failed.
    Tokenize(TextTokenizerError),
    /// The continuation has no token past the context's.
    NoOwnTokens,
    /// An empty context with neither BOS nor EOS to stand for it.
    NoPrefix,
    /// The continuation has more tokens than a window holds.
    TooLong(usize),
}

impl PairError {
    /// The task error of choice `choice` on `line` of `path`.
    fn at(self, path: &Path, line: usize, choice: usize, max_len: usize) -> TaskError {
        let path = path.to_path_buf();
        match self {
            PairError::Tokenize(source) => TaskError::Tokenize { path, line, source },
            PairError::NoOwnTokens => TaskError::NoOwnTokens { path, line, choice },
            PairError::NoPrefix => TaskError::NoPrefix { path, line },
            PairError::TooLong(tokens) => TaskError::TooLong {
                path,
                line,
                choice,
                tokens,
                max_len,
            },
        }
    }
}

/// Whitespace as Python's `str.isspace` has it (what lm-eval's `rstrip` removes): Unicode's
/// White_Space and the four information separators U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The context's and the continuation's tokens as lm-eval makes them (see the module's doc).
pub fn encode_pair(
    tok: &TextTokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>), PairError> {
    let kept = context.trim_end_matches(is_python_space);
    // lm-eval's _encode_pair: "  " at the context's end belongs to the continuation.
    let continuation = format!("{}{continuation}", &context[kept.len()..]);
    let encode = |text: &str| tok.encode_plain(text).map_err(PairError::Tokenize);
    if kept.is_empty() {
        let prefix = tok.bos.or(tok.eos).ok_or(PairError::NoPrefix)?;
        let continuation = encode(&continuation)?;
        if continuation.is_empty() {
            return Err(PairError::NoOwnTokens);
        }
        return Ok((vec![prefix], continuation));
    }
    let whole = encode(&format!("{kept}{continuation}"))?;
    let context = encode(kept)?;
    let continuation = whole.get(context.len()..).unwrap_or_default().to_vec();
    if continuation.is_empty() {
        return Err(PairError::NoOwnTokens);
    }
    Ok((context, continuation))
}

/// The window scoring `continuation` after `context`: at most `max_len` inputs, as lm-eval's
/// `(context + continuation)[-(max_length + 1):][:-1]`.
fn window(context: Vec<u32>, continuation: Vec<u32>, max_len: usize) -> Result<Window, PairError> {
    if continuation.len() > max_len {
        return Err(PairError::TooLong(continuation.len()));
    }
    let mut inputs = context;
    inputs.extend_from_slice(&continuation);
    inputs.pop();
    let cut = inputs.len().saturating_sub(max_len);
    Ok(Window {
        inputs: inputs.split_off(cut),
        targets: continuation,
    })
}

/// The summed log-likelihood (nats) of every window's targets after its inputs, at recurrence
/// `r`, in the windows' order. Windows run `batch` at a time, longest first (less padding;
/// right-padded and masked, so a window's values do not depend on its neighbours); the initial
/// state of pass i is drawn with seed `seed + i`. `progress` gets the windows done.
pub fn log_likelihoods(
    model: &Model,
    windows: &[Window],
    batch: usize,
    r: usize,
    seed: u64,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<f64>, ModelError> {
    let mut order: Vec<usize> = (0..windows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(windows[i].inputs.len()));
    let mut sums = vec![0.0; windows.len()];
    let mut done = 0;
    for (pass, group) in order.chunks(batch.max(1)).enumerate() {
        let rows: Vec<&Window> = group.iter().map(|&i| &windows[i]).collect();
        let state = InitialState::Seeded(seed.wrapping_add(pass as u64));
        for (&i, sum) in group
            .iter()
            .zip(batch_log_likelihoods(model, &rows, r, state)?)
        {
            sums[i] = sum;
        }
        done += group.len();
        progress(done);
    }
    Ok(sums)
}

/// One pass over `rows` (right-padded): each row's summed target log-probabilities.
fn batch_log_likelihoods(
    model: &Model,
    rows: &[&Window],
    r: usize,
    state: InitialState,
) -> Result<Vec<f64>, ModelError> {
    let t = rows.iter().map(|w| w.inputs.len()).max().unwrap_or(0);
    let b = rows.len();
    let (mut ids, mut mask, mut targets) = (
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
        Vec::with_capacity(b * t),
    );
    for w in rows {
        let pad = t - w.inputs.len();
        ids.extend(w.inputs.iter().copied().chain(std::iter::repeat_n(0, pad)));
        mask.extend(std::iter::repeat_n(1u32, w.inputs.len()).chain(std::iter::repeat_n(0, pad)));
        targets.extend(
            std::iter::repeat_n(0, w.context())
                .chain(w.targets.iter().copied())
                .chain(std::iter::repeat_n(0, pad)),
        );
    }
    let device = model.device();
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let mask = Tensor::from_vec(mask, (b, t), device)?;
    let padded = rows.iter().any(|w| w.inputs.len() < t);
    let targets = Tensor::from_vec(targets, (b, t, 1), device)?;
    let logits = model.forward(&ids, padded.then_some(&mask), r, state, None)?;
    // (B, T, V) -> log-probabilities of the targets, (B, T)
    let picked = log_softmax(&logits.to_dtype(DType::F32)?)?
        .gather(&targets, D::Minus1)?
        .squeeze(D::Minus1)?
        .to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(picked)
        .map(|(w, row)| {
            row.iter()
                .skip(w.context())
                .take(w.targets.len())
                .map(|&p| f64::from(p))
                .sum()
        })
        .collect())
}

/// A task's accuracies at one recurrence (lm-eval's metric names).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskRow {
    /// None for a static model (no recurrence).
    pub r: Option<usize>,
    pub examples: usize,
    /// Share of examples whose gold choice has the highest log-likelihood.
    pub acc: f64,
    /// Its standard error (lm-eval's: sample standard deviation over sqrt(n)).
    pub acc_stderr: f64,
    /// The same with each log-likelihood divided by the choice's length in characters.
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
    /// The same divided by the choice's length in UTF-8 bytes.
    pub acc_bytes: f64,
    pub acc_bytes_stderr: f64,
    pub seconds: f64,
}

/// The task's accuracies from each choice's log-likelihood (`lls`, in the windows' order).
pub fn score(requests: &Requests, lls: &[f64], r: Option<usize>, seconds: f64) -> TaskRow {
    let task = &requests.task;
    let mut hits = [Vec::new(), Vec::new(), Vec::new()];
    for (example, &start) in task.examples.iter().zip(&requests.starts) {
        let lls = lls.get(start..).unwrap_or_default();
        let picks = [
            argmax(example.choices.iter().zip(lls).map(|(_, &ll)| ll)),
            argmax(
                example
                    .choices
                    .iter()
                    .zip(lls)
                    .map(|(c, &ll)| ll / c.chars as f64),
            ),
            argmax(
                example
                    .choices
                    .iter()
                    .zip(lls)
                    .map(|(c, &ll)| ll / c.bytes as f64),
            ),
        ];
        for (hit, pick) in hits.iter_mut().zip(picks) {
            hit.push(if pick == example.gold { 1.0 } else { 0.0 });
        }
    }
    let [(acc, acc_stderr), (acc_norm, acc_norm_stderr), (acc_bytes, acc_bytes_stderr)] =
        hits.map(|h| mean_stderr(&h));
    TaskRow {
        r,
        examples: task.examples.len(),
        acc,
        acc_stderr,
        acc_norm,
        acc_norm_stderr,
        acc_bytes,
        acc_bytes_stderr,
        seconds,
    }
}

/// The index of the largest value, the first of equal ones, as numpy's argmax.
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in values.enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i)
}

/// The mean and lm-eval's standard error of the mean: sqrt(sum (x - mean)^2 / (n - 1)) / sqrt(n)
/// (0 for a single value).
fn mean_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// [`score`] at each r in turn, each pass reported to `progress` as "{label}r=R" in choices.
pub fn rows(
    model: &Model,
    requests: &Requests,
    rs: &[usize],
    batch: usize,
    seed: u64,
    label: &str,
    progress: &mut dyn Progress,
) -> Result<Vec<TaskRow>, EvalError> {
    let mut rows = Vec::with_capacity(rs.len());
    for &r in rs {
        progress.start(&format!("{label}r={r}"), requests.windows.len() as u64);
        let started = Instant::now();
        let lls = log_likelihoods(model, &requests.windows, batch, r, seed, &mut |done| {
            progress.advance(done as u64)
        })
        .map_err(|source| EvalError { r, source })?;
        progress.finish();
        let r = model.is_recurrent().then_some(r);
        rows.push(score(requests, &lls, r, started.elapsed().as_secs_f64()));
    }
    Ok(rows)
}
