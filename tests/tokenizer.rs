//! The tokenizer.json built from a GGUF vocabulary tokenizes as llama.cpp does: SmolLM2's ids
//! equal llama.cpp's `llama-tokenize --no-bos` on the golden texts, byte-level BPE round-trips
//! held-out XSum documents exactly, and BOS is added only as `tokenizer.ggml.add_bos_token` says.

mod common;

use std::path::Path;
use std::str::FromStr;

use serde_json::Value as Json;
use surgery::formats::gguf::{write_gguf, GgufFile, Value};
use surgery::tokenizer::gguf::{
    tokenizer_config_json_from_gguf, tokenizer_json_from_gguf, KEY_ADD_BOS,
};
use tokenizers::Tokenizer;

fn load(json: &Json) -> Tokenizer {
    Tokenizer::from_str(&json.to_string()).expect("tokenizers loads our tokenizer.json")
}

fn smollm2_tokenizer(path: &Path) -> Tokenizer {
    let g = GgufFile::open(path).expect("the SmolLM2 GGUF opens");
    load(&tokenizer_json_from_gguf(&g).expect("SmolLM2's vocabulary converts"))
}

fn encode(t: &Tokenizer, text: &str, add_special_tokens: bool) -> Vec<u32> {
    t.encode(text, add_special_tokens)
        .expect("encodes")
        .get_ids()
        .to_vec()
}

