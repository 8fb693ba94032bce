//! PostgreSQL values in pgoutput's text format → typed, lossless [`Value`]s.
//!
//! The text forms are PostgreSQL's output functions under `DateStyle = ISO` and
//! `TimeZone = UTC`, which the replication session pins (a server default like
//! `DateStyle = SQL, DMY` would otherwise change how dates read). Type OIDs are the
//! built-in ones from `pg_type`; any other type (enums, domains, arrays, ranges, …) stays
//! text, which is exactly what its output function wrote. A text a typed parser cannot read
//! (`NaN`, `infinity`, a BC date) also stays text, so nothing is lost here: the mapping
//! decides, and refuses with a reason, what FHIR cannot hold.

use std::sync::LazyLock;

use chrono::{
    format::{Item, Parsed, StrftimeItems},
    NaiveDate, NaiveTime,
};

use crate::change::{ExactDecimal, Value};

pub const BOOL: u32 = 16;
pub const BYTEA: u32 = 17;
pub const INT8: u32 = 20;
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const OID: u32 = 26;
pub const JSON: u32 = 114;
pub const FLOAT4: u32 = 700;
pub const FLOAT8: u32 = 701;
pub const DATE: u32 = 1082;
pub const TIME: u32 = 1083;
pub const TIMESTAMP: u32 = 1114;
pub const TIMESTAMPTZ: u32 = 1184;
pub const NUMERIC: u32 = 1700;
pub const UUID: u32 = 2950;
pub const JSONB: u32 = 3802;

/// The typed value of `text`, written by the output function of type `type_oid`.
pub fn from_text(type_oid: u32, text: &str) -> Value {
    typed(type_oid, text).unwrap_or_else(|| Value::Text(text.to_owned()))
}

/// PostgreSQL's text forms of timestamps, as chrono format items compiled once (every
/// change carries some; compiling the format per value cost more than the parse).
static TIMESTAMP_TEXT: LazyLock<Vec<Item<'static>>> =
    LazyLock::new(|| compiled("%Y-%m-%d %H:%M:%S%.f"));
static TIMESTAMPTZ_TEXT: LazyLock<Vec<Item<'static>>> =
    LazyLock::new(|| compiled("%Y-%m-%d %H:%M:%S%.f%#z"));

fn compiled(format: &str) -> Vec<Item<'static>> {
    StrftimeItems::new(format)
        .parse_to_owned()
        .expect("a valid chrono format")
}

