//! What a PostgreSQL database must offer before fhir-cdc can capture its changes, checked
//! against the live server.
//!
//! Logical decoding needs `wal_level = logical`
//! (<https://www.postgresql.org/docs/current/runtime-config-wal.html#GUC-WAL-LEVEL>), a role
//! with the `REPLICATION` attribute (or superuser) to open a replication connection, a free
//! replication slot and a free WAL sender
//! (<https://www.postgresql.org/docs/current/logical-replication-config.html>), and
//! PostgreSQL 10 or newer for `pgoutput`.

use std::time::Duration;

use tokio_postgres::{config::Host, error::SqlState, Client, Config};

use crate::{
    config::Secret,
    postgres::{ConnectError, SslMode, Target},
    preflight::{self, Finding},
};

const COMPONENT: &str = "postgres";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The server settings and role attributes the checks judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub server_version_num: i32,
    pub server_version: String,
    pub wal_level: String,
    pub max_replication_slots: i32,
    pub replication_slots_used: i32,
    pub max_wal_senders: i32,
    pub role: String,
    pub role_can_replicate: bool,
}

/// What `run` will capture: the mapped tables, the slot and the publication.
#[derive(Debug, Clone)]
pub struct Capture {
    pub tables: Vec<(String, String)>,
    /// The columns the mappings read, by table (`schema.table`).
    pub columns: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    /// The tables mappings make resources of (`schema.table`); the others are read
    /// through lookups only.
    pub mapped: Vec<String>,
    pub slot: String,
    pub publication: String,
}

/// Connect with `url` (the setting `field`): the client, the parsed URL and the server as
/// messages name it; or the problem, with its fix.
pub async fn reach(url: &Secret, field: &str) -> Result<(Client, Target, String), Finding> {
    let mut parsed = Target::parse(url).map_err(|e| {
        Finding::problem(
            COMPONENT,
            format!("{field} is not a valid PostgreSQL connection string: {e}"),
            "use postgres://user:password@host:port/database?sslmode=verify-full&sslrootcert=/path/ca.pem",
        )
    })?;
    parsed.config.connect_timeout(CONNECT_TIMEOUT);
    let target = describe_target(&parsed.config);
    match parsed.connect().await {
        Ok(client) => Ok((client, parsed, target)),
        Err(ConnectError::Setup(e)) => Err(Finding::problem(
            COMPONENT,
            format!("{field}: {e}"),
            "point sslrootcert, sslcert and sslkey at readable PEM files",
        )),
        Err(ConnectError::Postgres(e)) => Err(explain_connect_error(&e, &target, &parsed)),
    }
}

/// Connect with `url` and check every prerequisite of logical replication, and, given
/// `capture`, the state of the mapped tables, the slot and the publication.
pub async fn check(url: &Secret, capture: Option<&Capture>) -> Vec<Finding> {
    let (client, parsed, target) = match reach(url, "source.url").await {
        Ok(reached) => reached,
        Err(finding) => return vec![finding],
    };
    let row = match client.query_one(FACTS_QUERY, &[]).await {
        Ok(row) => row,
        Err(e) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("connected to {target}, but reading the server settings failed: {e}"),
                "the role needs to read pg_settings, pg_roles and pg_replication_slots",
            )]
        }
    };
    let facts = ServerFacts {
        server_version_num: row.get(0),
        server_version: row.get(1),
        wal_level: row.get(2),
        max_replication_slots: row.get(3),
        replication_slots_used: row.get(4),
        max_wal_senders: row.get(5),
        role: row.get(6),
        role_can_replicate: row.get(7),
    };
    let mut findings = vec![match encryption(&client, &parsed).await {
        Ok(tls) => Finding::ok(
            COMPONENT,
            format!(
                "connected to {target} (PostgreSQL {}, {tls})",
                facts.server_version
            ),
        ),
        Err(why) => Finding::warning(
            COMPONENT,
            format!("connected to {target} (PostgreSQL {}), {why}", facts.server_version),
            "turn ssl on at the server and set sslmode=verify-full with sslrootcert in source.url: rows of patient data cross this connection",
        ),
    }];
    findings.extend(evaluate(&facts));
    if let Some(capture) = capture {
        findings.extend(check_capture(&client, capture).await);
    }
    findings
}

