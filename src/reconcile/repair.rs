//! `--repair`: drift mended through the normal paths, never by editing a read model by
//! hand. Source-side drift asks the running connector for an ad-hoc snapshot of exactly the
//! affected rows (their new versions flow through Kafka to every consumer); projection-side
//! drift restores the projection's row from its ledger's record of the log's latest event
//! (recorded first from Kafka where the ledger lacks it; by event id, only while the row is still what the pass saw, so a version the projector
//! applies meanwhile is never overwritten). A dead letter whose row has changed since is
//! settled in its topic. What no path can mend goes to the worklist.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use rdkafka::Message;

use super::{Drift, Drifted, LogOrigin, Report};
use crate::{
    canonical::registry::EventCodec,
    config::ConnectorConfig,
    consumer::{
        config::ProjectorConfig,
        events::{Coordinates, Entry, Prepared},
        projection,
    },
    dlq,
    error::{Error, Kind},
    kafka::{Producer, TopicReader},
    offsets::{SnapshotRequest, StateStore},
    source,
};

/// Rows named in one snapshot request at most (its condition is one `OR` per row).
const KEYS_PER_REQUEST: usize = 200;

/// How the drift was met.
#[derive(Debug, Default)]
pub struct Repairs {
    /// Snapshot requests made: their ids, table and rows named.
    pub requests: Vec<(String, String, usize)>,
    /// Projection rows restored from the ledger.
    pub restored: usize,
    /// Projection rows left alone: changed since the pass read them.
    pub moved: usize,
    /// Drifted resources put on the worklist.
    pub worklisted: usize,
}

impl Drift {
    /// Whether reading the row again at the source mends it.
    fn read_again(self) -> bool {
        matches!(
            self,
            Drift::MissingFromLog | Drift::LogBehindSource | Drift::MappingChanged
        )
    }

    /// Whether restoring the projection's row from the log mends it.
    fn restore(self) -> bool {
        matches!(
            self,
            Drift::MissingFromProjection | Drift::ProjectionEdited | Drift::ProjectionBehindLog
        )
    }

    /// Whether settling its dead letter mends it.
    fn settle(self) -> bool {
        self == Drift::DeadLetterOutdated
    }

    /// Whether a person must decide (the worklist).
    pub fn manual(self) -> bool {
        !self.read_again() && !self.restore() && !self.settle()
    }
}

/// Settle the outdated dead letters: record in the dead-letter topic that each is
/// superseded by its row's current state (which the pass judged as any other resource),
/// so `fhir-cdc dlq list` no longer shows it outstanding. The number settled.
pub async fn settle_letters(config: &ConnectorConfig, report: &Report) -> Result<usize, Error> {
    let letters: Vec<&Drifted> = report.drifted.iter().filter(|d| d.class.settle()).collect();
    if letters.is_empty() {
        return Ok(0);
    }
    let producer = Producer::new(&config.kafka).map_err(Error::bare)?;
    let topic = config.dead_letter_topic();
    for drifted in &letters {
        let Some(id) = &drifted.letter else {
            continue;
        };
        let why = if drifted.source.is_some() {
            "superseded: its row maps at the source now (reconciliation)"
        } else {
            "superseded: its row is gone at the source, or no longer meant for its mapping (reconciliation)"
        };
        dlq::record_settled(&producer, &topic, id, why)
            .await
            .map_err(|e| Error::of(format!("settling dead letter {id}"), e))?;
    }
    Ok(letters.len())
}

/// Ask the connector to read the rows of the source-side drift again; the requests made.
pub async fn request_snapshots(
    config: &ConnectorConfig,
    report: &Report,
) -> Result<Vec<(String, String, usize)>, Error> {
    let mut keys: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for drifted in report.drifted.iter().filter(|d| d.class.read_again()) {
        if let Some((table, condition)) = &drifted.row {
            keys.entry(table).or_default().push(condition);
        }
    }
    let mut made = Vec::new();
    for (table, conditions) in keys {
        for some in conditions.chunks(KEYS_PER_REQUEST) {
            let condition = some
                .iter()
                .map(|condition| format!("({condition})"))
                .collect::<Vec<_>>()
                .join(" OR ");
            let request = SnapshotRequest::new(table.to_owned(), Some(condition));
            source::request_snapshot(config, &request)
                .await
                .map_err(Error::bare)?;
            made.push((request.id, table.to_owned(), some.len()));
        }
    }
    Ok(made)
}

