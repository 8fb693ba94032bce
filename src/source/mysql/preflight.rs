//! What a MySQL or MariaDB server must offer before fhir-cdc can read its binary log,
//! checked against the live server.
//!
//! Row-level change capture needs the binary log on (`log_bin`), row events
//! (`binlog_format = ROW`) carrying every column (`binlog_row_image = FULL`, so before
//! images are whole), a non-zero `server_id`, and a user with `REPLICATION SLAVE` (to read the
//! log) and `REPLICATION CLIENT` (MariaDB: `BINLOG MONITOR`, to list it) plus `SELECT` for
//! snapshots (<https://mariadb.com/kb/en/setting-up-replication/>,
//! <https://dev.mysql.com/doc/refman/8.0/en/replication-options-binary-log.html>).
//! `binlog_row_metadata = FULL` puts column names, signedness, character sets and ENUM/SET
//! labels in the log: the connector reads rows with them and parses no DDL, so without it
//! it does not start.

use std::time::Duration;

use mysql_async::{prelude::Queryable, Conn};

use super::tls::{self, SslMode};
use crate::{
    config::{Secret, SnapshotMode},
    preflight::{self, Finding},
};

const COMPONENT: &str = "mysql";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The server settings and grants the checks judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub version: String,
    pub log_bin: bool,
    pub binlog_format: String,
    pub binlog_row_image: String,
    /// `None` on servers without the variable (MySQL before 8.0.1, MariaDB before 10.5).
    pub binlog_row_metadata: Option<String>,
    pub server_id: u32,
    /// The lines of `SHOW GRANTS FOR CURRENT_USER()`.
    pub grants: Vec<String>,
}

/// A table a mapping reads, with the key the mapping names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedTable {
    pub database: String,
    pub table: String,
    pub key: Vec<String>,
    /// Every column the mappings read of it.
    pub columns: Vec<String>,
}

/// Whether `run` can resume from the connector's stored position (its state's text), and
/// what it does if the server purged that binary log: start over under
/// `snapshot.mode = when_needed`, refuse to start otherwise.
pub async fn stored_position(url: &Secret, stored: &str, mode: SnapshotMode) -> Finding {
    let (position, gtid) =
        match super::capture::parse_position(stored) {
            Ok(parsed) => parsed,
            Err(e) => return Finding::problem(
                COMPONENT,
                format!("the connector's stored position `{stored}` is unreadable: {e}"),
                "run `fhir-cdc offsets reset --to snapshot` (the connector stopped) to start over",
            ),
        };
    let mut conn = match super::connect(url).await {
        Ok(conn) => conn,
        // Unreachable: the server's own finding says so.
        Err(e) => {
            return Finding::warning(
                COMPONENT,
                format!("the stored position {stored} could not be checked: {e}"),
                "see the server's finding above",
            )
        }
    };
    let purged = super::purged_since(&mut conn, &position, gtid.as_ref()).await;
    let _ = conn.disconnect().await;
    match purged {
        Ok(None) => Finding::ok(
            COMPONENT,
            format!("the server still has the binary log from the stored position {stored}: run resumes there"),
        ),
        Ok(Some(why)) => {
            let (lost, fix) = super::capture::log_gone(&position, &why);
            if mode == SnapshotMode::WhenNeeded {
                Finding::warning(
                    COMPONENT,
                    format!("{lost}; run will snapshot every table again (snapshot.mode = when_needed)"),
                    "nothing to do, unless a new snapshot is unwanted",
                )
            } else {
                Finding::problem(COMPONENT, lost, fix)
            }
        }
        Err(e) => Finding::warning(
            COMPONENT,
            format!("the stored position {stored} could not be checked: {e}"),
            "the user needs REPLICATION CLIENT (MariaDB: BINLOG MONITOR) to list the binary logs",
        ),
    }
}

