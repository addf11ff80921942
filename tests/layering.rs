//! Which module of a crate may import which, checked from the source.
//!
//! A table names each top-level module of a crate (the first path segment under `src/`:
//! `src/scheduler/queue.rs` belongs to `scheduler`, `src/main.rs` or `src/lib.rs` is `main` or
//! `lib`) with the modules it may import. [`check_layers`] reads every source file and fails
//! when a module imports one its row does not list, when modules import each other in a
//! circle, when a module is missing from the table, or when the table names a module that does
//! not exist.
//!
//! An entry `::name` in a row stands for the outside crate `name`: once any row lists it, only
//! the modules that list it may use it (how the daemon keeps protocol types above the
//! scheduler).
//!
//! What counts as an import: a path through `crate::`, through `super::` up to the crate root,
//! and, in the crate root, a path that starts with a module's name. Modules nested in a
//! top-level one import each other freely; paths to items of the crate root itself
//! (`crate::Error`) are not checked. Code under `#[cfg(test)]` (a test module inline or in its
//! own file) is left out, as are comments and string literals.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Each top-level module with what it may import; `::name` is the outside crate `name`.
type Table<'a> = &'a [(&'a str, &'a [&'a str])];

/// `odmoed`: main -> server -> connection -> dispatch -> scheduler, and protocol types stop at
/// dispatch (see DESIGN.md, "Daemon layout"); `http` beside the socket's chain, queueing
/// through dispatch so that both doors check requests alike. Below the scheduler: what it shares with the
/// others (settings, the memory controller, the budget, memory figures); beside the chain:
/// leaves any layer may use.
#[rustfmt::skip]
const DAEMON: Table = &[
    ("main",       &["server", "http", "socket", "state", "scheduler", "pressure", "settings",
                     "budget", "memory", "logging", "startup"]),
    ("http",       &["dispatch", "state", "scheduler", "logging", "::odmoe_protocol"]),
    ("server",     &["connection", "state", "socket", "shutdown"]),
    ("connection", &["dispatch", "peer", "state", "shutdown", "logging", "::odmoe_protocol"]),
    ("dispatch",   &["peer", "state", "scheduler", "pressure", "budget", "memory", "models_dir",
                     "logging", "::odmoe_protocol"]),
    ("peer",       &["scheduler", "::odmoe_protocol"]),
    ("state",      &["scheduler", "pressure", "settings"]),
    ("scheduler",  &["pressure", "settings", "budget", "memory"]),
    ("settings",   &["budget"]),
    ("pressure",   &["budget", "memory"]),
    ("budget",     &[]),
    ("memory",     &[]),
    ("models_dir", &[]),
    ("socket",     &[]),
    ("shutdown",   &[]),
    ("startup",    &[]),
    ("logging",    &[]),
];

/// `odmoe-engine`: generate -> model -> expert <- store -> format -> config, kernels under the
/// models, converters above them, and `open` the one module that names every layer (see the
/// README, "Layout"). Errors, the chat template's clock and poisoned-lock recovery are leaves any
/// layer may use.
#[rustfmt::skip]
const ENGINE: Table = &[
    ("lib",       &["error"]),
    ("open",      &["predict", "model", "tokenizer", "store", "expert", "format", "config",
                    "allocator", "error"]),
    ("convert",   &["open", "model", "tokenizer", "expert", "format", "config", "error"]),
    ("eval",      &["model", "error"]),
    ("generate",  &["model", "tokenizer", "error"]),
    ("predict",   &["model", "store", "config", "lock", "error"]),
    ("model",     &["expert", "kernels", "format", "config", "error"]),
    ("tokenizer", &["format", "time", "error"]),
    ("store",     &["expert", "format", "config", "allocator", "lock", "error"]),
    ("expert",    &["kernels", "config", "error"]),
    ("kernels",   &["error"]),
    ("format",    &["config", "error"]),
    ("config",    &[]),
    ("error",     &[]),
    ("time",      &[]),
    ("lock",      &[]),
    ("allocator", &["lock"]),
];

/// The crates whose modules have no table yet: at least none of them may import another in a
/// circle.
const WITHOUT_TABLE: [&str; 3] = ["cli", "client", "config"];

#[test]
fn daemon_imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemon/src");
    if let Err(problems) = check_layers(&src, DAEMON) {
        panic!("daemon/src:\n{}", problems.join("\n"));
    }
}

#[test]
fn engine_imports_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/src");
    if let Err(problems) = check_layers(&src, ENGINE) {
        panic!("engine/src:\n{}", problems.join("\n"));
    }
}

#[test]
fn no_modules_import_each_other_in_a_circle() {
    for krate in WITHOUT_TABLE {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(krate)
            .join("src");
        if let Err(problems) = check_acyclic(&src) {
            panic!("{krate}/src:\n{}", problems.join("\n"));
        }
    }
}

/// Checks the crate whose sources are in `src` against `table`; every problem found, one line
/// each, naming the file and line.
pub fn check_layers(src: &Path, table: Table) -> Result<(), Vec<String>> {
    let mut files = Vec::new();
    read_sources(src, src, &mut files)
        .map_err(|error| vec![format!("{}: {error}", src.display())])?;
    check_files(&files, table)
}

/// Checks that no modules of the crate whose sources are in `src` import each other in a circle,
/// whatever the direction.
pub fn check_acyclic(src: &Path) -> Result<(), Vec<String>> {
    let mut files = Vec::new();
    read_sources(src, src, &mut files)
        .map_err(|error| vec![format!("{}: {error}", src.display())])?;
    let modules: BTreeSet<String> = files.iter().map(|(path, _)| top_module(path)).collect();
    let names: Vec<&str> = modules.iter().map(String::as_str).collect();
    let table: Vec<(&str, &[&str])> = names.iter().map(|&name| (name, &names[..])).collect();
    check_files(&files, &table)
}

/// The `.rs` files under `dir`, with their paths relative to `src`.
fn read_sources(src: &Path, dir: &Path, files: &mut Vec<(PathBuf, String)>) -> std::io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            read_sources(src, &path, files)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let relative = path.strip_prefix(src).unwrap_or(&path).to_owned();
            files.push((relative, fs::read_to_string(&path)?));
        }
    }
    Ok(())
}

