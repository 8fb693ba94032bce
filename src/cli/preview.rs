//! `fhir-cdc preview`: the FHIR resources the mappings make of live rows, printed and
//! written nowhere — no slot, no publication, no topic, no registry.
//!
//! Rows are read in one read-only transaction, at most `--limit` per table, mapped as
//! snapshot reads, and each resource printed as pretty FHIR JSON (stdout). A row a mapping
//! cannot map is reported on stderr with the mapping and the reason, as the dead-letter
//! topic would get it; its values are not printed.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use tokio::sync::mpsc;

use crate::{
    change::{PgLsn, Position, SourceMessage},
    config::{ConnectorConfig, SourceConfig},
    mapping,
    pipeline::mapper_for,
    source::postgres::snapshot::{Reading, TableReader},
};

#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// The connector configuration file (TOML), e.g. connectors/lab-postgres.toml.
    #[arg(long, short)]
    config: PathBuf,
    /// Only this mapped table (`schema.table`). Default: every mapped table.
    #[arg(long)]
    table: Option<String>,
    /// Rows read per table.
    #[arg(long, default_value_t = 5)]
    limit: u64,
}

pub async fn run(args: PreviewArgs) -> ExitCode {
    match preview(&args).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failures) => {
            eprintln!("fhir-cdc preview: {failures} row(s) would go to the dead-letter topic");
            ExitCode::FAILURE
        }
        Err(Failure::Config(e)) => {
            eprintln!("fhir-cdc preview: {e}");
            ExitCode::from(super::EXIT_BAD_CONFIG)
        }
        Err(Failure::Source(e)) => {
            eprintln!("fhir-cdc preview: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Config(String),
    Source(String),
}

/// Prints the resources; returns how many mapping failures there were.
async fn preview(args: &PreviewArgs) -> Result<u64, Failure> {
    let config = ConnectorConfig::load(&args.config).map_err(|e| Failure::Config(e.to_string()))?;
    let SourceConfig::Postgres(source) = &config.source else {
        return Err(Failure::Config(format!(
            "`preview` reads postgres sources; {} is not implemented yet",
            config.source.kind()
        )));
    };
    let mappings_config = config.mappings.as_ref().ok_or_else(|| {
        Failure::Config("the config has no [mappings] section: nothing to preview".into())
    })?;
    let mappings =
        mapping::load_dir(&mappings_config.path).map_err(|e| Failure::Config(e.to_string()))?;
    let mut tables = mapping::source_tables(&mappings);
    if let Some(only) = &args.table {
        tables.retain(|(schema, table)| format!("{schema}.{table}") == *only);
        if tables.is_empty() {
            return Err(Failure::Config(format!(
                "no mapping reads table `{only}` (write it as schema.table)"
            )));
        }
    }
    let mapper = mapper_for(&config, mappings).map_err(|e| Failure::Config(e.to_string()))?;
    let reader = TableReader::open(&source.url, &config.name)
        .await
        .map_err(|e| Failure::Source(e.to_string()))?;
    let mut failures = 0;
    let mut ordinal = 0;
    for (schema, table) in &tables {
        let (out, mut rows) = mpsc::channel(256);
        let reading = async {
            let read = reader
                .read(
                    schema,
                    table,
                    &Position::Postgres(PgLsn(0)),
                    &mut ordinal,
                    Reading {
                        chunk_rows: 256,
                        limit: Some(args.limit),
                        progress: None,
                    },
                    &out,
                )
                .await;
            drop(out);
            read
        };
        let printing = async {
            let mut failures = 0;
            let mut row_number = 0;
            while let Some(SourceMessage::Change(change)) = rows.recv().await {
                row_number += 1;
                let outcome = mapper.map(&change);
                for event in outcome.events {
                    if let Some(resource) = &event.resource {
                        match serde_json::to_string_pretty(resource) {
                            Ok(json) => println!("{json}"),
                            Err(e) => eprintln!("row {row_number}: cannot print the resource: {e}"),
                        }
                    }
                }
                for failure in outcome.failures {
                    failures += 1;
                    eprintln!(
                        "row {row_number} of {schema}.{table}: mapping `{}`: {}",
                        failure.mapping_id, failure.error
                    );
                }
            }
            failures
        };
        let (read, table_failures) = tokio::join!(reading, printing);
        let read = read.map_err(|e| Failure::Source(e.to_string()))?;
        eprintln!("── {schema}.{table}: {read} row(s) read, {table_failures} not mappable");
        failures += table_failures;
    }
    reader
        .close()
        .await
        .map_err(|e| Failure::Source(e.to_string()))?;
    Ok(failures)
}
