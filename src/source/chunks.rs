//! Snapshot chunks read alongside the stream, for sources whose log positions serve as
//! DBLog's watermarks (MySQL and MariaDB, SQL Server): the connector writes nothing into
//! the database for them.
//!
//! A chunk is read in a transaction of its own with two positions: `low`, before which
//! every change is in what the read saw, and `high`, after which none is. The stream goes
//! on while the chunk is read; it is emitted once the stream has passed `high`, leaving out
//! the rows a change after `low` touched (the stream gave them newer). At most two chunks
//! are in flight: the second is read while the first waits for the stream.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    future::Future,
    sync::Arc,
};

use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::{
    change::{ChangeEvent, Names, Position, Row, SourceMessage, SourceTable, Value},
    observe::progress::Progress,
    offsets::{ConnectorState, TableProgress},
    source::{chunk_changes, is_new_request, signal, SourceError},
};

/// A table as chunks read it.
pub trait ChunkTable: Send + Sync + fmt::Debug + 'static {
    /// Its name as the connector's state and the mappings write it.
    fn name(&self) -> &str;
    fn source(&self) -> &Arc<SourceTable>;
    /// The primary key, in key order; empty without one.
    fn key(&self) -> &Names;

    /// The key of `row` as text comparable with the stream's rows' keys; `None` when the
    /// row lacks a key column.
    fn key_of(&self, row: &Row) -> Option<String> {
        let values: Option<Vec<_>> = self.key().iter().map(|k| row.get(k)).collect();
        values.map(|v| format!("{v:?}"))
    }
}

/// The key of a row read by a chunk (`values`, the key columns at `key_at`), as the text a
/// chunk continues after and the connector's state keeps.
pub fn key_text(values: &[Value], key_at: &[usize]) -> Vec<String> {
    key_at
        .iter()
        .map(|at| crate::change::text_of(&values[*at]).into_owned())
        .collect()
}

/// One chunk as read.
#[derive(Debug)]
pub struct Chunk<P> {
    pub rows: Vec<Row>,
    /// The last row's key, as text, to continue after.
    pub last_key: Option<Vec<String>>,
    /// Fewer rows than asked: the table is read to its end.
    pub complete: bool,
    /// Every change before it is in the read: rows changed after it are left out.
    pub low: P,
    /// No change after it is in the read: the stream must pass it before the chunk is
    /// emitted.
    pub high: P,
}

/// How a source reads chunks.
pub trait ChunkReader: Clone + Send + Sync + 'static {
    type Position: Ord + Clone + Send + Sync + fmt::Debug + 'static;
    type Table: ChunkTable;
    type Error: Into<SourceError> + fmt::Debug + Send + 'static;

    /// The table `name` (as the mappings write it), from the catalog.
    fn describe(&self, name: &str)
        -> impl Future<Output = Result<Self::Table, Self::Error>> + Send;

    /// Up to `size` rows of `table` after the key `after` (all of them without a key), of
    /// those matching `filter`.
    fn read(
        &self,
        table: Arc<Self::Table>,
        after: Option<Vec<String>>,
        filter: Option<String>,
        size: usize,
    ) -> impl Future<Output = Result<Chunk<Self::Position>, Self::Error>> + Send + 'static;

    /// The catalog's estimate of the table's rows: for progress, never for correctness.
    fn estimated_rows(&self, table: &Self::Table) -> impl Future<Output = Option<u64>> + Send;

    /// Whether `error` is the server refusing a statement (a requested condition it will
    /// not take), rather than the connection failing.
    fn refused(error: &Self::Error) -> bool;

    /// This source's position inside a change's [`Position`].
    fn position(position: &Position) -> Option<Self::Position>;
}

/// A chunk's read, as its task ends.
type ChunkRead<R> = Result<Chunk<<R as ChunkReader>::Position>, <R as ChunkReader>::Error>;

/// Snapshot chunks in flight and done.
#[derive(Debug)]
pub struct Snapshotter<R: ChunkReader> {
    reader: R,
    size: usize,
    pub pending: VecDeque<(String, TableProgress)>,
    described: HashMap<String, Arc<R::Table>>,
    /// At most two: the second read while the first waits for the stream.
    chunks: VecDeque<Current<R>>,
    /// Chunks emitted and not yet durable: their position, table and progress.
    milestones: VecDeque<(R::Position, String, TableProgress)>,
    /// Requests whose condition the server refused, to be forgotten in the state.
    pub dropped: Vec<String>,
    progress: Progress,
}

