//! The sample billing database on MariaDB end to end, through the commands an operator
//! uses: `check` and `preview` with the billing mappings, `run` (its snapshot taken while
//! charges are posted, then the stream of corrections) and `tail`. What arrives is counted
//! against the database itself, read again by Confluent's Python client, and every resource
//! is validated by two independent FHIR validators.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::Duration,
};

use integration_tests::connector::{
    await_binlog_stored, await_snapshotted, start, stop, tail_everything,
};
use mysql_async::prelude::Queryable;
use rdkafka::{
    admin::{AdminClient, AdminOptions, ResourceSpecifier},
    client::DefaultClientContext,
    ClientConfig,
};
use serde_json::Value;

use crate::stack;

/// Charges posted while the snapshot is being taken.
const CONCURRENT_CHARGES: u64 = 300;

/// A fresh database `name` with the billing schema and the sample rows, loaded as its DBA
/// would (as root), and the billing mappings pointed at it.
fn load_billing(name: &str, mappings: &std::path::Path) {
    let schema = std::fs::read_to_string(stack::repo_root().join("mappings/billing/schema.sql"))
        .unwrap()
        .replace("billing.", &format!("{name}."))
        .replace(
            "DATABASE IF NOT EXISTS billing",
            &format!("DATABASE {name}"),
        );
    let user = mysql_async::Opts::from_url(&stack::mysql_url())
        .unwrap()
        .user()
        .unwrap()
        .to_owned();
    // The test writes the story as the stack's user.
    stack::mariadb_root(&format!(
        "{schema}; GRANT INSERT, UPDATE, DELETE ON {name}.* TO '{user}'@'%';"
    ));
    let fixture = Command::new("python3")
        .arg(stack::repo_root().join("integration-tests/fixtures/billing.py"))
        .args(["--patients", "80", "--database", name])
        .output()
        .unwrap();
    assert!(fixture.status.success());
    stack::mariadb_root(&String::from_utf8(fixture.stdout).unwrap());
    std::fs::create_dir_all(mappings).unwrap();
    for file in ["charge.yaml", "claim.yaml"] {
        let text = std::fs::read_to_string(stack::repo_root().join("mappings/billing").join(file))
            .unwrap()
            .replace("table: billing.", &format!("table: {name}."));
        std::fs::write(mappings.join(file), text).unwrap();
    }
}

