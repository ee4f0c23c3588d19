//! The command-line habits of the field (issue 20, part 6), each through the real binary: clap's
//! whole message on one line, bare `surgery` prints the help, the short flags, generate's default
//! recurrence, progress lines off a terminal, heal's time estimate, no checkpoints folder without
//! checkpoints, plan's dropped ranges, one size unit, and the note on requantizing.

mod common;

use common::{stderr, stdout, surgery};

#[test]
fn a_usage_error_is_clap_s_whole_message_on_one_line() {
    let d = tempfile::tempdir().unwrap();
    // A missing required argument is named (clap's first line alone does not name it).
    let o = surgery(d.path(), &["generate", "m"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        "error: the following required arguments were not provided: --prompt <PROMPT>; \
         Usage: surgery generate --prompt <PROMPT> <MODEL>; For more information, try '--help'.\n"
    );
    // Several missing arguments: a list, then the usage.
    let o = surgery(d.path(), &["heal"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "error: the following required arguments were not provided: --data <DATA>..., \
             --out <OUT>, <MODEL>; Usage: surgery heal"
        ),
        "{err}"
    );
    // An unknown flag keeps clap's tip and usage.
    let o = surgery(d.path(), &["inspect", "--bogus"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("unexpected argument '--bogus' found; tip:"),
        "{err}"
    );
    assert!(
        err.contains("; Usage: surgery inspect [OPTIONS] <MODEL>"),
        "{err}"
    );
    assert!(common::listing(d.path()).is_empty(), "nothing written");
}

#[test]
fn bare_surgery_prints_the_help_and_succeeds() {
    let d = tempfile::tempdir().unwrap();
    let o = surgery(d.path(), &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let help = stdout(&surgery(d.path(), &["--help"]));
    assert_eq!(stdout(&o), help);
    assert!(
        help.contains("Usage: surgery [OPTIONS] <COMMAND>"),
        "{help}"
    );
    assert_eq!(stderr(&o), "");
}
