//! The read model in PostgreSQL, created and migrated by the projector itself.
//!
//! In the configured schema (default `fhir_projection`):
//! - `resources`: the current version of every resource — `(resource_type, resource_id)`
//!   is the key; `version`, `event_id`, `deleted` (a tombstone, so that a late older upsert
//!   cannot resurrect a deleted resource), `body` (FHIR JSON, `jsonb`), the provenance
//!   columns and `applied_at`.
//! - `history`: every applied event, one row per event id — the trail of what this
//!   projection saw and when, and the ledger that makes application exactly-once: an event
//!   id already there is a duplicate and is never applied again.
//! - `offsets`: per consumer group, topic and partition, the next offset to read. Written in
//!   the same transaction as the rows and the history, so that rows, ledger and position
//!   move together; on start and on every assignment the projector seeks to them.
//!
//! An event is applied only when its `resource_version` is newer than the stored one; an
//! older or equal one is `stale`. Both outcomes are counted, neither changes a row.

use std::collections::HashMap;

use tokio_postgres::{GenericClient, Statement};

use super::events::{Counts, Entry, TopicCounts};
use crate::canonical::{CanonicalEvent, Provenance};

/// The migrations, in order; `schema_version` counts how many ran.
fn migrations(schema: &str) -> Vec<String> {
    let provenance = "source_system text NOT NULL, connector text NOT NULL,
        database_kind text NOT NULL, source_database text NOT NULL,
        source_schema text NOT NULL, source_table text NOT NULL, primary_key jsonb NOT NULL,
        source_position text NOT NULL, transaction_id text, commit_time timestamptz,
        capture_time timestamptz NOT NULL, mapping_id text NOT NULL,
        mapping_version text NOT NULL, snapshot boolean NOT NULL";
    vec![
        format!(
            "CREATE TABLE {schema}.resources (
             resource_type text NOT NULL, resource_id text NOT NULL, version text NOT NULL,
             event_id uuid NOT NULL, deleted boolean NOT NULL, body jsonb, {provenance},
             applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
             PRIMARY KEY (resource_type, resource_id));
         CREATE TABLE {schema}.history (
             event_id uuid PRIMARY KEY, resource_type text NOT NULL, resource_id text NOT NULL,
             version text NOT NULL, op text NOT NULL, body jsonb, {provenance},
             topic text NOT NULL, kafka_partition integer NOT NULL, kafka_offset bigint NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE INDEX ON {schema}.history (resource_type, resource_id, version);
         CREATE TABLE {schema}.offsets (
             consumer_group text NOT NULL, topic text NOT NULL, kafka_partition integer NOT NULL,
             next_offset bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
             PRIMARY KEY (consumer_group, topic, kafka_partition));"
        ),
        // When Kafka took each message: with `applied_at`, the apply latency.
        format!("ALTER TABLE {schema}.history ADD COLUMN kafka_timestamp timestamptz;"),
        // Bodies compressed with lz4 where the server has it (PostgreSQL 14+): writes of
        // the FHIR JSON cost a fraction of pglz's (measured: the whole apply ~12% faster).
        format!(
            "DO $$ BEGIN
               IF current_setting('server_version_num')::int >= 140000 THEN
                 ALTER TABLE {schema}.history ALTER COLUMN body SET COMPRESSION lz4;
                 ALTER TABLE {schema}.resources ALTER COLUMN body SET COMPRESSION lz4;
               END IF;
             EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN NULL;
             END $$;"
        ),
        // Keys and versions compare byte by byte, whatever the database's default collation:
        // a version is ordered by its bytes (a linguistic collation may skip its '.' or fold
        // case), and an identifier needs no linguistic order. In "C" a comparison is a
        // memcmp, not a strcoll.
        ["resources", "history"]
            .map(|table| {
                format!(
                    "ALTER TABLE {schema}.{table}
                       ALTER COLUMN resource_type TYPE text COLLATE \"C\",
                       ALTER COLUMN resource_id TYPE text COLLATE \"C\",
                       ALTER COLUMN version TYPE text COLLATE \"C\";"
                )
            })
            .concat(),
        // Was reconcile's worklist, which now has a migration of its own
        // (`reconcile::worklist::migrate`); kept, empty, so that the count stays the count.
        String::new(),
    ]
}

