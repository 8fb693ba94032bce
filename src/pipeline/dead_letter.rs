//! Dead-letter records: a change no mapping could turn into an event, with everything
//! needed to understand and replay it — the reason, the mapping, the position, the key and
//! (as `[dead_letters] rows` says) the row. JSON, so that any consumer (and an operator)
//! can read it.
//!
//! Rows are written `protected` by default: a column an element of the table's mappings
//! protects is written in the form the events carry it (its token, or no value when
//! masked), so the dead-letter topic holds no more PHI than the event topics. `full`
//! writes every value as the database sent it; `none` writes no row, only the key.
//!
//! [`replay_of`] reads a record back: into the change it was made of, value for value,
//! when it holds the whole row, so that `fhir-cdc dlq replay` can map it again once the
//! cause is fixed (the events it then yields carry the ids they would have had the first
//! time); otherwise into the key by which the row can be read again at the source.

use std::{str::FromStr, sync::Arc};

use base64::Engine;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime};
use serde_json::{json, Map, Value as Json};

use crate::{
    canonical::instant,
    change::{text_of, ChangeEvent, ExactDecimal, Operation, Position, Row, SourceTable, Value},
    config::DeadLetterRows,
    mapping::{MapFailure, Mapper, Protect},
};

/// What the letters of one connector hold of their rows.
#[derive(Debug, Clone, Copy)]
pub struct Letters<'a> {
    pub rows: DeadLetterRows,
    /// The mappings, whose protected columns `protected` rows hide.
    pub mapper: &'a Mapper,
}

/// The dead-letter record of `change` failing `failure`, at most `limit` bytes: a record
/// whose rows would make it larger carries none (`before` and `after` null) and says so in
/// `rows_omitted` — a letter Kafka refused would stop the connector on every restart.
pub fn record(
    change: &ChangeEvent,
    failure: &MapFailure,
    letters: Letters<'_>,
    limit: usize,
) -> Vec<u8> {
    let mut record = letter(change, failure, letters);
    if letters.rows == DeadLetterRows::None {
        record["rows_omitted"] =
            json!("[dead_letters] rows = \"none\": read the row at the source by its key");
        return serde_json::to_vec(&record).expect("JSON values serialize");
    }
    let bytes = serde_json::to_vec(&record).expect("JSON values serialize");
    if bytes.len() <= limit {
        return bytes;
    }
    record["before"] = Json::Null;
    record["after"] = Json::Null;
    record["rows_omitted"] = json!(format!(
        "with its rows the letter is {} bytes, more than the {limit} its topic takes; read the row at the source by its key",
        bytes.len()
    ));
    serde_json::to_vec(&record).expect("JSON values serialize")
}

fn letter(change: &ChangeEvent, failure: &MapFailure, letters: Letters<'_>) -> Json {
    let source = &change.source;
    let row = |row: &Row| match letters.rows {
        DeadLetterRows::None => Json::Null,
        DeadLetterRows::Full => self::row(row, |_| None),
        DeadLetterRows::Protected => protected_row(row, source, letters.mapper),
    };
    // The key's values (the key the failed mapping declares: with a full replica identity
    // the change flags every column), from the new row or else the old one, protected
    // like the rows unless they are written whole.
    let key_columns: Vec<&str> = match letters.mapper.source_key(source, &failure.mapping_id) {
        Some(key) => key.iter().map(String::as_str).collect(),
        None => change.key.iter().map(|name| &**name).collect(),
    };
    let keyed = change.after.as_ref().or(change.before.as_ref());
    let key_values = keyed.map(|image| {
        let key = Row::new(
            image
                .columns()
                .filter(|(column, _)| key_columns.contains(column))
                .map(|(column, value)| (column.into(), value.clone()))
                .collect(),
        );
        match letters.rows {
            DeadLetterRows::Full => self::row(&key, |_| None),
            _ => protected_row(&key, source, letters.mapper),
        }
    });
    json!({
        "connector": source.connector,
        "database_kind": source.kind,
        "database": source.database,
        "schema": source.schema,
        "table": source.table,
        "op": change.op.to_string(),
        "source_position": change.position.to_string(),
        "ordinal": change.ordinal,
        "transaction_id": change.transaction_id,
        "commit_time": change.commit_time.map(instant),
        "capture_time": instant(change.capture_time),
        "key": key_columns,
        "key_values": key_values,
        "mapping_id": failure.mapping_id,
        "error": failure.error.to_string(),
        "rows": letters.rows.as_str(),
        "before": change.before.as_ref().map(row),
        "after": change.after.as_ref().map(row),
    })
}

