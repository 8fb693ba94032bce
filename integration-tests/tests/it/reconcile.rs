//! `fhir-cdc reconcile` against the stack: a connector and a projector that agree with the
//! source give no drift; then each kind of drift made on purpose — a projection row edited
//! and one deleted outside the projector, rows changed, inserted and deleted while the
//! table was not published, a row whose mapping fails, a changed mapping, a projector that
//! fell behind — is found by one pass, with its class and resource, and reported as an
//! event. `--repair` mends what the log can mend, verifies with a second pass, and leaves the
//! rest on the worklist.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    connector::{
        await_caught_up, await_snapshotted, free_port, http_get, read_for, scrape, spawn, start,
        stop, Connector,
    },
    projector::{drop_projections, project_until_caught_up, projector_config},
    stack,
};

/// `fhir-cdc reconcile` (lag bound 20 s unless `extra` sets one): its exit code and stdout
/// (stderr appended).
fn reconcile(config: &Path, projection: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let bound: &[&str] = if extra.contains(&"--lag-bound") {
        &[]
    } else {
        &["--lag-bound", "20"]
    };
    let output = Command::new(stack::fhir_cdc_bin())
        .arg("reconcile")
        .arg("--config")
        .arg(config)
        .arg("--projection")
        .arg(projection)
        .args(bound)
        .args(extra)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The report's lines of drifted resources: `class resource`.
fn drifted(report: &str) -> Vec<String> {
    let mut lines: Vec<String> = report
        .lines()
        .filter(|l| l.contains("  source "))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    lines.sort();
    lines
}

/// Fifty lab results captured by a running connector, and a projector's configuration.
struct Lab {
    client: tokio_postgres::Client,
    schema: String,
    table: String,
    dir: PathBuf,
    config: PathBuf,
    slot: String,
    log: PathBuf,
    prefix: String,
    topic: String,
    projection_schema: String,
    projector: PathBuf,
    connector: Connector,
}

async fn lab(name: &str) -> Lab {
    lab_with(name, "").await
}

/// [`lab`], with `extra` appended to the connector's configuration.
async fn lab_with(name: &str, extra: &str) -> Lab {
    let client = stack::pg_client().await;
    let schema = stack::unique(name);
    stack::create_lab_schema(&client, &schema).await;
    let table = format!("{schema}.lab_result");
    stack::insert_results(&client, &table, 50).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhirrecon");
    let config = stack::connector_config(&dir, &schema, &prefix, extra);
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let topic = format!("{prefix}.lab.Observation");
    let projection_schema = format!("{schema}_proj");
    let projector = projector_config(&dir, &format!("{schema}_p"), &topic, &projection_schema);
    let connector = start(&config, &log);
    await_snapshotted(&config, &log).await;
    await_caught_up(&client, &slot, Duration::from_secs(30), &log).await;
    Lab {
        client,
        schema,
        table,
        dir,
        config,
        slot,
        log,
        prefix,
        topic,
        projection_schema,
        projector,
        connector,
    }
}

impl Lab {
    /// Drift made on purpose: a projection row edited (result 1) and one deleted (2)
    /// outside the projector; rows changed (3), deleted (4) and inserted (1001) while the
    /// table is not published; a row its mapping refuses (1002: no LOINC code).
    async fn drift(&self) {
        let (table, slot, projection) = (&self.table, &self.slot, &self.projection_schema);
        self.client
            .batch_execute(&format!(
                "UPDATE {projection}.resources SET body = jsonb_set(body, '{{status}}', '\"amended\"')
                  WHERE resource_id = 'result-1';
                 DELETE FROM {projection}.resources WHERE resource_id = 'result-2';"
            ))
            .await
            .unwrap();
        let insert = |id: i32, code: &str| {
            format!(
                "INSERT INTO {table} (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
                 VALUES ({id}, 'A24-{id}', 'M000001', '{code}', 90, 'mg/dL', 'F', '2024-03-05 14:30:00')"
            )
        };
        // (Each its own transaction: the publication's membership counts as of each change.)
        for statement in [
            format!("ALTER PUBLICATION {slot} DROP TABLE {table}"),
            format!("UPDATE {table} SET value_numeric = 91 WHERE result_id = 3"),
            format!("DELETE FROM {table} WHERE result_id = 4"),
            insert(1001, "GLU"),
            format!("ALTER PUBLICATION {slot} ADD TABLE {table}"),
            insert(1002, "ZZZ"),
        ] {
            self.client.batch_execute(&statement).await.unwrap();
        }
        await_caught_up(&self.client, slot, Duration::from_secs(30), &self.log).await;
    }

    fn reconcile_topic(&self) -> String {
        format!("{}.reconcile.{}", self.prefix, self.schema)
    }

    async fn end(self) {
        assert!(stop(self.connector).success());
        stack::drop_capture(&self.client, &self.slot, &self.slot, &self.schema).await;
        drop_projections(&self.client, &[self.projection_schema], &self.dir).await;
    }
}

#[tokio::test]
async fn each_drift_made_on_purpose_is_found_with_its_class() {
    let lab = lab("recon").await;
    let (config, projector, table) = (&lab.config, &lab.projector, &lab.table);
    project_until_caught_up(projector);
    let (code, report) = reconcile(config, projector, &[]);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("0 drifted of 50 resource(s) compared"),
        "{report}"
    );

    lab.drift().await;
    project_until_caught_up(projector);
    let (code, report) = reconcile(config, projector, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(
        drifted(&report),
        [
            "deleted_at_source Observation/result-4",
            "log_behind_source Observation/result-3",
            "missing_from_log Observation/result-1001",
            "missing_from_projection Observation/result-2",
            "projection_edited Observation/result-1",
        ],
        "{report}"
    );
    assert!(
        report.contains(&format!("1 row(s) of {table} fail mapping lab.result")),
        "{report}"
    );
    assert!(report.contains("6 drifted of"), "{report}");
    // Only the values' digests are shown, never a value.
    assert!(
        !report.contains("mg/dL") && !report.contains("M000001"),
        "{report}"
    );
    // Every drifted resource is an event, with the evidence of each side.
    let events: Vec<serde_json::Value> =
        read_for(&lab.reconcile_topic(), 5, Duration::from_secs(10))
            .await
            .iter()
            .map(|bytes| fhir_cdc::reconcile::events::decode(bytes).unwrap())
            .collect();
    assert_eq!(events.len(), 5);
    let edited = events
        .iter()
        .find(|e| e["drift"] == "projection_edited")
        .unwrap();
    assert_eq!(edited["resource_id"], "result-1");
    assert_eq!(edited["log_topic"], lab.topic.as_str());
    assert_eq!(edited["log_version"], edited["projection_version"]);
    assert_ne!(edited["log_digest"], edited["projection_digest"]);
    assert_eq!(edited["source_digest"], edited["log_digest"]);
    assert_eq!(edited["source_table"], table.as_str());

    // A changed mapping: every resource it makes differs from its logged version.
    let mapping = lab.dir.join("mappings/result.yaml");
    let text = std::fs::read_to_string(&mapping).unwrap();
    std::fs::write(
        &mapping,
        text.replace(
            "code: laboratory",
            "code: laboratory\n      category[0].text: Laboratory",
        ),
    )
    .unwrap();
    let (code, report) = reconcile(config, projector, &["--table", table]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("mapping_changed 49"),
        "the 50 rows but the one deleted (the source side is judged first): {report}"
    );
    std::fs::write(&mapping, text).unwrap();

    // A projector that stopped: lag beyond the bound is reported as such.
    stack::insert_results(&lab.client, table, 1).await;
    let (code, report) = reconcile(config, projector, &["--lag-bound", "3"]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("has not applied what Kafka holds within 3 s")
            && report.contains(&format!("{}[0] at ", lab.topic)),
        "{report}"
    );
    // A TRUNCATE: the stream says so (a dead letter, no per-row events), and every resource
    // the log still holds of the table is deleted at the source.
    project_until_caught_up(projector);
    lab.client
        .batch_execute(&format!("TRUNCATE {table}"))
        .await
        .unwrap();
    await_caught_up(&lab.client, &lab.slot, Duration::from_secs(30), &lab.log).await;
    let (code, report) = reconcile(config, projector, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("52 drifted of")
            && report.contains("(deleted_at_source 51, dead_letter_outdated 1)"),
        "results 1-50 but the one deleted, 1001 and the one inserted last; the letter of 1002, whose row is gone: {report}"
    );
    assert!(
        report.contains("cannot be matched to a source row: a TRUNCATE"),
        "the TRUNCATE's own letter is of no row: {report}"
    );
    let (code, report) = reconcile(config, projector, &["--table", "lis.nothing"]);
    assert_eq!(code, Some(2), "{report}");
    assert!(report.contains("no mapping reads table"), "{report}");
    lab.end().await;
}

/// A projection whose ledger does not reach back to the start of the log (pruned here; a
/// projector started from the end is alike): the pass reads those partitions from Kafka,
/// says so and why, and judges as with a whole ledger; `--repair` restores a row from an
/// event the ledger never held, recording it there first.
#[tokio::test]
async fn a_ledger_that_does_not_reach_back_is_completed_from_kafka() {
    let lab = lab("reconkafka").await;
    let (config, projector) = (&lab.config, &lab.projector);
    let (client, projection, topic) = (&lab.client, &lab.projection_schema, &lab.topic);
    project_until_caught_up(projector);
    client
        .batch_execute(&format!(
            "DELETE FROM {projection}.history WHERE kafka_offset <= (
               SELECT kafka_offset FROM {projection}.history WHERE resource_id = 'result-5');
             UPDATE {projection}.resources SET body = jsonb_set(body, '{{status}}', '\"amended\"')
              WHERE resource_id = 'result-5';"
        ))
        .await
        .unwrap();
    let (code, report) = reconcile(config, projector, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("log: Kafka itself for 1 partition(s), 50 event(s) read")
            && report.contains(&format!("{topic}[0]: the ledger begins at offset ")),
        "{report}"
    );
    assert_eq!(
        drifted(&report),
        ["projection_edited Observation/result-5"],
        "without Kafka's events, every resource the ledger lost would look edited: {report}"
    );

    let (code, report) = reconcile(config, projector, &["--repair"]);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("1 projection row(s) restored from the ledger")
            && report.contains("repaired 1 of 1; 0 still drifting"),
        "{report}"
    );
    let recorded: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {projection}.history WHERE resource_id = 'result-5'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1, "the restored row's event is in the ledger");

    // No ledger at all: the whole log from Kafka, and nothing drifted.
    client
        .batch_execute(&format!("DELETE FROM {projection}.history"))
        .await
        .unwrap();
    let (code, report) = reconcile(config, projector, &[]);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains(&format!("{topic}[0]: the ledger holds none of the"))
            && report.contains("0 drifted of 50 resource(s) compared"),
        "{report}"
    );
    lab.end().await;
}

