//! PostgreSQL: logical replication with the built-in `pgoutput` plugin.

pub mod capture;
pub mod changes;
pub mod pgoutput;
pub mod preflight;
pub mod replication;
pub mod snapshot;
pub mod types;
