//! What `run` measures (see [`super`] for how it is served).
//!
//! Per table (`connector`, `table` labels): changes read, events mapped, produced and
//! acknowledged by Kafka, dead letters, suppressed no-op updates. Per connector: the source
//! lag (now − commit time of the oldest change not yet acknowledged, so it grows through a
//! stall; see [`watch`]), stalls, the commit → Kafka-acknowledgement
//! latency histogram, the changes read and waiting to be mapped and the messages in flight to
//! Kafka; the restarts after transient failures. Labels name tables, never values.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use tracing::{info, warn};

use super::health::{Probe, Readiness};
use crate::{change::SourceTable, error::Kind as ErrorKind};

/// The counters of one table.
#[derive(Debug, Clone)]
pub struct TableMetrics {
    pub read: Counter,
    pub mapped: Counter,
    pub produced: Counter,
    pub acked: Counter,
    pub dead_letters: Counter,
    pub suppressed: Counter,
}

/// The pipeline's handles, registered once per table.
#[derive(Debug)]
pub struct Metrics {
    connector: String,
    /// By schema, then table: looked up with the change's names, without taking a
    /// reference to them (shared with the source's thread) per change.
    tables: HashMap<Arc<str>, HashMap<Arc<str>, TableMetrics>>,
    pub commit_to_ack: Histogram,
    pub channel_depth: Gauge,
    pub in_flight: Gauge,
}

impl Metrics {
    pub fn new(connector: &str) -> Self {
        let labels = [("connector", connector.to_owned())];
        Self {
            connector: connector.to_owned(),
            tables: HashMap::new(),
            commit_to_ack: histogram!("fhir_cdc_commit_to_ack_seconds", &labels),
            channel_depth: gauge!("fhir_cdc_channel_depth", &labels),
            in_flight: gauge!("fhir_cdc_in_flight_messages", &labels),
        }
    }

    pub fn table(&mut self, source: &SourceTable) -> &TableMetrics {
        let known = self
            .tables
            .get(&source.schema)
            .is_some_and(|tables| tables.contains_key(&source.table));
        if !known {
            self.add(source);
        }
        &self.tables[&source.schema][&source.table]
    }

    fn add(&mut self, source: &SourceTable) {
        let connector = &self.connector;
        self.tables
            .entry(source.schema.clone())
            .or_default()
            .entry(source.table.clone())
            .or_insert_with(|| {
                let labels = [
                    ("connector", connector.clone()),
                    ("table", format!("{}.{}", source.schema, source.table)),
                ];
                TableMetrics {
                    read: counter!("fhir_cdc_changes_read_total", &labels),
                    mapped: counter!("fhir_cdc_events_mapped_total", &labels),
                    produced: counter!("fhir_cdc_events_produced_total", &labels),
                    acked: counter!("fhir_cdc_events_acked_total", &labels),
                    dead_letters: counter!("fhir_cdc_dead_letters_total", &labels),
                    suppressed: counter!("fhir_cdc_suppressed_updates_total", &labels),
                }
            });
    }
}

/// A restart of the connector after a transient failure (`cause`: `source`, `kafka`,
/// `registry`, `state`).
pub fn restarted(connector: &str, cause: &'static str) {
    counter!("fhir_cdc_restarts_total", "connector" => connector.to_owned(), "cause" => cause)
        .increment(1);
}

/// What delivery waits on, as [`Waiting`] records it: bits, since Kafka and the registry
/// may both be awaited at once (while the connector starts).
pub mod waits {
    pub const KAFKA: u8 = 1;
    pub const REGISTRY: u8 = 2;
    pub const DATABASE: u8 = 4;

    /// The systems `on` names, for a log line.
    pub fn describe(on: u8) -> String {
        let named: Vec<&str> = [
            (KAFKA, "Kafka"),
            (REGISTRY, "the schema registry"),
            (DATABASE, "the source database"),
        ]
        .into_iter()
        .filter(|(bit, _)| on & bit != 0)
        .map(|(_, name)| name)
        .collect();
        if named.is_empty() {
            "nothing known".to_owned()
        } else {
            named.join(" and ")
        }
    }
}

