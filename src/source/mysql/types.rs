//! MySQL and MariaDB values, exactly: from the binary log (the table-map event's types,
//! metadata and character sets, [`binlog_value`]) and from snapshot reads (the binary
//! protocol's values with the result's column definitions, [`result_value`]), into the
//! same [`Value`] for the same stored value.
//!
//! - DECIMAL keeps every digit (its text); integers are [`Value::Int`], an unsigned BIGINT
//!   above `i64::MAX` a [`Value::Decimal`]; FLOAT is read as the shortest text of the
//!   float, not widened with binary noise.
//! - DATETIME is [`Value::Timestamp`] (no zone: the mapping names one); TIMESTAMP is an
//!   instant in UTC (the binary log stores seconds since the epoch; snapshot reads run with
//!   `time_zone = '+00:00'`).
//! - A zero date (`0000-00-00`, or a zero month or day) is [`Value::ZeroDate`], never a
//!   real date.
//! - TIME within a day is [`Value::Time`]; MySQL's TIME is also an interval (negative, or
//!   past 24 h), which stays text (`-838:59:59`).
//! - Text in any character set arrives as UTF-8 (latin1 is MySQL's cp1252); text that is
//!   not valid in its character set stays bytes, which no mapping reads as text.
//! - ENUM and SET are their labels (from `binlog_row_metadata = FULL`); BIT(1) a boolean,
//!   wider BITs bytes; YEAR an integer; JSON a JSON value (MySQL's binary JSON, or
//!   MariaDB's text in a column the catalog says holds JSON).

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime};
use encoding_rs::Encoding;
use mysql_async::{
    binlog::value::BinlogValue,
    consts::{ColumnFlags, ColumnType},
    Value as MyValue,
};

use crate::change::{ExactDecimal, Value};

/// The collation id of binary strings (BINARY, VARBINARY, BLOB).
pub const BINARY: u16 = 63;

/// How a column's values are read.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Integer,
    UnsignedInteger,
    Float,
    Double,
    Decimal,
    /// BIT(n): one bit is a boolean, more are bytes.
    Bit {
        bits: u16,
    },
    Year,
    Date,
    DateTime,
    Timestamp,
    Time,
    /// Character data, decoded from its character set (`None`: not decodable here, kept as
    /// bytes).
    Text(Option<&'static Encoding>),
    Bytes,
    Enum(Arc<[String]>),
    Set(Arc<[String]>),
    Json,
}

/// The encoding of a MySQL character set, by its name (`latin1`, `utf8mb4`): `None` for
/// `binary` and for character sets without a WHATWG encoding (their text stays bytes).
pub fn encoding(charset: &str) -> Option<&'static Encoding> {
    let label = match charset {
        "utf8" | "utf8mb3" | "utf8mb4" | "ascii" => "utf-8",
        // MySQL's latin1 is Windows-1252 (0x80–0x9F are its extra characters).
        "latin1" => "windows-1252",
        "latin2" => "iso-8859-2",
        "latin5" => "iso-8859-9",
        "latin7" => "iso-8859-13",
        "greek" => "iso-8859-7",
        "hebrew" => "iso-8859-8",
        "cp1250" => "windows-1250",
        "cp1251" => "windows-1251",
        "cp1256" => "windows-1256",
        "cp1257" => "windows-1257",
        "cp866" => "ibm866",
        "koi8r" => "koi8-r",
        "koi8u" => "koi8-u",
        "sjis" | "cp932" => "shift_jis",
        "ujis" | "eucjpms" => "euc-jp",
        "euckr" => "euc-kr",
        "gbk" | "gb2312" => "gbk",
        "gb18030" => "gb18030",
        "big5" => "big5",
        "utf16" | "ucs2" => "utf-16be",
        "utf16le" => "utf-16le",
        _ => return None,
    };
    Encoding::for_label(label.as_bytes())
}

