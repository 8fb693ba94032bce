//! Replaying a connector's letters: the change a letter holds mapped again by the mapping
//! that failed (its events keep the ids they would have had), or, for a letter without the
//! whole row, the row read again at the source by its key.

use super::{marked, Letter, Outcome};
use crate::{
    canonical::registry::EventCodec,
    change::{SourceTable, Value},
    config::ConnectorConfig,
    error::{Error, Kind},
    kafka::{ensure_topics, Producer},
    mapping,
    offsets::SnapshotRequest,
    pipeline::{
        dead_letter::{self, Replay},
        load_lookups, mapper_for, topic_specs,
    },
    source,
};

/// Replay connector letters (all of `config`'s connector): map each change again with the
/// mapping that failed and write the events. Returns each letter's outcome.
pub async fn replay_changes(
    config: &ConnectorConfig,
    letters: &[&Letter],
) -> Result<Vec<Outcome>, Error> {
    let mappings_config = config.mappings.as_ref().ok_or_else(|| {
        Error::new(
            Kind::Configuration,
            "the connector configuration names no mappings",
        )
    })?;
    let mappings = mapping::load_dir(&mappings_config.path).map_err(Error::bare)?;
    let specs = topic_specs(config, &mappings);
    let mapper = mapper_for(config, mappings).map_err(Error::bare)?;
    load_lookups(config, &mapper).await.map_err(Error::bare)?;
    ensure_topics(&config.kafka, &specs).await?;
    let producer = Producer::new(&config.kafka)?;
    let codec = EventCodec::new(&config.schema_registry)?;
    let mut outcomes = Vec::with_capacity(letters.len());
    for letter in letters {
        let outcome = async {
            let (change, mapping_id) = match dead_letter::replay_of(&letter.record)? {
                Replay::Change(change, mapping_id) => (change, mapping_id),
                Replay::ReRead { table, key } => return read_again(config, &table, &key).await,
            };
            let outcome = mapper.map_with(&change, &mapping_id).ok_or_else(|| {
                format!(
                    "no mapping `{mapping_id}` reads {} any more",
                    change.source.qualified_name()
                )
            })?;
            if !outcome.failures.is_empty() {
                let reasons: Vec<String> = outcome
                    .failures
                    .iter()
                    .map(|f| f.error.to_string())
                    .collect();
                return Err(format!("fails again: {}", reasons.join("; ")));
            }
            for event in &outcome.events {
                let topic = event.topic(&config.topics);
                let bytes = codec
                    .encode(event, &topic)
                    .await
                    .map_err(|e| e.to_string())?;
                producer
                    .send(&topic, &event.key(), &bytes, &event.headers())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(format!(
                "{} event(s) written, {} no-op",
                outcome.events.len(),
                outcome.suppressed
            ))
        }
        .await;
        outcomes.push(marked(&producer, letter, outcome).await);
    }
    Ok(outcomes)
}

/// Ask the connector to read the row with `key` again (a snapshot of that row, through the
/// source's log): the letter holds no whole row to map. Its events, or a new letter, follow
/// when the connector takes the request.
async fn read_again(
    config: &ConnectorConfig,
    table: &SourceTable,
    key: &[(String, Value)],
) -> Outcome {
    let request = SnapshotRequest::new(
        table.qualified_name(),
        Some(source::key_condition(&config.source, key)),
    );
    let filter = request.filter.as_deref().unwrap_or_default();
    source::check_condition(&config.source, &request.table, filter)
        .await
        .map_err(|e| e.to_string())?;
    source::request_snapshot(config, &request)
        .await
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "the letter holds no whole row: the connector reads it again at the source (snapshot request {}; `fhir-cdc offsets show` follows it)",
        request.id
    ))
}
