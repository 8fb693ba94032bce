//! The events of the consumer side as a job and a target see them: decoded, checked
//! against their envelope, their resource serialized once, with where each was read; and
//! what applying a batch of them did.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
};

use crate::canonical::{CanonicalEvent, EventOp, JsonResource};

/// Where an event was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// An event as the read model stores it: its resource and key already serialized, so that
/// the transaction that writes it waits for nothing but the database.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The event; its resource is in `body`.
    event: CanonicalEvent,
    body: Option<String>,
    primary_key: String,
}

impl Prepared {
    /// An event with its resource in memory.
    pub fn new(mut event: CanonicalEvent) -> Self {
        let body = event
            .resource
            .take()
            .map(|r| serde_json::to_string(&r).unwrap_or_default());
        Self::with_body(event, body)
    }

    /// An event as [`crate::canonical::registry::EventCodec::decode_json`] reads it, when its
    /// resource agrees with its envelope; otherwise why not.
    pub fn checked(event: CanonicalEvent, resource: Option<JsonResource>) -> Result<Self, String> {
        match (event.op, &resource) {
            (EventOp::Delete, Some(_)) => Err("a delete event carries a resource".into()),
            (EventOp::Upsert, None) => Err("an upsert event carries no resource".into()),
            // (Its type is the envelope's: the reader writes it from there.)
            (EventOp::Upsert, Some(resource))
                if resource.id.as_deref() != Some(&event.resource_id) =>
            {
                Err("the resource's id differs from the envelope's".into())
            }
            _ => Ok(Self::with_body(event, resource.map(|r| r.json))),
        }
    }

    fn with_body(event: CanonicalEvent, body: Option<String>) -> Self {
        let primary_key = serde_json::to_string(&event.provenance.primary_key).unwrap_or_default();
        Prepared {
            event,
            body,
            primary_key,
        }
    }

    /// The event; its resource is [`Self::body`].
    pub fn event(&self) -> &CanonicalEvent {
        &self.event
    }

    /// The resource as FHIR JSON (`None` for a delete).
    pub fn body(&self) -> Option<&str> {
        self.body.as_deref()
    }

    /// The source row's key as JSON (`[{"column": …, "value": …}]`).
    pub fn primary_key(&self) -> &str {
        &self.primary_key
    }

    /// When the source committed the change (`None` for a snapshot read).
    pub fn commit_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.event.provenance.commit_time
    }

    /// Which of `parts` the event's resource falls in: the same for every event of it.
    pub fn part(&self, parts: usize) -> usize {
        let mut hash = std::hash::DefaultHasher::new();
        (&self.event.resource_type, &self.event.resource_id).hash(&mut hash);
        (hash.finish() % parts.max(1) as u64) as usize
    }
}

/// One event of a batch, and where it was read.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub event: &'a Prepared,
    pub at: &'a Coordinates,
    /// When Kafka took the message (milliseconds since the epoch), if known.
    pub kafka_timestamp: Option<i64>,
}

/// How a batch went (for one topic, or all of them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub applied: u64,
    pub duplicate: u64,
    pub stale: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        self.applied += other.applied;
        self.duplicate += other.duplicate;
        self.stale += other.stale;
    }
}

/// How a batch went, per topic.
pub type TopicCounts = HashMap<String, Counts>;

/// The counts of every topic added up.
pub fn total(counts: &TopicCounts) -> Counts {
    let mut total = Counts::default();
    for counts in counts.values() {
        total += *counts;
    }
    total
}
