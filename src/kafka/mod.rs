//! The one Kafka module, through librdkafka (rdkafka): every client fhir-cdc makes, by role,
//! used by the capture side and the consumer side alike.
//!
//! - [`config`]: the `[kafka]` properties as each role's client takes them — what a producer
//!   must have (idempotence, `acks=all`) and its defaults, a transactional producer's
//!   timeouts, a reader's isolation.
//! - [`admin`]: the cluster as a whole — its metadata (`check`'s probe), topics created,
//!   the largest message each takes.
//! - [`producer`]: the idempotent producers — [`StreamProducer`] for the connector's stream,
//!   [`Producer`] for messages awaited one by one.
//! - [`transactional`]: [`TransactionalProducer`] — messages and consumed offsets committed
//!   together or not at all.
//! - [`reader`]: [`TopicReader`] — topics read directly (partitions assigned, nothing
//!   committed, `read_committed`).
//!
//! Every error says what the caller can do about it ([`ErrorKind`]).

pub mod admin;
pub mod config;
mod error;
pub mod producer;
pub mod reader;
pub mod transactional;

pub use admin::{check, ensure_topics, message_limits, topic_names, TopicSpec};
pub use config::READER_GROUP_PREFIX;
pub use error::{Error, ErrorKind};
pub use producer::{Delivery, Producer, StreamProducer};
pub use reader::TopicReader;
pub use transactional::TransactionalProducer;
