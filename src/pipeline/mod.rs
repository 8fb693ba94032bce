//! The connector at work: a [`Source`] → mappings → Avro → Kafka, with source positions
//! acknowledged only after Kafka has every event at or before them, and the connector's
//! state saved with them.
//!
//! Two stages joined by a bounded channel of [`CHANNEL_DEPTH`] changes, each on a core of
//! its own when there is one: the source reads its database's log (and its snapshot
//! chunks); the mapping stage maps each change, encodes its events and dead letters and
//! hands them to librdkafka, and takes no more changes while [`MAX_IN_FLIGHT`] messages,
//! from the oldest unacknowledged on, are out — so a slow or absent Kafka holds the mapping
//! and the source back and nothing grows without bound. Each Kafka acknowledgement feeds the
//! [`AckTracker`]; the tracker's safe position travels back to the source, which reports it
//! to its database and publishes the connector's state as of it; a task saves that state to
//! the state topic ([`StateStore`]): snapshot progress at once, a position alone at most
//! every [`STATE_INTERVAL`], and once more at the end. A crash anywhere therefore re-reads from a position whose events all reached Kafka,
//! and re-emitted events carry the same ids. The pipeline never names a database.
//!
//! A change a mapping cannot turn into an event goes to the dead-letter topic
//! `<prefix>.dlq.<connector>` with the reason and the row as the database sent it; it counts
//! as written once Kafka acknowledged the dead letter.

pub mod dead_letter;
pub mod window;

use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::window::DeliveryWindow;
use crate::observe::pipeline::{waits, Metrics, Waiting};
use crate::{
    canonical::{
        registry::{CodecError, EventCodec},
        CanonicalEvent,
    },
    change::SourceMessage,
    config::{ConnectorConfig, DeadLetterRows, TopicClass, TopicsConfig},
    error::{Kind, Kinded},
    kafka::{self, ensure_topics, message_limits, Delivery, StreamProducer, TopicSpec},
    mapping::{self, MapContext, MapError, MapFailure, Mapper, Mapping},
    offsets::{ConnectorState, RunningMappings, StateError, StateStore},
    source::{self, Source, SourceError, SourceIo},
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
/// The connector's state is saved at most this often (and once more at the end): a crash
/// re-reads at most this much more than the database's own acknowledged position.
pub const STATE_INTERVAL: Duration = Duration::from_secs(1);

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
    Source(#[from] SourceError),
    #[error("the connector's state: {0}")]
    State(#[from] StateError),
    #[error(transparent)]
    Sink(#[from] kafka::Error),
    #[error("encoding an event failed: {0}")]
    Codec(#[from] CodecError),
}

impl RunError {
    /// Whether starting the connector again may succeed by itself: the database, Kafka or
    /// the registry unreachable or restarting. Everything else (configuration, mappings,
    /// privileges, a topic Kafka refuses to create) stays until someone fixes it.
    pub fn is_transient(&self) -> bool {
        self.kind() == Kind::Transient
    }
}

impl Kinded for RunError {
    fn kind(&self) -> Kind {
        match self {
            RunError::Source(e) => e.kind(),
            RunError::State(e) => e.kind(),
            RunError::Sink(e) => Kinded::kind(e),
            RunError::Codec(e) => e.kind(),
            RunError::NoMappings | RunError::Mappings(_) | RunError::Setup(_) => {
                Kind::Configuration
            }
        }
    }
}

/// What a run did, for the log and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub snapshot_rows: u64,
    pub events: u64,
    pub suppressed: u64,
    pub dead_letters: u64,
    /// The last position acknowledged to the source database.
    pub acknowledged: Option<String>,
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
            ..MapContext::default()
        },
        source_system,
    )
    .map_err(RunError::Setup)
}

/// Fill the lookups of `mapper` with the current rows of the tables they read, in one
/// consistent read, before anything is mapped; the changes that follow keep them current.
/// A row that cannot be held (more rows than `max_rows`) stops it.
pub async fn load_lookups(config: &ConnectorConfig, mapper: &Mapper) -> Result<(), RunError> {
    let tables = mapper.looked_up_tables();
    if tables.is_empty() {
        return Ok(());
    }
    let (out, mut rows) = mpsc::channel(256);
    let reading = async {
        let read = source::read_consistent(config, &tables, &out).await;
        drop(out);
        read
    };
    let taking = async {
        let mut refused = None;
        while let Some(message) = rows.recv().await {
            if let SourceMessage::Change(change) = message {
                refused = refused.or(mapper.remember(&change).into_iter().next());
            }
        }
        refused
    };
    let (read, refused) = tokio::join!(reading, taking);
    read?;
    if let Some(refused) = refused {
        return Err(RunError::Setup(format!(
            "loading the lookups of mapping `{}`: {}",
            refused.mapping_id, refused.error
        )));
    }
    info!(
        tables = tables.len(),
        rows = mapper.remembered(),
        "lookups loaded"
    );
    Ok(())
}

/// The topics of a connector's events, one per domain and resource type of its mappings,
/// each with the resource type its events carry and the class of topics it is in.
pub fn event_topics<'a>(
    topics: &'a TopicsConfig,
    mappings: &[Mapping],
) -> BTreeMap<String, (String, &'a TopicClass)> {
    mappings
        .iter()
        .flat_map(|m| {
            m.resources.iter().map(move |r| {
                let topic = topics.event_topic(m.sensitivity, &m.domain, &r.resource_type);
                (
                    topic,
                    (r.resource_type.clone(), topics.class(m.sensitivity)),
                )
            })
        })
        .collect()
}

