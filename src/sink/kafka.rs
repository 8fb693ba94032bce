//! Kafka's producer and admin clients, through librdkafka (rdkafka): the producer
//! configuration fhir-cdc insists on, topic creation and limits, and two ways to send —
//! [`StreamProducer`] for the connector's stream (an id per message, answers on one
//! channel, nothing allocated per message) and [`Producer`] for the few messages a caller
//! awaits one by one (dead letters, replays, the connector's state). Reading topics is the
//! consumer side's (`consumer::topics`).

use std::{collections::HashMap, time::Duration};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication},
    client::{ClientContext, DefaultClientContext},
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{
        BaseRecord, DeliveryResult, FutureProducer, FutureRecord, ProducerContext, ThreadedProducer,
    },
    types::RDKafkaErrorCode,
    util::Timeout,
    ClientConfig, Message,
};

use crate::{config::KafkaProperties, preflight::Finding};

const COMPONENT: &str = "kafka";
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Create a client from the configured properties and ask the cluster for its metadata.
pub async fn check(properties: &KafkaProperties) -> Vec<Finding> {
    let bootstrap = bootstrap(properties);
    match cluster_metadata(properties).await {
        Ok((brokers, topics)) => vec![Finding::ok(
            COMPONENT,
            format!("{brokers} broker(s) answer at {bootstrap}; {topics} topic(s) visible"),
        )],
        Err(MetadataFailure::Properties(e)) => vec![Finding::problem(
            COMPONENT,
            format!("librdkafka refused the [kafka] properties: {e}"),
            "correct the property in [kafka]; names and values are librdkafka's (see its CONFIGURATION.md)",
        )],
        Err(MetadataFailure::Cluster(e, seen)) => {
            vec![explain_metadata_error(&e, seen.as_ref(), bootstrap)]
        }
        Err(MetadataFailure::Task(e)) => vec![Finding::problem(
            COMPONENT,
            format!("metadata request failed: {e}"),
            "retry; report a bug if it persists",
        )],
    }
}

fn bootstrap(properties: &KafkaProperties) -> &str {
    properties.get("bootstrap.servers").unwrap_or("?")
}

/// Why the cluster's metadata could not be had.
enum MetadataFailure {
    /// librdkafka would not create a client (see [`creation_message`]).
    Properties(String),
    /// The cluster did not answer, or refused; with the last error librdkafka reported
    /// meanwhile, which says why (authentication, TLS) where the request's own error
    /// says only that it timed out.
    Cluster(KafkaError, Option<ClientError>),
    /// The blocking task asking it failed.
    Task(String),
}

/// The number of brokers and topics the cluster reports, waiting up to `METADATA_TIMEOUT`.
async fn cluster_metadata(properties: &KafkaProperties) -> Result<(usize, usize), MetadataFailure> {
    let consumer: BaseConsumer<LastError> = properties
        .client_config()
        .create_with_context(LastError::default())
        .map_err(|e| MetadataFailure::Properties(creation_message(&e)))?;
    // fetch_metadata blocks; keep it off the async workers. librdkafka hands over its errors
    // (a refused password, a failed handshake) only when the client is polled: ask in short
    // requests, polling between them, and stop at once at an error no retry mends.
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + METADATA_TIMEOUT;
        loop {
            match consumer.fetch_metadata(None, Duration::from_secs(1)) {
                Ok(m) => return Ok((m.brokers().len(), m.topics().len())),
                Err(e) => {
                    let _ = consumer.poll(Duration::ZERO);
                    let seen = consumer.context().last();
                    if std::time::Instant::now() >= deadline
                        || seen.as_ref().is_some_and(ClientError::is_definite)
                    {
                        return Err(MetadataFailure::Cluster(e, seen));
                    }
                }
            }
        }
    })
    .await
    .map_err(|e| MetadataFailure::Task(e.to_string()))?
}

/// A client context that keeps the last error librdkafka reported. librdkafka says why a
/// broker could not be reached (a refused password, a failed handshake) in its log and in
/// error events, but answers a request only that it failed; `check` and topic creation ask
/// this context why, and say it in their own words (the log itself is not printed).
#[derive(Debug, Default)]
struct LastError(std::sync::Mutex<Option<ClientError>>);

