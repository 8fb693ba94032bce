//! `fhir-cdc check`: can this connector (or projector) run here, and are these mappings
//! valid? Every system
//! and every mapping file is checked, all problems are reported at once, each with a fix or
//! a `file:line:column`; exit status 0 only when nothing blocks a start.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::ExitCode,
};

use clap::Args;

use crate::{
    canonical::registry,
    config::{ConnectorConfig, Override},
    consumer::config::ProjectorConfig,
    kafka, mapping,
    preflight::{Finding, Severity},
    source,
};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["config", "mappings"])))]
pub struct CheckArgs {
    /// A connector's or a projector's configuration file (TOML), e.g.
    /// connectors/lab-postgres.toml or connectors/projector.toml: checks the config and
    /// connects to every system it names.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A directory of mapping files (searched recursively), e.g. mappings/: checks every
    /// file against FHIR R4 without connecting anywhere.
    #[arg(long, short)]
    mappings: Option<PathBuf>,
}

pub async fn run(args: CheckArgs) -> ExitCode {
    let mut code = ExitCode::SUCCESS;
    if let Some(dir) = &args.mappings {
        code = check_mappings(dir);
    }
    if let Some(config) = &args.config {
        let checked = match ProjectorConfig::is_one(config) {
            Ok(true) => check_projector(config).await,
            // A file that is no TOML is reported by the connector's loader.
            Ok(false) | Err(_) => check_connector(config).await,
        };
        if checked != ExitCode::SUCCESS {
            code = checked;
        }
    }
    code
}

/// A configuration as its loader left it: on success, what is checked (its kind and name)
/// said; on failure, why, and the exit status.
fn loaded<C>(
    result: Result<C, crate::config::ConfigError>,
    named: impl Fn(&C) -> (&str, &str, &[Override]),
    path: &std::path::Path,
) -> Result<C, ExitCode> {
    match result {
        Ok(config) => {
            let (kind, name, from_environment) = named(&config);
            println!("checking {kind} `{name}` ({})", path.display());
            println!(
                "{}",
                Finding::ok("config", "parsed and valid; secret references resolved")
            );
            if let Some(said) = environment_said(from_environment) {
                println!("{}", Finding::ok("config", said));
            }
            Ok(config)
        }
        Err(e) => {
            println!("FAIL  config    {e}");
            Err(ExitCode::from(super::EXIT_BAD_CONFIG))
        }
    }
}

/// The tables and columns `mappings` read, as the source's checks take them.
fn mapped_tables(mappings: &[mapping::Mapping]) -> source::MappedTables {
    let mut keyed: Vec<(String, Vec<String>)> = Vec::new();
    let mut columns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in mappings {
        if !keyed.iter().any(|(table, _)| *table == m.table) {
            keyed.push((m.table.clone(), m.key.clone()));
        }
        for (table, read) in m.columns_read() {
            columns
                .entry(table.to_owned())
                .or_default()
                .extend(read.into_iter().map(str::to_owned));
        }
    }
    source::MappedTables {
        read: mapping::source_tables(mappings),
        keyed,
        columns,
    }
}

/// A reference to a resource type no mapping makes, as a warning.
fn unmade_finding(unmade: &mapping::LoadError) -> Finding {
    Finding::warning(
        "mapping",
        unmade.to_string(),
        "map those resources too, or write `external: true` on the reference when another system or connector makes them",
    )
}

/// Which keys the environment set, by name and variable (never their values).
pub(super) fn environment_said(from_environment: &[Override]) -> Option<String> {
    if from_environment.is_empty() {
        return None;
    }
    let keys: Vec<String> = from_environment
        .iter()
        .map(|o| format!("{} ({})", o.key, o.variable))
        .collect();
    Some(format!(
        "from the environment: {}; every other value from the file",
        keys.join(", ")
    ))
}

/// A projector's configuration: parsed, and its Kafka, registry and projection database
/// reachable.
async fn check_projector(path: &std::path::Path) -> ExitCode {
    let config = match loaded(
        ProjectorConfig::load(path),
        |c| ("projector", &c.name, &c.from_environment),
        path,
    ) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let projection = async {
        let schema = &config.projection.schema;
        match source::postgres::preflight::reach(&config.projection.url, "projection.url").await {
            Ok((client, _, target)) => {
                let exists: bool = client
                    .query_one(
                        "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)",
                        &[schema],
                    )
                    .await
                    .map(|row| row.get(0))
                    .unwrap_or(false);
                let schema = if exists {
                    format!("schema `{schema}` exists")
                } else {
                    format!("schema `{schema}` is created at the first start")
                };
                Finding::ok("projection", format!("connected to {target}; {schema}"))
            }
            Err(finding) => finding,
        }
    };
    let (projection, kafka, registry) = tokio::join!(
        projection,
        kafka::check(&config.kafka),
        registry::check(&config.schema_registry)
    );
    report(
        std::iter::once(projection)
            .chain(kafka)
            .chain(registry)
            .collect(),
    )
}

fn check_mappings(dir: &std::path::Path) -> ExitCode {
    match mapping::load_dir(dir) {
        Ok(mappings) => {
            for m in &mappings {
                let resources: Vec<&str> = m
                    .resources
                    .iter()
                    .map(|r| r.resource_type.as_str())
                    .collect();
                println!(
                    "{}",
                    Finding::ok(
                        "mapping",
                        format!(
                            "{} ({}): {} → {}",
                            m.id,
                            m.file.display(),
                            m.table,
                            resources.join(", ")
                        )
                    )
                );
            }
            for unmade in mapping::unmade_references(&mappings) {
                println!("{}", unmade_finding(&unmade));
            }
            println!("{} mapping(s) valid in {}", mappings.len(), dir.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in &errors.0 {
                println!("{error}");
            }
            println!(
                "{} problem(s) in the mappings under {}",
                errors.0.len(),
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}

async fn check_connector(path: &std::path::Path) -> ExitCode {
    let config = match loaded(
        ConnectorConfig::load(path),
        |c| ("connector", &c.name, &c.from_environment),
        path,
    ) {
        Ok(config) => config,
        Err(code) => return code,
    };

    // With mappings configured, also what `run` will capture.
    let mut mapping_findings = Vec::new();
    let mappings = match &config.mappings {
        Some(m) => match mapping::load_dir(&m.path) {
            Ok(mappings) => mappings,
            Err(errors) => {
                mapping_findings.push(Finding::problem(
                    "mapping",
                    format!("{} problem(s) in {}", errors.0.len(), m.path.display()),
                    format!("run fhir-cdc check --mappings {}", m.path.display()),
                ));
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    mapping_findings.extend(
        mapping::unmade_references(&mappings)
            .iter()
            .map(unmade_finding),
    );
    let mapped = (!mappings.is_empty()).then(|| mapped_tables(&mappings));
    let source = source::preflight(&config, mapped.as_ref());
    let (source, kafka, registry) = tokio::join!(
        source,
        kafka::check(&config.kafka),
        registry::check(&config.schema_registry)
    );
    report(
        mapping_findings
            .into_iter()
            .chain(source)
            .chain(kafka)
            .chain(registry)
            .collect(),
    )
}

/// Print the findings and their count: success only without a problem.
fn report(findings: Vec<Finding>) -> ExitCode {
    for finding in &findings {
        println!("{finding}");
    }
    let count = |severity| findings.iter().filter(|f| f.severity == severity).count();
    let (problems, warnings) = (count(Severity::Problem), count(Severity::Warning));
    println!("{problems} problem(s), {warnings} warning(s)");
    if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
