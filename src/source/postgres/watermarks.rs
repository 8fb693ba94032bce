//! The PostgreSQL snapshot's chunk scheduler: each chunk read between a low and a high
//! watermark that the connector writes into the WAL itself (logical messages), so that the
//! stream tells when a chunk's window opens and closes; a chunk row is dropped when the
//! stream changed its row inside the window, or had already given its whole current row.
//! (`source/chunks.rs` serves MySQL and SQL Server, whose logs have positions a read can be
//! bounded by; PostgreSQL's snapshot read cannot name an LSN, so it writes its own.)

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use super::{
    capture::{is_transient, snapshot_error, Signal},
    snapshot::{self, Chunk, ChunkTable, SnapshotError},
};
use crate::{
    change::{ChangeEvent, Operation, PgLsn, Position, SourceMessage},
    observe::progress::Progress,
    offsets::{ConnectorState, TableProgress},
    source::{chunk_changes, is_new_request, SourceError},
};

/// Snapshot chunks in flight and done, between the stream's watermarks.
pub(super) struct Snapshotter {
    pub(super) client: Arc<Client>,
    pub(super) connector: String,
    pub(super) database: String,
    /// `<slot>:<process>`: marks this run's watermarks apart from other connectors' and
    /// from an earlier run's that the stream may deliver again.
    pub(super) marker: String,
    /// Snapshot requests name the slot of the connector they are for.
    pub(super) slot: String,
    pub(super) size: usize,
    /// Snapshots to read, in order, each with its table and progress.
    pub(super) pending: VecDeque<(String, TableProgress)>,
    /// The tables still to snapshot, by `schema.table`.
    pub(super) described: HashMap<String, Described>,
    /// The chunks in flight, oldest first: at most two, the second read while the first
    /// waits for its high watermark in the stream (their windows never overlap: a chunk's
    /// low watermark is committed after the previous one's high watermark).
    pub(super) chunks: VecDeque<Current>,
    pub(super) sequence: u64,
    /// Requests whose condition the server refused, to be forgotten in the state.
    pub(super) dropped: Vec<String>,
    /// Chunks emitted and not yet durable: their high watermark's position, their table,
    /// and its progress with them.
    pub(super) milestones: VecDeque<(PgLsn, String, TableProgress)>,
    pub(super) progress: Progress,
}

/// Keys remembered per table at most, as streamed whole; past that the table's snapshot
/// rows are all emitted (correct, with more repeats). ≈ 100 MiB for short keys.
pub(super) const MAX_STREAMED_KEYS: usize = 1_000_000;

/// A table still to snapshot.
pub(super) struct Described {
    pub(super) table: Arc<ChunkTable>,
    /// The keys whose whole current row the stream has given since capture (re)started:
    /// their snapshot rows would repeat it (the stream has delivered every change before a
    /// chunk's low watermark, and the chunk drops rows changed after it). Only saves
    /// repeats: `None` once too many to remember.
    pub(super) streamed: Option<HashSet<String>>,
}

/// The chunk being read.
pub(super) struct Current {
    pub(super) table: Arc<ChunkTable>,
    pub(super) marker: String,
    pub(super) task: Option<JoinHandle<Result<Chunk, SnapshotError>>>,
    pub(super) chunk: Option<Chunk>,
    /// The low watermark passed: changes to the table now remove their rows from the chunk.
    pub(super) open: bool,
    pub(super) changed: HashSet<String>,
    pub(super) any_change: bool,
}

impl Snapshotter {
    /// A scheduler for `pending`, reading on `client` from `database` for connector and
    /// slot `names`, `size` rows a chunk.
    pub(super) fn new(
        client: Arc<Client>,
        database: String,
        (connector, slot): (&str, &str),
        size: usize,
        pending: VecDeque<(String, TableProgress)>,
    ) -> Self {
        Snapshotter {
            client,
            connector: connector.to_owned(),
            database,
            marker: format!("{slot}:{}", std::process::id()),
            slot: slot.to_owned(),
            size,
            pending,
            described: HashMap::new(),
            chunks: VecDeque::new(),
            sequence: 0,
            milestones: VecDeque::new(),
            dropped: Vec::new(),
            progress: Progress::new("snapshot"),
        }
    }

    pub(super) fn reading(&self) -> bool {
        self.chunks.iter().any(|c| c.task.is_some())
    }

    /// Read the layout and key of every table still to snapshot, before the stream starts,
    /// so that the stream's changes to them are recognised from the first on.
    pub(super) async fn describe_pending(&mut self) -> Result<(), SourceError> {
        let names: Vec<String> = self.pending.iter().map(|(name, _)| name.clone()).collect();
        for name in names {
            self.describe(&name).await?;
        }
        if !self.pending.is_empty() {
            info!(
                tables = self.pending.len(),
                "snapshotting in chunks alongside the stream"
            );
        }
        Ok(())
    }

