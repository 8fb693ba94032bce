//! MySQL and MariaDB: the row-based binary log, read as a replica.

pub mod binlog;
pub mod capture;
pub mod gtid;
mod kind;
pub mod preflight;
mod rows;
pub mod signal;
pub mod snapshot;
pub mod tls;
pub mod types;

use mysql_async::{prelude::Queryable, Conn};

use crate::{change::BinlogPosition, config::Secret, source::SourceError};

use self::gtid::GtidPosition;

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum MysqlError {
    /// The network or the server's state: trying again later may succeed.
    #[error("{0}")]
    Transient(String),
    /// The setup, the privileges or the data: it stays so until someone changes it.
    #[error("{0}")]
    Definite(String),
    /// The server no longer has the binary log the connector must read from (purged).
    #[error("{0}")]
    LogGone(String),
}

impl MysqlError {
    pub fn connect(e: mysql_async::Error) -> Self {
        Self::classify("connecting to MySQL", &e)
    }

    /// `what` failed because of an error, classified.
    pub fn query(what: &str) -> impl Fn(mysql_async::Error) -> Self + '_ {
        move |e| Self::classify(what, &e)
    }

    fn classify(what: &str, e: &mysql_async::Error) -> Self {
        let message = format!("{what}: {}", error_text(e));
        match e {
            // 1236: the log position or GTID the replica asked for is not in the server's
            // binary logs any more.
            mysql_async::Error::Server(server) if server.code == 1236 => Self::LogGone(message),
            // Too many connections, lock wait and deadlock, shutting down, killed, lost.
            mysql_async::Error::Server(server)
                if [1040, 1053, 1205, 1213, 1927, 2006, 2013].contains(&server.code) =>
            {
                Self::Transient(message)
            }
            mysql_async::Error::Server(_) | mysql_async::Error::Url(_) => Self::Definite(message),
            mysql_async::Error::Driver(driver)
                if !matches!(driver, mysql_async::DriverError::ConnectionClosed) =>
            {
                Self::Definite(message)
            }
            _ => Self::Transient(message),
        }
    }
}

impl From<MysqlError> for SourceError {
    fn from(e: MysqlError) -> Self {
        match e {
            MysqlError::Transient(m) => SourceError::Transient(m),
            MysqlError::Definite(m) | MysqlError::LogGone(m) => SourceError::Connector(m),
        }
    }
}

/// The server's message and error code, or the client's error: never a statement's values.
pub fn error_text(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(server) => {
            format!("{} (error {})", server.message, server.code)
        }
        other => other.to_string(),
    }
}

/// The server's current end of the binary log and, when it has GTIDs, the position that
/// goes with it.
pub async fn current_position(
    conn: &mut Conn,
) -> Result<(BinlogPosition, Option<GtidPosition>), MysqlError> {
    let fail = MysqlError::query("reading the binary log position (SHOW MASTER STATUS; the user needs REPLICATION CLIENT, MariaDB: BINLOG MONITOR)");
    let row: Option<mysql_async::Row> = match conn.query_first("SHOW MASTER STATUS").await {
        Ok(row) => row,
        // MySQL 8.4 renamed it.
        Err(_) => conn
            .query_first("SHOW BINARY LOG STATUS")
            .await
            .map_err(&fail)?,
    };
    let row = row.ok_or_else(|| {
        MysqlError::Definite(
            "the server has no binary log (log_bin = OFF): set log_bin and server_id, then restart it".into(),
        )
    })?;
    let (file, offset): (String, u64) = (
        row.get(0).unwrap_or_default(),
        row.get(1).unwrap_or_default(),
    );
    let position = BinlogPosition::new(&file, offset)
        .map_err(|e| MysqlError::Definite(format!("the server's binary log: {e}")))?;
    let gtid = if is_mariadb(conn).await? {
        let text: Option<String> = conn
            .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (file.as_str(), offset))
            .await
            .map_err(&fail)?;
        text.map(|t| t.parse())
            .transpose()
            .map_err(MysqlError::Definite)?
    } else {
        // MySQL: the set executed, in the same row (empty when gtid_mode is off).
        row.get::<Option<String>, _>(4)
            .flatten()
            .filter(|s| !s.trim().is_empty())
            .map(|t| t.parse())
            .transpose()
            .map_err(MysqlError::Definite)?
    };
    Ok((position, gtid))
}

pub async fn is_mariadb(conn: &mut Conn) -> Result<bool, MysqlError> {
    let version: Option<String> = conn
        .query_first("SELECT @@version")
        .await
        .map_err(MysqlError::query("reading the server version"))?;
    Ok(version.is_some_and(|v| v.contains("MariaDB")))
}

