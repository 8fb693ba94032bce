//! `fhir-cdc project`: project the canonical topics into the read model until stopped
//! (SIGTERM or Ctrl-C: the batch in hand is committed first), or with `--until-caught-up`
//! until every partition is applied to its end.

use std::{future::Future, path::Path, path::PathBuf, process::ExitCode};

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::consumer::{self, ConsumerError, ProjectorConfig, Summary};

#[derive(Debug, Args)]
pub struct ProjectArgs {
    /// The projector configuration file (TOML), e.g. connectors/projector.toml.
    #[arg(long, short)]
    config: PathBuf,
    /// Stop once every partition is applied up to where it ended when the run started.
    #[arg(long)]
    until_caught_up: bool,
}

pub async fn run(args: ProjectArgs) -> ExitCode {
    let until_caught_up = args.until_caught_up;
    with_projector("project", &args.config, |config, shutdown| async move {
        consumer::run(&config, shutdown, until_caught_up).await
    })
    .await
}

/// Load the projector configuration at `path`, run `work` on it until it ends or a signal
/// stops it, and log what it did (`<command>: stopped …`).
pub(super) async fn with_projector<F, Fut>(command: &str, path: &Path, work: F) -> ExitCode
where
    F: FnOnce(ProjectorConfig, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Summary, ConsumerError>>,
{
    let config = match ProjectorConfig::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fhir-cdc {command}: {e}");
            return ExitCode::from(super::EXIT_BAD_CONFIG);
        }
    };
    let name = config.name.clone();
    let shutdown = CancellationToken::new();
    tokio::spawn(super::run::stop_on_signal(shutdown.clone()));
    match work(config, shutdown).await {
        Ok(summary) => {
            info!(
                command,
                projector = name,
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
            eprintln!("fhir-cdc {command}: {e}");
            ExitCode::FAILURE
        }
    }
}
