//! Reading the three sides of a pass: the source in one consistent snapshot, mapped; the
//! connector's and the projector's progress, waited for; the projection and its ledger.

use std::{
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap, HashSet},
    pin::Pin,
    time::{Duration, Instant},
};

use futures_util::TryStreamExt;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    Message,
};
use tokio::sync::mpsc;
use tokio_postgres::{binary_copy::BinaryCopyInWriter, types::Type};

use super::{Digest, LogOrigin, Logged, Projected, SourceSide};
use crate::{
    canonical::registry::EventCodec,
    change::{text_of, ChangeEvent, Position, SourceMessage, Value},
    config::{ConnectorConfig, SourceConfig},
    consumer::{config::ProjectorConfig, events::Prepared},
    dlq,
    error::{Error, Kind},
    kafka::TopicReader,
    mapping::{MapOutcome, Mapper},
    observe::progress::Progress,
    offsets::StateStore,
    pipeline::dead_letter::{self, LetterRow},
    source,
};

/// A resource: its type and id.
pub type ResourceKey = (String, String);

/// A row, as its table and key: `schema.table` and `col=value` pairs in column order.
pub type RowKey = (String, String);

/// A source row: its table (`schema.table`) and the condition that selects it by its key
/// (in the source's SQL, as a snapshot request takes it).
pub type SourceRow = (String, String);

/// What the source makes of its rows now. The resources themselves are staged in the
/// projection database's session (see [`source`]); what stays in memory is drift only.
#[derive(Debug, Default)]
pub struct SourceRead {
    /// Every change before it is in the snapshot: a version at or after it is judged by
    /// the next pass.
    pub low: Option<Position>,
    /// No change after it is in the snapshot: the connector must have captured up to it.
    pub high: Option<Position>,
    pub read: u64,
    /// Rows a mapping cannot map: their table and key, and the mapping.
    pub unmappable: HashMap<RowKey, String>,
    /// The connector's outstanding dead letters, and what the read found of their rows.
    pub letters: Letters,
}

/// The connector's outstanding dead letters, on their way to meet their rows in the read.
#[derive(Debug, Default)]
pub struct Letters {
    /// Each letter's id and row, and what the read found of the row.
    letters: Vec<(String, LetterRow, Option<Seen>)>,
    /// Per table, per set of key columns: the key's values (as text) → the letters.
    by_row: HashMap<String, Vec<KeyedLetters>>,
    /// Letters whose row cannot be told (a protected key, a malformed record): id and why.
    pub untold: Vec<(String, String)>,
}

/// Letters of one table by the values of one set of key columns: the columns, and the
/// values (as text, in the columns' order) → the letters' places.
type KeyedLetters = (Vec<String>, HashMap<Vec<String>, Vec<usize>>);

/// What the read found of a letter's row.
#[derive(Debug)]
enum Seen {
    /// The letter's mapping fails it still.
    Fails,
    /// The letter's mapping maps it now: the resource it makes (none when the mapping's
    /// conditions leave the row out now).
    Maps(Option<(ResourceKey, SourceSide)>),
}

/// An outstanding dead letter whose row has changed at the source since: it maps now, or
/// is gone.
#[derive(Debug, Clone, PartialEq)]
pub struct OutdatedLetter {
    pub id: String,
    /// `schema.table`.
    pub table: String,
    /// `None`: the row is gone at the source; else the resource it makes now, if any.
    pub now: Option<Option<(ResourceKey, SourceSide)>>,
}

impl Letters {
    /// The outstanding (never replayed or settled) dead letters of `config`'s connector,
    /// of `tables` only.
    pub async fn outstanding(
        config: &ConnectorConfig,
        tables: &[(String, String)],
    ) -> Result<Self, Error> {
        let letters = dlq::read_all(&config.kafka, &config.topics.prefix)
            .await
            .map_err(Error::while_("reading the dead letters"))?;
        let tables: HashSet<String> = tables.iter().map(|(s, t)| format!("{s}.{t}")).collect();
        let mut pending = Self::default();
        for letter in letters {
            if letter.side() != config.name || letter.replayed.is_some() {
                continue;
            }
            match dead_letter::row_of(&letter.record) {
                Ok(row) if tables.contains(&row.table) => pending.add(letter.id, row),
                Ok(_) => {}
                Err(why) => pending.untold.push((letter.id, why)),
            }
        }
        Ok(pending)
    }

