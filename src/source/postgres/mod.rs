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

/// `"name"`, with embedded quotes doubled: an identifier as the catalogue spells it
/// (unquoted, PostgreSQL would fold `LAB` to `lab`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."table"`, each quoted as [`quote_ident`] does.
pub fn quote_table(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}
