//! Snapshots: the rows that exist when capture starts (or when a table is added), read in
//! key-ordered chunks between watermarks in the replication stream, so that reading never
//! holds the stream back, a crash loses at most the chunk in flight, and no chunk row ever
//! overwrites a newer change.
//!
//! How (the DBLog algorithm, <https://arxiv.org/abs/2010.12597>; Debezium's incremental
//! snapshots): for each chunk, a low watermark is committed into the WAL
//! (`pg_logical_emit_message` in a transaction of its own), the next `size` rows after the
//! last key are selected in key order, and a high watermark is committed. The stream
//! delivers both watermarks at their commit positions, in commit order with every other
//! transaction. A row that a transaction between the two watermarks changed may have been
//! read before or after that change, so the chunk drops it: the stream's own event for it
//! is the newer one. The remaining rows are emitted at the high watermark's position, so
//! their versions sort after every change the select saw and before every change it did
//! not. A table without a key cannot be compared row by row: it is read as one chunk, read
//! again until no change to it fell between its watermarks.
//!
//! Snapshot rows are [`Operation::Read`] changes at the high watermark's commit LSN,
//! numbered in read order. Values come as text, parsed by the column's type like the
//! stream's ([`super::types`]).

use std::sync::Arc;

use chrono::Utc;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use super::{quote_ident, quote_table, types};
use tokio::sync::mpsc;

use crate::{
    change::{
        ChangeEvent, Names, Operation, PgLsn, Position, Row, SourceMessage, SourceTable, Value,
    },
    config::Secret,
    observe::progress::Progress,
    postgres::ConnectError,
};

/// The prefix of the watermark messages in the WAL.
pub const WATERMARK_PREFIX: &str = "fhir-cdc-watermark";
/// The prefix of snapshot requests in the WAL (see `capture::request_snapshot`).
pub const SIGNAL_PREFIX: &str = "fhir-cdc-signal";

/// Why the snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("connecting to PostgreSQL: {}", super::error_text(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("reading {table}: {}", super::error_text(source))]
    Read {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("source.url: {0}")]
    Setup(String),
    #[error("the snapshot's reader stopped")]
    Cancelled,
}

impl SnapshotError {
    /// The server's or the network's error, if it is one.
    pub fn postgres(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Self::Connect(e) | Self::Read { source: e, .. } => Some(e),
            Self::Setup(_) | Self::Cancelled => None,
        }
    }
}

/// The rows of one table a chunk reads, as [`read_chunk`] needs them.
#[derive(Debug)]
pub struct ChunkTable {
    /// `schema.table`.
    pub name: String,
    quoted: String,
    pub source: Arc<SourceTable>,
    names: Names,
    oids: Vec<u32>,
    /// The key columns (primary key, else the replica identity index), in key order; empty
    /// when the table has neither.
    pub key: Names,
    key_at: Vec<usize>,
    /// The key columns' SQL types, for the typed comparison with the last key.
    key_types: Vec<String>,
}

impl ChunkTable {
    /// Read `schema.table`'s columns and key.
    pub async fn describe(
        client: &Client,
        connector: &str,
        database: &str,
        schema: &str,
        table: &str,
    ) -> Result<Self, SnapshotError> {
        let name = format!("{schema}.{table}");
        let fail = |e: tokio_postgres::Error| SnapshotError::Read {
            table: name.clone(),
            source: e,
        };
        let quoted = quote_table(schema, table);
        let statement = client
            .prepare(&format!("SELECT * FROM {quoted}"))
            .await
            .map_err(fail)?;
        let names: Names = statement
            .columns()
            .iter()
            .map(|c| c.name().into())
            .collect();
        let oids = statement
            .columns()
            .iter()
            .map(|c| c.type_().oid())
            .collect();
        let key_rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                   FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = $1::text::regclass
                    AND i.indexrelid = (SELECT indexrelid FROM pg_index
                                         WHERE indrelid = $1::text::regclass
                                           AND (indisprimary OR indisreplident)
                                         ORDER BY indisprimary DESC LIMIT 1)
                  ORDER BY array_position(i.indkey, a.attnum)",
                &[&quoted],
            )
            .await
            .map_err(fail)?;
        let key: Names = key_rows
            .iter()
            .map(|r| r.get::<_, &str>(0).into())
            .collect();
        let key_types = key_rows.iter().map(|r| r.get::<_, String>(1)).collect();
        let key_at = key
            .iter()
            .map(|k| {
                names
                    .iter()
                    .position(|n| n == k)
                    .expect("a key column is a column")
            })
            .collect();
        Ok(Self {
            source: Arc::new(SourceTable::new(
                connector, "postgres", database, schema, table,
            )),
            name,
            quoted,
            names,
            oids,
            key,
            key_at,
            key_types,
        })
    }

    /// The key of `row` (the after image of a change, or its before image), comparable with
    /// the keys of this table's chunk rows; `None` when the row lacks a key column.
    pub fn key_of(&self, row: &Row) -> Option<String> {
        let values: Option<Vec<&Value>> = self.key.iter().map(|k| row.get(k)).collect();
        values.map(|v| format!("{v:?}"))
    }

    fn row(&self, row: &SimpleQueryRow) -> Row {
        text_row(&self.names, &self.oids, row)
    }
}

