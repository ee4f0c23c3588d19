//! The `tokenizer.*` metadata of an exported GGUF: carried over from a GGUF source as it is, or
//! built from a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) the way llama.cpp's
//! convert_hf_to_gguf.py builds it for a byte-level BPE vocabulary (`_set_vocab_gpt2`):
//!
//! - `tokenizer.ggml.model = "gpt2"`, `tokenizer.ggml.pre` from the table below;
//! - `tokens` by id, padded to the embedding's rows with `[PAD<id>]` of type UNUSED (5);
//! - `token_type`: CONTROL (3) for special added tokens, USER_DEFINED (4) for other added
//!   tokens, NORMAL (1) for the rest;
//! - `merges` as `"left right"` strings in rank order;
//! - BOS/EOS/UNK/PAD ids from tokenizer_config.json's token texts, else config.json's ids;
//! - `add_bos_token` / `add_eos_token` from tokenizer_config.json, else from whether the
//!   post-processor inserts them; `tokenizer.chat_template` when present.
//!
//! `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer. convert_hf_to_gguf.py finds it by
//! hashing the tokenization of a test string; we find it from the pre-tokenizer itself: its
//! splits, in order, compared against the regex lists llama.cpp uses for each name
//! (llama-vocab.cpp `llm_tokenizer_bpe`). Both spellings are recognized: the Hugging Face one
//! (`Digits`, a regex `ByteLevel`, the `(?i:...)` group) and the one this crate's GGUF-to-
//! tokenizer.json converter writes (plain `Split`s). A tokenizer that matches no entry is
//! refused: an approximate pre-tokenizer silently changes every tokenization.
//!
//! A SentencePiece-style vocabulary (Llama 2, TinyLlama: a BPE model with `byte_fallback` and
//! `▁` for spaces, no ByteLevel) becomes `tokenizer.ggml.model = "llama"`, as the converter's
//! `_set_vocab_sentencepiece` writes it: `pre = "default"`, tokens, `scores` (from the merge
//! ranks, see [`crate::tokenizer::spm`]; 0 for control, byte and unknown tokens as SentencePiece
//! gives them, -1000 for padding), token types with BYTE (6) for `<0xXX>` and UNKNOWN (2) for
//! the unknown token, `add_space_prefix` from the normalizer (`Prepend("▁")`) or a `Metaspace`
//! pre-tokenizer, and no merges.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value as Json;

use crate::formats::gguf::Value;
use crate::source::SourceModel;
use crate::tokenizer::gguf::{
    KEY_ADD_BOS, KEY_ADD_EOS, KEY_BOS_ID, KEY_CHAT_TEMPLATE, KEY_EOS_ID, KEY_MERGES, KEY_MODEL,
    KEY_PAD_ID, KEY_PRE, KEY_TOKENS, KEY_TOKEN_TYPE, KEY_UNK_ID,
};
use crate::tokenizer::spm::{self, KEY_ADD_SPACE_PREFIX, KEY_SCORES, SPACE};

/// llama.h `llama_token_type`.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Why the tokenizer metadata could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{path}: {reason}")]
    Unsupported { path: String, reason: String },
}

/// GGUF key/value pairs, in file order.
pub(crate) type Metadata = Vec<(String, Value)>;

/// The tokenizer keys for a model whose embedding has `n_rows` rows, and notes for the user.
pub(crate) fn tokenizer_metadata(
    source: &SourceModel,
    n_rows: usize,
) -> Result<(Metadata, Vec<String>), VocabError> {
    if let Some(g) = source.gguf() {
        let keys: Vec<(String, Value)> = g
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned()
            .collect();
        let notes = if keys.is_empty() {
            vec![no_tokenizer_note()]
        } else {
            vec![]
        };
        return Ok((pad_gguf_arrays(keys, n_rows), notes));
    }
    let path = source.root.join("tokenizer.json");
    if !path.is_file() {
        return Ok((vec![], vec![no_tokenizer_note()]));
    }
    let read = |p: &Path| -> Result<Option<Json>, VocabError> {
        if !p.is_file() {
            return Ok(None);
        }
        let invalid = |reason: String| VocabError::Invalid {
            path: p.display().to_string(),
            reason,
        };
        let bytes = crate::paths::read(p).map_err(|e| invalid(e.to_string()))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| invalid(format!("not valid JSON: {e}")))
    };
    let tokenizer = read(&path)?.unwrap_or(Json::Null);
    let config = read(&source.root.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let ids = ConfigIds {
        bos: first_id(source.config.bos_token_id.as_ref()),
        eos: first_id(source.config.eos_token_id.as_ref()),
    };
    let keys = from_tokenizer_json(&tokenizer, &config, ids, n_rows).map_err(|e| match e {
        VocabError::Invalid { reason, .. } => VocabError::Invalid {
            path: path.display().to_string(),
            reason,
        },
        VocabError::Unsupported { reason, .. } => VocabError::Unsupported {
            path: path.display().to_string(),
            reason,
        },
    })?;
    let notes = unmade_merges_note(&tokenizer, &keys).into_iter().collect();
    Ok((keys, notes))
}

