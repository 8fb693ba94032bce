//! `fhir-cdc check`: can this connector run here? Every system is checked, all problems are
//! reported at once, each with a fix; exit status 0 only when nothing blocks a start.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

use crate::{
    canonical::registry,
    config::{ConnectorConfig, SourceKind},
    preflight::{Finding, Severity},
    sink::kafka,
    source::{mysql, postgres},
};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The connector configuration file (TOML), e.g. connectors/lab-postgres.toml.
    #[arg(long, short)]
    config: PathBuf,
}

pub async fn run(args: CheckArgs) -> ExitCode {
    let config = match ConnectorConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            println!("FAIL  config    {e}");
            return ExitCode::from(super::EXIT_BAD_CONFIG);
        }
    };
    println!(
        "checking connector `{}` ({})",
        config.name,
        args.config.display()
    );
    println!(
        "{}",
        Finding::ok("config", "parsed and valid; secret references resolved")
    );

    let source = async {
        match config.source.kind {
            SourceKind::Postgres => postgres::preflight::check(&config.source.url).await,
            SourceKind::Mysql => mysql::preflight::check(&config.source.url).await,
        }
    };
    let (source, kafka, registry) = tokio::join!(
        source,
        kafka::check(&config.kafka),
        registry::check(&config.schema_registry)
    );
    let findings: Vec<Finding> = source.into_iter().chain(kafka).chain(registry).collect();
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
