//! What `reconcile` measures (see [`super`] for how it is served; `--metrics-listen`), per
//! connector: the drift of the last pass per class and table, the resources it compared,
//! its duration, the passes by outcome, the repairs attempted and verified (their ratio is
//! the replay success rate), and the worklist's open items (the manual intervention
//! volume).

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicI64, AtomicU8, Ordering::Relaxed},
    time::Duration,
};

use chrono::Utc;
use metrics::{counter, gauge};

use super::health::{Probe, Readiness};

/// A pass ended after `took`, having compared `compared` resources and found `drift`:
/// per table and drift class, how many (every class of every table, zeros included).
pub fn pass(
    connector: &str,
    drift: &[(&str, &'static str, usize)],
    compared: usize,
    took: Duration,
) {
    for (table, class, n) in drift {
        gauge!(
            "fhir_cdc_reconcile_drift",
            "connector" => connector.to_owned(),
            "class" => *class,
            "table" => (*table).to_owned()
        )
        .set(*n as f64);
    }
    let labels = [("connector", connector.to_owned())];
    gauge!("fhir_cdc_reconcile_resources_compared", &labels).set(compared as f64);
    gauge!("fhir_cdc_reconcile_pass_duration_seconds", &labels).set(took.as_secs_f64());
    let outcome = if drift.iter().all(|(_, _, n)| *n == 0) {
        "clean"
    } else {
        "drift"
    };
    counter!("fhir_cdc_reconcile_passes_total", "connector" => connector.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// A pass could not judge (lag beyond the bound, a system unreadable).
pub fn failed(connector: &str) {
    counter!("fhir_cdc_reconcile_passes_total", "connector" => connector.to_owned(), "outcome" => "failed")
        .increment(1);
}

/// Repairs attempted, and of them those the verifying pass found mended.
pub fn repairs(connector: &str, attempted: usize, verified: usize) {
    let labels = [("connector", connector.to_owned())];
    counter!("fhir_cdc_reconcile_repairs_attempted_total", &labels).increment(attempted as u64);
    counter!("fhir_cdc_reconcile_repairs_verified_total", &labels).increment(verified as u64);
}

/// The worklist's open items of `connector`.
pub fn worklist_open(connector: &str, open: i64) {
    gauge!("fhir_cdc_reconcile_worklist_open", "connector" => connector.to_owned())
        .set(open as f64);
}

/// The health of `reconcile --every`: started once a pass ended; live while passes end (one
/// running longer than `stuck_after` is stuck); ready while the last pass could judge —
/// drift found is a finding, not a failure.
#[derive(Debug)]
pub struct ReconcileProbe {
    stuck_after: Duration,
    /// When the running pass began (ms since the epoch); 0 between passes.
    began: AtomicI64,
    /// How the last pass ended: [`NONE_YET`], [`JUDGED`] or [`FAILED`].
    last: AtomicU8,
}

const NONE_YET: u8 = 0;
const JUDGED: u8 = 1;
const FAILED: u8 = 2;

impl ReconcileProbe {
    /// The probe of passes every `every`: stuck after four intervals, and never before ten
    /// minutes (a pass over a large table takes its time).
    pub fn new(every: Duration) -> Self {
        Self {
            stuck_after: every.saturating_mul(4).max(Duration::from_secs(600)),
            began: AtomicI64::new(0),
            last: AtomicU8::new(NONE_YET),
        }
    }

    /// A pass begins.
    pub fn begin(&self) {
        self.began.store(Utc::now().timestamp_millis(), Relaxed);
    }

    /// The pass ended: `judged`, it compared (whatever it found); otherwise it failed.
    pub fn end(&self, judged: bool) {
        self.began.store(0, Relaxed);
        self.last
            .store(if judged { JUDGED } else { FAILED }, Relaxed);
    }

    fn running_for(&self, now_ms: i64) -> Option<Duration> {
        let began = self.began.load(Relaxed);
        (began != 0).then(|| Duration::from_millis(u64::try_from(now_ms - began).unwrap_or(0)))
    }

    fn live_at(&self, now_ms: i64) -> Result<(), String> {
        match self.running_for(now_ms) {
            Some(running) if running > self.stuck_after => Err(format!(
                "a pass has been running for {} s, more than {} s",
                running.as_secs(),
                self.stuck_after.as_secs()
            )),
            _ => Ok(()),
        }
    }
}

impl Probe for ReconcileProbe {
    fn started(&self) -> bool {
        self.last.load(Relaxed) != NONE_YET
    }

    fn live(&self) -> Result<(), String> {
        self.live_at(Utc::now().timestamp_millis())
    }

    fn ready(&self) -> Readiness {
        let mut reasons = Vec::new();
        match self.last.load(Relaxed) {
            NONE_YET => reasons.push("no pass has ended yet".to_owned()),
            FAILED => reasons.push(
                "the last pass could not judge (a system unreadable, or lag beyond the bound; the log says which)"
                    .to_owned(),
            ),
            _ => {}
        }
        if let Err(why) = self.live() {
            reasons.push(why);
        }
        Readiness {
            ready: reasons.is_empty(),
            components: BTreeMap::from([(
                "reconcile",
                if reasons.is_empty() { "up" } else { "down" },
            )]),
            lag_seconds: 0,
            last_error_kind: None,
            reasons,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_after_a_judged_pass_and_not_live_when_a_pass_hangs() {
        let probe = ReconcileProbe::new(Duration::from_secs(30));
        assert!(!probe.started() && !probe.ready().ready);
        probe.begin();
        probe.end(true);
        assert!(
            probe.started() && probe.ready().ready,
            "{:?}",
            probe.ready()
        );
        probe.begin();
        probe.end(false);
        assert!(!probe.ready().ready);
        probe.begin();
        let now = Utc::now().timestamp_millis();
        assert!(probe.live_at(now + 599_000).is_ok());
        let stuck = probe.live_at(now + 601_000).unwrap_err();
        assert!(stuck.contains("running for 60"), "{stuck}");
        probe.end(true);
        assert!(probe.live_at(now + 10_000_000).is_ok());
    }
}
