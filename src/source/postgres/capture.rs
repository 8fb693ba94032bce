//! The PostgreSQL source behind the [`Source`] seam: the publication and the slot, the start
//! decided by the connector's stored state, then the replication stream with snapshot
//! chunks read between watermarks ([`super::snapshot`]) and heartbeats written into the WAL.
//!
//! Why the stored state decides and the slot does not: a slot only knows the position the
//! server may discard WAL before, not whether a snapshot finished. A connector killed during
//! its snapshot finds its slot and, trusting it, would skip the rows it never read. The slot
//! is a floor: streaming starts at the stored position or the slot's confirmed one,
//! whichever is later (START_REPLICATION's rule), and the stored snapshot progress says
//! which tables, from which key, are still to be read.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::task::JoinHandle;
use tokio_postgres::{error::SqlState, Client};
use tracing::{debug, info, warn};

use super::{
    changes::Decoded,
    replication::{ReplicationStream, StreamError, StreamOptions},
    snapshot::{self, Chunk, ChunkTable, SnapshotError},
};
use crate::{
    change::{ChangeEvent, Operation, PgLsn, Position, SourceMessage},
    config::{PostgresConfig, Secret, SnapshotMode},
    observe::progress::Progress,
    offsets::{ConnectorState, SnapshotRequest, TableProgress},
    postgres::ConnectError,
    source::{
        chunk_changes, is_new_request, publish, refuse_foreign_state, Source, SourceError, SourceIo,
    },
};

/// A PostgreSQL database captured through one slot and one publication.
#[derive(Debug)]
pub struct PostgresSource {
    connector: String,
    url: Secret,
    slot: String,
    publication: String,
    mode: SnapshotMode,
    chunk_size: usize,
    heartbeat: Duration,
    /// The mapped tables, `(schema, table)`.
    tables: Vec<(String, String)>,
}

impl PostgresSource {
    pub fn new(connector: &str, config: &PostgresConfig, tables: Vec<(String, String)>) -> Self {
        Self {
            connector: connector.to_owned(),
            url: config.url.clone(),
            slot: config.slot_name(connector),
            publication: config.publication_name(connector),
            mode: config.snapshot_mode(),
            chunk_size: config.snapshot_chunk_size(),
            heartbeat: config.heartbeat_interval(),
            tables,
        }
    }
}

impl Source for PostgresSource {
    type Position = PgLsn;

    const KIND: &'static str = "postgres";

    fn position(position: &Position) -> Option<PgLsn> {
        match position {
            Position::Postgres(lsn) => Some(*lsn),
            Position::Mysql(_) | Position::SqlServer(_) => None,
        }
    }

