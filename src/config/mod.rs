//! The connector configuration: one TOML file per connector (see `connectors/`).
//!
//! A typed contract: unknown keys are errors, every field is documented here (this is the
//! reference), and [`ConnectorConfig::load`] fails at start-up with the file, the line and
//! what is wrong. Strings may reference secrets as `${env:VAR}` or `${file:path}`
//! ([`interpolate`]); credentials live in [`Secret`]s, which never print.

pub mod ado;
pub mod environment;
mod interpolate;
mod kafka;
mod secret;
mod source;
mod url;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use thiserror::Error;

use crate::fhir::Sensitivity;

pub use self::{
    environment::Override,
    interpolate::InterpolateError,
    kafka::{KafkaProperties, TopicSettings},
    secret::{redact_urls, Secret},
    source::{
        ChunkConfig, HeartbeatConfig, Milliseconds, MysqlConfig, Named, PollConfig, PostgresConfig,
        ServerId, SignalConfig, SignalData, SnapshotConfig, SnapshotMode, SourceConfig, SourceKind,
        SqlServerConfig,
    },
    url::{take_query_parameters, Parameter},
};

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
    /// The mapping files this connector runs. Needed by `run`; `check` does without.
    pub mappings: Option<MappingsConfig>,
    /// The topics events go to.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// The Prometheus endpoint of `run`. Absent: none.
    pub metrics: Option<MetricsConfig>,
    /// What the connector's dead letters hold.
    #[serde(default)]
    pub dead_letters: DeadLettersConfig,
    /// When the connector calls itself stalled.
    #[serde(default)]
    pub health: HealthConfig,
    /// The keys the environment set (`FHIR_CDC__…`, see [`environment`]); every other
    /// value is the file's.
    #[serde(skip)]
    pub from_environment: Vec<Override>,
}

/// When delivery counts as stalled: changes wait (read and not yet acknowledged by Kafka,
/// or the connector restarting after a transient failure) and nothing has moved for
/// `stall_after_seconds`. A stall is warned of once, naming what delivery waits on (Kafka,
/// the schema registry, the database), and its end is logged with how long it lasted.
/// `/health/ready` answers 503 during a stall, and while the source lag is above
/// `ready_lag_seconds`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds without progress after which waiting changes make a stall. Default 30.
    #[serde(default = "default_stall_after_seconds")]
    pub stall_after_seconds: u64,
    /// The source lag (seconds) above which `/health/ready` answers 503. Default 60.
    #[serde(default = "default_ready_lag_seconds")]
    pub ready_lag_seconds: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            stall_after_seconds: default_stall_after_seconds(),
            ready_lag_seconds: default_ready_lag_seconds(),
        }
    }
}

impl HealthConfig {
    pub fn stall_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stall_after_seconds)
    }

    pub fn ready_lag(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ready_lag_seconds)
    }
}

fn default_stall_after_seconds() -> u64 {
    30
}

fn default_ready_lag_seconds() -> u64 {
    60
}

/// What a dead letter holds of the row that failed (see `pipeline::dead_letter`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersConfig {
    #[serde(default)]
    pub rows: DeadLetterRows,
}

/// How much of the failed row a dead letter holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterRows {
    /// The row, with the columns the table's mappings protect as the events carry them.
    #[default]
    Protected,
    /// The row as the database sent it, every value in clear.
    Full,
    /// No row: the key's values (protected as above), table, position and reason.
    None,
}

impl DeadLetterRows {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterRows::Protected => "protected",
            DeadLetterRows::Full => "full",
            DeadLetterRows::None => "none",
        }
    }
}

/// Where `run` serves its metrics (Prometheus text format).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// The address to listen on, e.g. `127.0.0.1:9464` (`0.0.0.0:9464` for every
    /// interface); scrape `http://<address>/metrics`.
    pub listen: std::net::SocketAddr,
}

/// Which mappings run, and what they need.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingsConfig {
    /// A directory of mapping files (searched recursively), relative to this config file.
    pub path: PathBuf,
    /// The key for `protect: token` (HMAC-SHA-256); required when a mapping tokenizes.
    pub token_key: Option<Secret>,
    /// Names the legacy system in every event's provenance (a URI such as
    /// `urn:oid:2.16.840.1.113883.19.5`). Default: the connector's name.
    #[serde(default, deserialize_with = "optional_interpolated")]
    pub source_system: Option<String>,
}

