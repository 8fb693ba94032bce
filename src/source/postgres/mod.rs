//! PostgreSQL: logical replication with the built-in `pgoutput` plugin.

pub mod preflight;
