//! `fhir-cdc project`: project the canonical topics into the read model until stopped
//! (SIGTERM or Ctrl-C: the batch in hand is committed first), or with `--until-caught-up`
//! until every assigned partition is applied to its end.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::consumer::{self, ProjectorConfig};

#[derive(Debug, Args)]
pub struct ProjectArgs {
    /// The projector configuration file (TOML), e.g. connectors/projector.toml.
    #[arg(long, short)]
    config: PathBuf,
    /// Stop once every assigned partition is applied up to its end.
    #[arg(long)]
    until_caught_up: bool,
}

pub async fn run(args: ProjectArgs) -> ExitCode {
    let config = match ProjectorConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fhir-cdc project: {e}");
            return ExitCode::from(super::EXIT_BAD_CONFIG);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(super::run::stop_on_signal(shutdown.clone()));
    match consumer::run(&config, shutdown, args.until_caught_up).await {
        Ok(summary) => {
            info!(
                projector = config.name,
                applied = summary.applied,
                duplicate = summary.duplicate,
                stale = summary.stale,
                dead_lettered = summary.dead_lettered,
                batches = summary.batches,
                "stopped"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fhir-cdc project: {e}");
            ExitCode::FAILURE
        }
    }
}
