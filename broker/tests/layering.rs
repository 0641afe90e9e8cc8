//! The broker's layering (docs/ARCHITECTURE.md, "Layering"), checked from its sources: no
//! file under `broker/src` is in an import cycle with another, nothing under `hub/` imports
//! the cluster, tungstenite is imported only by the WebSocket transport, and no function in
//! `src` returns `Result<_, String>`.
//!
//! Imports are read as text: every `use` tree (`crate::…`, `super::…`, `self::…`) and every
//! `crate::a::b` path in code is resolved to the longest prefix that names a file of the
//! crate; `mod` declarations are not edges. Doc comments and strings are skipped.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, as module paths (`hub::room`, `cluster::nats`) → file.
fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let mut inner = prefix.to_vec();
            inner.push(name);
            modules(&path, &inner, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            // `main.rs` is the binary, a crate of its own: named apart from the library's root.
            let mut module = prefix.to_vec();
            if name != "mod" && name != "lib" {
                module.push(name);
            }
            out.insert(module, path);
        }
    }
}

/// The code of a file without comments, string literals and its unit tests (a
/// `#[cfg(test)]` module at the end: test code may reach across layers).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        let mut in_string = false;
        for c in line.chars() {
            if c == '"' {
                in_string = !in_string;
            } else if !in_string {
                out.push(c);
            }
        }
        out.push('\n');
    }
    out
}

/// Expands the use trees and paths of `code` into absolute module paths, relative to the
/// module `me`.
fn imported_paths(code: &str, me: &[String]) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    // `use` statements, possibly spanning lines, up to their `;`.
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let tail = &rest[at + 4..];
        let end = tail.find(';').unwrap_or(tail.len());
        if before.is_none_or(|c| !c.is_alphanumeric() && c != '_') {
            expand(&tail[..end], &[], &mut paths);
        }
        rest = &tail[end..];
    }
    // Paths written in code: `crate::a::b`.
    for (at, _) in code.match_indices("crate::") {
        let path: String = code[at..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        paths.push(path.split("::").map(str::to_owned).collect());
    }
    // Resolve `self` and `super` against the file's own module (a `mod.rs` is its folder's
    // module, so `super` is the same step up for every file).
    paths
        .into_iter()
        .filter_map(|p| {
            let mut parts = p.into_iter().filter(|s| !s.is_empty()).peekable();
            let mut base = match parts.peek().map(String::as_str) {
                Some("crate") => Vec::new(),
                Some("self") | Some("super") => me.to_vec(),
                _ => return None,
            };
            if parts.peek().map(String::as_str) == Some("crate") {
                parts.next();
            }
            if parts.peek().map(String::as_str) == Some("self") {
                parts.next();
            }
            while parts.peek().map(String::as_str) == Some("super") {
                parts.next();
                base.pop()?;
            }
            base.extend(parts);
            Some(base)
        })
        .collect()
}

/// Expands one use tree (`a::{b, c::{d}}`) with `prefix` in front into `out`.
fn expand(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    match tree.find('{') {
        None => {
            let mut path = prefix.to_vec();
            for part in tree.split(" as ").next().unwrap_or("").split("::") {
                let part = part.trim();
                if !part.is_empty() && part != "*" {
                    path.push(part.to_owned());
                }
            }
            out.push(path);
        }
        Some(open) => {
            let mut path = prefix.to_vec();
            for part in tree[..open].split("::") {
                let part = part.trim();
                if !part.is_empty() {
                    path.push(part.to_owned());
                }
            }
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&inner[start..i], &path, out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            expand(&inner[start..], &path, out);
        }
    }
}

/// Module → the other modules (files) it imports from.
fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = BTreeMap::new();
    modules(&src(), &[], &mut files);
    let mut edges = BTreeMap::new();
    for (module, file) in &files {
        let text = code(&fs::read_to_string(file).unwrap());
        let mut targets = BTreeSet::new();
        for path in imported_paths(&text, module) {
            // The longest prefix that is a module of the crate.
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| files.contains_key(p));
            // A module using its own items or its children (declared there, re-exported)
            // is not an edge between files; a child using its parent is.
            if let Some(target) = target.filter(|t| !t.starts_with(module)) {
                targets.insert(target);
            }
        }
        edges.insert(module.clone(), targets);
    }
    edges
}

#[test]
fn no_file_of_the_broker_is_in_an_import_cycle() {
    let edges = graph();
    assert!(
        edges.len() > 30,
        "read the crate's modules: {}",
        edges.len()
    );
    // Tarjan-free: for each edge a → b, a cycle exists if a is reachable from b.
    let reachable = |from: &Vec<String>, to: &Vec<String>| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(m) = stack.pop() {
            if &m == to {
                return true;
            }
            if seen.insert(m.clone()) {
                stack.extend(edges.get(&m).into_iter().flatten().cloned());
            }
        }
        false
    };
    let mut cycles = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            if reachable(b, a) {
                cycles.push(format!("{} -> {}", a.join("::"), b.join("::")));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles through: {cycles:#?}");
}

#[test]
fn the_check_sees_imports_and_cycles() {
    // The reader finds grouped and relative imports…
    let mut paths = Vec::new();
    expand(
        "crate::{hub::{Hub, room::Room}, wire::Lane}",
        &[],
        &mut paths,
    );
    assert_eq!(
        paths,
        [
            vec!["crate", "hub", "Hub"],
            vec!["crate", "hub", "room", "Room"],
            vec!["crate", "wire", "Lane"],
        ]
    );
    let me = vec!["cluster".to_owned(), "nats".to_owned(), "reader".to_owned()];
    let got = imported_paths("use super::interest::RoomHandle;\n", &me);
    assert_eq!(got, [vec!["cluster", "nats", "interest", "RoomHandle"]]);
    // …and the graph has the edges the layering is made of.
    let edges = graph();
    let module = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    assert!(edges[&module("session")].contains(&module("hub")));
    assert!(edges[&module("cluster::nats::interest")].contains(&module("cluster::nats::reader")));
}

#[test]
fn the_hub_never_imports_the_cluster() {
    let edges = graph();
    for (module, targets) in &edges {
        if module.first().is_some_and(|m| m == "hub") {
            let bad: Vec<_> = targets
                .iter()
                .filter(|t| t.first().is_some_and(|m| m == "cluster"))
                .collect();
            assert!(bad.is_empty(), "{} imports {bad:?}", module.join("::"));
        }
    }
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn tungstenite_only_in_the_websocket_transport_and_no_stringly_errors() {
    let mut files = Vec::new();
    all_files(&src(), &mut files);
    for file in files {
        let text = code(&fs::read_to_string(&file).unwrap());
        let relative = file
            .strip_prefix(src())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if !relative.starts_with("transport/ws") {
            assert!(!text.contains("tungstenite"), "{relative} uses tungstenite");
        }
        let compact: String = text.split_whitespace().collect();
        for (at, _) in compact.match_indices("Result<") {
            // The arguments of this `Result<…>`, up to its closing `>`.
            let mut depth = 0;
            let mut error_at = None;
            let mut end = compact.len();
            for (i, c) in compact[at + 7..].char_indices() {
                match c {
                    '<' | '(' => depth += 1,
                    '>' | ')' if depth == 0 => {
                        end = at + 7 + i;
                        break;
                    }
                    '>' | ')' => depth -= 1,
                    ',' if depth == 0 => error_at = Some(at + 7 + i + 1),
                    _ => {}
                }
            }
            let error = error_at.map(|e| &compact[e..end]);
            assert_ne!(error, Some("String"), "{relative} has a Result<_, String>");
        }
    }
}