    /// Read `name`'s layout and key, unless known.
    async fn describe(&mut self, name: &str) -> Result<(), SourceError> {
        if self.described.contains_key(name) {
            return Ok(());
        }
        let (schema, table) = name.split_once('.').expect("tables are schema.table");
        let described =
            ChunkTable::describe(&self.client, &self.connector, &self.database, schema, table)
                .await
                .map_err(snapshot_error)?;
        if described.key.is_empty() {
            warn!(table = %name, "the table has no primary key or replica identity index: its snapshot is read as one chunk");
        }
        self.described.insert(
            name.to_owned(),
            Described {
                table: Arc::new(described),
                streamed: Some(HashSet::new()),
            },
        );
        Ok(())
    }

    /// A snapshot asked for through the WAL (`fhir-cdc snapshot`): queued after the ones in
    /// progress, and recorded in the state so that a restart still reads it. A request for a
    /// table no mapping reads, or one already queued (the stream may deliver it again after
    /// a restart), changes nothing.
    pub(super) async fn signal(
        &mut self,
        content: &str,
        mapped: &[String],
        state: &mut ConnectorState,
    ) -> Result<(), SourceError> {
        let Ok(signal) = serde_json::from_str::<Signal>(content) else {
            warn!("a snapshot request that is not readable: ignored");
            return Ok(());
        };
        if signal.slot != self.slot {
            return Ok(());
        }
        let request = signal.request;
        if !is_new_request(&request, mapped, state) {
            return Ok(());
        }
        self.describe(&request.table).await?;
        self.pending
            .push_back((request.table.clone(), request.progress()));
        state.requests.push(request);
        Ok(())
    }

    /// Start reading the next chunk: the first of the next snapshot when none is in flight,
    /// or the one after a chunk whose read is done (the reading then overlaps with the
    /// stream catching up to that chunk's high watermark and with its rows being mapped).
    pub(super) async fn start_next(&mut self) -> Result<(), SourceError> {
        let after = match (self.chunks.len(), self.chunks.back()) {
            (0, _) => None,
            (1, Some(last)) => match &last.chunk {
                Some(chunk) if !chunk.complete => Some(chunk.last_key.clone()),
                _ => return Ok(()),
            },
            _ => return Ok(()),
        };
        let Some((name, progress)) = self.pending.front().cloned() else {
            return Ok(());
        };
        let table = self.described[&name].table.clone();
        let (after, filter) = (after.unwrap_or(progress.last_key), progress.filter);
        // A table's first chunk, or the first after a restart resumed it.
        if !self.progress.is_on(&name) {
            let estimate = snapshot::estimated_rows(&self.client, &table).await;
            self.progress.start(&name, estimate, progress.rows);
        }
        self.sequence += 1;
        let marker = format!("{}:{}", self.marker, self.sequence);
        let task = {
            let (client, table, marker, size) = (
                self.client.clone(),
                table.clone(),
                marker.clone(),
                self.size,
            );
            tokio::spawn(async move {
                let chunk = snapshot::ChunkQuery {
                    after: after.as_deref(),
                    filter: filter.as_deref(),
                    size,
                };
                snapshot::read_chunk(&client, &table, chunk, &marker).await
            })
        };
        self.chunks.push_back(Current {
            table,
            marker,
            task: Some(task),
            chunk: None,
            open: false,
            changed: HashSet::new(),
            any_change: false,
        });
        Ok(())
    }

