//! From a source-neutral change to canonical events, through every mapping of its table.
//!
//! - Reads and inserts map the new row; each resource it yields is an upsert.
//! - Updates map the new row, and the old one when the source provides it. Identical
//!   results produce nothing (a suppressed no-op: the update touched no mapped content).
//!   When the id and the conditions read the same values in both rows, the old row is not
//!   mapped: only the elements whose columns changed are evaluated on it and compared. A
//!   changed resource id produces a delete of the old id and an upsert of the new (also when
//!   only the old key is known); a row that no longer meets a mapping's conditions produces
//!   a delete.
//! - Deletes produce a delete for every resource the row had produced. The old row must
//!   hold the id template's columns (the key, with PostgreSQL's default replica identity).
//! - Truncates name no rows; they are reported as failures for reconciliation to repair.
//!
//! A row that fails a mapping yields a [`MapFailure`] for the dead-letter topic; the other
//! mappings of the row still run.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::{
    apply::{MapContext, MapError},
    lookup::Lookups,
    model::{Mapping, Protect, ResourceMapping},
};
use crate::{
    canonical::{CanonicalEvent, EventOp, Origin},
    change::{ChangeEvent, Operation, Row, SourceTable},
    fhir::Element,
};

/// Runs the mappings of each table.
#[derive(Debug)]
pub struct Mapper {
    /// Schema → table → mappings (looked up per change without building a name).
    by_table: HashMap<String, HashMap<String, TableMappings>>,
    context: MapContext,
    source_system: Arc<str>,
}

/// The mappings of one table, and the columns they protect.
#[derive(Debug, Default)]
struct TableMappings {
    mappings: Vec<Arc<Mapping>>,
    /// Column → how an element of a mapping protects it: a token when any tokenizes it
    /// (the form a reader can join with the events), otherwise the mask.
    protected: HashMap<String, Protect>,
}

/// What one change yields.
#[derive(Debug, Default)]
pub struct MapOutcome {
    pub events: Vec<CanonicalEvent>,
    /// Updates that changed no mapped content, per resource.
    pub suppressed: usize,
    pub failures: Vec<MapFailure>,
}

/// A mapping that failed on a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFailure {
    pub mapping_id: String,
    pub error: MapError,
}

impl Mapper {
    /// `source_system` names the legacy system in every event's provenance. Fails when a
    /// mapping tokenizes identifiers but no token key is configured.
    pub fn new(
        mappings: Vec<Mapping>,
        mut context: MapContext,
        source_system: impl Into<Arc<str>>,
    ) -> Result<Self, String> {
        context.lookups = Arc::new(Lookups::new(&mappings));
        if context.token_key.is_none() {
            let tokenizing = mappings.iter().find(|m| {
                m.protected_columns()
                    .any(|(_, _, protect)| protect == Protect::Token)
            });
            if let Some(mapping) = tokenizing {
                return Err(format!(
                    "mapping `{}` ({}) tokenizes identifiers, but no token key is configured",
                    mapping.id,
                    mapping.file.display()
                ));
            }
        }
        let mut by_table: HashMap<String, HashMap<String, TableMappings>> = HashMap::new();
        for mapping in mappings {
            // A looked-up table's columns are protected in its own rows' dead letters too.
            for (table, column, protect) in mapping.protected_columns() {
                let strongest = table_of(&mut by_table, table)
                    .protected
                    .entry(column.as_str().to_owned())
                    .or_insert(protect);
                if protect == Protect::Token {
                    *strongest = Protect::Token;
                }
            }
            let table = mapping.table.clone();
            table_of(&mut by_table, &table)
                .mappings
                .push(Arc::new(mapping));
        }
        Ok(Self {
            by_table,
            context,
            source_system: source_system.into(),
        })
    }

    /// Take a change of a table lookups read into their rows; what cannot be taken is
    /// returned as failures of the mappings whose lookups they are. [`Self::map`] does this
    /// for every change; alone it is for the rows read before capture starts.
    pub fn remember(&self, change: &ChangeEvent) -> Vec<MapFailure> {
        self.context.lookups.take(change)
    }

