//! Every golden event survives Avro exactly: encoded with the generated schema of its
//! resource type, decoded back, it equals the original — decimals digit for digit, absent
//! elements absent, times to the microsecond — and read straight into FHIR JSON, its
//! resource is the JSON the decoded tree serializes to.

// The bare datum functions are what a Confluent-framed message body is, and what
// schema_registry_converter uses; their builder-style successors add nothing here.
#![allow(deprecated)]

use std::path::Path;

use apache_avro::{from_avro_datum, to_avro_datum, Schema};
use fhir_cdc::canonical::{
    event_from_avro, event_to_avro, schema::event_schema, CanonicalEvent, EventWriter,
};
use fhir_cdc::fhir::Element;
use serde_json::Value as Json;

#[test]
fn golden_events_round_trip_through_avro_losslessly() {
    let mut checked = 0;
    for entry in std::fs::read_dir(Path::new("tests/golden")).unwrap() {
        let path = entry.unwrap().path();
        if !path.to_string_lossy().ends_with(".expected.json") {
            continue;
        }
        let expected: Json =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for json in expected["events"].as_array().unwrap() {
            let event: CanonicalEvent = serde_json::from_value(json.clone()).unwrap();
            let schema = Schema::parse(&event_schema(&event.resource_type)).unwrap();
            let bytes = to_avro_datum(&schema, event_to_avro(&event, &schema).unwrap()).unwrap();
            // The compiled writer of the hot path writes exactly what apache-avro writes.
            let mut written = Vec::new();
            let compiled = EventWriter::new(&schema).unwrap();
            compiled.write(&event, &mut written).unwrap();
            // …and its reader reads back exactly what was written, in FHIR JSON's order.
            let read = compiled.read(&written).unwrap();
            assert_eq!(
                serde_json::to_value(&read).unwrap(),
                *json,
                "{}: {} read back differently",
                path.display(),
                event.event_id
            );
            // Read straight into FHIR JSON (the projector's way), the resource is the very
            // text serializing the tree gives, and the rest of the event the same.
            let (envelope, resource) = compiled.read_json(&written).unwrap();
            assert_eq!(
                resource.as_ref().map(|r| r.json.as_str()),
                read.resource
                    .as_ref()
                    .map(|r| serde_json::to_string(r).unwrap())
                    .as_deref(),
                "{}: {} read into JSON differently",
                path.display(),
                event.event_id
            );
            assert_eq!(
                resource.and_then(|r| r.id),
                read.resource
                    .as_ref()
                    .and_then(|r| r.get("id"))
                    .and_then(|id| id.as_str())
                    .map(str::to_owned)
            );
            let mut without_resource = read.clone();
            without_resource.resource = None;
            assert_eq!(
                serde_json::to_value(&envelope).unwrap(),
                serde_json::to_value(&without_resource).unwrap()
            );
            assert_eq!(
                written, bytes,
                "{}: EventWriter and apache-avro disagree",
                event.event_id
            );
            let value = from_avro_datum(&schema, &mut bytes.as_slice(), None).unwrap();
            let decoded = event_from_avro(&value, &schema).unwrap();
            assert_eq!(
                serde_json::to_value(&decoded).unwrap(),
                *json,
                "{}: {} did not survive Avro",
                path.display(),
                event.event_id
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} golden events");
}

#[test]
fn a_value_that_does_not_fit_names_its_field() {
    let schema = Schema::parse(&event_schema("Observation")).unwrap();
    let mut event: CanonicalEvent = serde_json::from_value(
        serde_json::from_str::<Json>(
            &std::fs::read_to_string("tests/golden/devices-vitals.expected.json").unwrap(),
        )
        .unwrap()["events"][0]
            .clone(),
    )
    .unwrap();
    event
        .resource
        .as_mut()
        .unwrap()
        .insert("status", Element::Boolean(true));
    let err = event_to_avro(&event, &schema).unwrap_err();
    assert_eq!(err.path, "resource.status");
}

#[test]
fn the_compiled_writer_refuses_a_resource_its_schema_cannot_hold() {
    let expected: Json = serde_json::from_str(
        &std::fs::read_to_string("tests/golden/lab-result-lifecycle.expected.json").unwrap(),
    )
    .unwrap();
    let event: CanonicalEvent = serde_json::from_value(expected["events"][0].clone()).unwrap();
    let schema = Schema::parse(&event_schema(&event.resource_type)).unwrap();
    let writer = EventWriter::new(&schema).unwrap();
    type Fields = Vec<(fhir_cdc::fhir::Name, Element)>;
    let refusal = |change: &dyn Fn(&mut Fields)| {
        let mut event = event.clone();
        let Some(Element::Object(fields)) = event.resource.as_mut() else {
            panic!("an upsert has an object")
        };
        change(fields);
        writer
            .write(&event, &mut Vec::new())
            .unwrap_err()
            .to_string()
    };
    let unknown =
        refusal(&|fields| fields.push((fhir_cdc::fhir::intern("colour"), Element::text("red"))));
    assert!(unknown.contains("colour"), "{unknown}");
    let twice = refusal(&|fields| {
        let status = fields.iter().find(|(n, _)| *n == "status").unwrap().clone();
        fields.push(status);
    });
    assert!(
        twice.contains("status") && twice.contains("twice"),
        "{twice}"
    );
}

/// A schema anyone with write access to the registry could register, where a record holds
/// itself: what comes first is `first`, then an envelope field.
fn hostile_writer(first: &str) -> EventWriter {
    let schema = Schema::parse_str(&format!(
        r#"{{"type": "record", "name": "Event", "fields": [
            {{"name": "{first}", "type": ["null", {{"type": "record", "name": "Nest", "fields": [
                {{"name": "inner", "type": ["null", "Nest"]}},
                {{"name": "nothing", "type": {{"type": "array", "items": "null"}}}}]}}]}},
            {{"name": "event_id", "type": "string"}}]}}"#
    ))
    .unwrap();
    EventWriter::new(&schema).unwrap()
}

#[test]
fn hostile_messages_are_refused_with_a_reason_not_a_crash() {
    // 30,000 levels of a record in itself: the reader would follow them off the stack.
    let mut deep = vec![2u8; 30_000];
    deep.extend([0, 0, 0]);
    for first in ["resource", "unknown_field"] {
        let writer = hostile_writer(first);
        let refused = writer.read(&deep).unwrap_err().to_string();
        assert!(
            refused.contains("nested deeper than 128"),
            "{first}: {refused}"
        );
        if first == "resource" {
            let refused = writer.read_json(&deep).unwrap_err().to_string();
            assert!(refused.contains("nested deeper than 128"), "{refused}");
        }
        // An array of 2^62 items that take no bytes: the reader would loop for ever.
        let endless = [
            2, 0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x7f, 0,
        ];
        let refused = writer.read(&endless).unwrap_err().to_string();
        assert!(
            refused.contains("longer than the message"),
            "{first}: {refused}"
        );
    }
    // A schema that is not a record is no event schema.
    let refused = EventWriter::new(&Schema::parse_str(r#""string""#).unwrap())
        .unwrap_err()
        .to_string();
    assert!(refused.contains("not a record"), "{refused}");
}
