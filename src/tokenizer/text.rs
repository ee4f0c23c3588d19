//! [`TextTokenizer`]: the tokenizer of any [`SourceModel`], ready to turn text into token ids for
//! evaluation and training, with the model's BOS and EOS ids resolved.
//!
//! A GGUF source gets the tokenizer.json that [`tokenizer_json_from_gguf`] builds from its
//! vocabulary (so it tokenizes as llama.cpp does); a directory (Hugging Face, a single
//! `.safetensors` beside its config, or a recurrent `huginn_raven` output) uses its own
//! `tokenizer.json`. A SentencePiece `tokenizer.model` without a tokenizer.json is refused: the
//! tokenizers crate cannot read it, and an approximation would skew every perplexity.
//!
//! BOS and EOS are resolved the way transformers resolves them: the special token's text in
//! tokenizer_config.json looked up in the vocabulary, else config.json's id, else the GGUF's
//! `tokenizer.ggml.*_token_id`. Whether BOS is prepended is not decided here: [`TextTokenizer::encode`]
//! leaves it to the tokenizer's own post-processor, as `tokenizer(text)` does in transformers.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value as Json;

use crate::source::{SourceFormat, SourceModel};
use crate::tokenizer::chat::{ChatError, ChatTemplate};
use crate::tokenizer::gguf::{
    tokenizer_config_json_from_gguf, tokenizer_json_from_gguf, TokenizerError, KEY_BOS_ID,
    KEY_EOS_ID, KEY_TOKENS,
};

/// Why a model's tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TextTokenizerError {
    /// Neither a tokenizer.json nor a GGUF vocabulary came with the model.
    #[error("{path}: the model has no tokenizer (no tokenizer.json, and no GGUF vocabulary)")]
    NoTokenizer { path: PathBuf },
    /// A tokenizer this crate cannot load exactly.
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    /// The GGUF vocabulary does not convert to a tokenizer.json.
    #[error("{path}: {source}")]
    Gguf {
        path: PathBuf,
        source: TokenizerError,
    },
    /// A tokenizer file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// tokenizer.json does not load in the tokenizers crate.
    #[error("{path}: not a tokenizer.json the tokenizers crate can load: {reason}")]
    Load { path: PathBuf, reason: String },
    /// tokenizer_config.json is not a JSON document.
    #[error("{path}: not valid JSON: {source}")]
    Config {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// A BOS/EOS declaration that names no token of the vocabulary.
    #[error("{path}: {which} {reason}")]
    SpecialToken {
        path: PathBuf,
        which: &'static str,
        reason: String,
    },
    /// The tokenizer failed on some text.
    #[error("tokenizing failed: {0}")]
    Encode(String),
    /// The tokenizer failed to turn ids back into text.
    #[error("detokenizing failed: {0}")]
    Decode(String),
}

/// Token ids and each one's byte range (start, end) in the text encoded.
pub(crate) type Offsets = (Vec<u32>, Vec<(usize, usize)>);

/// A loaded tokenizer and the model's BOS and EOS ids.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// The model's chat template, when its tokenizer config has one.
    chat: Option<ChatTemplate>,
}

/// Where a special token is declared, in the order they are consulted.
struct Sources<'a> {
    /// tokenizer_config.json (read from the directory, or built from the GGUF) and its path.
    tokenizer_config: Option<(Json, PathBuf)>,
    model: &'a SourceModel,
}

impl TextTokenizer {
    /// Loads the tokenizer of `model` and resolves its BOS and EOS ids.
    pub fn for_model(model: &SourceModel) -> Result<TextTokenizer, TextTokenizerError> {
        let (mut inner, tokenizer_config) = match model.format {
            SourceFormat::Gguf => load_gguf(model)?,
            SourceFormat::Safetensors => load_dir(&model.root)?,
        };
        // A tokenizer.json may carry the max_length truncation (and padding) it was trained
        // with; perplexity must see every token of a document, and windows are cut later.
        inner
            .with_truncation(None)
            .map_err(|e| TextTokenizerError::Load {
                path: model.path.clone(),
                reason: e.to_string(),
            })?;
        inner.with_padding(None);
        let sources = Sources {
            tokenizer_config,
            model,
        };
        let bos = sources.resolve(&inner, Special::Bos)?;
        let eos = sources.resolve(&inner, Special::Eos)?;
        let chat =
            (sources.tokenizer_config.as_ref()).and_then(|(c, _)| ChatTemplate::from_config(c));
        Ok(TextTokenizer {
            inner,
            bos,
            eos,
            chat,
        })
    }