/// Topic naming and creation, by class: events of `sensitivity: normal` mappings in
/// `<prefix>.<domain>.<ResourceType>`, of `restricted` ones in
/// `<prefix>.restricted.<domain>.<ResourceType>` (so that ACLs can be granted per class),
/// dead letters in `<prefix>.dlq.<connector>`. Topics are created when missing, with their
/// class's settings; never changed or deleted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Debezium's `topic.prefix`. Default `fhir`.
    #[serde(default = "default_topic_prefix")]
    pub prefix: String,
    /// Partitions of each created topic. Default 1.
    #[serde(default = "default_one")]
    pub partitions: i32,
    /// Replication factor of each created topic. Default 1 (raise it on a real cluster).
    #[serde(default = "default_one")]
    pub replication_factor: i32,
    /// The topics of `sensitivity: normal` mappings.
    #[serde(default)]
    pub normal: TopicClass,
    /// The topics of `sensitivity: restricted` mappings.
    #[serde(default)]
    pub restricted: TopicClass,
    /// The connector's dead-letter topic (its name is fixed).
    #[serde(default)]
    pub dead_letters: TopicClass,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            prefix: default_topic_prefix(),
            partitions: default_one(),
            replication_factor: default_one(),
            normal: TopicClass::default(),
            restricted: TopicClass::default(),
            dead_letters: TopicClass::default(),
        }
    }
}

/// The topics of one class: how they are named, and the settings they are created with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicClass {
    /// The name of each topic: `{prefix}`, `{domain}` and `{resource}` (the resource type)
    /// are replaced. Must start with `{prefix}.` and hold `{resource}`.
    pub name: Option<String>,
    /// Kafka topic settings the topics are created with (`retention.ms`,
    /// `cleanup.policy`, `min.insync.replicas`, …).
    #[serde(default)]
    pub config: TopicSettings,
}

impl TopicsConfig {
    const NORMAL: &'static str = "{prefix}.{domain}.{resource}";
    const RESTRICTED: &'static str = "{prefix}.restricted.{domain}.{resource}";

    /// The class of a mapping's topics.
    pub fn class(&self, sensitivity: Sensitivity) -> &TopicClass {
        match sensitivity {
            Sensitivity::Normal => &self.normal,
            Sensitivity::Restricted => &self.restricted,
        }
    }

    fn pattern(&self, sensitivity: Sensitivity) -> &str {
        let default = match sensitivity {
            Sensitivity::Normal => Self::NORMAL,
            Sensitivity::Restricted => Self::RESTRICTED,
        };
        self.class(sensitivity).name.as_deref().unwrap_or(default)
    }

    /// The topic of `domain`'s `resource_type` events from mappings of `sensitivity`.
    pub fn event_topic(
        &self,
        sensitivity: Sensitivity,
        domain: &str,
        resource_type: &str,
    ) -> String {
        let pattern = self.pattern(sensitivity);
        let mut name = String::with_capacity(pattern.len() + 32);
        let mut rest = pattern;
        while let Some(open) = rest.find('{') {
            name.push_str(&rest[..open]);
            let close = rest[open..].find('}').map_or(rest.len(), |c| open + c + 1);
            name.push_str(match &rest[open..close] {
                "{prefix}" => &self.prefix,
                "{domain}" => domain,
                "{resource}" => resource_type,
                other => other,
            });
            rest = &rest[close..];
        }
        name.push_str(rest);
        name
    }

    /// Check the name patterns; on failure, the field and the problem.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.dead_letters.name.is_some() {
            return Err((
                "topics.dead_letters.name",
                "the dead-letter topic is always <prefix>.dlq.<connector> (`fhir-cdc dlq` finds it by that name); set only its `config`".into(),
            ));
        }
        for (field, sensitivity) in [
            ("topics.normal.name", Sensitivity::Normal),
            ("topics.restricted.name", Sensitivity::Restricted),
        ] {
            let pattern = self.pattern(sensitivity);
            let literal = pattern
                .replace("{prefix}", "")
                .replace("{domain}", "")
                .replace("{resource}", "");
            let reserved = ["dlq.", "reconcile.", "state"]
                .iter()
                .any(|r| pattern.starts_with(&format!("{{prefix}}.{r}")));
            if !pattern.starts_with("{prefix}.")
                || !pattern.contains("{resource}")
                || reserved
                || !literal
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err((
                    field,
                    format!("`{pattern}` is not a topic name pattern: start it with `{{prefix}}.`, include `{{resource}}` (and usually `{{domain}}`), use only letters, digits, `.`, `_`, `-` besides them, and do not start with `{{prefix}}.dlq.`, `{{prefix}}.reconcile.` or `{{prefix}}.state`"),
                ));
            }
        }
        if self.pattern(Sensitivity::Normal) == self.pattern(Sensitivity::Restricted) {
            return Err((
                "topics.restricted.name",
                "restricted and normal events would share topics: give them different names, so that ACLs can keep restricted data apart".into(),
            ));
        }
        Ok(())
    }
}

