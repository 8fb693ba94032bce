//! The connector at work: PostgreSQL → mappings → Avro → Kafka, with source positions
//! acknowledged only after Kafka has every event at or before them.
//!
//! Two stages joined by a bounded channel of [`CHANNEL_DEPTH`] changes, each on a core of
//! its own when there is one: the source reads the snapshot and the replication stream; the
//! mapping stage maps each change, encodes its events and dead letters and hands them to
//! librdkafka, and takes no more changes while [`MAX_IN_FLIGHT`] messages, from the oldest
//! unacknowledged on, are out — so a slow or absent Kafka holds the mapping and the source
//! back and nothing grows without bound. Each Kafka acknowledgement feeds the
//! [`AckTracker`]; the tracker's safe position travels back to the source, which reports it
//! to PostgreSQL as the flush LSN. A crash anywhere therefore re-reads from a position whose
//! events all reached Kafka, and re-emitted events carry the same ids.
//!
//! A change a mapping cannot turn into an event goes to the dead-letter topic
//! `<prefix>.dlq.<connector>` with the reason and the row as the database sent it; it counts
//! as written once Kafka acknowledged the dead letter.

pub mod dead_letter;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    future::Future,
    sync::Arc,
};

use chrono::{DateTime, Utc};
use smallvec::{smallvec, SmallVec};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use ::metrics::Counter;

use crate::observe::{self, pipeline::Metrics};
use crate::{
    canonical::{
        self,
        registry::{CodecError, EventCodec},
    },
    change::{PgLsn, Position, SourceMessage},
    config::{ConnectorConfig, SnapshotMode, SourceKind},
    mapping::{self, MapContext, Mapper, Mapping},
    offsets::AckTracker,
    sink::kafka::{ensure_topics, Delivery, SinkError, StreamProducer, TopicSpec},
    source::postgres::{
        changes::Decoded,
        replication::{ReplicationStream, StreamError, StreamOptions},
        snapshot::{read_tables, ExportedSnapshot, SnapshotError},
    },
};

/// Changes between the source and the mapping stage.
pub const CHANNEL_DEPTH: usize = 256;
/// Messages sent to Kafka from the oldest not yet acknowledged on: no more changes are taken
/// beyond it (the events of one received batch may pass it). librdkafka holds a message up to
/// `linger.ms` (10) before it even goes out, so this caps the rate at about this many per
/// linger plus round trip: 1,024 stalled the pipeline at ≈ 70-80k messages/s with the cores
/// not busy. Alternating benchmark runs, 2,048 against 1,024: median 72.5 % of the ceiling
/// against 59.7 % (7 each), peak RSS 56-60 MiB against 52-58 (4,096: 57-64 MiB).
pub const MAX_IN_FLIGHT: usize = 2048;
/// Changes the mapping stage takes from its channel at once. Measured when it handed each
/// batch's messages to a sink stage of their own, medians of two series of alternating
/// benchmark runs (10 and 8 each): 128 gave 51 % and 55 % of the ceiling at 20.5 and 17.1
/// µs per change, 64 gave 48 % and 52 % at 21.9 and 18.0; 256 (second series) 52 % at 17.6.
const RECEIVE_BATCH: usize = 128;
/// Rows per snapshot fetch.
const SNAPSHOT_CHUNK: usize = 1000;

/// Why the connector stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the configuration has no [mappings]: `run` needs mapping files")]
    NoMappings,
    #[error("mappings:\n{0}")]
    Mappings(#[from] mapping::LoadErrors),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("encoding an event failed: {0}")]
    Codec(#[from] CodecError),
}

/// What a run did, for the log and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub snapshot_rows: u64,
    pub events: u64,
    pub suppressed: u64,
    pub dead_letters: u64,
    /// The last position acknowledged to PostgreSQL.
    pub acknowledged: Option<PgLsn>,
}