    async fn run(
        self,
        stored: Option<ConnectorState>,
        io: SourceIo<PgLsn>,
    ) -> Result<(), SourceError> {
        let SourceIo {
            out,
            mut durable,
            state: published,
            shutdown,
        } = io;
        let admin = Arc::new(connect(&self.url).await?);
        setup::ensure_publication(&admin, &self.publication, &self.tables).await?;
        refuse_foreign_state(stored.as_ref(), Self::KIND, &self.connector)?;
        let captured = stored.as_ref().is_some_and(|s| s.position.is_some());
        let plan = start_plan(
            setup::slot_state(&admin, &self.slot).await?,
            captured,
            self.mode,
        )
        .map_err(|why| SourceError::Connector(format!("replication slot {}: {why}", self.slot)))?;
        let mut state = match (&plan, stored) {
            (Start::Resume | Start::Create, Some(stored)) => stored,
            _ => ConnectorState::new(Self::KIND),
        };
        if let Start::Anew { drop } = plan {
            warn!(slot = %self.slot, "the slot lost the WAL it needs or is gone: taking a new snapshot of every table (snapshot.mode = when_needed)");
            if drop {
                setup::drop_slot(&admin, &self.slot).await?;
            }
        }
        if plan != Start::Resume {
            setup::create_slot(&admin, &self.slot).await?;
        }
        let qualified: Vec<String> = self
            .tables
            .iter()
            .map(|(s, t)| format!("{s}.{t}"))
            .collect();
        if self.mode == SnapshotMode::Never {
            for table in &qualified {
                state.tables.entry(table.clone()).or_insert(TableProgress {
                    complete: true,
                    ..TableProgress::default()
                });
            }
        }
        let start = match &state.position {
            Some(text) => text.parse::<PgLsn>().map_err(|e| {
                SourceError::Connector(format!(
                    "the stored state's position: {e}; `fhir-cdc offsets reset` replaces it"
                ))
            })?,
            None => PgLsn(0),
        };
        let options = StreamOptions {
            connector: self.connector.clone(),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            start,
        };
        let mut stream = ReplicationStream::start(&self.url, &options)
            .await
            .map_err(stream_error)?;
        info!(slot = %self.slot, from = %start, "streaming");
        let (reader, database) = snapshot::connect(&self.url).await.map_err(snapshot_error)?;
        let mut snapshot = Snapshotter {
            client: Arc::new(reader),
            connector: self.connector.clone(),
            database,
            marker: format!("{}:{}", self.slot, std::process::id()),
            slot: self.slot.clone(),
            size: self.chunk_size,
            pending: state.unfinished(&qualified).into(),
            described: HashMap::new(),
            chunks: VecDeque::new(),
            sequence: 0,
            milestones: VecDeque::new(),
            dropped: Vec::new(),
            progress: Progress::new("snapshot"),
        };
        snapshot.describe_pending().await?;
        publish(&published, &state);
        let heartbeats = tokio::spawn(heartbeats(admin.clone(), self.heartbeat));

        let mut acknowledged = None;
        let result: Result<(), SourceError> = async {
            loop {
                if state.drop_requests(std::mem::take(&mut snapshot.dropped)) {
                    publish(&published, &state);
                }
                snapshot.start_next().await?;
                let next = tokio::select! {
                    biased;
                    // Shutdown first: stop reading, let the pipeline drain.
                    () = shutdown.cancelled() => break,
                    // Durable positions at once, also while the database is idle.
                    Ok(()) = durable.changed() => {
                        if let Some(lsn) = *durable.borrow_and_update() {
                            stream.acknowledge(lsn);
                            snapshot.durable(lsn, &mut state);
                            publish(&published, &state);
                            acknowledged = Some(lsn);
                        }
                        continue;
                    }
                    // A chunk's read failing stops the source now, not at its watermark.
                    read = snapshot.read(), if snapshot.reading() => {
                        read?;
                        continue;
                    }
                    next = stream.next() => next.map_err(stream_error)?,
                };
                let messages: Vec<SourceMessage> = match next {
                    // Only a stop request ends capture: a server that ends the replication
                    // stream is shutting down or restarting.
                    None => {
                        return Err(SourceError::Transient(
                            "the server ended the replication stream (a shutdown or restart)"
                                .into(),
                        ))
                    }
                    Some(Decoded::Changes(changes)) => changes
                        .into_iter()
                        .map(|change| {
                            snapshot.observe(&change);
                            SourceMessage::Change(change)
                        })
                        .collect(),
                    Some(
                        Decoded::Committed {
                            commit_lsn: lsn, ..
                        }
                        | Decoded::Heartbeat(lsn),
                    ) => {
                        vec![SourceMessage::Progress(Position::Postgres(lsn))]
                    }
                    Some(Decoded::Watermark { position, marker }) => {
                        snapshot.watermark(position, &marker).await?
                    }
                    Some(Decoded::Signal(content)) => {
                        snapshot.signal(&content, &qualified, &mut state).await?;
                        publish(&published, &state);
                        Vec::new()
                    }
                    Some(Decoded::Nothing) => Vec::new(),
                };
                for message in messages {
                    if out.send(message).await.is_err() {
                        // The pipeline stopped taking changes: it says why.
                        return Ok(());
                    }
                }
            }
            Ok(())
        }
        .await;
        snapshot.abort();
        heartbeats.abort();
        // The pipeline drains what is in flight once the channel closes; its last durable
        // positions still count.
        drop(out);
        while durable.changed().await.is_ok() {
            if let Some(lsn) = *durable.borrow_and_update() {
                stream.acknowledge(lsn);
                snapshot.durable(lsn, &mut state);
                acknowledged = Some(lsn);
            }
        }
        publish(&published, &state);
        if let Some(lsn) = acknowledged {
            setup::wait_for_flush(&admin, &self.slot, lsn).await;
        }
        stream.stop();
        result
    }
}

/// How a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The slot exists: stream from the stored position (or the slot's, when later).
    Resume,
    /// No slot, and capture never began: create it.
    Create,
    /// The changes since the stored position are gone: (drop and) create the slot and
    /// snapshot every table again.
    Anew { drop: bool },
}

/// The slot as the connector finds it at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Absent,
    Usable,
    /// It exists, but the server removed WAL it still needed (`wal_status = lost`).
    Lost,
}

