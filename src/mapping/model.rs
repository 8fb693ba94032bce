//! A loaded, checked mapping: what the mapper executes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use super::{
    convert::{Conversion, Primitive},
    location::Location,
    shape::Shape,
    template::Template,
};
use crate::{
    change::Column,
    fhir::{Segment, Sensitivity},
};

/// One mapping file: rows of one source table to one or more FHIR resources.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// Unique among all mappings; part of every event id. Never reuse one for a different
    /// meaning.
    pub id: Arc<str>,
    pub description: Option<String>,
    /// The topic segment: events go to `<prefix>.<domain>.<ResourceType>`.
    pub domain: Arc<str>,
    pub sensitivity: Sensitivity,
    /// `schema.table`.
    pub table: String,
    /// The table's key columns.
    pub key: Vec<String>,
    /// The mapping version: a hash of the file and the code tables it reads.
    pub content_hash: Arc<str>,
    pub file: PathBuf,
    pub resources: Vec<ResourceMapping>,
    /// The other tables it reads rows of, by key.
    pub lookups: Vec<Arc<Lookup>>,
}

/// A lookup: rows of another captured table, found by the values of this row's columns.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub name: String,
    /// `schema.table`.
    pub table: String,
    /// The looked-up table's columns that identify a row (its key).
    pub key: Vec<Column>,
    /// This row's columns whose values find the row, in the order of `key`.
    pub by: Vec<Column>,
    /// The looked-up table's columns elements read through the lookup.
    pub columns: Vec<Column>,
    pub on_missing: OnMissing,
    /// The most rows held in memory for it.
    pub max_rows: usize,
    pub location: Location,
}

/// What becomes of an element whose lookup finds no row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    /// The row goes to the dead-letter topic.
    Fail,
    /// The element is left out, as for a NULL (`default` and `required` apply).
    Omit,
}

impl Mapping {
    /// What the events this mapping makes say of it.
    pub fn made_by(&self) -> crate::canonical::MadeBy<'_> {
        crate::canonical::MadeBy {
            id: &self.id,
            version: &self.content_hash,
            domain: &self.domain,
            sensitivity: self.sensitivity,
            key: &self.key,
        }
    }

    /// The columns whose values the resources publish only protected, with their table
    /// (`schema.table`: this mapping's, or a looked-up one's), and how: those of elements
    /// with `protect`, of tokenized ids and of references to them.
    pub fn protected_columns(&self) -> impl Iterator<Item = (&str, &Column, Protect)> {
        self.resources.iter().flat_map(|resource| {
            let id = resource.id.is_tokenized().then_some(&resource.id);
            let id = id.into_iter().flat_map(|t| {
                t.columns()
                    .map(|c| (self.table.as_str(), c, Protect::Token))
            });
            let elements = resource.elements.iter().flat_map(|element| {
                let protect = match &element.source {
                    ValueSource::Reference { id, .. } if id.is_tokenized() => Some(Protect::Token),
                    ValueSource::Reference { .. } => None,
                    _ => element.protect,
                };
                let table = element.table(&self.table);
                element
                    .source_columns()
                    .filter_map(move |c| Some((table, c, protect?)))
            });
            id.chain(elements)
        })
    }

    /// Every column the mapping reads, by table (`schema.table`: its own, or a looked-up
    /// one's): its key, its resources' ids, conditions and elements (templates, references
    /// and columns), and its lookups' `by`, `key` and `columns` — what the table must have.
    pub fn columns_read<'a>(&'a self) -> BTreeMap<&'a str, BTreeSet<&'a str>> {
        let mut read: BTreeMap<&'a str, BTreeSet<&'a str>> = BTreeMap::new();
        let own = self.table.as_str();
        let mut add = |table: &'a str, column: &'a str| {
            read.entry(table).or_default().insert(column);
        };
        for key in &self.key {
            add(own, key);
        }
        for lookup in &self.lookups {
            for column in &lookup.by {
                add(own, column.as_str());
            }
            for column in lookup.key.iter().chain(&lookup.columns) {
                add(&lookup.table, column.as_str());
            }
        }
        for resource in &self.resources {
            for column in resource.id.columns() {
                add(own, column.as_str());
            }
            for condition in &resource.when {
                add(own, condition.column.as_str());
            }
            for element in &resource.elements {
                let table = element.table(own);
                for column in element.source_columns() {
                    add(table, column.as_str());
                }
                for condition in &element.when {
                    add(own, condition.column.as_str());
                }
            }
        }
        read
    }

    /// The source table as (schema, table).
    pub fn schema_table(&self) -> (&str, &str) {
        // The loader accepts only `schema.table`.
        self.table.split_once('.').unwrap_or(("", &self.table))
    }
}

/// The distinct tables a set of mappings reads, as (schema, table): the tables their
/// lookups read first (a read of them all in this order fills the lookups before their
/// users are mapped), then the others, each in name order.
pub fn source_tables(mappings: &[Mapping]) -> Vec<(String, String)> {
    let mapped = mappings.iter().map(|m| split_table(&m.table)).collect();
    with_lookups(mappings, mapped)
}