/// Wait (up to `bound`) until the connector has every request in `ids` done: their rows'
/// events are in Kafka.
pub async fn await_requests(
    config: &ConnectorConfig,
    ids: &[String],
    bound: Duration,
) -> Result<(), Error> {
    let store = StateStore::of(config).await.map_err(Error::bare)?;
    let started = Instant::now();
    loop {
        let state = store.load().await.map_err(Error::bare)?.unwrap_or_default();
        if let Some(id) = ids.iter().find(|id| state.dropped.contains(id)) {
            return Err(Error::new(Kind::Definite, format!(
                "the connector dropped repair request {id}: the server refused its condition (see the connector's log)"
            )));
        }
        if ids.iter().all(|id| state.request_done(id)) {
            return Ok(());
        }
        if started.elapsed() >= bound {
            return Err(Error::new(
                Kind::Transient,
                format!(
                "connector {} has not finished the repair snapshots within {} s; is it running?",
                config.name,
                bound.as_secs()
            ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Restore the projection rows of the projection-side drift from the ledger's record of
/// the log's latest event (recorded first from Kafka where the ledger lacks it);
/// `(restored, moved)`.
pub async fn restore(
    client: &tokio_postgres::Client,
    projector: &ProjectorConfig,
    report: &Report,
) -> Result<(usize, usize), Error> {
    let schema = &projector.projection.schema;
    let origins: Vec<&LogOrigin> = report
        .drifted
        .iter()
        .filter(|d| d.class.restore())
        .filter_map(|d| d.log.as_ref()?.origin.as_ref())
        .collect();
    record_unrecorded(client, projector, &origins).await?;
    let columns = "resource_type, resource_id, version, event_id, deleted, body, source_system,
        connector, database_kind, source_database, source_schema, source_table, primary_key,
        source_position, transaction_id, commit_time, capture_time, mapping_id,
        mapping_version, snapshot";
    let updates = columns
        .split(',')
        .map(str::trim)
        .filter(|c| !matches!(*c, "resource_type" | "resource_id"))
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    // The row is restored only while it is what the pass saw ($2: its version, or none).
    let statement = client
        .prepare(&format!(
            "INSERT INTO {schema}.resources ({columns})
             SELECT resource_type, resource_id, version, event_id, op = 'delete', body, source_system,
                    connector, database_kind, source_database, source_schema, source_table, primary_key,
                    source_position, transaction_id, commit_time, capture_time, mapping_id,
                    mapping_version, snapshot
               FROM {schema}.history WHERE event_id = $1::text::uuid
             ON CONFLICT (resource_type, resource_id) DO UPDATE SET {updates}, applied_at = clock_timestamp()
              WHERE {schema}.resources.version = $2"
        ))
        .await
        .map_err(Error::while_("preparing the restore"))?;
    let (mut restored, mut moved) = (0, 0);
    for drifted in report.drifted.iter().filter(|d| d.class.restore()) {
        let Some(origin) = drifted.log.as_ref().and_then(|l| l.origin.as_ref()) else {
            continue;
        };
        let seen = drifted.projection.as_ref().map(|p| p.version.as_str());
        let written = client
            .execute(&statement, &[&origin.event_id, &seen])
            .await
            .map_err(|e| {
                Error::of(
                    format!(
                        "restoring {}/{}",
                        drifted.resource_type, drifted.resource_id
                    ),
                    e,
                )
            })?;
        if written == 1 {
            restored += 1;
        } else {
            moved += 1;
        }
    }
    Ok((restored, moved))
}

/// Record in the projection's ledger those of the events at `origins` it does not hold (the
/// pass read them from Kafka), read again from Kafka.
async fn record_unrecorded(
    client: &tokio_postgres::Client,
    projector: &ProjectorConfig,
    origins: &[&LogOrigin],
) -> Result<(), Error> {
    let schema = &projector.projection.schema;
    let ids: Vec<&str> = origins.iter().map(|o| o.event_id.as_str()).collect();
    let unrecorded: HashSet<String> = client
        .query(
            &format!(
                "SELECT id FROM unnest($1::text[]) id
                  WHERE NOT EXISTS (SELECT FROM {schema}.history WHERE event_id = id::uuid)"
            ),
            &[&ids],
        )
        .await
        .map_err(Error::while_("reading the projection's ledger"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if unrecorded.is_empty() {
        return Ok(());
    }
    let codec = EventCodec::new(&projector.schema_registry).map_err(Error::bare)?;
    for origin in origins.iter().filter(|o| unrecorded.contains(&o.event_id)) {
        let (topic, partition, offset) = (&origin.topic, origin.partition, origin.offset);
        let place = format!("{topic}[{partition}]@{offset}");
        let mut reader = TopicReader::open_at(&projector.kafka, topic, partition, offset)?;
        let mut found = None;
        while found.is_none() && !reader.at_end() {
            let Some(message) = reader.next().await? else {
                continue;
            };
            if message.partition() != partition || message.offset() < offset {
                continue;
            }
            if message.offset() > offset {
                break;
            }
            let bytes = message.payload().unwrap_or_default();
            let (event, resource) = codec
                .decode_json(bytes)
                .await
                .map_err(|e| Error::of(format!("the event at {place}"), e))?;
            let prepared = Prepared::checked(event, resource).map_err(|why| {
                Error::new(Kind::Definite, format!("the event at {place}: {why}"))
            })?;
            found = Some((prepared, message.timestamp().to_millis()));
        }
        let Some((prepared, kafka_timestamp)) = found else {
            return Err(Error::new(
                Kind::Definite,
                format!(
                    "the event {} at {place} is no longer in Kafka (retention?)",
                    origin.event_id
                ),
            ));
        };
        let at = Coordinates {
            topic: topic.clone(),
            partition,
            offset,
        };
        let entry = Entry {
            event: &prepared,
            at: &at,
            kafka_timestamp,
        };
        projection::record(client, schema, entry)
            .await
            .map_err(|e| Error::of(format!("recording the event at {place} in the ledger"), e))?;
    }
    Ok(())
}
