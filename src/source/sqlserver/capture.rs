//! The SQL Server source behind the [`Source`] seam: the start decided by the connector's
//! stored state, then the change tables polled window by window, with snapshot chunks
//! emitted between windows (see [`super`] for why each step is safe).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{
    catalog::{self, CaptureInstance},
    changes::{self, ChangeRow},
    connection::{self, Client},
    snapshot::Reader,
    types,
};
use crate::{
    change::{
        ChangeEvent, ChangeLsn, Lsn, Names, Operation, Position, Row, SourceMessage, SourceTable,
        Value,
    },
    config::{Secret, SnapshotMode, SqlServerConfig},
    offsets::ConnectorState,
    source::{chunks::Snapshotter, publish, refuse_foreign_state, Source, SourceError, SourceIo},
};

/// Rows read from one capture instance per query: a larger backlog is read a window of
/// whole transactions at a time.
const WINDOW_ROWS: usize = 10_000;

/// A SQL Server database's change tables, polled.
#[derive(Debug)]
pub struct SqlServerSource {
    connector: String,
    url: Secret,
    mode: SnapshotMode,
    chunk_size: usize,
    poll: Duration,
    /// The mapped tables, `(schema, table)`.
    tables: Vec<(String, String)>,
    /// The signal table, `schema.table`.
    signal: Option<String>,
}

impl SqlServerSource {
    pub fn new(connector: &str, config: &SqlServerConfig, tables: Vec<(String, String)>) -> Self {
        Self {
            connector: connector.to_owned(),
            url: config.url.clone(),
            mode: config.snapshot_mode(),
            chunk_size: config.snapshot_chunk_size(),
            poll: config.poll_interval(),
            tables,
            signal: config.signal_table().map(str::to_owned),
        }
    }
}

/// Where reading resumes after `at`: after its transaction when `at` is a transaction's
/// end, at its transaction when `at` is the start of one not yet read.
pub fn resume_from(at: &ChangeLsn) -> Lsn {
    if at.seqval == Lsn::END {
        at.commit.next()
    } else {
        at.commit
    }
}

/// A table the stream reads: its rows' source, key, and capture instances.
#[derive(Debug)]
struct Captured {
    name: String,
    source: Arc<SourceTable>,
    key: Names,
    instances: Vec<CaptureInstance>,
    signal: bool,
}

impl SqlServerSource {
    /// The captured tables (`qualified`, then the signal table) as the catalog describes
    /// them: their keys, and which is the signal table.
    async fn describe(
        &self,
        client: &mut Client,
        database: &str,
        qualified: &[String],
    ) -> Result<Vec<Captured>, SourceError> {
        let mut captured = Vec::new();
        for name in qualified.iter().chain(&self.signal) {
            let (schema, table) = name.split_once('.').expect("schema.table");
            let described = catalog::table_columns(client, schema, table).await?;
            captured.push(Captured {
                name: name.clone(),
                source: Arc::new(SourceTable::new(
                    self.connector.as_str(),
                    Self::KIND,
                    database,
                    schema,
                    table,
                )),
                key: described
                    .key
                    .iter()
                    .map(|k| Arc::from(k.as_str()))
                    .collect(),
                instances: Vec::new(),
                signal: self.signal.as_deref() == Some(name.as_str()),
            });
        }
        Ok(captured)
    }
}

impl Source for SqlServerSource {
    type Position = ChangeLsn;

    const KIND: &'static str = "sqlserver";

    fn position(position: &Position) -> Option<ChangeLsn> {
        match position {
            Position::SqlServer(at) => Some(*at),
            _ => None,
        }
    }

