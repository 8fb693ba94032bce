//! PHI sentinels: a patient whose every mapped column holds a recognisable value, captured
//! by snapshot and by stream, with a row its mapping refuses. The identifiers the mappings
//! protect (the MRN the ids are made of, the SSN) appear nowhere but in their protected
//! forms; no sentinel at all appears in the log, in any Kafka key or header, or in a topic
//! outside the restricted class and the dead letters.

use std::time::Duration;

use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    ClientConfig,
};

use crate::{
    connector::{await_caught_up, await_snapshotted, drain, read_whole, start},
    stack,
};

/// Each mapped column of a patient, with a value found nowhere else (the MRN is unique:
/// the streamed and the refused patient have their own, below).
const MRN: &str = "SNTLMRN041";
const OTHER_MRNS: [&str; 2] = ["SNTLMRN042", "SNTLMRN043"];
const SSN: &str = "SNTL-SSN-42";
const LAST: &str = "Sntllastname";
const FIRST: &str = "Sntlfirstname";
const PHONE: &str = "SNTL-PHONE-42";

/// The topics under `prefix`, by name.
fn topics_under(prefix: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack::kafka_bootstrap())
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut topics: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|name| name.starts_with(&format!("{prefix}.")))
        .collect();
    topics.sort();
    topics
}

fn holds(bytes: &[u8], text: &str) -> bool {
    bytes.windows(text.len()).any(|w| w == text.as_bytes())
}

#[tokio::test]
async fn protected_identifiers_appear_only_protected_and_patients_only_in_restricted_topics() {
    let client = stack::pg_client().await;
    let (schema, dir) = stack::lab_with_restricted_patients(&client, "sentinel").await;
    let mappings = dir.join("mappings");
    // Patients are restricted, their ids tokens, and a sex code outside the table fails
    // the row; results reference the patients by the same tokens.
    let patient = std::fs::read_to_string(mappings.join("patient.yaml"))
        .unwrap()
        .replace(
            r#"id: "lab-patient-{mrn}""#,
            r#"id: { template: "lab-patient-{mrn}", protect: token }"#,
        )
        .replace(
            "    unmapped: default\n    default: unknown\n",
            "    unmapped: fail\n",
        );
    std::fs::write(mappings.join("patient.yaml"), patient).unwrap();
    let result = std::fs::read_to_string(mappings.join("result.yaml"))
        .unwrap()
        .replace(
            r#"{ reference: Patient, id: "lab-patient-{mrn}" }"#,
            r#"{ reference: Patient, id: "lab-patient-{mrn}", protect: token }"#,
        );
    std::fs::write(mappings.join("result.yaml"), result).unwrap();
    let prefix = stack::unique("fhirsntl");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let (slot, log) = (format!("fhir_cdc_{schema}"), dir.join("run.log"));

    let patient = |id: i32, sex: &str| {
        format!(
            "INSERT INTO {schema}.patient (patient_id, mrn, last_name, first_name, middle_name, birth_date, sex, ssn, phone)
             VALUES ({id}, '{MRN}', '{LAST}', '{FIRST}', '{FIRST}', '1961-07-04', '{sex}', '{SSN}', '{PHONE}')"
        )
    };
    let result = |id: i32| {
        format!(
            "INSERT INTO {schema}.lab_result (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
             VALUES ({id}, 'A24-{id}', '{MRN}', 'GLU', 4.5, 'mmol/L', 'F', '2024-03-05 14:30:00')"
        )
    };
    client.batch_execute(&patient(1, "F")).await.unwrap();
    client.batch_execute(&result(1)).await.unwrap();
    let connector = start(&config, &log);
    await_snapshotted(&config, &log).await;
    await_caught_up(&client, &slot, Duration::from_secs(30), &log).await;
    for (id, sex, mrn) in [(2, "M", OTHER_MRNS[0]), (3, "X", OTHER_MRNS[1])] {
        client
            .batch_execute(&patient(id, sex).replace(MRN, mrn))
            .await
            .unwrap();
    }
    client.batch_execute(&result(2)).await.unwrap();
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;

    let sentinels = [MRN, OTHER_MRNS[0], OTHER_MRNS[1], SSN, LAST, FIRST, PHONE];
    let log_text = std::fs::read_to_string(&log).unwrap();
    for sentinel in sentinels {
        assert!(
            !log_text.contains(sentinel),
            "{sentinel} in the log:\n{log_text}"
        );
    }
    let topics = topics_under(&prefix);
    let restricted = format!("{prefix}.restricted.lab.Patient");
    let dead_letters = format!("{prefix}.dlq.{schema}");
    for topic in [
        &restricted,
        &dead_letters,
        &format!("{prefix}.lab.Observation"),
    ] {
        assert!(topics.contains(topic), "{topic} missing from {topics:?}");
    }
    let mut patients = 0;
    for topic in &topics {
        for message in read_whole(topic, usize::MAX, Duration::from_secs(3)).await {
            for sentinel in sentinels {
                assert!(
                    !holds(&message.key, sentinel),
                    "{sentinel} in a key of {topic}"
                );
                for (name, value) in &message.headers {
                    assert!(
                        !holds(value, sentinel),
                        "{sentinel} in header {name} of {topic}"
                    );
                }
            }
            let allowed: &[&str] = if *topic == restricted {
                patients += 1;
                assert!(holds(&message.payload, LAST), "the Patient holds its name");
                &[MRN, OTHER_MRNS[0], LAST, FIRST, PHONE]
            } else if *topic == dead_letters {
                let letter = String::from_utf8(message.payload.clone()).unwrap();
                assert!(
                    letter.contains(r#""ssn":{"kind":"text","protected":"token","token":""#),
                    "{letter}"
                );
                &[LAST, FIRST, PHONE]
            } else {
                &[]
            };
            for sentinel in sentinels.iter().filter(|s| !allowed.contains(s)) {
                assert!(
                    !holds(&message.payload, sentinel),
                    "{sentinel} in a message of {topic}"
                );
            }
        }
    }
    assert_eq!(patients, 2, "the snapshotted and the streamed patient");

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
