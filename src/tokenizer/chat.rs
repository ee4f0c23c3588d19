//! Chat templates: a model's Jinja `chat_template` (its tokenizer_config.json, or a GGUF's
//! `tokenizer.chat_template`) rendered as transformers' `apply_chat_template` renders it: blocks
//! trimmed (`trim_blocks`, `lstrip_blocks`), loop controls, Python's string methods, and
//! `raise_exception`, with `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! A template comes with the model, so it is untrusted: minijinja has no file or network access,
//! and rendering runs on a budget of instructions ([`FUEL`]) so a template cannot loop forever.

use std::ops::Range;

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::text::{TextTokenizer, TextTokenizerError};

/// Instructions one rendering may run: far above any real template on a long conversation
/// (SmolLM2's spends about 40 a message), far below a minute.
const FUEL: u64 = 50_000_000;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, or whatever the template accepts.
    pub role: String,
    pub content: String,
}

/// Why a conversation could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model carries no chat template.
    #[error("the model has no chat template (tokenizer_config.json's chat_template, or a GGUF's tokenizer.chat_template)")]
    NoTemplate,
    /// The template does not parse, raised an exception, or ran out of its budget.
    #[error("chat template: {0}")]
    Template(String),
    /// The template does not render a conversation as the renderings of its beginnings
    /// followed by more text, so the assistant's turns cannot be located in it.
    #[error("the chat template does not render the conversation turn by turn (message {0} changes what came before it), so its assistant turns cannot be located; train on every token with --loss-on all")]
    NotIncremental(usize),
    /// The rendered conversation could not be tokenized.
    #[error(transparent)]
    Encode(#[from] TextTokenizerError),
}

/// A model's chat template and the special tokens it may name.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template of a tokenizer_config.json document: `chat_template` as a string, or as a
    /// list of named templates (the one named `default`); None when there is none.
    pub(crate) fn from_config(config: &Json) -> Option<ChatTemplate> {
        let source = match &config["chat_template"] {
            Json::String(s) => s.clone(),
            Json::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())?
                .to_string(),
            _ => return None,
        };
        // A special token is written as its text, or as an AddedToken object with `content`.
        let token = |key: &str| match &config[key] {
            Json::String(s) => s.clone(),
            other => other["content"].as_str().unwrap_or("").to_string(),
        };
        Some(ChatTemplate {
            source,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
        })
    }

    /// `messages` rendered; with `add_generation_prompt`, followed by what opens the assistant's
    /// turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        let fail = |e: Error| ChatError::Template(message(&e));
        let template = env.template_from_str(&self.source).map_err(fail)?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        template.render(context).map_err(fail)
    }
}

impl ChatTemplate {
    /// `messages` rendered, and the byte ranges of the rendering that are the assistant's turns:
    /// for assistant message i, the text that rendering messages 0..=i ends with after the
    /// template's generation prompt (what `add_generation_prompt` adds to messages 0..i), that
    /// is its content and the template's end-of-turn text. The prompt is looked for from where
    /// the rendering of messages 0..i stops matching, so a system turn a template adds in front
    /// of a conversation is passed over. A template that rewrites earlier turns as more follow
    /// (dropping past reasoning, say) is refused.
    pub fn assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<Range<usize>>), ChatError> {
        let whole = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let not_incremental = || ChatError::NotIncremental(i + 1);
            let before = self.render(&messages[..i], false)?;
            let prompted = self.render(&messages[..i], true)?;
            let opening = prompted
                .strip_prefix(before.as_str())
                .ok_or_else(not_incremental)?;
            let through = self.render(&messages[..=i], false)?;
            if !whole.starts_with(&through) {
                return Err(not_incremental());
            }
            let from = common_prefix(&before, &through);
            let at = through[from..].find(opening).ok_or_else(not_incremental)?;
            let start = from + at + opening.len();
            if start < through.len() {
                spans.push(start..through.len());
            }
        }
        Ok((whole, spans))
    }
}

/// The length in bytes of the longest common prefix of `a` and `b`, at a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((at, _), _)| at)
}

impl TextTokenizer {
    /// The token ids of `messages` rendered with the model's chat template, as transformers'
    /// `apply_chat_template(tokenize=True)` gives them: the template places its own special
    /// tokens, the post-processor adds none.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, ChatError> {
        let text = self.chat()?.render(messages, add_generation_prompt)?;
        Ok(self.encode_plain(&text)?)
    }

    /// [`TextTokenizer::encode_chat`] of a whole conversation, and for each token whether it is
    /// part of an assistant's turn ([`ChatTemplate::assistant_spans`]): a token is when its text
    /// overlaps one.
    pub fn encode_chat_assistant(
        &self,
        messages: &[Message],
    ) -> Result<(Vec<u32>, Vec<bool>), ChatError> {
        let (text, spans) = self.chat()?.assistant_spans(messages)?;
        let (ids, offsets) = self.encode_plain_offsets(&text)?;
        let assistant = offsets
            .iter()
            .map(|&(start, end)| {
                // A token trimmed to nothing (a bare space) is taken at its start.
                let end = end.max(start + 1);
                spans.iter().any(|s| start < s.end && end > s.start)
            })
            .collect();
        Ok((ids, assistant))
    }
}

