//! The connector configuration: one TOML file per connector (see `connectors/`).
//!
//! A typed contract: unknown keys are errors, every field is documented here (this is the
//! reference), and [`ConnectorConfig::load`] fails at start-up with the file, the line and
//! what is wrong. Strings may reference secrets as `${env:VAR}` or `${file:path}`
//! ([`interpolate`]); credentials live in [`Secret`]s, which never print.

mod interpolate;
mod kafka;
mod secret;

use std::{fmt, path::Path};

use serde::{Deserialize, Deserializer};
use thiserror::Error;

pub use self::{interpolate::InterpolateError, kafka::KafkaProperties, secret::Secret};

/// One connector: a source database, the Kafka cluster it writes to, the schema registry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// The connector's name. It goes into every event id, the dead-letter topic
    /// (`<prefix>.dlq.<name>`) and metric labels, so it must stay stable for the life of the
    /// connector. 1–64 characters: letters, digits, `-`, `_`.
    pub name: String,
    /// The database to capture changes from.
    pub source: SourceConfig,
    /// librdkafka properties, passed through unchanged (see [`KafkaProperties`]).
    /// `bootstrap.servers` is required.
    #[serde(default)]
    pub kafka: KafkaProperties,
    /// The Confluent-compatible schema registry that holds the events' Avro schemas.
    pub schema_registry: RegistryConfig,
}

/// The source database.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Which database: `postgres` or `mysql` (MySQL and MariaDB). SQL Server is not
    /// implemented yet and is refused.
    pub kind: SourceKind,
    /// Connection URL, usually a reference to a secret:
    /// `postgres://user:password@host:port/database` or
    /// `mysql://user:password@host:port/database`.
    pub url: Secret,
}

/// The kinds of source database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Postgres,
    Mysql,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        })
    }
}

/// The schema registry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Root of the Confluent-compatible REST API, e.g. `http://registry:8081` for Confluent
    /// or Karapace, `http://registry:8080/apis/ccompat/v7` for Apicurio.
    #[serde(deserialize_with = "interpolated")]
    pub url: String,
}

/// Why a configuration cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the file: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {field}: {problem}")]
    Invalid {
        path: String,
        field: &'static str,
        problem: String,
    },
}

impl ConnectorConfig {
    /// Read, parse and validate a connector configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        config
            .validate()
            .map_err(|(field, problem)| ConfigError::Invalid {
                path: shown,
                field,
                problem,
            })?;
        Ok(config)
    }

    /// Check the constraints the types cannot express; on failure, the field and the
    /// broken constraint.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let name_ok = (1..=64).contains(&self.name.len())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err((
                "name",
                format!(
                    "`{}` is not a valid connector name: use 1-64 letters, digits, '-' or '_'",
                    self.name
                ),
            ));
        }
        let url = self.source.url.expose();
        let schemes: &[&str] = match self.source.kind {
            SourceKind::Postgres => &["postgres://", "postgresql://"],
            SourceKind::Mysql => &["mysql://", "mariadb://"],
        };
        // PostgreSQL also takes libpq's `key=value` form.
        let key_value_form = self.source.kind == SourceKind::Postgres && url.contains('=');
        if !key_value_form && !schemes.iter().any(|s| url.starts_with(s)) {
            return Err((
                "source.url",
                format!(
                    "a {} source needs a URL starting with {}",
                    self.source.kind,
                    schemes.join(" or ")
                ),
            ));
        }
        if self
            .kafka
            .get("bootstrap.servers")
            .is_none_or(str::is_empty)
        {
            return Err((
                "kafka.bootstrap.servers",
                "missing: list the Kafka brokers as host:port[,host:port…]".into(),
            ));
        }
        let registry = &self.schema_registry.url;
        if !(registry.starts_with("http://") || registry.starts_with("https://")) {
            return Err((
                "schema_registry.url",
                format!("`{registry}` is not an http:// or https:// URL"),
            ));
        }
        Ok(())
    }
}

/// Deserialize a non-secret string, resolving `${env:…}` / `${file:…}` references.
fn interpolated<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let raw = String::deserialize(deserializer)?;
    interpolate::resolve(&raw).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConnectorConfig, ConfigError> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        ConnectorConfig::load(file.path())
    }

    const VALID: &str = r#"
name = "lab"
[source]
kind = "postgres"
url = "postgres://u:p@localhost:5432/lab"
[kafka]
bootstrap.servers = "localhost:9092"
[schema_registry]
url = "http://localhost:8081"
"#;

    #[test]
    fn a_complete_file_loads() {
        let config = parse(VALID).unwrap();
        assert_eq!(config.name, "lab");
        assert_eq!(config.source.kind, SourceKind::Postgres);
        assert_eq!(
            config.kafka.get("bootstrap.servers"),
            Some("localhost:9092")
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let text = VALID.replace("[source]", "[source]\nslot_nmae = \"x\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("slot_nmae"), "{err}");
    }

    #[test]
    fn unknown_source_kinds_are_refused() {
        let err = parse(&VALID.replace("\"postgres\"", "\"sqlserver\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `sqlserver`"), "{err}");
    }

    #[test]
    fn broken_constraints_name_the_field() {
        let cases = [
            (VALID.replace("\"lab\"", "\"lab system\""), "name"),
            (VALID.replace("postgres://u", "mysql://u"), "source.url"),
            (
                VALID.replace("bootstrap.servers", "client.id"),
                "kafka.bootstrap.servers",
            ),
            (
                VALID.replace("http://localhost:8081", "localhost:8081"),
                "schema_registry.url",
            ),
        ];
        for (text, field) in cases {
            match parse(&text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected {field} to be invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn unresolvable_secrets_fail_with_the_reference() {
        let text = VALID.replace(
            "\"postgres://u:p@localhost:5432/lab\"",
            "\"${env:FHIR_CDC_TEST_UNSET_SECRET}\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("FHIR_CDC_TEST_UNSET_SECRET is not set"),
            "{err}"
        );
        assert!(err.contains("line 5"), "{err}");
    }
}