/// `row` with the columns `mapper` protects in `source` in their protected form:
/// `{"kind", "protected": "token", "token"}` or `{"kind", "protected": "mask"}`.
fn protected_row(row: &Row, source: &SourceTable, mapper: &Mapper) -> Json {
    self::row(row, |(name, value)| {
        let protect = mapper.protection(&source.schema, &source.table, name)?;
        Some(match (protect, mapper.token(text_of(value).trim())) {
            (Protect::Token, Some(token)) => {
                json!({"kind": value.kind(), "protected": "token", "token": token})
            }
            // Without a key no mapping can run that tokenizes; hide the value all the same.
            (Protect::Token, None) | (Protect::Mask, _) => {
                json!({"kind": value.kind(), "protected": "mask"})
            }
        })
    })
}

/// What replaying a record takes.
#[derive(Debug)]
pub enum Replay {
    /// The change, whole, and the id of the mapping that failed it: map it again.
    Change(Box<ChangeEvent>, String),
    /// The record holds no whole row: read the row again at the source by its key.
    ReRead {
        table: Arc<SourceTable>,
        key: Vec<(String, Value)>,
    },
}

/// How a record can be replayed. The error names the field that is missing or malformed,
/// never a value.
pub fn replay_of(record: &Json) -> Result<Replay, String> {
    let whole = record["rows_omitted"].is_null()
        && ["before", "after"].iter().all(|image| {
            record[image]
                .as_object()
                .is_none_or(|columns| columns.values().all(|c| c.get("protected").is_none()))
        });
    if whole {
        let (change, mapping) = change_of(record)?;
        return Ok(Replay::Change(Box::new(change), mapping));
    }
    let (change, _) = change_of(&Json::Object(
        record
            .as_object()
            .ok_or("the record is not a JSON object")?
            .iter()
            .filter(|(field, _)| !matches!(field.as_str(), "before" | "after"))
            .map(|(field, value)| (field.clone(), value.clone()))
            .collect(),
    ))?;
    if change.op == Operation::Delete {
        return Err("the letter of a delete holds no whole row, and the source no longer has it: write [dead_letters] rows = \"full\" to replay deletes, or let reconciliation remove the resource".into());
    }
    let key = match &record["key_values"] {
        Json::Object(columns) => columns,
        _ => return Err("the letter holds neither a whole row nor the key's values".into()),
    };
    if let Some((name, _)) = key.iter().find(|(_, c)| c.get("protected").is_some()) {
        return Err(format!(
            "key column `{name}` is protected by a mapping, so the letter does not hold the value to read the row again by; read the table again (`fhir-cdc snapshot --table {}`)",
            change.source.qualified_name()
        ));
    }
    let key = image_of(key).map_err(|e| format!("`key_values`: {e}"))?;
    if key.columns().next().is_none() {
        return Err("the letter's key values are empty".into());
    }
    Ok(Replay::ReRead {
        table: change.source,
        key: key
            .columns()
            .map(|(name, value)| (name.to_owned(), value.clone()))
            .collect(),
    })
}

/// The source row a record is about, as reconciliation matches it against the rows it
/// reads: its table, its key's values as text by column (sorted by column name), where the
/// change was in the source's log, and the mapping that failed it.
#[derive(Debug, Clone, PartialEq)]
pub struct LetterRow {
    /// `schema.table`.
    pub table: String,
    pub key: Vec<(String, String)>,
    pub position: Position,
    pub mapping_id: String,
}

