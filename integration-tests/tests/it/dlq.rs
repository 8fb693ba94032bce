//! `fhir-cdc dlq list|show|replay` against the real stack: a dead letter stays outstanding
//! while its cause does, is replayed once the cause is fixed — a change through the fixed
//! mapping into its topic with the event id it would have had, a projector's message into
//! the read model — and a replay applies nothing twice.

use std::{path::Path, process::Command, time::Duration};

use fhir_cdc::canonical::CanonicalEvent;

use crate::{
    connector::{
        await_caught_up, capture_results, drain, events_of, read_for, start, ResultCapture,
    },
    projector::{
        count, counters_of, drop_projections, encode, events, project_until_caught_up,
        projector_config, resources, same_tables, write,
    },
    stack,
};

/// `fhir-cdc dlq <args> --config config`: whether it succeeded, and its stdout and stderr.
fn dlq(config: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(stack::fhir_cdc_bin())
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The ids of the letters `dlq list` prints (with `--all`: replayed ones too).
fn listed(config: &Path, all: bool) -> Vec<String> {
    let args: &[&str] = if all { &["list", "--all"] } else { &["list"] };
    let (ok, out, err) = dlq(config, args);
    assert!(ok, "{err}");
    out.lines()
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_dead_lettered_change_is_replayed_through_the_fixed_mapping() {
    let client = stack::pg_client().await;
    let schema = stack::unique("dlq");
    stack::create_lab_schema(&client, &schema).await;
    let (
        ResultCapture {
            dir,
            prefix,
            config,
            slot,
            log,
        },
        connector,
    ) = capture_results(&client, &schema, "fhirdlq").await;
    // Result 2's test code is not in the LOINC table (unmapped: fail).
    for (id, code) in [(1, "GLU"), (2, "ZZZ"), (3, "K")] {
        client
            .batch_execute(&format!(
                "INSERT INTO {schema}.lab_result (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
                 VALUES ({id}, 'A24-{id}', 'M000001', '{code}', 4.5, 'mmol/L', 'F', '2024-03-05 14:30:00')"
            ))
            .await
            .unwrap();
    }
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;

    let letter = format!("{schema}:0:0");
    let (ok, out, err) = dlq(&config, &["list"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with(&format!("{letter}  ")), "{out}");
    assert!(
        out.contains(&format!("{schema}.lab_result pg:"))
            && out.contains(" insert  mapping lab.result: ")
            && out.contains("translation `loinc` (unmapped: fail)"),
        "{out}"
    );
    let (ok, shown, err) = dlq(&config, &["show", &letter]);
    assert!(ok, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        shown["record"]["after"]["test_code"],
        serde_json::json!({"kind": "text", "text": "ZZZ"})
    );
    assert_eq!(shown["replayed"], serde_json::Value::Null);

    // Before the fix the change fails again and stays outstanding.
    let (ok, out, _) = dlq(&config, &["replay", "--all"]);
    assert!(!ok);
    assert!(
        out.contains(&format!("{letter}  NOT replayed: fails again: ")),
        "{out}"
    );
    assert_eq!(listed(&config, false), [letter.as_str()]);

    // The fix: the code gets its LOINC entry.
    let codes = dir.join("mappings/tests.codes.yaml");
    let text = std::fs::read_to_string(&codes).unwrap() + "ZZZ: 2951-2\n";
    std::fs::write(&codes, text).unwrap();
    let (ok, out, err) = dlq(&config, &["replay", "--reason", "loinc"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("{letter}  replayed: 1 event(s) written")),
        "{out}"
    );
    assert!(listed(&config, false).is_empty());
    assert_eq!(listed(&config, true), [letter.as_str()]);
    let (_, out, _) = dlq(&config, &["replay", "--all"]);
    assert_eq!(out.trim(), "nothing to replay");

    // By id it is replayed again: the same event, with the same id.
    let (ok, out, err) = dlq(&config, &["replay", "--id", &letter]);
    assert!(ok, "{out}{err}");
    let codec = stack::codec();
    let mut events: Vec<CanonicalEvent> = Vec::new();
    for bytes in read_for(
        &format!("{prefix}.lab.Observation"),
        4,
        Duration::from_secs(10),
    )
    .await
    {
        events.push(codec.decode(&bytes).await.unwrap());
    }
    let ids: Vec<&str> = events.iter().map(|e| e.resource_id.as_str()).collect();
    assert_eq!(ids, ["result-1", "result-3", "result-2", "result-2"]);
    let (replayed, again) = (&events[2], &events[3]);
    assert_eq!(replayed.event_id, again.event_id);
    assert_eq!(
        replayed.provenance.source_position,
        shown["record"]["source_position"].as_str().unwrap(),
        "the event says where the change came from, not when it was replayed"
    );
    assert!(replayed.resource_version < events[1].resource_version);
    let resource = replayed.resource.as_ref().unwrap().to_json();
    assert_eq!(resource["code"]["coding"][0]["code"], "2951-2");

    // Something in the dead-letter topic that is not a letter: listed as such, shown, and
    // refused by replay with the field it lacks; the letters around it are unaffected.
    write(
        &format!("{prefix}.dlq.{schema}"),
        1,
        &[("stray".to_owned(), b"not a letter".to_vec())],
    )
    .await;
    // After the letter and the markers of its two replays.
    let stray = format!("{schema}:0:3");
    let (ok, out, err) = dlq(&config, &["list"]);
    assert!(ok, "{err}");
    assert!(
        out.lines().count() == 1
            && out.starts_with(&format!("{stray}  "))
            && out.contains("not a dead-letter record"),
        "{out}"
    );
    let (ok, shown, _) = dlq(&config, &["show", &stray]);
    assert!(
        ok && shown.contains("\"record\": \"not a letter\""),
        "{shown}"
    );
    let (ok, out, _) = dlq(&config, &["replay", "--id", &stray]);
    assert!(
        !ok && out.contains(&format!("{stray}  NOT replayed: the record has no `")),
        "{out}"
    );
    assert_eq!(listed(&config, true), [letter.as_str(), stray.as_str()]);

    // A configuration that cannot be read: the exit status says so, with the file.
    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "name = \"x\"\nunknown_key = 1\n").unwrap();
    let output = Command::new(stack::fhir_cdc_bin())
        .args(["dlq", "list", "--config"])
        .arg(&broken)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("broken.toml"), "{stderr}");

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_refused_event_is_applied_once_the_cause_is_fixed_and_only_once() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirdlqp");
    let dir = std::env::temp_dir().join(&prefix);
    let topic = format!("{prefix}.lab.Observation");
    let mut messages = encode(&events(30, 1), &topic).await;
    messages.insert(10, ("garbage".to_owned(), b"not an event".to_vec()));
    write(&topic, 1, &messages).await;
    let schema = prefix.replace('-', "_");
    // The read model refuses one resource (say, a constraint a DBA added by mistake).
    let (mut db, connection) = tokio_postgres::connect(&stack::pg_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    fhir_cdc::consumer::projection::migrate(&mut db, &schema)
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "ALTER TABLE {schema}.resources ADD CONSTRAINT refuse_7 CHECK (resource_id <> 'result-7')"
        ))
        .await
        .unwrap();
    let config = projector_config(&dir, "p", &topic, &schema);
    let counters = project_until_caught_up(&config);
    assert_eq!((counters["applied"], counters["dead_lettered"]), (29, 2));

    let (ok, out, err) = dlq(&config, &["list"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let (garbage, refused) = ("projector:0:0", "projector:0:1");
    assert!(
        lines[0].starts_with(garbage)
            && lines[0].contains(&format!("{topic}[0]@10"))
            && lines[0].contains("wire-format"),
        "{out}"
    );
    assert!(
        lines[1].starts_with(refused) && lines[1].contains("refuse_7"),
        "{out}"
    );

    // A projector's letter is not the connector's to replay, nor the other way round.
    let connector = stack::connector_config(&dir, "some-connector", &prefix, "");
    let (ok, _, err) = dlq(&connector, &["replay", "--id", refused]);
    assert!(
        !ok && err
            .contains("is a dead letter of `p`: replay it with that projector's configuration"),
        "{err}"
    );

    // Nor another projector's (they share the topic).
    let other = projector_config(&dir, "q", &topic, &format!("{schema}_q"));
    let (ok, _, err) = dlq(&other, &["replay", "--id", refused]);
    assert!(!ok && err.contains("is a dead letter of `p`"), "{err}");
    let (ok, out, _) = dlq(&other, &["replay", "--all"]);
    assert!(ok && out.trim() == "nothing to replay", "{out}");

    let (ok, out, _) = dlq(&config, &["replay", "--reason", "refuse_7"]);
    assert!(
        !ok && out.contains("NOT replayed: the database refused it"),
        "{out}"
    );
    client
        .batch_execute(&format!(
            "ALTER TABLE {schema}.resources DROP CONSTRAINT refuse_7"
        ))
        .await
        .unwrap();
    let (ok, out, err) = dlq(&config, &["replay", "--reason", "refuse_7"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!(
            "{refused}  replayed: applied 1, duplicate 0, stale 0"
        )),
        "{out}"
    );
    assert_eq!(listed(&config, false), [garbage]);
    // Again by id: the ledger has it.
    let (ok, out, _) = dlq(&config, &["replay", "--id", refused]);
    assert!(
        ok && out.contains("applied 0, duplicate 1, stale 0"),
        "{out}"
    );
    // Bytes that are no event stay outstanding.
    let (ok, out, _) = dlq(&config, &["replay", "--id", garbage]);
    assert!(
        !ok && out.contains("NOT replayed") && out.contains("wire-format"),
        "{out}"
    );
    let (ok, _, err) = dlq(&config, &["replay", "--id", "projector:0:99"]);
    assert!(
        !ok && err.contains("no dead letter `projector:0:99`"),
        "{err}"
    );
    assert_eq!(listed(&config, false), [garbage]);

    // The read model equals one projected without the refusal.
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {schema}.history")).await,
        30
    );
    let fresh = format!("{schema}_fresh");
    let counters = counters_of(
        &projector_config(&dir, "fresh", &topic, &fresh),
        &["project", "--until-caught-up"],
    );
    assert_eq!(counters["applied"], 30);
    same_tables(
        &resources(&client, &schema).await,
        &resources(&client, &fresh).await,
    );

    drop_projections(&client, &[schema, fresh], &dir).await;
}

/// A character FHIR strings forbid (here U+0001 in a result's comment) never reaches an
/// event: the row is dead-lettered, naming the character and its place, and once the
/// mapping says `control_characters: space` the replay publishes the cleaned text.
#[tokio::test]
async fn a_control_character_is_dead_lettered_until_the_mapping_cleans_it() {
    let client = stack::pg_client().await;
    let schema = stack::unique("ctrl");
    stack::create_lab_schema(&client, &schema).await;
    let (
        ResultCapture {
            dir,
            prefix,
            config,
            slot,
            log,
        },
        connector,
    ) = capture_results(&client, &schema, "fhirctrl").await;
    for (id, comment) in [(1, "E'hemolysed'"), (2, "E'hemo\\x01lysed\\tslightly'")] {
        client
            .batch_execute(&format!(
                "INSERT INTO {schema}.lab_result (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at, comment)
                 VALUES ({id}, 'A24-{id}', 'M000001', 'GLU', 4.5, 'mmol/L', 'F', '2024-03-05 14:30:00', {comment})"
            ))
            .await
            .unwrap();
    }
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;

    let (ok, out, err) = dlq(&config, &["list"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("result.yaml:39:7: Observation.note[0].text: the text holds a control character (U+0001, character 5 of the text) that FHIR strings forbid"),
        "{out}"
    );
    assert!(!out.contains("hemo"), "the reason names no value: {out}");

    let mapping = dir.join("mappings/result.yaml");
    let text = std::fs::read_to_string(&mapping).unwrap().replace(
        "note[0].text: { column: comment }",
        "note[0].text: { column: comment, control_characters: space }",
    );
    std::fs::write(&mapping, text).unwrap();
    let (ok, out, err) = dlq(&config, &["replay", "--all"]);
    assert!(ok, "{out}{err}");

    let codec = stack::codec();
    let mut notes = Vec::new();
    for bytes in read_for(
        &format!("{prefix}.lab.Observation"),
        2,
        Duration::from_secs(10),
    )
    .await
    {
        let event = codec.decode(&bytes).await.unwrap();
        let resource = event.resource.as_ref().unwrap().to_json();
        notes.push((event.resource_id, resource["note"][0]["text"].clone()));
    }
    assert_eq!(
        notes,
        [
            ("result-1".to_owned(), serde_json::json!("hemolysed")),
            (
                "result-2".to_owned(),
                serde_json::json!("hemo lysed\tslightly")
            ),
        ]
    );
    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// A patient row its mapping refuses leaves the SSN the mapping tokenizes out of the dead
/// letter (its token stands there, as in the events) and out of the log. The letter holds
/// no whole row, so its replay asks the connector to read the row again at the source by
/// its key. With `[dead_letters] rows = "none"` a letter holds the key and no row at all.
#[tokio::test]
async fn a_patient_letter_holds_the_protected_forms_and_is_replayed_from_the_source() {
    const SSN: &str = "987-65-4321";
    let client = stack::pg_client().await;
    let schema = stack::unique("phi");
    stack::create_lab_schema(&client, &schema).await;
    // Every column flagged as key by the change: the letter names the mapping's key alone.
    client
        .batch_execute(&format!(
            "ALTER TABLE {schema}.patient REPLICA IDENTITY FULL"
        ))
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(&schema);
    let mapping = dir.join("mappings/patient.yaml");
    stack::lab_mappings(&dir.join("mappings"), &schema, &["patient.yaml"]);
    // A sex code the table does not list fails the row.
    let text = std::fs::read_to_string(&mapping).unwrap().replace(
        "    unmapped: default\n    default: unknown\n",
        "    unmapped: fail\n",
    );
    std::fs::write(&mapping, &text).unwrap();
    let prefix = stack::unique("fhirphi");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let (slot, log) = (format!("fhir_cdc_{schema}"), dir.join("run.log"));
    let insert = |id: i32, sex: &str| {
        format!(
            "INSERT INTO {schema}.patient (patient_id, mrn, last_name, sex, ssn) VALUES ({id}, 'M00000000{id}', 'Doe', '{sex}', '{SSN}')"
        )
    };
    let connector = start(&config, &log);
    await_caught_up(&client, &slot, Duration::from_secs(30), &log).await;
    client.batch_execute(&insert(1, "F")).await.unwrap();
    client.batch_execute(&insert(2, "X")).await.unwrap();
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;

    let topic = format!("{prefix}.lab.Patient");
    let events = events_of(&topic).await;
    assert_eq!(events.len(), 1);
    let token = events[0].resource.as_ref().unwrap().to_json()["identifier"][1]["value"].clone();
    let letter = format!("{schema}:0:0");
    let (ok, shown, err) = dlq(&config, &["show", &letter]);
    assert!(ok, "{err}");
    assert!(!shown.contains(SSN), "{shown}");
    let record = &serde_json::from_str::<serde_json::Value>(&shown).unwrap()["record"];
    assert_eq!(record["rows"], "protected");
    assert_eq!(
        record["after"]["ssn"],
        serde_json::json!({"kind": "text", "protected": "token", "token": token})
    );
    assert_eq!(
        record["after"]["last_name"]["text"], "Doe",
        "unprotected columns stay"
    );
    assert_eq!(record["key"], serde_json::json!(["patient_id"]));
    assert_eq!(
        record["key_values"],
        serde_json::json!({"patient_id": {"kind": "integer", "text": "2"}})
    );
    assert!(!std::fs::read_to_string(&log).unwrap().contains(SSN));

    // The fix, and the replay: the connector reads patient 2 again when it runs.
    std::fs::write(
        &mapping,
        text.replace("U: unknown }", "U: unknown, X: unknown }"),
    )
    .unwrap();
    let (ok, out, err) = dlq(&config, &["replay", "--all"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("{letter}  replayed: the letter holds no whole row: the connector reads it again at the source (snapshot request ")),
        "{out}"
    );
    stack::connector_config(&dir, &schema, &prefix, "[dead_letters]\nrows = \"none\"");
    let connector = start(&config, &log);
    client.batch_execute(&insert(3, "Q")).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let replayed = loop {
        let events = events_of(&topic).await;
        if let Some(event) = events
            .iter()
            .find(|e| e.resource_id == "lab-patient-M000000002")
        {
            break event.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
    };
    assert_eq!(
        replayed.resource.as_ref().unwrap().to_json()["gender"],
        "unknown"
    );
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;

    // After the first letter and its replay's marker.
    let letter = format!("{schema}:0:2");
    let (ok, shown, err) = dlq(&config, &["show", &letter]);
    assert!(ok, "{err}");
    let record = &serde_json::from_str::<serde_json::Value>(&shown).unwrap()["record"];
    assert_eq!(record["rows"], "none");
    assert!(
        record["after"].is_null() && record["before"].is_null(),
        "{record}"
    );
    assert_eq!(record["key_values"]["patient_id"]["text"], "3");
    assert!(!shown.contains(SSN) && !shown.contains("Doe"), "{shown}");
    assert!(!std::fs::read_to_string(&log).unwrap().contains(SSN));

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