/// What the catalog says of a mapped table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFacts {
    /// Every column; empty when the table does not exist (or is hidden from the user).
    pub columns: Vec<String>,
    /// The columns snapshots chunk by: the primary key, or a UNIQUE NOT NULL index's.
    pub primary_key: Vec<String>,
    /// That index's name, when the table has no primary key.
    pub unique_index: Option<String>,
    /// The server's refusal of `SELECT` on the table, if it refused.
    pub select_refused: Option<String>,
    /// When the table does not exist as named: the one whose name differs only in case,
    /// as the catalogue spells it (`database.table`).
    pub spelled: Option<String>,
}

/// Connect with `url` and check every prerequisite of binlog capture, and with `mapped`
/// also the tables the mappings read, and the signal table (`database.table`) if named.
pub async fn check(url: &Secret, mapped: &[MappedTable], signal: Option<&str>) -> Vec<Finding> {
    let (opts, mode) = match tls::opts(url) {
        Ok(parsed) => parsed,
        Err(e) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("source.url is not a valid MySQL URL: {e}"),
                "use mysql://user:password@host:port/database?ssl-mode=VERIFY_IDENTITY&ssl-ca=/path/ca.pem",
            )]
        }
    };
    let target = format!(
        "{}:{}/{} as {}",
        opts.ip_or_hostname(),
        opts.tcp_port(),
        opts.db_name().unwrap_or(""),
        opts.user().unwrap_or("?")
    );
    let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(opts.clone())).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            return vec![explain_connect_error(
                &e,
                &target,
                opts.user().unwrap_or("?"),
            )]
        }
        Err(_) => {
            return vec![Finding::problem(
                COMPONENT,
                format!(
                    "no answer from {target} within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ),
                "check that the server runs and that no firewall drops the traffic",
            )]
        }
    };
    let facts = match read_facts(&mut conn).await {
        Ok(facts) => facts,
        Err(e) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("connected to {target}, but reading the server variables failed: {e}"),
                "see the server's error log",
            )]
        }
    };
    let mut findings = vec![encryption(&mut conn, &target, &facts.version, mode).await];
    findings.extend(evaluate(&facts));
    for mapped in mapped {
        findings.push(match read_table_facts(&mut conn, mapped).await {
            Ok(table) => mapped_table(mapped, &table),
            Err(e) => Finding::problem(
                COMPONENT,
                format!(
                    "reading the catalog of {}.{} failed: {e}",
                    mapped.database, mapped.table
                ),
                "the user needs SELECT on the table (information_schema shows only what it may read)",
            ),
        });
    }
    if let Some(signal) = signal {
        findings.push(match super::signal::check_table(&mut conn, signal).await {
            Ok(()) => Finding::ok(
                COMPONENT,
                format!("signal table {signal}: ad-hoc snapshots can be asked (`fhir-cdc snapshot`; the asking user needs INSERT on it)"),
            ),
            Err(problem) => Finding::problem(
                COMPONENT,
                format!("the signal table {signal} (signal.data.collection) {problem}"),
                format!("create it: {}", super::signal::ddl(signal)),
            ),
        });
    }
    // Closing is a courtesy; the checks are done either way.
    let _ = conn.disconnect().await;
    findings
}

async fn read_table_facts(
    conn: &mut Conn,
    mapped: &MappedTable,
) -> Result<TableFacts, mysql_async::Error> {
    let columns: Vec<(String, String)> = conn
        .exec(
            "SELECT COLUMN_NAME, COLUMN_KEY FROM information_schema.COLUMNS
              WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (&mapped.database, &mapped.table),
        )
        .await?;
    let (primary_key, unique_index) =
        super::chunk_key(conn, &mapped.database, &mapped.table).await?;
    let spelled = if columns.is_empty() {
        conn.exec_first(
            "SELECT CONCAT(TABLE_SCHEMA, '.', TABLE_NAME) FROM information_schema.TABLES
              WHERE LOWER(TABLE_SCHEMA) = LOWER(?) AND LOWER(TABLE_NAME) = LOWER(?)
                AND NOT (TABLE_SCHEMA = ? AND TABLE_NAME = ?) LIMIT 1",
            (
                &mapped.database,
                &mapped.table,
                &mapped.database,
                &mapped.table,
            ),
        )
        .await?
    } else {
        None
    };
    let select_refused = if columns.is_empty() {
        None
    } else {
        let probe = format!(
            "SELECT * FROM {}.{} LIMIT 0",
            super::quote_ident(&mapped.database),
            super::quote_ident(&mapped.table)
        );
        conn.query_drop(probe).await.err().map(|e| e.to_string())
    };
    Ok(TableFacts {
        columns: columns.into_iter().map(|(name, _)| name).collect(),
        primary_key,
        unique_index,
        select_refused,
        spelled,
    })
}