    /// Builds a tokenizer from a tokenizer.json document, for callers that already hold one.
    pub fn from_json(
        json: &str,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<TextTokenizer, TextTokenizerError> {
        let inner =
            tokenizers::Tokenizer::from_str(json).map_err(|e| TextTokenizerError::Load {
                path: PathBuf::from("tokenizer.json"),
                reason: e.to_string(),
            })?;
        Ok(TextTokenizer {
            inner,
            bos,
            eos,
            chat: None,
        })
    }

    /// The model's chat template.
    pub fn chat(&self) -> Result<&ChatTemplate, ChatError> {
        self.chat.as_ref().ok_or(ChatError::NoTemplate)
    }

    /// Token ids of `text`, with the special tokens the tokenizer's own post-processor adds
    /// (BOS for Llama 3, nothing for SmolLM2), as transformers' `tokenizer(text)` does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextTokenizerError> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TextTokenizerError::Encode(e.to_string()))
    }

    /// Token ids of `text` without the special tokens of the post-processor: for the pieces of a
    /// document too long to encode at once (the data reader adds them around the whole).
    pub(crate) fn encode_plain(&self, text: &str) -> Result<Vec<u32>, TextTokenizerError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TextTokenizerError::Encode(e.to_string()))
    }

    /// [`TextTokenizer::encode_plain`], with each token's byte range (start, end) in `text`.
    pub(crate) fn encode_plain_offsets(&self, text: &str) -> Result<Offsets, TextTokenizerError> {
        self.inner
            .encode(text, false)
            .map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec()))
            .map_err(|e| TextTokenizerError::Encode(e.to_string()))
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextTokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TextTokenizerError::Decode(e.to_string()))
    }

    /// Number of distinct ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `other` maps the same token texts to the same ids, added tokens included.
    pub(crate) fn same_vocabulary(&self, other: &TextTokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    /// The id of a token's text, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

fn load_gguf(
    model: &SourceModel,
) -> Result<(tokenizers::Tokenizer, Option<(Json, PathBuf)>), TextTokenizerError> {
    let path = model.path.clone();
    let Some(g) = model.gguf() else {
        return Err(TextTokenizerError::NoTokenizer { path });
    };
    if g.get(KEY_TOKENS).is_none() {
        return Err(TextTokenizerError::NoTokenizer { path });
    }
    let json = tokenizer_json_from_gguf(g).map_err(|source| TextTokenizerError::Gguf {
        path: path.clone(),
        source,
    })?;
    let inner = tokenizers::Tokenizer::from_str(&json.to_string()).map_err(|e| {
        TextTokenizerError::Load {
            path: path.clone(),
            reason: e.to_string(),
        }
    })?;
    Ok((inner, Some((tokenizer_config_json_from_gguf(g), path))))
}

fn load_dir(
    root: &Path,
) -> Result<(tokenizers::Tokenizer, Option<(Json, PathBuf)>), TextTokenizerError> {
    let json_path = root.join("tokenizer.json");
    if !json_path.is_file() {
        if root.join("tokenizer.model").is_file() {
            return Err(TextTokenizerError::Unsupported {
                path: root.to_path_buf(),
                reason: "only a SentencePiece tokenizer.model is present; add its tokenizer.json \
                         (transformers' AutoTokenizer.from_pretrained(dir).save_pretrained(dir) \
                         writes one)"
                    .into(),
            });
        }
        return Err(TextTokenizerError::NoTokenizer {
            path: root.to_path_buf(),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TextTokenizerError::Io { path, source }
    };
    let bytes = crate::paths::read(&json_path).map_err(io(&json_path))?;
    let inner =
        tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TextTokenizerError::Load {
            path: json_path.clone(),
            reason: e.to_string(),
        })?;
    let config_path = root.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        let bytes = crate::paths::read(&config_path).map_err(io(&config_path))?;
        let json = serde_json::from_slice(&bytes).map_err(|source| TextTokenizerError::Config {
            path: config_path.clone(),
            source,
        })?;
        Some((json, config_path))
    } else {
        None
    };
    Ok((inner, config))
}

#[derive(Clone, Copy)]
enum Special {
    Bos,
    Eos,
}

impl Special {
    /// The key in tokenizer_config.json.
    fn config_key(self) -> &'static str {
        match self {
            Special::Bos => "bos_token",
            Special::Eos => "eos_token",
        }
    }

    /// The key in config.json.
    fn id_key(self) -> &'static str {
        match self {
            Special::Bos => "bos_token_id",
            Special::Eos => "eos_token_id",
        }
    }

    fn gguf_key(self) -> &'static str {
        match self {
            Special::Bos => KEY_BOS_ID,
            Special::Eos => KEY_EOS_ID,
        }
    }
}

