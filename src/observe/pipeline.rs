//! What `run` measures (see [`super`] for how it is served).
//!
//! Per table (`connector`, `table` labels): changes read, events mapped, produced and
//! acknowledged by Kafka, dead letters, suppressed no-op updates. Per connector: the source
//! lag (capture time − commit time of the last change), the commit → Kafka-acknowledgement
//! latency histogram, the changes read and waiting to be mapped and the messages in flight to
//! Kafka; the restarts after transient failures. Labels name tables, never values.

use std::{collections::HashMap, sync::Arc};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

use crate::change::SourceTable;

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
