//! What `run` would do with a connector's config and mapping files, compared with what the
//! deployment has — the record `run` left of the mappings it started with, the stored
//! state, the registry's subjects, the topics — without doing any of it: the review step
//! of a config-file-driven rollout (`fhir-cdc plan`).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    canonical::{
        registry::{CodecError, Subjects, Verdict},
        schema::event_schema,
    },
    config::{ConnectorConfig, Override, SnapshotMode, SourceConfig},
    fhir::Sensitivity,
    kafka,
    mapping::{self, Mapping},
    offsets::{ConnectorState, RunningMappings, StateError, StateStore},
    pipeline,
};

/// What a rollout of the files would do.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub connector: String,
    /// The config keys the environment set (the rest are the file's).
    pub from_environment: Vec<Override>,
    /// What the files are compared with.
    pub against: Against,
    pub tables: Vec<TableStep>,
    pub mappings: Vec<MappingStep>,
    pub schemas: Vec<SchemaStep>,
    pub topics: Vec<TopicStep>,
    /// What the connector's Kafka principal must be granted to run these files.
    pub acls: Vec<Acl>,
}

/// What the files are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Against {
    /// The mappings the connector recorded at its last start.
    Recorded,
    /// A stored state, but no record of the mappings (a connector last started by a
    /// fhir-cdc that did not record them): every mapping is new to the plan.
    StateOnly,
    /// Nothing: the connector never ran.
    Nothing,
}

/// A captured table that comes or goes.
#[derive(Debug, Serialize)]
pub struct TableStep {
    /// `schema.table`.
    pub table: String,
    pub change: Change,
    /// Whether `run` reads its rows (an initial snapshot) before its changes.
    pub snapshot: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

/// A mapping that comes, goes or changed version.
#[derive(Debug, Serialize)]
pub struct MappingStep {
    pub id: String,
    pub change: Change,
    /// The table it maps (`schema.table`); `None` for a removed mapping.
    pub table: Option<String>,
    /// The resource types it produces; empty for a removed mapping.
    pub resources: Vec<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// The schema of one event topic's subject.
#[derive(Debug, Serialize)]
pub struct SchemaStep {
    pub subject: String,
    pub resource_type: String,
    /// `first`, `unchanged`, `compatible` or `incompatible`.
    pub verdict: &'static str,
    /// The version it is (unchanged) or would be (first, compatible).
    pub version: Option<u32>,
    /// The level a first version sets.
    pub compatibility: Option<&'static str>,
    /// Why the registry would refuse it, naming the fields.
    pub reasons: Vec<String>,
}

/// A topic `run` would create.
#[derive(Debug, Serialize)]
pub struct TopicStep {
    pub topic: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub config: BTreeMap<String, String>,
    /// Holds events of `sensitivity: restricted` mappings.
    pub restricted: bool,
}

/// One grant, in `kafka-acls.sh` terms.
#[derive(Debug, Serialize)]
pub struct Acl {
    pub principal: String,
    pub operations: Vec<&'static str>,
    /// `topic`, `group` or `cluster`.
    pub resource_type: &'static str,
    pub resource: String,
    /// `literal` or `prefixed`.
    pub pattern: &'static str,
}

impl Plan {
    /// Why rolling the files out would break consumers; empty when it is safe.
    pub fn breaking(&self) -> Vec<String> {
        self.schemas
            .iter()
            .filter(|s| s.verdict == "incompatible")
            .map(|s| format!("{}: {}", s.subject, s.reasons.join("; ")))
            .collect()
    }

