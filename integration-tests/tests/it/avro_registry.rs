//! Canonical events through the real schema registry: the Confluent wire format, schemas
//! registered under TopicNameStrategy subjects, a lossless round trip through fhir-cdc's
//! codec, and an independent decoder (Python fastavro, with the schema fetched from the
//! registry by id) that reads the same events field for field.

use fhir_cdc::{
    canonical::{registry::EventCodec, CanonicalEvent},
    config::RegistryConfig,
};
use serde_json::Value;

use crate::stack;

fn golden_events() -> Vec<CanonicalEvent> {
    stack::golden_events()
        .into_iter()
        .map(|(_, event)| serde_json::from_value(event).unwrap())
        .collect()
}

fn codec() -> EventCodec {
    let config: RegistryConfig =
        toml::from_str(&format!("url = \"{}\"", stack::registry_url())).unwrap();
    EventCodec::new(&config).unwrap()
}

/// Encode every golden event to a per-run topic of its resource type.
async fn encode_all(codec: &EventCodec, events: &[CanonicalEvent]) -> Vec<Vec<u8>> {
    let topics = fhir_cdc::config::TopicsConfig {
        prefix: stack::unique("avro"),
        ..Default::default()
    };
    let mut encoded = Vec::new();
    for event in events {
        encoded.push(codec.encode(event, &event.topic(&topics)).await.unwrap());
    }
    encoded
}

#[tokio::test]
async fn events_round_trip_through_the_registry_in_the_confluent_wire_format() {
    let events = golden_events();
    assert!(events.len() >= 20);
    let codec = codec();
    let encoded = encode_all(&codec, &events).await;
    for (event, bytes) in events.iter().zip(&encoded) {
        assert_eq!(bytes[0], 0, "magic byte");
        let decoded = codec.decode(bytes).await.unwrap();
        assert_eq!(&decoded, event, "{} changed on the way", event.event_id);
    }
    // Events of one resource type share one registered schema, per topic subject.
    let id = |b: &Vec<u8>| u32::from_be_bytes(b[1..5].try_into().unwrap());
    let observations: Vec<u32> = events
        .iter()
        .zip(&encoded)
        .filter(|(e, _)| e.resource_type == "Observation")
        .map(|(_, b)| id(b))
        .collect();
    assert!(
        observations.windows(2).all(|w| w[0] == w[1]),
        "{observations:?}"
    );
}

#[tokio::test]
async fn undecodable_bytes_are_refused_as_definite_errors() {
    let codec = codec();
    for bytes in [
        &b"{\"not\": \"avro\"}"[..],
        &[0, 0, 0, 0][..],
        &[0, 0x7f, 0xff, 0xff, 0xff, 1, 2, 3][..],
    ] {
        let err = codec.decode(bytes).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");
    }
}

#[tokio::test]
async fn an_independent_avro_client_reads_every_field() {
    let events = golden_events();
    let encoded = encode_all(&codec(), &events).await;
    let hex: Vec<String> = encoded
        .iter()
        .map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
        .collect();
    let decoded = stack::run_oracle("avro_decode.py", &[&stack::registry_url()], &hex);
    assert_eq!(decoded.len(), events.len());
    for (event, python) in events.iter().zip(decoded) {
        let mut expected = serde_json::to_value(event).unwrap();
        // The oracle prints times as epoch microseconds.
        for time in ["commit_time", "capture_time"] {
            let field = &mut expected["provenance"][time];
            if let Some(text) = field.as_str() {
                *field = Value::from(
                    chrono::DateTime::parse_from_rfc3339(text)
                        .unwrap()
                        .timestamp_micros(),
                );
            }
        }
        assert_eq!(
            python["event"], expected,
            "fastavro read {} differently",
            event.event_id
        );
    }
}