#[derive(Debug)]
pub struct Current<R: ChunkReader> {
    table: Arc<R::Table>,
    task: Option<JoinHandle<ChunkRead<R>>>,
    chunk: Option<Chunk<R::Position>>,
    /// The keys the stream changed since the read began, with the last change's position.
    touched: HashMap<String, R::Position>,
    /// Any change to the table since the read began (for tables without a key).
    any_change: Option<R::Position>,
}

impl<R: ChunkReader> Snapshotter<R> {
    /// The tables of `pending` described, ready to read `size` rows a chunk.
    pub async fn new(
        reader: R,
        size: usize,
        pending: VecDeque<(String, TableProgress)>,
    ) -> Result<Self, R::Error> {
        let mut snapshotter = Self {
            reader,
            size,
            pending,
            described: HashMap::new(),
            chunks: VecDeque::new(),
            milestones: VecDeque::new(),
            dropped: Vec::new(),
            progress: Progress::new("snapshot"),
        };
        for (name, _) in snapshotter.pending.clone() {
            snapshotter.describe(&name).await?;
        }
        if !snapshotter.pending.is_empty() {
            info!(
                tables = snapshotter.pending.len(),
                "snapshotting in chunks alongside the stream"
            );
        }
        Ok(snapshotter)
    }

    async fn describe(&mut self, name: &str) -> Result<(), R::Error> {
        if self.described.contains_key(name) {
            return Ok(());
        }
        let described = self.reader.describe(name).await?;
        if described.key().is_empty() {
            warn!(table = %name, "the table has no primary key: its snapshot is read as one chunk");
        }
        self.described.insert(name.to_owned(), Arc::new(described));
        Ok(())
    }

    /// A row inserted into the signal table: the snapshots it asks for are queued after
    /// the ones in progress and recorded in the state, so that a restart still reads them.
    /// A signal that cannot be followed is logged (why, never its values) and skipped.
    pub async fn signal(
        &mut self,
        change: &ChangeEvent,
        mapped: &[String],
        state: &mut ConnectorState,
    ) -> Result<(), SourceError> {
        let Some(row) = &change.after else {
            return Ok(());
        };
        let requests = match signal::requests(row) {
            Ok(Some(requests)) => requests,
            Ok(None) => return Ok(()),
            Err(why) => {
                warn!(table = %change.source.qualified_name(), position = %change.position, why, "a signal that cannot be followed: ignored");
                return Ok(());
            }
        };
        for request in requests {
            if !is_new_request(&request, mapped, state) {
                continue;
            }
            self.describe(&request.table).await.map_err(Into::into)?;
            self.pending
                .push_back((request.table.clone(), request.progress()));
            state.requests.push(request);
        }
        Ok(())
    }

    pub fn reading(&self) -> bool {
        self.chunks.iter().any(|c| c.task.is_some())
    }

    /// Start the next chunk's read: the first of the next table when none is in flight, or
    /// the one after a chunk whose read is done.
    pub async fn start_next(&mut self) {
        let after = match (self.chunks.len(), self.chunks.back()) {
            (0, _) => None,
            (1, Some(last)) => match &last.chunk {
                Some(chunk) if !chunk.complete => Some(chunk.last_key.clone()),
                _ => return,
            },
            _ => return,
        };
        let Some((name, progress)) = self.pending.front().cloned() else {
            return;
        };
        let table = self.described[&name].clone();
        let (after, filter) = (after.unwrap_or(progress.last_key), progress.filter);
        // A table's first chunk, or the first after a restart resumed it.
        if self.chunks.is_empty() && !self.progress.is_on(&name) {
            let estimate = self.reader.estimated_rows(&table).await;
            self.progress.start(&name, estimate, progress.rows);
        }
        let task = tokio::spawn(self.reader.read(table.clone(), after, filter, self.size));
        self.chunks.push_back(Current {
            table,
            task: Some(task),
            chunk: None,
            touched: HashMap::new(),
            any_change: None,
        });
    }

