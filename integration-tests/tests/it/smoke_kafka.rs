//! Kafka is real and reachable with rdkafka: a message makes the round trip with its key,
//! payload and headers, and topics are not created by accident.

use std::time::Duration;

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{Consumer, StreamConsumer},
    message::{Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Message, Offset, TopicPartitionList,
};

use crate::stack;

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", stack::kafka_bootstrap());
    config
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client_config().create().unwrap();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &options,
        )
        .await
        .unwrap();
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("creating {topic}: {code}"));
    }
}

#[tokio::test]
async fn a_message_round_trips_with_key_payload_and_headers() {
    let topic = stack::unique("smoke");
    create_topic(&topic, 1).await;

    let producer: FutureProducer = client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    let payload = br#"{"resourceType":"Observation","id":"smoke-1"}"#;
    let delivery = producer
        .send(
            FutureRecord::to(&topic)
                .key("Observation/smoke-1")
                .payload(&payload[..])
                .headers(OwnedHeaders::new().insert(Header {
                    key: "event_id",
                    value: Some("ev-1"),
                })),
            Duration::from_secs(20),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    assert_eq!(
        (delivery.partition, delivery.offset),
        (0, 0),
        "the first record of a new topic"
    );

    let consumer: StreamConsumer = client_config()
        .set("group.id", stack::unique("smoke-group"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("no message within 30s")
        .unwrap();
    assert_eq!(message.key(), Some(&b"Observation/smoke-1"[..]));
    assert_eq!(message.payload(), Some(&payload[..]));
    let header = message.headers().unwrap().get(0);
    assert_eq!((header.key, header.value), ("event_id", Some(&b"ev-1"[..])));
}

#[tokio::test]
async fn topics_are_never_created_by_accident() {
    let producer: FutureProducer = client_config()
        .set("message.timeout.ms", "3000")
        .create()
        .unwrap();
    let topic = stack::unique("never_created");
    let result = producer
        .send(
            FutureRecord::to(&topic).key("k").payload("v"),
            Duration::from_secs(10),
        )
        .await;
    assert!(
        result.is_err(),
        "the broker accepted a record for a topic nobody created"
    );
}