    fn add(&mut self, id: String, row: LetterRow) {
        let (columns, values): (Vec<String>, Vec<String>) = row.key.iter().cloned().unzip();
        let at = self.letters.len();
        let sets = self.by_row.entry(row.table.clone()).or_default();
        match sets.iter_mut().find(|(c, _)| *c == columns) {
            Some((_, rows)) => rows.entry(values).or_default().push(at),
            None => sets.push((columns, HashMap::from([(values, vec![at])]))),
        }
        self.letters.push((id, row, None));
    }

    /// The row `change` read (of `table`), mapped into `outcome`: what it means for the
    /// letters of that row.
    fn meet(&mut self, table: &str, change: &ChangeEvent, outcome: &MapOutcome) {
        let Some(sets) = self.by_row.get(table) else {
            return;
        };
        for (columns, rows) in sets {
            let values: Vec<String> = columns
                .iter()
                .map(|column| {
                    change
                        .after
                        .as_ref()
                        .and_then(|row| row.get(column))
                        .map_or_else(String::new, |v| text_of(v).into_owned())
                })
                .collect();
            for &at in rows.get(&values).into_iter().flatten() {
                let (_, row, seen) = &mut self.letters[at];
                let mapping = row.mapping_id.as_str();
                *seen = Some(
                    if outcome.failures.iter().any(|f| f.mapping_id == mapping) {
                        Seen::Fails
                    } else {
                        Seen::Maps(
                            outcome
                                .events
                                .iter()
                                .filter(|e| &*e.provenance.mapping_id == mapping)
                                .find_map(|e| {
                                    let resource = e.resource.as_ref()?;
                                    Some((
                                        (e.resource_type.clone(), e.resource_id.clone()),
                                        SourceSide::Resource {
                                            digest: Digest::of(&resource.to_json()),
                                            mapping_version: e
                                                .provenance
                                                .mapping_version
                                                .to_string(),
                                        },
                                    ))
                                }),
                        )
                    },
                );
            }
        }
    }

    /// The letters whose row maps now or is gone, of those written of a change before
    /// `read_at` (a [`Position::sort_key`]); a later one is judged by the next pass.
    pub fn outdated(&self, read_at: &str) -> Vec<OutdatedLetter> {
        self.letters
            .iter()
            .filter(|(_, row, _)| row.position.sort_key().as_str() < read_at)
            .filter_map(|(id, row, seen)| {
                let now = match seen {
                    Some(Seen::Fails) => return None,
                    Some(Seen::Maps(resource)) => Some(resource.clone()),
                    None => None,
                };
                Some(OutdatedLetter {
                    id: id.clone(),
                    table: row.table.clone(),
                    now,
                })
            })
            .collect()
    }
}

/// The staging table: a temporary table of the pass's session in the projection database,
/// one line per resource a source row makes (the last of a resource two rows make wins,
/// as it would in the log), with the row it is made of.
const STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS reconcile_source (
      ord bigint NOT NULL, resource_type text COLLATE \"C\" NOT NULL,
      resource_id text COLLATE \"C\" NOT NULL, digest bytea NOT NULL,
      mapping_version text NOT NULL, source_table text NOT NULL, key_condition text NOT NULL);
    TRUNCATE reconcile_source;";

/// The source's resources on their way into the staging table.
struct Staging<'a> {
    source: &'a SourceConfig,
    writer: Pin<Box<BinaryCopyInWriter>>,
    read: SourceRead,
}

