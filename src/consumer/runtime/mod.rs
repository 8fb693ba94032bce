//! The consumer runtime: what every consumer of the canonical topics shares, whatever it
//! does with the events and wherever the results go.
//!
//! The runtime owns the Kafka side — group membership (static when `group.instance.id` is
//! set, rebalances), batches (at most `events`, or what arrived within `wait`) read and
//! decoded through the registry on a task of their own, one batch ahead, with whatever
//! schema wrote each event — the dead letters, the consumer lag and the metrics. Two seams
//! say the rest:
//!
//! - a [`Job`] says what is done with a batch: its outputs, and what it refuses (today the
//!   projection, `Project` in `projector.rs`; next, an aggregation);
//! - a [`Target`] says where the outputs go and how a batch commits *with its input
//!   offsets* as one unit, so that a crash at any point leaves either all of a batch or none
//!   of it (today the PostgreSQL read model, `target/postgres.rs`; beside it an
//!   in-memory one, `target/memory.rs`, for the runtime's own tests; next, Kafka topics
//!   in a Kafka transaction, and a FHIR server).
//!
//! Offsets live in the target. At start the group's Kafka offsets are set to the target's
//! (a partition it has none for from its beginning), so the group starts where the target
//! is; on every assignment the runtime reads the target's offsets again and skips what is
//! below them. Kafka's group offsets follow each commit, for visibility and as a new
//! member's start; they may lag the target, never lead it. Anything read twice (a crash
//! between the two commits, a partition moving mid-batch) the target recognizes.
//!
//! A message that cannot be done — undecodable bytes, an unknown schema id, an event whose
//! body contradicts its envelope, one the job or the target refuses — goes to the dead-letter
//! topic with the reason, its coordinates, headers and original bytes, before the batch's
//! offsets that pass it commit; the rest of the batch goes on.

mod group;
mod letters;
mod read;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::Arc,
    time::Instant,
};

use chrono::{DateTime, Utc};
use rdkafka::{
    consumer::{CommitMode, Consumer},
    Offset, TopicPartitionList,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use self::read::{BatchLimits, Read};
use self::{
    letters::Letters,
    read::{lock, read_batches, Fetched},
};
use super::events::{total, TopicCounts};
use crate::{
    canonical::registry::EventCodec,
    config::{KafkaProperties, RegistryConfig},
    kafka::{ensure_topics, Producer, TopicSpec},
    observe::{
        self,
        progress::Progress,
        projector::{ConsumerProbe, Metrics},
    },
};

/// A topic and one of its partitions.
pub type Partition = (String, i32);

/// Why a consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("{0}")]
    Setup(String),
    /// The target failed; `place` names it (e.g. "the projection database").
    #[error("{place}: {source}")]
    Target {
        place: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A read of the batch that cannot be done: its index in the batch, the reason the dead
/// letter carries, and the reason for the log (a database's message may quote a value, so
/// the log gets less).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub index: usize,
    pub reason: String,
    pub logged: String,
}

/// What a job makes of a batch: outputs for the target, each with the index of the read it
/// came from, and the reads it refuses.
#[derive(Debug)]
pub struct Work<O> {
    pub outputs: Vec<(usize, O)>,
    pub refused: Vec<Refused>,
}

/// What is done with a batch of events.
pub trait Job {
    /// What the target is given, borrowing from the batch's reads.
    type Output<'a>;
    /// The batch's outputs and refusals. Reads that failed to decode are the job's to refuse.
    fn work<'a>(&mut self, batch: &'a [Read]) -> Work<Self::Output<'a>>;
}

/// Where the dead letters of a batch go: on Kafka before the batch's offsets commit.
pub trait DeadLetters {
    fn send(&mut self, refused: Vec<Refused>) -> impl Future<Output = Result<(), ConsumerError>>;
}

/// Where a job's outputs go, and the offsets with them.
pub trait Target<J: Job> {
    /// The next offset `group` holds of those of `partitions` the target has (below it,
    /// everything is done).
    fn offsets(
        &mut self,
        group: &str,
        partitions: &[Partition],
    ) -> impl Future<Output = Result<HashMap<Partition, i64>, ConsumerError>>;

    /// Record that `group` starts `partition` at `offset` (nothing before it is its to do).
    fn start(
        &mut self,
        group: &str,
        partition: &Partition,
        offset: i64,
    ) -> impl Future<Output = Result<(), ConsumerError>>;