/// The columns `database.table`'s rows are told apart and chunked by: its primary key, or
/// when it has none the first UNIQUE index whose columns are all NOT NULL (legacy tables
/// often have only that); empty when it has neither. With the index's name when it is not
/// the primary key.
pub async fn chunk_key(
    conn: &mut Conn,
    database: &str,
    table: &str,
) -> Result<(Vec<String>, Option<String>), mysql_async::Error> {
    // STATISTICS, not TABLE_CONSTRAINTS: MariaDB shows a user with only SELECT on a table
    // its indexes, but none of its constraints. NULLABLE is `YES` or empty.
    let rows: Vec<(String, Option<String>, String)> = conn
        .exec(
            "SELECT INDEX_NAME, COLUMN_NAME, NULLABLE FROM information_schema.STATISTICS
              WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND NON_UNIQUE = 0
              ORDER BY INDEX_NAME = 'PRIMARY' DESC, INDEX_NAME, SEQ_IN_INDEX",
            (database, table),
        )
        .await?;
    let mut indexes: Vec<(String, Vec<String>, bool)> = Vec::new();
    for (index, column, nullable) in rows {
        // A functional key part (MySQL 8) has no column: such an index cannot chunk.
        let usable = nullable != "YES" && column.is_some();
        let column = column.unwrap_or_default();
        match indexes.last_mut().filter(|(name, _, _)| *name == index) {
            Some((_, columns, all)) => {
                columns.push(column);
                *all &= usable;
            }
            None => indexes.push((index, vec![column], usable)),
        }
    }
    Ok(indexes
        .into_iter()
        .find(|(_, _, not_null)| *not_null)
        .map(|(index, columns, _)| {
            let named = (index != "PRIMARY").then_some(index);
            (columns, named)
        })
        .unwrap_or_default())
}

/// `` `name` `` with backquotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Why the server can no longer give the changes after `position` (with `gtid`), if it
/// cannot: its oldest binary log starts after them. MariaDB streams from a purged GTID
/// position without a word (it starts at its oldest log), so this is checked before
/// reading: by GTID, against the position its oldest log starts at; by file, against the
/// files it has.
pub async fn purged_since(
    conn: &mut Conn,
    position: &BinlogPosition,
    gtid: Option<&GtidPosition>,
) -> Result<Option<String>, MysqlError> {
    let fail = MysqlError::query("listing the binary logs (SHOW BINARY LOGS)");
    let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await.map_err(&fail)?;
    let files: Vec<String> = logs.iter().filter_map(|r| r.get(0)).collect();
    let Some(oldest) = files.first() else {
        return Ok(Some("the server has no binary logs".into()));
    };
    match gtid {
        Some(GtidPosition::Mariadb(stored)) => {
            let start: Option<String> = conn
                .exec_first("SELECT BINLOG_GTID_POS(?, 4)", (oldest.as_str(),))
                .await
                .map_err(&fail)?;
            let start: GtidPosition = start
                .unwrap_or_default()
                .parse()
                .map_err(MysqlError::Definite)?;
            let GtidPosition::Mariadb(start) = start else {
                return Ok(None);
            };
            for (domain, (server, sequence)) in start {
                let have = stored.get(&domain).map_or(0, |(_, s)| *s);
                if have < sequence {
                    return Ok(Some(format!(
                        "its oldest binary log {oldest} starts after GTID {domain}-{server}-{sequence}, and the connector has read domain {domain} only to sequence {have}"
                    )));
                }
            }
            Ok(None)
        }
        // MySQL refuses a purged GTID set itself (error 1236).
        Some(GtidPosition::Mysql(_)) => Ok(None),
        None if files.contains(&position.file_name()) => Ok(None),
        None => Ok(Some(format!(
            "its binary logs are {}…{}, without {}",
            oldest,
            files.last().unwrap_or(oldest),
            position.file_name()
        ))),
    }
}

pub async fn connect(url: &Secret) -> Result<Conn, MysqlError> {
    let (opts, _) = tls::opts(url).map_err(|e| MysqlError::Definite(format!("source.url: {e}")))?;
    Conn::new(opts).await.map_err(MysqlError::connect)
}

/// The user lock a running connector holds on the server (`GET_LOCK`): one copy of a
/// connector runs at a time, and `offsets reset` can tell whether it runs, with no privilege
/// needed. The server releases it with the connection, also when the process is killed.
/// Named after the connector (a long name by its digest: lock names end at 64 characters).
pub fn running_lock(connector: &str) -> String {
    let name = format!("fhir-cdc {connector}");
    if name.len() <= 64 {
        return name;
    }
    use sha2::Digest;
    format!(
        "fhir-cdc {}",
        hex::encode(&sha2::Sha256::digest(connector)[..27])
    )
}

/// Take `connector`'s lock on `conn` for as long as it stays open.
pub async fn take_running_lock(conn: &mut Conn, connector: &str) -> Result<(), MysqlError> {
    let lock = running_lock(connector);
    let taken: Option<Option<u8>> = conn
        .exec_first("SELECT GET_LOCK(?, 0)", (&lock,))
        .await
        .map_err(MysqlError::query("taking the connector's lock (GET_LOCK)"))?;
    if taken.flatten() == Some(1) {
        return Ok(());
    }
    // Another session holds it: a second copy of the connector, or the session of one
    // whose connection the server has not yet seen close. Retried with backoff.
    let holder: Option<Option<u64>> = conn
        .exec_first("SELECT IS_USED_LOCK(?)", (&lock,))
        .await
        .map_err(MysqlError::query("asking who holds the connector's lock"))?;
    Err(MysqlError::Transient(format!(
        "connector {connector} is already running against this server (its lock `{lock}` is held by connection {}): two copies would overwrite each other's state",
        holder.flatten().map_or_else(|| "unknown".to_owned(), |id| id.to_string())
    )))
}

/// Who runs `connector` against the server now, if anyone: the connection holding its lock.
pub async fn lock_holder(url: &Secret, connector: &str) -> Result<Option<String>, SourceError> {
    let mut conn = connect(url).await?;
    let lock = running_lock(connector);
    let holder: Option<Option<u64>> = conn
        .exec_first("SELECT IS_USED_LOCK(?)", (&lock,))
        .await
        .map_err(MysqlError::query("asking who holds the connector's lock"))?;
    Ok(holder
        .flatten()
        .map(|id| format!("connection {id} holds its lock `{lock}`")))
}
