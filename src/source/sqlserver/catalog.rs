//! What the connector asks SQL Server's catalog and CDC metadata: how far the capture job
//! has got, the capture instances of the mapped tables with their columns, a table's
//! columns and primary key, and the lock that keeps a second copy of a connector out.

use std::collections::BTreeMap;

use tiberius::{ColumnData, Row};

use super::{changes::Instance, connection::Client, MssqlError};
use crate::change::Lsn;

/// Column `at` of `row` as an LSN (`binary(10)`), or `None` when NULL.
pub fn lsn_at(row: &Row, at: usize) -> Result<Option<Lsn>, MssqlError> {
    match row.get_column_data(at) {
        Ok(ColumnData::Binary(Some(bytes))) => Lsn::from_bytes(bytes)
            .map(Some)
            .map_err(|e| MssqlError::Definite(format!("column {at} of a CDC result: {e}"))),
        Ok(ColumnData::Binary(None)) => Ok(None),
        _ => Err(MssqlError::Definite(format!(
            "column {at} of a CDC result is not an LSN (binary(10))"
        ))),
    }
}

/// Column `at` of `row` as text (`None` when NULL or not text).
pub fn text_at(row: &Row, at: usize) -> Option<String> {
    match row.get_column_data(at) {
        Ok(ColumnData::String(Some(text))) => Some(text.to_string()),
        _ => None,
    }
}

/// How far the capture job has got: `sys.fn_cdc_get_max_lsn()`, NULL until it has
/// captured anything (CDC just enabled, or SQL Server Agent not running).
pub async fn max_lsn(client: &mut Client) -> Result<Option<Lsn>, MssqlError> {
    let row = super::row(
        client,
        "SELECT sys.fn_cdc_get_max_lsn()",
        &[],
        "reading the capture job's position (sys.fn_cdc_get_max_lsn)",
    )
    .await?;
    match row {
        Some(row) => lsn_at(&row, 0),
        None => Ok(None),
    }
}

/// A capture instance with the table it captures and its columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureInstance {
    /// `schema.table` of the captured table.
    pub table: String,
    pub instance: Instance,
    /// The captured columns, in their order in the change table, with their types.
    pub columns: Vec<(String, String)>,
}

const INSTANCES: &str = "SELECT s.name, t.name, ct.capture_instance, ct.start_lsn, ct.create_date, cc.column_name, cc.column_type
  FROM cdc.change_tables AS ct
  JOIN sys.tables AS t ON t.object_id = ct.source_object_id
  JOIN sys.schemas AS s ON s.schema_id = t.schema_id
  JOIN cdc.captured_columns AS cc ON cc.object_id = ct.object_id
 ORDER BY ct.capture_instance, cc.column_ordinal";

/// Every capture instance of the database (`cdc.change_tables`, `cdc.captured_columns`),
/// by the `schema.table` it captures. An instance whose start is not yet established
/// (NULL: CDC was just enabled) is a transient error: the capture job sets it.
pub async fn instances(
    client: &mut Client,
) -> Result<BTreeMap<String, Vec<CaptureInstance>>, MssqlError> {
    let rows = super::rows(
        client,
        INSTANCES,
        &[],
        "reading the capture instances (cdc.change_tables; the user needs SELECT on the cdc schema)",
    )
    .await?;
    let mut found: Vec<CaptureInstance> = Vec::new();
    for row in &rows {
        let (Some(schema), Some(table), Some(name)) =
            (text_at(row, 0), text_at(row, 1), text_at(row, 2))
        else {
            continue;
        };
        let Some(start) = lsn_at(row, 3)? else {
            return Err(MssqlError::Transient(format!(
                "capture instance {name} of {schema}.{table} was just enabled: its start is not established yet (is SQL Server Agent running?)"
            )));
        };
        let created = match row.get_column_data(4).cloned().map(super::types::value) {
            Ok(Ok(crate::change::Value::Timestamp(at))) => at,
            _ => chrono::NaiveDateTime::MIN,
        };
        let column = (
            text_at(row, 5).unwrap_or_default(),
            text_at(row, 6).unwrap_or_default(),
        );
        match found.last_mut() {
            Some(last) if last.instance.name == name => last.columns.push(column),
            _ => found.push(CaptureInstance {
                table: format!("{schema}.{table}"),
                instance: Instance {
                    name,
                    start,
                    created,
                },
                columns: vec![column],
            }),
        }
    }
    let mut by_table: BTreeMap<String, Vec<CaptureInstance>> = BTreeMap::new();
    for instance in found {
        by_table
            .entry(instance.table.clone())
            .or_default()
            .push(instance);
    }
    Ok(by_table)
}

/// A table's columns with their base types, and its primary key, from the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumns {
    pub columns: Vec<(String, String)>,
    /// Each column's type as declared (`decimal(10,2)`, `nvarchar(40)`), in column order.
    pub declared: Vec<String>,
    pub key: Vec<String>,
}

