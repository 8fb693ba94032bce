//! Time-budgeted property tests of identity and of the mapping loader.

use std::{path::Path, sync::Arc};

use chrono::Utc;
use fhir_cdc::{
    canonical::{CanonicalEvent, Origin},
    change::{ChangeEvent, Operation, PgLsn, Position, Row, SourceTable, Value},
    mapping::{load_file, load_str, resource_id, Template},
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
        key: vec!["k".into()],
        before: None,
        after: Some(row(key)),
        position: Position::Postgres(PgLsn(lsn)),
        ordinal,
        transaction_id: None,
        commit_time: None,
        capture_time: Utc::now(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn resource_ids_are_valid_stable_and_distinct(a in key_text(), b in key_text()) {
        let template = Template::parse("r-{k}").unwrap();
        let (id_a, id_b) = (resource_id(&template, &row(&a)).unwrap(), resource_id(&template, &row(&b)).unwrap());
        let valid = |id: &str| (1..=64).contains(&id.len()) && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
        prop_assert!(valid(&id_a), "{id_a}");
        prop_assert_eq!(&id_a, &resource_id(&template, &row(&a)).unwrap());
        if a != b {
            prop_assert_ne!(id_a, id_b);
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
            CanonicalEvent::delete(Origin { change: &change, mapping: &mapping, source_system: &"s".into() }, "Observation", format!("r-{}", key.len())).event_id
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
