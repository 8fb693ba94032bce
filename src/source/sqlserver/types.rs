//! SQL Server values, exactly, from what tiberius decodes of the TDS stream.
//!
//! - decimal and numeric keep every digit (tiberius gives the unscaled integer and the
//!   scale). money and smallmoney reach the client as a float in tiberius, which loses
//!   digits past 2⁵³: the connector's queries cast them to `decimal(19,4)` and
//!   `decimal(10,4)` ([`select_list`]), so they arrive as decimals too.
//! - tinyint … bigint are [`Value::Int`], bit a boolean; real is read as the shortest text
//!   of the 32-bit float, not widened with binary noise.
//! - date, time(n), datetime2(n), datetime and smalldatetime have no zone:
//!   [`Value::Timestamp`] (the mapping names the zone the application wrote them in).
//!   datetime counts 1/300 s: read as SQL Server shows it, to the millisecond (.003, .007).
//!   datetimeoffset is an instant with its offset ([`Value::TimestampTz`]).
//! - char, varchar and text are cast to `nvarchar(max)` by the same queries, so the server
//!   converts them from their collation's code page to UTF-16 and they arrive exactly in
//!   any collation: tiberius knows only the Windows code pages of the older collations and
//!   ignores the UTF-8 flag of SQL Server 2019's `*_UTF8` ones. nchar, nvarchar and ntext
//!   are UTF-16 already; xml arrives as its text.
//! - uniqueidentifier is [`Value::Uuid`] (lower case, as FHIR writes ids); binary,
//!   varbinary and image are bytes.

