//! Source connectors: each reads one kind of database's change log and produces
//! source-neutral changes, behind one seam ([`Source`]) that the pipeline drives without
//! knowing the database.

pub mod mysql;
pub mod postgres;

use std::{fmt, future::Future, sync::Arc};

use chrono::Utc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    change::{ChangeEvent, Names, Operation, Position, Row, SourceMessage, SourceTable},
    offsets::ConnectorState,
};

/// A database's change log, as the pipeline sees it.
///
/// The contract: the source sends changes and progress to `out` in log order, starting from
/// the stored state it is given. A position that arrives on `durable` has every event at or
/// before it durable in Kafka; only such a position may be reported to the database or
/// written into the connector's state (which the source publishes on `state`, and the
/// pipeline saves). On `shutdown` the source stops reading and closes `out`, then keeps
/// taking durable positions until the pipeline has drained and closes `durable`.
pub trait Source: Send + 'static {
    /// This source's ordered position type.
    type Position: Ord + Clone + Send + Sync + fmt::Debug + fmt::Display + 'static;

    /// The `kind` recorded in the connector's state.
    const KIND: &'static str;

    /// This source's position inside a change's or a progress message's [`Position`].
    fn position(position: &Position) -> Option<Self::Position>;

    /// Capture until shutdown (see the trait's contract).
    fn run(
        self,
        stored: Option<ConnectorState>,
        io: SourceIo<Self::Position>,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// What a running source is connected to.
#[derive(Debug)]
pub struct SourceIo<P> {
    /// Changes and progress, to the mapping stage (bounded: a slow Kafka holds the source).
    pub out: mpsc::Sender<SourceMessage>,
    /// The latest position whose events are all durable in Kafka.
    pub durable: watch::Receiver<Option<P>>,
    /// The connector's state, as of the latest durable position. A change of snapshot
    /// progress or requests notifies (it is saved at once); a new position alone may be
    /// written without notifying (it is saved within a second).
    pub state: watch::Sender<ConnectorState>,
    pub shutdown: CancellationToken,
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The network or the server: starting again later may succeed (a restart, a
    /// connection reset, a server shutting down).
    #[error("{0}")]
    Transient(String),
    /// The configuration, the database's setup or its privileges: it stays so until
    /// someone changes it. The message names the fix.
    #[error("{0}")]
    Connector(String),
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient(_))
    }
}

/// Refuse a stored state another kind of source wrote (two connectors sharing a name).
pub fn refuse_foreign_state(
    stored: Option<&ConnectorState>,
    kind: &str,
    connector: &str,
) -> Result<(), SourceError> {
    match stored.map(|s| &s.kind).filter(|k| *k != kind) {
        Some(other) => Err(SourceError::Connector(format!(
            "the stored state of connector {connector} is a {other} connector's: give this connector a name of its own, or `fhir-cdc offsets reset` it"
        ))),
        None => Ok(()),
    }
}

/// The `SELECT` of a snapshot chunk of the table `quoted`: the rows matching every
/// condition, the next `size` in the order of `key` (quoted, comma-separated), or all of
/// them when the table has no key to order by.
pub fn chunk_select(quoted: &str, conditions: &[String], key: Option<&str>, size: usize) -> String {
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    match key {
        None => format!("SELECT * FROM {quoted}{filter}"),
        Some(key) => format!("SELECT * FROM {quoted}{filter} ORDER BY {key} LIMIT {size}"),
    }
}

/// Publish `state` for the pipeline to save. Only snapshot progress and requests wake the
/// saver: a new position alone, after every Kafka acknowledgement, is picked up at its next
/// round (see `SourceIo::state`).
pub fn publish(published: &watch::Sender<ConnectorState>, state: &ConnectorState) {
    published.send_if_modified(|published| {
        let progressed = published.tables != state.tables
            || published.requests != state.requests
            || published.dropped != state.dropped;
        published.clone_from(state);
        progressed
    });
}

/// A snapshot chunk's rows of `source` as reads at `position`, numbered from 0.
pub fn chunk_changes(
    source: &Arc<SourceTable>,
    key: &Names,
    rows: impl IntoIterator<Item = Row>,
    position: &Position,
) -> impl Iterator<Item = ChangeEvent> {
    let (source, key, position) = (source.clone(), key.clone(), position.clone());
    rows.into_iter()
        .enumerate()
        .map(move |(ordinal, row)| ChangeEvent {
            source: source.clone(),
            op: Operation::Read,
            key: key.clone(),
            before: None,
            after: Some(row),
            position: position.clone(),
            ordinal: ordinal as u32,
            transaction_id: None,
            commit_time: None,
            capture_time: Utc::now(),
        })
}
