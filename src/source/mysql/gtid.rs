//! Global transaction ids: what lets a connector resume on another server that has the same
//! transactions (a replica promoted after a failover), where binlog file names and offsets
//! differ.
//!
//! The two servers differ. MariaDB's GTID is `domain-server-sequence`, and its position is
//! the last GTID applied in each replication domain (`0-1-42,1-2-7`: what
//! `@@gtid_binlog_pos` shows and `@slave_connect_state` takes). MySQL's is
//! `source_uuid:transaction_number`, and its position is the set of every transaction applied
//! (`3E11FA47-…:1-57:60`, `@@gtid_executed`), sent with `COM_BINLOG_DUMP_GTID`.

use std::{collections::BTreeMap, fmt, str::FromStr};

/// One transaction's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gtid {
    Mariadb {
        domain: u32,
        server: u32,
        sequence: u64,
    },
    Mysql {
        uuid: [u8; 16],
        number: u64,
    },
}

impl Gtid {
    /// A MariaDB GTID event's body: the sequence number (8 bytes), the domain (4 bytes),
    /// little-endian; the server id is the event header's.
    pub fn mariadb_event(body: &[u8], server: u32) -> Option<Self> {
        let sequence = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
        let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
        Some(Gtid::Mariadb {
            domain,
            server,
            sequence,
        })
    }

    /// Whether a MariaDB GTID event opens a transaction that ends in its own statement (DDL,
    /// a non-transactional write): flag `FL_STANDALONE`, the 13th byte.
    pub fn mariadb_standalone(body: &[u8]) -> bool {
        body.get(12).is_some_and(|flags| flags & 1 != 0)
    }
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gtid::Mariadb {
                domain,
                server,
                sequence,
            } => write!(f, "{domain}-{server}-{sequence}"),
            Gtid::Mysql { uuid, number } => write!(f, "{}:{number}", uuid_text(uuid)),
        }
    }
}

/// The transactions a server (or the connector) has: see the module's documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GtidPosition {
    /// Per domain, the last server and sequence number.
    Mariadb(BTreeMap<u32, (u32, u64)>),
    /// Per source uuid (its text), the intervals of transaction numbers, each `[start, end]`.
    Mysql(BTreeMap<String, Vec<(u64, u64)>>),
}

impl GtidPosition {
    /// Count `gtid` as applied.
    pub fn apply(&mut self, gtid: Gtid) {
        match (self, gtid) {
            (
                GtidPosition::Mariadb(domains),
                Gtid::Mariadb {
                    domain,
                    server,
                    sequence,
                },
            ) => {
                domains.insert(domain, (server, sequence));
            }
            (GtidPosition::Mysql(sets), Gtid::Mysql { uuid, number }) => {
                let intervals = sets.entry(uuid_text(&uuid)).or_default();
                insert(intervals, number);
            }
            // A server does not change kind under a running connector.
            (position, gtid) => {
                *position = GtidPosition::empty_like(gtid);
                position.apply(gtid);
            }
        }
    }

