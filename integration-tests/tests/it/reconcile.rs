//! `fhir-cdc reconcile` against the stack: a connector and a projector that agree with the
//! source give no drift; then each kind of drift made on purpose — a projection row edited
//! and one deleted outside the projector, rows changed, inserted and deleted while the
//! table was not published, a row whose mapping fails, a changed mapping, a projector that
//! fell behind — is found by one pass, with its class and resource.

use std::{path::Path, process::Command};

use crate::{
    connector::{await_caught_up, await_snapshotted, start, stop},
    projector::{drop_projections, project_until_caught_up, projector_config},
    stack,
};

/// `fhir-cdc reconcile` (lag bound 20 s unless `extra` sets one): its exit code and stdout
/// (stderr appended).
fn reconcile(config: &Path, projection: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let bound: &[&str] = if extra.contains(&"--lag-bound") {
        &[]
    } else {
        &["--lag-bound", "20"]
    };
    let output = Command::new(stack::fhir_cdc_bin())
        .arg("reconcile")
        .arg("--config")
        .arg(config)
        .arg("--projection")
        .arg(projection)
        .args(bound)
        .args(extra)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The report's lines of drifted resources: `class resource`.
fn drifted(report: &str) -> Vec<String> {
    let mut lines: Vec<String> = report
        .lines()
        .filter(|l| l.contains("  source "))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn each_drift_made_on_purpose_is_found_with_its_class() {
    let client = stack::pg_client().await;
    let schema = stack::unique("recon");
    stack::create_lab_schema(&client, &schema).await;
    let table = format!("{schema}.lab_result");
    stack::insert_results(&client, &table, 50).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhirrecon");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let topic = format!("{prefix}.lab.Observation");
    let projection_schema = format!("{schema}_proj");
    let projector = projector_config(&dir, &format!("{schema}_p"), &topic, &projection_schema);
    let connector = start(&config, &log);
    await_snapshotted(&config, &log).await;
    await_caught_up(&client, &slot, std::time::Duration::from_secs(30), &log).await;
    project_until_caught_up(&projector);

    let (code, report) = reconcile(&config, &projector, &[]);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("0 drifted of 50 resource(s) compared"),
        "{report}"
    );

    // The projection edited, and a row of it deleted, outside the projector.
    client
        .batch_execute(&format!(
            "UPDATE {projection_schema}.resources SET body = jsonb_set(body, '{{status}}', '\"amended\"')
              WHERE resource_id = 'result-1';
             DELETE FROM {projection_schema}.resources WHERE resource_id = 'result-2';"
        ))
        .await
        .unwrap();
    // Rows changed, inserted and deleted while the table is not published: never captured.
    // (Each its own transaction: the publication's membership counts as of each change.)
    for statement in [
        format!("ALTER PUBLICATION {slot} DROP TABLE {table}"),
        format!("UPDATE {table} SET value_numeric = 91 WHERE result_id = 3"),
        format!("DELETE FROM {table} WHERE result_id = 4"),
        format!(
            "INSERT INTO {table} (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
             VALUES (1001, 'A24-1001', 'M000001', 'GLU', 90, 'mg/dL', 'F', '2024-03-05 14:30:00')"
        ),
        format!("ALTER PUBLICATION {slot} ADD TABLE {table}"),
    ] {
        client.batch_execute(&statement).await.unwrap();
    }
    // A row its mapping refuses (no LOINC code): a dead letter, no resource.
    client
        .batch_execute(&format!(
            "INSERT INTO {table} (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
             VALUES (1002, 'A24-1002', 'M000001', 'ZZZ', 90, 'mg/dL', 'F', '2024-03-05 14:30:00')"
        ))
        .await
        .unwrap();
    await_caught_up(&client, &slot, std::time::Duration::from_secs(30), &log).await;
    project_until_caught_up(&projector);
    let (code, report) = reconcile(&config, &projector, &[]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(
        drifted(&report),
        [
            "deleted_at_source Observation/result-4",
            "log_behind_source Observation/result-3",
            "missing_from_log Observation/result-1001",
            "missing_from_projection Observation/result-2",
            "projection_edited Observation/result-1",
        ],
        "{report}"
    );
    assert!(
        report.contains(&format!("1 row(s) of {table} fail mapping lab.result")),
        "{report}"
    );
    assert!(report.contains("6 drifted of"), "{report}");
    // Only the values' digests are shown, never a value.
    assert!(
        !report.contains("mg/dL") && !report.contains("M000001"),
        "{report}"
    );

    // A changed mapping: every resource it makes differs from its logged version.
    let mapping = dir.join("mappings/result.yaml");
    let text = std::fs::read_to_string(&mapping).unwrap();
    std::fs::write(
        &mapping,
        text.replace(
            "code: laboratory",
            "code: laboratory\n      category[0].text: Laboratory",
        ),
    )
    .unwrap();
    let (code, report) = reconcile(&config, &projector, &["--table", &table]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("mapping_changed 49"),
        "the 50 rows but the one deleted (the source side is judged first): {report}"
    );
    std::fs::write(&mapping, text).unwrap();

    // A projector that stopped: lag beyond the bound is reported as such.
    stack::insert_results(&client, &table, 1).await;
    let (code, report) = reconcile(&config, &projector, &["--lag-bound", "3"]);
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("has not applied what Kafka holds within 3 s")
            && report.contains(&format!("{topic}[0] at ")),
        "{report}"
    );
    let (code, report) = reconcile(&config, &projector, &["--table", "lis.nothing"]);
    assert_eq!(code, Some(2), "{report}");
    assert!(report.contains("no mapping reads table"), "{report}");

    assert!(stop(connector).success());
    stack::drop_capture(&client, &slot, &slot, &schema).await;
    drop_projections(&client, &[projection_schema], &dir).await;
}
