//! The binary log as changes: a replica's binlog stream (`mysql_async`), its table-map
//! events turned into table layouts once per layout, and rows events decoded against them.
//!
//! Column names, types, signedness, character sets and ENUM/SET labels come from the
//! table-map events' metadata (`binlog_row_metadata = FULL`): no DDL is parsed and no schema
//! history is kept, and an event written before a schema change decodes with the layout it
//! was written with. The catalog adds one fact the log lacks: which of MariaDB's text columns
//! hold JSON.
//!
//! A change's position is the end of its rows event, so versions order like the log. The
//! transaction's end comes as [`Decoded::Committed`]: only those positions (and heartbeats
//! between transactions) are places to resume from.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use chrono::DateTime;
use futures_util::{FutureExt, StreamExt};
use mysql_async::{
    binlog::{
        events::{EventData, TableMapEvent},
        BinlogVersion,
    },
    prelude::Queryable,
    BinlogStream, BinlogStreamRequest, Conn, Opts,
};
use mysql_common::binlog::EventStreamReader;
use tracing::warn;

use super::{
    error_text,
    gtid::{Gtid, GtidPosition},
    rows::{layout, rows, Layout, Place},
    MysqlError,
};
use crate::change::{BinlogPosition, ChangeEvent};

/// MariaDB's event types (not MySQL's, so `mysql_common` does not know them).
mod mariadb {
    pub const GTID: u8 = 162;
    /// 165–171: compressed query and rows events (`log_bin_compress = ON`).
    pub const COMPRESSED: std::ops::RangeInclusive<u8> = 165..=171;
}

/// Where the stream starts.
#[derive(Debug, Clone)]
pub enum StartAt {
    /// A file and offset on this server.
    File(BinlogPosition),
    /// The transactions applied (any server with them: a promoted replica too).
    Gtid(GtidPosition),
}

/// What the stream gave.
#[derive(Debug)]
pub enum Decoded {
    Changes(Vec<ChangeEvent>),
    /// A transaction ended at `position`; `gtid` is its id, when the server has them.
    Committed {
        position: BinlogPosition,
        gtid: Option<Gtid>,
    },
    /// Between transactions at `position` (the server's heartbeat, or a new log file).
    Idle(BinlogPosition),
    Nothing,
}

/// What the reader's task read, and where the reader stood after it.
#[derive(Debug)]
pub struct Read {
    /// `None` when the server ended the stream.
    pub decoded: Option<Decoded>,
    /// Whether the event left a transaction open.
    pub in_transaction: bool,
    /// Whether `position` is a real one yet (a start by GTID learns it from the stream).
    pub located: bool,
    pub position: BinlogPosition,
}

/// A [`BinlogReader`] reading on its own task ([`BinlogReader::spawn`]).
#[derive(Debug)]
pub struct Reading {
    receiver: tokio::sync::mpsc::Receiver<Result<Read, MysqlError>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Reading {
    /// The next read, in the log's order; safe to drop at any point.
    pub async fn recv(&mut self) -> Result<Read, MysqlError> {
        self.receiver.recv().await.unwrap_or_else(|| {
            Err(MysqlError::Transient(
                "the binary log reader stopped".into(),
            ))
        })
    }

    /// Stop reading and end the server's side of it.
    pub async fn close(self) {
        self.stop.cancel();
        drop(self.receiver);
        let _ = self.task.await;
    }
}

/// A table id's table map: its bytes (a new map with the same bytes is the same layout) and
/// the layout when the table is mapped.
#[derive(Debug)]
struct TableMap {
    bytes: Vec<u8>,
    layout: Option<Arc<Layout>>,
}

/// The binary log of one server, read as a replica.
pub struct BinlogReader {
    stream: BinlogStream,
    /// The server's id of the connection `stream` reads (its dump thread).
    dump_thread: u32,
    /// For the facts the log lacks (collation names, JSON columns).
    catalog: Conn,
    connector: Arc<str>,
    /// The mapped tables, `(database, table)`.
    tables: HashSet<(String, String)>,
    /// Collation id → character set name.
    collations: HashMap<u16, String>,
    maps: HashMap<u64, TableMap>,
    /// JSON columns by `(database, table)`, as the catalog last said.
    json_columns: HashMap<(String, String), HashSet<String>>,
    position: BinlogPosition,
    /// Whether `position` names a real file (a start by GTID learns it from the stream).
    located: bool,
    in_transaction: bool,
    gtid: Option<Gtid>,
    /// The transaction's id as text, for its changes.
    transaction: Option<String>,
    ordinal: u32,
}

impl std::fmt::Debug for BinlogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BinlogReader")
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

/// How to read.
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    pub connector: String,
    /// The replica id this reader registers with (unique among the server's replicas).
    pub server_id: u32,
    /// The server sends a heartbeat when it has had nothing to send for this long.
    pub heartbeat: Duration,
    pub tables: HashSet<(String, String)>,
}

