//! The PostgreSQL source's chunked snapshot against the real server, driven through the
//! source seam alone (no Kafka): with writes running while it reads, and stopped halfway
//! and started again from the state it published, the changes it emits — applied as a
//! projection applies them, a version only over an older one — rebuild the table exactly,
//! and no chunk row ever carries an older value than a change the stream already gave for
//! its row (the writes only ever raise values and never bring a deleted id back).

use std::{collections::BTreeMap, time::Duration};

use fhir_cdc::{
    change::{Operation, PgLsn, Position, SourceMessage, Value},
    config::PostgresConfig,
    offsets::ConnectorState,
    source::{postgres::capture::PostgresSource, Source, SourceIo},
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::stack;

const SENTINEL: i64 = 999_999;

fn int(value: Option<&Value>) -> i64 {
    match value {
        Some(Value::Int(i)) => *i,
        other => panic!("expected an integer, got {other:?}"),
    }
}

/// Each row's latest version as a projection keeps it: id → ((position, ordinal), value or
/// deleted).
type Projection = BTreeMap<i64, ((PgLsn, u32), Option<i64>)>;

/// What one run of the source gave.
struct Run {
    reads: usize,
    streamed: usize,
    state: ConnectorState,
    saw_sentinel: bool,
}

/// Run the source from `stored` until its published state says it has read
/// `stop_after_rows_read` rows of the snapshot (or finished it; then stop it), or until it
/// streamed the sentinel row, treating every position as durable as soon as it is
/// complete. Rows read, not rows emitted: a chunk row whose key the stream already gave is
/// rightly not emitted, and the writer updates every row within a few hundred
/// milliseconds, so on a loaded machine the emitted rows may never reach the bound.
async fn run_source(
    config: &PostgresConfig,
    schema: &str,
    stored: Option<ConnectorState>,
    stop_after_rows_read: Option<u64>,
    projection: &mut Projection,
) -> Run {
    let table = format!("{schema}.reading");
    let source = PostgresSource::new(
        "snap-it",
        config,
        vec![(schema.to_owned(), "reading".to_owned())],
    );
    let (out, mut received) = mpsc::channel(64);
    let (durable_tx, durable) = watch::channel(None);
    let (state, mut states) = watch::channel(ConnectorState::new("postgres"));
    let shutdown = CancellationToken::new();
    let io = SourceIo {
        out,
        durable,
        state,
        shutdown: shutdown.clone(),
    };
    let running = tokio::spawn(source.run(stored, io));
    let (mut reads, mut streamed, mut saw_sentinel) = (0, 0, false);
    let collect = async {
        while let Some(message) = received.recv().await {
            let change = match message {
                SourceMessage::Progress(Position::Postgres(lsn)) => {
                    durable_tx.send_replace(Some(lsn));
                    continue;
                }
                SourceMessage::Progress(other) => panic!("a postgres source said {other:?}"),
                SourceMessage::Change(change) => change,
            };
            let row = change.after.as_ref().or(change.before.as_ref()).unwrap();
            let id = int(row.get("id"));
            let value = change.after.as_ref().map(|r| int(r.get("value")));
            let Position::Postgres(lsn) = change.position else {
                panic!("a postgres source said {:?}", change.position)
            };
            let version = (lsn, change.ordinal);
            if change.op == Operation::Read {
                reads += 1;
            } else {
                streamed += 1;
            }
            match projection.get(&id) {
                Some((applied, _)) if *applied >= version => {}
                // Values only grow and deleted ids never come back: a newer version with a
                // smaller value, or a deleted row read again, is a stale row over a newer
                // change.
                Some((applied, now)) => {
                    assert!(
                        value.is_none() || (now.is_some() && value >= *now),
                        "row {id}: {:?} at {version:?} over {now:?} at {applied:?}",
                        value
                    );
                    projection.insert(id, (version, value));
                }
                None => {
                    projection.insert(id, (version, value));
                }
            }
            if id == SENTINEL {
                saw_sentinel = true;
                shutdown.cancel();
            }
            let read_so_far = states
                .borrow()
                .tables
                .get(&table)
                .map(|p| (p.rows, p.complete));
            if let (Some(n), Some((rows, complete))) = (stop_after_rows_read, read_so_far) {
                if rows >= n || complete {
                    shutdown.cancel();
                }
            }
        }
        // The channel closed: the source drains; let it see the last position durable.
        drop(durable_tx);
    };
    tokio::time::timeout(Duration::from_secs(120), collect)
        .await
        .expect("the source did not finish within 120 s");
    running.await.unwrap().unwrap();
    let state = states.borrow_and_update().clone();
    Run {
        reads,
        streamed,
        state,
        saw_sentinel,
    }
}

#[tokio::test]
async fn chunks_and_the_stream_rebuild_the_table_also_across_a_restart() {
    let client = stack::pg_client().await;
    let schema = stack::unique("snap");
    let table = format!("{schema}.reading");
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {table} (id bigint PRIMARY KEY, value bigint NOT NULL);
             INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 5000) g;"
        ))
        .await
        .unwrap();
    let config: PostgresConfig = toml::from_str(&format!(
        r#"url = "{}"
slot.name = "{schema}_slot"
publication.name = "{schema}_pub"
snapshot.chunk.size = 97
heartbeat.interval.ms = 200"#,
        stack::pg_url()
    ))
    .unwrap();

    // Inserts of new rows, updates and deletes of old ones, while the snapshot is read.
    let writing = CancellationToken::new();
    let writer = {
        let (table, writing) = (table.clone(), writing.clone());
        tokio::spawn(async move {
            let client = stack::pg_client().await;
            let mut i = 5001i64;
            while !writing.is_cancelled() {
                client
                    .batch_execute(&format!(
                        "INSERT INTO {table} VALUES ({i}, {i});
                         UPDATE {table} SET value = {i} WHERE id % 50 = {};
                         DELETE FROM {table} WHERE id = {};",
                        i % 50,
                        (i * 13) % 5000 + 1
                    ))
                    .await
                    .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let mut projection = Projection::new();
    let first = run_source(&config, &schema, None, Some(2_000), &mut projection).await;
    let progress = first.state.tables.get(&table).cloned();
    assert!(
        progress
            .as_ref()
            .is_some_and(|p| !p.complete && p.last_key.is_some()),
        "stopped halfway, the state says how far the snapshot came: {progress:?}"
    );
    assert!(first.state.position.is_some());

    // Started again from its state: the rest of the table, then the stream.
    let state = first.state.clone();
    let sentinel = {
        let table = table.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            writing.cancel();
            writer.await.unwrap();
            let client = stack::pg_client().await;
            client
                .execute(&format!("INSERT INTO {table} VALUES ($1, 0)"), &[&SENTINEL])
                .await
                .unwrap();
        }
    };
    let (second, ()) = tokio::join!(
        run_source(&config, &schema, Some(state), None, &mut projection),
        sentinel
    );
    assert!(second.saw_sentinel);
    assert!(
        second.state.tables[&table].complete,
        "the snapshot finished: {:?}",
        second.state
    );
    assert!(
        first.streamed + second.streamed > 100,
        "the writes ran alongside the snapshot: {} + {} streamed",
        first.streamed,
        second.streamed
    );
    eprintln!(
        "snapshot test: {} + {} rows read, {} + {} changes streamed",
        first.reads, second.reads, first.streamed, second.streamed
    );

    let rows = client
        .query(&format!("SELECT id, value FROM {table}"), &[])
        .await
        .unwrap();
    let expected: BTreeMap<i64, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let rebuilt: BTreeMap<i64, i64> = projection
        .into_iter()
        .filter_map(|(id, (_, value))| Some((id, value?)))
        .collect();
    assert_eq!(rebuilt, expected, "snapshot + stream differ from the table");

    stack::drop_capture(
        &client,
        &format!("{schema}_slot"),
        &format!("{schema}_pub"),
        &schema,
    )
    .await;
}
