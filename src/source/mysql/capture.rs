//! The MySQL/MariaDB source behind the [`Source`] seam: the start decided by the connector's
//! stored state, then the binary log with snapshot chunks emitted between transactions.
//!
//! The stored position is the end of the last transaction whose every event Kafka has, with
//! the GTID position that goes with it: a crash in the middle of a transaction replays all
//! of it (the same event ids), never half. On a server with GTIDs the connector resumes by
//! GTID, so it follows a failover to a replica that has the same transactions.

use std::{collections::VecDeque, time::Duration};

use mysql_async::{Conn, Opts};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    binlog::{BinlogReader, Decoded, ReaderOptions, StartAt},
    current_position,
    gtid::GtidPosition,
    purged_since, snapshot, MysqlError,
};
use crate::{
    change::{BinlogPosition, ChangeEvent, Operation, Position, SourceMessage},
    config::{MysqlConfig, Secret, SnapshotMode},
    offsets::ConnectorState,
    source::{chunks::Snapshotter, publish, refuse_foreign_state, Source, SourceError, SourceIo},
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

/// What a stored position whose binary log the server purged means, and the two ways on
/// (said by `run`, which refuses to start from it, and by `check`).
pub fn log_gone(position: &BinlogPosition, why: &str) -> (String, &'static str) {
    (
        format!("the server no longer has the binary log from the connector's stored position {position} ({why}): changes since are lost"),
        "set snapshot.mode = \"when_needed\" to take a new snapshot, or run `fhir-cdc offsets reset --to snapshot` to start over",
    )
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
            Position::Postgres(_) | Position::SqlServer(_) => None,
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
        let start = match &state.position {
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
        let options = self.reader_options();
        let (reader, mut durable_gtid, first) = self
            .open_log(&mut admin, &opts, &options, start, &mut state)
            .await?;
        if self.mode == SnapshotMode::Never {
            state.skip_snapshots(&qualified);
        }
        let pool = snapshot::pool(&opts);
        let chunks = snapshot::Reader {
            pool: pool.clone(),
            connector: self.connector.clone(),
        };
        let mut snapshot =
            Snapshotter::new(chunks, self.chunk_size, state.unfinished(&qualified).into()).await?;
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
                    // Only a stop request ends capture; a server that ends the stream is
                    // shutting down, restarting or failing over, and the connector waits
                    // for it and resumes from the stored state.
                    None => {
                        return Err(SourceError::Transient(format!(
                            "the server ended the binary log stream at {at} (a shutdown, restart or failover)"
                        )))
                    }
                    // A rows event's changes, then its end: nothing more comes at or before
                    // it (only the transaction's end is stored as a place to resume from).
                    Some(Decoded::Changes(changes)) => {
                        self.changes_out(changes, &mut snapshot, &qualified, &mut state, &published)
                            .await?
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
                    if let Some(position) = ready_chunk(&mut snapshot, &at, &mut last_emitted, &mut messages) {
                        commits.push_back((position, None));
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

impl MysqlSource {
    /// A rows event's changes, then its end (nothing more comes at or before it; only the
    /// transaction's end is stored as a place to resume from). A row of the signal table is
    /// a snapshot request, taken at once, not a change.
    async fn changes_out(
        &self,
        changes: Vec<ChangeEvent>,
        snapshot: &mut Snapshotter<snapshot::Reader>,
        qualified: &[String],
        state: &mut ConnectorState,
        published: &watch::Sender<ConnectorState>,
    ) -> Result<Vec<SourceMessage>, SourceError> {
        let end = changes
            .last()
            .map(|c| SourceMessage::Progress(c.position.clone()));
        let mut messages = Vec::with_capacity(changes.len() + 1);
        for change in changes {
            let signal = self
                .signal
                .as_ref()
                .is_some_and(|(d, t)| *change.source.schema == **d && *change.source.table == **t);
            if !signal {
                snapshot.observe(&change);
                messages.push(SourceMessage::Change(change));
            } else if change.op == Operation::Insert {
                snapshot.signal(&change, qualified, state).await?;
                publish(published, state);
            }
        }
        messages.extend(end);
        Ok(messages)
    }

    /// What the binary log reader reads: the mapped tables and the signal table.
    fn reader_options(&self) -> ReaderOptions {
        ReaderOptions {
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
        }
    }

    /// Open the binary log where the stored state says (at the server's current end when it
    /// says nothing), with its first event; a log the server purged is `when_needed`'s case
    /// (`state` starts over), and otherwise a refusal naming the fixes.
    async fn open_log(
        &self,
        admin: &mut Conn,
        opts: &Opts,
        options: &ReaderOptions,
        mut start: Option<(BinlogPosition, Option<GtidPosition>)>,
        state: &mut ConnectorState,
    ) -> Result<(BinlogReader, Option<GtidPosition>, Option<Decoded>), SourceError> {
        loop {
            let (position, gtid) = match start.take() {
                Some(stored) => stored,
                None => current_position(admin).await?,
            };
            let at = match &gtid {
                Some(gtid) if !gtid.is_empty() => StartAt::Gtid(gtid.clone()),
                _ => StartAt::File(position.clone()),
            };
            let opened = match purged_since(admin, &position, gtid.as_ref()).await? {
                Some(why) => Err(MysqlError::LogGone(why)),
                None => match BinlogReader::open(opts, options, &at).await {
                    Ok(mut reader) => reader.next().await.map(|first| (reader, first)),
                    Err(e) => Err(e),
                },
            };
            match opened {
                Err(MysqlError::LogGone(why)) if state.position.is_some() => {
                    if self.mode != SnapshotMode::WhenNeeded {
                        let (lost, fix) = log_gone(&position, &why);
                        return Err(SourceError::Connector(format!("{lost}; {fix}")));
                    }
                    warn!(connector = %self.connector, "the server purged the binary log from the stored position: taking a new snapshot of every table (snapshot.mode = when_needed)");
                    *state = ConnectorState::new(Self::KIND);
                }
                Err(e) => return Err(e.into()),
                Ok((reader, first)) => {
                    info!(from = %position_text(&position, gtid.as_ref()), "streaming");
                    return Ok((reader, gtid, first));
                }
            }
        }
    }
}

/// The chunk the stream has caught up with at `at`, if one has: its events and its end
/// into `messages`, at a position of its own after `at` (`step` counts the chunks emitted at
/// one place of the log). Returns that position, a place to resume from.
fn ready_chunk(
    snapshot: &mut Snapshotter<snapshot::Reader>,
    at: &BinlogPosition,
    last_emitted: &mut Option<BinlogPosition>,
    messages: &mut Vec<SourceMessage>,
) -> Option<BinlogPosition> {
    let chunk = snapshot.ready(at)?;
    let step = match last_emitted.as_ref() {
        Some(last) if last.file_sequence == at.file_sequence && last.offset == at.offset => {
            last.step + 1
        }
        _ => 1,
    };
    let position = BinlogPosition { step, ..at.clone() };
    *last_emitted = Some(position.clone());
    messages.extend(snapshot.emit(chunk, &position, &Position::Mysql(position.clone())));
    messages.push(SourceMessage::Progress(Position::Mysql(position.clone())));
    Some(position)
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
