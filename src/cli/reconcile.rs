//! `fhir-cdc reconcile`: one pass comparing a connector's source, its log and a projection
//! (see [`crate::reconcile`]). Exit status: 0 when nothing drifted, 1 when something did
//! (or the connector or projector stayed behind beyond the bound, or a system could not be
//! read), 2 on a usage or configuration error — so that a script can be gated on it.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;

use crate::{
    config::ConnectorConfig,
    consumer::config::ProjectorConfig,
    reconcile::{Pass, PassError},
};

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The connector configuration file (TOML): its source and mappings.
    #[arg(long, short)]
    config: PathBuf,
    /// The projector configuration file (TOML) whose read model is compared.
    #[arg(long)]
    projection: PathBuf,
    /// Only the resources of this mapped table (`schema.table`).
    #[arg(long)]
    table: Option<String>,
    /// How long the connector and then the projector may take to catch up with the source
    /// read, in seconds; lag beyond it counts as drift.
    #[arg(long, default_value_t = 60)]
    lag_bound: u64,
}

pub async fn run(args: ReconcileArgs) -> ExitCode {
    let bad = |message: String| {
        eprintln!("fhir-cdc reconcile: {message}");
        ExitCode::from(super::EXIT_BAD_CONFIG)
    };
    let connector = match ConnectorConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => return bad(e.to_string()),
    };
    let projector = match ProjectorConfig::load(&args.projection) {
        Ok(config) => config,
        Err(e) => return bad(e.to_string()),
    };
    let pass = Pass {
        connector: &connector,
        projector: &projector,
        table: args.table.as_deref(),
        lag_bound: Duration::from_secs(args.lag_bound),
    };
    let report = match pass.run().await {
        Ok(report) => report,
        Err(PassError::Usage(message)) => return bad(message),
        Err(e @ (PassError::Lag(_) | PassError::Failed(_))) => {
            eprintln!("fhir-cdc reconcile: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "source read at {}: {} row(s); connector caught up in {:.1} s, projector {} in {:.1} s",
        report.read_at.text(),
        report.rows,
        report.waited.0.as_secs_f64(),
        projector.name,
        report.waited.1.as_secs_f64(),
    );
    for drifted in &report.drifted {
        println!(
            "{:<24} {}/{}  source {}  log {}  projection {}",
            drifted.class.name(),
            drifted.resource_type,
            drifted.resource_id,
            drifted.source,
            drifted.log,
            drifted.projection
        );
    }
    for ((table, mapping_id), rows) in &report.unmappable_rows {
        println!(
            "{:<24} {rows} row(s) of {table} fail mapping {mapping_id} and have no resource yet (`fhir-cdc dlq list`)",
            "source_unmappable"
        );
    }
    let counts: Vec<String> = report
        .counts()
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(class, n)| format!("{} {n}", class.name()))
        .collect();
    let drift = report.drifted.len() + report.unmappable_rows.values().sum::<usize>();
    println!(
        "{drift} drifted of {} resource(s) compared{}; {} changed while the pass ran (judged next pass)",
        report.compared,
        if counts.is_empty() {
            String::new()
        } else {
            format!(" ({})", counts.join(", "))
        },
        report.changed_since
    );
    if drift == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