    /// Forget `group`'s offsets (a replay starts where it is told).
    fn forget(&mut self, group: &str) -> impl Future<Output = Result<(), ConsumerError>>;

    /// Write `outputs` and commit them with `ends` (per partition of the batch, the next
    /// offset) as one unit — offsets never moving back — after handing what the target
    /// itself refuses to `letters`. Returns per topic what was applied, recognized as a
    /// duplicate, or stale.
    fn commit<'a>(
        &mut self,
        group: &str,
        outputs: Vec<(usize, J::Output<'a>)>,
        ends: &HashMap<Partition, i64>,
        letters: &mut impl DeadLetters,
    ) -> impl Future<Output = Result<TopicCounts, ConsumerError>>;
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
    Offsets(BTreeMap<Partition, i64>),
}

/// How a consumer runs.
#[derive(Debug)]
pub struct Settings<'a> {
    /// The job's name: its metrics' label and its dead letters' author.
    pub name: &'a str,
    /// The Kafka consumer group.
    pub group: String,
    pub kafka: &'a KafkaProperties,
    pub registry: &'a RegistryConfig,
    /// The connectors' topic prefix: every event topic under it is read, unless `include`
    /// names topics.
    pub prefix: &'a str,
    pub include: &'a [String],
    pub dead_letter_topic: String,
    pub limits: BatchLimits,
    /// Stop once every partition is done up to where it ended at the start.
    pub until_caught_up: bool,
    /// Read again as this says (then `until_caught_up`, and the target's offsets of the
    /// group are forgotten first).
    pub replay: Option<&'a Replay>,
    /// Whether the metrics are served (the consumer lag then comes with librdkafka's
    /// statistics).
    pub metrics: bool,
    /// What the health probes are told, when they are served.
    pub probe: Option<Arc<ConsumerProbe>>,
}

/// What a consumer run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub applied: u64,
    pub duplicate: u64,
    pub stale: u64,
    pub dead_lettered: u64,
    pub batches: u64,
}

