//! `fhir-cdc run`: capture changes until stopped (SIGTERM or Ctrl-C), then drain what is
//! in flight, acknowledge it to the database and exit 0.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{config::ConnectorConfig, pipeline};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The connector configuration file (TOML), e.g. connectors/lab-postgres.toml.
    #[arg(long, short)]
    config: PathBuf,
}

pub async fn run(args: RunArgs) -> ExitCode {
    let config = match ConnectorConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fhir-cdc run: {e}");
            return ExitCode::from(super::EXIT_BAD_CONFIG);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    info!(connector = config.name, "starting");
    match pipeline::run(&config, shutdown).await {
        Ok(summary) => {
            info!(
                connector = config.name,
                snapshot_rows = summary.snapshot_rows,
                events = summary.events,
                suppressed = summary.suppressed,
                dead_letters = summary.dead_letters,
                acknowledged = summary.acknowledged.map(|lsn| lsn.to_string()),
                "stopped"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fhir-cdc run: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Cancel `shutdown` on SIGTERM or Ctrl-C.
pub(super) async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    info!("stop requested: draining in-flight events");
    shutdown.cancel();
}