/// Create the schema and bring its tables to the current version (idempotent; concurrent
/// projectors serialize on an advisory lock).
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<usize, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // `IF NOT EXISTS` notices are not news.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&schema])
        .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_version (version integer NOT NULL);
         INSERT INTO {schema}.schema_version SELECT 0 WHERE NOT EXISTS (SELECT FROM {schema}.schema_version);"
    ))
    .await?;
    let current: i32 = tx
        .query_one(&format!("SELECT version FROM {schema}.schema_version"), &[])
        .await?
        .get(0);
    let all = migrations(schema);
    for migration in all.iter().skip(usize::try_from(current).unwrap_or(0)) {
        tx.batch_execute(migration).await?;
    }
    tx.execute(
        &format!("UPDATE {schema}.schema_version SET version = $1"),
        &[&i32::try_from(all.len()).unwrap_or(i32::MAX)],
    )
    .await?;
    tx.commit().await?;
    Ok(all.len())
}

/// The stored next offsets of `group` for those of `partitions` it has.
pub async fn stored_offsets(
    client: &impl GenericClient,
    schema: &str,
    group: &str,
    partitions: &[(String, i32)],
) -> Result<HashMap<(String, i32), i64>, tokio_postgres::Error> {
    let mut found = HashMap::new();
    for (topic, partition) in partitions {
        if let Some(row) = client
            .query_opt(
                &format!("SELECT next_offset FROM {schema}.offsets WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = $3"),
                &[&group, topic, partition],
            )
            .await?
        {
            found.insert((topic.clone(), *partition), row.get(0));
        }
    }
    Ok(found)
}

/// Forget `group`'s offsets (a replay starts over).
pub async fn forget_offsets(
    client: &impl GenericClient,
    schema: &str,
    group: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!("DELETE FROM {schema}.offsets WHERE consumer_group = $1"),
            &[&group],
        )
        .await?;
    Ok(())
}

/// Record that `group` has consumed `topic[partition]` up to `next_offset` (never moving
/// it back: a projector that lost its partition mid-batch may commit after the new owner).
pub async fn store_offset(
    tx: &impl GenericClient,
    schema: &str,
    group: &str,
    topic: &str,
    partition: i32,
    next_offset: i64,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        &format!(
            "INSERT INTO {schema}.offsets (consumer_group, topic, kafka_partition, next_offset)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer_group, topic, kafka_partition) DO UPDATE
               SET next_offset = GREATEST({schema}.offsets.next_offset, EXCLUDED.next_offset),
                   updated_at = clock_timestamp()"
        ),
        &[&group, &topic, &partition, &next_offset],
    )
    .await?;
    Ok(())
}

/// The statements that apply events, prepared once per connection (their plans are made
/// once, not for every batch).
#[derive(Debug)]
pub struct Statements {
    /// For a whole batch. An event id the history already holds is found by the ledger
    /// check; one that another projector records while this statement runs (two processes
    /// on one partition for a moment, around a rebalance) is a unique violation that
    /// refuses the batch, which is then applied event by event with `one`. Without
    /// `ON CONFLICT` here, PostgreSQL inserts each history row once instead of
    /// speculatively (measured: PostgreSQL's CPU per event ~2.5 % lower).
    pub batch: Statement,
    /// For one event at a time: an event id recorded concurrently is skipped, not refused.
    pub one: Statement,
}

/// Prepare the [`Statements`] on `client`.
pub async fn prepare(
    client: &impl GenericClient,
    schema: &str,
) -> Result<Statements, tokio_postgres::Error> {
    Ok(Statements {
        batch: prepare_apply(client, schema, "").await?,
        one: prepare_apply(client, schema, "ON CONFLICT (event_id) DO NOTHING").await?,
    })
}

