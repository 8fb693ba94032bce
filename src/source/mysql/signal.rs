//! Ad-hoc snapshots of MySQL and MariaDB tables, asked through a signal table: Debezium's
//! `signal.data.collection`, with its columns and its `execute-snapshot` signal.
//!
//! The binary log has no message of its own to carry a request (PostgreSQL's WAL has,
//! `pg_logical_emit_message`), so a request is a row inserted into a table the connector's
//! binary log reader watches: it arrives in commit order, waits in the log for a connector
//! that is stopped, and needs no privilege of the connector beyond reading the log. Whoever
//! asks needs `INSERT` on that table; the connector never writes to it (it may be emptied at
//! any time).

use mysql_async::{prelude::Queryable, Conn};

use super::{quote_ident, MysqlError};
use crate::{
    change::Value,
    config::Secret,
    offsets::SnapshotRequest,
    source::signal::{data, EXECUTE_SNAPSHOT},
};

/// The statement that creates the signal table `database.table` (Debezium's layout; `data`
/// longer, for the conditions of several tables).
pub fn ddl(table: &str) -> String {
    let quoted = quoted(table);
    format!("CREATE TABLE {quoted} (id VARCHAR(64) PRIMARY KEY, type VARCHAR(32) NOT NULL, data TEXT NULL)")
}

fn quoted(table: &str) -> String {
    let (database, name) = table.split_once('.').unwrap_or(("", table));
    format!("{}.{}", quote_ident(database), quote_ident(name))
}

/// Ask through the signal table `signal` (`database.table`) for `request`.
pub async fn request_snapshot(
    url: &Secret,
    signal: &str,
    request: &SnapshotRequest,
) -> Result<(), MysqlError> {
    let mut conn = super::connect(url).await?;
    conn.exec_drop(
        format!(
            "INSERT INTO {} (id, type, data) VALUES (?, ?, ?)",
            quoted(signal)
        ),
        (&request.id, EXECUTE_SNAPSHOT, data(request)),
    )
    .await
    .map_err(|e| {
        MysqlError::Definite(format!(
            "writing the snapshot request into the signal table {signal} (it must exist, with the columns of `{}`, and the user needs INSERT on it): {}",
            ddl(signal),
            super::error_text(&e)
        ))
    })?;
    let _ = conn.disconnect().await;
    Ok(())
}

/// Whether `filter` is a condition the server takes on `table` (`database.table`): prepared
/// alone, never run.
pub async fn check_condition(url: &Secret, table: &str, filter: &str) -> Result<(), MysqlError> {
    let mut conn: Conn = super::connect(url).await?;
    let prepared = conn
        .prep(format!("SELECT * FROM {} WHERE ({filter})", quoted(table)))
        .await;
    let _ = conn.disconnect().await;
    prepared
        .map(drop)
        .map_err(|e| MysqlError::Definite(format!("--where: {}", super::error_text(&e))))
}

/// The condition that selects the row with this key: `` `col` = 'text' AND … ``. A text
/// with a backslash is written in hex (`X'…'`): what a backslash means in a quoted literal
/// depends on the server's `sql_mode` (`NO_BACKSLASH_ESCAPES`), a hex literal's does not.
pub fn key_condition(key: &[(String, Value)]) -> String {
    let terms: Vec<String> = key
        .iter()
        .map(|(column, value)| {
            let column = quote_ident(column);
            let text = crate::change::text_of(value);
            match value {
                Value::Null => format!("{column} IS NULL"),
                Value::Bytes(bytes) => format!("{column} = X'{}'", hex(bytes)),
                _ if text.contains('\\') => format!("{column} = X'{}'", hex(text.as_bytes())),
                _ => format!("{column} = '{}'", text.replace('\'', "''")),
            }
        })
        .collect();
    terms.join(" AND ")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// What `check` says of the signal table `signal`: `Ok` when it exists with the columns a
/// signal needs, else the problem.
pub async fn check_table(conn: &mut Conn, signal: &str) -> Result<(), String> {
    let (database, table) = signal.split_once('.').unwrap_or(("", signal));
    let columns: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS
              WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (database, table),
        )
        .await
        .map_err(|e| super::error_text(&e))?;
    if columns.is_empty() {
        return Err("does not exist, or the user may not see it".into());
    }
    let missing: Vec<&str> = ["id", "type", "data"]
        .into_iter()
        .filter(|c| !columns.iter().any(|have| have.eq_ignore_ascii_case(c)))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("lacks the column(s) {}", missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_conditions_need_no_escapes_the_sql_mode_could_change() {
        let key = vec![
            ("charge_id".to_owned(), Value::Int(7)),
            ("code".to_owned(), Value::Text("O'Brien".into())),
            ("path".to_owned(), Value::Text("a\\b".into())),
            ("raw".to_owned(), Value::Bytes(vec![0, 255])),
            ("gone".to_owned(), Value::Null),
        ];
        assert_eq!(
            key_condition(&key),
            "`charge_id` = '7' AND `code` = 'O''Brien' AND `path` = X'615C62' AND `raw` = X'00FF' AND `gone` IS NULL"
        );
    }
}