async fn check_capture(client: &Client, capture: &Capture) -> Vec<Finding> {
    let mut findings = Vec::new();
    let failed = |what: &str, e: tokio_postgres::Error| {
        Finding::problem(
            COMPONENT,
            format!("reading {what} failed: {e}"),
            "the role needs to read pg_class, pg_publication_tables and pg_replication_slots",
        )
    };
    for (schema, table) in &capture.tables {
        match identity(client, schema, table).await {
            Ok(None) => match spelled_otherwise(client, schema, table).await {
                Ok(Some(spelled)) => findings.push(crate::source::case_only(
                    COMPONENT,
                    &format!("{schema}.{table}"),
                    &spelled,
                )),
                Ok(None) => findings.push(replica_identity(schema, table, None)),
                Err(e) => return vec![failed("the mapped tables", e)],
            },
            // Updates of a table read only through lookups are never suppressed: the key
            // is all they need.
            Ok(Some(Identity::Key)) if !capture.mapped.contains(&format!("{schema}.{table}")) => {
                findings.push(Finding::ok(
                    COMPONENT,
                    format!("{schema}.{table}: REPLICA IDENTITY DEFAULT (read through lookups only: the key is enough)"),
                ));
            }
            Ok(identity) => findings.push(replica_identity(schema, table, identity)),
            Err(e) => return vec![failed("the mapped tables", e)],
        }
        let name = format!("{schema}.{table}");
        let read = capture.columns.get(&name).into_iter().flatten();
        match columns(client, schema, table).await {
            // An absent table is its own finding above.
            Ok(has) if has.is_empty() => {}
            Ok(has) => {
                // Names compare exactly: PostgreSQL keeps a quoted name's case.
                let absent: Vec<&str> = read
                    .filter(|c| !has.contains(*c))
                    .map(String::as_str)
                    .collect();
                if !absent.is_empty() {
                    findings.push(crate::source::absent_columns(COMPONENT, &name, &absent));
                }
            }
            Err(e) => return vec![failed("the mapped tables' columns", e)],
        }
    }
    match client
        .query_opt(
            // wal_status is PostgreSQL 13+: read through to_jsonb, NULL before.
            "SELECT active, confirmed_flush_lsn::text, to_jsonb(s) ->> 'wal_status',
                    pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn))
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[&capture.slot],
        )
        .await
    {
        Ok(None) => findings.push(Finding::ok(
            COMPONENT,
            format!("slot {} does not exist yet: `run` creates it", capture.slot),
        )),
        Ok(Some(row)) => findings.push(slot_finding(
            &capture.slot,
            row.get(0),
            row.get::<_, Option<String>>(1).as_deref().unwrap_or("?"),
            row.get(2),
            row.get::<_, Option<String>>(3).as_deref().unwrap_or("?"),
        )),
        Err(e) => findings.push(failed("the replication slots", e)),
    }
    match client
        .query("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1", &[&capture.publication])
        .await
    {
        Ok(rows) => {
            let published: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let exists = !published.is_empty()
                || client
                    .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&capture.publication])
                    .await
                    .ok()
                    .flatten()
                    .is_some();
            if !exists {
                findings.push(Finding::ok(COMPONENT, format!("publication {} does not exist yet: `run` creates it for the mapped tables", capture.publication)));
            }
            for (schema, table) in capture.tables.iter().filter(|t| exists && !published.contains(t)) {
                findings.push(Finding::problem(
                    COMPONENT,
                    format!("publication {} does not include {schema}.{table}, which a mapping reads", capture.publication),
                    format!("run ALTER PUBLICATION {} ADD TABLE {};", super::quote_ident(&capture.publication), super::quote_table(schema, table)),
                ));
            }
        }
        Err(e) => findings.push(failed("the publication", e)),
    }
    findings
}

