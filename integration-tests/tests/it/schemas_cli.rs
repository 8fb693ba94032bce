//! `fhir-cdc schemas check` fails on schemas that drift from the definitions and mappings,
//! and `generate` repairs them.

use std::process::Command;

use crate::stack;

fn schemas(args: &[&str]) -> (i32, String) {
    let output = Command::new(stack::fhir_cdc_bin())
        .arg("schemas")
        .args(args)
        .current_dir(stack::repo_root())
        .output()
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[test]
fn drifted_schemas_fail_the_check_until_regenerated() {
    let dir = std::env::temp_dir().join(stack::unique("schemas"));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_arg = dir.to_str().unwrap();
    for entry in std::fs::read_dir(stack::repo_root().join("schemas")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let (code, out) = schemas(&["check", "--dir", dir_arg]);
    assert_eq!(code, 0, "the checked-in schemas are stale:\n{out}");

    let observation = dir.join("Observation.avsc");
    let text = std::fs::read_to_string(&observation).unwrap();
    std::fs::write(
        &observation,
        text.replacen("\"valueString\"", "\"valueText\"", 1),
    )
    .unwrap();
    std::fs::write(dir.join("Orphan.avsc"), "{}").unwrap();
    let (code, out) = schemas(&["check", "--dir", dir_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("Observation.avsc: differs from what the definitions and mappings generate"),
        "{out}"
    );
    assert!(
        out.contains("Orphan.avsc: no mapping produces this resource type any more"),
        "{out}"
    );

    let (code, out) = schemas(&["generate", "--dir", dir_arg]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(schemas(&["check", "--dir", dir_arg]).0, 0);
    std::fs::remove_dir_all(dir).unwrap();
}
