//! Any bytes as a Kafka message value the projector or `tail` reads: the Confluent wire
//! header, then an Avro body read with an event schema (an Observation event's) and with a
//! schema of records nested in themselves. Each must answer an event or an error — never
//! panic, overflow the stack, loop, or allocate by a count the message cannot hold.
//! Run: `make fuzz` (each target for a bounded time), or
//! `cargo +nightly fuzz run wire_message` from the repository root.
#![no_main]

use std::sync::OnceLock;

use apache_avro::Schema;
use fhir_cdc::canonical::{registry::wire_format, schema::event_schema, EventWriter};
use libfuzzer_sys::fuzz_target;

fn readers() -> &'static [EventWriter; 2] {
    static READERS: OnceLock<[EventWriter; 2]> = OnceLock::new();
    READERS.get_or_init(|| {
        let event = Schema::parse(&event_schema("Observation")).expect("the event schema parses");
        let nested = Schema::parse_str(
            r#"{"type": "record", "name": "Event", "fields": [
                {"name": "resource", "type": ["null", {"type": "record", "name": "Nest", "fields": [
                    {"name": "inner", "type": ["null", "Nest"]},
                    {"name": "items", "type": {"type": "array", "items": "null"}}]}]},
                {"name": "event_id", "type": "string"}]}"#,
        )
        .expect("the nested schema parses");
        [
            EventWriter::new(&event).expect("compiles"),
            EventWriter::new(&nested).expect("compiles"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok((id, body)) = wire_format(data) else {
        return;
    };
    let reader = &readers()[(id % 2) as usize];
    let _ = reader.read(body);
    let _ = reader.read_json(body);
});
