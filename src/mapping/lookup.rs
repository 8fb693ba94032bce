//! Lookups into other captured tables: the rows a mapping reads by key from a table other
//! than its own (a test catalogue, a patient table), held in memory and kept current by the
//! changes of that table as they pass the mapper, in log order.
//!
//! A lookup row is as of the change being mapped: the cache takes every change of the
//! looked-up table before the changes after it. Resources made before a lookup row changed
//! are not made again; a snapshot of their table (`fhir-cdc snapshot`) or a reconciliation
//! pass makes them with the current row.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use super::{
    apply::MapError,
    mapper::MapFailure,
    model::{split_table, Lookup, Mapping},
};
use crate::change::{text_of, ChangeEvent, Column, Names, Operation, Row, Value};

/// The cached rows of every lookup of a set of mappings, one index per looked-up table and
/// key.
#[derive(Debug, Default)]
pub struct Lookups {
    /// `schema.table` → its indexes.
    tables: HashMap<String, Vec<Index>>,
}

/// The rows of one table by the values of one set of key columns.
#[derive(Debug)]
struct Index {
    key: Vec<Column>,
    /// The columns cached: the key's, then every column a lookup through it reads.
    kept: Vec<Column>,
    names: Names,
    /// The most rows it may hold: the largest `max_rows` of its lookups.
    max_rows: usize,
    /// Whose failures its refusals are: the first lookup through it — its mapping's id, and
    /// its place and name.
    owner: (String, String),
    rows: RwLock<HashMap<Vec<String>, Row>>,
}

impl Lookups {
    pub fn new(mappings: &[Mapping]) -> Self {
        let mut lookups = Self::default();
        for mapping in mappings {
            for lookup in &mapping.lookups {
                lookups.add(&mapping.id, lookup);
            }
        }
        for index in lookups.tables.values_mut().flatten() {
            index.names = index.kept.iter().map(|c| Arc::from(c.as_str())).collect();
        }
        lookups
    }

    fn add(&mut self, mapping_id: &str, lookup: &Lookup) {
        let indexes = self.tables.entry(lookup.table.clone()).or_default();
        let at = match indexes.iter().position(|i| i.key == lookup.key) {
            Some(at) => at,
            None => {
                indexes.push(Index {
                    key: lookup.key.clone(),
                    kept: lookup.key.clone(),
                    names: Names::from(Vec::new()),
                    max_rows: 0,
                    owner: (
                        mapping_id.to_owned(),
                        format!("{}: lookup `{}`", lookup.location, lookup.name),
                    ),
                    rows: RwLock::default(),
                });
                indexes.len() - 1
            }
        };
        let index = &mut indexes[at];
        for column in &lookup.columns {
            if !index.kept.contains(column) {
                index.kept.push(column.clone());
            }
        }
        index.max_rows = index.max_rows.max(lookup.max_rows);
    }

    /// Whether any lookup reads `schema.table`.
    pub fn reads(&self, qualified_name: &str) -> bool {
        self.tables.contains_key(qualified_name)
    }

    /// The tables lookups read, as (schema, table), in name order.
    pub fn tables(&self) -> Vec<(String, String)> {
        let mut tables: Vec<(String, String)> =
            self.tables.keys().map(|name| split_table(name)).collect();
        tables.sort();
        tables
    }

