//! Reading the three sides of a pass: the source in one consistent snapshot, mapped; the
//! connector's and the projector's progress, waited for; the projection and its ledger.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use futures_util::{pin_mut, TryStreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::mpsc;

use super::{Digest, LogOrigin, Logged, Projected, SourceSide};
use crate::{
    change::{ChangeEvent, PgLsn, Position, SourceMessage, Value},
    config::{ConnectorConfig, SourceConfig},
    consumer::config::ProjectorConfig,
    mapping::Mapper,
    observe::progress::Progress,
    offsets::StateStore,
    source::{chunk_changes, mysql, postgres::snapshot::TableReader},
};

/// A resource: its type and id.
pub type ResourceKey = (String, String);

/// A row, as its table and key: `schema.table` and `col=value` pairs in column order.
pub type RowKey = (String, String);

/// A source row: its table (`schema.table`) and key values.
pub type SourceRow = (String, Vec<(String, Value)>);

/// What the source makes of its rows now.
#[derive(Debug, Default)]
pub struct SourceRead {
    /// Every change before it is in the snapshot: a version at or after it is judged by
    /// the next pass.
    pub low: Option<Position>,
    /// No change after it is in the snapshot: the connector must have captured up to it.
    pub high: Option<Position>,
    pub read: u64,
    /// What each resource is now, and the row it is made of.
    pub resources: HashMap<ResourceKey, (SourceSide, SourceRow)>,
    /// Rows a mapping cannot map: their table and key, and the mapping.
    pub unmappable: HashMap<RowKey, String>,
}

impl SourceRead {
    fn take(&mut self, mapper: &Mapper, change: &ChangeEvent) {
        self.read += 1;
        let outcome = mapper.map(change);
        let row = change.after.as_ref();
        let key: Vec<(String, Value)> = change
            .key
            .iter()
            .map(|column| {
                let value = row.and_then(|r| r.get(column)).cloned();
                (column.to_string(), value.unwrap_or(Value::Null))
            })
            .collect();
        for event in outcome.events {
            let Some(resource) = &event.resource else {
                continue;
            };
            self.resources.insert(
                (event.resource_type, event.resource_id),
                (
                    SourceSide::Resource {
                        digest: Digest::of(&resource.to_json()),
                        mapping_version: event.provenance.mapping_version.to_string(),
                    },
                    (change.source.qualified_name(), key.clone()),
                ),
            );
        }
        if let Some(failure) = outcome.failures.first() {
            let key = key
                .iter()
                .map(|(column, value)| format!("{column}={}", crate::mapping::text_of(value)))
                .collect::<Vec<_>>()
                .join(",");
            self.unmappable.insert(
                (change.source.qualified_name(), key),
                failure.mapping_id.clone(),
            );
        }
    }
}

/// Read every row of `tables` in one consistent snapshot and map it.
pub async fn source(
    config: &ConnectorConfig,
    mapper: &Mapper,
    tables: &[(String, String)],
) -> Result<SourceRead, String> {
    let mut read = SourceRead::default();
    // A bar per table on a terminal (rows read; no total: the read is one snapshot).
    let progress = Progress::new("reconcile");
    match &config.source {
        SourceConfig::Postgres(pg) => {
            let reader = TableReader::open(&pg.url, &config.name)
                .await
                .map_err(|e| e.to_string())?;
            let position = Position::Postgres(reader.position);
            for (schema, table) in tables {
                let (out, mut rows) = mpsc::channel(256);
                progress.start(&format!("{schema}.{table}"), None);
                let reading = async {
                    let mut ordinal = 0;
                    let how = crate::source::postgres::snapshot::Reading {
                        chunk_rows: 1024,
                        limit: None,
                        progress: Some(&progress),
                    };
                    let read = reader
                        .read(schema, table, &position, &mut ordinal, how, &out)
                        .await;
                    drop(out);
                    read
                };
                let mapping = async {
                    while let Some(SourceMessage::Change(change)) = rows.recv().await {
                        read.take(mapper, &change);
                    }
                };
                let (result, ()) = tokio::join!(reading, mapping);
                result.map_err(|e| e.to_string())?;
                progress.finish();
            }
            reader.close().await.map_err(|e| e.to_string())?;
            read.low = Some(position.clone());
            read.high = Some(position);
        }
        SourceConfig::Mysql(my) => {
            let mut current = String::new();
            let mut take = |table: &mysql::snapshot::ChunkTable,
                            rows: Vec<crate::change::Row>,
                            at: &crate::change::BinlogPosition| {
                let at = Position::Mysql(at.clone());
                if current != table.name {
                    if !current.is_empty() {
                        progress.finish();
                    }
                    progress.start(&table.name, None);
                    current.clone_from(&table.name);
                }
                progress.advance(rows.len() as u64);
                for change in chunk_changes(&table.source, &table.key, rows, &at) {
                    read.take(mapper, &change);
                }
            };
            let window =
                mysql::snapshot::read_consistent(&my.url, &config.name, tables, 1024, &mut take)
                    .await
                    .map_err(|e| e.to_string())?;
            if !current.is_empty() {
                progress.finish();
            }
            // Snapshot chunks go out at a transaction's end with a step after it: what they
            // hold is as of that end, so every step of the read's position is before it.
            read.low = Some(Position::Mysql(crate::change::BinlogPosition {
                step: u32::MAX,
                ..window.low
            }));
            read.high = Some(Position::Mysql(window.high));
        }
    }
    Ok(read)
}

