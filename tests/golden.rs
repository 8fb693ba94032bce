//! Golden tests: recorded changes → the canonical events the sample mappings make of them.
//!
//! Each `tests/golden/<case>.changes.json` holds a connector's recorded changes; the events,
//! suppressed no-op count and failures they produce through the sample mappings (or the
//! directory the recording names under `mappings`) must equal
//! `tests/golden/<case>.expected.json`. Run with `UPDATE_GOLDEN=1` to rewrite the expected
//! files after a deliberate change, then review the diff: a golden file is a claim about
//! correct FHIR output, not a snapshot to wave through. The integration tests validate the
//! same output with an independent FHIR validator.

use std::{path::Path, sync::Arc};

use base64::Engine;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use fhir_cdc::{
    change::{ChangeEvent, ExactDecimal, Row, SourceTable, Value},
    config::Secret,
    mapping::{load_dir, MapContext, Mapper},
};
use serde_json::{json, Value as Json};

const TOKEN_KEY: &str = "golden-test-token-key";

fn value(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::String(s) => Value::Text(s.clone()),
        Json::Number(n) => Value::Int(
            n.as_i64()
                .expect("plain numbers are integers; use {\"decimal\": …}"),
        ),
        Json::Bool(b) => Value::Bool(*b),
        Json::Object(typed) => {
            let (kind, v) = typed.iter().next().expect("a typed value");
            let s = || {
                v.as_str()
                    .unwrap_or_else(|| panic!("{kind} takes a string"))
            };
            match kind.as_str() {
                "decimal" => Value::Decimal(ExactDecimal::parse(s()).unwrap()),
                "float" => Value::Float(v.as_f64().unwrap()),
                "date" => Value::Date(NaiveDate::parse_from_str(s(), "%Y-%m-%d").unwrap()),
                "zero_date" => Value::ZeroDate(s().to_owned()),
                "timestamp" => Value::Timestamp(
                    NaiveDateTime::parse_from_str(s(), "%Y-%m-%dT%H:%M:%S%.f").unwrap(),
                ),
                "timestamptz" => Value::TimestampTz(DateTime::parse_from_rfc3339(s()).unwrap()),
                "bytes" => Value::Bytes(
                    base64::engine::general_purpose::STANDARD
                        .decode(s())
                        .unwrap(),
                ),
                "uuid" => Value::Uuid(s().to_owned()),
                "json" => Value::Json(v.clone()),
                other => panic!("unknown value kind {other}"),
            }
        }
        Json::Array(_) => panic!("arrays are not column values"),
    }
}

fn row(json: &Json) -> Option<Row> {
    json.as_object().map(|columns| {
        Row::new(
            columns
                .iter()
                .map(|(k, v)| (k.as_str().into(), value(v)))
                .collect(),
        )
    })
}

fn changes(recording: &Json) -> Vec<ChangeEvent> {
    let connector = recording["connector"].as_str().unwrap();
    let kind = recording["kind"].as_str().unwrap();
    let database = recording["database"].as_str().unwrap();
    recording["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let (schema, table) = c["table"].as_str().unwrap().split_once('.').unwrap();
            let commit_time = c["commit_time"]
                .as_str()
                .map(|t| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc));
            ChangeEvent {
                source: Arc::new(SourceTable::new(connector, kind, database, schema, table)),
                op: c["op"].as_str().unwrap().parse().unwrap(),
                key: c["key"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap().into())
                    .collect(),
                before: row(&c["before"]),
                after: row(&c["after"]),
                position: c["position"].as_str().unwrap().parse().unwrap(),
                ordinal: c["ordinal"].as_u64().unwrap_or(0) as u32,
                transaction_id: c["txid"].as_str().map(str::to_owned),
                commit_time,
                capture_time: DateTime::parse_from_rfc3339(c["capture_time"].as_str().unwrap())
                    .unwrap()
                    .with_timezone(&Utc),
            }
        })
        .collect()
}

