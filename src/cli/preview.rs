//! `fhir-cdc preview`: the FHIR resources the mappings make of live rows, printed and
//! written nowhere — no slot, no publication, no topic, no registry.
//!
//! Rows are read in read-only transactions, at most `--limit` per table, mapped as
//! snapshot reads, and each resource printed as pretty FHIR JSON (stdout). A row a mapping
//! cannot map is reported on stderr with the mapping and the reason, as the dead-letter
//! topic would get it; its values are not printed.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use tokio::sync::mpsc;

use crate::{
    change::{ChangeEvent, PgLsn, Position, SourceMessage},
    config::{ConnectorConfig, MysqlConfig, PostgresConfig, SourceConfig},
    mapping::{self, Mapper},
    pipeline::{load_lookups, mapper_for},
    source::{
        chunk_changes, mysql,
        postgres::snapshot::{Reading, TableReader},
        sqlserver,
    },
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
    match &config.source {
        SourceConfig::Postgres(pg) => {
            preview_postgres(pg, &config.name, &tables, &mapper, args.limit).await
        }
        SourceConfig::Mysql(my) => {
            preview_mysql(my, &config.name, &tables, &mapper, args.limit).await
        }
        SourceConfig::SqlServer(ms) => {
            preview_sqlserver(&ms.url, &config.name, &tables, &mapper, args.limit).await
        }
    }
}

async fn preview_postgres(
    source: &PostgresConfig,
    connector: &str,
    tables: &[(String, String)],
    mapper: &Mapper,
    limit: u64,
) -> Result<u64, Failure> {
    let reader = TableReader::open(&source.url, connector)
        .await
        .map_err(|e| Failure::Source(e.to_string()))?;
    let mut failures = 0;
    let mut ordinal = 0;
    for (schema, table) in tables {
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
                        limit: Some(limit),
                        progress: None,
                    },
                    &out,
                )
                .await;
            drop(out);
            read
        };
        let printing = async {
            let mut printer = Printer::new(schema, table);
            while let Some(SourceMessage::Change(change)) = rows.recv().await {
                printer.print(mapper, &change);
            }
            printer.failures
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

async fn preview_mysql(
    source: &MysqlConfig,
    connector: &str,
    tables: &[(String, String)],
    mapper: &Mapper,
    limit: u64,
) -> Result<u64, Failure> {
    let source_error = |e: mysql::MysqlError| Failure::Source(e.to_string());
    let (opts, _) =
        mysql::tls::opts(&source.url).map_err(|e| Failure::Config(format!("source.url: {e}")))?;
    let pool = mysql::snapshot::pool(&opts);
    let mut failures = 0;
    for (database, table) in tables {
        let mut conn = pool
            .get_conn()
            .await
            .map_err(|e| source_error(mysql::MysqlError::connect(e)))?;
        let described =
            mysql::snapshot::ChunkTable::describe(&mut conn, connector, database, table)
                .await
                .map_err(source_error)?;
        drop(conn);
        let size = usize::try_from(limit).unwrap_or(usize::MAX);
        let chunk = mysql::snapshot::read_chunk(&pool, &described, None, None, size)
            .await
            .map_err(source_error)?;
        // A keyless table is read whole: preview only its first rows.
        let rows = chunk.rows.into_iter().take(size);
        let position = Position::Mysql(chunk.low.clone());
        let mut printer = Printer::new(database, table);
        for change in chunk_changes(&described.source, &described.key, rows, &position) {
            printer.print(mapper, &change);
        }
        eprintln!(
            "── {database}.{table}: {} row(s) read, {} not mappable",
            printer.rows, printer.failures
        );
        failures += printer.failures;
    }
    pool.disconnect()
        .await
        .map_err(|e| source_error(mysql::MysqlError::connect(e)))?;
    Ok(failures)
}

async fn preview_sqlserver(
    url: &crate::config::Secret,
    connector: &str,
    tables: &[(String, String)],
    mapper: &Mapper,
    limit: u64,
) -> Result<u64, Failure> {
    use crate::source::sqlserver::{connection, snapshot};
    let source_error = |e: sqlserver::MssqlError| Failure::Source(e.to_string());
    let database = crate::config::ado::database(url)
        .ok_or_else(|| Failure::Config("source.url names no database".into()))?;
    let mut client = connection::connect(url).await.map_err(source_error)?;
    let mut failures = 0;
    for (schema, table) in tables {
        let name = format!("{schema}.{table}");
        let described = snapshot::ChunkTable::describe(&mut client, connector, &database, &name)
            .await
            .map_err(source_error)?;
        let size = usize::try_from(limit).unwrap_or(usize::MAX);
        let (rows, _, _) = snapshot::select_rows(&mut client, &described, None, None, size)
            .await
            .map_err(source_error)?;
        // A keyless table is read whole: preview only its first rows.
        let rows = rows.into_iter().take(size);
        let position = Position::SqlServer(crate::change::ChangeLsn::end_of(Default::default()));
        let mut printer = Printer::new(schema, table);
        for change in chunk_changes(&described.source, &described.key, rows, &position) {
            printer.print(mapper, &change);
        }
        eprintln!(
            "── {schema}.{table}: {} row(s) read, {} not mappable",
            printer.rows, printer.failures
        );
        failures += printer.failures;
    }
    let _ = client.close().await;
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
