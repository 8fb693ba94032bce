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
use serde::Deserialize;

use super::{quote_ident, MysqlError};
use crate::{
    change::{Row, Value},
    config::Secret,
    offsets::SnapshotRequest,
};

/// The signal that asks for a snapshot (Debezium's name).
pub const EXECUTE_SNAPSHOT: &str = "execute-snapshot";

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

/// `execute-snapshot`'s data, as Debezium writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ExecuteSnapshot {
    data_collections: Vec<String>,
    /// `incremental` (the default); `blocking` is not supported.
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    additional_conditions: Vec<Condition>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Condition {
    data_collection: String,
    filter: String,
}

/// What a row of the signal table asks: the snapshots of an `execute-snapshot` signal, one
/// per table named, in order (the row's `id` names the first; the others add `#2`, `#3`…).
/// `Ok(None)`: a signal of another type (Debezium's `log`, `pause-snapshot`…), not for
/// this connector. `Err`: why the signal cannot be read, never quoting its values.
pub fn requests(row: &Row) -> Result<Option<Vec<SnapshotRequest>>, String> {
    let text = |column: &str| match row.get(column) {
        Some(Value::Text(text)) => Ok(Some(text.clone())),
        Some(Value::Bytes(bytes)) => String::from_utf8(bytes.clone())
            .map(Some)
            .map_err(|_| format!("its `{column}` is not UTF-8")),
        Some(Value::Json(json)) => Ok(Some(json.to_string())),
        Some(Value::Null) => Ok(None),
        Some(other) => Err(format!("its `{column}` is {}, not text", other.kind())),
        None => Err(format!("the signal table has no column `{column}`")),
    };
    let id = text("id")?.ok_or("its `id` is NULL")?;
    if text("type")?.as_deref() != Some(EXECUTE_SNAPSHOT) {
        return Ok(None);
    }
    let data = text("data")?.ok_or("its `data` is NULL")?;
    let data: ExecuteSnapshot = serde_json::from_str(&data).map_err(|e| {
        format!(
            "its `data` is not an execute-snapshot signal's (line {}, column {}: {})",
            e.line(),
            e.column(),
            match e.classify() {
                serde_json::error::Category::Data => "unexpected field or value",
                _ => "not JSON",
            }
        )
    })?;
    if let Some(kind) = data.kind.filter(|k| !k.eq_ignore_ascii_case("incremental")) {
        return Err(format!(
            "snapshots of type `{kind}` are not supported (only `incremental`)"
        ));
    }
    if data.data_collections.is_empty() {
        return Err("it names no table (`data-collections` is empty)".into());
    }
    if let Some(stray) = data
        .additional_conditions
        .iter()
        .find(|c| !data.data_collections.contains(&c.data_collection))
    {
        return Err(format!(
            "a condition names `{}`, which `data-collections` does not",
            stray.data_collection
        ));
    }
    let requests = data
        .data_collections
        .iter()
        .enumerate()
        .map(|(at, table)| {
            let conditions: Vec<String> = data
                .additional_conditions
                .iter()
                .filter(|c| c.data_collection == *table)
                .map(|c| format!("({})", c.filter))
                .collect();
            SnapshotRequest {
                id: if at == 0 {
                    id.clone()
                } else {
                    format!("{id}#{}", at + 1)
                },
                table: table.clone(),
                filter: (!conditions.is_empty()).then(|| conditions.join(" AND ")),
            }
        })
        .collect();
    Ok(Some(requests))
}

/// The signal's `data` for `request`.
fn data(request: &SnapshotRequest) -> String {
    let mut data = serde_json::json!({
        "data-collections": [request.table],
        "type": "incremental",
    });
    if let Some(filter) = &request.filter {
        data["additional-conditions"] =
            serde_json::json!([{"data-collection": request.table, "filter": filter}]);
    }
    data.to_string()
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
            let text = crate::mapping::text_of(value);
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
    use std::sync::Arc;

    use super::*;

    fn row(id: &str, kind: &str, data: Option<&str>) -> Row {
        Row::of_layout(
            ["id", "type", "data"].map(Arc::from).to_vec().into(),
            vec![
                Value::Text(id.into()),
                Value::Text(kind.into()),
                data.map_or(Value::Null, |d| Value::Bytes(d.as_bytes().to_vec())),
            ],
        )
    }

    #[test]
    fn what_fhir_cdc_snapshot_writes_reads_back_as_the_same_request() {
        for filter in [None, Some("charge_id IN (1, 2) AND note = 'a\\'b'")] {
            let request = SnapshotRequest::new("billing.charge".into(), filter.map(Into::into));
            let read = requests(&row(&request.id, EXECUTE_SNAPSHOT, Some(&data(&request))))
                .unwrap()
                .unwrap();
            let filter = request.filter.as_ref().map(|f| format!("({f})"));
            assert_eq!(read, vec![SnapshotRequest { filter, ..request }]);
        }
    }

    #[test]
    fn a_debezium_signal_for_two_tables_is_two_requests() {
        let data = r#"{"data-collections": ["db.a", "db.b"], "type": "INCREMENTAL",
            "additional-conditions": [{"data-collection": "db.b", "filter": "x > 1"},
                                      {"data-collection": "db.b", "filter": "y < 2"}]}"#;
        let read = requests(&row("s1", EXECUTE_SNAPSHOT, Some(data)))
            .unwrap()
            .unwrap();
        assert_eq!(
            read,
            vec![
                SnapshotRequest {
                    id: "s1".into(),
                    table: "db.a".into(),
                    filter: None
                },
                SnapshotRequest {
                    id: "s1#2".into(),
                    table: "db.b".into(),
                    filter: Some("(x > 1) AND (y < 2)".into())
                },
            ]
        );
    }

    #[test]
    fn signals_it_cannot_follow_say_why_without_their_values() {
        assert_eq!(requests(&row("s", "log", Some("{}"))).unwrap(), None);
        let why = |data: Option<&str>| requests(&row("s", EXECUTE_SNAPSHOT, data)).unwrap_err();
        assert!(why(None).contains("NULL"));
        assert!(why(Some("{\"data-collections\": [\"secret-42\"")).contains("not JSON"));
        let unknown = why(Some(
            r#"{"data-collections": ["db.a"], "surrogate-key": "mrn-9"}"#,
        ));
        assert!(unknown.contains("unexpected field") && !unknown.contains("mrn-9"));
        assert!(why(Some(
            r#"{"data-collections": ["db.a"], "type": "blocking"}"#
        ))
        .contains("blocking"));
        assert!(why(Some(r#"{"data-collections": []}"#)).contains("no table"));
        assert!(why(Some(
            r#"{"data-collections": ["db.a"], "additional-conditions": [{"data-collection": "db.b", "filter": "1"}]}"#
        ))
        .contains("db.b"));
    }

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