/// The mapper of a connector's mappings, with its token key and source system.
pub fn mapper_for(config: &ConnectorConfig, mappings: Vec<Mapping>) -> Result<Mapper, RunError> {
    let mappings_config = config.mappings.as_ref().ok_or(RunError::NoMappings)?;
    let source_system = mappings_config
        .source_system
        .clone()
        .unwrap_or_else(|| config.name.clone());
    Mapper::new(
        mappings,
        MapContext {
            token_key: mappings_config.token_key.clone(),
        },
        source_system,
    )
    .map_err(RunError::Setup)
}

/// The topics of a connector's events, one per domain and resource type of its mappings,
/// each with the resource type its events carry.
fn event_topics(config: &ConnectorConfig, mappings: &[Mapping]) -> BTreeMap<String, String> {
    mappings
        .iter()
        .flat_map(|m| {
            m.resources.iter().map(move |r| {
                (
                    canonical::topic(&config.topics.prefix, &m.domain, &r.resource_type),
                    r.resource_type.clone(),
                )
            })
        })
        .collect()
}

/// The topics a connector writes: those of its events, and its dead-letter topic.
pub fn topic_specs(config: &ConnectorConfig, mappings: &[Mapping]) -> Vec<TopicSpec> {
    let mut topics: BTreeSet<String> = event_topics(config, mappings).into_keys().collect();
    topics.insert(config.dead_letter_topic());
    topics
        .into_iter()
        .map(|name| TopicSpec {
            name,
            partitions: config.topics.partitions,
            replication_factor: config.topics.replication_factor,
            config: Vec::new(),
        })
        .collect()
}

/// The replication slot as the connector finds it at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Absent,
    Usable,
    /// It exists, but the server removed WAL it still needed (`wal_status = lost`).
    Lost,
}

/// How a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// From the slot's confirmed position.
    Resume,
    /// Create the slot with an exported snapshot; read the tables; stream.
    Snapshot,
    /// Drop the lost slot, then as `Snapshot`.
    DropAndSnapshot,
    /// Create the slot and stream, no snapshot.
    Stream,
}

/// Debezium's `snapshot.mode` rules, applied to the slot found.
fn start_plan(slot: SlotState, mode: SnapshotMode) -> Result<Start, String> {
    Ok(match (slot, mode) {
        (SlotState::Usable, _) => Start::Resume,
        (SlotState::Absent, SnapshotMode::Never) => Start::Stream,
        (SlotState::Absent, SnapshotMode::Initial | SnapshotMode::WhenNeeded) => Start::Snapshot,
        (SlotState::Lost, SnapshotMode::WhenNeeded) => Start::DropAndSnapshot,
        (SlotState::Lost, _) => {
            return Err("the server removed WAL the slot still needs (wal_status = lost), so changes since its confirmed position are gone; set snapshot.mode = \"when_needed\" to drop it and take a new snapshot, or drop the slot yourself".into())
        }
    })
}

