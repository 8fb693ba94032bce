//! `fhir-cdc run` end to end against the real stack: existing rows arrive by the snapshot,
//! new changes by the stream, a row no mapping can take goes to the dead-letter topic with
//! its reason, SIGTERM drains and acknowledges, and a restart resumes without re-sending.

use std::time::{Duration, Instant};

use crate::{
    connector::{
        await_confirmed, await_streaming, current_lsn, exit_within, free_port, messages_in,
        read_for, scrape, start, stop,
    },
    stack,
};

async fn read(topic: &str, count: usize) -> Vec<Vec<u8>> {
    read_for(topic, count, Duration::from_secs(60)).await
}

#[tokio::test]
async fn run_snapshots_streams_dead_letters_and_resumes() {
    let client = stack::pg_client().await;
    let schema = stack::unique("run");
    let t = format!("{schema}.lab_result");
    stack::create_lab_schema(&client, &schema).await;
    let insert = |id: i32, status: &str| {
        format!(
            "INSERT INTO {t} (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
             VALUES ({id}, 'A24-{id}', 'MRN0000042', 'GLU', 98.5, 'mg/dL', '{status}', '2024-03-05 14:30:00')"
        )
    };
    for id in 1..=3 {
        client.batch_execute(&insert(id, "P")).await.unwrap();
    }

    // The sample result mapping, reading this test's table.
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhirit");
    let metrics_port = free_port();
    let config = stack::connector_config(
        &dir,
        &schema,
        &prefix,
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\""),
    );
    let observations = format!("{prefix}.lab.Observation");
    let dead_letters = format!("{prefix}.dlq.{schema}");

    let log = dir.join("run.log");
    let connector = start(&config, &log);
    assert_eq!(
        read(&observations, 3).await.len(),
        3,
        "snapshot events; log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );

    client.batch_execute(&insert(4, "F")).await.unwrap();
    client
        .batch_execute(&format!(
            "UPDATE {t} SET result_status = 'F' WHERE result_id = 1"
        ))
        .await
        .unwrap();
    let before_last = current_lsn(&client).await;
    client.batch_execute(&insert(5, "Q")).await.unwrap(); // no translation for Q

    let messages = read(&observations, 5).await;
    assert_eq!(
        messages.len(),
        5,
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let letters = read(&dead_letters, 1).await;
    assert_eq!(letters.len(), 1);
    let letter: serde_json::Value = serde_json::from_slice(&letters[0]).unwrap();
    assert_eq!(letter["mapping_id"], "lab.result");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("translation `result-status`"),
        "{letter}"
    );
    assert_eq!(
        letter["after"]["result_status"]["text"], "Q",
        "the row as the database sent it"
    );

    // The metrics say the same, per table (polled: an acknowledgement is counted a moment
    // after Kafka has the message).
    let labels = format!("connector=\"{schema}\",table=\"{t}\"");
    let expected = [
        ("fhir_cdc_changes_read_total", 6.0),
        ("fhir_cdc_events_mapped_total", 5.0),
        ("fhir_cdc_events_produced_total", 5.0),
        ("fhir_cdc_events_acked_total", 5.0),
        ("fhir_cdc_dead_letters_total", 1.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape(metrics_port);
        let got: Vec<Option<f64>> = expected
            .iter()
            .map(|(name, _)| samples.get(&format!("{name}{{{labels}}}")).copied())
            .collect();
        let streamed_latencies = samples.get(&format!(
            "fhir_cdc_commit_to_ack_seconds_count{{connector=\"{schema}\"}}"
        ));
        if got == expected.iter().map(|(_, v)| Some(*v)).collect::<Vec<_>>()
            && streamed_latencies == Some(&2.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics {got:?} (commit→ack count {streamed_latencies:?}), expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let codec = stack::codec();
    let mut decoded = Vec::new();
    for bytes in &messages {
        decoded.push(codec.decode(bytes).await.unwrap());
    }
    let ids: Vec<&str> = decoded.iter().map(|e| e.resource_id.as_str()).collect();
    assert_eq!(
        ids,
        ["result-1", "result-2", "result-3", "result-4", "result-1"]
    );
    assert!(
        decoded[..3].iter().all(|e| e.provenance.snapshot),
        "the first three came from the snapshot"
    );
    assert_eq!(
        decoded[4].resource.as_ref().unwrap().to_json()["status"],
        "final"
    );

    // Heartbeats: traffic on a table no mapping reads still advances the acknowledged
    // position, so the server does not keep WAL for nothing.
    client
        .batch_execute(&format!(
            "CREATE TABLE {schema}.unmapped (x int); INSERT INTO {schema}.unmapped VALUES (1);"
        ))
        .await
        .unwrap();
    let unmapped = current_lsn(&client).await;
    let slot = format!("fhir_cdc_{schema}");
    await_confirmed(&client, &slot, &unmapped, Duration::from_secs(20), &log).await;

    assert!(
        stop(connector).success(),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let flushed: String = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    let lsn = |s: &str| s.parse::<fhir_cdc::change::PgLsn>().unwrap();
    assert!(
        lsn(&flushed) > lsn(&before_last),
        "the last transaction was acknowledged ({flushed} ≤ {before_last})"
    );
    // The state saved at the stop is as far as the slot: the last save is not lost to it.
    let loaded = fhir_cdc::config::ConnectorConfig::load(&config).unwrap();
    let stored = fhir_cdc::offsets::StateStore::of(&loaded)
        .await
        .unwrap()
        .load()
        .await
        .unwrap()
        .and_then(|state| state.position);
    assert!(
        stored.as_deref().is_some_and(|p| lsn(p) >= lsn(&flushed)),
        "the stored position {stored:?} is behind the slot's {flushed}"
    );

    // A restart resumes after the acknowledged position: nothing is sent again.
    let connector = start(&config, &log);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        stop(connector).success(),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    // Five seconds is ample for a re-sent event: the first ones arrived within two.
    let after_restart = read_for(&observations, 6, Duration::from_secs(5)).await;
    assert_eq!(
        after_restart.len(),
        5,
        "events were re-sent after a clean stop"
    );

    stack::drop_capture(&client, &slot, &format!("fhir_cdc_{schema}"), &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Kafka's acknowledgement of the last change before the database goes quiet reaches the
/// server without waiting for more traffic: with heartbeats an hour apart and nothing else
/// written to the publication, the slot still confirms the change's commit within seconds
/// (the server's own keepalives come every 30 s).
#[tokio::test]
async fn the_last_acknowledgement_reaches_an_idle_server() {
    let client = stack::pg_client().await;
    let (schema, dir, config) =
        quiet_connector(&client, "idle", &stack::unique("fhirit"), "").await;
    let log = dir.join("run.log");
    let slot = format!("fhir_cdc_{schema}");
    let connector = start(&config, &log);
    await_streaming(&client, &slot, &log).await;

    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.lab_result (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
             VALUES (1, 'A24-1', 'MRN0000042', 'GLU', 98.5, 'mg/dL', 'F', '2024-03-05 14:30:00')"
        ))
        .await
        .unwrap();
    let written = current_lsn(&client).await;
    await_confirmed(&client, &slot, &written, Duration::from_secs(10), &log).await;

    assert!(
        stop(connector).success(),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    stack::drop_capture(&client, &slot, &format!("fhir_cdc_{schema}"), &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// When Kafka refuses to create the topics (three replicas asked of a one-broker cluster),
/// `run` says which topic and why and exits non-zero at once — Kafka's reason, not what the
/// source it stopped says (the topics are created while the database is set up and the
/// snapshot starts).
#[tokio::test]
async fn refused_topics_stop_the_connector_with_the_reason() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirit");
    let (schema, dir, config) =
        quiet_connector(&client, "refused", &prefix, "replication_factor = 3").await;
    let text = fails_at_start(&config, &dir, "of Kafka refusing its topics");
    assert!(
        text.contains(&prefix) && text.contains("eplication factor"),
        "the error names the topic and the reason; log:\n{text}"
    );

    let slot = format!("fhir_cdc_{schema}");
    stack::drop_capture(&client, &slot, &format!("fhir_cdc_{schema}"), &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// A schema registry that does not answer is a transient failure: the connector keeps
/// trying (it must not crash-loop its supervisor, nor give up on a registry that is being
/// restarted), says so once with the cause, reads no change meanwhile, and a stop request
/// ends it at once.
#[tokio::test]
async fn an_unreachable_registry_is_retried_and_a_stop_ends_the_wait() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirit");
    let (schema, dir, config) = quiet_connector(&client, "noregistry", &prefix, "").await;
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "${env:FHIR_CDC_SCHEMA_REGISTRY_URL}",
        &format!("http://127.0.0.1:{}", free_port()),
    );
    std::fs::write(&config, text).unwrap();
    let log = dir.join("run.log");
    let connector = start(&config, &log);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("a transient failure stopped capture").count(),
        1,
        "one warning for the streak; log:\n{text}"
    );
    assert!(
        text.contains("schema registry"),
        "the warning names the registry; log:\n{text}"
    );
    assert!(
        text.matches("still failing").count() >= 1,
        "it kept trying; log:\n{text}"
    );
    let stopping = Instant::now();
    let status = stop(connector);
    assert!(
        status.success(),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "a stop took {:?}",
        stopping.elapsed()
    );
    assert_eq!(
        messages_in(&format!("{prefix}.lab.Observation")),
        0,
        "nothing was written"
    );

    let slot = format!("fhir_cdc_{schema}");
    stack::drop_capture(&client, &slot, &format!("fhir_cdc_{schema}"), &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Start the connector of `config` and wait up to a minute for it to stop `because`; it must
/// exit 1. Returns its log (`run.log` in `dir`).
fn fails_at_start(config: &std::path::Path, dir: &std::path::Path, because: &str) -> String {
    let log = dir.join("run.log");
    let status = exit_within(start(config, &log), Duration::from_secs(60), because);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "log:\n{text}");
    text
}

/// A connector of its own (named after `name`, its topics under `prefix`): a lab results
/// table, the sample result mapping reading it, and the stack's connector config (`extra`
/// in its `[topics]`) with heartbeats an hour apart, so that nothing but the test's own
/// writes wakes the connector. Returns the schema (also the connector's name), the
/// directory and the config file.
async fn quiet_connector(
    client: &tokio_postgres::Client,
    name: &str,
    prefix: &str,
    extra: &str,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let schema = stack::unique(name);
    stack::create_lab_schema(client, &schema).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let config = stack::connector_config(&dir, &schema, prefix, extra);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "heartbeat.interval.ms = 500",
        "heartbeat.interval.ms = 3600000",
    );
    assert!(text.contains("heartbeat.interval.ms = 3600000"), "{text}");
    std::fs::write(&config, text).unwrap();
    (schema, dir, config)
}

/// An event larger than its topic takes (`max.message.bytes` of 20,000 here) goes to the
/// dead-letter topic as its row, with its size and the limit: the stream goes on, the rows
/// around it arrive, and the slot moves past it — it must not stop the connector on every
/// restart.
#[tokio::test]
async fn an_event_too_large_for_its_topic_is_dead_lettered_and_the_stream_goes_on() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};

    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirbig");
    let (schema, dir, config) = quiet_connector(&client, "big", &prefix, "").await;
    let observations = format!("{prefix}.lab.Observation");
    let admin: AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", stack::kafka_bootstrap())
        .create()
        .unwrap();
    let topic = NewTopic::new(&observations, 1, TopicReplication::Fixed(1))
        .set("max.message.bytes", "20000");
    for result in admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    let log = dir.join("run.log");
    let connector = start(&config, &log);
    await_streaming(&client, &format!("fhir_cdc_{schema}"), &log).await;
    let t = format!("{schema}.lab_result");
    for (id, comment) in [(1, "short"), (2, &*"x".repeat(30_000)), (3, "short")] {
        client
            .execute(
                &format!(
                    "INSERT INTO {t} (result_id, accession_no, mrn, test_code, value_numeric, units, result_status, collected_at, comment)
                     VALUES ($1, 'A24-1', 'MRN0000042', 'GLU', 98.5, 'mg/dL', 'F', '2024-03-05 14:30:00', $2)"
                ),
                &[&id, &comment],
            )
            .await
            .unwrap();
    }
    let lsn = current_lsn(&client).await;
    await_confirmed(
        &client,
        &format!("fhir_cdc_{schema}"),
        &lsn,
        Duration::from_secs(30),
        &log,
    )
    .await;

    let codec = stack::codec();
    let mut ids = Vec::new();
    for bytes in read(&observations, 2).await {
        ids.push(codec.decode(&bytes).await.unwrap().resource_id);
    }
    assert_eq!(ids, ["result-1", "result-3"], "the rows around it arrived");
    let letters = read_for(
        &format!("{prefix}.dlq.{schema}"),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(letters.len(), 1);
    let letter: serde_json::Value = serde_json::from_slice(&letters[0]).unwrap();
    let error = letter["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("topic {observations}"))
            && error.contains("20000 bytes")
            && error.contains("max.message.bytes"),
        "{error}"
    );
    assert_eq!(letter["after"]["result_id"]["text"], "2", "{letter}");
    assert!(
        stop(connector).success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );

    let slot = format!("fhir_cdc_{schema}");
    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
