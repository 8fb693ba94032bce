//! Executing a resource mapping on one row image: the FHIR resource it yields, if any.

use std::{borrow::Cow, sync::Arc};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use smallvec::{smallvec, SmallVec};

use super::{
    convert::{is_fhir_id, parse_formatted, to_fhir},
    load::display_path,
    location::Location,
    lookup::Lookups,
    model::{
        Case, Condition, ElementMapping, Lookup, OnMissing, Protect, ResourceMapping, Test,
        Transform, Unmapped, ValueSource,
    },
    shape::Broken,
    template::{RenderError, Template},
};
use crate::{
    change::{text_of, Column, Row, Value},
    config::Secret,
    fhir::{names, Element},
};

/// Why a row could not be mapped. Never holds row values: it names columns, elements and
/// the broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError {
    /// `file:line:column` of the mapping element (or resource) that failed.
    pub location: String,
    pub message: String,
}

impl std::fmt::Display for MapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// What mapping needs beyond the row: the key for identifier tokens, and the rows of the
/// tables lookups read (filled by the mapper).
#[derive(Debug, Clone, Default)]
pub struct MapContext {
    pub token_key: Option<Secret>,
    pub lookups: Arc<Lookups>,
}

impl MapContext {
    /// The token of `text` for `protect: token`: HMAC-SHA-256 with the connector's key, its
    /// first 16 bytes in hex. `None` without a key.
    pub fn token(&self, text: &str) -> Option<String> {
        let key = self.token_key.as_ref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key.expose().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(text.as_bytes());
        Some(hex::encode(&mac.finalize().into_bytes()[..16]))
    }
}

/// Why a tokenized id or reference cannot be made (`Mapper::new` refuses such mappings
/// without a key, so only a mapper built otherwise says it).
const NO_TOKEN_KEY: &str = "the id is tokenized but the connector has no token key";

/// A resource id from its template: the rendered text when it is a valid FHIR id
/// (`[A-Za-z0-9-.]{1,64}`), otherwise `h-` and the first 40 hex digits of its SHA-256 —
/// stable, and free of whatever made the text unsafe.
pub fn resource_id(
    template: &Template,
    row: &Row,
    context: &MapContext,
) -> Result<String, RenderError> {
    let text = template.render(row, context)?;
    Ok(if is_fhir_id(&text) {
        text
    } else {
        format!("h-{}", hex::encode(&Sha256::digest(text.as_bytes())[..20]))
    })
}

impl ResourceMapping {
    /// Whether the row satisfies every `when` condition. A column missing from the row
    /// fails the condition check with an error.
    pub fn applies_to(&self, row: &Row) -> Result<bool, MapError> {
        all_hold(&self.when, row, &self.location)
    }

    /// The resource id for this row.
    pub fn id_for(&self, row: &Row, context: &MapContext) -> Result<String, MapError> {
        resource_id(&self.id, row, context).map_err(|e| MapError {
            location: self.location.to_string(),
            message: match e {
                RenderError::Null(c) => format!("id column `{c}` is NULL"),
                RenderError::Missing(c) => format!("id column `{c}` {}", row.absence(&c)),
                RenderError::NoTokenKey => NO_TOKEN_KEY.into(),
            },
        })
    }

    /// The resource (without `meta`) this row yields, or `None` when a condition excludes
    /// the row.
    pub fn apply(&self, row: &Row, context: &MapContext) -> Result<Option<Element>, MapError> {
        if !self.applies_to(row)? {
            return Ok(None);
        }
        let id = self.id_for(row, context)?;
        let values = self.values(row, context)?;
        self.assemble(id, values).map(Some)
    }

