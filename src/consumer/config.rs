//! The projector's configuration: one TOML file (see `connectors/projector.toml`), checked
//! like a connector's — unknown keys are errors, secrets are `${env:…}` / `${file:…}`.

use std::path::Path;

use serde::Deserialize;

use crate::config::{
    read_configured, read_toml, ConfigError, KafkaProperties, MetricsConfig, RegistryConfig, Secret,
};

/// The side of the projector's dead letters (a connector may not take this name).
pub const PROJECTOR: &str = "projector";

/// One projector: the topics it reads, the database it projects into.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorConfig {
    /// The projector's name: its Kafka consumer group (unless `kafka."group.id"` says
    /// otherwise) and the owner of its offsets in the projection database. Keep it stable.
    pub name: String,
    /// librdkafka properties, passed through unchanged; `bootstrap.servers` is required.
    #[serde(default)]
    pub kafka: KafkaProperties,
    /// The registry the events' schemas are in.
    pub schema_registry: RegistryConfig,
    /// Which topics are projected.
    #[serde(default)]
    pub topics: ProjectorTopics,
    /// Where the read model lives.
    pub projection: ProjectionConfig,
    /// Where `project` serves its metrics (Prometheus text format) and health probes;
    /// none when absent.
    pub metrics: Option<MetricsConfig>,
    /// When `/health/ready` answers 503.
    #[serde(default)]
    pub health: ProjectorHealth,
    /// The keys the environment set (`FHIR_CDC__…`); every other value is the file's.
    #[serde(skip)]
    pub from_environment: Vec<crate::config::Override>,
}

/// When the projector counts as not ready.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorHealth {
    /// `/health/ready` answers 503 while the last batch applied was more than this many
    /// seconds behind Kafka (its oldest message's timestamp). Default 60.
    #[serde(default = "default_ready_lag_seconds")]
    pub ready_lag_seconds: u64,
}

impl Default for ProjectorHealth {
    fn default() -> Self {
        Self {
            ready_lag_seconds: default_ready_lag_seconds(),
        }
    }
}

fn default_ready_lag_seconds() -> u64 {
    60
}

/// The canonical topics to read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorTopics {
    /// The connectors' topic prefix: every `<prefix>.<domain>.<ResourceType>` topic that
    /// exists at start is read (not the dead-letter topics). Dead letters of the projector
    /// go to `<prefix>.dlq.projector`. Default `fhir`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Read exactly these topics instead of every event topic under the prefix.
    #[serde(default)]
    pub include: Vec<String>,
}

impl Default for ProjectorTopics {
    fn default() -> Self {
        Self {
            prefix: default_prefix(),
            include: Vec::new(),
        }
    }
}

fn default_prefix() -> String {
    "fhir".to_owned()
}

/// The PostgreSQL database of the read model.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionConfig {
    /// `postgres://user:password@host:port/database`; the role must be able to create the
    /// schema (or own it).
    pub url: Secret,
    /// The schema the projector creates and migrates. Default `fhir_projection`.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Events applied per database transaction, at most. Default 500.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long a batch waits to fill before it is applied anyway (ms). Default 100.
    #[serde(default = "default_max_batch_ms")]
    pub max_batch_ms: u64,
    /// Database connections a batch is written on at once, each taking a share of its
    /// resources (all the events of one resource on the same). Default 1: a batch is one
    /// transaction with its offsets. With more, the offsets commit with the last part and
    /// the ledger recognizes the parts a crash left committed.
    #[serde(default = "default_connections")]
    pub connections: usize,
}

fn default_connections() -> usize {
    1
}

fn default_schema() -> String {
    "fhir_projection".to_owned()
}

fn default_max_batch() -> usize {
    500
}

fn default_max_batch_ms() -> u64 {
    100
}

impl ProjectorConfig {
    /// Whether the configuration file at `path` is a projector's (it has a `[projection]`
    /// table) rather than a connector's.
    pub fn is_one(path: &Path) -> Result<bool, ConfigError> {
        let table: toml::Table = read_toml(path)?;
        Ok(table.contains_key("projection"))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let (mut config, overrides): (Self, _) = read_configured(path)?;
        config.from_environment = overrides;
        if let Some(dir) = path.parent() {
            config.schema_registry.resolve_paths(dir);
        }
        let invalid = |field, problem: &str| ConfigError::Invalid {
            path: shown.clone(),
            field,
            problem: problem.to_owned(),
        };
        let identifier = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if config.name.is_empty() || config.name.len() > 64 {
            return Err(invalid("name", "must be 1–64 characters"));
        }
        if !identifier(&config.projection.schema) {
            return Err(invalid(
                "projection.schema",
                "must be a plain lower-case SQL identifier (letters, digits, _)",
            ));
        }
        if config.projection.max_batch == 0 {
            return Err(invalid("projection.max_batch", "must be at least 1"));
        }
        if !(1..=16).contains(&config.projection.connections) {
            return Err(invalid("projection.connections", "must be from 1 to 16"));
        }
        if config.kafka.get("bootstrap.servers").is_none() {
            return Err(invalid("kafka", "needs \"bootstrap.servers\""));
        }
        if let Err((field, problem)) = config.schema_registry.validate() {
            return Err(invalid(field, &problem));
        }
        Ok(config)
    }

    /// `<prefix>.dlq.projector`: where messages it cannot apply go.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlq.{}", self.topics.prefix, PROJECTOR)
    }

    /// The consumer group: `kafka."group.id"`, else the projector's name.
    pub fn group_id(&self) -> &str {
        self.kafka.get("group.id").unwrap_or(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ProjectorConfig, ConfigError> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        ProjectorConfig::load(file.path())
    }

    const GOOD: &str = r#"name = "lab-projection"
[kafka]
"bootstrap.servers" = "127.0.0.1:9092"
[schema_registry]
url = "http://127.0.0.1:8081"
[projection]
url = "postgres://u:p@127.0.0.1/db"
"#;

    #[test]
    fn defaults_and_the_group() {
        let config = load(GOOD).unwrap();
        assert_eq!(config.projection.schema, "fhir_projection");
        assert_eq!(config.projection.max_batch, 500);
        assert_eq!(config.projection.connections, 1);
        assert_eq!(config.topics.prefix, "fhir");
        assert_eq!(config.group_id(), "lab-projection");
    }

    #[test]
    fn bad_configurations_name_the_field() {
        for (text, expected) in [
            (
                GOOD.replace("[projection]", "[projection]\nschema = \"Bad-Name\""),
                "projection.schema: must be a plain lower-case SQL identifier",
            ),
            (
                GOOD.replace("[projection]", "[projection]\nmax_batch = 0"),
                "projection.max_batch: must be at least 1",
            ),
            (
                GOOD.replace("[projection]", "[projection]\nconnections = 0"),
                "projection.connections: must be from 1 to 16",
            ),
            (
                GOOD.replace("\"bootstrap.servers\" = \"127.0.0.1:9092\"", ""),
                "kafka: needs \"bootstrap.servers\"",
            ),
            (
                GOOD.replace("[projection]", "[projection]\nbatch = 3"),
                "unknown field `batch`",
            ),
        ] {
            let error = load(&text).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
