//! The source-neutral change: what every source produces and the mapper consumes. Sources
//! and the mapper import this module, never each other.

mod position;
mod text;
mod value;

use std::{fmt, sync::Arc};

use chrono::{DateTime, Utc};

pub use self::{
    position::{BinlogPosition, ChangeLsn, Lsn, PgLsn, Position},
    text::{push_decimal, rfc3339, text_of},
    value::{Column, ExactDecimal, Names, Row, Value},
};

/// Which table of which database a change comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceTable {
    /// The connector's name.
    pub connector: Arc<str>,
    /// `postgres` or `mysql`.
    pub kind: Arc<str>,
    pub database: Arc<str>,
    pub schema: Arc<str>,
    pub table: Arc<str>,
    /// `urn:fhir-cdc:<connector>:<database>.<schema>.<table>`: the `meta.source` of every
    /// resource made from the table's rows (interned: a bounded set, copied into every
    /// resource). MySQL's schemas are its databases: there it is
    /// `urn:fhir-cdc:<connector>:<database>.<table>`, the name once.
    pub urn: &'static str,
}

impl SourceTable {
    pub fn new(
        connector: impl Into<Arc<str>>,
        kind: impl Into<Arc<str>>,
        database: impl Into<Arc<str>>,
        schema: impl Into<Arc<str>>,
        table: impl Into<Arc<str>>,
    ) -> Self {
        let (connector, database, schema, table) = (
            connector.into(),
            database.into(),
            schema.into(),
            table.into(),
        );
        let kind = kind.into();
        let urn = if &*kind == "mysql" && database == schema {
            format!("urn:fhir-cdc:{connector}:{database}.{table}")
        } else {
            format!("urn:fhir-cdc:{connector}:{database}.{schema}.{table}")
        };
        Self {
            urn: crate::fhir::intern(&urn),
            connector,
            kind,
            database,
            schema,
            table,
        }
    }

    /// `schema.table`, as mappings name tables.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Read by a snapshot.
    Read,
    Insert,
    Update,
    Delete,
    Truncate,
}

impl std::str::FromStr for Operation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "read" => Operation::Read,
            "insert" => Operation::Insert,
            "update" => Operation::Update,
            "delete" => Operation::Delete,
            "truncate" => Operation::Truncate,
            other => {
                return Err(format!(
                    "`{other}` is not an operation (read, insert, update, delete, truncate)"
                ))
            }
        })
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Read => "read",
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
        })
    }
}

/// One changed row.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub source: Arc<SourceTable>,
    pub op: Operation,
    /// The key columns, in key order (shared by the changes of one table layout).
    pub key: Names,
    /// The row before the change, when the database provides it (updates and deletes with
    /// a full replica identity / full row image; deletes always carry at least the key).
    pub before: Option<Row>,
    /// The row after the change (reads, inserts, updates).
    pub after: Option<Row>,
    /// The commit position of the change's transaction (for snapshot reads: the position of
    /// the chunk's high watermark, after every change the read saw).
    pub position: Position,
    /// The change's index inside its transaction: several changes of one row in one
    /// transaction share a commit position and are told apart by this.
    pub ordinal: u32,
    pub transaction_id: Option<String>,
    pub commit_time: Option<DateTime<Utc>>,
    pub capture_time: DateTime<Utc>,
}

/// What a source emits: data, or progress that lets positions advance without data.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceMessage {
    Change(ChangeEvent),
    /// Nothing more will come at or before this position (a transaction's commit, the end
    /// of the snapshot, a heartbeat).
    Progress(Position),
}