/// `text` read by `items`, all of it.
fn parsed(items: &[Item<'static>], text: &str) -> Option<Parsed> {
    let mut parsed = Parsed::new();
    chrono::format::parse(&mut parsed, text, items.iter()).ok()?;
    Some(parsed)
}

fn typed(type_oid: u32, text: &str) -> Option<Value> {
    Some(match type_oid {
        BOOL => Value::Bool(match text {
            "t" => true,
            "f" => false,
            _ => return None,
        }),
        INT2 | INT4 | INT8 | OID => Value::Int(text.parse().ok()?),
        NUMERIC => Value::Decimal(ExactDecimal::parse(text).ok()?),
        FLOAT4 | FLOAT8 => Value::Float(text.parse().ok().filter(|f: &f64| f.is_finite())?),
        DATE => Value::Date(NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?),
        TIME => Value::Time(NaiveTime::parse_from_str(text, "%H:%M:%S%.f").ok()?),
        TIMESTAMP => Value::Timestamp(
            parsed(&TIMESTAMP_TEXT, text)?
                .to_naive_datetime_with_offset(0)
                .ok()?,
        ),
        // `2024-03-05 20:30:00.25+00`; zones with minutes print `+05:30`.
        TIMESTAMPTZ => Value::TimestampTz(parsed(&TIMESTAMPTZ_TEXT, text)?.to_datetime().ok()?),
        UUID => Value::Uuid(text.to_owned()),
        JSON | JSONB => Value::Json(serde_json::from_str(text).ok()?),
        BYTEA => {
            let hex = text.strip_prefix("\\x")?;
            Value::Bytes(hex::decode(hex).ok()?)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, NaiveDateTime};
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn compiled_formats_read_what_chrono_reads(
            seconds in 0i64..253_402_300_799,
            micros in prop_oneof![Just(0u32), 0u32..1_000_000],
            offset_minutes in -720i32..=840,
        ) {
            let ts = DateTime::from_timestamp(seconds, micros * 1_000).unwrap().naive_utc();
            let text = ts.format("%Y-%m-%d %H:%M:%S%.f").to_string();
            prop_assert_eq!(
                from_text(TIMESTAMP, &text),
                Value::Timestamp(NaiveDateTime::parse_from_str(&text, "%Y-%m-%d %H:%M:%S%.f").unwrap())
            );
            let zone = if offset_minutes % 60 == 0 {
                format!("{:+03}", offset_minutes / 60)
            } else {
                format!("{}{:02}:{:02}", if offset_minutes < 0 { '-' } else { '+' }, offset_minutes.abs() / 60, offset_minutes.abs() % 60)
            };
            let text = format!("{text}{zone}");
            prop_assert_eq!(
                from_text(TIMESTAMPTZ, &text),
                Value::TimestampTz(DateTime::parse_from_str(&text, "%Y-%m-%d %H:%M:%S%.f%#z").unwrap())
            );
        }
    }

    #[test]
    fn each_type_the_mappings_use_reads_exactly() {
        assert_eq!(
            from_text(NUMERIC, "12.5000"),
            Value::Decimal(ExactDecimal::parse("12.5000").unwrap())
        );
        assert_eq!(
            from_text(INT8, "-9223372036854775808"),
            Value::Int(i64::MIN)
        );
        assert_eq!(from_text(BOOL, "t"), Value::Bool(true));
        assert_eq!(
            from_text(DATE, "2024-03-05"),
            Value::Date(NaiveDate::from_ymd_opt(2024, 3, 5).unwrap())
        );
        let ts = NaiveDate::from_ymd_opt(2024, 3, 5)
            .unwrap()
            .and_hms_micro_opt(14, 30, 0, 123_456)
            .unwrap();
        assert_eq!(
            from_text(TIMESTAMP, "2024-03-05 14:30:00.123456"),
            Value::Timestamp(ts)
        );
        let Value::TimestampTz(tz) = from_text(TIMESTAMPTZ, "2024-03-05 20:30:00.25+05:30") else {
            panic!()
        };
        assert_eq!(tz.to_rfc3339(), "2024-03-05T20:30:00.250+05:30");
        assert!(matches!(
            from_text(TIMESTAMPTZ, "2024-03-05 20:30:00+00"),
            Value::TimestampTz(_)
        ));
        assert_eq!(
            from_text(BYTEA, "\\x48690a"),
            Value::Bytes(b"Hi\n".to_vec())
        );
        assert_eq!(
            from_text(JSONB, "{\"a\": [1, 2.50]}"),
            Value::Json(serde_json::from_str("{\"a\": [1, 2.50]}").unwrap())
        );
        assert_eq!(
            from_text(UUID, "0e4d6f2c-2b52-4bb2-9d2b-6f5cf1c3f2aa"),
            Value::Uuid("0e4d6f2c-2b52-4bb2-9d2b-6f5cf1c3f2aa".into())
        );
    }

    #[test]
    fn what_no_typed_value_can_hold_stays_text() {
        for (oid, text) in [
            (NUMERIC, "NaN"),
            (TIMESTAMPTZ, "infinity"),
            (DATE, "0044-03-15 BC"),
            (FLOAT8, "Infinity"),
            (99_999, "sad"),
        ] {
            assert_eq!(
                from_text(oid, text),
                Value::Text(text.to_owned()),
                "{oid} {text}"
            );
        }
    }
}