/// llama.cpp's SentencePiece tokenizer joins any two adjacent pieces whose join is a token, so a
/// `llama` vocabulary tokenizes as its tokenizer.json only if the merges list every such join
/// (those converted from SentencePiece models do). A note counts the joins the merges leave out.
fn unmade_merges_note(tokenizer: &Json, keys: &Metadata) -> Option<String> {
    let get = |key: &str| keys.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    if get(KEY_MODEL)?.as_str()? != "llama" {
        return None;
    }
    let tokens: Vec<String> = get(KEY_TOKENS)?
        .as_array()?
        .iter()
        .filter_map(|t| t.as_str().map(String::from))
        .collect();
    let scores: Vec<f32> = get(KEY_SCORES)?
        .as_array()?
        .iter()
        .filter_map(|v| v.as_f64().map(|f| f as f32))
        .collect();
    let listed: std::collections::HashSet<(String, String)> =
        merges(&tokenizer["model"]).ok()?.into_iter().collect();
    let unmade: Vec<(String, String)> = spm::merges_from_scores(&tokens, &scores)
        .into_iter()
        .filter(|m| !listed.contains(m))
        .collect();
    let (left, right) = unmade.first()?;
    Some(format!(
        "tokenizer.json's merges leave out {} join(s) of two tokens into a third (e.g. `{left}` + \
         `{right}`); llama.cpp's SentencePiece tokenizer makes every such join, so it will split \
         some text differently from this tokenizer.json",
        unmade.len()
    ))
}

fn no_tokenizer_note() -> String {
    "the model has no tokenizer: the GGUF has no tokenizer.* keys, which llama.cpp needs to run it"
        .into()
}

/// config.json's `bos_token_id` / `eos_token_id` (a number, or a list whose first entry counts).
fn first_id(v: Option<&Json>) -> Option<u64> {
    match v? {
        Json::Array(items) => items.first()?.as_u64(),
        other => other.as_u64(),
    }
}

/// BOS and EOS ids from config.json, used when tokenizer_config.json does not name them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ConfigIds {
    pub bos: Option<u64>,
    pub eos: Option<u64>,
}

/// Pads the per-token arrays of carried-over GGUF metadata to `n_rows` entries, as the
/// converter pads a vocabulary shorter than the embedding.
fn pad_gguf_arrays(mut keys: Vec<(String, Value)>, n_rows: usize) -> Vec<(String, Value)> {
    for (key, value) in &mut keys {
        let Value::Array(items) = value else { continue };
        let start = items.len();
        if start >= n_rows {
            continue;
        }
        let pad = |i: usize| match key.as_str() {
            KEY_TOKENS => Some(Value::String(format!("[PAD{i}]"))),
            KEY_TOKEN_TYPE => Some(Value::I32(UNUSED)),
            KEY_SCORES => Some(Value::F32(-1000.0)),
            _ => None,
        };
        if pad(start).is_none() {
            continue;
        }
        items.extend((start..n_rows).filter_map(pad));
    }
    keys
}

/// The tokenizer keys from a parsed tokenizer.json and tokenizer_config.json (Null when absent).
pub(crate) fn from_tokenizer_json(
    tokenizer: &Json,
    config: &Json,
    ids: ConfigIds,
    n_rows: usize,
) -> Result<Vec<(String, Value)>, VocabError> {
    let sentencepiece = is_sentencepiece(tokenizer)?;
    let vocab = Vocab::read(tokenizer, n_rows)?;
    let special = SpecialTokens::new(tokenizer, config, ids, &vocab.tokens);
    let mut keys = if sentencepiece {
        vocab.sentencepiece_keys(tokenizer)
    } else {
        vocab.gpt2_keys(tokenizer, config)?
    };
    keys.extend(special.keys());
    if let Some(template) = config["chat_template"].as_str() {
        keys.push((KEY_CHAT_TEMPLATE.to_string(), string(template)));
    }
    Ok(keys)
}

