//! PostgreSQL over TLS. The stack admits its TLS role over TLS only, with a client
//! certificate in its name (pg_hba `hostssl … clientcert=verify-full`, `hostnossl …
//! reject`): the connector snapshots and streams through it, its replication session
//! included (pg_stat_ssl says so, with the certificate's name); the projector writes
//! through it; `check` says how the connection is protected, and names what is wrong when
//! it cannot be.

use std::time::Duration;

use crate::{
    connector::{await_caught_up, drain, events_of, start},
    projector::{project_until_caught_up, projector_config},
    stack,
};

#[tokio::test]
async fn the_connector_and_the_projector_work_over_tls_with_a_client_certificate() {
    let client = stack::pg_client().await;
    let schema = stack::unique("pgtls");
    stack::create_lab_schema(&client, &schema).await;
    let table = format!("{schema}.lab_result");
    stack::insert_results(&client, &table, 3).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("pgtls");
    let plain =
        std::fs::read_to_string(stack::connector_config(&dir, &schema, &prefix, "")).unwrap();
    let tls_url = stack::env("FHIR_CDC_PG_TLS_URL");
    let (base, _) = tls_url.split_once('?').unwrap();
    let variant = |file: &str, url: &str| {
        let config = dir.join(file);
        let text = plain.replace("${env:FHIR_CDC_PG_URL}", url);
        assert_ne!(text, plain);
        std::fs::write(&config, text).unwrap();
        config
    };
    let config = variant("tls.toml", "${env:FHIR_CDC_PG_TLS_URL}");
    let ca = stack::env("FHIR_CDC_STACK_CA");

    let said = stack::check_said(&config);
    assert!(
        said.contains("as fhir_cdc_tls (PostgreSQL ")
            && said.contains(", certificate and host name verified)"),
        "{said}"
    );
    for (url, expected) in [
        (
            format!("{base}?sslmode=disable"),
            "admits role fhir_cdc_tls only over TLS",
        ),
        (
            format!("{base}?sslmode=verify-full&sslrootcert={ca}"),
            "requires a valid client certificate",
        ),
        (
            // A certificate that signed nothing, for a CA.
            format!(
                "{base}?sslmode=verify-full&sslrootcert={}",
                ca.replace("ca.pem", "client.pem")
            ),
            "certificate verify failed",
        ),
        (
            format!("{base}?sslmode=verify-full"),
            "verify-ca and verify-full need sslrootcert",
        ),
    ] {
        let said = stack::check_said(&variant("variant.toml", &url));
        assert!(
            said.contains("FAIL  postgres") && said.contains(expected),
            "{url}: {said}"
        );
    }

    let slot = format!("fhir_cdc_{schema}");
    let log = dir.join("run.log");
    let connector = start(&config, &log);
    await_caught_up(&client, &slot, Duration::from_secs(30), &log).await;
    stack::insert_results(&client, &table, 2).await;
    await_caught_up(&client, &slot, Duration::from_secs(30), &log).await;
    // Sessions of a role are whole only to that role (or a reader of all statistics).
    let own = fhir_cdc::postgres::connect(&fhir_cdc::config::Secret::new(&tls_url))
        .await
        .unwrap();
    let sessions = own
        .query(
            "SELECT a.backend_type, s.ssl, s.client_dn FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.usename = 'fhir_cdc_tls' AND a.pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let sessions: Vec<(String, bool, Option<String>)> = sessions
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        sessions.iter().any(|(kind, ..)| kind == "walsender"),
        "the replication session: {sessions:?}"
    );
    assert!(
        sessions
            .iter()
            .all(|(_, ssl, dn)| *ssl && dn.as_deref() == Some("/CN=fhir_cdc_tls")),
        "{sessions:?}"
    );
    drain(&client, &slot, connector, Duration::from_secs(60), &log).await;
    let topic = format!("{prefix}.lab.Observation");
    assert_eq!(events_of(&topic).await.len(), 5);

    let projection = format!("{}_proj", schema.replace('-', "_"));
    let projector = projector_config(&dir, "tlsproj", &topic, &projection);
    let text = std::fs::read_to_string(&projector).unwrap();
    std::fs::write(
        &projector,
        text.replace("${env:FHIR_CDC_PG_URL}", "${env:FHIR_CDC_PG_TLS_URL}"),
    )
    .unwrap();
    let counters = project_until_caught_up(&projector);
    assert_eq!(counters["applied"], 5);
    let resources: i64 = own
        .query_one(&format!("SELECT count(*) FROM {projection}.resources"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(resources, 5);

    own.batch_execute(&format!("DROP SCHEMA {projection} CASCADE"))
        .await
        .unwrap();
    stack::drop_capture(&own, &slot, &slot, &schema).await;
    std::fs::remove_dir_all(dir).unwrap();
}
