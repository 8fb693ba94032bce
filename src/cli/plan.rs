//! `fhir-cdc plan`: what `run` would do with these files, reviewed before it does any of
//! it. Exit 0 when the rollout is safe, 1 when it would break consumers (or the deployment
//! cannot be asked), 2 on a usage error: a CI job gates a merge on it.

use std::{path::PathBuf, process::ExitCode};

use clap::Args;

use crate::{
    config::ConnectorConfig,
    plan::{self, Against, Change, Plan, PlanError},
};

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The connector configuration file (TOML) as it would be rolled out, with its mapping
    /// directory.
    #[arg(long, short)]
    config: PathBuf,
    /// `text` for a reviewer, `json` for tools (one object on stdout).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

/// Exit status when rolling out would break consumers, or cannot be judged.
const EXIT_BREAKS: u8 = 1;

pub async fn run(args: PlanArgs) -> ExitCode {
    let config = match ConnectorConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fhir-cdc plan: {e}");
            return ExitCode::from(super::EXIT_BAD_CONFIG);
        }
    };
    let plan = match plan::plan(&config).await {
        Ok(plan) => plan,
        Err(e @ PlanError::NoMappings) => {
            eprintln!("fhir-cdc plan: {e}");
            return ExitCode::from(super::EXIT_BAD_CONFIG);
        }
        Err(e) => {
            eprintln!("fhir-cdc plan: cannot tell what a rollout would do: {e}");
            return ExitCode::from(EXIT_BREAKS);
        }
    };
    let breaking = plan.breaking();
    match args.format {
        Format::Json => {
            let mut json = serde_json::to_value(&plan).expect("a plan serialises");
            json["safe"] = serde_json::Value::Bool(breaking.is_empty());
            json["nothing_to_do"] = serde_json::Value::Bool(plan.nothing_to_do());
            println!("{json}");
        }
        Format::Text => print!("{}", text(&plan, &args.config, &breaking)),
    }
    if breaking.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_BREAKS)
    }
}

/// The plan for a reviewer.
fn text(plan: &Plan, path: &std::path::Path, breaking: &[String]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let against = match plan.against {
        Against::Recorded => "the mappings it recorded at its last start",
        Against::StateOnly => {
            "its stored state (it has no record of its mappings yet: every mapping shows as added; `run` records them from its next start)"
        }
        Against::Nothing => "nothing (it never ran)",
    };
    let _ = writeln!(
        out,
        "plan for connector `{}` ({}), against {against}",
        plan.connector,
        path.display()
    );
    if let Some(said) = super::check::environment_said(&plan.from_environment) {
        let _ = writeln!(out, "{said}");
    }
    if plan.nothing_to_do() {
        let _ = writeln!(out, "nothing to do: the files are what runs");
        return out;
    }
    if !plan.tables.is_empty() {
        let _ = writeln!(out, "tables");
        for t in &plan.tables {
            let what = match (t.change, t.snapshot) {
                (Change::Removed, _) => {
                    "no longer captured: its changes stop flowing (what its topics hold stays)"
                }
                (_, true) => "captured from the next start, after a snapshot of its rows",
                (_, false) => "captured from the next start, without a snapshot",
            };
            let _ = writeln!(out, "  {} {:<40} {what}", sign(t.change), t.table);
        }
    }
    if !plan.mappings.is_empty() {
        let _ = writeln!(out, "mappings");
        for m in &plan.mappings {
            let resources = m.resources.join(", ");
            let table = m.table.as_deref().unwrap_or("");
            let what = match m.change {
                Change::Added => format!("new: {resources} from {table}"),
                Change::Removed => "removed: its resources get no more events".to_owned(),
                Change::Changed => format!(
                    "changed ({} → {}): new events of {table} carry {resources} as the new version maps them; rows that do not change keep the old ones until `fhir-cdc snapshot --table {table}` re-emits them (reconciliation shows them as mapping_changed)",
                    short(m.from.as_deref()),
                    short(m.to.as_deref())
                ),
            };
            let _ = writeln!(out, "  {} {:<40} {what}", sign(m.change), m.id);
        }
    }
    let _ = writeln!(out, "schemas");
    for s in &plan.schemas {
        let (mark, what) = match s.verdict {
            "first" => (
                "+",
                format!(
                    "registered as version 1, compatibility {}",
                    s.compatibility.unwrap_or("")
                ),
            ),
            "unchanged" => (
                "=",
                format!("unchanged (version {})", s.version.unwrap_or(0)),
            ),
            "compatible" => (
                "~",
                format!("new compatible version {}", s.version.unwrap_or(0)),
            ),
            _ => ("!", format!("INCOMPATIBLE: {}", s.reasons.join("; "))),
        };
        let _ = writeln!(out, "  {mark} {:<40} {what}", s.subject);
    }
    if !plan.topics.is_empty() {
        let _ = writeln!(out, "topics to create");
        for t in &plan.topics {
            let config: Vec<String> = t.config.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                out,
                "  + {:<40} partitions {}, replication {}{}{}",
                t.topic,
                t.partitions,
                t.replication_factor,
                if config.is_empty() {
                    String::new()
                } else {
                    format!(", {}", config.join(", "))
                },
                if t.restricted {
                    " — restricted: only readers granted restricted data may read it"
                } else {
                    ""
                }
            );
        }
    }
    let _ = writeln!(out, "acls the connector needs (kafka-acls.sh)");
    for a in &plan.acls {
        let _ = writeln!(
            out,
            "  --allow-principal {} --operation {} --{} {} --resource-pattern-type {}",
            a.principal,
            a.operations.join(" --operation "),
            a.resource_type,
            a.resource,
            a.pattern
        );
    }
    if breaking.is_empty() {
        let _ = writeln!(out, "safe to roll out");
    } else {
        let _ = writeln!(out, "NOT safe to roll out: it would break consumers");
        for b in breaking {
            let _ = writeln!(out, "  {b}");
        }
    }
    out
}

fn sign(change: Change) -> char {
    match change {
        Change::Added => '+',
        Change::Removed => '-',
        Change::Changed => '~',
    }
}

/// A version hash, shortened for reading.
fn short(version: Option<&str>) -> &str {
    version.map_or("", |v| v.get(..12).unwrap_or(v))
}
