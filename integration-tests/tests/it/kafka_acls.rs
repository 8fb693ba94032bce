//! Kafka with an authorizer. The stack's SASL_SSL listener (SCRAM-SHA-512 over TLS with the
//! stack's CA) holds its users to ACLs. Granted exactly what docs/operations.md lists for
//! each role, the connector captures into both topic classes, the projector projects the
//! normal class and never sees the restricted one, and a reader of normal data sees
//! neither the restricted topics nor the dead letters. A user without the connector's
//! grants is refused with a message that says so; a wrong password and a TLS mismatch are
//! told apart from a stopped broker, by `check` and by `run`.

use std::{path::Path, process::Command, time::Duration};

use crate::{
    connector::{
        await_caught_up, crash, drain, events_of, exit_within, spawn, start, tail_everything,
    },
    projector::{project_until_caught_up, projector_config},
    stack,
};

/// `kafka-acls.sh ARGS` against the stack's broker, as its super user.
fn acls(args: &[&str]) {
    let output = Command::new(stack::repo_root().join("integration-tests/stack/kafka-tool"))
        .arg("kafka-acls")
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kafka-acls {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The grants of docs/operations.md ("A least-privilege setup") for the topics under
/// `prefix`: the connector, a projector named `projector` without access to restricted
/// data, and a reader of normal data.
fn grant_documented_roles(prefix: &str, projector: &str) {
    let topics = format!("{prefix}.");
    let restricted = format!("{prefix}.restricted.");
    let dead_letters = format!("{prefix}.dlq.");
    let (state, projector_dlq) = (format!("{prefix}.state"), format!("{prefix}.dlq.projector"));
    let allow = |user: &str, operations: &[&str], resource: &[&str], pattern: &str| {
        let principal = format!("User:{user}");
        let mut args = vec!["--add", "--allow-principal", &principal];
        for operation in operations {
            args.extend(["--operation", operation]);
        }
        args.extend(resource);
        args.extend(["--resource-pattern-type", pattern]);
        acls(&args);
    };
    let deny = |user: &str, operations: &[&str], topic: &str| {
        let principal = format!("User:{user}");
        let mut args = vec!["--add", "--deny-principal", &principal];
        for operation in operations {
            args.extend(["--operation", operation]);
        }
        args.extend(["--topic", topic, "--resource-pattern-type", "prefixed"]);
        acls(&args);
    };
    let connector = "fhir_cdc_connector";
    allow(
        connector,
        &["Create", "Describe", "DescribeConfigs", "Write"],
        &["--topic", &topics],
        "prefixed",
    );
    allow(connector, &["Read"], &["--topic", &state], "literal");
    allow(connector, &["IdempotentWrite"], &["--cluster"], "literal");
    // Reading a topic without a consumer group (the connector's state, `tail`, `dlq`) still
    // names one, and librdkafka looks up its coordinator.
    for user in [connector, "fhir_cdc_reader"] {
        allow(
            user,
            &["Describe"],
            &["--group", "fhir-cdc-reader-"],
            "prefixed",
        );
    }

    let reader_roles = [("fhir_cdc_projector", projector), ("fhir_cdc_reader", "")];
    for (user, group) in reader_roles {
        allow(
            user,
            &["Describe", "Read"],
            &["--topic", &topics],
            "prefixed",
        );
        deny(user, &["Describe", "Read"], &restricted);
        if !group.is_empty() {
            allow(user, &["Read"], &["--group", group], "literal");
        }
    }
    allow(
        "fhir_cdc_projector",
        &["Create", "Write"],
        &["--topic", &projector_dlq],
        "literal",
    );
    deny("fhir_cdc_reader", &["Describe", "Read"], &dead_letters);
}

/// `config` with its `[kafka]` table replaced by the SASL_SSL listener's, as `user`.
fn as_user(config: &Path, user: &str, password: &str, to: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    let kafka = format!(
        r#"[kafka]
bootstrap.servers = "${{env:FHIR_CDC_KAFKA_SASL_BOOTSTRAP}}"
security.protocol = "SASL_SSL"
ssl.ca.location = "${{env:FHIR_CDC_STACK_CA}}"
sasl.mechanism = "SCRAM-SHA-512"
sasl.username = "{user}"
sasl.password = "{password}"
"#
    );
    let plain = "[kafka]\nbootstrap.servers = \"${env:FHIR_CDC_KAFKA_BOOTSTRAP}\"\n";
    assert!(text.contains(plain), "{text}");
    let variant = config.with_file_name(to);
    std::fs::write(&variant, text.replace(plain, &kafka)).unwrap();
    variant
}

#[tokio::test]
async fn each_role_works_with_the_documented_grants_and_no_more() {
    let client = stack::pg_client().await;
    let (schema, dir) = stack::lab_with_restricted_patients(&client, "acl").await;
    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.patient (patient_id, mrn, last_name, first_name, birth_date, sex)
             VALUES (1, 'M000001', 'Doe', 'Jane', '1961-07-04', 'F')"
        ))
        .await
        .unwrap();
    let table = format!("{schema}.lab_result");
    stack::insert_results(&client, &table, 3).await;
    let prefix = stack::unique("fhiracl");
    let projector_name = format!("{}_proj", schema.replace('-', "_"));
    grant_documented_roles(&prefix, &projector_name);
    let password = stack::env("FHIR_CDC_KAFKA_SASL_PASSWORD");
    let plain = stack::connector_config(&dir, &schema, &prefix, "");
    let config = as_user(&plain, "fhir_cdc_connector", &password, "acl.toml");

    // Told apart from a stopped broker: a wrong password, TLS to a plaintext listener, and
    // a CA that did not sign the broker's certificate.
    let said = stack::check_said(&config);
    assert!(said.contains("ok    kafka"), "{said}");
    let wrong = as_user(
        &plain,
        "fhir_cdc_connector",
        "not-the-password",
        "wrong.toml",
    );
    let said = stack::check_said(&wrong);
    assert!(
        said.contains("FAIL  kafka") && said.contains("refused authentication"),
        "{said}"
    );
    assert!(!said.contains("start Kafka"), "{said}");
    let text = std::fs::read_to_string(&config).unwrap();
    for (variant, expected) in [
        (
            text.replace(
                "${env:FHIR_CDC_KAFKA_SASL_BOOTSTRAP}",
                "${env:FHIR_CDC_KAFKA_BOOTSTRAP}",
            ),
            "TLS with",
        ),
        (
            text.replace(
                "${env:FHIR_CDC_STACK_CA}",
                "/etc/ssl/certs/ca-certificates.crt",
            ),
            "certificate verify failed",
        ),
    ] {
        let file = dir.join("tls.toml");
        std::fs::write(&file, variant).unwrap();
        let said = stack::check_said(&file);
        assert!(
            said.contains("FAIL  kafka") && said.contains(expected),
            "{said}"
        );
    }
    // `run` with the wrong password says why it waits.
    let log = dir.join("wrong.log");
    let waiting = start(&wrong, &log);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Authentication failed")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no word of the refused authentication:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    crash(waiting);
    assert!(!std::fs::read_to_string(&log).unwrap().contains(&password));

    // A reader may not create the connector's topics: refused, and said so.
    let log = dir.join("reader-run.log");
    let reader_run = as_user(&plain, "fhir_cdc_reader", &password, "reader-run.toml");
    let refused = spawn(
        &["run"],
        &reader_run,
        std::fs::File::create(&log).unwrap().into(),
    );
    let status = exit_within(refused, Duration::from_secs(60), "without the grants");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        !status.success() && said.contains("authorization failed"),
        "{status}: {said}"
    );

    // The connector, with its grants: both classes written.
    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let connector = start(&config, &log);
    await_caught_up(&client, &slot, Duration::from_secs(60), &log).await;
    stack::insert_results(&client, &table, 2).await;
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;
    // Started again, it reads its stored state with the same grants.
    let connector = start(&config, &log);
    stack::insert_results(&client, &table, 1).await;
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;
    let observations = format!("{prefix}.lab.Observation");
    assert_eq!(events_of(&observations).await.len(), 6);
    assert_eq!(
        events_of(&format!("{prefix}.restricted.lab.Patient"))
            .await
            .len(),
        1
    );

    // The projector finds the normal topic under the prefix and never the restricted one.
    let projection = format!("{}_model", schema.replace('-', "_"));
    let projector = projector_config(&dir, &projector_name, &observations, &projection);
    let text = std::fs::read_to_string(&projector)
        .unwrap()
        .replace(&format!("include = [\"{observations}\"]\n"), "");
    std::fs::write(&projector, text).unwrap();
    let projector = as_user(
        &projector,
        "fhir_cdc_projector",
        &password,
        "projector.toml",
    );
    let counters = project_until_caught_up(&projector);
    assert_eq!(counters["applied"], 6, "{counters:?}");
    let types = stack::texts(
        &client,
        &format!("SELECT DISTINCT resource_type FROM {projection}.resources"),
    )
    .await;
    assert_eq!(types, ["Observation"]);

    // A reader of normal data sees the observations, and neither patients nor dead letters.
    let reader = as_user(&plain, "fhir_cdc_reader", &password, "reader.toml");
    let seen = tail_everything(&reader);
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen
        .iter()
        .all(|event| event.to_string().contains("\"Observation\"")));
}
