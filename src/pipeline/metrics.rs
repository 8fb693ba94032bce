//! What `run` measures, served in the Prometheus text format when `[metrics] listen` is set
//! (through the `metrics` facade and its Prometheus exporter).
//!
//! Per table (`connector`, `table` labels): changes read, events mapped, produced and
//! acknowledged by Kafka, dead letters, suppressed no-op updates. Per connector: the source
//! lag (capture time − commit time of the last change), the commit → Kafka-acknowledgement
//! latency histogram, the depth of the source → sink channel and the messages in flight to
//! Kafka. Labels name tables, never values.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use chrono::{DateTime, Utc};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::change::SourceTable;

/// Seconds: 1 ms to 30 s, finer around the tens of milliseconds a healthy pipeline takes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// Serve the metrics at `listen` (any path answers, `/metrics` by convention).
pub fn serve(listen: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| format!("metrics.listen = {listen}: {e}"))
}

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
    tables: HashMap<(Arc<str>, Arc<str>), TableMetrics>,
    pub source_lag_ms: Gauge,
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
            source_lag_ms: gauge!("fhir_cdc_source_lag_milliseconds", &labels),
            commit_to_ack: histogram!("fhir_cdc_commit_to_ack_seconds", &labels),
            channel_depth: gauge!("fhir_cdc_channel_depth", &labels),
            in_flight: gauge!("fhir_cdc_in_flight_messages", &labels),
        }
    }

    pub fn table(&mut self, source: &SourceTable) -> &TableMetrics {
        let connector = &self.connector;
        self.tables
            .entry((source.schema.clone(), source.table.clone()))
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
            })
    }
}

/// Seconds from `commit` to now (never negative: clocks may disagree).
pub fn seconds_since(commit: DateTime<Utc>) -> f64 {
    (Utc::now() - commit).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}
