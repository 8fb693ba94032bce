//! Kafka's cluster as a whole: its metadata (`check`'s probe, and why it did not answer),
//! topics created with their class's settings, and the largest message each takes.

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication},
    client::{ClientContext, DefaultClientContext},
    config::RDKafkaLogLevel,
    consumer::{BaseConsumer, Consumer, ConsumerContext},
    error::KafkaError,
    types::RDKafkaErrorCode,
};

use super::{error::ALL_TOPICS, Error};
use crate::{config::KafkaProperties, preflight::Finding};

const COMPONENT: &str = "kafka";
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// Create a client from the configured properties and ask the cluster for its metadata.
pub async fn check(properties: &KafkaProperties) -> Vec<Finding> {
    let bootstrap = bootstrap(properties);
    match cluster_metadata(properties).await {
        Ok((brokers, topics)) => vec![Finding::ok(
            COMPONENT,
            format!(
                "{brokers} broker(s) answer at {bootstrap}; {} topic(s) visible",
                topics.len()
            ),
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

/// The number of brokers and the topics the cluster reports, waiting up to
/// `METADATA_TIMEOUT`.
async fn cluster_metadata(
    properties: &KafkaProperties,
) -> Result<(usize, BTreeSet<String>), MetadataFailure> {
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
                Ok(m) => {
                    let topics = m.topics().iter().map(|t| t.name().to_owned()).collect();
                    return Ok((m.brokers().len(), topics));
                }
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

/// A topic as fhir-cdc creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic-level settings, e.g. `retention.ms`, `cleanup.policy`.
    pub config: Vec<(String, String)>,
}

/// The topics the cluster shows this client, waiting up to `METADATA_TIMEOUT` for it.
pub async fn topic_names(properties: &KafkaProperties) -> Result<BTreeSet<String>, Error> {
    cluster_metadata(properties)
        .await
        .map(|(_, topics)| topics)
        .map_err(|failure| match failure {
            MetadataFailure::Properties(e) => Error::Config(e),
            MetadataFailure::Cluster(e, seen) => Error::Topic {
                topic: ALL_TOPICS.into(),
                reason: format!(
                    "no Kafka broker answered at {} (waited up to {}s: {e}{})",
                    bootstrap(properties),
                    METADATA_TIMEOUT.as_secs(),
                    seen.map(|s| format!("; {}", s.reason)).unwrap_or_default()
                ),
            },
            MetadataFailure::Task(reason) => Error::Topic {
                topic: ALL_TOPICS.into(),
                reason,
            },
        })
}

/// Create the topics that do not exist yet; existing ones are left as they are. Returns the
/// names created.
pub async fn ensure_topics(
    properties: &KafkaProperties,
    topics: &[TopicSpec],
) -> Result<Vec<String>, Error> {
    // Admin requests wait for an absent cluster a minute and then say only "timed out";
    // asking for its metadata first names the cluster within ten seconds.
    topic_names(properties).await?;
    let admin: AdminClient<DefaultClientContext> = properties
        .client_config()
        .create()
        .map_err(|e| Error::Config(creation_message(&e)))?;
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
        .map_err(|e| Error::Topic {
            topic: ALL_TOPICS.into(),
            reason: e.to_string(),
        })?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Topic {
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
) -> Result<HashMap<String, usize>, Error> {
    let producer_limit = properties
        .get("message.max.bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(PRODUCER_MESSAGE_MAX);
    let admin: AdminClient<DefaultClientContext> = properties
        .client_config()
        .create()
        .map_err(|e| Error::Config(creation_message(&e)))?;
    let resources: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let described = admin
        .describe_configs(&resources, &options)
        .await
        .map_err(|e| Error::Topic {
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