    fn empty_like(gtid: Gtid) -> Self {
        match gtid {
            Gtid::Mariadb { .. } => GtidPosition::Mariadb(BTreeMap::new()),
            Gtid::Mysql { .. } => GtidPosition::Mysql(BTreeMap::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            GtidPosition::Mariadb(d) => d.is_empty(),
            GtidPosition::Mysql(s) => s.is_empty(),
        }
    }
}

/// Add `n` to sorted, disjoint, non-adjacent intervals.
fn insert(intervals: &mut Vec<(u64, u64)>, n: u64) {
    let at = intervals.partition_point(|(_, end)| *end < n);
    if intervals.get(at).is_some_and(|(start, _)| *start <= n) {
        return;
    }
    let joins_left = at > 0 && intervals[at - 1].1 + 1 == n;
    let joins_right = intervals.get(at).is_some_and(|(start, _)| *start == n + 1);
    match (joins_left, joins_right) {
        (true, true) => {
            intervals[at - 1].1 = intervals[at].1;
            intervals.remove(at);
        }
        (true, false) => intervals[at - 1].1 = n,
        (false, true) => intervals[at].0 = n,
        (false, false) => intervals.insert(at, (n, n)),
    }
}

fn uuid_text(uuid: &[u8; 16]) -> String {
    let hex = hex::encode(uuid);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

impl fmt::Display for GtidPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            let s = if first { "" } else { "," };
            first = false;
            f.write_str(s)
        };
        match self {
            GtidPosition::Mariadb(domains) => {
                for (domain, (server, sequence)) in domains {
                    sep(f)?;
                    write!(f, "{domain}-{server}-{sequence}")?;
                }
            }
            GtidPosition::Mysql(sets) => {
                for (uuid, intervals) in sets {
                    sep(f)?;
                    f.write_str(uuid)?;
                    for (start, end) in intervals {
                        if start == end {
                            write!(f, ":{start}")?;
                        } else {
                            write!(f, ":{start}-{end}")?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl FromStr for GtidPosition {
    type Err = String;

    /// MariaDB's `0-1-42,1-2-7` or MySQL's `uuid:1-57:60,uuid:1-3` (whitespace and line
    /// breaks, as `@@gtid_executed` has them, ignored). An empty text is an empty MariaDB
    /// position.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let bad = |part: &str| format!("`{part}` is not a GTID (MariaDB d-s-n, MySQL uuid:n-m)");
        if !s.contains(':') {
            let mut domains = BTreeMap::new();
            for part in s.split(',').filter(|p| !p.is_empty()) {
                let numbers: Vec<&str> = part.split('-').collect();
                let [domain, server, sequence] = numbers[..] else {
                    return Err(bad(part));
                };
                let (Ok(domain), Ok(server), Ok(sequence)) =
                    (domain.parse(), server.parse(), sequence.parse())
                else {
                    return Err(bad(part));
                };
                domains.insert(domain, (server, sequence));
            }
            return Ok(GtidPosition::Mariadb(domains));
        }
        let mut sets = BTreeMap::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let mut pieces = part.split(':');
            let uuid = pieces.next().unwrap_or_default().to_ascii_lowercase();
            if hex::decode(uuid.replace('-', "")).map(|b| b.len()) != Ok(16) {
                return Err(bad(part));
            }
            let mut intervals = Vec::new();
            for piece in pieces {
                let (start, end) = piece.split_once('-').unwrap_or((piece, piece));
                let (Ok(start), Ok(end)) = (start.parse::<u64>(), end.parse::<u64>()) else {
                    return Err(bad(part));
                };
                if start > end || start == 0 {
                    return Err(bad(part));
                }
                intervals.push((start, end));
            }
            intervals.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(intervals.len());
            for (start, end) in intervals {
                match merged.last_mut() {
                    Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                    _ => merged.push((start, end)),
                }
            }
            let intervals = merged;
            sets.insert(uuid, intervals);
        }
        Ok(GtidPosition::Mysql(sets))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn mariadb_positions_keep_the_last_gtid_per_domain() {
        let mut position: GtidPosition = "0-1-42,1-2-7".parse().unwrap();
        position.apply(Gtid::Mariadb {
            domain: 0,
            server: 3,
            sequence: 43,
        });
        assert_eq!(position.to_string(), "0-3-43,1-2-7");
        assert!("0-1".parse::<GtidPosition>().is_err());
        assert!("".parse::<GtidPosition>().unwrap().is_empty());
    }

    #[test]
    fn mysql_sets_read_and_write_like_the_server() {
        let text = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-57:60";
        let mut set: GtidPosition = text.parse().unwrap();
        assert_eq!(set.to_string(), text);
        let uuid: [u8; 16] = hex::decode("3e11fa4771ca11e19e33c80aa9429562")
            .unwrap()
            .try_into()
            .unwrap();
        set.apply(Gtid::Mysql { uuid, number: 59 });
        assert_eq!(
            set.to_string(),
            "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-57:59-60"
        );
        set.apply(Gtid::Mysql { uuid, number: 58 });
        assert_eq!(set.to_string(), "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-60");
        assert!("3e11fa47:1-5".parse::<GtidPosition>().is_err());
    }

    proptest! {
        #[test]
        fn intervals_hold_exactly_the_numbers_inserted(numbers in proptest::collection::vec(1u64..60, 0..40)) {
            let mut intervals = Vec::new();
            for n in &numbers {
                insert(&mut intervals, *n);
            }
            let held: Vec<u64> = intervals.iter().flat_map(|(s, e)| *s..=*e).collect();
            let mut expected = numbers.clone();
            expected.sort_unstable();
            expected.dedup();
            prop_assert_eq!(held, expected);
            prop_assert!(intervals.windows(2).all(|w| w[0].1 + 1 < w[1].0));
        }
    }
}
