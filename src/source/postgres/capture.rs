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

use std::{sync::Arc, time::Duration};

use tokio_postgres::{error::SqlState, Client};
use tracing::{info, warn};

use super::{
    changes::Decoded,
    replication::{ReplicationStream, StreamError, StreamOptions},
    snapshot::{self, SnapshotError},
    watermarks::Snapshotter,
};
use crate::{
    change::{PgLsn, Position, SourceMessage},
    config::{PostgresConfig, Secret, SnapshotMode},
    offsets::{ConnectorState, SnapshotRequest},
    postgres::ConnectError,
    source::{publish, refuse_foreign_state, Source, SourceError, SourceIo},
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
        let mut state = self.prepare_slot(&admin, stored).await?;
        let qualified: Vec<String> = self
            .tables
            .iter()
            .map(|(s, t)| format!("{s}.{t}"))
            .collect();
        if self.mode == SnapshotMode::Never {
            state.skip_snapshots(&qualified);
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
        // The server streams from the later of the requested position and the slot's
        // confirmed one: the log names where reading really begins.
        let confirmed = admin
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .ok()
            .flatten()
            .and_then(|row| row.get::<_, Option<String>>(0))
            .and_then(|text| text.parse::<PgLsn>().ok());
        let from = confirmed.map_or(start, |c| c.max(start));
        info!(slot = %self.slot, from = %from, stored = %start, "streaming");
        let (reader, database) = snapshot::connect(&self.url).await.map_err(snapshot_error)?;
        let mut snapshot = Snapshotter::new(
            Arc::new(reader),
            database,
            (&self.connector, &self.slot),
            self.chunk_size,
            state.unfinished(&qualified).into(),
        );
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

impl PostgresSource {
    /// The slot as the stored state needs it (created, or dropped and created again for a
    /// new snapshot under `when_needed`), and the state to start from.
    async fn prepare_slot(
        &self,
        admin: &Client,
        stored: Option<ConnectorState>,
    ) -> Result<ConnectorState, SourceError> {
        let captured = stored.as_ref().is_some_and(|s| s.position.is_some());
        let plan = start_plan(
            setup::slot_state(admin, &self.slot).await?,
            captured,
            self.mode,
        )
        .map_err(|why| SourceError::Connector(format!("replication slot {}: {why}", self.slot)))?;
        let state = match (&plan, stored) {
            (Start::Resume | Start::Create, Some(stored)) => stored,
            _ => ConnectorState::new(Self::KIND),
        };
        if let Start::Anew { drop } = plan {
            warn!(slot = %self.slot, "the slot lost the WAL it needs or is gone: taking a new snapshot of every table (snapshot.mode = when_needed)");
            if drop {
                setup::drop_slot(admin, &self.slot).await?;
            }
        }
        if plan != Start::Resume {
            setup::create_slot(admin, &self.slot).await?;
        }
        Ok(state)
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
            .map(|(s, t)| crate::source::postgres::quote_table(s, t))
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
