//! Decoding of the built-in `pgoutput` logical decoding plugin's messages, protocol
//! versions 1 and 2 (streamed in-progress transactions), as documented in "Logical
//! Replication Message Formats"
//! (<https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>).
//!
//! The bytes are untrusted input from the network: every read is bounds-checked and a
//! malformed message is an error naming the message type and the offset, never a panic (a
//! fuzz target holds this).

use std::fmt;

/// One pgoutput message. Column values borrow from the message's bytes: a change's row is
/// typed straight from them, without a copy per column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Begin {
        final_lsn: u64,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        xid: Option<u32>,
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        xid: Option<u32>,
        relation: u32,
        new: Tuple<'a>,
    },
    Update {
        xid: Option<u32>,
        relation: u32,
        old: Option<OldTuple<'a>>,
        new: Tuple<'a>,
    },
    Delete {
        xid: Option<u32>,
        relation: u32,
        old: OldTuple<'a>,
    },
    Truncate {
        xid: Option<u32>,
        options: u8,
        relations: Vec<u32>,
    },
    Message {
        xid: Option<u32>,
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
    StreamStart {
        xid: u32,
        first_segment: bool,
    },
    StreamStop,
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
}

/// A table's layout as the server describes it before the first change that uses it, and
/// again after every schema change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub xid: Option<u32>,
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity key.
    pub key: bool,
    /// Shared with every row of the relation.
    pub name: std::sync::Arc<str>,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The old row of an update or delete: only the key columns (`K`, default replica
/// identity) or the whole row (`O`, replica identity full).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple<'a> {
    Key(Tuple<'a>),
    Full(Tuple<'a>),
}

/// Column values in relation order.
pub type Tuple<'a> = Vec<Datum<'a>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum<'a> {
    Null,
    /// A TOASTed value that did not change: the server did not send it.
    UnchangedToast,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// A malformed message: its type byte and where reading failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub message_type: u8,
    pub offset: usize,
    pub problem: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "malformed pgoutput message '{}' at byte {}: {}",
            self.message_type.escape_ascii(),
            self.offset,
            self.problem
        )
    }
}

impl std::error::Error for DecodeError {}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    message_type: u8,
}

impl<'a> Reader<'a> {
    fn fail(&self, problem: &'static str) -> DecodeError {
        DecodeError {
            message_type: self.message_type,
            offset: self.at,
            problem,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| self.fail("message ends early"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("two bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("four bytes"),
        ))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("four bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("eight bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("eight bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.bytes[self.at..];
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| self.fail("string without terminator"))?;
        let text = std::str::from_utf8(&rest[..end])
            .map_err(|_| self.fail("string is not UTF-8"))?
            .to_owned();
        self.at += end + 1;
        Ok(text)
    }

    fn xid_if(&mut self, streaming: bool) -> Result<Option<u32>, DecodeError> {
        if streaming {
            Ok(Some(self.u32()?))
        } else {
            Ok(None)
        }
    }

    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let count = self.u16()?;
        let mut tuple = Vec::with_capacity(usize::from(count).min(self.bytes.len()));
        for _ in 0..count {
            tuple.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.u32()?;
                    let data = self.take(len as usize)?;
                    if kind == b't' {
                        Datum::Text(data)
                    } else {
                        Datum::Binary(data)
                    }
                }
                _ => return Err(self.fail("unknown column value kind")),
            });
        }
        Ok(tuple)
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(self.fail("trailing bytes after the message"))
        }
    }
}