    /// Take a change of a looked-up table into its indexes (nothing for other tables).
    /// A change that cannot be taken is a failure of the mapping owning the index, once per
    /// index, for the dead-letter topic: a delete without the key's old values, or a row
    /// beyond `max_rows`.
    pub fn take(&self, change: &ChangeEvent) -> Vec<MapFailure> {
        // Most changes are of no looked-up table: told apart without building a name.
        let source = &change.source;
        let looked_up = self.tables.iter().find(|(name, _)| {
            name.strip_prefix(&*source.schema)
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|table| table == &*source.table)
        });
        let Some((_, indexes)) = looked_up else {
            return Vec::new();
        };
        let mut failures = Vec::new();
        for index in indexes {
            if let Err(message) = index.take(change) {
                let (mapping_id, place) = &index.owner;
                failures.push(MapFailure {
                    mapping_id: mapping_id.clone(),
                    error: MapError {
                        location: place.clone(),
                        message,
                    },
                });
            }
        }
        failures
    }

    /// The row `lookup` finds for `row`: `Ok(None)` when a `by` column is NULL or no row has
    /// the key. A `by` column missing from the row is an error naming it.
    pub fn find(&self, lookup: &Lookup, row: &Row) -> Result<Option<Row>, String> {
        let mut key = Vec::with_capacity(lookup.by.len());
        for column in &lookup.by {
            match row.find(column) {
                None => return Err(column.to_string()),
                Some(Value::Null) => return Ok(None),
                Some(value) => key.push(key_text(value)),
            }
        }
        let index = self
            .tables
            .get(&lookup.table)
            .and_then(|indexes| indexes.iter().find(|i| i.key == lookup.key))
            .expect("every lookup of the mappings has its index");
        let rows = index.rows.read().unwrap_or_else(|e| e.into_inner());
        Ok(rows.get(&key).cloned())
    }

    /// The rows held, over every index.
    pub fn len(&self) -> usize {
        self.tables
            .values()
            .flatten()
            .map(|i| i.rows.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

impl Index {
    fn take(&self, change: &ChangeEvent) -> Result<(), String> {
        let mut rows = self.rows.write().unwrap_or_else(|e| e.into_inner());
        // The old key goes (a delete, or an update that moved the row to another key).
        let old_key = match (change.op, &change.before) {
            (Operation::Delete, None) => return Err(self.no_key("a delete")),
            (Operation::Delete, Some(before)) => {
                Some(self.key_of(before).ok_or_else(|| self.no_key("a delete"))?)
            }
            (Operation::Update, Some(before)) => self.key_of(before),
            (Operation::Truncate, _) => {
                rows.clear();
                return Ok(());
            }
            _ => None,
        };
        let new = match &change.after {
            Some(after) if change.op != Operation::Delete => {
                let key = self.key_of(after).ok_or_else(|| {
                    format!(
                        "a row of {} lacks a key column of the lookup ({})",
                        change.source.qualified_name(),
                        self.key_names()
                    )
                })?;
                Some((key, after))
            }
            _ => None,
        };
        if let Some(old_key) = old_key {
            if new.as_ref().is_none_or(|(key, _)| *key != old_key) {
                rows.remove(&old_key);
            }
        }
        let Some((key, after)) = new else {
            return Ok(());
        };
        let mut values = Vec::with_capacity(self.kept.len());
        for column in &self.kept {
            match after.find(column) {
                Some(value) => values.push(value.clone()),
                None => {
                    return Err(format!(
                        "column `{column}` {} (a row of {})",
                        after.absence(column),
                        change.source.qualified_name()
                    ))
                }
            }
        }
        if rows.len() >= self.max_rows && !rows.contains_key(&key) {
            return Err(format!(
                "the lookup holds at most {} rows of {} (max_rows) and this row would be one more: raise max_rows and restart the connector, which reads its lookups afresh",
                self.max_rows,
                change.source.qualified_name()
            ));
        }
        rows.insert(key, Row::of_layout(self.names.clone(), values));
        Ok(())
    }

    /// The key's values in `row` as text; `None` when a key column is missing or NULL.
    fn key_of(&self, row: &Row) -> Option<Vec<String>> {
        self.key
            .iter()
            .map(|column| match row.find(column)? {
                Value::Null => None,
                value => Some(key_text(value)),
            })
            .collect()
    }

    fn no_key(&self, what: &str) -> String {
        format!(
            "{what} without the old values of the lookup's key ({}): the row stays in the lookup until the connector restarts and reads it afresh; key the lookup by the table's primary key, or give the table a full replica identity",
            self.key_names()
        )
    }

    fn key_names(&self) -> String {
        self.key
            .iter()
            .map(Column::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A key value as it is compared: its text without trailing spaces (CHAR padding), so that
/// an integer key finds a text column's digits and the other way round.
fn key_text(value: &Value) -> String {
    text_of(value).trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chrono::Utc;

    use super::*;
    use crate::change::{PgLsn, Position, SourceTable};

    fn lookups() -> (Lookups, Arc<Lookup>) {
        let mapping = super::super::load_str(
            Path::new("m.yaml"),
            "mapping: m\ndomain: lab\nsource: { table: lis.result, key: [id] }\n\
             lookups:\n  codes: { table: lis.codes, key: [code], by: [test], columns: [name], max_rows: 2 }\n\
             resources:\n  - type: Observation\n    id: \"r-{id}\"\n    elements:\n      status: final\n\
             \x20     code.text: { lookup: codes, column: name }\n",
        )
        .unwrap();
        let lookup = mapping.lookups[0].clone();
        (Lookups::new(&[mapping]), lookup)
    }

    fn row(columns: &[(&str, Value)]) -> Row {
        Row::new(
            columns
                .iter()
                .map(|(c, v)| (Arc::from(*c), v.clone()))
                .collect(),
        )
    }

    fn codes_row(code: &str, name: &str) -> Row {
        row(&[
            ("code", Value::Text(code.into())),
            ("name", Value::Text(name.into())),
        ])
    }

    fn change(op: Operation, before: Option<Row>, after: Option<Row>) -> ChangeEvent {
        ChangeEvent {
            source: Arc::new(SourceTable::new("c", "postgres", "lab", "lis", "codes")),
            op,
            key: vec![Arc::from("code")].into(),
            before,
            after,
            position: Position::Postgres(PgLsn(1)),
            ordinal: 0,
            transaction_id: None,
            commit_time: None,
            capture_time: Utc::now(),
        }
    }

    fn name_of(lookups: &Lookups, lookup: &Lookup, test: &str) -> Option<String> {
        let found = lookups
            .find(lookup, &row(&[("test", Value::Text(test.into()))]))
            .unwrap()?;
        found.get("name").map(|v| text_of(v).into_owned())
    }

    #[test]
    fn a_row_follows_its_changes_and_a_moved_key_leaves_nothing_behind() {
        let (lookups, lookup) = lookups();
        let insert = change(Operation::Insert, None, Some(codes_row("GLU  ", "Glucose")));
        assert!(lookups.take(&insert).is_empty());
        assert_eq!(
            name_of(&lookups, &lookup, "GLU").as_deref(),
            Some("Glucose")
        );
        // PostgreSQL sends the old key when the key changes.
        let moved = change(
            Operation::Update,
            Some(row(&[("code", Value::Text("GLU".into()))])),
            Some(codes_row("GLUC", "Glucose")),
        );
        assert!(lookups.take(&moved).is_empty());
        assert_eq!(name_of(&lookups, &lookup, "GLU"), None);
        assert_eq!(
            name_of(&lookups, &lookup, "GLUC").as_deref(),
            Some("Glucose")
        );
        // An update without an old row keeps its key.
        let renamed = change(
            Operation::Update,
            None,
            Some(codes_row("GLUC", "Glucose, serum")),
        );
        assert!(lookups.take(&renamed).is_empty());
        assert_eq!(
            name_of(&lookups, &lookup, "GLUC").as_deref(),
            Some("Glucose, serum")
        );
        assert_eq!(lookups.len(), 1);
        let null_key = row(&[("test", Value::Null)]);
        assert_eq!(lookups.find(&lookup, &null_key).unwrap(), None);
        assert_eq!(
            lookups.find(&lookup, &row(&[("other", Value::Null)])),
            Err("test".to_owned())
        );
    }

    #[test]
    fn deletes_without_the_key_beyond_the_bound_and_truncates_are_told() {
        let (lookups, lookup) = lookups();
        for code in ["A", "B"] {
            assert!(lookups
                .take(&change(
                    Operation::Insert,
                    None,
                    Some(codes_row(code, code))
                ))
                .is_empty());
        }
        let third = lookups.take(&change(Operation::Insert, None, Some(codes_row("C", "C"))));
        assert_eq!(third.len(), 1);
        assert!(
            third[0].error.message.contains("at most 2 rows"),
            "{third:?}"
        );
        assert!(third[0].error.location.starts_with("m.yaml:"), "{third:?}");
        // An update of a held row is no row more.
        assert!(lookups
            .take(&change(Operation::Update, None, Some(codes_row("A", "a"))))
            .is_empty());
        let keyless = change(Operation::Delete, Some(row(&[("name", Value::Null)])), None);
        let untaken = lookups.take(&keyless);
        assert!(untaken[0]
            .error
            .message
            .contains("without the old values of the lookup's key (code)"));
        let delete = change(
            Operation::Delete,
            Some(row(&[("code", Value::Text("A".into()))])),
            None,
        );
        assert!(lookups.take(&delete).is_empty());
        assert_eq!(name_of(&lookups, &lookup, "A"), None);
        assert_eq!(lookups.len(), 1);
        assert!(lookups
            .take(&change(Operation::Truncate, None, None))
            .is_empty());
        assert_eq!(lookups.len(), 0);
    }
}
