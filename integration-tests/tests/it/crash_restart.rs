//! A crash (SIGKILL) in the middle of 10,000 changes, or at any point of the initial
//! snapshot while writes run, loses nothing: after restarts, event-id accounting shows every
//! change (every row's latest state) arrived, and that every duplicate is an exact
//! re-emission of an event already sent (same id, same resource, same version).

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use fhir_cdc::{canonical::CanonicalEvent, change::PgLsn};
use tokio_util::sync::CancellationToken;

use crate::{
    connector::{
        await_snapshotted, await_streaming, crash, drain, events_of, latest_values, messages_in,
        start, stop,
    },
    stack,
};

/// The events by id, and how many were repeats; panics when two events share an id but
/// differ: a repeat must be the same event sent again.
fn distinct_events(events: &[CanonicalEvent]) -> (HashMap<&str, &CanonicalEvent>, usize) {
    let mut by_id: HashMap<&str, &CanonicalEvent> = HashMap::new();
    let mut repeats = 0;
    for event in events {
        match by_id.get(event.event_id.as_str()) {
            None => {
                by_id.insert(&event.event_id, event);
            }
            Some(first) => {
                repeats += 1;
                let same = |e: &CanonicalEvent| {
                    (
                        e.resource_id.clone(),
                        e.resource_version.clone(),
                        e.op,
                        e.resource.clone(),
                        e.provenance.source_position.clone(),
                        e.provenance.commit_time,
                    )
                };
                assert_eq!(
                    same(first),
                    same(event),
                    "event {} re-sent differently",
                    event.event_id
                );
            }
        }
    }
    (by_id, repeats)
}

/// Transactions of the workload: odd ones insert 100 results, even ones update the 100
/// inserted just before — 10,000 changes, each one event.
const TRANSACTIONS: i64 = 100;
const ROWS: i64 = 100;