impl BinlogReader {
    /// Register as a replica of the server at `opts` and request its log from `start`.
    pub async fn open(
        opts: &Opts,
        options: &ReaderOptions,
        start: &StartAt,
    ) -> Result<Self, MysqlError> {
        let mut catalog = Conn::new(opts.clone()).await.map_err(MysqlError::connect)?;
        // Held as long as the reader reads.
        super::take_running_lock(&mut catalog, &options.connector).await?;
        let collations = catalog
            .query::<(u16, String), _>(
                "SELECT ID, CHARACTER_SET_NAME FROM information_schema.COLLATIONS WHERE ID IS NOT NULL",
            )
            .await
            .map_err(MysqlError::query("reading the server's collations"))?
            .into_iter()
            .collect();
        let mut conn = Conn::new(opts.clone()).await.map_err(MysqlError::connect)?;
        let fail = MysqlError::query("preparing the binlog request");
        // MariaDB sends its GTID events only to a replica that says it understands them
        // (otherwise a `BEGIN` in their place); MySQL ignores the variable.
        conn.query_drop("SET @mariadb_slave_capability = 4")
            .await
            .map_err(&fail)?;
        let nanos = options
            .heartbeat
            .as_nanos()
            .clamp(1_000_000, 4_294_967_000_000_000);
        conn.query_drop(format!("SET @master_heartbeat_period = {nanos}"))
            .await
            .map_err(&fail)?;
        let request = BinlogStreamRequest::new(options.server_id);
        let (name, sids);
        let (request, position) = match start {
            StartAt::File(position) => {
                name = position.file_name();
                (
                    request
                        .with_filename(name.as_bytes())
                        .with_pos(position.offset),
                    position.clone(),
                )
            }
            StartAt::Gtid(GtidPosition::Mariadb(_)) => {
                let state = start_gtid_text(start);
                conn.query_drop(format!("SET @slave_connect_state = '{state}'"))
                    .await
                    .map_err(&fail)?;
                conn.query_drop("SET @slave_gtid_strict_mode = 1")
                    .await
                    .map_err(&fail)?;
                (
                    request.with_pos(4),
                    BinlogPosition::new("unknown.000000", 4).expect("valid"),
                )
            }
            StartAt::Gtid(set @ GtidPosition::Mysql(_)) => {
                sids = set
                    .to_string()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse::<mysql_common::packets::Sid<'static>>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| MysqlError::Definite(format!("the stored GTID set: {e}")))?;
                (
                    request.with_gtid().with_gtid_set(sids.clone()),
                    BinlogPosition::new("unknown.000000", 4).expect("valid"),
                )
            }
        };
        let dump_thread = conn.id();
        let stream = conn
            .get_binlog_stream(request)
            .await
            .map_err(MysqlError::query("requesting the binary log"))?;
        Ok(Self {
            stream,
            dump_thread,
            catalog,
            connector: options.connector.as_str().into(),
            tables: options.tables.clone(),
            collations,
            maps: HashMap::new(),
            json_columns: HashMap::new(),
            located: matches!(start, StartAt::File(_)),
            position,
            in_transaction: false,
            gtid: None,
            transaction: None,
            ordinal: 0,
        })
    }

