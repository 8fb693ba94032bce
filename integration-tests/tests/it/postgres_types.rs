//! Every PostgreSQL type the mappings use, from a real table into FHIR exactly — through the
//! snapshot and through the stream alike: uuid, char, varchar, text, an enum, boolean, date,
//! timestamp (local time with a zone rule), timestamptz, numeric, jsonb and bytea; NULLs
//! leave their elements out. Both FHIR validators accept the results.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{
    connector::{await_streaming, drain, read_for, start},
    stack,
};

const MAPPING: &str = r#"mapping: typed.row
domain: types
source:
  table: SCHEMA.typed
  key: [id]
  columns: [id, mrn, family, note, sex, active, born, measured_at, issued_at, amount, attrs, photo]
resources:
  - type: Patient
    id: "typed-{id}"
    elements:
      identifier[0].system: urn:oid:2.16.840.1.113883.19.5.1
      identifier[0].value: { column: mrn, trim: true }
      name[0].family: { column: family }
      gender: { column: sex, translate: sex }
      active: { column: active }
      birthDate: { column: born }
      photo[0].contentType: image/png
      photo[0].data: { column: photo, anchor: true }
  - type: Observation
    id: "typed-obs-{id}"
    elements:
      status: final
      code.text: typed values
      subject.reference: { reference: Patient, id: "typed-{id}" }
      effectiveDateTime: { column: measured_at, zone: America/Chicago }
      issued: { column: issued_at }
      valueQuantity.value: { column: amount }
      note[0].text: { column: note }
      note[1].text: { column: attrs }
translations:
  sex:
    codes: { M: male, F: female, U: unknown }
    unmapped: fail
"#;

/// Columns and values of the full row, as SQL literals.
const FULL: &str = "'MRN42', 'Łukasiewicz', E'line 1\\nline 2 \"quoted\"', 'F', true, '1970-01-31',
     '2024-03-05 14:30:00.123456', '2024-03-05 20:30:00.5+00', 12345678.9000,
     '{\"b\": [1, 2.50], \"a\": null}', '\\x89504e47'";
const NULLS: &str = "'MRN43', 'Doe', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL";

#[tokio::test]
async fn every_type_the_mappings_use_arrives_exactly() {
    let client = stack::pg_client().await;
    let schema = stack::unique("types");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TYPE {schema}.sex_code AS ENUM ('M', 'F', 'U');
             CREATE TABLE {schema}.typed (
                 id uuid PRIMARY KEY, mrn char(10) NOT NULL, family varchar(60) NOT NULL,
                 note text, sex {schema}.sex_code, active boolean, born date,
                 measured_at timestamp, issued_at timestamptz, amount numeric(14,4),
                 attrs jsonb, photo bytea);
             ALTER TABLE {schema}.typed REPLICA IDENTITY FULL;"
        ))
        .await
        .unwrap();
    let insert = |id: &str, values: &str| {
        format!(
            "INSERT INTO {schema}.typed (id, mrn, family, note, sex, active, born, measured_at, issued_at, amount, attrs, photo)
             VALUES ('{id}', {values})"
        )
    };
    // Read by the snapshot…
    client
        .batch_execute(&insert("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", FULL))
        .await
        .unwrap();
    client
        .batch_execute(&insert("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12", NULLS))
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(&schema);
    std::fs::create_dir_all(dir.join("mappings")).unwrap();
    std::fs::write(
        dir.join("mappings/typed.yaml"),
        MAPPING.replace("SCHEMA", &schema),
    )
    .unwrap();
    let prefix = stack::unique("fhirtypes");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;
    // …and by the stream.
    client
        .batch_execute(&insert("b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", FULL))
        .await
        .unwrap();
    client
        .batch_execute(&insert("b0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12", NULLS))
        .await
        .unwrap();
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;

    let codec = stack::codec();
    let mut resources = Vec::new();
    for resource_type in ["Patient", "Observation"] {
        let topic = format!("{prefix}.types.{resource_type}");
        let messages = read_for(&topic, 5, Duration::from_secs(5)).await;
        assert_eq!(
            messages.len(),
            4,
            "{topic}: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        for bytes in messages {
            let event = codec.decode(&bytes).await.unwrap();
            let mut resource = event.resource.unwrap().to_json();
            // The envelope's own: checked elsewhere, different per row.
            resource.as_object_mut().unwrap().remove("meta");
            resources.push((event.provenance.snapshot, resource));
        }
    }
    let find = |id: &str| {
        resources
            .iter()
            .find(|(_, r)| r["id"] == id)
            .unwrap_or_else(|| panic!("no {id}"))
    };
    for (row, snapshot) in [("a0", true), ("b0", false)] {
        let full = format!("{row}eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        let nulls = format!("{row}eebc99-9c0b-4ef8-bb6d-6bb9bd380a12");
        let (read_by_snapshot, patient) = find(&format!("typed-{full}"));
        assert_eq!(*read_by_snapshot, snapshot);
        assert_eq!(
            *patient,
            json!({
                "resourceType": "Patient",
                "id": format!("typed-{full}"),
                "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5.1", "value": "MRN42"}],
                "name": [{"family": "Łukasiewicz"}],
                "gender": "female",
                "active": true,
                "birthDate": "1970-01-31",
                "photo": [{"contentType": "image/png", "data": "iVBORw=="}]
            })
        );
        let (_, observation) = find(&format!("typed-obs-{full}"));
        assert_eq!(
            *observation,
            json!({
                "resourceType": "Observation",
                "id": format!("typed-obs-{full}"),
                "status": "final",
                "code": {"text": "typed values"},
                "subject": {"reference": format!("Patient/typed-{full}")},
                "effectiveDateTime": "2024-03-05T14:30:00.123456-06:00",
                "issued": "2024-03-05T20:30:00.500Z",
                "valueQuantity": {"value": serde_json::from_str::<Value>("12345678.9000").unwrap()},
                "note": [{"text": "line 1\nline 2 \"quoted\""}, {"text": "{\"a\":null,\"b\":[1,2.50]}"}]
            })
        );
        assert_eq!(
            observation["valueQuantity"]["value"].to_string(),
            "12345678.9000",
            "the numeric's digits"
        );
        // NULLs leave their elements out (and the anchored photo with its literal).
        let (_, patient) = find(&format!("typed-{nulls}"));
        assert_eq!(
            *patient,
            json!({
                "resourceType": "Patient",
                "id": format!("typed-{nulls}"),
                "identifier": [{"system": "urn:oid:2.16.840.1.113883.19.5.1", "value": "MRN43"}],
                "name": [{"family": "Doe"}]
            })
        );
        let (_, observation) = find(&format!("typed-obs-{nulls}"));
        assert_eq!(
            *observation,
            json!({
                "resourceType": "Observation",
                "id": format!("typed-obs-{nulls}"),
                "status": "final",
                "code": {"text": "typed values"},
                "subject": {"reference": format!("Patient/typed-{nulls}")}
            })
        );
    }

    let lines: Vec<String> = resources.iter().map(|(_, r)| r.to_string()).collect();
    for (result, line) in stack::run_oracle("fhir_validate.py", &[], &lines)
        .iter()
        .zip(&lines)
    {
        assert!(
            result["fhirkit"].as_array().unwrap().is_empty() && result["google"].is_null(),
            "{line}: {result}"
        );
    }

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
