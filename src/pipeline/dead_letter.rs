//! Dead-letter records: a change no mapping could turn into an event, with everything
//! needed to understand and replay it — the reason, the mapping, the position, and the row
//! as the database sent it. JSON, so that any consumer (and an operator) can read it.

use serde_json::{json, Map, Value as Json};

use crate::{
    change::{ChangeEvent, Row, Value},
    mapping::{text_of, MapFailure},
};

/// The dead-letter record of `change` failing `failure`.
pub fn record(change: &ChangeEvent, failure: &MapFailure) -> Vec<u8> {
    let source = &change.source;
    let record = json!({
        "connector": source.connector,
        "database_kind": source.kind,
        "database": source.database,
        "schema": source.schema,
        "table": source.table,
        "op": change.op.to_string(),
        "source_position": change.position.to_string(),
        "ordinal": change.ordinal,
        "transaction_id": change.transaction_id,
        "key": change.key,
        "mapping_id": failure.mapping_id,
        "error": failure.error.to_string(),
        "before": change.before.as_ref().map(row),
        "after": change.after.as_ref().map(row),
    });
    serde_json::to_vec(&record).expect("JSON values serialize")
}

/// Column → value as text (its kind kept for exactness), NULL as null; a value the
/// database did not send (an unchanged TOASTed value) as `{"unavailable": true}`.
fn row(row: &Row) -> Json {
    let mut columns = Map::new();
    for (name, value) in row.columns() {
        let json = match value {
            Value::Null => Json::Null,
            other => json!({"kind": other.kind(), "text": text_of(other)}),
        };
        columns.insert(name.to_owned(), json);
    }
    for name in row.unavailable() {
        columns.insert(name.clone(), json!({"unavailable": true}));
    }
    Json::Object(columns)
}
