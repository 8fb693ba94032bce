//! What a SQL Server database must offer before fhir-cdc can read its change tables,
//! checked against the live server, each problem with the T-SQL that fixes it.
//!
//! CDC needs an edition that has it (Enterprise, Developer, Standard since 2016 SP1; not
//! Express, which also has no Agent), CDC enabled on the database and on every mapped
//! table, SQL Server Agent running (the capture and cleanup jobs are Agent jobs), SNAPSHOT
//! isolation allowed (snapshot chunks), a user that may read the change tables (SELECT on
//! the `cdc` schema, or the capture instance's gating role) and the tables, and a cleanup
//! retention longer than the connector may be stopped
//! (<https://learn.microsoft.com/sql/relational-databases/track-changes/enable-and-disable-change-data-capture-sql-server>).

use std::time::Duration;

use super::{
    catalog::{self, CaptureInstance},
    connection::{self, Client},
    MssqlError,
};
use crate::{config::Secret, preflight::Finding};

const COMPONENT: &str = "sqlserver";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the checks judge of the server and the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    /// `ProductVersion`, e.g. `16.0.4135.4`.
    pub version: String,
    pub edition: String,
    /// `SERVERPROPERTY('EngineEdition')`: 5 is Azure SQL Database, 8 Managed Instance.
    pub engine_edition: i32,
    pub database: String,
    pub cdc_enabled: bool,
    pub snapshot_isolation: bool,
    /// `None` when the user may not see the services (VIEW SERVER STATE).
    pub agent_running: Option<bool>,
    /// The cleanup job's retention in minutes; `None` when the user may not read msdb.
    pub retention_minutes: Option<i64>,
    /// Whether the user may read the `cdc` schema (`cdc.change_tables`).
    pub reads_cdc: bool,
    /// Whether the user may read `sys.dm_tran_database_transactions` (snapshot chunks).
    pub views_transactions: bool,
}

/// A table a mapping reads, with the key the mapping names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedTable {
    /// `schema.table`.
    pub name: String,
    pub key: Vec<String>,
}

/// Connect with `url` and check every prerequisite, and with `mapped` also the tables the
/// mappings read, and the signal table (`schema.table`) if named.
pub async fn check(url: &Secret, mapped: &[MappedTable], signal: Option<&str>) -> Vec<Finding> {
    let config = match crate::config::ado::config(url) {
        Ok(config) => config,
        Err(e) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("source.url: {e}"),
                "write it as an ADO.NET connection string: Server=tcp:host,1433;Database=lab;User Id=fhir_cdc;Password=${env:PASSWORD};Encrypt=true",
            )]
        }
    };
    let target = config.get_addr();
    let mut client = match tokio::time::timeout(CONNECT_TIMEOUT, connection::connect(url)).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => return vec![explain_connect_error(&e, &target)],
        Err(_) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("no answer from {target} within {}s", CONNECT_TIMEOUT.as_secs()),
                "check that SQL Server runs, listens on TCP (SQL Server Configuration Manager) and that no firewall drops the traffic",
            )]
        }
    };
    let facts = match read_facts(&mut client).await {
        Ok(facts) => facts,
        Err(e) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("connected to {target}, but reading the server's settings failed: {e}"),
                "see the server's error log",
            )]
        }
    };
    let mut findings = vec![Finding::ok(
        COMPONENT,
        format!(
            "{target}: SQL Server {} ({}), database {}",
            facts.version, facts.edition, facts.database
        ),
    )];
    findings.extend(evaluate(&facts));
    if facts.cdc_enabled && facts.reads_cdc {
        let instances = catalog::instances(&mut client).await;
        for table in mapped {
            let columns = catalog::table_columns(
                &mut client,
                table_part(&table.name).0,
                table_part(&table.name).1,
            )
            .await;
            findings.push(match (&instances, columns) {
                (Ok(instances), Ok(columns)) => mapped_table(
                    &facts.database,
                    table,
                    &columns.columns,
                    instances.get(&table.name).map_or(&[][..], Vec::as_slice),
                ),
                (Err(e), _) => Finding::problem(
                    COMPONENT,
                    format!("reading the catalog of {} failed: {e}", table.name),
                    "GRANT SELECT ON SCHEMA::cdc TO <user>, and SELECT on the table",
                ),
                (_, Err(e)) => Finding::problem(
                    COMPONENT,
                    format!("reading the catalog of {} failed: {e}", table.name),
                    "GRANT SELECT ON SCHEMA::cdc TO <user>, and SELECT on the table",
                ),
            });
        }
        if let Some(signal) = signal {
            let enabled = instances.as_ref().is_ok_and(|i| i.contains_key(signal));
            findings.push(if enabled {
                Finding::ok(COMPONENT, format!("signal table {signal}: ad-hoc snapshots can be asked (`fhir-cdc snapshot`; the asking user needs INSERT on it)"))
            } else {
                Finding::problem(
                    COMPONENT,
                    format!("the signal table {signal} (signal.data.collection) does not exist or has no capture instance"),
                    format!("create it: {}", super::signal::ddl(signal)),
                )
            });
        }
    }
    let _ = client.close().await;
    findings
}

