//! GGUF vocabulary to Hugging Face `tokenizer.json` and `tokenizer_config.json`.
//!
//! A GGUF file carries its tokenizer as `tokenizer.ggml.*` metadata, and llama.cpp's
//! src/llama-vocab.cpp decides from it how text is split. When `apply` reads a GGUF source it
//! writes a `tokenizer.json` built here, so that Hugging Face tooling tokenizes exactly as
//! llama.cpp does with the same file:
//!
//! - `tokenizer.ggml.model = "gpt2"` (byte-level BPE, `LLAMA_VOCAB_TYPE_BPE`) becomes a `BPE`
//!   model with the GGUF's vocabulary and merges in rank order, no byte fallback, and no unknown
//!   token (llama.cpp's BPE session silently drops a piece it cannot find, and so does
//!   tokenizers' BPE when `unk_token` is null).
//! - `tokenizer.ggml.pre` picks llama.cpp's list of split regexes (`llm_tokenizer_bpe`'s
//!   constructor). llama.cpp applies them one after the other, keeping matches and the text
//!   between them as separate words, then maps each word's bytes to the GPT-2 byte alphabet;
//!   that is a `Sequence` of `Split { behavior: Isolated }` followed by a `ByteLevel`
//!   pre-tokenizer with `use_regex: false` (tokenizers' pre_tokenizers/byte_level.rs).
//! - Tokens typed CONTROL, USER_DEFINED or UNKNOWN become added tokens: llama.cpp's
//!   `tokenizer_st_partition` cuts them out of the text before the regexes run, as tokenizers'
//!   `AddedVocabulary` does.
//! - BOS/EOS insertion follows `tokenizer.ggml.add_bos_token` / `add_eos_token`, else
//!   llama.cpp's default for the pre-tokenizer type, as a `TemplateProcessing` post-processor.
//!
//! - `tokenizer.ggml.model = "llama"` (SentencePiece, `LLAMA_VOCAB_TYPE_SPM`) becomes a byte-
//!   fallback BPE model whose merges are ranked by `tokenizer.ggml.scores`, with llama.cpp's
//!   space handling as normalizer (see [`crate::tokenizer::spm`]).
//!
//! WordPiece (`bert`), Unigram (`t5`) and RWKV vocabularies are refused with
//! [`TokenizerError::Unsupported`]: their llama.cpp tokenizers are not BPE, and an approximate
//! tokenizer.json would be worse than none.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use serde_json::{json, Map, Value as Json};

use crate::formats::gguf::{GgufFile, Value};
use crate::tokenizer::spm::{merges_from_scores, KEY_ADD_SPACE_PREFIX, KEY_SCORES, SPACE};

