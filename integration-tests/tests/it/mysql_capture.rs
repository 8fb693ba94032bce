//! `fhir-cdc run` on the stack's MariaDB, with the sample billing mappings: a snapshot
//! taken while writes run loses no row and leaves no stale one, and a connector killed in
//! the middle of a 2,000-row transaction and in the middle of a stream of changes delivers
//! every change after its restart — repeats only as the same events. `fhir-cdc snapshot`
//! reads a table again (or some rows) through the signal table while writes run, and a
//! dead letter that holds no row is replayed by reading its row again at the source.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use integration_tests::connector::{
    assert_repeats_are_exact, await_binlog_stored, await_snapshotted, crash, events_of,
    latest_values, messages_in, read_for, start, stop,
};
use mysql_async::{prelude::Queryable, Conn};

use crate::stack::{self, snapshot};

/// A billing database and a connector reading it.
struct Billing {
    conn: Conn,
    charge: String,
    /// The signal table `billing_tables` made (not yet named in the configuration).
    signal: String,
    config: PathBuf,
    log: PathBuf,
    topic: String,
    dlq: String,
}

async fn billing(name: &str) -> Billing {
    let name = stack::unique(name);
    let dir = std::env::temp_dir().join(&name);
    let mut conn = stack::mysql_conn().await;
    let database = stack::billing_tables(&mut conn, &name, &dir.join("mappings")).await;
    let prefix = stack::unique("fhirmy");
    let config = stack::mysql_connector_config(&dir, &name, &prefix);
    Billing {
        conn,
        charge: format!("{database}.{name}_charge"),
        signal: format!("{database}.{name}_signal"),
        log: dir.join("run.log"),
        topic: format!("{prefix}.billing.ChargeItem"),
        dlq: format!("{prefix}.dlq.{name}"),
        config,
    }
}

impl Billing {
    /// Charges `from..from + count` in one statement (one transaction).
    async fn insert(&mut self, from: u64, count: u64) {
        self.conn
            .query_drop(format!(
                "INSERT INTO {} (charge_id, account_no, mrn, cpt_code, description, amount, status, service_date, posted_at)
                 SELECT seq, 'ACC-1', 'M000000001', '99213', 'Office visit', 100.00, 'B', '2024-03-05', '2024-03-05 09:15:00.250'
                   FROM seq_{from}_to_{}",
                self.charge,
                from + count - 1
            ))
            .await
            .unwrap();
    }

    /// Every charge's id as its ChargeItem's id → amount as the database has it now.
    async fn amounts(&mut self) -> BTreeMap<String, String> {
        stack::charge_amounts(&mut self.conn, &self.charge).await
    }
}

/// Where a ChargeItem keeps its amount.
const PRICE: &str = "/priceOverride/value";

