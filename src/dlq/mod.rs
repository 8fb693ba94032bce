//! Dead letters of both sides, listed, shown and replayed (`fhir-cdc dlq`): a connector's
//! (`<prefix>.dlq.<connector>`: a change no mapping could turn into an event) and the
//! projector's (`<prefix>.dlq.projector`: a message it could not apply).
//!
//! A letter's id is `<side>:<partition>:<offset>` — the side being the dead-letter topic's
//! last segment (the connector's name, or `projector`) — e.g. `lab-postgres:0:12`. It is
//! stable for as long as Kafka keeps the letter.
//!
//! Replaying sends a letter back through the path that failed, as that path is now (after
//! the fix):
//! - a connector's letter: the change it holds is mapped again, by the mapping that failed
//!   only, with the connector's mapping files; the events are written to their topics. They
//!   carry the ids they would have had the first time, so a consumer that has them already
//!   drops them as duplicates. A letter without the whole row (written with its protected
//!   columns hidden, or with no row) is replayed by asking the connector to read the row
//!   again at the source by its key (a snapshot request, PostgreSQL sources), through
//!   every mapping of its table;
//! - a projector's letter: its original bytes are decoded through the registry and applied
//!   to the read model in one transaction with the ledger, so an event already applied is a
//!   counted duplicate: replays apply at most once.
//!
//! A replay that succeeds is recorded in the dead-letter topic itself, by a marker message
//! (header `replay_of` = the letter's id; a JSON body with the time and the outcome), so that
//! `list` shows what is still outstanding whoever replayed it. A letter that fails again
//! stays outstanding, with the reason reported.

mod changes;
mod messages;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rdkafka::{message::Headers, Message};
use serde_json::{json, Value as Json};

pub use self::{changes::replay_changes, messages::replay_messages};
pub use crate::consumer::config::PROJECTOR;
use crate::{
    canonical::instant,
    config::KafkaProperties,
    kafka::{Producer, TopicReader},
};

/// The header that makes a message in a dead-letter topic a replay marker.
const REPLAY_OF: &str = "replay_of";

/// One dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Letter {
    /// `<side>:<partition>:<offset>`.
    pub id: String,
    /// The dead-letter topic it is in.
    pub topic: String,
    /// When Kafka took it.
    pub written: Option<DateTime<Utc>>,
    pub reason: String,
    /// Where it failed, in one line: `lab.results pg:0/16B3748 update` for a change,
    /// `fhir.lab.Observation[2]@17` for a message.
    pub origin: String,
    /// The letter as written (JSON; a letter that is not JSON as a string).
    pub record: Json,
    /// The marker of its last successful replay, if any.
    pub replayed: Option<Json>,
}

impl Letter {
    /// The connector's name, or [`PROJECTOR`].
    pub fn side(&self) -> &str {
        self.id.rsplitn(3, ':').last().unwrap_or_default()
    }

    /// Who may replay the letter: the connector's name, or for a projector's letter the
    /// projector that wrote it (every projector shares `<prefix>.dlq.projector`).
    pub fn owner(&self) -> &str {
        match self.record["projector"].as_str() {
            Some(projector) if self.side() == PROJECTOR => projector,
            _ => self.side(),
        }
    }

    /// Its JSON form for `dlq show`.
    pub fn to_json(&self) -> Json {
        json!({
            "id": self.id,
            "topic": self.topic,
            "written": self.written.map(instant),
            "reason": self.reason,
            "origin": self.origin,
            "replayed": self.replayed,
            "record": self.record,
        })
    }
}

