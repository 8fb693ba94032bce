//! `fhir-cdc dlq list|show|replay`: the dead letters of the connectors and the projector
//! (see `dlq`). `--config` takes either configuration: both name the Kafka cluster
//! and the topic prefix, so `list` and `show` see every side's letters; `replay` replays
//! the letters of the side the file configures — a connector's changes with its mapping
//! files, or the projector's messages into its read model.

use std::{path::Path, path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand};

use crate::{
    config::{ConfigError, ConnectorConfig, KafkaProperties},
    consumer::ProjectorConfig,
    dlq::{self, Letter, Outcome, PROJECTOR},
};

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// One line per outstanding dead letter: id, when it was written, where it failed, why.
    List {
        /// A connector or projector configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Also list the letters already replayed.
        #[arg(long)]
        all: bool,
        /// Only letters whose reason contains this text.
        #[arg(long)]
        reason: Option<String>,
    },
    /// One dead letter as JSON: its reason, where it failed, the record as written (row
    /// values or the original message included) and its last replay.
    Show {
        /// A connector or projector configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// The letter's id, as `list` prints it (`<side>:<partition>:<offset>`).
        id: String,
    },
    /// Send dead letters back through the path that failed, once the cause is fixed:
    /// changes are mapped again and written (connector config), messages are applied to
    /// the read model (projector config). What is already applied is not applied again.
    Replay {
        /// The configuration of the side whose letters to replay.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        select: Selection,
    },
}

/// Which letters to replay.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Selection {
    /// A letter by id; repeat for several (replayed even when replayed before).
    #[arg(long = "id")]
    ids: Vec<String>,
    /// The outstanding letters whose reason contains this text.
    #[arg(long)]
    reason: Option<String>,
    /// Every outstanding letter of this side.
    #[arg(long)]
    all: bool,
}

/// Either configuration `dlq` takes: a projector's has a `[projection]` table.
enum Side {
    Connector(Box<ConnectorConfig>),
    Projector(Box<ProjectorConfig>),
}

impl Side {
    fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(if ProjectorConfig::is_one(path)? {
            Side::Projector(Box::new(ProjectorConfig::load(path)?))
        } else {
            Side::Connector(Box::new(ConnectorConfig::load(path)?))
        })
    }

    fn kafka(&self) -> &KafkaProperties {
        match self {
            Side::Connector(c) => &c.kafka,
            Side::Projector(p) => &p.kafka,
        }
    }

    fn prefix(&self) -> &str {
        match self {
            Side::Connector(c) => &c.topics.prefix,
            Side::Projector(p) => &p.topics.prefix,
        }
    }

    /// Whether `letter` is this configuration's to replay: its connector's, or its
    /// projector's (see [`Letter::owner`]).
    fn owns(&self, letter: &Letter) -> bool {
        match self {
            Side::Connector(c) => letter.side() == c.name,
            Side::Projector(p) => letter.side() == PROJECTOR && letter.owner() == p.name,
        }
    }
}

pub async fn run(args: DlqArgs) -> ExitCode {
    let path = match &args.command {
        DlqCommand::List { config, .. }
        | DlqCommand::Show { config, .. }
        | DlqCommand::Replay { config, .. } => config,
    };
    let side = match Side::load(path) {
        Ok(side) => side,
        Err(e) => {
            eprintln!("fhir-cdc dlq: {e}");
            return ExitCode::from(super::EXIT_BAD_CONFIG);
        }
    };
    let letters = match dlq::read_all(side.kafka(), side.prefix()).await {
        Ok(letters) => letters,
        Err(e) => {
            eprintln!("fhir-cdc dlq: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.command {
        DlqCommand::List { all, reason, .. } => {
            let shown = letters
                .iter()
                .filter(|l| all || l.replayed.is_none())
                .filter(|l| {
                    reason
                        .as_ref()
                        .is_none_or(|r| l.reason.contains(r.as_str()))
                });
            for letter in shown {
                let written = letter
                    .written
                    .map_or_else(|| "-".to_owned(), crate::canonical::instant);
                let replayed = if letter.replayed.is_some() {
                    "  (replayed)"
                } else {
                    ""
                };
                println!(
                    "{}  {written}  {}  {}{replayed}",
                    letter.id, letter.origin, letter.reason
                );
            }
            ExitCode::SUCCESS
        }
        DlqCommand::Show { id, .. } => match letters.iter().find(|l| l.id == id) {
            Some(letter) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&letter.to_json()).expect("JSON serializes")
                );
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("fhir-cdc dlq: no dead letter `{id}` (`dlq list --all` shows them)");
                ExitCode::FAILURE
            }
        },
        DlqCommand::Replay { select, .. } => replay(&side, &letters, &select).await,
    }
}

async fn replay(side: &Side, letters: &[Letter], select: &Selection) -> ExitCode {
    let chosen: Vec<&Letter> = if select.ids.is_empty() {
        letters
            .iter()
            .filter(|l| side.owns(l) && l.replayed.is_none())
            .filter(|l| {
                select
                    .reason
                    .as_ref()
                    .is_none_or(|r| l.reason.contains(r.as_str()))
            })
            .collect()
    } else {
        let mut chosen = Vec::new();
        for id in &select.ids {
            match letters.iter().find(|l| &l.id == id) {
                Some(letter) if side.owns(letter) => chosen.push(letter),
                Some(letter) => {
                    eprintln!(
                        "fhir-cdc dlq: `{id}` is a dead letter of `{}`: replay it with that {}'s configuration",
                        letter.owner(),
                        if letter.side() == PROJECTOR { "projector" } else { "connector" }
                    );
                    return ExitCode::FAILURE;
                }
                None => {
                    eprintln!("fhir-cdc dlq: no dead letter `{id}` (`dlq list --all` shows them)");
                    return ExitCode::FAILURE;
                }
            }
        }
        chosen
    };
    if chosen.is_empty() {
        println!("nothing to replay");
        return ExitCode::SUCCESS;
    }
    let outcomes = match side {
        Side::Connector(config) => dlq::replay_changes(config, &chosen).await,
        Side::Projector(config) => dlq::replay_messages(config, &chosen).await,
    };
    let outcomes: Vec<Outcome> = match outcomes {
        Ok(outcomes) => outcomes,
        Err(e) => {
            eprintln!("fhir-cdc dlq: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = 0;
    for (letter, outcome) in chosen.iter().zip(&outcomes) {
        match outcome {
            Ok(done) => println!("{}  replayed: {done}", letter.id),
            Err(why) => {
                failed += 1;
                println!("{}  NOT replayed: {why}", letter.id);
            }
        }
    }
    println!(
        "{} replayed, {failed} not replayed",
        outcomes.len() - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
