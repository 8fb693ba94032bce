//! The Confluent-compatible schema registry (Confluent, Karapace, Redpanda, Apicurio's
//! `ccompat` API): the subset of its REST API fhir-cdc uses
//! (<https://docs.confluent.io/platform/current/schema-registry/develop/api.html>).

use std::time::Duration;

use crate::{
    config::RegistryConfig,
    preflight::{self, Finding},
};

const COMPONENT: &str = "registry";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Ask the registry for its subjects and global compatibility level.
pub async fn check(config: &RegistryConfig) -> Vec<Finding> {
    let base = config.url.trim_end_matches('/');
    let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("cannot build an HTTP client: {e}"),
                "check the TLS setup of this machine",
            )]
        }
    };
    let subjects_url = format!("{base}/subjects");
    let response = match client.get(&subjects_url).send().await {
        Ok(response) => response,
        Err(e) => {
            return vec![
                preflight::unreachable(COMPONENT, "the schema registry", base, &e).unwrap_or_else(
                    || {
                        Finding::problem(
                            COMPONENT,
                            format!("no answer from the schema registry at {base}: {e}"),
                            "start the registry, or correct schema_registry.url",
                        )
                    },
                ),
            ]
        }
    };
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return vec![Finding::problem(
            COMPONENT,
            format!("the schema registry at {base} refused access (HTTP {status})"),
            "give the connector credentials the registry accepts",
        )];
    }
    let subjects = match response.error_for_status() {
        Ok(ok) => ok.json::<Vec<String>>().await.ok(),
        Err(_) => None,
    };
    let Some(subjects) = subjects else {
        return vec![Finding::problem(
            COMPONENT,
            format!("{subjects_url} answered HTTP {status}, not a Confluent-compatible subject list"),
            "point schema_registry.url at the Confluent-compatible API root (Apicurio: …/apis/ccompat/v7)",
        )];
    };
    let compatibility = match client.get(format!("{base}/config")).send().await {
        Ok(r) => r.json::<serde_json::Value>().await.ok().and_then(|v| {
            v.get("compatibilityLevel")
                .or(v.get("compatibility"))
                .and_then(|c| c.as_str())
                .map(str::to_owned)
        }),
        Err(_) => None,
    };
    vec![Finding::ok(
        COMPONENT,
        format!(
            "Confluent-compatible API answers at {base}: {} subject(s), compatibility {}",
            subjects.len(),
            compatibility.as_deref().unwrap_or("unknown")
        ),
    )]
}