/// The statement that applies events, with `on_conflict` for the insert into the history.
async fn prepare_apply(
    client: &impl GenericClient,
    schema: &str,
    on_conflict: &str,
) -> Result<Statement, tokio_postgres::Error> {
    let provenance = "source_system, connector, database_kind, source_database, source_schema,
        source_table, primary_key, source_position, transaction_id, commit_time, capture_time,
        mapping_id, mapping_version, snapshot";
    let provenance_cast = "w.source_system, w.connector, w.database_kind, w.source_database,
        w.source_schema, w.source_table, w.primary_key::jsonb, w.source_position,
        w.transaction_id, w.commit_time, w.capture_time, w.mapping_id, w.mapping_version,
        w.snapshot";
    let provenance_recorded = "h.source_system, h.connector, h.database_kind,
        h.source_database, h.source_schema, h.source_table, h.primary_key, h.source_position,
        h.transaction_id, h.commit_time, h.capture_time, h.mapping_id, h.mapping_version,
        h.snapshot";
    client
        .prepare(&format!(
                "WITH keys AS (
                   SELECT event_id::uuid AS event_id, resource_type COLLATE \"C\" AS resource_type,
                          resource_id COLLATE \"C\" AS resource_id, version COLLATE \"C\" AS version,
                          topic, pos
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $21::text[])
                       WITH ORDINALITY AS k(event_id, resource_type, resource_id, version, topic, pos)),
                 -- The decisions are taken on these narrow rows; the bodies and provenance are
                 -- read once, by the insert into the history, and handed on by its RETURNING.
                 -- One index probe per event (OFFSET 0 keeps the planner from turning the
                 -- probe into a hash join over the whole history, whose cost grows with it).
                 fresh AS (
                   SELECT DISTINCT ON (event_id) * FROM keys k
                    WHERE NOT EXISTS (SELECT FROM {schema}.history h WHERE h.event_id = k.event_id OFFSET 0)
                    ORDER BY event_id, pos),
                 ranked AS (
                   SELECT f.*, GREATEST(r.version, max(f.version) OVER (
                            PARTITION BY f.resource_type, f.resource_id ORDER BY f.pos
                            ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) AS newest_before
                     FROM fresh f LEFT JOIN {schema}.resources r
                       ON r.resource_type = f.resource_type AND r.resource_id = f.resource_id),
                 applied AS (
                   SELECT * FROM ranked WHERE newest_before IS NULL OR version > newest_before),
                 recorded AS (
                   INSERT INTO {schema}.history (event_id, resource_type, resource_id, version, op, body,
                       {provenance}, topic, kafka_partition, kafka_offset, kafka_timestamp)
                   SELECT a.event_id, a.resource_type, a.resource_id, a.version, w.op, w.body::jsonb,
                       {provenance_cast}, a.topic, w.kafka_partition, w.kafka_offset, w.kafka_timestamp
                     FROM unnest($5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                         $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                         $15::text[], $16::timestamptz[], $17::timestamptz[], $18::text[],
                         $19::text[], $20::bool[], $22::int[], $23::bigint[], $24::timestamptz[])
                       WITH ORDINALITY AS w(op, body, {provenance}, kafka_partition, kafka_offset,
                         kafka_timestamp, pos)
                     JOIN applied a ON a.pos = w.pos
                   {on_conflict}
                   RETURNING *),
                 newest AS (
                   INSERT INTO {schema}.resources AS r (resource_type, resource_id, version, event_id,
                       deleted, body, {provenance})
                   SELECT h.resource_type, h.resource_id, h.version, h.event_id, h.op = 'delete',
                       h.body, {provenance_recorded}
                     FROM recorded h JOIN (
                       SELECT DISTINCT ON (resource_type, resource_id) event_id FROM applied
                        ORDER BY resource_type, resource_id, version DESC) n
                       ON n.event_id = h.event_id
                   ON CONFLICT (resource_type, resource_id) DO UPDATE SET
                       version = EXCLUDED.version, event_id = EXCLUDED.event_id,
                       deleted = EXCLUDED.deleted, body = EXCLUDED.body,
                       source_system = EXCLUDED.source_system, connector = EXCLUDED.connector,
                       database_kind = EXCLUDED.database_kind,
                       source_database = EXCLUDED.source_database,
                       source_schema = EXCLUDED.source_schema, source_table = EXCLUDED.source_table,
                       primary_key = EXCLUDED.primary_key, source_position = EXCLUDED.source_position,
                       transaction_id = EXCLUDED.transaction_id, commit_time = EXCLUDED.commit_time,
                       capture_time = EXCLUDED.capture_time, mapping_id = EXCLUDED.mapping_id,
                       mapping_version = EXCLUDED.mapping_version, snapshot = EXCLUDED.snapshot,
                       applied_at = clock_timestamp()
                     WHERE r.version < EXCLUDED.version
                   RETURNING 1)
                 SELECT k.topic, count(*),
                        (SELECT count(*) FROM fresh f WHERE f.topic = k.topic),
                        (SELECT count(*) FROM recorded r WHERE r.topic = k.topic)
                   FROM keys k GROUP BY k.topic"
        ))
        .await
}