impl Staging<'_> {
    async fn take(&mut self, mapper: &Mapper, change: &ChangeEvent) -> Result<(), Error> {
        let fail = Error::while_::<tokio_postgres::Error>("staging the source's resources");
        self.read.read += 1;
        let outcome = mapper.map(change);
        let table = change.source.qualified_name();
        self.read.letters.meet(&table, change, &outcome);
        let row = change.after.as_ref();
        let key: Vec<(String, Value)> = change
            .key
            .iter()
            .map(|column| {
                let value = row.and_then(|r| r.get(column)).cloned();
                (column.to_string(), value.unwrap_or(Value::Null))
            })
            .collect();
        let condition = source::key_condition(self.source, &key);
        for event in outcome.events {
            let Some(resource) = &event.resource else {
                continue;
            };
            let digest = Digest::of(&resource.to_json());
            self.writer
                .as_mut()
                .write(&[
                    &i64::try_from(self.read.read).unwrap_or(i64::MAX),
                    &event.resource_type,
                    &event.resource_id,
                    &&digest.0[..],
                    &event.provenance.mapping_version.to_string(),
                    &table,
                    &condition,
                ])
                .await
                .map_err(fail)?;
        }
        if let Some(failure) = outcome.failures.first() {
            let key = key
                .iter()
                .map(|(column, value)| format!("{column}={}", text_of(value)))
                .collect::<Vec<_>>()
                .join(",");
            self.read
                .unmappable
                .insert((table, key), failure.mapping_id.clone());
        }
        Ok(())
    }
}

/// Read every row of `tables` in one consistent snapshot and map it, staging each
/// resource's digest in `client`'s session (the projection database's; it lives as long as
/// that connection), so that memory stays bounded whatever the tables' size: the three
/// sides are then joined by the database ([`sides`]), which sorts on disk what does not
/// fit its `work_mem`.
pub async fn source(
    config: &ConnectorConfig,
    mapper: &Mapper,
    tables: &[(String, String)],
    letters: Letters,
    client: &tokio_postgres::Client,
) -> Result<SourceRead, Error> {
    let fail = Error::while_::<tokio_postgres::Error>("staging the source's resources");
    client.batch_execute(STAGE).await.map_err(fail)?;
    let sink = client
        .copy_in("COPY reconcile_source (ord, resource_type, resource_id, digest, mapping_version, source_table, key_condition) FROM STDIN BINARY")
        .await
        .map_err(fail)?;
    let types = [
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::BYTEA,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
    ];
    let mut staging = Staging {
        source: &config.source,
        writer: Box::pin(BinaryCopyInWriter::new(sink, &types)),
        read: SourceRead {
            letters,
            ..SourceRead::default()
        },
    };
    // A bar per table on a terminal (rows read; no total: the read is one snapshot).
    let progress = Progress::new("reconcile");
    let (out, mut rows) = mpsc::channel(256);
    let reading = async {
        let read = source::read_consistent(config, tables, &out)
            .await
            .map_err(Error::bare);
        drop(out);
        read
    };
    let mapping = async {
        let mut current = String::new();
        while let Some(message) = rows.recv().await {
            let SourceMessage::Change(change) = message else {
                continue;
            };
            let table = change.source.qualified_name();
            if table != current {
                if !current.is_empty() {
                    progress.finish();
                }
                progress.start(&table, None, 0);
                current = table;
            }
            progress.advance(1);
            staging.take(mapper, &change).await?;
        }
        if !current.is_empty() {
            progress.finish();
        }
        Ok::<_, Error>(())
    };
    let (window, mapped) = tokio::join!(reading, mapping);
    mapped?;
    let (low, high) = window?;
    staging.writer.as_mut().finish().await.map_err(fail)?;
    client
        .batch_execute("ANALYZE reconcile_source")
        .await
        .map_err(fail)?;
    let mut read = staging.read;
    read.low = Some(low);
    read.high = Some(high);
    Ok(read)
}

/// The connector's stored position as a [`Position`] of its kind.
async fn stored_position(
    store: &StateStore,
    config: &ConnectorConfig,
) -> Result<Option<Position>, Error> {
    let Some(text) = store
        .load()
        .await
        .map_err(Error::bare)?
        .and_then(|s| s.position)
    else {
        return Ok(None);
    };
    Ok(source::stored_position(config, &text))
}