/// Run the connector until `shutdown` is cancelled (or the source ends), then drain what is
/// in flight, acknowledge it and return.
pub async fn run(
    config: &ConnectorConfig,
    shutdown: CancellationToken,
) -> Result<RunSummary, RunError> {
    if config.source.kind != SourceKind::Postgres {
        return Err(RunError::Setup(format!(
            "`run` captures postgres sources; {} capture is not implemented yet",
            config.source.kind
        )));
    }
    let mappings_config = config.mappings.as_ref().ok_or(RunError::NoMappings)?;
    let mappings = mapping::load_dir(&mappings_config.path)?;
    if let Some(metrics) = &config.metrics {
        observe::serve(metrics.listen).map_err(RunError::Setup)?;
        info!(listen = %metrics.listen, "serving metrics");
    }
    let tables = mapping::source_tables(&mappings);
    let dead_letter_topic = config.dead_letter_topic();
    let specs = topic_specs(config, &mappings);
    let event_topics = event_topics(config, &mappings);
    // Connecting to Kafka (and, with idempotence, getting a producer id) starts now.
    let producer = StreamProducer::new(&config.kafka)?;
    let mapper = mapper_for(config, mappings)?;
    // The mapping stage starts first: it creates the topics, builds the registry's client
    // and registers the events' schemas while the database is set up and the stream starts
    // (≈ 250 ms for new topics, ≈ 150 ms for the client and the schemas); it takes no change
    // before they are done.
    let (out, received) = mpsc::channel(CHANNEL_DEPTH);
    let (acked, acknowledgements) = watch::channel(None::<PgLsn>);
    let (kafka, registry) = (config.kafka.clone(), config.schema_registry.clone());
    let ready = async move {
        let codec = EventCodec::new(&registry);
        let registered = async {
            for (topic, resource_type) in &event_topics {
                codec.register(topic, resource_type).await?;
            }
            Ok::<_, RunError>(())
        };
        let topics = async {
            let created = ensure_topics(&kafka, &specs).await?;
            info!(
                created = created.len(),
                topics = specs.len(),
                "topics ready"
            );
            Ok(())
        };
        tokio::try_join!(registered, topics)?;
        Ok(codec)
    };
    let stage = map_and_send(
        received,
        mapper,
        producer,
        ready,
        Destinations {
            prefix: config.topics.prefix.clone(),
            dead_letter_topic,
            connector: config.name.clone(),
        },
        acked,
    );
    // On a thread of its own, not as a task: woken by the source, a task runs on the
    // source's worker right after it (tokio's LIFO slot, which other workers do not steal
    // from), so the two took turns on one core. Measured end to end, alternating: as a
    // task 49,500/44,700/54,600 changes/s, on its own thread 58,700/63,500/59,200. (When
    // setting up the database fails below, the stage ends by itself: its channel closes.)
    let runtime = tokio::runtime::Handle::current();
    let stage = tokio::task::spawn_blocking(move || runtime.block_on(stage));

    let slot = config.source.slot_name(&config.name);
    let publication = config.source.publication_name(&config.name);
    let admin = Arc::new(setup::connect(&config.source.url).await?);
    setup::ensure_publication(&admin, &publication, &tables).await?;
    let plan = start_plan(
        setup::slot_state(&admin, &slot).await?,
        config.source.snapshot_mode(),
    )
    .map_err(|why| RunError::Setup(format!("replication slot {slot}: {why}")))?;

    // A stage that fails stops the source (which then ends the others), also while the
    // database is idle; shutdown stops it too.
    let stop = shutdown.child_token();
    let options = StreamOptions {
        connector: config.name.clone(),
        slot: slot.clone(),
        publication,
        start: PgLsn(0),
    };

    // The source runs as a task of its own, so that reading and decoding the stream use
    // another core than mapping and encoding. It owns the sender: when it ends, the channel
    // closes and the sink drains.
    let source = {
        let (url, name, admin, shutdown) = (
            config.source.url.clone(),
            config.name.clone(),
            admin.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            if plan == Start::DropAndSnapshot {
                warn!(slot = %slot, "the slot lost the WAL it needs: dropping it and taking a new snapshot (snapshot.mode = when_needed)");
                setup::drop_slot(&admin, &slot).await?;
            }
            let stream = if plan == Start::Resume {
                info!(slot = %slot, "resuming from the slot's confirmed position");
                ReplicationStream::start(&url, &options).await?
            } else if plan != Start::Stream {
                let snapshot = ExportedSnapshot::create(&url, &slot, &options.publication).await?;
                let rows =
                    read_tables(&url, &snapshot, &name, &tables, SNAPSHOT_CHUNK, &out).await?;
                info!(slot = %slot, rows, "snapshot read");
                let database = setup::database(&admin).await?;
                ReplicationStream::resume(snapshot.start_streaming().await?, &name, &database)
            } else {
                setup::create_slot(&admin, &slot).await?;
                ReplicationStream::start(&url, &options).await?
            };
            read_stream(stream, &out, acknowledgements, &shutdown).await
        })
    };
    // Heartbeats into the WAL until the source stops, for whatever reason.
    let heartbeat_interval = config.source.heartbeat_interval();
    let source_done = shutdown.child_token();
    let source = async {
        let result = source
            .await
            .unwrap_or_else(|e| Err(RunError::Setup(format!("the source task failed: {e}"))));
        source_done.cancel();
        result
    };
    let heartbeats = async {
        let mut tick = tokio::time::interval(heartbeat_interval);
        loop {
            tokio::select! {
                () = source_done.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = ReplicationStream::emit_heartbeat(&admin).await {
                        warn!(error = %e, "writing a heartbeat failed");
                    }
                }
            }
        }
    };
    let stage = stopping_on_error(&stop, async {
        stage
            .await
            .unwrap_or_else(|e| Err(RunError::Setup(format!("the mapping stage failed: {e}"))))
    });
    let (source, summary, ()) = tokio::join!(source, stage, heartbeats);
    // A stage that failed is why the source stopped, if it did: its error first.
    let summary = summary?;
    let stream = source?;
    if let Some(safe) = summary.acknowledged {
        stream.acknowledge(safe);
        setup::wait_for_flush(&admin, &config.source.slot_name(&config.name), safe).await;
    }
    stream.stop();
    Ok(summary)
}

