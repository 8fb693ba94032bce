//! The canonical event: one version of one FHIR resource, with where it came from.

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    change::{push_decimal, ChangeEvent, Operation},
    config::TopicsConfig,
    fhir::Sensitivity,
    fhir::{names, Element},
};

/// What the event does to its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventOp {
    Upsert,
    Delete,
}

impl EventOp {
    /// Its name in the event (`upsert`, `delete`).
    pub fn name(self) -> &'static str {
        match self {
            EventOp::Upsert => "upsert",
            EventOp::Delete => "delete",
        }
    }
}

/// One version of one FHIR resource, plus provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanonicalEvent {
    /// Deterministic: the same change, re-read after a crash, gets the same id.
    pub event_id: String,
    pub resource_type: String,
    pub resource_id: String,
    /// Orders the versions of one resource: the commit position, then the change's ordinal
    /// in its transaction, as fixed-width text that sorts like them. Equal to
    /// `meta.versionId`.
    pub resource_version: String,
    pub op: EventOp,
    /// The topic segment (`lab`, `billing`, …).
    pub domain: Arc<str>,
    /// `normal` or `restricted`.
    pub sensitivity: Sensitivity,
    /// The FHIR R4 resource; `None` for deletes.
    pub resource: Option<Element>,
    pub provenance: Provenance,
}

/// Where an event came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub source_system: Arc<str>,
    pub connector: Arc<str>,
    /// `postgres` or `mysql`.
    pub database_kind: Arc<str>,
    pub database: Arc<str>,
    pub schema: Arc<str>,
    pub table: Arc<str>,
    /// The row's key columns and their values as text, in key order.
    pub primary_key: Vec<KeyColumn>,
    /// The source position, as text (`pg:0/16B3748`, `binlog:mysql-bin.000003:4567`).
    pub source_position: String,
    pub transaction_id: Option<String>,
    /// RFC 3339, UTC, in JSON.
    #[serde(with = "rfc3339::option")]
    pub commit_time: Option<DateTime<Utc>>,
    #[serde(with = "rfc3339")]
    pub capture_time: DateTime<Utc>,
    pub mapping_id: Arc<str>,
    /// The mapping's content hash.
    pub mapping_version: Arc<str>,
    /// Read by a snapshot rather than from the log.
    pub snapshot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyColumn {
    pub column: String,
    pub value: Option<String>,
}

/// The change and mapping an event is made from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub change: &'a ChangeEvent,
    pub mapping: MadeBy<'a>,
    pub source_system: &'a Arc<str>,
}

/// What an event says of the mapping that made it.
#[derive(Debug, Clone, Copy)]
pub struct MadeBy<'a> {
    pub id: &'a Arc<str>,
    /// The mapping file's content hash.
    pub version: &'a Arc<str>,
    pub domain: &'a Arc<str>,
    pub sensitivity: Sensitivity,
    /// The key columns the mapping declares.
    pub key: &'a [String],
}