/// Whether changes wait to be delivered, since when, and on what: written by the mapping
/// stage and by `run`'s restart loop, read every second by [`watch`], which turns it into
/// the source lag and the stall warnings. Times are milliseconds since the epoch; 0 is none.
#[derive(Debug, Default)]
pub struct Waiting {
    /// The commit time of the oldest change read and not yet acknowledged by Kafka (while
    /// the connector is down: at the latest, when it went down).
    oldest: AtomicI64,
    /// When delivery last moved while changes waited.
    since: AtomicI64,
    on: AtomicU8,
    /// Capture runs: the topics and schemas are ready and the source is read (false from
    /// a transient failure until the restart gets there again).
    running: AtomicBool,
    /// Capture ran at least once.
    started: AtomicBool,
    /// The kind of the failure that stopped capture last: 1 + its index in
    /// [`ErrorKind::ALL`]; 0 for none since capture last ran.
    failed: AtomicU8,
    /// When [`watch`] last made its round.
    beat: AtomicI64,
}

impl Waiting {
    /// Whether changes wait (or the connector is down).
    pub fn is_waiting(&self) -> bool {
        self.since.load(Relaxed) != 0
    }

    /// Nothing waits: every change read is acknowledged.
    pub fn clear(&self) {
        self.oldest.store(0, Relaxed);
        self.since.store(0, Relaxed);
        self.on.store(0, Relaxed);
    }

    /// Changes wait on `on`, the oldest committed at `oldest` (when known); `moved`: delivery
    /// made progress just now.
    pub fn wait(&self, oldest: Option<DateTime<Utc>>, on: u8, moved: bool) {
        let now = Utc::now().timestamp_millis();
        if let Some(oldest) = oldest {
            self.oldest.store(oldest.timestamp_millis(), Relaxed);
        } else {
            // Keep what an outage recorded until a change tells better.
            let _ = self.oldest.compare_exchange(0, now, Relaxed, Relaxed);
        }
        if moved {
            self.since.store(now, Relaxed);
        } else {
            let _ = self.since.compare_exchange(0, now, Relaxed, Relaxed);
        }
        self.on.store(on, Relaxed);
    }

    /// Delivery now also, or only, waits on `on` (a restart's cause; the parts of a start).
    pub fn set_on(&self, on: u8) {
        self.on.store(on, Relaxed);
    }

    /// `part` of what delivery waited on is done.
    pub fn done_with(&self, part: u8) {
        self.on.fetch_and(!part, Relaxed);
    }

    /// The connector went down (a failure of `kind`) and waits on `on` to come back: what
    /// waited still waits, and if nothing did, the outage itself counts from now.
    pub fn down(&self, on: u8, kind: ErrorKind) {
        self.running.store(false, Relaxed);
        self.failed.store(kind as u8 + 1, Relaxed);
        self.wait(None, on, false);
    }

    /// Capture runs: the topics and schemas are ready, the source is read.
    pub fn running(&self) {
        self.failed.store(0, Relaxed);
        self.started.store(true, Relaxed);
        self.running.store(true, Relaxed);
    }
}

/// What `run` tells the health probes, from its [`Waiting`]: started once capture ran;
/// live while [`watch`] makes its round every second (a runtime whose threads are stuck
/// misses it); ready while capture runs, delivery is not stalled and the source lag is
/// within `ready_lag`.
#[derive(Debug)]
pub struct RunProbe {
    pub waiting: Arc<Waiting>,
    pub stall_after: Duration,
    pub ready_lag: Duration,
}

/// How long [`watch`] may go without a round (it makes one a second) before the process
/// counts as stuck.
const LIVE_AFTER_MS: i64 = 10_000;

impl Probe for RunProbe {
    fn started(&self) -> bool {
        self.waiting.started.load(Relaxed)
    }

    fn live(&self) -> Result<(), String> {
        self.live_at(Utc::now().timestamp_millis())
    }

    fn ready(&self) -> Readiness {
        readiness(&self.waiting, Utc::now().timestamp_millis(), self)
    }
}

