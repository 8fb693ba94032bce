//! Health for probes, beside `/metrics` on the metrics listener: `/health/started`,
//! `/health/live` and `/health/ready` answer 200 or 503 with a small JSON body — the
//! components' states, the lag, and the reasons when not ready; never a secret or a value.
//! Any other path answers the metrics in the Prometheus text format, as before.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tracing::warn;

/// What a running command says of its health.
pub trait Probe: Send + Sync {
    /// Whether start-up is over: the command has done its work at least once (a connector:
    /// its topics and schemas ready and capture begun).
    fn started(&self) -> bool;

    /// `Ok` while the process makes progress; otherwise why not (a stuck task).
    fn live(&self) -> Result<(), String>;

    /// Whether the command does its work now, and the state of each component.
    fn ready(&self) -> Readiness;
}

/// A readiness answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Per component (`source`, `kafka`, `registry`, …): `up` or `down`.
    pub components: BTreeMap<&'static str, &'static str>,
    /// Seconds from the oldest change not yet delivered to now (0 when none waits).
    pub lag_seconds: u64,
    /// The kind of the last error that stopped the work (`transient`, …), if any since
    /// the last start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_kind: Option<&'static str>,
    /// Why not ready.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

#[derive(Clone)]
struct Served {
    metrics: PrometheusHandle,
    probe: Option<Arc<dyn Probe>>,
}

/// Serve the metrics of `metrics` and the health `probe` tells at `listen`, on the current
/// runtime. Binding fails at once (a port in use), not later in a task.
pub(super) fn serve(
    listen: SocketAddr,
    metrics: PrometheusHandle,
    probe: Option<Arc<dyn Probe>>,
) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        // What the exporter's own listener did: histograms drained, idle series dropped.
        let mut ticks = tokio::time::interval(Duration::from_secs(5));
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    });
    let router = Router::new()
        .route("/health/started", get(started))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .fallback(render)
        .with_state(Served { metrics, probe });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            warn!(error = %e, "the metrics listener stopped");
        }
    });
    Ok(())
}

async fn render(State(served): State<Served>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        served.metrics.render(),
    )
        .into_response()
}

/// 200 or 503 with `body` as JSON.
fn answer(ok: bool, body: &impl Serialize) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(body).unwrap_or_else(|_| "{}".to_owned());
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// No probe: this command tells no health (its metrics only).
fn untold() -> Response {
    answer(
        false,
        &serde_json::json!({"status": "unknown", "reason": "this command serves no health checks"}),
    )
}

async fn started(State(served): State<Served>) -> Response {
    let Some(probe) = served.probe else {
        return untold();
    };
    let started = probe.started();
    answer(
        started,
        &serde_json::json!({"status": if started { "started" } else { "starting" }}),
    )
}

async fn live(State(served): State<Served>) -> Response {
    let Some(probe) = served.probe else {
        return untold();
    };
    match probe.live() {
        Ok(()) => answer(true, &serde_json::json!({"status": "live"})),
        Err(why) => answer(
            false,
            &serde_json::json!({"status": "stuck", "reason": why}),
        ),
    }
}

async fn ready(State(served): State<Served>) -> Response {
    let Some(probe) = served.probe else {
        return untold();
    };
    let readiness = probe.ready();
    answer(readiness.ready, &readiness)
}
