//! The Kafka sink against the real broker: topics created with their settings (and left
//! alone when they exist), messages acknowledged with their partition and offset, headers
//! delivered.

use std::time::Duration;

use fhir_cdc::{
    config::KafkaProperties,
    kafka::{ensure_topics, Producer, StreamProducer, TopicSpec},
};
use rdkafka::{
    admin::{AdminClient, AdminOptions, ResourceSpecifier},
    client::DefaultClientContext,
    consumer::{Consumer, StreamConsumer},
    message::Headers,
    ClientConfig, Message, Offset, TopicPartitionList,
};

use crate::stack;

#[tokio::test]
async fn topics_are_created_once_with_their_settings_and_messages_are_acknowledged() {
    let name = stack::unique("sinkit.lab.Observation");
    let spec = TopicSpec {
        name: name.clone(),
        partitions: 3,
        replication_factor: 1,
        config: vec![
            ("retention.ms".into(), "3600000".into()),
            ("cleanup.policy".into(), "compact".into()),
        ],
    };
    assert_eq!(
        ensure_topics(&stack::kafka_properties(), std::slice::from_ref(&spec))
            .await
            .unwrap(),
        std::slice::from_ref(&name)
    );
    assert!(
        ensure_topics(&stack::kafka_properties(), &[spec])
            .await
            .unwrap()
            .is_empty(),
        "an existing topic is left alone"
    );

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", stack::kafka_bootstrap())
        .create()
        .unwrap();
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(&name)], &AdminOptions::new())
        .await
        .unwrap();
    let config = described.into_iter().next().unwrap().unwrap();
    let value = |key: &str| config.get(key).and_then(|e| e.value.clone());
    assert_eq!(value("retention.ms").as_deref(), Some("3600000"));
    assert_eq!(value("cleanup.policy").as_deref(), Some("compact"));

    let producer = Producer::new(&stack::kafka_properties()).unwrap();
    let key = "Observation/result-101";
    let headers = [
        ("event_id", "e-1"),
        ("resource_type", "Observation"),
        ("connector", "lab"),
    ];
    let (partition, first) = producer.send(&name, key, b"v1", &headers).await.unwrap();
    let (same_partition, second) = producer.send(&name, key, b"v2", &headers).await.unwrap();
    assert_eq!(
        partition, same_partition,
        "one key, one partition: versions stay ordered"
    );
    assert_eq!(second, first + 1);

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack::kafka_bootstrap())
        .set("group.id", stack::unique("sink"))
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&name, partition, Offset::Offset(first))
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.key(), Some(key.as_bytes()));
    assert_eq!(message.payload(), Some(&b"v1"[..]));
    let received: Vec<(String, String)> = message
        .headers()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h.key.to_owned(),
                String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    assert_eq!(received, expected);
}

/// The connector's producer: every message's report comes back with the id it was sent
/// with, in one partition in the order sent — also when librdkafka's queue (four messages
/// here) is full and sending waits for room.
#[tokio::test]
async fn a_stream_producer_reports_each_message_by_its_id_when_its_queue_fills() {
    let name = stack::unique("sinkit.lab.Stream");
    let spec = TopicSpec {
        name: name.clone(),
        partitions: 1,
        replication_factor: 1,
        config: Vec::new(),
    };
    ensure_topics(&stack::kafka_properties(), &[spec])
        .await
        .unwrap();
    let properties: KafkaProperties = toml::from_str(&format!(
        "\"bootstrap.servers\" = \"{}\"\n\"queue.buffering.max.messages\" = \"4\"",
        stack::kafka_bootstrap()
    ))
    .unwrap();
    let (producer, mut reports) = StreamProducer::new(&properties).unwrap();
    let sent = 40;
    for id in 0..sent {
        let payload = format!("m{id}");
        producer
            .send(
                id,
                &name,
                "Observation/1",
                payload.as_bytes(),
                &[("n", "1")],
            )
            .await
            .unwrap();
    }
    let mut offsets = vec![None; sent];
    for _ in 0..sent {
        let (id, result) = tokio::time::timeout(Duration::from_secs(30), reports.recv())
            .await
            .unwrap()
            .unwrap();
        let (partition, offset) = result.unwrap();
        assert_eq!(partition, 0);
        assert_eq!(offsets[id].replace(offset), None, "one report for id {id}");
    }
    let offsets: Vec<i64> = offsets.into_iter().map(Option::unwrap).collect();
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "offsets follow the ids: {offsets:?}"
    );
}
