//! `fhir-cdc run` against a real SQL Server, with the sample ADT mappings: a snapshot taken
//! while writes run, a connector killed mid-transaction and mid-stream, a schema change
//! through a second capture instance, and changes the cleanup job removed. These run only
//! where `MSSQL_URL` names a SQL Server with the Agent and CDC enabled on its database
//! (docker-compose.yml's `sqlserver`, as its header says); elsewhere each says it was
//! skipped and passes. The same logic is tested on every run against recorded result sets
//! (`tests/sqlserver_wire.rs`).

use std::{path::PathBuf, time::Duration};

use fhir_cdc::{
    config::Secret,
    source::sqlserver::{self, connection},
};
use integration_tests::connector::{crash, events_of, latest_values, start, stop};

use crate::stack;

/// Every visit's ward: a varchar in a UTF-8 collation, outside every Windows code page.
const WARD: &str = "4 West — 山田";

/// The SQL Server to test against, if any.
fn mssql_url() -> Option<Secret> {
    match std::env::var("MSSQL_URL") {
        Ok(url) if !url.is_empty() => Some(Secret::new(url)),
        _ => {
            eprintln!("skipped: MSSQL_URL is not set (no SQL Server here; see docker-compose.yml)");
            None
        }
    }
}

/// An ADT visit table of its own with CDC on it, the sample mapping pointed at it, and a
/// connector's configuration.
struct Adt {
    client: connection::Client,
    table: String,
    config: PathBuf,
    log: PathBuf,
    topic: String,
}

async fn adt(url: Secret, name: &str) -> Adt {
    let name = stack::unique(name).replace('-', "_");
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(dir.join("mappings")).unwrap();
    let mut client = connection::connect(&url).await.unwrap();
    let table = format!("{name}_visit");
    execute(
        &mut client,
        &format!(
            "CREATE TABLE dbo.{table} (
               visit_id bigint NOT NULL PRIMARY KEY, visit_no varchar(20) NOT NULL,
               mrn varchar(20) NOT NULL, patient_class char(1) NOT NULL, status char(1) NOT NULL,
               ward varchar(40) COLLATE Latin1_General_100_CI_AS_SC_UTF8 NULL, admitted_at datetime NOT NULL, discharged_at datetime NULL,
               deposit money NULL);
             EXEC sys.sp_cdc_enable_table @source_schema = N'dbo', @source_name = N'{table}',
               @role_name = NULL, @capture_instance = N'{table}_v1';"
        ),
    )
    .await;
    let mapping = std::fs::read_to_string(stack::repo_root().join("mappings/adt/visit.yaml"))
        .unwrap()
        .replace("table: dbo.adt_visit", &format!("table: dbo.{table}"));
    std::fs::write(dir.join("mappings/visit.yaml"), mapping).unwrap();
    let prefix = stack::unique("fhirms");
    let config = stack::sqlserver_connector_config(&dir, &name, &prefix);
    stack::add_source_setting(&config, "snapshot.chunk.size = 500");
    Adt {
        client,
        table: format!("dbo.{table}"),
        log: dir.join("run.log"),
        topic: format!("{prefix}.adt.Encounter"),
        config,
    }
}

async fn execute(client: &mut connection::Client, sql: &str) {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_results()
        .await
        .unwrap();
}

impl Adt {
    /// Visits `from..from + count`, in one transaction.
    async fn insert(&mut self, from: i64, count: i64) {
        let sql = format!(
            "WITH n AS (SELECT TOP ({count}) ROW_NUMBER() OVER (ORDER BY (SELECT NULL)) - 1 AS i
                          FROM sys.all_objects a CROSS JOIN sys.all_objects b)
             INSERT INTO {} (visit_id, visit_no, mrn, patient_class, status, ward, admitted_at, deposit)
             SELECT {from} + i, CONCAT('V', {from} + i), 'M0001', 'I', 'A', N'{WARD}', '2024-03-05 09:15:00.257', 100.0000
               FROM n",
            self.table
        );
        execute(&mut self.client, &sql).await;
    }

    /// Every visit's Encounter id → its status as the mapping makes it from the table now.
    async fn statuses(&mut self) -> std::collections::BTreeMap<String, String> {
        let rows = sqlserver::rows(
            &mut self.client,
            &format!("SELECT visit_no, status FROM {}", self.table),
            &[],
            "reading the visits",
        )
        .await
        .unwrap();
        rows.iter()
            .map(|row| {
                let no = sqlserver::catalog::text_at(row, 0).unwrap();
                let status = match sqlserver::catalog::text_at(row, 1).as_deref() {
                    Some("A") => "in-progress",
                    Some("D") => "finished",
                    _ => "entered-in-error",
                };
                (format!("adt-visit-{no}"), format!("\"{status}\""))
            })
            .collect()
    }

    /// Wait until the topic's latest statuses are the table's (the capture job runs every
    /// few seconds), check every visit's ward arrived whole, then stop the connector.
    async fn await_current(&mut self, connector: integration_tests::connector::Connector) {
        let expected = self.statuses().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let events = events_of(&self.topic).await;
            if latest_values(&events, "/status") == expected {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the topic did not reach the table's state; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let wards = latest_values(
            &events_of(&self.topic).await,
            "/location/0/location/display",
        );
        let whole = serde_json::Value::from(WARD).to_string();
        assert!(wards.values().all(|ward| *ward == whole), "{wards:?}");
        assert!(stop(connector).success());
    }
}