/// Consume until `shutdown` is cancelled (the batch in hand is committed first) — or, with
/// `until_caught_up`, until every partition is done up to its end at the start.
pub async fn consume<J: Job, T: Target<J>>(
    settings: &Settings<'_>,
    job: &mut J,
    target: &mut T,
    shutdown: CancellationToken,
) -> Result<Summary, ConsumerError> {
    let group = &settings.group;
    let replay_from = settings.replay.map(|r| &r.from);
    if replay_from.is_some() {
        target.forget(group).await?;
    }
    let (consumer, session_timeout) = group::consumer(settings)?;
    let topics = group::topics_to_read(
        &consumer,
        settings,
        settings.replay.map_or(&[], |r| &r.topics),
    )?;
    let (partitions, remaining) =
        group::start_where_the_target_is(&consumer, target, group, &topics, replay_from).await?;
    let ends = if settings.until_caught_up {
        group::ends_now(&consumer, &partitions)?
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
        .map_err(|e| ConsumerError::Kafka(format!("cannot subscribe: {e}")))?;
    info!(group = %group, topics = topics.len(), "consuming");

    ensure_topics(
        settings.kafka,
        &[TopicSpec {
            name: settings.dead_letter_topic.clone(),
            partitions: 1,
            replication_factor: 1,
            config: Vec::new(),
        }],
    )
    .await
    .map_err(|e| ConsumerError::Kafka(e.to_string()))?;
    let producer =
        Producer::new(settings.kafka).map_err(|e| ConsumerError::Kafka(e.to_string()))?;
    let codec =
        EventCodec::new(settings.registry).map_err(|e| ConsumerError::Setup(e.to_string()))?;

    let mut summary = Summary::default();
    let mut measured = Metrics::new(settings.name);
    // Per partition: the next offset to do (below it, everything is in the target).
    let mut next: HashMap<Partition, i64> = HashMap::new();
    // Kafka is read (and events decoded) on a task of its own, one batch ahead, while the
    // target takes the batch before: the two overlap instead of taking turns.
    let consumer = Arc::new(consumer);
    let (batches, mut fetched) = mpsc::channel(1);
    let reader = tokio::spawn(read_batches(
        consumer.clone(),
        codec,
        settings.limits,
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
            return Err(ConsumerError::Kafka(format!(
                "the Kafka reader failed: {why}"
            )));
        };
        group::learn_assignments(&consumer, target, group, &mut next).await?;
        if next.is_empty() && !said_waiting && subscribed.elapsed() >= group::ASSIGNMENT_PATIENCE {
            said_waiting = true;
            info!(
                group = %group,
                session_timeout_ms = %session_timeout,
                "no partitions assigned yet: the group is rebalancing, and a member that stopped without leaving (killed) keeps its partitions until its session times out"
            );
        }
        let Fetched::Batch(mut batch) = item? else {
            if let Some(probe) = &settings.probe {
                probe.round(!next.is_empty(), None);
            }
            if settings.until_caught_up && group::caught_up(target, group, &ends).await? {
                break;
            }
            continue;
        };
        if let Some(progress) = &progress {
            progress.advance(batch.len() as u64);
        }
        // Already in the target, or read before its partition moved to another member.
        batch.retain(|r| {
            next.get(&(r.at.topic.clone(), r.at.partition))
                .is_some_and(|from| r.at.offset >= *from)
        });
        if batch.is_empty() {
            continue;
        }
        let mut letters = Letters::new(settings, &producer, &batch, &mut measured);
        let done = do_batch(job, target, group, &batch, &mut letters).await?;
        summary.dead_lettered += letters.sent();
        account(&batch, &done.counts, &mut summary, &mut measured);
        next.extend(done.ends);
        if let Some(probe) = &settings.probe {
            probe.round(true, batch.iter().filter_map(|r| r.timestamp).min());
        }
        lock(&consumer.context().floor).extend(next.iter().map(|(p, o)| (p.clone(), *o)));
        // For visibility (lag in Kafka's tools) and as the start point of a new member.
        let mut commit = TopicPartitionList::new();
        for ((topic, partition), offset) in &next {
            let _ = commit.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        if let Err(e) = consumer.commit(&commit, CommitMode::Async) {
            debug!(error = %e, "committing group offsets to Kafka failed (the target has them)");
        }
        if settings.until_caught_up && group::caught_up(target, group, &ends).await? {
            break;
        }
    }
    reader.abort();
    if let Some(progress) = progress {
        progress.finish();
    }
    Ok(summary)
}

/// What a batch did: per topic its counts, per partition its next offset.
struct Done {
    counts: TopicCounts,
    ends: HashMap<Partition, i64>,
}

/// The job's work on `batch`, its refusals dead-lettered, its outputs committed by the
/// target with the batch's ends.
async fn do_batch<J: Job, T: Target<J>>(
    job: &mut J,
    target: &mut T,
    group: &str,
    batch: &[Read],
    letters: &mut Letters<'_>,
) -> Result<Done, ConsumerError> {
    let work = job.work(batch);
    let mut ends: HashMap<Partition, i64> = HashMap::new();
    for read in batch {
        let end = ends
            .entry((read.at.topic.clone(), read.at.partition))
            .or_insert(0);
        *end = (*end).max(read.at.offset + 1);
    }
    letters.send(work.refused).await?;
    let counts = target.commit(group, work.outputs, &ends, letters).await?;
    Ok(Done { counts, ends })
}

/// Count a committed batch into the summary and the metrics.
fn account(batch: &[Read], counts: &TopicCounts, summary: &mut Summary, measured: &mut Metrics) {
    for read in batch {
        measured.topic(&read.at.topic).consumed.increment(1);
        if let Some(written) = read.timestamp.and_then(DateTime::from_timestamp_millis) {
            measured
                .apply_latency
                .record(observe::seconds_since(written));
        }
        if let Some(committed) = read.event.as_ref().ok().and_then(|e| e.commit_time()) {
            measured
                .end_to_end
                .record(observe::seconds_since(committed));
        }
    }
    measured.batch_events.record(batch.len() as f64);
    for (topic, counts) in counts {
        let topic = measured.topic(topic);
        topic.applied.increment(counts.applied);
        topic.duplicate.increment(counts.duplicate);
        topic.stale.increment(counts.stale);
    }
    let counts = total(counts);
    summary.applied += counts.applied;
    summary.duplicate += counts.duplicate;
    summary.stale += counts.stale;
    summary.batches += 1;
    debug!(
        events = batch.len(),
        applied = counts.applied,
        "batch committed"
    );
}
