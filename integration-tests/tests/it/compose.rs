//! docker-compose.yml cannot run here (no Docker engine), so it is checked for what it must
//! hold: every service the README's stack table names, each with a health check, configured
//! for change capture the way `stack/up` configures its own services.

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

use crate::stack;

fn compose() -> Value {
    let text = std::fs::read_to_string(stack::repo_root().join("docker-compose.yml")).unwrap();
    serde_yaml_ng::from_str(&text).expect("docker-compose.yml is not valid YAML")
}

/// Service names from the README's stack table: rows of the form "| `service` | …".
fn readme_services() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(stack::repo_root().join("README.md")).unwrap();
    let section = readme
        .split("## The test stack")
        .nth(1)
        .expect("README has no `## The test stack` section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_owned)
        .collect()
}

/// The command-line flags and environment of a service, as one text to search.
fn settings(service: &Value) -> String {
    serde_yaml_ng::to_string(&(service.get("command"), service.get("environment"))).unwrap()
}

#[test]
fn every_service_the_readme_names_is_in_compose_with_a_health_check() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("no services");
    let long_running: BTreeSet<String> = services
        .iter()
        .filter(|(_, s)| s.get("restart").and_then(Value::as_str) != Some("no"))
        .map(|(name, _)| name.as_str().unwrap().to_owned())
        .collect();
    let named = readme_services();
    assert_eq!(
        named, long_running,
        "README stack table and docker-compose.yml disagree"
    );
    for name in &named {
        let service = &services[name.as_str()];
        assert!(service.get("image").is_some(), "{name} has no image");
        assert!(
            service.get("healthcheck").is_some(),
            "{name} has no health check"
        );
    }
}

#[test]
fn compose_services_are_configured_for_change_capture() {
    let compose = compose();
    let services = &compose["services"];
    let postgres = settings(&services["postgres"]);
    assert!(postgres.contains("wal_level=logical"), "{postgres}");
    let mysql = settings(&services["mysql"]);
    for flag in [
        "--binlog-format=ROW",
        "--binlog-row-image=FULL",
        "--log-bin",
    ] {
        assert!(mysql.contains(flag), "mysql lacks {flag}: {mysql}");
    }
    let sqlserver = settings(&services["sqlserver"]);
    assert!(
        sqlserver.contains("MSSQL_AGENT_ENABLED"),
        "CDC needs the SQL Server Agent: {sqlserver}"
    );
    assert!(
        services["sqlserver-init"].get("depends_on").is_some(),
        "CDC is enabled by an init step"
    );
    let kafka = settings(&services["kafka"]);
    assert!(
        kafka.contains("KAFKA_PROCESS_ROLES: broker,controller"),
        "KRaft mode: {kafka}"
    );
    assert!(
        kafka.contains("KAFKA_AUTO_CREATE_TOPICS_ENABLE: 'false'"),
        "{kafka}"
    );
}