/// How a table's updates and deletes name their row in the WAL (its replica identity),
/// which decides what capture sees and whether publishing the table is safe at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// `REPLICA IDENTITY FULL`: the whole old row.
    Full,
    /// `REPLICA IDENTITY USING INDEX` of an index that exists.
    Index,
    /// `REPLICA IDENTITY DEFAULT` with a primary key: the old key.
    Key,
    /// `REPLICA IDENTITY DEFAULT` without a primary key: none.
    DefaultWithoutKey,
    /// `REPLICA IDENTITY NOTHING`, or `USING INDEX` of an index since dropped: none.
    Nothing,
}

impl Identity {
    fn of(relreplident: &str, primary_key: bool, identity_index: bool) -> Self {
        match relreplident {
            "f" => Identity::Full,
            "i" if identity_index => Identity::Index,
            "d" if primary_key => Identity::Key,
            "d" => Identity::DefaultWithoutKey,
            _ => Identity::Nothing,
        }
    }

    /// Whether publishing the table makes the application's own UPDATEs and DELETEs on it
    /// fail (`cannot update table … because it does not have a replica identity and
    /// publishes updates`).
    pub fn breaks_updates(self) -> bool {
        matches!(self, Identity::DefaultWithoutKey | Identity::Nothing)
    }
}

/// The replica identity of `schema.table`, `None` when there is no such table.
pub async fn identity(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<Identity>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await?;
    Ok(row.map(|r| Identity::of(r.get(0), r.get(1), r.get(2))))
}