/// The topics a connector writes — those of its events, and its dead-letter topic — each
/// with its class's settings.
pub fn topic_specs(config: &ConnectorConfig, mappings: &[Mapping]) -> Vec<TopicSpec> {
    let topics = &config.topics;
    let mut classes: BTreeMap<String, &TopicClass> = event_topics(topics, mappings)
        .into_iter()
        .map(|(topic, (_, class))| (topic, class))
        .collect();
    classes.insert(config.dead_letter_topic(), &topics.dead_letters);
    classes
        .into_iter()
        .map(|(name, class)| TopicSpec {
            name,
            partitions: topics.partitions,
            replication_factor: topics.replication_factor,
            config: class
                .config
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        })
        .collect()
}

/// What `run` records of `mappings` when it starts with them.
pub fn running_mappings(mappings: &[Mapping]) -> RunningMappings {
    RunningMappings {
        versions: mappings
            .iter()
            .map(|m| (m.id.to_string(), m.content_hash.to_string()))
            .collect(),
        tables: mapping::source_tables(mappings)
            .into_iter()
            .map(|(schema, table)| format!("{schema}.{table}"))
            .collect(),
    }
}

/// The store the mappings `run` starts with are recorded in, and their record.
fn recording_mappings(
    config: &ConnectorConfig,
    mappings: &[Mapping],
) -> impl Future<Output = Result<(StateStore, RunningMappings), RunError>> {
    let versions = running_mappings(mappings);
    let (kafka, topic, name) = (
        config.kafka.clone(),
        config.state_topic(),
        config.name.clone(),
    );
    let replication = config.topics.replication_factor;
    async move {
        let store = StateStore::open(&kafka, &topic, &name, replication).await?;
        Ok((store, versions))
    }
}