fn table_part(name: &str) -> (&str, &str) {
    name.split_once('.').unwrap_or(("dbo", name))
}

async fn read_facts(client: &mut Client) -> Result<ServerFacts, MssqlError> {
    let fail = MssqlError::query("reading the server's settings");
    let row = client
        .simple_query(
            "SELECT CAST(SERVERPROPERTY('ProductVersion') AS nvarchar(128)),
                    CAST(SERVERPROPERTY('Edition') AS nvarchar(128)),
                    CAST(SERVERPROPERTY('EngineEdition') AS int),
                    DB_NAME(), d.is_cdc_enabled, d.snapshot_isolation_state
               FROM sys.databases AS d WHERE d.database_id = DB_ID()",
        )
        .await
        .map_err(&fail)?
        .into_row()
        .await
        .map_err(&fail)?
        .ok_or_else(|| MssqlError::Definite("the server did not describe the database".into()))?;
    let text = |at| catalog::text_at(&row, at).unwrap_or_default();
    let mut facts = ServerFacts {
        version: text(0),
        edition: text(1),
        engine_edition: row.get::<i32, _>(2).unwrap_or_default(),
        database: text(3),
        cdc_enabled: row.get::<bool, _>(4).unwrap_or_default(),
        snapshot_isolation: row.get::<u8, _>(5) == Some(1),
        agent_running: None,
        retention_minutes: None,
        reads_cdc: false,
        views_transactions: false,
    };
    // Each of these may be refused: a refusal is a fact too.
    facts.agent_running = first_row(
        client,
        "SELECT CAST(CASE WHEN status_desc = N'Running' THEN 1 ELSE 0 END AS bit) FROM sys.dm_server_services WHERE servicename LIKE N'SQL Server Agent%'",
    )
    .await
    .and_then(|r| r.get::<bool, _>(0));
    facts.retention_minutes = first_row(
        client,
        "SELECT CAST(retention AS bigint) FROM msdb.dbo.cdc_jobs WHERE database_id = DB_ID() AND job_type = N'cleanup'",
    )
    .await
    .and_then(|r| r.get::<i64, _>(0));
    facts.reads_cdc = facts.cdc_enabled
        && client
            .simple_query("SELECT TOP (0) capture_instance FROM cdc.change_tables")
            .await
            .is_ok_and(|_| true);
    facts.views_transactions = first_row(
        client,
        "SELECT COUNT(*) FROM sys.dm_tran_database_transactions WHERE database_id = DB_ID()",
    )
    .await
    .is_some();
    Ok(facts)
}

/// The first row of `sql`, or `None` when the server refuses it or it has none.
async fn first_row(client: &mut Client, sql: &str) -> Option<tiberius::Row> {
    client.simple_query(sql).await.ok()?.into_row().await.ok()?
}

