//! Canonical events: the envelope, its Avro encoding and the schema registry.

mod event;
pub mod registry;

pub use event::{CanonicalEvent, EventOp, KeyColumn, Origin, Provenance};
