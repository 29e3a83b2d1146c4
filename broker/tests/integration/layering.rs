//! The broker's layering, checked: `broker/src/lib.rs` lists its modules
//! bottom to top, and every `crate::` path in a module must name a module
//! listed below it. So the `use crate::` arrows form no cycle, and a
//! newcomer can read the layers off the crate docs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Files of the `herald` binary, which sits on top of the library.
const BINARY: &[&str] = &["main", "cli"];
/// Roughly where a file holds two concepts and should be split.
const MAX_LINES: usize = 480;

fn src() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))
}

/// Module names in the order the crate docs' Layout list gives them.
fn layout(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! - [`"))
        .filter_map(|l| l.split_once("`]").map(|(m, _)| m.to_owned()))
        .collect()
}

/// The crate modules a file's code (comments aside) refers to.
fn references(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a, b::c};`
                let group = group.split('}').next().unwrap_or("");
                group
                    .split(',')
                    .map(|p| p.trim().split("::").next().unwrap_or(""))
                    .collect()
            } else {
                vec![rest
                    .split(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()
                    .unwrap_or("")]
            };
            out.extend(names.into_iter().filter(|n| !n.is_empty()).map(str::to_owned));
        }
    }
    out
}

/// Each module file and the modules it refers to.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut g = BTreeMap::new();
    for entry in std::fs::read_dir(src()).expect("broker/src") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_owned();
        if name == "lib" || BINARY.contains(&name.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let mut refs = references(&text);
        refs.remove(&name);
        g.insert(name, refs);
    }
    g
}

/// A cycle in `g`, as the path that closes it, if there is one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_owned());
            return Some(cycle);
        }
        if !done.insert(n.to_owned()) {
            return None;
        }
        stack.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(n, g, &mut Vec::new(), &mut done))
}

#[test]
fn crate_imports_form_no_cycle() {
    let g = graph();
    assert!(g.len() > 5, "found too few modules in {}", src().display());
    if let Some(cycle) = find_cycle(&g) {
        panic!("broker/src imports form a cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn every_import_points_down_the_documented_layers() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    let order = layout(&lib);
    let g = graph();
    let mut wrong = Vec::new();
    for (module, refs) in &g {
        let Some(at) = order.iter().position(|m| m == module) else {
            wrong.push(format!("{module}.rs is missing from the Layout list in lib.rs"));
            continue;
        };
        for r in refs {
            match order.iter().position(|m| m == r) {
                Some(i) if i < at => {}
                Some(_) => wrong.push(format!("{module} uses crate::{r}, which is not below it")),
                None => wrong.push(format!("{module} uses crate::{r}, which the Layout list lacks")),
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn no_file_holds_two_concepts_by_size() {
    for entry in std::fs::read_dir(src()).expect("broker/src") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) == Some("rs") {
            let lines = std::fs::read_to_string(&path).expect("read").lines().count();
            assert!(
                lines <= MAX_LINES,
                "{} has {lines} lines: split it by concept",
                path.display()
            );
        }
    }
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    let refs = references("use crate::{hub::Hub, bus};\n// crate::writer\nlet x = crate::metrics::X;");
    assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["bus", "hub", "metrics"]);
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "a"]);
}
