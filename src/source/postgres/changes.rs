//! From decoded pgoutput messages to source-neutral changes.
//!
//! [`ChangeDecoder`] keeps what the stream has said so far: the layout of each relation
//! (sent before its first change and again after every schema change, so a dropped or
//! added column takes effect exactly where the server says) and the transaction being
//! read. A change's position is its transaction's commit LSN — known from Begin, whose
//! `final_lsn` is the commit record's LSN — and its ordinal is its index in the
//! transaction, so two changes of one row in one transaction stay two versions.
//!
//! An unchanged TOASTed value (`u`) is never published as data: it is taken from the old
//! row when the server sent one (replica identity full), and otherwise the column is left
//! out of the row and marked unavailable ([`Row::absence`]): a mapping that reads it fails
//! for that row (dead-letter topic, with the reason), mappings that do not read it map the
//! row as usual — never a placeholder inside a FHIR resource.

use std::{collections::HashMap, sync::Arc};

use chrono::{DateTime, Utc};
use smallvec::{smallvec, SmallVec};

use super::{
    pgoutput::{Datum, Message, OldTuple, Relation, Tuple},
    types,
};
use crate::change::{ChangeEvent, Names, Operation, PgLsn, Position, Row, SourceTable, Value};

/// Microseconds between the Unix epoch and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Why a message could not become a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("a change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error("a change arrived outside a transaction")]
    NoTransaction,
    #[error("{table}: the row has {got} columns but the relation has {expected}")]
    ColumnCount {
        table: String,
        expected: usize,
        got: usize,
    },
    #[error("{table}.{column}: a binary-format value, which fhir-cdc does not request")]
    Binary { table: String, column: String },
}

/// What one message means for the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Changes of captured rows: one, or for a truncate one per table (held inline: one
    /// allocation less per change).
    Changes(SmallVec<[ChangeEvent; 1]>),
    /// The transaction ending at this commit LSN is complete: everything up to `end_lsn`
    /// has been read.
    Committed { commit_lsn: PgLsn, end_lsn: PgLsn },
    /// The server has sent everything up to here and no transaction is open: a heartbeat,
    /// which lets the acknowledged position advance on an idle database or over traffic on
    /// unmapped tables (which pgoutput does not send at all).
    Heartbeat(PgLsn),
    /// A snapshot watermark (see [`super::snapshot`]): its marker, and the commit position
    /// of the transaction that wrote it.
    Watermark { position: PgLsn, marker: String },
    /// A snapshot request (see `super::capture::request_snapshot`), as JSON.
    Signal(String),
    /// Nothing to publish (relation layouts, types, origins, other logical messages).
    Nothing,
}

struct Transaction {
    commit_lsn: PgLsn,
    commit_time: DateTime<Utc>,
    xid: u32,
    next_ordinal: u32,
}

/// A table as the stream last described it, with what its changes share.
struct Layout {
    relation: Relation,
    source: Arc<SourceTable>,
    /// The column names, in table order.
    names: Names,
    /// The key columns, in table order.
    key: Names,
}

/// Turns one replication stream's messages into changes.
pub struct ChangeDecoder {
    connector: String,
    database: String,
    relations: HashMap<u32, Layout>,
    transaction: Option<Transaction>,
}

impl std::fmt::Debug for ChangeDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeDecoder")
            .field("relations", &self.relations.len())
            .finish_non_exhaustive()
    }
}