    /// Wait for the read in flight to end.
    pub async fn read(&mut self) -> Result<(), SourceError> {
        let Some(at) = self.chunks.iter().position(|c| c.task.is_some()) else {
            return Ok(());
        };
        let task = self.chunks[at].task.as_mut().expect("found by its task");
        let read = task
            .await
            .map_err(|e| SourceError::Connector(format!("the snapshot reader failed: {e}")))?;
        self.chunks[at].task = None;
        let refused = self.pending.front().and_then(|(_, p)| p.filtered_request());
        match (read, refused) {
            (Ok(chunk), _) => self.chunks[at].chunk = Some(chunk),
            // A request's condition the server refuses (a typo, a column that is not
            // there) is dropped, not retried for ever: only the request fails. The server's
            // message may quote the condition: it is not logged.
            (Err(e), Some(request)) if R::refused(&e) => {
                warn!(request = %request, "the server refused a requested snapshot's condition: the request is dropped");
                self.abort();
                self.pending.pop_front();
                self.dropped.push(request);
            }
            (Err(e), _) => return Err(e.into()),
        }
        Ok(())
    }

    /// A change from the stream: its key is remembered by the chunks being read of its table.
    pub fn observe(&mut self, change: &ChangeEvent) {
        if self.chunks.is_empty() {
            return;
        }
        let Some(position) = R::position(&change.position) else {
            return;
        };
        for current in &mut self.chunks {
            let source = current.table.source();
            if change.source.schema != source.schema || change.source.table != source.table {
                continue;
            }
            current.any_change = Some(position.clone());
            for row in [&change.before, &change.after].into_iter().flatten() {
                if let Some(key) = current.table.key_of(row) {
                    current.touched.insert(key, position.clone());
                }
            }
        }
    }

    /// The oldest chunk, if it is read and the stream at `at` has passed its high mark.
    pub fn ready(&mut self, at: &R::Position) -> Option<Current<R>> {
        let front = self.chunks.front()?;
        let chunk = front.chunk.as_ref()?;
        if *at < chunk.high {
            return None;
        }
        self.chunks.pop_front()
    }

    /// The chunk's rows that no later change touched, as snapshot reads at `position`
    /// (which is `at`, wrapped).
    pub fn emit(
        &mut self,
        current: Current<R>,
        at: &R::Position,
        position: &Position,
    ) -> Vec<SourceMessage> {
        let chunk = current.chunk.expect("a ready chunk is read");
        let table = &current.table;
        let name = table.name().to_owned();
        let low = chunk.low.clone();
        let changed_after_low = |p: &R::Position| *p > low;
        if table.key().is_empty() && current.any_change.as_ref().is_some_and(changed_after_low) {
            debug!(table = %name, "the table changed while it was read: reading it again");
            return Vec::new();
        }
        let read = chunk.rows.len();
        let rows = chunk.rows.into_iter().filter(|row| {
            current.touched.is_empty()
                || table
                    .key_of(row)
                    .is_none_or(|key| !current.touched.get(&key).is_some_and(changed_after_low))
        });
        let messages: Vec<SourceMessage> =
            chunk_changes(table.source(), table.key(), rows, position)
                .map(SourceMessage::Change)
                .collect();
        debug!(table = %name, read, emitted = messages.len(), "chunk");
        self.progress.advance(read as u64);
        let front = self
            .pending
            .front_mut()
            .expect("the chunk's table is pending");
        let progress = TableProgress {
            complete: chunk.complete,
            last_key: chunk.last_key.or_else(|| front.1.last_key.clone()),
            rows: front.1.rows + read as u64,
            ..front.1.clone()
        };
        if chunk.complete {
            self.pending.pop_front();
            self.progress.finish();
            info!(table = %name, request = progress.request, "table snapshotted");
        } else {
            front.1 = progress.clone();
        }
        self.milestones.push_back((at.clone(), name, progress));
        messages
    }

    /// Everything up to `at` is durable: so are the chunks emitted up to it.
    pub fn durable(&mut self, at: &R::Position, state: &mut ConnectorState) {
        while self.milestones.front().is_some_and(|(p, ..)| p <= at) {
            let (_, table, progress) = self.milestones.pop_front().expect("checked");
            state.record(table, progress);
        }
    }

    pub fn abort(&mut self) {
        for task in self.chunks.drain(..).filter_map(|c| c.task) {
            task.abort();
        }
    }
}