/// Run the connector until `shutdown` is cancelled, then drain what is in flight,
/// acknowledge it and return; a source that ends by itself is a transient failure.
/// `source` makes the source of the mapped tables (`(schema, table)`); what delivery waits
/// on is kept in `waiting`.
pub async fn run<S: Source>(
    config: &ConnectorConfig,
    source: impl FnOnce(Vec<(String, String)>) -> S,
    waiting: Arc<Waiting>,
    shutdown: CancellationToken,
) -> Result<RunSummary, RunError> {
    let mappings_config = config.mappings.as_ref().ok_or(RunError::NoMappings)?;
    let mappings = mapping::load_dir(&mappings_config.path)?;
    let source = source(mapping::source_tables(&mappings));
    let dead_letter_topic = config.dead_letter_topic();
    let specs = topic_specs(config, &mappings);
    let event_topics: BTreeMap<String, String> = event_topics(&config.topics, &mappings)
        .into_iter()
        .map(|(topic, (resource_type, _))| (topic, resource_type))
        .collect();
    // Connecting to Kafka (and, with idempotence, getting a producer id) starts now.
    let producer = StreamProducer::new(&config.kafka)?;
    let running = recording_mappings(config, &mappings);
    let mapper = mapper_for(config, mappings)?;
    let lookups = load_lookups(config, &mapper);
    tokio::select! {
        loaded = lookups => loaded?,
        () = shutdown.cancelled() => return Ok(RunSummary::default()),
    }
    // The mapping stage starts first: it creates the topics, builds the registry's client
    // and registers the events' schemas while the state is read and the database set up
    // (≈ 250 ms for new topics, ≈ 150 ms for the client and the schemas); it takes no change
    // before they are done.
    let (out, received) = mpsc::channel(CHANNEL_DEPTH);
    let (acked, durable) = watch::channel(None::<S::Position>);
    let (kafka, registry) = (config.kafka.clone(), config.schema_registry.clone());
    let readying = waiting.clone();
    let ready = async move {
        let codec = EventCodec::new(&registry)?;
        let registered = async {
            for (topic, resource_type) in &event_topics {
                codec.register(topic, resource_type).await?;
            }
            readying.done_with(waits::REGISTRY);
            Ok::<_, RunError>(())
        };
        let topics = async {
            let created = ensure_topics(&kafka, &specs).await?;
            info!(
                created = created.len(),
                topics = specs.len(),
                "topics ready"
            );
            let names: Vec<String> = specs.into_iter().map(|s| s.name).collect();
            let limits = MessageLimits(message_limits(&kafka, &names).await?);
            readying.done_with(waits::KAFKA);
            Ok(limits)
        };
        let ((), limits) = tokio::try_join!(registered, topics)?;
        // Recorded once the schemas are in and before a change is taken: what `plan`
        // compares mapping files with.
        let (store, versions) = running.await?;
        store.save_mappings(&versions).await?;
        Ok((codec, limits))
    };
    // A stage that fails stops the source (which then ends the others); shutdown stops it
    // too, also while the stage is still getting ready.
    let stop = shutdown.child_token();
    let stage = map_and_send::<S>(
        received,
        mapper,
        producer,
        ready,
        Destinations {
            topics: config.topics.clone(),
            dead_letter_topic,
            dead_letter_rows: config.dead_letters.rows,
            connector: config.name.clone(),
        },
        (acked, waiting),
        stop.clone(),
    );
    // On a thread of its own, not as a task: woken by the source, a task runs on the
    // source's worker right after it (tokio's LIFO slot, which other workers do not steal
    // from), so the two took turns on one core. Measured end to end, alternating: as a
    // task 49,500/44,700/54,600 changes/s, on its own thread 58,700/63,500/59,200. (When
    // the source cannot start, the stage ends by itself: its channel closes.)
    let runtime = tokio::runtime::Handle::current();
    let stage = tokio::task::spawn_blocking(move || runtime.block_on(stage));
    let stage = stopping_on_error(&stop, async {
        stage
            .await
            .unwrap_or_else(|e| Err(RunError::Setup(format!("the mapping stage failed: {e}"))))
    });

    // The source, as a task of its own: reading and decoding use another core than mapping
    // and encoding. It owns the sender: when it ends, the channel closes and the stage
    // drains. It starts from the stored state.
    let source = async {
        // Reading the state can wait on an absent Kafka: a stop request ends it at once.
        // Once the source runs, a stop lets it drain, and the last state is saved.
        let starting = async {
            let store = StateStore::of(config).await?;
            let stored = store.load().await?;
            Ok::<_, RunError>((store, stored))
        };
        let (store, stored) = tokio::select! {
            started = starting => started?,
            () = stop.cancelled() => return Ok(()),
        };
        match &stored {
            Some(state) => info!(position = state.position, "resuming from the stored state"),
            None => info!(topic = store.topic(), "no stored state: starting afresh"),
        }
        // Until the source publishes, the stored state stands: a source that fails before
        // (a second copy of a running connector, a database down) must not overwrite it.
        let (published, states) = watch::channel(
            stored
                .clone()
                .unwrap_or_else(|| ConnectorState::new(S::KIND)),
        );
        let io = SourceIo {
            out,
            durable,
            state: published,
            shutdown: stop.clone(),
        };
        let source = tokio::spawn(source.run(stored, io));
        let (source, ()) = tokio::join!(source, save_states(&store, states));
        source.unwrap_or_else(|e| {
            Err(SourceError::Connector(format!(
                "the source task failed: {e}"
            )))
        })?;
        // Capture ends on a stop request (or a failed stage, which says why); a source that
        // ends by itself has lost its database, and the connector must come back.
        if !stop.is_cancelled() {
            return Err(SourceError::Transient(format!(
                "the {} source ended without a stop request",
                S::KIND
            ))
            .into());
        }
        Ok::<_, RunError>(())
    };
    let (source, summary) = tokio::join!(stopping_on_error(&stop, source), stage);
    // A stage that failed is why the source stopped, if it did: its error first.
    let summary = summary?;
    source?;
    Ok(summary)
}