/// Every letter in the dead-letter topics under `prefix`, in topic and offset order, each
/// with its last replay marker.
pub async fn read_all(
    kafka: &KafkaProperties,
    prefix: &str,
) -> Result<Vec<Letter>, crate::kafka::Error> {
    let dead_letters = format!("{prefix}.dlq.");
    let mut reader = TopicReader::open(
        kafka,
        |topic| topic.starts_with(&dead_letters),
        |_, _, _, low, _| Ok(low),
    )?;
    let mut letters = Vec::new();
    let mut markers: HashMap<String, Json> = HashMap::new();
    while !reader.at_end() {
        let Some(message) = reader.next().await? else {
            continue;
        };
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        let payload = message.payload().unwrap_or_default();
        let record = serde_json::from_slice(payload)
            .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(payload).into_owned()));
        let replay_of = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == REPLAY_OF)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        if let Some(id) = replay_of {
            markers.insert(id, record);
            continue;
        }
        let side = topic.strip_prefix(&dead_letters).unwrap_or(topic);
        let (reason, origin) = describe(side, &record);
        let place = (topic.to_owned(), partition, offset);
        letters.push((
            place,
            Letter {
                id: format!("{side}:{partition}:{offset}"),
                topic: topic.to_owned(),
                written: message
                    .timestamp()
                    .to_millis()
                    .and_then(DateTime::from_timestamp_millis),
                reason,
                origin,
                record,
                replayed: None,
            },
        ));
    }
    // Partitions were read interleaved: topic, partition and offset order.
    letters.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
    Ok(letters
        .into_iter()
        .map(|(_, mut letter)| {
            letter.replayed = markers.remove(&letter.id);
            letter
        })
        .collect())
}

/// The reason and origin lines of a letter of `side`.
fn describe(side: &str, record: &Json) -> (String, String) {
    let text = |field: &str| record[field].as_str().unwrap_or("?");
    if !record.is_object() {
        return (
            "not a dead-letter record (not a JSON object)".into(),
            "?".into(),
        );
    }
    if side == PROJECTOR {
        let mut origin = format!(
            "{}[{}]@{}",
            text("topic"),
            record["partition"],
            record["offset"]
        );
        if let Some(projector) = record["projector"].as_str() {
            origin.push_str(&format!(" (projector {projector})"));
        }
        (text("reason").to_owned(), origin)
    } else {
        let origin = format!(
            "{}.{} {} {}",
            text("schema"),
            text("table"),
            text("source_position"),
            text("op")
        );
        (
            format!("mapping {}: {}", text("mapping_id"), text("error")),
            origin,
        )
    }
}

/// What replaying one letter did: a line for the operator, or why it failed again.
pub type Outcome = Result<String, String>;

/// `outcome`, recorded in the letter's topic when the replay succeeded (right away, so
/// that what is done stays known whatever happens to the letters after it).
async fn marked(producer: &Producer, letter: &Letter, outcome: Outcome) -> Outcome {
    let done = outcome?;
    match record_settled(producer, &letter.topic, &letter.id, &done).await {
        Ok(()) => Ok(done),
        Err(e) => Ok(format!(
            "{done}; recording the replay failed ({e}), so the letter is still listed"
        )),
    }
}

/// Record in dead-letter topic `topic` that letter `id` needs no replay any more, and why:
/// the marker a replay writes, so that `list` no longer shows it as outstanding.
pub async fn record_settled(
    producer: &Producer,
    topic: &str,
    id: &str,
    outcome: &str,
) -> Result<(), crate::kafka::Error> {
    let marker = json!({
        REPLAY_OF: id,
        "replayed_at": instant(Utc::now()),
        "outcome": outcome,
    });
    producer
        .send(topic, id, marker.to_string().as_bytes(), &[(REPLAY_OF, id)])
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_say_where_they_failed_and_why() {
        let change = json!({"schema": "lab", "table": "results", "source_position": "pg:0/16B3748",
            "op": "update", "mapping_id": "lab-result", "error": "x.yaml:3:1: NULL in a required element"});
        assert_eq!(
            describe("lab-postgres", &change),
            (
                "mapping lab-result: x.yaml:3:1: NULL in a required element".to_owned(),
                "lab.results pg:0/16B3748 update".to_owned()
            )
        );
        let message = json!({"reason": "unknown schema id 9", "topic": "fhir.lab.Observation", "partition": 2, "offset": 17});
        assert_eq!(
            describe(PROJECTOR, &message),
            (
                "unknown schema id 9".to_owned(),
                "fhir.lab.Observation[2]@17".to_owned()
            )
        );
        assert_eq!(describe(PROJECTOR, &json!("garbage")).1, "?");
    }

    #[test]
    fn the_side_is_what_precedes_partition_and_offset() {
        let letter = Letter {
            id: "lab-postgres:3:120".into(),
            topic: "fhir.dlq.lab-postgres".into(),
            written: None,
            reason: String::new(),
            origin: String::new(),
            record: Json::Null,
            replayed: None,
        };
        assert_eq!(letter.side(), "lab-postgres");
    }
}
