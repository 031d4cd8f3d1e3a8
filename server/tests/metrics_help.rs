//! Every metric kvindex emits has a description (`# HELP` on `/metrics`): the metric names in
//! the sources of the engine, persistence and server crates (string literals, and the
//! constants naming them) are each passed to a `describe_counter!` / `describe_gauge!` /
//! `describe_histogram!` somewhere in those sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CRATES: [&str; 3] = ["engine", "persistence", "server"];
const MACROS: [&str; 3] = ["counter!(", "gauge!(", "histogram!("];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The sources, without `//` comment lines.
fn sources() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for c in CRATES {
        rust_files(&root.join(c).join("src"), &mut files);
    }
    assert!(
        files.len() > 20,
        "sources not found under {}",
        root.display()
    );
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read a source file");
            let code: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect();
            (p, code.join("\n"))
        })
        .collect()
}

fn is_metric_name(s: &str) -> bool {
    (s.starts_with("kvindex_") || s.starts_with("dynamo_"))
        && s.len() > 8
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Every string literal of `code` that is a metric name.
fn metric_literals(code: &str) -> Vec<String> {
    code.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| is_metric_name(s))
        .map(str::to_owned)
        .collect()
}

/// `const NAME: &str = "kvindex_…";` → NAME ↦ (file, value), for every file defining it.
type Consts = BTreeMap<String, Vec<(PathBuf, String)>>;

fn metric_consts(path: &Path, code: &str, into: &mut Consts) {
    for line in code.lines() {
        let Some((_, rest)) = line.split_once("const ") else {
            continue;
        };
        let Some((name, rest)) = rest.split_once(':') else {
            continue;
        };
        let Some((ty, value)) = rest.split_once('=') else {
            continue;
        };
        if !ty.contains("str") {
            continue;
        }
        let value = value.trim().trim_end_matches(';').trim_matches('"');
        if is_metric_name(value) {
            into.entry(name.trim().to_owned())
                .or_default()
                .push((path.to_owned(), value.to_owned()));
        }
    }
}

/// The first argument of every `<prefix><macro>` call of `code`, e.g. of every
/// `describe_counter!(` for `prefix` = `describe_`; without `prefix`, calls whose macro name
/// has no prefix (`counter!(`, `metrics::counter!(`, not `describe_counter!(`).
fn first_args(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for m in MACROS {
        let pat = format!("{prefix}{m}");
        let mut from = 0;
        while let Some(i) = code[from..].find(&pat) {
            let at = from + i;
            from = at + pat.len();
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // another macro (`describe_counter!` when looking for `counter!`)
            }
            let arg: String = code[from..]
                .trim_start()
                .chars()
                .take_while(|c| !matches!(c, ',' | ')') && !c.is_whitespace())
                .collect();
            out.push(arg);
        }
    }
    out
}

/// The module a `use` statement of `code` imports `name` from (`metrics` for
/// `use crate::metrics::{ERRORS_TOTAL, ...};`), if any.
fn imported_from(code: &str, name: &str) -> Option<String> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let starts = code.match_indices('\n').map(|(i, _)| i + 1);
    for start in std::iter::once(0).chain(starts) {
        let line = code[start..].trim_start_matches([' ', '\t']);
        let Some(stmt) = ["use ", "pub use ", "pub(crate) use "]
            .iter()
            .find_map(|p| line.strip_prefix(p))
        else {
            continue;
        };
        let stmt = stmt.split(';').next().unwrap_or_default();
        let names_it = stmt.split(|c: char| !is_word(c)).any(|w| w == name);
        if !names_it {
            continue;
        }
        let path = match stmt.split_once("::{") {
            Some((path, _)) => path,
            None => stmt.rsplit_once("::").map_or(stmt, |(path, _)| path),
        };
        return path.rsplit("::").next().map(|m| m.trim().to_owned());
    }
    None
}

/// The metric name an argument of a call in `file` stands for: a literal, or a constant (by
/// its last path segment; of several of that name, the one of `file` for a bare name, or the
/// one of the module the path names); `None` for anything else or an ambiguous name.
fn resolve(file: &Path, code: &str, arg: &str, consts: &Consts) -> Option<String> {
    if let Some(lit) = arg.strip_prefix('"') {
        let lit = lit.trim_end_matches('"');
        return is_metric_name(lit).then(|| lit.to_owned());
    }
    let mut segments = arg.rsplit("::");
    let last = segments.next()?;
    let candidates = consts.get(last)?;
    if let [(_, value)] = candidates.as_slice() {
        return Some(value.clone());
    }
    let imported;
    let module = match segments.next() {
        Some(m) => Some(m),
        None => {
            imported = imported_from(code, last);
            imported.as_deref()
        }
    };
    let matching: Vec<&String> = candidates
        .iter()
        .filter(|(path, _)| match module {
            None => path == file,
            Some(m) if m == "self" || m == "super" => false,
            Some(m) => {
                path.file_stem().is_some_and(|s| s == m)
                    || (path.file_stem().is_some_and(|s| s == "mod")
                        && path
                            .parent()
                            .and_then(Path::file_name)
                            .is_some_and(|d| d == m))
            }
        })
        .map(|(_, v)| v)
        .collect();
    match matching.as_slice() {
        [one] => Some((*one).clone()),
        _ => None,
    }
}

#[test]
fn every_metric_name_in_the_sources_is_described() {
    let sources = sources();
    let mut consts = BTreeMap::new();
    let mut names = BTreeSet::new();
    for (path, code) in &sources {
        metric_consts(path, code, &mut consts);
        names.extend(metric_literals(code));
    }
    let mut described = BTreeSet::new();
    let mut unresolved = Vec::new();
    for (path, code) in &sources {
        for arg in first_args(code, "describe_") {
            match resolve(path, code, &arg, &consts) {
                Some(n) => {
                    described.insert(n);
                }
                None => unresolved.push(format!("{}: describe of {arg}", path.display())),
            }
        }
        // Every emission names its metric by a literal or a constant (so that it is in
        // `names`), or by a field of `self` holding one (the body budgets' metric sets, whose
        // names are literals).
        for arg in first_args(code, "") {
            if resolve(path, code, &arg, &consts).is_none() && !arg.starts_with("self.") {
                unresolved.push(format!("{}: metric named by {arg}", path.display()));
            }
        }
    }
    assert!(unresolved.is_empty(), "unresolved names: {unresolved:#?}");
    assert!(names.len() > 50, "too few metric names found: {names:?}");
    let missing: Vec<&String> = names.difference(&described).collect();
    assert!(
        missing.is_empty(),
        "metrics without a describe_* call (no # HELP on /metrics): {missing:#?}"
    );
}