/// An error librdkafka reported: its code and its reason (which holds no property value).
#[derive(Debug, Clone)]
struct ClientError {
    code: Option<RDKafkaErrorCode>,
    reason: String,
}

impl ClientError {
    /// Whether asking again cannot help: the brokers refused authentication, or TLS failed.
    fn is_definite(&self) -> bool {
        matches!(
            self.code,
            Some(
                RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::SSL
            )
        )
    }
}

impl LastError {
    fn last(&self) -> Option<ClientError> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keep `seen`, unless what is kept says why and `seen` does not ("all brokers down"
    /// follows every refused handshake).
    fn keep(&self, seen: ClientError) {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if seen.is_definite() || !kept.as_ref().is_some_and(ClientError::is_definite) {
            *kept = Some(seen);
        }
    }
}

impl ClientContext for LastError {
    fn log(&self, _: RDKafkaLogLevel, facility: &str, message: &str) {
        // A connection that failed: a TLS handshake (to a plaintext listener, or with a
        // certificate the CA did not sign) is only logged, never an error event.
        if facility == "FAIL" {
            let code = if message.contains("SSL handshake failed") {
                Some(RDKafkaErrorCode::SSL)
            } else if message.contains("SASL authentication error") {
                Some(RDKafkaErrorCode::Authentication)
            } else {
                None
            };
            self.keep(ClientError {
                code,
                reason: message.to_owned(),
            });
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.keep(ClientError {
            code: error.rdkafka_error_code(),
            reason: reason.to_owned(),
        });
    }
}

impl ConsumerContext for LastError {}

/// Why librdkafka would not create a client, without the value of the property it names:
/// a misspelt `sasl.password` is still a password.
pub fn creation_message(err: &KafkaError) -> String {
    match err {
        KafkaError::ClientCreation(message) => message.clone(),
        KafkaError::ClientConfig(_, description, key, value) => {
            let description = if value.is_empty() {
                description.clone()
            } else {
                description.replace(value.as_str(), "***")
            };
            format!("{description} (property `{key}`; its value is not shown)")
        }
        other => other.to_string(),
    }
}

fn explain_metadata_error(
    err: &KafkaError,
    seen: Option<&ClientError>,
    bootstrap: &str,
) -> Finding {
    let (code, reason) = match seen {
        Some(seen) => (seen.code, seen.reason.as_str()),
        None => (err.rdkafka_error_code(), ""),
    };
    match code {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            Finding::problem(
                COMPONENT,
                format!("the brokers at {bootstrap} refused authentication ({reason})"),
                "check sasl.mechanism, sasl.username and sasl.password in [kafka]",
            )
        }
        Some(RDKafkaErrorCode::SSL) => Finding::problem(
            COMPONENT,
            format!("TLS with {bootstrap} failed ({reason})"),
            "check security.protocol (SSL or SASL_SSL only where the listener speaks TLS) and ssl.ca.location in [kafka]",
        ),
        _ => Finding::problem(
            COMPONENT,
            format!(
                "no Kafka broker answered at {bootstrap} (waited up to {}s: {err})",
                METADATA_TIMEOUT.as_secs()
            ),
            "start Kafka, or correct bootstrap.servers and security.protocol in [kafka]",
        ),
    }
}

/// Why writing to Kafka failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("[kafka] {property} = {value}: fhir-cdc requires {required} ({why})")]
    Required {
        property: &'static str,
        value: String,
        required: &'static str,
        why: &'static str,
    },
    #[error("librdkafka refused the [kafka] properties: {0}")]
    Config(String),
    #[error("creating topic {topic} failed: {reason}")]
    Topic { topic: String, reason: String },
    #[error("Kafka did not acknowledge a message: {0}")]
    Delivery(String),
    #[error("Kafka refused a message as too large ({0}): the broker takes less than the topic's max.message.bytes said; raise it on the topic")]
    TooLarge(String),
}

impl SinkError {
    /// The error of a message librdkafka refused or Kafka did not acknowledge.
    fn of_message(error: &KafkaError) -> Self {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => SinkError::TooLarge(error.to_string()),
            _ => SinkError::Delivery(error.to_string()),
        }
    }
}

