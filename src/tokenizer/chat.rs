//! Chat templates: a model's Jinja `chat_template` (its tokenizer_config.json, or a GGUF's
//! `tokenizer.chat_template`) rendered as transformers' `apply_chat_template` renders it: blocks
//! trimmed (`trim_blocks`, `lstrip_blocks`), loop controls, Python's string methods, and
//! `raise_exception`, with `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! A template comes with the model, so it is untrusted: minijinja has no file or network access,
//! and rendering runs on a budget of instructions ([`FUEL`]) so a template cannot loop forever.

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