/// `tokenizer.ggml.model`: the tokenizer family (llama-vocab.cpp `LLM_KV_TOKENIZER_MODEL`).
pub(crate) const KEY_MODEL: &str = "tokenizer.ggml.model";
/// `tokenizer.ggml.pre`: the pre-tokenizer type of a BPE vocabulary.
pub(crate) const KEY_PRE: &str = "tokenizer.ggml.pre";
/// `tokenizer.ggml.tokens`: token texts, indexed by id.
pub(crate) const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
/// `tokenizer.ggml.token_type`: llama.cpp's `llama_token_type` per token.
pub(crate) const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
/// `tokenizer.ggml.merges`: BPE merges as `"left right"`, highest priority first.
pub(crate) const KEY_MERGES: &str = "tokenizer.ggml.merges";
/// `tokenizer.ggml.add_bos_token`.
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
/// `tokenizer.ggml.add_eos_token`.
pub(crate) const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
/// `tokenizer.ggml.bos_token_id`.
pub(crate) const KEY_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
/// `tokenizer.ggml.eos_token_id`.
pub(crate) const KEY_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
/// `tokenizer.ggml.unknown_token_id`.
pub(crate) const KEY_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
/// `tokenizer.ggml.padding_token_id`.
pub(crate) const KEY_PAD_ID: &str = "tokenizer.ggml.padding_token_id";
/// `tokenizer.chat_template`: a Jinja template, copied as is.
pub(crate) const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// llama.h `LLAMA_TOKEN_TYPE_UNKNOWN`.
const TOKEN_TYPE_UNKNOWN: i64 = 2;
/// llama.h `LLAMA_TOKEN_TYPE_CONTROL`.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.h `LLAMA_TOKEN_TYPE_USER_DEFINED`.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Why a GGUF vocabulary could not be turned into a tokenizer.json.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key the tokenizer needs is absent.
    #[error("GGUF metadata has no `{key}`, which a tokenizer.json needs")]
    MissingKey { key: &'static str },
    /// A metadata key holds a value of the wrong type.
    #[error("GGUF metadata `{key}` is not {expected}")]
    WrongType {
        key: &'static str,
        expected: &'static str,
    },
    /// One element of a metadata array holds a value of the wrong type.
    #[error("GGUF metadata `{key}`[{index}] is not {expected}")]
    WrongElement {
        key: &'static str,
        index: usize,
        expected: &'static str,
    },
    /// A tokenizer family llama.cpp knows but this converter does not (WordPiece, Unigram, ...).
    #[error("`tokenizer.ggml.model` = `{model}` is not supported: only `gpt2` (byte-level BPE) and `llama` (SentencePiece BPE) vocabularies convert to tokenizer.json")]
    Unsupported { model: String },
    /// A tokenizer family llama.cpp does not know either.
    #[error("`tokenizer.ggml.model` = `{model}` is not a tokenizer type llama.cpp knows (expected `gpt2` or `llama`)")]
    UnknownModel { model: String },
    /// A pre-tokenizer type that is unknown or not (yet) translated.
    #[error("`tokenizer.ggml.pre` = `{pre}` is not supported; supported: {supported}")]
    UnsupportedPre { pre: String, supported: String },
    /// An array that must have one entry per token has another length.
    #[error("GGUF metadata `{key}` has {len} entries for {n_tokens} tokens")]
    LengthMismatch {
        key: &'static str,
        len: usize,
        n_tokens: usize,
    },
    /// Two ids share one token text (llama.cpp asserts against it at load).
    #[error("token {id} `{text}` repeats token {first} in `tokenizer.ggml.tokens`")]
    DuplicateToken {
        id: usize,
        first: usize,
        text: String,
    },
    /// A merge is not two tokens separated by a space.
    #[error(
        "merge {index} `{merge}` in `tokenizer.ggml.merges` is not two tokens separated by a space"
    )]
    BadMerge { index: usize, merge: String },
    /// A merge names, or produces, a token the vocabulary lacks.
    #[error("merge {index} `{merge}` in `tokenizer.ggml.merges` needs `{token}`, which is not in the vocabulary")]
    MergeOutOfVocab {
        index: usize,
        merge: String,
        token: String,
    },
    /// A special token id points outside the vocabulary.
    #[error("GGUF metadata `{key}` = {id} is outside the vocabulary of {n_tokens} tokens")]
    TokenIdOutOfRange {
        key: &'static str,
        id: u64,
        n_tokens: usize,
    },
    /// The vocabulary has more ids than tokenizer.json's u32 can hold.
    #[error("`tokenizer.ggml.tokens` has {0} tokens, more than a u32 id can address")]
    TooManyTokens(usize),
    /// The tokenizers crate refused the tokenizer.json built here (a bug in this module).
    #[error("the tokenizer.json built from the GGUF does not load in tokenizers: {0}")]
    Rejected(String),
}

/// A pre-tokenizer type, grouped as llama-vocab.cpp's `llm_tokenizer_bpe` groups the regexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreType {
    Default,
    Llama3,
    Falcon,
    Gpt2,
    Starcoder,
    Qwen2,
}

/// How llama.cpp treats one pre-tokenizer type (`llama_vocab::impl::load`).
#[derive(Debug, Clone, Copy)]
struct Pre {
    kind: PreType,
    /// Whole words found in the vocabulary skip the merges (`ignore_merges`).
    ignore_merges: bool,
    /// BOS is prepended unless `tokenizer.ggml.add_bos_token` says otherwise.
    add_bos: bool,
    /// Detokenization cleans spaces before punctuation (`clean_spaces`).
    clean_spaces: bool,
}

/// `tokenizer.ggml.pre` names and what llama.cpp makes of them (llama-vocab.cpp,
/// `llama_vocab::impl::load`, the `tokenizer_pre == ...` chain). Only the groups whose regexes
/// translate one-for-one to tokenizers' Split are listed.
const PRE_NAMES: &[(&str, PreType)] = &[
    ("default", PreType::Default),
    ("llama3", PreType::Llama3),
    ("llama-v3", PreType::Llama3),
    ("llama-bpe", PreType::Llama3),
    ("falcon3", PreType::Llama3),
    ("dbrx", PreType::Llama3),
    ("smaug-bpe", PreType::Llama3),
    ("falcon", PreType::Falcon),
    ("gpt-2", PreType::Gpt2),
    ("phi-2", PreType::Gpt2),
    ("jina-es", PreType::Gpt2),
    ("jina-de", PreType::Gpt2),
    ("gigachat", PreType::Gpt2),
    ("jina-v1-en", PreType::Gpt2),
    ("jina-v2-es", PreType::Gpt2),
    ("jina-v2-de", PreType::Gpt2),
    ("jina-v2-code", PreType::Gpt2),
    ("roberta-bpe", PreType::Gpt2),
    ("mpt", PreType::Gpt2),
    ("olmo", PreType::Gpt2),
    ("jais", PreType::Gpt2),
    ("starcoder", PreType::Starcoder),
    ("refact", PreType::Starcoder),
    ("command-r", PreType::Starcoder),
    ("smollm", PreType::Starcoder),
    ("codeshell", PreType::Starcoder),
    ("exaone", PreType::Starcoder),
    ("minerva-7b", PreType::Starcoder),
    ("qwen2", PreType::Qwen2),
    ("stablelm2", PreType::Qwen2),
    ("megrez", PreType::Qwen2),
];

