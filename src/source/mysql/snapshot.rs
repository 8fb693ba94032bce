//! Snapshot chunks: the rows of a table in key order, a chunk at a time, each read in a
//! transaction of its own with the binary log position that belongs to it.
//!
//! MariaDB gives that position exactly: `START TRANSACTION WITH CONSISTENT SNAPSHOT` sets
//! `binlog_snapshot_file` and `binlog_snapshot_position` to the end of the last transaction
//! the snapshot sees, without a lock. A chunk read there is the table's state at that
//! position P; the stream (see `capture`) emits it once it has passed P, leaving out the rows
//! that a change after P touched (the stream gave them newer). MySQL has no such variables:
//! there the window is the log's end before and after the read (low and high), and rows
//! changed after low are left out — DBLog's watermark rule, with the log's own positions as
//! watermarks, so the connector writes nothing into the database.

use std::sync::Arc;

use mysql_async::{prelude::Queryable, Conn, Pool, Row as MyRow, Value as MyValue};

use super::{
    binlog::json_columns,
    current_position, quote_ident,
    types::{self, Kind},
    MysqlError,
};
use tokio::sync::mpsc;

use crate::{
    change::{BinlogPosition, Names, Position, Row, SourceMessage, SourceTable, Value},
    source::{chunk_changes, chunks},
};

/// A table as chunks read it.
#[derive(Debug)]
pub struct ChunkTable {
    /// `database.table`.
    pub name: String,
    quoted: String,
    pub source: Arc<SourceTable>,
    names: Names,
    /// The primary key, in key order; empty without one.
    pub key: Names,
    key_at: Vec<usize>,
    /// The catalog's JSON columns (MariaDB).
    json: std::collections::HashSet<String>,
}

impl ChunkTable {
    /// Read `database.table`'s columns and chunk key (its primary key, or a UNIQUE NOT NULL
    /// index) from the catalog.
    pub async fn describe(
        conn: &mut Conn,
        connector: &str,
        database: &str,
        table: &str,
    ) -> Result<Self, MysqlError> {
        let name = format!("{database}.{table}");
        let fail = MysqlError::query("reading a mapped table's columns");
        let columns: Vec<(String, String)> = conn
            .exec(
                "SELECT COLUMN_NAME, COLUMN_KEY FROM information_schema.COLUMNS
                  WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (database, table),
            )
            .await
            .map_err(&fail)?;
        if columns.is_empty() {
            return Err(MysqlError::Definite(format!(
                "the mapped table {name} does not exist, or the user may not read it (GRANT SELECT)"
            )));
        }
        let (key, _) = super::chunk_key(conn, database, table)
            .await
            .map_err(&fail)?;
        let names: Names = columns.iter().map(|(n, _)| Arc::from(n.as_str())).collect();
        let key_at = key
            .iter()
            .filter_map(|k| names.iter().position(|n| **n == **k))
            .collect();
        Ok(Self {
            quoted: format!("{}.{}", quote_ident(database), quote_ident(table)),
            source: Arc::new(SourceTable::new(
                connector, "mysql", database, database, table,
            )),
            names,
            key: key.iter().map(|k| Arc::from(k.as_str())).collect(),
            key_at,
            json: json_columns(conn, database, table).await,
            name,
        })
    }
}

impl chunks::ChunkTable for ChunkTable {
    fn name(&self) -> &str {
        &self.name
    }

    fn source(&self) -> &Arc<SourceTable> {
        &self.source
    }

    fn key(&self) -> &Names {
        &self.key
    }
}

/// Chunks of a server's tables, read through a pool of connections.
#[derive(Debug, Clone)]
pub struct Reader {
    pub pool: Pool,
    pub connector: String,
}

impl chunks::ChunkReader for Reader {
    type Position = BinlogPosition;
    type Table = ChunkTable;
    type Error = MysqlError;

    async fn describe(&self, name: &str) -> Result<ChunkTable, MysqlError> {
        let (database, table) = name.split_once('.').expect("tables are database.table");
        let mut conn = self.pool.get_conn().await.map_err(MysqlError::connect)?;
        ChunkTable::describe(&mut conn, &self.connector, database, table).await
    }

