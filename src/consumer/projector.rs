//! `fhir-cdc project`: a Kafka consumer group over the canonical topics, applying each
//! event to the read model exactly once.
//!
//! Events are read in batches (at most `max_batch`, or what arrived within `max_batch_ms`)
//! and decoded through the registry, with whatever schema version wrote them — on a task of
//! its own, one batch ahead of the database, so that reading and applying overlap. Each batch
//! is one database transaction: the rows, the history (the ledger of applied event ids)
//! and the consumed offsets commit together, so a crash at any point leaves either all of
//! a batch or none of it. (With `connections` above 1, a big batch is split over that many
//! transactions, the offsets committed last with the first: see `apply_batch`.) The
//! Kafka group offsets follow: committed after each batch, and
//! at start set to the database's (a partition it has none for from its beginning), so that
//! the group starts where the projection is. They may lag the database (a crash between the
//! two commits, a partition moving to another process); on every assignment the projector
//! reads the database's offsets and skips what is below them, and the ledger turns any
//! other repeat into a counted duplicate. Nothing is skipped that the database lacks.
//!
//! A message that cannot be applied — undecodable bytes, an unknown schema id, an event
//! whose body contradicts its envelope, a row the database refuses — goes to
//! `<prefix>.dlq.projector` with the reason, its coordinates, headers and original bytes,
//! before the batch commits; the rest of the batch is applied.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine;
use chrono::{DateTime, Utc};
use rdkafka::{
    consumer::{CommitMode, Consumer, StreamConsumer},
    Offset, TopicPartitionList,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use super::runtime::ProjectError;
use super::{
    config::ProjectorConfig,
    projection::{self, Entry, Prepared, Statements, TopicCounts},
    runtime::{lock, read_batches, Assignments, BatchLimits, Fetched, Read},
};
use crate::{
    canonical::registry::EventCodec,
    kafka::{ensure_topics, Producer, TopicSpec},
    observe::{self, progress::Progress, projector::Metrics},
    postgres,
};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// The group session's timeout unless `[kafka]` says otherwise (librdkafka's is 45 s).
const SESSION_TIMEOUT_MS: &str = "10000";
/// How long without partitions before the projector says what it waits for.
const ASSIGNMENT_PATIENCE: Duration = Duration::from_secs(3);

/// What a projector run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProjectSummary {
    pub applied: u64,
    pub duplicate: u64,
    pub stale: u64,
    pub dead_lettered: u64,
    pub batches: u64,
}

/// Project until `shutdown` is cancelled — or, with `until_caught_up`, until every assigned
/// partition has been applied up to its end.
pub async fn run(
    config: &ProjectorConfig,
    shutdown: CancellationToken,
    until_caught_up: bool,
) -> Result<ProjectSummary, ProjectError> {
    project(config, shutdown, until_caught_up, None).await
}

/// What a replay reads again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub from: ReplayFrom,
    /// These topics instead of the configuration's.
    pub topics: Vec<String>,
}

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The first retained message of every partition.
    Earliest,
    /// The first message of every partition written at or after this time.
    Time(DateTime<Utc>),
    /// These partitions from these offsets (clamped to what Kafka still holds); the other
    /// partitions are not replayed.
    Offsets(BTreeMap<(String, i32), i64>),
}

/// Project the topics again as `replay` says into the same read model, until caught up.
/// The ledger makes it harmless: what is already applied counts as duplicate and changes
/// nothing, what is missing is applied. It runs as a group of its own
/// (`<group>.replay`), so the projectors of the live group are not moved.
pub async fn replay(
    config: &ProjectorConfig,
    shutdown: CancellationToken,
    replay: &Replay,
) -> Result<ProjectSummary, ProjectError> {
    project(config, shutdown, true, Some(replay)).await
}

