//! Every resource the golden tests produce is valid FHIR R4 to two independent validators
//! (fhirkit-rs and Google's FHIR protos), and both catch known-invalid resources — so the
//! check can fail, and fhir-cdc's own checker does not grade itself.

use std::process::Command;

use serde_json::{json, Value};

use crate::stack;

/// Each resource's validation results from `oracles/fhir_validate.py`.
fn validate(resources: &[Value]) -> Vec<Value> {
    let file = std::env::temp_dir().join(format!("{}.ndjson", stack::unique("fhir_oracle")));
    let lines: Vec<String> = resources
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let output = Command::new(stack::oracle_python())
        .arg(stack::repo_root().join("integration-tests/oracles/fhir_validate.py"))
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(
        output.status.success(),
        "oracle failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), resources.len());
    results
}

fn golden_resources() -> Vec<(String, Value)> {
    let dir = stack::repo_root().join("tests/golden");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".expected.json") {
            continue;
        }
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for event in expected["events"].as_array().unwrap() {
            if !event["resource"].is_null() {
                let name = format!(
                    "{} {}",
                    path.file_name().unwrap().to_string_lossy(),
                    event["resource_id"]
                );
                found.push((name, event["resource"].clone()));
            }
        }
    }
    found
}

#[test]
fn every_golden_resource_is_valid_fhir_r4_to_both_validators() {
    let resources = golden_resources();
    assert!(
        resources.len() >= 20,
        "only {} golden resources",
        resources.len()
    );
    let bodies: Vec<Value> = resources.iter().map(|(_, r)| r.clone()).collect();
    let mut invalid = Vec::new();
    for ((name, _), result) in resources.iter().zip(validate(&bodies)) {
        if !result["fhirkit"].as_array().unwrap().is_empty() || !result["google"].is_null() {
            invalid.push(format!("{name}: {result}"));
        }
    }
    assert!(
        invalid.is_empty(),
        "invalid resources:\n{}",
        invalid.join("\n")
    );
}

#[test]
fn both_validators_reject_what_fhir_forbids() {
    let broken = [
        // a code outside Observation.status's required value set
        json!({"resourceType": "Observation", "id": "x", "status": "done", "code": {"text": "glucose"}}),
        // Observation.code is 1..1
        json!({"resourceType": "Observation", "id": "x", "status": "final"}),
        // a decimal given as a string
        json!({"resourceType": "Observation", "id": "x", "status": "final", "code": {"text": "g"}, "valueQuantity": {"value": "98"}}),
    ];
    let results = validate(&broken);
    // Google's enum-typed codes catch every case; fhirkit checks structure, not bindings.
    for (resource, result) in broken.iter().zip(&results) {
        assert!(
            !result["google"].is_null(),
            "google-fhir accepted {resource}"
        );
    }
    assert!(results[1]["fhirkit"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i.as_str().unwrap().contains("Observation.code")));
    assert!(results[2]["fhirkit"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i.as_str().unwrap().contains("valueQuantity.value")));
}
