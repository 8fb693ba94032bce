//! The runtime's Kafka half: group membership (partitions assigned and revoked, each newly
//! assigned one positioned where the target holds everything below), batches read one
//! ahead of the job and decoded through the registry with whatever schema wrote each event,
//! and the consumer lag from librdkafka's statistics.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rdkafka::{
    client::ClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    message::{BorrowedMessage, Headers},
    statistics::Statistics,
    Message, Offset, TopicPartitionList,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::ConsumerError;
use crate::{
    canonical::registry::EventCodec,
    consumer::events::{Coordinates, Prepared},
    observe,
};

/// Partitions assigned since the loop last looked, to be positioned from the database; and
/// the consumer lag from librdkafka's statistics, when they are on.
#[derive(Debug, Default)]
pub(super) struct Assignments {
    pub(super) job: String,
    /// Partitions assigned (`true`) and revoked (`false`) since the loop last looked, in
    /// order.
    pub(super) assigned: Mutex<Vec<((String, i32), bool)>>,
    /// Per partition, an offset the database holds everything below (it may lag the
    /// database, never lead it): where a newly assigned partition is read from, whatever
    /// the group's Kafka offset says — that may be ahead of the database (a replay started
    /// again while its killed predecessor is still a member, a database restored from a
    /// backup), and reading from there would skip what the database lacks.
    pub(super) floor: Mutex<HashMap<(String, i32), i64>>,
}

/// A mutex's data, even if a panicking thread poisoned it (the data here are plain maps).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ClientContext for Assignments {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1: not consumed by this member (or no committed offset yet).
                if *partition >= 0 && p.consumer_lag >= 0 {
                    observe::projector::consumer_lag(&self.job, topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Assignments {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            lock(&self.assigned).extend(
                partitions
                    .elements()
                    .iter()
                    .map(|p| ((p.topic().to_owned(), p.partition()), false)),
            );
        }
        if let Rebalance::Assign(partitions) = rebalance {
            let partitions: Vec<(String, i32)> = partitions
                .elements()
                .iter()
                .map(|p| (p.topic().to_owned(), p.partition()))
                .collect();
            // The assignment again, with the database's offsets where they are known (a
            // seek is refused this early); the others from the group's offsets.
            let floor = lock(&self.floor);
            let mut positioned = TopicPartitionList::new();
            for (topic, partition) in &partitions {
                let offset = floor
                    .get(&(topic.clone(), *partition))
                    .map_or(Offset::Stored, |o| Offset::Offset(*o));
                let _ = positioned.add_partition_offset(topic, *partition, offset);
            }
            drop(floor);
            if let Err(e) = consumer.assign(&positioned) {
                warn!(error = %e, "cannot position the newly assigned partitions at the projection's offsets");
            }
            lock(&self.assigned).extend(partitions.into_iter().map(|p| (p, true)));
        }
    }
}

/// A message read, ready for the job or for the dead-letter topic.
#[derive(Debug)]
pub struct Read {
    pub at: Coordinates,
    /// When Kafka took the message (ms since the epoch).
    pub timestamp: Option<i64>,
    /// The event, decoded and checked, or why it cannot be.
    pub event: Result<Prepared, String>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// What the reader hands the applier.
pub(super) enum Fetched {
    Batch(Vec<Read>),
    /// Nothing arrived for a while.
    Idle,
}

/// How batches are cut.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Events per batch, at most.
    pub events: usize,
    /// How long a batch waits to fill once its first event is in.
    pub wait: Duration,
    /// How long without any event before the job hears of it.
    pub idle: Duration,
}

/// Read batches from Kafka and decode them until `shutdown`, an error (sent on) or the
/// applier hangs up.
pub(super) async fn read_batches(
    consumer: Arc<StreamConsumer<Assignments>>,
    codec: EventCodec,
    limits: BatchLimits,
    shutdown: CancellationToken,
    batches: mpsc::Sender<Result<Fetched, ConsumerError>>,
) {
    let kafka = |e: rdkafka::error::KafkaError| ConsumerError::Kafka(e.to_string());
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            first = tokio::time::timeout(limits.idle, consumer.recv()) => first,
        };
        let fetched = match first {
            Err(_) => Ok(Fetched::Idle),
            Ok(Err(e)) => Err(kafka(e)),
            Ok(Ok(first)) => {
                let mut batch = Vec::with_capacity(limits.events);
                let mut failed = read(&codec, &first).await.map(|r| batch.push(r)).err();
                let deadline = Instant::now() + limits.wait;
                while failed.is_none() && batch.len() < limits.events {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, consumer.recv()).await {
                        Ok(Ok(message)) => match read(&codec, &message).await {
                            Ok(read) => batch.push(read),
                            Err(e) => failed = Some(e),
                        },
                        Ok(Err(e)) => failed = Some(kafka(e)),
                        Err(_) => break,
                    }
                }
                failed.map_or(Ok(Fetched::Batch(batch)), Err)
            }
        };
        let stop = fetched.is_err();
        if batches.send(fetched).await.is_err() || stop {
            return;
        }
    }
}

/// A message, decoded. An unreachable registry is waited for a few seconds, then an error:
/// its messages are not bad, and must not become dead letters.
async fn read(codec: &EventCodec, message: &BorrowedMessage<'_>) -> Result<Read, ConsumerError> {
    let payload = message.payload().unwrap_or_default().to_vec();
    let at = Coordinates {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
    };
    let timestamp = message.timestamp().to_millis();
    let mut wait = Duration::from_millis(200);
    let event = loop {
        match codec.decode_json(&payload).await {
            Ok((event, resource)) => break Prepared::checked(event, resource),
            Err(e) if e.is_transient() && wait <= Duration::from_secs(4) => {
                warn!(error = %e, retry_in_ms = wait.as_millis(), "the schema registry failed; trying again");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) if e.is_transient() => {
                return Err(ConsumerError::Setup(format!("the schema registry: {e}")))
            }
            Err(e) => break Err(e.to_string()),
        }
    };
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Read {
        at,
        timestamp,
        event,
        key: message.key().map(<[u8]>::to_vec),
        payload,
        headers,
    })
}