async fn project(
    config: &ProjectorConfig,
    shutdown: CancellationToken,
    until_caught_up: bool,
    replay: Option<&Replay>,
) -> Result<ProjectSummary, ProjectError> {
    let replay_from = replay.map(|r| &r.from);
    let schema = &config.projection.schema;
    let group = match replay {
        None => config.group_id().to_owned(),
        Some(_) => format!("{}.replay", config.group_id()),
    };
    // A replay may run beside the live projector, on its port: only the latter serves.
    let metrics = config.metrics.as_ref().filter(|_| replay_from.is_none());
    if let Some(metrics) = metrics {
        observe::serve(metrics.listen).map_err(ProjectError::Setup)?;
        info!(listen = %metrics.listen, "serving metrics");
    }
    let mut db = postgres::connect(&config.projection.url).await?;
    projection::migrate(&mut db, schema).await?;
    let mut writers = vec![Writer::new(db, schema).await?];
    for _ in 1..config.projection.connections {
        let client = postgres::connect(&config.projection.url).await?;
        writers.push(Writer::new(client, schema).await?);
    }
    let db = &writers[0].client;
    if replay_from.is_some() {
        // A replay starts where it is told, not where an earlier replay stopped.
        projection::forget_offsets(db, schema, &group).await?;
    }

    let mut kafka = config.kafka.client_config();
    kafka
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    // A member killed without leaving keeps its partitions until its session times out,
    // and a restarted projector waits that long for them: librdkafka's 45 s became more
    // than 80 s before a restart after kill -9 applied anything. 10 s, unless configured.
    let session_timeout = config
        .kafka
        .get("session.timeout.ms")
        .unwrap_or(SESSION_TIMEOUT_MS)
        .to_owned();
    kafka.set("session.timeout.ms", &session_timeout);
    if metrics.is_some() && config.kafka.get("statistics.interval.ms").is_none() {
        // The consumer lag per partition comes with the statistics.
        kafka.set("statistics.interval.ms", "5000");
    }
    let context = Assignments {
        projector: config.name.clone(),
        ..Assignments::default()
    };
    let consumer: StreamConsumer<Assignments> =
        kafka.create_with_context(context).map_err(|e| {
            ProjectError::Kafka(format!(
                "cannot create a consumer: {}",
                crate::kafka::admin::creation_message(&e)
            ))
        })?;
    let topics = topics_to_read(&consumer, config, replay.map_or(&[], |r| &r.topics))?;
    let (partitions, remaining) =
        start_where_the_projection_is(&consumer, db, schema, &group, &topics, replay_from).await?;
    let ends = if until_caught_up {
        ends_now(&consumer, &partitions)?
    } else {
        Vec::new()
    };
    let progress = replay_from.map(|_| {
        let progress = Progress::new("replay");
        progress.start("messages", Some(remaining), 0);
        progress
    });
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|e| ProjectError::Kafka(format!("cannot subscribe: {e}")))?;
    info!(group = %group, topics = topics.len(), schema = %schema, "projecting");

    let dead_letter_topic = config.dead_letter_topic();
    ensure_topics(
        &config.kafka,
        &[TopicSpec {
            name: dead_letter_topic.clone(),
            partitions: 1,
            replication_factor: 1,
            config: Vec::new(),
        }],
    )
    .await
    .map_err(|e| ProjectError::Kafka(e.to_string()))?;
    let producer = Producer::new(&config.kafka).map_err(|e| ProjectError::Kafka(e.to_string()))?;
    let codec =
        EventCodec::new(&config.schema_registry).map_err(|e| ProjectError::Setup(e.to_string()))?;

    let mut summary = ProjectSummary::default();
    let mut measured = Metrics::new(&config.name);
    // Per partition: the next offset to apply (below it, everything is in the database).
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    // Kafka is read (and events decoded) on a task of its own, one batch ahead, while the
    // database applies the batch before: the two overlap instead of taking turns.
    let consumer = Arc::new(consumer);
    let (batches, mut fetched) = mpsc::channel(1);
    let reader = tokio::spawn(read_batches(
        consumer.clone(),
        codec,
        BatchLimits {
            events: config.projection.max_batch,
            wait: Duration::from_millis(config.projection.max_batch_ms),
            idle: Duration::from_millis(config.projection.max_batch_ms.max(200)),
        },
        shutdown.clone(),
        batches,
    ));
    let (subscribed, mut said_waiting) = (Instant::now(), false);
    loop {
        let item = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            item = fetched.recv() => item,
        };
        // The reader stops only when told to, or after sending its error: anything else is
        // a failure, not the end of the work.
        let Some(item) = item else {
            let why = match reader.await {
                Err(e) => e.to_string(),
                Ok(()) => "it stopped".to_owned(),
            };
            return Err(ProjectError::Kafka(format!(
                "the Kafka reader failed: {why}"
            )));
        };
        learn_assignments(&consumer, &writers[0].client, schema, &group, &mut next).await?;
        if next.is_empty() && !said_waiting && subscribed.elapsed() >= ASSIGNMENT_PATIENCE {
            said_waiting = true;
            info!(
                group = %group,
                session_timeout_ms = %session_timeout,
                "no partitions assigned yet: the group is rebalancing, and a member that stopped without leaving (killed) keeps its partitions until its session times out"
            );
        }
        let Fetched::Batch(mut batch) = item? else {
            if until_caught_up && caught_up(&writers[0].client, schema, &group, &ends).await? {
                break;
            }
            continue;
        };
        if let Some(progress) = &progress {
            progress.advance(batch.len() as u64);
        }
        // Already in the database, or read before its partition moved to another member.
        batch.retain(|r| {
            next.get(&(r.at.topic.clone(), r.at.partition))
                .is_some_and(|from| r.at.offset >= *from)
        });
        if batch.is_empty() {
            continue;
        }
        apply_batch(
            &mut writers,
            config,
            &group,
            &producer,
            &dead_letter_topic,
            batch,
            &mut next,
            (&mut summary, &mut measured),
        )
        .await?;
        lock(&consumer.context().floor).extend(next.iter().map(|(p, o)| (p.clone(), *o)));
        // For visibility (lag in Kafka's tools) and as the start point of a new member.
        let mut commit = TopicPartitionList::new();
        for ((topic, partition), offset) in &next {
            let _ = commit.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        if let Err(e) = consumer.commit(&commit, CommitMode::Async) {
            debug!(error = %e, "committing group offsets to Kafka failed (the database has them)");
        }
        if until_caught_up && caught_up(&writers[0].client, schema, &group, &ends).await? {
            break;
        }
    }
    reader.abort();
    if let Some(progress) = progress {
        progress.finish();
    }
    Ok(summary)
}