fn default_topic_prefix() -> String {
    "fhir".to_owned()
}

fn default_one() -> i32 {
    1
}

/// The schema registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Root of the Confluent-compatible REST API, e.g. `http://registry:8081` for Confluent
    /// or Karapace, `http://registry:8080/apis/ccompat/v7` for Apicurio.
    #[serde(deserialize_with = "interpolated")]
    pub url: String,
    /// `username` and `password`: HTTP basic authentication (Confluent Cloud: the API key
    /// and secret). The password is usually a `${env:…}` or `${file:…}` reference.
    #[serde(default, deserialize_with = "optional_interpolated")]
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `bearer_token`: sent as `Authorization: Bearer …` (an OAuth access token, or the
    /// static token of a gateway in front of the registry); instead of basic
    /// authentication. Usually a `${file:…}` reference, which a token refresher rewrites:
    /// it is read when the process starts.
    pub bearer_token: Option<Secret>,
    /// `ca_file`: a PEM file of the certificate authorities an `https://` registry's
    /// certificate is checked against, in addition to the system's. Relative to this
    /// config file.
    #[serde(default, deserialize_with = "optional_interpolated_path")]
    pub ca_file: Option<PathBuf>,
    /// `compatibility`: the level set on each subject when fhir-cdc registers its first
    /// version (Confluent's names: `BACKWARD`, `BACKWARD_TRANSITIVE`, `FORWARD`,
    /// `FORWARD_TRANSITIVE`, `FULL`, `FULL_TRANSITIVE`, `NONE`). Default `BACKWARD`: a
    /// consumer reading with the newest schema reads every older event. A subject that
    /// already exists keeps the level the registry has for it; a new version it would not
    /// admit stops `run` before anything is written, naming the fields.
    #[serde(default)]
    pub compatibility: Compatibility,
}

/// A schema registry's compatibility level, by Confluent's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    #[default]
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
    None,
}

impl Compatibility {
    /// Confluent's name of the level.
    pub fn name(self) -> &'static str {
        match self {
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
            Compatibility::None => "NONE",
        }
    }

    /// The level named `name` (Confluent's name, any case).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Compatibility::Backward,
            Compatibility::BackwardTransitive,
            Compatibility::Forward,
            Compatibility::ForwardTransitive,
            Compatibility::Full,
            Compatibility::FullTransitive,
            Compatibility::None,
        ]
        .into_iter()
        .find(|level| level.name().eq_ignore_ascii_case(name))
    }

    /// Whether a new version must read what older ones wrote.
    pub fn backward(self) -> bool {
        !matches!(
            self,
            Compatibility::None | Compatibility::Forward | Compatibility::ForwardTransitive
        )
    }

    /// Whether older versions must read what a new one writes.
    pub fn forward(self) -> bool {
        !matches!(
            self,
            Compatibility::None | Compatibility::Backward | Compatibility::BackwardTransitive
        )
    }

    /// Whether a new version is checked against every version, not only the latest.
    pub fn transitive(self) -> bool {
        matches!(
            self,
            Compatibility::BackwardTransitive
                | Compatibility::ForwardTransitive
                | Compatibility::FullTransitive
        )
    }
}

/// How requests to the registry authenticate.
#[derive(Debug, Clone, Copy)]
pub enum RegistryAuth<'a> {
    None,
    Basic(&'a str, &'a Secret),
    Bearer(&'a Secret),
}

