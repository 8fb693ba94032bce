//! A `fhir-cdc run` process under test, and reading what it wrote to Kafka.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    ClientConfig, Message, Offset, TopicPartitionList,
};

use crate::stack;

/// A running connector; killed if the test fails before stopping it, so that no
/// connector (and no walsender) outlives its test.
#[derive(Debug)]
pub struct Connector(Option<Child>);

impl Drop for Connector {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `fhir-cdc run --config config`, its log (stderr) appended to `log`.
pub fn start(config: &Path, log: &Path) -> Connector {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    spawn(&["run"], config, log.into())
}

/// `fhir-cdc <args> --config config` in the background, its stderr to `stderr`.
pub fn spawn(args: &[&str], config: &Path, stderr: Stdio) -> Connector {
    Connector(Some(
        Command::new(stack::fhir_cdc_bin())
            .args(args)
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    ))
}

impl Connector {
    /// Whether the process is still running (it has not exited, for whatever reason).
    pub fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|child| child.try_wait().unwrap().is_none())
    }
}

/// SIGTERM, then the exit status (within 30 s).
pub fn stop(connector: Connector) -> std::process::ExitStatus {
    signal(connector, "-TERM", Duration::from_secs(30))
}

/// SIGKILL: a crash at whatever point the connector was.
pub fn crash(connector: Connector) {
    signal(connector, "-KILL", Duration::from_secs(10));
}

fn signal(connector: Connector, signal: &str, within: Duration) -> std::process::ExitStatus {
    let id = connector.0.as_ref().expect("a running connector").id();
    Command::new("kill")
        .args([signal, &id.to_string()])
        .status()
        .unwrap();
    exit_within(connector, within, &format!("of {signal}"))
}

