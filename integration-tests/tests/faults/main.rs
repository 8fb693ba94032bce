//! The stack's own services failing while a connector captures a stream of writes: the
//! broker frozen for 30 s, PostgreSQL restarted, the schema registry frozen for 30 s while
//! the connector has to start again. Each time `run` must not exit, and event-id accounting
//! must show every committed row arrived, repeats only as exact events.
//!
//! These freeze or restart services that every other test uses, so they live in a test
//! binary of their own — cargo runs test binaries one after another — and take one lock,
//! so that they also run one at a time.

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    process::Command,
    time::{Duration, Instant},
};

use fhir_cdc::canonical::CanonicalEvent;
use integration_tests::{
    connector::{await_snapshotted, await_streaming, events_of, start, stop},
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
    let mut by_id: HashMap<&str, &CanonicalEvent> = HashMap::new();
    for event in &events {
        let first = *by_id.entry(&event.event_id).or_insert(event);
        assert_eq!(
            (&first.resource_id, &first.resource_version, &first.resource),
            (&event.resource_id, &event.resource_version, &event.resource),
            "event {} re-sent differently",
            event.event_id
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        connector.running(),
        "`run` exited during the fault; log:\n{text}"
    );
    eprintln!(
        "{name}: {} rows, {} events ({} distinct), {} restart(s)",
        expected.len(),
        events.len(),
        by_id.len(),
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
