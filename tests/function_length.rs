//! No function in `src/` is longer than 80 lines (issue 19): a longer one is split into steps
//! that can be named and read alone. A function that is a table (a long literal list read top to
//! bottom) may stay whole when a comment in its doc or just above it says "table-shaped" and why.

use std::path::{Path, PathBuf};

const MAX_LINES: usize = 80;

/// Whether `line` starts a function item: `fn name`, after any visibility and qualifiers.
fn starts_fn(line: &str) -> bool {
    let mut rest = line.trim_start();
    for prefix in ["pub(crate) ", "pub(super) ", "pub "] {
        if let Some(r) = rest.strip_prefix(prefix) {
            rest = r;
            break;
        }
    }
    for qualifier in ["const ", "async ", "unsafe ", "extern \"C\" "] {
        if let Some(r) = rest.strip_prefix(qualifier) {
            rest = r;
        }
    }
    rest.starts_with("fn ")
}

/// The functions of `text` over `MAX_LINES` lines, as (first line number, name, lines), unless
/// marked table-shaped. A function ends at the first `}` at its own indentation.
fn long_functions(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !starts_fn(line) || line.trim_end().ends_with(';') {
            continue;
        }
        let indent = &line[..line.len() - line.trim_start().len()];
        let close = format!("{indent}}}");
        let Some(end) = lines[i..].iter().position(|l| *l == close) else {
            continue;
        };
        let n = end + 1;
        let marked = lines[..i]
            .iter()
            .rev()
            .take_while(|l| l.trim_start().starts_with("//") || l.trim_start().starts_with("#["))
            .any(|l| l.contains("table-shaped"));
        if n > MAX_LINES && !marked {
            let name = line.split("fn ").nth(1).unwrap_or("");
            let name = name.split(['(', '<']).next().unwrap_or("").to_string();
            out.push((i + 1, name, n));
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_function_in_src_is_over_80_lines() {
    let mut files = Vec::new();
    rust_files(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut files,
    );
    files.sort();
    let mut long = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        for (line, name, n) in long_functions(&text) {
            long.push(format!("{}:{line}: {name} has {n} lines", path.display()));
        }
    }
    assert!(
        long.is_empty(),
        "split these (or mark a table `table-shaped` with why):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_check_finds_a_long_function_and_honours_the_mark() {
    let body = "    let x = 1;\n".repeat(MAX_LINES);
    let long = format!("/// Does it.\npub(crate) fn long(a: u8) -> u8 {{\n{body}}}\n");
    assert_eq!(
        long_functions(&long),
        [(2, "long".to_string(), MAX_LINES + 2)]
    );
    let marked = format!("/// Every key in order (table-shaped: one line a key).\n{long}");
    assert!(long_functions(&marked).is_empty());
    let method =
        format!("impl A {{\n    fn short() {{\n    }}\n    async fn m<T>() {{\n{body}    }}\n}}\n");
    assert_eq!(
        long_functions(&method),
        [(4, "m".to_string(), MAX_LINES + 2)]
    );
    // A declaration without a body (a trait's) is not a function body.
    assert!(long_functions("trait T {\n    fn f(&self);\n}\n").is_empty());
}