/// A tokenizer.json that is not what it should be (its real path is put in by the caller).
fn invalid(reason: String) -> VocabError {
    VocabError::Invalid {
        path: "tokenizer.json".into(),
        reason,
    }
}

/// A tokenizer.json that is valid but not exported (its real path is put in by the caller).
fn unsupported(reason: String) -> VocabError {
    VocabError::Unsupported {
        path: "tokenizer.json".into(),
        reason,
    }
}

/// A GGUF string value.
fn string(s: &str) -> Value {
    Value::String(s.to_string())
}

/// Whether a tokenizer.json is a SentencePiece-style BPE vocabulary (byte fallback, no ByteLevel
/// pre-tokenizer) rather than a byte-level one; any other vocabulary is refused.
fn is_sentencepiece(tokenizer: &Json) -> Result<bool, VocabError> {
    let model = &tokenizer["model"];
    let kind = model["type"].as_str().unwrap_or("");
    if kind != "BPE" {
        return Err(unsupported(format!(
            "model type {kind:?} is not exported: only BPE vocabularies (byte-level, or \
             SentencePiece-style with byte fallback) are"
        )));
    }
    let sentencepiece = !has_byte_level(&tokenizer["pre_tokenizer"]);
    if sentencepiece && model["byte_fallback"] != true {
        return Err(unsupported(
            "a BPE vocabulary with neither a ByteLevel pre-tokenizer nor byte fallback is \
             neither llama.cpp's `gpt2` nor its `llama` (SentencePiece) tokenizer"
                .into(),
        ));
    }
    Ok(sentencepiece)
}

/// A BPE vocabulary: token texts by id with their llama.cpp types, padded to the embedding's
/// rows, and the merges in rank order.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<(String, String)>,
}

impl Vocab {
    /// The vocabulary of a tokenizer.json for an embedding of `n_rows` rows.
    fn read(tokenizer: &Json, n_rows: usize) -> Result<Vocab, VocabError> {
        let (tokens, types) = tokens_and_types(tokenizer, n_rows).map_err(invalid)?;
        let merges = merges(&tokenizer["model"]).map_err(invalid)?;
        Ok(Vocab {
            tokens,
            types,
            merges,
        })
    }

    /// The keys of llama.cpp's SentencePiece tokenizer (`llama`), as `_set_vocab_sentencepiece`
    /// writes them: BYTE and UNKNOWN types, scores from the merge ranks, no merges.
    fn sentencepiece_keys(self, tokenizer: &Json) -> Metadata {
        let Vocab {
            tokens,
            mut types,
            merges,
        } = self;
        let unk_text = tokenizer["model"]["unk_token"].as_str();
        for (text, kind) in tokens.iter().zip(&mut types) {
            if Some(text.as_str()) == unk_text {
                *kind = UNKNOWN;
            } else if *kind == NORMAL && spm::is_byte_token(text) {
                *kind = BYTE;
            }
        }
        let scores = spm::scores_from_merges(&tokens, &merges);
        let scores = scores
            .into_iter()
            .zip(&types)
            .map(|(score, kind)| match *kind {
                NORMAL | USER_DEFINED => score,
                UNUSED => -1000.0,
                _ => 0.0,
            });
        vec![
            (KEY_MODEL.to_string(), string("llama")),
            (KEY_PRE.to_string(), string("default")),
            (
                KEY_TOKENS.to_string(),
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                KEY_SCORES.to_string(),
                Value::Array(scores.map(Value::F32).collect()),
            ),
            (
                KEY_TOKEN_TYPE.to_string(),
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                KEY_ADD_SPACE_PREFIX.to_string(),
                Value::Bool(adds_space_prefix(tokenizer)),
            ),
        ]
    }

