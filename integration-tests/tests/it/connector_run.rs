//! `fhir-cdc run` end to end against the real stack: existing rows arrive by the snapshot,
//! new changes by the stream, a row no mapping can take goes to the dead-letter topic with
//! its reason, SIGTERM drains and acknowledges, and a restart resumes without re-sending.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fhir_cdc::{canonical::registry::EventCodec, config::RegistryConfig};
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    ClientConfig, Message, Offset, TopicPartitionList,
};
use tokio_postgres::NoTls;

use crate::stack;

/// A running connector; killed if the test fails before stopping it, so that no
/// connector (and no walsender) outlives its test.
struct Connector(Option<Child>);

impl Drop for Connector {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start(config: &Path, log: &Path) -> Connector {
    Connector(Some(
        Command::new(stack::fhir_cdc_bin())
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    ))
}

/// SIGTERM, then the exit status (within 30 s).
fn stop(mut connector: Connector) -> std::process::ExitStatus {
    let mut child = connector.0.take().expect("a running connector");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the connector did not stop within 30s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every message of partition 0 of `topic`, read until `count` arrived or `wait` passed.
async fn read_for(topic: &str, count: usize, wait: Duration) -> Vec<Vec<u8>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack::kafka_bootstrap())
        .set("group.id", stack::unique("run-reader"))
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut messages = Vec::new();
    let deadline = Instant::now() + wait;
    while messages.len() < count && Instant::now() < deadline {
        if let Ok(Ok(message)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
        {
            messages.push(message.payload().unwrap().to_vec());
        }
    }
    messages
}

async fn read(topic: &str, count: usize) -> Vec<Vec<u8>> {
    read_for(topic, count, Duration::from_secs(60)).await
}

#[tokio::test]
async fn run_snapshots_streams_dead_letters_and_resumes() {
    let (client, connection) = tokio_postgres::connect(&stack::pg_url(), NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let schema = stack::unique("run");
    let t = format!("{schema}.lab_result");
    let ddl = std::fs::read_to_string(stack::repo_root().join("mappings/lab/schema.sql"))
        .unwrap()
        .replace(
            "CREATE SCHEMA IF NOT EXISTS lis;",
            &format!("CREATE SCHEMA {schema};"),
        )
        .replace("lis.", &format!("{schema}."));
    client.batch_execute(&ddl).await.unwrap();
    client
        .batch_execute(&format!("ALTER TABLE {t} REPLICA IDENTITY FULL"))
        .await
        .unwrap();
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
    std::fs::create_dir_all(dir.join("mappings")).unwrap();
    let lab = stack::repo_root().join("mappings/lab");
    let mapping = std::fs::read_to_string(lab.join("result.yaml"))
        .unwrap()
        .replace("table: lis.lab_result", &format!("table: {t}"));
    std::fs::write(dir.join("mappings/result.yaml"), mapping).unwrap();
    std::fs::copy(
        lab.join("tests.codes.yaml"),
        dir.join("mappings/tests.codes.yaml"),
    )
    .unwrap();
    let prefix = stack::unique("fhirit");
    let config = dir.join("connector.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "{schema}"
[source]
kind = "postgres"
url = "${{env:FHIR_CDC_PG_URL}}"
heartbeat.interval.ms = 500
[kafka]
bootstrap.servers = "${{env:FHIR_CDC_KAFKA_BOOTSTRAP}}"
[schema_registry]
url = "${{env:FHIR_CDC_SCHEMA_REGISTRY_URL}}"
[mappings]
path = "mappings"
[topics]
prefix = "{prefix}"
"#
        ),
    )
    .unwrap();
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
    let before_last: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
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

    let codec = EventCodec::new(
        &toml::from_str::<RegistryConfig>(&format!("url = \"{}\"", stack::registry_url())).unwrap(),
    );
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
    let unmapped: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let flushed_now = || async {
        client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&format!("fhir_cdc_{schema}")],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while flushed_now()
        .await
        .parse::<fhir_cdc::change::PgLsn>()
        .unwrap()
        < unmapped.parse().unwrap()
    {
        assert!(
            Instant::now() < deadline,
            "the slot did not advance past unmapped traffic within 20s; log:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert!(
        stop(connector).success(),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let slot = format!("fhir_cdc_{schema}");
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
