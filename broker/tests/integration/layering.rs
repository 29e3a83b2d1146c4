//! The broker's layering, checked from the tree.
//!
//! `broker/src/lib.rs` lists the crate's units (a folder or a file each)
//! bottom to top. Each unit's root doc (`folder/mod.rs` or `file.rs`) has a
//! `Uses:` line naming the units it may use, every one of them below it in
//! that list; so the arrows between units form no cycle. Every `crate::`
//! path in a unit's files must name the unit itself or one of its `Uses:`.
//!
//! Inside a folder, the root's doc lists its files (and subfolders) bottom
//! to top, and a file may name only a sibling listed before it (as
//! `super::x` or `crate::folder::x`); the folder's own root is open to all
//! of them. Subfolders are checked the same way, recursively.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files of the `herald` binary, which sits on top of the library and can
/// reach only what lib.rs re-exports (the compiler holds that).
const BINARY: &[&str] = &["main", "cli"];

fn src() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")).to_owned()
}

/// The doc lines (`//!`) a file opens with, joined.
fn doc(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| l.starts_with("//!") || l.trim().is_empty() || l.starts_with("#!["))
        .filter_map(|l| l.strip_prefix("//!"))
        .collect()
}

/// The names of a doc's layout list (`- [`name`]: ...`), in order.
fn listed(text: &str) -> Vec<String> {
    doc(text)
        .iter()
        .filter_map(|l| l.trim_start().strip_prefix("- [`"))
        .filter_map(|l| l.split_once("`]").map(|(m, _)| m.to_owned()))
        .collect()
}

/// The units a root's `Uses:` paragraph names (in backticks), or `None`
/// when the doc has no `Uses:` line.
fn uses(text: &str) -> Option<BTreeSet<String>> {
    let lines = doc(text);
    let at = lines.iter().position(|l| l.trim_start().starts_with("Uses:"))?;
    let mut para = String::new();
    for l in &lines[at..] {
        if l.trim().is_empty() {
            break;
        }
        para.push_str(l);
    }
    Some(para.split('`').skip(1).step_by(2).map(str::to_owned).collect())
}

/// Every path a file's code (comments aside) names after `prefix`, as its
/// segments: `crate::a::b::C` gives `[a, b, C]`; a group
/// `crate::{a::b, c}` gives `[a, b]` and `[c]`.
fn paths(text: &str, prefix: &str) -> Vec<Vec<String>> {
    fn segments(s: &str) -> Vec<String> {
        let s = s.trim_start();
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(s.len());
        s[..end]
            .split("::")
            .take_while(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    }
    fn group(s: &str) -> Vec<&str> {
        // The items of a `{...}` group at depth 1.
        let (mut depth, mut start, mut out) = (0, 0, Vec::new());
        for (i, c) in s.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    out.push(&s[start..i]);
                    return out;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.push(&s[start..]);
        out
    }
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if let Some(g) = rest.strip_prefix('{') {
            out.extend(group(g).into_iter().map(segments).filter(|s| !s.is_empty()));
        } else {
            let s = segments(rest);
            if !s.is_empty() {
                out.push(s);
            }
        }
    }
    out
}

/// The `.rs` files and folders directly in `dir`, as (module name, path).
fn entries(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter_map(|p| {
            let name = if p.is_dir() {
                p.file_name()?.to_str()?.to_owned()
            } else if p.extension().and_then(|e| e.to_str()) == Some("rs") {
                p.file_stem()?.to_str()?.to_owned()
            } else {
                return None;
            };
            Some((name, p))
        })
        .collect();
    out.sort();
    out
}

/// The root file of a module at `path` (a folder's `mod.rs`, or the file).
fn root(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("mod.rs")
    } else {
        path.to_owned()
    }
}

/// Every `.rs` file of a module, its root included.
fn files(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_owned()];
    }
    entries(path).into_iter().flat_map(|(_, p)| files(&p)).collect()
}

/// Checks one folder's order of files: each entry may name only siblings
/// listed before it. `at` is the folder's crate path (`["fanout"]`).
fn check_folder(dir: &Path, at: &[String], wrong: &mut Vec<String>) {
    let text = std::fs::read_to_string(dir.join("mod.rs")).unwrap_or_default();
    let order = listed(&text);
    for (name, path) in entries(dir) {
        if name == "mod" {
            continue;
        }
        let Some(me) = order.iter().position(|m| *m == name) else {
            wrong.push(format!(
                "{}: {name} is missing from the folder's list",
                dir.display()
            ));
            continue;
        };
        // `super::x` in the entry's root names a sibling; `crate::folder::x`
        // anywhere in the entry does too.
        let mut named: Vec<String> = paths(&std::fs::read_to_string(root(&path)).expect("read"), "super::")
            .into_iter()
            .filter_map(|p| p.first().cloned())
            .collect();
        for file in files(&path) {
            let text = std::fs::read_to_string(&file).expect("read");
            for p in paths(&text, "crate::") {
                if p.len() > at.len() && p[..at.len()] == *at {
                    named.push(p[at.len()].clone());
                }
            }
        }
        for n in named.into_iter().filter(|n| *n != name) {
            // A name the list lacks is an item of the folder's root.
            if order.iter().position(|m| *m == n).is_some_and(|i| i > me) {
                wrong.push(format!(
                    "{}: {name} uses {n}, which is not listed before it",
                    dir.display()
                ));
            }
        }
        if path.is_dir() {
            let mut inner = at.to_vec();
            inner.push(name);
            check_folder(&path, &inner, wrong);
        }
    }
}