/// Save each state the source publishes that differs from the one it started from: snapshot
/// progress at once (a crash would otherwise read a finished chunk again), a position alone
/// at most every [`STATE_INTERVAL`], and the last state once the source is done. A failed save is logged once per streak and retried
/// with the next state: an older stored state only means more to read again after a crash.
async fn save_states(store: &StateStore, mut states: watch::Receiver<ConnectorState>) {
    let mut failing = false;
    let mut save = async |state: &ConnectorState| match store.save(state).await {
        Ok(()) if failing => {
            info!("saving the connector's state works again");
            failing = false;
        }
        Ok(()) => {}
        Err(e) if !failing => {
            warn!(error = %e, "saving the connector's state failed; retrying with the next");
            failing = true;
        }
        Err(_) => {}
    };
    let mut saved = states.borrow_and_update().clone();
    loop {
        // Progress at once; otherwise whatever position the source wrote meanwhile, at most
        // every interval (positions alone do not notify).
        let progressed = {
            let progressed = states.wait_for(|s| {
                s.tables != saved.tables
                    || s.requests != saved.requests
                    || s.dropped != saved.dropped
            });
            tokio::time::timeout(STATE_INTERVAL, progressed)
                .await
                .map(|found| found.is_ok())
        };
        let open = match progressed {
            Ok(open) => open,
            Err(_) => states.has_changed().is_ok(),
        };
        let state = states.borrow_and_update().clone();
        if state != saved {
            save(&state).await;
            saved = state;
        }
        if !open {
            break;
        }
    }
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

/// When a change was committed (else captured: a snapshot row): how long it has waited.
fn change_time(message: &SourceMessage) -> Option<chrono::DateTime<chrono::Utc>> {
    match message {
        SourceMessage::Change(change) => Some(change.commit_time.unwrap_or(change.capture_time)),
        SourceMessage::Progress(_) => None,
    }
}

/// The largest message each topic takes, in bytes.
struct MessageLimits(std::collections::HashMap<String, usize>);

impl MessageLimits {
    /// Room left in a message for the record's framing and headers (event id, resource
    /// type, connector: well under this).
    const FRAMING: usize = 512;

    /// The bytes of key and payload a message to `topic` may have.
    fn room(&self, topic: &str) -> usize {
        self.0
            .get(topic)
            .map_or(usize::MAX, |limit| limit.saturating_sub(Self::FRAMING))
    }

    /// Why `event`, `size` bytes of key and payload, cannot go to `topic`, if it cannot.
    fn refuses(&self, topic: &str, event: &CanonicalEvent, size: usize) -> Option<MapFailure> {
        let limit = *self.0.get(topic)?;
        (size > self.room(topic)).then(|| MapFailure {
            mapping_id: event.provenance.mapping_id.to_string(),
            error: MapError {
                location: format!("topic {topic}"),
                message: format!(
                    "the {} event is {size} bytes, more than the {limit} bytes a message may have there (the smaller of the producer's message.max.bytes and the topic's max.message.bytes, less {} for framing)",
                    event.resource_type,
                    Self::FRAMING
                ),
            },
        })
    }
}

/// Where the stage writes: the topics, the dead-letter topic and what its letters hold,
/// the connector's name.
struct Destinations {
    topics: TopicsConfig,
    dead_letter_topic: String,
    dead_letter_rows: DeadLetterRows,
    connector: String,
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
async fn map_and_send<S: Source>(
    mut received: mpsc::Receiver<SourceMessage>,
    mapper: Mapper,
    (producer, mut deliveries): (StreamProducer, mpsc::UnboundedReceiver<Delivery>),
    ready: impl Future<Output = Result<(EventCodec, MessageLimits), RunError>>,
    to: Destinations,
    (acked, waiting): (watch::Sender<Option<S::Position>>, Arc<Waiting>),
    stop: CancellationToken,
) -> Result<RunSummary, RunError> {
    let mut summary = RunSummary::default();
    let mut measured = Metrics::new(&to.connector);
    let mut sink = DeliveryWindow::new(producer, MAX_IN_FLIGHT + RECEIVE_BATCH);
    let (mut key, mut payload) = (String::new(), Vec::with_capacity(1024));
    let mut batch = Vec::with_capacity(RECEIVE_BATCH);
    let mut reports = Vec::with_capacity(MAX_IN_FLIGHT);
    let mut open = true;
    // Delivery waits on Kafka (the topics) and the registry (the schemas) until ready. Once
    // ready, a start after an outage waits on the source until it sends again; a fresh
    // start with nothing received has nothing waiting.
    let recovering = waiting.is_waiting();
    waiting.wait(None, waits::KAFKA | waits::REGISTRY, false);
    tokio::pin!(ready);
    let (codec, limits) = loop {
        tokio::select! {
            biased;
            ready = &mut ready => break ready?,
            () = stop.cancelled() => return Ok(summary),
            // One batch, taken early to learn how old the waiting changes are.
            taken = received.recv_many(&mut batch, RECEIVE_BATCH), if open && batch.is_empty() => {
                open = taken > 0;
                if let Some(oldest) = batch.iter().find_map(change_time) {
                    waiting.wait(Some(oldest), waits::KAFKA | waits::REGISTRY, false);
                }
            }
        }
    };
    waiting.running();
    match (recovering, batch.is_empty()) {
        (true, _) => waiting.set_on(waits::DATABASE),
        (false, true) => waiting.clear(),
        (false, false) => {}
    }
    // A batch taken before ready leaves `open` set: the loop takes it in with the next.
    while open || !sink.is_empty() {
        measured.in_flight.set(sink.len() as f64);
        let moved = tokio::select! {
            biased;
            // Acknowledgements first: they free room and let positions advance.
            reported = deliveries.recv_many(&mut reports, MAX_IN_FLIGHT), if !sink.is_empty() => {
                if reported == 0 {
                    return Err(kafka::Error::Delivery("the producer stopped reporting deliveries".into()).into());
                }
                for report in reports.drain(..) {
                    sink.delivered(report, &measured.commit_to_ack)?;
                }
                true
            }
            // Many at once: taking one change at a time from a full channel woke the source
            // for every change, and the two threads took turns instead of working.
            // (A batch taken before ready is extended here.)
            taken = received.recv_many(&mut batch, RECEIVE_BATCH), if open && sink.len() < MAX_IN_FLIGHT => {
                if taken == 0 {
                    open = false;
                    if batch.is_empty() {
                        continue;
                    }
                }
                measured.channel_depth.set(received.len() as f64);
                for message in batch.drain(..) {
                    let change = match message {
                        SourceMessage::Progress(position) => {
                            if let Some(position) = S::position(&position) {
                                sink.complete(position);
                            }
                            continue;
                        }
                        SourceMessage::Change(change) => change,
                    };
                    let Some(position) = S::position(&change.position) else {
                        continue;
                    };
                    if change.op == crate::change::Operation::Read {
                        summary.snapshot_rows += 1;
                    }
                    let time = change.commit_time.unwrap_or(change.capture_time);
                    let table = measured.table(&change.source);
                    table.read.increment(1);
                    let outcome = mapper.map(&change);
                    summary.suppressed += outcome.suppressed as u64;
                    table.suppressed.increment(outcome.suppressed as u64);
                    table.mapped.increment(outcome.events.len() as u64);
                    // A change without messages (a suppressed no-op, a table without a
                    // mapping) is safe at once.
                    sink.track(position.clone(), outcome.events.len() + outcome.failures.len());
                    let mut failures = outcome.failures;
                    for event in &outcome.events {
                        let topic = event.topic(&to.topics);
                        codec.encode_into(event, &topic, &mut payload).await?;
                        event.write_key(&mut key);
                        // An event Kafka would refuse goes to the dead-letter topic, as its row:
                        // refused, it would stop the connector on every restart.
                        if let Some(failure) = limits.refuses(&topic, event, payload.len() + key.len()) {
                            failures.push(failure);
                            continue;
                        }
                        let acknowledged = (table.acked.clone(), change.commit_time);
                        sink.send((&topic, &key, &payload), &event.headers(), (&position, time), Some(acknowledged)).await?;
                        summary.events += 1;
                        table.produced.increment(1);
                    }
                    for failure in failures {
                        // The reason names columns and rules, never row values.
                        warn!(mapping = failure.mapping_id, table = %change.source.qualified_name(), position = %change.position,
                            reason = %failure.error, "a change went to the dead-letter topic");
                        summary.dead_letters += 1;
                        table.dead_letters.increment(1);
                        let key = format!("{}:{}", change.source.qualified_name(), change.position);
                        let letters = dead_letter::Letters { rows: to.dead_letter_rows, mapper: &mapper };
                        let record = dead_letter::record(&change, &failure, letters, limits.room(&to.dead_letter_topic));
                        sink.send((&to.dead_letter_topic, &key, &record), &[("mapping_id", &failure.mapping_id)], (&position, time), None).await?;
                    }
                }
                false
            }
        };
        match sink.oldest() {
            None => waiting.clear(),
            Some(oldest) => waiting.wait(Some(oldest), waits::KAFKA, moved),
        }
        if let Some(safe) = sink.safe() {
            if acked.borrow().as_ref() != Some(safe) {
                summary.acknowledged = Some(safe.to_string());
                acked.send_replace(Some(safe.clone()));
            }
        }
    }
    Ok(summary)
}
