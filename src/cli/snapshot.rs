//! `fhir-cdc snapshot`: ask a running connector to read a table again (all of it, or the
//! rows matching a condition), and wait until the events of every row it read are in
//! Kafka. The request travels through the source's own log (see
//! [`source::request_snapshot`]), so a connector that is stopped takes it when it starts;
//! its progress is read from the connector's stored state.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Args;

use crate::{
    config::ConnectorConfig,
    offsets::{SnapshotRequest, StateStore},
    source::{self, SourceError},
};

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The connector configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// The table to read, as `schema.table`; a mapping must read it.
    #[arg(long)]
    table: String,
    /// Only the rows matching this SQL condition on the table's columns, e.g.
    /// `result_id IN (17, 42)` or `collected_at >= '2024-03-01'`.
    #[arg(long = "where")]
    filter: Option<String>,
    /// Ask, print the request's id, and return without waiting.
    #[arg(long)]
    no_wait: bool,
}

pub async fn run(args: SnapshotArgs) -> ExitCode {
    match snapshot(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("fhir-cdc snapshot: {message}");
            ExitCode::from(code)
        }
    }
}

/// How long the connector may leave a request untaken before the command says so.
const UNTAKEN: Duration = Duration::from_secs(15);

async fn snapshot(args: SnapshotArgs) -> Result<(), (u8, String)> {
    let bad = |message: String| (super::EXIT_BAD_CONFIG, message);
    let config = ConnectorConfig::load(&args.config).map_err(|e| bad(e.to_string()))?;
    if !super::mapped_tables(&config)?.contains(&args.table) {
        return Err(bad(format!(
            "no mapping reads table `{}` (write it as schema.table)",
            args.table
        )));
    }
    let failed = |e: &dyn std::fmt::Display| (1, e.to_string());
    let store = StateStore::of(&config).await.map_err(|e| failed(&e))?;
    let request = SnapshotRequest::new(args.table.clone(), args.filter.clone());
    if let Some(filter) = &request.filter {
        source::check_condition(&config.source, &request.table, filter)
            .await
            .map_err(|e| bad(e.to_string()))?;
    }
    source::request_snapshot(&config, &request)
        .await
        .map_err(|e| match e {
            SourceError::Connector(_) => bad(e.to_string()),
            SourceError::Transient(_) => failed(&e),
        })?;
    println!("{}", request.id);
    if args.no_wait {
        eprintln!(
            "fhir-cdc snapshot: requested {} of {}; `fhir-cdc offsets show` follows it",
            request.id, request.table
        );
        return Ok(());
    }
    let asked = Instant::now();
    let (mut taken, mut said_untaken, mut rows) = (false, false, 0);
    loop {
        let state = store
            .load()
            .await
            .map_err(|e| failed(&e))?
            .unwrap_or_default();
        if state.request_done(&request.id) {
            let read = state
                .tables
                .get(&request.table)
                .map_or(0, |progress| progress.rows);
            eprintln!(
                "fhir-cdc snapshot: {} read again, {read} rows; their events are in Kafka",
                request.table
            );
            return Ok(());
        }
        let queued = state.requests.iter().any(|r| r.id == request.id);
        if !taken && queued {
            taken = true;
            eprintln!("fhir-cdc snapshot: the connector took the request");
        }
        if state.dropped.contains(&request.id) {
            return Err(failed(
                &"the connector dropped the request: the server refused its condition (see the connector's log)",
            ));
        }
        let progress = state
            .tables
            .get(&request.table)
            .filter(|p| p.request.as_ref() == Some(&request.id));
        if let Some(progress) = progress.filter(|p| p.rows != rows) {
            rows = progress.rows;
            eprintln!("fhir-cdc snapshot: {} rows read", rows);
        }
        if !taken && !said_untaken && asked.elapsed() > UNTAKEN {
            said_untaken = true;
            eprintln!(
                "fhir-cdc snapshot: connector {} has not taken the request yet; it waits in the database's log and is taken when the connector runs",
                config.name
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
