//! `fhir-cdc replay`: project the topics again from a point in the log into the same read
//! model, until caught up. Harmless by construction: events already applied are counted as
//! duplicates and change nothing; missing ones are applied.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

use crate::consumer::{self, ReplayFrom};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The projector configuration file (TOML), e.g. connectors/projector.toml.
    #[arg(long, short)]
    config: PathBuf,
    /// `earliest`, or a time (RFC 3339): replay what was written from then on.
    #[arg(long, value_parser = parse_from)]
    from: ReplayFrom,
}

fn parse_from(text: &str) -> Result<ReplayFrom, String> {
    if text == "earliest" {
        return Ok(ReplayFrom::Earliest);
    }
    super::parse_time(text)
        .map(ReplayFrom::Time)
        .map_err(|e| format!("`earliest` or a time: {e}"))
}

pub async fn run(args: ReplayArgs) -> ExitCode {
    let from = args.from;
    super::project::with_projector("replay", &args.config, |config, shutdown| async move {
        consumer::replay(&config, shutdown, from).await
    })
    .await
}