#[tokio::test]
async fn a_snapshot_taken_while_writes_run_loses_nothing_and_ends_current() {
    let mut billing = billing("my_snap").await;
    billing.insert(1, 3000).await;
    stack::add_source_setting(&billing.config, "snapshot.chunk.size = 500");
    let connector = start(&billing.config, &billing.log);
    // Updates of rows in every chunk and new rows after the last, while the chunks are read.
    for round in 0..20u64 {
        billing
            .conn
            .query_drop(format!(
                "UPDATE {} SET amount = amount + {round} + 1, version = version + 1 WHERE charge_id % 20 = {round}",
                billing.charge
            ))
            .await
            .unwrap();
        billing.insert(3001 + round * 50, 50).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    await_snapshotted(&billing.config, &billing.log).await;
    await_binlog_stored(&billing.config, Duration::from_secs(60), &billing.log).await;
    assert!(stop(connector).success());

    let events = events_of(&billing.topic).await;
    let expected = billing.amounts().await;
    assert_eq!(expected.len(), 4000);
    assert_eq!(latest_values(&events, PRICE), expected);
    assert_repeats_are_exact(&events);
}

/// A legacy table with no primary key, only a UNIQUE index on NOT NULL columns: snapshots
/// read it in chunks by that index (not in one pass), and `check` says so as information.
#[tokio::test]
async fn a_table_with_only_a_unique_key_is_snapshotted_in_chunks_by_it() {
    let mut billing = billing("my_unique").await;
    billing
        .conn
        .query_drop(format!(
            "ALTER TABLE {} DROP PRIMARY KEY, ADD UNIQUE KEY charge_no (charge_id)",
            billing.charge
        ))
        .await
        .unwrap();
    billing.insert(1, 1200).await;
    stack::add_source_setting(&billing.config, "snapshot.chunk.size = 100");
    let said = stack::check_said(&billing.config);
    assert!(
        said.contains("no primary key, snapshots chunk by its unique index charge_no (charge_id)"),
        "{said}"
    );
    let connector = start(&billing.config, &billing.log);
    await_snapshotted(&billing.config, &billing.log).await;
    await_binlog_stored(&billing.config, Duration::from_secs(60), &billing.log).await;
    assert!(stop(connector).success());
    let logged = std::fs::read_to_string(&billing.log).unwrap();
    assert!(!logged.contains("read as one chunk"), "{logged}");
    let events = events_of(&billing.topic).await;
    assert_eq!(latest_values(&events, PRICE), billing.amounts().await);
    assert_eq!(events.len(), 1200, "one event per row, none twice");
}

#[tokio::test]
async fn a_connector_killed_mid_transaction_and_mid_stream_delivers_every_change() {
    let mut billing = billing("my_kill").await;
    let connector = start(&billing.config, &billing.log);
    await_snapshotted(&billing.config, &billing.log).await;

    // A 2,000-row transaction, the connector killed once its first events are in Kafka.
    billing.insert(1, 2000).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while messages_in(&billing.topic) == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing arrived");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    crash(connector);
    let in_kafka = messages_in(&billing.topic);

    // A stream of 10,000 changes (inserts and updates), the connector killed halfway.
    let connector = start(&billing.config, &billing.log);
    let writes = {
        let charge = billing.charge.clone();
        tokio::spawn(async move {
            let mut conn = stack::mysql_conn().await;
            for batch in 0..50u64 {
                conn.query_drop(format!(
                    "INSERT INTO {charge} (charge_id, account_no, mrn, cpt_code, amount, status, service_date, posted_at)
                     SELECT seq, 'ACC-2', 'M000000002', '99214', 50.00, 'P', '2024-03-06', '2024-03-06 10:00:00'
                       FROM seq_{}_to_{}",
                    10_001 + batch * 100,
                    10_000 + (batch + 1) * 100
                ))
                .await
                .unwrap();
                conn.query_drop(format!(
                    "UPDATE {charge} SET amount = amount + 0.01, version = version + 1 WHERE charge_id BETWEEN {} AND {}",
                    1 + batch * 40,
                    (batch + 1) * 40
                ))
                .await
                .unwrap();
                conn.query_drop(format!(
                    "UPDATE {charge} SET amount = amount + 0.5 WHERE charge_id BETWEEN {} AND {}",
                    10_001 + batch * 100,
                    10_000 + (batch + 1) * 100
                ))
                .await
                .unwrap();
            }
        })
    };
    let halfway = in_kafka + 3000;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while messages_in(&billing.topic) < halfway {
        assert!(std::time::Instant::now() < deadline, "the stream stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    crash(connector);
    writes.await.unwrap();

    let connector = start(&billing.config, &billing.log);
    await_binlog_stored(&billing.config, Duration::from_secs(90), &billing.log).await;
    assert!(stop(connector).success());

    let events = events_of(&billing.topic).await;
    let expected = billing.amounts().await;
    assert_eq!(expected.len(), 7000);
    assert_eq!(latest_values(&events, PRICE), expected);
    assert_repeats_are_exact(&events);
    // Every change arrived: 2,000 + 5,000 inserts and 2,000 + 5,000 updates, each its own
    // version (the table was empty when its snapshot was taken: no reads).
    let versions: std::collections::HashSet<(&str, &str)> = events
        .iter()
        .map(|e| (e.resource_id.as_str(), e.resource_version.as_str()))
        .collect();
    assert_eq!(versions.len(), 14_000, "every change is one version");
}

#[tokio::test]
async fn schema_changes_mid_stream_are_read_from_the_next_table_map() {
    let mut billing = billing("my_ddl").await;
    let connector = start(&billing.config, &billing.log);
    await_snapshotted(&billing.config, &billing.log).await;
    let charge = billing.charge.clone();
    let insert = |id: u64, description: &str| {
        format!(
            "INSERT INTO {charge} (charge_id, account_no, mrn, cpt_code, {description}, amount, status, service_date, posted_at)
             VALUES ({id}, 'ACC-1', 'M000000001', '99213', 'Office visit', 100.25, 'B', '2024-03-05', '2024-03-05 09:15:00')"
        )
    };
    for step in [
        insert(1, "description"),
        // An added column changes nothing the mapping reads.
        format!("ALTER TABLE {charge} ADD COLUMN batch_no INT NULL AFTER charge_id"),
        insert(2, "description"),
        // A type change: the new values arrive with the new type's digits.
        format!("ALTER TABLE {charge} MODIFY amount DECIMAL(18,6) NOT NULL"),
        insert(3, "description"),
        // A renamed column the mapping reads: a dead letter, and the stream goes on.
        format!("ALTER TABLE {charge} RENAME COLUMN description TO descr"),
        insert(4, "descr"),
        format!("ALTER TABLE {charge} RENAME COLUMN descr TO description"),
        // A dropped column the mapping reads: a dead letter too.
        format!("ALTER TABLE {charge} DROP COLUMN encounter_no"),
        insert(5, "description"),
        format!("ALTER TABLE {charge} ADD COLUMN encounter_no VARCHAR(20)"),
        insert(6, "description"),
    ] {
        billing.conn.query_drop(step).await.unwrap();
    }
    await_binlog_stored(&billing.config, Duration::from_secs(60), &billing.log).await;
    assert!(stop(connector).success());

    let events = events_of(&billing.topic).await;
    let arrived: Vec<(&str, String)> = events
        .iter()
        .map(|e| {
            let resource = e.resource.as_ref().unwrap().to_json();
            (
                e.resource_id.as_str(),
                resource["priceOverride"]["value"].to_string(),
            )
        })
        .collect();
    assert_eq!(
        arrived,
        [
            ("charge-1", "100.25".to_owned()),
            ("charge-2", "100.25".to_owned()),
            ("charge-3", "100.250000".to_owned()),
            ("charge-6", "100.250000".to_owned()),
        ],
        "{}",
        std::fs::read_to_string(&billing.log).unwrap()
    );
    let letters: Vec<serde_json::Value> = read_for(&billing.dlq, 3, Duration::from_secs(5))
        .await
        .iter()
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let error = |i: usize| letters[i]["error"].as_str().unwrap().to_owned();
    assert!(
        error(0).contains("column `description`") && error(0).contains("not in the row"),
        "{}",
        error(0)
    );
    assert_eq!(letters[0]["after"]["descr"]["text"], "Office visit");
    assert!(
        error(1).contains("column `encounter_no`") && error(1).contains("not in the row"),
        "{}",
        error(1)
    );
}

#[tokio::test]
async fn an_idle_server_and_unmapped_traffic_still_advance_the_stored_position() {
    let mut billing = billing("my_idle").await;
    let connector = start(&billing.config, &billing.log);
    await_snapshotted(&billing.config, &billing.log).await;
    // Traffic on a table no mapping reads only: no event, but the stored position follows
    // the server's (its commits, then the heartbeats of the idle server after them).
    let other = format!("{}_other", billing.charge);
    billing
        .conn
        .query_drop(format!("CREATE TABLE {other} (id INT PRIMARY KEY)"))
        .await
        .unwrap();
    billing
        .conn
        .query_drop(format!("INSERT INTO {other} SELECT seq FROM seq_1_to_100"))
        .await
        .unwrap();
    await_binlog_stored(&billing.config, Duration::from_secs(30), &billing.log).await;
    assert!(stop(connector).success());
    assert_eq!(messages_in(&billing.topic), 0);
}

#[tokio::test]
async fn offsets_reset_waits_for_a_stopped_connector_then_reads_a_table_again() {
    let mut billing = billing("my_reset").await;
    billing.insert(1, 50).await;
    let connector = start(&billing.config, &billing.log);
    await_snapshotted(&billing.config, &billing.log).await;
    await_binlog_stored(&billing.config, Duration::from_secs(30), &billing.log).await;
    let reset = || {
        std::process::Command::new(stack::fhir_cdc_bin())
            .args(["offsets", "reset", "--config"])
            .arg(&billing.config)
            .args(["--to", "snapshot", "--table", &billing.charge, "--yes"])
            .output()
            .unwrap()
    };
    // The running connector holds its lock: a reset is refused, a second copy waits.
    let refused = reset();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("is reading its source now") && said.contains("holds its lock"),
        "{said}"
    );
    let second_log = billing.log.with_extension("second");
    let second = start(&billing.config, &second_log);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&second_log)
        .unwrap_or_default()
        .contains("is already running against this server")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the second copy did not wait"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crash(second);
    assert!(stop(connector).success());

    let reset = reset();
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let connector = start(&billing.config, &billing.log);
    let events = read_for(&billing.topic, 100, Duration::from_secs(60)).await;
    assert_eq!(events.len(), 100, "every charge read again");
    await_snapshotted(&billing.config, &billing.log).await;
    assert!(stop(connector).success());
    let events = events_of(&billing.topic).await;
    assert_eq!(latest_values(&events, PRICE), billing.amounts().await);
}

/// The connector as a user the server admits over TLS only, with a client certificate of
/// the stack's CA (`REQUIRE X509`): `check` says how the connection is protected and names
/// a plaintext attempt's refusal; the snapshot and the binary-log stream arrive whole
/// (every connection of the connector is encrypted: the server admits no other).
#[tokio::test]
async fn the_connector_reads_over_tls_with_a_client_certificate() {
    let mut billing = billing("my_tls").await;
    let plain = std::fs::read_to_string(&billing.config).unwrap();
    let tls = plain.replace("${env:FHIR_CDC_MYSQL_URL}", "${env:FHIR_CDC_MYSQL_TLS_URL}");
    assert_ne!(tls, plain);
    let tls_url = stack::env("FHIR_CDC_MYSQL_TLS_URL");
    let (base, _) = tls_url.split_once('?').unwrap();
    for (url, expected) in [
        (base.to_owned(), "FAIL  mysql     authentication failed"),
        (
            // A certificate that signed nothing, for a CA.
            format!(
                "{base}?ssl-mode=VERIFY_IDENTITY&ssl-ca={}",
                stack::env("FHIR_CDC_STACK_CA").replace("ca.pem", "client.pem")
            ),
            "FAIL  mysql     TLS with 127.0.0.1",
        ),
        (
            format!("{base}?ssl-mode=PREFERRED"),
            "fall back to plaintext",
        ),
    ] {
        std::fs::write(
            &billing.config,
            plain.replace("${env:FHIR_CDC_MYSQL_URL}", &url),
        )
        .unwrap();
        let said = stack::check_said(&billing.config);
        assert!(said.contains(expected), "{url}: {said}");
    }
    std::fs::write(&billing.config, tls).unwrap();
    let said = stack::check_said(&billing.config);
    assert!(
        said.contains("as fhir_cdc_tls (")
            && said.contains(", certificate and host name verified)"),
        "{said}"
    );

    billing.insert(1, 20).await;
    let connector = start(&billing.config, &billing.log);
    await_snapshotted(&billing.config, &billing.log).await;
    billing.insert(21, 10).await;
    await_binlog_stored(&billing.config, Duration::from_secs(60), &billing.log).await;
    assert!(stop(connector).success());
    let events = events_of(&billing.topic).await;
    assert_eq!(latest_values(&events, PRICE), billing.amounts().await);
    assert_eq!(latest_values(&events, PRICE).len(), 30);
}

#[tokio::test]
async fn a_requested_snapshot_through_the_signal_table_while_writes_run_ends_current() {
    let mut billing = billing("my_adhoc").await;
    stack::add_source_setting(&billing.config, "snapshot.chunk.size = 500");
    billing.insert(1, 3000).await;
    // Without a signal table a request has no way to the connector: refused, saying how.
    let (code, stderr) = snapshot(&billing.config, &["--table", &billing.charge]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("signal.data.collection") && stderr.contains("CREATE TABLE"),
        "{stderr}"
    );
    stack::add_source_setting(
        &billing.config,
        &format!("signal.data.collection = \"{}\"", billing.signal),
    );
    let said = stack::check_said(&billing.config);
    assert!(
        said.contains(&format!(
            "signal table {}: ad-hoc snapshots",
            billing.signal
        )),
        "{said}"
    );
    let connector = start(&billing.config, &billing.log);
    await_snapshotted(&billing.config, &billing.log).await;

    // A table no mapping reads, or a condition the server does not take, is refused before
    // anything is asked.
    let (code, stderr) = snapshot(&billing.config, &["--table", &billing.signal]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no mapping reads table"), "{stderr}");
    let (code, stderr) = snapshot(
        &billing.config,
        &["--table", &billing.charge, "--where", "no_such_column = 1"],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--where") && stderr.contains("no_such_column"),
        "{stderr}"
    );

    // Amounts raised all along, anywhere in the table, while it is read again.
    let writing = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (mut writer, charge, writing) = (
            stack::mysql_conn().await,
            billing.charge.clone(),
            writing.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0;
            while !writing.is_cancelled() {
                writer
                    .query_drop(format!(
                        "UPDATE {charge} SET amount = amount + 1 WHERE charge_id % 211 = {}",
                        n % 211
                    ))
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let (code, stderr) = snapshot(&billing.config, &["--table", &billing.charge]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("3000 rows"), "{stderr}");
    let (code, stderr) = snapshot(
        &billing.config,
        &["--table", &billing.charge, "--where", "charge_id <= 100"],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("100 rows"), "{stderr}");
    // A condition that only fails when run (the server prepared it) is dropped by the
    // connector, which goes on; the command says so.
    let (code, stderr) = snapshot(
        &billing.config,
        &[
            "--table",
            &billing.charge,
            "--where",
            &format!("charge_id = (SELECT charge_id FROM {})", billing.charge),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("dropped the request"), "{stderr}");
    // A signal the connector cannot follow, written by hand: skipped, the stream goes on.
    billing
        .conn
        .query_drop(format!(
            "INSERT INTO {} VALUES ('by-hand', 'execute-snapshot', '{{\"data-collections\": 7}}')",
            billing.signal
        ))
        .await
        .unwrap();
    writing.cancel();
    writer.await.unwrap();
    billing.insert(3001, 10).await;
    await_binlog_stored(&billing.config, Duration::from_secs(60), &billing.log).await;
    assert!(stop(connector).success());
    let log = std::fs::read_to_string(&billing.log).unwrap();
    assert!(
        log.contains("a signal that cannot be followed: ignored"),
        "{log}"
    );

    let events = events_of(&billing.topic).await;
    assert_eq!(latest_values(&events, PRICE), billing.amounts().await);
    assert_repeats_are_exact(&events);
    let snapshot_reads = events.iter().filter(|e| e.provenance.snapshot).count();
    assert!(
        snapshot_reads >= 3000 + 3000 + 100 - 50,
        "the initial snapshot and both requests were read ({snapshot_reads} snapshot events; the rows changed inside a chunk's window come by the stream instead)"
    );
}

/// A dead letter that holds only its row's key (`[dead_letters] rows = "none"`) is
/// replayed by asking the connector, through the signal table, to read that row again.
#[tokio::test]
async fn a_row_less_dead_letter_is_replayed_by_reading_its_row_again() {
    let mut billing = billing("my_dlq").await;
    stack::add_source_setting(
        &billing.config,
        &format!("signal.data.collection = \"{}\"", billing.signal),
    );
    let text = std::fs::read_to_string(&billing.config).unwrap();
    std::fs::write(
        &billing.config,
        format!("{text}\n[dead_letters]\nrows = \"none\"\n"),
    )
    .unwrap();
    let connector = start(&billing.config, &billing.log);
    await_snapshotted(&billing.config, &billing.log).await;
    let charge = billing.charge.clone();
    // A column the mapping reads is renamed for one insert: that row is a dead letter.
    for step in [
        format!("ALTER TABLE {charge} RENAME COLUMN description TO descr"),
        format!(
            "INSERT INTO {charge} (charge_id, account_no, mrn, cpt_code, descr, amount, status, service_date, posted_at)
             VALUES (7, 'ACC-1', 'M000000001', '99213', 'Office visit', 80.00, 'B', '2024-03-05', '2024-03-05 09:15:00')"
        ),
        format!("ALTER TABLE {charge} RENAME COLUMN descr TO description"),
    ] {
        billing.conn.query_drop(step).await.unwrap();
    }
    let letters = read_for(&billing.dlq, 1, Duration::from_secs(30)).await;
    let letter: serde_json::Value = serde_json::from_slice(&letters[0]).unwrap();
    assert!(letter["after"].is_null(), "{letter}");
    assert_eq!(letter["key_values"]["charge_id"]["text"], "7");
    assert_eq!(messages_in(&billing.topic), 0);

    let replay = std::process::Command::new(stack::fhir_cdc_bin())
        .args(["dlq", "replay", "--all", "--config"])
        .arg(&billing.config)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&replay.stdout);
    assert!(
        replay.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(
        out.contains("replayed: the letter holds no whole row: the connector reads it again at the source (snapshot request "),
        "{out}"
    );
    let events = read_for(&billing.topic, 1, Duration::from_secs(60)).await;
    assert_eq!(
        events.len(),
        1,
        "{}",
        std::fs::read_to_string(&billing.log).unwrap()
    );
    await_binlog_stored(&billing.config, Duration::from_secs(60), &billing.log).await;
    assert!(stop(connector).success());
    let events = events_of(&billing.topic).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].resource_id, "charge-7");
    assert!(events[0].provenance.snapshot, "read again at the source");
    assert_eq!(latest_values(&events, PRICE), billing.amounts().await);
}

/// A connector killed (-9) in the middle of a requested snapshot finishes it after its
/// restart: the request is in its stored state (or again in the log after its position).
#[tokio::test]
async fn a_connector_killed_during_a_requested_snapshot_finishes_it_after_restart() {
    let mut billing = billing("my_adhoc_kill").await;
    stack::add_source_setting(&billing.config, "snapshot.chunk.size = 100");
    stack::add_source_setting(
        &billing.config,
        &format!("signal.data.collection = \"{}\"", billing.signal),
    );
    billing.insert(1, 20_000).await;
    let connector = start(&billing.config, &billing.log);
    await_snapshotted(&billing.config, &billing.log).await;
    let (code, stderr) = snapshot(&billing.config, &["--table", &billing.charge, "--no-wait"]);
    assert_eq!(code, Some(0), "{stderr}");

    let config = fhir_cdc::config::ConnectorConfig::load(&billing.config).unwrap();
    let store = fhir_cdc::offsets::StateStore::of(&config).await.unwrap();
    let requested = |state: &fhir_cdc::offsets::ConnectorState| {
        state
            .tables
            .get(&billing.charge)
            .filter(|p| p.request.is_some())
            .cloned()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state = store.load().await.unwrap().unwrap_or_default();
        match requested(&state) {
            Some(progress) if progress.complete => {
                panic!("the request ended before the kill: give the table more rows")
            }
            Some(progress) if progress.rows > 0 => break,
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request did not begin"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crash(connector);

    let connector = start(&billing.config, &billing.log);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let state = store.load().await.unwrap().unwrap_or_default();
        if state.requests.is_empty() && requested(&state).is_some_and(|p| p.complete) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request did not finish after the restart: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    await_binlog_stored(&billing.config, Duration::from_secs(60), &billing.log).await;
    assert!(stop(connector).success());
    // The resumed table's progress is named, with what was read before the kill.
    let said = std::fs::read_to_string(&billing.log).unwrap();
    assert!(
        said.lines()
            .any(|l| l.contains("resumed") && l.contains(&format!("part={}", billing.charge))),
        "{said}"
    );

    // Every charge read twice at least: by the first snapshot and by the request.
    let events = events_of(&billing.topic).await;
    assert_repeats_are_exact(&events);
    let mut reads: HashMap<&str, usize> = HashMap::new();
    for event in events.iter().filter(|e| e.provenance.snapshot) {
        *reads.entry(&event.resource_id).or_default() += 1;
    }
    assert_eq!(reads.len(), 20_000);
    let once: Vec<_> = reads.iter().filter(|(_, n)| **n < 2).take(5).collect();
    assert!(once.is_empty(), "read once only: {once:?}");
}

/// Killed three times during its initial snapshot of 30,000 charges — early, in the middle
/// and once the last chunk is in Kafka — while small transactions insert charges and raise
/// amounts everywhere in the table, the connector ends with every charge's latest amount as
/// the latest version of its ChargeItem, and repeats only exact events.
#[tokio::test]
async fn killed_during_its_initial_snapshot_the_connector_ends_with_every_rows_latest_state() {
    const ROWS: u64 = 30_000;
    let mut billing = billing("my_snapkill").await;
    billing.insert(1, ROWS).await;
    stack::add_source_setting(&billing.config, "snapshot.chunk.size = 1000");
    let writing = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (charge, writing) = (billing.charge.clone(), writing.clone());
        tokio::spawn(async move {
            let mut conn = stack::mysql_conn().await;
            let mut n: u64 = 0;
            while !writing.is_cancelled() {
                conn.query_drop(format!(
                    "INSERT INTO {charge} (charge_id, account_no, mrn, cpt_code, amount, status, service_date, posted_at)
                     VALUES ({}, 'ACC-3', 'M000000003', '99215', 10.00, 'P', '2024-03-07', '2024-03-07 08:00:00')",
                    ROWS + 1 + n
                ))
                .await
                .unwrap();
                conn.query_drop(format!(
                    "UPDATE {charge} SET amount = amount + 1, version = version + 1 WHERE charge_id % 997 = {}",
                    n % 997
                ))
                .await
                .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let mut connector = start(&billing.config, &billing.log);
    for threshold in [2_000, ROWS as i64 / 2, ROWS as i64] {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while messages_in(&billing.topic) < threshold {
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                std::fs::read_to_string(&billing.log).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        crash(connector);
        connector = start(&billing.config, &billing.log);
    }
    await_snapshotted(&billing.config, &billing.log).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    writing.cancel();
    writer.await.unwrap();
    await_binlog_stored(&billing.config, Duration::from_secs(90), &billing.log).await;
    assert!(stop(connector).success());

    let events = events_of(&billing.topic).await;
    let expected = billing.amounts().await;
    assert!(expected.len() as u64 > ROWS);
    let latest = latest_values(&events, PRICE);
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(id, amount)| latest.get(*id) != Some(*amount))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty() && latest.len() == expected.len(),
        "{} of {} charges missing or stale, e.g. {wrong:?}",
        expected
            .iter()
            .filter(|(id, amount)| latest.get(*id) != Some(*amount))
            .count(),
        expected.len()
    );
    assert_repeats_are_exact(&events);
}