/// `fhir-cdc reconcile worklist --projection P <args>`: its exit code and output.
fn worklist(projection: &Path, args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(stack::fhir_cdc_bin())
        .args(["reconcile", "worklist", "--projection"])
        .arg(projection)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[tokio::test]
async fn repair_mends_through_the_log_and_leaves_the_rest_on_the_worklist() {
    let lab = lab("recrep").await;
    let (config, projector) = (&lab.config, &lab.projector);
    let projecting = spawn(&["project"], projector, Stdio::null());
    let (code, report) = reconcile(config, projector, &["--repair"]);
    assert_eq!(code, Some(0), "{report}");
    assert!(!report.contains("repair:"), "nothing to repair: {report}");

    lab.drift().await;
    let (code, report) = reconcile(config, projector, &["--repair"]);
    assert_eq!(
        code,
        Some(1),
        "the deleted row and the unmappable one remain: {report}"
    );
    assert!(
        report.contains(&format!(
            "repair: asked connector {} to read 2 row(s) of {} again",
            lab.schema, lab.table
        )) && report.contains("repair: 2 projection row(s) restored from the ledger")
            && report.contains("repair: 1 item(s) on the worklist"),
        "{report}"
    );
    let verified = report.split("verifying:").nth(1).unwrap();
    assert_eq!(
        drifted(verified),
        ["deleted_at_source Observation/result-4"],
        "{report}"
    );
    assert!(
        report.contains("repaired 4 of 5; 1 still drifting"),
        "{report}"
    );
    // What the rows hold now is in the projection; the edited row is the log's again.
    let (client, schema, table) = (&lab.client, &lab.projection_schema, &lab.table);
    let one = |sql: String| async move {
        client
            .query_one(&sql, &[])
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
    };
    let projected = |id: i32, path: &str| {
        one(format!(
            "SELECT body #>> '{{{path}}}' FROM {schema}.resources WHERE resource_id = 'result-{id}'"
        ))
    };
    let value = |id: i32| {
        one(format!(
            "SELECT value_numeric::text FROM {table} WHERE result_id = {id}"
        ))
    };
    assert_eq!(projected(3, "valueQuantity,value").await, value(3).await);
    assert_eq!(
        projected(1001, "valueQuantity,value").await,
        value(1001).await
    );
    assert_eq!(projected(1, "status").await.as_deref(), Some("final"));
    assert_eq!(projected(2, "status").await.as_deref(), Some("final"));
    // Five events of the first pass (the unmappable row has no resource), one of the second.
    let events = read_for(&lab.reconcile_topic(), 7, Duration::from_secs(10)).await;
    assert_eq!(events.len(), 6);

    let (code, listed) = worklist(projector, &["list"]);
    assert_eq!(code, Some(0), "{listed}");
    assert!(
        listed.contains(&format!(
            "{}  Observation/result-4  deleted_at_source  open",
            lab.schema
        )),
        "{listed}"
    );
    let (code, shown) = worklist(projector, &["show", "Observation/result-4"]);
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("\"source_side\": \"none\""), "{shown}");
    let (code, said) = worklist(
        projector,
        &[
            "resolve",
            "Observation/result-4",
            "--note",
            "deleted in the source on purpose",
        ],
    );
    assert_eq!(code, Some(0), "{said}");
    let (_, listed) = worklist(projector, &["list"]);
    assert!(listed.contains("0 item(s)"), "{listed}");
    let (_, listed) = worklist(projector, &["list", "--all"]);
    assert!(listed.contains("resolved"), "{listed}");
    let (code, said) = worklist(projector, &["resolve", "Observation/result-99"]);
    assert_eq!(code, Some(1), "{said}");

    // The unmappable row fixed at the source: its change flows, and the letter it left is
    // outstanding but superseded — found as such, and settled by a repair.
    let letter = outstanding_letters(config, &lab.schema)
        .into_iter()
        .next()
        .expect("the letter of result 1002");
    lab.client
        .batch_execute(&format!(
            "UPDATE {table} SET test_code = 'GLU' WHERE result_id = 1002"
        ))
        .await
        .unwrap();
    await_caught_up(client, &lab.slot, Duration::from_secs(30), &lab.log).await;
    let (code, report) = reconcile(config, projector, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains(&format!(
            "dead_letter_outdated     {letter}  of {table}: its row maps now, as Observation/result-1002"
        )),
        "{report}"
    );
    let events = read_for(&lab.reconcile_topic(), 8, Duration::from_secs(10)).await;
    let event = events
        .iter()
        .map(|bytes| fhir_cdc::reconcile::events::decode(bytes).unwrap())
        .find(|e| e["drift"] == "dead_letter_outdated")
        .expect("the letter's event");
    assert_eq!(event["dead_letter"], letter.as_str());
    assert_eq!(event["resource_id"], "result-1002");
    assert_eq!(event["source_table"], table.as_str());
    let (_, report) = reconcile(config, projector, &["--repair"]);
    assert!(
        report.contains("repair: 1 dead letter(s) settled"),
        "{report}"
    );
    let verified = report.split("verifying:").nth(1).unwrap();
    assert!(!verified.contains("dead_letter_outdated"), "{report}");
    assert!(outstanding_letters(config, &lab.schema).is_empty());

    /// The ids of connector `name`'s outstanding dead letters, as `fhir-cdc dlq list` shows them.
    fn outstanding_letters(config: &Path, name: &str) -> Vec<String> {
        let output = Command::new(stack::fhir_cdc_bin())
            .args(["dlq", "list", "--config"])
            .arg(config)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|id| id.starts_with(&format!("{name}:")))
            .map(str::to_owned)
            .collect()
    }

    assert!(stop(projecting).success());
    lab.end().await;
}

