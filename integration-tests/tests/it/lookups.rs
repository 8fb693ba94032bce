//! Lookups against the real PostgreSQL: a result row holds a local test code and an internal
//! patient number; the LOINC code and name come from the catalogue table, the MRN from the
//! patient table, both captured by the same connector. The catalogue is read as of each
//! change (also one made in the same transaction as the result), read afresh when the
//! connector restarts, and a result whose code the catalogue lacks is dead-lettered until
//! the catalogue has it, then replayed.

use std::time::Duration;

use serde_json::Value as Json;

use crate::{
    connector::{await_snapshotted, await_streaming, drain, events_of, latest_values, start},
    stack,
};

#[tokio::test]
async fn lookups_read_other_tables_as_of_each_change_and_afresh_after_a_restart() {
    let client = stack::pg_client().await;
    let schema = stack::unique("lookup");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.test_catalogue (local_code char(8) PRIMARY KEY,
               loinc_code varchar(10), loinc_name varchar(200), active char(1) NOT NULL DEFAULT 'Y');
             CREATE TABLE {schema}.patient (patient_no integer PRIMARY KEY, mrn varchar(12), name text);
             CREATE TABLE {schema}.coded_result (result_id integer PRIMARY KEY,
               test_code varchar(8) NOT NULL, patient_no integer, result_value numeric(10,2),
               units varchar(10), result_status char(1) NOT NULL);
             INSERT INTO {schema}.test_catalogue VALUES ('GLU', '2345-7', 'Glucose [Mass/volume] in Serum or Plasma');
             INSERT INTO {schema}.patient VALUES (7, 'M100', 'Doe');
             INSERT INTO {schema}.coded_result VALUES (1, 'GLU', 7, 5.4, 'mmol/L', 'F');"
        ))
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(&schema);
    std::fs::create_dir_all(dir.join("mappings")).unwrap();
    let mapping = std::fs::read_to_string(
        stack::repo_root().join("tests/golden/mappings-lookups/result.yaml"),
    )
    .unwrap()
    .replace("lis.", &format!("{schema}."));
    std::fs::write(dir.join("mappings/result.yaml"), mapping).unwrap();
    let prefix = stack::unique("fhirlookup");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let (slot, log) = (format!("fhir_cdc_{schema}"), dir.join("run.log"));
    let topic = format!("{prefix}.lab.Observation");
    let sql = |text: String| {
        let client = &client;
        async move { client.batch_execute(&text).await.unwrap() }
    };

    let connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;
    await_snapshotted(&config, &log).await;
    // A code the catalogue lacks (on_missing: fail): a dead letter. The catalogue gains a
    // code in the transaction that also writes a result reading it: the lookup has it.
    sql(format!(
        "INSERT INTO {schema}.coded_result VALUES (2, 'K', 7, 4.1, 'mmol/L', 'F')"
    ))
    .await;
    sql(format!(
        "BEGIN;
         INSERT INTO {schema}.test_catalogue VALUES ('K', '2823-3', 'Potassium [Moles/volume] in Serum or Plasma');
         INSERT INTO {schema}.coded_result VALUES (3, 'K', 7, 4.4, 'mmol/L', 'F');
         COMMIT;"
    ))
    .await;
    sql(format!(
        "UPDATE {schema}.test_catalogue SET loinc_name = 'Glucose' WHERE local_code = 'GLU'"
    ))
    .await;
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;
    let events = events_of(&topic).await;
    let ids: Vec<&str> = events.iter().map(|e| e.resource_id.as_str()).collect();
    assert_eq!(
        ids,
        ["coded-1", "coded-3"],
        "a catalogue change makes nothing again; log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // Restarted after everything above is acknowledged, the connector reads the lookups
    // afresh: no change of the catalogue streams again, yet result 4 has the new name.
    let connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;
    sql(format!(
        "INSERT INTO {schema}.coded_result VALUES (4, 'GLU', 7, 6.1, 'mmol/L', 'P');
         INSERT INTO {schema}.coded_result VALUES (5, 'GLU', 8, 6.2, 'mmol/L', 'P');"
    ))
    .await;
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("lookups loaded").count(), 2, "{text}");
    for secret in ["Glucose", "Potassium", "M100", "2823-3"] {
        assert!(!text.contains(secret), "a row value in the log: {secret}");
    }

    // Once the catalogue has the code, the letter replays.
    let output = stack::fhir_cdc(&[
        "dlq",
        "replay",
        "--all",
        "--config",
        config.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && said.contains("replayed: 1 event(s) written"),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let events = events_of(&topic).await;
    let value = |pointer: &str| latest_values(&events, pointer);
    let display = value("/code/coding/0/display");
    let code = value("/code/coding/0/code");
    let subject = value("/subject/reference");
    let text = |s: &str| Json::String(s.to_owned()).to_string();
    assert_eq!(
        display["coded-1"],
        text("Glucose [Mass/volume] in Serum or Plasma")
    );
    assert_eq!(
        display["coded-4"],
        text("Glucose"),
        "read afresh at the restart"
    );
    for id in ["coded-2", "coded-3"] {
        assert_eq!(code[id], text("2823-3"), "{id}");
    }
    assert_eq!(subject["coded-1"], text("Patient/lab-patient-M100"));
    assert_eq!(
        subject["coded-5"], "null",
        "patient 8 is unknown (on_missing: omit): no subject"
    );
    assert_eq!(code.len(), 5, "{code:?}");

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
