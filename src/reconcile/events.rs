//! Reconciliation events: every drifted resource of a pass, on
//! `<prefix>.reconcile.<connector>` (keyed by `ResourceType/id`, or a dead letter's id), Avro in the Confluent wire
//! format with its schema registered under the topic's subject, as the canonical events
//! are — so any consumer, and any audit, sees what a pass found and on which evidence.

use apache_avro::{types::Value as Avro, Schema};

use super::{Drifted, Report, SourceSide};
use crate::{
    canonical::registry::EventCodec,
    config::ConnectorConfig,
    error::{Error, Kind},
    kafka::{ensure_topics, Producer, TopicSpec},
};

/// The events' schema (`fhir_cdc.event.ReconcileEvent`). Sides a resource lacks are null.
pub const SCHEMA: &str = r#"{
  "type": "record", "name": "ReconcileEvent", "namespace": "fhir_cdc.event",
  "doc": "A resource whose source, log and projection disagree, as one reconciliation pass found it.",
  "fields": [
    {"name": "run_id", "type": "string", "doc": "The pass (one id per pass)."},
    {"name": "detected_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "connector", "type": "string"},
    {"name": "projector", "type": "string"},
    {"name": "resource_type", "type": "string", "doc": "Empty for a dead letter whose row makes no resource now."},
    {"name": "resource_id", "type": "string"},
    {"name": "drift", "type": "string", "doc": "missing_from_log, log_behind_source, mapping_changed, deleted_at_source, source_unmappable, missing_from_projection, projection_edited, projection_behind_log or dead_letter_outdated."},
    {"name": "source_read_at", "type": "string", "doc": "The source position the rows were read at."},
    {"name": "source_table", "type": ["null", "string"], "default": null},
    {"name": "source_digest", "type": ["null", "string"], "default": null, "doc": "SHA-256 (128 bits, hex) of the resource the row makes now, canonical JSON without meta."},
    {"name": "source_mapping_version", "type": ["null", "string"], "default": null},
    {"name": "source_unmappable_by", "type": ["null", "string"], "default": null, "doc": "The mapping the row fails."},
    {"name": "log_version", "type": ["null", "string"], "default": null},
    {"name": "log_deleted", "type": "boolean"},
    {"name": "log_digest", "type": ["null", "string"], "default": null},
    {"name": "log_mapping_version", "type": ["null", "string"], "default": null},
    {"name": "log_event_id", "type": ["null", "string"], "default": null},
    {"name": "log_topic", "type": ["null", "string"], "default": null},
    {"name": "log_partition", "type": ["null", "int"], "default": null},
    {"name": "log_offset", "type": ["null", "long"], "default": null},
    {"name": "projection_schema", "type": "string"},
    {"name": "projection_version", "type": ["null", "string"], "default": null},
    {"name": "projection_deleted", "type": "boolean"},
    {"name": "projection_digest", "type": ["null", "string"], "default": null},
    {"name": "dead_letter", "type": ["null", "string"], "default": null, "doc": "The outstanding dead letter (its id, as fhir-cdc dlq shows it) a dead_letter_outdated event is about."}
  ]
}"#;

/// The schema's full name, as registered.
const NAME: &str = "fhir_cdc.event.ReconcileEvent";

/// `<prefix>.reconcile.<connector>`, created as the connector's other topics are (its
/// partitions and replication), with the broker's default settings.
pub fn topic_spec(config: &ConnectorConfig) -> TopicSpec {
    TopicSpec {
        name: config.reconcile_topic(),
        partitions: config.topics.partitions,
        replication_factor: config.topics.replication_factor,
        config: Vec::new(),
    }
}

/// Where a pass's events come from besides its report.
#[derive(Debug)]
pub struct Context<'a> {
    pub run_id: &'a str,
    pub connector: &'a ConnectorConfig,
    pub projector: &'a str,
    pub projection_schema: &'a str,
}

/// Write one event per drifted resource of `report`; the number written.
pub async fn publish(
    context: &Context<'_>,
    codec: &EventCodec,
    report: &Report,
) -> Result<usize, Error> {
    if report.drifted.is_empty() {
        return Ok(0);
    }
    let config = context.connector;
    let spec = topic_spec(config);
    ensure_topics(&config.kafka, std::slice::from_ref(&spec))
        .await
        .map_err(Error::bare)?;
    let producer = Producer::new(&config.kafka).map_err(Error::bare)?;
    let schema = Schema::parse_str(SCHEMA).expect("the reconcile schema parses");
    let detected_at = chrono::Utc::now().timestamp_millis();
    for drifted in &report.drifted {
        let value = record(context, report, drifted, detected_at);
        let bytes = codec
            .encode_record(&spec.name, SCHEMA, NAME, &schema, value)
            .await
            .map_err(Error::bare)?;
        let key = match &drifted.letter {
            Some(letter) => letter.clone(),
            None => format!("{}/{}", drifted.resource_type, drifted.resource_id),
        };
        producer
            .send(
                &spec.name,
                &key,
                &bytes,
                &[("fhir-cdc-run", context.run_id)],
            )
            .await
            .map_err(Error::bare)?;
    }
    Ok(report.drifted.len())
}