/// Run one recording through the sample mappings (or those it names).
pub fn run_case(case: &Path) -> Json {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Relative, so that failure locations in the golden files do not depend on the checkout.
    assert_eq!(
        std::env::current_dir().unwrap(),
        root,
        "cargo runs tests from the package root"
    );
    let recording: Json = serde_json::from_str(&std::fs::read_to_string(case).unwrap()).unwrap();
    // The sample mappings, unless the recording names a directory of its own.
    let dir = recording["mappings"].as_str().unwrap_or("mappings");
    let mappings = load_dir(Path::new(dir)).unwrap_or_else(|e| panic!("{dir}:\n{e}"));
    let context = MapContext {
        token_key: Some(Secret::new(TOKEN_KEY)),
        ..MapContext::default()
    };
    let mapper = Mapper::new(
        mappings,
        context,
        recording["source_system"].as_str().unwrap(),
    )
    .unwrap();
    let (mut events, mut suppressed, mut failures) = (Vec::new(), 0, Vec::new());
    for change in changes(&recording) {
        let outcome = mapper.map(&change);
        events.extend(
            outcome
                .events
                .iter()
                .map(|e| serde_json::to_value(e).unwrap()),
        );
        suppressed += outcome.suppressed;
        failures.extend(
            outcome
                .failures
                .iter()
                .map(|f| json!({"mapping_id": f.mapping_id, "error": f.error.to_string()})),
        );
    }
    json!({"events": events, "suppressed": suppressed, "failures": failures})
}

#[test]
fn recorded_changes_map_to_the_expected_events() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".changes.json"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no golden cases in {}", dir.display());
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    for case in cases {
        let actual = run_case(&case);
        let expected_path = case
            .to_string_lossy()
            .replace(".changes.json", ".expected.json");
        if update {
            std::fs::write(
                &expected_path,
                serde_json::to_string_pretty(&actual).unwrap() + "\n",
            )
            .unwrap();
            continue;
        }
        let expected: Json = serde_json::from_str(
            &std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
                panic!("{expected_path} is missing: run with UPDATE_GOLDEN=1 and review it")
            }),
        )
        .unwrap();
        if actual != expected {
            mismatches.push(format!(
                "{}:\n--- expected\n{}\n--- actual\n{}",
                case.display(),
                serde_json::to_string_pretty(&expected).unwrap(),
                serde_json::to_string_pretty(&actual).unwrap()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}

#[test]
fn every_resource_agrees_with_its_envelope() {
    let mut checked = 0;
    for entry in std::fs::read_dir("tests/golden").unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".changes.json") {
            continue;
        }
        let outcome = run_case(&path);
        for event in outcome["events"].as_array().unwrap() {
            let Some(resource) = event["resource"].as_object() else {
                assert_eq!(event["op"], "delete", "only deletes carry no resource");
                continue;
            };
            let p = &event["provenance"];
            assert_eq!(resource["resourceType"], event["resource_type"]);
            assert_eq!(resource["id"], event["resource_id"]);
            assert_eq!(resource["meta"]["versionId"], event["resource_version"]);
            let updated = if p["commit_time"].is_null() {
                &p["capture_time"]
            } else {
                &p["commit_time"]
            };
            assert_eq!(&resource["meta"]["lastUpdated"], updated);
            // MySQL's schemas are its databases: named once.
            let (database, schema) = (
                p["database"].as_str().unwrap(),
                p["schema"].as_str().unwrap(),
            );
            let place = if p["database_kind"] == "mysql" && database == schema {
                database.to_owned()
            } else {
                format!("{database}.{schema}")
            };
            let source = format!(
                "urn:fhir-cdc:{}:{place}.{}",
                p["connector"].as_str().unwrap(),
                p["table"].as_str().unwrap()
            );
            assert_eq!(resource["meta"]["source"], source.as_str());
            let confidentiality = if event["sensitivity"] == "restricted" {
                "R"
            } else {
                "N"
            };
            assert!(resource["meta"]["security"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["code"] == confidentiality));
            assert_eq!(
                p["snapshot"],
                Json::Bool(p["commit_time"].is_null()),
                "snapshot reads have no commit time"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20);
}