    /// The tables its lookups read, as (schema, table).
    pub fn looked_up_tables(&self) -> Vec<(String, String)> {
        self.context.lookups.tables()
    }

    /// The rows the lookups hold.
    pub fn remembered(&self) -> usize {
        self.context.lookups.len()
    }

    fn mappings_of(&self, schema: &str, table: &str) -> Option<&Vec<Arc<Mapping>>> {
        // A looked-up table that no mapping maps has an entry for its protected columns.
        Some(&self.by_table.get(schema)?.get(table)?.mappings).filter(|m| !m.is_empty())
    }

    /// How the mappings of `schema.table` protect `column`, if any does.
    pub fn protection(&self, schema: &str, table: &str, column: &str) -> Option<Protect> {
        self.by_table
            .get(schema)?
            .get(table)?
            .protected
            .get(column)
            .copied()
    }

    /// The token `protect: token` makes of `text`; `None` without a token key.
    pub fn token(&self, text: &str) -> Option<String> {
        self.context.token(text)
    }

    /// The events of a change, in log order after every change before it: a change of a
    /// table lookups read is taken into them first.
    pub fn map(&self, change: &ChangeEvent) -> MapOutcome {
        let mut outcome = self.map_through(change, |_| true);
        outcome.failures.splice(0..0, self.remember(change));
        outcome
    }

    /// [`Self::map`] through the mapping `mapping_id` only (a dead letter's replay: the
    /// table's other mappings did not fail), out of log order: the lookups are not changed
    /// (see [`Self::remember`]). `None` when no mapping of the change's table has that id
    /// and no lookup reads the table.
    pub fn map_with(&self, change: &ChangeEvent, mapping_id: &str) -> Option<MapOutcome> {
        let table = change.source.qualified_name();
        let looked_up = self.context.lookups.reads(&table);
        let known = looked_up
            || self
                .mappings_of(&change.source.schema, &change.source.table)?
                .iter()
                .any(|m| &*m.id == mapping_id);
        known.then(|| self.map_through(change, |m| &*m.id == mapping_id))
    }

    /// The key columns the mapping `mapping_id` declares for the change's table
    /// (`source.key`): what identifies a row whatever the table's replica identity flags.
    pub fn source_key(&self, source: &SourceTable, mapping_id: &str) -> Option<&[String]> {
        self.mappings_of(&source.schema, &source.table)?
            .iter()
            .find(|m| &*m.id == mapping_id)
            .map(|m| m.key.as_slice())
    }

    fn map_through(&self, change: &ChangeEvent, chosen: impl Fn(&Mapping) -> bool) -> MapOutcome {
        let mut outcome = MapOutcome::default();
        let Some(mappings) = self.mappings_of(&change.source.schema, &change.source.table) else {
            return outcome;
        };
        for mapping in mappings.iter().filter(|m| chosen(m)) {
            let origin = Origin {
                change,
                mapping: mapping.made_by(),
                source_system: &self.source_system,
            };
            for resource in &mapping.resources {
                if let Err(error) = self.map_resource(origin, resource, &mut outcome) {
                    outcome.failures.push(MapFailure {
                        mapping_id: mapping.id.to_string(),
                        error,
                    });
                }
            }
        }
        if outcome.events.len() > 1 && outcome.events.iter().any(|e| e.op == EventOp::Delete) {
            settle(&mut outcome.events);
        }
        outcome
    }