impl RegistryConfig {
    /// The authentication configured (valid once [`Self::validate`] passed).
    pub fn auth(&self) -> RegistryAuth<'_> {
        match (&self.username, &self.password, &self.bearer_token) {
            (Some(user), Some(password), _) => RegistryAuth::Basic(user, password),
            (_, _, Some(token)) => RegistryAuth::Bearer(token),
            _ => RegistryAuth::None,
        }
    }

    /// Make `ca_file` relative to `dir`, the config file's directory.
    pub fn resolve_paths(&mut self, dir: &Path) {
        if let Some(ca) = self.ca_file.as_mut().filter(|ca| ca.is_relative()) {
            *ca = lexically_normal(&dir.join(&*ca));
        }
    }

    /// The constraints the types cannot express: the field and the broken constraint.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let url = &self.url;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err((
                "schema_registry.url",
                format!("`{}` is not an http:// or https:// URL", redact_urls(url)),
            ));
        }
        if self.bearer_token.is_some() && (self.username.is_some() || self.password.is_some()) {
            return Err((
                "schema_registry.bearer_token",
                "is set with schema_registry.username/password: give one way to authenticate"
                    .into(),
            ));
        }
        match (&self.username, &self.password) {
            (Some(_), None) => Err((
                "schema_registry.username",
                "is set without schema_registry.password: basic authentication needs both".into(),
            )),
            (None, Some(_)) => Err((
                "schema_registry.password",
                "is set without schema_registry.username: basic authentication needs both".into(),
            )),
            _ => Ok(()),
        }
    }
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
    #[error("{path}, with the environment's overrides: {problem}")]
    Environment { path: String, problem: String },
}

/// Read a TOML configuration file into `T` with the environment's `FHIR_CDC__…` overrides
/// applied ([`environment`]), and what they set.
pub fn read_configured<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<(T, Vec<Override>), ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_configured(&text, &shown, &environment::variables())
}

/// Parse `text` (the file shown as `shown`) into `T` with `variables` (override name →
/// value) applied. The file's own mistakes keep their `file:line:column`; what only the
/// overrides break names the variables.
fn parse_configured<T: serde::de::DeserializeOwned>(
    text: &str,
    shown: &str,
    variables: &std::collections::BTreeMap<String, String>,
) -> Result<(T, Vec<Override>), ConfigError> {
    if variables.is_empty() {
        return parse_toml(text, shown).map(|config| (config, Vec::new()));
    }
    let mut table: toml::Table = parse_toml(text, shown)?;
    let overridden = |problem| ConfigError::Environment {
        path: shown.to_owned(),
        problem,
    };
    let overrides = environment::apply(&mut table, variables).map_err(overridden)?;
    match toml::Value::Table(table).try_into::<T>() {
        Ok(config) => Ok((config, overrides)),
        Err(e) => {
            parse_toml::<T>(text, shown)?;
            let names: Vec<&str> = overrides.iter().map(|o| o.variable.as_str()).collect();
            Err(overridden(format!(
                "{} (set by {})",
                without_values(e.message()),
                names.join(", ")
            )))
        }
    }
}

/// Read and parse a TOML configuration file into `T` (secrets resolved as fields parse).
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_toml(&text, &shown)
}

/// Parse the TOML `text` of the file shown as `shown` into `T`.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    shown: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: parse_place(shown, text, e.span()),
        message: without_values(e.message()),
    })
}

/// `path:line:column` of the start of `span` in `text`: the place of a parse error without
/// the line itself, which may hold a secret.
fn parse_place(path: &str, text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(at) = span.map(|s| s.start.min(text.len())) else {
        return path.to_owned();
    };
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{path}:{line}:{column}")
}

/// A parse error's message without the values it quotes (serde names a mistyped string by
/// its value: `invalid type: string "…", expected …`), which may be secrets.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message.trim_end();
    while let Some(at) = rest.find("string \"") {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        let after = &rest[at + "string \"".len()..];
        rest = after.find('"').map_or("", |end| &after[end + 1..]);
    }
    out.push_str(rest);
    out
}