    /// Whether a rollout changes nothing.
    pub fn nothing_to_do(&self) -> bool {
        self.tables.is_empty()
            && self.mappings.is_empty()
            && self.topics.is_empty()
            && self.schemas.iter().all(|s| s.verdict == "unchanged")
    }
}

/// Why there is no plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the config names no [mappings] directory")]
    NoMappings,
    #[error("{0}")]
    Mappings(#[from] mapping::LoadErrors),
    #[error("reading what the connector stored: {0}")]
    State(#[from] StateError),
    #[error("listing the topics: {0}")]
    Kafka(#[from] kafka::Error),
    #[error("asking the schema registry: {0}")]
    Registry(#[from] CodecError),
}

/// The plan of `config`'s files against the deployment.
pub async fn plan(config: &ConnectorConfig) -> Result<Plan, PlanError> {
    let dir = config.mappings.as_ref().ok_or(PlanError::NoMappings)?;
    let mappings = mapping::load_dir(&dir.path)?;
    let wanted = pipeline::running_mappings(&mappings);
    let (state, recorded) =
        tokio::try_join!(StateStore::peek(config), StateStore::peek_mappings(config))?;
    let against = match (&recorded, &state) {
        (Some(_), _) => Against::Recorded,
        (None, Some(_)) => Against::StateOnly,
        (None, None) => Against::Nothing,
    };
    let recorded = recorded.unwrap_or_default();
    let existing = kafka::topic_names(&config.kafka).await?;
    Ok(Plan {
        connector: config.name.clone(),
        from_environment: config.from_environment.clone(),
        against,
        tables: tables(config, &wanted, &recorded, state.as_ref()),
        mappings: mapping_steps(&mappings, &recorded),
        schemas: schemas(config, &mappings).await?,
        topics: topics(config, &mappings, &existing),
        acls: acls(config),
    })
}

fn tables(
    config: &ConnectorConfig,
    wanted: &RunningMappings,
    recorded: &RunningMappings,
    state: Option<&ConnectorState>,
) -> Vec<TableStep> {
    let snapshots = snapshot_mode(&config.source) != SnapshotMode::Never;
    let complete =
        |table: &str| state.is_some_and(|s| s.tables.get(table).is_some_and(|p| p.complete));
    let added = wanted
        .tables
        .difference(&recorded.tables)
        .map(|table| TableStep {
            table: table.clone(),
            change: Change::Added,
            snapshot: snapshots && !complete(table),
        });
    let removed = recorded
        .tables
        .difference(&wanted.tables)
        .map(|table| TableStep {
            table: table.clone(),
            change: Change::Removed,
            snapshot: false,
        });
    added.chain(removed).collect()
}

fn snapshot_mode(source: &SourceConfig) -> SnapshotMode {
    match source {
        SourceConfig::Postgres(c) => c.snapshot_mode(),
        SourceConfig::Mysql(c) => c.snapshot_mode(),
        SourceConfig::SqlServer(c) => c.snapshot_mode(),
    }
}

fn mapping_steps(mappings: &[Mapping], recorded: &RunningMappings) -> Vec<MappingStep> {
    let mut steps: Vec<MappingStep> = mappings
        .iter()
        .filter_map(|m| {
            let before = recorded.versions.get(&*m.id);
            let change = match before {
                None => Change::Added,
                Some(version) if **version == *m.content_hash => return None,
                Some(_) => Change::Changed,
            };
            Some(MappingStep {
                id: m.id.to_string(),
                change,
                table: Some(m.table.clone()),
                resources: m
                    .resources
                    .iter()
                    .map(|r| r.resource_type.clone())
                    .collect(),
                from: before.cloned(),
                to: Some(m.content_hash.to_string()),
            })
        })
        .collect();
    let kept: BTreeSet<&str> = mappings.iter().map(|m| &*m.id).collect();
    steps.extend(
        recorded
            .versions
            .iter()
            .filter(|(id, _)| !kept.contains(id.as_str()))
            .map(|(id, version)| MappingStep {
                id: id.clone(),
                change: Change::Removed,
                table: None,
                resources: Vec::new(),
                from: Some(version.clone()),
                to: None,
            }),
    );
    steps
}

async fn schemas(
    config: &ConnectorConfig,
    mappings: &[Mapping],
) -> Result<Vec<SchemaStep>, PlanError> {
    let subjects = Subjects::new(&config.schema_registry)?;
    let mut steps = Vec::new();
    for (topic, (resource_type, _)) in pipeline::event_topics(&config.topics, mappings) {
        let subject = format!("{topic}-value");
        let schema = event_schema(&resource_type).to_string();
        let (verdict, version, compatibility, reasons) =
            match subjects.verdict(&subject, &schema).await? {
                Verdict::First(level) => ("first", Some(1), Some(level.name()), Vec::new()),
                Verdict::Unchanged(v) => ("unchanged", Some(v), None, Vec::new()),
                Verdict::Compatible(v) => ("compatible", Some(v), None, Vec::new()),
                Verdict::Incompatible(reasons) => ("incompatible", None, None, reasons),
            };
        steps.push(SchemaStep {
            subject,
            resource_type,
            verdict,
            version,
            compatibility,
            reasons,
        });
    }
    Ok(steps)
}

fn topics(
    config: &ConnectorConfig,
    mappings: &[Mapping],
    existing: &BTreeSet<String>,
) -> Vec<TopicStep> {
    let restricted: BTreeSet<String> = mappings
        .iter()
        .filter(|m| m.sensitivity == Sensitivity::Restricted)
        .flat_map(|m| {
            m.resources.iter().map(|r| {
                config
                    .topics
                    .event_topic(m.sensitivity, &m.domain, &r.resource_type)
            })
        })
        .collect();
    pipeline::topic_specs(config, mappings)
        .into_iter()
        .filter(|spec| !existing.contains(&spec.name))
        .map(|spec| TopicStep {
            restricted: restricted.contains(&spec.name),
            topic: spec.name,
            partitions: spec.partitions,
            replication_factor: spec.replication_factor,
            config: spec.config.into_iter().collect(),
        })
        .collect()
}

/// The connector's grants (docs/operations.md, least privilege): its principal is
/// `User:<sasl.username>`, or named generically without SASL.
fn acls(config: &ConnectorConfig) -> Vec<Acl> {
    let principal = config.kafka.get("sasl.username").map_or_else(
        || "<the connector's principal>".to_owned(),
        |u| format!("User:{u}"),
    );
    let prefix = &config.topics.prefix;
    let grant = |operations: &[&'static str], resource_type, resource: String, pattern| Acl {
        principal: principal.clone(),
        operations: operations.to_vec(),
        resource_type,
        resource,
        pattern,
    };
    vec![
        grant(
            &["Create", "Describe", "DescribeConfigs", "Write"],
            "topic",
            format!("{prefix}."),
            "prefixed",
        ),
        grant(&["Read"], "topic", config.state_topic(), "literal"),
        grant(
            &["Describe"],
            "group",
            kafka::READER_GROUP_PREFIX.to_owned(),
            "prefixed",
        ),
        grant(
            &["IdempotentWrite"],
            "cluster",
            "kafka-cluster".to_owned(),
            "literal",
        ),
    ]
}