impl Sources<'_> {
    /// The first declaration of `which` found; a declaration that is there but names no token
    /// of the vocabulary is an error rather than a silent fall-through, since the sources
    /// disagreeing means the checkpoint is inconsistent.
    fn resolve(
        &self,
        inner: &tokenizers::Tokenizer,
        which: Special,
    ) -> Result<Option<u32>, TextTokenizerError> {
        if let Some(id) = self.tokenizer_config_id(inner, which)? {
            return Ok(Some(id));
        }
        // For a GGUF source the config's ids were read from the GGUF itself.
        let config_path = match self.model.format {
            SourceFormat::Safetensors => self.model.root.join("config.json"),
            SourceFormat::Gguf => self.model.path.clone(),
        };
        let declared = match which {
            Special::Bos => &self.model.config.bos_token_id,
            Special::Eos => &self.model.config.eos_token_id,
        };
        if let Some(value) = declared {
            if let Some(id) = config_id(value, which, &config_path)? {
                return check_id(inner, id, which, &config_path).map(Some);
            }
        }
        let gguf = self.model.gguf().and_then(|g| g.get_u64(which.gguf_key()));
        match gguf {
            Some(id) => check_id(inner, id, which, &self.model.path).map(Some),
            None => Ok(None),
        }
    }

    /// tokenizer_config.json's `bos_token`/`eos_token`: a string, or an AddedToken object with
    /// a `content` string (both spellings occur in published checkpoints); null is absent.
    fn tokenizer_config_id(
        &self,
        inner: &tokenizers::Tokenizer,
        which: Special,
    ) -> Result<Option<u32>, TextTokenizerError> {
        let Some((config, path)) = &self.tokenizer_config else {
            return Ok(None);
        };
        let text = match config.get(which.config_key()) {
            None | Some(Json::Null) => return Ok(None),
            Some(Json::String(s)) => s,
            Some(v) => match v.get("content").and_then(Json::as_str) {
                Some(s) => s,
                None => {
                    return Err(special_error(
                        path,
                        which,
                        format!(
                            "`{}` is neither a string nor a token object",
                            which.config_key()
                        ),
                    ))
                }
            },
        };
        inner.token_to_id(text).map(Some).ok_or_else(|| {
            special_error(
                path,
                which,
                format!("token `{text}` is not in the vocabulary"),
            )
        })
    }
}

/// config.json's id: an integer, or a list of integers whose first is taken (Llama 3.x lists
/// several EOS ids; the first is the end-of-text token that separates documents). null or an
/// empty list count as absent.
fn config_id(value: &Json, which: Special, path: &Path) -> Result<Option<u64>, TextTokenizerError> {
    let first = match value {
        Json::Null => return Ok(None),
        Json::Array(items) => match items.first() {
            None => return Ok(None),
            Some(v) => v,
        },
        v => v,
    };
    first.as_u64().map(Some).ok_or_else(|| {
        special_error(
            path,
            which,
            format!("`{}` = {value} is not a token id", which.id_key()),
        )
    })
}

fn check_id(
    inner: &tokenizers::Tokenizer,
    id: u64,
    which: Special,
    path: &Path,
) -> Result<u32, TextTokenizerError> {
    u32::try_from(id)
        .ok()
        .filter(|&id| inner.id_to_token(id).is_some())
        .ok_or_else(|| {
            special_error(
                path,
                which,
                format!(
                    "id {id} is outside the tokenizer's vocabulary of {} tokens",
                    inner.get_vocab_size(true)
                ),
            )
        })
}

