//! The lab sample's point-of-care results against the real stack: a result column that holds
//! a number on one version, a number behind a comparator on the next, a word after a
//! correction and a number again. Each version is one Observation (never a delete), coded
//! through the catalogue table, and the read model shows the right value every time; both
//! FHIR validators and Confluent's own client accept every event.

use std::time::Duration;

use serde_json::{json, Value as Json};

use crate::{
    connector::{
        await_caught_up, await_snapshotted, await_streaming, drain, start, tail_everything,
    },
    projector::{drop_projections, project_until_caught_up, projector_config},
    stack,
};

#[tokio::test]
async fn a_result_that_turns_from_number_to_text_and_back_projects_right_each_time() {
    let client = stack::pg_client().await;
    let schema = stack::unique("poc");
    stack::create_lab_schema(&client, &schema).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.test_catalogue (local_code, loinc_code, loinc_name) VALUES
               ('PTROP', '10839-9', 'Troponin I.cardiac [Mass/volume] in Serum or Plasma');
             INSERT INTO {schema}.poc_result (result_id, mrn, test_code, result_raw, units, flags,
               result_status, collected_date, collected_time)
             VALUES (1, 'M000001', 'PTROP', '0.42', 'ng/mL', 'h,a', 'P', '20240305', '1430');"
        ))
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["poc_result.yaml"]);
    let prefix = stack::unique("fhirpoc");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let (slot, log) = (format!("fhir_cdc_{schema}"), dir.join("run.log"));
    let topic = format!("{prefix}.lab.Observation");
    let projection = format!("{schema}_read");
    let projector = projector_config(&dir, "projection", &topic, &projection);

    let connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;
    await_snapshotted(&config, &log).await;
    let interpretation = |codes: &[&str]| -> Json {
        codes
            .iter()
            .map(|code| json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": code}]}))
            .collect()
    };
    // Each step: the row's new result, flags and status, then what the read model shows.
    let steps = [
        (
            None,
            "preliminary",
            json!({"value": 0.42, "unit": "ng/mL", "system": "http://unitsofmeasure.org", "code": "ng/mL"}),
            Json::Null,
            interpretation(&["H", "A"]),
        ),
        (
            Some(("< 0.01", None, "F")),
            "final",
            json!({"comparator": "<", "value": 0.01, "unit": "ng/mL", "system": "http://unitsofmeasure.org", "code": "ng/mL"}),
            Json::Null,
            Json::Null,
        ),
        (
            Some(("Hemolyzed - redraw", Some("A"), "C")),
            "corrected",
            Json::Null,
            json!("Hemolyzed - redraw"),
            interpretation(&["A"]),
        ),
        (
            Some(("0.38", Some("H"), "C")),
            "corrected",
            json!({"value": 0.38, "unit": "ng/mL", "system": "http://unitsofmeasure.org", "code": "ng/mL"}),
            Json::Null,
            interpretation(&["H"]),
        ),
    ];
    for (n, (change, status, quantity, string, flags)) in steps.into_iter().enumerate() {
        if let Some((raw, flag, letter)) = change {
            client
                .execute(
                    &format!(
                        "UPDATE {schema}.poc_result SET result_raw = $1, flags = $2, result_status = $3
                          WHERE result_id = 1"
                    ),
                    &[&raw, &flag, &letter],
                )
                .await
                .unwrap();
        }
        await_caught_up(&client, &slot, Duration::from_secs(60), &log).await;
        project_until_caught_up(&projector);
        let row = client
            .query_one(
                &format!(
                    "SELECT body::text, deleted FROM {projection}.resources WHERE resource_id = 'poc-1'"
                ),
                &[],
            )
            .await
            .unwrap();
        let (body, deleted): (String, bool) = (row.get(0), row.get(1));
        let body: Json = serde_json::from_str(&body).unwrap();
        assert!(!deleted, "step {n}: the read model shows a delete");
        assert_eq!(body["status"], status, "step {n}: {body}");
        assert_eq!(body["valueQuantity"], quantity, "step {n}: {body}");
        assert_eq!(body["valueString"], string, "step {n}: {body}");
        assert_eq!(body["interpretation"], flags, "step {n}: {body}");
        assert_eq!(
            body["code"]["coding"][0]["code"], "10839-9",
            "step {n}: coded through the catalogue"
        );
        assert_eq!(body["effectiveDateTime"], "2024-03-05T14:30:00-06:00");
    }
    let ops = stack::texts(
        &client,
        &format!(
            "SELECT op FROM {projection}.history WHERE resource_id = 'poc-1' ORDER BY version"
        ),
    )
    .await;
    assert_eq!(ops, ["upsert"; 4], "one version per change, never a delete");
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;

    let events = tail_everything(&config);
    assert_eq!(events.len(), 4, "{events:?}");
    stack::assert_oracles_accept(&events);
    let text = std::fs::read_to_string(&log).unwrap();
    for secret in ["Hemolyzed", "Troponin", "0.42"] {
        assert!(!text.contains(secret), "a row value in the log: {secret}");
    }

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    drop_projections(&client, &[projection], &dir).await;
}