/// `tables` (some of the tables the mappings read), after the tables the mappings' lookups
/// read: what must be read, in this order, for them to map.
pub fn with_lookups(
    mappings: &[Mapping],
    tables: BTreeSet<(String, String)>,
) -> Vec<(String, String)> {
    let looked_up: BTreeSet<(String, String)> = mappings
        .iter()
        .flat_map(|m| &m.lookups)
        .map(|l| split_table(&l.table))
        .collect();
    let rest: Vec<_> = tables
        .into_iter()
        .filter(|t| !looked_up.contains(t))
        .collect();
    looked_up.into_iter().chain(rest).collect()
}

/// `schema.table` as (schema, table).
pub(super) fn split_table(table: &str) -> (String, String) {
    let (schema, table) = table.split_once('.').unwrap_or(("", table));
    (schema.to_owned(), table.to_owned())
}

/// One resource produced from a row.
#[derive(Debug, Clone)]
pub struct ResourceMapping {
    pub resource_type: String,
    pub id: Template,
    /// All must hold for the row to produce this resource.
    pub when: Vec<Condition>,
    pub elements: Vec<ElementMapping>,
    /// Nodes with children FHIR requires: checked on every produced resource.
    pub required: Vec<RequiredNode>,
    /// Choice elements the mapping fills with more than one type; a row may fill only one.
    pub choices: Vec<ChoiceGroup>,
    /// The tree of `elements`' paths, with the two checks above placed in it.
    pub shape: Shape,
    pub location: Location,
}

/// A node (the resource itself, or a complex element) and the children it must have.
#[derive(Debug, Clone)]
pub struct RequiredNode {
    /// JSON path of the node; empty for the resource.
    pub path: Vec<Segment>,
    /// The definition path of the node, for messages (`Observation`, `Observation.component`).
    pub definition: String,
    pub children: Vec<String>,
}

/// A choice element (`value[x]`) the mapping can fill with several types
/// (`valueQuantity`, `valueString`): at most one may be present in a resource.
#[derive(Debug, Clone)]
pub struct ChoiceGroup {
    /// JSON path of the node holding the choice; empty for the resource.
    pub path: Vec<Segment>,
    /// `value[x]`
    pub choice: String,
    /// The JSON names the mapping uses for it.
    pub names: Vec<String>,
}

/// One primitive element filled from the row.
#[derive(Debug, Clone)]
pub struct ElementMapping {
    pub path: Vec<Segment>,
    /// All must hold for the row to fill the element (its own and its groups'); otherwise
    /// it is left out, as for a NULL, `required` and `default` aside.
    pub when: Vec<Condition>,
    pub source: ValueSource,
    /// The FHIR primitive type of the element.
    pub fhir_type: Primitive,
    /// The codes a required binding allows.
    pub required_codes: Option<&'static HashSet<String>>,
    /// The definition path (`Quantity.unit`).
    pub definition: String,
    /// The element as the mapping writes it, for messages: `Observation.valueQuantity.unit`.
    pub written: String,
    /// A NULL is an error (the row goes to the dead-letter topic) instead of an omission.
    pub required: bool,
    /// When set, the element's parent (or the ancestor with this many path segments) is
    /// emitted only when this element has a value: a Quantity without its value, or an
    /// Identifier without its value, is dropped with its literal siblings.
    pub anchor: Option<usize>,
    pub conversion: Conversion,
    /// Typed steps on the source's text before anything else: a capture, a case, a format.
    pub transform: Transform,
    pub translate: Option<Arc<Translation>>,
    pub protect: Option<Protect>,
    /// The source is read from the row this lookup finds, not from the mapped row.
    pub lookup: Option<Arc<Lookup>>,
    /// The separator the source's text is split at: each part, trimmed, goes through the
    /// other steps into one item of the path's `[*]` array (an empty one keeps its place).
    pub split: Option<String>,
    /// Used when the source is NULL.
    pub default: Option<String>,
    /// The FHIR value of a literal, converted once at load time.
    pub fixed: Option<crate::fhir::Element>,
    /// The translation's targets as this element's FHIR values, converted once at load
    /// time (when the value is not masked or tokenized after translation).
    pub translated: Option<Translated>,
    pub location: Location,
}

impl ElementMapping {
    /// The columns its value is made of: its column, or those of its template or of its
    /// reference's id.
    pub fn source_columns(&self) -> impl Iterator<Item = &Column> {
        let (column, template) = match &self.source {
            ValueSource::Column(column) => (Some(column), None),
            ValueSource::Template(template) | ValueSource::Reference { id: template, .. } => {
                (None, Some(template))
            }
        };
        column
            .into_iter()
            .chain(template.into_iter().flat_map(Template::columns))
    }

    /// The table (`schema.table`) those columns are in: `own`, the mapping's, or, read
    /// through a lookup, the looked-up one.
    pub fn table<'a>(&'a self, own: &'a str) -> &'a str {
        self.lookup.as_ref().map_or(own, |l| l.table.as_str())
    }
}

