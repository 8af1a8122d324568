//! The gateway's modules depend on each other in one direction only.
//!
//! `gateway/src/lib.rs` lists the top-level modules from the top of the application down; a
//! module may use the modules listed after it, never one listed before it, so the import graph
//! has no cycle. Inside a folder, the files beside `mod.rs` form no cycle either. This test reads
//! every `crate::…` path (in `use` lines and inline, doc comments aside) and `super::…` path of
//! `gateway/src`, and fails on a reference that goes up or around.

#![allow(clippy::unwrap_used)] // a test: a file it cannot read is a failure

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layer order as `lib.rs` states it: the names in its "Layers" list, top first.
fn layers() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let list: Vec<String> = lib
        .lines()
        .skip_while(|l| !l.contains("Layers, from the top"))
        .skip(1)
        .take_while(|l| l.starts_with("//!"))
        .filter_map(|l| {
            // "//! - [`tools`]: …": the first name in backquotes.
            let item = l.trim_start_matches("//!").trim().strip_prefix("- ")?;
            let name = item.split('`').nth(1)?;
            Some(name.to_owned())
        })
        .collect();
    list
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

/// The file's code without comments and string contents.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let code = match line.find("//") {
            // A `//` inside a string is not a comment; strings are blanked below anyway.
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        let mut in_string = false;
        let mut escaped = false;
        for c in code.chars() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                    out.push('"');
                }
                continue;
            }
            if c == '"' {
                in_string = true;
            }
            out.push(c);
        }
        out.push('\n');
    }
    out
}

/// Every `prefix` path's first segment in `code`: `crate::store::Store` gives `store`.
fn paths_after<'a>(code: &'a str, prefix: &str) -> impl Iterator<Item = &'a str> {
    code.match_indices(prefix).filter_map(move |(i, _)| {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        let rest = &code[i + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        (end > 0).then(|| &rest[..end])
    })
}

/// `a/b/c.rs` → ["a", "b", "c"]; `a/mod.rs` → ["a"].
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut found = path[i..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn modules_depend_downwards_only_and_without_cycles() {
    let layers = layers();
    let rank = |m: &str| layers.iter().position(|l| l == m);
    let top_modules: BTreeSet<String> = std::fs::read_dir(src())
        .unwrap()
        .map(|e| module_of(&e.unwrap().path()).concat())
        .collect();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut upward = Vec::new();
    let mut top_graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // Per folder: its files beside mod.rs, and which of them use which.
    let mut folder_graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> =
        BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        let Some(top) = module.first().cloned() else {
            continue;
        };
        if top == "lib" || top == "main" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for used in paths_after(&code, "crate::") {
            if used == top || !top_modules.contains(used) {
                continue;
            }
            top_graph
                .entry(top.clone())
                .or_default()
                .insert(used.to_owned());
            match (rank(&top), rank(used)) {
                (Some(from), Some(to)) if to < from => {
                    upward.push(format!("{}: {top} uses crate::{used}", file.display()));
                }
                (Some(_), Some(_)) => {}
                _ => upward.push(format!(
                    "{}: {top} or {used} is not in lib.rs's layer list",
                    file.display()
                )),
            }
        }
        // Siblings inside a folder: `super::x` and `crate::<folder>::x` from a file that is not
        // the folder's mod.rs.
        let is_mod_rs = file.file_name().is_some_and(|n| n == "mod.rs");
        if module.len() >= 2 && !is_mod_rs {
            let folder = module[..module.len() - 1].to_vec();
            let me = module.last().unwrap().clone();
            let mut siblings: Vec<String> =
                paths_after(&code, "super::").map(str::to_owned).collect();
            let inside = format!("crate::{}::", folder.join("::"));
            siblings.extend(paths_after(&code, &inside).map(str::to_owned));
            let graph = folder_graphs.entry(folder.clone()).or_default();
            graph.entry(me.clone()).or_default();
            for s in siblings {
                let mut candidate = src();
                candidate.extend(&folder);
                let exists = candidate.join(format!("{s}.rs")).exists()
                    || candidate.join(&s).join("mod.rs").exists();
                if exists && s != me {
                    graph.entry(me.clone()).or_default().insert(s);
                }
            }
        }
    }
    assert_eq!(
        cycle(&top_graph),
        None,
        "a cycle between the top-level modules"
    );
    assert!(
        upward.is_empty(),
        "modules may only use modules below them in lib.rs's layer list ({}):\n{}",
        layers.join(" > "),
        upward.join("\n")
    );
    assert!(
        layers.len() >= 5,
        "lib.rs must list the layers after a line with 'Layers, from the top': {layers:?}"
    );
    for (folder, graph) in &folder_graphs {
        assert_eq!(
            cycle(graph),
            None,
            "a cycle between the files of {}",
            folder.join("/")
        );
    }
}

#[test]
fn the_checker_finds_a_cycle_and_an_upward_use() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(cycle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let code = code_of("use crate::store::Store; // crate::tools\nlet s = \"crate::app\";\n");
    assert_eq!(paths_after(&code, "crate::").collect::<Vec<_>>(), ["store"]);
}