    /// Stop reading. The server's dump thread notices a closed connection only when it
    /// next writes to it (the next event or heartbeat), and until then it is listed as a
    /// replica: it is killed, which a user may do to its own connections. Closing the
    /// catalog's connection releases the connector's lock.
    async fn close(mut self) {
        let kill = format!("KILL CONNECTION {}", self.dump_thread);
        match self.catalog.query_drop(kill).await {
            Ok(()) => {}
            // The server went away or is shutting down: its dump thread goes with it.
            Err(
                mysql_async::Error::Io(_)
                | mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed),
            ) => {}
            Err(mysql_async::Error::Server(e)) if e.code == 1053 => {}
            Err(e) => warn!(
                connector = %self.connector,
                error = %error_text(&e),
                "could not end the server's binary log thread; it ends when the server next writes to it"
            ),
        }
        let _ = self.catalog.disconnect().await;
    }

    /// Read on a task of its own from now on. [`Self::next`] may await the catalog after
    /// taking an event from the stream, so a `select!` that dropped it midway would lose
    /// that event, and leave the catalog's connection in the middle of a reply; a channel's
    /// `recv` can be dropped at any point.
    pub fn spawn(mut self) -> Reading {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    biased;
                    () = stopped.cancelled() => break,
                    next = self.next() => next,
                };
                let last = !matches!(next, Ok(Some(_)));
                let read = next.map(|decoded| Read {
                    decoded,
                    in_transaction: self.in_transaction,
                    located: self.located,
                    position: self.position.clone(),
                });
                if sender.send(read).await.is_err() || last {
                    break;
                }
            }
            self.close().await;
        });
        Reading {
            receiver,
            stop,
            task,
        }
    }

    /// The position after the last event read.
    pub fn position(&self) -> &BinlogPosition {
        &self.position
    }

    /// Whether [`Self::position`] is a real one yet.
    pub fn located(&self) -> bool {
        self.located
    }

    /// Whether the last event read left a transaction open.
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// The next thing the log says; `None` when the server ends the stream.
    pub async fn next(&mut self) -> Result<Option<Decoded>, MysqlError> {
        // mysql_common's parsers panic on some malformed events (a count past the bytes, a
        // length that underflows): such an event is an error, never the end of the process.
        let next = std::panic::AssertUnwindSafe(self.stream.next()).catch_unwind();
        let Some(event) = next.await.map_err(|_| self.unreadable())? else {
            return Ok(None);
        };
        let event = event.map_err(MysqlError::query("reading the binary log"))?;
        let header = event.header();
        // Artificial events (the rotate announcing where the stream starts) have no place.
        let artificial = header.flags_raw() & 0x20 != 0;
        if header.log_pos() > 0 && !artificial {
            self.position.offset = u64::from(header.log_pos());
            self.position.step = 0;
        }
        let raw_type = header.event_type_raw();
        if raw_type == mariadb::GTID {
            self.gtid = Gtid::mariadb_event(event.data(), header.server_id());
            self.begin();
            self.in_transaction = !Gtid::mariadb_standalone(event.data());
            return Ok(Some(Decoded::Nothing));
        }
        if mariadb::COMPRESSED.contains(&raw_type) {
            return Err(MysqlError::Definite(
                "the server compresses its binary log (log_bin_compress = ON), which fhir-cdc does not read: set log_bin_compress = OFF".into(),
            ));
        }
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| event.read_data()));
        let data = match read.map_err(|_| self.unreadable())? {
            Ok(Some(data)) => data,
            Ok(None) => return Ok(Some(Decoded::Nothing)),
            Err(e) => {
                return Err(MysqlError::Definite(format!(
                    "an event at {} could not be read: {e}",
                    self.position
                )))
            }
        };
        let timestamp = DateTime::from_timestamp(i64::from(header.timestamp()), 0);
        Ok(Some(match data {
            EventData::RotateEvent(rotate) => {
                // The rotate that opens the stream comes before the format description, so
                // its body may end in a checksum the reader did not know to strip.
                let raw = rotate.name_raw();
                let name = |bytes: &[u8]| {
                    BinlogPosition::new(&String::from_utf8_lossy(bytes), rotate.position())
                };
                self.position = name(raw)
                    .or_else(|e| name(&raw[..raw.len().saturating_sub(4)]).map_err(|_| e))
                    .map_err(|e| {
                        MysqlError::Definite(format!("the server's binary log file name: {e}"))
                    })?;
                self.located = true;
                // The artificial rotate of a start by GTID names the file, not yet the place.
                if self.in_transaction || artificial {
                    Decoded::Nothing
                } else {
                    Decoded::Idle(self.position.clone())
                }
            }
            EventData::GtidEvent(gtid) => {
                self.gtid = Some(Gtid::Mysql {
                    uuid: gtid.sid(),
                    number: gtid.gno(),
                });
                self.begin();
                Decoded::Nothing
            }
            EventData::AnonymousGtidEvent(_) => {
                self.gtid = None;
                self.begin();
                Decoded::Nothing
            }
            EventData::QueryEvent(query) => {
                let text = query.query();
                let statement = text.trim();
                if statement.eq_ignore_ascii_case("BEGIN") {
                    if self.gtid.is_none() || !self.in_transaction {
                        self.begin();
                    }
                    self.in_transaction = true;
                    Decoded::Nothing
                } else if statement.eq_ignore_ascii_case("COMMIT") || !self.in_transaction {
                    // A COMMIT (non-transactional tables), or a statement that is its own
                    // transaction (DDL): its table's JSON columns may have changed.
                    if !statement.eq_ignore_ascii_case("COMMIT") {
                        let schema = query.schema().into_owned();
                        self.json_columns.retain(|(db, _), _| *db != schema);
                        self.maps.clear();
                    }
                    self.commit()
                } else {
                    Decoded::Nothing
                }
            }
            EventData::XidEvent(_) => self.commit(),
            EventData::TableMapEvent(tme) => {
                self.table_map(&tme, event.data()).await?;
                Decoded::Nothing
            }
            EventData::RowsEvent(rows) => {
                let Some(layout) = self
                    .maps
                    .get(&rows.table_id())
                    .and_then(|m| m.layout.clone())
                else {
                    return Ok(Some(Decoded::Nothing));
                };
                let place = Place {
                    position: &self.position,
                    transaction: &self.transaction,
                    ordinal: &mut self.ordinal,
                };
                Decoded::Changes(self::rows(&layout, &rows, timestamp, place)?)
            }
            EventData::HeartbeatEvent if !self.in_transaction && header.log_pos() > 0 => {
                Decoded::Idle(self.position.clone())
            }
            _ => Decoded::Nothing,
        }))
    }

    /// The error of an event that does not parse (mysql_common panicked on it).
    fn unreadable(&self) -> MysqlError {
        MysqlError::Definite(format!(
            "the event after {} does not parse: the server sent bytes that are not a binary-log event",
            self.position
        ))
    }

    fn begin(&mut self) {
        self.in_transaction = true;
        self.ordinal = 0;
        self.transaction = self.gtid.map(|g| g.to_string());
    }

    fn commit(&mut self) -> Decoded {
        self.in_transaction = false;
        self.transaction = None;
        Decoded::Committed {
            position: self.position.clone(),
            gtid: self.gtid.take(),
        }
    }

    /// A table map: the layout of the rows events after it, built when the table is mapped
    /// and its map (`bytes`) is new.
    async fn table_map(&mut self, tme: &TableMapEvent<'_>, bytes: &[u8]) -> Result<(), MysqlError> {
        let id = tme.table_id();
        if self.maps.get(&id).is_some_and(|m| m.bytes == bytes) {
            return Ok(());
        }
        let bytes = bytes.to_vec();
        let table = (
            tme.database_name().into_owned(),
            tme.table_name().into_owned(),
        );
        let layout = if self.tables.contains(&table) {
            let json = self.json_columns(&table).await?;
            Some(Arc::new(layout(
                &self.connector,
                &self.collations,
                tme,
                &table,
                &json,
            )?))
        } else {
            None
        };
        self.maps.insert(id, TableMap { bytes, layout });
        Ok(())
    }

    /// The table's JSON columns (MariaDB's JSON is LONGTEXT with a `json_valid` check; MySQL
    /// has a type of its own and no such checks).
    async fn json_columns(
        &mut self,
        table: &(String, String),
    ) -> Result<HashSet<String>, MysqlError> {
        if let Some(known) = self.json_columns.get(table) {
            return Ok(known.clone());
        }
        let found = json_columns(&mut self.catalog, &table.0, &table.1).await;
        self.json_columns.insert(table.clone(), found.clone());
        Ok(found)
    }
}