/// The topics to subscribe to: `only` (a replay's choice, each of which must exist), else
/// `topics.include`, else every event topic under the prefix.
fn topics_to_read(
    consumer: &StreamConsumer<Assignments>,
    config: &ProjectorConfig,
    only: &[String],
) -> Result<Vec<String>, ProjectError> {
    let metadata = consumer
        .fetch_metadata(None, METADATA_TIMEOUT)
        .map_err(|e| ProjectError::Kafka(format!("cannot read the cluster's topics: {e}")))?;
    if let Some(missing) = only
        .iter()
        .find(|t| !metadata.topics().iter().any(|m| m.name() == t.as_str()))
    {
        return Err(ProjectError::Setup(format!(
            "topic `{missing}` does not exist"
        )));
    }
    if !only.is_empty() {
        return Ok(only.to_vec());
    }
    if !config.topics.include.is_empty() {
        return Ok(config.topics.include.clone());
    }
    let topics: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|name| crate::canonical::is_event_topic(&config.topics.prefix, name))
        .map(str::to_owned)
        .collect();
    if topics.is_empty() {
        return Err(ProjectError::Setup(format!(
            "no event topics under the prefix `{}`: start a connector first, or name topics in [topics] include",
            config.topics.prefix
        )));
    }
    Ok(topics)
}

