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

use tokio_postgres::{GenericClient, Transaction};

use crate::canonical::{CanonicalEvent, EventOp};

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Its event id is in the history: applied before.
    Duplicate,
    /// The stored version is newer or the same.
    Stale,
}

/// Where an event was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// The migrations, in order; `schema_version` counts how many ran.
fn migrations(schema: &str) -> Vec<String> {
    let provenance = "source_system text NOT NULL, connector text NOT NULL,
        database_kind text NOT NULL, source_database text NOT NULL,
        source_schema text NOT NULL, source_table text NOT NULL, primary_key jsonb NOT NULL,
        source_position text NOT NULL, transaction_id text, commit_time timestamptz,
        capture_time timestamptz NOT NULL, mapping_id text NOT NULL,
        mapping_version text NOT NULL, snapshot boolean NOT NULL";
    vec![format!(
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
    )]
}

/// Create the schema and bring its tables to the current version (idempotent; concurrent
/// projectors serialize on an advisory lock).
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<usize, tokio_postgres::Error> {
    let tx = client.transaction().await?;
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

/// The stored next offsets of `group` for `partitions`.
pub async fn stored_offsets(
    client: &impl GenericClient,
    schema: &str,
    group: &str,
    partitions: &[(String, i32)],
) -> Result<Vec<(String, i32, i64)>, tokio_postgres::Error> {
    let mut found = Vec::new();
    for (topic, partition) in partitions {
        if let Some(row) = client
            .query_opt(
                &format!("SELECT next_offset FROM {schema}.offsets WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = $3"),
                &[&group, topic, partition],
            )
            .await?
        {
            found.push((topic.clone(), *partition, row.get(0)));
        }
    }
    Ok(found)
}

/// Record that `group` has consumed `topic[partition]` up to `next_offset` (never moving
/// it back: a projector that lost its partition mid-batch may commit after the new owner).
pub async fn store_offset(
    tx: &Transaction<'_>,
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

/// Apply one event inside `tx`.
pub async fn apply(
    tx: &Transaction<'_>,
    schema: &str,
    event: &CanonicalEvent,
    at: &Coordinates,
) -> Result<Outcome, tokio_postgres::Error> {
    // Event ids travel as text and are cast to uuid in SQL.
    let event_id = &event.event_id;
    let p = &event.provenance;
    let body = event
        .resource
        .as_ref()
        .map(|r| serde_json::to_string(r).unwrap_or_default());
    let primary_key = serde_json::to_string(&p.primary_key).unwrap_or_default();
    let op = match event.op {
        EventOp::Upsert => "upsert",
        EventOp::Delete => "delete",
    };
    // The ledger first: an event id already applied stops here, whatever its version.
    let recorded = tx
        .execute(
            &format!(
                "INSERT INTO {schema}.history (event_id, resource_type, resource_id, version, op, body,
                    source_system, connector, database_kind, source_database, source_schema, source_table,
                    primary_key, source_position, transaction_id, commit_time, capture_time, mapping_id,
                    mapping_version, snapshot, topic, kafka_partition, kafka_offset)
                 SELECT $1::text::uuid, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11, $12,
                    $13::text::jsonb, $14, $15, $16::text::timestamptz, $17::text::timestamptz, $18,
                    $19, $20, $21, $22, $23
                 WHERE NOT EXISTS (
                    SELECT FROM {schema}.resources r
                     WHERE r.resource_type = $2 AND r.resource_id = $3 AND r.version >= $4)
                 ON CONFLICT (event_id) DO NOTHING"
            ),
            &[
                event_id,
                &event.resource_type,
                &event.resource_id,
                &event.resource_version,
                &op,
                &body,
                &&*p.source_system,
                &&*p.connector,
                &&*p.database_kind,
                &&*p.database,
                &&*p.schema,
                &&*p.table,
                &primary_key,
                &p.source_position,
                &p.transaction_id,
                &p.commit_time.map(crate::canonical::instant),
                &crate::canonical::instant(p.capture_time),
                &&*p.mapping_id,
                &&*p.mapping_version,
                &p.snapshot,
                &at.topic,
                &at.partition,
                &at.offset,
            ],
        )
        .await?;
    if recorded == 0 {
        let seen = tx
            .query_opt(
                &format!("SELECT 1 FROM {schema}.history WHERE event_id = $1::text::uuid"),
                &[event_id],
            )
            .await?;
        return Ok(if seen.is_some() {
            Outcome::Duplicate
        } else {
            Outcome::Stale
        });
    }
    tx.execute(
        &format!(
            "INSERT INTO {schema}.resources AS r (resource_type, resource_id, version, event_id, deleted, body,
                source_system, connector, database_kind, source_database, source_schema, source_table,
                primary_key, source_position, transaction_id, commit_time, capture_time, mapping_id,
                mapping_version, snapshot)
             SELECT resource_type, resource_id, version, event_id, op = 'delete', body,
                source_system, connector, database_kind, source_database, source_schema, source_table,
                primary_key, source_position, transaction_id, commit_time, capture_time, mapping_id,
                mapping_version, snapshot
               FROM {schema}.history WHERE event_id = $1::text::uuid
             ON CONFLICT (resource_type, resource_id) DO UPDATE SET
                version = EXCLUDED.version, event_id = EXCLUDED.event_id, deleted = EXCLUDED.deleted,
                body = EXCLUDED.body, source_system = EXCLUDED.source_system,
                connector = EXCLUDED.connector, database_kind = EXCLUDED.database_kind,
                source_database = EXCLUDED.source_database, source_schema = EXCLUDED.source_schema,
                source_table = EXCLUDED.source_table, primary_key = EXCLUDED.primary_key,
                source_position = EXCLUDED.source_position, transaction_id = EXCLUDED.transaction_id,
                commit_time = EXCLUDED.commit_time, capture_time = EXCLUDED.capture_time,
                mapping_id = EXCLUDED.mapping_id, mapping_version = EXCLUDED.mapping_version,
                snapshot = EXCLUDED.snapshot, applied_at = clock_timestamp()
             WHERE r.version < EXCLUDED.version"
        ),
        &[event_id],
    )
    .await?;
    Ok(Outcome::Applied)
}
