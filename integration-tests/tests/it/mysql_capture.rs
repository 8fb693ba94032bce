//! `fhir-cdc run` on the stack's MariaDB, with the sample billing mappings: a snapshot
//! taken while writes run loses no row and leaves no stale one, and a connector killed in
//! the middle of a 2,000-row transaction and in the middle of a stream of changes delivers
//! every change after its restart — repeats only as the same events.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use fhir_cdc::canonical::CanonicalEvent;
use integration_tests::connector::{
    await_binlog_stored, await_snapshotted, crash, events_of, messages_in, start, stop,
};
use mysql_async::{prelude::Queryable, Conn};

use crate::stack;

/// A billing database and a connector reading it.
struct Billing {
    conn: Conn,
    charge: String,
    config: PathBuf,
    log: PathBuf,
    topic: String,
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
        log: dir.join("run.log"),
        topic: format!("{prefix}.billing.ChargeItem"),
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
        self.conn
            .query::<(u64, String), _>(format!(
                "SELECT charge_id, CAST(amount AS CHAR) FROM {}",
                self.charge
            ))
            .await
            .unwrap()
            .into_iter()
            .map(|(id, amount)| (format!("charge-{id}"), amount))
            .collect()
    }
}

/// Each ChargeItem's amount in its highest version among `events`.
fn latest_amounts(events: &[CanonicalEvent]) -> BTreeMap<String, String> {
    let mut latest: HashMap<&str, &CanonicalEvent> = HashMap::new();
    for event in events {
        let entry = latest.entry(&event.resource_id).or_insert(event);
        if event.resource_version > entry.resource_version {
            *entry = event;
        }
    }
    latest
        .into_iter()
        .map(|(id, event)| {
            let resource = event.resource.as_ref().expect("no charge is deleted here");
            (
                id.to_owned(),
                resource.to_json()["priceOverride"]["value"].to_string(),
            )
        })
        .collect()
}

/// Repeats are exact: one event id is one resource version, with one content.
fn assert_repeats_are_exact(events: &[CanonicalEvent]) {
    let mut seen: HashMap<&str, &CanonicalEvent> = HashMap::new();
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
    assert_eq!(latest_amounts(&events), expected);
    assert_repeats_are_exact(&events);
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
    assert_eq!(latest_amounts(&events), expected);
    assert_repeats_are_exact(&events);
    // Every change arrived: 2,000 + 5,000 inserts and 2,000 + 5,000 updates, each its own
    // version (the table was empty when its snapshot was taken: no reads).
    let versions: std::collections::HashSet<(&str, &str)> = events
        .iter()
        .map(|e| (e.resource_id.as_str(), e.resource_version.as_str()))
        .collect();
    assert_eq!(versions.len(), 14_000, "every change is one version");
}
