//! SQL Server: the change data capture tables, polled.
//!
//! SQL Server's capture job (a SQL Server Agent job) reads the transaction log and writes
//! every change of a table with CDC enabled into its change table; the connector reads
//! them through the documented functions, never the log itself:
//!
//! - `sys.fn_cdc_get_max_lsn()` is how far the capture job has got. The connector asks
//!   for the changes from where it stands up to there, then waits `poll.interval.ms` when
//!   there were none. The capture job also records progress in periods without changes
//!   (`cdc.lsn_time_mapping`), so the maximum moves on an idle database too.
//! - `cdc.fn_cdc_get_all_changes_<instance>(from, to, N'all update old')` gives each
//!   change with its commit LSN and sequence value ([`changes`]). The rows of every mapped
//!   table's instance in a window are merged in LSN order, so a transaction's changes reach
//!   Kafka together and in order, whatever tables they touch.
//! - The stored position is the end of the last transaction Kafka has every event of; a
//!   crash in the middle of a transaction replays all of it, with the same event ids.
//! - `sys.fn_cdc_get_min_lsn(instance)` is where an instance's changes start since the
//!   cleanup job last ran (three days by default). A stored position before it means
//!   changes the connector never read are gone: `when_needed` takes a new snapshot,
//!   `initial` stops and says how to recover. Never a silent gap.
//!
//! Snapshots read each chunk in a transaction of its own under SNAPSHOT isolation (no
//! locks, no blocking of writers; the database needs `ALLOW_SNAPSHOT_ISOLATION ON`), and
//! apply DBLog's watermark rule with the log's own LSNs as watermarks, as for MySQL: the
//! capture job's maximum before the read is the low mark (rows a later change touched are
//! left out: the stream gives them newer), and the LSN the server gives the chunk's own
//! transaction once the read is done (a savepoint makes it one, nothing is written) is the
//! high mark: every change the read could see committed before it, so the chunk goes out
//! once the stream has passed it.

pub mod capture;
pub mod catalog;
pub mod changes;
pub mod connection;
mod kind;
pub mod preflight;
pub mod signal;
pub mod snapshot;
pub mod types;

use crate::source::SourceError;

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum MssqlError {
    /// The network or the server's state: trying again later may succeed.
    #[error("{0}")]
    Transient(String),
    /// The setup, the privileges or the data: it stays so until someone changes it.
    #[error("{0}")]
    Definite(String),
    /// The server would not compile a statement (a requested snapshot's condition with a
    /// typo, a column that is not there).
    #[error("{0}")]
    Refused(String),
}

/// Server errors that may pass by themselves.
const TRANSIENT: [u32; 18] = [
    233, 313, 596, 1205, 1222, 3952, 3961, 3966, 3967, 3980, 10053, 10054, 10928, 10929, 40197,
    40501, 40613, 49918,
];

/// Server errors of a statement that does not compile: syntax, names, types.
const REFUSED: [u32; 9] = [102, 105, 156, 207, 208, 245, 4104, 4145, 8114];

impl MssqlError {
    /// `what` failed because of `e`, classified.
    pub fn query(what: &str) -> impl Fn(tiberius::error::Error) -> Self + '_ {
        move |e| {
            use tiberius::error::Error;
            let message = format!("{what}: {}", error_text(&e));
            match &e {
                // Deadlock victim, lock timeout, session killed, the database starting up or
                // failing over, Azure's throttling and reconfiguration, connections dropped;
                // SNAPSHOT isolation against a concurrent DDL or a full version store; 313,
                // an LSN range outside a capture instance's (the cleanup job ran since the
                // connector looked): a restart decides by snapshot.mode.
                Error::Server(server) if TRANSIENT.contains(&server.code()) => {
                    Self::Transient(message)
                }
                Error::Server(server) if REFUSED.contains(&server.code()) => Self::Refused(message),
                Error::Io { .. } | Error::Routing { .. } => Self::Transient(message),
                _ => Self::Definite(message),
            }
        }
    }
}

impl From<MssqlError> for SourceError {
    fn from(e: MssqlError) -> Self {
        match e {
            MssqlError::Transient(m) => SourceError::Transient(m),
            MssqlError::Definite(m) | MssqlError::Refused(m) => SourceError::Connector(m),
        }
    }
}

/// The server's message and error number, or the client's error.
pub fn error_text(e: &tiberius::error::Error) -> String {
    match e {
        tiberius::error::Error::Server(server) => {
            format!("{} (error {})", server.message(), server.code())
        }
        other => other.to_string(),
    }
}

/// The rows of the first result of `sql` with `params` (`@P1…`); a failure says `what`
/// was being done.
pub async fn rows(
    client: &mut connection::Client,
    sql: &str,
    params: &[&dyn tiberius::ToSql],
    what: &str,
) -> Result<Vec<tiberius::Row>, MssqlError> {
    let fail = MssqlError::query(what);
    let stream = if params.is_empty() {
        client.simple_query(sql).await
    } else {
        client.query(sql, params).await
    };
    stream
        .map_err(&fail)?
        .into_first_result()
        .await
        .map_err(&fail)
}

/// The first row of [`rows`].
pub async fn row(
    client: &mut connection::Client,
    sql: &str,
    params: &[&dyn tiberius::ToSql],
    what: &str,
) -> Result<Option<tiberius::Row>, MssqlError> {
    Ok(rows(client, sql, params, what).await?.into_iter().next())
}

/// `[name]` with `]` doubled.
pub fn quote_ident(name: &str) -> String {
    format!("[{}]", name.replace(']', "]]"))
}

/// `[schema].[table]`.
pub fn quote_table(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}
