//! The MySQL/MariaDB source behind the [`Source`] seam: the start decided by the connector's
//! stored state, then the binary log with snapshot chunks emitted between transactions.
//!
//! The stored position is the end of the last transaction whose every event Kafka has, with
//! the GTID position that goes with it: a crash in the middle of a transaction replays all
//! of it (the same event ids), never half. On a server with GTIDs the connector resumes by
//! GTID, so it follows a failover to a replica that has the same transactions.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use mysql_async::{Conn, Pool};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{
    binlog::{BinlogReader, Decoded, ReaderOptions, StartAt},
    current_position,
    gtid::GtidPosition,
    purged_since, signal,
    snapshot::{self, Chunk, ChunkTable},
    MysqlError,
};
use crate::{
    change::{BinlogPosition, ChangeEvent, Operation, Position, SourceMessage},
    config::{MysqlConfig, Secret, SnapshotMode},
    observe::progress::Progress,
    offsets::{ConnectorState, TableProgress},
    source::{
        chunk_changes, is_new_request, publish, refuse_foreign_state, Source, SourceError, SourceIo,
    },
};

/// A MySQL or MariaDB server's binary log, read as a replica.
#[derive(Debug)]
pub struct MysqlSource {
    connector: String,
    url: Secret,
    server_id: u32,
    mode: SnapshotMode,
    chunk_size: usize,
    heartbeat: Duration,
    /// The mapped tables, `(database, table)`.
    tables: Vec<(String, String)>,
    /// The signal table (`signal.data.collection`), `(database, table)`.
    signal: Option<(String, String)>,
}

impl MysqlSource {
    pub fn new(connector: &str, config: &MysqlConfig, tables: Vec<(String, String)>) -> Self {
        Self {
            connector: connector.to_owned(),
            url: config.url.clone(),
            server_id: config.server_id(connector),
            mode: config.snapshot_mode(),
            chunk_size: config.snapshot_chunk_size(),
            heartbeat: config.heartbeat_interval(),
            tables,
            signal: config
                .signal_table()
                .and_then(|s| s.split_once('.'))
                .map(|(database, table)| (database.to_owned(), table.to_owned())),
        }
    }
}

/// The stored position: `file:offset`, then ` gtid=<position>` when the server has GTIDs.
pub fn position_text(position: &BinlogPosition, gtid: Option<&GtidPosition>) -> String {
    match gtid.filter(|g| !g.is_empty()) {
        Some(gtid) => format!("{position} gtid={gtid}"),
        None => position.to_string(),
    }
}

/// The inverse of [`position_text`].
pub fn parse_position(text: &str) -> Result<(BinlogPosition, Option<GtidPosition>), String> {
    let (position, gtid) = match text.split_once(" gtid=") {
        Some((position, gtid)) => (position, Some(gtid.parse()?)),
        None => (text, None),
    };
    Ok((position.parse()?, gtid))
}

impl Source for MysqlSource {
    type Position = BinlogPosition;

    const KIND: &'static str = "mysql";

    fn position(position: &Position) -> Option<BinlogPosition> {
        match position {
            Position::Mysql(pos) => Some(pos.clone()),
            Position::Postgres(_) => None,
        }
    }

