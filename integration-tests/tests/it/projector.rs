//! `fhir-cdc project` against real Kafka, registry and PostgreSQL: the read model is the same
//! however the events arrive — twice, interleaved across partitions, with duplicates and
//! stale versions injected, through crashes — and a poison message is dead-lettered while
//! everything after it is applied.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use chrono::{TimeZone, Utc};
use fhir_cdc::{
    canonical::CanonicalEvent,
    change::{ChangeEvent, ExactDecimal, Operation, PgLsn, Position, Row, SourceTable, Value},
    config::KafkaProperties,
    kafka::{ensure_topics, Producer, TopicSpec},
    mapping::{load_dir, MapContext, Mapper},
};

use crate::stack;

/// Canonical Observation events: `results` lab results, `versions` versions each (with
/// more than one, the last of every fifth result is a delete), in commit order.
pub(crate) fn events(results: u64, versions: u64) -> Vec<CanonicalEvent> {
    let mapper = Mapper::new(
        load_dir(&stack::repo_root().join("mappings/lab"))
            .unwrap()
            .into_iter()
            .filter(|m| m.table == "lis.lab_result")
            .collect(),
        MapContext::default(),
        "urn:oid:2.16.840.1.113883.19.5",
    )
    .unwrap();
    let source = Arc::new(SourceTable::new(
        "projector-it",
        "postgres",
        "lab",
        "lis",
        "lab_result",
    ));
    let row = |id: u64, version: u64| {
        let status = ["P", "F", "C", "A"][(version % 4) as usize];
        Row::new(vec![
            ("result_id".into(), Value::Int(id as i64)),
            ("accession_no".into(), Value::Text(format!("A24-{id}"))),
            ("mrn".into(), Value::Text("M000001".into())),
            ("test_code".into(), Value::Text("GLU".into())),
            (
                "value_numeric".into(),
                Value::Decimal(ExactDecimal::parse(&format!("{}.5", 90 + version)).unwrap()),
            ),
            ("value_text".into(), Value::Null),
            ("units".into(), Value::Text("mg/dL".into())),
            ("ref_low".into(), Value::Null),
            ("ref_high".into(), Value::Null),
            ("abnormal_flag".into(), Value::Null),
            ("result_status".into(), Value::Text(status.into())),
            (
                "collected_at".into(),
                Value::Timestamp(
                    chrono::NaiveDate::from_ymd_opt(2024, 3, 5)
                        .unwrap()
                        .and_hms_opt(14, 30, 0)
                        .unwrap(),
                ),
            ),
            ("verified_at".into(), Value::Null),
            ("comment".into(), Value::Null),
        ])
    };
    let mut out = Vec::new();
    let mut lsn = 0x1000_0000u64;
    for version in 0..versions {
        for id in 1..=results {
            lsn += 0x100;
            let delete = version > 0 && version == versions - 1 && id % 5 == 0;
            let change = ChangeEvent {
                source: source.clone(),
                op: match (version, delete) {
                    (_, true) => Operation::Delete,
                    (0, _) => Operation::Insert,
                    _ => Operation::Update,
                },
                key: vec!["result_id".into()].into(),
                before: (version > 0).then(|| row(id, version - 1)),
                after: (!delete).then(|| row(id, version)),
                position: Position::Postgres(PgLsn(lsn)),
                ordinal: 0,
                transaction_id: Some(lsn.to_string()),
                commit_time: Some(
                    Utc.timestamp_opt(1_709_650_000 + lsn as i64 / 256, 0)
                        .unwrap(),
                ),
                capture_time: Utc
                    .timestamp_opt(1_709_650_001 + lsn as i64 / 256, 0)
                    .unwrap(),
            };
            let outcome = mapper.map(&change);
            assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
            out.extend(outcome.events);
        }
    }
    out
}

fn kafka() -> KafkaProperties {
    toml::from_str(&format!(
        "\"bootstrap.servers\" = \"{}\"",
        stack::kafka_bootstrap()
    ))
    .unwrap()
}