/// Run a stage; if it fails, cancel `stop`.
async fn stopping_on_error<T>(
    stop: &CancellationToken,
    stage: impl Future<Output = Result<T, RunError>>,
) -> Result<T, RunError> {
    let result = stage.await;
    if result.is_err() {
        stop.cancel();
    }
    result
}

/// Read the stream into `out` until shutdown, reporting acknowledged positions to the
/// server. Returns the stream, so that the last acknowledgement can follow the drain.
async fn read_stream(
    mut stream: ReplicationStream,
    out: &mpsc::Sender<SourceMessage>,
    mut acknowledgements: watch::Receiver<Option<PgLsn>>,
    shutdown: &CancellationToken,
) -> Result<ReplicationStream, RunError> {
    loop {
        let next = tokio::select! {
            biased;
            // Shutdown first: stop reading, let the sink drain.
            () = shutdown.cancelled() => break,
            // An acknowledgement is passed on at once, also while the database is idle (it
            // waited for the next message or 200 ms before: the end of a burst reached the
            // server up to 200 ms after Kafka had it).
            Ok(()) = acknowledgements.changed() => {
                if let Some(safe) = *acknowledgements.borrow_and_update() {
                    debug!(position = %safe, "acknowledging");
                    stream.acknowledge(safe);
                }
                continue;
            }
            next = stream.next() => next,
        };
        // Held inline: nothing allocated per change on its way to the channel.
        let messages: SmallVec<[SourceMessage; 1]> = match next? {
            None => break,
            Some(Decoded::Changes(changes)) => {
                changes.into_iter().map(SourceMessage::Change).collect()
            }
            Some(
                Decoded::Committed {
                    commit_lsn: lsn, ..
                }
                | Decoded::Heartbeat(lsn),
            ) => smallvec![SourceMessage::Progress(Position::Postgres(lsn))],
            Some(Decoded::Nothing) => SmallVec::new(),
        };
        for message in messages {
            if out.send(message).await.is_err() {
                return Ok(stream);
            }
        }
    }
    Ok(stream)
}

/// Where the stage writes: the topics' prefix, the dead-letter topic, the connector's name.
struct Destinations {
    prefix: String,
    dead_letter_topic: String,
    connector: String,
}

/// A message sent, by the id it was sent with: its change's position, and for an event its
/// table's acknowledgement counter and commit time.
struct InFlight {
    lsn: PgLsn,
    event: Option<(Counter, Option<DateTime<Utc>>)>,
}