/// Pre-tokenizer names for which llama.cpp turns `clean_spaces` off (llama-vocab.cpp).
const NO_CLEAN_SPACES: &[&str] = &["command-r", "qwen2", "smollm"];

/// GPT-2's split regex as llama.cpp writes it (`LLAMA_VOCAB_PRE_TYPE_GPT2`). llama.cpp leaves
/// out the trailing `|\s+` of tokenizers' byte_level.rs; an Isolated split keeps unmatched text
/// as its own word anyway, as `unicode_regex_split` does.
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's regex as llama.cpp adapts it: the case-insensitive group spelled out
/// (https://github.com/ggerganov/llama.cpp/pull/6920#issuecomment-2080233989).
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's regex, adapted by llama.cpp like Llama 3's.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreType {
    /// llama.cpp's regexes for this type, applied in order (`llm_tokenizer_bpe::regex_exprs`).
    fn regexes(self) -> &'static [&'static str] {
        match self {
            PreType::Default => &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            PreType::Llama3 => &[LLAMA3_REGEX],
            PreType::Falcon => &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, r"[0-9][0-9][0-9]"],
            PreType::Gpt2 => &[GPT2_REGEX],
            // Digits first, one word each: tokenizers' `Digits { individual_digits: true }`
            // in the Hugging Face SmolLM2/StarCoder tokenizer.json does the same.
            PreType::Starcoder => &[r"\p{N}", GPT2_REGEX],
            PreType::Qwen2 => &[QWEN2_REGEX],
        }
    }
}

/// Resolves `tokenizer.ggml.pre` the way llama.cpp does for a BPE vocabulary. An absent key is
/// llama.cpp's `default` (it warns that quality will degrade, but tokenizes that way).
fn resolve_pre(g: &GgufFile) -> Result<Pre, TokenizerError> {
    let name = match g.get(KEY_PRE) {
        None => "default",
        Some(v) => v.as_str().ok_or(TokenizerError::WrongType {
            key: KEY_PRE,
            expected: "a string",
        })?,
    };
    let kind = PRE_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, kind)| *kind)
        .ok_or_else(|| TokenizerError::UnsupportedPre {
            pre: name.to_string(),
            supported: PRE_NAMES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    // Only the Llama 3 names turn these on; dbrx and smaug share its regex, not its flags.
    let llama3 = matches!(name, "llama3" | "llama-v3" | "llama-bpe" | "falcon3");
    Ok(Pre {
        kind,
        ignore_merges: llama3,
        add_bos: llama3,
        clean_spaces: !NO_CLEAN_SPACES.contains(&name),
    })
}

/// The vocabulary families that convert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `gpt2`: byte-level BPE.
    Bpe,
    /// `llama`: SentencePiece with scores (see [`crate::tokenizer::spm`]).
    Spm,
}

/// Checks `tokenizer.ggml.model`: `gpt2` (byte-level BPE) and `llama` (SentencePiece) convert.
fn check_model(g: &GgufFile) -> Result<Family, TokenizerError> {
    let model = required_str(g, KEY_MODEL)?;
    match model {
        "gpt2" => Ok(Family::Bpe),
        "llama" => Ok(Family::Spm),
        // The families llama-vocab.cpp's load() accepts besides those.
        "bert" | "t5" | "rwkv" | "plamo2" | "no_vocab" | "none" => {
            Err(TokenizerError::Unsupported {
                model: model.to_string(),
            })
        }
        _ => Err(TokenizerError::UnknownModel {
            model: model.to_string(),
        }),
    }
}

fn required_str<'g>(g: &'g GgufFile, key: &'static str) -> Result<&'g str, TokenizerError> {
    g.get(key)
        .ok_or(TokenizerError::MissingKey { key })?
        .as_str()
        .ok_or(TokenizerError::WrongType {
            key,
            expected: "a string",
        })
}

fn required_array<'g>(g: &'g GgufFile, key: &'static str) -> Result<&'g [Value], TokenizerError> {
    g.get(key)
        .ok_or(TokenizerError::MissingKey { key })?
        .as_array()
        .ok_or(TokenizerError::WrongType {
            key,
            expected: "an array",
        })
}

fn optional_bool(g: &GgufFile, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    g.get(key)
        .map(|v| {
            v.as_bool().ok_or(TokenizerError::WrongType {
                key,
                expected: "a bool",
            })
        })
        .transpose()
}

