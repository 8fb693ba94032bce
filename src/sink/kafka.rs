//! Kafka, through librdkafka (rdkafka).

use std::time::Duration;

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    types::RDKafkaErrorCode,
    ClientConfig,
};

use crate::{config::KafkaProperties, preflight::Finding};

const COMPONENT: &str = "kafka";
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// A librdkafka client configuration holding exactly the configured properties.
pub fn client_config(properties: &KafkaProperties) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (name, value) in properties.iter() {
        config.set(name, value);
    }
    config
}

/// Create a client from the configured properties and ask the cluster for its metadata.
pub async fn check(properties: &KafkaProperties) -> Vec<Finding> {
    let bootstrap = properties
        .get("bootstrap.servers")
        .unwrap_or("?")
        .to_owned();
    let consumer: BaseConsumer = match client_config(properties).create() {
        Ok(consumer) => consumer,
        Err(e) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("librdkafka refused the [kafka] properties: {}", creation_message(&e)),
                "correct the property in [kafka]; names and values are librdkafka's (see its CONFIGURATION.md)",
            )]
        }
    };
    // fetch_metadata blocks; keep it off the async workers.
    let metadata = tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, METADATA_TIMEOUT)
            .map(|m| (m.brokers().len(), m.topics().len()))
    })
    .await;
    match metadata {
        Ok(Ok((brokers, topics))) => vec![Finding::ok(
            COMPONENT,
            format!("{brokers} broker(s) answer at {bootstrap}; {topics} topic(s) visible"),
        )],
        Ok(Err(e)) => vec![explain_metadata_error(&e, &bootstrap)],
        Err(e) => vec![Finding::problem(
            COMPONENT,
            format!("metadata request failed: {e}"),
            "retry; report a bug if it persists",
        )],
    }
}

fn creation_message(err: &KafkaError) -> String {
    match err {
        KafkaError::ClientCreation(message) => message.clone(),
        other => other.to_string(),
    }
}

fn explain_metadata_error(err: &KafkaError, bootstrap: &str) -> Finding {
    match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            Finding::problem(
                COMPONENT,
                format!("the brokers at {bootstrap} refused authentication"),
                "check sasl.mechanism, sasl.username and sasl.password in [kafka]",
            )
        }
        Some(RDKafkaErrorCode::SSL) => Finding::problem(
            COMPONENT,
            format!("TLS handshake with {bootstrap} failed"),
            "check security.protocol and ssl.ca.location in [kafka]",
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