/// Every arrow against the declared layers in the crate rooted at `src`.
fn check(src: &Path) -> (usize, Vec<String>) {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    let order = listed(&lib);
    let mut wrong = Vec::new();
    let mut units = 0;
    for (unit, path) in entries(src) {
        if unit == "lib" || BINARY.contains(&unit.as_str()) {
            continue;
        }
        units += 1;
        let Some(me) = order.iter().position(|m| *m == unit) else {
            wrong.push(format!("{unit} is missing from the Layout list in lib.rs"));
            continue;
        };
        let text = std::fs::read_to_string(root(&path)).expect("read root");
        let Some(allowed) = uses(&text) else {
            wrong.push(format!("{unit}'s doc has no `Uses:` line"));
            continue;
        };
        for u in &allowed {
            match order.iter().position(|m| m == u) {
                Some(i) if i < me => {}
                Some(_) => wrong.push(format!(
                    "{unit} says it uses {u}, which is not below it in lib.rs"
                )),
                None => wrong.push(format!("{unit} says it uses {u}, which lib.rs does not list")),
            }
        }
        for file in files(&path) {
            let text = std::fs::read_to_string(&file).expect("read");
            for p in paths(&text, "crate::") {
                let to = &p[0];
                if *to != unit && !allowed.contains(to) {
                    wrong.push(format!(
                        "{} uses crate::{}, not in {unit}'s Uses",
                        file.display(),
                        p.join("::")
                    ));
                }
            }
        }
        if path.is_dir() {
            check_folder(&path, std::slice::from_ref(&unit), &mut wrong);
        }
    }
    (units, wrong)
}

#[test]
fn every_import_points_down_the_documented_layers() {
    let (units, wrong) = check(&src());
    assert!(units > 10, "found only {units} units in {}", src().display());
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

/// A throwaway crate tree for the checker's own test.
struct Tree(PathBuf);

impl Tree {
    fn new(name: &str, files: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("herald-layering-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }
        Tree(dir)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const LIB: &str = "//! - [`low`]: x\n//! - [`mid`]: y\n//! - [`top`]: z\n";
const MID: &str =
    "//! Mid.\n//!\n//! Uses: `low`.\n//!\n//! - [`a`]: first\n//! - [`b`]: second\n\nmod a;\nmod b;\n";

#[test]
fn the_checker_refuses_a_wrong_way_import_across_folders() {
    let t = Tree::new(
        "across",
        &[
            ("lib.rs", LIB),
            (
                "low.rs",
                "//! Low.\n//!\n//! Uses: nothing.\n\nuse crate::mid::a::A;\n",
            ),
            ("mid/mod.rs", MID),
            ("mid/a.rs", "use crate::low::X;\n"),
            ("mid/b.rs", "use super::a::A;\n"),
            (
                "top.rs",
                "//! Top.\n//!\n//! Uses: `mid`, `low`.\n\nuse crate::{mid::b, low};\n",
            ),
            ("x.rs", "//! Unlisted.\n//!\n//! Uses: nothing.\n"),
        ],
    );
    let (_, wrong) = check(&t.0);
    assert_eq!(wrong.len(), 2, "{wrong:#?}");
    assert!(
        wrong[0].contains("low.rs uses crate::mid::a::A, not in low's Uses"),
        "{wrong:#?}"
    );
    assert!(
        wrong[1].contains("x is missing from the Layout list"),
        "{wrong:#?}"
    );
}

#[test]
fn the_checker_refuses_a_wrong_way_import_inside_a_folder() {
    let t = Tree::new(
        "inside",
        &[
            ("lib.rs", LIB),
            ("low.rs", "//! Low.\n//!\n//! Uses: nothing.\n"),
            ("mid/mod.rs", MID),
            ("mid/a.rs", "use super::b::B;\nfn f() { crate::mid::b::g(); }\n"),
            ("mid/b.rs", "use super::a::A;\n"),
            ("top.rs", "//! Top.\n//!\n//! Uses: `top`, `mid`.\n"),
        ],
    );
    let (_, wrong) = check(&t.0);
    assert_eq!(wrong.len(), 3, "{wrong:#?}");
    assert!(
        wrong
            .iter()
            .filter(|w| w.contains("a uses b, which is not listed before it"))
            .count()
            == 2,
        "{wrong:#?}"
    );
    assert!(
        wrong.iter().any(|w| w.contains("top says it uses top")),
        "{wrong:#?}"
    );
}

#[test]
fn the_checker_reads_paths_and_groups() {
    let p = paths(
        "use crate::{hub::{Hub, Body}, bus};\n// crate::writer\nlet x = crate::metrics::X; my_crate::no;",
        "crate::",
    );
    assert_eq!(p, [vec!["hub"], vec!["bus"], vec!["metrics", "X"]]);
    assert_eq!(
        uses("//! A.\n//!\n//! Uses: `a`,\n//! `b`.\n//!\n//! - [`x`]: y\n"),
        Some(BTreeSet::from(["a".to_owned(), "b".to_owned()]))
    );
}