impl RunProbe {
    /// Whether the connector's watch ran within [`LIVE_AFTER_MS`] of `now` (ms).
    fn live_at(&self, now: i64) -> Result<(), String> {
        let beat = self.waiting.beat.load(Relaxed);
        let ago = now - beat;
        if beat == 0 || ago <= LIVE_AFTER_MS {
            Ok(())
        } else {
            Err(format!(
                "the connector's watch has not run for {} s",
                ago / 1000
            ))
        }
    }
}

/// [`RunProbe::ready`] at `now` (ms since the epoch).
fn readiness(waiting: &Waiting, now: i64, probe: &RunProbe) -> Readiness {
    let (oldest, since, on) = (
        waiting.oldest.load(Relaxed),
        waiting.since.load(Relaxed),
        waiting.on.load(Relaxed),
    );
    let running = waiting.running.load(Relaxed);
    let lag_ms = if oldest == 0 {
        0
    } else {
        (now - oldest).max(0)
    };
    let stall_ms = i64::try_from(probe.stall_after.as_millis()).unwrap_or(i64::MAX);
    let stalled = since != 0 && now - since >= stall_ms;
    let mut reasons = Vec::new();
    if !running {
        reasons.push(if waiting.started.load(Relaxed) {
            format!(
                "capture restarts after a failure, waiting on {}",
                waits::describe(on)
            )
        } else {
            format!("capture is starting, waiting on {}", waits::describe(on))
        });
    } else if stalled {
        reasons.push(format!(
            "delivery has made no progress for {} s while changes wait on {}",
            (now - since) / 1000,
            waits::describe(on)
        ));
    }
    let lag_bound = i64::try_from(probe.ready_lag.as_millis()).unwrap_or(i64::MAX);
    if lag_ms > lag_bound {
        reasons.push(format!(
            "the source lag, {} s, is above [health] ready_lag_seconds ({} s)",
            lag_ms / 1000,
            lag_bound / 1000
        ));
    }
    let down = !running || stalled;
    let components = [
        ("source", waits::DATABASE),
        ("kafka", waits::KAFKA),
        ("registry", waits::REGISTRY),
    ]
    .into_iter()
    .map(|(name, bit)| (name, if down && on & bit != 0 { "down" } else { "up" }))
    .collect();
    let failed = waiting.failed.load(Relaxed);
    Readiness {
        ready: reasons.is_empty(),
        components,
        lag_seconds: u64::try_from(lag_ms / 1000).unwrap_or(0),
        last_error_kind: ErrorKind::ALL
            .get(usize::from(failed).wrapping_sub(1))
            .map(|k| k.name()),
        reasons,
    }
}