#[tokio::test]
async fn sql_server_a_snapshot_while_writes_run_then_the_stream_end_current() {
    let Some(url) = mssql_url() else { return };
    let mut adt = adt(url, "ms_snap").await;
    adt.insert(1, 3000).await;
    let connector = start(&adt.config, &adt.log);
    for round in 0..10 {
        execute(
            &mut adt.client,
            &format!(
                "UPDATE {} SET status = 'D' WHERE visit_id % 10 = {round}",
                adt.table
            ),
        )
        .await;
        adt.insert(3001 + round * 50, 50).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    adt.await_current(connector).await;
    let events = events_of(&adt.topic).await;
    assert_eq!(latest_values(&events, "/status").len(), 3500);
}

#[tokio::test]
async fn sql_server_a_connector_killed_mid_stream_delivers_every_change_once_per_version() {
    let Some(url) = mssql_url() else { return };
    let mut adt = adt(url, "ms_kill").await;
    let connector = start(&adt.config, &adt.log);
    tokio::time::sleep(Duration::from_secs(2)).await;
    adt.insert(1, 2000).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while integration_tests::connector::messages_in(&adt.topic) == 0 {
        assert!(std::time::Instant::now() < deadline, "nothing arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    crash(connector);
    let connector = start(&adt.config, &adt.log);
    for batch in 0..20 {
        adt.insert(10_001 + batch * 100, 100).await;
        execute(
            &mut adt.client,
            &format!(
                "UPDATE {} SET status = 'D' WHERE visit_id BETWEEN {} AND {}",
                adt.table,
                1 + batch * 50,
                (batch + 1) * 50
            ),
        )
        .await;
        if batch == 10 {
            crash(connector);
            let restarted = start(&adt.config, &adt.log);
            for rest in 11..20 {
                adt.insert(10_001 + rest * 100, 100).await;
            }
            adt.await_current(restarted).await;
            break;
        }
    }
    let events = events_of(&adt.topic).await;
    let versions: std::collections::HashSet<(&str, &str)> = events
        .iter()
        .map(|e| (e.resource_id.as_str(), e.resource_version.as_str()))
        .collect();
    let ids: std::collections::HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        versions.len(),
        "one event id per version: repeats are exact"
    );
    // 2,000 + 2,000 inserts and 550 updates, each its own version.
    assert_eq!(versions.len(), 4550);
}

#[tokio::test]
async fn sql_server_a_second_capture_instance_after_a_schema_change_gives_every_change_once() {
    let Some(url) = mssql_url() else { return };
    let mut adt = adt(url, "ms_ddl").await;
    let connector = start(&adt.config, &adt.log);
    adt.insert(1, 100).await;
    let table = adt.table.trim_start_matches("dbo.").to_owned();
    execute(
        &mut adt.client,
        &format!(
            "ALTER TABLE {} ADD room nvarchar(10) NULL;
             EXEC sys.sp_cdc_enable_table @source_schema = N'dbo', @source_name = N'{table}',
               @role_name = NULL, @capture_instance = N'{table}_v2';",
            adt.table
        ),
    )
    .await;
    adt.insert(101, 100).await;
    execute(
        &mut adt.client,
        &format!(
            "UPDATE {} SET status = 'D', room = N'12' WHERE visit_id <= 150",
            adt.table
        ),
    )
    .await;
    adt.await_current(connector).await;
    let events = events_of(&adt.topic).await;
    let versions: std::collections::HashSet<(&str, &str)> = events
        .iter()
        .map(|e| (e.resource_id.as_str(), e.resource_version.as_str()))
        .collect();
    assert_eq!(
        versions.len(),
        350,
        "200 inserts and 150 updates, none twice"
    );
}

#[tokio::test]
async fn sql_server_changes_the_cleanup_job_removed_stop_initial_and_resnapshot_when_needed() {
    let Some(url) = mssql_url() else { return };
    let mut adt = adt(url, "ms_gap").await;
    let connector = start(&adt.config, &adt.log);
    adt.insert(1, 10).await;
    adt.await_current(connector).await;
    // Stopped, changes made and cleaned up before the connector read them.
    adt.insert(11, 10).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let instance = format!("{}_v1", adt.table.trim_start_matches("dbo."));
    execute(
        &mut adt.client,
        &format!(
            "DECLARE @lsn binary(10) = sys.fn_cdc_get_max_lsn();
             EXEC sys.sp_cdc_cleanup_change_table @capture_instance = N'{instance}', @low_water_mark = @lsn, @threshold = 100000;"
        ),
    )
    .await;
    let run = stack::fhir_cdc(&["run", "--config", adt.config.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success(),
        "initial must stop across the gap: {said}"
    );
    assert!(said.contains("when_needed"), "{said}");
    stack::add_source_setting(&adt.config, "snapshot.mode = \"when_needed\"");
    let connector = start(&adt.config, &adt.log);
    adt.await_current(connector).await;
}
