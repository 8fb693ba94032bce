//! Replaying the projector's letters: a message's original bytes decoded through the
//! registry and applied to the read model in one transaction with the ledger, so an event
//! already applied is a counted duplicate.

use base64::Engine;

use super::{marked, Letter, Outcome};
use crate::{
    canonical::registry::EventCodec,
    consumer::{
        config::ProjectorConfig,
        events::{self, Coordinates, Entry, Prepared},
        projection,
    },
    error::Error,
    kafka::Producer,
    postgres,
};

/// Replay projector letters: decode each message's original bytes and apply the event to
/// the read model with the ledger. Returns each letter's outcome.
pub async fn replay_messages(
    config: &ProjectorConfig,
    letters: &[&Letter],
) -> Result<Vec<Outcome>, Error> {
    const DATABASE: &str = "the projection database";
    let schema = &config.projection.schema;
    let mut db = postgres::connect(&config.projection.url)
        .await
        .map_err(Error::while_(DATABASE))?;
    projection::migrate(&mut db, schema)
        .await
        .map_err(Error::while_(DATABASE))?;
    let statements = projection::prepare(&db, schema)
        .await
        .map_err(Error::while_(DATABASE))?;
    let codec = EventCodec::new(&config.schema_registry)?;
    let producer = Producer::new(&config.kafka)?;
    let mut outcomes = Vec::with_capacity(letters.len());
    for letter in letters {
        let record = &letter.record;
        let outcome = async {
            let bytes = record["value_base64"]
                .as_str()
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .ok_or("the letter holds no original bytes (`value_base64`)")?;
            let event = codec
                .decode_json(&bytes)
                .await
                .map_err(|e| e.to_string())
                .and_then(|(event, resource)| Prepared::checked(event, resource))?;
            let at = Coordinates {
                topic: record["topic"].as_str().unwrap_or_default().to_owned(),
                partition: record["partition"]
                    .as_i64()
                    .and_then(|p| i32::try_from(p).ok())
                    .unwrap_or(-1),
                offset: record["offset"].as_i64().unwrap_or(-1),
            };
            let entry = Entry {
                event: &event,
                at: &at,
                kafka_timestamp: record["timestamp"].as_i64(),
            };
            let refused = |e: tokio_postgres::Error| match e.as_db_error() {
                Some(db) => format!("the database refused it: {}", db.message()),
                None => format!("the projection database: {e}"),
            };
            let tx = db.transaction().await.map_err(refused)?;
            let counts = projection::apply(&tx, &statements.one, &[entry])
                .await
                .map_err(refused)?;
            let counts = events::total(&counts);
            tx.commit().await.map_err(refused)?;
            Ok(format!(
                "applied {}, duplicate {}, stale {}",
                counts.applied, counts.duplicate, counts.stale
            ))
        }
        .await;
        outcomes.push(marked(&producer, letter, outcome).await);
    }
    Ok(outcomes)
}