/// Debezium's `snapshot.mode` rules, applied to the slot found and to whether the stored
/// state says capture had begun.
fn start_plan(slot: SlotState, captured: bool, mode: SnapshotMode) -> Result<Start, String> {
    const RESET: &str = "or run `fhir-cdc offsets reset --to snapshot` to start over";
    Ok(match (slot, captured, mode) {
        (SlotState::Usable, ..) => Start::Resume,
        (SlotState::Absent, false, _) => Start::Create,
        (SlotState::Absent, true, SnapshotMode::WhenNeeded) => Start::Anew { drop: false },
        (SlotState::Lost, _, SnapshotMode::WhenNeeded) => Start::Anew { drop: true },
        (SlotState::Absent, true, _) => {
            return Err(format!("the slot is gone, but the connector's stored state says capture had begun, so changes since its stored position are lost; set snapshot.mode = \"when_needed\" to snapshot again, {RESET}"))
        }
        (SlotState::Lost, ..) => {
            return Err(format!("the server removed WAL the slot still needs (wal_status = lost), so changes since its confirmed position are gone; set snapshot.mode = \"when_needed\" to drop it and take a new snapshot, {RESET}"))
        }
    })
}

/// Snapshot chunks in flight and done, between the stream's watermarks.
struct Snapshotter {
    client: Arc<Client>,
    connector: String,
    database: String,
    /// `<slot>:<process>`: marks this run's watermarks apart from other connectors' and
    /// from an earlier run's that the stream may deliver again.
    marker: String,
    /// Snapshot requests name the slot of the connector they are for.
    slot: String,
    size: usize,
    /// Snapshots to read, in order, each with its table and progress.
    pending: VecDeque<(String, TableProgress)>,
    /// The tables still to snapshot, by `schema.table`.
    described: HashMap<String, Described>,
    /// The chunks in flight, oldest first: at most two, the second read while the first
    /// waits for its high watermark in the stream (their windows never overlap: a chunk's
    /// low watermark is committed after the previous one's high watermark).
    chunks: VecDeque<Current>,
    sequence: u64,
    /// Requests whose condition the server refused, to be forgotten in the state.
    dropped: Vec<String>,
    /// Chunks emitted and not yet durable: their high watermark's position, their table,
    /// and its progress with them.
    milestones: VecDeque<(PgLsn, String, TableProgress)>,
    progress: Progress,
}

/// Keys remembered per table at most, as streamed whole; past that the table's snapshot
/// rows are all emitted (correct, with more repeats). ≈ 100 MiB for short keys.
const MAX_STREAMED_KEYS: usize = 1_000_000;

/// A table still to snapshot.
struct Described {
    table: Arc<ChunkTable>,
    /// The keys whose whole current row the stream has given since capture (re)started:
    /// their snapshot rows would repeat it (the stream has delivered every change before a
    /// chunk's low watermark, and the chunk drops rows changed after it). Only saves
    /// repeats: `None` once too many to remember.
    streamed: Option<HashSet<String>>,
}

/// A snapshot request as `fhir-cdc snapshot` writes it into the WAL.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Signal {
    /// The slot of the connector it is for (every slot sees every logical message).
    pub slot: String,
    #[serde(flatten)]
    pub request: SnapshotRequest,
}

/// Ask the connector reading `slot` for `request`: a transactional logical message that its
/// stream delivers in commit order, also to a connector that is stopped now, at its next
/// start (Debezium signals through a table; the WAL needs none).
pub async fn request_snapshot(
    url: &Secret,
    slot: &str,
    request: &SnapshotRequest,
) -> Result<(), SourceError> {
    let client = connect(url).await?;
    let signal = serde_json::to_string(&Signal {
        slot: slot.to_owned(),
        request: request.clone(),
    })
    .expect("a signal serialises");
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&snapshot::SIGNAL_PREFIX, &signal],
        )
        .await
        .map_err(|e| postgres_error("writing the snapshot request into the WAL", &e))?;
    Ok(())
}

/// Whether `filter` is a condition the server takes on `table` (`schema.table`): parsed and
/// planned alone, never run. The server's message goes to whoever wrote the condition.
pub async fn check_condition(url: &Secret, table: &str, filter: &str) -> Result<(), SourceError> {
    let client = connect(url).await?;
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    client
        .prepare(&format!(
            "SELECT * FROM {}.{} WHERE ({filter})",
            quote(schema),
            quote(name)
        ))
        .await
        .map_err(|e| SourceError::Connector(format!("--where: {}", super::error_text(&e))))?;
    Ok(())
}

