//! The PostgreSQL source against the real server: a lab result's life (preliminary, final,
//! corrected twice in one transaction, a no-op update, a delete) read through a pgoutput
//! slot, decoded into changes and mapped by the sample mapping into canonical events —
//! and read again from the same position, with the same event ids.

use std::{str::FromStr, time::Duration};

use fhir_cdc::{
    canonical::{CanonicalEvent, EventOp, KeyColumn},
    change::PgLsn,
    config::Secret,
    mapping::{load_str, MapContext, Mapper},
    source::postgres::{
        changes::Decoded,
        replication::{ReplicationStream, StreamOptions},
    },
};

use crate::stack;

async fn read_all(options: &StreamOptions, mapper: &Mapper) -> (Vec<CanonicalEvent>, usize) {
    let url = Secret::new(stack::pg_url());
    // The walsender of a previous read may still hold the slot for a moment.
    let mut stream = None;
    for _ in 0..50 {
        match ReplicationStream::start(&url, options).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut stream = stream.expect("replication stream");
    let (mut events, mut suppressed) = (Vec::new(), 0);
    // The workload ends with the row's delete: read until it arrives. (A stop position
    // would be passed only by later WAL, which an otherwise idle server may not write.)
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(decoded) = stream.next().await.unwrap() {
            let Decoded::Changes(changes) = decoded else {
                continue;
            };
            for change in changes {
                let outcome = mapper.map(&change);
                assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
                suppressed += outcome.suppressed;
                events.extend(outcome.events);
                if change.op == fhir_cdc::change::Operation::Delete {
                    return;
                }
            }
        }
    })
    .await;
    stream.stop();
    read.expect("the delete did not arrive within 60s");
    (events, suppressed)
}

#[tokio::test]
async fn a_lab_result_life_streams_into_canonical_events_with_stable_ids() {
    let client = stack::pg_client().await;
    let schema = stack::unique("lis");
    stack::create_lab_schema(&client, &schema).await;
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {schema}_pub FOR TABLE {schema}.lab_result;"
        ))
        .await
        .unwrap();
    let slot = format!("{schema}_slot");
    let start = stack::create_slot(&client, &slot).await;

    let t = format!("{schema}.lab_result");
    // One simple query runs as one transaction: each step is its own query.
    for step in [
        format!(
            "INSERT INTO {t} (result_id, accession_no, mrn, test_code, value_numeric, units, ref_low, ref_high, abnormal_flag, result_status, collected_at)
               VALUES (101, 'A24-000123', 'MRN0000042', 'GLU', 98.0000, 'mg/dL', 70, 99, 'N', 'P', '2024-03-05 14:30:00')"
        ),
        format!("UPDATE {t} SET result_status = 'F', verified_at = '2024-03-05 15:02:11.25-06' WHERE result_id = 101"),
        format!(
            "BEGIN;
             UPDATE {t} SET result_status = 'C', value_numeric = 112.0000 WHERE result_id = 101;
             UPDATE {t} SET comment = 'Corrected: sample re-run' WHERE result_id = 101;
             COMMIT"
        ),
        format!("UPDATE {t} SET units = 'mg/dL ' WHERE result_id = 101"),
        format!("DELETE FROM {t} WHERE result_id = 101"),
    ] {
        client.batch_execute(&step).await.unwrap();
    }
    let mapping_path = stack::repo_root().join("mappings/lab/result.yaml");
    let text = std::fs::read_to_string(&mapping_path)
        .unwrap()
        .replace("table: lis.lab_result", &format!("table: {t}"));
    let mapper = Mapper::new(
        vec![load_str(&mapping_path, &text).unwrap()],
        MapContext::default(),
        "urn:test",
    )
    .unwrap();
    let options = StreamOptions {
        connector: "lab-it".into(),
        slot: slot.clone(),
        publication: format!("{schema}_pub"),
        start: PgLsn::from_str(&start).unwrap(),
    };

    let (events, suppressed) = read_all(&options, &mapper).await;
    let statuses: Vec<Option<&str>> = events
        .iter()
        .map(|e| {
            e.resource.as_ref().map(|r| {
                r.get("status")
                    .and_then(fhir_cdc::fhir::Element::as_str)
                    .unwrap()
            })
        })
        .collect();
    assert_eq!(
        statuses,
        [
            Some("preliminary"),
            Some("final"),
            Some("corrected"),
            Some("corrected"),
            None
        ]
    );
    assert_eq!(events.last().unwrap().op, EventOp::Delete);
    assert_eq!(
        suppressed, 1,
        "the padding-only update maps to the same resource"
    );
    assert!(events.iter().all(|e| e.resource_id == "result-101"));
    assert!(
        events
            .windows(2)
            .all(|w| w[0].resource_version < w[1].resource_version),
        "versions rise"
    );
    let (third, fourth) = (&events[2], &events[3]);
    assert_eq!(
        third.provenance.source_position, fourth.provenance.source_position,
        "one transaction, one commit position"
    );
    assert!(
        third.resource_version.ends_with(".0000000000")
            && fourth.resource_version.ends_with(".0000000001"),
        "ordinals in the transaction: {} {}",
        third.resource_version,
        fourth.resource_version
    );
    let value = &third.resource.as_ref().unwrap().to_json()["valueQuantity"]["value"];
    assert_eq!(value.to_string(), "112.0000", "numeric digits survive");
    assert_eq!(
        fourth.resource.as_ref().unwrap().to_json()["note"][0]["text"],
        "Corrected: sample re-run"
    );
    assert_eq!(*third.provenance.schema, *schema);
    assert_eq!(&*third.provenance.table, "lab_result");
    // REPLICA IDENTITY FULL flags every column as key in pgoutput; the provenance names the
    // mapping's key only, with its value, for the delete too.
    for event in &events {
        assert_eq!(
            event.provenance.primary_key,
            [KeyColumn {
                column: "result_id".into(),
                value: Some("101".into())
            }],
            "{:?}",
            event.op
        );
    }

    // Nothing was acknowledged: reading again from the start re-emits the same events.
    let (again, _) = read_all(&options, &mapper).await;
    let ids = |e: &[CanonicalEvent]| e.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&again),
        ids(&events),
        "a re-read must give identical event ids"
    );

    stack::drop_capture(&client, &slot, &format!("{schema}_pub"), &schema).await;
}