/// Decode one message. `streaming` says whether it arrives between a Stream Start and a
/// Stream Stop, where data messages carry their transaction id (protocol version 2).
pub fn decode(bytes: &[u8], streaming: bool) -> Result<Message<'_>, DecodeError> {
    let message_type = *bytes.first().ok_or(DecodeError {
        message_type: 0,
        offset: 0,
        problem: "empty message",
    })?;
    let mut r = Reader {
        bytes,
        at: 1,
        message_type,
    };
    let message = match message_type {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: r.u64()?,
            end_lsn: r.u64()?,
            commit_time: r.i64()?,
        },
        b'O' => Message::Origin {
            commit_lsn: r.u64()?,
            name: r.string()?,
        },
        b'R' => {
            let xid = r.xid_if(streaming)?;
            let oid = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let replica_identity = r.u8()?;
            let count = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(count).min(bytes.len()));
            for _ in 0..count {
                columns.push(Column {
                    key: r.u8()? & 1 == 1,
                    name: r.string()?.into(),
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation {
                xid,
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            xid: r.xid_if(streaming)?,
            oid: r.u32()?,
            namespace: r.string()?,
            name: r.string()?,
        },
        b'I' => {
            let xid = r.xid_if(streaming)?;
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return Err(r.fail("an insert carries a new tuple ('N')"));
            }
            Message::Insert {
                xid,
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let xid = r.xid_if(streaming)?;
            let relation = r.u32()?;
            let (old, marker) = match r.u8()? {
                b'K' => (Some(OldTuple::Key(r.tuple()?)), r.u8()?),
                b'O' => (Some(OldTuple::Full(r.tuple()?)), r.u8()?),
                marker => (None, marker),
            };
            if marker != b'N' {
                return Err(r.fail("an update carries a new tuple ('N')"));
            }
            Message::Update {
                xid,
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let xid = r.xid_if(streaming)?;
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                _ => return Err(r.fail("a delete carries the old key ('K') or row ('O')")),
            };
            Message::Delete { xid, relation, old }
        }
        b'T' => {
            let xid = r.xid_if(streaming)?;
            let count = r.u32()?;
            let options = r.u8()?;
            let mut relations = Vec::with_capacity((count as usize).min(bytes.len()));
            for _ in 0..count {
                relations.push(r.u32()?);
            }
            Message::Truncate {
                xid,
                options,
                relations,
            }
        }
        b'M' => {
            let xid = r.xid_if(streaming)?;
            let transactional = r.u8()? & 1 == 1;
            let lsn = r.u64()?;
            let prefix = r.string()?;
            let len = r.u32()?;
            Message::Message {
                xid,
                transactional,
                lsn,
                prefix,
                content: r.take(len as usize)?.to_vec(),
            }
        }
        b'S' => Message::StreamStart {
            xid: r.u32()?,
            first_segment: r.u8()? == 1,
        },
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit {
            xid: r.u32()?,
            flags: r.u8()?,
            commit_lsn: r.u64()?,
            end_lsn: r.u64()?,
            commit_time: r.i64()?,
        },
        b'A' => Message::StreamAbort {
            xid: r.u32()?,
            subxid: r.u32()?,
        },
        _ => return Err(r.fail("unknown message type")),
    };
    r.end()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16_384u32.to_be_bytes());
        b.extend(b"lis\0lab_result\0");
        b.push(b'd');
        b.extend(2u16.to_be_bytes());
        b.push(1);
        b.extend(b"result_id\0");
        b.extend(23u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.push(0);
        b.extend(b"comment\0");
        b.extend(25u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b
    }

    #[test]
    fn relations_and_changes_decode() {
        let Message::Relation(relation) = decode(&relation_bytes(), false).unwrap() else {
            panic!()
        };
        assert_eq!(
            (relation.namespace.as_str(), relation.name.as_str()),
            ("lis", "lab_result")
        );
        assert!(relation.columns[0].key && !relation.columns[1].key);
        assert_eq!(relation.columns[1].type_oid, 25);

        let mut update = vec![b'U'];
        update.extend(16_384u32.to_be_bytes());
        update.push(b'K');
        update.extend(2u16.to_be_bytes());
        update.extend([b't', 0, 0, 0, 3]);
        update.extend(b"101");
        update.push(b'n');
        update.push(b'N');
        update.extend(2u16.to_be_bytes());
        update.extend([b't', 0, 0, 0, 3]);
        update.extend(b"101");
        update.push(b'u');
        assert_eq!(
            decode(&update, false).unwrap(),
            Message::Update {
                xid: None,
                relation: 16_384,
                old: Some(OldTuple::Key(vec![Datum::Text(b"101"), Datum::Null])),
                new: vec![Datum::Text(b"101"), Datum::UnchangedToast],
            }
        );
    }

    #[test]
    fn streamed_messages_carry_their_transaction() {
        let mut insert = vec![b'I'];
        insert.extend(77u32.to_be_bytes());
        insert.extend(16_384u32.to_be_bytes());
        insert.push(b'N');
        insert.extend(0u16.to_be_bytes());
        assert_eq!(
            decode(&insert, true).unwrap(),
            Message::Insert {
                xid: Some(77),
                relation: 16_384,
                new: vec![]
            }
        );
        // Read as unstreamed, the same bytes do not line up.
        assert!(decode(&insert, false).is_err());
    }

    #[test]
    fn malformed_messages_are_errors_with_their_place() {
        let bytes = relation_bytes();
        for cut in 1..bytes.len() {
            let err = decode(&bytes[..cut], false).unwrap_err();
            assert_eq!(err.message_type, b'R');
            assert!(err.offset <= cut, "{err}");
        }
        assert_eq!(decode(b"", false).unwrap_err().problem, "empty message");
        assert_eq!(
            decode(b"Z", false).unwrap_err().problem,
            "unknown message type"
        );
        let mut long = relation_bytes();
        long.push(0);
        assert_eq!(
            decode(&long, false).unwrap_err().problem,
            "trailing bytes after the message"
        );
        // A huge declared length is an error, not an allocation.
        let mut huge = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        huge.extend(u32::MAX.to_be_bytes());
        assert_eq!(
            decode(&huge, false).unwrap_err().problem,
            "message ends early"
        );
    }
}