/// Create `topic` with `partitions` and write `messages` (key, bytes) in order.
pub(crate) async fn write(topic: &str, partitions: i32, messages: &[(String, Vec<u8>)]) {
    ensure_topics(
        &kafka(),
        &[TopicSpec {
            name: topic.to_owned(),
            partitions,
            replication_factor: 1,
            config: Vec::new(),
        }],
    )
    .await
    .unwrap();
    let producer = Producer::new(&kafka()).unwrap();
    // Queued in order (the idempotent producer keeps it), acknowledged together.
    let sends = messages
        .iter()
        .map(|(key, bytes)| producer.send(topic, key, bytes, &[]));
    for result in futures_util::future::join_all(sends).await {
        result.unwrap();
    }
}

pub(crate) async fn encode(events: &[CanonicalEvent], topic: &str) -> Vec<(String, Vec<u8>)> {
    let codec = stack::codec();
    let mut out = Vec::new();
    for event in events {
        out.push((event.key(), codec.encode(event, topic).await.unwrap()));
    }
    out
}

/// A projector config in `dir`, reading `topic` into `schema` as group `name`.
pub(crate) fn projector_config(dir: &Path, name: &str, topic: &str, schema: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"name = "{name}"
[kafka]
bootstrap.servers = "${{env:FHIR_CDC_KAFKA_BOOTSTRAP}}"
# A killed member leaves the group after 6 s, not 45.
session.timeout.ms = "6000"
heartbeat.interval.ms = "1000"
[schema_registry]
url = "${{env:FHIR_CDC_SCHEMA_REGISTRY_URL}}"
[topics]
prefix = "{prefix}"
include = ["{topic}"]
[projection]
url = "${{env:FHIR_CDC_PG_URL}}"
schema = "{schema}"
max_batch = 200
max_batch_ms = 50
# Batches split over two connections: the path with more to get wrong.
connections = 2
"#,
            prefix = topic.split('.').next().unwrap()
        ),
    )
    .unwrap();
    config
}

/// `fhir-cdc project --until-caught-up`; its counters from the final log line.
pub(crate) fn project_until_caught_up(config: &Path) -> BTreeMap<String, u64> {
    counters_of(config, &["project", "--until-caught-up"])
}