/// Set the group's Kafka offsets to the projection's before joining: the database's offset
/// per partition, the partition's beginning where it has none (a new or emptied
/// projection). Refused while other members of the group are active; they keep the group's
/// offsets in step themselves. Returns the partitions, and how many messages lie ahead in
/// those the database had no offsets for (all of them for a replay).
async fn start_where_the_projection_is(
    consumer: &StreamConsumer<Assignments>,
    db: &tokio_postgres::Client,
    schema: &str,
    group: &str,
    topics: &[String],
    replay_from: Option<&ReplayFrom>,
) -> Result<(Vec<(String, i32)>, u64), ProjectError> {
    let mut partitions = Vec::new();
    let mut remaining = 0;
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map_err(|e| ProjectError::Kafka(format!("cannot read topic {topic}: {e}")))?;
        for t in metadata.topics() {
            partitions.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
        }
    }
    if let Some(ReplayFrom::Offsets(offsets)) = replay_from {
        if let Some((topic, partition)) = offsets.keys().find(|p| !partitions.contains(p)) {
            return Err(ProjectError::Setup(format!(
                "{topic}:{partition} is not a partition of the topics replayed"
            )));
        }
    }
    let stored = projection::stored_offsets(db, schema, group, &partitions).await?;
    let mut start = TopicPartitionList::new();
    for (topic, partition) in &partitions {
        let offset = match stored.get(&(topic.clone(), *partition)) {
            Some(offset) => *offset,
            None => {
                let (low, high) = consumer
                    .fetch_watermarks(topic, *partition, METADATA_TIMEOUT)
                    .map_err(|e| ProjectError::Kafka(e.to_string()))?;
                let start = match replay_from {
                    Some(ReplayFrom::Time(since)) => {
                        crate::kafka::reader::offset_at(consumer, topic, *partition, *since)
                            .map_err(ProjectError::Kafka)?
                            .unwrap_or(high)
                    }
                    Some(ReplayFrom::Offsets(offsets)) => {
                        match offsets.get(&(topic.clone(), *partition)) {
                            Some(&from) if from < low => {
                                warn!(topic = %topic, partition, from, low, "Kafka no longer holds the offsets asked for: replaying from the first it holds");
                                low
                            }
                            Some(&from) => from.min(high),
                            None => high,
                        }
                    }
                    Some(ReplayFrom::Earliest) | None => low,
                };
                remaining += u64::try_from(high - start).unwrap_or(0);
                start
            }
        };
        start
            .add_partition_offset(topic, *partition, Offset::Offset(offset))
            .map_err(|e| ProjectError::Kafka(e.to_string()))?;
        lock(&consumer.context().floor).insert((topic.clone(), *partition), offset);
        if !stored.contains_key(&(topic.clone(), *partition)) {
            // Where this group starts is where it stands: nothing before it is its to apply.
            projection::store_offset(db, schema, group, topic, *partition, offset).await?;
        }
    }
    if let Err(e) = consumer.commit(&start, CommitMode::Sync) {
        info!(error = %e, "the group's offsets were left as they are (other members are active)");
    }
    Ok((partitions, remaining))
}

/// Forget revoked partitions (their offsets are their new owner's to commit); read the
/// database's offsets of newly assigned ones: below them, everything is applied.
async fn learn_assignments(
    consumer: &StreamConsumer<Assignments>,
    db: &tokio_postgres::Client,
    schema: &str,
    group: &str,
    next: &mut HashMap<(String, i32), i64>,
) -> Result<(), ProjectError> {
    let changes = std::mem::take(&mut *lock(&consumer.context().assigned));
    let mut assigned: Vec<(String, i32)> = Vec::new();
    for (partition, now_assigned) in changes {
        assigned.retain(|p| *p != partition);
        if now_assigned {
            assigned.push(partition);
        } else {
            next.remove(&partition);
        }
    }
    if assigned.is_empty() {
        return Ok(());
    }
    for partition in &assigned {
        next.insert(partition.clone(), 0);
    }
    next.extend(projection::stored_offsets(db, schema, group, &assigned).await?);
    info!(partitions = assigned.len(), "partitions assigned");
    Ok(())
}

/// A partition's first and end offsets at one moment.
struct Span {
    partition: (String, i32),
    low: i64,
    high: i64,
}

/// Where each partition ends now, and where it begins: what `--until-caught-up` waits for
/// (later writes are the next run's, or it would never end while a connector writes).
fn ends_now(
    consumer: &StreamConsumer<Assignments>,
    partitions: &[(String, i32)],
) -> Result<Vec<Span>, ProjectError> {
    partitions
        .iter()
        .map(|(topic, partition)| {
            let (low, high) = consumer
                .fetch_watermarks(topic, *partition, METADATA_TIMEOUT)
                .map_err(|e| ProjectError::Kafka(e.to_string()))?;
            Ok(Span {
                partition: (topic.clone(), *partition),
                low,
                high,
            })
        })
        .collect()
}

