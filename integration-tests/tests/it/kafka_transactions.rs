//! The transactional producer against the stack's broker: a committed transaction is
//! visible whole to a `read_committed` reader, an aborted one not at all (though its
//! messages are in the log, as a `read_uncommitted` reader shows), an empty one is never
//! sent, consumed offsets commit with the output they were made into, and a second
//! producer with the same `transactional.id` fences the first, which then says so.

use std::time::Duration;

use fhir_cdc::kafka::{ensure_topics, ErrorKind, Producer, TopicSpec, TransactionalProducer};
use integration_tests::connector::partition_reader;
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    ClientConfig, Message, Offset, TopicPartitionList,
};

use crate::stack;

/// A fresh one-partition topic.
async fn topic(name: &str) -> String {
    let name = stack::unique(name);
    let spec = TopicSpec {
        name: name.clone(),
        partitions: 1,
        replication_factor: 1,
        config: Vec::new(),
    };
    ensure_topics(&stack::kafka_properties(), &[spec])
        .await
        .unwrap();
    name
}

/// The payloads of `topic` a reader at `isolation` sees, read until 3 s pass without one.
async fn payloads(topic: &str, isolation: &str) -> Vec<String> {
    let consumer = partition_reader(topic, isolation);
    let mut seen = Vec::new();
    while let Ok(message) = tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await {
        let message = message.unwrap();
        seen.push(String::from_utf8(message.payload().unwrap().to_vec()).unwrap());
    }
    seen
}

#[tokio::test]
async fn a_committed_transaction_shows_whole_and_an_aborted_one_not_at_all() {
    let topic = topic("tx.commit").await;
    let id = stack::unique("tx-commit");
    let mut producer = TransactionalProducer::new(&stack::kafka_properties(), &id)
        .await
        .unwrap();
    assert!(!producer.commit().await.unwrap(), "nothing to commit");
    assert!(!producer.is_open());

    for n in 1..=3 {
        producer
            .send(&topic, "k", format!("committed-{n}").as_bytes(), &[])
            .await
            .unwrap();
    }
    assert!(producer.is_open());
    assert!(producer.commit().await.unwrap());
    for n in 1..=2 {
        producer
            .send(&topic, "k", format!("aborted-{n}").as_bytes(), &[])
            .await
            .unwrap();
    }
    // Past linger.ms, so that the broker has them: an abort purges what is still queued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    producer.abort().await.unwrap();
    producer
        .send(&topic, "k", b"committed-4", &[])
        .await
        .unwrap();
    producer.commit().await.unwrap();

    assert_eq!(
        payloads(&topic, "read_committed").await,
        ["committed-1", "committed-2", "committed-3", "committed-4"]
    );
    // The aborted messages were written; only the transaction's end hides them.
    let uncommitted = payloads(&topic, "read_uncommitted").await;
    assert!(
        uncommitted.contains(&"aborted-1".to_owned()),
        "{uncommitted:?}"
    );
}

#[tokio::test]
async fn consumed_offsets_commit_with_the_output_and_not_without_it() {
    let (input, output) = (topic("tx.in").await, topic("tx.out").await);
    let plain = Producer::new(&stack::kafka_properties()).unwrap();
    for n in 0..4 {
        plain
            .send(&input, "k", format!("in-{n}").as_bytes(), &[])
            .await
            .unwrap();
    }
    let group = stack::unique("txgroup");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack::kafka_bootstrap())
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&input]).unwrap();
    let mut producer =
        TransactionalProducer::new(&stack::kafka_properties(), &stack::unique("tx-offsets"))
            .await
            .unwrap();
    let committed = |consumer: &StreamConsumer| {
        let mut wanted = TopicPartitionList::new();
        wanted.add_partition(&input, 0);
        consumer
            .committed_offsets(wanted, Duration::from_secs(10))
            .unwrap()
            .find_partition(&input, 0)
            .unwrap()
            .offset()
    };

    // Two messages consumed and transformed, the transaction aborted: no offset committed.
    // Then the same two again in a transaction that commits.
    let mut read = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap()
            .unwrap();
        read.push((
            message.offset(),
            String::from_utf8(message.payload().unwrap().to_vec()).unwrap(),
        ));
    }
    let mut next = TopicPartitionList::new();
    next.add_partition_offset(&input, 0, Offset::Offset(read[1].0 + 1))
        .unwrap();
    for attempt in ["aborted", "committed"] {
        for (_, payload) in &read {
            producer
                .send(&output, "k", format!("{attempt}:{payload}").as_bytes(), &[])
                .await
                .unwrap();
        }
        producer
            .send_offsets(next.clone(), consumer.group_metadata().unwrap())
            .await
            .unwrap();
        if attempt == "aborted" {
            producer.abort().await.unwrap();
            assert_eq!(
                committed(&consumer),
                Offset::Invalid,
                "no offset after an abort"
            );
        } else {
            producer.commit().await.unwrap();
        }
    }
    assert_eq!(committed(&consumer), Offset::Offset(2));
    assert_eq!(
        payloads(&output, "read_committed").await,
        ["committed:in-0", "committed:in-1"]
    );
}

#[tokio::test]
async fn a_second_producer_with_the_same_id_fences_the_first() {
    let topic = topic("tx.fence").await;
    let id = stack::unique("tx-fence");
    let mut first = TransactionalProducer::new(&stack::kafka_properties(), &id)
        .await
        .unwrap();
    first.send(&topic, "k", b"first-1", &[]).await.unwrap();
    first.commit().await.unwrap();
    first.send(&topic, "k", b"first-open", &[]).await.unwrap();

    // The second takes over: the first's open transaction is aborted.
    let mut second = TransactionalProducer::new(&stack::kafka_properties(), &id)
        .await
        .unwrap();
    second.send(&topic, "k", b"second-1", &[]).await.unwrap();
    second.commit().await.unwrap();

    let refused = match first.commit().await {
        Ok(_) => first.send(&topic, "k", b"first-2", &[]).await.err(),
        Err(e) => Some(e),
    }
    .expect("the fenced producer is refused");
    assert_eq!(refused.kind(), ErrorKind::Fenced, "{refused}");
    let said = refused.to_string();
    assert!(
        said.contains(&id)
            && said.contains("another producer with this transactional.id took over"),
        "{said}"
    );
    assert_eq!(
        payloads(&topic, "read_committed").await,
        ["first-1", "second-1"]
    );
}