#[tokio::test]
async fn the_sample_billing_database_arrives_whole_and_valid() {
    let name = stack::unique("billing_sample");
    let dir = std::env::temp_dir().join(&name);
    load_billing(&name, &dir.join("mappings"));
    let prefix = stack::unique("fhirbill");
    let config = stack::mysql_connector_config(&dir, &name, &prefix);
    // Claims are restricted: their class keeps them on topics of their own, created with
    // its settings.
    let text = std::fs::read_to_string(&config).unwrap()
        + "[topics.restricted]\nconfig = { \"retention.ms\" = 86400000 }\n";
    std::fs::write(&config, text).unwrap();
    let config_arg = config.to_str().unwrap();

    // check: the mapped tables exist, are readable and keyed.
    let check = stack::fhir_cdc(&["check", "--config", config_arg]);
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "{name}.charge is readable, primary key (charge_id)"
        )),
        "{said}"
    );

    // preview: resources of live rows, nothing written; a draft's zero date is no date.
    let claims = format!("{name}.claim");
    let preview = stack::fhir_cdc(&[
        "preview", "--config", config_arg, "--table", &claims, "--limit", "40",
    ]);
    assert!(
        preview.status.success(),
        "{}",
        String::from_utf8_lossy(&preview.stderr)
    );
    let previewed: Vec<Value> = serde_json::Deserializer::from_slice(&preview.stdout)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(previewed.len(), 40);
    assert!(previewed.iter().all(|r| r["resourceType"] == "Claim"));
    assert!(
        previewed
            .iter()
            .any(|r| r["billablePeriod"]["start"].is_string()
                && r["billablePeriod"]["end"].is_null()),
        "some draft claim has no end of its billable period"
    );

    // run, with charges posted while the snapshot is taken.
    stack::add_source_setting(&config, "snapshot.chunk.size = 200");
    let log = dir.join("run.log");
    let connector = start(&config, &log);
    let mut conn = stack::mysql_conn().await;
    for i in 0..CONCURRENT_CHARGES {
        conn.query_drop(format!(
            "INSERT INTO {name}.charge (charge_id, account_no, mrn, cpt_code, description, amount, status, service_date, posted_at)
             VALUES ({}, 'ACC-000001', 'M000001', '93000', 'Électrocardiogramme, 12 dérivations', 61.20, 'B', '2024-03-05', NOW(3))",
            500_000 + i
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    // A correction and a reversal once the posting is done.
    conn.query_drop(format!(
        "UPDATE {name}.charge SET quantity = 2, version = version + 1 WHERE charge_id = 500000"
    ))
    .await
    .unwrap();
    conn.query_drop(format!(
        "START TRANSACTION;
         INSERT INTO {name}.charge (charge_id, account_no, mrn, cpt_code, description, amount, status, reversal_of, service_date, posted_at)
           SELECT 600000, account_no, mrn, cpt_code, description, -amount, 'B', charge_id, service_date, NOW(3)
             FROM {name}.charge WHERE charge_id = 500001;
         UPDATE {name}.charge SET status = 'R', version = version + 1 WHERE charge_id = 500001;
         COMMIT"
    ))
    .await
    .unwrap();
    await_snapshotted(&config, &log).await;
    await_binlog_stored(&config, Duration::from_secs(90), &log).await;
    assert!(stop(connector).success());

    // tail: everything, decoded through the registry.
    let events = tail_everything(&config);
    let ids: BTreeSet<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), events.len(), "no event twice");

    // Every charge and claim the database holds, each as its resource's latest version.
    let charges: BTreeSet<String> = conn
        .query::<u64, _>(format!("SELECT charge_id FROM {name}.charge"))
        .await
        .unwrap()
        .into_iter()
        .map(|id| format!("charge-{id}"))
        .collect();
    let claims: BTreeSet<String> = conn
        .query::<String, _>(format!("SELECT claim_no FROM {name}.claim"))
        .await
        .unwrap()
        .into_iter()
        .map(|no| format!("claim-{no}"))
        .collect();
    let mut latest: BTreeMap<(&str, &str), &Value> = BTreeMap::new();
    for event in &events {
        let key = (
            event["resource_type"].as_str().unwrap(),
            event["resource_id"].as_str().unwrap(),
        );
        let entry = latest.entry(key).or_insert(event);
        if event["resource_version"].as_str() > entry["resource_version"].as_str() {
            *entry = event;
        }
    }
    let arrived = |kind: &str| -> BTreeSet<String> {
        latest
            .keys()
            .filter(|(t, _)| *t == kind)
            .map(|(_, id)| id.to_string())
            .collect()
    };
    assert_eq!(arrived("ChargeItem"), charges, "no gap, no stale charge");
    assert_eq!(arrived("Claim"), claims);
    for event in &events {
        let topic = match event["resource_type"].as_str().unwrap() {
            "Claim" => format!("{prefix}.restricted.billing.Claim"),
            other => format!("{prefix}.billing.{other}"),
        };
        assert_eq!(event["topic"], topic.as_str());
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", stack::kafka_bootstrap())
        .create()
        .unwrap();
    for (topic, expected) in [
        ("restricted.billing.Claim", Some("86400000")),
        ("billing.ChargeItem", None),
    ] {
        let topic = format!("{prefix}.{topic}");
        let described = admin
            .describe_configs(&[ResourceSpecifier::Topic(&topic)], &AdminOptions::new())
            .await
            .unwrap();
        let config = described.into_iter().next().unwrap().unwrap();
        let retention = config.get("retention.ms").unwrap();
        assert_eq!(retention.is_default, expected.is_none(), "{topic}");
        if let Some(expected) = expected {
            assert_eq!(retention.value.as_deref(), Some(expected), "{topic}");
        }
    }
    assert!(charges.len() as u64 > 500 + CONCURRENT_CHARGES);

    // Corrections are what they are: a new version of the same ChargeItem, a reversal its
    // own ChargeItem pointing at the charge it cancels, which is entered-in-error.
    let resource = |id: &str| &latest[&("ChargeItem", id)]["resource"];
    assert_eq!(resource("charge-500000")["quantity"]["value"], 2);
    assert_eq!(
        resource("charge-500000")["identifier"][1]["value"],
        "charge-500000-v2"
    );
    assert_eq!(
        resource("charge-600000")["partOf"][0]["reference"],
        "ChargeItem/charge-500001"
    );
    assert_eq!(resource("charge-500001")["status"], "entered-in-error");
    // latin1 text arrives as the same characters.
    assert_eq!(
        resource("charge-500002")["code"]["text"],
        "Électrocardiogramme, 12 dérivations"
    );
    // A resubmission (replacement or void) names the claim it replaces, which is cancelled.
    let resubmitted: Vec<&&Value> = latest
        .iter()
        .filter(|((t, _), e)| *t == "Claim" && !e["resource"]["related"].is_null())
        .map(|(_, e)| e)
        .collect();
    assert!(!resubmitted.is_empty(), "the sample has resubmissions");
    for event in resubmitted {
        let related = &event["resource"]["related"][0];
        assert_eq!(related["relationship"]["coding"][0]["code"], "prior");
        let replaced = related["claim"]["reference"].as_str().unwrap();
        let replaced = replaced.trim_start_matches("Claim/");
        assert_eq!(
            latest[&("Claim", replaced)]["resource"]["status"],
            "cancelled",
            "{replaced}"
        );
    }

    stack::assert_oracles_accept(&events);

    stack::mariadb_root(&format!("DROP DATABASE {name}"));
    std::fs::remove_dir_all(dir).unwrap();
}