#[tokio::test]
async fn killed_mid_stream_the_connector_loses_nothing_and_repeats_only_exact_events() {
    let client = stack::pg_client().await;
    let schema = stack::unique("crash");
    stack::create_lab_schema(&client, &schema).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhircrash");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let topic = format!("{prefix}.lab.Observation");
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");

    let mut connector = start(&config, &log);
    // The workload starts once the connector streams and has recorded its (empty) table as
    // snapshotted: the crashes below are crashes mid-stream.
    await_streaming(&client, &slot, &log).await;
    await_snapshotted(&config, &log).await;
    let writer = {
        let writer = stack::pg_client().await;
        let table = format!("{schema}.lab_result");
        tokio::spawn(async move {
            for n in 0..TRANSACTIONS {
                let first = (n / 2) * ROWS + 1;
                let last = first + ROWS - 1;
                let sql = if n % 2 == 0 {
                    format!(
                        "INSERT INTO {table} (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
                         SELECT i, 'A24-' || i, 'M000001', 'GLU', 90, 'mg/dL', 'F', '2024-03-05 14:30:00'
                           FROM generate_series({first}, {last}) AS i"
                    )
                } else {
                    format!("UPDATE {table} SET value_numeric = 91 WHERE result_id BETWEEN {first} AND {last}")
                };
                writer.batch_execute(&sql).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };

    // Two crashes while the workload runs, each followed by a restart.
    for threshold in [2_000, 6_000] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while messages_in(&topic) < threshold {
            assert!(
                Instant::now() < deadline,
                "{}",
                std::fs::read_to_string(&log).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        crash(connector);
        connector = start(&config, &log);
    }
    writer.await.unwrap();
    drain(&client, &slot, connector, Duration::from_secs(120), &log).await;

    let events = events_of(&topic).await;

    let (by_id, repeats) = distinct_events(&events);
    // Every change arrived: each result has exactly its insert and its update, once each.
    let mut versions: BTreeMap<&str, Vec<&CanonicalEvent>> = BTreeMap::new();
    for event in by_id.values() {
        versions.entry(&event.resource_id).or_default().push(event);
    }
    assert_eq!(
        versions.len() as i64,
        TRANSACTIONS / 2 * ROWS,
        "every inserted result"
    );
    for (id, mut history) in versions {
        history.sort_by(|a, b| a.resource_version.cmp(&b.resource_version));
        let values: Vec<String> = history
            .iter()
            .map(|e| e.resource.as_ref().unwrap().to_json()["valueQuantity"]["value"].to_string())
            .collect();
        assert_eq!(
            values,
            ["90.0000", "91.0000"],
            "{id}: its insert, then its update"
        );
    }
    eprintln!(
        "crash test: {} messages for {} changes, {repeats} exact re-emissions",
        events.len(),
        by_id.len()
    );
    assert_eq!(by_id.len() as i64, TRANSACTIONS * ROWS);
    // Each start names where reading really begins: never before the stored position.
    let logged = std::fs::read_to_string(&log).unwrap();
    let starts: Vec<(PgLsn, PgLsn)> = logged
        .lines()
        .filter(|l| l.contains("capture: streaming"))
        .filter_map(|l| {
            let field = |name: &str| {
                let at = l.find(&format!(" {name}="))? + name.len() + 2;
                l[at..].split_whitespace().next()?.parse::<PgLsn>().ok()
            };
            Some((field("from")?, field("stored")?))
        })
        .collect();
    assert!(starts.len() >= 2, "{logged}");
    assert!(
        starts.iter().all(|(from, stored)| from >= stored),
        "{starts:?}"
    );

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Rows in the table before the connector first starts.
const SNAPSHOT_ROWS: i64 = 30_000;

/// Killed three times during its initial snapshot — early, in the middle, and right after
/// the last chunk reached Kafka (before the state recording it was saved) — while writes
/// insert and update rows all along, the connector ends with every row's latest state as
/// the latest version of its Observation, and repeats only exact events.
#[tokio::test]
async fn killed_during_its_snapshot_the_connector_ends_with_every_rows_latest_state() {
    let client = stack::pg_client().await;
    let schema = stack::unique("crashsnap");
    stack::create_lab_schema(&client, &schema).await;
    let table = format!("{schema}.lab_result");
    stack::insert_results(&client, &table, SNAPSHOT_ROWS).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhircrashsnap");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    stack::add_source_setting(&config, "snapshot.chunk.size = 1000");
    let topic = format!("{prefix}.lab.Observation");
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");

    // Small transactions all along: new results, and raised values of existing ones
    // anywhere in the table (ahead of the snapshot, behind it, inside its chunk).
    let writing = CancellationToken::new();
    let writer = {
        let (writer, table, writing) = (stack::pg_client().await, table.clone(), writing.clone());
        tokio::spawn(async move {
            let mut n: i64 = 0;
            while !writing.is_cancelled() {
                writer
                    .batch_execute(&format!(
                        "INSERT INTO {table} (accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
                         VALUES ('B24-{n}', 'M000002', 'GLU', 100, 'mg/dL', 'F', '2024-03-05 14:30:00');
                         UPDATE {table} SET value_numeric = value_numeric + 1
                          WHERE result_id % 997 = {}",
                        n % 997
                    ))
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let mut connector = start(&config, &log);
    for threshold in [2_000, SNAPSHOT_ROWS / 2, SNAPSHOT_ROWS] {
        let deadline = Instant::now() + Duration::from_secs(90);
        while messages_in(&topic) < threshold {
            assert!(
                Instant::now() < deadline,
                "{}",
                std::fs::read_to_string(&log).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        crash(connector);
        connector = start(&config, &log);
    }
    await_streaming(&client, &slot, &log).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    writing.cancel();
    writer.await.unwrap();

    // Every row's latest state, as the latest version of its Observation.
    let expected = stack::result_values(&client, &table).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (latest, events) = loop {
        let events = events_of(&topic).await;
        let latest = latest_values(&events, "/valueQuantity/value");
        if latest == expected || Instant::now() > deadline {
            break (latest, events);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let missing = expected
        .keys()
        .filter(|id| !latest.contains_key(*id))
        .count();
    let stale: Vec<_> = expected
        .iter()
        .filter(|(id, value)| latest.get(*id).is_some_and(|l| l != *value))
        .take(5)
        .collect();
    assert!(
        missing == 0 && stale.is_empty() && latest.len() == expected.len(),
        "{missing} rows never arrived, {} resources for no row, stale: {stale:?}",
        latest.len() + missing - expected.len()
    );
    let (by_id, repeats) = distinct_events(&events);
    eprintln!(
        "snapshot crash test: {} rows, {} events, {} distinct, {repeats} exact re-emissions",
        expected.len(),
        events.len(),
        by_id.len()
    );
    assert!(
        stop(connector).success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
