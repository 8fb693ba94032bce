//! What `project` and `replay` measure (see [`super`] for how it is served).
//!
//! Per topic (`projector`, `topic` labels): events consumed, applied, stale, duplicate and
//! dead-lettered. Per partition: the consumer lag, from librdkafka's statistics (high
//! watermark − the group's committed offset). Per projector: the apply latency (Kafka's
//! timestamp of a message → the commit of its batch), the end-to-end latency (the source's
//! commit of a change → the commit of its batch in the projection; streamed changes only,
//! as snapshot reads have no source commit) and the events per batch.

use std::collections::HashMap;

use metrics::{counter, gauge, histogram, Counter, Histogram};

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
