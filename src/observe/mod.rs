//! What fhir-cdc measures, served in the Prometheus text format when a configuration's
//! `[metrics] listen` is set (through the `metrics` facade and its Prometheus exporter):
//! [`pipeline`] for `run`, [`projector`] for `project` and `replay`, [`reconcile`] for
//! `reconcile --every`; and on the same listener the health probes of [`health`].

pub mod health;
pub mod pipeline;
pub mod progress;
pub mod projector;
pub mod reconcile;

use std::{net::SocketAddr, sync::Arc};

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Seconds: 1 ms to 30 s, finer around the tens of milliseconds a healthy pipeline takes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// Events per batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0];

/// Serve the metrics at `listen` (`/metrics`, and any path but the health probes'), and
/// the health `probe` tells (`/health/started`, `/health/live`, `/health/ready`; a
/// command without one answers them 503 "unknown"). Needs a Tokio runtime.
pub fn serve(listen: SocketAddr, probe: Option<Arc<dyn health::Probe>>) -> Result<(), String> {
    let metrics = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_batch_events".into()), BATCH_BUCKETS)
        })
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| format!("metrics: {e}"))?;
    health::serve(listen, metrics, probe).map_err(|e| format!("metrics.listen = {listen}: {e}"))
}

/// Seconds from `then` to now (never negative: clocks may disagree).
pub fn seconds_since(then: DateTime<Utc>) -> f64 {
    (Utc::now() - then).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}