    /// An update's new resource, and whether the old row's would be the same — or `None`
    /// when neither yields one. Only for rows whose conditions and id read the same values
    /// ([`Self::same_gates`]); then the old row is not mapped: an element whose columns hold
    /// the same values in both rows has the same value (mapping is a function of the columns
    /// it reads), and only the others are evaluated on the old row. An element the old row
    /// cannot give differs, as a resource the old row could not give does.
    pub fn apply_update(
        &self,
        old: &Row,
        new: &Row,
        context: &MapContext,
    ) -> Result<Option<(Element, bool)>, MapError> {
        if !self.applies_to(new)? {
            return Ok(None);
        }
        let id = self.id_for(new, context)?;
        let values = self.values(new, context)?;
        let unchanged = self.elements.iter().zip(&values).all(|(element, value)| {
            element.columns().all(|c| old.find(c) == new.find(c)) || {
                let mut before = None;
                element_value(element, old, context, &mut before).is_ok() && before == *value
            }
        });
        Ok(Some((self.assemble(id, values)?, unchanged)))
    }

    /// Whether the columns of the conditions and of the id hold the same values in both
    /// rows (and both rows have them): then both rows yield a resource, or neither, under
    /// the same id.
    pub fn same_gates(&self, old: &Row, new: &Row) -> bool {
        let condition_columns = self.when.iter().map(|condition| &condition.column);
        condition_columns.chain(self.id.columns()).all(|column| {
            let value = old.find(column);
            value.is_some() && value == new.find(column)
        })
    }

    /// The value of each element in this row.
    fn values(&self, row: &Row, context: &MapContext) -> Result<Values, MapError> {
        let mut values: Values = smallvec![None; self.elements.len()];
        for (element, value) in self.elements.iter().zip(&mut values) {
            element_value(element, row, context, value)?;
        }
        Ok(values)
    }

    /// The resource with this id and these element values.
    fn assemble(&self, id: String, mut values: Values) -> Result<Element, MapError> {
        let masked = self
            .elements
            .iter()
            .zip(&values)
            .any(|(element, value)| value.is_some() && element.protect == Some(Protect::Mask));
        let names = names();
        let mut resource = Vec::with_capacity(self.elements.len() + 3);
        resource.push((names.resource_type, Element::text(&*self.resource_type)));
        resource.push((names.id, Element::text(id)));
        // The canonical layer fills `meta` in this place; a masked resource is labelled now.
        let mut meta = Vec::new();
        if masked {
            meta.push((
                names.security,
                Element::Array(vec![Element::Object(vec![
                    (
                        names.system,
                        Element::text("http://terminology.hl7.org/CodeSystem/v3-ObservationValue"),
                    ),
                    (names.code, Element::text("MASKED")),
                ])]),
            ));
        }
        resource.push((names.meta, Element::Object(meta)));
        self.shape
            .build(&mut values, &mut resource)
            .map_err(|broken| MapError {
                location: self.location.to_string(),
                message: match broken {
                    Broken::Required(i, j) => {
                        let node = &self.required[i];
                        let child = &node.children[j];
                        let at = if node.path.is_empty() {
                            self.resource_type.clone()
                        } else {
                            format!("{}.{}", self.resource_type, display_path(&node.path))
                        };
                        format!("{at} lacks `{child}`, which FHIR requires ({}.{child}): its source is NULL in this row", node.definition)
                    }
                    Broken::Parts([(a, m), (b, n)]) => format!(
                        "{} has {m} part(s) and {} has {n}: each item of their `[*]` takes one part of each",
                        self.elements[a].written, self.elements[b].written
                    ),
                    Broken::Choice(i, present) => {
                        let group = &self.choices[i];
                        format!(
                            "{} is a choice: this row fills {present} of {}, FHIR allows one",
                            group.choice,
                            group.names.join(", ")
                        )
                    }
                },
            })?;
        Ok(Element::Object(resource))
    }
}