/// A column's kind from the binary log's type, its table-map metadata and its character
/// set's name (character columns only), with the ENUM/SET labels and whether the catalog
/// says it holds JSON.
pub fn binlog_kind(
    column_type: ColumnType,
    metadata: &[u8],
    unsigned: bool,
    charset: Option<&str>,
    labels: Option<Arc<[String]>>,
    json: bool,
) -> Kind {
    use ColumnType as T;
    match column_type {
        T::MYSQL_TYPE_TINY
        | T::MYSQL_TYPE_SHORT
        | T::MYSQL_TYPE_INT24
        | T::MYSQL_TYPE_LONG
        | T::MYSQL_TYPE_LONGLONG => {
            if unsigned {
                Kind::UnsignedInteger
            } else {
                Kind::Integer
            }
        }
        T::MYSQL_TYPE_FLOAT => Kind::Float,
        T::MYSQL_TYPE_DOUBLE => Kind::Double,
        T::MYSQL_TYPE_NEWDECIMAL | T::MYSQL_TYPE_DECIMAL => Kind::Decimal,
        T::MYSQL_TYPE_BIT => Kind::Bit {
            bits: u16::from(metadata.get(1).copied().unwrap_or(0)) * 8
                + u16::from(metadata.first().copied().unwrap_or(0)),
        },
        T::MYSQL_TYPE_YEAR => Kind::Year,
        T::MYSQL_TYPE_DATE | T::MYSQL_TYPE_NEWDATE => Kind::Date,
        T::MYSQL_TYPE_DATETIME | T::MYSQL_TYPE_DATETIME2 => Kind::DateTime,
        T::MYSQL_TYPE_TIMESTAMP | T::MYSQL_TYPE_TIMESTAMP2 => Kind::Timestamp,
        T::MYSQL_TYPE_TIME | T::MYSQL_TYPE_TIME2 => Kind::Time,
        T::MYSQL_TYPE_JSON => Kind::Json,
        T::MYSQL_TYPE_ENUM => Kind::Enum(labels.unwrap_or_default()),
        T::MYSQL_TYPE_SET => Kind::Set(labels.unwrap_or_default()),
        T::MYSQL_TYPE_STRING
        | T::MYSQL_TYPE_VAR_STRING
        | T::MYSQL_TYPE_VARCHAR
        | T::MYSQL_TYPE_TINY_BLOB
        | T::MYSQL_TYPE_MEDIUM_BLOB
        | T::MYSQL_TYPE_LONG_BLOB
        | T::MYSQL_TYPE_BLOB => match charset {
            None | Some("binary") => Kind::Bytes,
            Some(_) if json => Kind::Json,
            Some(name) => Kind::Text(encoding(name)),
        },
        _ => Kind::Bytes,
    }
}

/// A column's kind from a result set's column definition (snapshot reads, utf8mb4 text).
pub fn result_kind(column: &mysql_async::Column, json: bool) -> Kind {
    let flags = column.flags();
    let column_type =
        if flags.contains(ColumnFlags::ENUM_FLAG) || flags.contains(ColumnFlags::SET_FLAG) {
            // Labels arrive as text.
            return Kind::Text(encoding("utf8mb4"));
        } else {
            column.column_type()
        };
    let charset = (column.character_set() != BINARY).then_some("utf8mb4");
    let bits = u16::try_from(column.column_length()).unwrap_or(u16::MAX);
    match column_type {
        ColumnType::MYSQL_TYPE_BIT => Kind::Bit { bits },
        other => binlog_kind(
            other,
            &[],
            flags.contains(ColumnFlags::UNSIGNED_FLAG),
            charset,
            None,
            json,
        ),
    }
}

/// A value from the binary log, read as `kind`.
pub fn binlog_value(kind: &Kind, value: BinlogValue<'_>) -> Value {
    match value {
        BinlogValue::Value(MyValue::NULL) => Value::Null,
        BinlogValue::Value(value) => match (kind, value) {
            // Seconds since the epoch in UTC, with the fraction: `1700000000.123000`.
            (Kind::Timestamp, MyValue::Bytes(text)) => epoch_timestamp(&text),
            (Kind::Year, MyValue::Bytes(text)) => {
                // The crate adds 1900 to the stored byte; 0 is the year 0000.
                match std::str::from_utf8(&text)
                    .ok()
                    .and_then(|t| t.parse::<i64>().ok())
                {
                    Some(1900) => Value::Int(0),
                    Some(year) => Value::Int(year),
                    None => Value::Bytes(text),
                }
            }
            (Kind::Enum(labels), MyValue::Int(index)) => usize::try_from(index)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| labels.get(i))
                // 0 is the empty string a lax sql_mode stores for a value not in the list.
                .map_or_else(
                    || Value::Text(String::new()),
                    |label| Value::Text(label.clone()),
                ),
            (Kind::Set(labels), MyValue::Bytes(bits)) => {
                let members: Vec<&str> = labels
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
                    .map(|(_, label)| label.as_str())
                    .collect();
                Value::Text(members.join(","))
            }
            (kind, value) => common_value(kind, value),
        },
        BinlogValue::Jsonb(json) => match serde_json::Value::try_from(json) {
            Ok(json) => Value::Json(json),
            Err(_) => Value::Null,
        },
        // Partial JSON updates (binlog_row_value_options = PARTIAL_JSON) carry no whole
        // value; `check` refuses that setting.
        BinlogValue::JsonDiff(_) => Value::Null,
    }
}