/// An error's message on one line: a `raise_exception` as the template said it, anything else
/// with minijinja's own words.
fn message(e: &Error) -> String {
    let text = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => e.to_string(),
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn messages(turns: &[(&str, &str)]) -> Vec<Message> {
        turns
            .iter()
            .map(|(role, content)| Message {
                role: role.to_string(),
                content: content.to_string(),
            })
            .collect()
    }

    /// A template shaped like Llama 3's: a leading bos_token, whitespace control, a method
    /// call, a loop control and raise_exception. The expected text is jinja2 3.1.4's rendering
    /// in transformers' environment (trim_blocks, lstrip_blocks, loopcontrols).
    const LLAMA_LIKE: &str = "{{- bos_token }}\n{% for message in messages %}\n    {% if message['role'] not in ['system', 'user', 'assistant'] %}\n        {{- raise_exception('Conversation roles must be system, user or assistant') }}\n    {% endif %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'].strip() + '<|eot_id|>' }}\n    {% if loop.last and message['role'] == 'assistant' %}{% break %}{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{% endif %}\n";

    #[test]
    fn renders_as_jinja2_in_transformers_environment() {
        let config = json!({
            "chat_template": LLAMA_LIKE,
            "bos_token": {"content": "<|begin_of_text|>", "lstrip": false},
            "eos_token": "<|eot_id|>",
        });
        let chat = ChatTemplate::from_config(&config).unwrap();
        let text = chat
            .render(
                &messages(&[("system", "  Be brief. "), ("user", "Hi\n")]),
                true,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|>\n<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n<|start_header_id|>assistant<|end_header_id|>\n\n\n"
        );
        let err = chat.render(&messages(&[("tool", "x")]), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "chat template: Conversation roles must be system, user or assistant"
        );
    }

    #[test]
    fn assistant_turns_are_what_each_turn_adds_after_the_generation_prompt() {
        // SmolLM2's ChatML, with the default system turn it adds when there is none.
        let chatml = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let chat = ChatTemplate::from_config(&json!({ "chat_template": chatml })).unwrap();
        let turns = messages(&[
            ("assistant", "Welcome."),
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "Bye"),
        ]);
        let (text, spans) = chat.assistant_spans(&turns).unwrap();
        assert_eq!(text, chat.render(&turns, false).unwrap());
        let parts: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(parts, ["Welcome.<|im_end|>\n", "Hello.<|im_end|>\n"]);
        // A template that rewrites a past turn once another follows cannot be split in turns.
        let rewriting = "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[past]{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let chat = ChatTemplate::from_config(&json!({ "chat_template": rewriting })).unwrap();
        let err = chat.assistant_spans(&turns).unwrap_err();
        assert!(matches!(err, ChatError::NotIncremental(1)), "{err}");
        assert!(err.to_string().ends_with("--loss-on all"), "{err}");
    }

    #[test]
    fn named_templates_and_their_absence() {
        let config = json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
        ]});
        let chat = ChatTemplate::from_config(&config).unwrap();
        assert_eq!(
            chat.render(&messages(&[("user", "a"), ("assistant", "b")]), false)
                .unwrap(),
            "ab"
        );
        assert!(ChatTemplate::from_config(&json!({"bos_token": "<s>"})).is_none());
        assert!(ChatTemplate::from_config(
            &json!({"chat_template": [{"name": "x", "template": "y"}]})
        )
        .is_none());
    }

    #[test]
    fn a_template_that_never_ends_runs_out_of_fuel_and_a_broken_one_is_named() {
        let config = json!({"chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"});
        let err = ChatTemplate::from_config(&config)
            .unwrap()
            .render(&[], false)
            .unwrap_err();
        assert!(err.to_string().contains("ran out of fuel"), "{err}");
        let config = json!({"chat_template": "{% for m in messages %}"});
        let err = ChatTemplate::from_config(&config)
            .unwrap()
            .render(&[], false)
            .unwrap_err();
        assert!(err.to_string().starts_with("chat template: "), "{err}");
        assert!(!err.to_string().contains('\n'));
    }
}
