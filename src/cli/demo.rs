//! `surgery demo [--out DIR] [--heal-steps N]`: the whole method on the small pretrained model
//! embedded in the binary (the pipeline is `surgery::demo::run`); each stage's paragraph on stderr,
//! then the before/after table, or the summary as JSON.

use std::path::PathBuf;

use anyhow::Context;
use surgery::demo::{Narrator, Summary, PROMPT};
use surgery::heal::train::Observer;
use surgery::progress::Progress;

use super::{BarProgress, Global};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Keep the artifacts in DIR (written atomically); default: a new temporary folder.
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Replace an existing DIR.
    #[arg(long)]
    pub force: bool,
    /// Optimizer steps of the heal (4 sequences of 128 tokens each).
    #[arg(long, default_value_t = 450)]
    pub heal_steps: u64,
}

pub fn run(args: DemoArgs, global: Global) -> anyhow::Result<()> {
    let mut narrator = Terminal {
        global,
        bytes: BarProgress::new(global),
        tokens: BarProgress::tokens(global),
        heal: super::heal::Bar::new(global, args.heal_steps),
    };
    let Some(out) = &args.out else {
        let dir = std::env::temp_dir().join(format!("surgery-demo-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let summary = surgery::demo::run(&dir, &dir, args.heal_steps, &mut narrator)?;
        return report(&summary, global);
    };
    surgery::paths::refuse_existing(out, args.force)?;
    let io = |path: PathBuf, e| anyhow::Error::new(e).context(path.display().to_string());
    let summary = surgery::atomic::Staging::write_dir(out, args.force, io, |dir| {
        Ok(surgery::demo::run(
            dir,
            out,
            args.heal_steps,
            &mut narrator,
        )?)
    })?;
    report(&summary, global)
}

/// The demo told on stderr: each stage's paragraph (unless --quiet) and progress bars.
struct Terminal {
    global: Global,
    bytes: BarProgress,
    tokens: BarProgress,
    heal: super::heal::Bar,
}

impl Narrator for Terminal {
    fn stage(&mut self, title: &str, text: &str) {
        if !self.global.quiet {
            eprintln!("\n== {title}\n{text}");
        }
    }

    fn bytes(&mut self) -> &mut dyn Progress {
        &mut self.bytes
    }

    fn tokens(&mut self) -> &mut dyn Progress {
        &mut self.tokens
    }

    fn heal(&mut self) -> &mut dyn Observer {
        &mut self.heal
    }

    fn heal_finished(&mut self) {
        self.heal.bar.finish();
    }
}

/// The before/after table, the GGUF, the generated line and where everything is (or the JSON).
fn report(s: &Summary, global: Global) -> anyhow::Result<()> {
    if global.json {
        outln!("{}", serde_json::to_string_pretty(s)?)?;
        return Ok(());
    }
    outln!(
        "\nperplexity on {} held-out tokens (full {}-layer model: {:.2}); shape ({}), layers {} dropped",
        s.eval_tokens,
        s.model.layers,
        s.full_model_perplexity,
        s.shape,
        s.layers.dropped.join(", "),
    )?;
    outln!("{:>4} {:>12} {:>12}", "r", "before heal", "after heal")?;
    for row in &s.table {
        outln!("{:>4} {:>12.2} {:>12.2}", row.r, row.before, row.after)?;
    }
    outln!(
        "GGUF {} at r = {}: perplexity {:.2}",
        s.gguf.quant,
        s.gguf.r,
        s.gguf.perplexity
    )?;
    outln!(
        "generated (GGUF, r = {}): {PROMPT} {}",
        s.generated.r,
        s.generated.text
    )?;
    let a = &s.artifacts;
    outln!("artifacts in {}:", a.dir)?;
    for (path, what) in [
        (a.model, "the fixture model (Hugging Face Llama)"),
        (a.plan, "the plan apply executed"),
        (a.recurrent, "the recurrent checkpoint before healing"),
        (a.healed, "the healed checkpoint (metrics.jsonl, curves)"),
        (a.gguf, "the healed model as GGUF q8_0"),
        (a.summary, "this summary as JSON"),
    ] {
        outln!("  {path:<18} {what}")?;
    }
    outln!("done in {:.0} s", s.seconds)?;
    Ok(())
}
