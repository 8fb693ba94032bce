//! The consumer side: canonical events projected into read models, exactly once.
//!
//! [`projector::run`] is `fhir-cdc project` (see its module); [`projection`] is the read
//! model in PostgreSQL; [`config`] the projector's configuration file.

pub mod config;
pub mod projection;
pub mod projector;
mod runtime;

pub use self::{
    config::ProjectorConfig,
    projector::{replay, run, ProjectError, ProjectSummary, Replay, ReplayFrom},
};
