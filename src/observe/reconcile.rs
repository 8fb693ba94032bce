//! What `reconcile` measures (see [`super`] for how it is served; `--metrics-listen`), per
//! connector: the drift of the last pass per class and table, the resources it compared,
//! its duration, the passes by outcome, the repairs attempted and verified (their ratio is
//! the replay success rate), and the worklist's open items (the manual intervention
//! volume).

use std::time::Duration;

use metrics::{counter, gauge};

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
