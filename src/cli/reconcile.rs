//! `fhir-cdc reconcile`: a pass comparing a connector's source, its log and a projection
//! (see [`crate::reconcile`]), each drifted resource reported on stdout and as an event on
//! `<prefix>.reconcile.<connector>`; with `--repair`, the drift mended through the log and a
//! second pass that verifies it. Exit status: 0 when no drift remains, 1 when some does (or
//! the connector or projector stayed behind beyond the bound, or a system could not be
//! read), 2 on a usage or configuration error — so that a script can be gated on it.
//! `fhir-cdc reconcile worklist` lists, shows and resolves what a person must decide on.

use std::{
    collections::HashSet,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::{
    canonical::registry::EventCodec,
    config::ConnectorConfig,
    consumer::{config::ProjectorConfig, projection},
    observe,
    reconcile::{events, repair, worklist, Drifted, Pass, PassError, Report},
};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReconcileArgs {
    #[command(subcommand)]
    command: Option<ReconcileCommand>,
    /// The connector configuration file (TOML): its source and mappings.
    #[arg(long, short, required = true)]
    config: Option<PathBuf>,
    /// The projector configuration file (TOML) whose read model is compared.
    #[arg(long, required = true)]
    projection: Option<PathBuf>,
    /// Only the resources of this mapped table (`schema.table`).
    #[arg(long)]
    table: Option<String>,
    /// How long the connector and then the projector may take to catch up with the source
    /// read (and, with --repair, the connector to read the rows again), in seconds; lag
    /// beyond it counts as drift.
    #[arg(long, default_value_t = 60)]
    lag_bound: u64,
    /// Mend the drift through the log (rows read again at the source, projection rows
    /// restored from the ledger), put the rest on the worklist, and verify with a second
    /// pass. The connector and the projector must be running.
    #[arg(long)]
    repair: bool,
    /// Run a pass (with --repair, a repair and its verifying pass) every DURATION (`30s`,
    /// `15m`, `1h`, or seconds) until SIGTERM or Ctrl-C, instead of once.
    #[arg(long, value_parser = parse_every)]
    every: Option<Duration>,
    /// Serve the metrics here (Prometheus text format), e.g. `127.0.0.1:9466`.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// `30s`, `15m`, `1h`, or a number of seconds; at least a second.
fn parse_every(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write e.g. 30s, 15m or 1h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("`{text}`: the unit is s, m or h")),
    };
    if seconds == 0 {
        return Err("the interval is at least 1s".into());
    }
    Ok(Duration::from_secs(seconds))
}

#[derive(Debug, Subcommand)]
enum ReconcileCommand {
    /// The drift a person must decide on (`--repair` fills it).
    Worklist(WorklistArgs),
}

#[derive(Debug, Args)]
struct WorklistArgs {
    /// The projector configuration file (TOML) whose database holds the worklist.
    #[arg(long)]
    projection: PathBuf,
    /// Only this connector's items.
    #[arg(long)]
    connector: Option<String>,
    #[command(subcommand)]
    action: WorklistAction,
}

#[derive(Debug, Subcommand)]
enum WorklistAction {
    /// The open items (with --all, the cleared and resolved too), one per line.
    List {
        #[arg(long)]
        all: bool,
    },
    /// One item with its three sides.
    Show { item: String },
    /// Mark an item decided: it stays resolved while it still drifts.
    Resolve {
        item: String,
        /// What was decided, kept with the item.
        #[arg(long)]
        note: Option<String>,
    },
}