/// Judge a mapped table: it exists, the user may read it, the mapping's key columns are
/// among its columns, and it has a primary key for chunked snapshots.
pub fn mapped_table(mapped: &MappedTable, facts: &TableFacts) -> Finding {
    let name = format!("{}.{}", mapped.database, mapped.table);
    if let (true, Some(spelled)) = (facts.columns.is_empty(), &facts.spelled) {
        return crate::source::case_only(COMPONENT, &name, spelled);
    }
    if facts.columns.is_empty() {
        return Finding::problem(
            COMPONENT,
            format!("{name}, which a mapping reads, does not exist or the user may not see it"),
            format!("create the table, correct `source.table` in its mapping, or GRANT SELECT ON {name} TO the connector's user"),
        );
    }
    if let Some(refusal) = &facts.select_refused {
        return Finding::problem(
            COMPONENT,
            format!("the user may not read {name}: {refusal}"),
            format!("run GRANT SELECT ON {name} TO the connector's user"),
        );
    }
    let missing: Vec<&str> = mapped
        .key
        .iter()
        .filter(|k| !facts.columns.iter().any(|c| c.eq_ignore_ascii_case(k)))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Finding::problem(
            COMPONENT,
            format!(
                "{name} has no column {} of the mapping's key",
                missing.join(", ")
            ),
            "correct `source.key` in the mapping to the table's identifying columns",
        );
    }
    // Column names are case-insensitive on MySQL and MariaDB.
    let absent: Vec<&str> = mapped
        .columns
        .iter()
        .filter(|read| !facts.columns.iter().any(|c| c.eq_ignore_ascii_case(read)))
        .map(String::as_str)
        .collect();
    if !absent.is_empty() {
        return crate::source::absent_columns(COMPONENT, &name, &absent);
    }
    if facts.primary_key.is_empty() {
        return Finding::warning(
            COMPONENT,
            format!(
                "{name} has neither a primary key nor a UNIQUE index of NOT NULL columns: changes are identified by the mapping's key ({}), but a snapshot reads the table in one pass instead of in chunks",
                mapped.key.join(", ")
            ),
            format!("nothing, if {name} is small; if it is large, a UNIQUE index on NOT NULL columns lets snapshots read it in chunks"),
        );
    }
    if let Some(index) = &facts.unique_index {
        return Finding::ok(
            COMPONENT,
            format!(
                "{name} is readable; no primary key, snapshots chunk by its unique index {index} ({})",
                facts.primary_key.join(", ")
            ),
        );
    }
    Finding::ok(
        COMPONENT,
        format!(
            "{name} is readable, primary key ({})",
            facts.primary_key.join(", ")
        ),
    )
}

async fn read_facts(conn: &mut Conn) -> Result<ServerFacts, mysql_async::Error> {
    let (version, log_bin, binlog_format, binlog_row_image, server_id): (
        String,
        u8,
        String,
        String,
        u32,
    ) = conn
        .query_first(
            "SELECT @@version, @@log_bin, @@binlog_format, @@binlog_row_image, @@server_id",
        )
        .await?
        .unwrap_or_default();
    // Older servers lack the variable; that is a finding, not a failure.
    let binlog_row_metadata: Option<String> = conn
        .query_first("SELECT @@binlog_row_metadata")
        .await
        .unwrap_or(None);
    let grants: Vec<String> = conn.query("SHOW GRANTS FOR CURRENT_USER()").await?;
    Ok(ServerFacts {
        version,
        log_bin: log_bin == 1,
        binlog_format,
        binlog_row_image,
        binlog_row_metadata,
        server_id,
        grants,
    })
}

