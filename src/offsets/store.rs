//! Where connector state lives: a compacted Kafka topic, one key per connector.
//!
//! Kafka Connect keeps its source offsets the same way (`offset.storage.topic`): the state
//! survives the connector's container, needs no volume and no other service, and is written
//! to the cluster that holds the events it describes. Compaction keeps the latest record per
//! connector; loading reads the topic to its end and takes the last record for the key.

use rdkafka::Message;

use super::state::ConnectorState;
use crate::{
    config::{ConnectorConfig, KafkaProperties},
    kafka::{self, ensure_topics, Producer, TopicReader, TopicSpec},
};

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    #[error("reading the state topic {topic}: {source}")]
    Read {
        topic: String,
        #[source]
        source: kafka::Error,
    },
    #[error("the state of connector {connector} in {topic} is not readable ({reason}); `fhir-cdc offsets reset` replaces it")]
    Corrupt {
        connector: String,
        topic: String,
        reason: String,
    },
}

impl crate::error::Kinded for StateError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            StateError::Kafka(source) | StateError::Read { source, .. } => {
                crate::error::Kinded::kind(source)
            }
            StateError::Corrupt { .. } => crate::error::Kind::Definite,
        }
    }
}

/// One connector's state in the state topic.
#[derive(Debug)]
pub struct StateStore {
    properties: KafkaProperties,
    producer: Producer,
    topic: String,
    connector: String,
}

impl StateStore {
    /// The store of `connector` in `topic`, created (compacted, one partition) when absent.
    pub async fn open(
        properties: &KafkaProperties,
        topic: &str,
        connector: &str,
        replication_factor: i32,
    ) -> Result<Self, StateError> {
        let spec = TopicSpec {
            name: topic.to_owned(),
            partitions: 1,
            replication_factor,
            config: vec![("cleanup.policy".into(), "compact".into())],
        };
        ensure_topics(properties, &[spec]).await?;
        Ok(Self {
            properties: properties.clone(),
            producer: Producer::new(properties)?,
            topic: topic.to_owned(),
            connector: connector.to_owned(),
        })
    }

    /// The store of `config`'s connector, in its state topic.
    pub async fn of(config: &ConnectorConfig) -> Result<Self, StateError> {
        Self::open(
            &config.kafka,
            &config.state_topic(),
            &config.name,
            config.topics.replication_factor,
        )
        .await
    }

    /// The last state saved, `None` when there is none (or it was deleted).
    pub async fn load(&self) -> Result<Option<ConnectorState>, StateError> {
        read_last(&self.properties, &self.topic, &self.connector).await
    }

    /// The last state `config`'s connector saved, read without creating anything (`check`
    /// looks, and changes nothing): `None` also when the state topic does not exist.
    pub async fn peek(config: &ConnectorConfig) -> Result<Option<ConnectorState>, StateError> {
        read_last(&config.kafka, &config.state_topic(), &config.name).await
    }

    /// Save `state`; returns once Kafka acknowledged it.
    pub async fn save(&self, state: &ConnectorState) -> Result<(), StateError> {
        let json = serde_json::to_vec(state).expect("the state serialises");
        self.producer
            .send(&self.topic, &self.connector, &json, &[])
            .await?;
        Ok(())
    }

    /// The topic the state is kept in.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Record the mappings `run` started with (mapping id → version), under the key
    /// `<connector>.mappings` (a `.` no connector name holds): what `plan` compares the
    /// mapping files with. A record of its own, so that the state itself keeps its shape
    /// and an older fhir-cdc still reads it after a rollback.
    pub async fn save_mappings(&self, mappings: &RunningMappings) -> Result<(), StateError> {
        let json = serde_json::to_vec(mappings).expect("mapping versions serialise");
        self.producer
            .send(&self.topic, &mappings_key(&self.connector), &json, &[])
            .await?;
        Ok(())
    }

    /// The mappings `config`'s connector last started with, read without creating
    /// anything: `None` when it never recorded any.
    pub async fn peek_mappings(
        config: &ConnectorConfig,
    ) -> Result<Option<RunningMappings>, StateError> {
        read_last(
            &config.kafka,
            &config.state_topic(),
            &mappings_key(&config.name),
        )
        .await
    }
}

/// The mappings a connector runs, as `run` recorded them when it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunningMappings {
    /// Mapping id → version (the hash of its file and the code tables it reads).
    pub versions: std::collections::BTreeMap<String, String>,
    /// The tables captured (`schema.table`): the mappings' and those their lookups read.
    pub tables: std::collections::BTreeSet<String>,
}

fn mappings_key(connector: &str) -> String {
    format!("{connector}.mappings")
}

/// The last record `key` has in `topic` (a topic that does not exist has none), as JSON.
async fn read_last<T: serde::de::DeserializeOwned>(
    properties: &KafkaProperties,
    topic: &str,
    key: &str,
) -> Result<Option<T>, StateError> {
    let fail = |source| StateError::Read {
        topic: topic.to_owned(),
        source,
    };
    let mut reader = TopicReader::open_topic(properties, topic).map_err(fail)?;
    let mut last: Option<Option<Vec<u8>>> = None;
    while !reader.at_end() {
        let Some(message) = reader.next().await.map_err(fail)? else {
            continue;
        };
        if message.key() == Some(key.as_bytes()) {
            last = Some(message.payload().map(<[u8]>::to_vec));
        }
    }
    match last.flatten() {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                connector: key.to_owned(),
                topic: topic.to_owned(),
                reason: e.to_string(),
            }),
    }
}