/// `fhir-cdc <args> --config config`; its counters from the final log line.
pub(crate) fn counters_of(config: &Path, args: &[&str]) -> BTreeMap<String, u64> {
    let output = Command::new(stack::fhir_cdc_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{log}");
    std::fs::write(config.with_extension("log"), &log).unwrap();
    let stopped = log
        .lines()
        .find(|l| l.contains("applied="))
        .unwrap_or_else(|| panic!("no summary in:\n{log}"));
    ["applied", "duplicate", "stale", "dead_lettered"]
        .iter()
        .map(|name| {
            let value = stopped
                .split(&format!("{name}="))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {stopped}"));
            ((*name).to_owned(), value)
        })
        .collect()
}

/// The read model: every resource row's state, in key order.
pub(crate) async fn resources(client: &tokio_postgres::Client, schema: &str) -> Vec<String> {
    client
        .query(
            &format!(
                "SELECT resource_type || '/' || resource_id || ' ' || version || ' ' || event_id || ' '
                        || deleted || ' ' || coalesce(body::text, '-')
                   FROM {schema}.resources ORDER BY resource_type, resource_id"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The two read models hold the same rows; otherwise the first few differences.
pub(crate) fn same_tables(got: &[String], expected: &[String]) {
    let key = |row: &String| row.split(' ').take(2).collect::<Vec<_>>().join(" ");
    let missing: Vec<String> = expected
        .iter()
        .filter(|r| !got.contains(r))
        .map(key)
        .take(5)
        .collect();
    let extra: Vec<String> = got
        .iter()
        .filter(|r| !expected.contains(r))
        .map(key)
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && got.len() == expected.len(),
        "{} rows, expected {}; missing or different: {missing:?}; unexpected: {extra:?}",
        got.len(),
        expected.len()
    );
}

/// Drop the read models a test made, and its directory.
pub(crate) async fn drop_projections(
    client: &tokio_postgres::Client,
    schemas: &[String],
    dir: &Path,
) {
    for schema in schemas {
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
    std::fs::remove_dir_all(dir).unwrap();
}

pub(crate) async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The history of `schema` holds each of `all` once, and nothing else; when it does not,
/// the message says which events are missing, with their versions and the version the
/// resource holds (a missing older version means it was judged stale).
async fn ledger_holds_each_once(
    client: &tokio_postgres::Client,
    schema: &str,
    all: &[CanonicalEvent],
) {
    let recorded: std::collections::HashSet<String> = client
        .query(&format!("SELECT event_id::text FROM {schema}.history"), &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let missing: Vec<&CanonicalEvent> = all
        .iter()
        .filter(|e| !recorded.contains(&e.event_id))
        .collect();
    let mut described = Vec::new();
    for event in missing.iter().take(5) {
        let holds: Option<String> = client
            .query_opt(
                &format!("SELECT version FROM {schema}.resources WHERE resource_id = $1"),
                &[&event.resource_id],
            )
            .await
            .unwrap()
            .map(|row| row.get(0));
        described.push(format!(
            "{} {} (the resource holds {holds:?})",
            event.resource_id, event.resource_version
        ));
    }
    assert!(
        missing.is_empty() && recorded.len() == all.len(),
        "the ledger holds each event once: {} recorded, {} events, {} missing, e.g. {described:?}",
        recorded.len(),
        all.len(),
        missing.len()
    );
}

#[tokio::test]
async fn the_read_model_is_the_same_however_events_arrive() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirproj");
    let dir = std::env::temp_dir().join(&prefix);
    let all = events(200, 3);
    assert_eq!(all.len(), 600);

    // One partition, in order, with 40 exact duplicates and 25 stale versions injected.
    let ordered = format!("{prefix}.lab.Observation");
    let mut messages = encode(&all, &ordered).await;
    let duplicates: Vec<_> = messages.iter().step_by(15).take(40).cloned().collect();
    messages.extend(duplicates);
    // Stale: the first version of resources whose newest is already applied, under event
    // ids never seen (another mapping version re-emitting an old state).
    let mut stale: Vec<CanonicalEvent> = all[..25].to_vec();
    for event in &mut stale {
        event.event_id = format!("{}0000", &event.event_id[..32]);
    }
    messages.extend(encode(&stale, &ordered).await);
    write(&ordered, 1, &messages).await;
    let first = format!("{}_a", prefix.replace('-', "_"));
    let counters = project_until_caught_up(&projector_config(&dir, "a", &ordered, &first));
    assert_eq!(
        counters,
        BTreeMap::from([
            ("applied".to_owned(), 600),
            ("duplicate".to_owned(), 40),
            ("stale".to_owned(), 25),
            ("dead_lettered".to_owned(), 0)
        ])
    );
    let expected = resources(&client, &first).await;
    assert_eq!(expected.len(), 200);
    assert_eq!(
        expected.iter().filter(|r| r.contains(" true -")).count(),
        40,
        "every fifth result ends deleted: a tombstone"
    );
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {first}.history")).await,
        600
    );

    // The same stream again, from the start, into the same tables: nothing changes.
    let again = project_until_caught_up(&projector_config(&dir, "again", &ordered, &first));
    assert_eq!(again["applied"], 0);
    assert_eq!(again["duplicate"], 640);
    assert_eq!(again["stale"], 25);
    same_tables(&resources(&client, &first).await, &expected);

    // Three partitions (one resource's versions stay in one), read interleaved.
    let spread = format!("{prefix}.lab.ObservationSpread");
    write(&spread, 3, &encode(&all, &spread).await).await;
    let second = format!("{}_b", prefix.replace('-', "_"));
    let counters = project_until_caught_up(&projector_config(&dir, "b", &spread, &second));
    assert_eq!(counters["applied"], 600);
    same_tables(&resources(&client, &second).await, &expected);

    drop_projections(&client, &[first, second], &dir).await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_the_rest_applied() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirpoison");
    let dir = std::env::temp_dir().join(&prefix);
    let topic = format!("{prefix}.lab.Observation");
    let all = events(50, 1);
    let mut messages = encode(&all, &topic).await;
    messages.insert(20, ("garbage".to_owned(), b"not an event".to_vec()));
    // Well-formed Avro whose resource disagrees with its envelope: another id, a delete
    // that carries a resource, an upsert without one.
    let mut other_id = all[1].clone();
    other_id.resource_id = "result-elsewhere".into();
    let mut delete_with_body = all[2].clone();
    delete_with_body.op = fhir_cdc::canonical::EventOp::Delete;
    let mut upsert_without_body = all[3].clone();
    upsert_without_body.resource = None;
    let disagreeing = encode(&[other_id, delete_with_body, upsert_without_body], &topic).await;
    messages.splice(30..30, disagreeing);
    write(&topic, 1, &messages).await;
    let schema = prefix.replace('-', "_");
    let counters = project_until_caught_up(&projector_config(&dir, "p", &topic, &schema));
    assert_eq!(counters["applied"], 50);
    assert_eq!(counters["dead_lettered"], 4);
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {schema}.resources")).await,
        50
    );
    let letters = crate::connector::read_for(
        &format!("{prefix}.dlq.projector"),
        5,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(letters.len(), 4);
    let letters: Vec<serde_json::Value> = letters
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    for (letter, (offset, reason)) in letters.iter().zip([
        (20, "wire-format"),
        (30, "the resource's id differs from the envelope's"),
        (31, "a delete event carries a resource"),
        (32, "an upsert event carries no resource"),
    ]) {
        assert_eq!(letter["offset"], offset);
        assert_eq!(letter["topic"], topic.as_str());
        assert!(
            letter["reason"].as_str().unwrap().contains(reason),
            "{letter}"
        );
    }
    assert_eq!(letters[0]["value_base64"], "bm90IGFuIGV2ZW50");

    drop_projections(&client, &[schema], &dir).await;
}

/// A registry that answers every request with a 500, as Apicurio does while its storage is
/// down (a fault no real registry can be made to show on demand).
async fn failing_registry() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0; 4096];
                let _ = socket.read(&mut request).await;
                let body = r#"{"error_code":50001,"message":"the storage is unavailable"}"#;
                let response = format!(
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_registry_stops_the_projector_and_dead_letters_nothing() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirregfail");
    let dir = std::env::temp_dir().join(&prefix);
    let topic = format!("{prefix}.lab.Observation");
    write(&topic, 1, &encode(&events(20, 1), &topic).await).await;
    let schema = prefix.replace('-', "_");
    let config = projector_config(&dir, "p", &topic, &schema);
    let good = std::fs::read_to_string(&config).unwrap();
    let failing = dir.join("failing.toml");
    std::fs::write(
        &failing,
        good.replace(
            "${env:FHIR_CDC_SCHEMA_REGISTRY_URL}",
            &failing_registry().await,
        ),
    )
    .unwrap();

    let output = tokio::process::Command::new(stack::fhir_cdc_bin())
        .args(["project", "--until-caught-up", "--config"])
        .arg(&failing)
        .output()
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{log}");
    assert!(log.contains("the schema registry"), "{log}");
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {schema}.history")).await,
        0
    );
    let letters = crate::connector::read_for(
        &format!("{prefix}.dlq.projector"),
        1,
        Duration::from_secs(3),
    )
    .await;
    assert!(letters.is_empty(), "good messages were dead-lettered");

    // The registry is back: everything is applied, from the start.
    let counters = project_until_caught_up(&config);
    assert_eq!((counters["applied"], counters["dead_lettered"]), (20, 0));

    drop_projections(&client, &[schema], &dir).await;
}

/// Start `fhir-cdc <args>` and kill -9 it `after` it has applied more than `past` events to
/// `schema` (a fixed delay found nothing applied in a slow build, everything in a fast
/// one); how many the history then holds.
async fn kill_once_it_applies(
    client: &tokio_postgres::Client,
    config: &Path,
    args: &[&str],
    schema: &str,
    past: i64,
    after: Duration,
) -> i64 {
    let process = crate::connector::spawn(args, config, Stdio::null());
    let applied = format!("SELECT count(*) FROM {schema}.history");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // The projector creates the table: until it has, nothing is applied.
    while client
        .query_one(&applied, &[])
        .await
        .map_or(0, |row| row.get::<_, i64>(0))
        <= past
    {
        assert!(
            std::time::Instant::now() < deadline,
            "`{}` applies nothing",
            args.join(" ")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(after).await;
    crate::connector::crash(process);
    count(client, &applied).await
}

#[tokio::test]
async fn killed_at_random_points_the_projector_ends_with_the_uninterrupted_tables() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhircrashproj");
    let dir = std::env::temp_dir().join(&prefix);
    let topic = format!("{prefix}.lab.Observation");
    let all = events(5_000, 4);
    assert_eq!(all.len(), 20_000);
    write(&topic, 2, &encode(&all, &topic).await).await;

    let calm = format!("{}_calm", prefix.replace('-', "_"));
    project_until_caught_up(&projector_config(&dir, "calm", &topic, &calm));
    let expected = resources(&client, &calm).await;

    let crashed = format!("{}_crashed", prefix.replace('-', "_"));
    let config = projector_config(&dir, "crashed", &topic, &crashed);
    // Kill -9 three times, each a different while after it applies more, then let it finish.
    let mut before_the_end = 0;
    for delay in [0, 150, 60] {
        before_the_end = kill_once_it_applies(
            &client,
            &config,
            &["project"],
            &crashed,
            before_the_end,
            Duration::from_millis(delay),
        )
        .await;
    }
    assert!(
        (1..all.len() as i64).contains(&before_the_end),
        "the kills land mid-stream ({before_the_end} applied)"
    );
    project_until_caught_up(&config);
    same_tables(&resources(&client, &crashed).await, &expected);
    ledger_holds_each_once(&client, &crashed, &all).await;

    // A replay killed midway and started again at once, while the killed one is still a
    // member of the replay group (whose Kafka offsets are then ahead and cannot be reset):
    // the new one still reads from where it was told, and rebuilds everything.
    let replayed = format!("{}_replayed", prefix.replace('-', "_"));
    let config = projector_config(&dir, "replayed", &topic, &replayed);
    let partly = kill_once_it_applies(
        &client,
        &config,
        &["replay", "--from", "earliest"],
        &replayed,
        0,
        Duration::ZERO,
    )
    .await;
    assert!(
        (1..all.len() as i64).contains(&partly),
        "killed midway ({partly})"
    );
    client
        .batch_execute(&format!(
            "TRUNCATE {replayed}.history, {replayed}.resources"
        ))
        .await
        .unwrap();
    let counters = counters_of(&config, &["replay", "--from", "earliest"]);
    assert_eq!(counters["applied"], all.len() as u64);
    same_tables(&resources(&client, &replayed).await, &expected);

    drop_projections(&client, &[calm, crashed, replayed], &dir).await;
}

#[tokio::test]
async fn two_projectors_in_one_group_one_killed_end_with_the_single_process_tables() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirgroup");
    let dir = std::env::temp_dir().join(&prefix);
    let topic = format!("{prefix}.lab.Observation");
    let all = events(1_500, 3);
    write(&topic, 6, &encode(&all, &topic).await).await;

    let single = format!("{}_single", prefix.replace('-', "_"));
    project_until_caught_up(&projector_config(&dir, "single", &topic, &single));
    let expected = resources(&client, &single).await;

    // Two members of one group share the six partitions; one is killed mid-stream and
    // restarted; then both run until the projection holds everything.
    let shared = format!("{}_shared", prefix.replace('-', "_"));
    let config = projector_config(&dir, "shared", &topic, &shared);
    let member = || crate::connector::spawn(&["project"], &config, Stdio::null());
    let steady = member();
    let victim = member();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    crate::connector::crash(victim);
    let _restarted = member();
    project_until_caught_up(&config);
    crate::connector::crash(steady);
    same_tables(&resources(&client, &shared).await, &expected);
    ledger_holds_each_once(&client, &shared, &all).await;

    drop_projections(&client, &[single, shared], &dir).await;
}

/// Messages written with a compatible newer version of the Observation event schema (one
/// more optional element in the resource record), registered under the topic's subject.
async fn encode_evolved(events: &[CanonicalEvent], topic: &str) -> Vec<(String, Vec<u8>)> {
    use schema_registry_converter::{
        async_impl::schema_registry::{post_schema, SrSettings},
        schema_registry_common::{SchemaType, SuppliedSchema},
    };
    let mut schema = fhir_cdc::canonical::schema::event_schema("Observation");
    let resource = schema["fields"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == "resource")
        .unwrap();
    resource["type"][1]["fields"].as_array_mut().unwrap().push(
        serde_json::json!({"name": "evolutionMarker", "type": ["null", "string"], "default": null}),
    );
    let registered = post_schema(
        &SrSettings::new(stack::registry_url()),
        format!("{topic}-value"),
        SuppliedSchema::new(
            Some("fhir_cdc.event.ObservationEvent".into()),
            SchemaType::Avro,
            schema.to_string(),
        ),
    )
    .await
    .unwrap();
    let writer =
        fhir_cdc::canonical::EventWriter::new(&apache_avro::Schema::parse(&schema).unwrap())
            .unwrap();
    events
        .iter()
        .map(|event| {
            let mut bytes = vec![0];
            bytes.extend_from_slice(&registered.id.to_be_bytes());
            writer.write(event, &mut bytes).unwrap();
            (event.key(), bytes)
        })
        .collect()
}

#[tokio::test]
async fn events_of_two_schema_versions_are_both_applied() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirevolve");
    let dir = std::env::temp_dir().join(&prefix);
    let topic = format!("{prefix}.lab.Observation");
    let all = events(100, 2);
    // The first half written with the schema as generated, the rest with its successor.
    let mut messages = encode(&all[..100], &topic).await;
    let evolved = encode_evolved(&all[100..], &topic).await;
    assert_ne!(messages[0].1[1..5], evolved[0].1[1..5], "two schema ids");
    messages.extend(evolved);
    write(&topic, 1, &messages).await;
    let schema = prefix.replace('-', "_");
    let counters = project_until_caught_up(&projector_config(&dir, "e", &topic, &schema));
    assert_eq!(counters["applied"], 200);
    assert_eq!(counters["dead_lettered"], 0);
    // Every resource holds its second version, as written.
    let bodies: BTreeMap<String, serde_json::Value> = client
        .query(
            &format!("SELECT resource_id, body::text FROM {schema}.resources WHERE NOT deleted"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), serde_json::from_str(r.get::<_, &str>(1)).unwrap()))
        .collect();
    for event in &all[100..] {
        if let Some(resource) = &event.resource {
            assert_eq!(
                bodies[&event.resource_id],
                resource.to_json(),
                "{}",
                event.resource_id
            );
        }
    }

    drop_projections(&client, &[schema], &dir).await;
}

