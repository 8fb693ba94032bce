//! The group: the consumer made, the topics chosen, the group's offsets set to the target's
//! before joining, assignments learnt, and whether the target has caught up.

use std::{collections::HashMap, time::Duration};

use rdkafka::{
    consumer::{CommitMode, Consumer, StreamConsumer},
    Offset, TopicPartitionList,
};
use tracing::{info, warn};

use super::{
    read::{lock, Assignments},
    ConsumerError, Job, Partition, ReplayFrom, Settings, Target,
};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// The group session's timeout unless `[kafka]` says otherwise (librdkafka's is 45 s).
const SESSION_TIMEOUT_MS: &str = "10000";
/// How long without partitions before the runtime says what it waits for.
pub(super) const ASSIGNMENT_PATIENCE: Duration = Duration::from_secs(3);

/// The group's consumer, and its session timeout (for the log).
pub(super) fn consumer(
    settings: &Settings<'_>,
) -> Result<(StreamConsumer<Assignments>, String), ConsumerError> {
    let mut kafka = settings.kafka.client_config();
    kafka
        .set("group.id", &settings.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    // A member killed without leaving keeps its partitions until its session times out,
    // and a restarted consumer waits that long for them: librdkafka's 45 s became more
    // than 80 s before a restart after kill -9 applied anything. 10 s, unless configured.
    let session_timeout = settings
        .kafka
        .get("session.timeout.ms")
        .unwrap_or(SESSION_TIMEOUT_MS)
        .to_owned();
    kafka.set("session.timeout.ms", &session_timeout);
    if settings.metrics && settings.kafka.get("statistics.interval.ms").is_none() {
        // The consumer lag per partition comes with the statistics.
        kafka.set("statistics.interval.ms", "5000");
    }
    let context = Assignments {
        job: settings.name.to_owned(),
        ..Assignments::default()
    };
    let consumer = kafka.create_with_context(context).map_err(|e| {
        ConsumerError::Kafka(format!(
            "cannot create a consumer: {}",
            crate::kafka::admin::creation_message(&e)
        ))
    })?;
    Ok((consumer, session_timeout))
}

/// The topics to subscribe to: `only` (a replay's choice, each of which must exist), else
/// `include`, else every event topic under the prefix.
pub(super) fn topics_to_read(
    consumer: &StreamConsumer<Assignments>,
    settings: &Settings<'_>,
    only: &[String],
) -> Result<Vec<String>, ConsumerError> {
    let metadata = consumer
        .fetch_metadata(None, METADATA_TIMEOUT)
        .map_err(|e| ConsumerError::Kafka(format!("cannot read the cluster's topics: {e}")))?;
    if let Some(missing) = only
        .iter()
        .find(|t| !metadata.topics().iter().any(|m| m.name() == t.as_str()))
    {
        return Err(ConsumerError::Setup(format!(
            "topic `{missing}` does not exist"
        )));
    }
    if !only.is_empty() {
        return Ok(only.to_vec());
    }
    if !settings.include.is_empty() {
        return Ok(settings.include.to_vec());
    }
    let topics: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|name| crate::canonical::is_event_topic(settings.prefix, name))
        .map(str::to_owned)
        .collect();
    if topics.is_empty() {
        return Err(ConsumerError::Setup(format!(
            "no event topics under the prefix `{}`: start a connector first, or name topics in [topics] include",
            settings.prefix
        )));
    }
    Ok(topics)
}

