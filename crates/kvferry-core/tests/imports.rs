//! kvferry-core's modules form layers: no file imports, through any chain of `crate::` and
//! `super::` paths, a file that imports it back, except the pairs listed in `ALLOWED_CYCLES`
//! (docs/architecture.md, "Module layers", says why each belongs together). A path names the file
//! it resolves to, so importing `crate::memory::MemKind` (re-exported by `memory/mod.rs`) depends
//! on all of `memory`, while `crate::memory::region::MemKind` depends on that leaf alone. Tests
//! (`tests.rs` files and trailing `#[cfg(test)] mod tests`) are left out: they may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ALLOWED_CYCLES: &[&[&str]] = &[&["tier::error", "tier::key"]];

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

/// `memory/host.rs` → `memory::host`, `memory/mod.rs` → `memory`, `lib.rs` → "".
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The source without comments and without a trailing test module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines().map(|line| line.split("//").next().unwrap()).collect::<Vec<_>>().join("\n")
}

/// Every `crate::a::b…` and `super::…::a…` path in `code`, as segments from the crate root.
fn paths(code: &str, module: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let ident = |i: usize| {
        let end =
            (i..bytes.len()).find(|&j| !(bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_')).unwrap_or(bytes.len());
        (&code[i..end], end)
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let at_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':');
        let (word, end) = ident(i);
        if !at_word || (word != "crate" && word != "super") || !code[end..].starts_with("::") {
            i += 1;
            continue;
        }
        let mut base: Vec<String> = match word {
            "crate" => Vec::new(),
            _ => module.split("::").filter(|s| !s.is_empty()).map(String::from).collect(),
        };
        let mut j = end;
        if word == "super" {
            base.pop();
        }
        let mut segments = Vec::new();
        while code[j..].starts_with("::") {
            let (next, after) = ident(j + 2);
            if next.is_empty() {
                break;
            }
            if next == "super" && segments.is_empty() {
                base.pop();
            } else {
                segments.push(next.to_string());
            }
            j = after;
        }
        base.extend(segments);
        found.push(base);
        i = j;
    }
    found
}

fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files.iter().map(|f| (module_of(&src, f), f.clone())).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let name = file.file_name().unwrap().to_string_lossy();
        if name == "tests.rs" || name == "lib.rs" || module.starts_with("fuzzing") {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let edges = graph.entry(module.clone()).or_default();
        for path in paths(&code, module) {
            // The longest prefix of the path that is a file.
            let target = (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| modules.contains_key(m));
            if let Some(target) = target.filter(|t| t != module) {
                edges.insert(target);
            }
        }
    }
    graph
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = BTreeSet::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                component.insert(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = import_graph();
    assert!(graph.len() > 40, "the walk found only {} modules", graph.len());
    assert!(graph["agent"].contains("transport"), "the agent's imports were not read: {:?}", graph["agent"]);
    let allowed: Vec<BTreeSet<String>> =
        ALLOWED_CYCLES.iter().map(|c| c.iter().map(|m| m.to_string()).collect()).collect();
    let unexpected: Vec<_> = cycles(&graph).into_iter().filter(|c| !allowed.contains(c)).collect();
    let shown: Vec<String> = unexpected
        .iter()
        .map(|c| {
            let edges: Vec<String> = c
                .iter()
                .flat_map(|a| graph[a].iter().filter(|b| c.contains(*b)).map(move |b| format!("{a} -> {b}")))
                .collect();
            edges.join(", ")
        })
        .collect();
    assert!(unexpected.is_empty(), "import cycles: {shown:#?}");
}

#[test]
fn the_leaf_modules_import_only_leaves() {
    let graph = import_graph();
    let leaves = [
        "error::code",
        "descriptor",
        "memory::region",
        "memory::error",
        "transport::kind",
        "transport::error",
        "tier::medium",
        "layout::error",
        "discovery::error",
        "metadata",
        "sync",
        "deadline",
        "limits",
    ];
    for leaf in leaves {
        let imports = &graph[leaf];
        let upward: Vec<_> = imports.iter().filter(|m| !leaves.contains(&m.as_str())).collect();
        assert!(upward.is_empty(), "{leaf} imports {upward:?}, which are not leaves");
    }
}
