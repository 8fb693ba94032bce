//! Reading topics directly, as `tail`, `dlq` and the connector's state store do: partitions
//! assigned, no consumer group, nothing committed, so reading never disturbs a consumer;
//! only what committed transactions wrote (`read_committed`).

use std::{collections::HashMap, time::Duration};

use rdkafka::{
    consumer::{Consumer, ConsumerContext, StreamConsumer},
    message::BorrowedMessage,
    Message, Offset, TopicPartitionList,
};

use super::Error;
use crate::config::KafkaProperties;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The first offset of `topic[partition]` written at or after `since`; `None` when none is.
pub fn offset_at<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<Option<i64>, Error> {
    let doing = || format!("cannot find the offsets of {topic}[{partition}] at {since}");
    let mut query = TopicPartitionList::new();
    query
        .add_partition_offset(topic, partition, Offset::Offset(since.timestamp_millis()))
        .map_err(|e| Error::client(doing(), e))?;
    let found = consumer
        .offsets_for_times(query, METADATA_TIMEOUT)
        .map_err(|e| Error::client(doing(), e))?;
    Ok(found
        .find_partition(topic, partition)
        .and_then(|p| match p.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        }))
}

/// Topics read directly, knowing where each partition ended when reading began.
pub struct TopicReader {
    consumer: StreamConsumer,
    /// The topics read.
    pub topics: Vec<String>,
    /// Per partition with messages still ahead of the reader: where it ended.
    ends: HashMap<(String, i32), i64>,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl TopicReader {
    /// Read every partition of the topics `wanted` picks, each from the offset `start`
    /// gives for it (its topic, partition, low and high watermarks).
    pub fn open(
        properties: &KafkaProperties,
        wanted: impl Fn(&str) -> bool,
        start: impl Fn(&StreamConsumer, &str, i32, i64, i64) -> Result<i64, Error>,
    ) -> Result<Self, Error> {
        Self::open_among(properties, None, wanted, start)
    }

    /// Read every partition of `topic` from its beginning. Asks the cluster about this
    /// topic alone (the connector's state store does this at every start, on clusters with
    /// many topics).
    pub fn open_topic(properties: &KafkaProperties, topic: &str) -> Result<Self, Error> {
        Self::open_among(
            properties,
            Some(topic),
            |t| t == topic,
            |_, _, _, low, _| Ok(low),
        )
    }

    /// Read `topic[partition]` from `offset` (the first offset left, when retention removed
    /// it), and no other partition.
    pub fn open_at(
        properties: &KafkaProperties,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Self, Error> {
        Self::open_among(
            properties,
            Some(topic),
            |t| t == topic,
            |_, _, p, _, high| Ok(if p == partition { offset } else { high }),
        )
    }

    fn open_among(
        properties: &KafkaProperties,
        only: Option<&str>,
        wanted: impl Fn(&str) -> bool,
        start: impl Fn(&StreamConsumer, &str, i32, i64, i64) -> Result<i64, Error>,
    ) -> Result<Self, Error> {
        let consumer: StreamConsumer =
            super::config::reader_config(properties)
                .create()
                .map_err(|e| Error::Create {
                    role: "consumer",
                    reason: super::admin::creation_message(&e),
                })?;
        let metadata = consumer
            .fetch_metadata(only, METADATA_TIMEOUT)
            .map_err(|e| Error::client("cannot read the cluster's topics", e))?;
        let mut assignment = TopicPartitionList::new();
        let (mut topics, mut ends) = (Vec::new(), HashMap::new());
        for topic in metadata.topics().iter().filter(|t| wanted(t.name())) {
            let name = topic.name();
            topics.push(name.to_owned());
            for partition in topic.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(name, partition.id(), METADATA_TIMEOUT)
                    .map_err(|e| {
                        Error::client(
                            format!("cannot read the offsets of {name}[{}]", partition.id()),
                            e,
                        )
                    })?;
                let from = start(&consumer, name, partition.id(), low, high)?;
                assignment
                    .add_partition_offset(name, partition.id(), Offset::Offset(from))
                    .map_err(|e| {
                        Error::client(format!("cannot assign {name}[{}]", partition.id()), e)
                    })?;
                if high > from {
                    ends.insert((name.to_owned(), partition.id()), high);
                }
            }
        }
        if assignment.count() > 0 {
            consumer
                .assign(&assignment)
                .map_err(|e| Error::client("cannot assign the partitions", e))?;
        }
        Ok(Self {
            consumer,
            topics,
            ends,
        })
    }

    /// Whether every partition is read up to where it ended when reading began.
    pub fn at_end(&self) -> bool {
        self.ends.is_empty()
    }

    /// The next message; `None` after a second without one (the partitions' positions
    /// are then checked against their ends: the last offset before an end need not be a
    /// message one reads).
    pub async fn next(&mut self) -> Result<Option<BorrowedMessage<'_>>, Error> {
        let message = match tokio::time::timeout(Duration::from_secs(1), self.consumer.recv()).await
        {
            Ok(message) => message.map_err(|e| Error::client("reading from Kafka failed", e))?,
            Err(_) => {
                let positions = self
                    .consumer
                    .position()
                    .map_err(|e| Error::client("cannot read the consumer's positions", e))?;
                self.ends.retain(|(topic, partition), end| {
                    !matches!(
                        positions.find_partition(topic, *partition).map(|p| p.offset()),
                        Some(Offset::Offset(at)) if at >= *end
                    )
                });
                return Ok(None);
            }
        };
        let place = (message.topic().to_owned(), message.partition());
        if self
            .ends
            .get(&place)
            .is_some_and(|end| message.offset() + 1 >= *end)
        {
            self.ends.remove(&place);
        }
        Ok(Some(message))
    }
}
