//! The crate's layering, read from its source: which module uses which (`crate::…`, `super::…`, a
//! child module by name, and `glance_shim::…` in `main.rs`). It fails on any import circle, naming
//! it, and when README's Layout does not list every file of `src/` with each file below the ones
//! that use it.
//!
//! Test modules (`#[cfg(test)] mod tests`, at the end of a file) and comments are not read: a test
//! may reach for whatever it checks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

/// Every `.rs` file under `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The module a file holds: `inspect/view.rs` is `inspect::view`, `inspect/mod.rs` is `inspect`.
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(SRC).unwrap().with_extension("");
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.last().map(String::as_str) {
        Some("mod") => parts[..parts.len() - 1].join("::"),
        _ => parts.join("::"),
    }
}

/// The code of a file without its comments and its test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                ""
            } else {
                // A comment after code; a `//` in a string (a URL) has no `crate::` after it.
                line.split(" // ").next().unwrap_or(line)
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifier-like paths (`a::b::c`) that follow `prefix` in `code`, with braced groups
/// (`prefix{a, b::{c, d}}`) opened to their first segments.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // part of a longer name
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            let mut depth = 0;
            let mut item = String::new();
            for c in group[..end].chars().chain(std::iter::once(',')) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(segments(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            out.push(segments(rest));
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The leading `a::b::c` of `text`, as segments.
fn segments(text: &str) -> Vec<String> {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    text[..end]
        .split("::")
        .take_while(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The longest known module that `path` (from the crate root) starts with.
fn resolve(path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// Who uses whom, by module.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut paths = Vec::new();
    files(Path::new(SRC), &mut paths);
    let modules: BTreeSet<String> = paths.iter().map(|p| module_of(p)).collect();
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in &paths {
        let module = module_of(path);
        if module == "lib" {
            continue; // the module list itself
        }
        let code = code(&std::fs::read_to_string(path).unwrap());
        let mut refs = Vec::new();
        let root = if module == "main" {
            "glance_shim::"
        } else {
            "crate::"
        };
        refs.extend(paths_after(&code, root));
        let parent: Vec<String> = match module.rsplit_once("::") {
            Some((p, _)) => p.split("::").map(str::to_owned).collect(),
            None => Vec::new(),
        };
        for p in paths_after(&code, "super::") {
            refs.push(parent.iter().cloned().chain(p).collect());
        }
        // Child modules, used by their bare name.
        let here: Vec<String> = module.split("::").map(str::to_owned).collect();
        for child in modules
            .iter()
            .filter_map(|m| m.strip_prefix(&format!("{module}::")))
        {
            if !child.contains("::") && !paths_after(&code, &format!("{child}::")).is_empty() {
                refs.push(here.iter().cloned().chain([child.to_owned()]).collect());
            }
        }
        let used = uses.entry(module.clone()).or_default();
        for r in refs {
            if let Some(target) = resolve(&r, &modules).filter(|t| *t != module && t != "lib") {
                used.insert(target);
            }
        }
    }
    uses
}

/// A circle through `start`, if there is one, as the modules along it.
fn circle(
    uses: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    at: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    for next in uses.get(at).into_iter().flatten() {
        if next == start {
            let mut found = path.clone();
            found.push(start.to_owned());
            return Some(found);
        }
        if !path.contains(next) {
            path.push(next.clone());
            if let Some(found) = circle(uses, start, next, path) {
                return Some(found);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn no_module_uses_one_that_uses_it_back() {
    let uses = graph();
    assert!(uses.len() > 20, "the source was not read: {uses:?}");
    assert!(
        uses["proxy"].contains("upstream") && uses["inspect"].contains("inspect::view"),
        "the uses were not read: {uses:?}"
    );
    // Each circle once, from its first module in name order.
    let circles: BTreeSet<String> = uses
        .keys()
        .filter_map(|m| circle(&uses, m, m, &mut vec![m.clone()]))
        .map(|mut c| {
            c.pop();
            let first = (0..c.len()).min_by_key(|&i| &c[i]).unwrap_or(0);
            c.rotate_left(first);
            c.push(c[0].clone());
            c.join(" -> ")
        })
        .collect();
    assert!(
        circles.is_empty(),
        "import circles:\n  {}",
        circles.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

#[test]
fn readme_lists_every_file_below_the_ones_that_use_it() {
    let readme = std::fs::read_to_string(README).unwrap();
    let layout = readme
        .split("\n## Layout")
        .nth(1)
        .expect("README has a Layout section");
    let layout = layout.split("\n## ").next().unwrap();
    let listed: Vec<String> = layout
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("src/"))
        .map(|l| module_of(&Path::new(SRC).join(l.split_whitespace().next().unwrap())))
        .collect();
    let mut paths = Vec::new();
    files(Path::new(SRC), &mut paths);
    let missing: Vec<String> = paths
        .iter()
        .map(|p| module_of(p))
        .filter(|m| !listed.contains(m))
        .collect();
    assert!(missing.is_empty(), "README's Layout leaves out {missing:?}");
    let place = |m: &str| listed.iter().position(|l| l == m).unwrap();
    let mut wrong = Vec::new();
    for (module, used) in graph() {
        for u in used {
            if place(&u) > place(&module) {
                wrong.push(format!("{module} uses {u}, listed above it"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "README's Layout goes bottom up:\n  {}",
        wrong.join("\n  ")
    );
}