/// Token texts by id. An empty text becomes `[EMPTY_<id>]`, as llama.cpp's load() renames it;
/// a repeated text is an error, as llama.cpp asserts `id_to_token.size() == token_to_id.size()`.
fn read_tokens(g: &GgufFile) -> Result<Vec<String>, TokenizerError> {
    let items = required_array(g, KEY_TOKENS)?;
    if u32::try_from(items.len()).is_err() {
        return Err(TokenizerError::TooManyTokens(items.len()));
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    let mut tokens = Vec::with_capacity(items.len());
    for (id, item) in items.iter().enumerate() {
        let text = item.as_str().ok_or(TokenizerError::WrongElement {
            key: KEY_TOKENS,
            index: id,
            expected: "a string",
        })?;
        if let Some(&first) = seen.get(text) {
            return Err(TokenizerError::DuplicateToken {
                id,
                first,
                text: text.to_string(),
            });
        }
        seen.insert(text, id);
        tokens.push(if text.is_empty() {
            format!("[EMPTY_{id}]")
        } else {
            text.to_string()
        });
    }
    Ok(tokens)
}

/// llama.cpp's token type per id; all NORMAL (1) when the key is absent, as in load().
fn read_token_types(g: &GgufFile, n_tokens: usize) -> Result<Vec<i64>, TokenizerError> {
    let Some(value) = g.get(KEY_TOKEN_TYPE) else {
        return Ok(vec![1; n_tokens]);
    };
    let items = value.as_array().ok_or(TokenizerError::WrongType {
        key: KEY_TOKEN_TYPE,
        expected: "an array",
    })?;
    per_token(items, KEY_TOKEN_TYPE, n_tokens, "an integer", Value::as_i64)
}

/// One value per token from `items` (the array under `key`), converted by `convert`.
fn per_token<T>(
    items: &[Value],
    key: &'static str,
    n_tokens: usize,
    expected: &'static str,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, TokenizerError> {
    if items.len() != n_tokens {
        return Err(TokenizerError::LengthMismatch {
            key,
            len: items.len(),
            n_tokens,
        });
    }
    items
        .iter()
        .enumerate()
        .map(|(index, v)| {
            convert(v).ok_or(TokenizerError::WrongElement {
                key,
                index,
                expected,
            })
        })
        .collect()
}

/// The merges as `[left, right]` pairs, in rank order. llama.cpp splits each at the first space
/// after the first byte (`word.find(' ', 1)`), so a left side may itself start with a space. A
/// repeated pair keeps its first rank (llama.cpp's `bpe_ranks.emplace` ignores the second;
/// tokenizers' builder would let the later rank win). Pairs, not `"a b"` strings: that is what
/// tokenizers >= 0.20 writes, and it cannot be misread when a token holds a space.
fn read_merges(g: &GgufFile, vocab: &HashSet<&str>) -> Result<Vec<Json>, TokenizerError> {
    let items = required_array(g, KEY_MERGES)?;
    let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(items.len());
    let mut merges = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let merge = item.as_str().ok_or(TokenizerError::WrongElement {
            key: KEY_MERGES,
            index,
            expected: "a string",
        })?;
        let (left, right) = split_merge(merge).ok_or_else(|| TokenizerError::BadMerge {
            index,
            merge: merge.to_string(),
        })?;
        let joined = format!("{left}{right}");
        for token in [left, right, joined.as_str()] {
            if !vocab.contains(token) {
                return Err(TokenizerError::MergeOutOfVocab {
                    index,
                    merge: merge.to_string(),
                    token: token.to_string(),
                });
            }
        }
        if seen.insert((left, right)) {
            merges.push(json!([left, right]));
        }
    }
    Ok(merges)
}

/// `"left right"` split at the first space after the first character; None when either side
/// would be empty.
fn split_merge(merge: &str) -> Option<(&str, &str)> {
    let first_len = merge.chars().next()?.len_utf8();
    let pos = merge.get(first_len..)?.find(' ')? + first_len;
    let left = merge.get(..pos)?;
    let right = merge.get(pos + 1..)?;
    (!right.is_empty()).then_some((left, right))
}

/// The added tokens: every CONTROL, USER_DEFINED or UNKNOWN token, which llama.cpp's
/// `cache_special_tokens` holds and `tokenizer_st_partition` matches in the text before the
/// regexes (llama-tokenize parses special tokens by default). CONTROL and UNKNOWN are
/// `special` (skipped when decoding with skip_special_tokens); USER_DEFINED are not, as in the
/// tokenizer.json files llama.cpp's converter reads them from.
fn added_tokens(tokens: &[String], types: &[i64]) -> Vec<Json> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &t))| {
            matches!(
                t,
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED | TOKEN_TYPE_UNKNOWN
            )
        })
        .map(|(id, (content, &t))| {
            json!({
                "id": id,
                "content": content,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": t != TOKEN_TYPE_USER_DEFINED,
            })
        })
        .collect()
}