impl CanonicalEvent {
    /// An upsert of `resource` (as mapped, with `resourceType` and `id`); `meta` is set here
    /// so that it agrees with the envelope.
    pub fn upsert(origin: Origin<'_>, mut resource: Element) -> Self {
        let text = |name| {
            resource
                .get(name)
                .and_then(Element::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let resource_type = text("resourceType");
        let resource_id = text("id");
        let mut event = Self::new(origin, resource_type, resource_id, EventOp::Upsert);
        set_meta(&mut resource, &event, origin.change.source.urn);
        event.resource = Some(resource);
        event
    }

    pub fn delete(origin: Origin<'_>, resource_type: &str, resource_id: String) -> Self {
        Self::new(
            origin,
            resource_type.to_owned(),
            resource_id,
            EventOp::Delete,
        )
    }

    fn new(origin: Origin<'_>, resource_type: String, resource_id: String, op: EventOp) -> Self {
        let change = origin.change;
        let key_row = change.after.as_ref().or(change.before.as_ref());
        // The key the mapping declares, not the one the source reports: with PostgreSQL's
        // REPLICA IDENTITY FULL every column is flagged as key, and the provenance would
        // carry the whole row (values a consumer of provenance has no business seeing), and
        // a snapshot and a stream event of one row would name different keys.
        let primary_key: Vec<KeyColumn> = origin
            .mapping
            .key
            .iter()
            .map(|column| KeyColumn {
                column: column.clone(),
                value: key_row
                    .and_then(|row| row.get(column))
                    .filter(|v| !v.is_null())
                    .map(|v| crate::change::text_of(v).into_owned()),
            })
            .collect();
        let mut resource_version = String::with_capacity(40);
        change.position.push_sort_key(&mut resource_version);
        resource_version.push('.');
        push_decimal(&mut resource_version, change.ordinal.into(), 10);
        let source_position = change.position.text();
        let event_id = event_id(
            change,
            &source_position,
            &primary_key,
            origin.mapping.id,
            (&resource_type, &resource_id),
            op,
        );
        let source = &change.source;
        CanonicalEvent {
            event_id,
            resource_type,
            resource_id,
            resource_version,
            op,
            domain: origin.mapping.domain.clone(),
            sensitivity: origin.mapping.sensitivity,
            resource: None,
            provenance: Provenance {
                source_system: origin.source_system.clone(),
                connector: source.connector.clone(),
                database_kind: source.kind.clone(),
                database: source.database.clone(),
                schema: source.schema.clone(),
                table: source.table.clone(),
                primary_key,
                source_position,
                transaction_id: change.transaction_id.clone(),
                // Microseconds, as the Avro envelope keeps them, so that meta.lastUpdated
                // still agrees with the envelope after a round trip.
                commit_time: change.commit_time.map(|t| t.trunc_subsecs(6)),
                capture_time: change.capture_time.trunc_subsecs(6),
                mapping_id: origin.mapping.id.clone(),
                mapping_version: origin.mapping.version.clone(),
                snapshot: change.op == Operation::Read,
            },
        }
    }

    /// The Kafka headers of the event's message: event id, resource type, connector.
    pub fn headers(&self) -> [(&'static str, &str); 3] {
        headers(
            &self.event_id,
            &self.resource_type,
            &self.provenance.connector,
        )
    }

    /// The Kafka topic, as the connector's topic classes name it (by default
    /// `<prefix>.<domain>.<ResourceType>`, restricted ones under `<prefix>.restricted.`).
    pub fn topic(&self, topics: &TopicsConfig) -> String {
        topics.event_topic(self.sensitivity, &self.domain, &self.resource_type)
    }

    /// The Kafka key, `<ResourceType>/<id>`, so one resource's versions share a partition.
    pub fn key(&self) -> String {
        let mut key = String::new();
        self.write_key(&mut key);
        key
    }

    /// [`Self::key`], written over what `key` held (no allocation once it is large enough).
    pub fn write_key(&self, key: &mut String) {
        key.clear();
        key.push_str(&self.resource_type);
        key.push('/');
        key.push_str(&self.resource_id);
    }
}

/// Whether `name` is an event topic under `prefix` (`<prefix>.<domain>.<ResourceType>`,
/// `<prefix>.restricted.<domain>.<ResourceType>` or another name a topic class gives), not
/// a dead-letter, reconciliation or state topic living under the same prefix.
pub fn is_event_topic(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(domain, resource_type)| {
            !matches!(domain, "dlq" | "reconcile") && !resource_type.is_empty()
        })
}

fn headers<'a>(
    event_id: &'a str,
    resource_type: &'a str,
    connector: &'a str,
) -> [(&'static str, &'a str); 3] {
    [
        ("event_id", event_id),
        ("resource_type", resource_type),
        ("connector", connector),
    ]
}

/// UUID-formatted first 128 bits of SHA-256 over the change's identity: connector, source
/// position, ordinal in the transaction, table, key values, mapping and resource, and for
/// a delete its op.
fn event_id(
    change: &ChangeEvent,
    position: &str,
    key: &[KeyColumn],
    mapping_id: &str,
    (resource_type, resource_id): (&str, &str),
    op: EventOp,
) -> String {
    let mut hash = Sha256::new();
    let source = &change.source;
    let mut ordinal = String::with_capacity(10);
    push_decimal(&mut ordinal, change.ordinal.into(), 1);
    // Each part, then the unit separator; `schema.table` is one part.
    for part in [
        &[source.connector.as_bytes()][..],
        &[position.as_bytes()],
        &[ordinal.as_bytes()],
        &[source.database.as_bytes()],
        &[source.schema.as_bytes(), b".", source.table.as_bytes()],
        &[mapping_id.as_bytes()],
        &[resource_type.as_bytes()],
        &[resource_id.as_bytes()],
    ] {
        for piece in part {
            hash.update(piece);
        }
        hash.update([0x1f]);
    }
    for column in key {
        hash.update(column.column.as_bytes());
        hash.update([0x1e]);
        hash.update(column.value.as_deref().unwrap_or("\u{0}NULL").as_bytes());
        hash.update([0x1f]);
    }
    // A delete and an upsert of one resource by one change are two events (an upsert's id
    // is as it always was).
    if op == EventOp::Delete {
        hash.update(b"delete");
        hash.update([0x1f]);
    }
    let digest = hash.finalize();
    let mut id = String::with_capacity(36);
    for (i, byte) in digest[..16].iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id.push('-');
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    id
}

/// RFC 3339 in UTC with the fraction it needs (`2024-03-05T14:30:00.25Z`): FHIR `instant`.
pub fn instant(ts: DateTime<Utc>) -> String {
    crate::change::rfc3339(&ts.fixed_offset())
}

/// Serde of the provenance times as [`instant`] text.
mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::instant(*ts))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = <std::borrow::Cow<'_, str>>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|ts| ts.to_utc())
            .map_err(|e| D::Error::custom(format!("not an RFC 3339 time: {e}")))
    }

    pub mod option {
        use chrono::{DateTime, Utc};
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            ts: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match ts {
                Some(ts) => super::serialize(ts, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            #[derive(Deserialize)]
            struct Wrapped(#[serde(with = "super")] DateTime<Utc>);
            Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(ts)| ts))
        }
    }
}