/// Wait (up to `bound`) until the connector's stored position has reached `at`: every
/// change the source read saw is then in Kafka. `Err` says how far behind it stayed.
pub async fn connector_caught_up(
    config: &ConnectorConfig,
    at: &Position,
    bound: Duration,
) -> Result<Duration, Error> {
    let store = StateStore::of(config).await.map_err(Error::bare)?;
    let started = Instant::now();
    let target = at.sort_key();
    loop {
        let stored = stored_position(&store, config).await?;
        if stored.as_ref().is_some_and(|p| p.sort_key() >= target) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= bound {
            return Err(Error::new(Kind::Transient, format!(
                "connector {} has not captured up to the source read ({}) within {} s: its stored position is {}; is it running?",
                config.name,
                at.text(),
                bound.as_secs(),
                stored.map_or("none".into(), |p| p.text())
            )));
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
) -> Result<Duration, Error> {
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
            .map_err(Error::while_("reading the projection's offsets"))?
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
            return Err(Error::new(Kind::Transient, format!(
                "projector {} has not applied what Kafka holds within {} s: {}; is it running, and does it read these topics?",
                projector.name,
                bound.as_secs(),
                behind.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The end offset of every partition of `topics` (those that exist).
fn high_watermarks(
    projector: &ProjectorConfig,
    topics: &[String],
) -> Result<BTreeMap<(String, i32), i64>, Error> {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let consumer: BaseConsumer =
        projector
            .kafka
            .client_config()
            .create()
            .map_err(|e| crate::kafka::Error::Create {
                role: "consumer",
                reason: crate::kafka::admin::creation_message(&e),
            })?;
    let metadata = consumer
        .fetch_metadata(None, TIMEOUT)
        .map_err(Error::while_("cannot read the cluster's topics"))?;
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
                    Error::of(
                        format!(
                            "cannot read the offsets of {}[{}]",
                            topic.name(),
                            partition.id()
                        ),
                        e,
                    )
                })?;
            if high > 0 {
                ends.insert((topic.name().to_owned(), partition.id()), high);
            }
        }
    }
    Ok(ends)
}

/// Where a pass took the log side from: the projection's ledger, and Kafka for the
/// partitions the ledger does not cover.
#[derive(Debug, Default)]
pub struct LogRead {
    /// The partitions read from Kafka: `topic[partition]`, and why.
    pub from_topics: Vec<(String, String)>,
    /// Events read from Kafka.
    pub events: u64,
    /// Messages read from Kafka that could not be decoded, left out of the log side (the
    /// projector's dead letters hold them too): where, and why.
    pub undecodable: Vec<String>,
}

/// The log's events read from Kafka: a temporary table of the pass's session, with the
/// columns of the ledger that [`sides`] reads.
const LOG_STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS reconcile_log (
      event_id text NOT NULL, resource_type text COLLATE \"C\" NOT NULL,
      resource_id text COLLATE \"C\" NOT NULL, version text COLLATE \"C\" NOT NULL,
      op text NOT NULL, body text, mapping_version text NOT NULL, connector text NOT NULL,
      source_schema text NOT NULL, source_table text NOT NULL, primary_key text NOT NULL,
      topic text NOT NULL, kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL);
    TRUNCATE reconcile_log;";

/// Complete the log side where the projection's ledger does not cover it. The ledger of a
/// partition of `topics` covers it when its first event of it is at or before Kafka's first
/// offset: the projector applies a partition in order, so it has then recorded every event
/// Kafka holds (an event it found stale or a duplicate is superseded by one it recorded).
/// A partition whose ledger begins later — the projector started from the end, or its
/// ledger was pruned — is read from Kafka, start to end, into `reconcile_log` of `client`'s
/// session, which [`sides`] reads alongside the ledger.
pub async fn log(
    projector: &ProjectorConfig,
    client: &tokio_postgres::Client,
    topics: &[String],
) -> Result<LogRead, Error> {
    let fail = Error::while_::<tokio_postgres::Error>("staging the log read from Kafka");
    client.batch_execute(LOG_STAGE).await.map_err(fail)?;
    let firsts: HashMap<(String, i32), i64> = client
        .query(
            &format!(
                "SELECT topic, kafka_partition, min(kafka_offset) FROM {}.history
                  WHERE topic = ANY($1) GROUP BY topic, kafka_partition",
                projector.projection.schema
            ),
            &[&topics],
        )
        .await
        .map_err(Error::while_(
            "reading where the projection's ledger begins",
        ))?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let (uncovered, total) = (RefCell::new(Vec::new()), Cell::new(0));
    let mut reader = TopicReader::open(
        &projector.kafka,
        |topic| topics.iter().any(|t| t == topic),
        |_, topic, partition, low, high| {
            let why = match firsts.get(&(topic.to_owned(), partition)) {
                _ if high <= low => return Ok(high),
                Some(first) if *first <= low => return Ok(high),
                Some(first) => format!("the ledger begins at offset {first}, Kafka at {low}"),
                None => format!(
                    "the ledger holds none of the {} event(s) Kafka holds",
                    high - low
                ),
            };
            total.set(total.get() + u64::try_from(high - low).unwrap_or_default());
            uncovered
                .borrow_mut()
                .push((format!("{topic}[{partition}]"), why));
            Ok(low)
        },
    )?;
    let mut read = LogRead {
        from_topics: uncovered.into_inner(),
        ..LogRead::default()
    };
    if read.from_topics.is_empty() {
        return Ok(read);
    }
    let codec = EventCodec::new(&projector.schema_registry).map_err(Error::bare)?;
    let sink = client
        .copy_in("COPY reconcile_log FROM STDIN BINARY")
        .await
        .map_err(fail)?;
    let mut types = vec![Type::TEXT; 12];
    types.extend([Type::INT4, Type::INT8]);
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    let progress = Progress::new("reconcile");
    progress.start("the log, from Kafka", Some(total.get()), 0);
    while !reader.at_end() {
        let Some(message) = reader.next().await? else {
            continue;
        };
        progress.advance(1);
        let place = format!(
            "{}[{}]@{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        let decoded = match message.payload() {
            None => Err("an empty message (a tombstone?)".to_owned()),
            Some(bytes) => match codec.decode_json(bytes).await {
                Err(e) if e.is_transient() => return Err(Error::of("the schema registry", e)),
                Err(e) => Err(e.to_string()),
                Ok((event, resource)) => Prepared::checked(event, resource),
            },
        };
        let prepared = match decoded {
            Ok(prepared) => prepared,
            Err(why) => {
                read.undecodable.push(format!("{place}: {why}"));
                continue;
            }
        };
        let (event, provenance) = (prepared.event(), &prepared.event().provenance);
        writer
            .as_mut()
            .write(&[
                &event.event_id,
                &event.resource_type,
                &event.resource_id,
                &event.resource_version,
                &event.op.name(),
                &prepared.body(),
                &&*provenance.mapping_version,
                &&*provenance.connector,
                &&*provenance.schema,
                &&*provenance.table,
                &prepared.primary_key(),
                &message.topic(),
                &message.partition(),
                &message.offset(),
            ])
            .await
            .map_err(fail)?;
        read.events += 1;
    }
    progress.finish();
    writer.finish().await.map_err(fail)?;
    client
        .batch_execute("ANALYZE reconcile_log")
        .await
        .map_err(fail)?;
    Ok(read)
}

/// One resource's three sides as the projection database joined them.
#[derive(Debug)]
pub struct Sides {
    pub key: ResourceKey,
    /// What the source makes of it now, and the row it is made of.
    pub source: Option<(SourceSide, SourceRow)>,
    /// The log's latest event of it, and the row (table and key) it was made of.
    pub logged: Option<(Logged, RowKey)>,
    pub projected: Option<Projected>,
}

/// Every resource any side has, streamed: the staged source ([`source`]) joined with the
/// latest event per resource of the log (the projection's ledger, with what [`log`] read
/// from Kafka) and the projection's `resources` rows, of
/// `connector`'s resources (of `tables` only, when given). The database does the join (on
/// disk what does not fit its memory), so the pass holds one resource at a time.
pub async fn sides(
    client: &tokio_postgres::Client,
    schema: &str,
    connector: &str,
    tables: Option<&[String]>,
) -> Result<impl futures_util::Stream<Item = Result<Sides, Error>>, Error> {
    let fail = Error::while_::<tokio_postgres::Error>("reading the projection and its ledger");
    let only: Vec<String> = tables.map(<[String]>::to_vec).unwrap_or_default();
    let filter = "connector = $1 AND (cardinality($2::text[]) = 0 OR source_schema || '.' || source_table = ANY($2))";
    let rows = client
        .query_raw(
            &format!(
                "WITH src AS (
                   SELECT DISTINCT ON (resource_type, resource_id) resource_type, resource_id,
                          digest, mapping_version, source_table, key_condition
                     FROM reconcile_source ORDER BY resource_type, resource_id, ord DESC),
                 logged AS (
                   SELECT DISTINCT ON (resource_type, resource_id) resource_type, resource_id,
                          version, op, body, mapping_version,
                          source_schema || '.' || source_table AS source_table, primary_key,
                          event_id, topic, kafka_partition, kafka_offset
                     FROM (SELECT resource_type, resource_id, version, op, body::text AS body,
                                  mapping_version, connector, source_schema, source_table,
                                  primary_key::text AS primary_key, event_id::text AS event_id,
                                  topic, kafka_partition, kafka_offset
                             FROM {schema}.history
                           UNION ALL
                           SELECT resource_type, resource_id, version, op, body, mapping_version,
                                  connector, source_schema, source_table, primary_key, event_id,
                                  topic, kafka_partition, kafka_offset
                             FROM reconcile_log) events
                    WHERE {filter}
                    ORDER BY resource_type, resource_id, version DESC),
                 projected AS (
                   SELECT resource_type, resource_id, version, deleted, body::text AS body
                     FROM {schema}.resources WHERE {filter})
                 SELECT coalesce(s.resource_type, l.resource_type, p.resource_type),
                        coalesce(s.resource_id, l.resource_id, p.resource_id),
                        s.digest, s.mapping_version, s.source_table, s.key_condition,
                        l.version, l.op, l.body, l.mapping_version, l.source_table,
                        l.primary_key, l.event_id, l.topic, l.kafka_partition, l.kafka_offset,
                        p.version, p.deleted, p.body
                   FROM src s
                   FULL JOIN logged l
                     ON l.resource_type = s.resource_type AND l.resource_id = s.resource_id
                   FULL JOIN projected p
                     ON p.resource_type = coalesce(s.resource_type, l.resource_type)
                    AND p.resource_id = coalesce(s.resource_id, l.resource_id)"
            ),
            [
                &connector as &(dyn tokio_postgres::types::ToSql + Sync),
                &only,
            ],
        )
        .await
        .map_err(fail)?;
    Ok(rows.map_err(fail).map_ok(|row| {
        let text = |at: usize| -> Option<String> { row.get(at) };
        let source = row.get::<_, Option<Vec<u8>>>(2).map(|digest| {
            let mut bytes = [0; 16];
            bytes.copy_from_slice(&digest[..16.min(digest.len())]);
            (
                SourceSide::Resource {
                    digest: Digest(bytes),
                    mapping_version: row.get(3),
                },
                (row.get(4), row.get(5)),
            )
        });
        let logged = text(6).map(|version| {
            let op: String = row.get(7);
            let key: String = row.get(11);
            (
                Logged {
                    version,
                    deleted: op == "delete",
                    digest: digest_of_text(text(8).as_deref()),
                    mapping_version: row.get(9),
                    origin: Some(LogOrigin {
                        event_id: row.get(12),
                        topic: row.get(13),
                        partition: row.get(14),
                        offset: row.get(15),
                    }),
                },
                (row.get(10), key_text(&key)),
            )
        });
        let projected = text(16).map(|version| Projected {
            version,
            deleted: row.get(17),
            digest: digest_of_text(text(18).as_deref()),
        });
        Sides {
            key: (row.get(0), row.get(1)),
            source,
            logged,
            projected,
        }
    }))
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