#[tokio::test]
async fn a_replay_changes_nothing_over_the_projection_and_rebuilds_an_empty_one() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirreplay");
    let dir = std::env::temp_dir().join(&prefix);
    let topic = format!("{prefix}.lab.Observation");
    let all = events(150, 3);
    write(&topic, 2, &encode(&all, &topic).await).await;
    let projected = format!("{}_projected", prefix.replace('-', "_"));
    let config = projector_config(&dir, "r", &topic, &projected);
    project_until_caught_up(&config);
    let expected = resources(&client, &projected).await;

    // The whole log again over the existing projection: every event a duplicate.
    let again = counters_of(&config, &["replay", "--from", "earliest"]);
    let logged = std::fs::read_to_string(config.with_extension("log")).unwrap();
    assert!(
        logged.contains("started job=replay part=messages expected=450")
            && logged.contains("done job=replay part=messages done=450"),
        "the replay's progress: {logged}"
    );
    assert_eq!(again["applied"], 0);
    assert_eq!(again["duplicate"], all.len() as u64);
    same_tables(&resources(&client, &projected).await, &expected);
    // Twice is the same as once.
    assert_eq!(
        counters_of(&config, &["replay", "--from", "earliest"])["duplicate"],
        all.len() as u64
    );

    // Into an empty projection: rebuilt exactly.
    let rebuilt = format!("{}_rebuilt", prefix.replace('-', "_"));
    let counters = counters_of(
        &projector_config(&dir, "rebuild", &topic, &rebuilt),
        &["replay", "--from", "earliest"],
    );
    assert_eq!(counters["applied"], all.len() as u64);
    same_tables(&resources(&client, &rebuilt).await, &expected);

    // From offsets: partition 0 from its tenth message, partition 1 not at all. Within a
    // partition a resource's versions come in order, so every one of them applies.
    let partial = format!("{}_partial", prefix.replace('-', "_"));
    let counters = counters_of(
        &projector_config(&dir, "partial", &topic, &partial),
        &["replay", "--from", &format!("{topic}:0:10")],
    );
    let in_partition_0 = count(
        &client,
        &format!("SELECT count(*) FROM {projected}.history WHERE kafka_partition = 0 AND kafka_offset >= 10"),
    )
    .await;
    assert!(in_partition_0 > 0);
    assert_eq!(counters["applied"], in_partition_0 as u64);
    for (args, refusal) in [
        (
            vec!["--from", "earliest", "--topics", "no.such.topic"],
            "topic `no.such.topic` does not exist",
        ),
        (
            vec!["--from", &format!("{topic}:7:0")],
            "is not a partition of the topics replayed",
        ),
    ] {
        let output = Command::new(stack::fhir_cdc_bin())
            .arg("replay")
            .args(&args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(refusal),
            "{stderr}"
        );
    }

    // From a time after the log: nothing to replay.
    let later = counters_of(&config, &["replay", "--from", "2999-01-01T00:00:00Z"]);
    assert_eq!(later["applied"] + later["duplicate"], 0);

    drop_projections(&client, &[projected, rebuilt, partial], &dir).await;
}

