//! Canonical events: the envelope, its Avro encoding and the schema registry.

pub mod registry;