    /// The keys of llama.cpp's byte-level BPE tokenizer (`gpt2`), as `_set_vocab_gpt2` writes
    /// them; a pre-tokenizer whose llama.cpp name is not known is refused.
    fn gpt2_keys(self, tokenizer: &Json, config: &Json) -> Result<Metadata, VocabError> {
        let clean_spaces = config["clean_up_tokenization_spaces"].as_bool();
        let pre = pre_name(&tokenizer["pre_tokenizer"], clean_spaces).map_err(unsupported)?;
        let merges = self
            .merges
            .into_iter()
            .map(|(l, r)| Value::String(format!("{l} {r}")));
        Ok(vec![
            (KEY_MODEL.to_string(), string("gpt2")),
            (KEY_PRE.to_string(), string(pre)),
            (
                KEY_TOKENS.to_string(),
                Value::Array(self.tokens.into_iter().map(Value::String).collect()),
            ),
            (
                KEY_TOKEN_TYPE.to_string(),
                Value::Array(self.types.into_iter().map(Value::I32).collect()),
            ),
            (KEY_MERGES.to_string(), Value::Array(merges.collect())),
        ])
    }
}

/// The special tokens' ids (none past the vocabulary) and whether BOS and EOS are added:
/// tokenizer_config.json's token texts and flags, else config.json's ids and what the
/// post-processor inserts.
struct SpecialTokens {
    bos: Option<u64>,
    eos: Option<u64>,
    unk: Option<u64>,
    pad: Option<u64>,
    add_bos: bool,
    add_eos: bool,
}

impl SpecialTokens {
    /// The special tokens of a vocabulary of `tokens`.
    fn new(tokenizer: &Json, config: &Json, ids: ConfigIds, tokens: &[String]) -> SpecialTokens {
        let index: BTreeMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let special = |name: &str| -> Option<u64> {
            let text = match &config[name] {
                Json::String(s) => Some(s.as_str()),
                Json::Object(o) => o.get("content").and_then(Json::as_str),
                _ => None,
            }?;
            index.get(text).map(|&i| i as u64)
        };
        let in_range = |id: Option<u64>| id.filter(|&i| (i as usize) < tokens.len());
        let (inserts_bos, inserts_eos) = post_processor_inserts(&tokenizer["post_processor"]);
        SpecialTokens {
            bos: in_range(special("bos_token").or(ids.bos)),
            eos: in_range(special("eos_token").or(ids.eos)),
            unk: in_range(special("unk_token")),
            pad: in_range(special("pad_token")),
            add_bos: config["add_bos_token"].as_bool().unwrap_or(inserts_bos),
            add_eos: config["add_eos_token"].as_bool().unwrap_or(inserts_eos),
        }
    }

    /// Their keys: the ids that are known, then the two flags.
    fn keys(&self) -> Metadata {
        let ids = [
            (KEY_BOS_ID, self.bos),
            (KEY_EOS_ID, self.eos),
            (KEY_UNK_ID, self.unk),
            (KEY_PAD_ID, self.pad),
        ];
        let mut keys: Metadata = ids
            .into_iter()
            .filter_map(|(key, id)| Some((key.to_string(), Value::U32(id? as u32))))
            .collect();
        keys.push((KEY_ADD_BOS.to_string(), Value::Bool(self.add_bos)));
        keys.push((KEY_ADD_EOS.to_string(), Value::Bool(self.add_eos)));
        keys
    }
}

/// True when the pre-tokenizer (or one step of a Sequence) is ByteLevel.
fn has_byte_level(pre: &Json) -> bool {
    match pre["type"].as_str() {
        Some("ByteLevel") => true,
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .is_some_and(|steps| steps.iter().any(has_byte_level)),
        _ => false,
    }
}

/// Whether a SentencePiece-style tokenizer puts a `▁` before the text: Hugging Face's Llama
/// tokenizer.json does it with a `Prepend` normalizer, newer ones with a `Metaspace`
/// pre-tokenizer whose prepend scheme is not `never`.
fn adds_space_prefix(tokenizer: &Json) -> bool {
    fn prepends(normalizer: &Json) -> bool {
        match normalizer["type"].as_str() {
            Some("Prepend") => normalizer["prepend"] == SPACE,
            Some("Sequence") => normalizer["normalizers"]
                .as_array()
                .is_some_and(|steps| steps.iter().any(prepends)),
            _ => false,
        }
    }
    let pre = &tokenizer["pre_tokenizer"];
    let metaspace = pre["type"] == "Metaspace"
        && pre["prepend_scheme"] != "never"
        && pre["add_prefix_space"] != false;
    prepends(&tokenizer["normalizer"]) || metaspace
}