/// The changes in a run of binary-log events as a server writes them (`bytes`: a format
/// description event, then the others, without the file's magic number): the decoding a
/// [`BinlogReader`] does of table maps and rows events (others are skipped), with every
/// table taken as mapped, no column as JSON and no character set known. What the
/// `binlog_events` fuzz target feeds hostile bytes.
pub fn decode_events(connector: &str, mut bytes: &[u8]) -> Result<Vec<ChangeEvent>, MysqlError> {
    use mysql_async::binlog::EventType as E;
    const EVENT_HEADER_LEN: usize = 19;
    const ROW_DECODING: [u8; 8] = [
        E::TABLE_MAP_EVENT as u8,
        E::WRITE_ROWS_EVENT as u8,
        E::UPDATE_ROWS_EVENT as u8,
        E::DELETE_ROWS_EVENT as u8,
        E::WRITE_ROWS_EVENT_V1 as u8,
        E::UPDATE_ROWS_EVENT_V1 as u8,
        E::DELETE_ROWS_EVENT_V1 as u8,
        E::PARTIAL_UPDATE_ROWS_EVENT as u8,
    ];
    let bad = |e: std::io::Error| MysqlError::Definite(format!("an event does not read: {e}"));
    let connector: Arc<str> = connector.into();
    let mut reader = EventStreamReader::new(BinlogVersion::Version4);
    let (mut layouts, mut changes) = (HashMap::new(), Vec::new());
    let position = BinlogPosition::new("decoded.000001", 4).expect("a valid position");
    let mut ordinal = 0;
    while !bytes.is_empty() {
        // mysql_common's reader takes an event's size field on trust (it allocates that
        // much, and panics when fewer bytes follow): give it whole events only.
        let size = bytes
            .get(9..13)
            .map(|field| u32::from_le_bytes([field[0], field[1], field[2], field[3]]))
            .and_then(|size| usize::try_from(size).ok())
            .filter(|size| (EVENT_HEADER_LEN..=bytes.len()).contains(size))
            .ok_or_else(|| {
                MysqlError::Definite(format!(
                    "an event's header names a size that the {} bytes left cannot hold",
                    bytes.len()
                ))
            })?;
        let (whole, rest) = bytes.split_at(size);
        bytes = rest;
        // As in the reader, mysql_common's panics are errors of the event.
        let unparsable = |_| MysqlError::Definite("an event does not parse".into());
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader.read(whole)));
        let Some(event) = read.map_err(unparsable)?.map_err(bad)? else {
            break;
        };
        if !ROW_DECODING.contains(&event.header().event_type_raw()) {
            continue;
        }
        let data = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| event.read_data()));
        match data.map_err(unparsable)?.map_err(bad)? {
            Some(EventData::TableMapEvent(tme)) => {
                let table = (
                    tme.database_name().into_owned(),
                    tme.table_name().into_owned(),
                );
                let found = layout(&connector, &HashMap::new(), &tme, &table, &HashSet::new())?;
                layouts.insert(tme.table_id(), found);
            }
            Some(EventData::RowsEvent(event)) => {
                if let Some(layout) = layouts.get(&event.table_id()) {
                    let place = Place {
                        position: &position,
                        transaction: &None,
                        ordinal: &mut ordinal,
                    };
                    changes.extend(rows(layout, &event, None, place)?);
                }
            }
            _ => {}
        }
    }
    Ok(changes)
}
/// The JSON columns of `database.table` by the catalog (none when it cannot tell).
pub async fn json_columns(conn: &mut Conn, database: &str, table: &str) -> HashSet<String> {
    conn.exec::<String, _, _>(
        "SELECT CONSTRAINT_NAME FROM information_schema.CHECK_CONSTRAINTS
          WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?
            AND CHECK_CLAUSE = CONCAT('json_valid(`', CONSTRAINT_NAME, '`)')",
        (database, table),
    )
    .await
    .map(|names| names.into_iter().collect())
    .unwrap_or_default()
}

