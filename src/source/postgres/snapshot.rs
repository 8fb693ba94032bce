//! The consistent initial snapshot: the rows that exist when capture starts, read so that
//! the stream continues exactly where the snapshot ends — no gap, no double.
//!
//! How (<https://www.postgresql.org/docs/current/protocol-replication.html>,
//! CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT): the slot is created on a replication
//! session that stays open and idle, which keeps the exported snapshot alive. The slot's
//! consistent point is the LSN from which its stream holds every transaction that the
//! snapshot does not see. A second, ordinary connection imports the snapshot
//! (`SET TRANSACTION SNAPSHOT` in a REPEATABLE READ transaction) and reads the tables
//! through cursors in chunks (bounded memory). Only then does the replication session send
//! START_REPLICATION: changes committed before the consistent point are in the snapshot,
//! changes after it are in the stream, each exactly once.
//!
//! Snapshot rows are [`Operation::Read`] changes at the consistent point, numbered in read
//! order.

use std::{str::FromStr, sync::Arc};

use chrono::Utc;
use pgwire_replication::ReplicationClient;
use tokio_postgres::{NoTls, SimpleQueryMessage};

use super::{replication::session_config, types};
use tokio::sync::mpsc;

use crate::{
    change::{ChangeEvent, Names, Operation, PgLsn, Position, Row, SourceMessage, SourceTable},
    config::Secret,
    observe::progress::Progress,
};

/// Why the snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("source.url cannot be used: {0}")]
    Config(String),
    #[error("creating replication slot {slot} failed: {reason}")]
    Slot { slot: String, reason: String },
    #[error("starting replication from slot {slot} after the snapshot failed: {reason}")]
    Start { slot: String, reason: String },
    #[error("reading {table} in the snapshot failed: {reason}")]
    Read { table: String, reason: String },
    #[error("the snapshot's reader stopped")]
    Cancelled,
}

/// A slot created with an exported snapshot, its replication session held open and idle.
pub struct ExportedSnapshot {
    session: ReplicationClient,
    slot: String,
    /// Where the slot's stream begins: the first change the snapshot does not contain.
    pub consistent_point: PgLsn,
    /// The name other sessions import it by.
    pub name: String,
}

impl std::fmt::Debug for ExportedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportedSnapshot")
            .field("consistent_point", &self.consistent_point)
            .finish_non_exhaustive()
    }
}

impl ExportedSnapshot {
    /// Create logical replication slot `slot` (pgoutput) exporting its snapshot.
    pub async fn create(
        url: &Secret,
        slot: &str,
        publication: &str,
    ) -> Result<Self, SnapshotError> {
        let (replication, _) = session_config(url, slot, publication)
            .map_err(|e| SnapshotError::Config(e.to_string()))?;
        let fail = |reason: String| SnapshotError::Slot {
            slot: slot.to_owned(),
            reason,
        };
        let mut session = ReplicationClient::connect_gated(replication)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let rows = session
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(slot)
            ))
            .await
            .map_err(|e| fail(e.to_string()))?;
        // The reply's columns: slot_name, consistent_point, snapshot_name, output_plugin.
        let row = rows
            .first()
            .ok_or_else(|| fail("the server returned no slot".into()))?;
        let field = |index: usize, name: &str| {
            row.get(index)
                .and_then(|v| v.as_ref())
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .ok_or_else(|| fail(format!("no `{name}` in the reply")))
        };
        let consistent_point = PgLsn::from_str(&field(1, "consistent_point")?).map_err(fail)?;
        Ok(Self {
            session,
            slot: slot.to_owned(),
            consistent_point,
            name: field(2, "snapshot_name")?,
        })
    }

    /// Start streaming from the consistent point on the same session (the snapshot ends).
    pub async fn start_streaming(mut self) -> Result<ReplicationClient, SnapshotError> {
        let slot = self.slot.clone();
        let fail = |e: pgwire_replication::PgWireError| SnapshotError::Start {
            slot: slot.clone(),
            reason: e.to_string(),
        };
        self.session.start().await.map_err(fail)?;
        self.session.wait_started().await.map_err(fail)?;
        Ok(self.session)
    }
}

/// Read the mapped tables inside the exported snapshot, `chunk_rows` rows at a time, sending
/// each row to `out` as a snapshot read (a full channel holds the reading back), then the
/// consistent point as progress. Returns the number of rows read.
pub async fn read_tables(
    url: &Secret,
    snapshot: &ExportedSnapshot,
    connector: &str,
    tables: &[(String, String)],
    chunk_rows: usize,
    out: &mpsc::Sender<SourceMessage>,
) -> Result<u64, SnapshotError> {
    let reader = TableReader::open(url, connector, Some(&snapshot.name)).await?;
    let position = Position::Postgres(snapshot.consistent_point);
    let mut ordinal: u32 = 0;
    let progress = Progress::new("snapshot");
    for (schema, table) in tables {
        progress.start(
            &format!("{schema}.{table}"),
            reader.estimated_rows(schema, table).await,
        );
        reader
            .read(
                schema,
                table,
                &position,
                &mut ordinal,
                Reading {
                    chunk_rows,
                    limit: None,
                    progress: Some(&progress),
                },
                out,
            )
            .await?;
        progress.finish();
    }
    reader.close().await?;
    out.send(SourceMessage::Progress(position))
        .await
        .map_err(|_| SnapshotError::Cancelled)?;
    Ok(u64::from(ordinal))
}

/// How [`TableReader::read`] reads a table.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    /// Rows fetched at a time (memory stays bounded by it).
    pub chunk_rows: usize,
    /// Rows read at most.
    pub limit: Option<u64>,
    /// Where each chunk is counted.
    pub progress: Option<&'a Progress>,
}