/// Judge the server and database facts.
pub fn evaluate(facts: &ServerFacts) -> Vec<Finding> {
    let mut findings = Vec::new();
    let major: u32 = facts
        .version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    // 13 is SQL Server 2016: CDC in Standard edition from its SP1 on.
    if major < 13 && facts.engine_edition != 5 && facts.engine_edition != 8 {
        findings.push(Finding::problem(
            COMPONENT,
            format!(
                "SQL Server {} is older than 2016, which fhir-cdc needs",
                facts.version
            ),
            "upgrade to SQL Server 2016 SP1 or later",
        ));
    }
    if facts.edition.contains("Express") {
        findings.push(Finding::problem(
            COMPONENT,
            format!(
                "the {} has no change data capture (and no SQL Server Agent)",
                facts.edition
            ),
            "use Standard, Enterprise or Developer edition",
        ));
    }
    let db = &facts.database;
    if !facts.cdc_enabled {
        findings.push(Finding::problem(
            COMPONENT,
            format!("CDC is not enabled on database {db}"),
            format!("USE [{db}]; EXEC sys.sp_cdc_enable_db;"),
        ));
    } else {
        findings.push(Finding::ok(
            COMPONENT,
            format!("CDC is enabled on database {db}"),
        ));
        if !facts.reads_cdc {
            findings.push(Finding::problem(
                COMPONENT,
                "the user may not read the change tables (cdc.change_tables)",
                "GRANT SELECT ON SCHEMA::cdc TO <user>; (or add the user to each capture instance's gating role)",
            ));
        }
    }
    if !facts.snapshot_isolation {
        findings.push(Finding::problem(
            COMPONENT,
            format!("SNAPSHOT isolation is not allowed on {db}: snapshot chunks read under it, without locks"),
            format!("ALTER DATABASE [{db}] SET ALLOW_SNAPSHOT_ISOLATION ON;"),
        ));
    }
    if !facts.views_transactions {
        findings.push(Finding::problem(
            COMPONENT,
            "the user may not read sys.dm_tran_database_transactions, which gives each snapshot chunk its LSN",
            "GRANT VIEW SERVER STATE TO <login>; (SQL Server 2022: GRANT VIEW SERVER PERFORMANCE STATE TO <login>;)",
        ));
    }
    match facts.agent_running {
        Some(true) => findings.push(Finding::ok(COMPONENT, "SQL Server Agent is running (it runs the capture job)")),
        Some(false) => findings.push(Finding::problem(
            COMPONENT,
            "SQL Server Agent is not running: the capture job writes no changes without it",
            "start it (SQL Server Configuration Manager, `systemctl start mssql-server` with `mssql-conf set sqlagent.enabled true` on Linux) and set it to start automatically",
        )),
        // Azure SQL Database runs capture on its own scheduler.
        None if facts.engine_edition == 5 => {}
        None => findings.push(Finding::warning(
            COMPONENT,
            "cannot tell whether SQL Server Agent runs (the user may not read sys.dm_server_services)",
            "check that SQL Server Agent runs, or GRANT VIEW SERVER STATE TO <login> so that check can",
        )),
    }
    match facts.retention_minutes {
        Some(minutes) if minutes < 24 * 60 => findings.push(Finding::warning(
            COMPONENT,
            format!("the cleanup job keeps changes {minutes} minutes: a connector stopped longer loses changes (when_needed then snapshots again)"),
            "EXEC sys.sp_cdc_change_job @job_type = N'cleanup', @retention = 4320; (minutes; three days is the default)",
        )),
        Some(minutes) => findings.push(Finding::ok(
            COMPONENT,
            format!("the cleanup job keeps changes {} hours: the connector may be stopped that long without losing any", minutes / 60),
        )),
        None if facts.cdc_enabled => findings.push(Finding::warning(
            COMPONENT,
            "cannot read the cleanup job's retention (msdb.dbo.cdc_jobs)",
            "check it with EXEC sys.sp_cdc_help_jobs; keep it longer than the connector may be stopped",
        )),
        None => {}
    }
    findings
}