/// The table that `schema.table` names but for the case of its letters, as the catalogue
/// spells it (`LAB.RESULT` for `lab.result`), if there is one.
async fn spelled_otherwise(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text || '.' || c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE lower(n.nspname) = lower($1) AND lower(c.relname) = lower($2)
                AND c.relkind IN ('r', 'p') LIMIT 1",
            &[&schema, &table],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The columns `schema.table` has (none when there is no such table).
async fn columns(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &table],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What a table's replica identity means for capture.
pub fn replica_identity(schema: &str, table: &str, identity: Option<Identity>) -> Finding {
    let name = format!("{schema}.{table}");
    // The fix names the table as the catalogue spells it: `LAB.CATALOG` unquoted is lab.catalog.
    let quoted = super::quote_table(schema, table);
    let unsafe_fix = format!(
        "run ALTER TABLE {quoted} REPLICA IDENTITY FULL; (or give it a primary key) before `run` publishes it"
    );
    match identity {
        None => Finding::problem(
            COMPONENT,
            format!("table {name} does not exist, but a mapping reads it"),
            "create the table, or correct `source.table` in the mapping",
        ),
        Some(Identity::Full) => Finding::ok(COMPONENT, format!("{name}: REPLICA IDENTITY FULL (old rows complete)")),
        Some(Identity::Index) => Finding::ok(COMPONENT, format!("{name}: REPLICA IDENTITY USING INDEX")),
        Some(Identity::DefaultWithoutKey) => Finding::problem(
            COMPONENT,
            format!("{name}: REPLICA IDENTITY DEFAULT without a primary key: once the table is published, the application's UPDATEs and DELETEs on it fail"),
            unsafe_fix,
        ),
        Some(Identity::Nothing) => Finding::problem(
            COMPONENT,
            format!("{name}: REPLICA IDENTITY NOTHING (or USING INDEX of a dropped index): once the table is published, the application's UPDATEs and DELETEs on it fail"),
            unsafe_fix,
        ),
        Some(Identity::Key) => Finding::warning(
            COMPONENT,
            format!("{name}: REPLICA IDENTITY DEFAULT: updates carry only the key, so updates that change no mapped content cannot be suppressed and unchanged TOASTed values cannot be filled"),
            format!("run ALTER TABLE {quoted} REPLICA IDENTITY FULL; (more WAL per update)"),
        ),
    }
}

const FACTS_QUERY: &str = "
    SELECT current_setting('server_version_num')::int,
           current_setting('server_version'),
           current_setting('wal_level'),
           current_setting('max_replication_slots')::int,
           (SELECT count(*) FROM pg_replication_slots)::int,
           current_setting('max_wal_senders')::int,
           current_user::text,
           (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)";

/// Judge the facts: one finding per prerequisite.
pub fn evaluate(facts: &ServerFacts) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.push(if facts.server_version_num >= 100_000 {
        Finding::ok(COMPONENT, "server version supports pgoutput (10 or newer)")
    } else {
        Finding::problem(
            COMPONENT,
            format!(
                "PostgreSQL {} is too old: pgoutput needs 10 or newer",
                facts.server_version
            ),
            "upgrade the server",
        )
    });
    findings.push(if facts.wal_level == "logical" {
        Finding::ok(COMPONENT, "wal_level = logical")
    } else {
        Finding::problem(
            COMPONENT,
            format!("wal_level = {}, but logical decoding needs wal_level = logical", facts.wal_level),
            "run ALTER SYSTEM SET wal_level = logical; as a superuser (or set it in postgresql.conf), then restart PostgreSQL",
        )
    });
    findings.push(if facts.role_can_replicate {
        Finding::ok(
            COMPONENT,
            format!("role {} may open replication connections", facts.role),
        )
    } else {
        Finding::problem(
            COMPONENT,
            format!("role {} lacks the REPLICATION attribute", facts.role),
            format!(
                "run ALTER ROLE {} WITH REPLICATION; as a superuser",
                facts.role
            ),
        )
    });
    let free_slots = facts.max_replication_slots - facts.replication_slots_used;
    findings.push(if free_slots > 0 {
        Finding::ok(
            COMPONENT,
            format!("{free_slots} of {} replication slots free", facts.max_replication_slots),
        )
    } else {
        Finding::problem(
            COMPONENT,
            format!(
                "no free replication slot ({} of max_replication_slots = {} in use)",
                facts.replication_slots_used, facts.max_replication_slots
            ),
            "raise max_replication_slots and restart, or drop a slot that is no longer used (SELECT pg_drop_replication_slot(name))",
        )
    });
    findings.push(if facts.max_wal_senders > 0 {
        Finding::ok(
            COMPONENT,
            format!("max_wal_senders = {}", facts.max_wal_senders),
        )
    } else {
        Finding::problem(
            COMPONENT,
            "max_wal_senders = 0: no replication connection can be opened",
            "set max_wal_senders to at least 2 in postgresql.conf and restart PostgreSQL",
        )
    });
    findings
}

/// `host:port/database as user`, never the password.
fn describe_target(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config.get_dbname().or(config.get_user()).unwrap_or("?");
    format!(
        "{host}:{port}/{database} as {}",
        config.get_user().unwrap_or("?")
    )
}

/// How the connection is encrypted (`TLSv1.3, certificate verified with its host name`),
/// or why it is not.
async fn encryption(client: &Client, target: &Target) -> Result<String, String> {
    let row = client
        .query_opt(
            "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
            &[],
        )
        .await
        .map_err(|e| format!("but whether it is encrypted could not be read: {e}"))?;
    let unix = matches!(target.config.get_hosts().first(), Some(Host::Unix(_)));
    let Some(row) = row else {
        return match (unix, target.tls.mode) {
            (true, _) => Ok("over a Unix socket, unencrypted".into()),
            (false, SslMode::Disable) => Err("unencrypted: sslmode=disable".into()),
            (false, _) => {
                Err("unencrypted: the server offers no TLS and sslmode=prefer let that pass".into())
            }
        };
    };
    let version: String = row.get(0);
    Ok(match target.tls.effective_mode() {
        SslMode::VerifyFull => format!("{version}, certificate and host name verified"),
        SslMode::VerifyCa => format!("{version}, certificate verified, host name not"),
        _ => format!(
            "{version}, the server's certificate not verified (sslmode=verify-full verifies it)"
        ),
    })
}