    async fn run(
        self,
        stored: Option<ConnectorState>,
        io: SourceIo<BinlogPosition>,
    ) -> Result<(), SourceError> {
        let SourceIo {
            out,
            mut durable,
            state: published,
            shutdown,
        } = io;
        let (opts, _) = super::tls::opts(&self.url)
            .map_err(|e| SourceError::Connector(format!("source.url: {e}")))?;
        refuse_foreign_state(stored.as_ref(), Self::KIND, &self.connector)?;
        let mut admin = Conn::new(opts.clone()).await.map_err(MysqlError::connect)?;
        let mut state = stored
            .filter(|s| s.position.is_some())
            .unwrap_or_else(|| ConnectorState::new(Self::KIND));
        let mut start = match &state.position {
            Some(text) => Some(parse_position(text).map_err(|e| {
                SourceError::Connector(format!(
                    "the stored state's position: {e}; `fhir-cdc offsets reset` replaces it"
                ))
            })?),
            None => None,
        };
        let qualified: Vec<String> = self
            .tables
            .iter()
            .map(|(d, t)| format!("{d}.{t}"))
            .collect();
        let options = ReaderOptions {
            connector: self.connector.clone(),
            server_id: self.server_id,
            heartbeat: self.heartbeat,
            // The signal table's rows are decoded with the mapped tables'.
            tables: self
                .tables
                .iter()
                .cloned()
                .chain(self.signal.clone())
                .collect(),
        };
        // Open the log where the state says; a log the server purged is when_needed's case.
        let (reader, mut durable_gtid, first) = loop {
            let (position, gtid) = match start.take() {
                Some(stored) => stored,
                None => current_position(&mut admin).await?,
            };
            let at = match &gtid {
                Some(gtid) if !gtid.is_empty() => StartAt::Gtid(gtid.clone()),
                _ => StartAt::File(position.clone()),
            };
            let opened = match purged_since(&mut admin, &position, gtid.as_ref()).await? {
                Some(why) => Err(MysqlError::LogGone(why)),
                None => match BinlogReader::open(&opts, &options, &at).await {
                    Ok(mut reader) => reader.next().await.map(|first| (reader, first)),
                    Err(e) => Err(e),
                },
            };
            match opened {
                Err(MysqlError::LogGone(why)) if state.position.is_some() => {
                    if self.mode != SnapshotMode::WhenNeeded {
                        return Err(SourceError::Connector(format!(
                            "the server no longer has the binary log from the connector's stored position {position} ({why}): changes since are lost; set snapshot.mode = \"when_needed\" to take a new snapshot, or run `fhir-cdc offsets reset --to snapshot` to start over"
                        )));
                    }
                    warn!(connector = %self.connector, "the server purged the binary log from the stored position: taking a new snapshot of every table (snapshot.mode = when_needed)");
                    state = ConnectorState::new(Self::KIND);
                }
                Err(e) => return Err(e.into()),
                Ok((reader, first)) => {
                    info!(from = %position_text(&position, gtid.as_ref()), "streaming");
                    break (reader, gtid, first);
                }
            }
        };
        if self.mode == SnapshotMode::Never {
            for table in &qualified {
                state.tables.entry(table.clone()).or_insert(TableProgress {
                    complete: true,
                    ..TableProgress::default()
                });
            }
        }
        let pool = snapshot::pool(&opts);
        let mut snapshot = Snapshotter {
            pool: pool.clone(),
            connector: self.connector.clone(),
            size: self.chunk_size,
            pending: state.unfinished(&qualified).into(),
            described: HashMap::new(),
            chunks: VecDeque::new(),
            milestones: VecDeque::new(),
            dropped: Vec::new(),
            progress: Progress::new("snapshot"),
        };
        for (name, _) in snapshot.pending.clone() {
            snapshot.describe(&mut admin, &name).await?;
        }
        if !snapshot.pending.is_empty() {
            info!(
                tables = snapshot.pending.len(),
                "snapshotting in chunks alongside the stream"
            );
        }
        drop(admin);
        publish(&published, &state);
        // Where the stream stands after the last read.
        let (mut in_transaction, mut located, mut at) = (
            reader.in_transaction(),
            reader.located(),
            reader.position().clone(),
        );
        let mut reading = reader.spawn();

        // Resume points not yet durable, oldest first, with the GTID of the transaction that
        // ends there.
        let mut commits: VecDeque<(BinlogPosition, Option<super::gtid::Gtid>)> = VecDeque::new();
        let mut last_emitted: Option<BinlogPosition> = None;
        let mut next = Some(first);
        let result: Result<(), SourceError> = async {
            loop {
                let decoded = match next.take() {
                    Some(decoded) => decoded,
                    None => {
                        if state.drop_requests(std::mem::take(&mut snapshot.dropped)) {
                            publish(&published, &state);
                        }
                        snapshot.start_next().await;
                        tokio::select! {
                            biased;
                            () = shutdown.cancelled() => break,
                            Ok(()) = durable.changed() => {
                                if let Some(at) = durable.borrow_and_update().clone() {
                                    snapshot.durable(&at, &mut state);
                                    settle(&mut commits, &at, &mut durable_gtid, &mut state);
                                    publish(&published, &state);
                                }
                                continue;
                            }
                            read = snapshot.read(), if snapshot.reading() => {
                                read?;
                                Some(Decoded::Nothing)
                            }
                            read = reading.recv() => {
                                let read = read?;
                                (in_transaction, located, at) = (read.in_transaction, read.located, read.position);
                                read.decoded
                            }
                        }
                    }
                };
                let mut messages: Vec<SourceMessage> = match decoded {
                    None => break,
                    // A rows event's changes, then its end: nothing more comes at or before
                    // it (only the transaction's end is stored as a place to resume from).
                    Some(Decoded::Changes(changes)) => {
                        let end = changes
                            .last()
                            .map(|c| SourceMessage::Progress(c.position.clone()));
                        let mut messages = Vec::with_capacity(changes.len() + 1);
                        for change in changes {
                            let signal = self.signal.as_ref().is_some_and(|(d, t)| {
                                *change.source.schema == **d && *change.source.table == **t
                            });
                            if !signal {
                                snapshot.observe(&change);
                                messages.push(SourceMessage::Change(change));
                            } else if change.op == Operation::Insert {
                                snapshot.signal(&change, &qualified, &mut state).await?;
                                publish(&published, &state);
                            }
                        }
                        messages.extend(end);
                        messages
                    }
                    Some(Decoded::Committed { position, gtid }) => {
                        commits.push_back((position.clone(), gtid));
                        vec![SourceMessage::Progress(Position::Mysql(position))]
                    }
                    Some(Decoded::Idle(position)) => {
                        commits.push_back((position.clone(), None));
                        vec![SourceMessage::Progress(Position::Mysql(position))]
                    }
                    Some(Decoded::Nothing) => Vec::new(),
                };
                // Between transactions, a chunk the stream has caught up with goes out.
                if !in_transaction && located {
                    if let Some(chunk) = snapshot.ready(&at) {
                        let step = match &last_emitted {
                            Some(last)
                                if last.file_sequence == at.file_sequence
                                    && last.offset == at.offset =>
                            {
                                last.step + 1
                            }
                            _ => 1,
                        };
                        let position = BinlogPosition { step, ..at.clone() };
                        last_emitted = Some(position.clone());
                        messages.extend(snapshot.emit(chunk, &position));
                        commits.push_back((position.clone(), None));
                        messages.push(SourceMessage::Progress(Position::Mysql(position)));
                    }
                }
                for message in messages {
                    if out.send(message).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        }
        .await;
        snapshot.abort();
        reading.close().await;
        drop(out);
        while durable.changed().await.is_ok() {
            if let Some(at) = durable.borrow_and_update().clone() {
                snapshot.durable(&at, &mut state);
                settle(&mut commits, &at, &mut durable_gtid, &mut state);
            }
        }
        publish(&published, &state);
        let _ = pool.disconnect().await;
        result
    }
}

/// Everything up to `at` is durable: the last resume point up to it becomes the stored
/// position, with the GTIDs of the transactions up to it.
fn settle(
    commits: &mut VecDeque<(BinlogPosition, Option<super::gtid::Gtid>)>,
    at: &BinlogPosition,
    gtid: &mut Option<GtidPosition>,
    state: &mut ConnectorState,
) {
    let mut last = None;
    while commits.front().is_some_and(|(p, _)| p <= at) {
        let (position, id) = commits.pop_front().expect("checked");
        if let Some(id) = id {
            match gtid {
                Some(g) => g.apply(id),
                None => {
                    let mut g = GtidPosition::Mariadb(Default::default());
                    g.apply(id);
                    *gtid = Some(g);
                }
            }
        }
        last = Some(position);
    }
    if let Some(position) = last {
        state.position = Some(position_text(&position, gtid.as_ref()));
    }
}

/// Snapshot chunks in flight and done.
struct Snapshotter {
    pool: Pool,
    connector: String,
    size: usize,
    pending: VecDeque<(String, TableProgress)>,
    described: HashMap<String, Arc<ChunkTable>>,
    /// At most two: the second read while the first waits for the stream.
    chunks: VecDeque<Current>,
    /// Chunks emitted and not yet durable: their position, table and progress.
    milestones: VecDeque<(BinlogPosition, String, TableProgress)>,
    /// Requests whose condition the server refused, to be forgotten in the state.
    dropped: Vec<String>,
    progress: Progress,
}

struct Current {
    table: Arc<ChunkTable>,
    task: Option<JoinHandle<Result<Chunk, MysqlError>>>,
    chunk: Option<Chunk>,
    /// The keys the stream changed since the read began, with the last change's position.
    touched: HashMap<String, BinlogPosition>,
    /// Any change to the table since the read began (for tables without a key).
    any_change: Option<BinlogPosition>,
}

impl Snapshotter {
    async fn describe(&mut self, conn: &mut Conn, name: &str) -> Result<(), MysqlError> {
        if self.described.contains_key(name) {
            return Ok(());
        }
        let (database, table) = name.split_once('.').expect("tables are database.table");
        let described = ChunkTable::describe(conn, &self.connector, database, table).await?;
        if described.key.is_empty() {
            warn!(table = %name, "the table has no primary key: its snapshot is read as one chunk");
        }
        self.described.insert(name.to_owned(), Arc::new(described));
        Ok(())
    }

    /// A row inserted into the signal table: the snapshots it asks for are queued after
    /// the ones in progress and recorded in the state, so that a restart still reads them.
    /// A signal that cannot be followed is logged (why, never its values) and skipped.
    async fn signal(
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
            let mut conn = self.pool.get_conn().await.map_err(MysqlError::connect)?;
            self.describe(&mut conn, &request.table).await?;
            self.pending
                .push_back((request.table.clone(), request.progress()));
            state.requests.push(request);
        }
        Ok(())
    }

    fn reading(&self) -> bool {
        self.chunks.iter().any(|c| c.task.is_some())
    }

    /// Start the next chunk's read: the first of the next table when none is in flight, or
    /// the one after a chunk whose read is done.
    async fn start_next(&mut self) {
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
        if after.is_none() && self.chunks.is_empty() {
            self.progress
                .start(&name, snapshot::estimated_rows(&self.pool, &table).await);
        }
        let (pool, reading, size) = (self.pool.clone(), table.clone(), self.size);
        let task = tokio::spawn(async move {
            snapshot::read_chunk(&pool, &reading, after.as_deref(), filter.as_deref(), size).await
        });
        self.chunks.push_back(Current {
            table,
            task: Some(task),
            chunk: None,
            touched: HashMap::new(),
            any_change: None,
        });
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
            // there) is dropped, not retried for ever: only the request fails. The server's
            // message may quote the condition: it is not logged.
            (Err(MysqlError::Definite(_)), Some(request)) => {
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
    fn observe(&mut self, change: &ChangeEvent) {
        if self.chunks.is_empty() {
            return;
        }
        let Position::Mysql(position) = &change.position else {
            return;
        };
        for current in &mut self.chunks {
            if change.source.schema != current.table.source.schema
                || change.source.table != current.table.source.table
            {
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
    fn ready(&mut self, at: &BinlogPosition) -> Option<Current> {
        let front = self.chunks.front()?;
        let chunk = front.chunk.as_ref()?;
        if *at < chunk.high {
            return None;
        }
        self.chunks.pop_front()
    }

    /// The chunk's rows that no later change touched, as snapshot reads at `position`.
    fn emit(&mut self, current: Current, position: &BinlogPosition) -> Vec<SourceMessage> {
        let chunk = current.chunk.expect("a ready chunk is read");
        let name = current.table.name.clone();
        let low = chunk.low.clone();
        let changed_after_low = |p: &BinlogPosition| *p > low;
        if current.table.key.is_empty()
            && current.any_change.as_ref().is_some_and(changed_after_low)
        {
            debug!(table = %name, "the table changed while it was read: reading it again");
            return Vec::new();
        }
        let read = chunk.rows.len();
        let table = &current.table;
        let rows = chunk.rows.into_iter().filter(|row| {
            current.touched.is_empty()
                || table
                    .key_of(row)
                    .is_none_or(|key| !current.touched.get(&key).is_some_and(changed_after_low))
        });
        let messages: Vec<SourceMessage> = chunk_changes(
            &table.source,
            &table.key,
            rows,
            &Position::Mysql(position.clone()),
        )
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
        self.milestones
            .push_back((position.clone(), name, progress));
        messages
    }

    /// Everything up to `at` is durable: so are the chunks emitted up to it.
    fn durable(&mut self, at: &BinlogPosition, state: &mut ConnectorState) {
        while self.milestones.front().is_some_and(|(p, ..)| p <= at) {
            let (_, table, progress) = self.milestones.pop_front().expect("checked");
            state.record(table, progress);
        }
    }

    fn abort(&mut self) {
        for task in self.chunks.drain(..).filter_map(|c| c.task) {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_position_carries_the_gtids() {
        let position = BinlogPosition::new("mariadb-bin.000003", 4567).unwrap();
        let gtid: GtidPosition = "0-1-42".parse().unwrap();
        let text = position_text(&position, Some(&gtid));
        assert_eq!(text, "mariadb-bin.000003:4567 gtid=0-1-42");
        assert_eq!(
            parse_position(&text).unwrap(),
            (position.clone(), Some(gtid))
        );
        assert_eq!(
            parse_position("mariadb-bin.000003:4567").unwrap(),
            (position, None)
        );
        assert!(parse_position("nonsense").is_err());
    }

    #[test]
    fn settling_stores_the_last_resume_point_up_to_the_durable_position() {
        let at = |offset| BinlogPosition::new("b.000001", offset).unwrap();
        let gtid = |sequence| {
            Some(super::super::gtid::Gtid::Mariadb {
                domain: 0,
                server: 1,
                sequence,
            })
        };
        let mut commits: VecDeque<_> =
            [(at(100), gtid(7)), (at(200), gtid(8)), (at(300), gtid(9))].into();
        let mut position = Some("0-1-6".parse().unwrap());
        let mut state = ConnectorState::new("mysql");
        // In the middle of the third transaction: the second's end is stored.
        settle(&mut commits, &at(250), &mut position, &mut state);
        assert_eq!(state.position.as_deref(), Some("b.000001:200 gtid=0-1-8"));
        assert_eq!(commits.len(), 1);
    }
}