use chrono::{Duration, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
use tiberius::ColumnData;

use crate::change::{ExactDecimal, Value};

/// A TDS value as a [`Value`]; an error names the type that cannot be read (never the
/// value).
pub fn value(data: ColumnData<'_>) -> Result<Value, String> {
    Ok(match data {
        ColumnData::U8(v) => v.map_or(Value::Null, |v| Value::Int(v.into())),
        ColumnData::I16(v) => v.map_or(Value::Null, |v| Value::Int(v.into())),
        ColumnData::I32(v) => v.map_or(Value::Null, |v| Value::Int(v.into())),
        ColumnData::I64(v) => v.map_or(Value::Null, Value::Int),
        ColumnData::F32(v) => v.map_or(Value::Null, |v| {
            Value::Float(v.to_string().parse().unwrap_or(f64::from(v)))
        }),
        ColumnData::F64(v) => v.map_or(Value::Null, Value::Float),
        ColumnData::Bit(v) => v.map_or(Value::Null, Value::Bool),
        ColumnData::String(v) => v.map_or(Value::Null, |v| Value::Text(v.into_owned())),
        ColumnData::Guid(v) => v.map_or(Value::Null, |v| Value::Uuid(v.hyphenated().to_string())),
        ColumnData::Binary(v) => v.map_or(Value::Null, |v| Value::Bytes(v.into_owned())),
        ColumnData::Numeric(v) => match v {
            None => Value::Null,
            Some(n) => Value::Decimal(decimal(n.value(), n.scale())?),
        },
        ColumnData::Xml(v) => v.map_or(Value::Null, |v| Value::Text(v.into_owned().into_string())),
        ColumnData::DateTime(v) => v.map_or(Value::Null, |v| {
            // Days since 1900-01-01 and 1/300 s since midnight, shown to the millisecond.
            let millis = (i64::from(v.seconds_fragments()) * 10 + 1) / 3;
            Value::Timestamp(
                epoch_1900() + Duration::days(v.days().into()) + Duration::milliseconds(millis),
            )
        }),
        ColumnData::SmallDateTime(v) => v.map_or(Value::Null, |v| {
            Value::Timestamp(
                epoch_1900()
                    + Duration::days(v.days().into())
                    + Duration::minutes(v.seconds_fragments().into()),
            )
        }),
        ColumnData::Time(v) => v.map_or(Ok(Value::Null), |v| time(v).map(Value::Time))?,
        ColumnData::Date(v) => v.map_or(Ok(Value::Null), |v| date(v).map(Value::Date))?,
        ColumnData::DateTime2(v) => {
            v.map_or(Ok(Value::Null), |v| datetime2(v).map(Value::Timestamp))?
        }
        ColumnData::DateTimeOffset(v) => match v {
            None => Value::Null,
            Some(v) => {
                // The date and time are UTC; the offset is the one it was written with.
                let utc = datetime2(v.datetime2())?;
                let offset = FixedOffset::east_opt(i32::from(v.offset()) * 60)
                    .ok_or("a datetimeoffset with an offset beyond ±14:00")?;
                Value::TimestampTz(offset.from_utc_datetime(&utc))
            }
        },
    })
}

/// The decimal `unscaled × 10^-scale` as its digits.
fn decimal(unscaled: i128, scale: u8) -> Result<ExactDecimal, String> {
    let digits = unscaled.unsigned_abs().to_string();
    let scale = usize::from(scale);
    let text = if scale == 0 {
        digits
    } else {
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (int, frac) = padded.split_at(padded.len() - scale);
        format!("{int}.{frac}")
    };
    let sign = if unscaled < 0 { "-" } else { "" };
    ExactDecimal::parse(&format!("{sign}{text}"))
}

fn epoch_1900() -> NaiveDateTime {
    NaiveDate::from_ymd_opt(1900, 1, 1)
        .expect("a date")
        .and_time(NaiveTime::MIN)
}

fn date(date: tiberius::time::Date) -> Result<NaiveDate, String> {
    NaiveDate::from_ymd_opt(1, 1, 1)
        .expect("a date")
        .checked_add_signed(Duration::days(date.days().into()))
        .ok_or_else(|| "a date beyond 9999-12-31".to_owned())
}

fn time(time: tiberius::time::Time) -> Result<NaiveTime, String> {
    // `increments` of 10^-scale seconds since midnight.
    let nanos = u128::from(time.increments()) * 10u128.pow(9 - u32::from(time.scale().min(9)));
    let (secs, nanos) = (nanos / 1_000_000_000, nanos % 1_000_000_000);
    NaiveTime::from_num_seconds_from_midnight_opt(
        u32::try_from(secs).map_err(|_| "a time beyond a day")?,
        nanos as u32,
    )
    .ok_or_else(|| "a time beyond a day".to_owned())
}

fn datetime2(value: tiberius::time::DateTime2) -> Result<NaiveDateTime, String> {
    Ok(date(value.date())?.and_time(time(value.time())?))
}

/// A date or time as text (`change::text_of`'s, nine fractional digits when it has any
/// below the microsecond) with at most the seven fractional digits SQL Server's literals
/// take: its values are in 100 ns, so only zeros go.
pub fn seven_digits(text: &str) -> String {
    let Some(dot) = text.find('.') else {
        return text.to_owned();
    };
    let digits = text[dot + 1..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(text.len(), |end| dot + 1 + end);
    let fraction = &text[dot + 1..digits];
    if fraction.len() <= 7 {
        return text.to_owned();
    }
    let kept = fraction[..7].trim_end_matches('0');
    let dot_and_kept = if kept.is_empty() {
        String::new()
    } else {
        format!(".{kept}")
    };
    format!("{}{dot_and_kept}{}", &text[..dot], &text[digits..])
}

/// The columns `(name, type)` as the connector selects them, each name after
/// `qualifier` (`c.` or nothing): money as a decimal and code-page text as `nvarchar(max)`
/// (see the module documentation), everything else as it is.
pub fn select_list(columns: &[(String, String)], qualifier: &str) -> String {
    columns
        .iter()
        .map(|(name, data_type)| {
            let quoted = super::quote_ident(name);
            match data_type.to_ascii_lowercase().as_str() {
                "money" => format!("CAST({qualifier}{quoted} AS decimal(19,4)) AS {quoted}"),
                "smallmoney" => format!("CAST({qualifier}{quoted} AS decimal(10,4)) AS {quoted}"),
                "char" | "varchar" | "text" => {
                    format!("CAST({qualifier}{quoted} AS nvarchar(max)) AS {quoted}")
                }
                _ => format!("{qualifier}{quoted}"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use tiberius::{
        numeric::Numeric,
        time::{Date, DateTime, DateTime2, DateTimeOffset, SmallDateTime, Time},
    };

    use super::*;

    fn text(v: Value) -> String {
        match v {
            Value::Decimal(d) => d.as_str().to_owned(),
            Value::Timestamp(t) => t.to_string(),
            Value::TimestampTz(t) => t.to_rfc3339(),
            Value::Date(d) => d.to_string(),
            Value::Time(t) => t.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Uuid(u) => u,
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn decimals_keep_every_digit() {
        let cases = [
            (Numeric::new_with_scale(12345, 2), "123.45"),
            (Numeric::new_with_scale(-5, 3), "-0.005"),
            (
                Numeric::new_with_scale(9_999_999_999_999_999_999_999_999_999_999_999_999, 0),
                "9999999999999999999999999999999999999",
            ),
            (
                Numeric::new_with_scale(9_223_372_036_854_775_807, 4),
                "922337203685477.5807",
            ),
            (Numeric::new_with_scale(0, 4), "0.0000"),
        ];
        for (n, expected) in cases {
            assert_eq!(text(value(ColumnData::Numeric(Some(n))).unwrap()), expected);
        }
    }

    #[test]
    fn dates_and_times_are_read_as_the_server_shows_them() {
        // 2024-02-29 is day 738_944 since 0001-01-01.
        let day = Date::new(738_944);
        assert_eq!(
            text(value(ColumnData::Date(Some(day))).unwrap()),
            "2024-02-29"
        );
        let t = Time::new(452_961_234_567, 7);
        assert_eq!(
            text(value(ColumnData::Time(Some(t))).unwrap()),
            "12:34:56.123456700"
        );
        let dt2 = DateTime2::new(day, Time::new(45_296_123, 3));
        assert_eq!(
            text(value(ColumnData::DateTime2(Some(dt2))).unwrap()),
            "2024-02-29 12:34:56.123"
        );
        // datetime: 1/300 s ticks; 1 tick is .003, 2 are .007.
        let days_1900 = 45_349; // 2024-02-29
        for (ticks, shown) in [
            (0, "2024-02-29 00:00:00"),
            (1, "2024-02-29 00:00:00.003"),
            (2, "2024-02-29 00:00:00.007"),
            (300 * 3600 + 3, "2024-02-29 01:00:00.010"),
        ] {
            let dt = DateTime::new(days_1900, ticks);
            assert_eq!(text(value(ColumnData::DateTime(Some(dt))).unwrap()), shown);
        }
        let small = SmallDateTime::new(45_349, 61);
        assert_eq!(
            text(value(ColumnData::SmallDateTime(Some(small))).unwrap()),
            "2024-02-29 01:01:00"
        );
        // datetimeoffset: UTC on the wire, shown in its own offset.
        let utc = DateTime2::new(day, Time::new(36_000, 0));
        let dto = DateTimeOffset::new(utc, -300);
        assert_eq!(
            text(value(ColumnData::DateTimeOffset(Some(dto))).unwrap()),
            "2024-02-29T05:00:00-05:00"
        );
    }

    #[test]
    fn other_types_and_nulls() {
        assert_eq!(value(ColumnData::I32(None)).unwrap(), Value::Null);
        assert_eq!(value(ColumnData::U8(Some(255))).unwrap(), Value::Int(255));
        assert_eq!(
            value(ColumnData::Bit(Some(true))).unwrap(),
            Value::Bool(true)
        );
        assert_eq!(text(value(ColumnData::F32(Some(0.1))).unwrap()), "0.1");
        let guid = tiberius::Uuid::parse_str("6F9619FF-8B86-D011-B42D-00C04FC964FF").unwrap();
        assert_eq!(
            text(value(ColumnData::Guid(Some(guid))).unwrap()),
            "6f9619ff-8b86-d011-b42d-00c04fc964ff"
        );
        assert_eq!(
            value(ColumnData::String(Some(Cow::Borrowed("Grüße")))).unwrap(),
            Value::Text("Grüße".into())
        );
        assert_eq!(
            value(ColumnData::Binary(Some(Cow::Borrowed(&[0, 1][..])))).unwrap(),
            Value::Bytes(vec![0, 1])
        );
    }

    #[test]
    fn times_keep_at_most_seven_fractional_digits() {
        assert_eq!(seven_digits("12:34:56.123456700"), "12:34:56.1234567");
        assert_eq!(
            seven_digits("2024-02-29T12:00:00.000000100+01:00"),
            "2024-02-29T12:00:00.0000001+01:00"
        );
        assert_eq!(
            seven_digits("2024-02-29T12:00:00.123"),
            "2024-02-29T12:00:00.123"
        );
        assert_eq!(seven_digits("2024-02-29T12:00:00"), "2024-02-29T12:00:00");
    }

    #[test]
    fn money_is_selected_as_a_decimal_and_code_page_text_as_utf16() {
        let columns = [
            ("amount".to_owned(), "money".to_owned()),
            ("fee".to_owned(), "smallmoney".to_owned()),
            ("odd]name".to_owned(), "int".to_owned()),
            ("code".to_owned(), "char".to_owned()),
            ("note".to_owned(), "VARCHAR".to_owned()),
            ("old".to_owned(), "text".to_owned()),
            ("name".to_owned(), "nvarchar".to_owned()),
        ];
        assert_eq!(
            select_list(&columns, "c."),
            "CAST(c.[amount] AS decimal(19,4)) AS [amount], CAST(c.[fee] AS decimal(10,4)) AS [fee], \
             c.[odd]]name], CAST(c.[code] AS nvarchar(max)) AS [code], \
             CAST(c.[note] AS nvarchar(max)) AS [note], CAST(c.[old] AS nvarchar(max)) AS [old], \
             c.[name]"
        );
    }
}
