//! A config-file-driven rollout against the real stack: `fhir-cdc plan` says what a change
//! of mapping files would do before it is rolled out (tables, mappings, schema versions with
//! the registry's verdict, topics) and exits 0 when it is safe; the subjects `run` creates
//! get the configured compatibility level; after SIGTERM and a start with the new files the
//! changed resources come out as new versions with nothing lost, and `plan` has nothing left
//! to do. A schema version the registry would refuse makes `plan` exit 1 naming the field,
//! and stops `run` before it writes anything.

use std::{path::Path, process::Output, time::Duration};

use fhir_cdc::{
    canonical::{registry::Subjects, schema::event_schema},
    config::{Compatibility, RegistryConfig},
};
use schema_registry_converter::{
    async_impl::schema_registry::{post_schema, SrSettings},
    schema_registry_common::{SchemaType, SuppliedSchema},
};
use serde_json::Value;

use crate::{
    connector::{self, await_caught_up, await_snapshotted, events_of, exit_within},
    stack,
};

fn plan(config: &Path, format: &str) -> Output {
    stack::fhir_cdc(&[
        "plan",
        "--config",
        config.to_str().unwrap(),
        "--format",
        format,
    ])
}

fn plan_json(config: &Path) -> (Option<i32>, Value) {
    let output = plan(config, "json");
    let text = String::from_utf8_lossy(&output.stdout);
    let json = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "plan --format json printed no JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), json)
}

fn plan_text(config: &Path) -> (Option<i32>, String) {
    let output = plan(config, "text");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The `field` of the entries of `list` whose `key` is `value`.
fn entry<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|e| e[key] == value)
        .unwrap_or_else(|| panic!("no {key} = {value} in {list}"))
}

fn registry_with(level: Compatibility) -> Subjects {
    let mut config: RegistryConfig =
        toml::from_str(&format!("url = \"{}\"", stack::registry_url())).unwrap();
    config.compatibility = level;
    Subjects::new(&config).unwrap()
}