impl ChangeDecoder {
    pub fn new(connector: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            connector: connector.into(),
            database: database.into(),
            relations: HashMap::new(),
            transaction: None,
        }
    }

    /// Whether a transaction has begun and not yet committed.
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// The commit position of the transaction being read.
    pub fn commit_lsn(&self) -> Option<PgLsn> {
        self.transaction.as_ref().map(|t| t.commit_lsn)
    }

    /// The layout the stream last described for `schema.table`.
    pub fn relation(&self, schema: &str, table: &str) -> Option<&Relation> {
        self.relations
            .values()
            .map(|layout| &layout.relation)
            .find(|r| r.namespace == schema && r.name == table)
    }

    pub fn decode(
        &mut self,
        message: Message<'_>,
        capture_time: DateTime<Utc>,
    ) -> Result<Decoded, ChangeError> {
        match message {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                self.transaction = Some(Transaction {
                    commit_lsn: PgLsn(final_lsn),
                    commit_time: pg_time(commit_time),
                    xid,
                    next_ordinal: 0,
                });
                Ok(Decoded::Nothing)
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                self.transaction = None;
                Ok(Decoded::Committed {
                    commit_lsn: PgLsn(commit_lsn),
                    end_lsn: PgLsn(end_lsn),
                })
            }
            Message::Relation(relation) => {
                let source = Arc::new(SourceTable::new(
                    self.connector.as_str(),
                    "postgres",
                    self.database.as_str(),
                    if relation.namespace.is_empty() {
                        "pg_catalog"
                    } else {
                        relation.namespace.as_str()
                    },
                    relation.name.as_str(),
                ));
                let names = relation.columns.iter().map(|c| c.name.clone()).collect();
                let key = relation
                    .columns
                    .iter()
                    .filter(|c| c.key)
                    .map(|c| c.name.clone())
                    .collect();
                self.relations.insert(
                    relation.oid,
                    Layout {
                        relation,
                        source,
                        names,
                        key,
                    },
                );
                Ok(Decoded::Nothing)
            }
            Message::Insert { relation, new, .. } => {
                let change =
                    self.change(relation, Operation::Insert, None, Some(new), capture_time)?;
                Ok(Decoded::Changes(smallvec![change]))
            }
            Message::Update {
                relation, old, new, ..
            } => {
                let change =
                    self.change(relation, Operation::Update, old, Some(new), capture_time)?;
                Ok(Decoded::Changes(smallvec![change]))
            }
            Message::Delete { relation, old, .. } => {
                let change =
                    self.change(relation, Operation::Delete, Some(old), None, capture_time)?;
                Ok(Decoded::Changes(smallvec![change]))
            }
            Message::Truncate { relations, .. } => {
                let mut changes = SmallVec::with_capacity(relations.len());
                for relation in relations {
                    changes.push(self.change(
                        relation,
                        Operation::Truncate,
                        None,
                        None,
                        capture_time,
                    )?);
                }
                Ok(Decoded::Changes(changes))
            }
            Message::Type { .. } | Message::Origin { .. } | Message::Message { .. } => {
                Ok(Decoded::Nothing)
            }
            // Streamed transactions are not requested (protocol version 1 with
            // `streaming off`): the server sends each transaction whole, after its commit.
            Message::StreamStart { .. }
            | Message::StreamStop
            | Message::StreamCommit { .. }
            | Message::StreamAbort { .. } => Ok(Decoded::Nothing),
        }
    }

    fn change(
        &mut self,
        relation: u32,
        op: Operation,
        old: Option<OldTuple<'_>>,
        new: Option<Tuple<'_>>,
        capture_time: DateTime<Utc>,
    ) -> Result<ChangeEvent, ChangeError> {
        let layout = self
            .relations
            .get(&relation)
            .ok_or(ChangeError::UnknownRelation(relation))?;
        let transaction = self
            .transaction
            .as_mut()
            .ok_or(ChangeError::NoTransaction)?;
        let before = match old {
            None => None,
            // Only the key columns are filled; the others are NULL in the message.
            Some(OldTuple::Key(tuple)) => Some(key_row(&layout.relation, &tuple)?),
            Some(OldTuple::Full(tuple)) => Some(full_row(layout, &tuple, None)?),
        };
        let after = match new {
            None => None,
            Some(tuple) => Some(full_row(layout, &tuple, before.as_ref())?),
        };
        let ordinal = transaction.next_ordinal;
        transaction.next_ordinal += 1;
        Ok(ChangeEvent {
            source: layout.source.clone(),
            op,
            key: layout.key.clone(),
            before,
            after,
            position: Position::Postgres(transaction.commit_lsn),
            ordinal,
            transaction_id: Some(transaction.xid.to_string()),
            commit_time: Some(transaction.commit_time),
            capture_time,
        })
    }
}

