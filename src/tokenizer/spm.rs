//! SentencePiece-style vocabularies: llama.cpp's `tokenizer.ggml.model = "llama"`
//! (`LLAMA_VOCAB_TYPE_SPM`: Llama 2, TinyLlama, Mistral 7B v0.1) on one side, and a Hugging Face
//! `tokenizer.json` with a byte-fallback BPE model and `▁` for spaces on the other.
//!
//! llama.cpp's SPM session (llama-vocab.cpp `llm_tokenizer_spm_session`) splits the text into
//! UTF-8 characters, then repeatedly joins the adjacent pair whose join is a vocabulary token with
//! the highest `tokenizer.ggml.scores` entry (the leftmost among equal scores); a leftover piece
//! that is not a token is spelled with the `<0xXX>` byte tokens. tokenizers' BPE does the same
//! with merges in rank order, so the two meet when:
//!
//! - the merges are every split `left + right` of every token into two tokens, ranked by the
//!   token's score, highest first ([`merges_from_scores`]); and
//! - the scores are the negated rank of the first merge that makes each token
//!   ([`scores_from_merges`]), the inverse direction.
//!
//! Where two different tokens share a score, llama.cpp breaks the tie by position and a merge
//! list by rank, so their tokenizations can differ; vocabularies that came from a SentencePiece
//! BPE model have distinct scores for every token a merge can make.

use std::collections::HashMap;

/// The character SentencePiece writes for a space.
pub(crate) const SPACE: &str = "\u{2581}";

/// `tokenizer.ggml.scores`: one f32 per token.
pub(crate) const KEY_SCORES: &str = "tokenizer.ggml.scores";
/// `tokenizer.ggml.add_space_prefix`: a space is put before the text (and after each special
/// token) before it is split; llama.cpp's default for SPM is true.
pub(crate) const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// The score given to tokens no merge makes: below every merge's, so their order is irrelevant.
pub(crate) const UNMERGED_SCORE: f32 = -1e9;

/// True for SentencePiece's byte tokens, `<0x00>` to `<0xFF>` (llama.cpp types them BYTE).
pub(crate) fn is_byte_token(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 6
        && text.starts_with("<0x")
        && b[5] == b'>'
        && b[3..5].iter().all(u8::is_ascii_hexdigit)
}

/// The merges that make byte-fallback BPE tokenize as llama.cpp's SPM session does with these
/// tokens and scores: every split of a token into two tokens, ranked by the token's score
/// (highest first; equal scores by token id, then by split position).
pub(crate) fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut found: Vec<(f32, usize, usize)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if ids.contains_key(left) && ids.contains_key(right) {
                found.push((scores[id], id, split));
            }
        }
    }
    found.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    found
        .into_iter()
        .map(|(_, id, split)| {
            let (left, right) = tokens[id].split_at(split);
            (left.to_string(), right.to_string())
        })
        .collect()
}

