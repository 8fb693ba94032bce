//! Time-budgeted property tests of identity and of the mapping loader.

use std::{
    path::Path,
    sync::{Arc, LazyLock},
};

use chrono::{DateTime, NaiveDate, Utc};
use fhir_cdc::{
    canonical::{CanonicalEvent, Origin},
    change::{ChangeEvent, ExactDecimal, Operation, PgLsn, Position, Row, SourceTable, Value},
    config::Secret,
    mapping::{load_file, load_str, resource_id, MapContext, Mapping, Template},
};
use proptest::prelude::*;

/// Key text without trailing spaces (templates drop CHAR padding by design).
fn key_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9.-]{1,20}",                 // safe: used as it is
        "[A-Za-z0-9_ /:#é\u{0}-\u{1f}]{1,80}", // unsafe characters: hashed
        "[0-9]{60,200}",                       // too long: hashed
    ]
    .prop_filter("no trailing spaces", |s| !s.ends_with(' '))
}

fn row(key: &str) -> Row {
    Row::new(vec![("k".into(), Value::Text(key.to_owned()))])
}

fn change(key: &str, lsn: u64, ordinal: u32) -> ChangeEvent {
    ChangeEvent {
        source: Arc::new(SourceTable::new("c", "postgres", "d", "s", "t")),
        op: Operation::Insert,
        key: vec!["k".into()].into(),
        before: None,
        after: Some(row(key)),
        position: Position::Postgres(PgLsn(lsn)),
        ordinal,
        transaction_id: None,
        commit_time: None,
        capture_time: Utc::now(),
    }
}

/// A row of `columns`, each taking one of a few values: values that map alike (CHAR
/// padding, codes one translation merges), that map apart by a hair (`98.0`, `98.00`),
/// NULLs, and values a mapping refuses.
fn rows(
    columns: &'static [(&'static str, &'static [Option<&'static str>])],
) -> impl Strategy<Value = Row> {
    let value = |column: &str, text: &str| match column {
        "result_id" | "order_id" => Value::Int(text.parse().unwrap()),
        "value_numeric" | "ref_low" | "ref_high" => {
            Value::Decimal(ExactDecimal::parse(text).unwrap())
        }
        "collected_at" | "ordered_at" => Value::Timestamp(
            NaiveDate::from_ymd_opt(2024, 3, text.parse().unwrap())
                .unwrap()
                .and_hms_opt(8, 0, 0)
                .unwrap(),
        ),
        "verified_at" | "reported_at" => {
            Value::TimestampTz(DateTime::parse_from_rfc3339(text).unwrap())
        }
        _ => Value::Text(text.to_owned()),
    };
    columns
        .iter()
        .map(|(column, options)| {
            proptest::sample::select(*options).prop_map(move |text| {
                (
                    Arc::from(*column),
                    text.map_or(Value::Null, |text| value(column, text)),
                )
            })
        })
        .collect::<Vec<_>>()
        .prop_map(Row::new)
}

const RESULT_COLUMNS: &[(&str, &[Option<&str>])] = &[
    ("result_id", &[Some("1"), Some("1"), Some("1"), Some("2")]),
    ("accession_no", &[Some("A1"), Some("A1  "), Some("A2")]),
    ("mrn", &[Some("M1"), Some("M1 "), None]),
    (
        "test_code",
        &[Some("GLU"), Some("GLU  "), Some("K"), Some("NOPE")],
    ),
    (
        "value_numeric",
        &[Some("98.0"), Some("98.00"), Some("7"), None],
    ),
    ("value_text", &[None, None, Some("positive")]),
    ("units", &[Some("mg/dL"), Some("mg/dL "), None]),
    ("ref_low", &[Some("70"), None]),
    ("ref_high", &[Some("99"), Some("99.0"), None]),
    ("abnormal_flag", &[Some("N"), Some("H"), Some("Q"), None]),
    ("result_status", &[Some("F"), Some("C"), Some("Q"), None]),
    ("collected_at", &[Some("5"), Some("6"), None]),
    (
        "verified_at",
        &[
            Some("2024-03-05T20:30:00Z"),
            Some("2024-03-05T14:30:00-06:00"),
            None,
        ],
    ),
    ("comment", &[None, Some("hemolyzed")]),
];

const ORDER_COLUMNS: &[(&str, &[Option<&str>])] = &[
    ("order_id", &[Some("1")]),
    ("accession_no", &[Some("A1"), Some("A1"), Some("A2")]),
    ("mrn", &[Some("M1"), Some("M1 ")]),
    ("order_code", &[Some("BMP"), Some("BMP  "), Some("CBC")]),
    (
        "order_status",
        &[Some("O"), Some("P"), Some("F"), Some("C"), None],
    ),
    ("priority", &[Some("R"), Some("S"), Some("Z"), None]),
    ("ordering_provider", &[Some("D1"), None]),
    ("ordered_at", &[Some("5"), Some("6")]),
    ("reported_at", &[Some("2024-03-05T20:30:00Z"), None]),
];