/// The pre-tokenizer: llama.cpp's regexes as Isolated splits, then the byte-to-unicode map.
fn pre_tokenizer(kind: PreType) -> Json {
    let mut steps: Vec<Json> = kind
        .regexes()
        .iter()
        .map(|re| {
            json!({
                "type": "Split",
                "pattern": { "Regex": re },
                "behavior": "Isolated",
                "invert": false,
            })
        })
        .collect();
    // No prefix space for BPE (llama.cpp sets add_space_prefix = false), and the regex already
    // ran above.
    steps.push(json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": true,
        "use_regex": false,
    }));
    json!({ "type": "Sequence", "pretokenizers": steps })
}

/// The special token id stored under `key`, checked against the vocabulary; None when absent.
fn special_id(
    g: &GgufFile,
    key: &'static str,
    n_tokens: usize,
) -> Result<Option<usize>, TokenizerError> {
    let Some(value) = g.get(key) else {
        return Ok(None);
    };
    let id = value.as_u64().ok_or(TokenizerError::WrongType {
        key,
        expected: "a token id",
    })?;
    match usize::try_from(id) {
        Ok(i) if i < n_tokens => Ok(Some(i)),
        _ => Err(TokenizerError::TokenIdOutOfRange { key, id, n_tokens }),
    }
}

/// BOS/EOS insertion as llama.cpp's `llm_tokenizer_bpe_session::append_bos/append_eos` does
/// it; null when neither is added. The pair template repeats it for the second sequence, like
/// the Llama 3 tokenizer.json.
fn post_processor(
    g: &GgufFile,
    tokens: &[String],
    add_bos: bool,
    add_eos: bool,
) -> Result<Json, TokenizerError> {
    if !add_bos && !add_eos {
        return Ok(Json::Null);
    }
    // (id, text) of the token under `key`, which must be there when it is to be added.
    let lookup = |key: &'static str| -> Result<(usize, &str), TokenizerError> {
        let id = special_id(g, key, tokens.len())?.ok_or(TokenizerError::MissingKey { key })?;
        let text = tokens.get(id).map(String::as_str).unwrap_or_default();
        Ok((id, text))
    };
    let bos = add_bos.then(|| lookup(KEY_BOS_ID)).transpose()?;
    let eos = add_eos.then(|| lookup(KEY_EOS_ID)).transpose()?;
    let template = |seq: &str, type_id: u32| -> Vec<Json> {
        let special =
            |(_, t): (usize, &str)| json!({ "SpecialToken": { "id": t, "type_id": type_id } });
        bos.map(special)
            .into_iter()
            .chain([json!({ "Sequence": { "id": seq, "type_id": type_id } })])
            .chain(eos.map(special))
            .collect()
    };
    let mut pair = template("A", 0);
    pair.extend(template("B", 1));
    let special_tokens: Map<String, Json> = bos
        .into_iter()
        .chain(eos)
        .map(|(id, text)| {
            let entry = json!({ "id": text, "ids": [id], "tokens": [text] });
            (text.to_string(), entry)
        })
        .collect();
    Ok(json!({
        "type": "TemplateProcessing",
        "single": template("A", 0),
        "pair": pair,
        "special_tokens": special_tokens,
    }))
}

/// Builds a Hugging Face `tokenizer.json` from the `tokenizer.ggml.*` metadata of `g`, one that
/// tokenizes as llama.cpp does with the same file (see the module docs). The result has been
/// loaded by the tokenizers crate once before it is returned.
pub fn tokenizer_json_from_gguf(g: &GgufFile) -> Result<Json, TokenizerError> {
    let tokens = read_tokens(g)?;
    let types = read_token_types(g, tokens.len())?;
    let tokenizer = match check_model(g)? {
        Family::Bpe => bpe_tokenizer_json(g, &tokens, &types)?,
        Family::Spm => spm_tokenizer_json(g, &tokens, &types)?,
    };
    // Validate before anyone writes it: a file tokenizers cannot load is a bug here.
    tokenizers::Tokenizer::from_str(&tokenizer.to_string())
        .map_err(|e| TokenizerError::Rejected(e.to_string()))?;
    Ok(tokenizer)
}

fn vocab_map(tokens: &[String]) -> Map<String, Json> {
    tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect()
}

/// A byte-level BPE vocabulary (`gpt2`).
fn bpe_tokenizer_json(
    g: &GgufFile,
    tokens: &[String],
    types: &[i64],
) -> Result<Json, TokenizerError> {
    let pre = resolve_pre(g)?;
    let known: HashSet<&str> = tokens.iter().map(String::as_str).collect();
    let merges = read_merges(g, &known)?;
    let add_bos = optional_bool(g, KEY_ADD_BOS)?.unwrap_or(pre.add_bos);
    let add_eos = optional_bool(g, KEY_ADD_EOS)?.unwrap_or(false);

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre.kind),
        "post_processor": post_processor(g, tokens, add_bos, add_eos)?,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges,
            "vocab": vocab_map(tokens),
            "merges": merges,
        },
    }))
}