    /// Wait for the read in flight to end.
    pub(super) async fn read(&mut self) -> Result<(), SourceError> {
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
            // there) is dropped, not retried for ever: only the request fails.
            (Err(e), Some(request)) if !e.postgres().is_some_and(is_transient) => {
                let code = e
                    .postgres()
                    .and_then(|e| e.code())
                    .map(|c| c.code().to_owned());
                warn!(request = %request, sqlstate = code, "the server refused a requested snapshot's condition: the request is dropped");
                self.abort();
                self.pending.pop_front();
                self.dropped.push(request);
            }
            (Err(e), _) => return Err(snapshot_error(e)),
        }
        Ok(())
    }

    /// A change from the stream: inside a chunk's window, its row leaves the chunk; before
    /// it, a complete row (an insert's or update's whole new row, a delete) makes the
    /// table's snapshot row for that key a repeat of what the stream already gave.
    pub(super) fn observe(&mut self, change: &ChangeEvent) {
        // Nothing to snapshot (the usual case): nothing to look up, no name to build.
        if self.described.is_empty() {
            return;
        }
        if let Some(described) = self.described.get_mut(&*change.source.qualified_name()) {
            let row = match change.op {
                Operation::Insert | Operation::Update => change
                    .after
                    .as_ref()
                    .filter(|row| row.unavailable().is_empty()),
                Operation::Delete => change.before.as_ref(),
                Operation::Read | Operation::Truncate => None,
            };
            if let (Some(streamed), Some(key)) = (
                described.streamed.as_mut(),
                row.and_then(|row| described.table.key_of(row)),
            ) {
                streamed.insert(key);
                if streamed.len() > MAX_STREAMED_KEYS {
                    described.streamed = None;
                }
            }
        }
        let Some(current) = self.chunks.iter_mut().find(|c| c.open) else {
            return;
        };
        if change.source.schema != current.table.source.schema
            || change.source.table != current.table.source.table
        {
            return;
        }
        current.any_change = true;
        for row in [&change.before, &change.after].into_iter().flatten() {
            if let Some(key) = current.table.key_of(row) {
                current.changed.insert(key);
            }
        }
    }

    /// A watermark from the stream: the low one opens the chunk's window, the high one
    /// closes it and returns the chunk's rows that no change in the window touched.
    pub(super) async fn watermark(
        &mut self,
        position: PgLsn,
        marker: &str,
    ) -> Result<Vec<SourceMessage>, SourceError> {
        let Some((of, edge)) = marker.rsplit_once(':') else {
            return Ok(Vec::new());
        };
        let Some(current) = self.chunks.iter_mut().find(|c| c.marker == of) else {
            // Another connector's, or an earlier run's.
            return Ok(Vec::new());
        };
        if edge == "low" {
            current.open = true;
            return Ok(Vec::new());
        }
        // Windows close in the order they opened: this is the oldest chunk.
        if current.chunk.is_none() {
            self.read().await?;
        }
        // Gone if its read failed and its request was dropped.
        if self.chunks.front().is_none_or(|c| c.marker != of) {
            return Ok(Vec::new());
        }
        let current = self.chunks.pop_front().expect("a chunk is in flight");
        let chunk = current.chunk.expect("read before its high watermark");
        let name = current.table.name.clone();
        if current.table.key.is_empty() && current.any_change {
            debug!(table = %name, "the table changed while it was read: reading it again");
            return Ok(Vec::new());
        }
        let read = chunk.rows.len();
        let front = self
            .pending
            .front_mut()
            .expect("the chunk's table is pending");
        // A snapshot asked for sends every row it reads: that is what it was asked for.
        let streamed = self.described[&name]
            .streamed
            .as_ref()
            .filter(|_| front.1.request.is_none());
        // A row's key is worked out only when some key is to be left out.
        let streamed = streamed.filter(|s| !s.is_empty());
        let table = &current.table;
        let rows = chunk.rows.into_iter().filter(|row| {
            (current.changed.is_empty() && streamed.is_none())
                || table.key_of(row).is_none_or(|key| {
                    !current.changed.contains(&key) && !streamed.is_some_and(|s| s.contains(&key))
                })
        });
        let at = Position::Postgres(position);
        let messages: Vec<SourceMessage> =
            chunk_changes(&current.table.source, &current.table.key, rows, &at)
                .map(SourceMessage::Change)
                .collect();
        debug!(table = %name, read, emitted = messages.len(), "chunk");
        self.progress.advance(read as u64);
        let progress = TableProgress {
            complete: chunk.complete,
            last_key: chunk.last_key.or_else(|| front.1.last_key.clone()),
            rows: front.1.rows + read as u64,
            ..front.1.clone()
        };
        if chunk.complete {
            self.pending.pop_front();
            if !self.pending.iter().any(|(table, _)| *table == name) {
                self.described.remove(&name);
            }
            self.progress.finish();
            info!(table = %name, request = progress.request, "table snapshotted");
        } else {
            front.1 = progress.clone();
        }
        self.milestones.push_back((position, name, progress));
        Ok(messages)
    }

    /// Everything up to `lsn` is durable: so are the chunks emitted up to it.
    pub(super) fn durable(&mut self, lsn: PgLsn, state: &mut ConnectorState) {
        while self.milestones.front().is_some_and(|(at, ..)| *at <= lsn) {
            let (_, table, progress) = self.milestones.pop_front().expect("checked");
            state.record(table, progress);
        }
        state.position = Some(lsn.to_string());
    }

    pub(super) fn abort(&mut self) {
        for task in self.chunks.drain(..).filter_map(|c| c.task) {
            task.abort();
        }
    }
}