impl SinkError {
    /// Whether trying again later may succeed: the cluster was unreachable or did not
    /// acknowledge in time (a topic Kafka refused, or properties librdkafka refused, stay
    /// refused).
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Delivery(_) => true,
            SinkError::Topic { topic, .. } => topic == ALL_TOPICS,
            SinkError::Required { .. } | SinkError::Config(_) | SinkError::TooLarge(_) => false,
        }
    }
}

/// The "topic" of a topic-creation request that failed as a whole (no answer from the
/// cluster), rather than for one topic.
const ALL_TOPICS: &str = "(all)";

/// Properties fhir-cdc insists on, and why: without them a retry could duplicate or
/// reorder events, or an acknowledgement could precede durability.
const REQUIRED: [(&str, &str, &str); 2] = [
    (
        "enable.idempotence",
        "true",
        "retries must not duplicate or reorder events",
    ),
    (
        "acks",
        "all",
        "an event counts as written only once every in-sync replica has it",
    ),
];

/// Defaults for what the configuration leaves unset. `linger.ms`: librdkafka's 5 ms makes
/// small requests, and with idempotence only five may be in flight to a partition; when
/// five are and the next batch is due, librdkafka's broker thread polls its socket with no
/// timeout until one returns — 8,000 to 45,000 polls a second under the benchmark's
/// backlog, a fifth of fhir-cdc's CPU. At 10 ms it polls a few hundred times a second (at
/// 20 ms hardly fewer, and every change waits 10 ms more).
///
/// `message.timeout.ms`: librdkafka's 300 s is how long a message may wait unacknowledged
/// (once, after the test broker was frozen for 30 s and thawed — the partition's leader
/// briefly unknown — messages stayed unacknowledged for over three minutes with nothing
/// logged); at 120 s, the Java producer's `delivery.timeout.ms`, such a wait ends sooner as
/// a delivery failure, which restarts capture from the stored state with a fresh producer:
/// a logged delay, nothing lost.
const DEFAULTS: [(&str, &str); 3] = [
    ("compression.type", "lz4"),
    ("linger.ms", "10"),
    ("message.timeout.ms", "120000"),
];

/// A producer configuration: the configured properties, fhir-cdc's required ones (a
/// conflicting value is an error, not silently overridden), and defaults.
pub fn producer_config(properties: &KafkaProperties) -> Result<ClientConfig, SinkError> {
    let mut config = properties.client_config();
    for (property, required, why) in REQUIRED {
        // `acks = -1` is librdkafka's other spelling of `all`.
        let accepted = |value: &str| {
            value.eq_ignore_ascii_case(required) || (property == "acks" && value == "-1")
        };
        match properties.get(property) {
            Some(value) if !accepted(value) => {
                return Err(SinkError::Required {
                    property,
                    value: value.to_owned(),
                    required,
                    why,
                })
            }
            _ => {
                config.set(property, required);
            }
        }
    }
    for (property, value) in DEFAULTS {
        if properties.get(property).is_none() {
            config.set(property, value);
        }
    }
    Ok(config)
}

/// A topic as fhir-cdc creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic-level settings, e.g. `retention.ms`, `cleanup.policy`.
    pub config: Vec<(String, String)>,
}