/// One chunk as read between its watermarks.
#[derive(Debug)]
pub struct Chunk {
    /// The rows read, in key order.
    pub rows: Vec<Row>,
    /// The last row's key as text, to continue after.
    pub last_key: Option<Vec<String>>,
    /// Fewer rows than asked: the table is read to its end.
    pub complete: bool,
}

/// Which rows a chunk reads: up to `size` after the key `after`, of those matching
/// `filter` (an SQL condition).
#[derive(Debug, Clone, Copy)]
pub struct ChunkQuery<'a> {
    pub after: Option<&'a [String]>,
    pub filter: Option<&'a str>,
    pub size: usize,
}

/// Commit the low watermark `<marker>:low`, read the chunk `query` says of `table` in key
/// order (the whole table when it has no key), then commit `<marker>:high`.
pub async fn read_chunk(
    client: &Client,
    table: &ChunkTable,
    query: ChunkQuery<'_>,
    marker: &str,
) -> Result<Chunk, SnapshotError> {
    let ChunkQuery {
        after,
        filter,
        size,
    } = query;
    let fail = |e: tokio_postgres::Error| SnapshotError::Read {
        table: table.name.clone(),
        source: e,
    };
    // The request's condition, and for a keyed table the key after the last one read.
    let mut conditions: Vec<String> = filter.map(|f| format!("({f})")).into_iter().collect();
    let columns = table
        .key
        .iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    if let (Some(last), false) = (after, table.key.is_empty()) {
        let values = last
            .iter()
            .zip(&table.key_types)
            .map(|(v, t)| format!("{}::{t}", quote_literal(v)))
            .collect::<Vec<_>>()
            .join(", ");
        conditions.push(format!("({columns}) > ({values})"));
    }
    let select = crate::source::chunk_select(
        &table.quoted,
        &conditions,
        (!table.key.is_empty()).then_some(columns.as_str()),
        size,
    );
    let watermark = |edge: &str| {
        format!(
            "BEGIN; SELECT pg_logical_emit_message(true, {}, {}); COMMIT",
            quote_literal(WATERMARK_PREFIX),
            quote_literal(&format!("{marker}:{edge}"))
        )
    };
    client
        .batch_execute(&watermark("low"))
        .await
        .map_err(fail)?;
    let messages = match query.filter {
        None => client.simple_query(&select).await.map_err(fail)?,
        // A condition comes from a request in the WAL, which any role that may write logical
        // messages can write: it runs as one statement (the server parses it alone first,
        // and refuses more than one) in a read-only transaction, so it can only read.
        Some(_) => {
            client.prepare(&select).await.map_err(fail)?;
            client
                .batch_execute("BEGIN READ ONLY")
                .await
                .map_err(fail)?;
            let read = client.simple_query(&select).await;
            client.batch_execute("COMMIT").await.map_err(fail)?;
            read.map_err(fail)?
        }
    };
    client
        .batch_execute(&watermark("high"))
        .await
        .map_err(fail)?;
    let mut rows = Vec::with_capacity(messages.len());
    let mut last_key = None;
    // Each message's text is dropped once parsed: a chunk is held once, not twice.
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        last_key = Some(
            table
                .key_at
                .iter()
                .map(|at| row.get(*at).unwrap_or_default().to_owned())
                .collect(),
        );
        rows.push(table.row(&row));
    }
    Ok(Chunk {
        complete: table.key.is_empty() || rows.len() < size,
        rows,
        last_key,
    })
}

