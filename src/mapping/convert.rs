//! Typed conversion of column values into FHIR primitives, never losing data: exact
//! decimals keep their digits, timestamps their precision, and a timestamp without zone
//! becomes a FHIR `dateTime`/`instant` only through the zone the mapping names.
//!
//! Refusals say what kind of value met what FHIR type, never the value itself (row values
//! are PHI and must not reach logs).

use base64::Engine;
use chrono::{DateTime, FixedOffset, LocalResult, NaiveDateTime, TimeZone};
use chrono_tz::Tz;

use crate::{
    change::{rfc3339, text_of, ExactDecimal, Value},
    fhir::Element,
};

/// Whether `format` is a `strftime` format chrono understands, and which of date, time and
/// offset it reads: `Err` names the first bad specifier.
pub fn format_reads(format: &str) -> Result<(bool, bool, bool), String> {
    use chrono::format::{Fixed, Item, Numeric, StrftimeItems};
    let (mut date, mut time, mut offset) = (false, false, false);
    for item in StrftimeItems::new(format) {
        match item {
            Item::Error => return Err(format!("`{format}` is not a strftime format chrono reads (a `%` not followed by a known specifier)")),
            Item::Numeric(n, _) => match n {
                Numeric::Year | Numeric::Month | Numeric::Day | Numeric::Ordinal | Numeric::YearMod100 => date = true,
                Numeric::Hour | Numeric::Hour12 | Numeric::Minute | Numeric::Second | Numeric::Nanosecond => time = true,
                _ => {}
            },
            Item::Fixed(f) => match f {
                Fixed::ShortMonthName | Fixed::LongMonthName => date = true,
                Fixed::TimezoneOffset | Fixed::TimezoneOffsetColon | Fixed::TimezoneOffsetZ | Fixed::TimezoneOffsetColonZ => offset = true,
                Fixed::RFC3339 | Fixed::RFC2822 => (date, time, offset) = (true, true, true),
                _ => {}
            },
            _ => {}
        }
    }
    Ok((date, time, offset))
}

/// `text` read with the `strftime` `format` as the value it names: a date, a time, a
/// timestamp without zone, or one with its offset. The message never holds the text.
pub fn parse_formatted(text: &str, format: &str) -> Result<Value, String> {
    let text = text.trim();
    let refused = |e: chrono::ParseError| format!("the text does not read as `{format}` ({e})");
    let (date, time, offset) = format_reads(format)?;
    Ok(match (date, time, offset) {
        (_, _, true) => {
            Value::TimestampTz(DateTime::parse_from_str(text, format).map_err(refused)?)
        }
        (true, true, false) => {
            Value::Timestamp(NaiveDateTime::parse_from_str(text, format).map_err(refused)?)
        }
        (true, false, false) => {
            Value::Date(chrono::NaiveDate::parse_from_str(text, format).map_err(refused)?)
        }
        _ => Value::Time(chrono::NaiveTime::parse_from_str(text, format).map_err(refused)?),
    })
}

/// How a column value is read, beyond its FHIR type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Conversion {
    /// Remove leading and trailing whitespace (CHAR padding) from text.
    pub trim: bool,
    /// The zone timestamps without zone were written in.
    pub zone: Option<Tz>,
    /// Legacy encodings of `true` and `false` (compared case-insensitively), e.g. `Y`/`N`.
    pub true_values: Vec<String>,
    pub false_values: Vec<String>,
    /// MySQL's zero dates (`0000-00-00`) are left out like NULL (`zero_date: null`) instead
    /// of failing the row.
    pub zero_date_as_null: bool,
    /// What becomes of characters FHIR strings forbid (`control_characters`).
    pub control: ControlCharacters,
}

/// Characters below U+0020 other than tab, line feed and carriage return, which no FHIR
/// string may hold: by default the row is refused; a mapping may clean them explicitly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ControlCharacters {
    /// The row goes to the dead-letter topic (`reject`).
    #[default]
    Reject,
    /// They are removed (`strip`).
    Strip,
    /// Each becomes a space (`space`).
    Space,
}

fn is_forbidden(c: char) -> bool {
    c < ' ' && !matches!(c, '\t' | '\n' | '\r')
}