fn special_error(path: &Path, which: Special, reason: String) -> TextTokenizerError {
    TextTokenizerError::SpecialToken {
        path: path.to_path_buf(),
        which: match which {
            Special::Bos => "BOS",
            Special::Eos => "EOS",
        },
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::synth::{write_gguf, write_hf, SynthSpec};
    use serde_json::json;

    /// A word-level tokenizer.json whose post-processor prepends `<s>`.
    fn tokenizer_json() -> Json {
        let added = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        json!({
            "version": "1.0",
            "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst",
                           "stride": 0},
            "padding": null,
            "added_tokens": [added(1, "<s>"), added(2, "</s>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "<unk>",
                      "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}}
        })
    }

    fn model_dir(files: &[(&str, Json)]) -> (tempfile::TempDir, SourceModel) {
        let dir = tempfile::tempdir().unwrap();
        write_hf(dir.path(), &SynthSpec::llama(2), 1).unwrap();
        for (name, json) in files {
            std::fs::write(dir.path().join(name), json.to_string()).unwrap();
        }
        let model = SourceModel::open(dir.path()).unwrap();
        (dir, model)
    }

    #[test]
    fn directory_tokenizer_encodes_with_its_post_processor_and_no_truncation() {
        let config = json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}});
        let (_dir, model) = model_dir(&[
            ("tokenizer.json", tokenizer_json()),
            ("tokenizer_config.json", config),
        ]);
        let tok = TextTokenizer::for_model(&model).unwrap();
        assert_eq!((tok.bos, tok.eos), (Some(1), Some(2)));
        assert_eq!(tok.encode("hello world hello").unwrap(), vec![1, 3, 4, 3]);
        assert_eq!(tok.decode(&[1, 3, 2, 4]).unwrap(), "hello world");
        assert_eq!(tok.vocab_size(), 5);
    }

    #[test]
    fn config_json_ids_are_used_without_tokenizer_config() {
        // The synthetic config.json says bos 1, eos 2.
        let (_dir, model) = model_dir(&[("tokenizer.json", tokenizer_json())]);
        let tok = TextTokenizer::for_model(&model).unwrap();
        assert_eq!((tok.bos, tok.eos), (Some(1), Some(2)));
    }

    #[test]
    fn first_of_a_list_of_eos_ids_is_taken() {
        let value = json!([2, 1]);
        assert_eq!(
            config_id(&value, Special::Eos, Path::new("c")).unwrap(),
            Some(2)
        );
        assert_eq!(
            config_id(&json!([]), Special::Eos, Path::new("c")).unwrap(),
            None
        );
        let err = config_id(&json!("x"), Special::Eos, Path::new("c")).unwrap_err();
        assert!(err.to_string().contains("not a token id"), "{err}");
    }

    #[test]
    fn eos_text_outside_the_vocabulary_is_an_error() {
        let config = json!({"eos_token": "<|im_end|>"});
        let (_dir, model) = model_dir(&[
            ("tokenizer.json", tokenizer_json()),
            ("tokenizer_config.json", config),
        ]);
        let err = TextTokenizer::for_model(&model).err().unwrap();
        assert!(
            err.to_string()
                .ends_with("EOS token `<|im_end|>` is not in the vocabulary"),
            "{err}"
        );
    }

    #[test]
    fn sentencepiece_only_is_unsupported() {
        let (dir, _) = model_dir(&[]);
        std::fs::write(dir.path().join("tokenizer.model"), b"\x0a\x00").unwrap();
        let model = SourceModel::open(dir.path()).unwrap();
        let err = TextTokenizer::for_model(&model).err().unwrap();
        assert!(
            matches!(err, TextTokenizerError::Unsupported { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("tokenizer.model"), "{err}");
    }

    #[test]
    fn no_tokenizer_is_an_error() {
        let (_dir, model) = model_dir(&[]);
        let err = TextTokenizer::for_model(&model).err().unwrap();
        assert!(
            matches!(err, TextTokenizerError::NoTokenizer { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("the model has no tokenizer"),
            "{err}"
        );
    }

    #[test]
    fn bad_tokenizer_json_is_an_error() {
        let (_dir, model) = model_dir(&[("tokenizer.json", json!({"model": 3}))]);
        let err = TextTokenizer::for_model(&model).err().unwrap();
        assert!(matches!(err, TextTokenizerError::Load { .. }), "{err}");
    }

    #[test]
    fn gguf_without_merges_reports_the_conversion_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        write_gguf(&path, &SynthSpec::llama(2), 1, DType::F32).unwrap();
        let model = SourceModel::open(&path).unwrap();
        let err = TextTokenizer::for_model(&model).err().unwrap();
        assert!(matches!(err, TextTokenizerError::Gguf { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");
    }
}
