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

/// A reference made like a resource's id must be tokenized exactly when that id is: the
/// mapping set does not load otherwise, naming the reference. Once both are, the id and
/// the reference agree, and neither holds the MRN.
#[test]
fn a_reference_is_tokenized_exactly_when_the_id_it_points_at_is() {
    use fhir_cdc::{
        change::{ExactDecimal, Row, Value},
        config::Secret,
        mapping::{load_dir, MapContext},
    };
    let dir = std::env::temp_dir().join(format!("fhir-cdc-id-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lab = Path::new("mappings/lab");
    for file in ["result.yaml", "tests.codes.yaml"] {
        std::fs::copy(lab.join(file), dir.join(file)).unwrap();
    }
    let patient = std::fs::read_to_string(lab.join("patient.yaml"))
        .unwrap()
        .replace(
            r#"id: "lab-patient-{mrn}""#,
            r#"id: { template: "lab-patient-{mrn}", protect: token }"#,
        );
    std::fs::write(dir.join("patient.yaml"), patient).unwrap();
    let errors = load_dir(&dir).unwrap_err().to_string();
    assert_eq!(errors.lines().count(), 1, "{errors}");
    assert!(
        errors.contains("result.yaml:25:")
            && errors.contains("Observation.subject.reference: mapping `lab.patient` tokenizes the ids of the Patients this references; add `protect: token`"),
        "{errors}"
    );

    let result = std::fs::read_to_string(dir.join("result.yaml"))
        .unwrap()
        .replace(
            r#"{ reference: Patient, id: "lab-patient-{mrn}" }"#,
            r#"{ reference: Patient, id: "lab-patient-{mrn}", protect: token }"#,
        );
    std::fs::write(dir.join("result.yaml"), result).unwrap();
    let mappings = load_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let of = |id: &str| mappings.iter().find(|m| &*m.id == id).unwrap();
    let context = MapContext {
        token_key: Some(Secret::new("a key")),
        ..MapContext::default()
    };
    let text = |s: &str| Value::Text(s.to_owned());
    let patient_row = Row::new(vec![
        ("patient_id".into(), Value::Int(1)),
        ("mrn".into(), text("M000000042")),
        ("last_name".into(), text("Doe")),
        ("first_name".into(), Value::Null),
        ("middle_name".into(), Value::Null),
        ("birth_date".into(), Value::Null),
        ("sex".into(), text("F")),
        ("ssn".into(), Value::Null),
        ("deceased".into(), text("N")),
        ("phone".into(), Value::Null),
    ]);
    let patient = of("lab.patient").resources[0]
        .apply(&patient_row, &context)
        .unwrap()
        .unwrap()
        .to_json();
    let id = patient["id"].as_str().unwrap();
    assert_eq!(
        id,
        format!("lab-patient-{}", context.token("M000000042").unwrap())
    );
    let result_row = Row::new(vec![
        ("result_id".into(), Value::Int(7)),
        ("accession_no".into(), text("A24-7")),
        ("mrn".into(), text("M000000042")),
        ("test_code".into(), text("GLU")),
        (
            "value_numeric".into(),
            Value::Decimal(ExactDecimal::parse("4.5").unwrap()),
        ),
        ("value_text".into(), Value::Null),
        ("units".into(), text("mmol/L")),
        ("ref_low".into(), Value::Null),
        ("ref_high".into(), Value::Null),
        ("abnormal_flag".into(), Value::Null),
        ("result_status".into(), text("F")),
        (
            "collected_at".into(),
            Value::Timestamp(
                chrono::NaiveDate::from_ymd_opt(2024, 3, 5)
                    .unwrap()
                    .and_hms_opt(14, 30, 0)
                    .unwrap(),
            ),
        ),
        ("verified_at".into(), Value::Null),
        ("comment".into(), Value::Null),
    ]);
    let result = of("lab.result").resources[0]
        .apply(&result_row, &context)
        .unwrap()
        .unwrap()
        .to_json();
    assert_eq!(result["subject"]["reference"], format!("Patient/{id}"));
    assert!(!result.to_string().contains("M000000042"), "{result}");
}

/// Two resource entries that can make one type and id load only when no row can meet both:
/// exclusive conditions on one column pass; overlapping ones, or entries of two tables,
/// are refused at the later entry, naming the earlier.
#[test]
fn entries_that_can_make_one_resource_need_exclusive_conditions() {
    use fhir_cdc::mapping::load_dir;
    let dir = std::env::temp_dir().join(format!("fhir-cdc-shared-ids-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let split = std::fs::read_to_string("tests/golden/mappings-conditions/split.yaml").unwrap();
    std::fs::write(dir.join("split.yaml"), &split).unwrap();
    assert!(
        load_dir(&dir).is_ok(),
        "is_numeric true and false exclude each other"
    );
    for (test, exclusive) in [
        ("in: [POS]", false),
        ("not_in: [POS]", false),
        ("lt: 0", false),
        ("is_numeric: true", false),
        // A NULL is no number.
        ("is_null: true", true),
    ] {
        let text = split.replacen("is_numeric: false", test, 1);
        std::fs::write(dir.join("split.yaml"), text).unwrap();
        let loaded = load_dir(&dir);
        assert_eq!(loaded.is_ok(), exclusive, "{test}");
        let Err(errors) = loaded else { continue };
        let errors = errors.to_string();
        assert!(
            errors
                .contains("split.yaml:21:5: Observation/split-{} can also be made by the entry at")
                && errors.contains("split.yaml:12:5 (mapping `lab.split`)"),
            "{test}: {errors}"
        );
    }
    // Bounds: `gt: 5` and `le: 5` leave no number between them; `ge: 5` and `le: 5` do.
    let bounded = |low: &str, high: &str| {
        split
            .replacen("is_numeric: true", low, 1)
            .replacen("is_numeric: false", high, 1)
    };
    std::fs::write(dir.join("split.yaml"), bounded("gt: 5", "le: 5")).unwrap();
    assert!(load_dir(&dir).is_ok());
    std::fs::write(dir.join("split.yaml"), bounded("ge: 5", "le: 5")).unwrap();
    assert!(load_dir(&dir).is_err());
    // Another table's rows cannot be told apart by conditions.
    std::fs::write(dir.join("split.yaml"), &split).unwrap();
    let other = split
        .replace("mapping: lab.split", "mapping: lab.other")
        .replace("lis.split_result", "lis.other_result");
    std::fs::write(dir.join("zother.yaml"), other).unwrap();
    let errors = load_dir(&dir).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        errors.contains("zother.yaml:12:5: Observation/split-{} can also be made")
            && errors.contains("they read different tables"),
        "{errors}"
    );
}