/// Judge the facts: one finding per prerequisite.
pub fn evaluate(facts: &ServerFacts) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.push(if facts.log_bin {
        Finding::ok(COMPONENT, "binary log is on")
    } else {
        Finding::problem(
            COMPONENT,
            "the binary log is off (log_bin = OFF): there is no change stream to read",
            "set log_bin (and server_id) in the server configuration and restart it",
        )
    });
    findings.push(if facts.binlog_format.eq_ignore_ascii_case("ROW") {
        Finding::ok(COMPONENT, "binlog_format = ROW")
    } else {
        Finding::problem(
            COMPONENT,
            format!("binlog_format = {}, but change capture needs ROW events", facts.binlog_format),
            "set binlog_format = ROW in the server configuration (SET GLOBAL binlog_format = 'ROW' takes effect for new sessions)",
        )
    });
    findings.push(if facts.binlog_row_image.eq_ignore_ascii_case("FULL") {
        Finding::ok(COMPONENT, "binlog_row_image = FULL")
    } else {
        Finding::problem(
            COMPONENT,
            format!(
                "binlog_row_image = {}: row events would miss unchanged columns",
                facts.binlog_row_image
            ),
            "set binlog_row_image = FULL in the server configuration",
        )
    });
    findings.push(match facts.binlog_row_metadata.as_deref() {
        Some(m) if m.eq_ignore_ascii_case("FULL") => Finding::ok(COMPONENT, "binlog_row_metadata = FULL"),
        other => Finding::problem(
            COMPONENT,
            format!(
                "binlog_row_metadata = {}: the binary log lacks the column names, so the connector cannot read rows (it parses no DDL) and refuses to start",
                other.unwrap_or("unsupported")
            ),
            "set binlog_row_metadata = FULL (MySQL 8.0.1+, MariaDB 10.5+): SET GLOBAL binlog_row_metadata = 'FULL' and in the server's configuration",
        ),
    });
    findings.push(if facts.server_id != 0 {
        Finding::ok(COMPONENT, format!("server_id = {}", facts.server_id))
    } else {
        Finding::problem(
            COMPONENT,
            "server_id = 0: the server does not serve replicas",
            "set a non-zero server_id and restart",
        )
    });
    let granted = |privileges: &[&str]| {
        facts.grants.iter().any(|g| {
            let g = g.to_ascii_uppercase();
            (g.contains("ALL PRIVILEGES ON *.*"))
                || privileges
                    .iter()
                    .any(|p| g.contains(p) && g.contains(" ON *.*"))
        })
    };
    findings.push(if granted(&["REPLICATION SLAVE", "REPLICATION REPLICA"]) {
        Finding::ok(
            COMPONENT,
            "user may read the binary log (REPLICATION SLAVE)",
        )
    } else {
        Finding::problem(
            COMPONENT,
            "the user lacks REPLICATION SLAVE and cannot read the binary log",
            "run GRANT REPLICATION SLAVE ON *.* TO the connector's user",
        )
    });
    findings.push(if granted(&["REPLICATION CLIENT", "BINLOG MONITOR"]) {
        Finding::ok(COMPONENT, "user may list binary logs (REPLICATION CLIENT)")
    } else {
        Finding::problem(
            COMPONENT,
            "the user lacks REPLICATION CLIENT (MariaDB: BINLOG MONITOR) and cannot find the current log position",
            "run GRANT REPLICATION CLIENT ON *.* TO the connector's user",
        )
    });
    findings
}

