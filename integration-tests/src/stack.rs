//! Where the stack is, and small helpers shared by the tests.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// A stack address from the environment, or a panic that says how to get one.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the stack with integration-tests/stack/up and \
             `source integration-tests/stack/env`, or run `make test`"
        )
    })
}

pub fn pg_url() -> String {
    env("FHIR_CDC_PG_URL")
}

pub fn mysql_url() -> String {
    env("FHIR_CDC_MYSQL_URL")
}

pub fn kafka_bootstrap() -> String {
    env("FHIR_CDC_KAFKA_BOOTSTRAP")
}

pub fn registry_url() -> String {
    env("FHIR_CDC_SCHEMA_REGISTRY_URL")
}

/// A name no other test run has used: tests share one long-lived stack.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `fhir-cdc ARGS`, run to its end.
pub fn fhir_cdc(args: &[&str]) -> std::process::Output {
    std::process::Command::new(fhir_cdc_bin())
        .args(args)
        .output()
        .unwrap()
}

/// `fhir-cdc snapshot --config config <args>`: its exit code and stderr.
pub fn snapshot(config: &Path, args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(fhir_cdc_bin())
        .arg("snapshot")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// What `fhir-cdc check --config config` prints on its standard output.
pub fn check_said(config: &Path) -> String {
    let output = fhir_cdc(&["check", "--config", config.to_str().unwrap()]);
    String::from_utf8(output.stdout).unwrap()
}

/// The `fhir-cdc` binary of this build (`make test` builds it first), or `FHIR_CDC_BIN`.
pub fn fhir_cdc_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("FHIR_CDC_BIN") {
        return bin.into();
    }
    // target/<profile>/deps/it-<hash> → target/<profile>/fhir-cdc
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("fhir-cdc");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bin fhir-cdc` first (make test does)",
        bin.display()
    );
    bin
}

/// The Python of the independent oracles' virtualenv (`integration-tests/oracles/setup`).
pub fn oracle_python() -> PathBuf {
    if let Ok(python) = std::env::var("FHIR_CDC_ORACLE_PYTHON") {
        return python.into();
    }
    let state = std::env::var("FHIR_CDC_STACK_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("integration-tests/stack/state"));
    let python = state.join("oracles/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run integration-tests/oracles/setup (make test does)",
        python.display()
    );
    python
}

/// Run an oracle script of `integration-tests/oracles/` with `args`, then the path of a
/// temporary file holding `lines`; its output, one JSON value per line.
pub fn run_oracle(script: &str, args: &[&str], lines: &[String]) -> Vec<serde_json::Value> {
    let file = std::env::temp_dir().join(unique("oracle_input"));
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let output = std::process::Command::new(oracle_python())
        .arg(repo_root().join("integration-tests/oracles").join(script))
        .args(args)
        .arg(&file)
        .output()
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        results.len(),
        lines.len(),
        "{script} answered {} of {} lines",
        results.len(),
        lines.len()
    );
    results
}

/// The independent oracles judge `events` (as `fhir-cdc tail` prints them, with their
/// Kafka coordinates): Confluent's own Python client reads the same messages from Kafka,
/// through the registry, with its Avro deserializer, and finds what fhir-cdc found; both
/// FHIR validators accept every resource.
pub fn assert_oracles_accept(events: &[serde_json::Value]) {
    let by_id: std::collections::HashMap<&str, &serde_json::Value> = events
        .iter()
        .map(|e| (e["event_id"].as_str().unwrap(), e))
        .collect();
    let coordinates: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["topic"].as_str().unwrap(),
                e["partition"],
                e["offset"]
            )
        })
        .collect();
    for python in run_oracle(
        "confluent_consume.py",
        &[&kafka_bootstrap(), &registry_url()],
        &coordinates,
    ) {
        let event = &python["event"];
        let ours = by_id[event["event_id"].as_str().unwrap()];
        for field in [
            "resource_type",
            "resource_id",
            "resource_version",
            "op",
            "resource",
        ] {
            assert_eq!(
                event[field], ours[field],
                "confluent-kafka read {field} of {} differently",
                event["event_id"]
            );
        }
        assert_eq!(
            event["provenance"]["primary_key"],
            ours["provenance"]["primary_key"]
        );
    }
    let resources: Vec<String> = events
        .iter()
        .filter(|e| !e["resource"].is_null())
        .map(|e| serde_json::to_string(&e["resource"]).unwrap())
        .collect();
    let invalid: Vec<String> = run_oracle("fhir_validate.py", &[], &resources)
        .into_iter()
        .zip(events.iter().filter(|e| !e["resource"].is_null()))
        .filter(|(r, _)| !r["fhirkit"].as_array().unwrap().is_empty() || !r["google"].is_null())
        .map(|(r, e)| format!("{}/{}: {r}", e["resource_type"], e["resource_id"]))
        .collect();
    assert!(
        invalid.is_empty(),
        "invalid resources:\n{}",
        invalid.join("\n")
    );
}

/// The events of every golden file (`tests/golden/*.expected.json`), with the file's name.
pub fn golden_events() -> Vec<(String, serde_json::Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_root().join("tests/golden"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".expected.json"))
        .collect();
    files.sort();
    let mut events = Vec::new();
    for path in files {
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        events.extend(
            expected["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (name.clone(), e.clone())),
        );
    }
    events
}

/// Drop a test's replication slot (retrying while its walsender lets go), publication and
/// schema.
pub async fn drop_capture(
    client: &tokio_postgres::Client,
    slot: &str,
    publication: &str,
    schema: &str,
) {
    for _ in 0..50 {
        if client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {publication}; DROP SCHEMA {schema} CASCADE;"
        ))
        .await
        .unwrap();
}

/// Create a pgoutput slot; its start position.
pub async fn create_slot(client: &tokio_postgres::Client, slot: &str) -> String {
    client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

/// The sample lab tables (`mappings/lab/schema.sql`, which gives them REPLICA IDENTITY
/// FULL as the sample connector expects) in a schema of their own.
pub async fn create_lab_schema(client: &tokio_postgres::Client, schema: &str) {
    let ddl = std::fs::read_to_string(repo_root().join("mappings/lab/schema.sql"))
        .unwrap()
        .replace(
            "CREATE SCHEMA IF NOT EXISTS lis;",
            &format!("CREATE SCHEMA {schema};"),
        )
        .replace("lis.", &format!("{schema}."));
    client.batch_execute(&ddl).await.unwrap();
}

/// The sample lab tables in a schema of their own (named from `name`), with the patient and
/// result mappings in `<temp>/<schema>/mappings` and patients `sensitivity: restricted`.
/// Returns the schema and its directory.
pub async fn lab_with_restricted_patients(
    client: &tokio_postgres::Client,
    name: &str,
) -> (String, PathBuf) {
    let schema = unique(name);
    create_lab_schema(client, &schema).await;
    let dir = std::env::temp_dir().join(&schema);
    let mappings = dir.join("mappings");
    lab_mappings(&mappings, &schema, &["patient.yaml", "result.yaml"]);
    let patient = std::fs::read_to_string(mappings.join("patient.yaml"))
        .unwrap()
        .replace("domain: lab\n", "domain: lab\nsensitivity: restricted\n");
    std::fs::write(mappings.join("patient.yaml"), patient).unwrap();
    (schema, dir)
}

/// The first column of what `sql` returns, as text.
pub async fn texts(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The sample lab mappings named in `files` (with the code tables they read), copied to
/// `dir` and pointed at the tables in `schema`.
pub fn lab_mappings(dir: &Path, schema: &str, files: &[&str]) {
    let lab = repo_root().join("mappings/lab");
    std::fs::create_dir_all(dir).unwrap();
    for file in files {
        let text = std::fs::read_to_string(lab.join(file))
            .unwrap()
            .replace("table: lis.", &format!("table: {schema}."));
        std::fs::write(dir.join(file), text).unwrap();
    }
    std::fs::copy(lab.join("tests.codes.yaml"), dir.join("tests.codes.yaml")).unwrap();
}

/// A connector config in `dir` (connector `name`, topics under `prefix`, mappings in
/// `dir/mappings`) against the stack's PostgreSQL, with `extra` (more tables) appended.
pub fn connector_config(dir: &Path, name: &str, prefix: &str, extra: &str) -> PathBuf {
    config_with_source(
        dir,
        name,
        prefix,
        "postgres",
        "FHIR_CDC_PG_URL",
        HEARTBEAT,
        extra,
    )
}

/// As [`connector_config`], against the stack's MariaDB.
pub fn mysql_connector_config(dir: &Path, name: &str, prefix: &str) -> PathBuf {
    config_with_source(
        dir,
        name,
        prefix,
        "mysql",
        "FHIR_CDC_MYSQL_URL",
        HEARTBEAT,
        "",
    )
}

/// As [`connector_config`], against the SQL Server `MSSQL_URL` names, polling every 200 ms.
pub fn sqlserver_connector_config(dir: &Path, name: &str, prefix: &str) -> PathBuf {
    config_with_source(
        dir,
        name,
        prefix,
        "sqlserver",
        "MSSQL_URL",
        "poll.interval.ms = 200",
        "",
    )
}

/// The heartbeat of PostgreSQL and MySQL test connectors (what [`add_source_setting`]
/// writes after).
const HEARTBEAT: &str = "heartbeat.interval.ms = 500";

fn config_with_source(
    dir: &Path,
    name: &str,
    prefix: &str,
    kind: &str,
    url: &str,
    setting: &str,
    extra: &str,
) -> PathBuf {
    let config = dir.join("connector.toml");
    std::fs::write(
        &config,
        format!(
            r#"name = "{name}"
[source]
kind = "{kind}"
url = "${{env:{url}}}"
{setting}
[kafka]
bootstrap.servers = "${{env:FHIR_CDC_KAFKA_BOOTSTRAP}}"
[schema_registry]
url = "${{env:FHIR_CDC_SCHEMA_REGISTRY_URL}}"
[mappings]
path = "mappings"
token_key = "${{env:FHIR_CDC_TOKEN_KEY}}"
[topics]
prefix = "{prefix}"
{extra}
"#
        ),
    )
    .unwrap();
    config
}

/// The sample billing tables (`mappings/billing/schema.sql`) as `<prefix>_charge` and
/// `<prefix>_claim` in the stack's MariaDB database, and their mappings in `dir`, pointed
/// at them. Returns the database's name.
pub async fn billing_tables(conn: &mut mysql_async::Conn, prefix: &str, dir: &Path) -> String {
    use mysql_async::prelude::Queryable;
    let database: String = conn
        .query_first("SELECT DATABASE()")
        .await
        .unwrap()
        .unwrap();
    let ddl = std::fs::read_to_string(repo_root().join("mappings/billing/schema.sql"))
        .unwrap()
        .replace("CREATE DATABASE IF NOT EXISTS billing;", "")
        .replace("billing.charge", &format!("{database}.{prefix}_charge"))
        .replace("billing.claim", &format!("{database}.{prefix}_claim"))
        .replace(
            "billing.fhir_cdc_signal",
            &format!("{database}.{prefix}_signal"),
        );
    for statement in ddl.split(';').filter(|s| s.contains("CREATE")) {
        conn.query_drop(statement).await.unwrap();
    }
    std::fs::create_dir_all(dir).unwrap();
    for table in ["charge", "claim"] {
        let text =
            std::fs::read_to_string(repo_root().join(format!("mappings/billing/{table}.yaml")))
                .unwrap()
                .replace(
                    &format!("table: billing.{table}"),
                    &format!("table: {database}.{prefix}_{table}"),
                );
        std::fs::write(dir.join(format!("{table}.yaml")), text).unwrap();
    }
    database
}

/// Every charge of the billing table `charge` as its ChargeItem's id → its amount as the
/// database has it now.
pub async fn charge_amounts(
    conn: &mut mysql_async::Conn,
    charge: &str,
) -> std::collections::BTreeMap<String, String> {
    use mysql_async::prelude::Queryable;
    conn.query::<(u64, String), _>(format!(
        "SELECT charge_id, CAST(amount AS CHAR) FROM {charge}"
    ))
    .await
    .unwrap()
    .into_iter()
    .map(|(id, amount)| (format!("charge-{id}"), amount))
    .collect()
}

/// The `[kafka]` properties of the stack's broker.
pub fn kafka_properties() -> fhir_cdc::config::KafkaProperties {
    toml::from_str(&format!(
        "\"bootstrap.servers\" = \"{}\"",
        kafka_bootstrap()
    ))
    .unwrap()
}

/// A client of the stack's MariaDB.
pub async fn mysql_conn() -> mysql_async::Conn {
    mysql_async::Conn::new(mysql_async::Opts::from_url(&mysql_url()).unwrap())
        .await
        .unwrap()
}

/// `sql` run by MariaDB's root over the stack's socket (what the connector's user may not:
/// FLUSH and PURGE BINARY LOGS, other databases).
pub fn mariadb_root(sql: &str) {
    use std::io::Write;
    let socket = repo_root().join("integration-tests/stack/state/mariadb/run/mysqld.sock");
    let mut client = std::process::Command::new("mariadb")
        .args(["--no-defaults", "-uroot"])
        .arg(format!("--socket={}", socket.display()))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    client
        .stdin
        .take()
        .unwrap()
        .write_all(sql.as_bytes())
        .unwrap();
    assert!(
        client.wait().unwrap().success(),
        "mariadb failed on {}",
        sql.chars().take(200).collect::<String>()
    );
}

/// `rows` lab results (value 90, status F) in `table`, ids from the sequence.
pub async fn insert_results(client: &tokio_postgres::Client, table: &str, rows: i64) {
    client
        .batch_execute(&format!(
            "INSERT INTO {table} (accession_no, mrn, test_code, value_numeric, units, result_status, collected_at)
             SELECT 'A24-' || i, 'M000001', 'GLU', 90, 'mg/dL', 'F', '2024-03-05 14:30:00'
               FROM generate_series(1, {rows}) AS i"
        ))
        .await
        .unwrap();
}

/// Each lab result of `table` as its Observation's id → `value_numeric` as text.
pub async fn result_values(
    client: &tokio_postgres::Client,
    table: &str,
) -> std::collections::BTreeMap<String, String> {
    client
        .query(
            &format!("SELECT result_id, value_numeric::text FROM {table}"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (format!("result-{}", r.get::<_, i32>(0)), r.get(1)))
        .collect()
}

/// Add `setting` (a `[source]` line such as `snapshot.chunk.size = 500`) to the connector
/// config `connector_config` wrote.
pub fn add_source_setting(config: &Path, setting: &str) {
    let text = std::fs::read_to_string(config).unwrap().replacen(
        "[kafka]",
        &format!("{setting}\n[kafka]"),
        1,
    );
    assert!(text.contains(setting), "{text}");
    std::fs::write(config, text).unwrap();
}

/// A client of the stack's PostgreSQL (its connection driven in the background).
pub async fn pg_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// An event codec against the stack's registry.
pub fn codec() -> fhir_cdc::canonical::registry::EventCodec {
    fhir_cdc::canonical::registry::EventCodec::new(
        &toml::from_str(&format!("url = \"{}\"", registry_url())).unwrap(),
    )
    .unwrap()
}