/// A value a snapshot read returned (binary protocol), read as `kind`.
pub fn result_value(kind: &Kind, value: MyValue) -> Value {
    match (kind, value) {
        (_, MyValue::NULL) => Value::Null,
        // The session's zone is UTC: the wall-clock time is the instant.
        (Kind::Timestamp, MyValue::Date(y, m, d, h, mi, s, us)) => {
            match datetime(y, m, d, h, mi, s, us) {
                Value::Timestamp(naive) => Value::TimestampTz(naive.and_utc().fixed_offset()),
                other => other,
            }
        }
        (Kind::Year, MyValue::Int(year)) => Value::Int(year),
        (Kind::Year, MyValue::UInt(year)) => Value::Int(year as i64),
        (kind, value) => common_value(kind, value),
    }
}

/// What the binary log and the binary protocol carry alike.
fn common_value(kind: &Kind, value: MyValue) -> Value {
    match (kind, value) {
        (_, MyValue::NULL) => Value::Null,
        (_, MyValue::Int(i)) => Value::Int(i),
        (_, MyValue::UInt(u)) => match i64::try_from(u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Decimal(ExactDecimal::parse(&u.to_string()).expect("digits")),
        },
        // The float's own shortest text, read back as a double: FLOAT 0.1 is 0.1.
        (_, MyValue::Float(f)) => Value::Float(f.to_string().parse().unwrap_or(f64::from(f))),
        (_, MyValue::Double(d)) => Value::Float(d),
        (Kind::Decimal, MyValue::Bytes(text)) => std::str::from_utf8(&text)
            .ok()
            .and_then(|t| ExactDecimal::parse(t).ok())
            .map_or(Value::Bytes(text), Value::Decimal),
        (Kind::Bit { bits: 1 }, MyValue::Bytes(b)) => Value::Bool(b.iter().any(|byte| *byte != 0)),
        (Kind::Date, MyValue::Date(y, m, d, ..)) => date(y, m, d),
        (_, MyValue::Time(negative, days, h, m, s, us)) => time(negative, days, h, m, s, us),
        (Kind::Text(Some(encoding)), MyValue::Bytes(bytes)) => {
            match encoding.decode_without_bom_handling_and_without_replacement(&bytes) {
                Some(text) => Value::Text(text.into_owned()),
                None => Value::Bytes(bytes),
            }
        }
        (Kind::Json, MyValue::Bytes(text)) => match serde_json::from_slice(&text) {
            Ok(json) => Value::Json(json),
            Err(_) => Value::Bytes(text),
        },
        (Kind::Year | Kind::Integer | Kind::UnsignedInteger, MyValue::Bytes(text)) => {
            std::str::from_utf8(&text)
                .ok()
                .and_then(|t| t.parse().ok())
                .map_or(Value::Bytes(text), Value::Int)
        }
        (_, MyValue::Bytes(bytes)) => Value::Bytes(bytes),
        (_, MyValue::Date(y, m, d, h, mi, s, us)) => datetime(y, m, d, h, mi, s, us),
    }
}

fn date(y: u16, m: u8, d: u8) -> Value {
    match NaiveDate::from_ymd_opt(i32::from(y), u32::from(m), u32::from(d)) {
        Some(date) if y != 0 => Value::Date(date),
        _ => Value::ZeroDate(format!("{y:04}-{m:02}-{d:02}")),
    }
}

fn datetime(y: u16, m: u8, d: u8, h: u8, mi: u8, s: u8, us: u32) -> Value {
    let time = NaiveTime::from_hms_micro_opt(u32::from(h), u32::from(mi), u32::from(s), us);
    match (date(y, m, d), time) {
        (Value::Date(date), Some(time)) => Value::Timestamp(NaiveDateTime::new(date, time)),
        _ => Value::ZeroDate(format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}")),
    }
}

fn time(negative: bool, days: u32, h: u8, m: u8, s: u8, us: u32) -> Value {
    if !negative && days == 0 {
        if let Some(t) = NaiveTime::from_hms_micro_opt(u32::from(h), u32::from(m), u32::from(s), us)
        {
            return Value::Time(t);
        }
    }
    // A real TIME is within ±838 hours; the arithmetic stays in u64 whatever the bytes say.
    let hours = u64::from(days) * 24 + u64::from(h);
    let sign = if negative { "-" } else { "" };
    let fraction = if us == 0 {
        String::new()
    } else {
        format!(".{us:06}")
    };
    Value::Text(format!("{sign}{hours:02}:{m:02}:{s:02}{fraction}"))
}