/// Create the topics that do not exist yet; existing ones are left as they are. Returns the
/// names created.
pub async fn ensure_topics(
    properties: &KafkaProperties,
    topics: &[TopicSpec],
) -> Result<Vec<String>, SinkError> {
    // Admin requests wait for an absent cluster a minute and then say only "timed out";
    // asking for its metadata first names the cluster within ten seconds.
    cluster_metadata(properties)
        .await
        .map_err(|failure| match failure {
            MetadataFailure::Properties(e) => SinkError::Config(e),
            MetadataFailure::Cluster(e, seen) => SinkError::Topic {
                topic: ALL_TOPICS.into(),
                reason: format!(
                    "no Kafka broker answered at {} (waited up to {}s: {e}{})",
                    bootstrap(properties),
                    METADATA_TIMEOUT.as_secs(),
                    seen.map(|s| format!("; {}", s.reason)).unwrap_or_default()
                ),
            },
            MetadataFailure::Task(reason) => SinkError::Topic {
                topic: ALL_TOPICS.into(),
                reason,
            },
        })?;
    let admin: AdminClient<DefaultClientContext> = properties
        .client_config()
        .create()
        .map_err(|e| SinkError::Config(creation_message(&e)))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            t.config.iter().fold(
                NewTopic::new(
                    &t.name,
                    t.partitions,
                    TopicReplication::Fixed(t.replication_factor),
                ),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|e| SinkError::Topic {
            topic: ALL_TOPICS.into(),
            reason: e.to_string(),
        })?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(SinkError::Topic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(created)
}

/// librdkafka's default `message.max.bytes`.
const PRODUCER_MESSAGE_MAX: usize = 1_000_000;

/// The largest message each of `topics` takes: the smaller of the producer's
/// `message.max.bytes` (librdkafka refuses larger ones itself) and the topic's
/// `max.message.bytes` (the broker refuses larger batches).
pub async fn message_limits(
    properties: &KafkaProperties,
    topics: &[String],
) -> Result<HashMap<String, usize>, SinkError> {
    let producer_limit = properties
        .get("message.max.bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(PRODUCER_MESSAGE_MAX);
    let admin: AdminClient<DefaultClientContext> = properties
        .client_config()
        .create()
        .map_err(|e| SinkError::Config(creation_message(&e)))?;
    let resources: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let described = admin
        .describe_configs(&resources, &options)
        .await
        .map_err(|e| SinkError::Topic {
            topic: ALL_TOPICS.into(),
            reason: format!("reading the topics' settings: {e}"),
        })?;
    Ok(topics
        .iter()
        .zip(described)
        .map(|(topic, result)| {
            let topic_limit = result
                .ok()
                .and_then(|config| {
                    config
                        .get("max.message.bytes")?
                        .value
                        .as_ref()?
                        .parse()
                        .ok()
                })
                .unwrap_or(usize::MAX);
            (topic.clone(), producer_limit.min(topic_limit))
        })
        .collect())
}

/// Message headers as librdkafka takes them.
fn owned_headers(headers: &[(&str, &str)]) -> OwnedHeaders {
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
    pub fn new(properties: &KafkaProperties) -> Result<Self, SinkError> {
        let inner = producer_config(properties)?
            .create()
            .map_err(|e| SinkError::Config(creation_message(&e)))?;
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
    ) -> Result<(i32, i64), SinkError> {
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(owned_headers(headers));
        match self.inner.send(record, Timeout::Never).await {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((error, _)) => Err(SinkError::Delivery(error.to_string())),
        }
    }
}

/// Kafka's answer about one message of a [`StreamProducer`]: the id it was sent with, and
/// its partition and offset or why Kafka refused it.
pub type Delivery = (usize, Result<(i32, i64), SinkError>);

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
            Err((error, _)) => Err(SinkError::of_message(error)),
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
    ) -> Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Delivery>), SinkError> {
        let (reports, received) = tokio::sync::mpsc::unbounded_channel();
        let inner = producer_config(properties)?
            .create_with_context(Reporting { reports })
            .map_err(|e| SinkError::Config(creation_message(&e)))?;
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
    ) -> Result<(), SinkError> {
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
                Err((error, _)) => return Err(SinkError::of_message(&error)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(toml: &str) -> KafkaProperties {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn idempotence_and_acks_all_are_enforced_not_overridden() {
        let config = producer_config(&properties(r#""bootstrap.servers" = "k:9092""#)).unwrap();
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("compression.type"), Some("lz4"));
        let tuned =
            producer_config(&properties("compression.type = \"zstd\"\nacks = \"-1\"")).unwrap();
        assert_eq!(
            tuned.get("compression.type"),
            Some("zstd"),
            "the configuration wins over defaults"
        );
        for (toml, property) in [
            ("enable.idempotence = false", "enable.idempotence"),
            ("acks = 1", "acks"),
        ] {
            let err = producer_config(&properties(toml)).unwrap_err().to_string();
            assert!(err.starts_with(&format!("[kafka] {property} = ")), "{err}");
            assert!(err.contains("fhir-cdc requires"), "{err}");
        }
    }
}
