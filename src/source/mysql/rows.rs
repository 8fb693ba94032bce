//! Rows events decoded against a table's layout: the layout from a table-map event's
//! metadata (names, types, signedness, character sets, ENUM/SET labels, which columns hold
//! JSON), and each row image of a rows event turned into a change.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use mysql_async::{
    binlog::{
        events::{OptionalMetaExtractor, OptionalMetadataField, RowsEventData, TableMapEvent},
        value::BinlogValue,
    },
    consts::ColumnType,
};
use mysql_common::{io::ParseBuf, proto::MyDeserialize};

use super::{
    types::{self, Kind},
    MysqlError,
};
use crate::change::{BinlogPosition, ChangeEvent, Names, Operation, Row, SourceTable, Value};

/// A mapped table's layout, as one table-map event gives it.
#[derive(Debug)]
pub(super) struct Layout {
    pub(super) source: Arc<SourceTable>,
    pub(super) names: Names,
    pub(super) key: Names,
    pub(super) columns: Vec<ColumnDecoder>,
}

#[derive(Debug)]
pub(super) struct ColumnDecoder {
    pub(super) column_type: ColumnType,
    pub(super) metadata: Vec<u8>,
    pub(super) unsigned: bool,
    pub(super) kind: Kind,
}

/// The layout of a mapped table's rows events, from its table map: column names, types,
/// signedness, character sets (`collations`: id → character set) and ENUM/SET labels.
pub(super) fn layout(
    connector: &Arc<str>,
    collations: &HashMap<u16, String>,
    tme: &TableMapEvent<'_>,
    (database, table): &(String, String),
    json: &HashSet<String>,
) -> Result<Layout, MysqlError> {
    let bad = |e: std::io::Error| {
        MysqlError::Definite(format!("the table map of {database}.{table}: {e}"))
    };
    let meta = OptionalMetaExtractor::new(tme.iter_optional_meta()).map_err(bad)?;
    let names: Vec<Arc<str>> = meta
        .iter_column_name()
        .map(|n| n.map(|n| Arc::from(n.name().as_ref())))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    let count = usize::try_from(tme.columns_count()).unwrap_or(usize::MAX);
    if names.len() != count {
        return Err(MysqlError::Definite(format!(
                "the binary log has no column names for {database}.{table}: set binlog_row_metadata = FULL on the server (SET GLOBAL binlog_row_metadata = 'FULL'), then restart the connector"
            )));
    }
    // The labels of the ENUM columns, and of the SET columns, each in column order.
    let (mut enum_labels, mut set_labels) = (Vec::new(), Vec::new());
    for field in tme.iter_optional_meta() {
        match field.map_err(bad)? {
            OptionalMetadataField::EnumStrValue(values) => {
                for column in values.iter_values() {
                    enum_labels.push(labels(
                        column.map_err(bad)?.values().iter().map(|v| v.value()),
                    ));
                }
            }
            OptionalMetadataField::SetStrValue(values) => {
                for column in values.iter_values() {
                    set_labels.push(labels(
                        column.map_err(bad)?.values().iter().map(|v| v.value()),
                    ));
                }
            }
            _ => {}
        }
    }
    let (mut enum_labels, mut set_labels) = (enum_labels.into_iter(), set_labels.into_iter());
    let mut signedness = meta.iter_signedness();
    let mut charsets = meta.iter_charset();
    let mut enum_charsets = meta.iter_enum_and_set_charset();
    let mut columns = Vec::with_capacity(count);
    for (i, name) in names.iter().enumerate() {
        let column_type = tme
            .get_column_type(i)
            .map_err(|e| MysqlError::Definite(format!("{database}.{table}.{name}: {e}")))?
            .ok_or_else(|| {
                MysqlError::Definite(format!("{database}.{table}: no type for column {i}"))
            })?;
        let metadata = tme.get_column_metadata(i).unwrap_or(&[]).to_vec();
        let unsigned = column_type.is_numeric_type() && signedness.next().unwrap_or(false);
        let charset = if column_type.is_character_type() {
            charsets.next().transpose().map_err(bad)?
        } else if column_type.is_enum_or_set_type() {
            enum_charsets.next().transpose().map_err(bad)?;
            None
        } else {
            None
        };
        let charset = charset.map(|id| {
            collations.get(&id).map_or(
                if id == types::BINARY {
                    "binary"
                } else {
                    "unknown"
                },
                String::as_str,
            )
        });
        let label = match column_type {
            ColumnType::MYSQL_TYPE_ENUM => enum_labels.next().flatten(),
            ColumnType::MYSQL_TYPE_SET => set_labels.next().flatten(),
            _ => None,
        };
        let kind = types::binlog_kind(
            column_type,
            &metadata,
            unsigned,
            charset,
            label.map(Into::into),
            json.contains(&**name),
        );
        columns.push(ColumnDecoder {
            column_type,
            metadata,
            unsigned,
            kind,
        });
    }
    let key: Vec<Arc<str>> = meta
        .iter_primary_key()
        .filter_map(|i| i.ok())
        .filter_map(|i| names.get(usize::try_from(i).ok()?).cloned())
        .collect();
    Ok(Layout {
        source: Arc::new(SourceTable::new(
            connector.clone(),
            "mysql",
            database.as_str(),
            database.as_str(),
            table.as_str(),
        )),
        names: names.into(),
        key: key.into(),
        columns,
    })
}