/// The row `record` is about. The error says why it cannot be told (a protected key
/// column, a field missing), never a value.
pub fn row_of(record: &Json) -> Result<LetterRow, String> {
    let text = |field: &str| {
        record[field]
            .as_str()
            .ok_or_else(|| format!("the record has no `{field}` text"))
    };
    if record["op"] == "truncate" {
        return Err("a TRUNCATE, of no row: reconciliation judges the table's resources one by one (`deleted_at_source`)".into());
    }
    let Json::Object(columns) = &record["key_values"] else {
        return Err("the letter holds no key values".into());
    };
    let mut key = Vec::with_capacity(columns.len());
    for (name, value) in columns {
        let text = match value {
            Json::Null => String::new(),
            _ if value.get("protected").is_some() => {
                return Err(format!(
                    "key column `{name}` is protected by a mapping, so the letter does not hold its value"
                ))
            }
            _ => value["text"]
                .as_str()
                .ok_or_else(|| format!("key column `{name}` has no text"))?
                .to_owned(),
        };
        key.push((name.clone(), text));
    }
    if key.is_empty() {
        return Err("the letter's key values are empty".into());
    }
    key.sort();
    Ok(LetterRow {
        table: format!("{}.{}", text("schema")?, text("table")?),
        key,
        position: text("source_position")?.parse()?,
        mapping_id: text("mapping_id")?.to_owned(),
    })
}

/// The change a dead-letter record was made of, and the id of the mapping that failed it.
fn change_of(record: &Json) -> Result<(ChangeEvent, String), String> {
    let text = |field: &str| {
        record[field]
            .as_str()
            .ok_or_else(|| format!("the record has no `{field}` text"))
    };
    let optional_text = |field: &str| record[field].as_str().map(str::to_owned);
    let time = |field: &str, text: &str| {
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.to_utc())
            .map_err(|e| format!("`{field}` is not an RFC 3339 time: {e}"))
    };
    let image = |field: &str| match &record[field] {
        Json::Null => Ok(None),
        Json::Object(columns) => image_of(columns)
            .map(Some)
            .map_err(|e| format!("`{field}`: {e}")),
        _ => Err(format!("`{field}` is neither null nor an object")),
    };
    let key = record["key"]
        .as_array()
        .and_then(|key| key.iter().map(|c| c.as_str().map(Into::into)).collect())
        .ok_or("the record has no `key` list of column names")?;
    let change = ChangeEvent {
        source: Arc::new(SourceTable::new(
            text("connector")?,
            text("database_kind")?,
            text("database")?,
            text("schema")?,
            text("table")?,
        )),
        op: text("op")?.parse()?,
        key,
        before: image("before")?,
        after: image("after")?,
        position: text("source_position")?.parse()?,
        ordinal: record["ordinal"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("the record has no `ordinal`")?,
        transaction_id: optional_text("transaction_id"),
        commit_time: optional_text("commit_time")
            .map(|t| time("commit_time", &t))
            .transpose()?,
        capture_time: time("capture_time", text("capture_time")?)?,
    };
    Ok((change, text("mapping_id")?.to_owned()))
}

/// Column → value as text (its kind kept for exactness), or as `protect` writes it; NULL
/// as null; a value the database did not send (an unchanged TOASTed value) as
/// `{"unavailable": true}`.
fn row(row: &Row, protect: impl Fn((&str, &Value)) -> Option<Json>) -> Json {
    let mut columns = Map::new();
    for (name, value) in row.columns() {
        let json = match value {
            Value::Null => Json::Null,
            other => protect((name, other))
                .unwrap_or_else(|| json!({"kind": other.kind(), "text": text_of(other)})),
        };
        columns.insert(name.to_owned(), json);
    }
    for name in row.unavailable() {
        columns.insert(name.clone(), json!({"unavailable": true}));
    }
    Json::Object(columns)
}

