//! The consistent snapshot against the real server, with writes running while it is taken:
//! every row is read exactly once — by the snapshot or as a streamed insert, never both,
//! never neither — and the snapshot plus the stream rebuild the table's final state.

use std::{collections::BTreeMap, time::Duration};

use fhir_cdc::{
    change::{Operation, Position, SourceMessage, Value},
    config::Secret,
    source::postgres::{
        changes::Decoded,
        replication::ReplicationStream,
        snapshot::{read_tables, ExportedSnapshot},
    },
};

use crate::stack;

const SENTINEL: i64 = 999_999;

async fn connect() -> tokio_postgres::Client {
    let client = stack::pg_client().await;
    client
}

fn int(value: Option<&Value>) -> i64 {
    match value {
        Some(Value::Int(i)) => *i,
        other => panic!("expected an integer, got {other:?}"),
    }
}

#[tokio::test]
async fn the_snapshot_and_the_stream_meet_without_gap_or_double() {
    let client = connect().await;
    let schema = stack::unique("snap");
    let table = format!("{schema}.reading");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {table} (id bigint PRIMARY KEY, value bigint NOT NULL);
             INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 2000) g;
             CREATE PUBLICATION {schema}_pub FOR TABLE {table};"
        ))
        .await
        .unwrap();

    // Inserts of new rows and updates of old ones, one transaction each, while the snapshot
    // is taken.
    let writer_table = table.clone();
    let writer = tokio::spawn(async move {
        let client = connect().await;
        for i in 2001..=3000i64 {
            client
                .execute(
                    &format!("INSERT INTO {writer_table} VALUES ($1, $1)"),
                    &[&i],
                )
                .await
                .unwrap();
            client
                .execute(
                    &format!("UPDATE {writer_table} SET value = $1 WHERE id = $2"),
                    &[&i, &(i - 2000)],
                )
                .await
                .unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let url = Secret::new(stack::pg_url());
    let slot = format!("{schema}_slot");
    let snapshot = ExportedSnapshot::create(&url, &slot, &format!("{schema}_pub"))
        .await
        .unwrap();
    let mut state: BTreeMap<i64, i64> = BTreeMap::new();
    let tables = [(schema.clone(), "reading".to_owned())];
    let (out, mut received) = tokio::sync::mpsc::channel(64);
    let reading = read_tables(&url, &snapshot, "snap-it", &tables, 97, &out);
    let collecting = async {
        let mut progress = None;
        while let Some(message) = received.recv().await {
            match message {
                SourceMessage::Change(change) => {
                    assert_eq!(change.op, Operation::Read);
                    assert_eq!(*change.key, ["id".into()]);
                    let row = change.after.unwrap();
                    assert!(
                        state
                            .insert(int(row.get("id")), int(row.get("value")))
                            .is_none(),
                        "a row read twice"
                    );
                }
                SourceMessage::Progress(position) => {
                    progress = Some(position);
                    break;
                }
            }
        }
        progress
    };
    let (read, progress) = tokio::join!(reading, collecting);
    let read = read.unwrap();
    assert_eq!(
        progress,
        Some(Position::Postgres(snapshot.consistent_point)),
        "the snapshot ends with its consistent point"
    );
    assert_eq!(read as usize, state.len());
    assert!(
        state.len() >= 2000,
        "the rows that existed before are in the snapshot"
    );

    writer.await.unwrap();
    client
        .execute(&format!("INSERT INTO {table} VALUES ($1, 0)"), &[&SENTINEL])
        .await
        .unwrap();

    let stream_client = snapshot.start_streaming().await.unwrap();
    let mut stream = ReplicationStream::resume(stream_client, "snap-it", "fhir_cdc");
    let (mut streamed_inserts, mut streamed_updates) = (0, 0);
    tokio::time::timeout(Duration::from_secs(60), async {
        'read: while let Some(decoded) = stream.next().await.unwrap() {
            let Decoded::Changes(changes) = decoded else {
                continue;
            };
            for change in changes {
                let row = change.after.unwrap();
                let (id, value) = (int(row.get("id")), int(row.get("value")));
                match change.op {
                    Operation::Insert => {
                        assert!(
                            state.insert(id, value).is_none(),
                            "row {id} is in the snapshot and streamed as an insert"
                        );
                        streamed_inserts += 1;
                        if id == SENTINEL {
                            break 'read;
                        }
                    }
                    Operation::Update => {
                        assert!(
                            state.insert(id, value).is_some(),
                            "row {id} updated but never seen"
                        );
                        streamed_updates += 1;
                    }
                    other => panic!("unexpected {other}"),
                }
            }
        }
    })
    .await
    .expect("the stream did not reach the sentinel within 60s");
    stream.stop();

    let rows = client
        .query(&format!("SELECT id, value FROM {table}"), &[])
        .await
        .unwrap();
    let expected: BTreeMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(state, expected, "snapshot + stream differ from the table");
    assert!(streamed_inserts > 1 && streamed_updates > 0, "the writes ran concurrently: {streamed_inserts} inserts, {streamed_updates} updates streamed");

    stack::drop_capture(&client, &slot, &format!("{schema}_pub"), &schema).await;
}
