//! The consumer side: canonical events read by the consumer runtime ([`runtime`]) and done
//! by a job into a target, exactly once.
//!
//! [`projector`] is `fhir-cdc project` — the projection job into the PostgreSQL read model
//! ([`projection`], [`target::postgres`]); [`events`] are the events as jobs and targets
//! see them; [`config`] the projector's configuration file.

pub mod config;
pub mod events;
pub mod projection;
pub mod projector;
pub mod runtime;
pub mod target;

pub use self::{
    config::{ProjectionConfig, ProjectorConfig},
    projector::{replay, run},
    runtime::{ConsumerError, Replay, ReplayFrom, Summary},
};
