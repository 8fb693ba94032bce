//! A kind of source database as the rest of the crate asks of it, beyond its stream: the
//! checks `check` runs, where the log ends and what reads it now, positions read back from
//! the stored state, snapshot requests through the log, a consistent read (reconcile,
//! lookups), samples (`preview`). Each kind implements [`Kind`] on its configuration, in its
//! own folder; [`with_kind!`](crate::source::kind::with_kind) is the one place a kind is
//! registered: a new kind of source is its folder, its `[source]` variant, its
//! `Position` variant, and one line there.

use std::future::Future;

use tokio::sync::mpsc;

use super::{MappedTables, Source, SourceError};
use crate::{
    change::{ChangeEvent, Position, SourceMessage, Value},
    config::ConnectorConfig,
    offsets::SnapshotRequest,
    preflight::Finding,
};

/// What the crate asks of one kind of source. `config` is the whole connector's (its name
/// names the slot, the lock, the stored state).
pub trait Kind {
    /// Its stream.
    type Source: Source;

    /// Its stream of `tables` (`(schema, table)`) for `connector`.
    fn source(&self, connector: &str, tables: Vec<(String, String)>) -> Self::Source;

    /// Everything the source must offer before `run` can capture from it, checked on the
    /// live server; with `mapped`, also the tables the mappings read and whether `run` can
    /// resume from where the connector stopped.
    fn preflight(
        &self,
        config: &ConnectorConfig,
        mapped: Option<&MappedTables>,
    ) -> impl Future<Output = Vec<Finding>>;

    /// What reads the source for the connector now, if anything (for messages).
    fn reader_now(
        &self,
        config: &ConnectorConfig,
    ) -> impl Future<Output = Result<Option<String>, SourceError>>;

    /// The end of the log now, as the stored state writes positions.
    fn log_end(&self) -> impl Future<Output = Result<String, SourceError>>;

    /// The position a stored state's text names (`None` when it names none of this kind).
    fn stored_position(&self, text: &str) -> Option<Position>;

    /// Ask the connector for the snapshot `request`, through the source's log; a connector
    /// that is stopped takes it when it starts.
    fn request_snapshot(
        &self,
        config: &ConnectorConfig,
        request: &SnapshotRequest,
    ) -> impl Future<Output = Result<(), SourceError>>;

    /// Whether `filter` is a condition the server takes on `table` (`schema.table`):
    /// parsed and planned alone, never run.
    fn check_condition(
        &self,
        table: &str,
        filter: &str,
    ) -> impl Future<Output = Result<(), SourceError>>;

    /// The condition, in the source's SQL, that selects the row with this key.
    fn key_condition(&self, key: &[(String, Value)]) -> String;

    /// Every row of `tables` in one consistent snapshot into `out`, in the order of
    /// `tables`; the snapshot's window: every change before its low end is in it, none
    /// after its high end.
    fn read_consistent(
        &self,
        config: &ConnectorConfig,
        tables: &[(String, String)],
        out: &mpsc::Sender<SourceMessage>,
    ) -> impl Future<Output = Result<(Position, Position), SourceError>>;

    /// Up to `limit` current rows of each of `tables`, as snapshot changes, table by table
    /// in the same order; nothing created or written at the source.
    fn sample(
        &self,
        config: &ConnectorConfig,
        tables: &[(String, String)],
        limit: u64,
    ) -> impl Future<Output = Result<Vec<Vec<ChangeEvent>>, SourceError>>;
}

/// `$body` with `$kind` bound to the [`Kind`] of the `[source]` configuration `$source`:
/// the one registration of each kind of source.
macro_rules! with_kind {
    ($source:expr, $kind:ident => $body:expr) => {
        match $source {
            $crate::config::SourceConfig::Postgres($kind) => $body,
            $crate::config::SourceConfig::Mysql($kind) => $body,
            $crate::config::SourceConfig::SqlServer($kind) => $body,
        }
    };
}
pub(crate) use with_kind;
