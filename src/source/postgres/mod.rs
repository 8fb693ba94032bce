//! PostgreSQL: logical replication with the built-in `pgoutput` plugin.

pub mod pgoutput;
pub mod preflight;
pub mod types;