/// Token texts by id and their llama.cpp types, padded to `n_rows`.
fn tokens_and_types(tokenizer: &Json, n_rows: usize) -> Result<(Vec<String>, Vec<i32>), String> {
    let vocab = tokenizer["model"]["vocab"]
        .as_object()
        .ok_or("model.vocab is not an object")?;
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| format!("vocab entry {text:?} has no integer id"))?;
        by_id.insert(id as usize, (text.clone(), NORMAL));
    }
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"]
            .as_u64()
            .ok_or("an added token has no integer id")?;
        let text = added["content"]
            .as_str()
            .ok_or("an added token has no content")?;
        let kind = if added["special"].as_bool().unwrap_or(false) {
            CONTROL
        } else {
            USER_DEFINED
        };
        by_id.insert(id as usize, (text.to_string(), kind));
    }
    let n_ids = by_id.keys().next_back().map_or(0, |&m| m + 1);
    if n_ids > n_rows {
        return Err(format!(
            "the tokenizer has ids up to {} but the embedding has only {n_rows} rows",
            n_ids - 1
        ));
    }
    let mut tokens = Vec::with_capacity(n_rows);
    let mut types = Vec::with_capacity(n_rows);
    let mut seen = std::collections::HashSet::with_capacity(n_rows);
    for id in 0..n_rows {
        let (text, kind) = by_id
            .remove(&id)
            .unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
        // llama.cpp asserts that token texts are unique.
        if !seen.insert(text.clone()) {
            return Err(format!(
                "token {id} {text:?} appears twice in the vocabulary"
            ));
        }
        tokens.push(text);
        types.push(kind);
    }
    Ok((tokens, types))
}

/// Merges as `(left, right)`, from either spelling tokenizers writes (`"a b"` or `["a", "b"]`).
fn merges(model: &Json) -> Result<Vec<(String, String)>, String> {
    let items = match &model["merges"] {
        Json::Null => return Ok(vec![]),
        Json::Array(items) => items,
        _ => return Err("model.merges is not an array".into()),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| match m {
            Json::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("merge {i} {s:?} is not two tokens separated by a space")),
            Json::Array(pair) => match (pair.first().and_then(Json::as_str), pair.get(1)) {
                (Some(a), Some(Json::String(b))) if pair.len() == 2 => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(format!("merge {i} is not a pair of strings")),
            },
            _ => Err(format!("merge {i} is neither a string nor a pair")),
        })
        .collect()
}

/// Whether the post-processor inserts a BOS before the sequence and an EOS after it.
fn post_processor_inserts(post: &Json) -> (bool, bool) {
    match post["type"].as_str() {
        Some("TemplateProcessing") => {
            let single = post["single"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let is_special =
                |item: Option<&Json>| item.is_some_and(|i| i.get("SpecialToken").is_some());
            (
                is_special(single.first()),
                single.len() > 1 && is_special(single.last()),
            )
        }
        Some("Sequence") => post["processors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(post_processor_inserts)
            .fold((false, false), |a, b| (a.0 || b.0, a.1 || b.1)),
        _ => (false, false),
    }
}

/// GPT-2's split regex: tokenizers' ByteLevel spelling ends with `|\s+`, llama.cpp's without.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_TAIL: &str =
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_TAIL: &str =
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The contraction group, as Hugging Face and llama.cpp spell it.
const CONTRACTIONS_HF: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)";
const CONTRACTIONS_CPP: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])";

/// One split of the pre-tokenizer, normalized so that both spellings compare equal.
fn normalize(regex: &str) -> String {
    let r = regex
        .strip_suffix(r"|\s+")
        .filter(|r| *r == GPT2)
        .unwrap_or(regex);
    r.replace(CONTRACTIONS_HF, CONTRACTIONS_CPP)
}

/// The splits a pre-tokenizer applies, in order, normalized; Err names what is not understood.
fn splits(pre: &Json, out: &mut Vec<String>) -> Result<(), String> {
    match pre["type"].as_str() {
        Some("Sequence") => {
            for step in pre["pretokenizers"].as_array().into_iter().flatten() {
                splits(step, out)?;
            }
            Ok(())
        }
        Some("Split") if pre["behavior"] == "Isolated" && pre["invert"].as_bool() != Some(true) => {
            let regex = pre["pattern"]["Regex"]
                .as_str()
                .ok_or("a Split pre-tokenizer without a Regex pattern")?;
            out.push(normalize(regex));
            Ok(())
        }
        Some("Digits") if pre["individual_digits"] == true => {
            out.push(r"\p{N}".into());
            Ok(())
        }
        Some("ByteLevel") => {
            if pre["use_regex"] != false {
                out.push(GPT2.into());
            }
            Ok(())
        }
        other => Err(format!("pre-tokenizer step {other:?}")),
    }
}

