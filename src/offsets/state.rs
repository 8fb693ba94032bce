//! The connector's own record of where capture stands.
//!
//! Saved only with what Kafka has acknowledged: `position` is a source position every event
//! at or before which is durable, and a table's `last_key` is the key of the last row of a
//! snapshot chunk whose events are all durable. A restart therefore re-reads at most what
//! followed (the same event ids again), never skips anything. The database's own record (a
//! PostgreSQL slot's confirmed position) is only a floor: it says what the server still
//! keeps, not whether a snapshot finished.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where one connector stands (JSON in the state topic, keyed by the connector's name).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorState {
    /// The source kind the state belongs to (`postgres`, `mysql`, `sqlserver`).
    pub kind: String,
    /// The last durable source position, in the source's text form (`16/B374D848` for a
    /// PostgreSQL LSN); `None` before anything was acknowledged.
    pub position: Option<String>,
    /// Snapshot progress per mapped table (`schema.table`). A mapped table missing here has
    /// never been snapshotted.
    #[serde(default)]
    pub tables: BTreeMap<String, TableProgress>,
}

/// How far a table's snapshot came.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableProgress {
    /// Every row was read and its events are durable.
    pub complete: bool,
    /// The key (one text value per key column, in key order) of the last row read whose
    /// events are durable; the snapshot continues after it. `None`: from the start.
    pub last_key: Option<Vec<String>>,
}

impl ConnectorState {
    /// A fresh state of a `kind` source: nothing read.
    pub fn new(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            ..Self::default()
        }
    }

    /// The tables among `tables` whose snapshot is still to be read (or finished), each
    /// with the key it continues after.
    pub fn unfinished<'a>(
        &self,
        tables: impl IntoIterator<Item = &'a String>,
    ) -> Vec<(String, Option<Vec<String>>)> {
        tables
            .into_iter()
            .filter_map(|table| match self.tables.get(table) {
                Some(progress) if progress.complete => None,
                progress => Some((table.clone(), progress.and_then(|p| p.last_key.clone()))),
            })
            .collect()
    }

    /// Whether every table in `tables` is snapshotted.
    pub fn snapshot_complete<'a>(&self, tables: impl IntoIterator<Item = &'a String>) -> bool {
        self.unfinished(tables).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_tables_continue_after_their_last_durable_key() {
        let mut state = ConnectorState::new("postgres");
        state.tables.insert(
            "lab.result".into(),
            TableProgress {
                complete: false,
                last_key: Some(vec!["42".into()]),
            },
        );
        state.tables.insert(
            "lab.patient".into(),
            TableProgress {
                complete: true,
                last_key: Some(vec!["7".into()]),
            },
        );
        let mapped: Vec<String> = ["lab.result", "lab.patient", "lab.order"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            state.unfinished(&mapped),
            vec![
                ("lab.result".into(), Some(vec!["42".into()])),
                ("lab.order".into(), None)
            ]
        );
        assert!(!state.snapshot_complete(&mapped));
        assert!(state.snapshot_complete(&mapped[1..2]));
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(
            serde_json::from_str::<ConnectorState>(&json).unwrap(),
            state
        );
    }
}