impl ConnectorConfig {
    /// Read, parse and validate a connector configuration file, with the environment's
    /// `FHIR_CDC__…` overrides applied.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (mut config, overrides): (Self, _) = read_configured(path)?;
        config.from_environment = overrides;
        Self::validated(config, path)
    }

    /// Parse and validate `text` as the connector configuration file at `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::validated(parse_toml(text, &path.display().to_string())?, path)
    }

    fn validated(mut config: Self, path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        // Mapping paths are relative to the config file, wherever the connector runs from.
        if let Some(dir) = path.parent() {
            if let Some(mappings) = config.mappings.as_mut().filter(|m| m.path.is_relative()) {
                mappings.path = lexically_normal(&dir.join(&mappings.path));
            }
            config.schema_registry.resolve_paths(dir);
        }
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
    /// `<prefix>.dlq.<name>`: where changes no mapping could turn into an event go.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}.dlq.{}", self.topics.prefix, self.name)
    }

    /// `<prefix>.reconcile.<name>`: where `fhir-cdc reconcile` reports each drifted
    /// resource of this connector.
    pub fn reconcile_topic(&self) -> String {
        format!("{}.reconcile.{}", self.topics.prefix, self.name)
    }

    /// `<prefix>.state`: the compacted topic the connector keeps its state in (one key per
    /// connector; see `offsets::StateStore`).
    pub fn state_topic(&self) -> String {
        format!("{}.state", self.topics.prefix)
    }

    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        // `projector` names the projector's dead-letter topic (`<prefix>.dlq.projector`).
        let name_ok = (1..=64).contains(&self.name.len())
            && self.name != "projector"
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err((
                "name",
                format!(
                    "`{}` is not a valid connector name: use 1-64 letters, digits, '-' or '_' (not `projector`, the projector's dead-letter topic)",
                    self.name
                ),
            ));
        }
        let url = self.source.url().expose();
        let kind = self.source.kind();
        let schemes: &[&str] = match kind {
            SourceKind::Postgres => &["postgres://", "postgresql://"],
            SourceKind::Mysql => &["mysql://", "mariadb://"],
            SourceKind::Sqlserver => &[],
        };
        if let SourceConfig::SqlServer(mssql) = &self.source {
            ado::config(&mssql.url).map_err(|e| ("source.url", e))?;
            if mssql.snapshot_chunk_size() == 0 {
                return Err((
                    "source.snapshot.chunk.size",
                    "0 rows per chunk would read nothing: use at least 1 (default 1024)".into(),
                ));
            }
        }
        // PostgreSQL also takes libpq's `key=value` form.
        let key_value_form = kind == SourceKind::Postgres && url.contains('=');
        if kind != SourceKind::Sqlserver
            && !key_value_form
            && !schemes.iter().any(|s| url.starts_with(s))
        {
            return Err((
                "source.url",
                format!(
                    "a {kind} source needs a URL starting with {}",
                    schemes.join(" or ")
                ),
            ));
        }
        let signal = match &self.source {
            SourceConfig::Mysql(mysql) => mysql.signal.as_ref().map(|s| (s, "database.table")),
            SourceConfig::SqlServer(mssql) => mssql.signal.as_ref().map(|s| (s, "schema.table")),
            SourceConfig::Postgres(_) => None,
        };
        if let Some((signal, form)) = signal {
            let named = |part: &str| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$'))
            };
            let collection = &signal.data.collection;
            if !collection
                .split_once('.')
                .is_some_and(|(d, t)| named(d) && named(t))
            {
                return Err((
                    "source.signal.data.collection",
                    format!("`{collection}` is not a table: write it as {form} (letters, digits, `_`, `$`)"),
                ));
            }
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
        if let SourceConfig::Postgres(pg) = &self.source {
            if pg.snapshot_chunk_size() == 0 {
                return Err((
                    "source.snapshot.chunk.size",
                    "0 rows per chunk would read nothing: use at least 1 (default 1024)".into(),
                ));
            }
        }
        if self.health.stall_after_seconds == 0 {
            return Err((
                "health.stall_after_seconds",
                "0 would call every moment a stall: use at least 1 (default 30)".into(),
            ));
        }
        self.topics.validate()?;
        self.schema_registry.validate()
    }
}

fn optional_interpolated<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    interpolated(deserializer).map(Some)
}

fn optional_interpolated_path<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<PathBuf>, D::Error> {
    interpolated(deserializer).map(|path| Some(path.into()))
}

/// Deserialize a non-secret string, resolving `${env:…}` / `${file:…}` references.
fn interpolated<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    let raw = String::deserialize(deserializer)?;
    interpolate::resolve(&raw).map_err(serde::de::Error::custom)
}

