//! Snapshot chunks of SQL Server tables: key-ordered, each read in a SNAPSHOT isolation
//! transaction of its own with its watermarks (see the module documentation of
//! [`super`]).

use std::sync::Arc;

use tiberius::ToSql;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{
    catalog::{self, max_lsn, TableColumns},
    connection::{connect, Client},
    quote_ident, quote_table, types, MssqlError,
};
use crate::{
    change::{ChangeLsn, Lsn, Names, Position, Row, SourceTable, Value},
    config::Secret,
    source::chunks::{self, Chunk},
};

/// A table as chunks read it.
#[derive(Debug)]
pub struct ChunkTable {
    /// `schema.table`.
    pub name: String,
    quoted: String,
    /// The table's name as the `FROM` exposes it: key columns are named after it, because
    /// the select list's aliases (a cast column keeps its name) would win in `ORDER BY`
    /// and sort by the cast value, not the column the continuation compares.
    exposed: String,
    pub source: Arc<SourceTable>,
    /// The columns as selected (money as decimal, code-page text as nvarchar).
    select: String,
    names: Names,
    pub key: Names,
    key_at: Vec<usize>,
    /// The key columns' declared types: the last key's text is cast to them, so the
    /// comparison is the column's own (its collation, its order) and can seek the index.
    key_types: Vec<String>,
}

/// A chunk's continuation parameter: the last key's text, as the column's type needs it.
#[derive(Debug)]
enum KeyParam {
    Text(String),
    Bytes(Vec<u8>),
}

impl KeyParam {
    /// `text` (as [`chunks::key_text`] wrote it) for a column declared `declared`: binary
    /// keys as their bytes (the text is base64), times with at most the seven fractional
    /// digits SQL Server's literals take (its values have no more).
    fn of(text: &str, declared: &str) -> Self {
        use base64::Engine;
        if declared.starts_with("binary") || declared.starts_with("varbinary") {
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(text) {
                return KeyParam::Bytes(bytes);
            }
        }
        if ["datetime2", "time", "datetimeoffset"]
            .iter()
            .any(|t| declared.starts_with(t))
        {
            return KeyParam::Text(types::seven_digits(text));
        }
        KeyParam::Text(text.to_owned())
    }

    fn sql(&self) -> &dyn ToSql {
        match self {
            KeyParam::Text(text) => text,
            KeyParam::Bytes(bytes) => bytes,
        }
    }
}

impl ChunkTable {
    /// `name` (`schema.table`) of `database` as the catalog describes it.
    pub async fn describe(
        client: &mut Client,
        connector: &str,
        database: &str,
        name: &str,
    ) -> Result<Self, MssqlError> {
        let (schema, table) = name.split_once('.').unwrap_or(("dbo", name));
        let TableColumns {
            columns,
            declared,
            key,
        } = catalog::table_columns(client, schema, table).await?;
        if columns.is_empty() {
            return Err(MssqlError::Definite(format!(
                "the mapped table {name} does not exist, or the user may not read it (GRANT SELECT ON {} TO <user>)",
                quote_table(schema, table)
            )));
        }
        let names: Names = columns.iter().map(|(n, _)| Arc::from(n.as_str())).collect();
        let key_at: Vec<usize> = key
            .iter()
            .filter_map(|k| names.iter().position(|n| **n == **k))
            .collect();
        let key_types = key_at.iter().map(|at| declared[*at].clone()).collect();
        Ok(Self {
            name: name.to_owned(),
            quoted: quote_table(schema, table),
            exposed: quote_ident(table),
            source: Arc::new(SourceTable::new(
                connector,
                "sqlserver",
                database,
                schema,
                table,
            )),
            select: types::select_list(&columns, ""),
            names,
            key: key.iter().map(|k| Arc::from(k.as_str())).collect(),
            key_at,
            key_types,
        })
    }

    /// The parameters of a chunk after `after` (the last key's text).
    fn key_params(&self, after: Option<&[String]>) -> Vec<KeyParam> {
        after
            .unwrap_or_default()
            .iter()
            .zip(&self.key_types)
            .map(|(text, declared)| KeyParam::of(text, declared))
            .collect()
    }

    /// `@Pn` as the `n`th key column's value: cast to its type, bytes as they are.
    fn key_value(&self, n: usize) -> String {
        match self.key_types.get(n - 1) {
            Some(declared) if !declared.contains("binary") => format!("CAST(@P{n} AS {declared})"),
            _ => format!("@P{n}"),
        }
    }

    /// The `n`th key column, named after the table (see [`ChunkTable::exposed`]).
    fn key_column(&self, n: usize) -> String {
        format!("{}.{}", self.exposed, quote_ident(&self.key[n]))
    }