/// An ENUM's or SET's labels, owned.
fn labels<'a>(values: impl Iterator<Item = std::borrow::Cow<'a, str>>) -> Option<Vec<String>> {
    Some(values.map(std::borrow::Cow::into_owned).collect())
}

/// Where the changes of a rows event are in the log: its position, its transaction, and the
/// ordinal of the next change in it (counted on).
pub(super) struct Place<'a> {
    pub(super) position: &'a BinlogPosition,
    pub(super) transaction: &'a Option<String>,
    pub(super) ordinal: &'a mut u32,
}

/// The changes of one rows event of a table with `layout`.
pub(super) fn rows(
    layout: &Layout,
    rows: &RowsEventData<'_>,
    commit_time: Option<DateTime<Utc>>,
    place: Place<'_>,
) -> Result<Vec<ChangeEvent>, MysqlError> {
    let op = match rows {
        RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_) => Operation::Insert,
        RowsEventData::UpdateRowsEvent(_)
        | RowsEventData::UpdateRowsEventV1(_)
        | RowsEventData::PartialUpdateRowsEvent(_) => Operation::Update,
        RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_) => {
            Operation::Delete
        }
    };
    let bad = |e: std::io::Error| {
        MysqlError::Definite(format!(
            "a rows event of {} at {} does not decode with its table map: {e}",
            layout.source.qualified_name(),
            place.position
        ))
    };
    let mut buf = ParseBuf(rows.rows_data());
    let mut changes = Vec::new();
    let capture_time = Utc::now();
    while !buf.is_empty() {
        let left = buf.len();
        let before = match (op, rows.columns_before_image()) {
            (Operation::Update | Operation::Delete, Some(bits)) => {
                let present = |i: usize| bits.get(i).is_some_and(|b| *b);
                Some(image(layout, &mut buf, present).map_err(bad)?)
            }
            _ => None,
        };
        let after = match (op, rows.columns_after_image()) {
            (Operation::Insert | Operation::Update, Some(bits)) => {
                let present = |i: usize| bits.get(i).is_some_and(|b| *b);
                Some(image(layout, &mut buf, present).map_err(bad)?)
            }
            _ => None,
        };
        if buf.len() == left {
            // Images of no columns take no bytes: the event would never end.
            return Err(bad(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "its rows hold no column",
            )));
        }
        changes.push(ChangeEvent {
            source: layout.source.clone(),
            op,
            key: layout.key.clone(),
            before,
            after,
            position: crate::change::Position::Mysql(place.position.clone()),
            ordinal: *place.ordinal,
            transaction_id: place.transaction.clone(),
            commit_time,
            capture_time,
        });
        *place.ordinal += 1;
    }
    Ok(changes)
}

/// One row image: a null bitmap over the columns present, then their values.
fn image<'a>(
    layout: &'a Layout,
    buf: &mut ParseBuf<'a>,
    present: impl Fn(usize) -> bool,
) -> std::io::Result<Row> {
    let count = layout.columns.len();
    let present_count = (0..count).filter(|i| present(*i)).count();
    let nulls: &[u8] = buf.parse(present_count.div_ceil(8))?;
    let mut values = Vec::with_capacity(count);
    let mut unavailable = Vec::new();
    let mut at = 0;
    for (i, column) in layout.columns.iter().enumerate() {
        if !present(i) {
            unavailable.push(layout.names[i].to_string());
            values.push(Value::Null);
            continue;
        }
        let null = nulls[at / 8] & (1 << (at % 8)) != 0;
        at += 1;
        if null {
            values.push(Value::Null);
            continue;
        }
        // mysql_common panics on some malformed values (a DECIMAL's digit groups that
        // overflow, under overflow checks): a value that does not decode is an error of
        // this event, never the end of the process.
        let value = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            BinlogValue::deserialize(
                (column.column_type, &column.metadata, column.unsigned, false),
                &mut *buf,
            )
        }))
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "column {} holds a value that does not decode",
                    layout.names[i]
                ),
            )
        })??;
        values.push(types::binlog_value(
            &column.kind,
            signed_medium(column, value),
        ));
    }
    if unavailable.is_empty() {
        Ok(Row::of_layout(layout.names.clone(), values))
    } else {
        let columns = layout
            .names
            .iter()
            .cloned()
            .zip(values)
            .filter(|(name, _)| !unavailable.iter().any(|u| **u == **name))
            .collect();
        Ok(Row::with_unavailable(columns, unavailable))
    }
}

/// A signed MEDIUMINT's value with its sign: mysql_common reads the three bytes without
/// extending it (-8000000 comes out as 8777216).
fn signed_medium<'a>(column: &ColumnDecoder, value: BinlogValue<'a>) -> BinlogValue<'a> {
    const SIGN: i64 = 1 << 23;
    match value {
        BinlogValue::Value(mysql_async::Value::Int(v))
            if column.column_type == ColumnType::MYSQL_TYPE_INT24
                && !column.unsigned
                && v >= SIGN =>
        {
            BinlogValue::Value(mysql_async::Value::Int(v - 2 * SIGN))
        }
        other => other,
    }
}