/// Every second until `stop`: set the source lag from `waiting` (now − the oldest waiting
/// change's commit time, 0 when nothing waits), warn once when nothing has moved for
/// `stall_after` while changes wait, and say when delivery moves again.
pub async fn watch(
    connector: String,
    waiting: Arc<Waiting>,
    stall_after: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let labels = [("connector", connector.clone())];
    let lag = gauge!("fhir_cdc_source_lag_milliseconds", &labels);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The `since` of the stall warned of, and when that stall began.
    let mut stalled: Option<i64> = None;
    let stall_ms = i64::try_from(stall_after.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = Utc::now().timestamp_millis();
        waiting.beat.store(now, Relaxed);
        let oldest = waiting.oldest.load(Relaxed);
        lag.set(if oldest == 0 {
            0.0
        } else {
            (now - oldest).max(0) as f64
        });
        let since = waiting.since.load(Relaxed);
        match stalled {
            Some(began) if since != began => {
                stalled = None;
                info!(
                    connector,
                    after_seconds = (now - began) / 1000,
                    "delivery moves again"
                );
            }
            None if since != 0 && now - since >= stall_ms => {
                stalled = Some(since);
                let on = waiting.on.load(Relaxed);
                counter!("fhir_cdc_stalls_total", "connector" => connector.clone()).increment(1);
                warn!(
                    connector,
                    waiting_on = %waits::describe(on),
                    seconds = (now - since) / 1000,
                    lag_seconds = if oldest == 0 { 0 } else { (now - oldest) / 1000 },
                    "delivery has made no progress while changes wait"
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_follows_capture_stalls_the_lag_and_failures() {
        let waiting = Arc::new(Waiting::default());
        let probe = RunProbe {
            waiting: waiting.clone(),
            stall_after: Duration::from_secs(5),
            ready_lag: Duration::from_secs(60),
        };
        let now = || Utc::now().timestamp_millis();
        let starting = readiness(&waiting, now(), &probe);
        assert!(!starting.ready && !probe.started());
        assert!(starting.reasons[0].contains("starting"), "{starting:?}");

        waiting.running();
        waiting.clear();
        let ready = readiness(&waiting, now(), &probe);
        assert!(ready.ready && probe.started(), "{ready:?}");
        assert!(ready.components.values().all(|state| *state == "up"));

        // Changes wait on Kafka and nothing moves for longer than the stall bound.
        let committed = Utc::now() - chrono::Duration::seconds(20);
        waiting.wait(Some(committed), waits::KAFKA, false);
        assert!(readiness(&waiting, now(), &probe).ready, "not stalled yet");
        let stalled = readiness(&waiting, now() + 10_000, &probe);
        assert!(!stalled.ready);
        assert_eq!(stalled.components["kafka"], "down");
        assert_eq!(stalled.components["registry"], "up");
        assert!((29..=31).contains(&stalled.lag_seconds), "{stalled:?}");

        // Moving, but behind by more than the lag bound.
        waiting.wait(
            Some(Utc::now() - chrono::Duration::seconds(120)),
            waits::KAFKA,
            true,
        );
        let behind = readiness(&waiting, now(), &probe);
        assert!(!behind.ready && behind.components["kafka"] == "up");
        assert!(
            behind.reasons[0].contains("ready_lag_seconds"),
            "{behind:?}"
        );

        // Down after a transient failure, waiting on the registry.
        waiting.down(waits::REGISTRY, ErrorKind::Transient);
        let down = readiness(&waiting, now(), &probe);
        assert!(!down.ready && down.components["registry"] == "down");
        assert_eq!(down.last_error_kind, Some("transient"));
        assert!(down.reasons[0].contains("restarts"), "{down:?}");
        waiting.running();
        assert_eq!(readiness(&waiting, now(), &probe).last_error_kind, None);

        // A watch that stops beating (its runtime stuck) turns live false within 10 s.
        waiting.beat.store(now(), Relaxed);
        assert!(probe.live_at(now() + 9_000).is_ok());
        let stuck = probe.live_at(now() + 11_000).unwrap_err();
        assert!(stuck.contains("has not run for 1"), "{stuck}");
    }

    #[test]
    fn waiting_keeps_the_oldest_change_through_an_outage_until_everything_is_acknowledged() {
        let waiting = Waiting::default();
        assert!(!waiting.is_waiting());
        let committed = Utc::now() - chrono::Duration::seconds(40);
        waiting.wait(Some(committed), waits::KAFKA, false);
        let since = waiting.since.load(Relaxed);
        assert!(waiting.is_waiting());
        assert_eq!(waiting.oldest.load(Relaxed), committed.timestamp_millis());
        // Going down keeps what waited, and when it began; the cause replaces Kafka.
        waiting.down(waits::DATABASE, ErrorKind::Transient);
        assert_eq!(waiting.oldest.load(Relaxed), committed.timestamp_millis());
        assert_eq!(waiting.since.load(Relaxed), since);
        assert_eq!(
            waits::describe(waiting.on.load(Relaxed)),
            "the source database"
        );
        // Everything acknowledged: nothing waits.
        waiting.clear();
        assert!(!waiting.is_waiting());
        assert_eq!(waiting.oldest.load(Relaxed), 0);
        // Down with nothing waiting: the outage counts from now.
        waiting.down(waits::REGISTRY, ErrorKind::Transient);
        assert!(waiting.oldest.load(Relaxed) >= committed.timestamp_millis() + 39_000);
        waiting.set_on(waits::KAFKA | waits::REGISTRY);
        assert_eq!(
            waits::describe(waiting.on.load(Relaxed)),
            "Kafka and the schema registry"
        );
        waiting.done_with(waits::KAFKA);
        assert_eq!(
            waits::describe(waiting.on.load(Relaxed)),
            "the schema registry"
        );
    }
}