/// `element` with the characters FHIR strings forbid dealt with as `control` says.
fn without_control_characters(
    element: Element,
    control: ControlCharacters,
) -> Result<Element, String> {
    let Element::String(text) = &element else {
        return Ok(element);
    };
    // They are ASCII: a byte scan finds them (this runs for every string of every event).
    let Some(at) = text.bytes().position(|b| is_forbidden(char::from(b))) else {
        return Ok(element);
    };
    match control {
        ControlCharacters::Reject => Err(format!(
            "the text holds a control character (U+{:04X}, character {} of the text) that FHIR strings forbid (`control_characters: strip` or `space` in the mapping cleans it)",
            text.as_bytes()[at],
            text[..at].chars().count() + 1
        )),
        ControlCharacters::Strip => Ok(Element::String(
            text.chars().filter(|&c| !is_forbidden(c)).collect(),
        )),
        ControlCharacters::Space => Ok(Element::String(
            text.chars()
                .map(|c| if is_forbidden(c) { ' ' } else { c })
                .collect(),
        )),
    }
}

const DEFAULT_TRUE: [&str; 6] = ["true", "t", "y", "yes", "1", "on"];
const DEFAULT_FALSE: [&str; 6] = ["false", "f", "n", "no", "0", "off"];

/// The FHIR primitive types mappings fill: an element's type, resolved once when its
/// mapping is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primitive {
    Boolean,
    Integer,
    PositiveInt,
    UnsignedInt,
    Decimal,
    String,
    Markdown,
    Code,
    Id,
    Uri,
    Url,
    Canonical,
    Oid,
    Uuid,
    Date,
    DateTime,
    Instant,
    Time,
    Base64Binary,
}

impl Primitive {
    const ALL: [Primitive; 19] = [
        Primitive::Boolean,
        Primitive::Integer,
        Primitive::PositiveInt,
        Primitive::UnsignedInt,
        Primitive::Decimal,
        Primitive::String,
        Primitive::Markdown,
        Primitive::Code,
        Primitive::Id,
        Primitive::Uri,
        Primitive::Url,
        Primitive::Canonical,
        Primitive::Oid,
        Primitive::Uuid,
        Primitive::Date,
        Primitive::DateTime,
        Primitive::Instant,
        Primitive::Time,
        Primitive::Base64Binary,
    ];

    /// The type named `code` in the FHIR definitions; `None` for one fhir-cdc cannot fill
    /// (`xhtml`).
    pub fn of(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Primitive::Boolean => "boolean",
            Primitive::Integer => "integer",
            Primitive::PositiveInt => "positiveInt",
            Primitive::UnsignedInt => "unsignedInt",
            Primitive::Decimal => "decimal",
            Primitive::String => "string",
            Primitive::Markdown => "markdown",
            Primitive::Code => "code",
            Primitive::Id => "id",
            Primitive::Uri => "uri",
            Primitive::Url => "url",
            Primitive::Canonical => "canonical",
            Primitive::Oid => "oid",
            Primitive::Uuid => "uuid",
            Primitive::Date => "date",
            Primitive::DateTime => "dateTime",
            Primitive::Instant => "instant",
            Primitive::Time => "time",
            Primitive::Base64Binary => "base64Binary",
        }
    }
}

impl std::fmt::Display for Primitive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Convert `value` (not NULL) to the FHIR primitive type `fhir_type`, as a FHIR value.
pub fn to_fhir(
    value: &Value,
    fhir_type: Primitive,
    conversion: &Conversion,
) -> Result<Element, String> {
    without_control_characters(primitive(value, fhir_type, conversion)?, conversion.control)
}