/// Whether every one of `conditions` holds in the row. A column missing from the row is an
/// error, placed at `location`.
fn all_hold(conditions: &[Condition], row: &Row, location: &Location) -> Result<bool, MapError> {
    for condition in conditions {
        let value = row.find(&condition.column).ok_or_else(|| MapError {
            location: location.to_string(),
            message: format!(
                "condition column `{}` {}",
                condition.column,
                row.absence(&condition.column)
            ),
        })?;
        if !holds(&condition.test, value) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a `by` column of `lookup` is NULL in the row: the row then looks nothing up, as
/// a NULL foreign key references nothing.
fn key_is_null(lookup: &Lookup, row: &Row) -> bool {
    lookup
        .by
        .iter()
        .any(|c| matches!(row.find(c), Some(Value::Null)))
}

/// `value` through the element's typed steps: `None` when a capture finds nothing.
fn transform(steps: &Transform, value: &Value) -> Result<Option<Value>, String> {
    let text = text_of(value);
    let mut text: Cow<'_, str> = match &steps.capture {
        None => text,
        Some(pattern) => match pattern.captures(&text).and_then(|c| c.get(1)) {
            None => return Ok(None),
            Some(group) => Cow::Owned(group.as_str().to_owned()),
        },
    };
    match steps.case {
        Some(Case::Upper) => text = Cow::Owned(text.to_uppercase()),
        Some(Case::Lower) => text = Cow::Owned(text.to_lowercase()),
        None => {}
    }
    Ok(Some(match &steps.format {
        Some(format) => parse_formatted(&text, format)?,
        None => Value::Text(text.into_owned()),
    }))
}

/// Whether `value` passes `test`.
fn holds(test: &Test, value: &Value) -> bool {
    let text = || text_of(value);
    match test {
        Test::IsNull(expected) => value.is_null() == *expected,
        Test::In(set) => !value.is_null() && set.iter().any(|v| v == text().trim_end()),
        Test::NotIn(set) => value.is_null() || !set.iter().any(|v| v == text().trim_end()),
        Test::IsNumeric(expected) => number(value).is_some() == *expected,
        Test::Compare(comparison, than) => {
            number(value).is_some_and(|n| comparison.holds(n, *than))
        }
        Test::Matches(pattern) => !value.is_null() && pattern.is_match(text().trim_end()),
        Test::NotMatches(pattern) => value.is_null() || !pattern.is_match(text().trim_end()),
    }
}

/// The value as a number, when it is one: an integer, a decimal, a finite float, or text
/// that is a plain decimal (`-?digits[.digits]`) once surrounding spaces are removed.
pub fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => f.is_finite().then_some(*f),
        Value::Decimal(_) | Value::Text(_) => {
            let text = text_of(value);
            let text = text.trim();
            let digits = text.strip_prefix('-').unwrap_or(text);
            let (int, fraction) = digits.split_once('.').unwrap_or((digits, "0"));
            let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            (plain(int) && plain(fraction))
                .then(|| text.parse().ok())
                .flatten()
        }
        _ => None,
    }
}

/// A resource's element values, in the order of its element mappings; `None` for a NULL.
type Values = SmallVec<[Option<Element>; 32]>;

impl ElementMapping {
    /// The columns the element reads: its conditions', and its source's (none for a
    /// literal; a lookup's `by` columns for a source read through a lookup, whose row is
    /// the same for the same values).
    fn columns(&self) -> impl Iterator<Item = &Column> {
        let by = self.lookup.iter().flat_map(|l| &l.by);
        let (column, template) = match &self.source {
            _ if self.fixed.is_some() || self.lookup.is_some() => (None, None),
            ValueSource::Column(column) => (Some(column), None),
            ValueSource::Template(template) | ValueSource::Reference { id: template, .. } => {
                (None, Some(template))
            }
        };
        self.when
            .iter()
            .map(|condition| &condition.column)
            .chain(by)
            .chain(column)
            .chain(template.into_iter().flat_map(Template::columns))
    }
}

