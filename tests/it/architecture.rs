//! The shape of `src/` (docs/architecture.md, "Module map"): no import
//! cycles between sibling modules, and no source file longer than
//! [`MAX_LINES`] lines before its tests.
//!
//! The module graph is read from the source text, not from the compiler:
//! each file is a module (`a/b.rs` and `a/b/mod.rs` are `a::b`), and every
//! `crate::` or `super::` path in it (in `use` lines, `{...}` groups
//! included, and inline) is an edge to the longest existing module that
//! path names. An edge from `a::x::y` to `a::z` is an edge between the
//! siblings `a::x` and `a::z`, the children of their lowest common
//! ancestor; edges between a module and its own ancestors or descendants
//! are not cycles. A strongly connected component of more than one sibling
//! is a cycle. Test code is left out: files named `tests.rs`, and every item
//! marked `#[cfg(test)]` (a `mod tests;` line, a `mod tests { .. }` block, a
//! test-only function), wherever it stands in the file. The line count of
//! a file is that of what remains.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest a source file may be before its first `#[cfg(test)]`.
const MAX_LINES: usize = 700;

/// A module path below the crate root (`[]` is the root).
type Module = Vec<String>;

/// A sibling-level edge and the module-level edges that make it.
type SiblingEdges = BTreeMap<(Module, Module), BTreeSet<(Module, Module)>>;

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".to_owned()
    } else {
        m.join("::")
    }
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file under `root` defines; `None` for test modules.
fn module_of(root: &Path, file: &Path) -> Option<Module> {
    let rel = file.strip_prefix(root).expect("file under root");
    let mut parts: Module = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if stem == "tests" {
        return None;
    }
    if !matches!(stem, "mod" | "lib" | "main") || !parts.is_empty() && stem != "mod" {
        parts.push(stem.to_owned());
    }
    Some(parts)
}

/// `code` (already [`code_only`]) without its `#[cfg(test)]` items: each
/// such attribute, the attributes after it and the item they mark (up to
/// its `;` or the end of its `{ .. }` block) are cut out.
fn without_tests(code: &str) -> String {
    const MARK: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let item = &rest[at + MARK.len()..];
        rest = &item[item_len(item)..];
    }
    out.push_str(rest);
    out
}

/// Length of the item at the start of `s`, attributes included: up to a
/// `;` outside brackets, or up to the `}` that closes its first block.
fn item_len(s: &str) -> usize {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' => depth = depth.saturating_sub(1),
            '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return i + 1;
                }
            }
            ';' if depth == 0 => return i + 1,
            _ => {}
        }
    }
    s.len()
}

/// A file's non-test code with comments and literals blanked.
fn non_test_code(text: &str) -> String {
    without_tests(&code_only(text))
}

