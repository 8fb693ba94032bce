//! The `fhir-cdc` command line. Only subcommands that work are listed.

mod check;
mod dlq;
mod offsets;
mod plan;
mod preview;
mod project;
mod reconcile;
mod replay;
mod run;
mod schemas;
mod snapshot;
mod tail;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Change data capture from legacy healthcare databases into FHIR R4 events on Kafka.
#[derive(Debug, Parser)]
#[command(name = "fhir-cdc", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `fhir_cdc=debug`.
    #[arg(long, global = true, env = "FHIR_CDC_LOG", default_value = "info")]
    pub log: String,

    /// Log lines as human text (the default) or as one JSON object per line (time, level,
    /// component, the message and its fields) for a log pipeline.
    #[arg(
        long,
        global = true,
        env = "FHIR_CDC_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a connector configuration and test every system it names: the source
    /// database's replication prerequisites, Kafka and the schema registry.
    Check(check::CheckArgs),
    /// Show what `run` would do with these config and mapping files, compared with what
    /// the deployment has, doing none of it: exit 0 when safe to roll out, 1 when it would
    /// break consumers.
    Plan(plan::PlanArgs),
    /// Capture changes from the source into Kafka until stopped: the replication stream or
    /// binary log, with snapshot chunks read alongside it; positions acknowledged and the
    /// connector's state saved only after Kafka.
    Run(run::RunArgs),
    /// Print the FHIR resources the mappings make of live rows, writing nothing anywhere.
    Preview(preview::PreviewArgs),
    /// Print canonical events from Kafka, decoded through the schema registry, one JSON
    /// object per line.
    Tail(tail::TailArgs),
    /// Project the canonical topics into a PostgreSQL read model, each event exactly once.
    Project(project::ProjectArgs),
    /// Project the topics again from a point in the log (`earliest` or a time) into the
    /// same read model; what is already applied changes nothing.
    Replay(replay::ReplayArgs),
    /// List, show and replay the dead letters of the connectors and the projector.
    Dlq(dlq::DlqArgs),
    /// Ask a running connector to read a table again, or the rows matching a condition,
    /// and wait until their events are in Kafka (MySQL/MariaDB: through the signal table).
    Snapshot(snapshot::SnapshotArgs),
    /// Compare the source, the log and a projection resource by resource, once: every
    /// drifted resource named with its class; exit 1 when any drifted.
    Reconcile(reconcile::ReconcileArgs),
    /// Show the connector's stored state (source position, snapshot progress), or reset
    /// it to take a snapshot again or to skip to the source's current end.
    Offsets(offsets::OffsetsArgs),
    /// Generate or check the Avro schemas of canonical events (schemas/*.avsc).
    Schemas(schemas::SchemasArgs),
}

/// A time given on the command line (RFC 3339).
fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.to_utc())
        .map_err(|e| format!("not an RFC 3339 time ({e}); write e.g. 2024-03-05T14:30:00Z"))
}

/// Exit status for a configuration the program cannot use at all.
pub const EXIT_BAD_CONFIG: u8 = 2;

/// The tables `config`'s mappings read, as `schema.table`; a configuration without
/// mappings, or whose mappings do not load, is unusable here.
fn mapped_tables(config: &crate::config::ConnectorConfig) -> Result<Vec<String>, (u8, String)> {
    let bad = |message: String| (EXIT_BAD_CONFIG, message);
    let mappings = config
        .mappings
        .as_ref()
        .ok_or_else(|| bad("the configuration has no [mappings]".into()))?;
    let mappings = crate::mapping::load_dir(&mappings.path).map_err(|e| bad(e.to_string()))?;
    Ok(crate::mapping::source_tables(&mappings)
        .into_iter()
        .map(|(schema, table)| format!("{schema}.{table}"))
        .collect())
}

impl Cli {
    /// The async workers the subcommand wants, when not the runtime's default (one per
    /// core, or `TOKIO_WORKER_THREADS`). `run` wants one: its mapping stage has a thread of
    /// its own, and its async work is the source — the replication client reading the
    /// socket and the decoder taking each message from it — which on one worker hands each
    /// message over on the same core, without waking another thread. Alternating benchmark
    /// runs, ten each: median 75.6 % of the ceiling against 72.0 % with two workers, CPU per
    /// change 12.8 against 13.3 µs, peak RSS 51-53 against 52-56 MiB.
    pub fn worker_threads(&self) -> Option<usize> {
        match self.command {
            Command::Run(_) if std::env::var_os("TOKIO_WORKER_THREADS").is_none() => Some(1),
            _ => None,
        }
    }

    /// Run the chosen subcommand; the exit code says how it went.
    pub async fn run(self) -> ExitCode {
        match self.command {
            Command::Check(args) => check::run(args).await,
            Command::Dlq(args) => dlq::run(args).await,
            Command::Offsets(args) => offsets::run(args).await,
            Command::Plan(args) => plan::run(args).await,
            Command::Preview(args) => preview::run(args).await,
            Command::Project(args) => project::run(args).await,
            Command::Replay(args) => replay::run(args).await,
            Command::Run(args) => run::run(args).await,
            Command::Schemas(args) => schemas::run(args),
            Command::Snapshot(args) => snapshot::run(args).await,
            Command::Reconcile(args) => reconcile::run(args).await,
            Command::Tail(args) => tail::run(args).await,
        }
    }
}