/// Typed steps on an element's source value, in this order, each checked at load time.
#[derive(Debug, Clone, Default)]
pub struct Transform {
    /// The text of the pattern's one group in the first match; no match leaves the element
    /// out, as a NULL does.
    pub capture: Option<regex::Regex>,
    /// Upper or lower case.
    pub case: Option<Case>,
    /// A `strftime` format the text is read with, for a date, dateTime, instant or time.
    pub format: Option<String>,
}

impl Transform {
    /// Whether it has any step.
    pub fn is_some(&self) -> bool {
        self.capture.is_some() || self.case.is_some() || self.format.is_some()
    }
}

/// A letter case for [`Transform::case`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    Upper,
    Lower,
}

/// Where an element's value comes from.
#[derive(Debug, Clone)]
pub enum ValueSource {
    /// A column's value, converted by type.
    Column(Column),
    /// A string template (a literal when it reads no column).
    Template(Template),
    /// A reference to another mapped resource: `<type>/<deterministic id>`. `external`:
    /// another system (or another connector) makes the referenced resources.
    Reference {
        resource_type: String,
        id: Template,
        external: bool,
    },
}

/// A code translation table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    pub name: String,
    pub codes: HashMap<String, String>,
    pub unmapped: Unmapped,
}

/// A translation's targets as one element's FHIR values.
#[derive(Debug, Clone, Default)]
pub struct Translated {
    /// Source code → FHIR value.
    pub codes: rustc_hash::FxHashMap<String, crate::fhir::Element>,
    /// The value of `unmapped: default`.
    pub default: Option<crate::fhir::Element>,
}

/// What happens to a source code the table does not list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmapped {
    /// The row goes to the dead-letter topic.
    Fail,
    /// The source code is used as it is.
    Pass,
    /// This code is used.
    Default(String),
}

/// A condition on one column.
#[derive(Debug, Clone)]
pub struct Condition {
    pub column: Column,
    pub test: Test,
}

/// What a condition asks of its column's value. Texts compare after trailing spaces are
/// removed; a NULL is in no set, no number and matches no pattern.
#[derive(Debug, Clone)]
pub enum Test {
    In(Vec<String>),
    NotIn(Vec<String>),
    IsNull(bool),
    /// Whether the value is a number: an integer, a decimal, a float, or text that is a
    /// plain decimal (`-?digits[.digits]`, surrounding spaces aside).
    IsNumeric(bool),
    /// The value is a number, and compares so with this one.
    Compare(Comparison, f64),
    /// The value's text matches the pattern, whole.
    Matches(regex::Regex),
    /// The value is NULL, or its text does not match the pattern, whole.
    NotMatches(regex::Regex),
}

/// A numeric comparison of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Gt,
    Ge,
    Lt,
    Le,
}

impl Comparison {
    /// Whether `value` compares so with `than`.
    pub fn holds(self, value: f64, than: f64) -> bool {
        match self {
            Comparison::Gt => value > than,
            Comparison::Ge => value >= than,
            Comparison::Lt => value < than,
            Comparison::Le => value <= than,
        }
    }
}

impl Test {
    /// Whether it holds only for values that are not NULL.
    fn needs_value(&self) -> bool {
        matches!(
            self,
            Test::In(_)
                | Test::IsNull(false)
                | Test::IsNumeric(true)
                | Test::Compare(..)
                | Test::Matches(_)
        )
    }

    /// Whether no value meets both: provably, from the tests alone (a pattern is not
    /// compared with anything but NULL).
    fn excludes(&self, other: &Test) -> bool {
        use Test::{Compare, In, IsNull, IsNumeric, Matches, NotIn, NotMatches};
        let one_way = |a: &Test, b: &Test| match (a, b) {
            (Matches(x), NotMatches(y)) => x.as_str() == y.as_str(),
            (In(x), In(y)) => x.iter().all(|v| !y.contains(v)),
            (In(x), NotIn(y)) => x.iter().all(|v| y.contains(v)),
            (IsNull(x), IsNull(y)) | (IsNumeric(x), IsNumeric(y)) => x != y,
            (IsNull(true), other) => other.needs_value(),
            (IsNumeric(false), Compare(..)) => true,
            // A lower bound above an upper one, or both at one number, one of them strict.
            (Compare(low @ (Comparison::Gt | Comparison::Ge), x), Compare(high, y))
                if matches!(high, Comparison::Lt | Comparison::Le) =>
            {
                x > y || (x == y && (*low == Comparison::Gt || *high == Comparison::Lt))
            }
            _ => false,
        };
        one_way(self, other) || one_way(other, self)
    }
}

/// Whether no row meets both sets of conditions (all of each must hold), provably: some
/// condition of one and some of the other, on the same column, exclude each other.
pub fn exclusive(a: &[Condition], b: &[Condition]) -> bool {
    a.iter().any(|x| {
        b.iter()
            .any(|y| x.column == y.column && x.test.excludes(&y.test))
    })
}

/// Field protection for identifiers published without raw PHI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protect {
    /// Replaced by `****`; the resource is labelled MASKED.
    Mask,
    /// Replaced by a keyed token: HMAC-SHA-256 with the connector's key, hex, 32 characters.
    /// The same value always gives the same token, so joins still work.
    Token,
}