/// `tokenizer.ggml.scores`: one number per token.
fn read_scores(g: &GgufFile, n_tokens: usize) -> Result<Vec<f32>, TokenizerError> {
    let items = required_array(g, KEY_SCORES)?;
    per_token(items, KEY_SCORES, n_tokens, "a number", |v| {
        v.as_f64().map(|f| f as f32)
    })
}

/// A SentencePiece vocabulary (`llama`) as byte-fallback BPE with merges ranked by the scores
/// (see [`crate::tokenizer::spm`]), spaces written `▁` by the normalizer (and one put in front of
/// each piece of text unless `add_space_prefix` is false), as llama.cpp's SPM tokenizer does, and
/// the decoder of Hugging Face's Llama tokenizer.json.
fn spm_tokenizer_json(
    g: &GgufFile,
    tokens: &[String],
    types: &[i64],
) -> Result<Json, TokenizerError> {
    let scores = read_scores(g, tokens.len())?;
    // llama.cpp's defaults for SPM (llama_vocab::impl::load).
    let add_bos = optional_bool(g, KEY_ADD_BOS)?.unwrap_or(true);
    let add_eos = optional_bool(g, KEY_ADD_EOS)?.unwrap_or(false);
    let add_space_prefix = optional_bool(g, KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
    let unk = special_id(g, KEY_UNK_ID, tokens.len())?
        .or_else(|| types.iter().position(|&t| t == TOKEN_TYPE_UNKNOWN));
    let merges: Vec<Json> = merges_from_scores(tokens, &scores)
        .into_iter()
        .map(|(l, r)| json!([l, r]))
        .collect();
    let replace_spaces =
        json!({ "type": "Replace", "pattern": { "String": " " }, "content": SPACE });
    let (normalizer, decoder) = if add_space_prefix {
        (
            json!({ "type": "Sequence", "normalizers": [
                { "type": "Prepend", "prepend": SPACE }, replace_spaces] }),
            json!({ "type": "Sequence", "decoders": [
                { "type": "Replace", "pattern": { "String": SPACE }, "content": " " },
                { "type": "ByteFallback" }, { "type": "Fuse" },
                { "type": "Strip", "content": " ", "start": 1, "stop": 0 }] }),
        )
    } else {
        (
            replace_spaces,
            json!({ "type": "Sequence", "decoders": [
                { "type": "Replace", "pattern": { "String": SPACE }, "content": " " },
                { "type": "ByteFallback" }, { "type": "Fuse" }] }),
        )
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post_processor(g, tokens, add_bos, add_eos)?,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk.map(|i| tokens[i].clone()),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab_map(tokens),
            "merges": merges,
        },
    }))
}