/// The first finding: connected, and how the connection is protected.
async fn encryption(conn: &mut Conn, target: &str, version: &str, mode: SslMode) -> Finding {
    let tls: Option<(String, String)> = conn
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_version'")
        .await
        .ok()
        .flatten();
    let Some(tls) = tls.map(|(_, v)| v).filter(|v| !v.is_empty()) else {
        return Finding::warning(
            COMPONENT,
            format!("connected to {target} ({version}), unencrypted"),
            "give the server ssl_cert and ssl_key, and set ssl-mode=VERIFY_IDENTITY with ssl-ca in source.url: rows of patient data cross this connection",
        );
    };
    let verified = match mode {
        SslMode::VerifyIdentity => "certificate and host name verified",
        SslMode::VerifyCa => "certificate verified, host name not",
        _ => "the server's certificate not verified (ssl-mode=VERIFY_IDENTITY verifies it)",
    };
    Finding::ok(
        COMPONENT,
        format!("connected to {target} ({version}, {tls}, {verified})"),
    )
}

fn explain_connect_error(err: &mysql_async::Error, target: &str, user: &str) -> Finding {
    // rustls's refusals come as I/O errors that carry a rustls error.
    let tls = match err {
        mysql_async::Error::Io(mysql_async::IoError::Tls(tls)) => Some(tls.to_string()),
        mysql_async::Error::Io(mysql_async::IoError::Io(io)) => io
            .get_ref()
            .filter(|inner| inner.is::<rustls::Error>())
            .map(|inner| inner.to_string()),
        _ => None,
    };
    if let Some(tls) = tls {
        return Finding::problem(
            COMPONENT,
            format!("TLS with {target} failed: {tls}"),
            "the server's certificate must be signed by the CA in ssl-ca (and, with VERIFY_IDENTITY, name the host source.url connects to)",
        );
    }
    if let mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer) = err {
        return Finding::problem(
            COMPONENT,
            format!("{target} offers no TLS"),
            "give the server ssl_cert and ssl_key (and restart it), or drop ssl-mode from source.url",
        );
    }
    if let mysql_async::Error::Server(server) = err {
        return match server.code {
            // ER_ACCESS_DENIED_ERROR
            1045 => Finding::problem(
                COMPONENT,
                format!("authentication failed at {target}: {}", server.message),
                format!(
                    "check the password of {user} in source.url, and the host part of its account"
                ),
            ),
            // ER_BAD_DB_ERROR
            1049 => Finding::problem(
                COMPONENT,
                format!("{target}: {}", server.message),
                "correct the database name in source.url",
            ),
            code => Finding::problem(
                COMPONENT,
                format!(
                    "{target} refused the connection: {} (error {code})",
                    server.message
                ),
                "see the server's error log",
            ),
        };
    }
    preflight::unreachable(COMPONENT, "the MySQL/MariaDB server", target, err).unwrap_or_else(
        || {
            Finding::problem(
                COMPONENT,
                format!("cannot connect to {target}: {err}"),
                "check that the server runs, and the host and port in source.url",
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::Severity;

    fn healthy() -> ServerFacts {
        ServerFacts {
            version: "10.11.6-MariaDB".into(),
            log_bin: true,
            binlog_format: "ROW".into(),
            binlog_row_image: "FULL".into(),
            binlog_row_metadata: Some("FULL".into()),
            server_id: 1,
            grants: vec![
                "GRANT SELECT, REPLICATION SLAVE, BINLOG MONITOR ON *.* TO `cdc`@`%`".into(),
            ],
        }
    }

    fn not_ok(facts: &ServerFacts) -> Vec<Finding> {
        evaluate(facts)
            .into_iter()
            .filter(|f| f.severity != Severity::Ok)
            .collect()
    }

    fn charge() -> (MappedTable, TableFacts) {
        (
            MappedTable {
                database: "billing".into(),
                table: "charge".into(),
                key: vec!["charge_id".into()],
                columns: vec!["charge_id".into(), "AMOUNT".into()],
            },
            TableFacts {
                columns: vec!["charge_id".into(), "amount".into()],
                primary_key: vec!["charge_id".into()],
                unique_index: None,
                select_refused: None,
                spelled: None,
            },
        )
    }

    #[test]
    fn a_mapped_table_is_judged_by_existence_grant_key_and_primary_key() {
        let (mapped, facts) = charge();
        assert_eq!(mapped_table(&mapped, &facts).severity, Severity::Ok);
        let gone = TableFacts {
            columns: vec![],
            ..facts.clone()
        };
        let finding = mapped_table(&mapped, &gone);
        assert_eq!(finding.severity, Severity::Problem);
        assert!(finding.summary.contains("billing.charge"));
        let other_case = TableFacts {
            spelled: Some("billing.CHARGE".into()),
            ..gone.clone()
        };
        let finding = mapped_table(&mapped, &other_case);
        assert!(
            finding
                .summary
                .contains("billing.CHARGE differs only in case"),
            "{}",
            finding.summary
        );
        let refused = TableFacts {
            select_refused: Some("SELECT command denied".into()),
            ..facts.clone()
        };
        assert!(mapped_table(&mapped, &refused)
            .fix
            .as_deref()
            .unwrap_or("")
            .contains("GRANT SELECT ON billing.charge"));
        let wrong_key = MappedTable {
            key: vec!["charge_no".into()],
            ..mapped.clone()
        };
        let finding = mapped_table(&wrong_key, &facts);
        assert_eq!(finding.severity, Severity::Problem);
        assert!(finding.summary.contains("charge_no"));
        // Read columns compare as the server does (case-insensitively); one it lacks would
        // dead-letter every row.
        let reads_more = MappedTable {
            columns: vec!["charge_id".into(), "posted_by".into()],
            ..mapped.clone()
        };
        let finding = mapped_table(&reads_more, &facts);
        assert_eq!(finding.severity, Severity::Problem);
        assert!(
            finding.summary.contains("no column posted_by"),
            "{}",
            finding.summary
        );
        let keyless = TableFacts {
            primary_key: vec![],
            ..facts
        };
        assert_eq!(mapped_table(&mapped, &keyless).severity, Severity::Warning);
    }

    #[test]
    fn a_ready_server_has_no_findings_but_ok() {
        assert!(not_ok(&healthy()).is_empty());
    }

    #[test]
    fn each_missing_prerequisite_is_named_with_its_fix() {
        type Case = (fn(&mut ServerFacts), Severity, &'static str);
        let cases: [Case; 7] = [
            (
                |f| f.log_bin = false,
                Severity::Problem,
                "binary log is off",
            ),
            (
                |f| f.binlog_format = "STATEMENT".into(),
                Severity::Problem,
                "binlog_format = STATEMENT",
            ),
            (
                |f| f.binlog_row_image = "MINIMAL".into(),
                Severity::Problem,
                "binlog_row_image = MINIMAL",
            ),
            (
                |f| f.binlog_row_metadata = None,
                Severity::Problem,
                "binlog_row_metadata = unsupported",
            ),
            (|f| f.server_id = 0, Severity::Problem, "server_id = 0"),
            (
                |f| f.grants = vec!["GRANT SELECT, BINLOG MONITOR ON *.* TO x".into()],
                Severity::Problem,
                "REPLICATION SLAVE",
            ),
            (
                |f| f.grants = vec!["GRANT REPLICATION SLAVE ON *.* TO x".into()],
                Severity::Problem,
                "REPLICATION CLIENT",
            ),
        ];
        for (break_it, severity, summary) in cases {
            let mut facts = healthy();
            break_it(&mut facts);
            let found = not_ok(&facts);
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].severity, severity);
            assert!(found[0].summary.contains(summary), "{:?}", found[0]);
            assert!(found[0].fix.is_some());
        }
    }

    #[test]
    fn grants_on_one_database_do_not_count_as_global() {
        let mut facts = healthy();
        facts.grants = vec![
            "GRANT ALL PRIVILEGES ON `lab`.* TO x".into(),
            "GRANT REPLICATION SLAVE ON `lab`.* TO x".into(),
        ];
        assert_eq!(not_ok(&facts).len(), 2);
    }
}