#[tokio::test]
async fn tail_reports_an_undecodable_message_with_its_place_and_goes_on() {
    let prefix = stack::unique("fhirtail");
    let dir = std::env::temp_dir().join(&prefix);
    let topic = format!("{prefix}.lab.Observation");
    let all = events(3, 1);
    let mut messages = encode(&all, &topic).await;
    messages.insert(1, ("garbage".to_owned(), b"not an event".to_vec()));
    write(&topic, 1, &messages).await;
    // A connector config: tail reads its [kafka], [schema_registry] and topic prefix.
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tail.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "tail-it"
[source]
kind = "postgres"
url = "${{env:FHIR_CDC_PG_URL}}"
[kafka]
bootstrap.servers = "${{env:FHIR_CDC_KAFKA_BOOTSTRAP}}"
[schema_registry]
url = "${{env:FHIR_CDC_SCHEMA_REGISTRY_URL}}"
[topics]
prefix = "{prefix}"
"#
        ),
    )
    .unwrap();
    let output = Command::new(stack::fhir_cdc_bin())
        .args([
            "tail",
            "--from-beginning",
            "--to-end",
            "--topic",
            &topic,
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{topic}[0]@1: not a canonical event")),
        "{stderr}"
    );
    let ids: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["resource_id"].to_string())
        .collect();
    assert_eq!(
        ids,
        ["\"result-1\"", "\"result-2\"", "\"result-3\""],
        "the others all printed"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn the_metrics_count_per_topic_the_lag_comes_down_to_zero_and_the_projector_is_ready() {
    let client = stack::pg_client().await;
    let prefix = stack::unique("fhirprojm");
    let dir = std::env::temp_dir().join(&prefix);
    let (a, b) = (
        format!("{prefix}.lab.Observation"),
        format!("{prefix}.lab.ObservationB"),
    );
    // a: results 1–40 in two versions, the first ten events again, one poison message;
    // b (two partitions): results 41–60, one version.
    let mut messages = encode(&events(40, 2), &a).await;
    let repeats: Vec<_> = messages[..10].to_vec();
    messages.extend(repeats);
    messages.push(("garbage".to_owned(), b"not an event".to_vec()));
    write(&a, 1, &messages).await;
    write(&b, 2, &encode(&events(60, 1)[40..], &b).await).await;

    let schema = prefix.replace('-', "_");
    let config = projector_config(&dir, "m", &a, &schema);
    let port = crate::connector::free_port();
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("include = [\"{a}\"]"),
        &format!("include = [\"{a}\", \"{b}\"]"),
    ) + &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(dir.join("m.log")).unwrap();
    let projector = crate::connector::spawn(&["project"], &config, log.into());

    let topic = |name: &str, topic: &str| format!("{name}{{projector=\"m\",topic=\"{topic}\"}}");
    let expected = [
        (topic("fhir_cdc_projector_events_consumed_total", &a), 91.0),
        (topic("fhir_cdc_projector_events_applied_total", &a), 80.0),
        (topic("fhir_cdc_projector_events_duplicate_total", &a), 10.0),
        (topic("fhir_cdc_projector_events_stale_total", &a), 0.0),
        (topic("fhir_cdc_projector_dead_letters_total", &a), 1.0),
        (topic("fhir_cdc_projector_events_consumed_total", &b), 20.0),
        (topic("fhir_cdc_projector_events_applied_total", &b), 20.0),
        (
            "fhir_cdc_projector_batch_events_sum{projector=\"m\"}".to_owned(),
            111.0,
        ),
        (
            "fhir_cdc_projector_apply_latency_seconds_count{projector=\"m\"}".to_owned(),
            111.0,
        ),
    ];
    let lags = [(&a, 0), (&b, 0), (&b, 1)].map(|(topic, partition)| {
        format!("fhir_cdc_projector_consumer_lag_messages{{projector=\"m\",topic=\"{topic}\",partition=\"{partition}\"}}")
    });
    // Polled: the lag comes with librdkafka's statistics, every 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        // Nothing listens until the projector has started.
        let samples = if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            crate::connector::scrape(port)
        } else {
            Default::default()
        };
        let got: Vec<Option<f64>> = expected
            .iter()
            .map(|(name, _)| samples.get(name).copied())
            .collect();
        let lag: Vec<Option<f64>> = lags.iter().map(|name| samples.get(name).copied()).collect();
        if got == expected.iter().map(|(_, v)| Some(*v)).collect::<Vec<_>>()
            && lag == [Some(0.0); 3]
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics {got:?}, lag {lag:?}; expected {expected:?}, lag 0"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Beside the metrics, the health probes: started, live, and ready once caught up.
    let get = |path| crate::connector::http_get(port, path).unwrap();
    assert_eq!(get("/health/started").0, 200);
    assert_eq!(get("/health/live").0, 200);
    let (status, body) = get("/health/ready");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["components"]["kafka"], "up", "{ready}");
    assert!(crate::connector::stop(projector).success());
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {schema}.resources")).await,
        60
    );
    drop_projections(&client, &[schema], &dir).await;
}