/// Judge a mapped table: it exists, CDC captures it, its capture instances capture the
/// mapping's key and its other columns.
pub fn mapped_table(
    database: &str,
    mapped: &MappedTable,
    columns: &[(String, String)],
    instances: &[CaptureInstance],
) -> Finding {
    let name = &mapped.name;
    let (schema, table) = table_part(name);
    if columns.is_empty() {
        return Finding::problem(
            COMPONENT,
            format!("{name}, which a mapping reads, does not exist in {database} or the user may not see it"),
            format!("create the table, correct `source.table` in its mapping, or GRANT SELECT ON {} TO <user>", super::quote_table(schema, table)),
        );
    }
    let enable = format!(
        "EXEC sys.sp_cdc_enable_table @source_schema = N'{schema}', @source_name = N'{table}', @role_name = NULL;"
    );
    let Some(newest) = instances
        .iter()
        .max_by_key(|i| (i.instance.created, i.instance.start))
    else {
        return Finding::problem(
            COMPONENT,
            format!("CDC is not enabled on {name} (it has no capture instance)"),
            enable,
        );
    };
    let captured = |column: &str| {
        newest
            .columns
            .iter()
            .any(|(c, _)| c.eq_ignore_ascii_case(column))
    };
    let key_missing: Vec<&str> = mapped
        .key
        .iter()
        .map(String::as_str)
        .filter(|k| !captured(k))
        .collect();
    if !key_missing.is_empty() {
        return Finding::problem(
            COMPONENT,
            format!(
                "capture instance {} of {name} does not capture {} of the mapping's key",
                newest.instance.name,
                key_missing.join(", ")
            ),
            format!("enable a capture instance with every column: EXEC sys.sp_cdc_enable_table @source_schema = N'{schema}', @source_name = N'{table}', @role_name = NULL, @capture_instance = N'{schema}_{table}_v2'; then, once the connector has moved to it, drop the old one with sys.sp_cdc_disable_table"),
        );
    }
    let uncaptured: Vec<&str> = columns
        .iter()
        .map(|(c, _)| c.as_str())
        .filter(|c| !captured(c))
        .collect();
    let instances_text = if instances.len() > 1 {
        format!(
            " (two capture instances: the connector moves to {} at its start LSN; drop the older one once it has)",
            newest.instance.name
        )
    } else {
        String::new()
    };
    if !uncaptured.is_empty() {
        return Finding::warning(
            COMPONENT,
            format!(
                "capture instance {} of {name} does not capture {}: changes carry them as absent, and a mapping that reads them gets no value{instances_text}",
                newest.instance.name,
                uncaptured.join(", ")
            ),
            format!("if a mapping reads them, enable a capture instance with every column: EXEC sys.sp_cdc_enable_table @source_schema = N'{schema}', @source_name = N'{table}', @role_name = NULL, @capture_instance = N'{schema}_{table}_v2';"),
        );
    }
    Finding::ok(
        COMPONENT,
        format!(
            "{name}: captured by {}{instances_text}",
            newest.instance.name
        ),
    )
}

