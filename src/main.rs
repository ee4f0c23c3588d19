//! The `surgery` binary: parses arguments, dispatches to `cli::*`, prints the error chain on one
//! line and maps it to an exit code (1: invalid input or a failed check; 2: I/O or internal error).

mod cli;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    keep_freed_memory();
    park_idle_candle_workers();
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let json = cli.global.json;
    cli.global.set_threads();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `surgery inspect M | head -1`: the reader has what it wanted.
        Err(err) if err.downcast_ref::<cli::StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(err) => {
            let code = cli::exit_code(&err);
            let message = one_line(&err);
            eprintln!("error: {message}");
            if json {
                // Best effort: stdout may be the closed pipe the error is about.
                let line = serde_json::json!({"error": message, "exit_code": code});
                let _ = writeln!(std::io::stdout(), "{line}");
            }
            ExitCode::from(code)
        }
    }
}

/// Help and --version on stdout with exit code 0, bare `surgery` too (its help, as `cargo` does);
/// any other parse error as clap's whole message on one line (the missing argument named, the
/// usage, the advice), with exit code 1: invalid input, as every refusal here (2 is an I/O error).
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            use clap::CommandFactory;
            let _ = cli::Cli::command().print_help();
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{}", one_line_usage(&e.render().to_string()));
            ExitCode::from(1)
        }
    }
}

/// clap's message, its lines joined: the indented lines after one ending in `:` are a list (the
/// missing arguments), joined by `, `; other lines are separated by `; `.
fn one_line_usage(rendered: &str) -> String {
    let mut line = String::new();
    let mut in_list = false;
    for raw in rendered.lines().filter(|l| !l.trim().is_empty()) {
        let part = raw.trim();
        let item = raw.starts_with(char::is_whitespace);
        if line.ends_with(':') {
            line.push(' ');
            in_list = item;
        } else if !line.is_empty() {
            in_list &= item;
            line.push_str(if in_list { ", " } else { "; " });
        }
        line.push_str(part);
    }
    if line.is_empty() {
        "error: invalid arguments".into()
    } else {
        line
    }
}

/// Has glibc's malloc keep freed memory for reuse rather than hand it back to the kernel. A
/// training or eval step allocates and frees tensors of a few megabytes by the hundred; by default
/// glibc maps many of them fresh and unmaps them when freed, so every step pays the kernel for
/// page faults, zeroed pages and TLB shootdowns (a tenth of a heal step's samples, and about 10%
/// of its tokens/s, measured in docs/BENCHMARKS.md). Buffers up to 32 MiB (glibc's largest mmap
/// threshold) now come from the heap, whose top is kept up to 1 GiB. Peak RSS rose 3%.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc's parameters, here before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Has candle's own worker pool (elementwise ops; rayon runs the rest) park a worker as soon as it
/// runs out of work, instead of spinning 25,000 times first: on a machine with as many threads as
/// cores the spinning worker takes CPU from the threads with work (6% of a heal step's samples;
/// parking: heal +5%, eval +5-15% tokens/s, docs/BENCHMARKS.md). A value the user set is kept.
fn park_idle_candle_workers() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        // Before any other thread exists (candle reads it when its pool starts).
        std::env::set_var(SPIN_LIMIT, "0");
    }
}

/// The error chain on one line, each cause once: our errors often repeat their source's message.
fn one_line(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    message.replace('\n', " ")
}