/// Messages handed to librdkafka and not yet acknowledged, and the positions they hold back.
struct Sink {
    producer: StreamProducer,
    /// By id, from `first`, the oldest not answered yet, on. Ids are handed out in order and
    /// Kafka mostly answers in that order; an answer that comes early leaves its place empty
    /// until those before it came. So the length is the window from the oldest message
    /// waiting to the newest: bounding it bounds this and the tracker, also when one topic
    /// stalls while others are answered.
    in_flight: VecDeque<Option<InFlight>>,
    first: usize,
    tracker: AckTracker<PgLsn>,
}

impl Sink {
    /// Hand one message to librdkafka (which copies it); its acknowledgement counts for `lsn`.
    async fn send(
        &mut self,
        (topic, key, payload): (&str, &str, &[u8]),
        headers: &[(&str, &str)],
        lsn: PgLsn,
        event: Option<(Counter, Option<DateTime<Utc>>)>,
    ) -> Result<(), SinkError> {
        let id = self.first + self.in_flight.len();
        self.producer.send(id, topic, key, payload, headers).await?;
        self.in_flight.push_back(Some(InFlight { lsn, event }));
        Ok(())
    }

    /// Count Kafka's answer about message `id`. A message Kafka refused after its retries
    /// stops the connector: nothing after it is acknowledged, so a restart writes it again.
    fn delivered(
        &mut self,
        (id, result): Delivery,
        commit_to_ack: &metrics::Histogram,
    ) -> Result<(), SinkError> {
        let Some(InFlight { lsn, event }) = id
            .checked_sub(self.first)
            .and_then(|at| self.in_flight.get_mut(at))
            .and_then(Option::take)
        else {
            return Ok(());
        };
        while let Some(None) = self.in_flight.front() {
            self.in_flight.pop_front();
            self.first += 1;
        }
        result?;
        if let Some((acked, commit_time)) = event {
            acked.increment(1);
            if let Some(commit_time) = commit_time {
                commit_to_ack.record(observe::seconds_since(commit_time));
            }
        }
        self.tracker.acknowledge(&lsn);
        Ok(())
    }
}

