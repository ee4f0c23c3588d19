//! The import rule of docs/ARCHITECTURE.md: a module of `src/` imports only from its own module and
//! from the layers below it, so the formats never learn about plans, the runtime never about the
//! trainer, and each layer can be read without the ones above it. `src/cli/`, `src/main.rs` and
//! `src/lib.rs` sit on top and may import anything; test modules (`#[cfg(test)]`) may use fixtures
//! from any layer.
//!
//! And the length rule (issue 19): no function in `src/` is longer than 80 lines; a longer one is
//! split into steps that can be named and read alone. A function that is a table (a long literal
//! list read top to bottom) may stay whole when a comment in its doc or just above it says
//! "table-shaped" and why.

use std::path::{Path, PathBuf};

/// Bottom to top; a module may import from its own layer's index or lower only when it is itself,
/// or strictly lower otherwise.
const LAYERS: &[&[&str]] = &[
    &["dtype", "paths", "atomic", "progress", "named", "units"],
    &["formats", "hub"],
    &["arch"],
    &["source"],
    &["tokenizer", "manifest", "model"],
    &["plan"],
    &["eval"],
    &["surgery", "export", "heal"],
    &["synth", "demo"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level modules that production code in `text` (a file of module `own`) imports with a
/// `crate::` path, test modules and whole-line comments left out.
fn imports(text: &str) -> Vec<String> {
    let code = without_test_modules(text);
    let mut out = Vec::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c}`: the first segment of each item (on this line).
                let group = group.split('}').next().unwrap_or("");
                out.extend(group.split(',').filter_map(first_segment));
            } else {
                out.extend(first_segment(rest));
            }
        }
    }
    out
}

/// `text` less each `#[cfg(test)] mod ... { ... }`, its braces matched (a brace inside a string
/// or char literal would mislead it; the sources have none in their test modules' outlines).
fn without_test_modules(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]\nmod ") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(open) = rest.find('{') else {
            return out;
        };
        let mut depth = 0;
        let mut end = rest.len();
        for (i, c) in rest[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn first_segment(path: &str) -> Option<String> {
    let name: String = path
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

/// "FILE imports crate::M (layer ...)" for each import of `text`, from module `own`, that breaks the
/// rule.
fn violations(file: &str, own: &str, text: &str) -> Vec<String> {
    let Some(mine) = layer(own) else {
        return vec![format!(
            "{file}: module {own} has no layer in tests/layering.rs"
        )];
    };
    let mut out = Vec::new();
    for m in imports(text) {
        if m == own {
            continue;
        }
        match layer(&m) {
            Some(theirs) if theirs < mine => {}
            Some(theirs) => out.push(format!(
                "{file} imports crate::{m}: {own} is in layer {mine}, {m} in layer {theirs}"
            )),
            None => out.push(format!(
                "{file} imports crate::{m}, which has no layer in tests/layering.rs"
            )),
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
fn no_module_imports_from_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut found = Vec::new();
    let mut checked = 0;
    for path in files {
        let rel = path
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel.starts_with("cli/") || rel == "main.rs" || rel == "lib.rs" {
            continue;
        }
        let own = rel.split('/').next().unwrap().trim_end_matches(".rs");
        found.extend(violations(
            &rel,
            own,
            &std::fs::read_to_string(&path).unwrap(),
        ));
        checked += 1;
    }
    assert!(checked > 50, "only {checked} files under src/");
    assert!(
        found.is_empty(),
        "imports against the layering:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_library_module_has_a_layer() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let modules: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';'))
        .collect();
    assert!(modules.len() > 10, "{modules:?}");
    let missing: Vec<&&str> = modules.iter().filter(|m| layer(m).is_none()).collect();
    assert!(missing.is_empty(), "modules without a layer: {missing:?}");
}

#[test]
fn the_check_catches_an_upward_import_and_passes_a_downward_one() {
    let upward =
        "use crate::plan::REFERENCE_STATE_STD;\nuse crate::{dtype::DType, source::SourceModel};\n";
    assert_eq!(
        violations("formats/x.rs", "formats", upward),
        vec![
            "formats/x.rs imports crate::plan: formats is in layer 1, plan in layer 5",
            "formats/x.rs imports crate::source: formats is in layer 1, source in layer 3",
        ]
    );
    // Same layer, another module: refused too (heal may not import export).
    assert_eq!(
        violations("heal/x.rs", "heal", "    crate::export::gguf::write(x)"),
        vec!["heal/x.rs imports crate::export: heal is in layer 7, export in layer 7"]
    );
    let fine = "use crate::formats::gguf;\n// crate::heal in a comment\nuse crate::eval::data;\n#[cfg(test)]\nmod tests {\n    fn f() { crate::synth::x() }\n}\n";
    assert!(violations("heal/x.rs", "heal", fine).is_empty());
    // Code after a test module is still read.
    let after = format!("{fine}pub fn g() {{ crate::demo::run() }}\n");
    assert_eq!(
        violations("heal/x.rs", "heal", &after),
        vec!["heal/x.rs imports crate::demo: heal is in layer 7, demo in layer 8"]
    );
}

/// The length rule: functions of at most this many lines.
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
