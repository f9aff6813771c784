//! `cargo xtask modules`: the import graph between each library crate's
//! top-level modules (`src/x.rs` or `src/x/`), found from the `crate::x`
//! paths in their code and the `crate::Name`s the crate root re-exports
//! from a module (comments, doc links and `#[cfg(test)] mod tests` left
//! out), and its cycles (strongly connected components). With
//! `--check` a cycle that `xtask/module-cycles.txt` does not allow fails:
//! the file lists today's cycles so that none grows and no new one
//! appears, and shrinks as they are broken.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use crate::util;

/// The crates checked.
const CRATES: [&str; 4] = [
    "prism-stream",
    "prism-buffer",
    "prism-pipeline",
    "prism-nvcomp",
];
/// The allowed cycles, one per line: `crate: a b c` (sorted names).
const ALLOWED: &str = "xtask/module-cycles.txt";

pub fn run(check: bool) -> util::Result {
    let root = util::root();
    let mut found: Vec<(String, BTreeSet<String>)> = Vec::new();
    for krate in CRATES {
        let graph = graph(&root.join("crates").join(krate).join("src"))?;
        let edges: usize = graph.values().map(BTreeSet::len).sum();
        let cycles = cycles(&graph);
        println!(
            "{krate}: {} modules, {edges} imports between them, {} cycle(s)",
            graph.len(),
            cycles.len()
        );
        for c in cycles {
            println!(
                "  cycle: {}",
                c.iter().cloned().collect::<Vec<_>>().join(" ")
            );
            found.push((krate.to_owned(), c));
        }
    }
    if !check {
        return Ok(());
    }
    let allowed = read_allowed(&root.join(ALLOWED))?;
    let mut bad = String::new();
    for (krate, c) in &found {
        let ok = allowed.iter().any(|(k, a)| k == krate && c.is_subset(a));
        if !ok {
            let names: Vec<&str> = c.iter().map(String::as_str).collect();
            let _ = writeln!(bad, "  {krate}: {}", names.join(" "));
        }
    }
    for (krate, a) in &allowed {
        if !found.iter().any(|(k, c)| k == krate && c == a) {
            let names: Vec<&str> = a.iter().map(String::as_str).collect();
            println!(
                "note: the allowed cycle `{krate}: {}` is gone or smaller: shrink {ALLOWED}",
                names.join(" ")
            );
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "module cycles that {ALLOWED} does not allow:\n{bad}"
        ))
    }
}

fn read_allowed(path: &Path) -> Result<Vec<(String, BTreeSet<String>)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (krate, names) = line
            .split_once(':')
            .ok_or_else(|| format!("{}: `{line}` is not `crate: a b c`", path.display()))?;
        out.push((
            krate.trim().to_owned(),
            names.split_whitespace().map(str::to_owned).collect(),
        ));
    }
    Ok(out)
}

/// Top-level module → the top-level modules its code names.
fn graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let mut files: Vec<(String, std::path::PathBuf)> = Vec::new();
    let entries = std::fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))?;
    for e in entries.flatten() {
        let path = e.path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            walk(&path, &name, &mut files)?;
        } else if path.extension().is_some_and(|x| x == "rs") && name != "lib" {
            files.push((name, path));
        }
    }
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    // `crate::Name` through the crate root's `pub use module::Name`.
    let lib = src.join("lib.rs");
    let lib = std::fs::read_to_string(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    let reexports = reexports(&lib);
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for used in crate_paths(&text) {
            let target = reexports.get(&used).cloned().unwrap_or(used);
            if target != *module && modules.contains(&target) {
                graph.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    Ok(graph)
}

/// The crate root's re-exports: item name → the module it comes from
/// (`pub use module::{A, B};`, `pub use module::A;`).
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = lib;
    while let Some(i) = rest.find("pub use ") {
        rest = &rest[i + "pub use ".len()..];
        let end = rest.find(';').unwrap_or(rest.len());
        let stmt: String = rest[..end].split_whitespace().collect::<Vec<_>>().join(" ");
        rest = &rest[end..];
        let Some((module, items)) = stmt.split_once("::") else {
            continue;
        };
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            // `a::B` keeps B; `B as C` is C.
            let item = item.rsplit("::").next().unwrap_or(item);
            let name = item.rsplit(" as ").next().unwrap_or(item).trim();
            if !name.is_empty() {
                out.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    out
}

fn walk(
    dir: &Path,
    module: &str,
    files: &mut Vec<(String, std::path::PathBuf)>,
) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            walk(&path, module, files)?;
        } else if path.extension().is_some_and(|x| x == "rs") {
            files.push((module.to_owned(), path));
        }
    }
    Ok(())
}

/// The first segment of every `crate::x` path in code: not in comments,
/// and not in a trailing `#[cfg(test)] mod tests`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            // Not `prism_crate::` or the like: a path starts here.
            let before = rest[..i].chars().next_back();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() {
                // `crate::{a, b}`: every name in the braces.
                if let Some(group) = rest.strip_prefix('{') {
                    let end = group.find('}').unwrap_or(group.len());
                    for part in group[..end].split(',') {
                        let n: String = part
                            .trim()
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        if !n.is_empty() {
                            out.insert(n);
                        }
                    }
                }
            } else {
                out.insert(name);
            }
        }
    }
    out
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        next: usize,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(lw));
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low[v];
                s.low.insert(v, lv.min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                scc.insert(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                s.out.push(scc);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_code_count_and_comments_do_not() {
        let text = "use crate::order::Lane;\nuse crate::{event, memory::X, Error};\n// crate::graph\n/// [`x`](crate::stream)\nfn f() { crate::kernels::run(); my_crate::nope(); }\n#[cfg(test)]\nmod tests { use crate::future; }\n";
        let got: Vec<String> = crate_paths(text).into_iter().collect();
        assert_eq!(got, ["Error", "event", "kernels", "memory", "order"]);
    }

    #[test]
    fn root_reexports_name_their_module() {
        let lib = "pub use error::{Error, Result};\npub use order::{\n    Lane, StreamId,\n};\npub use a::b::C as D;\npub use cudarc;\n";
        let r = reexports(lib);
        assert_eq!(r.get("Error").map(String::as_str), Some("error"));
        assert_eq!(r.get("StreamId").map(String::as_str), Some("order"));
        assert_eq!(r.get("D").map(String::as_str), Some("a"));
        assert!(!r.contains_key("cudarc"));
    }

    #[test]
    fn cycles_are_the_strongly_connected_components() {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut edge = |a: &str, b: &str| {
            g.entry(a.into()).or_default().insert(b.into());
            g.entry(b.into()).or_default();
        };
        edge("a", "b");
        edge("b", "c");
        edge("c", "a");
        edge("c", "d");
        edge("d", "e");
        edge("e", "d");
        edge("f", "a");
        let got = cycles(&g);
        let want: Vec<BTreeSet<String>> = vec![
            ["d", "e"].iter().map(|s| s.to_string()).collect(),
            ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
        ];
        assert_eq!(got.len(), 2);
        for w in want {
            assert!(got.contains(&w), "{got:?}");
        }
    }
}