/// The inverse of [`row`].
fn image_of(columns: &Map<String, Json>) -> Result<Row, String> {
    let mut values = Vec::with_capacity(columns.len());
    let mut unavailable = Vec::new();
    for (name, json) in columns {
        if json["unavailable"] == Json::Bool(true) {
            unavailable.push(name.clone());
            continue;
        }
        let value = match json {
            Json::Null => Value::Null,
            _ => match (json["kind"].as_str(), json["text"].as_str()) {
                (Some(kind), Some(text)) => {
                    value_of(kind, text).map_err(|e| format!("column `{name}` ({kind}): {e}"))?
                }
                _ => return Err(format!("column `{name}` has no kind and text")),
            },
        };
        values.push((name.as_str().into(), value));
    }
    Ok(Row::with_unavailable(values, unavailable))
}

/// A value of `kind` from the text [`text_of`] made of it.
fn value_of(kind: &str, text: &str) -> Result<Value, String> {
    fn parsed<T: FromStr>(text: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        text.parse().map_err(|e: T::Err| e.to_string())
    }
    let chrono = |e: chrono::ParseError| e.to_string();
    Ok(match kind {
        "boolean" => Value::Bool(parsed(text)?),
        "integer" => Value::Int(parsed(text)?),
        "decimal" => Value::Decimal(ExactDecimal::parse(text)?),
        "float" => Value::Float(parsed(text)?),
        "text" => Value::Text(text.to_owned()),
        "uuid" => Value::Uuid(text.to_owned()),
        "bytes" => Value::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| e.to_string())?,
        ),
        "date" => Value::Date(NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(chrono)?),
        "time" => Value::Time(NaiveTime::parse_from_str(text, "%H:%M:%S%.f").map_err(chrono)?),
        "timestamp" => Value::Timestamp(
            NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").map_err(chrono)?,
        ),
        "timestamptz" => Value::TimestampTz(DateTime::parse_from_rfc3339(text).map_err(chrono)?),
        "json" => Value::Json(serde_json::from_str(text).map_err(|e| e.to_string())?),
        "zero date" => Value::ZeroDate(text.to_owned()),
        other => return Err(format!("unknown value kind `{other}`")),
    })
}

#[cfg(test)]
mod tests {
    use chrono::{FixedOffset, TimeZone, Utc};

    use super::*;
    use crate::{
        change::{PgLsn, Position},
        config::Secret,
        mapping::{load_str, MapContext, MapError},
    };

    /// Mappings of `lab.results` that tokenize `comment` and mask `id`.
    fn mapper() -> Mapper {
        let mapping = load_str(
            std::path::Path::new("protects.yaml"),
            r#"
mapping: lab.protects
domain: lab
source:
  table: lab.results
  key: [result_id]
  columns: [result_id, comment, id]
resources:
  - type: Patient
    id: "p-{result_id}"
    elements:
      identifier[0].value: { column: comment, protect: token }
      name[0].family: { column: id, protect: mask }
"#,
        )
        .unwrap();
        let context = MapContext {
            token_key: Some(Secret::new("k")),
            ..MapContext::default()
        };
        Mapper::new(vec![mapping], context, "lis").unwrap()
    }