/// The same on MariaDB: the rows read in one consistent snapshot at its binary log
/// position; a change the binary log never saw (`sql_log_bin = 0`) is found, and mended
/// by reading the row again through the signal table.
#[tokio::test]
async fn a_change_the_binary_log_never_saw_is_found_and_read_again() {
    use mysql_async::prelude::Queryable;
    let name = stack::unique("recmy");
    let dir = std::env::temp_dir().join(&name);
    let mut conn = stack::mysql_conn().await;
    let database = stack::billing_tables(&mut conn, &name, &dir.join("mappings")).await;
    let charge = format!("{database}.{name}_charge");
    conn.query_drop(format!(
        "INSERT INTO {charge} (charge_id, account_no, mrn, cpt_code, description, amount, status, service_date, posted_at)
         SELECT seq, 'ACC-1', 'M000000001', '99213', 'Office visit', 100.00, 'B', '2024-03-05', '2024-03-05 09:15:00'
           FROM seq_1_to_20"
    ))
    .await
    .unwrap();
    let prefix = stack::unique("fhirrecmy");
    let config = stack::mysql_connector_config(&dir, &name, &prefix);
    stack::add_source_setting(
        &config,
        &format!("signal.data.collection = \"{database}.{name}_signal\""),
    );
    let topic = format!("{prefix}.billing.ChargeItem");
    let projection_schema = format!("{name}_proj");
    let projector = projector_config(&dir, &format!("{name}_p"), &topic, &projection_schema);
    let log = dir.join("run.log");
    let connector = start(&config, &log);
    await_snapshotted(&config, &log).await;
    let projecting = spawn(&["project"], &projector, Stdio::null());
    let (code, report) = reconcile(&config, &projector, &[]);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("0 drifted of 20 resource(s) compared")
            && report.contains("source read at binlog:"),
        "{report}"
    );

    stack::mariadb_root(&format!(
        "SET sql_log_bin = 0; UPDATE {charge} SET amount = 5 WHERE charge_id = 3;"
    ));
    let (code, report) = reconcile(&config, &projector, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(
        drifted(&report),
        ["log_behind_source ChargeItem/charge-3"],
        "{report}"
    );
    let (code, report) = reconcile(&config, &projector, &["--repair"]);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("repaired 1 of 1; 0 still drifting"),
        "{report}"
    );

    assert!(stop(projecting).success());
    assert!(stop(connector).success());
    let client = stack::pg_client().await;
    drop_projections(&client, &[projection_schema], &dir).await;
}