    fn map_resource(
        &self,
        origin: Origin<'_>,
        resource: &ResourceMapping,
        outcome: &mut MapOutcome,
    ) -> Result<(), MapError> {
        let change = origin.change;
        let upsert = |body: Element| CanonicalEvent::upsert(origin, body);
        let delete = |id: String| CanonicalEvent::delete(origin, &resource.resource_type, id);
        match change.op {
            Operation::Read | Operation::Insert => {
                if let Some(body) = resource.apply(after(change, resource)?, &self.context)? {
                    outcome.events.push(upsert(body));
                }
            }
            Operation::Update => {
                let new_row = after(change, resource)?;
                // The usual update leaves the id and the conditions alone: the old row is
                // then compared column by column instead of mapped.
                let old_row = change.before.as_ref();
                if let Some(old_row) = old_row.filter(|old| resource.same_gates(old, new_row)) {
                    match resource.apply_update(old_row, new_row, &self.context)? {
                        Some((_, true)) => outcome.suppressed += 1,
                        Some((new, false)) => outcome.events.push(upsert(new)),
                        None => {}
                    }
                    return Ok(());
                }
                let new = resource.apply(new_row, &self.context)?;
                // The old row as it was mapped; unknown when the source sent no (full) old row.
                let old = old_row.and_then(|row| resource.apply(row, &self.context).ok());
                match (old, new) {
                    (Some(Some(old)), Some(new)) if old == new => outcome.suppressed += 1,
                    (Some(Some(old)), Some(new)) => {
                        if id_of(&old) != id_of(&new) {
                            outcome.events.push(delete(id_of(&old).to_owned()));
                        }
                        outcome.events.push(upsert(new));
                    }
                    (_, Some(new)) => {
                        // Only the old key is known (PostgreSQL sends it when the key
                        // changed): the resource under the old id must go.
                        let old_id = change.before.as_ref().and_then(|row| resource.id_for(row, &self.context).ok());
                        if let Some(old_id) = old_id.filter(|id| id_of(&new) != id) {
                            outcome.events.push(delete(old_id));
                        }
                        outcome.events.push(upsert(new));
                    }
                    (Some(Some(old)), None) => outcome.events.push(delete(id_of(&old).to_owned())),
                    (Some(None), None) => {}
                    // No old row to tell whether the resource existed: delete what the row's id
                    // would be, so a resource that should no longer exist does not linger.
                    (None, None) => outcome.events.push(delete(resource.id_for(after(change, resource)?, &self.context)?)),
                }
            }
            Operation::Delete => {
                let row = change.before.as_ref().ok_or_else(|| MapError {
                    location: resource.location.to_string(),
                    message: "a delete without the old row's key cannot be mapped".into(),
                })?;
                // With a full old row, a row the conditions excluded never had a resource.
                if let Ok(false) = resource.applies_to(row) {
                    return Ok(());
                }
                outcome.events.push(delete(resource.id_for(row, &self.context)?));
            }
            Operation::Truncate => {
                return Err(MapError {
                    location: resource.location.to_string(),
                    message: format!("table {} was truncated: the resources of its rows are not deleted one by one; run reconciliation", change.source.qualified_name()),
                })
            }
        }
        Ok(())
    }
}

/// The entry of `schema.table` in a mapper's tables.
fn table_of<'a>(
    by_table: &'a mut HashMap<String, HashMap<String, TableMappings>>,
    qualified: &str,
) -> &'a mut TableMappings {
    let (schema, table) = qualified.split_once('.').unwrap_or(("", qualified));
    by_table
        .entry(schema.to_owned())
        .or_default()
        .entry(table.to_owned())
        .or_default()
}

/// One change leaves a resource one way. A resource one entry deletes and another makes (a
/// row that moved from one entry's conditions to another's, both making one id — as `check`
/// allows when their conditions exclude each other) exists after the change: its delete,
/// at the same version as the upsert, would otherwise win or lose by the order of entries.
fn settle(events: &mut Vec<CanonicalEvent>) {
    let made: HashSet<(String, String)> = events
        .iter()
        .filter(|e| e.op == EventOp::Upsert)
        .map(|e| (e.resource_type.clone(), e.resource_id.clone()))
        .collect();
    events.retain(|e| {
        e.op == EventOp::Upsert || !made.contains(&(e.resource_type.clone(), e.resource_id.clone()))
    });
}

fn after<'a>(change: &'a ChangeEvent, resource: &ResourceMapping) -> Result<&'a Row, MapError> {
    change.after.as_ref().ok_or_else(|| MapError {
        location: resource.location.to_string(),
        message: format!("a {} without the new row", change.op),
    })
}

/// The `id` of a mapped resource (the mapper always sets it).
fn id_of(resource: &Element) -> &str {
    resource
        .get("id")
        .and_then(Element::as_str)
        .unwrap_or_default()
}
