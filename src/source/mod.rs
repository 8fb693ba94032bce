//! Source connectors: each reads one kind of database's change log and produces
//! source-neutral changes, behind one seam ([`Source`]) that the pipeline drives without
//! knowing the database.

pub mod chunks;
pub mod kind;
pub mod mysql;
pub mod postgres;
pub mod signal;
pub mod sqlserver;

use std::{fmt, future::Future, sync::Arc};

use self::kind::{with_kind, Kind};

use chrono::Utc;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    change::{ChangeEvent, Names, Operation, Position, Row, SourceMessage, SourceTable},
    config::{ConnectorConfig, SourceConfig},
    offsets::{ConnectorState, SnapshotRequest, StateStore},
    preflight::Finding,
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

impl crate::error::Kinded for SourceError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            SourceError::Transient(_) => crate::error::Kind::Transient,
            SourceError::Connector(_) => crate::error::Kind::Configuration,
        }
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

/// Ask `config`'s connector for the snapshot `request`, through its source's log: a
/// logical message in PostgreSQL's WAL, a row of the signal table in MySQL's binary log.
/// A connector that is stopped takes it when it starts.
pub async fn request_snapshot(
    config: &ConnectorConfig,
    request: &SnapshotRequest,
) -> Result<(), SourceError> {
    with_kind!(&config.source, kind => kind.request_snapshot(config, request).await)
}

/// What `check` knows of the tables a connector's mappings read.
#[derive(Debug, Clone, Default)]
pub struct MappedTables {
    /// Every table read, the lookups' first, as `(schema, table)`.
    pub read: Vec<(String, String)>,
    /// The tables mappings make resources of (`schema.table`), each with the key its first
    /// mapping names.
    pub keyed: Vec<(String, Vec<String>)>,
    /// The columns mappings read, by table (`schema.table`): what each table must have.
    pub columns: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
}

/// The columns mappings read that a table lacks (`check`, for `component`): every row
/// would be dead-lettered.
pub fn absent_columns(component: &'static str, table: &str, absent: &[&str]) -> Finding {
    Finding::problem(
        component,
        format!(
            "{table} has no column {}, which the mappings read: every row would be dead-lettered",
            absent.join(", ")
        ),
        "correct the column names in the mapping (as the table spells them), or add the columns to the table before `run`",
    )
}

/// A mapped table that does not exist as written, but does in another case (`spelled`,
/// as the catalogue has it): names are case-sensitive there.
pub fn case_only(component: &'static str, table: &str, spelled: &str) -> Finding {
    Finding::problem(
        component,
        format!("table {table} does not exist, but a mapping reads it; {spelled} differs only in case"),
        format!("write `source.table: {spelled}` in the mapping: the server compares table names with their case"),
    )
}

/// Everything `config`'s source must offer before `run` can capture from it, checked on the
/// live server; with `mapped`, also the tables the mappings read and whether `run` can
/// resume from where the connector stopped.
pub async fn preflight(config: &ConnectorConfig, mapped: Option<&MappedTables>) -> Vec<Finding> {
    with_kind!(&config.source, kind => kind.preflight(config, mapped).await)
}

/// The position `run` would resume from (the connector's stored state in Kafka), if any.
/// Kafka unreachable is its own finding; here it only leaves the position unchecked.
pub(crate) async fn stored_state_position(
    config: &ConnectorConfig,
) -> Result<Option<String>, Finding> {
    let read = StateStore::peek(config);
    let unchecked = |why: String| {
        Finding::warning(
            "state",
            format!("the connector's stored state could not be read ({why}), so whether run can resume from it is unchecked"),
            "see Kafka's finding",
        )
    };
    match tokio::time::timeout(STATE_TIMEOUT, read).await {
        Ok(Ok(state)) => Ok(state.and_then(|s| s.position)),
        Ok(Err(e)) => Err(unchecked(e.to_string())),
        Err(_) => Err(unchecked(format!(
            "no answer within {}s",
            STATE_TIMEOUT.as_secs()
        ))),
    }
}

/// How long `check` waits for the stored state.
const STATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What reads `config`'s source for its connector now, if anything (for messages): a
/// PostgreSQL slot in use, the lock a MySQL or SQL Server connector holds while it runs.
pub async fn reader_now(config: &ConnectorConfig) -> Result<Option<String>, SourceError> {
    with_kind!(&config.source, kind => kind.reader_now(config).await)
}

/// The end of `config`'s source's log now, as the stored state writes positions.
pub async fn log_end(config: &ConnectorConfig) -> Result<String, SourceError> {
    with_kind!(&config.source, kind => kind.log_end().await)
}

/// The position a stored state's text names, for `config`'s kind of source (`None` when
/// it names none of that kind).
pub fn stored_position(config: &ConnectorConfig, text: &str) -> Option<Position> {
    with_kind!(&config.source, kind => kind.stored_position(text))
}

/// Whether `filter` is a condition `source`'s server takes on `table`: parsed and planned
/// alone, never run. The server's message goes to whoever wrote the condition.
pub async fn check_condition(
    source: &SourceConfig,
    table: &str,
    filter: &str,
) -> Result<(), SourceError> {
    with_kind!(source, kind => kind.check_condition(table, filter).await)
}

/// Up to `limit` current rows of each of `tables` (`(schema, table)`), as snapshot changes,
/// table by table in the same order, for `fhir-cdc preview`: read in read-only
/// transactions, nothing created or written at the source.
pub async fn sample(
    config: &ConnectorConfig,
    tables: &[(String, String)],
    limit: u64,
) -> Result<Vec<Vec<ChangeEvent>>, SourceError> {
    with_kind!(&config.source, kind => kind.sample(config, tables, limit).await)
}

/// The condition, in `source`'s SQL, that selects the row with this key.
pub fn key_condition(source: &SourceConfig, key: &[(String, crate::change::Value)]) -> String {
    with_kind!(source, kind => kind.key_condition(key))
}

/// Whether a snapshot request that arrived through the source's log is one to take now:
/// for a table a mapping reads (warned of when not), and not one the state knows.
pub fn is_new_request(
    request: &SnapshotRequest,
    mapped: &[String],
    state: &ConnectorState,
) -> bool {
    if !mapped.contains(&request.table) {
        warn!(table = %request.table, request = %request.id, "a snapshot request for a table no mapping reads: ignored");
        return false;
    }
    if state.knows_request(&request.id) {
        return false;
    }
    info!(table = %request.table, request = %request.id, filtered = request.filter.is_some(), "snapshot requested");
    true
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

/// Read every row of `tables` of `config`'s source in one consistent snapshot into `out`,
/// in the order of `tables`; the snapshot's window: every change before its low end is in
/// it, none after its high end.
pub async fn read_consistent(
    config: &ConnectorConfig,
    tables: &[(String, String)],
    out: &mpsc::Sender<SourceMessage>,
) -> Result<(Position, Position), SourceError> {
    with_kind!(&config.source, kind => kind.read_consistent(config, tables, out).await)
}