/// The Grafana dashboard (docs/grafana/fhir-cdc.json) asks only for metrics that the
/// connector, the projector and `reconcile --every` export, scraped from their endpoints
/// while they run.
#[tokio::test]
async fn the_dashboard_asks_only_for_metrics_the_binaries_export() {
    let ports = [free_port(), free_port(), free_port()];
    let lab = lab_with(
        "recdash",
        &format!("[metrics]\nlisten = \"127.0.0.1:{}\"", ports[0]),
    )
    .await;
    let text = std::fs::read_to_string(&lab.projector).unwrap();
    std::fs::write(
        &lab.projector,
        format!("{text}[metrics]\nlisten = \"127.0.0.1:{}\"\n", ports[1]),
    )
    .unwrap();
    let projecting = spawn(&["project"], &lab.projector, Stdio::null());
    // Streamed changes: the latencies from the source's commit are measured.
    stack::insert_results(&lab.client, &lab.table, 5).await;
    let listen = format!("127.0.0.1:{}", ports[2]);
    let projection = lab.projector.to_str().unwrap();
    let reconciling = spawn(
        &[
            "reconcile",
            "--projection",
            projection,
            "--every",
            "2s",
            "--repair",
            "--metrics-listen",
            &listen,
        ],
        &lab.config,
        Stdio::null(),
    );
    let names = |port| -> std::collections::BTreeSet<String> {
        scrape(port)
            .into_keys()
            .map(|series| {
                let name = series.split('{').next().unwrap();
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n))
                    .to_owned()
            })
            .collect()
    };
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stack::repo_root().join("docs/grafana/fhir-cdc.json")).unwrap(),
    )
    .unwrap();
    let mut asked = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("fhir_cdc_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                asked.insert(
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .fold(name.as_str(), |n, suffix| {
                            n.strip_suffix(suffix).unwrap_or(n)
                        })
                        .to_owned(),
                );
            }
        }
    }
    assert!(asked.len() >= 15, "{asked:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let missing = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let exported: std::collections::BTreeSet<String> =
            ports.iter().flat_map(|port| names(*port)).collect();
        let missing: Vec<&String> = asked.difference(&exported).collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
    };
    assert!(
        missing.is_empty(),
        "the dashboard asks for metrics no binary exports: {missing:?}"
    );
    let reconciled = scrape(ports[2]);
    let clean = reconciled
        .iter()
        .find(|(series, _)| {
            series.starts_with("fhir_cdc_reconcile_passes_total") && series.contains("clean")
        })
        .map(|(_, n)| *n);
    assert!(clean >= Some(1.0), "{reconciled:?}");
    // Passes every interval serve health on the same listener.
    for path in ["/health/started", "/health/live", "/health/ready"] {
        let (status, body) = http_get(ports[2], path).unwrap();
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert!(stop(reconciling).success());
    assert!(stop(projecting).success());
    lab.end().await;
}

/// With writes running all along — updates everywhere in the table, new rows — a pass
/// finds no drift: what changed after the source read is judged by the next pass, and the
/// lag of the connector and the projector stays within the bound.
#[tokio::test]
async fn passes_while_writes_run_find_no_drift() {
    let lab = lab("recbusy").await;
    let projecting = spawn(&["project"], &lab.projector, Stdio::null());
    let writing = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (writer, table, writing) =
            (stack::pg_client().await, lab.table.clone(), writing.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !writing.is_cancelled() {
                writer
                    .batch_execute(&format!(
                        "UPDATE {table} SET value_numeric = value_numeric + 1 WHERE result_id % 7 = {}",
                        n % 7
                    ))
                    .await
                    .unwrap();
                if n % 10 == 0 {
                    stack::insert_results(&writer, &table, 1).await;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    for _ in 0..3 {
        let (code, report) = reconcile(&lab.config, &lab.projector, &[]);
        assert_eq!(code, Some(0), "{report}");
    }
    writing.cancel();
    writer.await.unwrap();
    assert!(stop(projecting).success());
    lab.end().await;
}