    fn full(mapper: &Mapper) -> Letters<'_> {
        Letters {
            rows: DeadLetterRows::Full,
            mapper,
        }
    }

    /// The change a whole record replays.
    fn replayed(record: &Json) -> (ChangeEvent, String) {
        match replay_of(record).unwrap() {
            Replay::Change(change, mapping) => (*change, mapping),
            other => panic!("not replayed from the record: {other:?}"),
        }
    }

    fn change(before: Option<Row>, after: Option<Row>) -> ChangeEvent {
        ChangeEvent {
            source: Arc::new(SourceTable::new("lab", "postgres", "lis", "lab", "results")),
            op: Operation::Update,
            key: vec!["result_id".into()].into(),
            before,
            after,
            position: Position::Postgres(PgLsn(0x016B_3748)),
            ordinal: 3,
            transaction_id: Some("771".into()),
            commit_time: Some(Utc.with_ymd_and_hms(2024, 3, 10, 8, 30, 0).unwrap()),
            capture_time: DateTime::parse_from_rfc3339("2024-03-10T08:30:00.123456Z")
                .unwrap()
                .to_utc(),
        }
    }

    fn failure() -> MapFailure {
        MapFailure {
            mapping_id: "lab-result".into(),
            error: MapError {
                location: "mappings/lab/result.yaml:12:5".into(),
                message: "NULL in a required element".into(),
            },
        }
    }

    fn json(bytes: &[u8]) -> Json {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn a_record_reads_back_into_the_change_it_was_made_of() {
        let zone = FixedOffset::west_opt(6 * 3600).unwrap();
        let after = Row::with_unavailable(
            vec![
                ("result_id".into(), Value::Int(-42)),
                ("flag".into(), Value::Bool(true)),
                (
                    "value".into(),
                    Value::Decimal(ExactDecimal::parse("12.50").unwrap()),
                ),
                ("ratio".into(), Value::Float(0.1 + 0.2)),
                (
                    "comment".into(),
                    Value::Text(" ünïcode \"quoted\"\n".into()),
                ),
                ("raw".into(), Value::Bytes(vec![0, 159, 255])),
                (
                    "taken_on".into(),
                    Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()),
                ),
                (
                    "at".into(),
                    Value::Time(NaiveTime::from_hms_micro_opt(23, 59, 59, 1).unwrap()),
                ),
                (
                    "local".into(),
                    Value::Timestamp(
                        NaiveDate::from_ymd_opt(2024, 3, 10)
                            .unwrap()
                            .and_hms_nano_opt(2, 30, 0, 5_000)
                            .unwrap(),
                    ),
                ),
                (
                    "instant".into(),
                    Value::TimestampTz(zone.with_ymd_and_hms(2024, 3, 10, 1, 59, 59).unwrap()),
                ),
                (
                    "id".into(),
                    Value::Uuid("0b7c1f0e-8d4e-4f55-9a43-2b1d6e1b9f10".into()),
                ),
                (
                    "extra".into(),
                    Value::Json(json!({"b": [1, 2.50], "a": null})),
                ),
                ("cancelled".into(), Value::Null),
            ],
            vec!["notes".into()],
        );
        let before = Row::new(vec![("result_id".into(), Value::Int(-42))]);
        let original = change(Some(before), Some(after));
        let mapper = mapper();
        let (read, mapping) = replayed(&json(&record(
            &original,
            &failure(),
            full(&mapper),
            usize::MAX,
        )));
        assert_eq!(mapping, "lab-result");
        assert_eq!(read, original);
        let (read, _) = replayed(&json(&record(
            &change(None, None),
            &failure(),
            full(&mapper),
            usize::MAX,
        )));
        assert_eq!(read, change(None, None));
    }

    #[test]
    fn protected_columns_are_written_as_the_events_carry_them_and_the_row_is_read_again() {
        let mapper = mapper();
        let after = Row::new(vec![
            ("result_id".into(), Value::Int(7)),
            ("comment".into(), Value::Text(" 123-45-6789".into())),
            (
                "id".into(),
                Value::Uuid("0b7c1f0e-8d4e-4f55-9a43-2b1d6e1b9f10".into()),
            ),
            ("units".into(), Value::Text("mmol/L".into())),
        ]);
        let original = change(None, Some(after));
        let letters = Letters {
            rows: DeadLetterRows::Protected,
            mapper: &mapper,
        };
        let bytes = record(&original, &failure(), letters, usize::MAX);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            !text.contains("6789") && !text.contains("0b7c1f0e"),
            "{text}"
        );
        let written = json(&bytes);
        let token = mapper.token("123-45-6789").unwrap();
        assert_eq!(
            written["after"]["comment"],
            json!({"kind": "text", "protected": "token", "token": token})
        );
        assert_eq!(
            written["after"]["id"],
            json!({"kind": "uuid", "protected": "mask"})
        );
        assert_eq!(written["after"]["units"]["text"], "mmol/L");
        assert_eq!(written["rows"], "protected");
        match replay_of(&written).unwrap() {
            Replay::ReRead { table, key } => {
                assert_eq!(table.qualified_name(), "lab.results");
                assert_eq!(key, [("result_id".to_owned(), Value::Int(7))]);
            }
            other => panic!("{other:?}"),
        }

        // No row at all: the key stays, and is enough.
        let none = Letters {
            rows: DeadLetterRows::None,
            mapper: &mapper,
        };
        let written = json(&record(&original, &failure(), none, usize::MAX));
        assert!(written["after"].is_null() && written["before"].is_null());
        assert!(written["rows_omitted"]
            .as_str()
            .unwrap()
            .contains("rows = \"none\""));
        assert!(matches!(replay_of(&written), Ok(Replay::ReRead { .. })));
        // Reconciliation finds its row by the key's values, as text.
        let row = row_of(&written).unwrap();
        assert_eq!(
            (row.table.as_str(), row.mapping_id.as_str()),
            ("lab.results", "lab-result")
        );
        assert_eq!(row.key, [("result_id".to_owned(), "7".to_owned())]);
        assert_eq!(row.position, original.position);

        // A protected key column leaves nothing to read the row by; a delete, no row to read.
        let mut keyed = change(
            None,
            Some(Row::new(vec![("comment".into(), Value::Text("x".into()))])),
        );
        keyed.key = vec!["comment".into()].into();
        let written = json(&record(&keyed, &failure(), letters, usize::MAX));
        let why = replay_of(&written).unwrap_err();
        assert!(why.contains("key column `comment` is protected"), "{why}");
        let why = row_of(&written).unwrap_err();
        assert!(why.contains("key column `comment` is protected"), "{why}");
        let mut deleted = change(
            Some(Row::new(vec![("result_id".into(), Value::Int(7))])),
            None,
        );
        deleted.op = Operation::Delete;
        let written = json(&record(&deleted, &failure(), none, usize::MAX));
        assert!(replay_of(&written)
            .unwrap_err()
            .contains("the letter of a delete"));
    }

    #[test]
    fn a_letter_too_large_for_its_topic_leaves_its_rows_out_and_says_so() {
        let after = Row::new(vec![("comment".into(), Value::Text("x".repeat(5_000)))]);
        let original = change(None, Some(after));
        let mapper = mapper();
        let whole = record(&original, &failure(), full(&mapper), usize::MAX);
        let small = json(&record(&original, &failure(), full(&mapper), 2_000));
        assert!(
            small["after"].is_null() && small["before"].is_null(),
            "{small}"
        );
        let why = small["rows_omitted"].as_str().unwrap();
        assert!(
            why.contains(&format!("{} bytes", whole.len())) && why.contains("2000"),
            "{why}"
        );
        assert!(!why.contains("xxx"), "no value in the reason");
        assert_eq!(small["mapping_id"], "lab-result");
    }

    #[test]
    fn a_broken_record_is_refused_with_the_field_named() {
        let mapper = mapper();
        let mut good = json(&record(
            &change(None, None),
            &failure(),
            full(&mapper),
            usize::MAX,
        ));
        assert!(replay_of(&json!([]))
            .unwrap_err()
            .starts_with("the record has no `"));
        good["after"] = json!({"value": {"kind": "decimal", "text": "1e5"}});
        assert!(replay_of(&good)
            .unwrap_err()
            .contains("`after`: column `value` (decimal)"));
        good["after"] = Json::Null;
        good["source_position"] = json!("somewhere");
        assert!(replay_of(&good)
            .unwrap_err()
            .contains("not a source position"));
        good.as_object_mut().unwrap().remove("capture_time");
        good["source_position"] = json!("pg:0/1");
        assert!(replay_of(&good).unwrap_err().contains("`capture_time`"));
    }
}
