//! PostgreSQL: logical replication with the built-in `pgoutput` plugin.

pub mod capture;
pub mod changes;
mod kind;
pub mod pgoutput;
pub mod preflight;
pub mod replication;
pub mod snapshot;
pub mod types;
mod watermarks;

/// What went wrong, for a log line or an error: the server's message and SQLSTATE (never
/// its detail, which can quote row values), or the client's error with its cause —
/// `tokio_postgres` itself says only "db error".
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}