/// The planner's estimate of the rows in `table` (`None` before the table was
/// ever analysed): for progress, never for correctness.
pub async fn estimated_rows(client: &Client, table: &ChunkTable) -> Option<u64> {
    let row = client
        .query_one(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::text::regclass",
            &[&table.quoted],
        )
        .await
        .ok()?;
    u64::try_from(row.get::<_, i64>(0)).ok()
}

/// A connection for reading tables (values as text under `DateStyle = ISO`, `TimeZone =
/// UTC`, as [`super::types`] parses them), and the database's name.
pub async fn connect(url: &Secret) -> Result<(Client, String), SnapshotError> {
    let client = crate::postgres::connect(url).await.map_err(|e| match e {
        ConnectError::Setup(e) => SnapshotError::Setup(e),
        ConnectError::Postgres(e) => SnapshotError::Connect(e),
    })?;
    client
        .batch_execute("SET DateStyle = ISO; SET TimeZone = 'UTC'")
        .await
        .map_err(SnapshotError::Connect)?;
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(SnapshotError::Connect)?
        .get(0);
    Ok((client, database))
}

/// A row of text values, parsed by each column's type.
fn text_row(names: &Names, oids: &[u32], row: &SimpleQueryRow) -> Row {
    let values = oids
        .iter()
        .enumerate()
        .map(|(i, oid)| {
            row.get(i)
                .map_or(Value::Null, |text| types::from_text(*oid, text))
        })
        .collect();
    Row::of_layout(names.clone(), values)
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

/// Reads whole tables through cursors, inside one read-only REPEATABLE READ transaction
/// (`preview`, `reconcile`).
#[derive(Debug)]
pub struct TableReader {
    client: Client,
    connector: String,
    database: String,
    /// The end of the WAL when the transaction's snapshot was taken: every change it sees
    /// was committed before (its first statement reads both at once; on a standby, the
    /// position replayed).
    pub position: PgLsn,
}

impl TableReader {
    /// Connect and begin the transaction.
    pub async fn open(url: &Secret, connector: &str) -> Result<Self, SnapshotError> {
        let (client, database) = connect(url).await?;
        let fail = |e| SnapshotError::Read {
            table: "(begin)".into(),
            source: e,
        };
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(fail)?;
        let position: String = client
            .query_one(
                "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                             ELSE pg_current_wal_insert_lsn() END::text",
                &[],
            )
            .await
            .map_err(fail)?
            .get(0);
        Ok(Self {
            client,
            connector: connector.to_owned(),
            database,
            position: position.parse().unwrap_or(PgLsn(0)),
        })
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
        let table =
            ChunkTable::describe(client, &self.connector, &self.database, schema, table).await?;
        let fail = |e: tokio_postgres::Error| SnapshotError::Read {
            table: table.name.clone(),
            source: e,
        };
        let limit_clause = limit.map_or(String::new(), |n| format!(" LIMIT {n}"));
        client
            .batch_execute(&format!(
                "DECLARE fhir_cdc_snapshot NO SCROLL CURSOR FOR SELECT * FROM {}{limit_clause}",
                table.quoted
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
                let change = ChangeEvent {
                    source: table.source.clone(),
                    op: Operation::Read,
                    key: table.key.clone(),
                    before: None,
                    after: Some(table.row(&row)),
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
                source: e,
            })
    }
}

/// The condition that selects the row with this key: `"col" = 'text' AND …`, each value
/// written as text the server casts to the column's type (bytes as `decode(…, 'base64')`).
pub fn key_condition(key: &[(String, Value)]) -> String {
    let terms: Vec<String> = key
        .iter()
        .map(|(column, value)| {
            let column = quote_ident(column);
            match value {
                Value::Null => format!("{column} IS NULL"),
                Value::Bytes(_) => format!(
                    "{column} = decode({}, 'base64')",
                    quote_literal(&crate::change::text_of(value))
                ),
                other => format!(
                    "{column} = {}",
                    quote_literal(&crate::change::text_of(other))
                ),
            }
        })
        .collect();
    terms.join(" AND ")
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