/// Scores for a vocabulary whose merges are given in rank order: the negated rank of the first
/// merge that makes a token, [`UNMERGED_SCORE`] for tokens no merge makes.
pub(crate) fn scores_from_merges(tokens: &[String], merges: &[(String, String)]) -> Vec<f32> {
    let mut first: HashMap<String, usize> = HashMap::with_capacity(merges.len());
    for (rank, (left, right)) in merges.iter().enumerate() {
        first.entry(format!("{left}{right}")).or_insert(rank);
    }
    tokens
        .iter()
        .map(|t| first.get(t).map_or(UNMERGED_SCORE, |&rank| -(rank as f32)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn byte_tokens_are_recognized() {
        assert!(is_byte_token("<0x0A>"));
        assert!(is_byte_token("<0xff>"));
        assert!(!is_byte_token("<0xG0>"));
        assert!(!is_byte_token("<0x0A"));
        assert!(!is_byte_token("<s>"));
    }

    #[test]
    fn merges_follow_scores_and_scores_follow_merges() {
        let tokens = strings(&["<unk>", "a", "b", "c", "ab", "bc", "abc"]);
        let scores = [0.0, -100.0, -100.0, -100.0, -1.0, -0.5, -2.0];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // bc (-0.5) before ab (-1), then abc's two splits in position order.
        assert_eq!(pairs, [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]);
        let back = scores_from_merges(&tokens, &merges);
        assert_eq!(
            back,
            [
                UNMERGED_SCORE,
                UNMERGED_SCORE,
                UNMERGED_SCORE,
                UNMERGED_SCORE,
                -1.0,
                0.0,
                -2.0
            ]
        );
        // The round trip keeps the merge order.
        assert_eq!(merges_from_scores(&tokens, &back), merges);
    }

    /// A SentencePiece-like vocabulary learned from `text` the way SentencePiece's BPE trainer
    /// does it (words prefixed with `▁`, the most frequent adjacent pair merged at each step,
    /// ties by text), scored -step: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then the
    /// characters of the text and the merged pieces.
    fn learned_vocabulary(text: &str, steps: usize) -> (Vec<String>, Vec<f32>, Vec<i32>) {
        let mut tokens = strings(&["<unk>", "<s>", "</s>"]);
        let mut types = vec![2, 3, 3];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend([6; 256]);
        let mut scores = vec![0.0; tokens.len()];
        let mut words: Vec<Vec<String>> = text
            .split(' ')
            .map(|w| format!("{SPACE}{w}").chars().map(String::from).collect())
            .collect();
        let mut chars: Vec<String> = words.iter().flatten().cloned().collect();
        chars.sort();
        chars.dedup();
        for c in chars {
            tokens.push(c);
            scores.push(-1e6);
            types.push(1);
        }
        for step in 0..steps {
            let mut counts: std::collections::BTreeMap<(String, String), usize> =
                Default::default();
            for w in &words {
                for pair in w.windows(2) {
                    *counts
                        .entry((pair[0].clone(), pair[1].clone()))
                        .or_default() += 1;
                }
            }
            let Some(((l, r), _)) = counts
                .into_iter()
                .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            else {
                break;
            };
            let joined = format!("{l}{r}");
            for w in &mut words {
                let mut i = 0;
                while i + 1 < w.len() {
                    if w[i] == l && w[i + 1] == r {
                        w[i] = joined.clone();
                        w.remove(i + 1);
                    }
                    i += 1;
                }
            }
            if !tokens.contains(&joined) {
                tokens.push(joined);
                scores.push(-(step as f32));
                types.push(1);
            }
        }
        (tokens, scores, types)
    }

    /// llama.cpp's SPM tokenization, transcribed: a space in front, spaces as `▁`, then join
    /// the adjacent pair whose join is a token with the highest score (leftmost on ties) until
    /// none is; pieces that are not tokens are spelled in byte tokens. BOS first.
    fn llama_cpp_spm(tokens: &[String], scores: &[f32], text: &str) -> Vec<u32> {
        let ids: HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let text = format!(" {text}").replace(' ', SPACE);
        let mut symbols: Vec<String> = text.chars().map(String::from).collect();
        loop {
            let mut best: Option<(f32, usize)> = None;
            for i in 0..symbols.len().saturating_sub(1) {
                let joined = format!("{}{}", symbols[i], symbols[i + 1]);
                if let Some(&id) = ids.get(joined.as_str()) {
                    if best.is_none_or(|(score, _)| scores[id] > score) {
                        best = Some((scores[id], i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let right = symbols.remove(i + 1);
            symbols[i].push_str(&right);
        }
        let mut out = vec![1];
        for s in symbols {
            match ids.get(s.as_str()) {
                Some(&id) => out.push(id as u32),
                None => out.extend(
                    s.bytes()
                        .map(|b| ids[format!("<0x{b:02X}>").as_str()] as u32),
                ),
            }
        }
        out
    }

    const TRAINING_TEXT: &str = "In the beginning God created the heaven and the earth. And the \
        earth was without form, and void; and darkness was upon the face of the deep. And the \
        Spirit of God moved upon the face of the waters. And God said, Let there be light: and \
        there was light. And God saw the light, that it was good: and God divided the light \
        from the darkness.";

    const PROBES: &[&str] = &[
        "In the beginning",
        "the the the",
        "And God saw the light, that it was good",
        "  two  spaces and a trailing one ",
        "darkness\nupon the\tdeep",
        "Ünïcödé and emoji 😀 fall back to bytes",
        // Words run together, so that merges overlap and their order decides.
        "theheavenandtheearthwaswithoutform",
        "Godsaidletherebelightandtherewaslight",
        "darknessupthefaceofthedeepandthewaters",
        "x",
        "",
    ];

    fn encode(tokenizer: &serde_json::Value, text: &str) -> Vec<u32> {
        use std::str::FromStr;
        let t = tokenizers::Tokenizer::from_str(&tokenizer.to_string()).unwrap();
        t.encode(text, true).unwrap().get_ids().to_vec()
    }

    fn gguf_tokenizer(meta: &[(String, crate::formats::gguf::Value)]) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.gguf");
        crate::formats::gguf::write_gguf(&path, meta, &[]).unwrap();
        let g = crate::formats::gguf::GgufFile::open(&path).unwrap();
        crate::tokenizer::gguf::tokenizer_json_from_gguf(&g).unwrap()
    }

    #[test]
    fn tokenizer_json_from_a_llama_gguf_tokenizes_as_llama_cpp() {
        use crate::formats::gguf::Value;
        let (tokens, scores, types) = learned_vocabulary(TRAINING_TEXT, 120);
        let meta = vec![
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(tokens.iter().cloned().map(Value::String).collect()),
            ),
            (
                KEY_SCORES.to_string(),
                Value::Array(scores.iter().copied().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(types.iter().copied().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
        ];
        let json = gguf_tokenizer(&meta);
        for text in PROBES {
            let want = llama_cpp_spm(&tokens, &scores, text);
            let want = if text.is_empty() { vec![1] } else { want };
            assert_eq!(encode(&json, text), want, "{text:?}");
        }
        let long = encode(&json, "And God said, Let there be light");
        assert!(long.len() < 12, "merges were applied: {long:?}");
        // The probes tell merge orders apart: the reversed scores tokenize some differently.
        let reversed: Vec<f32> = scores.iter().map(|s| -s).collect();
        assert!(PROBES
            .iter()
            .any(|t| llama_cpp_spm(&tokens, &reversed, t) != llama_cpp_spm(&tokens, &scores, t)));

        // Exported again (tokenizer.json -> GGUF keys -> tokenizer.json): the same tokens.
        let keys = crate::tokenizer::vocab::from_tokenizer_json(
            &json,
            &serde_json::Value::Null,
            crate::tokenizer::vocab::ConfigIds {
                bos: Some(1),
                eos: Some(2),
            },
            tokens.len() + 3,
        )
        .unwrap();
        let get = |k: &str| {
            keys.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            get("tokenizer.ggml.model"),
            Some(Value::String("llama".into()))
        );
        assert_eq!(get(KEY_ADD_SPACE_PREFIX), Some(Value::Bool(true)));
        assert_eq!(get("tokenizer.ggml.merges"), None);
        let Some(Value::Array(exported_types)) = get("tokenizer.ggml.token_type") else {
            panic!("no token types");
        };
        assert_eq!(exported_types[0], Value::I32(2), "<unk> is UNKNOWN");
        assert_eq!(exported_types[1], Value::I32(3), "<s> is CONTROL");
        assert_eq!(exported_types[3 + 0x41], Value::I32(6), "<0x41> is BYTE");
        assert_eq!(
            exported_types[tokens.len()],
            Value::I32(5),
            "padding is UNUSED"
        );
        let again = gguf_tokenizer(&keys);
        for text in PROBES {
            assert_eq!(encode(&again, text), encode(&json, text), "{text:?}");
        }
    }
}
