//! The sample lab database end to end, through the commands an operator uses: `preview`,
//! `run` (its snapshot taken while writes go on, then the stream) and `tail`. What arrives
//! is counted against the database itself, decoded again by fastavro, and every resource
//! is validated by two independent FHIR validators.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{
    connector::{await_snapshotted, drain, read_for, start, tail_everything},
    stack,
};

/// Rows written while the snapshot is being taken.
const CONCURRENT_INSERTS: i64 = 200;

/// `column` (a timestamp without zone, in the lab's local time) names no instant in
/// America/Chicago: PostgreSQL's own zone rules, not fhir-cdc's, decide.
fn in_gap(column: &str) -> String {
    format!(
        "(({column} AT TIME ZONE 'America/Chicago') AT TIME ZONE 'America/Chicago') <> {column}"
    )
}

#[tokio::test]
async fn the_sample_lab_database_arrives_whole_and_valid() {
    let client = stack::pg_client().await;
    let schema = stack::unique("sample");
    stack::create_lab_schema(&client, &schema).await;
    let fixture = Command::new("python3")
        .arg(stack::repo_root().join("integration-tests/fixtures/lab.py"))
        .args(["--patients", "120", "--schema", &schema])
        .output()
        .unwrap();
    assert!(fixture.status.success());
    client
        .batch_execute(&String::from_utf8(fixture.stdout).unwrap())
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(
        &dir.join("mappings"),
        &schema,
        &["patient.yaml", "order.yaml", "specimen.yaml", "result.yaml"],
    );
    let prefix = stack::unique("fhirsample");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let config_arg = config.to_str().unwrap();

    // preview: resources of live rows, nothing written.
    let results_table = format!("{schema}.lab_result");
    let preview = stack::fhir_cdc(&[
        "preview",
        "--config",
        config_arg,
        "--table",
        &results_table,
        "--limit",
        "3",
    ]);
    assert!(
        preview.status.success(),
        "{}",
        String::from_utf8_lossy(&preview.stderr)
    );
    let previewed: Vec<Value> = serde_json::Deserializer::from_slice(&preview.stdout)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(previewed.len(), 3);
    assert!(previewed.iter().all(|r| r["resourceType"] == "Observation"
        && r["code"]["coding"][0]["system"] == "http://loinc.org"));
    let unknown = stack::fhir_cdc(&["preview", "--config", config_arg, "--table", "nope.nothing"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no mapping reads table `nope.nothing`")
    );
    let slot = format!("fhir_cdc_{schema}");
    let slots: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "preview created no slot");

    // run, with inserts committing while the snapshot is taken.
    let writer = {
        let writer = stack::pg_client().await;
        let table = results_table.clone();
        tokio::spawn(async move {
            for i in 0..CONCURRENT_INSERTS {
                writer
                    .batch_execute(&format!(
                        "INSERT INTO {table} (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
                         VALUES ({}, 'A24-000001', 'M000001', 'K', 4.{i}, 'mmol/L', 'F', now()::timestamp)",
                        100_000 + i
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let log = dir.join("run.log");
    let connector = start(&config, &log);
    writer.await.unwrap();
    // The snapshot runs in chunks alongside the stream: a slot caught up says nothing of it.
    await_snapshotted(&config, &log).await;
    drain(&client, &slot, connector, Duration::from_secs(90), &log).await;

    // What the database says should have arrived.
    let count = |sql: String| {
        let client = &client;
        async move { client.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let s = &schema;
    let mut expected = BTreeMap::new();
    expected.insert(
        "Patient",
        count(format!("SELECT count(*) FROM {s}.patient")).await,
    );
    // The snapshot's progress, in the log (no terminal here), per table.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!(
            "done job=snapshot part={s}.patient done={}",
            expected["Patient"]
        )),
        "{logged}"
    );
    expected.insert(
        "ServiceRequest",
        count(format!(
            "SELECT count(*) FROM {s}.lab_order WHERE NOT {}",
            in_gap("ordered_at")
        ))
        .await,
    );
    expected.insert(
        "DiagnosticReport",
        count(format!(
            "SELECT count(*) FROM {s}.lab_order WHERE order_status <> 'O' AND NOT {}",
            in_gap("ordered_at")
        ))
        .await,
    );
    expected.insert(
        "Specimen",
        count(format!(
            "SELECT count(*) FROM {s}.specimen WHERE NOT {}",
            in_gap("collected_at")
        ))
        .await,
    );
    expected.insert(
        "Observation",
        count(format!(
            "SELECT count(*) FROM {s}.lab_result WHERE NOT {}",
            in_gap("collected_at")
        ))
        .await,
    );
    let dead_letters = count(format!(
        "SELECT (SELECT count(*) FROM {s}.lab_order WHERE {gap_o})
              + (SELECT count(*) FROM {s}.lab_order WHERE order_status <> 'O' AND {gap_o})
              + (SELECT count(*) FROM {s}.specimen WHERE {gap_c})
              + (SELECT count(*) FROM {s}.lab_result WHERE {gap_c})",
        gap_o = in_gap("ordered_at"),
        gap_c = in_gap("collected_at")
    ))
    .await;
    assert!(dead_letters > 0, "the sample holds rows in the DST gap");

    // tail: everything, decoded through the registry.
    let events = tail_everything(&config);
    let mut arrived: BTreeMap<&str, i64> = BTreeMap::new();
    for event in &events {
        *arrived
            .entry(event["resource_type"].as_str().unwrap())
            .or_default() += 1;
    }
    assert_eq!(arrived, expected, "events per resource type");
    let ids: BTreeSet<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len(), "no event twice");

    // No gap, no double at the snapshot boundary: every result exactly once.
    let result_ids: BTreeSet<String> = stack::texts(
        &client,
        &format!(
            "SELECT 'result-' || result_id FROM {s}.lab_result WHERE NOT {}",
            in_gap("collected_at")
        ),
    )
    .await
    .into_iter()
    .collect();
    let observed: Vec<&str> = events
        .iter()
        .filter(|e| e["resource_type"] == "Observation")
        .map(|e| e["resource_id"].as_str().unwrap())
        .collect();
    assert_eq!(observed.len(), result_ids.len());
    assert_eq!(
        observed
            .iter()
            .map(|id| id.to_string())
            .collect::<BTreeSet<_>>(),
        result_ids
    );
    let streamed = events
        .iter()
        .filter(|e| e["provenance"]["snapshot"] == false)
        .count();
    assert!(
        streamed as i64 <= CONCURRENT_INSERTS,
        "only the concurrent inserts can come from the stream ({streamed})"
    );

    let letters = read_for(
        &format!("{prefix}.dlq.{schema}"),
        dead_letters as usize + 1,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(letters.len() as i64, dead_letters);
    for letter in &letters {
        let letter: Value = serde_json::from_slice(letter).unwrap();
        assert!(
            letter["error"]
                .as_str()
                .unwrap()
                .contains("daylight-saving gap"),
            "{letter}"
        );
    }

    // Confluent's own Python client and two FHIR validators.
    stack::assert_oracles_accept(&events);

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