/// The chunk being read.
struct Current {
    table: Arc<ChunkTable>,
    marker: String,
    task: Option<JoinHandle<Result<Chunk, SnapshotError>>>,
    chunk: Option<Chunk>,
    /// The low watermark passed: changes to the table now remove their rows from the chunk.
    open: bool,
    changed: HashSet<String>,
    any_change: bool,
}

impl Snapshotter {
    fn reading(&self) -> bool {
        self.chunks.iter().any(|c| c.task.is_some())
    }

    /// Read the layout and key of every table still to snapshot, before the stream starts,
    /// so that the stream's changes to them are recognised from the first on.
    async fn describe_pending(&mut self) -> Result<(), SourceError> {
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
    async fn signal(
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
    async fn start_next(&mut self) -> Result<(), SourceError> {
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
    async fn read(&mut self) -> Result<(), SourceError> {
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
    fn observe(&mut self, change: &ChangeEvent) {
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
    async fn watermark(
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
    fn durable(&mut self, lsn: PgLsn, state: &mut ConnectorState) {
        while self.milestones.front().is_some_and(|(at, ..)| *at <= lsn) {
            let (_, table, progress) = self.milestones.pop_front().expect("checked");
            state.record(table, progress);
        }
        state.position = Some(lsn.to_string());
    }

    fn abort(&mut self) {
        for task in self.chunks.drain(..).filter_map(|c| c.task) {
            task.abort();
        }
    }
}

/// Write a heartbeat into the WAL every `interval`: on an idle database, or one whose
/// traffic is on unmapped tables, it is what lets the acknowledged position advance.
async fn heartbeats(admin: Arc<Client>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Err(e) = ReplicationStream::emit_heartbeat(&admin).await {
            warn!(error = %e, "writing a heartbeat failed");
        }
    }
}

/// Whether a walsender is reading `slot` now (a connector runs).
pub async fn slot_active(url: &Secret, slot: &str) -> Result<bool, SourceError> {
    let client = connect(url).await?;
    let row = client
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| postgres_error("looking up the replication slot", &e))?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// The end of the WAL now.
pub async fn current_end(url: &Secret) -> Result<PgLsn, SourceError> {
    let client = connect(url).await?;
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| postgres_error("reading the current WAL position", &e))?
        .get(0);
    text.parse()
        .map_err(|e: String| SourceError::Connector(format!("the server's WAL position: {e}")))
}

async fn connect(url: &Secret) -> Result<Client, SourceError> {
    crate::postgres::connect(url).await.map_err(|e| match e {
        ConnectError::Setup(e) => SourceError::Connector(format!("source.url: {e}")),
        ConnectError::Postgres(e) => postgres_error("connecting to PostgreSQL", &e),
    })
}

/// Whether an error from the server or the network may pass by itself: the connection
/// (class 08), a server shutting down or starting (57P01-57P03), too many connections or
/// too little memory (class 53), a conflict with recovery (40001 on a standby).
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => {
            e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        }
        Some(code) => {
            let class = &code.code()[..2];
            class == "08"
                || class == "53"
                || [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(code)
        }
    }
}

/// `what` failed because of `e`: transient or not, with the server's message.
fn postgres_error(what: &str, e: &tokio_postgres::Error) -> SourceError {
    let message = format!("{what}: {}", super::error_text(e));
    if is_transient(e) {
        SourceError::Transient(message)
    } else {
        SourceError::Connector(message)
    }
}

pub(crate) fn snapshot_error(e: SnapshotError) -> SourceError {
    match e.postgres() {
        Some(pg) if is_transient(pg) => SourceError::Transient(format!("snapshot: {e}")),
        _ => SourceError::Connector(format!("snapshot: {e}")),
    }
}

fn stream_error(e: StreamError) -> SourceError {
    if e.is_transient() {
        SourceError::Transient(e.to_string())
    } else {
        SourceError::Connector(e.to_string())
    }
}

mod setup {
    //! The PostgreSQL objects the connector needs, created when absent, never dropped
    //! (except a slot that lost its WAL, under `snapshot.mode = when_needed`).

    use std::time::Duration;

    use tokio_postgres::Client;

    use super::{postgres_error, SlotState};
    use crate::{
        change::PgLsn,
        source::{postgres::preflight::identity, SourceError},
    };

    fn fail(what: &str) -> impl Fn(tokio_postgres::Error) -> SourceError + '_ {
        move |e| postgres_error(what, &e)
    }

    /// Create the publication of `tables`, or add the tables it lacks; refused for a table
    /// whose replica identity is none, as publishing it makes the application's UPDATEs
    /// and DELETEs on it fail.
    pub async fn ensure_publication(
        client: &Client,
        name: &str,
        tables: &[(String, String)],
    ) -> Result<(), SourceError> {
        let published: Option<Vec<String>> = client
            .query_opt(
                "SELECT coalesce((SELECT array_agg(schemaname || '.' || tablename) FROM pg_publication_tables WHERE pubname = $1), '{}')
                   FROM pg_publication WHERE pubname = $1",
                &[&name],
            )
            .await
            .map_err(fail("looking up the publication"))?
            .map(|row| row.get(0));
        let added: Vec<&(String, String)> = tables
            .iter()
            .filter(|(s, t)| {
                published
                    .as_ref()
                    .is_none_or(|p| !p.contains(&format!("{s}.{t}")))
            })
            .collect();
        if added.is_empty() {
            return Ok(());
        }
        let mut unsafe_tables = Vec::new();
        for (schema, table) in &added {
            let identity = identity(client, schema, table)
                .await
                .map_err(fail("reading the mapped tables' replica identity"))?;
            if identity.is_some_and(|i| i.breaks_updates()) {
                unsafe_tables.push(format!("{schema}.{table}"));
            }
        }
        if !unsafe_tables.is_empty() {
            return Err(SourceError::Connector(format!(
                "not publishing {}: without a replica identity (a primary key, or REPLICA IDENTITY FULL or USING INDEX) the application's UPDATEs and DELETEs on a published table fail; run ALTER TABLE … REPLICA IDENTITY FULL on it, or give it a primary key (`check` lists them)",
                unsafe_tables.join(", ")
            )));
        }
        let quoted = added
            .iter()
            .map(|(s, t)| format!("\"{s}\".\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let statement = match published {
            None => format!("CREATE PUBLICATION \"{name}\" FOR TABLE {quoted}"),
            Some(_) => format!("ALTER PUBLICATION \"{name}\" ADD TABLE {quoted}"),
        };
        client.batch_execute(&statement).await.map_err(fail(
            "creating or extending the publication (the role must own the mapped tables)",
        ))
    }

    pub async fn slot_state(client: &Client, slot: &str) -> Result<SlotState, SourceError> {
        let row = client
            .query_opt(
                "SELECT coalesce(wal_status = 'lost', false) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(fail("looking up the replication slot"))?;
        Ok(match row.map(|r| r.get::<_, bool>(0)) {
            None => SlotState::Absent,
            Some(false) => SlotState::Usable,
            Some(true) => SlotState::Lost,
        })
    }

    pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(fail("dropping the lost replication slot"))?;
        Ok(())
    }

    pub async fn create_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .map_err(fail("creating the replication slot"))?;
        Ok(())
    }

    /// Wait (a few seconds at most) until the server has recorded `lsn` as flushed.
    pub async fn wait_for_flush(client: &Client, slot: &str, lsn: PgLsn) {
        for _ in 0..50 {
            let flushed: Option<String> = client
                .query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
                .await
                .ok()
                .flatten()
                .and_then(|row| row.get(0));
            if flushed
                .and_then(|f| f.parse::<PgLsn>().ok())
                .is_some_and(|f| f >= lsn)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_state_and_the_slot_decide_the_start() {
        use SlotState::*;
        use SnapshotMode::*;
        for mode in [Initial, Never, WhenNeeded] {
            for captured in [false, true] {
                assert_eq!(start_plan(Usable, captured, mode), Ok(Start::Resume));
            }
            assert_eq!(start_plan(Absent, false, mode), Ok(Start::Create));
        }
        assert_eq!(
            start_plan(Absent, true, WhenNeeded),
            Ok(Start::Anew { drop: false })
        );
        assert_eq!(
            start_plan(Lost, true, WhenNeeded),
            Ok(Start::Anew { drop: true })
        );
        for mode in [Initial, Never] {
            for (slot, captured) in [(Absent, true), (Lost, false), (Lost, true)] {
                let refusal = start_plan(slot, captured, mode).unwrap_err();
                assert!(refusal.contains("when_needed"), "{refusal}");
                assert!(refusal.contains("offsets reset"), "{refusal}");
            }
        }
    }
}
