//! Debezium's signal table, read the same way from every source whose log carries its
//! rows (MySQL's binary log, SQL Server's change tables): a row whose `type` is
//! `execute-snapshot` asks for incremental snapshots of the tables its `data` names.

use serde::Deserialize;

use super::SourceError;
use crate::{
    change::{Row, Value},
    offsets::SnapshotRequest,
};

/// The signal that asks for a snapshot (Debezium's name).
pub const EXECUTE_SNAPSHOT: &str = "execute-snapshot";

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

/// Why a snapshot cannot be asked of a `kind` source whose `[source]` names no signal
/// table, and how to give it one (`example`, created by `ddl`).
pub fn no_signal_table(kind: &str, example: &str, ddl: &str) -> SourceError {
    SourceError::Connector(format!(
        "snapshots of a {kind} source are asked through a signal table, and [source] names none: create one (e.g. `{ddl}`), set signal.data.collection = \"{example}\" in [source], restart the connector, and GRANT INSERT on the table to the user of source.url"
    ))
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
pub fn data(request: &SnapshotRequest) -> String {
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
}
