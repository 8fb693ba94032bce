//! The stack's own services failing while a connector captures a stream of writes: the
//! broker frozen for 30 s, the source database restarted (PostgreSQL; MariaDB cleanly and
//! killed, in `mariadb`), the schema registry frozen for 30 s while the connector has to
//! start again. Each time `run` must not exit, and event-id accounting must show every
//! committed row arrived, repeats only as exact events.
//!
//! These freeze or restart services that every other test uses, so they live in a test
//! binary of their own — cargo runs test binaries one after another — and take one lock,
//! so that they also run one at a time.

mod mariadb;

use std::{
    collections::BTreeSet,
    future::Future,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    connector::{
        assert_repeats_are_exact, await_binlog_stored, await_snapshotted, await_streaming,
        events_of, exit_within, free_port, http_get, latest_values, scrape, start, stop,
    },
    stack,
};
use tokio_util::sync::CancellationToken;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `integration-tests/stack/fault <args>`, which must succeed.
fn fault(args: &[&str]) {
    let status = Command::new(stack::repo_root().join("integration-tests/stack/fault"))
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "stack/fault {args:?}: {status}");
}

/// Run a connector over a table written to all along, apply `fault` meanwhile, and check
/// that every row in the table at the end arrived as an event, that events sharing an id
/// are the same event, and that `run` never exited.
async fn survives(name: &str, fault: impl Future<Output = ()>) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let client = stack::pg_client().await;
    let schema = stack::unique(name);
    stack::create_lab_schema(&client, &schema).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhirfault");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let topic = format!("{prefix}.lab.Observation");
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let mut connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;
    await_snapshotted(&config, &log).await;

    // Ten rows every 50 ms, by id, each transaction tried again (on a new connection)
    // until it commits: whatever is in the table at the end was committed.
    let writing = CancellationToken::new();
    let writer = {
        let (table, writing) = (format!("{schema}.lab_result"), writing.clone());
        tokio::spawn(async move {
            let mut writer = stack::pg_client().await;
            let mut n: i32 = 0;
            while !writing.is_cancelled() {
                let sql = format!(
                    "INSERT INTO {table} (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
                     SELECT i, 'A24-' || i, 'M000001', 'GLU', 90, 'mg/dL', 'F', '2024-03-05 14:30:00'
                       FROM generate_series({}, {}) AS i ON CONFLICT DO NOTHING",
                    n * 10 + 1,
                    n * 10 + 10
                );
                match writer.batch_execute(&sql).await {
                    Ok(()) => n += 1,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if let Ok(Ok((client, connection))) = tokio::time::timeout(
                            Duration::from_secs(5),
                            tokio_postgres::connect(&stack::pg_url(), tokio_postgres::NoTls),
                        )
                        .await
                        {
                            tokio::spawn(connection);
                            writer = client;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    fault.await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    writing.cancel();
    writer.await.unwrap();

    let client = stack::pg_client().await;
    let rows = client
        .query(&format!("SELECT result_id FROM {schema}.lab_result"), &[])
        .await
        .unwrap();
    let expected: BTreeSet<String> = rows
        .iter()
        .map(|r| format!("result-{}", r.get::<_, i32>(0)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    let events = loop {
        let events = events_of(&topic).await;
        let arrived: BTreeSet<String> = events.iter().map(|e| e.resource_id.clone()).collect();
        if arrived.is_superset(&expected) || Instant::now() > deadline {
            let missing: Vec<_> = expected.difference(&arrived).take(5).collect();
            assert!(
                missing.is_empty(),
                "{} of {} rows never arrived, e.g. {missing:?}; log:\n{}",
                expected.difference(&arrived).count(),
                expected.len(),
                std::fs::read_to_string(&log).unwrap()
            );
            break events;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_repeats_are_exact(&events);
    let distinct: BTreeSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        connector.running(),
        "`run` exited during the fault; log:\n{text}"
    );
    eprintln!(
        "{name}: {} rows, {} events ({} distinct), {} restart(s)",
        expected.len(),
        events.len(),
        distinct.len(),
        text.matches("restarting").count() + text.matches("restarts by itself").count()
    );
    assert!(stop(connector).success(), "{text}");
    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_broker_frozen_for_30_s_loses_nothing() {
    survives("brokerfault", async {
        fault(&["pause", "kafka"]);
        tokio::time::sleep(Duration::from_secs(30)).await;
        fault(&["resume", "kafka"]);
    })
    .await;
}

#[tokio::test]
async fn postgres_restarted_while_writes_run_loses_nothing() {
    survives("pgfault", async {
        fault(&["restart", "postgres"]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        fault(&["restart", "postgres"]);
    })
    .await;
}

/// The registry frozen, and the connector made to start again meanwhile (its replication
/// connection ended by the server): starting needs the registry, so it retries until the
/// registry answers again.
#[tokio::test]
async fn a_registry_frozen_for_30_s_while_the_connector_restarts_loses_nothing() {
    survives("registryfault", async {
        fault(&["pause", "registry"]);
        let client = stack::pg_client().await;
        client
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE backend_type = 'walsender' AND application_name LIKE 'fhir-cdc registryfault%'",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        fault(&["resume", "registry"]);
    })
    .await;
}

/// The binary log rotated twice while the connector was stopped: it resumes by GTID and
/// misses nothing. Then the logs from its stored position purged: with the default
/// `snapshot.mode` it stops and names the fix; with `when_needed` it snapshots again and the
/// topic is whole. (A test of its own binary: purging logs would break other tests' readers.)
#[tokio::test]
async fn rotated_logs_resume_by_gtid_and_purged_ones_need_when_needed() {
    use mysql_async::prelude::Queryable;
    let _alone = ONE_AT_A_TIME.lock().await;
    let name = stack::unique("my_purge");
    let dir = std::env::temp_dir().join(&name);
    let mut conn = stack::mysql_conn().await;
    let database = stack::billing_tables(&mut conn, &name, &dir.join("mappings")).await;
    let prefix = stack::unique("fhirpurge");
    let config = stack::mysql_connector_config(&dir, &name, &prefix);
    let (log, topic) = (dir.join("run.log"), format!("{prefix}.billing.ChargeItem"));
    let charge = format!("{database}.{name}_charge");
    let insert = |from: u32| {
        format!(
            "INSERT INTO {charge} (charge_id, account_no, mrn, cpt_code, amount, status, service_date, posted_at)
             SELECT seq, 'ACC-1', 'M000000001', '99213', seq, 'B', '2024-03-05', '2024-03-05 09:15:00'
               FROM seq_{from}_to_{}",
            from + 99
        )
    };
    conn.query_drop(insert(1)).await.unwrap();
    let connector = start(&config, &log);
    await_snapshotted(&config, &log).await;
    await_binlog_stored(&config, Duration::from_secs(30), &log).await;
    assert!(stop(connector).success());

    for from in [101, 201] {
        stack::mariadb_root("FLUSH BINARY LOGS");
        conn.query_drop(insert(from)).await.unwrap();
    }
    let connector = start(&config, &log);
    await_binlog_stored(&config, Duration::from_secs(30), &log).await;
    assert!(stop(connector).success());
    assert_eq!(
        latest_values(&events_of(&topic).await, "/priceOverride/value").len(),
        300
    );

    conn.query_drop(insert(301)).await.unwrap();
    stack::mariadb_root("FLUSH BINARY LOGS");
    let (now, _) = fhir_cdc::source::mysql::current_position(&mut conn)
        .await
        .unwrap();
    // The server keeps a log a replica's dump thread still has open (the stopped
    // connector's, until the server notices): purge until the oldest log is the current one.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        stack::mariadb_root(&format!("PURGE BINARY LOGS TO '{}'", now.file_name()));
        let oldest: Option<(String, u64)> = conn.query_first("SHOW BINARY LOGS").await.unwrap();
        let oldest = oldest.map(|(file, _)| file);
        if oldest == Some(now.file_name()) {
            break;
        }
        assert!(Instant::now() < deadline, "the server kept {oldest:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // `check` refuses the start `run` would refuse, with the same two fixes, and prints the
    // GTID whole.
    let checked = stack::fhir_cdc(&["check", "--config", config.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(1), "{said}");
    let finding = said
        .lines()
        .skip_while(|l| !l.contains("no longer has the binary log"))
        .take(2)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        finding.contains("when_needed") && finding.contains("offsets reset --to snapshot"),
        "{said}"
    );
    assert!(!finding.contains('…'), "{finding}");
    let refused = exit_within(
        start(&config, &log),
        Duration::from_secs(30),
        "after the purge",
    );
    assert!(!refused.success());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("no longer has the binary log") && said.contains("when_needed"),
        "{said}"
    );

    stack::add_source_setting(&config, "snapshot.mode = \"when_needed\"");
    let checked = stack::fhir_cdc(&["check", "--config", config.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{said}");
    assert!(
        said.contains("run will snapshot every table again"),
        "{said}"
    );
    let connector = start(&config, &log);
    await_snapshotted(&config, &log).await;
    await_binlog_stored(&config, Duration::from_secs(30), &log).await;
    assert!(stop(connector).success());
    let expected = stack::charge_amounts(&mut conn, &charge).await;
    assert_eq!(expected.len(), 400);
    assert_eq!(
        latest_values(&events_of(&topic).await, "/priceOverride/value"),
        expected
    );
}

/// A paused component (`kafka`, `registry`) resumed when dropped, also when an assertion
/// fails while it is frozen.
struct Frozen(&'static str);

impl Drop for Frozen {
    fn drop(&mut self) {
        fault(&["resume", self.0]);
    }
}

/// `GET path` until `wanted` holds for its status and body (at most `wait`); the last answer.
async fn probe_until(
    port: u16,
    path: &str,
    wait: Duration,
    wanted: impl Fn(u16, &serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + wait;
    loop {
        let answer = http_get(port, path).ok().map(|(status, body)| {
            (
                status,
                serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
            )
        });
        if let Some((status, body)) = &answer {
            if wanted(*status, body) {
                return answer.unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not answer as wanted within {wait:?}; last: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The health probes of a running connector: started and ready once it captures; while the
/// broker is frozen and changes wait, ready turns 503 and names Kafka, live stays 200; ready
/// again once the broker answers.
#[tokio::test]
async fn health_turns_unready_while_a_frozen_broker_or_registry_holds_capture_and_ready_again_after(
) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let client = stack::pg_client().await;
    let schema = stack::unique("healthfault");
    stack::create_lab_schema(&client, &schema).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhirhealth");
    let port = free_port();
    let config = stack::connector_config(
        &dir,
        &schema,
        &prefix,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n[health]\nstall_after_seconds = 2\n"),
    );
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;
    let minute = Duration::from_secs(60);
    probe_until(port, "/health/started", minute, |s, _| s == 200).await;
    let (_, ready) = probe_until(port, "/health/ready", minute, |s, _| s == 200).await;
    assert_eq!(ready["components"]["kafka"], "up", "{ready}");
    assert_eq!(http_get(port, "/health/live").unwrap().0, 200);
    assert!(
        scrape(port)
            .keys()
            .any(|k| k.starts_with("fhir_cdc_source_lag_milliseconds")),
        "the metrics are still served beside the probes"
    );

    // Rows keep coming while the broker is frozen: they wait, and delivery stalls.
    let writing = CancellationToken::new();
    let writer = {
        let (table, writing) = (format!("{schema}.lab_result"), writing.clone());
        tokio::spawn(async move {
            let client = stack::pg_client().await;
            while !writing.is_cancelled() {
                stack::insert_results(&client, &table, 5).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    fault(&["pause", "kafka"]);
    let frozen = Frozen("kafka");
    let (status, unready) =
        probe_until(port, "/health/ready", Duration::from_secs(30), |s, body| {
            s == 503 && body["components"]["kafka"] == "down"
        })
        .await;
    assert_eq!(status, 503);
    let reasons = unready["reasons"].to_string();
    assert!(reasons.contains("Kafka"), "{unready}");
    assert_eq!(
        http_get(port, "/health/live").unwrap().0,
        200,
        "a stalled delivery is not a stuck process"
    );
    drop(frozen);
    let (_, ready) = probe_until(port, "/health/ready", Duration::from_secs(120), |s, _| {
        s == 200
    })
    .await;
    assert_eq!(ready["components"]["kafka"], "up", "{ready}");

    // The registry stopped while the connector has to start again (its replication
    // connection ended by the server): it cannot register its schemas, and says so.
    fault(&["pause", "registry"]);
    let frozen = Frozen("registry");
    client
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await
        .unwrap();
    let (_, unready) = probe_until(port, "/health/ready", minute, |s, body| {
        s == 503 && body["components"]["registry"] == "down"
    })
    .await;
    assert_eq!(unready["last_error_kind"], "transient", "{unready}");
    drop(frozen);
    let (_, ready) = probe_until(port, "/health/ready", Duration::from_secs(120), |s, _| {
        s == 200
    })
    .await;
    assert_eq!(ready["components"]["registry"], "up", "{ready}");
    writing.cancel();
    writer.await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(stop(connector).success(), "{text}");
    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