fn record(context: &Context<'_>, report: &Report, drifted: &Drifted, detected_at: i64) -> Avro {
    let text = |s: &str| Avro::String(s.to_owned());
    let optional = |value: Option<Avro>| match value {
        Some(value) => Avro::Union(1, Box::new(value)),
        None => Avro::Union(0, Box::new(Avro::Null)),
    };
    let optional_text = |s: Option<String>| optional(s.map(Avro::String));
    let (source_digest, source_mapping, unmappable_by) = match &drifted.source {
        Some(SourceSide::Resource {
            digest,
            mapping_version,
        }) => (Some(digest.hex()), Some(mapping_version.clone()), None),
        Some(SourceSide::Unmappable { mapping_id }) => (None, None, Some(mapping_id.clone())),
        None => (None, None, None),
    };
    let log = drifted.log.as_ref();
    let origin = log.and_then(|l| l.origin.as_ref());
    let projection = drifted.projection.as_ref();
    Avro::Record(vec![
        ("run_id".into(), text(context.run_id)),
        ("detected_at".into(), Avro::TimestampMillis(detected_at)),
        ("connector".into(), text(&context.connector.name)),
        ("projector".into(), text(context.projector)),
        ("resource_type".into(), text(&drifted.resource_type)),
        ("resource_id".into(), text(&drifted.resource_id)),
        ("drift".into(), text(drifted.class.name())),
        ("source_read_at".into(), text(&report.read_at.text())),
        ("source_table".into(), optional_text(drifted.table.clone())),
        ("source_digest".into(), optional_text(source_digest)),
        (
            "source_mapping_version".into(),
            optional_text(source_mapping),
        ),
        ("source_unmappable_by".into(), optional_text(unmappable_by)),
        (
            "log_version".into(),
            optional_text(log.map(|l| l.version.clone())),
        ),
        (
            "log_deleted".into(),
            Avro::Boolean(log.is_some_and(|l| l.deleted)),
        ),
        (
            "log_digest".into(),
            optional_text(log.and_then(|l| l.digest).map(|d| d.hex())),
        ),
        (
            "log_mapping_version".into(),
            optional_text(log.map(|l| l.mapping_version.clone())),
        ),
        (
            "log_event_id".into(),
            optional_text(origin.map(|o| o.event_id.clone())),
        ),
        (
            "log_topic".into(),
            optional_text(origin.map(|o| o.topic.clone())),
        ),
        (
            "log_partition".into(),
            optional(origin.map(|o| Avro::Int(o.partition))),
        ),
        (
            "log_offset".into(),
            optional(origin.map(|o| Avro::Long(o.offset))),
        ),
        ("projection_schema".into(), text(context.projection_schema)),
        (
            "projection_version".into(),
            optional_text(projection.map(|p| p.version.clone())),
        ),
        (
            "projection_deleted".into(),
            Avro::Boolean(projection.is_some_and(|p| p.deleted)),
        ),
        (
            "projection_digest".into(),
            optional_text(projection.and_then(|p| p.digest).map(|d| d.hex())),
        ),
        ("dead_letter".into(), optional_text(drifted.letter.clone())),
    ])
}

/// A reconciliation event's fields, from its wire-format bytes (`tail` and tests).
pub fn decode(bytes: &[u8]) -> Result<serde_json::Value, Error> {
    let (_, mut body) = crate::canonical::registry::wire_format(bytes).map_err(Error::bare)?;
    let schema = Schema::parse_str(SCHEMA).expect("the reconcile schema parses");
    let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .and_then(|reader| reader.read_value(&mut body))
        .map_err(|e| Error::caused(Kind::Definite, "not a reconcile event", e))?;
    let Avro::Record(fields) = value else {
        return Err(Error::new(Kind::Definite, "not a record"));
    };
    Ok(fields
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                Avro::Union(_, inner) => *inner,
                other => other,
            };
            let json = match value {
                Avro::Null => serde_json::Value::Null,
                Avro::Boolean(b) => b.into(),
                Avro::Int(n) => n.into(),
                Avro::Long(n) | Avro::TimestampMillis(n) => n.into(),
                Avro::String(s) => s.into(),
                other => format!("{other:?}").into(),
            };
            (name, json)
        })
        .collect())
}
