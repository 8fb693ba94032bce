//! Snapshots after the first: `fhir-cdc snapshot` asks a running connector to read a table
//! again (or some of its rows) while writes run, and a mapping added for a new table is
//! snapshotted alone at the next start, its table added to the publication.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::{
    connector::{
        await_caught_up, await_snapshotted, await_streaming, events_of, latest_values, start, stop,
    },
    stack::{self, snapshot},
};

#[tokio::test]
async fn a_requested_snapshot_while_writes_run_leaves_no_resource_older_than_its_row() {
    let client = stack::pg_client().await;
    let schema = stack::unique("adhoc");
    stack::create_lab_schema(&client, &schema).await;
    let table = format!("{schema}.lab_result");
    stack::insert_results(&client, &table, 3000).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhiradhoc");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    stack::add_source_setting(&config, "snapshot.chunk.size = 500");
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let topic = format!("{prefix}.lab.Observation");
    let connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;
    await_snapshotted(&config, &log).await;

    // A table no mapping reads, or a condition the server does not take, is refused before
    // anything is asked.
    let (code, stderr) = snapshot(&config, &["--table", &format!("{schema}.patient")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no mapping reads table"), "{stderr}");
    let (code, stderr) = snapshot(
        &config,
        &["--table", &table, "--where", "no_such_column = 1"],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--where") && stderr.contains("no_such_column"),
        "{stderr}"
    );

    // Values raised all along, anywhere in the table, while the table is read again.
    let writing = CancellationToken::new();
    let writer = {
        let (writer, table, writing) = (stack::pg_client().await, table.clone(), writing.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !writing.is_cancelled() {
                writer
                    .batch_execute(&format!(
                        "UPDATE {table} SET value_numeric = value_numeric + 1 WHERE result_id % 211 = {}",
                        n % 211
                    ))
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = Instant::now();
    let (code, stderr) = snapshot(&config, &["--table", &table]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("3000 rows"), "{stderr}");
    let (code, stderr) = snapshot(&config, &["--table", &table, "--where", "result_id <= 100"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("100 rows"), "{stderr}");
    eprintln!("two requested snapshots in {:?}", started.elapsed());
    // A condition that only fails when run (the server planned it) is dropped by the
    // connector, which goes on; the command says so.
    let (code, stderr) = snapshot(
        &config,
        &["--table", &table, "--where", "result_id / 0 = 1"],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("dropped the request"), "{stderr}");
    writing.cancel();
    writer.await.unwrap();
    await_caught_up(&client, &slot, Duration::from_secs(60), &log).await;

    let expected = stack::result_values(&client, &table).await;
    let events = events_of(&topic).await;
    let latest = latest_values(&events, "/valueQuantity/value");
    let stale: Vec<_> = expected
        .iter()
        .filter(|(id, value)| latest.get(*id) != Some(value))
        .take(5)
        .collect();
    assert!(stale.is_empty(), "resources behind their rows: {stale:?}");
    let snapshot_reads = events.iter().filter(|e| e.provenance.snapshot).count();
    assert!(
        snapshot_reads >= 3000 + 3000 + 100 - 50,
        "the initial snapshot and both requests were read ({snapshot_reads} snapshot events; the rows changed inside a chunk's window come by the stream instead)"
    );
    assert!(
        stop(connector).success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_table_newly_mapped_is_published_and_snapshotted_alone() {
    let client = stack::pg_client().await;
    let schema = stack::unique("newtable");
    stack::create_lab_schema(&client, &schema).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.lab_result (accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
             SELECT 'A24-' || i, 'M000001', 'GLU', 90, 'mg/dL', 'F', '2024-03-05 14:30:00'
               FROM generate_series(1, 10) AS i;
             INSERT INTO {schema}.patient (mrn, last_name, first_name, birth_date, sex)
             SELECT 'MRN' || lpad(i::text, 7, '0'), 'Doe', 'Jo', '1960-01-01', 'F'
               FROM generate_series(1, 5) AS i;"
        ))
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhirnew");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let (observations, patients) = (
        format!("{prefix}.lab.Observation"),
        format!("{prefix}.lab.Patient"),
    );

    let connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;
    await_snapshotted(&config, &log).await;
    assert!(stop(connector).success());
    assert_eq!(events_of(&observations).await.len(), 10);

    stack::lab_mappings(
        &dir.join("mappings"),
        &schema,
        &["result.yaml", "patient.yaml"],
    );
    let connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while events_of(&patients).await.len() < 5 {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
    }
    await_snapshotted(&config, &log).await;
    let published: Vec<String> = client
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(published, ["lab_result", "patient"]);
    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.patient (mrn, last_name, birth_date, sex) VALUES ('MRN0000099', 'Roe', '1970-01-01', 'M')"
        ))
        .await
        .unwrap();
    await_caught_up(&client, &slot, Duration::from_secs(30), &log).await;
    assert_eq!(
        events_of(&patients).await.len(),
        6,
        "the five read, the one streamed"
    );
    assert_eq!(
        events_of(&observations).await.len(),
        10,
        "the results were not read again"
    );
    assert!(
        stop(connector).success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
