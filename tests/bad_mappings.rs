//! Broken mapping files, each with the exact problems the loader must report: every
//! `# expect: LINE:COLUMN text` line in a file names one error, at that position, whose
//! message contains the text. No more, no fewer.

use std::path::Path;

use fhir_cdc::mapping::load_file;

#[test]
fn each_broken_file_reports_exactly_its_expected_errors() {
    let dir = Path::new("tests/bad-mappings");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "the broken-mapping set is missing");
    let mut failures = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut expected: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|e| {
                let (at, message) = e.split_once(' ').unwrap();
                (at.to_owned(), message.to_owned())
            })
            .collect();
        assert!(
            !expected.is_empty(),
            "{} has no `# expect:` line",
            file.display()
        );
        let errors = match load_file(&file) {
            Ok(_) => {
                failures.push(format!("{}: loaded without error", file.display()));
                continue;
            }
            Err(errors) => errors.0,
        };
        let prefix = format!("{}:", file.display());
        let mut unexpected = Vec::new();
        for error in &errors {
            let shown = error.to_string();
            assert!(
                shown.starts_with(&prefix),
                "an error names another file: {shown}"
            );
            let at = format!("{}:{}", error.location.line, error.location.column);
            match expected
                .iter()
                .position(|(l, m)| *l == at && error.message.contains(m.as_str()))
            {
                Some(i) => {
                    expected.remove(i);
                }
                None => unexpected.push(shown),
            }
        }
        if !expected.is_empty() || !unexpected.is_empty() {
            failures.push(format!(
                "{}:\n  expected but not reported: {expected:?}\n  reported but not expected: {unexpected:#?}",
                file.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
