//! The consumer runtime against the real broker and registry, with the in-memory target:
//! a crash between applying a batch and committing it, a second member joining while the
//! first holds a batch, and poison messages — every event done exactly once, every offset
//! reached, every refusal a dead letter with its reason.

use std::{collections::BTreeSet, time::Duration};

use fhir_cdc::{
    config::{KafkaProperties, RegistryConfig},
    consumer::{
        projector::Project,
        runtime::{consume, BatchLimits, Settings, Summary},
        target::memory::Memory,
        ConsumerError,
    },
};
use rdkafka::{consumer::Consumer, Message};
use tokio_util::sync::CancellationToken;

use crate::{
    projector::{encode, events, write},
    stack,
};
use integration_tests::connector::partition_reader;

/// The stack's broker and registry, a topic of `partitions` holding `count` lab-result
/// events (and `poison` undecodable messages in their midst); the topic and the event ids.
async fn topic_with_events(
    partitions: i32,
    count: u64,
    poison: usize,
) -> (String, Vec<String>, Vec<String>) {
    let topic = stack::unique("rt.lab.Observation");
    let events = events(count, 1);
    let mut messages = encode(&events, &topic).await;
    for i in 0..poison {
        let at = (i + 1) * messages.len() / (poison + 1);
        messages.insert(at, (format!("poison-{i}"), b"not an event".to_vec()));
    }
    write(&topic, partitions, &messages).await;
    let ids = events.iter().map(|e| e.event_id.clone()).collect();
    let resources = events.iter().map(|e| e.resource_id.clone()).collect();
    (topic, ids, resources)
}

fn registry() -> RegistryConfig {
    toml::from_str(&format!("url = \"{}\"", stack::registry_url())).unwrap()
}

fn settings<'a>(
    kafka: &'a KafkaProperties,
    registry: &'a RegistryConfig,
    topics: &'a [String],
    group: &str,
) -> Settings<'a> {
    Settings {
        name: "runtime-it",
        group: group.to_owned(),
        kafka,
        registry,
        prefix: "rt",
        include: topics,
        dead_letter_topic: format!("{group}.dlq"),
        limits: BatchLimits {
            events: 40,
            wait: Duration::from_millis(50),
            idle: Duration::from_millis(200),
        },
        until_caught_up: true,
        replay: None,
        metrics: false,
        probe: None,
    }
}

/// Run one member until the group has caught up (at most 120 s).
async fn member(settings: &Settings<'_>, target: &mut Memory) -> Result<Summary, ConsumerError> {
    tokio::time::timeout(
        Duration::from_secs(120),
        consume(settings, &mut Project, target, CancellationToken::new()),
    )
    .await
    .expect("the consumer did not catch up within 120 s")
}

/// Each of `ids` applied exactly once, and the group's offsets at the end of every partition.
fn exactly_once(target: &Memory, group: &str, ids: &[String], partitions: i32, messages: usize) {
    let store = target.store();
    let applied: Vec<&String> = store.applied.iter().map(|(id, _)| id).collect();
    let distinct: BTreeSet<&String> = applied.iter().copied().collect();
    assert_eq!(distinct.len(), applied.len(), "an event was applied twice");
    assert_eq!(
        distinct,
        ids.iter().collect::<BTreeSet<_>>(),
        "the events applied are not the events written"
    );
    let ends: i64 = (0..partitions)
        .map(|p| {
            store
                .offsets
                .iter()
                .find(|((g, (_, partition)), _)| g == group && *partition == p)
                .map_or(0, |(_, next)| *next)
        })
        .sum();
    assert_eq!(
        ends, messages as i64,
        "the offsets do not reach the end of every partition"
    );
}

#[tokio::test]
async fn a_crash_between_apply_and_commit_loses_and_repeats_nothing() {
    let (topic, ids, _) = topic_with_events(3, 300, 0).await;
    let (kafka, registry) = (stack::kafka_properties(), registry());
    let topics = [topic];
    let group = stack::unique("rt-crash");
    let settings = settings(&kafka, &registry, &topics, &group);

    let target = Memory::new();
    let failed = member(&settings, &mut target.clone().crashing_at(3))
        .await
        .expect_err("the target crashed at its third batch");
    assert!(
        failed
            .to_string()
            .contains("crashed between apply and commit"),
        "{failed}"
    );
    let committed = target.store().applied.len();
    assert_eq!(
        target.store().commits,
        2,
        "two batches committed before the crash"
    );
    assert!(committed > 0 && committed < ids.len(), "{committed}");

    // Started again: from the target's offsets, the rest, nothing twice.
    let summary = member(&settings, &mut target.clone()).await.unwrap();
    assert_eq!(
        summary.applied as usize + committed,
        ids.len(),
        "{summary:?}"
    );
    exactly_once(&target, &group, &ids, 3, ids.len());
}

#[tokio::test]
async fn a_member_joining_while_the_first_holds_a_batch_takes_over_without_loss_or_repeat() {
    let (topic, ids, _) = topic_with_events(4, 400, 0).await;
    let (kafka, registry) = (stack::kafka_properties(), registry());
    let topics = [topic];
    let group = stack::unique("rt-rebalance");
    let settings = settings(&kafka, &registry, &topics, &group);

    // The first holds each batch 1.5 s before committing it; the second joins during the
    // first batch, and the group rebalances while the first holds its next one.
    let target = Memory::new();
    let mut slow = target.clone().pausing(Duration::from_millis(1500));
    let mut second = target.clone();
    let first = member(&settings, &mut slow);
    let joining = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        member(&settings, &mut second).await
    };
    let (first, second) = tokio::join!(first, joining);
    let (first, second) = (first.unwrap(), second.unwrap());
    assert!(
        first.applied > 0 && second.applied > 0,
        "both members applied events (the partitions moved): {first:?} {second:?}"
    );
    assert_eq!(first.applied + second.applied, ids.len() as u64);
    assert_eq!(
        first.duplicate + second.duplicate,
        target.store().duplicates,
        "what was read twice is counted as duplicate"
    );
    exactly_once(&target, &group, &ids, 4, ids.len());
}

#[tokio::test]
async fn poison_messages_and_refused_events_are_dead_lettered_and_the_rest_done() {
    let (topic, ids, resources) = topic_with_events(2, 120, 2).await;
    let (kafka, registry) = (stack::kafka_properties(), registry());
    let topics = [topic];
    let group = stack::unique("rt-poison");
    let settings = settings(&kafka, &registry, &topics, &group);

    let refused = resources[17].clone();
    let mut target = Memory::new().refusing([refused.clone()]);
    let summary = member(&settings, &mut target).await.unwrap();
    let done: Vec<String> = ids
        .iter()
        .zip(&resources)
        .filter(|(_, resource)| **resource != refused)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(summary.dead_lettered, 3, "{summary:?}");
    assert_eq!(summary.applied as usize, done.len(), "{summary:?}");
    exactly_once(&target, &group, &done, 2, ids.len() + 2);

    // The dead letters: the two undecodable messages and the refused event, with reasons.
    let reader = partition_reader(&settings.dead_letter_topic, "read_committed");
    let mut reasons = Vec::new();
    while reasons.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(30), reader.recv())
            .await
            .expect("three dead letters within 30 s")
            .unwrap();
        let letter: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        reasons.push(letter["reason"].as_str().unwrap().to_owned());
    }
    reader.unsubscribe();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("refuses this resource"))
            .count(),
        1,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| !r.contains("refuses this resource"))
            .count(),
        2,
        "{reasons:?}"
    );
}
