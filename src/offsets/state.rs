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
    /// Snapshots asked for (`fhir-cdc snapshot`) and not yet complete, in the order asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<SnapshotRequest>,
    /// The latest requests dropped because the server refused their condition (their ids,
    /// the last [`ConnectorState::DROPPED_KEPT`]), so that whoever asked learns of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
}

/// A snapshot of one table (or of its rows matching a condition) asked of a running
/// connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Names the request, so that its end can be recognised.
    pub id: String,
    /// `schema.table`.
    pub table: String,
    /// An SQL condition on the table's rows (`result_id IN (1, 2)`); `None`: every row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

impl SnapshotRequest {
    /// A request with an id of its own: the time in milliseconds, this process and a count.
    pub fn new(table: String, filter: Option<String>) -> Self {
        static ASKED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let count = ASKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            id: format!("{millis}-{}-{count}", std::process::id()),
            table,
            filter,
        }
    }
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
    /// Rows read so far (for progress reports).
    #[serde(default)]
    pub rows: u64,
    /// The request this progress belongs to ([`SnapshotRequest::id`]), for a snapshot asked
    /// of a running connector; `None` for the initial one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The request's condition on the rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

impl ConnectorState {
    /// A fresh state of a `kind` source: nothing read.
    pub fn new(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            ..Self::default()
        }
    }

    /// Under `snapshot.mode = "never"`: `tables` not yet in the state count as read (their
    /// existing rows are not captured; their changes are).
    pub fn skip_snapshots<'a>(&mut self, tables: impl IntoIterator<Item = &'a String>) {
        for table in tables {
            self.tables.entry(table.clone()).or_insert(TableProgress {
                complete: true,
                ..TableProgress::default()
            });
        }
    }

    /// The snapshots still to read, in order, each with its progress: the mapped tables
    /// not yet complete (a table missing from the state from its start), then the requests
    /// not yet begun.
    pub fn unfinished<'a>(
        &self,
        tables: impl IntoIterator<Item = &'a String>,
    ) -> Vec<(String, TableProgress)> {
        let mut unfinished: Vec<(String, TableProgress)> = tables
            .into_iter()
            .filter_map(|table| match self.tables.get(table) {
                Some(progress) if progress.complete => None,
                progress => Some((table.clone(), progress.cloned().unwrap_or_default())),
            })
            .collect();
        for request in &self.requests {
            let begun = unfinished
                .iter()
                .any(|(_, p)| p.request.as_ref() == Some(&request.id));
            if !begun {
                unfinished.push((request.table.clone(), request.progress()));
            }
        }
        unfinished
    }

    /// Whether every table in `tables` is snapshotted and no request is outstanding.
    pub fn snapshot_complete<'a>(&self, tables: impl IntoIterator<Item = &'a String>) -> bool {
        self.unfinished(tables).is_empty()
    }

    /// `table`'s snapshot made `progress`, now durable; a request it completes is done.
    pub fn record(&mut self, table: String, progress: TableProgress) {
        if progress.complete {
            if let Some(id) = &progress.request {
                self.requests.retain(|r| r.id != *id);
            }
        }
        self.tables.insert(table, progress);
    }

    /// Dropped requests remembered.
    pub const DROPPED_KEPT: usize = 16;

    /// Request `id` is dropped: no longer outstanding, remembered as dropped.
    pub fn drop_request(&mut self, id: &str) {
        self.requests.retain(|r| r.id != id);
        self.dropped.push(id.to_owned());
        let excess = self.dropped.len().saturating_sub(Self::DROPPED_KEPT);
        self.dropped.drain(..excess);
    }

    /// Requests `ids` are dropped (see [`Self::drop_request`]); whether there were any.
    pub fn drop_requests(&mut self, ids: Vec<String>) -> bool {
        for id in &ids {
            self.drop_request(id);
        }
        !ids.is_empty()
    }

    /// Whether request `id` is queued or has begun (a log read again after a restart
    /// delivers a request again).
    pub fn knows_request(&self, id: &str) -> bool {
        self.requests.iter().any(|r| r.id == id)
            || self
                .tables
                .values()
                .any(|p| p.request.as_deref() == Some(id))
    }

    /// Whether request `id` was asked and is now complete.
    pub fn request_done(&self, id: &str) -> bool {
        !self.requests.iter().any(|r| r.id == id)
            && self
                .tables
                .values()
                .any(|p| p.complete && p.request.as_deref() == Some(id))
    }
}

impl TableProgress {
    /// The request this progress belongs to, when it reads the rows matching a condition
    /// (whose refusal by the server drops the request).
    pub fn filtered_request(&self) -> Option<String> {
        self.filter.as_ref().and(self.request.clone())
    }
}

impl SnapshotRequest {
    /// A request's progress before it begins.
    pub fn progress(&self) -> TableProgress {
        TableProgress {
            request: Some(self.id.clone()),
            filter: self.filter.clone(),
            ..TableProgress::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_tables_continue_after_their_last_durable_key() {
        let mut state = ConnectorState::new("postgres");
        let at = |complete, key: &str| TableProgress {
            complete,
            last_key: Some(vec![key.into()]),
            ..TableProgress::default()
        };
        state.tables.insert("lab.result".into(), at(false, "42"));
        state.tables.insert("lab.patient".into(), at(true, "7"));
        let mapped: Vec<String> = ["lab.result", "lab.patient", "lab.order"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            state.unfinished(&mapped),
            vec![
                ("lab.result".into(), at(false, "42")),
                ("lab.order".into(), TableProgress::default())
            ]
        );
        assert!(!state.snapshot_complete(&mapped));
        assert!(state.snapshot_complete(&mapped[1..2]));

        // A request for the snapshotted table comes after them, until it begins; it is done
        // when a complete progress of it is recorded.
        let request = SnapshotRequest {
            id: "r1".into(),
            table: "lab.patient".into(),
            filter: Some("mrn = 'M1'".into()),
        };
        state.requests.push(request.clone());
        assert_eq!(
            state.unfinished(&mapped[1..2]),
            vec![("lab.patient".into(), request.progress())]
        );
        let halfway = TableProgress {
            last_key: Some(vec!["3".into()]),
            ..request.progress()
        };
        state.record("lab.patient".into(), halfway.clone());
        assert_eq!(
            state.unfinished(&mapped[1..2]),
            vec![("lab.patient".into(), halfway.clone())],
            "begun: continued from its progress, not asked again"
        );
        assert!(!state.request_done("r1"));
        state.record(
            "lab.patient".into(),
            TableProgress {
                complete: true,
                ..halfway
            },
        );
        assert!(state.request_done("r1") && state.requests.is_empty());
        assert!(state.snapshot_complete(&mapped[1..2]));
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(
            serde_json::from_str::<ConnectorState>(&json).unwrap(),
            state
        );
    }

    #[test]
    fn dropped_requests_are_no_longer_outstanding_and_the_latest_are_remembered() {
        let mut state = ConnectorState::new("postgres");
        for n in 0..20 {
            state.requests.push(SnapshotRequest {
                id: format!("r{n}"),
                table: "lab.result".into(),
                filter: Some("x".into()),
            });
        }
        for n in 0..20 {
            state.drop_request(&format!("r{n}"));
        }
        assert!(state.requests.is_empty());
        assert_eq!(state.dropped.len(), ConnectorState::DROPPED_KEPT);
        assert_eq!(state.dropped.last().map(String::as_str), Some("r19"));
        assert!(!state.dropped.contains(&"r0".to_owned()));
    }
}