fn pg_time(micros_since_2000: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros_since_2000.saturating_add(PG_EPOCH_MICROS))
        .unwrap_or_default()
}

fn check_width(layout: &Relation, tuple: &Tuple) -> Result<(), ChangeError> {
    if tuple.len() == layout.columns.len() {
        Ok(())
    } else {
        Err(ChangeError::ColumnCount {
            table: table_name(layout),
            expected: layout.columns.len(),
            got: tuple.len(),
        })
    }
}

fn table_name(layout: &Relation) -> String {
    format!("{}.{}", layout.namespace, layout.name)
}

/// Every column, typed; unchanged TOAST values from `before`, or marked unavailable.
fn full_row(layout: &Layout, tuple: &Tuple, before: Option<&Row>) -> Result<Row, ChangeError> {
    let relation = &layout.relation;
    check_width(relation, tuple)?;
    let mut values = Vec::with_capacity(tuple.len());
    let mut unavailable = Vec::new();
    for (column, datum) in relation.columns.iter().zip(tuple) {
        values.push(match datum {
            Datum::Null => Value::Null,
            Datum::Text(bytes) => {
                types::from_text(column.type_oid, &String::from_utf8_lossy(bytes))
            }
            Datum::UnchangedToast => match before.and_then(|row| row.get(&column.name)) {
                Some(value) => value.clone(),
                None => {
                    unavailable.push(column.name.to_string());
                    Value::Null
                }
            },
            Datum::Binary(_) => {
                return Err(ChangeError::Binary {
                    table: table_name(relation),
                    column: column.name.to_string(),
                })
            }
        });
    }
    if unavailable.is_empty() {
        return Ok(Row::of_layout(layout.names.clone(), values));
    }
    // Rare (no old row to take them from): the row leaves out what was not sent.
    let columns = relation
        .columns
        .iter()
        .zip(values)
        .filter(|(column, _)| !unavailable.iter().any(|u| **u == *column.name))
        .map(|(column, value)| (column.name.clone(), value))
        .collect();
    Ok(Row::with_unavailable(columns, unavailable))
}