fn explain_connect_error(err: &tokio_postgres::Error, target: &str, parsed: &Target) -> Finding {
    let user = parsed.config.get_user().unwrap_or("?");
    if let Some(db) = err.as_db_error() {
        let code = db.code();
        if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            && db.message().contains("no encryption")
        {
            return Finding::problem(
                COMPONENT,
                format!(
                    "{target} admits role {user} only over TLS: {}",
                    db.message()
                ),
                "set sslmode=verify-full (or require) in source.url",
            );
        }
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            if db.message().contains("client certificate") {
                return Finding::problem(
                    COMPONENT,
                    format!("authentication failed at {target}: {}", db.message()),
                    format!("set sslcert and sslkey in source.url to a certificate of the server's CA made out to {user}"),
                );
            }
            return Finding::problem(
                COMPONENT,
                format!("authentication failed at {target}: {}", db.message()),
                format!("check the password of role {user} in source.url, and that pg_hba.conf admits it from this host"),
            );
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return Finding::problem(
                COMPONENT,
                format!("{target}: {}", db.message()),
                "correct the database name in source.url",
            );
        }
        return Finding::problem(
            COMPONENT,
            format!(
                "{target} refused the connection: {} (SQLSTATE {})",
                db.message(),
                code.code()
            ),
            "see the PostgreSQL server log for details",
        );
    }
    if err
        .to_string()
        .starts_with("error performing TLS handshake")
    {
        let why = std::error::Error::source(err).map_or(String::new(), |s| s.to_string());
        return Finding::problem(
            COMPONENT,
            format!("TLS with {target} failed: {why}"),
            match parsed.tls.effective_mode() {
                SslMode::VerifyFull => "the server's certificate must be signed by a CA in sslrootcert and name the host source.url connects to; sslmode=verify-ca skips the name",
                SslMode::VerifyCa => "the server's certificate must be signed by a CA in sslrootcert",
                _ => "turn ssl on at the server, or lower sslmode",
            },
        );
    }
    preflight::unreachable(COMPONENT, "PostgreSQL", target, err).unwrap_or_else(|| {
        Finding::problem(
            COMPONENT,
            format!("cannot connect to {target}: {err}"),
            "check that PostgreSQL runs, and the host, port and TLS settings in source.url",
        )
    })
}

