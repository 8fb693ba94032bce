//! A value's text, as every reader of values writes it: templates, conditions, code
//! tables, keys in provenance and dead letters, snapshot conditions.

use std::borrow::Cow;

use base64::Engine;
use chrono::{DateTime, Datelike, FixedOffset, SecondsFormat, Timelike};

use super::Value;

/// A value's text, as templates, conditions and code tables see it: decimals exact,
/// dates and times in ISO 8601, bytes in base64.
pub fn text_of(value: &Value) -> Cow<'_, str> {
    match value {
        Value::Null => Cow::Borrowed(""),
        Value::Text(s) | Value::Uuid(s) | Value::ZeroDate(s) => Cow::Borrowed(s),
        Value::Decimal(d) => Cow::Borrowed(d.as_str()),
        Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let mut text = String::with_capacity(20);
            if *i < 0 {
                text.push('-');
            }
            push_decimal(&mut text, i.unsigned_abs(), 1);
            Cow::Owned(text)
        }
        Value::Float(f) => Cow::Owned(f.to_string()),
        Value::Bytes(b) => Cow::Owned(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::Date(d) => Cow::Owned(d.to_string()),
        Value::Time(t) => Cow::Owned(t.format("%H:%M:%S%.f").to_string()),
        Value::Timestamp(ts) => Cow::Owned(ts.format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
        Value::TimestampTz(ts) => Cow::Owned(ts.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        Value::Json(j) => Cow::Owned(j.to_string()),
    }
}

/// RFC 3339 as FHIR writes instants and dateTimes: the fraction only as long as it needs
/// to be (none, milli-, micro- or nanoseconds), `Z` for UTC — chrono's
/// `to_rfc3339_opts(AutoSi, true)`, written by hand because it is on every event's path
/// and chrono's formatting machinery costs several times as much. What this does not
/// cover (years outside 0–9999, leap seconds, offsets with seconds) is left to chrono.
pub fn rfc3339(ts: &DateTime<FixedOffset>) -> String {
    let offset = ts.offset().local_minus_utc();
    let nanos = ts.nanosecond();
    if !(0..=9999).contains(&ts.year()) || nanos >= 1_000_000_000 || offset % 60 != 0 {
        return ts.to_rfc3339_opts(SecondsFormat::AutoSi, true);
    }
    let local = ts.naive_local();
    let mut out = String::with_capacity(35);
    push_decimal(&mut out, local.year().unsigned_abs().into(), 4);
    for (separator, n) in [
        ('-', local.month()),
        ('-', local.day()),
        ('T', local.hour()),
        (':', local.minute()),
        (':', local.second()),
    ] {
        out.push(separator);
        push_decimal(&mut out, n.into(), 2);
    }
    if nanos != 0 {
        out.push('.');
        match nanos {
            n if n % 1_000_000 == 0 => push_decimal(&mut out, (n / 1_000_000).into(), 3),
            n if n % 1_000 == 0 => push_decimal(&mut out, (n / 1_000).into(), 6),
            n => push_decimal(&mut out, n.into(), 9),
        }
    }
    if offset == 0 {
        out.push('Z');
    } else {
        out.push(if offset < 0 { '-' } else { '+' });
        let minutes = offset.unsigned_abs() / 60;
        push_decimal(&mut out, (minutes / 60).into(), 2);
        out.push(':');
        push_decimal(&mut out, (minutes % 60).into(), 2);
    }
    out
}

/// `n` in decimal digits, zero-padded to at least `width` (at most 20).
pub fn push_decimal(out: &mut String, mut n: u64, width: usize) {
    // The fields of dates and times.
    if width == 2 && n < 100 {
        out.push(char::from(b'0' + (n / 10) as u8));
        out.push(char::from(b'0' + (n % 10) as u8));
        return;
    }
    let mut buf = [b'0'; 20];
    let mut start = buf.len();
    while n > 0 || start > buf.len() - width.max(1) {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push_str(std::str::from_utf8(&buf[start..]).expect("ASCII digits"));
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn decimals_are_written_as_format_writes_them(n in prop_oneof![0u64..200, any::<u64>()], width in 0usize..=20) {
            let mut out = String::new();
            push_decimal(&mut out, n, width);
            prop_assert_eq!(out, format!("{n:0width$}"));
        }

        #[test]
        fn integers_are_written_as_display_writes_them(i in prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(0i64), any::<i64>()]) {
            let value = Value::Int(i);
            prop_assert_eq!(text_of(&value), i.to_string());
        }

        #[test]
        fn rfc3339_writes_what_chrono_writes(
            seconds in -62_135_596_800i64..253_402_300_799,
            nanos in prop_oneof![Just(0u32), (0u32..1000).prop_map(|n| n * 1_000_000), (0u32..1_000_000).prop_map(|n| n * 1_000), 0u32..1_000_000_000],
            offset_minutes in prop_oneof![Just(0i32), -840i32..=840],
        ) {
            let ts = DateTime::from_timestamp(seconds, nanos)
                .unwrap()
                .with_timezone(&FixedOffset::east_opt(offset_minutes * 60).unwrap());
            prop_assert_eq!(rfc3339(&ts), ts.to_rfc3339_opts(SecondsFormat::AutoSi, true));
        }
    }
}