    /// The chunk's `SELECT`: the next `size` rows after the last key (its values are the
    /// parameters `@P1…`), of those matching `filter`, in key order.
    fn select(&self, after: bool, filter: Option<&str>, size: usize) -> String {
        let mut conditions: Vec<String> = filter.map(|f| format!("({f})")).into_iter().collect();
        if after && !self.key.is_empty() {
            // (a, b) > (@P1, @P2), which T-SQL cannot write as a row comparison.
            let terms: Vec<String> = (0..self.key.len())
                .map(|n| {
                    let mut term: Vec<String> = (0..n)
                        .map(|i| format!("{} = {}", self.key_column(i), self.key_value(i + 1)))
                        .collect();
                    term.push(format!(
                        "{} > {}",
                        self.key_column(n),
                        self.key_value(n + 1)
                    ));
                    format!("({})", term.join(" AND "))
                })
                .collect();
            conditions.push(format!("({})", terms.join(" OR ")));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        if self.key.is_empty() {
            return format!("SELECT {} FROM {}{filter}", self.select, self.quoted);
        }
        let order: Vec<String> = (0..self.key.len()).map(|n| self.key_column(n)).collect();
        format!(
            "SELECT TOP ({size}) {} FROM {}{filter} ORDER BY {}",
            self.select,
            self.quoted,
            order.join(", ")
        )
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

/// Chunks of a database's tables, read over one connection kept between chunks.
#[derive(Debug, Clone)]
pub struct Reader {
    pub url: Secret,
    pub connector: String,
    pub database: String,
    client: Arc<Mutex<Option<Client>>>,
}

impl Reader {
    pub fn new(url: &Secret, connector: &str, database: &str) -> Self {
        Self {
            url: url.clone(),
            connector: connector.to_owned(),
            database: database.to_owned(),
            client: Arc::new(Mutex::new(None)),
        }
    }

    /// The kept connection (a new one when there is none), held until [`Self::give_back`].
    async fn take(&self) -> Result<(OwnedMutexGuard<Option<Client>>, Client), MssqlError> {
        let mut kept = self.client.clone().lock_owned().await;
        let client = match kept.take() {
            Some(client) => client,
            None => connect(&self.url).await?,
        };
        Ok((kept, client))
    }

    /// Keep `client` for the next chunk, unless its work failed in a way that may have
    /// broken the connection.
    fn give_back<T>(
        mut kept: OwnedMutexGuard<Option<Client>>,
        client: Client,
        result: &Result<T, MssqlError>,
    ) {
        if !matches!(result, Err(MssqlError::Transient(_))) {
            *kept = Some(client);
        }
    }
}

impl chunks::ChunkReader for Reader {
    type Position = ChangeLsn;
    type Table = ChunkTable;
    type Error = MssqlError;

    async fn describe(&self, name: &str) -> Result<ChunkTable, MssqlError> {
        let (kept, mut client) = self.take().await?;
        let described =
            ChunkTable::describe(&mut client, &self.connector, &self.database, name).await;
        Self::give_back(kept, client, &described);
        described
    }

    fn read(
        &self,
        table: Arc<ChunkTable>,
        after: Option<Vec<String>>,
        filter: Option<String>,
        size: usize,
    ) -> impl std::future::Future<Output = Result<Chunk<ChangeLsn>, MssqlError>> + Send + 'static
    {
        let reader = self.clone();
        async move {
            let (kept, mut client) = reader.take().await?;
            let read = read_chunk(
                &mut client,
                &table,
                after.as_deref(),
                filter.as_deref(),
                size,
            )
            .await;
            Self::give_back(kept, client, &read);
            read
        }
    }

    async fn estimated_rows(&self, table: &ChunkTable) -> Option<u64> {
        let (kept, mut client) = self.take().await.ok()?;
        let row = super::row(
            &mut client,
            "SELECT SUM(p.rows) FROM sys.partitions AS p WHERE p.object_id = OBJECT_ID(@P1) AND p.index_id IN (0, 1)",
            &[&table.quoted.as_str()],
            "estimating a table's rows",
        )
        .await;
        Self::give_back(kept, client, &row);
        row.ok()?
            .and_then(|r| r.get::<i64, _>(0))
            .and_then(|n| u64::try_from(n).ok())
    }

    fn refused(error: &MssqlError) -> bool {
        matches!(error, MssqlError::Refused(_))
    }

    fn position(position: &Position) -> Option<ChangeLsn> {
        match position {
            Position::SqlServer(at) => Some(*at),
            _ => None,
        }
    }
}

/// Up to `size` rows of `table` after `after` (all of them without a key), of those
/// matching `filter`, with the chunk's watermarks.
pub async fn read_chunk(
    client: &mut Client,
    table: &ChunkTable,
    after: Option<&[String]>,
    filter: Option<&str>,
    size: usize,
) -> Result<Chunk<ChangeLsn>, MssqlError> {
    let low = begin_snapshot(client).await?;
    let read = select_rows(client, table, after, filter, size).await;
    let high = end_snapshot(client).await;
    let (rows, last_key, complete) = read?;
    Ok(Chunk {
        rows,
        last_key,
        complete,
        low,
        high: high?,
    })
}

/// Up to `size` rows of `table` after the key `after`, of those matching `filter`, with
/// the last one's key and whether the table is read to its end.
pub async fn select_rows(
    client: &mut Client,
    table: &ChunkTable,
    after: Option<&[String]>,
    filter: Option<&str>,
    size: usize,
) -> Result<(Vec<Row>, Option<Vec<String>>, bool), MssqlError> {
    let select = table.select(after.is_some(), filter, size);
    let keys = table.key_params(after);
    let params: Vec<&dyn ToSql> = keys.iter().map(KeyParam::sql).collect();
    let read = super::rows(client, &select, &params, "reading a snapshot chunk").await?;
    let complete = table.key.is_empty() || read.len() < size;
    let (rows, last_key) = rows_of(table, read)?;
    Ok((rows, last_key, complete))
}

/// Read every row of `tables` (`(schema, table)`) in one SNAPSHOT isolation transaction,
/// `size` rows at a time in key order, each row a read at the snapshot's low mark into
/// `out` (`reconcile`). Returns the window: every change up to its low end is in the
/// read, none after its high end.
pub async fn read_consistent(
    url: &Secret,
    connector: &str,
    tables: &[(String, String)],
    size: usize,
    out: &tokio::sync::mpsc::Sender<crate::change::SourceMessage>,
) -> Result<(ChangeLsn, ChangeLsn), MssqlError> {
    let database = crate::config::ado::database(url)
        .ok_or_else(|| MssqlError::Definite("source.url names no database".into()))?;
    let mut client = connect(url).await?;
    let mut described = Vec::with_capacity(tables.len());
    for (schema, table) in tables {
        let name = format!("{schema}.{table}");
        described.push(ChunkTable::describe(&mut client, connector, &database, &name).await?);
    }
    let low = begin_snapshot(&mut client).await?;
    for table in &described {
        let mut after: Option<Vec<String>> = None;
        loop {
            let (rows, last, complete) =
                select_rows(&mut client, table, after.as_deref(), None, size).await?;
            let at = Position::SqlServer(low);
            for change in crate::source::chunk_changes(&table.source, &table.key, rows, &at) {
                out.send(crate::change::SourceMessage::Change(change))
                    .await
                    .map_err(|_| {
                        MssqlError::Definite("the reader of the snapshot stopped".into())
                    })?;
            }
            if complete {
                break;
            }
            after = last;
        }
    }
    let high = end_snapshot(&mut client).await?;
    let _ = client.close().await;
    Ok((low, high))
}

/// The capture job's position, then a SNAPSHOT isolation transaction begun: every change
/// up to the returned low mark is in what the transaction will read.
async fn begin_snapshot(client: &mut Client) -> Result<ChangeLsn, MssqlError> {
    let low = max_lsn(client).await?.unwrap_or_default();
    client
        .simple_query("SET TRANSACTION ISOLATION LEVEL SNAPSHOT; BEGIN TRANSACTION")
        .await
        .map_err(MssqlError::query(
            "beginning a snapshot transaction (the database needs ALTER DATABASE … SET ALLOW_SNAPSHOT_ISOLATION ON)",
        ))?
        .into_results()
        .await
        .map_err(MssqlError::query("beginning a snapshot transaction"))?;
    Ok(ChangeLsn::end_of(low))
}

/// The high mark of the transaction's reads, and the transaction ended (rolled back: it
/// wrote nothing). A savepoint gives the transaction a place in the log; every change its
/// reads saw committed before that place.
async fn end_snapshot(client: &mut Client) -> Result<ChangeLsn, MssqlError> {
    let fail = MssqlError::query(
        "reading the snapshot transaction's LSN (sys.dm_tran_database_transactions: GRANT VIEW SERVER STATE, on SQL Server 2022 VIEW SERVER PERFORMANCE STATE, TO <user>)",
    );
    let read = async {
        client
            .simple_query(
                "SAVE TRANSACTION fhir_cdc_chunk;
                 SELECT database_transaction_begin_lsn FROM sys.dm_tran_database_transactions
                  WHERE transaction_id = CURRENT_TRANSACTION_ID() AND database_id = DB_ID()",
            )
            .await?
            .into_row()
            .await
    }
    .await;
    let ended = client
        .simple_query("ROLLBACK; SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .await;
    let ended = match ended {
        Ok(stream) => stream.into_results().await.map(drop),
        Err(e) => Err(e),
    };
    let row = read.map_err(&fail)?;
    ended.map_err(MssqlError::query("ending a snapshot transaction"))?;
    let lsn = match row.as_ref().map(|r| r.get_column_data(0)) {
        Some(Ok(tiberius::ColumnData::Numeric(Some(n)))) => {
            u128::try_from(n.value()).ok().map(Lsn::from_decimal)
        }
        _ => None,
    };
    match lsn {
        Some(Ok(high)) => Ok(ChangeLsn {
            commit: high,
            seqval: Lsn::default(),
            step: 0,
        }),
        _ => Err(MssqlError::Definite(
            "the server gave the snapshot transaction no LSN (sys.dm_tran_database_transactions.database_transaction_begin_lsn)".into(),
        )),
    }
}

/// The server's rows of `table` as rows, with the last one's key as text.
fn rows_of(
    table: &ChunkTable,
    read: Vec<tiberius::Row>,
) -> Result<(Vec<Row>, Option<Vec<String>>), MssqlError> {
    let mut rows = Vec::with_capacity(read.len());
    let mut last_key = None;
    for row in read {
        let values = row
            .into_iter()
            .zip(table.names.iter())
            .map(|(data, name)| {
                types::value(data).map_err(|why| {
                    MssqlError::Definite(format!("column {name} of {}: {why}", table.name))
                })
            })
            .collect::<Result<Vec<Value>, _>>()?;
        last_key = Some(chunks::key_text(&values, &table.key_at));
        rows.push(Row::of_layout(table.names.clone(), values));
    }
    Ok((rows, last_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(key: &[&str]) -> ChunkTable {
        let columns = [("id", "int"), ("seq", "varchar"), ("amount", "money")];
        ChunkTable {
            name: "dbo.charge".into(),
            quoted: "[dbo].[charge]".into(),
            exposed: "[charge]".into(),
            source: Arc::new(SourceTable::new(
                "c",
                "sqlserver",
                "billing",
                "dbo",
                "charge",
            )),
            select: types::select_list(&columns.map(|(n, t)| (n.to_owned(), t.to_owned())), ""),
            names: columns.iter().map(|(n, _)| Arc::from(*n)).collect(),
            key: key.iter().map(|k| Arc::from(*k)).collect(),
            key_at: Vec::new(),
            key_types: key
                .iter()
                .map(|k| if *k == "seq" { "varchar(20)" } else { "int" }.to_owned())
                .collect(),
        }
    }

    #[test]
    fn the_last_key_is_given_as_its_column_needs_it() {
        assert!(
            matches!(KeyParam::of("AP8=", "varbinary(16)"), KeyParam::Bytes(b) if b == [0, 255])
        );
        assert!(matches!(
            KeyParam::of("2024-02-29T12:34:56.123456700", "datetime2(7)"),
            KeyParam::Text(t) if t == "2024-02-29T12:34:56.1234567"
        ));
        assert!(
            matches!(KeyParam::of("1.123456700", "decimal(20,9)"), KeyParam::Text(t) if t == "1.123456700")
        );
    }

    #[test]
    fn chunks_continue_after_the_last_key_in_key_order() {
        // seq is read cast to nvarchar under its own name: order and comparison name the
        // table's column, not the alias.
        let two = table(&["id", "seq"]);
        assert_eq!(
            two.select(true, Some("amount > 0"), 100),
            "SELECT TOP (100) [id], CAST([seq] AS nvarchar(max)) AS [seq], CAST([amount] AS decimal(19,4)) AS [amount] \
             FROM [dbo].[charge] WHERE (amount > 0) AND (([charge].[id] > CAST(@P1 AS int)) \
             OR ([charge].[id] = CAST(@P1 AS int) AND [charge].[seq] > CAST(@P2 AS varchar(20)))) \
             ORDER BY [charge].[id], [charge].[seq]"
        );
        assert_eq!(
            two.select(false, None, 5),
            "SELECT TOP (5) [id], CAST([seq] AS nvarchar(max)) AS [seq], CAST([amount] AS decimal(19,4)) AS [amount] \
             FROM [dbo].[charge] ORDER BY [charge].[id], [charge].[seq]"
        );
        let keyless = table(&[]);
        assert_eq!(
            keyless.select(false, None, 5),
            "SELECT [id], CAST([seq] AS nvarchar(max)) AS [seq], CAST([amount] AS decimal(19,4)) AS [amount] FROM [dbo].[charge]"
        );
    }
}