/// The exit status of a connector that must stop by itself within `within` (`after` says
/// of what, for the failure message).
pub fn exit_within(
    mut connector: Connector,
    within: Duration,
    after: &str,
) -> std::process::ExitStatus {
    let mut child = connector.0.take().expect("a running connector");
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the connector did not stop within {within:?} {after}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Repeats are exact: one event id is one resource version, with one content.
pub fn assert_repeats_are_exact(events: &[fhir_cdc::canonical::CanonicalEvent]) {
    let mut seen: HashMap<&str, &fhir_cdc::canonical::CanonicalEvent> = HashMap::new();
    let mut versions: HashMap<(&str, &str), &str> = HashMap::new();
    for event in events {
        if let Some(first) = seen.insert(&event.event_id, event) {
            assert_eq!(
                first.resource_version, event.resource_version,
                "{}",
                event.event_id
            );
            assert_eq!(
                first.resource.as_ref().map(|r| r.to_json()),
                event.resource.as_ref().map(|r| r.to_json()),
                "{}",
                event.event_id
            );
        }
        let id = versions
            .entry((&event.resource_id, &event.resource_version))
            .or_insert(&event.event_id);
        assert_eq!(*id, event.event_id, "two event ids for one version");
    }
}

/// Every event of partition 0 of `topic`, decoded through the stack's registry — asked
/// again for a minute while it fails transiently (it keeps its schemas in the stack's
/// PostgreSQL, which a fault test restarts).
pub async fn events_of(topic: &str) -> Vec<fhir_cdc::canonical::CanonicalEvent> {
    let codec = stack::codec();
    let mut events = Vec::new();
    for bytes in read_for(topic, usize::MAX, Duration::from_secs(3)).await {
        let deadline = Instant::now() + Duration::from_secs(60);
        let event = loop {
            match codec.decode(&bytes).await {
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                decoded => break decoded.unwrap(),
            }
        };
        events.push(event);
    }
    events
}

/// Each resource's latest state among `events`: resource id → the value at `pointer` (a
/// JSON pointer, `/valueQuantity/value`) in its highest version, as JSON text.
pub fn latest_values(
    events: &[fhir_cdc::canonical::CanonicalEvent],
    pointer: &str,
) -> std::collections::BTreeMap<String, String> {
    let mut latest: std::collections::BTreeMap<&str, &fhir_cdc::canonical::CanonicalEvent> =
        std::collections::BTreeMap::new();
    for event in events {
        let entry = latest.entry(&event.resource_id).or_insert(event);
        if event.resource_version > entry.resource_version {
            *entry = event;
        }
    }
    latest
        .into_iter()
        .map(|(id, event)| {
            let resource = event
                .resource
                .as_ref()
                .expect("a resource is never deleted here")
                .to_json();
            let value = resource
                .pointer(pointer)
                .unwrap_or(&serde_json::Value::Null);
            (id.to_owned(), value.to_string())
        })
        .collect()
}

/// Every event the connector of `config` wrote, read by `fhir-cdc tail --from-beginning
/// --to-end` (decoded through the registry), one JSON object each.
pub fn tail_everything(config: &Path) -> Vec<serde_json::Value> {
    let tail = stack::fhir_cdc(&[
        "tail",
        "--config",
        config.to_str().unwrap(),
        "--from-beginning",
        "--to-end",
    ]);
    assert!(
        tail.status.success(),
        "{}",
        String::from_utf8_lossy(&tail.stderr)
    );
    String::from_utf8(tail.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every message of partition 0 of `topic`, read until `count` arrived or `wait` passed.
pub async fn read_for(topic: &str, count: usize, wait: Duration) -> Vec<Vec<u8>> {
    read_whole(topic, count, wait)
        .await
        .into_iter()
        .map(|m| m.payload)
        .collect()
}

/// A message as Kafka holds it.
#[derive(Debug)]
pub struct RawMessage {
    pub key: Vec<u8>,
    /// Each header's name and value.
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
}

/// A consumer of partition 0 of `topic` from its beginning, at `isolation`
/// (`read_committed`, librdkafka's default, or `read_uncommitted`), committing nothing.
pub fn partition_reader(topic: &str, isolation: &str) -> StreamConsumer {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack::kafka_bootstrap())
        .set("group.id", stack::unique("run-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    consumer
}

/// [`read_for`], keys and headers included.
pub async fn read_whole(topic: &str, count: usize, wait: Duration) -> Vec<RawMessage> {
    use rdkafka::message::Headers;
    let consumer = partition_reader(topic, "read_committed");
    let mut messages = Vec::new();
    let deadline = Instant::now() + wait;
    while messages.len() < count && Instant::now() < deadline {
        if let Ok(Ok(message)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
        {
            let headers = message.headers().map_or_else(Vec::new, |headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            });
            messages.push(RawMessage {
                key: message.key().unwrap_or_default().to_vec(),
                headers,
                payload: message.payload().unwrap_or_default().to_vec(),
            });
        }
    }
    messages
}

/// Wait (up to `within`) until the connector's slot has confirmed `lsn`: everything up to
/// it is in Kafka.
pub async fn await_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
    lsn: &str,
    within: Duration,
    log: &Path,
) {
    let target: fhir_cdc::change::PgLsn = lsn.parse().unwrap();
    let deadline = Instant::now() + within;
    loop {
        let confirmed: Option<String> = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .and_then(|row| row.get(0));
        if confirmed
            .as_deref()
            .is_some_and(|c| c.parse::<fhir_cdc::change::PgLsn>().unwrap() >= target)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "slot {slot} did not confirm {lsn} within {within:?} (at {confirmed:?}); log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The current WAL position.
pub async fn current_lsn(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// How many messages partition 0 of `topic` holds (its high watermark); 0 when it does not
/// exist yet.
pub fn messages_in(topic: &str) -> i64 {
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack::kafka_bootstrap())
        .create()
        .unwrap();
    consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(5))
        .map_or(0, |(_, high)| high)
}

/// A port nothing listens on (just now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The samples of a Prometheus endpoint, `name{labels}` → value.
pub fn scrape(port: u16) -> HashMap<String, f64> {
    try_scrape(port).unwrap_or_else(|e| panic!("nothing serves metrics on {port}: {e}"))
}

/// `GET path` on 127.0.0.1:`port`: the status and the body, or why nothing answered.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// As [`scrape`], or why the endpoint could not be reached (the process gone).
pub fn try_scrape(port: u16) -> std::io::Result<HashMap<String, f64>> {
    let (status, body) = http_get(port, "/metrics")?;
    assert_eq!(status, 200, "{body}");
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// Wait (up to 30 s) until a connector streams from `slot`: from then on, new changes
/// arrive by the stream, not the snapshot.
pub async fn await_streaming(client: &tokio_postgres::Client, slot: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&slot],
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait (up to 30 s) until the connector of `config` has stored a state whose snapshot of
/// every mapped table is complete: from then on, a restart reads no table again.
pub async fn await_snapshotted(config: &Path, log: &Path) {
    let config = fhir_cdc::config::ConnectorConfig::load(config).unwrap();
    let store = fhir_cdc::offsets::StateStore::of(&config).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = store.load().await.unwrap();
        if state
            .as_ref()
            .is_some_and(|s| !s.tables.is_empty() && s.tables.values().all(|t| t.complete))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no complete snapshot stored ({state:?}); log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait (up to `within`) until the connector has confirmed everything written so far.
pub async fn await_caught_up(
    client: &tokio_postgres::Client,
    slot: &str,
    within: Duration,
    log: &Path,
) {
    await_confirmed(client, slot, &current_lsn(client).await, within, log).await;
}

/// Wait (up to `within`) until the connector has everything written so far in Kafka and
/// acknowledged, then stop it with SIGTERM; it must exit 0.
pub async fn drain(
    client: &tokio_postgres::Client,
    slot: &str,
    connector: Connector,
    within: Duration,
    log: &Path,
) {
    await_caught_up(client, slot, within, log).await;
    assert!(
        stop(connector).success(),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// A connector capturing `<schema>.lab_result` (the sample lab tables, created by the
/// caller) through the sample result mapping, into topics under a fresh prefix.
#[derive(Debug)]
pub struct ResultCapture {
    /// The connector's directory: its config, `mappings/`, `run.log`.
    pub dir: PathBuf,
    pub prefix: String,
    pub config: PathBuf,
    pub slot: String,
    pub log: PathBuf,
}

/// Start a [`ResultCapture`] of `schema` and wait until it streams: every change from now
/// on arrives through the replication stream.
pub async fn capture_results(
    client: &tokio_postgres::Client,
    schema: &str,
    prefix: &str,
) -> (ResultCapture, Connector) {
    let dir = std::env::temp_dir().join(schema);
    stack::lab_mappings(&dir.join("mappings"), schema, &["result.yaml"]);
    let prefix = stack::unique(prefix);
    let capture = ResultCapture {
        config: stack::connector_config(&dir, schema, &prefix, ""),
        slot: format!("fhir_cdc_{schema}"),
        log: dir.join("run.log"),
        dir,
        prefix,
    };
    let connector = start(&capture.config, &capture.log);
    await_caught_up(client, &capture.slot, Duration::from_secs(30), &capture.log).await;
    (capture, connector)
}

/// Wait (up to `within`) until the MySQL connector of `config` has stored a position at or
/// after the end of the stack MariaDB's binary log now: everything written so far is in
/// Kafka.
pub async fn await_binlog_stored(config: &Path, within: Duration, log: &Path) {
    let mut conn = stack::mysql_conn().await;
    let (end, _) = fhir_cdc::source::mysql::current_position(&mut conn)
        .await
        .unwrap();
    let config = fhir_cdc::config::ConnectorConfig::load(config).unwrap();
    let store = fhir_cdc::offsets::StateStore::of(&config).await.unwrap();
    let deadline = Instant::now() + within;
    loop {
        let stored = store.load().await.unwrap().and_then(|s| s.position);
        if stored
            .as_deref()
            .and_then(|p| fhir_cdc::source::mysql::capture::parse_position(p).ok())
            .is_some_and(|(position, _)| position >= end)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the connector stored {stored:?}, not yet {end}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