pub async fn run(args: ReconcileArgs) -> ExitCode {
    let outcome = match args.command {
        Some(ReconcileCommand::Worklist(worklist)) => worklist_command(worklist).await,
        None => reconcile(args).await,
    };
    match outcome {
        Ok(code) => code,
        Err((code, message)) => {
            eprintln!("fhir-cdc reconcile: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn bad(message: impl ToString) -> Failure {
    (super::EXIT_BAD_CONFIG, message.to_string())
}

fn failed(message: impl ToString) -> Failure {
    (1, message.to_string())
}

async fn reconcile(args: ReconcileArgs) -> Result<ExitCode, Failure> {
    let (Some(config), Some(projection)) = (&args.config, &args.projection) else {
        return Err(bad("--config and --projection are required"));
    };
    let connector = ConnectorConfig::load(config).map_err(bad)?;
    let projector = ProjectorConfig::load(projection).map_err(bad)?;
    let codec = EventCodec::new(&connector.schema_registry).map_err(bad)?;
    // Passes every interval serve health; a single pass, its metrics only.
    let probe = args
        .every
        .map(|every| std::sync::Arc::new(observe::reconcile::ReconcileProbe::new(every)));
    if let Some(listen) = args.metrics_listen {
        let told = probe
            .clone()
            .map(|p| p as std::sync::Arc<dyn observe::health::Probe>);
        observe::serve(listen, told).map_err(bad)?;
    }
    let pass = Pass {
        connector: &connector,
        projector: &projector,
        table: args.table.as_deref(),
        lag_bound: Duration::from_secs(args.lag_bound),
    };
    let (Some(every), Some(probe)) = (args.every, probe) else {
        return round(&pass, &codec, args.repair).await;
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(super::run::stop_on_signal(shutdown.clone()));
    loop {
        let started = Instant::now();
        probe.begin();
        let ended = round(&pass, &codec, args.repair).await;
        probe.end(ended.is_ok());
        match ended {
            Err((code, message)) if code == super::EXIT_BAD_CONFIG => return Err((code, message)),
            // The next pass may go better (a connector restarted, a database back).
            Err((_, message)) => eprintln!("fhir-cdc reconcile: {message}"),
            Ok(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(every.saturating_sub(started.elapsed())) => {}
        }
    }
}

/// One pass, or with `repair` a repair and its verifying pass: the exit status of the last.
async fn round(pass: &Pass<'_>, codec: &EventCodec, repair: bool) -> Result<ExitCode, Failure> {
    let (connector, projector) = (pass.connector, pass.projector);
    let run_id = run_id();
    let context = events::Context {
        run_id: &run_id,
        connector,
        projector: &projector.name,
        projection_schema: &projector.projection.schema,
    };
    let report = one_pass(pass, &context, codec).await?;
    if !repair {
        return Ok(exit(&report));
    }
    let client = projection_client(projector).await?;
    let schema = &projector.projection.schema;
    if report.drifted.is_empty() {
        observe::reconcile::repairs(&connector.name, 0, 0);
        observe::reconcile::worklist_open(
            &connector.name,
            worklist::open_items(&client, schema, &connector.name)
                .await
                .map_err(failed)?,
        );
        return Ok(exit(&report));
    }

    let requests = repair::request_snapshots(connector, &report)
        .await
        .map_err(failed)?;
    for (id, table, rows) in &requests {
        println!("repair: asked connector {} to read {rows} row(s) of {table} again (snapshot request {id})", connector.name);
    }
    let (restored, moved) = repair::restore(&client, projector, &report)
        .await
        .map_err(failed)?;
    if restored + moved > 0 {
        println!("repair: {restored} projection row(s) restored from the ledger, {moved} left (changed since the pass)");
    }
    let settled = repair::settle_letters(connector, &report)
        .await
        .map_err(failed)?;
    if settled > 0 {
        println!("repair: {settled} dead letter(s) settled, superseded by their rows' current state (`fhir-cdc dlq list --all`)");
    }
    let worklisted = worklist::record(&client, schema, &connector.name, &run_id, &report)
        .await
        .map_err(failed)?;
    if worklisted > 0 {
        println!("repair: {worklisted} item(s) on the worklist (`fhir-cdc reconcile worklist`)");
    }
    let ids: Vec<String> = requests.into_iter().map(|(id, ..)| id).collect();
    repair::await_requests(connector, &ids, pass.lag_bound)
        .await
        .map_err(failed)?;

    println!("verifying:");
    let run_id = run_id_after(&run_id);
    let context = events::Context {
        run_id: &run_id,
        ..context
    };
    let verified = one_pass(pass, &context, codec).await?;
    worklist::record(&client, schema, &connector.name, &run_id, &verified)
        .await
        .map_err(failed)?;
    observe::reconcile::worklist_open(
        &connector.name,
        worklist::open_items(&client, schema, &connector.name)
            .await
            .map_err(failed)?,
    );
    let still: HashSet<(&str, &str, &str)> =
        verified.drifted.iter().map(Drifted::subject).collect();
    let repaired = report
        .drifted
        .iter()
        .filter(|d| !still.contains(&d.subject()))
        .count();
    println!(
        "repaired {repaired} of {}; {} still drifting",
        report.drifted.len(),
        verified.drifted.len()
    );
    let attempted = report.drifted.iter().filter(|d| !d.class.manual()).count();
    let mended = report
        .drifted
        .iter()
        .filter(|d| !d.class.manual())
        .filter(|d| !still.contains(&d.subject()))
        .count();
    observe::reconcile::repairs(&connector.name, attempted, mended);
    Ok(exit(&verified))
}

/// A pass, its report printed and its events written.
async fn one_pass(
    pass: &Pass<'_>,
    context: &events::Context<'_>,
    codec: &EventCodec,
) -> Result<Report, Failure> {
    let started = Instant::now();
    let name = &pass.connector.name;
    let report = match pass.run().await {
        Ok(report) => report,
        Err(PassError::Usage(message)) => return Err(bad(message)),
        Err(e @ (PassError::Lag(_) | PassError::Failed(_))) => {
            observe::reconcile::failed(name);
            return Err(failed(e));
        }
    };
    observe::reconcile::pass(
        name,
        &report.drift_by_table(),
        report.compared,
        started.elapsed(),
    );
    print(&report, pass.projector);
    let written = events::publish(context, codec, &report)
        .await
        .map_err(|e| failed(format!("writing the reconcile events: {e}")))?;
    if written > 0 {
        println!(
            "{written} reconcile event(s) on {} (run {})",
            context.connector.reconcile_topic(),
            context.run_id
        );
    }
    Ok(report)
}

fn print(report: &Report, projector: &ProjectorConfig) {
    println!(
        "source read at {}: {} row(s); connector caught up in {:.1} s, projector {} in {:.1} s",
        report.read_at.text(),
        report.rows,
        report.waited.0.as_secs_f64(),
        projector.name,
        report.waited.1.as_secs_f64(),
    );
    let ledger = format!(
        "the projection's ledger ({}.history)",
        projector.projection.schema
    );
    let log = &report.log;
    if log.from_topics.is_empty() {
        println!("log: {ledger}: it reaches back to Kafka's first offset of every partition, and the projector applied every event topic to its end");
    } else {
        let partitions: Vec<String> = log
            .from_topics
            .iter()
            .map(|(partition, why)| format!("{partition}: {why}"))
            .collect();
        println!(
            "log: Kafka itself for {} partition(s), {} event(s) read ({}); {ledger} for the rest",
            partitions.len(),
            log.events,
            partitions.join("; ")
        );
    }
    for place in &log.undecodable {
        println!("log: left out, cannot be decoded: {place}");
    }
    for drifted in &report.drifted {
        if let Some(letter) = &drifted.letter {
            let table = drifted.table.as_deref().unwrap_or_default();
            let now = match drifted.source {
                Some(_) => format!(
                    "its row maps now, as {}/{}",
                    drifted.resource_type, drifted.resource_id
                ),
                None => "its row is gone at the source, or its mapping leaves it out now".into(),
            };
            println!(
                "{:<24} {letter}  of {table}: {now}; the letter is outstanding (`fhir-cdc dlq show {letter}`)",
                drifted.class.name()
            );
            continue;
        }
        let [source, log, projection] = drifted.sides();
        println!(
            "{:<24} {}/{}  source {source}  log {log}  projection {projection}",
            drifted.class.name(),
            drifted.resource_type,
            drifted.resource_id,
        );
    }
    for ((table, mapping_id), rows) in &report.unmappable_rows {
        println!(
            "{:<24} {rows} row(s) of {table} fail mapping {mapping_id} and have no resource yet (`fhir-cdc dlq list`)",
            "source_unmappable"
        );
    }
    for (letter, why) in &report.letters_untold {
        println!("dead letter {letter} cannot be matched to a source row: {why}");
    }
    let counts: Vec<String> = report
        .counts()
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(class, n)| format!("{} {n}", class.name()))
        .collect();
    println!(
        "{} drifted of {} resource(s) compared{}; {} changed while the pass ran (judged next pass)",
        report.drift(),
        report.compared,
        if counts.is_empty() {
            String::new()
        } else {
            format!(" ({})", counts.join(", "))
        },
        report.changed_since
    );
}

fn exit(report: &Report) -> ExitCode {
    if report.drift() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A pass's id: the time in milliseconds and this process.
fn run_id() -> String {
    let millis = chrono::Utc::now().timestamp_millis();
    format!("{millis}-{}", std::process::id())
}

/// The verifying pass's id: the first's, marked.
fn run_id_after(first: &str) -> String {
    format!("{first}-verify")
}

/// A connection to `projector`'s database, its schema migrated (the worklist with it).
async fn projection_client(projector: &ProjectorConfig) -> Result<tokio_postgres::Client, Failure> {
    let mut client = crate::postgres::connect(&projector.projection.url)
        .await
        .map_err(|e| failed(format!("the projection database: {e}")))?;
    projection::migrate(&mut client, &projector.projection.schema)
        .await
        .map_err(|e| failed(format!("migrating the projection: {e}")))?;
    worklist::migrate(&mut client, &projector.projection.schema)
        .await
        .map_err(failed)?;
    Ok(client)
}

async fn worklist_command(args: WorklistArgs) -> Result<ExitCode, Failure> {
    let projector = ProjectorConfig::load(&args.projection).map_err(bad)?;
    let client = projection_client(&projector).await?;
    let schema = &projector.projection.schema;
    let connector = args.connector.as_deref();
    let fail = |e: tokio_postgres::Error| failed(format!("reading the worklist: {e}"));
    match args.action {
        WorklistAction::List { all } => {
            let rows = client
                .query(
                    &format!(
                        "SELECT connector, item, class, state, first_seen::text, last_seen::text
                           FROM {schema}.reconcile_worklist
                          WHERE ($1::text IS NULL OR connector = $1) AND ($2 OR state = 'open')
                          ORDER BY connector, first_seen, item"
                    ),
                    &[&connector, &all],
                )
                .await
                .map_err(fail)?;
            for row in &rows {
                let column = |i| row.get::<_, String>(i);
                println!(
                    "{}  {}  {}  {}  first seen {}  last seen {}",
                    column(0),
                    column(1),
                    column(2),
                    column(3),
                    column(4),
                    column(5)
                );
            }
            eprintln!("{} item(s)", rows.len());
            Ok(ExitCode::SUCCESS)
        }
        WorklistAction::Show { item } => {
            let rows = client
                .query(
                    &format!(
                        "SELECT to_jsonb(w)::text FROM {schema}.reconcile_worklist w
                          WHERE item = $1 AND ($2::text IS NULL OR connector = $2)"
                    ),
                    &[&item, &connector],
                )
                .await
                .map_err(fail)?;
            if rows.is_empty() {
                return Err(failed(format!("no worklist item {item}")));
            }
            for row in rows {
                let text: String = row.get(0);
                let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json).unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        WorklistAction::Resolve { item, note } => {
            let resolved = client
                .query(
                    &format!(
                        "UPDATE {schema}.reconcile_worklist
                            SET state = 'resolved', resolved_at = clock_timestamp(), note = $3
                          WHERE item = $1 AND ($2::text IS NULL OR connector = $2)
                          RETURNING connector"
                    ),
                    &[&item, &connector, &note],
                )
                .await
                .map_err(fail)?;
            match resolved.len() {
                0 => Err(failed(format!("no worklist item {item}"))),
                1 => {
                    println!("{item} resolved");
                    Ok(ExitCode::SUCCESS)
                }
                n => {
                    println!("{item} resolved for {n} connectors");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}