/// Builds the `tokenizer_config.json` that goes next to [`tokenizer_json_from_gguf`]'s output,
/// so that transformers' `AutoTokenizer` loads the directory: the special tokens' texts,
/// `add_bos_token`/`add_eos_token` as llama.cpp resolves them, `clean_up_tokenization_spaces`
/// as llama.cpp's `clean_spaces`, the context length and the chat template when present.
/// Whatever the metadata lacks or gets wrong is left out; [`tokenizer_json_from_gguf`] is where
/// malformed metadata is reported.
pub fn tokenizer_config_json_from_gguf(g: &GgufFile) -> Json {
    let tokens = g.get_array(KEY_TOKENS).unwrap_or(&[]);
    let spm = g.get_str(KEY_MODEL) == Some("llama");
    // SPM has no pre-tokenizer type; llama.cpp adds BOS and does not clean spaces for it.
    let pre = resolve_pre(g).ok().map(|p| {
        if spm {
            Pre {
                add_bos: true,
                clean_spaces: false,
                ..p
            }
        } else {
            p
        }
    });
    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    let add_bos = g
        .get(KEY_ADD_BOS)
        .and_then(Value::as_bool)
        .unwrap_or(pre.is_some_and(|p| p.add_bos));
    let add_eos = g.get(KEY_ADD_EOS).and_then(Value::as_bool).unwrap_or(false);
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    for (name, key) in [
        ("bos_token", KEY_BOS_ID),
        ("eos_token", KEY_EOS_ID),
        ("unk_token", KEY_UNK_ID),
        ("pad_token", KEY_PAD_ID),
    ] {
        let text = g
            .get_u64(key)
            .and_then(|id| usize::try_from(id).ok())
            .and_then(|id| tokens.get(id))
            .and_then(Value::as_str);
        if let Some(text) = text {
            config.insert(name.into(), json!(text));
        }
    }
    if let Some(p) = pre {
        config.insert("clean_up_tokenization_spaces".into(), json!(p.clean_spaces));
    }
    let context_length = g
        .get_str("general.architecture")
        .and_then(|arch| g.get_u64(&format!("{arch}.context_length")));
    if let Some(n) = context_length {
        config.insert("model_max_length".into(), json!(n));
    }
    if let Some(template) = g.get_str(KEY_CHAT_TEMPLATE) {
        config.insert("chat_template".into(), json!(template));
    }
    Json::Object(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::write_gguf;

    fn s(v: &str) -> Value {
        Value::String(v.to_string())
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|t| s(t)).collect())
    }

    /// A byte-level vocabulary small enough to read: "a", "b", "ab", "Ġ", "Ġab", a control
    /// token, and merges that build "ab" and "Ġab".
    fn tiny() -> Vec<(String, Value)> {
        vec![
            (KEY_MODEL.into(), s("gpt2")),
            (KEY_PRE.into(), s("smollm")),
            (
                KEY_TOKENS.into(),
                strings(&["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab", "1"]),
            ),
            (
                KEY_TOKEN_TYPE.into(),
                Value::Array([3, 1, 1, 1, 1, 1, 1].map(Value::I32).to_vec()),
            ),
            (KEY_MERGES.into(), strings(&["a b", "Ġ ab"])),
            (KEY_BOS_ID.into(), Value::U32(0)),
            (KEY_EOS_ID.into(), Value::U32(0)),
        ]
    }

    fn with(
        mut meta: Vec<(String, Value)>,
        key: &str,
        value: Option<Value>,
    ) -> Vec<(String, Value)> {
        meta.retain(|(k, _)| k != key);
        if let Some(v) = value {
            meta.push((key.to_string(), v));
        }
        meta
    }

    fn build(meta: &[(String, Value)]) -> Result<Json, TokenizerError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        write_gguf(&path, meta, &[]).unwrap();
        tokenizer_json_from_gguf(&GgufFile::open(&path).unwrap())
    }

    fn config(meta: &[(String, Value)]) -> Json {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        write_gguf(&path, meta, &[]).unwrap();
        tokenizer_config_json_from_gguf(&GgufFile::open(&path).unwrap())
    }

    fn encode(json: &Json, text: &str, add_special: bool) -> Vec<u32> {
        let t = tokenizers::Tokenizer::from_str(&json.to_string()).unwrap();
        t.encode(text, add_special).unwrap().get_ids().to_vec()
    }

    #[test]
    fn tiny_vocabulary_tokenizes_with_merges_and_digits() {
        let json = build(&tiny()).unwrap();
        assert_eq!(json["model"]["merges"], json!([["a", "b"], ["Ġ", "ab"]]));
        assert_eq!(json["model"]["ignore_merges"], json!(false));
        assert_eq!(json["added_tokens"][0]["content"], json!("<|endoftext|>"));
        assert_eq!(json["post_processor"], Json::Null);
        assert_eq!(encode(&json, "ab ab11", true), vec![3, 5, 6, 6]);
        assert_eq!(encode(&json, "ab<|endoftext|>", false), vec![3, 0]);
    }

    #[test]
    fn add_bos_token_adds_bos() {
        let meta = with(tiny(), KEY_ADD_BOS, Some(Value::Bool(true)));
        assert_eq!(encode(&build(&meta).unwrap(), "ab", true), vec![0, 3]);
        assert_eq!(encode(&build(&meta).unwrap(), "ab", false), vec![3]);
    }

    #[test]
    fn add_eos_token_appends_eos() {
        let meta = with(tiny(), KEY_ADD_EOS, Some(Value::Bool(true)));
        assert_eq!(encode(&build(&meta).unwrap(), "ab", true), vec![3, 0]);
    }

    #[test]
    fn llama_bpe_defaults_to_bos_and_ignore_merges() {
        let meta = with(tiny(), KEY_PRE, Some(s("llama-bpe")));
        let json = build(&meta).unwrap();
        assert_eq!(json["model"]["ignore_merges"], json!(true));
        assert_eq!(encode(&json, "ab", true), vec![0, 3]);
        assert_eq!(config(&meta)["add_bos_token"], json!(true));
    }

    #[test]
    fn every_supported_pre_type_loads_in_tokenizers() {
        for (name, _) in PRE_NAMES {
            let json = build(&with(tiny(), KEY_PRE, Some(s(name))));
            assert!(json.is_ok(), "{name}: {:?}", json.err());
        }
    }

    #[test]
    fn repeated_merge_keeps_its_first_rank() {
        let meta = with(tiny(), KEY_MERGES, Some(strings(&["a b", "Ġ ab", "a b"])));
        assert_eq!(
            build(&meta).unwrap()["model"]["merges"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
    }

    #[test]
    fn missing_tokens_is_an_error_naming_the_key() {
        let err = build(&with(tiny(), KEY_TOKENS, None)).unwrap_err();
        assert!(
            matches!(err, TokenizerError::MissingKey { key: KEY_TOKENS }),
            "{err}"
        );
        assert!(err.to_string().contains("tokenizer.ggml.tokens"));
    }

    #[test]
    fn missing_merges_is_an_error() {
        let err = build(&with(tiny(), KEY_MERGES, None)).unwrap_err();
        assert!(
            matches!(err, TokenizerError::MissingKey { key: KEY_MERGES }),
            "{err}"
        );
    }

    #[test]
    fn tokens_not_an_array_is_an_error() {
        let err = build(&with(tiny(), KEY_TOKENS, Some(s("a")))).unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::WrongType {
                    key: KEY_TOKENS,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn token_not_a_string_is_an_error() {
        let meta = with(tiny(), KEY_TOKENS, Some(Value::Array(vec![Value::U8(1)])));
        let err = build(&meta).unwrap_err();
        assert!(
            matches!(err, TokenizerError::WrongElement { index: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn merge_without_a_space_is_an_error() {
        for bad in ["ab", "a ", " a"] {
            let err = build(&with(tiny(), KEY_MERGES, Some(strings(&[bad])))).unwrap_err();
            assert!(
                matches!(err, TokenizerError::BadMerge { index: 0, .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn merge_out_of_vocabulary_is_an_error() {
        let err = build(&with(tiny(), KEY_MERGES, Some(strings(&["b a"])))).unwrap_err();
        assert!(
            matches!(err, TokenizerError::MergeOutOfVocab { ref token, .. } if token == "ba"),
            "{err}"
        );
    }

    #[test]
    fn unknown_model_type_is_an_error() {
        let err = build(&with(tiny(), KEY_MODEL, Some(s("wordpiece2")))).unwrap_err();
        assert!(matches!(err, TokenizerError::UnknownModel { .. }), "{err}");
    }

    #[test]
    fn wordpiece_is_unsupported_by_name() {
        let err = build(&with(tiny(), KEY_MODEL, Some(s("bert")))).unwrap_err();
        assert!(matches!(err, TokenizerError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("`bert`"), "{err}");
    }

    #[test]
    fn sentencepiece_needs_its_scores() {
        let err = build(&with(tiny(), KEY_MODEL, Some(s("llama")))).unwrap_err();
        assert!(
            err.to_string().contains("no `tokenizer.ggml.scores`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_pre_is_an_error() {
        let err = build(&with(tiny(), KEY_PRE, Some(s("klingon")))).unwrap_err();
        assert!(
            matches!(err, TokenizerError::UnsupportedPre { .. }),
            "{err}"
        );
    }

    #[test]
    fn duplicate_token_is_an_error() {
        let meta = with(tiny(), KEY_TOKENS, Some(strings(&["a", "b", "a"])));
        let meta = with(meta, KEY_TOKEN_TYPE, None);
        let err = build(&meta).unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::DuplicateToken {
                    id: 2,
                    first: 0,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn token_types_of_another_length_is_an_error() {
        let meta = with(
            tiny(),
            KEY_TOKEN_TYPE,
            Some(Value::Array(vec![Value::I32(1)])),
        );
        let err = build(&meta).unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::LengthMismatch {
                    len: 1,
                    n_tokens: 7,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bos_out_of_range_is_an_error_when_bos_is_added() {
        let meta = with(tiny(), KEY_ADD_BOS, Some(Value::Bool(true)));
        let meta = with(meta, KEY_BOS_ID, Some(Value::U32(99)));
        let err = build(&meta).unwrap_err();
        assert!(
            matches!(err, TokenizerError::TokenIdOutOfRange { id: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn config_names_special_tokens_and_skips_bad_ids() {
        let meta = with(tiny(), KEY_PAD_ID, Some(Value::U32(99)));
        let meta = with(meta, KEY_CHAT_TEMPLATE, Some(s("{{ x }}")));
        let c = config(&meta);
        assert_eq!(c["bos_token"], json!("<|endoftext|>"));
        assert_eq!(c["add_bos_token"], json!(false));
        assert_eq!(c["clean_up_tokenization_spaces"], json!(false));
        assert_eq!(c["chat_template"], json!("{{ x }}"));
        assert!(c.get("pad_token").is_none());
    }

    #[test]
    fn split_merge_splits_after_the_first_character() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ", "t")));
        assert_eq!(split_merge("  x"), Some((" ", "x")));
        assert_eq!(split_merge("a b c"), Some(("a", "b c")));
        assert_eq!(split_merge(""), None);
        assert_eq!(split_merge("é "), None);
    }
}