/// [`check_layers`] on `files`: paths relative to `src/` with their text.
fn check_files(files: &[(PathBuf, String)], table: Table) -> Result<(), Vec<String>> {
    let rows: BTreeMap<&str, &[&str]> = table.iter().copied().collect();
    let watched: BTreeSet<&str> = table
        .iter()
        .flat_map(|(_, allowed)| allowed.iter())
        .filter_map(|name| name.strip_prefix("::"))
        .collect();
    let modules: BTreeSet<String> = files.iter().map(|(path, _)| top_module(path)).collect();
    let mut problems = Vec::new();
    for (name, _) in table {
        if !modules.contains(*name) {
            problems.push(format!(
                "the table names `{name}`, which is not a module of src/"
            ));
        }
    }
    let skipped = test_only_files(files);
    let mut edges: BTreeMap<String, BTreeMap<String, (PathBuf, usize)>> = BTreeMap::new();
    for (path, text) in files {
        if skipped.iter().any(|skip| path.starts_with(skip)) {
            continue;
        }
        let from = top_module(path);
        let Some(allowed) = rows.get(from.as_str()) else {
            problems.push(format!(
                "{}: module `{from}` is not in the table",
                path.display()
            ));
            continue;
        };
        for (to, line) in imports(path, text, &modules, &watched) {
            if to == from {
                continue;
            }
            if !allowed.contains(&to.as_str()) {
                problems.push(format!(
                    "{}:{line}: `{from}` may not import `{to}` (it may import: {})",
                    path.display(),
                    if allowed.is_empty() {
                        "nothing".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                ));
            }
            if !to.starts_with("::") {
                edges
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_insert((path.clone(), line));
            }
        }
    }
    for cycle in cycles(&edges) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|pair| {
                let (path, line) = &edges[&pair[0]][&pair[1]];
                format!("{} -> {} ({}:{line})", pair[0], pair[1], path.display())
            })
            .collect();
        problems.push(format!(
            "modules import each other in a circle: {}",
            steps.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The top-level module a file under `src/` belongs to.
fn top_module(path: &Path) -> String {
    let first = path
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    let first = first.unwrap_or_default();
    first
        .strip_suffix(".rs")
        .map(str::to_owned)
        .unwrap_or(first)
}

/// The module path of a file: `[]` for the crate root, `["a", "b"]` for `a/b.rs` or `a/b/mod.rs`.
fn module_path(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let file = names.pop().unwrap_or_default();
    let stem = file.strip_suffix(".rs").unwrap_or(&file).to_owned();
    let is_root = names.is_empty() && (stem == "main" || stem == "lib");
    if stem != "mod" && !is_root {
        names.push(stem);
    }
    names
}

/// The directory holding the files of the modules that `path` declares.
fn child_dir(path: &Path) -> PathBuf {
    let parent = path.parent().unwrap_or(Path::new("")).to_owned();
    match path.file_stem().and_then(|stem| stem.to_str()) {
        Some("mod") => parent,
        Some("main" | "lib") if parent.as_os_str().is_empty() => parent,
        Some(stem) => parent.join(stem),
        None => parent,
    }
}

/// Files (or directories) of modules declared as `#[cfg(test)] mod name;`.
fn test_only_files(files: &[(PathBuf, String)]) -> Vec<PathBuf> {
    let mut skipped = Vec::new();
    for (path, text) in files {
        let tokens = tokenize(text);
        let mut at = 0;
        while at < tokens.len() {
            if is_cfg_test(&tokens, at) {
                let end = item_end(&tokens, at);
                let item = &tokens[at..end];
                if let [
                    ..,
                    Tok::Ident(kw, _),
                    Tok::Ident(name, _),
                    Tok::Punct(';', _),
                ] = item
                    && kw == "mod"
                {
                    let dir = child_dir(path);
                    skipped.push(dir.join(format!("{name}.rs")));
                    skipped.push(dir.join(name));
                }
                at = end;
            } else {
                at += 1;
            }
        }
    }
    skipped
}

/// The top-level modules (and watched outside crates, as `::name`) that the file at `path`
/// imports, each with the line of its first use.
fn imports(
    path: &Path,
    text: &str,
    modules: &BTreeSet<String>,
    watched: &BTreeSet<&str>,
) -> Vec<(String, usize)> {
    let tokens = tokenize(text);
    let file_module = module_path(path);
    let is_root = file_module.is_empty();
    let mut found: BTreeMap<String, usize> = BTreeMap::new();
    let mut note = |name: String, line: usize| {
        found.entry(name).or_insert(line);
    };
    // Inline `mod name { ... }` blocks open, with the depth of their brace.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut at = 0;
    while at < tokens.len() {
        if is_cfg_test(&tokens, at) {
            at = item_end(&tokens, at);
            continue;
        }
        // A path starts here unless a `::` joins it to what comes before (a leading `::`,
        // as in `::name::Item`, joins nothing).
        let starts_path = match at.checked_sub(1).map(|before| &tokens[before]) {
            Some(Tok::PathSep(_)) => !matches!(
                at.checked_sub(2).map(|before| &tokens[before]),
                Some(Tok::Ident(..) | Tok::Punct('>', _))
            ),
            _ => true,
        };
        match &tokens[at] {
            Tok::Punct('{', _) => depth += 1,
            Tok::Punct('}', _) => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, open)| *open == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(kw, _) if kw == "mod" => {
                if let (Some(Tok::Ident(name, _)), Some(Tok::Punct('{', _))) =
                    (tokens.get(at + 1), tokens.get(at + 2))
                {
                    inline.push((name.clone(), depth));
                }
            }
            Tok::Ident(word, line) if starts_path && is_path_sep(&tokens, at + 1) => {
                let mut module: Vec<String> = file_module.clone();
                module.extend(inline.iter().map(|(name, _)| name.clone()));
                let (base, next) = match word.as_str() {
                    "crate" => (Some(Vec::new()), at + 2),
                    "super" => {
                        let mut base = module;
                        let mut next = at;
                        while matches!(tokens.get(next), Some(Tok::Ident(w, _)) if w == "super")
                            && is_path_sep(&tokens, next + 1)
                        {
                            base.pop();
                            next += 2;
                        }
                        (Some(base), next)
                    }
                    name if watched.contains(name) => {
                        note(format!("::{name}"), *line);
                        (None, at + 1)
                    }
                    name if is_root && inline.is_empty() && modules.contains(name) => {
                        note(name.to_owned(), *line);
                        (None, at + 1)
                    }
                    _ => (None, at + 1),
                };
                if let Some(base) = base {
                    match base.first() {
                        Some(top) => note(top.clone(), *line),
                        None => {
                            for name in first_segments(&tokens, next) {
                                if modules.contains(&name) {
                                    note(name, *line);
                                }
                            }
                        }
                    }
                }
                at = next.max(at + 1);
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    found.into_iter().collect()
}

/// The first segment of the path at `at`, or of each path in the `{...}` group there.
fn first_segments(tokens: &[Tok], at: usize) -> Vec<String> {
    match tokens.get(at) {
        Some(Tok::Ident(name, _)) => vec![name.clone()],
        Some(Tok::Punct('{', _)) => {
            let mut names = Vec::new();
            let mut depth = 0;
            let mut element_start = true;
            for token in &tokens[at..] {
                match token {
                    Tok::Punct('{', _) => {
                        depth += 1;
                        element_start = depth == 1;
                        continue;
                    }
                    Tok::Punct('}', _) => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    Tok::Punct(',', _) if depth == 1 => {
                        element_start = true;
                        continue;
                    }
                    Tok::Ident(name, _) if element_start && depth == 1 => names.push(name.clone()),
                    _ => {}
                }
                element_start = false;
            }
            names
        }
        _ => Vec::new(),
    }
}

fn is_path_sep(tokens: &[Tok], at: usize) -> bool {
    matches!(tokens.get(at), Some(Tok::PathSep(_)))
}

/// Whether `#[cfg(test)]` starts at `at`.
fn is_cfg_test(tokens: &[Tok], at: usize) -> bool {
    let words = ["#", "[", "cfg", "(", "test", ")", "]"];
    tokens.len() >= at + words.len()
        && tokens[at..at + words.len()]
            .iter()
            .zip(words)
            .all(|(token, word)| token.is(word))
}

/// The end of the item whose attributes start at `at`: past its `;` or its closing `}`.
fn item_end(tokens: &[Tok], at: usize) -> usize {
    let mut depth = 0usize;
    let mut at = at;
    // The attributes first, each a `#[...]`.
    while tokens.get(at).is_some_and(|t| t.is("#")) && tokens.get(at + 1).is_some_and(|t| t.is("["))
    {
        at += 1;
        loop {
            match tokens.get(at) {
                Some(Tok::Punct('[', _)) => depth += 1,
                Some(Tok::Punct(']', _)) => {
                    depth -= 1;
                    if depth == 0 {
                        at += 1;
                        break;
                    }
                }
                None => return tokens.len(),
                _ => {}
            }
            at += 1;
        }
    }
    while let Some(token) = tokens.get(at) {
        match token {
            Tok::Punct('{' | '(' | '[', _) => depth += 1,
            Tok::Punct('}' | ')' | ']', _) => {
                depth = depth.saturating_sub(1);
                if depth == 0 && token.is("}") {
                    return at + 1;
                }
            }
            Tok::Punct(';', _) if depth == 0 => return at + 1,
            _ => {}
        }
        at += 1;
    }
    tokens.len()
}

/// A token of Rust source, with its line: what the checks need and nothing more.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String, usize),
    /// `::`
    PathSep(usize),
    Punct(char, usize),
}

impl Tok {
    fn is(&self, text: &str) -> bool {
        match self {
            Tok::Ident(name, _) => name == text,
            Tok::PathSep(_) => text == "::",
            Tok::Punct(c, _) => text.len() == c.len_utf8() && text.starts_with(*c),
        }
    }
}

/// The identifiers and punctuation of `text`, without comments, literals and lifetimes.
fn tokenize(text: &str) -> Vec<Tok> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut at = 0;
    // Skips a string body from after its opening quote, for a raw string with `hashes`.
    let skip_string = |at: &mut usize, line: &mut usize, raw: Option<usize>| {
        while *at < chars.len() {
            let c = chars[*at];
            *at += 1;
            match (c, raw) {
                ('\n', _) => *line += 1,
                ('\\', None) => {
                    if chars.get(*at) == Some(&'\n') {
                        *line += 1;
                    }
                    *at += 1;
                }
                ('"', None) => return,
                ('"', Some(hashes))
                    if chars[*at..].iter().take_while(|&&c| c == '#').count() >= hashes =>
                {
                    *at += hashes;
                    return;
                }
                _ => {}
            }
        }
    };
    while at < chars.len() {
        let c = chars[at];
        let next = chars.get(at + 1).copied();
        if c == '\n' {
            line += 1;
            at += 1;
        } else if c.is_whitespace() {
            at += 1;
        } else if c == '/' && next == Some('/') {
            while at < chars.len() && chars[at] != '\n' {
                at += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while at < chars.len() {
                if chars[at] == '/' && chars.get(at + 1) == Some(&'*') {
                    depth += 1;
                    at += 2;
                } else if chars[at] == '*' && chars.get(at + 1) == Some(&'/') {
                    depth -= 1;
                    at += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[at] == '\n' {
                        line += 1;
                    }
                    at += 1;
                }
            }
        } else if c == '"' {
            at += 1;
            skip_string(&mut at, &mut line, None);
        } else if c == '\'' {
            // A character literal, or a lifetime or label (left out too).
            if next == Some('\\') {
                at += 3;
                while at < chars.len() && chars[at] != '\'' {
                    at += 1;
                }
                at += 1;
            } else if chars.get(at + 2) == Some(&'\'') {
                at += 3;
            } else {
                at += 1;
                while at < chars.len() && (chars[at].is_alphanumeric() || chars[at] == '_') {
                    at += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = at;
            while at < chars.len() && (chars[at].is_alphanumeric() || chars[at] == '_') {
                at += 1;
            }
            let word: String = chars[start..at].iter().collect();
            let after = chars.get(at).copied();
            match (word.as_str(), after) {
                ("r" | "br" | "cr", Some('#' | '"')) => {
                    let hashes = chars[at..].iter().take_while(|&&c| c == '#').count();
                    if chars.get(at + hashes) == Some(&'"') {
                        at += hashes + 1;
                        skip_string(&mut at, &mut line, Some(hashes));
                    } else if word == "r" {
                        // A raw identifier, `r#name`.
                        at += 1;
                    }
                }
                ("b" | "c", Some('"')) => {
                    at += 1;
                    skip_string(&mut at, &mut line, None);
                }
                ("b", Some('\'')) => {
                    at += 1;
                    while at < chars.len() && chars[at] != '\'' {
                        at += if chars[at] == '\\' { 2 } else { 1 };
                    }
                    at += 1;
                }
                _ => tokens.push(Tok::Ident(word, line)),
            }
        } else if c.is_ascii_digit() {
            while at < chars.len() && (chars[at].is_alphanumeric() || chars[at] == '_') {
                at += 1;
            }
        } else if c == ':' && next == Some(':') {
            tokens.push(Tok::PathSep(line));
            at += 2;
        } else {
            tokens.push(Tok::Punct(c, line));
            at += 1;
        }
    }
    tokens
}

/// The circles in `edges`, each as the modules on it with the first repeated at the end.
fn cycles<V>(edges: &BTreeMap<String, BTreeMap<String, V>>) -> Vec<Vec<String>> {
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    fn visit<'a, V>(
        node: &'a str,
        edges: &'a BTreeMap<String, BTreeMap<String, V>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        found: &mut BTreeSet<Vec<String>>,
    ) {
        if let Some(at) = stack.iter().position(|&on| on == node) {
            // Start the circle at its smallest name, so each is reported once.
            let mut circle: Vec<String> = stack[at..].iter().map(|s| s.to_string()).collect();
            let first = circle
                .iter()
                .enumerate()
                .min_by_key(|(_, name)| *name)
                .map_or(0, |(i, _)| i);
            circle.rotate_left(first);
            circle.push(circle[0].clone());
            found.insert(circle);
            return;
        }
        if done.contains(node) {
            return;
        }
        stack.push(node);
        for next in edges.get(node).into_iter().flat_map(BTreeMap::keys) {
            visit(next, edges, stack, done, found);
        }
        stack.pop();
        done.insert(node);
    }
    for node in edges.keys() {
        visit(node, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table where `top` may import `middle`, and `middle` may import `bottom`.
    const LAYERS: Table = &[
        ("lib", &["top", "middle", "bottom"]),
        ("top", &["middle", "::outside"]),
        ("middle", &["bottom"]),
        ("bottom", &[]),
    ];

    fn files(sources: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        sources
            .iter()
            .map(|(path, text)| (PathBuf::from(path), text.to_string()))
            .collect()
    }

    /// A crate that follows [`LAYERS`], with `bottom` given `extra` lines.
    fn crate_with(extra: &str) -> Vec<(PathBuf, String)> {
        files(&[
            (
                "lib.rs",
                "mod top;\nmod middle;\nmod bottom;\npub fn run() { top::go() }\n",
            ),
            ("top.rs", "use crate::middle::Thing;\nuse outside::Api;\n"),
            (
                "middle/mod.rs",
                "mod inner;\nuse super::bottom;\nuse inner::X;\n",
            ),
            (
                "middle/inner.rs",
                "use super::super::bottom::Y;\nuse crate::middle::Z;\n",
            ),
            ("bottom.rs", extra),
        ])
    }

    #[test]
    fn imports_down_the_table_pass() {
        let extra = "// use crate::top::Thing;\nconst S: &str = \"crate::top::x\";\n\
                     #[cfg(test)]\nmod tests {\n    use crate::top::Thing;\n}\n";
        assert_eq!(check_files(&crate_with(extra), LAYERS), Ok(()));
    }

    #[test]
    fn an_import_up_the_table_fails() {
        let problems =
            check_files(&crate_with("fn f() { crate::middle::g() }\n"), LAYERS).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("bottom.rs:1: `bottom` may not import `middle`")),
            "{problems:?}"
        );
        let problems =
            check_files(&crate_with("use super::{top::A, middle};\n"), LAYERS).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn a_circle_fails_even_when_the_table_allows_it() {
        let circular: Table = &[
            ("lib", &["top", "middle", "bottom"]),
            ("top", &["middle", "::outside"]),
            ("middle", &["bottom"]),
            ("bottom", &["top"]),
        ];
        let problems = check_files(&crate_with("use crate::top;\n"), circular).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "modules import each other in a circle: bottom -> top (bottom.rs:1), \
                 top -> middle (top.rs:1), middle -> bottom (middle/mod.rs:2)"
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn a_watched_outside_crate_is_only_for_the_modules_that_list_it() {
        let problems =
            check_files(&crate_with("fn f() -> outside::Api { todo!() }\n"), LAYERS).unwrap_err();
        assert_eq!(
            problems,
            ["bottom.rs:1: `bottom` may not import `::outside` (it may import: nothing)"]
        );
    }

    #[test]
    fn modules_missing_from_the_table_and_rows_without_a_module_fail() {
        let mut sources = crate_with("");
        sources.push((PathBuf::from("extra.rs"), String::new()));
        let table: Table = &[("lib", &[]), ("top", &[]), ("middle", &[]), ("gone", &[])];
        let problems = check_files(&sources, table).unwrap_err();
        for expected in [
            "the table names `gone`, which is not a module of src/",
            "bottom.rs: module `bottom` is not in the table",
            "extra.rs: module `extra` is not in the table",
        ] {
            assert!(
                problems.iter().any(|p| p == expected),
                "{expected}: {problems:?}"
            );
        }
    }

    #[test]
    fn test_modules_in_their_own_files_are_left_out() {
        let mut sources = crate_with("#[cfg(test)]\nmod tests;\n");
        sources.push((
            PathBuf::from("bottom/tests.rs"),
            "use crate::top::Thing;\n".into(),
        ));
        assert_eq!(check_files(&sources, LAYERS), Ok(()));
    }

    #[test]
    fn without_a_table_only_circles_fail() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path();
        fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
        fs::write(src.join("a.rs"), "use crate::b::B;\n").unwrap();
        fs::write(src.join("b.rs"), "pub struct B;\n").unwrap();
        assert_eq!(check_acyclic(src), Ok(()));
        fs::write(src.join("b.rs"), "use super::a;\n").unwrap();
        let problems = check_acyclic(src).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("modules import each other in a circle: a -> b"));
    }

    #[test]
    fn the_tokenizer_skips_literals_and_comments() {
        let text = "let a = 'x'; let b = '\\''; let c = r#\"crate::top \"quoted\" \"#; /* crate::top /* */ */\n\
                    let d: &'static str = b\"crate::top\"; fn e<'a>() {}\n crate::middle::f();";
        let found = imports(
            Path::new("bottom.rs"),
            text,
            &["top".into(), "middle".into()].into(),
            &BTreeSet::new(),
        );
        assert_eq!(found, [("middle".to_owned(), 3)]);
    }
}
