//! The idempotent producers: [`StreamProducer`] for the connector's stream (an id per
//! message, answers on one channel, nothing allocated per message) and [`Producer`] for the
//! few messages a caller awaits one by one (dead letters, replays, the connector's state).

use std::time::Duration;

use rdkafka::{
    client::ClientContext,
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{
        BaseRecord, DeliveryResult, FutureProducer, FutureRecord, ProducerContext, ThreadedProducer,
    },
    types::RDKafkaErrorCode,
    util::Timeout,
    Message,
};

use super::{admin::creation_message, config::producer_config, Error};
use crate::config::KafkaProperties;

/// Message headers as librdkafka takes them.
pub(super) fn owned_headers(headers: &[(&str, &str)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(*value),
            })
        },
    )
}

/// Writes messages and reports when Kafka has them.
pub struct Producer {
    inner: FutureProducer,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

impl Producer {
    pub fn new(properties: &KafkaProperties) -> Result<Self, Error> {
        let inner = producer_config(properties)?
            .create()
            .map_err(|e| Error::Config(creation_message(&e)))?;
        Ok(Self { inner })
    }

    /// Send one message; resolves to its partition and offset once Kafka acknowledged it
    /// (with `acks=all`: once every in-sync replica has it).
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(i32, i64), Error> {
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(owned_headers(headers));
        match self.inner.send(record, Timeout::Never).await {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((error, _)) => Err(Error::Delivery(error.to_string())),
        }
    }
}

/// Kafka's answer about one message of a [`StreamProducer`]: the id it was sent with, and
/// its partition and offset or why Kafka refused it.
pub type Delivery = (usize, Result<(i32, i64), Error>);

/// Hands each delivery report of a [`StreamProducer`] to its receiver.
struct Reporting {
    reports: tokio::sync::mpsc::UnboundedSender<Delivery>,
}

impl ClientContext for Reporting {}

impl ProducerContext for Reporting {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        let outcome = match result {
            Ok(message) => Ok((message.partition(), message.offset())),
            Err((error, _)) => Err(Error::of_message(error)),
        };
        // Nobody listening: the connector is stopping, and what was not acknowledged is
        // sent again on restart.
        let _ = self.reports.send((id, outcome));
    }
}

/// Writes a stream of messages: each goes out with an id, and Kafka's answer comes back
/// with that id through the receiver [`StreamProducer::new`] returns — no future, channel
/// or task per message ([`Producer`] has those, for callers that await each message).
/// Nothing unbounded: there is one report per message sent, and the caller bounds those
/// in flight.
pub struct StreamProducer {
    inner: ThreadedProducer<Reporting>,
}

impl std::fmt::Debug for StreamProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamProducer").finish_non_exhaustive()
    }
}

impl StreamProducer {
    pub fn new(
        properties: &KafkaProperties,
    ) -> Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Delivery>), Error> {
        let (reports, received) = tokio::sync::mpsc::unbounded_channel();
        let inner = producer_config(properties)?
            .create_with_context(Reporting { reports })
            .map_err(|e| Error::Config(creation_message(&e)))?;
        Ok((Self { inner }, received))
    }

    /// Queue one message (librdkafka copies it); its delivery report carries `id`. Waits
    /// while librdkafka's queue is full.
    pub async fn send(
        &self,
        id: usize,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), Error> {
        let mut record = BaseRecord::with_opaque_to(topic, id)
            .key(key)
            .payload(payload)
            .headers(owned_headers(headers));
        loop {
            match self.inner.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((error, _)) => return Err(Error::of_message(&error)),
            }
        }
    }
}
