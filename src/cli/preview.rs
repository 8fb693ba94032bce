//! `fhir-cdc preview`: the FHIR resources the mappings make of live rows, printed and
//! written nowhere — no slot, no publication, no topic, no registry.
//!
//! Rows are read in read-only transactions, at most `--limit` per table, mapped as
//! snapshot reads, and each resource printed as pretty FHIR JSON (stdout). A row a mapping
//! cannot map is reported on stderr with the mapping and the reason, as the dead-letter
//! topic would get it; its values are not printed.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

use crate::{
    change::ChangeEvent,
    config::ConnectorConfig,
    mapping::{self, Mapper},
    pipeline::{load_lookups, mapper_for},
    source,
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
    load_lookups(&config, &mapper)
        .await
        .map_err(|e| Failure::Source(e.to_string()))?;
    let sampled = source::sample(&config, &tables, args.limit)
        .await
        .map_err(|e| Failure::Source(e.to_string()))?;
    let mut failures = 0;
    for ((schema, table), changes) in tables.iter().zip(sampled) {
        let mut printer = Printer::new(schema, table);
        for change in &changes {
            printer.print(&mapper, change);
        }
        eprintln!(
            "── {schema}.{table}: {} row(s) read, {} not mappable",
            printer.rows, printer.failures
        );
        failures += printer.failures;
    }
    Ok(failures)
}

/// Prints what the mappings make of one table's rows, counting the rows and the failures.
struct Printer<'a> {
    schema: &'a str,
    table: &'a str,
    rows: u64,
    failures: u64,
}

impl<'a> Printer<'a> {
    fn new(schema: &'a str, table: &'a str) -> Self {
        Self {
            schema,
            table,
            rows: 0,
            failures: 0,
        }
    }

    fn print(&mut self, mapper: &Mapper, change: &ChangeEvent) {
        self.rows += 1;
        let outcome = mapper.map(change);
        for event in outcome.events {
            if let Some(resource) = &event.resource {
                match serde_json::to_string_pretty(resource) {
                    Ok(json) => println!("{json}"),
                    Err(e) => eprintln!("row {}: cannot print the resource: {e}", self.rows),
                }
            }
        }
        for failure in outcome.failures {
            self.failures += 1;
            eprintln!(
                "row {} of {}.{}: mapping `{}`: {}",
                self.rows, self.schema, self.table, failure.mapping_id, failure.error
            );
        }
    }
}
