//! What `reconcile` measures (see [`super`] for how it is served; `--metrics-listen`), per
//! connector: the drift of the last pass per class and table, the resources it compared,
//! its duration, the passes by outcome, the repairs attempted and verified (their ratio is
//! the replay success rate), and the worklist's open items (the manual intervention
//! volume).

use std::time::Duration;

use metrics::{counter, gauge};

use crate::reconcile::{Drift, Report};

/// A pass ended with `report` after `took`.
pub fn pass(connector: &str, report: &Report, took: Duration) {
    let counts = report.counts_by_table();
    for table in &report.tables {
        for class in Drift::ALL {
            let n = counts.get(&(class, table.as_str())).copied().unwrap_or(0);
            gauge!(
                "fhir_cdc_reconcile_drift",
                "connector" => connector.to_owned(),
                "class" => class.name(),
                "table" => table.clone()
            )
            .set(n as f64);
        }
    }
    let labels = [("connector", connector.to_owned())];
    gauge!("fhir_cdc_reconcile_resources_compared", &labels).set(report.compared as f64);
    gauge!("fhir_cdc_reconcile_pass_duration_seconds", &labels).set(took.as_secs_f64());
    let outcome = if report.drift() == 0 {
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