/// What an existing slot means for `run`: whether it can resume, and how much WAL it makes
/// the server keep (all of it since the connector last confirmed a position).
fn slot_finding(
    slot: &str,
    active: bool,
    confirmed: &str,
    wal_status: Option<&str>,
    retained: &str,
) -> Finding {
    match wal_status {
        Some("lost") => Finding::problem(
            COMPONENT,
            format!("slot {slot} was invalidated: the server removed WAL it still needed (max_slot_wal_keep_size), so the changes after {confirmed} are gone from the log"),
            format!("set snapshot.mode = \"when_needed\" (`run` drops the slot and takes a new snapshot), or drop it yourself (SELECT pg_drop_replication_slot('{slot}');) and use \"initial\""),
        ),
        _ if active => Finding::warning(
            COMPONENT,
            format!("slot {slot} is in use by another process"),
            "stop the other connector first: a slot has one reader",
        ),
        Some("unreserved") => Finding::warning(
            COMPONENT,
            format!("slot {slot} holds {retained} of WAL, beyond max_slot_wal_keep_size: the server may remove it at the next checkpoint"),
            "start the connector now, or the slot is lost and the tables must be captured again",
        ),
        _ => Finding::ok(
            COMPONENT,
            format!("slot {slot} exists; `run` resumes after {confirmed} (the server keeps {retained} of WAL for it)"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preflight::Severity;

    fn healthy() -> ServerFacts {
        ServerFacts {
            server_version_num: 150_000,
            server_version: "15.0".into(),
            wal_level: "logical".into(),
            max_replication_slots: 10,
            replication_slots_used: 2,
            max_wal_senders: 10,
            role: "cdc".into(),
            role_can_replicate: true,
        }
    }

    fn problems(facts: &ServerFacts) -> Vec<Finding> {
        evaluate(facts)
            .into_iter()
            .filter(|f| f.severity == Severity::Problem)
            .collect()
    }

    #[test]
    fn replica_identities_are_judged() {
        for (relreplident, primary_key, index, identity, severity) in [
            ("f", false, false, Identity::Full, Severity::Ok),
            ("i", true, true, Identity::Index, Severity::Ok),
            ("i", true, false, Identity::Nothing, Severity::Problem),
            ("d", true, false, Identity::Key, Severity::Warning),
            (
                "d",
                false,
                false,
                Identity::DefaultWithoutKey,
                Severity::Problem,
            ),
            ("n", true, false, Identity::Nothing, Severity::Problem),
        ] {
            let judged = Identity::of(relreplident, primary_key, index);
            assert_eq!(judged, identity, "{relreplident} {primary_key} {index}");
            assert_eq!(judged.breaks_updates(), severity == Severity::Problem);
            assert_eq!(
                replica_identity("lis", "r", Some(judged)).severity,
                severity
            );
        }
        let missing = replica_identity("lis", "r", None);
        assert_eq!(missing.severity, Severity::Problem);
        assert!(missing.summary.contains("lis.r does not exist"));
    }

    #[test]
    fn a_ready_server_has_no_problems() {
        assert!(problems(&healthy()).is_empty());
    }

    #[test]
    fn each_missing_prerequisite_is_named_with_its_fix() {
        type Case = (fn(&mut ServerFacts), &'static str, &'static str);
        let cases: [Case; 5] = [
            (
                |f| f.wal_level = "replica".into(),
                "wal_level = replica",
                "ALTER SYSTEM SET wal_level = logical",
            ),
            (
                |f| f.role_can_replicate = false,
                "lacks the REPLICATION attribute",
                "ALTER ROLE cdc WITH REPLICATION",
            ),
            (
                |f| f.replication_slots_used = 10,
                "no free replication slot",
                "max_replication_slots",
            ),
            (
                |f| f.max_wal_senders = 0,
                "max_wal_senders = 0",
                "max_wal_senders",
            ),
            (|f| f.server_version_num = 90_600, "too old", "upgrade"),
        ];
        for (break_it, summary, fix) in cases {
            let mut facts = healthy();
            break_it(&mut facts);
            let found = problems(&facts);
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(found[0].summary.contains(summary), "{:?}", found[0]);
            assert!(
                found[0].fix.as_deref().unwrap().contains(fix),
                "{:?}",
                found[0]
            );
        }
    }

    #[test]
    fn a_slot_is_judged_by_whether_run_can_resume_from_it() {
        let judged = |active, status| slot_finding("cdc", active, "0/16B3748", status, "3 GB");
        let lost = judged(false, Some("lost"));
        assert_eq!(lost.severity, Severity::Problem);
        assert!(
            lost.summary.contains("after 0/16B3748 are gone"),
            "{lost:?}"
        );
        let fix = lost.fix.unwrap();
        assert!(fix.contains("when_needed") && fix.contains("pg_drop_replication_slot('cdc')"));
        let unreserved = judged(false, Some("unreserved"));
        assert_eq!(unreserved.severity, Severity::Warning);
        assert!(
            unreserved.summary.contains("holds 3 GB of WAL"),
            "{unreserved:?}"
        );
        assert_eq!(judged(true, Some("reserved")).severity, Severity::Warning);
        assert_eq!(judged(true, Some("lost")).severity, Severity::Problem);
        for status in [Some("reserved"), Some("extended"), None] {
            let fine = judged(false, status);
            assert_eq!(fine.severity, Severity::Ok);
            assert!(fine
                .summary
                .contains("resumes after 0/16B3748 (the server keeps 3 GB of WAL for it)"));
        }
    }
}
