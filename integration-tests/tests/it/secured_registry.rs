//! The schema registry over HTTPS with basic authentication (the stack's second Apicurio
//! instance, its certificate from the stack's own CA): `check` names an untrusted
//! certificate and refused credentials with their fix, and a connector registers, and
//! `tail` reads, its events through it.

use std::{path::Path, process::Command, time::Duration};

use crate::{
    connector::{await_caught_up, drain, free_port, start, tail_everything},
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

    let said = stack::check_said(&untrusted);
    assert!(
        said.contains(&format!("FAIL  registry  the schema registry at {url} presented a certificate this machine does not trust"))
            && said.contains("fix: set schema_registry.ca_file"),
        "{said}"
    );
    let password = stack::env("FHIR_CDC_SCHEMA_REGISTRY_PASSWORD");
    accepted_refused_and_captured(
        &client,
        &schema,
        &dir,
        [&secured, &refused],
        &url,
        &["not-the-password", &password],
    )
    .await;
}

/// `bearer_token` (here from a file, as a token refresher writes it): the registry behind a
/// gateway that admits one token (`fixtures/token_gateway.py`) registers the connector's
/// schemas; a wrong token is a refusal that does not print the token.
#[tokio::test]
async fn a_bearer_token_reaches_the_registry_behind_a_token_gateway() {
    let client = stack::pg_client().await;
    let schema = stack::unique("bearer");
    stack::create_lab_schema(&client, &schema).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("bearer");
    let plain =
        std::fs::read_to_string(stack::connector_config(&dir, &schema, &prefix, "")).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "sentinel-bearer-token-8c1f\n").unwrap();
    let registry = stack::env("FHIR_CDC_SCHEMA_REGISTRY_URL");
    let (upstream, path) = registry[7..].split_once('/').unwrap();
    let port = free_port();
    let mut gateway = Command::new("python3")
        .arg(stack::repo_root().join("integration-tests/fixtures/token_gateway.py"))
        .arg(port.to_string())
        .arg(format!("http://{upstream}"))
        .arg(&token_file)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://127.0.0.1:{port}/{path}");
    let variant = |file: &str, token: &str| {
        let config = dir.join(file);
        let text = plain.replace(
            "url = \"${env:FHIR_CDC_SCHEMA_REGISTRY_URL}\"",
            &format!("url = \"{url}\"\nbearer_token = \"{token}\""),
        );
        assert_ne!(text, plain);
        std::fs::write(&config, text).unwrap();
        config
    };
    let secured = variant(
        "bearer.toml",
        &format!("${{file:{}}}", token_file.display()),
    );
    let wrong = variant("wrong.toml", "not-the-token");

    accepted_refused_and_captured(
        &client,
        &schema,
        &dir,
        [&secured, &wrong],
        &url,
        &["not-the-token", "sentinel-bearer-token"],
    )
    .await;
    gateway.kill().unwrap();
    gateway.wait().unwrap();
}

/// `check` accepts `secured` and names `refused`'s refusal; a connector with `secured`
/// registers its schemas and `tail` reads its two events; no `secrets` in what they say.
async fn accepted_refused_and_captured(
    client: &tokio_postgres::Client,
    schema: &str,
    dir: &Path,
    [secured, refused]: [&Path; 2],
    url: &str,
    secrets: &[&str],
) {
    let said = stack::check_said(secured);
    assert!(
        said.contains(&format!(
            "ok    registry  Confluent-compatible API answers at {url}"
        )),
        "{said}"
    );
    let said = stack::check_said(refused);
    assert!(
        said.contains(&format!(
            "FAIL  registry  the schema registry at {url} refused access (HTTP 401"
        )),
        "{said}"
    );
    assert!(secrets.iter().all(|s| !said.contains(s)), "{said}");

    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let connector = start(secured, &log);
    await_caught_up(client, &slot, Duration::from_secs(30), &log).await;
    stack::insert_results(client, &format!("{schema}.lab_result"), 2).await;
    drain(client, &slot, connector, Duration::from_secs(60), &log).await;
    let ids: Vec<String> = tail_everything(secured)
        .iter()
        .map(|event| event["resource_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["result-1", "result-2"]);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(secrets.iter().all(|s| !logged.contains(s)));

    stack::drop_capture(client, &slot, &slot, schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