/// A column's type as `CAST` writes it, from `sys.columns`: the base type with its length
/// (in bytes there: half of it for nchar and nvarchar, -1 for max), precision or scale.
pub fn declared_type(name: &str, max_length: i16, precision: u8, scale: u8) -> String {
    let length = |units: i16| {
        if max_length == -1 {
            "max".to_owned()
        } else {
            (max_length / units).to_string()
        }
    };
    match name {
        "decimal" | "numeric" => format!("{name}({precision},{scale})"),
        "char" | "varchar" | "binary" | "varbinary" => format!("{name}({})", length(1)),
        "nchar" | "nvarchar" => format!("{name}({})", length(2)),
        "datetime2" | "time" | "datetimeoffset" => format!("{name}({scale})"),
        _ => name.to_owned(),
    }
}

/// The columns and primary key of `schema.table`; no columns when it does not exist or
/// the user may not see it.
pub async fn table_columns(
    client: &mut Client,
    schema: &str,
    table: &str,
) -> Result<TableColumns, MssqlError> {
    let what = "reading a mapped table's columns";
    let qualified = super::quote_table(schema, table);
    let rows = super::rows(
        client,
        "SELECT c.name, TYPE_NAME(c.system_type_id), c.max_length, c.precision, c.scale
           FROM sys.columns AS c WHERE c.object_id = OBJECT_ID(@P1) ORDER BY c.column_id",
        &[&qualified.as_str()],
        what,
    )
    .await?;
    let mut columns = Vec::with_capacity(rows.len());
    let mut declared = Vec::with_capacity(rows.len());
    for row in &rows {
        let (Some(name), base) = (text_at(row, 0), text_at(row, 1).unwrap_or_default()) else {
            continue;
        };
        declared.push(declared_type(
            &base,
            row.get::<i16, _>(2).unwrap_or_default(),
            row.get::<u8, _>(3).unwrap_or_default(),
            row.get::<u8, _>(4).unwrap_or_default(),
        ));
        columns.push((name, base));
    }
    let key = super::rows(
        client,
        "SELECT c.name FROM sys.indexes AS i
           JOIN sys.index_columns AS ic ON ic.object_id = i.object_id AND ic.index_id = i.index_id
           JOIN sys.columns AS c ON c.object_id = ic.object_id AND c.column_id = ic.column_id
          WHERE i.object_id = OBJECT_ID(@P1) AND i.is_primary_key = 1
          ORDER BY ic.key_ordinal",
        &[&qualified.as_str()],
        what,
    )
    .await?
    .iter()
    .filter_map(|row| text_at(row, 0))
    .collect();
    Ok(TableColumns {
        columns,
        declared,
        key,
    })
}

/// The application lock a running connector holds in the database for as long as its
/// session lasts (`sp_getapplock` with a session owner): one copy of a connector at a
/// time. The server releases it with the session, also when the process is killed.
pub fn running_lock(connector: &str) -> String {
    format!("fhir-cdc {connector}")
}

/// Take `connector`'s lock on `client`'s session.
pub async fn take_running_lock(client: &mut Client, connector: &str) -> Result<(), MssqlError> {
    let lock = running_lock(connector);
    let row = super::row(
        client,
        "DECLARE @r int;
         EXEC @r = sys.sp_getapplock @Resource = @P1, @LockMode = 'Exclusive', @LockOwner = 'Session', @LockTimeout = 0;
         SELECT @r;",
        &[&lock.as_str()],
        "taking the connector's lock (sp_getapplock)",
    )
    .await?;
    match row.and_then(|r| r.get::<i32, _>(0)) {
        Some(status) if status >= 0 => Ok(()),
        // -1: another session holds it. Retried with backoff.
        _ => Err(MssqlError::Transient(format!(
            "connector {connector} is already running against this database (another session holds its lock `{lock}`): two copies would overwrite each other's state"
        ))),
    }
}

/// Whether a session holds `connector`'s lock now: it runs against the database.
pub async fn lock_holder(
    url: &crate::config::Secret,
    connector: &str,
) -> Result<Option<String>, MssqlError> {
    let mut client = super::connection::connect(url).await?;
    let lock = running_lock(connector);
    let free = super::row(
        &mut client,
        "SELECT APPLOCK_TEST(N'public', @P1, N'Exclusive', N'Session')",
        &[&lock.as_str()],
        "testing the connector's lock (APPLOCK_TEST)",
    )
    .await?
    .and_then(|r| r.get::<i32, _>(0));
    let _ = client.close().await;
    Ok((free == Some(0)).then(|| format!("a session holds its lock `{lock}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_are_written_as_cast_takes_them() {
        assert_eq!(declared_type("decimal", 9, 10, 2), "decimal(10,2)");
        assert_eq!(declared_type("nvarchar", 80, 0, 0), "nvarchar(40)");
        assert_eq!(declared_type("varchar", -1, 0, 0), "varchar(max)");
        assert_eq!(declared_type("binary", 10, 0, 0), "binary(10)");
        assert_eq!(declared_type("datetime2", 8, 27, 7), "datetime2(7)");
        assert_eq!(declared_type("int", 4, 10, 0), "int");
    }
}
