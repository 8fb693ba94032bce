//! The crate's layout, tested: the rules of `docs/architecture.md`, written once here, held
//! against the `crate::…` paths every file of `src/` uses (tests left out). A rule broken
//! fails with the files that break it, so the layout cannot drift silently.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Top-level modules and the top-level modules each must never import, with the reason.
const NEVER: &[(&str, &[&str], &str)] = &[
    (
        "error",
        &[
            "fhir",
            "change",
            "config",
            "mapping",
            "canonical",
            "source",
            "pipeline",
            "consumer",
            "kafka",
            "offsets",
            "reconcile",
            "dlq",
            "observe",
            "postgres",
        ],
        "the error kinds are what every module's errors say; they know none of them",
    ),
    (
        "fhir",
        &[
            "change",
            "config",
            "mapping",
            "canonical",
            "source",
            "pipeline",
            "consumer",
        ],
        "the FHIR definitions and resources stand on nothing of the crate",
    ),
    (
        "change",
        &[
            "config",
            "mapping",
            "canonical",
            "source",
            "pipeline",
            "consumer",
            "kafka",
        ],
        "the source-neutral change is what sources and the mapper share; it knows neither",
    ),
    (
        "config",
        &[
            "change",
            "mapping",
            "canonical",
            "source",
            "pipeline",
            "consumer",
            "kafka",
            "offsets",
        ],
        "the configuration is a contract every module reads, and it reads none of them",
    ),
    (
        "observe",
        &[
            "source",
            "mapping",
            "pipeline",
            "consumer",
            "reconcile",
            "dlq",
            "kafka",
        ],
        "metrics are told numbers; they reach into no module",
    ),
    (
        "kafka",
        &[
            "change",
            "mapping",
            "canonical",
            "source",
            "pipeline",
            "consumer",
            "offsets",
            "reconcile",
            "dlq",
        ],
        "the one Kafka module serves both sides and knows neither",
    ),
    (
        "source",
        &[
            "mapping",
            "canonical",
            "pipeline",
            "consumer",
            "kafka",
            "reconcile",
            "dlq",
        ],
        "readers produce changes; they never map, encode or write (value text is `change`'s)",
    ),
    (
        "mapping",
        &[
            "source",
            "pipeline",
            "consumer",
            "kafka",
            "offsets",
            "reconcile",
            "dlq",
        ],
        "the mapper turns changes into events and does no I/O of the pipeline's",
    ),
    (
        "pipeline",
        &["consumer", "reconcile", "dlq", "postgres"],
        "the capture pipeline drives any source through its seam and names no database",
    ),
    (
        "consumer",
        &[
            "source",
            "pipeline",
            "mapping",
            "offsets",
            "reconcile",
            "dlq",
        ],
        "the consumer side reads events only, never the capture side",
    ),
];

/// Modules no module of the library imports: the command line is the binary's.
const ONLY_THE_BINARY: &[&str] = &["cli"];

/// Database client crates, which the capture pipeline must not name.
const DATABASE_CRATES: &[&str] = &["tokio_postgres", "mysql_async", "tiberius"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
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

/// The top-level module `file` (relative to `src/`) belongs to.
fn module_of(file: &Path) -> String {
    let first = file
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// A file's code without its unit tests (by the crate's convention, a trailing
/// `#[cfg(test)]` module).
fn code(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |at| &text[..at])
}

/// The first segments of every `crate::…` path in `code`, groups (`crate::{a, b::c}`)
/// opened.
fn imported(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            let body = &group[..end];
            // Top-level items of the group: split on commas at depth 0.
            let mut depth = 0;
            let mut item = String::new();
            for c in body.chars().chain([',']) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let name = item.trim().split("::").next().unwrap_or("").trim();
                        if !name.is_empty() {
                            found.insert(name.to_owned());
                        }
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// Per top-level module, what it imports of the others, with the files that do.
fn imports() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut modules: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&root).unwrap().to_owned();
        let module = module_of(&relative);
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for name in imported(code(&text)) {
            if name != module {
                modules
                    .entry(module.clone())
                    .or_default()
                    .entry(name)
                    .or_default()
                    .insert(relative.display().to_string());
            }
        }
    }
    modules
}

#[test]
fn no_two_top_level_modules_import_each_other() {
    let modules = imports();
    let mut circles = Vec::new();
    for (a, uses) in &modules {
        for (b, files) in uses {
            let back = modules.get(b).and_then(|u| u.get(a));
            if let Some(back) = back.filter(|_| a < b) {
                circles.push(format!("{a} ⇄ {b}: {files:?} and back {back:?}"));
            }
        }
    }
    assert!(
        circles.is_empty(),
        "modules importing each other:\n{}",
        circles.join("\n")
    );
}

#[test]
fn each_module_keeps_to_its_layer() {
    let modules = imports();
    let mut broken = Vec::new();
    for (module, never, why) in NEVER {
        for forbidden in *never {
            if let Some(files) = modules.get(*module).and_then(|u| u.get(*forbidden)) {
                broken.push(format!("{module} imports {forbidden} ({files:?}): {why}"));
            }
        }
    }
    for (module, uses) in &modules {
        for only in ONLY_THE_BINARY {
            if let Some(files) = uses.get(*only) {
                broken.push(format!(
                    "{module} imports {only} ({files:?}): only the binary does"
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "layout rules broken:\n{}",
        broken.join("\n")
    );
}

/// The files under `dir` of `src/` that name any of `names`, each with the name.
fn naming(dir: &str, names: &[&str]) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&src().join(dir), &mut files);
    let mut named = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let code = code(&text);
        for name in names {
            if code.contains(name) {
                named.push(format!("{} names {name}", file.display()));
            }
        }
    }
    named
}

#[test]
fn the_capture_pipeline_names_no_database() {
    let names: Vec<&str> = DATABASE_CRATES
        .iter()
        .copied()
        .chain(["source::postgres", "source::mysql", "source::sqlserver"])
        .collect();
    let named = naming("pipeline", &names);
    assert!(named.is_empty(), "{}", named.join("\n"));
}

#[test]
fn the_consumer_runtime_names_no_target_and_no_job() {
    let names: Vec<&str> = DATABASE_CRATES
        .iter()
        .copied()
        .chain([
            "crate::postgres",
            "consumer::projection",
            "super::projection",
            "consumer::target",
            "super::target",
            "consumer::projector",
            "super::projector",
        ])
        .collect();
    let named = naming("consumer/runtime", &names);
    assert!(named.is_empty(), "{}", named.join("\n"));
}

#[test]
fn the_import_reader_sees_groups_and_paths() {
    let code = "use crate::{a::{b, c}, d, e::f};\nlet x = crate::g::h();\nuse super::i;";
    let found: Vec<String> = imported(code).into_iter().collect();
    assert_eq!(found, ["a", "d", "e", "g"]);
}