#[tokio::test]
async fn plan_then_roll_out_a_mapping_change_with_nothing_lost() {
    let client = stack::pg_client().await;
    let schema = stack::unique("rollout");
    stack::create_lab_schema(&client, &schema).await;
    let dir = std::env::temp_dir().join(&schema);
    let mappings = dir.join("mappings");
    stack::lab_mappings(&mappings, &schema, &["patient.yaml", "result.yaml"]);
    let prefix = stack::unique("fhirroll");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[schema_registry]\n",
        "[schema_registry]\ncompatibility = \"FULL\"\n",
    );
    std::fs::write(&config, text).unwrap();
    let log = dir.join("run.log");
    let results = format!("{schema}.lab_result");
    stack::insert_results(&client, &results, 5).await;

    // Before the first start: everything is new, and safe.
    let (code, first) = plan_json(&config);
    assert_eq!(code, Some(0), "{first}");
    assert_eq!(first["against"], "nothing");
    assert_eq!(entry(&first["tables"], "table", &results)["snapshot"], true);
    let observations = format!("{prefix}.lab.Observation");
    let subject = format!("{observations}-value");
    let planned = entry(&first["schemas"], "subject", &subject);
    assert_eq!(planned["verdict"], "first");
    assert_eq!(planned["compatibility"], "FULL");
    entry(&first["topics"], "topic", &observations);

    let running = connector::start(&config, &log);
    await_snapshotted(&config, &log).await;
    let slot = format!("fhir_cdc_{schema}");
    await_caught_up(&client, &slot, Duration::from_secs(30), &log).await;
    // The subject `run` created has the configured level, not the registry's global one.
    let registry = registry_with(Compatibility::Backward);
    assert_eq!(
        registry.level(&subject).await.unwrap(),
        Some(Compatibility::Full)
    );
    assert_eq!(registry.versions(&subject).await.unwrap().len(), 1);

    let (code, said) = plan_text(&config);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("nothing to do"), "{said}");

    // The change under review: a display added to every Observation, orders mapped, patients
    // no longer captured.
    let result_file = mappings.join("result.yaml");
    let changed = std::fs::read_to_string(&result_file).unwrap().replace(
        "      category[0].coding[0].code: laboratory\n",
        "      category[0].coding[0].code: laboratory\n      category[0].coding[0].display: Laboratory\n",
    );
    std::fs::write(&result_file, changed).unwrap();
    stack::lab_mappings(&mappings, &schema, &["order.yaml"]);
    std::fs::remove_file(mappings.join("patient.yaml")).unwrap();

    let (code, plan) = plan_json(&config);
    assert_eq!(code, Some(0), "{plan}");
    assert_eq!(plan["against"], "recorded");
    assert_eq!(
        entry(&plan["mappings"], "id", "lab.result")["change"],
        "changed"
    );
    assert_eq!(
        entry(&plan["mappings"], "id", "lab.order")["change"],
        "added"
    );
    assert_eq!(
        entry(&plan["mappings"], "id", "lab.patient")["change"],
        "removed"
    );
    let orders = entry(&plan["tables"], "table", &format!("{schema}.lab_order"));
    assert_eq!(
        (&orders["change"], &orders["snapshot"]),
        (&"added".into(), &true.into())
    );
    assert_eq!(
        entry(&plan["tables"], "table", &format!("{schema}.patient"))["change"],
        "removed"
    );
    assert_eq!(
        entry(&plan["schemas"], "subject", &subject)["verdict"],
        "unchanged"
    );
    let requests = format!("{prefix}.lab.ServiceRequest");
    assert_eq!(
        entry(&plan["schemas"], "subject", &format!("{requests}-value"))["verdict"],
        "first"
    );
    entry(&plan["topics"], "topic", &requests);
    assert!(
        plan["topics"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["topic"] != observations.as_str()),
        "{plan}"
    );
    let (_, said) = plan_text(&config);
    assert!(
        said.contains("~ lab.result") && said.contains("safe to roll out"),
        "{said}"
    );

    // Roll out: writes go on while the connector stops and starts with the new files.
    stack::insert_results(&client, &results, 3).await;
    assert!(
        connector::stop(running).success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    stack::insert_results(&client, &results, 3).await;
    client
        .batch_execute(&format!(
            "INSERT INTO {schema}.lab_order (accession_no, mrn, order_code, order_status, ordered_at)
             VALUES ('A24-900', 'M000001', 'BMP', 'O', '2024-03-05 14:00:00')"
        ))
        .await
        .unwrap();
    let running = connector::start(&config, &log);
    await_snapshotted(&config, &log).await;
    let (code, said) = stack::snapshot(&config, &["--table", &results]);
    assert_eq!(code, Some(0), "{said}");
    stack::insert_results(&client, &results, 2).await;
    await_caught_up(&client, &slot, Duration::from_secs(30), &log).await;

    let (code, said) = plan_text(&config);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("nothing to do"), "{said}");
    assert!(
        connector::stop(running).success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );

    // Nothing lost: every result has an event; each now has a version the new mapping made,
    // with the display, above the one the old mapping made; one reader decodes them all.
    let new_version = plan["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "lab.result")
        .unwrap()["to"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = events_of(&observations).await;
    connector::assert_repeats_are_exact(&events);
    let ids = stack::result_values(&client, &results).await;
    assert_eq!(ids.len(), 13);
    for id in ids.keys() {
        let versions: Vec<_> = events.iter().filter(|e| &e.resource_id == id).collect();
        let last = versions
            .last()
            .unwrap_or_else(|| panic!("{id} has no event"));
        assert_eq!(&*last.provenance.mapping_version, new_version, "{id}");
        let resource = last.resource.as_ref().unwrap().to_json().to_string();
        assert!(resource.contains("Laboratory"), "{resource}");
    }
    let changed = (1..=5)
        .map(|n| format!("result-{n}"))
        .filter(|id| {
            events
                .iter()
                .filter(|e| &e.resource_id == id)
                .map(|e| &*e.provenance.mapping_version)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == 2
        })
        .count();
    assert_eq!(changed, 5, "the first rows have an old and a new version");
    assert_eq!(events_of(&requests).await.len(), 1);
    stack::drop_capture(&client, &slot, &slot, &schema).await;
}

#[tokio::test]
async fn an_incompatible_schema_version_is_refused_by_plan_and_by_run_before_anything_is_written() {
    let client = stack::pg_client().await;
    let schema = stack::unique("incompat");
    stack::create_lab_schema(&client, &schema).await;
    let dir = std::env::temp_dir().join(&schema);
    stack::lab_mappings(&dir.join("mappings"), &schema, &["result.yaml"]);
    let prefix = stack::unique("fhirincompat");
    let config = stack::connector_config(&dir, &schema, &prefix, "");
    stack::insert_results(&client, &format!("{schema}.lab_result"), 3).await;

    // What consumers of the topic read today: a version whose event_id is a number, under
    // BACKWARD. The events fhir-cdc writes cannot join it.
    let topic = format!("{prefix}.lab.Observation");
    let subject = format!("{topic}-value");
    let mut today = event_schema("Observation");
    for field in today["fields"].as_array_mut().unwrap() {
        if field["name"] == "event_id" {
            field["type"] = "long".into();
        }
    }
    post_schema(
        &SrSettings::new(stack::registry_url()),
        subject.clone(),
        SuppliedSchema::new(None, SchemaType::Avro, today.to_string()),
    )
    .await
    .unwrap();
    registry_with(Compatibility::Backward)
        .set_compatibility(&subject)
        .await
        .unwrap();

    let (code, said) = plan_text(&config);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("INCOMPATIBLE") && said.contains(&subject),
        "{said}"
    );
    assert!(said.contains("event_id"), "the field is named: {said}");
    let (code, json) = plan_json(&config);
    assert_eq!((code, &json["safe"]), (Some(1), &Value::Bool(false)));

    let log = dir.join("run.log");
    let refused = connector::start(&config, &log);
    let status = exit_within(
        refused,
        Duration::from_secs(60),
        "of an incompatible schema",
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{logged}");
    assert!(
        logged.contains("event_id") && logged.contains(&subject),
        "{logged}"
    );
    assert_eq!(connector::messages_in(&topic), 0, "nothing was written");
    let versions = registry_with(Compatibility::Backward)
        .versions(&subject)
        .await
        .unwrap();
    assert_eq!(versions.len(), 1, "no version was registered");
    let slot = format!("fhir_cdc_{schema}");
    stack::drop_capture(&client, &slot, &slot, &schema).await;
}