/// Reads whole tables through cursors, inside one read-only REPEATABLE READ transaction:
/// an exported snapshot's, or its own (`preview`).
#[derive(Debug)]
pub struct TableReader {
    client: tokio_postgres::Client,
    connector: String,
    database: String,
}

impl TableReader {
    /// Connect and begin the transaction, importing `snapshot` when given.
    pub async fn open(
        url: &Secret,
        connector: &str,
        snapshot: Option<&str>,
    ) -> Result<Self, SnapshotError> {
        let (client, connection) = tokio_postgres::connect(url.expose(), NoTls)
            .await
            .map_err(|e| SnapshotError::Config(e.to_string()))?;
        tokio::spawn(connection);
        let database: String = client
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(|e| SnapshotError::Config(e.to_string()))?
            .get(0);
        let import = snapshot.map_or(String::new(), |name| {
            format!("SET TRANSACTION SNAPSHOT {};", quote_literal(name))
        });
        client
            .batch_execute(&format!(
                "SET DateStyle = ISO; SET TimeZone = 'UTC';
                 BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
                 {import}"
            ))
            .await
            .map_err(|e| SnapshotError::Read {
                table: "(snapshot import)".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            client,
            connector: connector.to_owned(),
            database,
        })
    }

    /// The planner's estimate of the rows in `schema.table` (`None` before the table was
    /// ever analysed): for progress, never for correctness.
    pub async fn estimated_rows(&self, schema: &str, table: &str) -> Option<u64> {
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let row = self
            .client
            .query_one(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::text::regclass",
                &[&qualified],
            )
            .await
            .ok()?;
        u64::try_from(row.get::<_, i64>(0)).ok()
    }

    /// Read `schema.table` as `how` says, sending each row as a snapshot read at `position`,
    /// numbered from `ordinal` on. Returns the number of rows read.
    pub async fn read(
        &self,
        schema: &str,
        table: &str,
        position: &Position,
        ordinal: &mut u32,
        how: Reading<'_>,
        out: &mpsc::Sender<SourceMessage>,
    ) -> Result<u64, SnapshotError> {
        let Reading {
            chunk_rows,
            limit,
            progress,
        } = how;
        let client = &self.client;
        let name = format!("{schema}.{table}");
        let fail = |e: tokio_postgres::Error| SnapshotError::Read {
            table: name.clone(),
            reason: e.to_string(),
        };
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
        // Column types come from the statement's description; values come as text.
        let statement = client
            .prepare(&format!("SELECT * FROM {qualified}"))
            .await
            .map_err(fail)?;
        let names: Names = statement
            .columns()
            .iter()
            .map(|c| c.name().into())
            .collect();
        let oids: Vec<u32> = statement
            .columns()
            .iter()
            .map(|c| c.type_().oid())
            .collect();
        let key: Names = client
            .query(
                "SELECT a.attname::text FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = $1::text::regclass AND i.indisprimary
                  ORDER BY array_position(i.indkey, a.attnum)",
                &[&qualified],
            )
            .await
            .map_err(fail)?
            .iter()
            .map(|r| r.get::<_, &str>(0).into())
            .collect();
        let source = Arc::new(SourceTable::new(
            self.connector.as_str(),
            "postgres",
            self.database.as_str(),
            schema,
            table,
        ));
        let limit_clause = limit.map_or(String::new(), |n| format!(" LIMIT {n}"));
        client
            .batch_execute(&format!(
                "DECLARE fhir_cdc_snapshot NO SCROLL CURSOR FOR SELECT * FROM {qualified}{limit_clause}"
            ))
            .await
            .map_err(fail)?;
        let mut read = 0;
        loop {
            let messages = client
                .simple_query(&format!("FETCH {chunk_rows} FROM fhir_cdc_snapshot"))
                .await
                .map_err(fail)?;
            let mut fetched = 0;
            for message in messages {
                let SimpleQueryMessage::Row(row) = message else {
                    continue;
                };
                fetched += 1;
                let values = oids
                    .iter()
                    .enumerate()
                    .map(|(i, oid)| {
                        row.get(i).map_or(crate::change::Value::Null, |text| {
                            types::from_text(*oid, text)
                        })
                    })
                    .collect();
                let change = ChangeEvent {
                    source: source.clone(),
                    op: Operation::Read,
                    key: key.clone(),
                    before: None,
                    after: Some(Row::of_layout(names.clone(), values)),
                    position: position.clone(),
                    ordinal: *ordinal,
                    transaction_id: None,
                    commit_time: None,
                    capture_time: Utc::now(),
                };
                out.send(SourceMessage::Change(change))
                    .await
                    .map_err(|_| SnapshotError::Cancelled)?;
                *ordinal = ordinal.wrapping_add(1);
            }
            read += fetched;
            if let Some(progress) = progress {
                progress.advance(fetched as u64);
            }
            if fetched < chunk_rows {
                break;
            }
        }
        client
            .batch_execute("CLOSE fhir_cdc_snapshot")
            .await
            .map_err(fail)?;
        Ok(read as u64)
    }

    /// End the transaction.
    pub async fn close(self) -> Result<(), SnapshotError> {
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| SnapshotError::Read {
                table: "(commit)".into(),
                reason: e.to_string(),
            })
    }
}

/// `"name"`, with embedded quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, with embedded quotes doubled.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("lab\"result"), "\"lab\"\"result\"");
        assert_eq!(
            quote_literal("00000003-0000001B-1'"),
            "'00000003-0000001B-1'''"
        );
    }
}