    fn read(
        &self,
        table: Arc<ChunkTable>,
        after: Option<Vec<String>>,
        filter: Option<String>,
        size: usize,
    ) -> impl std::future::Future<Output = Result<Chunk, MysqlError>> + Send + 'static {
        let pool = self.pool.clone();
        async move { read_chunk(&pool, &table, after.as_deref(), filter.as_deref(), size).await }
    }

    async fn estimated_rows(&self, table: &ChunkTable) -> Option<u64> {
        estimated_rows(&self.pool, table).await
    }

    fn refused(error: &MysqlError) -> bool {
        matches!(error, MysqlError::Definite(_))
    }

    fn position(position: &Position) -> Option<BinlogPosition> {
        match position {
            Position::Mysql(at) => Some(at.clone()),
            _ => None,
        }
    }
}

/// One chunk as read, between binary log positions.
pub type Chunk = chunks::Chunk<BinlogPosition>;

/// A connection pool for chunk reads: values in UTC and UTF-8.
pub fn pool(opts: &mysql_async::Opts) -> Pool {
    let opts = mysql_async::OptsBuilder::from_opts(opts.clone())
        .init(vec!["SET time_zone = '+00:00', NAMES utf8mb4"])
        .pool_opts(
            mysql_async::PoolOpts::default()
                .with_constraints(mysql_async::PoolConstraints::new(0, 2).expect("0 ≤ 2")),
        );
    Pool::new(opts)
}

/// Read up to `size` rows of `table` after `after` (all of them without a key), of those
/// matching `filter`.
pub async fn read_chunk(
    pool: &Pool,
    table: &ChunkTable,
    after: Option<&[String]>,
    filter: Option<&str>,
    size: usize,
) -> Result<Chunk, MysqlError> {
    let mut conn = pool.get_conn().await.map_err(MysqlError::connect)?;
    let fail = MysqlError::query("reading a snapshot chunk");
    let (select, params) = chunk_select(table, after, filter, size);
    let (before, exact) = begin_snapshot(&mut conn, &fail).await?;
    let read: Result<Vec<MyRow>, _> = conn.exec(select, params).await;
    conn.query_drop("COMMIT").await.map_err(&fail)?;
    let read = read.map_err(&fail)?;
    let (low, high) = match exact {
        Some(at) => (at.clone(), at),
        None => (before, current_position(&mut conn).await?.0),
    };
    let complete = table.key.is_empty() || read.len() < size;
    let (rows, last_key) = rows_of(table, read);
    Ok(Chunk {
        rows,
        last_key,
        complete,
        low,
        high,
    })
}

/// The server's rows of `table` as rows, with the last one's key as text.
fn rows_of(table: &ChunkTable, read: Vec<MyRow>) -> (Vec<Row>, Option<Vec<String>>) {
    let kinds: Vec<Kind> = read
        .first()
        .map(|row| {
            row.columns_ref()
                .iter()
                .map(|c| types::result_kind(c, table.json.contains(&*c.name_str())))
                .collect()
        })
        .unwrap_or_default();
    let mut rows = Vec::with_capacity(read.len());
    let mut last_key = None;
    for row in read {
        let values: Vec<Value> = row
            .unwrap()
            .into_iter()
            .zip(&kinds)
            .map(|(value, kind)| types::result_value(kind, value))
            .collect();
        last_key = Some(chunks::key_text(&values, &table.key_at));
        rows.push(Row::of_layout(table.names.clone(), values));
    }
    (rows, last_key)
}

/// Where [`read_consistent`] read.
#[derive(Debug, Clone)]
pub struct Consistent {
    /// Every change before it is in the snapshot (MariaDB: exactly the changes before it).
    pub low: BinlogPosition,
    /// No change after it is in the snapshot.
    pub high: BinlogPosition,
}

