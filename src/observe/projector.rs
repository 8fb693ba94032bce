//! What `project` and `replay` measure (see [`super`] for how it is served).
//!
//! Per topic (`projector`, `topic` labels): events consumed, applied, stale, duplicate and
//! dead-lettered. Per partition: the consumer lag, from librdkafka's statistics (high
//! watermark − the group's committed offset). Per projector: the apply latency (Kafka's
//! timestamp of a message → the commit of its batch), the end-to-end latency (the source's
//! commit of a change → the commit of its batch in the projection; streamed changes only,
//! as snapshot reads have no source commit) and the events per batch.

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed},
    time::Duration,
};

use chrono::Utc;
use metrics::{counter, gauge, histogram, Counter, Histogram};

use super::health::{Probe, Readiness};

/// The counters of one topic.
#[derive(Debug, Clone)]
pub struct TopicMetrics {
    pub consumed: Counter,
    pub applied: Counter,
    pub stale: Counter,
    pub duplicate: Counter,
    pub dead_lettered: Counter,
}

/// The projector's handles, registered once per topic.
#[derive(Debug)]
pub struct Metrics {
    projector: String,
    topics: HashMap<String, TopicMetrics>,
    pub apply_latency: Histogram,
    pub end_to_end: Histogram,
    pub batch_events: Histogram,
}

impl Metrics {
    pub fn new(projector: &str) -> Self {
        let labels = [("projector", projector.to_owned())];
        Self {
            projector: projector.to_owned(),
            topics: HashMap::new(),
            apply_latency: histogram!("fhir_cdc_projector_apply_latency_seconds", &labels),
            end_to_end: histogram!("fhir_cdc_projector_end_to_end_seconds", &labels),
            batch_events: histogram!("fhir_cdc_projector_batch_events", &labels),
        }
    }

    pub fn topic(&mut self, topic: &str) -> &TopicMetrics {
        let projector = &self.projector;
        self.topics.entry(topic.to_owned()).or_insert_with(|| {
            let labels = [
                ("projector", projector.clone()),
                ("topic", topic.to_owned()),
            ];
            TopicMetrics {
                consumed: counter!("fhir_cdc_projector_events_consumed_total", &labels),
                applied: counter!("fhir_cdc_projector_events_applied_total", &labels),
                stale: counter!("fhir_cdc_projector_events_stale_total", &labels),
                duplicate: counter!("fhir_cdc_projector_events_duplicate_total", &labels),
                dead_lettered: counter!("fhir_cdc_projector_dead_letters_total", &labels),
            }
        })
    }
}

/// The consumer lag of one partition, in messages.
pub fn consumer_lag(projector: &str, topic: &str, partition: i32, lag: i64) {
    gauge!("fhir_cdc_projector_consumer_lag_messages",
        "projector" => projector.to_owned(), "topic" => topic.to_owned(), "partition" => partition.to_string())
    .set(lag as f64);
}

/// What a consumer (`project`) tells the health probes: started once partitions were
/// assigned; live while its loop makes a round (it does at least every few hundred
/// milliseconds, idle or not) within `LIVE_AFTER`; ready while it has partitions, its loop
/// is live and what it last did was at most `ready_lag` behind Kafka.
#[derive(Debug)]
pub struct ConsumerProbe {
    ready_lag: Duration,
    started: AtomicBool,
    assigned: AtomicBool,
    /// When the loop last made a round (ms since the epoch).
    beat: AtomicI64,
    /// Kafka's timestamp of the oldest message of the last batch (ms); 0 when idle.
    behind: AtomicI64,
}

/// How long the consumer's loop may go without a round before it counts as stuck.
const LIVE_AFTER: Duration = Duration::from_secs(60);

impl ConsumerProbe {
    pub fn new(ready_lag: Duration) -> Self {
        Self {
            ready_lag,
            started: AtomicBool::new(false),
            assigned: AtomicBool::new(false),
            beat: AtomicI64::new(0),
            behind: AtomicI64::new(0),
        }
    }

    /// A round of the loop: `assigned`, whether it has partitions; `oldest`, Kafka's
    /// timestamp of the oldest message of the batch it just committed (`None`: idle).
    pub fn round(&self, assigned: bool, oldest: Option<i64>) {
        self.beat.store(Utc::now().timestamp_millis(), Relaxed);
        self.assigned.store(assigned, Relaxed);
        if assigned {
            self.started.store(true, Relaxed);
        }
        self.behind.store(oldest.unwrap_or(0), Relaxed);
    }

    fn since_beat(&self) -> Option<Duration> {
        let beat = self.beat.load(Relaxed);
        (beat != 0).then(|| {
            Duration::from_millis(u64::try_from(Utc::now().timestamp_millis() - beat).unwrap_or(0))
        })
    }
}

impl Probe for ConsumerProbe {
    fn started(&self) -> bool {
        self.started.load(Relaxed)
    }

    fn live(&self) -> Result<(), String> {
        match self.since_beat() {
            Some(ago) if ago > LIVE_AFTER => Err(format!(
                "the consumer's loop has made no round for {} s",
                ago.as_secs()
            )),
            _ => Ok(()),
        }
    }

    fn ready(&self) -> Readiness {
        let behind = self.behind.load(Relaxed);
        let lag_ms = if behind == 0 {
            0
        } else {
            (Utc::now().timestamp_millis() - behind).max(0)
        };
        let lag = Duration::from_millis(u64::try_from(lag_ms).unwrap_or(0));
        let assigned = self.assigned.load(Relaxed);
        let mut reasons = Vec::new();
        if !assigned {
            reasons
                .push("no partitions assigned (the group is rebalancing, or starting)".to_owned());
        }
        let live = self.live();
        let target = if live.is_ok() { "up" } else { "down" };
        if let Err(why) = live {
            reasons.push(why);
        }
        if lag > self.ready_lag {
            reasons.push(format!(
                "the last batch was {} s behind Kafka, above [health] ready_lag_seconds ({} s)",
                lag.as_secs(),
                self.ready_lag.as_secs()
            ));
        }
        Readiness {
            ready: reasons.is_empty(),
            components: BTreeMap::from([
                ("kafka", if assigned { "up" } else { "down" }),
                ("target", target),
            ]),
            lag_seconds: lag.as_secs(),
            last_error_kind: None,
            reasons,
        }
    }
}