fn start_gtid_text(start: &StartAt) -> String {
    match start {
        StartAt::Gtid(position) => position.to_string(),
        StartAt::File(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Operation, Value};

    /// A real MariaDB log (the fuzz target's seed): a table with a column of each type,
    /// one row inserted, updated and deleted.
    const LOG: &[u8] = include_bytes!("../../../fuzz/seeds/binlog_events/mariadb-all-types");

    #[test]
    fn a_real_log_decodes_to_its_changes() {
        let changes = decode_events("seed", LOG).unwrap();
        let ops: Vec<Operation> = changes.iter().map(|c| c.op).collect();
        assert_eq!(
            ops,
            [Operation::Insert, Operation::Update, Operation::Delete]
        );
        let inserted = changes[0].after.as_ref().unwrap();
        // BIGINT UNSIGNED's largest, past i64: exact, whatever the kind.
        let b = format!("{:?}", inserted.get("b").unwrap());
        assert!(b.contains("18446744073709551615"), "{b}");
        assert_eq!(inserted.get("su"), Some(&Value::Int(65000)));
        assert_eq!(inserted.get("m"), Some(&Value::Int(-8000000)));
        assert_eq!(inserted.get("e"), Some(&Value::Text("b".into())));
        assert_eq!(inserted.get("st"), Some(&Value::Text("x,z".into())));
        assert_eq!(inserted.get("n"), Some(&Value::Null));
        let updated = changes[1].after.as_ref().unwrap();
        // No character set is known without a server: text columns read as their bytes.
        assert_eq!(updated.get("vc"), Some(&Value::Bytes(b"changed".to_vec())));
        assert_eq!(updated.get("n"), Some(&Value::Int(7)));
        assert_eq!(
            changes[2].before.as_ref().unwrap().get("e"),
            Some(&Value::Text("c".into()))
        );
        assert_eq!(changes[0].key.len(), 1);
        assert_eq!(&*changes[0].key[0], "id");
    }

    #[test]
    fn a_log_cut_anywhere_reads_as_the_changes_before_the_cut_or_an_error() {
        // Each decode stamps its own capture time: compare the rest.
        let shown = |changes: Vec<ChangeEvent>| {
            let images: Vec<String> = changes
                .iter()
                .map(|c| format!("{:?} {:?} {:?}", c.op, c.before, c.after))
                .collect();
            images.join("\n")
        };
        let whole = shown(decode_events("seed", LOG).unwrap());
        let (mut errors, mut fewer) = (0, 0);
        for end in 0..LOG.len() {
            match decode_events("seed", &LOG[..end]) {
                Ok(changes) => {
                    fewer += usize::from(changes.len() < 3);
                    let read = shown(changes);
                    assert!(whole.starts_with(&read), "cut at {end}: {read}");
                }
                Err(_) => errors += 1,
            }
        }
        assert!(errors > 0 && fewer > 0, "{errors} errors, {fewer} shorter");
    }
}
