//! Every resource the golden tests produce is valid FHIR R4 to two independent validators
//! (fhirkit-rs and Google's FHIR protos), and both catch known-invalid resources — so the
//! check can fail, and fhir-cdc's own checker does not grade itself.

use serde_json::{json, Value};

use crate::stack;

/// Each resource's validation results from `oracles/fhir_validate.py`.
fn validate(resources: &[Value]) -> Vec<Value> {
    let lines: Vec<String> = resources
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    stack::run_oracle("fhir_validate.py", &[], &lines)
}

fn golden_resources() -> Vec<(String, Value)> {
    stack::golden_events()
        .into_iter()
        .filter(|(_, event)| !event["resource"].is_null())
        .map(|(file, event)| {
            (
                format!("{file} {}", event["resource_id"]),
                event["resource"].clone(),
            )
        })
        .collect()
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