/// `seconds[.micros]` since the epoch (how the binary log's TIMESTAMP arrives): 0 is the
/// zero timestamp.
fn epoch_timestamp(text: &[u8]) -> Value {
    let parsed = std::str::from_utf8(text).ok().and_then(|t| {
        let (secs, micros) = t.split_once('.').unwrap_or((t, "0"));
        let micros = micros.parse::<u32>().ok().filter(|m| *m < 1_000_000)?;
        Some((secs.parse::<i64>().ok()?, micros))
    });
    match parsed {
        Some((0, 0)) => Value::ZeroDate("0000-00-00 00:00:00".into()),
        Some((secs, micros)) => DateTime::from_timestamp(secs, micros * 1000).map_or_else(
            || Value::Bytes(text.to_vec()),
            |ts| Value::TimestampTz(ts.fixed_offset()),
        ),
        None => Value::Bytes(text.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_kind(charset: &str) -> Kind {
        binlog_kind(
            ColumnType::MYSQL_TYPE_VARCHAR,
            &[],
            false,
            Some(charset),
            None,
            false,
        )
    }

    #[test]
    fn latin1_is_windows_1252_and_arrives_as_utf8() {
        // "Müller €" in latin1 (cp1252: € is 0x80).
        let bytes = vec![b'M', 0xFC, b'l', b'l', b'e', b'r', b' ', 0x80];
        assert_eq!(
            binlog_value(
                &text_kind("latin1"),
                BinlogValue::Value(MyValue::Bytes(bytes))
            ),
            Value::Text("Müller €".into())
        );
    }

    #[test]
    fn text_not_valid_in_its_character_set_stays_bytes() {
        let bytes = vec![0xFF, 0xFE];
        assert_eq!(
            binlog_value(
                &text_kind("utf8mb4"),
                BinlogValue::Value(MyValue::Bytes(bytes.clone()))
            ),
            Value::Bytes(bytes)
        );
    }

    #[test]
    fn zero_dates_are_never_dates() {
        assert_eq!(
            common_value(&Kind::Date, MyValue::Date(0, 0, 0, 0, 0, 0, 0)),
            Value::ZeroDate("0000-00-00".into())
        );
        assert_eq!(
            common_value(&Kind::Date, MyValue::Date(2024, 3, 0, 0, 0, 0, 0)),
            Value::ZeroDate("2024-03-00".into())
        );
        assert_eq!(
            common_value(&Kind::DateTime, MyValue::Date(0, 0, 0, 0, 0, 0, 0)),
            Value::ZeroDate("0000-00-00 00:00:00".into())
        );
        assert_eq!(
            epoch_timestamp(b"0"),
            Value::ZeroDate("0000-00-00 00:00:00".into())
        );
    }

    #[test]
    fn timestamps_are_instants_and_datetimes_are_not() {
        assert_eq!(
            text_of(&epoch_timestamp(b"1700000000.123000")),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            text_of(&common_value(
                &Kind::DateTime,
                MyValue::Date(2024, 2, 29, 23, 59, 58, 5)
            )),
            "2024-02-29T23:59:58.000005"
        );
    }

    fn text_of(value: &Value) -> String {
        crate::change::text_of(value).into_owned()
    }

    #[test]
    fn integers_keep_their_range_and_times_their_sign() {
        assert_eq!(
            common_value(&Kind::UnsignedInteger, MyValue::UInt(u64::MAX)),
            Value::Decimal(ExactDecimal::parse("18446744073709551615").unwrap())
        );
        assert_eq!(
            common_value(&Kind::Float, MyValue::Float(0.1)),
            Value::Float(0.1)
        );
        assert_eq!(
            common_value(&Kind::Time, MyValue::Time(true, 34, 22, 59, 59, 0)),
            Value::Text("-838:59:59".into())
        );
        assert_eq!(
            common_value(&Kind::Time, MyValue::Time(false, 0, 7, 5, 3, 250_000)),
            Value::Time(NaiveTime::from_hms_micro_opt(7, 5, 3, 250_000).unwrap())
        );
    }

    #[test]
    fn enums_and_sets_are_their_labels() {
        let labels: Arc<[String]> = vec!["F".to_string(), "P".into(), "C".into()].into();
        let value = |kind: &Kind, v| binlog_value(kind, BinlogValue::Value(v));
        assert_eq!(
            value(&Kind::Enum(labels.clone()), MyValue::Int(3)),
            Value::Text("C".into())
        );
        assert_eq!(
            value(&Kind::Enum(labels.clone()), MyValue::Int(0)),
            Value::Text("".into())
        );
        assert_eq!(
            value(&Kind::Set(labels), MyValue::Bytes(vec![0b101])),
            Value::Text("F,C".into())
        );
    }
}