/// For each resource of `mapping` whose id and conditions read the same values in both
/// rows: the same id and conditions hold for both, and the update's verdict (the new
/// resource, and whether the old row's is the same) is what mapping both rows gives.
fn mapped_both(mapping: &Mapping, old: &Row, new: &Row) -> Result<(), TestCaseError> {
    let context = MapContext::default();
    for resource in &mapping.resources {
        if !resource.same_gates(old, new) {
            continue;
        }
        prop_assert_eq!(
            resource.id_for(old, &context),
            resource.id_for(new, &context)
        );
        prop_assert_eq!(resource.applies_to(old), resource.applies_to(new));
        let expected = resource.apply(new, &context).map(|new_resource| {
            new_resource.map(|new_resource| {
                let same = resource.apply(old, &context).ok() == Some(Some(new_resource.clone()));
                (new_resource, same)
            })
        });
        prop_assert_eq!(resource.apply_update(old, new, &context), expected);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn an_update_compared_column_by_column_is_judged_as_if_both_rows_were_mapped(
        results in (rows(RESULT_COLUMNS), rows(RESULT_COLUMNS)),
        orders in (rows(ORDER_COLUMNS), rows(ORDER_COLUMNS)),
    ) {
        static MAPPINGS: LazyLock<[Mapping; 2]> = LazyLock::new(|| {
            ["mappings/lab/result.yaml", "mappings/lab/order.yaml"].map(|file| load_file(Path::new(file)).unwrap())
        });
        mapped_both(&MAPPINGS[0], &results.0, &results.1)?;
        mapped_both(&MAPPINGS[1], &orders.0, &orders.1)?;
    }

    #[test]
    fn resource_ids_are_valid_stable_and_distinct(a in key_text(), b in key_text(), tokenized: bool) {
        let template = Template::parse("r-{k}").unwrap();
        let (template, context) = if tokenized {
            (template.tokenized(), MapContext { token_key: Some(Secret::new("k")), ..MapContext::default() })
        } else {
            (template, MapContext::default())
        };
        let id = |key: &str| resource_id(&template, &row(key), &context).unwrap();
        let (id_a, id_b) = (id(&a), id(&b));
        let valid = |id: &str| (1..=64).contains(&id.len()) && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
        prop_assert!(valid(&id_a), "{id_a}");
        prop_assert_eq!(&id_a, &id(&a));
        if a != b {
            prop_assert_ne!(&id_a, &id_b);
        }
        if tokenized {
            prop_assert!(!id_a.contains(a.as_str()) || a.len() < 8, "{id_a} holds {a}");
        }
    }

    #[test]
    fn event_ids_are_stable_and_tell_changes_apart(
        key_a in key_text(), key_b in key_text(),
        lsn_a in 0u64..1 << 40, lsn_b in 0u64..1 << 40,
        ord_a in 0u32..4, ord_b in 0u32..4,
    ) {
        let mapping = load_file(Path::new("mappings/devices/vitals.yaml")).unwrap();
        let event = |key: &str, lsn, ordinal| {
            let change = change(key, lsn, ordinal);
            CanonicalEvent::delete(Origin { change: &change, mapping: mapping.made_by(), source_system: &"s".into() }, "Observation", format!("r-{}", key.len())).event_id
        };
        let a = event(&key_a, lsn_a, ord_a);
        prop_assert_eq!(&a, &event(&key_a, lsn_a, ord_a), "a re-read change must keep its id");
        if (key_a.as_str(), lsn_a, ord_a) != (key_b.as_str(), lsn_b, ord_b) {
            prop_assert_ne!(a, event(&key_b, lsn_b, ord_b));
        }
    }

    #[test]
    fn the_loader_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = load_str(Path::new("arbitrary.yaml"), &text);
    }

    #[test]
    fn the_loader_never_panics_on_plausible_mappings(
        keys in proptest::collection::vec(prop_oneof![
            Just("mapping"), Just("domain"), Just("source"), Just("table"), Just("key"), Just("resources"),
            Just("type"), Just("id"), Just("elements"), Just("when"), Just("column"), Just("translate"),
            Just("anchor"), Just("status"), Just("code.coding[0].code"), Just("valueQuantity.value"),
            Just("translations"), Just("codes"), Just("unmapped"), Just("zone"), Just("in"), Just("file"),
        ], 1..30),
        values in proptest::collection::vec(prop_oneof![
            Just("x"), Just("lab"), Just("Observation"), Just("\"{a}\""), Just("[a, b]"), Just("{ column: a }"),
            Just("true"), Just("lis.t"), Just("~"), Just("{a"), Just("- type: Patient"), Just("../../etc/passwd"),
        ], 1..30),
        indents in proptest::collection::vec(0usize..4, 1..30),
    ) {
        let text: String = keys.iter().zip(values.iter().cycle()).zip(indents.iter().cycle())
            .map(|((k, v), i)| format!("{}{k}: {v}\n", "  ".repeat(*i)))
            .collect();
        let _ = load_str(Path::new("mappings/lab/plausible.yaml"), &text);
    }
}