/// `meta.versionId`, `meta.lastUpdated` and `meta.source` from the envelope, and the
/// confidentiality label of the sensitivity, keeping labels the mapping set (MASKED).
fn set_meta(resource: &mut Element, event: &CanonicalEvent, source: &'static str) {
    let confidentiality = match event.sensitivity {
        Sensitivity::Restricted => "R",
        Sensitivity::Normal => "N",
    };
    let names = names();
    let mut security = match resource
        .get_mut("meta")
        .and_then(|m| m.get_mut("security"))
        .map(|labels| std::mem::replace(labels, Element::Array(Vec::new())))
    {
        Some(Element::Array(labels)) => labels,
        _ => Vec::with_capacity(1),
    };
    security.push(Element::Object(vec![
        (
            names.system,
            Element::Shared("http://terminology.hl7.org/CodeSystem/v3-Confidentiality"),
        ),
        (names.code, Element::Shared(confidentiality)),
    ]));
    let p = &event.provenance;
    let meta = Element::Object(vec![
        (
            names.version_id,
            Element::text(event.resource_version.clone()),
        ),
        (
            names.last_updated,
            Element::text(instant(p.commit_time.unwrap_or(p.capture_time))),
        ),
        (names.source, Element::Shared(source)),
        (names.security, Element::Array(security)),
    ]);
    // The mapper leaves `meta` right after `id`, where FHIR JSON puts it; replacing the value
    // keeps the place.
    resource.insert(names.meta, meta);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_topics_are_told_from_the_others_under_the_prefix() {
        for name in ["fhir.lab.Observation", "fhir.restricted.billing.Claim"] {
            assert!(is_event_topic("fhir", name), "{name}");
        }
        for name in [
            "fhir.state",
            "fhir.dlq.lab",
            "fhir.reconcile.lab",
            "fhirx.lab.Observation",
            "other.lab.Observation",
        ] {
            assert!(!is_event_topic("fhir", name), "{name}");
        }
    }
}
