//! Source connectors: each reads one kind of database's change log and produces
//! source-neutral changes.

pub mod mysql;
pub mod postgres;