    async fn run(
        self,
        stored: Option<ConnectorState>,
        io: SourceIo<ChangeLsn>,
    ) -> Result<(), SourceError> {
        let SourceIo {
            out,
            mut durable,
            state: published,
            shutdown,
        } = io;
        refuse_foreign_state(stored.as_ref(), Self::KIND, &self.connector)?;
        let database = crate::config::ado::database(&self.url)
            .ok_or_else(|| SourceError::Connector("source.url names no database".into()))?;
        let mut client = connection::connect(&self.url).await?;
        catalog::take_running_lock(&mut client, &self.connector).await?;
        let qualified: Vec<String> = self
            .tables
            .iter()
            .map(|(s, t)| format!("{s}.{t}"))
            .collect();
        let mut captured = self.describe(&mut client, &database, &qualified).await?;
        refresh_instances(&mut client, &mut captured).await?;

        let mut state = stored
            .filter(|s| s.position.is_some())
            .unwrap_or_else(|| ConnectorState::new(Self::KIND));
        let mut at = match &state.position {
            Some(text) => Some(text.parse::<ChangeLsn>().map_err(|e| {
                SourceError::Connector(format!(
                    "the stored state's position: {e}; `fhir-cdc offsets reset` replaces it"
                ))
            })?),
            None => None,
        };
        if let Some(stored) = at {
            if let Some(why) = cleaned_up(&captured, &state, resume_from(&stored)) {
                if self.mode != SnapshotMode::WhenNeeded {
                    return Err(SourceError::Connector(format!(
                        "the change tables no longer hold the changes from the connector's stored position {stored} ({why}): the cleanup job removed them, and changes since are lost; set snapshot.mode = \"when_needed\" to take a new snapshot, or run `fhir-cdc offsets reset --to snapshot` to start over, and keep the retention (sys.sp_cdc_change_job @job_type = N'cleanup', @retention = <minutes>) longer than the connector may be stopped"
                    )));
                }
                warn!(connector = %self.connector, "the cleanup job removed changes after the stored position: taking a new snapshot of every table (snapshot.mode = when_needed)");
                state = ConnectorState::new(Self::KIND);
                at = None;
            }
        }
        let mut at = match at {
            Some(at) => at,
            None => ChangeLsn::end_of(catalog::max_lsn(&mut client).await?.ok_or_else(|| {
                SourceError::Transient(
                    "the capture job has recorded no position yet (sys.fn_cdc_get_max_lsn() is NULL): CDC was just enabled, or SQL Server Agent is not running".into(),
                )
            })?),
        };
        if self.mode == SnapshotMode::Never {
            state.skip_snapshots(&qualified);
        }
        let reader = Reader::new(&self.url, &self.connector, &database);
        let mut snapshot =
            Snapshotter::new(reader, self.chunk_size, state.unfinished(&qualified).into()).await?;
        publish(&published, &state);
        info!(from = %at, "streaming");

        // Resume points not yet durable, oldest first.
        let mut commits: VecDeque<ChangeLsn> = VecDeque::new();
        let mut next_poll = Instant::now();
        let result: Result<(), SourceError> = async {
            loop {
                if state.drop_requests(std::mem::take(&mut snapshot.dropped)) {
                    publish(&published, &state);
                }
                snapshot.start_next().await;
                let mut messages = Vec::new();
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    Ok(()) = durable.changed() => {
                        if let Some(durable) = *durable.borrow_and_update() {
                            snapshot.durable(&durable, &mut state);
                            settle(&mut commits, &durable, &mut state);
                            publish(&published, &state);
                        }
                        continue;
                    }
                    read = snapshot.read(), if snapshot.reading() => read?,
                    () = tokio::time::sleep_until(next_poll) => {
                        let window = poll(&mut client, &mut captured, &state, resume_from(&at)).await?;
                        next_poll = Instant::now() + if window.more { Duration::ZERO } else { self.poll };
                        for message in window.messages {
                            match message {
                                SourceMessage::Change(change) => {
                                    let signal = captured
                                        .iter()
                                        .any(|c| c.signal && Arc::ptr_eq(&c.source, &change.source));
                                    if !signal {
                                        snapshot.observe(&change);
                                        messages.push(SourceMessage::Change(change));
                                    } else if change.op == Operation::Insert {
                                        snapshot.signal(&change, &qualified, &mut state).await?;
                                        publish(&published, &state);
                                    }
                                }
                                SourceMessage::Progress(Position::SqlServer(end)) => {
                                    commits.push_back(end);
                                    messages.push(SourceMessage::Progress(Position::SqlServer(end)));
                                }
                                SourceMessage::Progress(_) => {}
                            }
                        }
                        at = window.until.map_or(at, |until| until.max(at));
                    }
                }
                // Between windows, a chunk the stream has caught up with goes out.
                if let Some(chunk) = snapshot.ready(&at) {
                    at = ChangeLsn { step: at.step + 1, ..at };
                    messages.extend(snapshot.emit(chunk, &at, &Position::SqlServer(at)));
                    commits.push_back(at);
                    messages.push(SourceMessage::Progress(Position::SqlServer(at)));
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
        drop(out);
        while durable.changed().await.is_ok() {
            if let Some(durable) = *durable.borrow_and_update() {
                snapshot.durable(&durable, &mut state);
                settle(&mut commits, &durable, &mut state);
            }
        }
        publish(&published, &state);
        let _ = client.close().await;
        result
    }
}

/// Read the capture instances again (a DBA may have added one) into `captured`; a table
/// without any is an error naming the T-SQL that enables CDC on it.
async fn refresh_instances(
    client: &mut Client,
    captured: &mut [Captured],
) -> Result<(), SourceError> {
    let mut instances = catalog::instances(client).await?;
    for table in captured.iter_mut() {
        table.instances = instances.remove(&table.name).unwrap_or_default();
        if table.instances.is_empty() {
            let (schema, name) = table.name.split_once('.').expect("schema.table");
            return Err(SourceError::Connector(format!(
                "CDC is not enabled on {} (it has no capture instance): EXEC sys.sp_cdc_enable_table @source_schema = N'{schema}', @source_name = N'{name}', @role_name = NULL",
                table.name
            )));
        }
    }
    Ok(())
}

/// Why changes of a table the connector has begun to capture are gone from `from` on.
fn cleaned_up(captured: &[Captured], state: &ConnectorState, from: Lsn) -> Option<String> {
    captured
        .iter()
        // A lost signal loses only a request: the signal table never stops the connector.
        .filter(|t| !t.signal && state.tables.contains_key(&t.name))
        .find_map(|t| {
            let instances: Vec<_> = t.instances.iter().map(|i| i.instance.clone()).collect();
            changes::cleaned_up(&instances, from).map(|start| {
                format!(
                    "the changes of {} now start at {start}, after {from}",
                    t.name
                )
            })
        })
}

/// One poll's changes in LSN order, each transaction followed by its end (a resume
/// point), the last by the window's end.
#[derive(Debug, Default)]
struct Window {
    messages: Vec<SourceMessage>,
    /// The position reached (`None`: nothing new).
    until: Option<ChangeLsn>,
    /// More changes wait: poll again at once.
    more: bool,
}

/// Read the changes from `from` up to the capture job's position.
async fn poll(
    client: &mut Client,
    captured: &mut [Captured],
    state: &ConnectorState,
    from: Lsn,
) -> Result<Window, SourceError> {
    let Some(max) = catalog::max_lsn(client).await? else {
        return Ok(Window::default());
    };
    if max < from {
        return Ok(Window::default());
    }
    refresh_instances(client, captured).await?;
    if let Some(why) = cleaned_up(captured, state, from) {
        // Restarting decides by snapshot.mode, from the state Kafka has.
        return Err(SourceError::Transient(format!(
            "the cleanup job removed changes the connector had not read ({why}): restarting to recover"
        )));
    }
    let mut to = max;
    let mut read = read_changes(client, captured, from, to, Some(WINDOW_ROWS)).await?;
    // A read that stopped at the limit may have cut its last transaction short: keep only
    // the transactions before it, or read a transaction larger than the limit whole.
    let cut = read.capped.iter().min().copied();
    if let Some(cut) = cut {
        if cut == from {
            to = cut;
            read = read_changes(client, captured, from, to, None).await?;
        } else {
            read.changes
                .retain(|c| matches!(&c.position, Position::SqlServer(p) if p.commit < cut));
        }
    }
    let mut changes = read.changes;
    changes.sort_by_key(position);
    changes::number(&mut changes);
    let until = match cut {
        Some(cut) if cut != from => ChangeLsn {
            commit: cut,
            seqval: Lsn::default(),
            step: 0,
        },
        _ => ChangeLsn::end_of(to),
    };
    Ok(Window {
        messages: with_ends(changes, until),
        until: Some(until),
        more: cut.is_some(),
    })
}

/// `changes` (in LSN order) with each transaction's end after its last change, and
/// `until` after them all (unless it is the last transaction's end).
fn with_ends(changes: Vec<ChangeEvent>, until: ChangeLsn) -> Vec<SourceMessage> {
    let mut messages = Vec::with_capacity(changes.len() + 2);
    let mut open: Option<Lsn> = None;
    for change in changes {
        let commit = position(&change).commit;
        if let Some(previous) = open.filter(|p| *p != commit) {
            messages.push(SourceMessage::Progress(Position::SqlServer(
                ChangeLsn::end_of(previous),
            )));
        }
        open = Some(commit);
        messages.push(SourceMessage::Change(change));
    }
    if let Some(last) = open.map(ChangeLsn::end_of).filter(|end| *end != until) {
        messages.push(SourceMessage::Progress(Position::SqlServer(last)));
    }
    messages.push(SourceMessage::Progress(Position::SqlServer(until)));
    messages
}

fn position(change: &ChangeEvent) -> ChangeLsn {
    match &change.position {
        Position::SqlServer(at) => *at,
        _ => unreachable!("a SQL Server change"),
    }
}

/// Changes read from every table's instances over `[from, to]`, with the last commit LSN
/// of each read that stopped at `limit`.
struct Read {
    changes: Vec<ChangeEvent>,
    capped: Vec<Lsn>,
}

async fn read_changes(
    client: &mut Client,
    captured: &[Captured],
    from: Lsn,
    to: Lsn,
    limit: Option<usize>,
) -> Result<Read, SourceError> {
    let mut read = Read {
        changes: Vec::new(),
        capped: Vec::new(),
    };
    for table in captured {
        let instances: Vec<_> = table.instances.iter().map(|i| i.instance.clone()).collect();
        for (index, low, high) in changes::reads(&instances, from, to) {
            let instance = &table.instances[index];
            let mut rows = instance_rows(client, instance, low, high, limit).await?;
            if limit == Some(rows.len()) {
                if let Some(last) = rows.last().map(|r| r.commit) {
                    // The last transaction may be cut short (an update's old row without
                    // its new one): the next window reads it whole.
                    rows.retain(|r| r.commit != last);
                    read.capped.push(last);
                }
            }
            let changes = changes::changes(&table.source, &table.key, rows).map_err(|e| {
                SourceError::Connector(format!(
                    "the change table of capture instance {}: {e}",
                    instance.instance.name
                ))
            })?;
            read.changes.extend(changes);
        }
    }
    Ok(read)
}

/// The change function's query for `instance`: the place, operation and commit time of each
/// change, then the captured columns; `limit` rows at most. The commit time is the server's
/// local `tran_end_time` turned into UTC with the server's offset now (a backlog across a
/// change of daylight saving time is an hour off on one side of it).
pub fn changes_query(instance: &CaptureInstance, limit: Option<usize>) -> String {
    let top = limit.map_or_else(String::new, |n| format!("TOP ({n}) "));
    let function = super::quote_ident(&format!(
        "fn_cdc_get_all_changes_{}",
        instance.instance.name
    ));
    format!(
        "SELECT {top}c.[__$start_lsn], c.[__$seqval], c.[__$operation], \
         DATEADD(MINUTE, -DATEPART(TZOFFSET, SYSDATETIMEOFFSET()), m.tran_end_time), {} \
         FROM cdc.{function}(@P1, @P2, N'all update old') AS c \
         LEFT JOIN cdc.lsn_time_mapping AS m ON m.start_lsn = c.[__$start_lsn] \
         ORDER BY c.[__$start_lsn], c.[__$seqval], c.[__$operation]",
        types::select_list(&instance.columns, "c.")
    )
}

async fn instance_rows(
    client: &mut Client,
    instance: &CaptureInstance,
    from: Lsn,
    to: Lsn,
    limit: Option<usize>,
) -> Result<Vec<ChangeRow>, SourceError> {
    let (from, to) = (from.to_bytes(), to.to_bytes());
    let rows = super::rows(
        client,
        &changes_query(instance, limit),
        &[&&from[..], &&to[..]],
        "reading a change table (cdc.fn_cdc_get_all_changes_…)",
    )
    .await?;
    let names: Names = instance
        .columns
        .iter()
        .map(|(n, _)| Arc::from(n.as_str()))
        .collect();
    rows.into_iter()
        .map(|row| change_row(row, &names, &instance.instance.name))
        .collect()
}

/// One row of a change function as a [`ChangeRow`]; a value that cannot be read names
/// its column and the capture instance.
fn change_row(row: tiberius::Row, names: &Names, instance: &str) -> Result<ChangeRow, SourceError> {
    let bad = |what: String| SourceError::Connector(format!("capture instance {instance}: {what}"));
    let commit =
        catalog::lsn_at(&row, 0)?.ok_or_else(|| bad("a change without __$start_lsn".into()))?;
    let seqval =
        catalog::lsn_at(&row, 1)?.ok_or_else(|| bad("a change without __$seqval".into()))?;
    let operation = row
        .get::<i32, _>(2)
        .ok_or_else(|| bad("a change without __$operation".into()))?;
    let mut cells = row.into_iter().skip(3);
    let commit_time = match cells.next().map(types::value) {
        Some(Ok(Value::Timestamp(at))) => Some(DateTime::<Utc>::from_naive_utc_and_offset(at, Utc)),
        _ => None,
    };
    let values = cells
        .zip(names.iter())
        .map(|(data, name)| types::value(data).map_err(|why| bad(format!("column {name}: {why}"))))
        .collect::<Result<Vec<Value>, _>>()?;
    Ok(ChangeRow {
        commit,
        seqval,
        operation,
        row: Row::of_layout(names.clone(), values),
        commit_time,
    })
}

/// Everything up to `at` is durable: the last resume point up to it becomes the stored
/// position.
fn settle(commits: &mut VecDeque<ChangeLsn>, at: &ChangeLsn, state: &mut ConnectorState) {
    let mut last = None;
    while commits.front().is_some_and(|p| p <= at) {
        last = commits.pop_front();
    }
    if let Some(position) = last {
        state.position = Some(position.to_string());
    }
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDateTime;

    use super::*;
    use crate::source::sqlserver::changes::Instance;

    fn lsn(block: u32) -> Lsn {
        Lsn {
            vlf: 0x2A,
            block,
            record: 1,
        }
    }

    #[test]
    fn reading_resumes_after_a_transaction_end_and_at_a_cut() {
        assert_eq!(resume_from(&ChangeLsn::end_of(lsn(7))), lsn(7).next());
        let cut = ChangeLsn {
            commit: lsn(9),
            seqval: Lsn::default(),
            step: 0,
        };
        assert_eq!(resume_from(&cut), lsn(9));
        let chunk = ChangeLsn {
            step: 3,
            ..ChangeLsn::end_of(lsn(7))
        };
        assert_eq!(resume_from(&chunk), lsn(7).next());
    }

    #[test]
    fn each_transaction_is_followed_by_its_end_and_the_window_by_its_own() {
        let change = |commit: u32, seqval: u32| ChangeEvent {
            source: Arc::new(SourceTable::new("c", "sqlserver", "lab", "dbo", "t")),
            op: Operation::Insert,
            key: Names::from(Vec::new()),
            before: None,
            after: None,
            position: Position::SqlServer(ChangeLsn {
                commit: lsn(commit),
                seqval: lsn(seqval),
                step: 0,
            }),
            ordinal: 0,
            transaction_id: None,
            commit_time: None,
            capture_time: Utc::now(),
        };
        let shape = |messages: Vec<SourceMessage>| -> Vec<String> {
            messages
                .iter()
                .map(|m| match m {
                    SourceMessage::Change(c) => format!("change {}", position(c).commit.block),
                    SourceMessage::Progress(Position::SqlServer(p)) if p.seqval == Lsn::END => {
                        format!("end {}", p.commit.block)
                    }
                    SourceMessage::Progress(p) => format!("until {p}"),
                })
                .collect()
        };
        let window = with_ends(
            vec![change(3, 1), change(3, 2), change(5, 1)],
            ChangeLsn::end_of(lsn(9)),
        );
        assert_eq!(
            shape(window),
            ["change 3", "change 3", "end 3", "change 5", "end 5", "end 9"]
        );
        // A window that ends with its last transaction says so once.
        let window = with_ends(vec![change(5, 1)], ChangeLsn::end_of(lsn(5)));
        assert_eq!(shape(window), ["change 5", "end 5"]);
        // Nothing read: the window's end alone.
        assert_eq!(
            shape(with_ends(Vec::new(), ChangeLsn::end_of(lsn(7)))),
            ["end 7"]
        );
    }

    #[test]
    fn settling_stores_the_last_resume_point_up_to_the_durable_position() {
        let mut commits: VecDeque<_> = [1, 2, 3].map(|n| ChangeLsn::end_of(lsn(n))).into();
        let mut state = ConnectorState::new("sqlserver");
        let inside_third = ChangeLsn {
            commit: lsn(3),
            seqval: lsn(1),
            step: 0,
        };
        settle(&mut commits, &inside_third, &mut state);
        assert_eq!(state.position, Some(ChangeLsn::end_of(lsn(2)).to_string()));
        assert_eq!(commits.len(), 1);
    }

    #[test]
    fn the_change_query_reads_in_the_documented_order() {
        let instance = CaptureInstance {
            table: "dbo.lab_result".into(),
            instance: Instance {
                name: "dbo_lab_result".into(),
                start: lsn(1),
                created: NaiveDateTime::MIN,
            },
            columns: vec![
                ("result_id".into(), "int".into()),
                ("fee".into(), "money".into()),
            ],
        };
        let query = changes_query(&instance, Some(10));
        assert!(
            query
                .starts_with("SELECT TOP (10) c.[__$start_lsn], c.[__$seqval], c.[__$operation], "),
            "{query}"
        );
        assert!(
            query.contains("c.[result_id], CAST(c.[fee] AS decimal(19,4)) AS [fee]"),
            "{query}"
        );
        assert!(query.contains("FROM cdc.[fn_cdc_get_all_changes_dbo_lab_result](@P1, @P2, N'all update old') AS c"), "{query}");
        assert!(
            query.ends_with("ORDER BY c.[__$start_lsn], c.[__$seqval], c.[__$operation]"),
            "{query}"
        );
    }
}