/// `a/b/../c` as `a/c`, without touching the file system, so that locations in messages
/// read `mappings/lab/result.yaml`, not `connectors/../mappings/lab/result.yaml`. A `..`
/// with nothing before it to cancel stays.
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component<'_>> = Vec::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_paths_are_normalized_for_messages() {
        for (path, normal) in [
            ("connectors/../mappings/lab", "mappings/lab"),
            ("/etc/fhir-cdc/./conf/../mappings", "/etc/fhir-cdc/mappings"),
            ("../mappings", "../mappings"),
            ("a/..", "."),
        ] {
            assert_eq!(
                lexically_normal(Path::new(path)),
                Path::new(normal),
                "{path}"
            );
        }
    }

    fn parse(text: &str) -> Result<ConnectorConfig, ConfigError> {
        ConnectorConfig::parse(text, Path::new("/etc/fhir-cdc/lab.toml"))
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
        assert_eq!(config.source.kind(), SourceKind::Postgres);
        assert_eq!(
            config.kafka.get("bootstrap.servers"),
            Some("localhost:9092")
        );
    }

    #[test]
    fn registry_compatibility_defaults_to_backward_and_takes_confluents_names_only() {
        assert_eq!(
            parse(VALID).unwrap().schema_registry.compatibility,
            Compatibility::Backward
        );
        let full = parse(&format!("{VALID}compatibility = \"FULL_TRANSITIVE\"\n")).unwrap();
        let level = full.schema_registry.compatibility;
        assert_eq!(level, Compatibility::FullTransitive);
        assert!(level.backward() && level.forward() && level.transitive());
        assert_eq!(
            Compatibility::from_name("forward"),
            Some(Compatibility::Forward)
        );
        let err = parse(&format!("{VALID}compatibility = \"STRICT\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("STRICT") && err.contains("BACKWARD_TRANSITIVE"),
            "{err}"
        );
    }

    #[test]
    fn topic_classes_name_topics_and_carry_their_settings() {
        let config = parse(VALID).unwrap();
        let topics = &config.topics;
        assert_eq!(
            topics.event_topic(Sensitivity::Normal, "lab", "Observation"),
            "fhir.lab.Observation"
        );
        assert_eq!(
            topics.event_topic(Sensitivity::Restricted, "billing", "Claim"),
            "fhir.restricted.billing.Claim"
        );
        let text = format!(
            "{VALID}[topics]\nprefix = \"h\"\n[topics.restricted]\nname = \"{{prefix}}.phi-{{domain}}.{{resource}}.v1\"\nconfig = {{ retention.ms = 86400000, \"cleanup.policy\" = \"delete\" }}\n"
        );
        let config = parse(&text).unwrap();
        let topics = &config.topics;
        assert_eq!(
            topics.event_topic(Sensitivity::Restricted, "billing", "Claim"),
            "h.phi-billing.Claim.v1"
        );
        assert_eq!(
            topics
                .class(Sensitivity::Restricted)
                .config
                .iter()
                .collect::<Vec<_>>(),
            [("cleanup.policy", "delete"), ("retention.ms", "86400000")]
        );
        assert_eq!(topics.class(Sensitivity::Normal).config.iter().count(), 0);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let text = VALID.replace("[source]", "[source]\nslot_nmae = \"x\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(":4:1: unknown field `slot_nmae`"), "{err}");
    }

    #[test]
    fn a_key_of_another_source_kind_is_refused_with_its_line() {
        let text = VALID
            .replace("\"postgres\"", "\"mysql\"\nslot.name = \"x\"")
            .replace("postgres://u", "mysql://u");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains(":5:1: unknown field `slot`"), "{err}");
    }

    #[test]
    fn a_mysql_signal_table_is_named_database_dot_table() {
        let mysql = |signal: &str| {
            VALID
                .replace(
                    "\"postgres\"",
                    &format!("\"mysql\"\nsignal.data.collection = \"{signal}\""),
                )
                .replace("postgres://u", "mysql://u")
        };
        let config = parse(&mysql("billing.fhir_cdc_signal")).unwrap();
        let SourceConfig::Mysql(my) = &config.source else {
            panic!("{config:?}")
        };
        assert_eq!(my.signal_table(), Some("billing.fhir_cdc_signal"));
        for bad in ["fhir_cdc_signal", "billing.", "a.b.c", "billing.sig`nal"] {
            let err = parse(&mysql(bad)).unwrap_err().to_string();
            assert!(
                err.contains("source.signal.data.collection") && err.contains("database.table"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn keys_before_kind_are_read_too() {
        let text = VALID.replace(
            "[source]\n",
            "[source]\nheartbeat.interval.ms = 250\nsnapshot.chunk.size = 10\n",
        );
        let config = parse(&text).unwrap();
        let SourceConfig::Postgres(pg) = &config.source else {
            panic!("{config:?}")
        };
        assert_eq!(
            pg.heartbeat_interval(),
            std::time::Duration::from_millis(250)
        );
        assert_eq!(pg.snapshot_chunk_size(), 10);
        let err = parse(&VALID.replace("kind = \"postgres\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `kind`"), "{err}");
    }

    #[test]
    fn unknown_source_kinds_are_refused() {
        let err = parse(&VALID.replace("\"postgres\"", "\"oracle\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `oracle`"), "{err}");
    }

    #[test]
    fn a_sql_server_source_takes_an_ado_connection_string() {
        let mssql = |url: &str, extra: &str| {
            VALID
                .replace("\"postgres\"", &format!("\"sqlserver\"\n{extra}"))
                .replace(
                    "\"postgres://u:p@localhost:5432/lab\"",
                    &format!("\"{url}\""),
                )
        };
        let good =
            "Server=tcp:db.example,1433;Database=lab;User Id=fhir_cdc;Password=s3cret;Encrypt=true";
        let config = parse(&mssql(good, "poll.interval.ms = 250")).unwrap();
        let SourceConfig::SqlServer(ms) = &config.source else {
            panic!("{config:?}")
        };
        assert_eq!(ms.poll_interval(), std::time::Duration::from_millis(250));
        assert!(!format!("{config:?}").contains("s3cret"));
        let err = parse(&mssql("Server=db;User Id=u;Password=s3cret", ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("source.url") && err.contains("Database"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        let err = parse(&mssql(good, "slot.name = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `slot`"), "{err}");
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
            (
                VALID.replace("[kafka]", "snapshot.chunk.size = 0\n[kafka]"),
                "source.snapshot.chunk.size",
            ),
            (
                format!(
                    "{VALID}[topics.restricted]\nname = \"{{prefix}}.{{domain}}.{{resource}}\""
                ),
                "topics.restricted.name",
            ),
            (
                format!("{VALID}[topics.normal]\nname = \"lab.{{domain}}.{{resource}}\""),
                "topics.normal.name",
            ),
            (
                format!("{VALID}[topics.normal]\nname = \"{{prefix}}.{{domain}}\""),
                "topics.normal.name",
            ),
            (
                format!("{VALID}[topics.normal]\nname = \"{{prefix}}.dlq.{{resource}}\""),
                "topics.normal.name",
            ),
            (
                format!("{VALID}[topics.restricted]\nname = \"{{prefix}}.r/{{resource}}\""),
                "topics.restricted.name",
            ),
            (
                format!("{VALID}[topics.dead_letters]\nname = \"{{prefix}}.letters\""),
                "topics.dead_letters.name",
            ),
            (
                VALID.replace(
                    "http://localhost:8081\"",
                    "http://localhost:8081\"\nusername = \"u\"\npassword = \"p\"\nbearer_token = \"t\"",
                ),
                "schema_registry.bearer_token",
            ),
            (
                format!("{VALID}[health]\nstall_after_seconds = 0"),
                "health.stall_after_seconds",
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
    fn a_mistyped_string_is_not_quoted() {
        assert_eq!(
            without_values("invalid type: string \"hunter2\", expected u32\n"),
            "invalid type: a string, expected u32"
        );
        assert_eq!(
            parse_place("f.toml", "a = 1\nbb = ", Some(9..10)),
            "f.toml:2:4"
        );
        assert_eq!(parse_place("f.toml", "", None), "f.toml");
    }

    #[test]
    fn unresolvable_secrets_fail_with_the_reference() {
        let text = VALID.replace(
            "\"postgres://u:p@localhost:5432/lab\"",
            "\"${env:FHIR_CDC_TEST_UNSET_SECRET}\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains(":5:7: environment variable FHIR_CDC_TEST_UNSET_SECRET is not set"),
            "{err}"
        );
    }
}
