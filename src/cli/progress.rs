//! Progress on stderr: an indicatif bar on a terminal; elsewhere (a log file, `nohup`, a Slurm
//! job) a plain line every [`log_every`] seconds, so that a log shows a long command's progress
//! before it ends (issue 20); nothing with --quiet.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::{si, thousands, Global};

/// The variable that sets the seconds between progress lines off a terminal.
pub const PROGRESS_SECONDS: &str = "SURGERY_PROGRESS_SECONDS";

/// Seconds between progress lines off a terminal: [`PROGRESS_SECONDS`], else 10 (a line a few
/// times a minute: enough to see a run move, few enough for a long run's log).
fn log_every() -> Duration {
    std::env::var(PROGRESS_SECONDS)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(10), Duration::from_secs_f64)
}

/// What a [`Meter`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes, in decimal units (MB), as every size the tool prints.
    Bytes,
    /// Plain counts (windows, candidates).
    Count,
    /// Scored tokens, with their rate.
    Tokens,
    /// Optimizer steps; the message carries the step's numbers.
    Steps,
}

impl Unit {
    /// The bar's template on a terminal (`{prefix}`: what is measured).
    fn template(self) -> &'static str {
        match self {
            Unit::Bytes => "{prefix} [{bar:30}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} {eta}",
            Unit::Count => "{prefix} [{bar:30}] {pos}/{len} {eta}",
            Unit::Tokens => "{prefix} [{bar:30}] {pos}/{len} tokens {per_sec} {eta}",
            Unit::Steps => "{prefix} [{bar:30}] step {pos}/{len} {msg} {eta}",
        }
    }
}

/// Off a terminal: when the last line was printed and whether any was.
struct Log {
    every: Duration,
    last: Instant,
    printed: bool,
}

/// One progress display on stderr (see the module's header).
pub struct Meter {
    bar: ProgressBar,
    label: String,
    unit: Unit,
    quiet: bool,
    /// Some off a terminal (and without --quiet): the bar is hidden and lines are printed.
    log: Option<Mutex<Log>>,
}

impl Meter {
    /// A display of `label`'s progress over `len` units.
    pub fn new(global: Global, len: u64, label: &str, unit: Unit) -> Meter {
        let terminal = std::io::stderr().is_terminal();
        let bar = if global.quiet || !terminal {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::new(len).with_prefix(label.to_string());
            bar.set_style(
                ProgressStyle::with_template(unit.template())
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        };
        // A hidden bar keeps its position, length and rate: the lines are made from them.
        bar.set_length(len);
        let log = (!global.quiet && !terminal).then(|| {
            Mutex::new(Log {
                every: log_every(),
                last: Instant::now(),
                printed: false,
            })
        });
        Meter {
            bar,
            label: label.to_string(),
            unit,
            quiet: global.quiet,
            log,
        }
    }

    pub fn set_length(&self, len: u64) {
        self.bar.set_length(len);
    }

    /// Moves to `pos`; off a terminal, prints a line when the interval has passed.
    pub fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        let Some(log) = &self.log else {
            return;
        };
        let Ok(mut log) = log.lock() else {
            return;
        };
        if log.last.elapsed() >= log.every {
            log.last = Instant::now();
            log.printed = true;
            say(&self.line(false));
        }
    }

    /// The text after the counts (heal's loss, LR, m and tokens/s).
    pub fn set_message(&self, message: String) {
        self.bar.set_message(message);
    }

    /// `text` on its own line: above a drawn bar, or plainly; nothing with --quiet.
    pub fn println(&self, text: &str) {
        if self.quiet {
            return;
        }
        if self.bar.is_hidden() {
            say(text);
        } else {
            self.bar.println(text);
        }
    }

    /// Clears the bar; off a terminal, a last line with the time taken, when any line was
    /// printed (a command that ends within the interval prints none).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if let Some(Ok(log)) = self.log.as_ref().map(Mutex::lock) {
            if log.printed {
                say(&self.line(true));
            }
        }
    }

    /// `label: amount (pct%), rate, message, ETA` (at the end: the elapsed time instead).
    fn line(&self, done: bool) -> String {
        let pos = self.bar.position();
        let len = self.bar.length().unwrap_or(0);
        let mut line = format!("{}: ", self.label);
        line.push_str(&match self.unit {
            Unit::Bytes => format!("{} of {}", si(pos as f64, "B"), si(len as f64, "B")),
            Unit::Count => format!("{pos}/{len}"),
            Unit::Tokens => format!("{}/{} tokens", thousands(pos), thousands(len)),
            Unit::Steps => format!("step {pos}/{len}"),
        });
        if let Some(pct) = pos.saturating_mul(100).checked_div(len) {
            line.push_str(&format!(" ({pct}%)"));
        }
        let rate = self.bar.per_sec();
        match self.unit {
            Unit::Bytes => line.push_str(&format!(", {}/s", si(rate, "B"))),
            Unit::Tokens => line.push_str(&format!(", {} tokens/s", thousands(rate as u64))),
            Unit::Count | Unit::Steps => {}
        }
        let message = self.bar.message();
        if !message.is_empty() {
            line.push_str(&format!(", {message}"));
        }
        if done {
            line.push_str(&format!(", done in {}", clock(self.bar.elapsed())));
        } else if pos > 0 && len > pos {
            line.push_str(&format!(", ETA {}", clock(self.bar.eta())));
        }
        line
    }
}

/// `line` on stderr. A failed write is ignored (`eprintln!` would panic): a log that cannot be
/// written, or a reader that stopped reading (`2>&1 | head`), does not stop the work it reports on.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// 3725 s -> "1h 02m 05s", 125 s -> "2m 05s", 7.2 s -> "7s".
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m {sec:02}s"),
        (h, min, sec) => format!("{h}h {min:02}m {sec:02}s"),
    }
}

/// The library's progress reports ([`surgery::progress::Progress`]) drawn as one [`Meter`] per
/// step, in bytes, plain counts or tokens.
pub struct BarProgress {
    global: Global,
    meter: Option<Meter>,
    unit: Unit,
}

impl BarProgress {
    /// Progress in bytes.
    pub fn new(global: Global) -> Self {
        BarProgress {
            global,
            meter: None,
            unit: Unit::Bytes,
        }
    }

    /// Progress in plain counts (windows, candidates).
    pub fn counting(global: Global) -> Self {
        BarProgress {
            unit: Unit::Count,
            ..BarProgress::new(global)
        }
    }

    /// Progress in scored tokens, with their rate.
    pub fn tokens(global: Global) -> Self {
        BarProgress {
            unit: Unit::Tokens,
            ..BarProgress::new(global)
        }
    }
}

impl surgery::progress::Progress for BarProgress {
    fn start(&mut self, what: &str, total: u64) {
        self.meter = Some(Meter::new(self.global, total, what, self.unit));
    }

    fn advance(&mut self, done: u64) {
        if let Some(meter) = &self.meter {
            meter.set_position(done);
        }
    }

    fn finish(&mut self) {
        if let Some(meter) = self.meter.take() {
            meter.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn clock_reads_as_hours_minutes_seconds() {
        use std::time::Duration;
        let clock = |s: f64| super::clock(Duration::from_secs_f64(s));
        assert_eq!(clock(7.2), "7s");
        assert_eq!(clock(125.0), "2m 05s");
        assert_eq!(clock(3725.0), "1h 02m 05s");
    }
}
