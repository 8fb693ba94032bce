//! Column values, typed and lossless: exact decimals stay exact text, timestamps keep their
//! precision and whether they carry a zone, NULL is not an empty string, bytes stay bytes.

use std::{
    fmt,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime};

/// One column value as the source database gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// An exact decimal, kept as its digits (PostgreSQL `numeric`, MySQL `DECIMAL`).
    Decimal(ExactDecimal),
    /// A binary floating-point number (`double precision`, `FLOAT`).
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
    Date(NaiveDate),
    Time(NaiveTime),
    /// A timestamp without zone (`timestamp`, `DATETIME`): wall-clock time, meaning depends on
    /// the zone the application wrote it in — mappings must name that zone.
    Timestamp(NaiveDateTime),
    /// An instant (`timestamptz`, MySQL `TIMESTAMP` read in UTC).
    TimestampTz(DateTime<FixedOffset>),
    Uuid(String),
    Json(serde_json::Value),
    /// A MySQL date that is no date (`0000-00-00`, or a zero month or day, which a lax
    /// `sql_mode` allows), as the server writes it. Never read as a real date: a mapping
    /// leaves it out (`zero_date: null`) or the row goes to the dead-letter topic.
    ZeroDate(String),
}

impl Value {
    /// The value's kind, for messages that must not show the value itself.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Int(_) => "integer",
            Value::Decimal(_) => "decimal",
            Value::Float(_) => "float",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::Date(_) => "date",
            Value::Time(_) => "time",
            Value::Timestamp(_) => "timestamp",
            Value::TimestampTz(_) => "timestamptz",
            Value::Uuid(_) => "uuid",
            Value::Json(_) => "json",
            Value::ZeroDate(_) => "zero date",
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

/// An exact decimal number as text: optional sign, digits, optional fraction. What goes in
/// comes out, trailing zeros included (`12.50` stays `12.50`: in FHIR the precision of a
/// decimal is significant).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExactDecimal(String);

impl ExactDecimal {
    /// Accepts `-12.50`, `0.001`, `7`; refuses exponents, `NaN`, `Infinity` and empty parts,
    /// none of which a FHIR decimal can carry.
    pub fn parse(text: &str) -> Result<Self, String> {
        let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
        let (int, frac) = match unsigned.split_once('.') {
            Some((int, frac)) => (int, Some(frac)),
            None => (unsigned, None),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if digits(int) && frac.is_none_or(digits) {
            Ok(Self(text.strip_prefix('+').unwrap_or(text).to_owned()))
        } else {
            Err(format!(
                "not an exact decimal number ({} characters)",
                text.len()
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExactDecimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Column names in table order, shared by the rows of one table layout.
pub type Names = Arc<[Arc<str>]>;

/// A row image: column names with their values, in table order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    /// Shared with the source's table layout: a row copies no name and takes one reference
    /// for all of them. (A reference per name, taken on the source's thread and dropped on
    /// the mapping stage's, had the two cores contend for the same counters: ≈ 10 % of
    /// fhir-cdc's samples, `lock inc` and `lock dec`.)
    names: Names,
    /// One per name.
    values: Box<[Value]>,
    /// Columns whose value the source did not send (PostgreSQL's unchanged TOASTed values
    /// without an old row): absent from the row, never guessed.
    unavailable: Box<[String]>,
}

impl Row {
    pub fn new(columns: Vec<(Arc<str>, Value)>) -> Self {
        Self::with_unavailable(columns, Vec::new())
    }

    /// A row without the values of `unavailable`, which the source did not send.
    pub fn with_unavailable(columns: Vec<(Arc<str>, Value)>, unavailable: Vec<String>) -> Self {
        let (names, values): (Vec<_>, Vec<_>) = columns.into_iter().unzip();
        Self {
            names: names.into(),
            values: values.into(),
            unavailable: unavailable.into(),
        }
    }

    /// A row of a table layout: one value per name.
    pub fn of_layout(names: Names, values: Vec<Value>) -> Self {
        debug_assert_eq!(names.len(), values.len());
        Self {
            names,
            values: values.into(),
            unavailable: Box::default(),
        }
    }

    /// Why `column` is not in the row, for messages: its value was not sent, or the table
    /// has no such column (any more).
    pub fn absence(&self, column: &str) -> &'static str {
        if self.unavailable.iter().any(|c| c == column) {
            "holds an unchanged TOASTed value the database did not send (no full old row: set REPLICA IDENTITY FULL); the row is not mapped on a guess"
        } else {
            "is not in the row (dropped or renamed?)"
        }
    }

    /// The columns whose values the source did not send.
    pub fn unavailable(&self) -> &[String] {
        &self.unavailable
    }

    /// The value of `column`, or `None` when the row has no such column (not the same as
    /// a NULL value).
    pub fn get(&self, column: &str) -> Option<&Value> {
        let at = self.names.iter().position(|name| &**name == column)?;
        Some(&self.values[at])
    }

    pub fn columns(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.names.iter().map(|n| &**n).zip(&self.values)
    }
}

/// A column name that remembers where it was found in the last row it was looked up in:
/// the rows of one table share a layout, so the next lookup takes one comparison instead of
/// a scan ([`Row::find`]).
#[derive(Debug, Default)]
pub struct Column {
    name: String,
    at: AtomicUsize,
}

impl Column {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            at: AtomicUsize::new(0),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl Clone for Column {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            at: AtomicUsize::new(self.at.load(Ordering::Relaxed)),
        }
    }
}

impl PartialEq for Column {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Column {}

impl std::ops::Deref for Column {
    type Target = str;

    fn deref(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Row {
    /// [`Row::get`] through a [`Column`]'s memory of where it was last.
    pub fn find(&self, column: &Column) -> Option<&Value> {
        let at = column.at.load(Ordering::Relaxed);
        if let Some(name) = self.names.get(at) {
            if **name == *column.name {
                return Some(&self.values[at]);
            }
        }
        let at = self.names.iter().position(|name| **name == *column.name)?;
        column.at.store(at, Ordering::Relaxed);
        Some(&self.values[at])
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_column_is_found_wherever_the_row_has_it() {
        let column = Column::new("b");
        let row = |names: &[&str]| {
            Row::new(
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| ((*n).into(), Value::Int(i as i64)))
                    .collect(),
            )
        };
        assert_eq!(row(&["a", "b"]).find(&column), Some(&Value::Int(1)));
        assert_eq!(row(&["a", "b"]).find(&column), Some(&Value::Int(1)));
        // Another layout (a column added in front), then one without it.
        assert_eq!(row(&["x", "a", "b"]).find(&column), Some(&Value::Int(2)));
        assert_eq!(row(&["b"]).find(&column), Some(&Value::Int(0)));
        assert_eq!(row(&["a", "c"]).find(&column), None);
        assert_eq!(row(&[]).find(&column), None);
    }

    #[test]
    fn decimals_keep_their_digits_and_refuse_what_fhir_cannot_hold() {
        for text in ["12.50", "-0.001", "7", "000.10"] {
            assert_eq!(ExactDecimal::parse(text).unwrap().as_str(), text);
        }
        assert_eq!(ExactDecimal::parse("+1.0").unwrap().as_str(), "1.0");
        for text in ["NaN", "Infinity", "1e5", "", "1.", ".5", "1.2.3", "--1"] {
            assert!(ExactDecimal::parse(text).is_err(), "{text}");
        }
    }

    proptest! {
        #[test]
        fn any_decimal_text_round_trips_exactly(
            negative: bool, int in "[0-9]{1,30}", frac in proptest::option::of("[0-9]{1,30}"),
        ) {
            let text = format!("{}{int}{}", if negative { "-" } else { "" }, frac.map(|f| format!(".{f}")).unwrap_or_default());
            let parsed = ExactDecimal::parse(&text).unwrap();
            prop_assert_eq!(parsed.as_str(), text.as_str());
        }
    }
}