/// `ids[at-3..at+3]`, each decoded on its own, for a readable mismatch message.
fn around(t: &Tokenizer, ids: &[u32], at: usize) -> String {
    let lo = at.saturating_sub(3);
    let hi = (at + 4).min(ids.len());
    ids.get(lo..hi)
        .unwrap_or(&[])
        .iter()
        .map(|&id| format!("{id}:{:?}", t.decode(&[id], false).unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn smollm2_ids_equal_llama_cpp_on_the_golden_texts() {
    let Some(gguf) = common::smollm2() else {
        return;
    };
    let golden_path = common::root().join("tests/golden/smollm2-tokens.json");
    let Ok(golden) = std::fs::read_to_string(&golden_path) else {
        eprintln!("NOTICE: skipping: {} is missing", golden_path.display());
        return;
    };
    let golden: Json = serde_json::from_str(&golden).expect("golden JSON parses");
    let cases = golden["cases"].as_array().expect("golden has cases");
    assert!(!cases.is_empty());
    let t = smollm2_tokenizer(&gguf);

    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let text = case["text"].as_str().expect("case text");
        let want: Vec<u32> =
            serde_json::from_value(case["ids_llama_cpp"].clone()).expect("case ids are u32s");
        let got = encode(&t, text, false);
        if got == want {
            continue;
        }
        let at = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        failures.push(format!(
            "case {i} ({} vs {} ids) differs at {at}:\n  ours:      {}\n  llama.cpp: {}",
            got.len(),
            want.len(),
            around(&t, &got, at),
            around(&t, &want, at),
        ));
    }
    eprintln!(
        "{} of {} golden cases equal llama.cpp",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn smollm2_round_trips_200_xsum_documents() {
    let (Some(gguf), Some(xsum)) = (common::smollm2(), common::asset("xsum-test.jsonl")) else {
        return;
    };
    let t = smollm2_tokenizer(&gguf);
    let lines = std::fs::read_to_string(xsum).expect("XSum reads");
    let documents: Vec<String> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter_map(|j| j["document"].as_str().map(str::to_owned))
        .take(200)
        .collect();
    assert_eq!(documents.len(), 200, "XSum has 200 documents");
    let mut n_tokens = 0;
    for (i, doc) in documents.iter().enumerate() {
        let ids = encode(&t, doc, false);
        n_tokens += ids.len();
        let back = t.decode(&ids, false).expect("decodes");
        assert!(back == *doc, "document {i} does not round-trip");
    }
    eprintln!("200 XSum documents ({n_tokens} tokens) round-trip exactly");
}

#[test]
fn smollm2_special_tokens_are_matched_in_text_and_survive_decoding() {
    let Some(gguf) = common::smollm2() else {
        return;
    };
    let t = smollm2_tokenizer(&gguf);
    let text = "<|im_start|>user\nHi<|im_end|>\n";
    let ids = encode(&t, text, false);
    assert_eq!(ids.first(), Some(&1), "{ids:?}");
    assert!(ids.contains(&2), "{ids:?}");
    assert_eq!(t.decode(&ids, false).expect("decodes"), text);
    assert_eq!(t.decode(&ids, true).expect("decodes"), "user\nHi\n");
}

/// The SmolLM2 tokenizer metadata, without tensors, with `add_bos_token` set as given (None:
/// removed), written to `dir` and opened.
fn smollm2_with_add_bos(gguf: &Path, dir: &Path, add_bos: Option<bool>) -> GgufFile {
    let g = GgufFile::open(gguf).expect("the SmolLM2 GGUF opens");
    let mut metadata: Vec<(String, Value)> = g
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer.") && k != KEY_ADD_BOS)
        .cloned()
        .collect();
    if let Some(b) = add_bos {
        metadata.push((KEY_ADD_BOS.to_string(), Value::Bool(b)));
    }
    let path = dir.join(format!("tokenizer-{add_bos:?}.gguf"));
    write_gguf(&path, &metadata, &[]).expect("writes");
    GgufFile::open(&path).expect("reopens")
}

#[test]
fn smollm2_adds_bos_only_when_the_gguf_says_so() {
    let Some(gguf) = common::smollm2() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = "Hello world";
    let plain = encode(&smollm2_tokenizer(&gguf), text, false);

    // SmolLM2 says add_bos_token = false; an absent key is llama.cpp's default for `smollm`,
    // also false.
    for add_bos in [Some(false), None] {
        let g = smollm2_with_add_bos(&gguf, dir.path(), add_bos);
        let t = load(&tokenizer_json_from_gguf(&g).unwrap());
        assert_eq!(encode(&t, text, true), plain, "add_bos_token = {add_bos:?}");
        let config = tokenizer_config_json_from_gguf(&g);
        assert_eq!(config["add_bos_token"], Json::Bool(false));
    }

    let g = smollm2_with_add_bos(&gguf, dir.path(), Some(true));
    let t = load(&tokenizer_json_from_gguf(&g).unwrap());
    let with_bos: Vec<u32> = [1].into_iter().chain(plain.iter().copied()).collect();
    assert_eq!(encode(&t, text, true), with_bos);
    assert_eq!(encode(&t, text, false), plain);
    assert_eq!(
        tokenizer_config_json_from_gguf(&g)["add_bos_token"],
        Json::Bool(true)
    );
}

#[test]
fn smollm2_tokenizer_config_names_the_special_tokens_and_template() {
    let Some(gguf) = common::smollm2() else {
        return;
    };
    let g = GgufFile::open(&gguf).expect("the SmolLM2 GGUF opens");
    let c = tokenizer_config_json_from_gguf(&g);
    assert_eq!(c["bos_token"], "<|im_start|>");
    assert_eq!(c["eos_token"], "<|im_end|>");
    assert_eq!(c["unk_token"], "<|endoftext|>");
    assert_eq!(c["pad_token"], "<|im_end|>");
    assert_eq!(c["add_bos_token"], false);
    assert_eq!(c["clean_up_tokenization_spaces"], false);
    let template = c["chat_template"].as_str().expect("a chat template");
    assert!(template.contains("<|im_start|>"), "{template}");
}

#[test]
fn smollm2_chat_template_renders_as_jinja2_does() {
    let Some(gguf) = common::smollm2() else {
        return;
    };
    let model = surgery::source::SourceModel::open(&gguf).unwrap();
    let tok = surgery::tokenizer::text::TextTokenizer::for_model(&model).unwrap();
    let turns = [
        ("user", "What is 2+2?"),
        ("assistant", "4."),
        ("user", "And 3+3?"),
    ];
    let messages: Vec<_> = turns
        .iter()
        .map(|(role, content)| surgery::tokenizer::chat::Message {
            role: role.to_string(),
            content: content.to_string(),
        })
        .collect();
    // jinja2 3.1.4 in transformers' environment (trim_blocks, lstrip_blocks) on the GGUF's
    // tokenizer.chat_template: the system turn the template adds, then the conversation.
    assert_eq!(
        tok.chat().unwrap().render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    );
    // The fixture's tokenizer has no template.
    let tiny =
        surgery::source::SourceModel::open(&common::root().join("fixtures/tiny/model")).unwrap();
    let err = surgery::tokenizer::text::TextTokenizer::for_model(&tiny)
        .unwrap()
        .chat()
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("the model has no chat template"),
        "{err}"
    );
}
