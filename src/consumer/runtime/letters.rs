//! A batch's dead letters: each refused read as a JSON record on the job's dead-letter
//! topic — the reason, its coordinates, key, headers and original bytes — in Kafka before
//! the offsets that pass it commit.

use std::collections::HashMap;

use base64::Engine;
use serde_json::json;
use tracing::warn;

use super::{ConsumerError, DeadLetters, Read, Refused, Settings};
use crate::{kafka::Producer, observe::projector::Metrics};

/// The dead letters of one batch.
pub(super) struct Letters<'a> {
    name: &'a str,
    group: &'a str,
    topic: &'a str,
    producer: &'a Producer,
    batch: &'a [Read],
    measured: &'a mut Metrics,
    sent: u64,
}

impl<'a> Letters<'a> {
    pub(super) fn new(
        settings: &'a Settings<'_>,
        producer: &'a Producer,
        batch: &'a [Read],
        measured: &'a mut Metrics,
    ) -> Self {
        Letters {
            name: settings.name,
            group: &settings.group,
            topic: &settings.dead_letter_topic,
            producer,
            batch,
            measured,
            sent: 0,
        }
    }

    /// How many were sent.
    pub(super) fn sent(&self) -> u64 {
        self.sent
    }
}

impl DeadLetters for Letters<'_> {
    async fn send(&mut self, refused: Vec<Refused>) -> Result<(), ConsumerError> {
        for Refused {
            index,
            reason,
            logged,
        } in refused
        {
            let read = &self.batch[index];
            warn!(topic = %read.at.topic, partition = read.at.partition, offset = read.at.offset, reason = %logged,
                "a message went to the dead-letter topic");
            let record = json!({
                "projector": self.name,
                "group": self.group,
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
            self.producer
                .send(
                    self.topic,
                    &key,
                    record.to_string().as_bytes(),
                    &[("reason", &reason)],
                )
                .await
                .map_err(|e| ConsumerError::Kafka(e.to_string()))?;
            self.sent += 1;
            self.measured
                .topic(&read.at.topic)
                .dead_lettered
                .increment(1);
        }
        Ok(())
    }
}