/// The element's value in this row, into `slot` (in place: a resource's values are built
/// where they are kept until the resource is assembled); a NULL leaves it `None`.
fn element_value(
    element: &ElementMapping,
    row: &Row,
    context: &MapContext,
    slot: &mut Option<Element>,
) -> Result<(), MapError> {
    if !element.when.is_empty() && !all_hold(&element.when, row, &element.location)? {
        return Ok(());
    }
    if let Some(fixed) = &element.fixed {
        *slot = Some(fixed.clone());
        return Ok(());
    }
    let fail = |message: String| MapError {
        location: element.location.to_string(),
        message,
    };
    let missing = |column: &str| {
        fail(format!(
            "column `{column}` for {} {}",
            element.written,
            row.absence(column)
        ))
    };
    // Read through a lookup, the source is the row it finds; none found is a NULL source,
    // unless the lookup says that is a failure.
    let found: Option<Row>;
    let row = match &element.lookup {
        None => Some(row),
        Some(lookup) => {
            found = context.lookups.find(lookup, row).map_err(|c| missing(&c))?;
            if found.is_none() && lookup.on_missing == OnMissing::Fail && !key_is_null(lookup, row)
            {
                return Err(fail(format!(
                    "lookup `{}` finds no row of {} for {} (on_missing: fail)",
                    lookup.name, lookup.table, element.written
                )));
            }
            found.as_ref()
        }
    };
    // Each step refers to the value it passes on; what a step makes is kept in its own
    // local (the values are not moved from step to step).
    let rendered: Value;
    let raw: Option<&Value> = match (row, &element.source) {
        (None, _) => None,
        (Some(row), ValueSource::Column(column)) => match row.find(column) {
            None => return Err(missing(column)),
            Some(Value::Null) => None,
            Some(Value::ZeroDate(_)) if element.conversion.zero_date_as_null => None,
            Some(value) => Some(value),
        },
        (Some(row), ValueSource::Template(template)) => match template.render(row, context) {
            Ok(text) => {
                rendered = Value::Text(text);
                Some(&rendered)
            }
            Err(RenderError::Null(_)) => None,
            Err(RenderError::Missing(column)) => return Err(missing(&column)),
            Err(RenderError::NoTokenKey) => return Err(fail(NO_TOKEN_KEY.into())),
        },
        (
            Some(row),
            ValueSource::Reference {
                resource_type, id, ..
            },
        ) => match resource_id(id, row, context) {
            Ok(id) => {
                let mut reference = String::with_capacity(resource_type.len() + 1 + id.len());
                reference.push_str(resource_type);
                reference.push('/');
                reference.push_str(&id);
                rendered = Value::Text(reference);
                Some(&rendered)
            }
            Err(RenderError::Null(_)) => None,
            Err(RenderError::Missing(column)) => return Err(missing(&column)),
            Err(RenderError::NoTokenKey) => return Err(fail(NO_TOKEN_KEY.into())),
        },
    };
    let Some(separator) = &element.split else {
        return finish(element, raw, context, slot);
    };
    // One item per part, an empty one (or one a capture finds nothing in) holding its
    // place as an empty array, so that the parts of two split columns pair up by position.
    let mut items = Vec::new();
    let mut filled = false;
    if let Some(whole) = raw {
        let text = text_of(whole);
        for part in text.split(separator.as_str()).map(str::trim) {
            let mut item = None;
            if !part.is_empty() {
                finish(
                    element,
                    Some(&Value::Text(part.to_owned())),
                    context,
                    &mut item,
                )?;
            }
            filled |= item.is_some();
            items.push(item.unwrap_or(Element::Array(Vec::new())));
        }
    }
    // No part with a value: NULL, with its default.
    if !filled {
        items.clear();
        let mut item = None;
        finish(element, None, context, &mut item)?;
        items.extend(item);
    }
    *slot = (!items.is_empty()).then_some(Element::Array(items));
    Ok(())
}