/// `text` with comments and the contents of string and character
/// literals blanked (newlines kept), so that only code is searched.
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r' && (next == Some('"') || next == Some('#')) && starts_token(&c, i) {
            // A raw string: r"..." or r#"..."# (or br"...").
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            while j < c.len() {
                if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                out.push(blank(c[j]));
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if let Some(&ch) = c.get(i) {
                    out.push(blank(ch));
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c[i] == '\'' {
            // A character literal ('x', '\n', '\u{..}'), else a lifetime.
            if next == Some('\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Whether `c[i]` starts a token (or follows a `b` byte-string prefix).
fn starts_token(c: &[char], i: usize) -> bool {
    let before = |k: usize| i < k || !is_ident(c[i - k]);
    before(1) || c[i - 1] == 'b' && before(2)
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Reads paths from `s` at `*i`: one path, or a `{...}` group of them
/// (nested), each prefixed with `prefix`. `as` renames and `*` globs end a
/// path.
fn read_tree(s: &[char], i: &mut usize, prefix: Module, out: &mut Vec<Module>) {
    let mut path = prefix;
    loop {
        skip_space(s, i);
        match s.get(*i) {
            Some('{') => {
                *i += 1;
                loop {
                    skip_space(s, i);
                    match s.get(*i) {
                        None => return,
                        Some('}') => {
                            *i += 1;
                            return;
                        }
                        Some(',') => *i += 1,
                        Some(_) => {
                            let before = *i;
                            read_tree(s, i, path.clone(), out);
                            // Skip an `as` rename or anything unexpected.
                            while *i < s.len() && !matches!(s[*i], ',' | '}') {
                                *i += 1;
                            }
                            if *i == before {
                                *i += 1;
                            }
                        }
                    }
                }
            }
            Some(&c) if is_ident(c) => {
                let start = *i;
                while *i < s.len() && is_ident(s[*i]) {
                    *i += 1;
                }
                let seg: String = s[start..*i].iter().collect();
                if seg != "self" {
                    path.push(seg);
                }
                skip_space(s, i);
                if s.get(*i) == Some(&':') && s.get(*i + 1) == Some(&':') {
                    *i += 2;
                    continue;
                }
                out.push(path);
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

fn skip_space(s: &[char], i: &mut usize) {
    while *i < s.len() && s[*i].is_whitespace() {
        *i += 1;
    }
}

/// Every module-relative path that starts with `crate::` or `super::` in
/// `code` (already [`code_only`]), made absolute for module `m`.
fn crate_paths(m: &[String], code: &str) -> Vec<Module> {
    let s: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if !is_ident(s[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < s.len() && is_ident(s[i]) {
            i += 1;
        }
        let word: String = s[start..i].iter().collect();
        if word != "crate" && word != "super" {
            continue;
        }
        let mut j = i;
        skip_space(&s, &mut j);
        if !(s.get(j) == Some(&':') && s.get(j + 1) == Some(&':')) {
            continue;
        }
        j += 2;
        let mut paths = Vec::new();
        read_tree(&s, &mut j, vec![word], &mut paths);
        for p in paths {
            let supers = p.iter().take_while(|x| *x == "super").count();
            let (base, rest) = if p[0] == "crate" {
                (Vec::new(), &p[1..])
            } else if supers <= m.len() {
                (m[..m.len() - supers].to_vec(), &p[supers..])
            } else {
                continue;
            };
            let mut abs = base;
            abs.extend(rest.iter().cloned());
            out.push(abs);
        }
        i = j;
    }
    out
}

/// The module graph: every edge `a -> b` between distinct modules.
fn module_edges(files: &[(Module, String)]) -> BTreeSet<(Module, Module)> {
    let modules: BTreeSet<&Module> = files.iter().map(|(m, _)| m).collect();
    let resolve = |p: &Module| -> Module {
        (0..=p.len())
            .rev()
            .map(|n| p[..n].to_vec())
            .find(|m| modules.contains(m))
            .unwrap_or_default()
    };
    let mut edges = BTreeSet::new();
    for (m, text) in files {
        for p in crate_paths(m, &non_test_code(text)) {
            let target = resolve(&p);
            if &target != m {
                edges.insert((m.clone(), target));
            }
        }
    }
    edges
}

/// Each module edge as an edge between siblings (the children of the two
/// modules' lowest common ancestor); ancestor/descendant edges dropped.
fn sibling_edges(edges: &BTreeSet<(Module, Module)>) -> SiblingEdges {
    let mut out = SiblingEdges::new();
    for (a, b) in edges {
        let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        if common == a.len() || common == b.len() {
            continue;
        }
        let key = (a[..=common].to_vec(), b[..=common].to_vec());
        out.entry(key).or_default().insert((a.clone(), b.clone()));
    }
    out
}

/// Strongly connected components of more than one node (Tarjan).
fn cycles(edges: &SiblingEdges) -> Vec<Vec<Module>> {
    struct Tarjan<'a> {
        next: BTreeMap<&'a Module, Vec<&'a Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a Module) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.next.get(v).cloned().unwrap_or_default() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().expect("v is on the stack");
                    self.on_stack.remove(w);
                    component.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        next: BTreeMap::new(),
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for (a, b) in edges.keys() {
        t.next.entry(a).or_default().push(b);
    }
    let nodes: Vec<&Module> = t.next.keys().copied().collect();
    for v in nodes {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.found.sort();
    t.found
}

/// One cycle, with up to three module edges behind each sibling edge.
fn describe(cycle: &[Module], edges: &SiblingEdges) -> String {
    let names: Vec<String> = cycle.iter().map(|m| name(m)).collect();
    let mut s = format!("cycle: {}\n", names.join(" <-> "));
    for ((a, b), why) in edges {
        if cycle.contains(a) && cycle.contains(b) {
            let examples: Vec<String> = why
                .iter()
                .take(3)
                .map(|(x, y)| format!("{} -> {}", name(x), name(y)))
                .collect();
            s += &format!(
                "    {} -> {}  e.g. {}\n",
                name(a),
                name(b),
                examples.join(", ")
            );
        }
    }
    s
}

/// Every non-test module under `src/`, with its text.
fn sources() -> Vec<(Module, String)> {
    let root = src_dir();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|f| {
            let m = module_of(&root, &f)?;
            let text =
                std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            Some((m, text))
        })
        .collect()
}

#[test]
fn no_import_cycles_between_sibling_modules() {
    let files = sources();
    let modules = files.iter().map(|(m, _)| m).collect::<BTreeSet<_>>().len();
    let edges = module_edges(&files);
    // Not vacuous: the whole tree was read and its paths understood (about
    // 105 modules and 300 edges when this was written).
    assert!(modules > 100, "only {modules} modules found");
    assert!(edges.len() > 250, "only {} module edges found", edges.len());
    let siblings = sibling_edges(&edges);
    let found = cycles(&siblings);
    let report: String = found.iter().map(|c| describe(c, &siblings)).collect();
    println!(
        "{modules} modules, {} module edges, {} sibling edges, {} cycles\n{report}",
        edges.len(),
        siblings.len(),
        found.len()
    );
    assert!(
        found.is_empty(),
        "import cycles between sibling modules:\n{report}"
    );
}

#[test]
fn no_source_file_is_too_long_before_its_tests() {
    let root = src_dir();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    let long: Vec<String> = files
        .iter()
        .filter(|f| module_of(&root, f).is_some())
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).expect("readable source");
            let lines = non_test_code(&text).trim_end().lines().count();
            (lines > MAX_LINES).then(|| format!("{}: {lines} lines", f.display()))
        })
        .collect();
    assert!(files.len() > 100, "only {} files found", files.len());
    assert!(
        long.is_empty(),
        "source files over {MAX_LINES} lines before their tests (split them):\n{}",
        long.join("\n")
    );
}

fn module(path: &str) -> Module {
    path.split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_two_module_cycle_is_reported() {
    let files = vec![
        (module(""), "pub mod a;\npub mod b;\n".to_owned()),
        (
            module("a"),
            "use crate::b::{self, Thing as T};\n".to_owned(),
        ),
        (module("b"), "pub struct Thing;\n".to_owned()),
        (
            module("b::inner"),
            "fn f() { super::super::a::g(); }\n".to_owned(),
        ),
    ];
    let edges = module_edges(&files);
    assert!(edges.contains(&(module("a"), module("b"))), "{edges:?}");
    assert!(
        edges.contains(&(module("b::inner"), module("a"))),
        "{edges:?}"
    );
    let siblings = sibling_edges(&edges);
    assert_eq!(cycles(&siblings), vec![vec![module("a"), module("b")]]);
    let report = describe(&cycles(&siblings)[0], &siblings);
    assert!(report.contains("b -> a  e.g. b::inner -> a"), "{report}");
}

#[test]
fn paths_are_read_from_code_only() {
    let m = module("x::y");
    let text = "use crate::{a::{b::C, d}, e as f};\n\
         // crate::commented::Out\n\
         let s = \"crate::in_string\"; let c = '\"'; let r = br#\"super::raw\"#;\n\
         fn g<'a>(v: &'a super::z::T) {}\n\
         #[cfg(test)] use crate::test_only;";
    let code = non_test_code(text);
    let got: Vec<String> = crate_paths(&m, &code).iter().map(|p| name(p)).collect();
    assert_eq!(got, ["a::b::C", "a::d", "e", "x::z::T"]);
}

#[test]
fn test_items_are_left_out_wherever_they_stand() {
    let text = "mod a;\n\
         #[cfg(test)]\n\
         mod tests;\n\
         use crate::kept::One;\n\
         impl X {\n\
             #[cfg(test)]\n\
             #[allow(dead_code)]\n\
             fn helper() -> [u8; 2] { crate::test_only::f(); [0; 2] }\n\
             fn g() { let s = \"}\"; crate::kept::two(); }\n\
         }\n\
         #[cfg(test)]\n\
         mod tests_inline {\n\
             use crate::test_only::Three;\n\
             fn t() { if true { } }\n\
         }\n";
    let code = non_test_code(text);
    let got: Vec<String> = crate_paths(&module("x"), &code)
        .iter()
        .map(|p| name(p))
        .collect();
    assert_eq!(got, ["kept::One", "kept::two"]);
    assert_eq!(code.trim_end().lines().count(), 7, "{code}");
}

#[test]
fn modules_follow_file_names() {
    let root = Path::new("/src");
    let m = |f: &str| module_of(root, Path::new(f)).map(|m| name(&m));
    assert_eq!(m("/src/lib.rs").as_deref(), Some("crate"));
    assert_eq!(m("/src/main.rs").as_deref(), Some("crate"));
    assert_eq!(m("/src/route.rs").as_deref(), Some("route"));
    assert_eq!(
        m("/src/route/persist/db.rs").as_deref(),
        Some("route::persist::db")
    );
    assert_eq!(m("/src/x/mod.rs").as_deref(), Some("x"));
    assert_eq!(m("/src/x/main.rs").as_deref(), Some("x::main"));
    assert_eq!(m("/src/route/tests.rs"), None);
}