/// Whether the projection holds every partition up to `ends` — whichever member of the
/// group applied it (the database's offsets are the group's).
async fn caught_up(
    db: &tokio_postgres::Client,
    schema: &str,
    group: &str,
    ends: &[Span],
) -> Result<bool, ProjectError> {
    let partitions: Vec<(String, i32)> = ends.iter().map(|e| e.partition.clone()).collect();
    let stored = projection::stored_offsets(db, schema, group, &partitions).await?;
    Ok(ends.iter().all(|end| {
        stored
            .get(&end.partition)
            .copied()
            .unwrap_or(end.low)
            .max(end.low)
            >= end.high
    }))
}

/// Whether the database refused for a reason of its own that may pass: a serialization
/// failure or deadlock, a lock or statement timeout, a lack of resources, a lost connection.
fn transient(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_some_and(|code| {
            let code = code.code();
            matches!(code, "40001" | "40P01" | "55P03" | "57014")
                || code.starts_with("53")
                || code.starts_with("08")
        })
}

/// A connection batches are written on, with the statements prepared on it.
struct Writer {
    client: tokio_postgres::Client,
    statements: Statements,
}

impl Writer {
    async fn new(client: tokio_postgres::Client, schema: &str) -> Result<Self, ProjectError> {
        let statements = projection::prepare(&client, schema).await?;
        Ok(Writer { client, statements })
    }
}

/// Events per part, at least, before a batch is split over the writers.
const MIN_PART: usize = 50;

/// What cannot be applied: the message's index in its batch, the reason for the dead
/// letter, and the reason for the log (a database's message may quote a value, so the log
/// gets its SQLSTATE only).
type Refused = (usize, String, String);

/// Apply a batch and commit its offsets; dead-letter what cannot be applied.
///
/// A batch of at least twice [`MIN_PART`] events is split by resource over the writers (a
/// resource's events stay in one part, in order), each part applied in a transaction of its
/// own connection, all at once. The offsets go into the first writer's transaction, which
/// commits last: a crash before it leaves the offsets where they were, and the events of
/// parts that did commit are read again and recognized by the ledger as duplicates.
#[allow(clippy::too_many_arguments)]
async fn apply_batch(
    writers: &mut [Writer],
    config: &ProjectorConfig,
    group: &str,
    producer: &Producer,
    dead_letter_topic: &str,
    batch: Vec<Read>,
    next: &mut HashMap<(String, i32), i64>,
    (summary, measured): (&mut ProjectSummary, &mut Metrics),
) -> Result<(), ProjectError> {
    let schema = &config.projection.schema;
    let mut refused: Vec<Refused> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.event.as_ref().err().map(|e| (i, e.clone(), e.clone())))
        .collect();
    // Splitting pays only when there is much to write: the small batches of a quiet stream
    // stay on one connection (fewer round trips, less contention, lower latency).
    let split = writers.len().min(batch.len() / MIN_PART).max(1);
    let mut parts: Vec<Vec<(usize, Entry<'_>)>> = (0..split).map(|_| Vec::new()).collect();
    for (i, read) in batch.iter().enumerate() {
        if let Ok(event) = &read.event {
            parts[event.part(split)].push((
                i,
                Entry {
                    event,
                    at: &read.at,
                    kafka_timestamp: read.timestamp,
                },
            ));
        }
    }
    let applied = futures_util::future::try_join_all(
        writers
            .iter_mut()
            .zip(&parts)
            .map(|(writer, part)| apply_part(writer, part)),
    )
    .await?;
    let mut counts = TopicCounts::new();
    let mut transactions = Vec::with_capacity(applied.len());
    for (tx, part_counts, part_refused) in applied {
        for (topic, one) in part_counts {
            *counts.entry(topic).or_default() += one;
        }
        refused.extend(part_refused);
        transactions.push(tx);
    }
    let mut dead_lettered = 0;
    // Dead letters are in Kafka before the offsets that pass them are committed.
    for (i, reason, logged) in &refused {
        let read = &batch[*i];
        warn!(topic = %read.at.topic, partition = read.at.partition, offset = read.at.offset, reason = %logged,
            "a message went to the projector's dead-letter topic");
        let record = json!({
            "projector": config.name,
            "group": group,
            "reason": reason,
            "topic": read.at.topic,
            "partition": read.at.partition,
            "offset": read.at.offset,
            "timestamp": read.timestamp,
            "key": read.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "headers": read.headers.iter().cloned().collect::<HashMap<_, _>>(),
            "value_base64": base64::engine::general_purpose::STANDARD.encode(&read.payload),
        });
        let key = format!("{}:{}:{}", read.at.topic, read.at.partition, read.at.offset);
        producer
            .send(
                dead_letter_topic,
                &key,
                record.to_string().as_bytes(),
                &[("reason", reason)],
            )
            .await
            .map_err(|e| ProjectError::Kafka(e.to_string()))?;
        dead_lettered += 1;
        measured.topic(&read.at.topic).dead_lettered.increment(1);
    }
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for read in &batch {
        let end = ends
            .entry((read.at.topic.clone(), read.at.partition))
            .or_insert(0);
        *end = (*end).max(read.at.offset + 1);
    }
    let mut transactions = transactions.into_iter();
    let Some(first) = transactions.next() else {
        unreachable!("a projector has at least one writer");
    };
    for ((topic, partition), end) in &ends {
        projection::store_offset(&first, schema, group, topic, *partition, *end).await?;
    }
    for tx in transactions {
        tx.commit().await?;
    }
    first.commit().await?;
    next.extend(ends);
    for read in &batch {
        measured.topic(&read.at.topic).consumed.increment(1);
        if let Some(written) = read.timestamp.and_then(DateTime::from_timestamp_millis) {
            measured
                .apply_latency
                .record(observe::seconds_since(written));
        }
        if let Some(committed) = read.event.as_ref().ok().and_then(Prepared::commit_time) {
            measured
                .end_to_end
                .record(observe::seconds_since(committed));
        }
    }
    measured.batch_events.record(batch.len() as f64);
    for (topic, counts) in &counts {
        let topic = measured.topic(topic);
        topic.applied.increment(counts.applied);
        topic.duplicate.increment(counts.duplicate);
        topic.stale.increment(counts.stale);
    }
    let counts = projection::total(&counts);
    summary.applied += counts.applied;
    summary.duplicate += counts.duplicate;
    summary.stale += counts.stale;
    summary.dead_lettered += dead_lettered;
    summary.batches += 1;
    debug!(
        events = batch.len(),
        applied = counts.applied,
        "batch committed"
    );
    Ok(())
}