fn primitive(
    value: &Value,
    fhir_type: Primitive,
    conversion: &Conversion,
) -> Result<Element, String> {
    use Primitive as P;
    let refuse = || {
        match value {
        Value::ZeroDate(text) => format!("the zero date `{text}` is no date and cannot become a FHIR {fhir_type} (`zero_date: null` in the mapping leaves it out)"),
        _ => format!("a {} value cannot become a FHIR {fhir_type}", value.kind()),
    }
    };
    match fhir_type {
        P::Boolean => match value {
            Value::Bool(b) => Ok(Element::Boolean(*b)),
            Value::Int(0) => Ok(Element::Boolean(false)),
            Value::Int(1) => Ok(Element::Boolean(true)),
            Value::Text(s) => {
                let s = s.trim();
                let is = |custom: &[String], default: &[&str]| {
                    if custom.is_empty() {
                        default.iter().any(|d| d.eq_ignore_ascii_case(s))
                    } else {
                        custom.iter().any(|d| d.eq_ignore_ascii_case(s))
                    }
                };
                if is(&conversion.true_values, &DEFAULT_TRUE) {
                    Ok(Element::Boolean(true))
                } else if is(&conversion.false_values, &DEFAULT_FALSE) {
                    Ok(Element::Boolean(false))
                } else {
                    Err("a text value is not one of the mapping's true/false encodings".into())
                }
            }
            _ => Err(refuse()),
        },
        P::Integer | P::PositiveInt | P::UnsignedInt => {
            let number: i64 = match value {
                Value::Int(i) => *i,
                Value::Decimal(d) => integral(d.as_str()).ok_or_else(refuse)?,
                Value::Text(s) => s.trim().parse().map_err(|_| refuse())?,
                _ => return Err(refuse()),
            };
            let min = match fhir_type {
                P::PositiveInt => 1,
                P::UnsignedInt => 0,
                _ => i64::from(i32::MIN),
            };
            if number < min || number > i64::from(i32::MAX) {
                return Err(format!("an integer out of the range of a FHIR {fhir_type}"));
            }
            Ok(Element::Number(number.into()))
        }
        P::Decimal => {
            let text = match value {
                Value::Decimal(d) => d.as_str().to_owned(),
                Value::Int(i) => i.to_string(),
                Value::Float(f) if f.is_finite() => {
                    // Shortest text that reads back as the same double.
                    let text = f.to_string();
                    if text.contains('e') {
                        return Err(refuse());
                    } else {
                        text
                    }
                }
                Value::Text(s) => ExactDecimal::parse(s.trim())
                    .map_err(|_| refuse())?
                    .as_str()
                    .to_owned(),
                _ => return Err(refuse()),
            };
            Element::decimal(text).ok_or_else(refuse)
        }
        P::String | P::Markdown => match value {
            Value::Bytes(_) | Value::ZeroDate(_) => Err(refuse()),
            Value::Text(s) if conversion.trim => Ok(Element::String(s.trim().to_owned())),
            other => Ok(Element::String(text_of(other).into_owned())),
        },
        P::Code | P::Id | P::Uri | P::Url | P::Canonical | P::Oid | P::Uuid => match value {
            Value::Bytes(_) | Value::Json(_) | Value::ZeroDate(_) => Err(refuse()),
            other => {
                let text = text_of(other);
                let text = text.trim();
                if text.is_empty() {
                    return Err(format!("an empty text cannot be a FHIR {fhir_type}"));
                }
                if fhir_type == P::Id && !is_fhir_id(text) {
                    return Err("the text is not a valid FHIR id ([A-Za-z0-9-.]{1,64})".into());
                }
                let single_spaces =
                    !text.split(' ').any(str::is_empty) && !text.contains(['\t', '\n', '\r']);
                if fhir_type == P::Code && !single_spaces {
                    return Err("a FHIR code cannot contain runs of whitespace".into());
                }
                Ok(Element::String(text.to_owned()))
            }
        },
        P::Date => match value {
            Value::Date(d) => Ok(Element::String(d.format("%Y-%m-%d").to_string())),
            Value::Timestamp(ts) => Ok(Element::String(ts.format("%Y-%m-%d").to_string())),
            Value::TimestampTz(ts) => Ok(Element::String(
                in_zone(ts, conversion).format("%Y-%m-%d").to_string(),
            )),
            Value::Text(s) if is_partial_date(s.trim()) => Ok(Element::String(s.trim().to_owned())),
            _ => Err(refuse()),
        },
        P::DateTime | P::Instant => {
            let instant = fhir_type == P::Instant;
            match value {
                Value::Date(d) if !instant => Ok(Element::String(d.to_string())),
                Value::TimestampTz(ts) => Ok(Element::String(rfc3339(&in_zone(ts, conversion)))),
                Value::Timestamp(naive) => {
                    let zone = conversion.zone.ok_or_else(|| {
                        format!("a timestamp without time zone needs the mapping's `zone` to become a FHIR {fhir_type}")
                    })?;
                    Ok(Element::String(rfc3339(&localize(naive, zone)?)))
                }
                Value::Text(s) => {
                    let s = s.trim();
                    DateTime::parse_from_rfc3339(s)
                        .map(|ts| Element::String(rfc3339(&ts)))
                        .or_else(|_| {
                            if !instant && is_partial_date(s) {
                                Ok(Element::String(s.to_owned()))
                            } else {
                                Err(refuse())
                            }
                        })
                }
                _ => Err(refuse()),
            }
        }
        P::Time => match value {
            Value::Time(t) => Ok(Element::String(t.format("%H:%M:%S%.f").to_string())),
            Value::Timestamp(ts) => Ok(Element::String(ts.format("%H:%M:%S%.f").to_string())),
            _ => Err(refuse()),
        },
        P::Base64Binary => match value {
            Value::Bytes(b) => Ok(Element::String(
                base64::engine::general_purpose::STANDARD.encode(b),
            )),
            _ => Err(refuse()),
        },
    }
}