/// The element's value from its source's value (`None`: NULL), into `slot`: through its
/// transform, default, translation, protection and conversion. A split element's parts
/// come here one by one.
#[inline]
fn finish(
    element: &ElementMapping,
    raw: Option<&Value>,
    context: &MapContext,
    slot: &mut Option<Element>,
) -> Result<(), MapError> {
    let fail = |message: String| MapError {
        location: element.location.to_string(),
        message,
    };
    let transformed: Value;
    let raw = match raw {
        Some(value) if element.transform.is_some() => {
            match transform(&element.transform, value)
                .map_err(|why| fail(format!("{}: {why}", element.written)))?
            {
                Some(value) => {
                    transformed = value;
                    Some(&transformed)
                }
                None => None,
            }
        }
        raw => raw,
    };
    let defaulted: Value;
    let raw: &Value = match (raw, &element.default) {
        (Some(value), _) => value,
        (None, Some(default)) => {
            defaulted = Value::Text(default.clone());
            &defaulted
        }
        (None, None) if element.required => {
            // Through a lookup, say which: a replay that fails again must name it as the
            // first failure did.
            let through = element.lookup.as_ref().map_or(String::new(), |lookup| {
                let read = match &element.source {
                    ValueSource::Column(column) => format!("column `{column}`"),
                    _ => "its columns".to_owned(),
                };
                format!(
                    " ({read} through lookup `{}` of {}: it found no row, or the row's value is NULL)",
                    lookup.name, lookup.table
                )
            });
            return Err(fail(format!(
                "{} is required but its source is NULL{through}",
                element.written
            )));
        }
        (None, None) => return Ok(()),
    };
    let target: Value;
    let value: &Value = match &element.translate {
        None => raw,
        Some(translation) => {
            let source = text_of(raw);
            let code = source.trim();
            if let Some(translated) = &element.translated {
                if let Some(fhir) = translated.codes.get(code).or(translated.default.as_ref()) {
                    *slot = Some(fhir.clone());
                    return Ok(());
                }
            }
            target = Value::Text(match (translation.codes.get(code), &translation.unmapped) {
                (Some(to), _) | (None, Unmapped::Default(to)) => to.clone(),
                (None, Unmapped::Pass) => code.to_owned(),
                (None, Unmapped::Fail) => {
                    return Err(fail(format!(
                        "the source code for {} has no entry in translation `{}` (unmapped: fail)",
                        element.written, translation.name
                    )))
                }
            });
            &target
        }
    };
    let protected: Value;
    let value: &Value = match element.protect {
        None => value,
        Some(Protect::Mask) => {
            protected = Value::Text("****".into());
            &protected
        }
        Some(Protect::Token) => {
            let token = context.token(text_of(value).trim()).ok_or_else(|| {
                fail(format!(
                    "{} is tokenized but the connector has no token key",
                    element.written
                ))
            })?;
            protected = Value::Text(token);
            &protected
        }
    };
    let fhir = slot.insert(
        to_fhir(value, element.fhir_type, &element.conversion)
            .map_err(|e| fail(format!("{}: {e}", element.written)))?,
    );
    if let (Some(codes), Some(code)) = (element.required_codes, fhir.as_str()) {
        if !codes.contains(code) {
            return Err(fail(format!(
                "{} must be a code of the value set {} requires; the mapped code is not",
                element.written, element.definition
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::ExactDecimal;

    #[test]
    fn numbers_are_told_from_text_that_only_looks_like_one() {
        let text = |s: &str| Value::Text(s.to_owned());
        for (value, expected) in [
            (Value::Int(-3), Some(-3.0)),
            (Value::Float(0.5), Some(0.5)),
            (Value::Float(f64::NAN), None),
            (
                Value::Decimal(ExactDecimal::parse("12.50").unwrap()),
                Some(12.5),
            ),
            (text(" 7.25 "), Some(7.25)),
            (text("-0.5"), Some(-0.5)),
            (text("<5"), None),
            (text("5."), None),
            (text(".5"), None),
            (text("1e3"), None),
            (text("POS"), None),
            (text(""), None),
            (Value::Null, None),
        ] {
            assert_eq!(number(&value), expected, "{value:?}");
        }
    }
}