/// Apply `entries` in a transaction of `writer`, left open: in one statement, or, should the
/// database refuse it, event by event under savepoints, so that only what it refuses is
/// set aside. A refusal that says nothing about an event (a deadlock, a timeout, a server
/// short of resources, a lost connection) fails the batch instead.
async fn apply_part<'c>(
    writer: &'c mut Writer,
    entries: &[(usize, Entry<'_>)],
) -> Result<(Transaction<'c>, TopicCounts, Vec<Refused>), ProjectError> {
    let Writer { client, statements } = writer;
    let mut tx = client.transaction().await?;
    let mut counts = TopicCounts::new();
    let mut refused = Vec::new();
    if entries.is_empty() {
        return Ok((tx, counts, refused));
    }
    let all: Vec<Entry<'_>> = entries.iter().map(|(_, e)| *e).collect();
    // Under a savepoint, not a transaction of its own: the transaction must outlive a
    // refusal, to be tried again event by event.
    let whole = tx.savepoint("batch").await?;
    match projection::apply(&whole, &statements.batch, &all).await {
        Ok(applied) => {
            whole.commit().await?;
            return Ok((tx, applied, refused));
        }
        Err(e) => {
            debug!(sqlstate = ?e.code().map(|c| c.code()), "the batch was refused; applying it event by event");
            whole.rollback().await?;
        }
    }
    for (i, entry) in entries {
        let savepoint = tx.savepoint("event").await?;
        match projection::apply(&savepoint, &statements.one, &[*entry]).await {
            Ok(one) => {
                savepoint.commit().await?;
                for (topic, one) in one {
                    *counts.entry(topic).or_default() += one;
                }
            }
            Err(e) if transient(&e) => return Err(ProjectError::Database(e)),
            Err(e) => {
                savepoint.rollback().await?;
                let (message, code) = e.as_db_error().map_or_else(
                    || (e.to_string(), "unknown".to_owned()),
                    |db| (db.message().to_owned(), db.code().code().to_owned()),
                );
                refused.push((
                    *i,
                    format!("the database refused it: {message}"),
                    format!("the database refused it (SQLSTATE {code})"),
                ));
            }
        }
    }
    Ok((tx, counts, refused))
}