/// A failed connection explained: the network, TLS, or the login.
fn explain_connect_error(err: &MssqlError, target: &str) -> Finding {
    let text = err.to_string();
    let (summary, fix) = if text.contains("Connection refused") {
        (
            format!("nothing is listening at {target} (connection refused)"),
            "start SQL Server, enable its TCP protocol, or correct Server in source.url (tcp:host,port)".to_owned(),
        )
    } else if text.contains("error 18456") {
        (
            format!("login failed at {target}: {text}"),
            "check User Id and Password in source.url, and that the server allows SQL Server authentication (mixed mode)".to_owned(),
        )
    } else if text.contains("error 4060") {
        (
            format!("{target}: {text}"),
            "correct Database in source.url, or CREATE USER for the login in that database"
                .to_owned(),
        )
    } else if text.to_ascii_lowercase().contains("tls") || text.contains("certificate") {
        (
            format!("TLS with {target} failed: {text}"),
            "trust the server's certificate: TrustServerCertificateCA=<path to its CA's PEM file> in source.url (or TrustServerCertificate=true, which checks nothing)".to_owned(),
        )
    } else if text.contains("connecting to SQL Server at") {
        (
            text,
            "start SQL Server, or correct Server in source.url (tcp:host,port)".to_owned(),
        )
    } else {
        (
            format!("connecting to {target} failed: {text}"),
            "see the server's error log".to_owned(),
        )
    };
    Finding::problem(COMPONENT, summary, fix)
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDateTime;

    use super::*;
    use crate::{change::Lsn, preflight::Severity, source::sqlserver::changes::Instance};

    fn facts() -> ServerFacts {
        ServerFacts {
            version: "16.0.4135.4".into(),
            edition: "Developer Edition (64-bit)".into(),
            engine_edition: 3,
            database: "lab".into(),
            cdc_enabled: true,
            snapshot_isolation: true,
            agent_running: Some(true),
            retention_minutes: Some(4320),
            reads_cdc: true,
            views_transactions: true,
        }
    }

    fn problems(findings: &[Finding]) -> Vec<String> {
        findings
            .iter()
            .filter(|f| f.severity != Severity::Ok)
            .map(|f| format!("{} → {}", f.summary, f.fix.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn a_ready_database_passes() {
        assert_eq!(problems(&evaluate(&facts())), Vec::<String>::new());
    }

    #[test]
    fn each_missing_prerequisite_is_named_with_its_t_sql() {
        type Break = fn(&mut ServerFacts);
        let cases: [(Break, &str); 7] = [
            (|f| f.cdc_enabled = false, "EXEC sys.sp_cdc_enable_db"),
            (
                |f| f.snapshot_isolation = false,
                "SET ALLOW_SNAPSHOT_ISOLATION ON",
            ),
            (|f| f.agent_running = Some(false), "Agent is not running"),
            (|f| f.retention_minutes = Some(60), "@retention = 4320"),
            (|f| f.reads_cdc = false, "GRANT SELECT ON SCHEMA::cdc"),
            (|f| f.views_transactions = false, "GRANT VIEW SERVER STATE"),
            (
                |f| f.edition = "Express Edition (64-bit)".into(),
                "no change data capture",
            ),
        ];
        for (break_it, says) in cases {
            let mut broken = facts();
            break_it(&mut broken);
            let found = problems(&evaluate(&broken));
            assert!(found.iter().any(|p| p.contains(says)), "{says}: {found:?}");
        }
    }

    fn instance(name: &str, day: u32, columns: &[&str]) -> CaptureInstance {
        CaptureInstance {
            table: "dbo.lab_result".into(),
            instance: Instance {
                name: name.into(),
                start: Lsn::default(),
                created: NaiveDateTime::MIN + chrono::Duration::days(day.into()),
            },
            columns: columns
                .iter()
                .map(|c| ((*c).to_owned(), "int".to_owned()))
                .collect(),
        }
    }

    #[test]
    fn mapped_tables_need_a_capture_instance_with_their_columns() {
        let mapped = MappedTable {
            name: "dbo.lab_result".into(),
            key: vec!["result_id".into()],
        };
        let columns: Vec<(String, String)> = ["result_id", "value"]
            .map(|c| (c.to_owned(), "int".to_owned()))
            .to_vec();
        let judge =
            |instances: &[CaptureInstance]| mapped_table("lab", &mapped, &columns, instances);
        let none = judge(&[]);
        assert_eq!(none.severity, Severity::Problem);
        assert!(none
            .fix
            .unwrap()
            .contains("sp_cdc_enable_table @source_schema = N'dbo', @source_name = N'lab_result'"));
        let keyless = judge(&[instance("dbo_lab_result", 1, &["value"])]);
        assert_eq!(keyless.severity, Severity::Problem, "{keyless}");
        let partial = judge(&[instance("dbo_lab_result", 1, &["result_id"])]);
        assert_eq!(partial.severity, Severity::Warning, "{partial}");
        assert!(partial.summary.contains("value"));
        // The newer of two instances is the one judged.
        let moved = judge(&[
            instance("dbo_lab_result", 1, &["result_id"]),
            instance("dbo_lab_result_v2", 2, &["result_id", "value"]),
        ]);
        assert_eq!(moved.severity, Severity::Ok, "{moved}");
        assert!(moved.summary.contains("dbo_lab_result_v2"));
        assert_eq!(
            judge(&[instance("x", 1, &["result_id", "value"])]).severity,
            Severity::Ok
        );
        let absent = mapped_table("lab", &mapped, &[], &[]);
        assert!(absent.summary.contains("does not exist"));
    }
}
