//! `fhir-cdc run`: capture changes until stopped (SIGTERM or Ctrl-C), then drain what is
//! in flight, acknowledge it to the database and exit 0.
//!
//! The error policy's outer loop: a transient failure (the database restarting, Kafka or
//! the registry unreachable) drains what is in flight, saves the state and starts the
//! connector again from it after a capped, jittered backoff — logged once per streak with
//! its cause, counted in `fhir_cdc_restarts_total`. Only a failure no retry can mend (bad
//! credentials, missing privileges, mappings that do not load) ends `run`, with the fix.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::ConnectorConfig,
    error::Kinded,
    observe::{
        self,
        pipeline::{waits, RunProbe, Waiting},
    },
    pipeline::{self, RunError, RunSummary},
    source::kind::{with_kind, Kind},
};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The connector configuration file (TOML), e.g. connectors/lab-postgres.toml.
    #[arg(long, short)]
    config: PathBuf,
}

pub async fn run(args: RunArgs) -> ExitCode {
    let config = match ConnectorConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fhir-cdc run: {e}");
            return ExitCode::from(super::EXIT_BAD_CONFIG);
        }
    };
    let waiting = Arc::new(Waiting::default());
    if let Some(metrics) = &config.metrics {
        let probe = RunProbe {
            waiting: waiting.clone(),
            stall_after: config.health.stall_after(),
            ready_lag: config.health.ready_lag(),
        };
        if let Err(e) = observe::serve(metrics.listen, Some(Arc::new(probe))) {
            eprintln!("fhir-cdc run: {e}");
            return ExitCode::FAILURE;
        }
        info!(listen = %metrics.listen, "serving metrics and health");
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    info!(connector = config.name, "starting");
    tokio::spawn(observe::pipeline::watch(
        config.name.clone(),
        waiting.clone(),
        config.health.stall_after(),
        shutdown.clone(),
    ));
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        match run_once(&config, waiting.clone(), shutdown.clone()).await {
            Ok(summary) => {
                info!(
                    connector = config.name,
                    snapshot_rows = summary.snapshot_rows,
                    events = summary.events,
                    suppressed = summary.suppressed,
                    dead_letters = summary.dead_letters,
                    acknowledged = summary.acknowledged,
                    "stopped"
                );
                return ExitCode::SUCCESS;
            }
            // A stop requested while an attempt was starting or failing: the stored state
            // only ever moves past acknowledged events, so the next start resumes where this
            // one ended and nothing is lost by not finishing the drain.
            Err(e) if e.is_transient() && shutdown.is_cancelled() => {
                info!(connector = config.name, cause = cause(&e).0, "stopped while a transient failure was being retried: the next start resumes from the stored state");
                return ExitCode::SUCCESS;
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next(started.elapsed());
                let (label, on) = cause(&e);
                observe::pipeline::restarted(&config.name, label);
                waiting.down(on, e.kind());
                if backoff.streak == 1 {
                    warn!(connector = config.name, error = %e, retry_in = ?delay, "a transient failure stopped capture: it restarts by itself from the stored state");
                } else {
                    info!(connector = config.name, attempt = backoff.streak, retry_in = ?delay, "still failing: restarting");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return ExitCode::SUCCESS,
                }
            }
            Err(e) => {
                eprintln!("fhir-cdc run: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

async fn run_once(
    config: &ConnectorConfig,
    waiting: Arc<Waiting>,
    shutdown: CancellationToken,
) -> Result<RunSummary, RunError> {
    with_kind!(&config.source, kind => {
        pipeline::run(
            config,
            |tables| kind.source(&config.name, tables),
            waiting,
            shutdown,
        )
        .await
    })
}

/// The `cause` label of a restart, and what delivery waits on until it succeeds.
fn cause(e: &RunError) -> (&'static str, u8) {
    match e {
        RunError::Source(_) => ("source", waits::DATABASE),
        RunError::Codec(_) => ("registry", waits::REGISTRY),
        RunError::State(_) => ("state", waits::KAFKA),
        _ => ("kafka", waits::KAFKA),
    }
}

/// Restart delays: 1 s, doubling to at most 30 s, each ±20 % so that connectors failing
/// together do not retry together; a run that lasted a minute starts a new streak.
#[derive(Debug, Default)]
struct Backoff {
    streak: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);
    const HEALTHY: Duration = Duration::from_secs(60);

    fn next(&mut self, lasted: Duration) -> Duration {
        if lasted >= Self::HEALTHY {
            self.streak = 0;
        }
        self.streak += 1;
        let base = Self::FIRST
            .saturating_mul(1 << (self.streak - 1).min(5))
            .min(Self::MAX);
        // Jitter from the clock: nothing here needs a random generator's quality.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        base.mul_f64(0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0)
    }
}

/// Cancel `shutdown` on SIGTERM or Ctrl-C.
pub(super) async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    info!("stop requested: draining in-flight events");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_to_a_cap_and_a_healthy_run_starts_over() {
        let mut backoff = Backoff::default();
        let quick = Duration::from_millis(10);
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next(quick)).collect();
        for (delay, base) in delays.iter().zip([1, 2, 4, 8, 16, 30, 30, 30]) {
            let base = Duration::from_secs(base);
            assert!(
                *delay >= base.mul_f64(0.8) && *delay <= base.mul_f64(1.2),
                "{delays:?}"
            );
        }
        assert_eq!(backoff.streak, 8);
        let again = backoff.next(Duration::from_secs(61));
        assert_eq!(backoff.streak, 1);
        assert!(again <= Duration::from_millis(1200), "{again:?}");
    }
}