/// The key columns of an old-key tuple (the other columns are absent, not NULL).
fn key_row(layout: &Relation, tuple: &Tuple) -> Result<Row, ChangeError> {
    check_width(layout, tuple)?;
    let mut columns = Vec::new();
    for (column, datum) in layout.columns.iter().zip(tuple) {
        if let (true, Datum::Text(bytes)) = (column.key, datum) {
            columns.push((
                column.name.clone(),
                types::from_text(column.type_oid, &String::from_utf8_lossy(bytes)),
            ));
        }
    }
    Ok(Row::new(columns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::postgres::pgoutput::Column;

    fn relation() -> Message<'static> {
        let column = |key, name: &str, type_oid| Column {
            key,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        Message::Relation(Relation {
            xid: None,
            oid: 7,
            namespace: "lis".into(),
            name: "lab_result".into(),
            replica_identity: b'd',
            columns: vec![
                column(true, "result_id", types::INT4),
                column(false, "value_numeric", types::NUMERIC),
                column(false, "comment", 25),
            ],
        })
    }

    fn text(s: &str) -> Datum<'_> {
        Datum::Text(s.as_bytes())
    }

    fn decoder() -> ChangeDecoder {
        let mut d = ChangeDecoder::new("lab", "labdb");
        d.decode(relation(), Utc::now()).unwrap();
        d.decode(
            Message::Begin {
                final_lsn: 0x1000,
                commit_time: 0,
                xid: 42,
            },
            Utc::now(),
        )
        .unwrap();
        d
    }

    #[test]
    fn changes_carry_commit_position_ordinal_and_typed_rows() {
        let mut d = decoder();
        let insert = Message::Insert {
            xid: None,
            relation: 7,
            new: vec![text("1"), text("12.50"), Datum::Null],
        };
        let update = Message::Update {
            xid: None,
            relation: 7,
            old: None,
            new: vec![text("1"), text("13.00"), text("x")],
        };
        let Decoded::Changes(first) = d.decode(insert, Utc::now()).unwrap() else {
            panic!()
        };
        let Decoded::Changes(second) = d.decode(update, Utc::now()).unwrap() else {
            panic!()
        };
        assert_eq!((first[0].ordinal, second[0].ordinal), (0, 1));
        assert_eq!(first[0].position, Position::Postgres(PgLsn(0x1000)));
        assert_eq!(*first[0].key, ["result_id".into()]);
        assert_eq!(first[0].source.qualified_name(), "lis.lab_result");
        assert_eq!(
            first[0].commit_time.unwrap().to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
        let after = first[0].after.as_ref().unwrap();
        assert_eq!(
            after.get("value_numeric"),
            Some(&Value::Decimal(
                crate::change::ExactDecimal::parse("12.50").unwrap()
            ))
        );
        assert_eq!(after.get("comment"), Some(&Value::Null));
        assert_eq!(
            d.decode(
                Message::Commit {
                    flags: 0,
                    commit_lsn: 0x1000,
                    end_lsn: 0x1010,
                    commit_time: 0
                },
                Utc::now()
            )
            .unwrap(),
            Decoded::Committed {
                commit_lsn: PgLsn(0x1000),
                end_lsn: PgLsn(0x1010)
            }
        );
    }

    #[test]
    fn unchanged_toast_comes_from_the_old_row_or_is_marked_unavailable() {
        let mut d = decoder();
        let with_old = Message::Update {
            xid: None,
            relation: 7,
            old: Some(OldTuple::Full(vec![
                text("1"),
                text("1"),
                text("a very long comment"),
            ])),
            new: vec![text("1"), text("2"), Datum::UnchangedToast],
        };
        let Decoded::Changes(changes) = d.decode(with_old, Utc::now()).unwrap() else {
            panic!()
        };
        assert_eq!(
            changes[0].after.as_ref().unwrap().get("comment"),
            Some(&Value::Text("a very long comment".into()))
        );
        let without_old = Message::Update {
            xid: None,
            relation: 7,
            old: None,
            new: vec![text("1"), text("2"), Datum::UnchangedToast],
        };
        let Decoded::Changes(changes) = d.decode(without_old, Utc::now()).unwrap() else {
            panic!()
        };
        let after = changes[0].after.as_ref().unwrap();
        assert_eq!(after.get("comment"), None, "no value, not a guess");
        assert_eq!(after.unavailable(), ["comment"]);
        assert!(after.absence("comment").contains("unchanged TOASTed value"));
        assert_eq!(after.get("result_id"), Some(&Value::Int(1)));
    }

    #[test]
    fn deletes_with_the_default_identity_carry_only_the_key() {
        let mut d = decoder();
        let delete = Message::Delete {
            xid: None,
            relation: 7,
            old: OldTuple::Key(vec![text("9"), Datum::Null, Datum::Null]),
        };
        let Decoded::Changes(changes) = d.decode(delete, Utc::now()).unwrap() else {
            panic!()
        };
        let before = changes[0].before.as_ref().unwrap();
        assert_eq!(before.get("result_id"), Some(&Value::Int(9)));
        assert_eq!(before.get("comment"), None, "absent, not NULL");
    }

    #[test]
    fn stream_order_errors_are_named() {
        let mut d = ChangeDecoder::new("lab", "labdb");
        let insert = || Message::Insert {
            xid: None,
            relation: 7,
            new: vec![text("1"), text("1"), Datum::Null],
        };
        assert_eq!(
            d.decode(insert(), Utc::now()).unwrap_err(),
            ChangeError::UnknownRelation(7)
        );
        d.decode(relation(), Utc::now()).unwrap();
        assert_eq!(
            d.decode(insert(), Utc::now()).unwrap_err(),
            ChangeError::NoTransaction
        );
        d.decode(
            Message::Begin {
                final_lsn: 1,
                commit_time: 0,
                xid: 1,
            },
            Utc::now(),
        )
        .unwrap();
        let narrow = Message::Insert {
            xid: None,
            relation: 7,
            new: vec![text("1")],
        };
        assert!(matches!(
            d.decode(narrow, Utc::now()).unwrap_err(),
            ChangeError::ColumnCount {
                expected: 3,
                got: 1,
                ..
            }
        ));
    }
}
