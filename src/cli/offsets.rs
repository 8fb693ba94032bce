//! `fhir-cdc offsets show|reset`: the connector's stored state (`offsets::StateStore`), and
//! moving it while the connector is stopped.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand, ValueEnum};

use crate::{
    config::ConnectorConfig,
    offsets::{ConnectorState, StateStore, TableProgress},
    source,
};

#[derive(Debug, Args)]
pub struct OffsetsArgs {
    #[command(subcommand)]
    command: OffsetsCommand,
}

#[derive(Debug, Subcommand)]
enum OffsetsCommand {
    /// Print the connector's stored state as JSON: the last durable source position and
    /// each table's snapshot progress.
    Show {
        /// The connector configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Replace the stored state (the connector must be stopped): prints the new state, and
    /// writes it only with `--yes`.
    Reset {
        /// The connector configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// `snapshot`: read every table again on the next start, streaming from the slot's
        /// confirmed position (or a new slot's start: use it to start over after dropping
        /// the slot), or only `--table`, keeping the stored position; `end`: skip everything
        /// up to the source's current end, and mark every table snapshotted (what happened
        /// meanwhile is never captured).
        #[arg(long, value_enum)]
        to: Target,
        /// With `--to snapshot`: only this table (`schema.table`).
        #[arg(long)]
        table: Option<String>,
        /// Write the new state.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Snapshot,
    End,
}

pub async fn run(args: OffsetsArgs) -> ExitCode {
    match offsets(args).await {
        Ok(code) => code,
        Err((code, message)) => {
            eprintln!("fhir-cdc offsets: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn failed(e: impl std::fmt::Display) -> Failure {
    (1, e.to_string())
}

async fn offsets(args: OffsetsArgs) -> Result<ExitCode, Failure> {
    let config_path = match &args.command {
        OffsetsCommand::Show { config } | OffsetsCommand::Reset { config, .. } => config,
    };
    let config =
        ConnectorConfig::load(config_path).map_err(|e| (super::EXIT_BAD_CONFIG, e.to_string()))?;
    let store = StateStore::of(&config).await.map_err(failed)?;
    let stored = store.load().await.map_err(failed)?;
    let OffsetsCommand::Reset { to, table, yes, .. } = args.command else {
        match stored {
            Some(state) => println!("{}", serde_json::to_string_pretty(&state).expect("serialises")),
            None => println!(
                "no stored state for connector {} in {}: its next start takes a snapshot (snapshot.mode permitting)",
                config.name,
                store.topic()
            ),
        }
        return Ok(ExitCode::SUCCESS);
    };
    if let Some(reader) = source::reader_now(&config).await.map_err(failed)? {
        return Err(failed(format!(
            "connector {} is reading its source now ({reader}): stop it first (a running connector overwrites its state within a second)",
            config.name
        )));
    }
    let mut state =
        stored.unwrap_or_else(|| ConnectorState::new(&config.source.kind().to_string()));
    match (to, table) {
        // Everything again: the stream from the slot's confirmed position, or from a new
        // slot's start when the slot was dropped (nothing Kafka lacks lies before either).
        (Target::Snapshot, None) => {
            state.tables.clear();
            state.requests.clear();
            state.position = None;
        }
        (Target::Snapshot, Some(table)) => {
            if state.tables.remove(&table).is_none() {
                return Err((
                    super::EXIT_BAD_CONFIG,
                    format!("the stored state has no table `{table}` (write it as schema.table; `offsets show` lists them)"),
                ));
            }
        }
        (Target::End, Some(_)) => {
            return Err((
                super::EXIT_BAD_CONFIG,
                "`--table` goes with `--to snapshot`".into(),
            ))
        }
        (Target::End, None) => {
            for table in super::mapped_tables(&config)? {
                state.tables.insert(
                    table,
                    TableProgress {
                        complete: true,
                        ..TableProgress::default()
                    },
                );
            }
            state.position = Some(source::log_end(&config).await.map_err(failed)?);
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&state).expect("serialises")
    );
    if !yes {
        eprintln!(
            "fhir-cdc offsets: nothing written; add --yes to store this state for connector {}",
            config.name
        );
        return Ok(ExitCode::FAILURE);
    }
    store.save(&state).await.map_err(failed)?;
    eprintln!(
        "fhir-cdc offsets: stored in {}; it takes effect at the connector's next start",
        store.topic()
    );
    Ok(ExitCode::SUCCESS)
}