/// The mapping stage and the sink, as one loop: map each change, encode its events and
/// dead letters and hand them to librdkafka; count Kafka's acknowledgements and pass each
/// newly safe position on to the source. Takes no more changes while the messages from the
/// oldest unacknowledged on number [`MAX_IN_FLIGHT`] (the events of one batch may pass
/// it); ends when the source's channel closes and every message is acknowledged. Takes no
/// change before `ready` gives the codec (the topics exist and the schemas are
/// registered). Returns what it counted and the last safe position.
///
/// One loop on one thread: no message crosses to another thread before librdkafka's copy,
/// and the key and payload are written into the same two buffers each time. (Mapping and
/// sending as two stages on two threads, handing each batch's messages over a channel, cost
/// more CPU per change.)
async fn map_and_send(
    mut received: mpsc::Receiver<SourceMessage>,
    mapper: Mapper,
    (producer, mut deliveries): (StreamProducer, mpsc::UnboundedReceiver<Delivery>),
    ready: impl Future<Output = Result<EventCodec, RunError>>,
    to: Destinations,
    acked: watch::Sender<Option<PgLsn>>,
) -> Result<RunSummary, RunError> {
    let mut summary = RunSummary::default();
    let mut measured = Metrics::new(&to.connector);
    let mut sink = Sink {
        producer,
        in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT + RECEIVE_BATCH),
        first: 0,
        tracker: AckTracker::default(),
    };
    let (mut key, mut payload) = (String::new(), Vec::with_capacity(1024));
    let mut batch = Vec::with_capacity(RECEIVE_BATCH);
    let mut reports = Vec::with_capacity(MAX_IN_FLIGHT);
    let mut open = true;
    let codec = ready.await?;
    while open || !sink.in_flight.is_empty() {
        measured.in_flight.set(sink.in_flight.len() as f64);
        tokio::select! {
            biased;
            // Acknowledgements first: they free room and let positions advance.
            reported = deliveries.recv_many(&mut reports, MAX_IN_FLIGHT), if !sink.in_flight.is_empty() => {
                if reported == 0 {
                    return Err(SinkError::Delivery("the producer stopped reporting deliveries".into()).into());
                }
                for report in reports.drain(..) {
                    sink.delivered(report, &measured.commit_to_ack)?;
                }
            }
            // Many at once: taking one change at a time from a full channel woke the source
            // for every change, and the two threads took turns instead of working.
            taken = received.recv_many(&mut batch, RECEIVE_BATCH), if open && sink.in_flight.len() < MAX_IN_FLIGHT => {
                if taken == 0 {
                    open = false;
                    continue;
                }
                measured.channel_depth.set(received.len() as f64);
                for message in batch.drain(..) {
                    let change = match message {
                        SourceMessage::Progress(Position::Postgres(lsn)) => {
                            sink.tracker.complete(lsn);
                            continue;
                        }
                        SourceMessage::Progress(_) => continue,
                        SourceMessage::Change(change) => change,
                    };
                    let Position::Postgres(lsn) = change.position else {
                        continue;
                    };
                    if change.op == crate::change::Operation::Read {
                        summary.snapshot_rows += 1;
                    }
                    if let Some(commit_time) = change.commit_time {
                        measured.source_lag_ms.set(
                            (change.capture_time - commit_time).num_milliseconds().max(0) as f64,
                        );
                    }
                    let table = measured.table(&change.source);
                    table.read.increment(1);
                    let outcome = mapper.map(&change);
                    summary.suppressed += outcome.suppressed as u64;
                    table.suppressed.increment(outcome.suppressed as u64);
                    table.mapped.increment(outcome.events.len() as u64);
                    // A change without messages (a suppressed no-op, a table without a
                    // mapping) is safe at once.
                    sink.tracker.track(lsn, outcome.events.len() + outcome.failures.len());
                    for event in &outcome.events {
                        let topic = event.topic(&to.prefix);
                        codec.encode_into(event, &topic, &mut payload).await?;
                        event.write_key(&mut key);
                        let acknowledged = (table.acked.clone(), change.commit_time);
                        sink.send((&topic, &key, &payload), &event.headers(), lsn, Some(acknowledged)).await?;
                        summary.events += 1;
                        table.produced.increment(1);
                    }
                    for failure in outcome.failures {
                        // The reason names columns and rules, never row values.
                        warn!(mapping = failure.mapping_id, table = %change.source.qualified_name(), position = %change.position,
                            reason = %failure.error, "a change went to the dead-letter topic");
                        summary.dead_letters += 1;
                        table.dead_letters.increment(1);
                        let key = format!("{}:{}", change.source.qualified_name(), change.position);
                        let record = dead_letter::record(&change, &failure);
                        sink.send((&to.dead_letter_topic, &key, &record), &[("mapping_id", &failure.mapping_id)], lsn, None).await?;
                    }
                }
            }
        }
        if let Some(safe) = sink.tracker.safe().copied() {
            summary.acknowledged = Some(safe);
            acked.send_if_modified(|current| current.replace(safe) != Some(safe));
        }
    }
    Ok(summary)
}

mod setup {
    //! The PostgreSQL objects the connector needs, created when absent, never dropped.

    use std::time::Duration;

    use tokio_postgres::{Client, NoTls};

    use super::{RunError, SlotState};
    use crate::{change::PgLsn, config::Secret};

