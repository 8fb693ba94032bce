//! Canonical events: the envelope, its Avro encoding and the schema registry.

mod avro;
mod event;
mod plan;
pub mod registry;
pub mod schema;

pub use self::{
    avro::{event_from_avro, event_to_avro, AvroShapeError},
    event::{
        instant, is_event_topic, CanonicalEvent, EventOp, KeyColumn, MadeBy, Origin, Provenance,
    },
    plan::{EventWriter, JsonResource},
};