#[tokio::test]
async fn an_event_another_projector_records_meanwhile_refuses_the_batch_and_is_a_duplicate_alone() {
    use fhir_cdc::consumer::{
        events::{self, Coordinates, Entry, Prepared},
        projection,
    };
    let client = stack::pg_client().await;
    let schema = stack::unique("fhirprojrace").replace('-', "_");
    let connect = || async {
        let (mut db, connection) = tokio_postgres::connect(&stack::pg_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        projection::migrate(&mut db, &schema).await.unwrap();
        let statements = projection::prepare(&db, &schema).await.unwrap();
        (db, statements)
    };
    let ((mut first, first_statements), (mut second, second_statements)) =
        (connect().await, connect().await);
    let prepared: Vec<Prepared> = events(3, 1).into_iter().map(Prepared::new).collect();
    let at: Vec<Coordinates> = (0..3)
        .map(|offset| Coordinates {
            topic: "t".to_owned(),
            partition: 0,
            offset,
        })
        .collect();
    let entries: Vec<Entry<'_>> = prepared
        .iter()
        .zip(&at)
        .map(|(event, at)| Entry {
            event,
            at,
            kafka_timestamp: None,
        })
        .collect();

    // The first projector records the middle event and has not committed yet when the
    // second applies all three in one statement: the second waits on the ledger's key.
    let first_tx = first.transaction().await.unwrap();
    projection::apply(&first_tx, &first_statements.batch, &entries[1..2])
        .await
        .unwrap();
    let second_tx = second.transaction().await.unwrap();
    let batch = projection::apply(&second_tx, &second_statements.batch, &entries);
    let committed = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        first_tx.commit().await.unwrap();
    };
    let (refused, ()) = tokio::join!(batch, committed);
    let refused = refused.expect_err("a batch holding an event recorded meanwhile is refused");
    assert_eq!(refused.code().map(|c| c.code()), Some("23505"), "{refused}");
    second_tx.rollback().await.unwrap();

    // Event by event, the ledger sees the other's commit: a duplicate, the rest applied.
    let tx = second.transaction().await.unwrap();
    let mut counts = events::Counts::default();
    for entry in &entries {
        let one = projection::apply(&tx, &second_statements.one, &[*entry])
            .await
            .unwrap();
        counts += events::total(&one);
    }
    tx.commit().await.unwrap();
    assert_eq!((counts.applied, counts.duplicate, counts.stale), (2, 1, 0));
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {schema}.history")).await,
        3
    );
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