/// `tokenizer.ggml.pre` for a pre-tokenizer (see the module docs). `clean_spaces` is
/// tokenizer_config.json's `clean_up_tokenization_spaces`, which tells SmolLM's name (off) from
/// StarCoder's (on): the two split text the same way.
fn pre_name(pre: &Json, clean_spaces: Option<bool>) -> Result<&'static str, String> {
    let mut found = Vec::new();
    let unknown = |what: String| {
        format!(
            "{what} is not one whose llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) is known; \
             known: gpt-2, smollm, starcoder, llama-bpe, qwen2, falcon, default"
        )
    };
    splits(pre, &mut found).map_err(unknown)?;
    let llama3 = format!("{CONTRACTIONS_CPP}{LLAMA3_TAIL}");
    let qwen2 = format!("{CONTRACTIONS_CPP}{QWEN2_TAIL}");
    let found: Vec<&str> = found.iter().map(String::as_str).collect();
    let digits = r"\p{N}";
    let name = match found.as_slice() {
        [r] if *r == GPT2 => "gpt-2",
        [d, r] if *d == digits && *r == GPT2 => {
            if clean_spaces == Some(false) {
                "smollm"
            } else {
                "starcoder"
            }
        }
        [r] if *r == llama3 => "llama-bpe",
        [r] if *r == qwen2 => "qwen2",
        [p, r, d] if *p == r"[\p{P}\$\+<=>\^~\|`]+" && *r == GPT2 && *d == "[0-9][0-9][0-9]" => {
            "falcon"
        }
        [p, r, n, d]
            if *p == r"[\p{P}\$\+<=>\^~\|]+"
                && *r == GPT2
                && *n == r"\p{N}+"
                && *d == "[0-9][0-9][0-9]" =>
        {
            "default"
        }
        _ => return Err(unknown(format!("a pre-tokenizer splitting with {found:?}"))),
    };
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Hugging Face's SmolLM2 tokenizer.json, cut down to a few tokens.
    fn smollm_like() -> Json {
        json!({
            "added_tokens": [
                {"id": 0, "content": "<|endoftext|>", "special": true},
                {"id": 1, "content": "<|im_start|>", "special": true},
            ],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            ]},
            "post_processor": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": {"<|endoftext|>": 0, "<|im_start|>": 1, "a": 2, "b": 3, "ab": 4},
                      "merges": ["a b"]},
        })
    }

    fn get<'a>(keys: &'a [(String, Value)], k: &str) -> Option<&'a Value> {
        keys.iter().find(|(key, _)| key == k).map(|(_, v)| v)
    }

    #[test]
    fn smollm_tokenizer_json_becomes_gpt2_metadata() {
        let config = json!({"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>",
                            "clean_up_tokenization_spaces": false, "chat_template": "{{x}}"});
        let keys = from_tokenizer_json(&smollm_like(), &config, ConfigIds::default(), 7).unwrap();
        let s = |v: &str| Value::String(v.into());
        assert_eq!(get(&keys, KEY_MODEL), Some(&s("gpt2")));
        assert_eq!(get(&keys, KEY_PRE), Some(&s("smollm")));
        let tokens = get(&keys, KEY_TOKENS).and_then(Value::as_array).unwrap();
        assert_eq!(tokens.len(), 7);
        assert_eq!(tokens[4], s("ab"));
        assert_eq!(tokens[6], s("[PAD6]"));
        let types: Vec<i64> = get(&keys, KEY_TOKEN_TYPE)
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .filter_map(Value::as_i64)
            .collect();
        assert_eq!(types, vec![3, 3, 1, 1, 1, 5, 5]);
        assert_eq!(get(&keys, KEY_MERGES), Some(&Value::Array(vec![s("a b")])));
        assert_eq!(get(&keys, KEY_BOS_ID), Some(&Value::U32(1)));
        assert_eq!(get(&keys, KEY_EOS_ID), Some(&Value::U32(0)));
        assert_eq!(get(&keys, KEY_ADD_BOS), Some(&Value::Bool(false)));
        assert_eq!(get(&keys, KEY_CHAT_TEMPLATE), Some(&s("{{x}}")));
        // Without the clean-spaces hint the same splits are StarCoder's.
        let keys =
            from_tokenizer_json(&smollm_like(), &Json::Null, ConfigIds::default(), 5).unwrap();
        assert_eq!(get(&keys, KEY_PRE), Some(&s("starcoder")));
    }

    #[test]
    fn pre_tokenizers_are_recognized_in_both_spellings() {
        let byte_level = |use_regex| json!({"type": "ByteLevel", "use_regex": use_regex});
        let split = |r: &str| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false});
        let seq = |steps: Vec<Json>| json!({"type": "Sequence", "pretokenizers": steps});
        let hf_llama3 = format!("{CONTRACTIONS_HF}{LLAMA3_TAIL}");
        let cpp_llama3 = format!("{CONTRACTIONS_CPP}{LLAMA3_TAIL}");
        for (pre, want) in [
            (byte_level(true), "gpt-2"),
            (seq(vec![split(GPT2), byte_level(false)]), "gpt-2"),
            (seq(vec![split(&hf_llama3), byte_level(false)]), "llama-bpe"),
            (
                seq(vec![split(&cpp_llama3), byte_level(false)]),
                "llama-bpe",
            ),
            (
                seq(vec![
                    split(&format!("{CONTRACTIONS_HF}{QWEN2_TAIL}")),
                    byte_level(false),
                ]),
                "qwen2",
            ),
            (
                seq(vec![split(r"\p{N}"), split(GPT2), byte_level(false)]),
                "starcoder",
            ),
        ] {
            assert_eq!(pre_name(&pre, None), Ok(want), "{pre}");
        }
        let err = pre_name(&seq(vec![split("x+"), byte_level(false)]), None).unwrap_err();
        assert!(
            err.contains("not one whose llama.cpp pre-tokenizer"),
            "{err}"
        );
        let err = pre_name(&json!({"type": "Whitespace"}), None).unwrap_err();
        assert!(err.contains("\"Whitespace\""), "{err}");
    }

    #[test]
    fn bos_insertion_comes_from_the_post_processor_unless_configured() {
        let mut t = smollm_like();
        t["post_processor"] = json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]});
        let keys = from_tokenizer_json(&t, &Json::Null, ConfigIds::default(), 5).unwrap();
        assert_eq!(get(&keys, KEY_ADD_BOS), Some(&Value::Bool(true)));
        assert_eq!(get(&keys, KEY_ADD_EOS), Some(&Value::Bool(false)));
        let config = json!({"add_bos_token": false});
        let keys = from_tokenizer_json(
            &t,
            &config,
            ConfigIds {
                bos: Some(1),
                eos: Some(0),
            },
            5,
        )
        .unwrap();
        assert_eq!(get(&keys, KEY_ADD_BOS), Some(&Value::Bool(false)));
        assert_eq!(get(&keys, KEY_BOS_ID), Some(&Value::U32(1)));
    }

    #[test]
    fn refusals_say_why() {
        let err = from_tokenizer_json(&smollm_like(), &Json::Null, ConfigIds::default(), 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ids up to 4 but the embedding has only 3 rows"),
            "{err}"
        );
        let mut sp = smollm_like();
        sp["pre_tokenizer"] = json!({"type": "Metaspace"});
        let err = from_tokenizer_json(&sp, &Json::Null, ConfigIds::default(), 5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("neither a ByteLevel pre-tokenizer nor byte fallback"),
            "{err}"
        );
        let mut wp = smollm_like();
        wp["model"]["type"] = json!("WordPiece");
        let err = from_tokenizer_json(&wp, &Json::Null, ConfigIds::default(), 5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"WordPiece\" is not exported"), "{err}");
    }

    #[test]
    fn carried_over_arrays_are_padded_to_the_embedding() {
        let keys = vec![
            (
                KEY_TOKENS.to_string(),
                Value::Array(vec![Value::String("a".into())]),
            ),
            (
                KEY_TOKEN_TYPE.to_string(),
                Value::Array(vec![Value::I32(1)]),
            ),
            (KEY_MERGES.to_string(), Value::Array(vec![])),
        ];
        let padded = pad_gguf_arrays(keys, 3);
        assert_eq!(padded[0].1.as_array().map(|a| a.len()), Some(3));
        assert_eq!(padded[1].1.as_array().unwrap()[2], Value::I32(5));
        assert_eq!(padded[2].1.as_array().map(|a| a.len()), Some(0));
    }
}