/// The connector's stored position as a [`Position`] of its kind.
async fn stored_position(
    store: &StateStore,
    config: &ConnectorConfig,
) -> Result<Option<Position>, String> {
    let Some(text) = store
        .load()
        .await
        .map_err(|e| e.to_string())?
        .and_then(|s| s.position)
    else {
        return Ok(None);
    };
    Ok(match &config.source {
        SourceConfig::Postgres(_) => text.parse::<PgLsn>().ok().map(Position::Postgres),
        SourceConfig::Mysql(_) => mysql::capture::parse_position(&text)
            .ok()
            .map(|(p, _)| Position::Mysql(p)),
    })
}

/// Wait (up to `bound`) until the connector's stored position has reached `at`: every
/// change the source read saw is then in Kafka. `Err` says how far behind it stayed.
pub async fn connector_caught_up(
    config: &ConnectorConfig,
    at: &Position,
    bound: Duration,
) -> Result<Duration, String> {
    let store = StateStore::of(config).await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let target = at.sort_key();
    loop {
        let stored = stored_position(&store, config).await?;
        if stored.as_ref().is_some_and(|p| p.sort_key() >= target) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= bound {
            return Err(format!(
                "connector {} has not captured up to the source read ({}) within {} s: its stored position is {}; is it running?",
                config.name,
                at.text(),
                bound.as_secs(),
                stored.map_or("none".into(), |p| p.text())
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Wait (up to `bound`) until the projector of `projector` has applied every message of
/// `topics` that Kafka holds now. `Err` names what it had not read.
pub async fn projector_caught_up(
    projector: &ProjectorConfig,
    client: &tokio_postgres::Client,
    topics: &[String],
    bound: Duration,
) -> Result<Duration, String> {
    let ends = high_watermarks(projector, topics)?;
    let started = Instant::now();
    let schema = &projector.projection.schema;
    loop {
        let applied: HashMap<(String, i32), i64> = client
            .query(
                &format!("SELECT topic, kafka_partition, next_offset FROM {schema}.offsets WHERE consumer_group = $1"),
                &[&projector.group_id()],
            )
            .await
            .map_err(|e| format!("reading the projection's offsets: {e}"))?
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        let behind: Vec<String> = ends
            .iter()
            .filter(|(at, end)| applied.get(*at).copied().unwrap_or(0) < **end)
            .map(|((topic, partition), end)| {
                format!(
                    "{topic}[{partition}] at {} of {end}",
                    applied
                        .get(&(topic.clone(), *partition))
                        .copied()
                        .unwrap_or(0)
                )
            })
            .collect();
        if behind.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= bound {
            return Err(format!(
                "projector {} has not applied what Kafka holds within {} s: {}; is it running, and does it read these topics?",
                projector.name,
                bound.as_secs(),
                behind.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The end offset of every partition of `topics` (those that exist).
fn high_watermarks(
    projector: &ProjectorConfig,
    topics: &[String],
) -> Result<BTreeMap<(String, i32), i64>, String> {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let consumer: BaseConsumer = projector.kafka.client_config().create().map_err(|e| {
        format!(
            "cannot create a Kafka consumer: {}",
            crate::sink::kafka::creation_message(&e)
        )
    })?;
    let metadata = consumer
        .fetch_metadata(None, TIMEOUT)
        .map_err(|e| format!("cannot read the cluster's topics: {e}"))?;
    let wanted: HashSet<&str> = topics.iter().map(String::as_str).collect();
    let mut ends = BTreeMap::new();
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| wanted.contains(t.name()))
    {
        for partition in topic.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic.name(), partition.id(), TIMEOUT)
                .map_err(|e| {
                    format!(
                        "cannot read the offsets of {}[{}]: {e}",
                        topic.name(),
                        partition.id()
                    )
                })?;
            if high > 0 {
                ends.insert((topic.name().to_owned(), partition.id()), high);
            }
        }
    }
    Ok(ends)
}

/// The projection's rows and its ledger's latest event per resource, of `connector`'s
/// resources (of `tables` only, when given).
#[derive(Debug, Default)]
pub struct ProjectionRead {
    pub rows: HashMap<ResourceKey, Projected>,
    pub logged: HashMap<ResourceKey, (Logged, RowKey)>,
}

pub async fn projection(
    client: &tokio_postgres::Client,
    schema: &str,
    connector: &str,
    tables: Option<&[String]>,
) -> Result<ProjectionRead, String> {
    let fail = |what: &str| {
        let what = what.to_owned();
        move |e: tokio_postgres::Error| format!("reading the projection's {what}: {e}")
    };
    let only: Vec<String> = tables.map(<[String]>::to_vec).unwrap_or_default();
    let filter = "connector = $1 AND (cardinality($2::text[]) = 0 OR source_schema || '.' || source_table = ANY($2))";
    let mut read = ProjectionRead::default();
    let rows = client
        .query_raw(
            &format!("SELECT resource_type, resource_id, version, deleted, body::text FROM {schema}.resources WHERE {filter}"),
            [&connector as &(dyn tokio_postgres::types::ToSql + Sync), &only],
        )
        .await
        .map_err(fail("resources"))?;
    pin_mut!(rows);
    while let Some(row) = rows.try_next().await.map_err(fail("resources"))? {
        let body: Option<String> = row.get(4);
        read.rows.insert(
            (row.get(0), row.get(1)),
            Projected {
                version: row.get(2),
                deleted: row.get(3),
                digest: digest_of_text(body.as_deref()),
            },
        );
    }
    let logged = client
        .query_raw(
            &format!(
                "SELECT DISTINCT ON (resource_type, resource_id) resource_type, resource_id, version, op, body::text,
                        mapping_version, source_schema || '.' || source_table, primary_key::text,
                        event_id::text, topic, kafka_partition, kafka_offset
                   FROM {schema}.history WHERE {filter}
                  ORDER BY resource_type, resource_id, version DESC"
            ),
            [&connector as &(dyn tokio_postgres::types::ToSql + Sync), &only],
        )
        .await
        .map_err(fail("ledger"))?;
    pin_mut!(logged);
    while let Some(row) = logged.try_next().await.map_err(fail("ledger"))? {
        let body: Option<String> = row.get(4);
        let op: String = row.get(3);
        let key: String = row.get(7);
        read.logged.insert(
            (row.get(0), row.get(1)),
            (
                Logged {
                    version: row.get(2),
                    deleted: op == "delete",
                    digest: digest_of_text(body.as_deref()),
                    mapping_version: row.get(5),
                    origin: Some(LogOrigin {
                        event_id: row.get(8),
                        topic: row.get(9),
                        partition: row.get(10),
                        offset: row.get(11),
                    }),
                },
                (row.get(6), key_text(&key)),
            ),
        );
    }
    Ok(read)
}

fn digest_of_text(body: Option<&str>) -> Option<Digest> {
    body.and_then(|b| serde_json::from_str(b).ok())
        .map(|json| Digest::of(&json))
}

/// An event's `primary_key` (`[{"column": …, "value": …}]`) as `col=value` pairs, the form
/// of [`RowKey`].
fn key_text(primary_key: &str) -> String {
    let columns: Vec<serde_json::Value> = serde_json::from_str(primary_key).unwrap_or_default();
    columns
        .iter()
        .map(|c| {
            format!(
                "{}={}",
                c["column"].as_str().unwrap_or_default(),
                c["value"].as_str().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}
