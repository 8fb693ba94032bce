//! A crash (SIGKILL) in the middle of 10,000 changes loses nothing: after restarts, event-id
//! accounting shows every change arrived at least once, and that every duplicate is an
//! exact re-emission of an event already sent (same id, same resource, same version).

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use fhir_cdc::canonical::CanonicalEvent;

use crate::{
    connector::{await_streaming, crash, drain, messages_in, read_for, start},
    stack,
};

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
    // The workload starts once the connector streams.
    await_streaming(&client, &slot, &log).await;
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

    let messages = read_for(&topic, usize::MAX, Duration::from_secs(10)).await;
    let codec = stack::codec();
    let mut events = Vec::with_capacity(messages.len());
    for bytes in &messages {
        events.push(codec.decode(bytes).await.unwrap());
    }

    // Every event id names one event: a repeat is the same event sent again.
    let mut by_id: HashMap<&str, &CanonicalEvent> = HashMap::new();
    let mut repeats = 0;
    for event in &events {
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

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