/// Set the group's Kafka offsets to the target's before joining: the target's offset per
/// partition, the partition's beginning where it has none (a new or emptied target).
/// Refused while other members of the group are active; they keep the group's offsets in
/// step themselves. Returns the partitions, and how many messages lie ahead in those the
/// target had no offsets for (all of them for a replay).
pub(super) async fn start_where_the_target_is<J: Job, T: Target<J>>(
    consumer: &StreamConsumer<Assignments>,
    target: &mut T,
    group: &str,
    topics: &[String],
    replay_from: Option<&ReplayFrom>,
) -> Result<(Vec<Partition>, u64), ConsumerError> {
    let mut partitions = Vec::new();
    let mut remaining = 0;
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map_err(|e| ConsumerError::Kafka(format!("cannot read topic {topic}: {e}")))?;
        for t in metadata.topics() {
            partitions.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
        }
    }
    if let Some(ReplayFrom::Offsets(offsets)) = replay_from {
        if let Some((topic, partition)) = offsets.keys().find(|p| !partitions.contains(p)) {
            return Err(ConsumerError::Setup(format!(
                "{topic}:{partition} is not a partition of the topics replayed"
            )));
        }
    }
    let stored = target.offsets(group, &partitions).await?;
    let mut start = TopicPartitionList::new();
    for partition in &partitions {
        let offset = match stored.get(partition) {
            Some(offset) => *offset,
            None => {
                let (from, high) = first_offset(consumer, partition, replay_from)?;
                remaining += u64::try_from(high - from).unwrap_or(0);
                // Where this group starts is where it stands: nothing before it is its to do.
                target.start(group, partition, from).await?;
                from
            }
        };
        let (topic, number) = partition;
        start
            .add_partition_offset(topic, *number, Offset::Offset(offset))
            .map_err(|e| ConsumerError::Kafka(e.to_string()))?;
        lock(&consumer.context().floor).insert(partition.clone(), offset);
    }
    if let Err(e) = consumer.commit(&start, CommitMode::Sync) {
        info!(error = %e, "the group's offsets were left as they are (other members are active)");
    }
    Ok((partitions, remaining))
}

/// Where a partition the target has no offset for starts (its beginning, or where a
/// replay says), and where it ends now.
fn first_offset(
    consumer: &StreamConsumer<Assignments>,
    (topic, partition): &Partition,
    replay_from: Option<&ReplayFrom>,
) -> Result<(i64, i64), ConsumerError> {
    let (low, high) = consumer
        .fetch_watermarks(topic, *partition, METADATA_TIMEOUT)
        .map_err(|e| ConsumerError::Kafka(e.to_string()))?;
    let from = match replay_from {
        Some(ReplayFrom::Time(since)) => {
            crate::kafka::reader::offset_at(consumer, topic, *partition, *since)
                .map_err(|e| ConsumerError::Kafka(e.to_string()))?
                .unwrap_or(high)
        }
        Some(ReplayFrom::Offsets(offsets)) => match offsets.get(&(topic.clone(), *partition)) {
            Some(&from) if from < low => {
                warn!(topic = %topic, partition, from, low, "Kafka no longer holds the offsets asked for: replaying from the first it holds");
                low
            }
            Some(&from) => from.min(high),
            None => high,
        },
        Some(ReplayFrom::Earliest) | None => low,
    };
    Ok((from, high))
}

/// Forget revoked partitions (their offsets are their new owner's to commit); read the
/// target's offsets of newly assigned ones: below them, everything is done.
pub(super) async fn learn_assignments<J: Job, T: Target<J>>(
    consumer: &StreamConsumer<Assignments>,
    target: &mut T,
    group: &str,
    next: &mut HashMap<Partition, i64>,
) -> Result<(), ConsumerError> {
    let changes = std::mem::take(&mut *lock(&consumer.context().assigned));
    let mut assigned: Vec<Partition> = Vec::new();
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
    next.extend(target.offsets(group, &assigned).await?);
    info!(partitions = assigned.len(), "partitions assigned");
    Ok(())
}

/// A partition's first and end offsets at one moment.
pub(super) struct Span {
    partition: Partition,
    low: i64,
    high: i64,
}

/// Where each partition ends now, and where it begins: what `until_caught_up` waits for
/// (later writes are the next run's, or it would never end while a connector writes).
pub(super) fn ends_now(
    consumer: &StreamConsumer<Assignments>,
    partitions: &[Partition],
) -> Result<Vec<Span>, ConsumerError> {
    partitions
        .iter()
        .map(|(topic, partition)| {
            let (low, high) = consumer
                .fetch_watermarks(topic, *partition, METADATA_TIMEOUT)
                .map_err(|e| ConsumerError::Kafka(e.to_string()))?;
            Ok(Span {
                partition: (topic.clone(), *partition),
                low,
                high,
            })
        })
        .collect()
}

/// Whether the target holds every partition up to `ends` — whichever member of the group
/// did it (the target's offsets are the group's).
pub(super) async fn caught_up<J: Job, T: Target<J>>(
    target: &mut T,
    group: &str,
    ends: &[Span],
) -> Result<bool, ConsumerError> {
    let partitions: Vec<Partition> = ends.iter().map(|e| e.partition.clone()).collect();
    let stored = target.offsets(group, &partitions).await?;
    Ok(ends.iter().all(|end| {
        stored
            .get(&end.partition)
            .copied()
            .unwrap_or(end.low)
            .max(end.low)
            >= end.high
    }))
}
