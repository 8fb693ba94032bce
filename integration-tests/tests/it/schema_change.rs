//! The stream through schema changes and TOAST: a renamed column sends rows to the
//! dead-letter topic with the reason while the stream keeps flowing; an added column and a
//! type change are taken in stride; an unchanged TOASTed value is never guessed — without a
//! full old row the row is dead-lettered, with one it is filled from the old row.

use std::time::Duration;

use serde_json::Value;

use crate::{
    connector::{capture_results, drain, read_for, ResultCapture},
    stack,
};

#[tokio::test]
async fn schema_changes_and_unchanged_toast_values_mid_stream() {
    let client = stack::pg_client().await;
    let schema = stack::unique("ddl");
    stack::create_lab_schema(&client, &schema).await;
    let t = format!("{schema}.lab_result");
    client
        .batch_execute(&format!("ALTER TABLE {t} REPLICA IDENTITY DEFAULT"))
        .await
        .unwrap();
    let (
        ResultCapture {
            dir,
            prefix,
            slot,
            log,
            ..
        },
        connector,
    ) = capture_results(&client, &schema, "fhirddl").await;

    let insert_as = |id: i32, units: &str| {
        format!(
            "INSERT INTO {t} (result_id, accession_no, mrn, test_code, value_numeric, {units}, result_status, collected_at)
             VALUES ({id}, 'A24-{id}', 'M000001', 'GLU', 98.5, 'mg/dL', 'P', '2024-03-05 14:30:00')"
        )
    };
    let insert = |id: i32| insert_as(id, "units");
    // A comment big enough to be stored out of line (TOAST), and incompressible.
    let long_comment = format!(
        "UPDATE {t} SET comment = (SELECT string_agg(md5(random()::text), ' ') FROM generate_series(1, 300)) WHERE result_id = 1"
    );
    for step in [
        insert(1),
        long_comment,
        // 1: the comment is unchanged and not sent; no old row holds it → dead letter.
        format!("UPDATE {t} SET result_status = 'F' WHERE result_id = 1"),
        // 2: with a full old row the unchanged value is taken from it → an event.
        format!("ALTER TABLE {t} REPLICA IDENTITY FULL"),
        format!("UPDATE {t} SET result_status = 'C' WHERE result_id = 1"),
        // 3: an added column changes nothing the mapping reads.
        format!("ALTER TABLE {t} ADD COLUMN instrument text"),
        insert(2),
        // 4: a type change: the new values arrive with the new type's digits.
        format!("ALTER TABLE {t} ALTER COLUMN value_numeric TYPE numeric(18,6)"),
        insert(3),
        // 5: a renamed column the mapping reads → dead letter, and the stream goes on.
        format!("ALTER TABLE {t} RENAME COLUMN units TO unit_code"),
        insert_as(4, "unit_code"),
        format!("ALTER TABLE {t} RENAME COLUMN unit_code TO units"),
        insert(5),
    ] {
        client.batch_execute(&step).await.unwrap();
    }
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;

    let codec = stack::codec();
    let mut events = Vec::new();
    for bytes in read_for(
        &format!("{prefix}.lab.Observation"),
        7,
        Duration::from_secs(5),
    )
    .await
    {
        events.push(codec.decode(&bytes).await.unwrap());
    }
    let summary: Vec<(String, Option<String>)> = events
        .iter()
        .map(|e| {
            let resource = e.resource.as_ref().unwrap().to_json();
            (
                e.resource_id.clone(),
                resource["status"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let row = |id: &str, status: &str| (id.to_owned(), Some(status.to_owned()));
    assert_eq!(
        summary,
        [
            row("result-1", "preliminary"),
            row("result-1", "preliminary"), // the comment added
            row("result-1", "corrected"),   // the unchanged comment from the old row
            row("result-2", "preliminary"),
            row("result-3", "preliminary"),
            row("result-5", "preliminary"),
        ],
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let comment: String = client
        .query_one(&format!("SELECT comment FROM {t} WHERE result_id = 1"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(comment.len() > 9_000);
    let corrected = events[2].resource.as_ref().unwrap().to_json();
    assert_eq!(
        corrected["note"][0]["text"],
        comment.as_str(),
        "the whole TOASTed text"
    );
    let third = events[4].resource.as_ref().unwrap().to_json();
    assert_eq!(
        third["valueQuantity"]["value"].to_string(),
        "98.500000",
        "numeric(18,6) digits"
    );

    let letters: Vec<Value> =
        read_for(&format!("{prefix}.dlq.{schema}"), 3, Duration::from_secs(5))
            .await
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let error = |i: usize| letters[i]["error"].as_str().unwrap().to_owned();
    assert!(
        error(0).contains("column `comment`") && error(0).contains("unchanged TOASTed value"),
        "{}",
        error(0)
    );
    assert_eq!(
        letters[0]["after"]["comment"],
        serde_json::json!({"unavailable": true})
    );
    assert!(
        error(1).contains("column `units`") && error(1).contains("not in the row"),
        "{}",
        error(1)
    );
    assert_eq!(
        letters[1]["after"]["unit_code"]["text"], "mg/dL",
        "the row as the database sent it"
    );

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
