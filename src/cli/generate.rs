//! `surgery generate MODEL --prompt TEXT --recurrence R`: sample a continuation, streaming tokens
//! to stdout as they come; `--exit latent-diff:EPS` stops each token's core iterations early and
//! reports the mean recurrence per token.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};

use surgery::model::{generate, Exit, GenerateOptions, GenerateReport, Model};
use surgery::source::SourceModel;
use surgery::tokenizer::chat::Message;
use surgery::tokenizer::text::TextTokenizer;

use super::Global;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A recurrent checkpoint or GGUF, or any static model (then r is ignored).
    pub model: PathBuf,
    /// The text to continue (special tokens such as <|im_start|> are recognized).
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// The prompt is a user's turn: rendered with the model's chat template, the assistant's
    /// turn opened after it (as transformers' apply_chat_template with add_generation_prompt).
    #[arg(long)]
    pub chat: bool,
    /// Core iterations per token (the most, with --exit); default: the mean recurrence the model
    /// was healed at when `heal` wrote it, else its config's mean_recurrence.
    #[arg(long, value_name = "R")]
    pub recurrence: Option<usize>,
    /// Tokens to generate at most.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampler and of the initial states.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Adaptive compute: latent-diff:EPS stops a token's iterations once
    /// ||s_i - s_{i-1}|| / ||s_i|| < EPS.
    #[arg(long, value_name = "latent-diff:EPS", value_parser = parse_exit)]
    pub exit: Option<Exit>,
    /// Keep going after the end-of-text token (for benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub runtime: super::Runtime,
    /// Dequantize a quantized GGUF's weights to f32 (its exact values) instead of multiplying
    /// with its blocks as llama.cpp does (more memory, no rounding of activations).
    #[arg(long)]
    pub dequantize: bool,
}

fn parse_exit(s: &str) -> Result<Exit, String> {
    s.parse()
}

/// Text decoded so far, printed as it grows; a trailing incomplete UTF-8 sequence (U+FFFD) is
/// held back until the next token completes it.
struct Streamer<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    printed: usize,
    echo: bool,
}

impl Streamer<'_> {
    fn push(&mut self, id: u32) -> anyhow::Result<()> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        let ready = text.trim_end_matches('\u{FFFD}');
        if self.echo && ready.len() > self.printed && ready.is_char_boundary(self.printed) {
            let mut out = std::io::stdout().lock();
            out.write_all(&ready.as_bytes()[self.printed..])
                .and_then(|()| out.flush())
                .map_err(super::closed)?;
            self.printed = ready.len();
        }
        Ok(())
    }
}

pub fn run(args: GenerateArgs, global: Global) -> anyhow::Result<()> {
    if args.recurrence == Some(0) {
        bail!("--recurrence 0 is not a recurrence: the core runs r >= 1 times");
    }
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature must be a number >= 0");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let device = args.runtime.device()?;
    let source = SourceModel::open(&args.model)?;
    let tokenizer = TextTokenizer::for_model(&source)?;
    let prompt = if args.chat {
        let turn = Message {
            role: "user".into(),
            content: args.prompt.clone(),
        };
        tokenizer.encode_chat(&[turn], true)?
    } else {
        tokenizer.encode(&args.prompt)?
    };
    if prompt.is_empty() {
        bail!("the prompt tokenizes to nothing: give some text");
    }
    let mut model = Model::load_as(&source, None, &device, super::weights(args.dequantize))?;
    model.set_kernels(args.runtime.kernels);
    let r = match source.config.recurrent {
        Some(shape) => match args.recurrence {
            Some(r) => r,
            None => default_recurrence(&source, shape.mean_recurrence, global)?,
        },
        None => {
            if args.recurrence.is_some() && !global.quiet {
                eprintln!("note: a static model has no recurrence; --recurrence is ignored");
            }
            1
        }
    };
    let opts = GenerateOptions {
        r,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        exit: args.exit.unwrap_or(Exit::Never),
        stop: if args.ignore_eos {
            vec![]
        } else {
            tokenizer.eos.into_iter().collect()
        },
    };
    let mut streamer = Streamer {
        tokenizer: &tokenizer,
        ids: Vec::new(),
        printed: 0,
        echo: !global.json,
    };
    let mut failed = None;
    let report = generate(&model, &prompt, &opts, &mut |id| {
        if let Err(e) = streamer.push(id) {
            failed = Some(e);
        }
        Ok(())
    })
    .context("generating")?;
    if let Some(e) = failed {
        return Err(e);
    }
    let text = tokenizer.decode(&report.tokens)?;
    let r = source.config.recurrent.map(|_| r);
    print_result(&args, global, r, &text, &report, streamer.printed)
}

/// The recurrence a recurrent model runs at without --recurrence: the one it was healed at when
/// `heal` wrote it (its config.json records the run; noted on stderr), else its config's
/// `mean_recurrence`.
fn default_recurrence(
    source: &SourceModel,
    mean_recurrence: usize,
    global: Global,
) -> anyhow::Result<usize> {
    if source.gguf().is_some() {
        return Ok(mean_recurrence);
    }
    let Some(healed) = surgery::heal::checkpoint::healed_recurrence(&source.root)? else {
        return Ok(mean_recurrence);
    };
    if !global.quiet {
        eprintln!(
            "note: r = {healed}, the mean recurrence this model was healed at (config.json's \
             surgery.heal); pass --recurrence R for another"
        );
    }
    Ok(healed)
}

/// The JSON, or the rest of the text after the `streamed` bytes already printed and the run's
/// numbers on stderr. `r` is None for a static model.
fn print_result(
    args: &GenerateArgs,
    global: Global,
    r: Option<usize>,
    text: &str,
    report: &GenerateReport,
    streamed: usize,
) -> anyhow::Result<()> {
    if global.json {
        let value = serde_json::json!({
            "model": args.model.display().to_string(),
            "prompt": args.prompt,
            "text": text,
            "r": r,
            "exit": args.exit.map(|e| match e {
                Exit::LatentDiff(eps) => format!("latent-diff:{eps}"),
                Exit::Never => "never".into(),
            }),
            "report": report,
        });
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    // Whatever the stream held back (a final incomplete character) and the newline.
    let rest = text.get(streamed..).unwrap_or("");
    outln!("{rest}")?;
    if !global.quiet {
        let mean = report
            .mean_recurrence
            .map(|m| format!(", mean recurrence {m:.2} of at most {}", r.unwrap_or(1)))
            .unwrap_or_default();
        eprintln!(
            "{} prompt tokens, {} generated ({}), {:.1} tokens/s after a {:.2} s prefill{mean}",
            report.prompt_tokens,
            report.tokens.len(),
            report.stopped.replace('_', " "),
            report.tokens_per_second,
            report.prefill_seconds,
        );
    }
    Ok(())
}
