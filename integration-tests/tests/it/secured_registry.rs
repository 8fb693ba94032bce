//! The schema registry over HTTPS with basic authentication (the stack's second Apicurio
//! instance, its certificate from the stack's own CA): `check` names an untrusted
//! certificate and refused credentials with their fix, and a connector registers, and
//! `tail` reads, its events through it.

use std::time::Duration;

use crate::{
    connector::{await_caught_up, drain, start, tail_everything},
    stack,
};

#[tokio::test]
async fn the_registry_is_used_over_https_with_basic_authentication() {
    let client = stack::pg_client().await;
    let schema = stack::unique("secreg");
    stack::create_lab_schema(&client, &schema).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("secreg");
    let plain =
        std::fs::read_to_string(stack::connector_config(&dir, &schema, &prefix, "")).unwrap();
    let variant = |file: &str, registry: &str| {
        let config = dir.join(file);
        let text = plain.replace(
            "url = \"${env:FHIR_CDC_SCHEMA_REGISTRY_URL}\"",
            &format!("url = \"${{env:FHIR_CDC_SCHEMA_REGISTRY_TLS_URL}}\"\n{registry}"),
        );
        assert_ne!(text, plain);
        std::fs::write(&config, text).unwrap();
        config
    };
    let secured = variant(
        "secured.toml",
        "username = \"${env:FHIR_CDC_SCHEMA_REGISTRY_USER}\"\npassword = \"${env:FHIR_CDC_SCHEMA_REGISTRY_PASSWORD}\"\nca_file = \"${env:FHIR_CDC_STACK_CA}\"",
    );
    let untrusted = variant(
        "untrusted.toml",
        "username = \"${env:FHIR_CDC_SCHEMA_REGISTRY_USER}\"\npassword = \"${env:FHIR_CDC_SCHEMA_REGISTRY_PASSWORD}\"",
    );
    let refused = variant(
        "refused.toml",
        "username = \"${env:FHIR_CDC_SCHEMA_REGISTRY_USER}\"\npassword = \"not-the-password\"\nca_file = \"${env:FHIR_CDC_STACK_CA}\"",
    );
    let url = stack::env("FHIR_CDC_SCHEMA_REGISTRY_TLS_URL");

    let said = stack::check_said(&secured);
    assert!(
        said.contains(&format!(
            "ok    registry  Confluent-compatible API answers at {url}"
        )),
        "{said}"
    );
    let said = stack::check_said(&untrusted);
    assert!(
        said.contains(&format!("FAIL  registry  the schema registry at {url} presented a certificate this machine does not trust"))
            && said.contains("fix: set schema_registry.ca_file"),
        "{said}"
    );
    let said = stack::check_said(&refused);
    assert!(
        said.contains(&format!(
            "FAIL  registry  the schema registry at {url} refused access (HTTP 401"
        )),
        "{said}"
    );
    assert!(!said.contains("not-the-password"), "{said}");

    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let connector = start(&secured, &log);
    await_caught_up(&client, &slot, Duration::from_secs(30), &log).await;
    stack::insert_results(&client, &format!("{schema}.lab_result"), 2).await;
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;
    let ids: Vec<String> = tail_everything(&secured)
        .iter()
        .map(|event| event["resource_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["result-1", "result-2"]);

    stack::drop_capture(&client, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