    fn fail(what: &str) -> impl Fn(tokio_postgres::Error) -> RunError + '_ {
        move |e| RunError::Setup(format!("{what}: {e}"))
    }

    pub async fn connect(url: &Secret) -> Result<Client, RunError> {
        let (client, connection) = tokio_postgres::connect(url.expose(), NoTls)
            .await
            .map_err(fail("connecting to PostgreSQL"))?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub async fn database(client: &Client) -> Result<String, RunError> {
        Ok(client
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(fail("reading the database name"))?
            .get(0))
    }

    pub async fn ensure_publication(
        client: &Client,
        name: &str,
        tables: &[(String, String)],
    ) -> Result<(), RunError> {
        let exists = client
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
            .await
            .map_err(fail("looking up the publication"))?
            .is_some();
        if !exists {
            let list: Vec<String> = tables
                .iter()
                .map(|(s, t)| format!("\"{s}\".\"{t}\""))
                .collect();
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION \"{name}\" FOR TABLE {}",
                    list.join(", ")
                ))
                .await
                .map_err(fail(
                    "creating the publication (the role must own the mapped tables)",
                ))?;
        }
        Ok(())
    }

    pub async fn slot_state(client: &Client, slot: &str) -> Result<SlotState, RunError> {
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

    pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), RunError> {
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(fail("dropping the lost replication slot"))?;
        Ok(())
    }

    pub async fn create_slot(client: &Client, slot: &str) -> Result<(), RunError> {
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
    fn snapshot_modes_decide_the_start() {
        use SlotState::*;
        use SnapshotMode::*;
        for mode in [Initial, Never, WhenNeeded] {
            assert_eq!(start_plan(Usable, mode), Ok(Start::Resume), "{mode:?}");
        }
        assert_eq!(start_plan(Absent, Initial), Ok(Start::Snapshot));
        assert_eq!(start_plan(Absent, WhenNeeded), Ok(Start::Snapshot));
        assert_eq!(start_plan(Absent, Never), Ok(Start::Stream));
        assert_eq!(start_plan(Lost, WhenNeeded), Ok(Start::DropAndSnapshot));
        for mode in [Initial, Never] {
            let refusal = start_plan(Lost, mode).unwrap_err();
            assert!(refusal.contains("when_needed"), "{refusal}");
        }
    }

    /// Kafka's answers out of order: the window keeps its oldest unanswered message, a
    /// position is safe only once every message at or before it is answered, and the
    /// window empties once all are. (The producer is never connected: librdkafka queues.)
    #[tokio::test]
    async fn the_window_of_messages_in_flight_starts_at_the_oldest_unanswered() {
        let properties = toml::from_str(r#""bootstrap.servers" = "127.0.0.1:9""#).unwrap();
        let (producer, _reports) = StreamProducer::new(&properties).unwrap();
        let mut sink = Sink {
            producer,
            in_flight: VecDeque::new(),
            first: 0,
            tracker: AckTracker::default(),
        };
        // Ids 0 and 1 for the transaction at 10, 2 for the one at 20, 3 for the one at 30.
        for (lsn, messages) in [(10, 2), (20, 1), (30, 1)] {
            sink.tracker.track(PgLsn(lsn), messages);
            for _ in 0..messages {
                let message = ("t", "k", &b"v"[..]);
                sink.send(message, &[], PgLsn(lsn), None).await.unwrap();
            }
            sink.tracker.complete(PgLsn(lsn));
        }
        let histogram = metrics::Histogram::noop();
        let answer = |sink: &mut Sink, id| sink.delivered((id, Ok((0, 0))), &histogram);

        answer(&mut sink, 2).unwrap();
        answer(&mut sink, 1).unwrap();
        assert_eq!(
            (sink.first, sink.in_flight.len()),
            (0, 4),
            "id 0 holds the window"
        );
        assert_eq!(sink.tracker.safe(), None);

        answer(&mut sink, 0).unwrap();
        assert_eq!((sink.first, sink.in_flight.len()), (3, 1));
        assert_eq!(sink.tracker.safe(), Some(&PgLsn(20)));

        // An answer about an id no longer (or never) in flight changes nothing.
        answer(&mut sink, 1).unwrap();
        answer(&mut sink, 7).unwrap();
        assert_eq!((sink.first, sink.in_flight.len()), (3, 1));

        let refused = sink.delivered((3, Err(SinkError::Delivery("refused".into()))), &histogram);
        assert!(refused.is_err(), "a refused message stops the stage");
        assert!(sink.in_flight.is_empty());
        assert_eq!(sink.tracker.safe(), Some(&PgLsn(20)), "30 is not safe");
    }
}