fn integral(text: &str) -> Option<i64> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    frac.bytes()
        .all(|b| b == b'0')
        .then(|| int.parse().ok())
        .flatten()
}

fn in_zone(ts: &DateTime<FixedOffset>, conversion: &Conversion) -> DateTime<FixedOffset> {
    match conversion.zone {
        Some(zone) => ts.with_timezone(&zone).fixed_offset(),
        None => *ts,
    }
}

/// A wall-clock time in `zone`. In the hour a clock is turned back the time is ambiguous
/// and the earlier instant is taken; in the hour skipped when it is turned forward the time
/// does not exist and is refused.
fn localize(naive: &NaiveDateTime, zone: Tz) -> Result<DateTime<FixedOffset>, String> {
    match zone.from_local_datetime(naive) {
        LocalResult::Single(ts) => Ok(ts.fixed_offset()),
        LocalResult::Ambiguous(earlier, _) => Ok(earlier.fixed_offset()),
        LocalResult::None => Err(format!(
            "the timestamp falls in a daylight-saving gap of {zone} and names no instant"
        )),
    }
}

/// FHIR `id`: 1–64 of `A-Z a-z 0-9 - .`
pub fn is_fhir_id(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
fn is_partial_date(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let digits = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [y] => digits(y, 4),
        [y, m] => digits(y, 4) && digits(m, 2),
        [y, m, d] => {
            digits(y, 4)
                && digits(m, 2)
                && digits(d, 2)
                && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, NaiveTime};
    use proptest::prelude::*;

    use super::*;

    proptest! {}

    fn convert(value: Value, fhir_type: &str) -> Result<String, String> {
        let fhir_type = Primitive::of(fhir_type).unwrap();
        to_fhir(&value, fhir_type, &Conversion::default()).map(|e| e.to_json().to_string())
    }

    #[test]
    fn decimals_keep_every_digit() {
        let d = |s: &str| Value::Decimal(ExactDecimal::parse(s).unwrap());
        assert_eq!(convert(d("12.50"), "decimal").unwrap(), "12.50");
        assert_eq!(
            convert(d("0.000000000000000000000000000001"), "decimal").unwrap(),
            "0.000000000000000000000000000001"
        );
        assert_eq!(convert(Value::Int(7), "decimal").unwrap(), "7");
        assert_eq!(convert(Value::Float(0.1), "decimal").unwrap(), "0.1");
        assert!(convert(Value::Float(f64::NAN), "decimal").is_err());
        assert_eq!(convert(d("3.000"), "integer").unwrap(), "3");
        assert!(convert(d("3.5"), "integer").is_err());
        assert!(convert(Value::Int(0), "positiveInt").is_err());
    }

    #[test]
    fn legacy_booleans_are_read() {
        assert_eq!(convert(Value::Text("Y".into()), "boolean").unwrap(), "true");
        assert_eq!(
            convert(Value::Text("n ".into()), "boolean").unwrap(),
            "false"
        );
        assert_eq!(convert(Value::Int(1), "boolean").unwrap(), "true");
        assert!(convert(Value::Text("maybe".into()), "boolean").is_err());
        let custom = Conversion {
            true_values: vec!["J".into()],
            false_values: vec!["N".into()],
            ..Default::default()
        };
        assert_eq!(
            to_fhir(&Value::Text("j".into()), Primitive::Boolean, &custom).unwrap(),
            Element::Boolean(true)
        );
        assert!(to_fhir(&Value::Text("Y".into()), Primitive::Boolean, &custom).is_err());
    }

    #[test]
    fn timestamps_without_zone_need_one_and_keep_precision() {
        let naive = NaiveDate::from_ymd_opt(2024, 3, 5)
            .unwrap()
            .and_hms_micro_opt(14, 30, 0, 250_000)
            .unwrap();
        let err = convert(Value::Timestamp(naive), "dateTime").unwrap_err();
        assert!(err.contains("needs the mapping's `zone`"), "{err}");
        let chicago = Conversion {
            zone: Some(chrono_tz::America::Chicago),
            ..Default::default()
        };
        let json = to_fhir(&Value::Timestamp(naive), Primitive::Instant, &chicago).unwrap();
        assert_eq!(json, Element::text("2024-03-05T14:30:00.250-06:00"));
        // 02:30 on 2024-03-10 does not exist in Chicago.
        let gap = NaiveDate::from_ymd_opt(2024, 3, 10)
            .unwrap()
            .and_hms_opt(2, 30, 0)
            .unwrap();
        assert!(
            to_fhir(&Value::Timestamp(gap), Primitive::DateTime, &chicago)
                .unwrap_err()
                .contains("daylight-saving gap")
        );
        assert_eq!(
            convert(Value::Timestamp(naive), "date").unwrap(),
            "\"2024-03-05\""
        );
        assert_eq!(
            convert(
                Value::Time(NaiveTime::from_hms_opt(8, 5, 0).unwrap()),
                "time"
            )
            .unwrap(),
            "\"08:05:00\""
        );
    }

    #[test]
    fn codes_are_trimmed_and_ids_checked() {
        assert_eq!(
            convert(Value::Text("F   ".into()), "code").unwrap(),
            "\"F\""
        );
        assert!(convert(Value::Text("   ".into()), "code").is_err());
        assert!(convert(Value::Text("a_b".into()), "id").is_err());
        assert!(convert(Value::Bytes(vec![1]), "string").is_err());
    }

    #[test]
    fn control_characters_are_refused_unless_the_mapping_cleans_them() {
        let text = Value::Text("Na\u{1}ti\tve\u{1f}".into());
        let err = convert(text.clone(), "string").unwrap_err();
        assert!(err.contains("U+0001, character 3 of the text"), "{err}");
        assert!(!err.contains("Na"), "{err}");
        let with = |control| {
            let conversion = Conversion {
                control,
                ..Conversion::default()
            };
            to_fhir(&text, Primitive::String, &conversion)
                .unwrap()
                .to_json()
                .to_string()
        };
        assert_eq!(with(ControlCharacters::Strip), "\"Nati\\tve\"");
        assert_eq!(with(ControlCharacters::Space), "\"Na ti\\tve \"");
        assert!(convert(Value::Text("A\u{0}".into()), "code").is_err());
    }

    #[test]
    fn refusals_never_contain_the_value() {
        let err = convert(Value::Text("SECRET-PATIENT-NAME".into()), "integer").unwrap_err();
        assert!(!err.contains("SECRET"), "{err}");
    }

    proptest! {
        #[test]
        fn no_string_made_holds_a_forbidden_character(text in "\\PC*|[\\x00-\\x7f]{0,12}", strip in any::<bool>()) {
            let conversion = Conversion {
                control: if strip { ControlCharacters::Strip } else { ControlCharacters::Space },
                ..Conversion::default()
            };
            for fhir_type in [Primitive::String, Primitive::Markdown, Primitive::Uri] {
                let reject = to_fhir(&Value::Text(text.clone()), fhir_type, &Conversion::default());
                let clean = to_fhir(&Value::Text(text.clone()), fhir_type, &conversion);
                for made in [reject, clean].into_iter().flatten() {
                    let Element::String(made) = made else { panic!() };
                    prop_assert!(!made.chars().any(is_forbidden), "{:?}", made);
                }
            }
        }

        #[test]
        fn timestamptz_round_trips_through_fhir_instant(secs in 0i64..4_000_000_000, micros in 0u32..1_000_000, offset_min in -720i32..=840) {
            let offset = FixedOffset::east_opt(offset_min * 60).unwrap();
            let ts = DateTime::from_timestamp(secs, micros * 1000).unwrap().with_timezone(&offset);
            let Element::String(text) = to_fhir(&Value::TimestampTz(ts), Primitive::Instant, &Conversion::default()).unwrap() else { panic!() };
            prop_assert_eq!(DateTime::parse_from_rfc3339(&text).unwrap(), ts);
        }

        #[test]
        fn decimal_text_round_trips_through_fhir_json(int in "-?[1-9][0-9]{0,25}", frac in "[0-9]{0,25}") {
            let text = if frac.is_empty() { int } else { format!("{int}.{frac}") };
            let json = to_fhir(&Value::Decimal(ExactDecimal::parse(&text).unwrap()), Primitive::Decimal, &Conversion::default()).unwrap();
            prop_assert_eq!(json.to_json().to_string(), text);
        }
    }
}