/// Record `entry` in the ledger alone, not in `resources`, unless its id is there already;
/// whether it was recorded. `reconcile --repair` restores a projection row from the ledger:
/// an event the projector never recorded (it started after it, or its ledger was pruned)
/// is recorded first.
pub async fn record(
    client: &impl GenericClient,
    schema: &str,
    entry: Entry<'_>,
) -> Result<bool, tokio_postgres::Error> {
    let (event, provenance) = (entry.event.event(), &entry.event.event().provenance);
    let written = client
        .execute(
            &format!(
                "INSERT INTO {schema}.history (event_id, resource_type, resource_id, version, op,
                   body, source_system, connector, database_kind, source_database, source_schema,
                   source_table, primary_key, source_position, transaction_id, commit_time,
                   capture_time, mapping_id, mapping_version, snapshot, topic, kafka_partition,
                   kafka_offset, kafka_timestamp)
                 VALUES ($1::text::uuid, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11, $12,
                   $13::text::jsonb, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)
                 ON CONFLICT (event_id) DO NOTHING"
            ),
            &[
                &event.event_id,
                &event.resource_type,
                &event.resource_id,
                &event.resource_version,
                &event.op.name(),
                &entry.event.body(),
                &&*provenance.source_system,
                &&*provenance.connector,
                &&*provenance.database_kind,
                &&*provenance.database,
                &&*provenance.schema,
                &&*provenance.table,
                &entry.event.primary_key(),
                &provenance.source_position,
                &provenance.transaction_id,
                &provenance.commit_time,
                &provenance.capture_time,
                &&*provenance.mapping_id,
                &&*provenance.mapping_version,
                &provenance.snapshot,
                &entry.at.topic,
                &entry.at.partition,
                &entry.at.offset,
                &entry
                    .kafka_timestamp
                    .and_then(chrono::DateTime::from_timestamp_millis),
            ],
        )
        .await?;
    Ok(written == 1)
}

/// Apply `entries`, in order, inside `tx` with `statement` (one of [`Statements`]) — set-based, one
/// statement for the whole batch: an event id already in the history (or earlier in the
/// batch) is a duplicate; an event whose version is not newer than the stored one, nor than
/// those of the same resource earlier in the batch, is stale; the others go into the
/// history, and the newest of each resource into `resources`.
pub async fn apply(
    tx: &impl GenericClient,
    statement: &Statement,
    entries: &[Entry<'_>],
) -> Result<TopicCounts, tokio_postgres::Error> {
    // One array per column, of references into the entries.
    fn column<'a, T>(entries: &[Entry<'a>], value: impl Fn(Entry<'a>) -> T) -> Vec<T> {
        entries.iter().map(|e| value(*e)).collect()
    }
    fn e<'a>(entry: Entry<'a>) -> &'a CanonicalEvent {
        entry.event.event()
    }
    fn p<'a>(entry: Entry<'a>) -> &'a Provenance {
        &entry.event.event().provenance
    }
    let rows = tx
        .query(
            statement,
            &[
                &column(entries, |r| e(r).event_id.as_str()),
                &column(entries, |r| e(r).resource_type.as_str()),
                &column(entries, |r| e(r).resource_id.as_str()),
                &column(entries, |r| e(r).resource_version.as_str()),
                &column(entries, |r| e(r).op.name()),
                &column(entries, |r| r.event.body()),
                &column(entries, |r| &*p(r).source_system),
                &column(entries, |r| &*p(r).connector),
                &column(entries, |r| &*p(r).database_kind),
                &column(entries, |r| &*p(r).database),
                &column(entries, |r| &*p(r).schema),
                &column(entries, |r| &*p(r).table),
                &column(entries, |r| r.event.primary_key()),
                &column(entries, |r| p(r).source_position.as_str()),
                &column(entries, |r| p(r).transaction_id.as_deref()),
                &column(entries, |r| p(r).commit_time),
                &column(entries, |r| p(r).capture_time),
                &column(entries, |r| &*p(r).mapping_id),
                &column(entries, |r| &*p(r).mapping_version),
                &column(entries, |r| p(r).snapshot),
                &column(entries, |r| r.at.topic.as_str()),
                &column(entries, |r| r.at.partition),
                &column(entries, |r| r.at.offset),
                &column(entries, |r| {
                    r.kafka_timestamp
                        .and_then(chrono::DateTime::from_timestamp_millis)
                }),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let count = |i: usize| row.get::<_, i64>(i) as u64;
            let (received, fresh, applied) = (count(1), count(2), count(3));
            let counts = Counts {
                applied,
                duplicate: received - fresh,
                stale: fresh - applied,
            };
            (row.get(0), counts)
        })
        .collect())
}