/// Read every row of `tables` (`(database, table)`) in one consistent snapshot, `size`
/// rows at a time in key order, each row a read at the snapshot's position into `out`
/// (`reconcile`).
pub async fn read_consistent(
    url: &crate::config::Secret,
    connector: &str,
    tables: &[(String, String)],
    size: usize,
    out: &mpsc::Sender<SourceMessage>,
) -> Result<Consistent, MysqlError> {
    let (opts, _) =
        super::tls::opts(url).map_err(|e| MysqlError::Definite(format!("source.url: {e}")))?;
    let pool = pool(&opts);
    let mut conn = pool.get_conn().await.map_err(MysqlError::connect)?;
    let mut described = Vec::with_capacity(tables.len());
    for (database, table) in tables {
        described.push(ChunkTable::describe(&mut conn, connector, database, table).await?);
    }
    let fail = MysqlError::query("reading the tables in one snapshot");
    let (before, exact) = begin_snapshot(&mut conn, &fail).await?;
    let window = match exact {
        Some(at) => Consistent {
            low: at.clone(),
            high: at,
        },
        None => Consistent {
            low: before,
            high: current_position(&mut conn).await?.0,
        },
    };
    for table in &described {
        let mut after: Option<Vec<String>> = None;
        loop {
            let (select, params) = chunk_select(table, after.as_deref(), None, size);
            let read: Vec<MyRow> = conn.exec(select, params).await.map_err(&fail)?;
            let complete = table.key.is_empty() || read.len() < size;
            let (rows, last) = rows_of(table, read);
            let at = Position::Mysql(window.low.clone());
            for change in chunk_changes(&table.source, &table.key, rows, &at) {
                out.send(SourceMessage::Change(change)).await.map_err(|_| {
                    MysqlError::Definite("the reader of the snapshot stopped".into())
                })?;
            }
            if complete {
                break;
            }
            after = last;
        }
    }
    conn.query_drop("COMMIT").await.map_err(&fail)?;
    drop(conn);
    let _ = pool.disconnect().await;
    Ok(window)
}

/// Begin a read-only transaction with a consistent snapshot: the log's end just before,
/// and MariaDB's exact position of the snapshot (MySQL has none).
async fn begin_snapshot(
    conn: &mut Conn,
    fail: &impl Fn(mysql_async::Error) -> MysqlError,
) -> Result<(BinlogPosition, Option<BinlogPosition>), MysqlError> {
    let (before, _) = current_position(conn).await?;
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        .await
        .map_err(fail)?;
    let snapshot: Vec<(String, String)> = conn
        .query("SHOW STATUS LIKE 'binlog_snapshot_%'")
        .await
        .map_err(fail)?;
    Ok((before, snapshot_position(&snapshot)))
}

/// MariaDB's position of a consistent snapshot, from `SHOW STATUS LIKE 'binlog_snapshot_%'`.
fn snapshot_position(status: &[(String, String)]) -> Option<BinlogPosition> {
    let get = |name: &str| {
        status
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let file = get("binlog_snapshot_file").filter(|f| !f.is_empty())?;
    let offset = get("binlog_snapshot_position")?.parse().ok()?;
    BinlogPosition::new(file, offset).ok()
}

/// The chunk's SELECT and its parameters (the last key's values).
fn chunk_select(
    table: &ChunkTable,
    after: Option<&[String]>,
    filter: Option<&str>,
    size: usize,
) -> (String, Vec<MyValue>) {
    let mut conditions: Vec<String> = filter.map(|f| format!("({f})")).into_iter().collect();
    let columns = table
        .key
        .iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    let mut params = Vec::new();
    if let (Some(last), false) = (after, table.key.is_empty()) {
        let marks = vec!["?"; last.len()].join(", ");
        conditions.push(format!("({columns}) > ({marks})"));
        params = last.iter().map(|v| MyValue::from(v.as_str())).collect();
    }
    let select = crate::source::chunk_select(
        &table.quoted,
        &conditions,
        (!table.key.is_empty()).then_some(columns.as_str()),
        size,
    );
    (select, params)
}

/// The catalog's estimate of the rows in `table`: for progress, never for correctness.
pub async fn estimated_rows(pool: &Pool, table: &ChunkTable) -> Option<u64> {
    let mut conn = pool.get_conn().await.ok()?;
    let (database, name) = table.name.split_once('.')?;
    conn.exec_first(
        "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
        (database, name),
    )
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_snapshot_status_gives_the_position_and_mysql_none() {
        let status = vec![
            (
                "Binlog_snapshot_file".to_string(),
                "mariadb-bin.000004".to_string(),
            ),
            ("Binlog_snapshot_position".to_string(), "568".to_string()),
        ];
        assert_eq!(
            snapshot_position(&status).unwrap().to_string(),
            "mariadb-bin.000004:568"
        );
        assert_eq!(snapshot_position(&[]), None);
    }
}
