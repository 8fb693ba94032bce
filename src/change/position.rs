//! Source positions: one ordered newtype per database kind.

use std::{fmt, str::FromStr};

/// A PostgreSQL WAL location (log sequence number): a 64-bit byte position in the WAL,
/// written `XXXXXXXX/XXXXXXXX` (high and low 32 bits in hex), as `pg_current_wal_lsn()`
/// shows it. Ordered as the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgLsn(pub u64);

impl fmt::Display for PgLsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for PgLsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a PostgreSQL LSN (expected hex `XXXXXXXX/XXXXXXXX`)");
        let (high, low) = s.split_once('/').ok_or_else(bad)?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 {
                return Err(bad());
            }
            u32::from_str_radix(p, 16).map_err(|_| bad())
        };
        Ok(PgLsn(
            (u64::from(part(high)?) << 32) | u64::from(part(low)?),
        ))
    }
}

/// A MySQL/MariaDB binary log coordinate: the log file's sequence number (the numeric
/// extension of `mysql-bin.000042`) and the byte offset of an event in it (the end of the
/// event, as the server's event headers give it). Ordered by file, then offset — the order
/// in which the server wrote them — then step. The file's base name is not part of the
/// order (a server writes one series); it is kept for display.
///
/// `step` numbers the snapshot chunks emitted after the event at `offset` and before the
/// next one (`mariadb-bin.000003:4567+2`): the binary log gets no events of its own for a
/// chunk, and a chunk's rows must sort after the transaction before them and before the
/// one after them. It is 0 for the log's own events.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BinlogPosition {
    pub base_name: String,
    pub file_sequence: u32,
    pub offset: u64,
    pub step: u32,
}

impl BinlogPosition {
    /// From a file name as the server reports it (`mariadb-bin.000003`) and an offset.
    pub fn new(file_name: &str, offset: u64) -> Result<Self, String> {
        let (base, sequence) = file_name
            .rsplit_once('.')
            .ok_or_else(|| format!("`{file_name}` is not a binary log file name (base.NNNNNN)"))?;
        let file_sequence = sequence
            .parse()
            .map_err(|_| format!("`{file_name}` is not a binary log file name (base.NNNNNN)"))?;
        Ok(Self {
            base_name: base.to_owned(),
            file_sequence,
            offset,
            step: 0,
        })
    }

    pub fn file_name(&self) -> String {
        format!("{}.{:06}", self.base_name, self.file_sequence)
    }
}

impl PartialOrd for BinlogPosition {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for BinlogPosition {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.file_sequence, self.offset, self.step).cmp(&(
            other.file_sequence,
            other.offset,
            other.step,
        ))
    }
}

impl fmt::Display for BinlogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file_name(), self.offset)?;
        if self.step > 0 {
            write!(f, "+{}", self.step)?;
        }
        Ok(())
    }
}

impl FromStr for BinlogPosition {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (file, offset) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not a binlog position (file.NNNNNN:offset)"))?;
        let (offset, step) = offset.split_once('+').unwrap_or((offset, "0"));
        let (Ok(offset), Ok(step)) = (offset.parse(), step.parse()) else {
            return Err(format!("`{s}`: the offset is not a number"));
        };
        Ok(Self {
            step,
            ..Self::new(file, offset)?
        })
    }
}

/// A SQL Server log sequence number, as `binary(10)` columns hold it (`__$start_lsn`,
/// `__$seqval`, `sys.fn_cdc_get_max_lsn()`): the virtual log file's sequence number (4
/// bytes), the log block in it (4) and the record in the block (2), big-endian. Ordered by
/// those fields in that order, which is the order of the bytes and of the log. Written as
/// SQL Server's own tools write it, `0000002A:00000150:0003` (hex); the `0x…` form of a
/// `binary(10)` in a query window is read too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn {
    pub vlf: u32,
    pub block: u32,
    pub record: u16,
}

impl Lsn {
    /// After every LSN: a snapshot chunk emitted at the end of a transaction sorts after
    /// all of the transaction's changes.
    pub const END: Lsn = Lsn {
        vlf: u32::MAX,
        block: u32::MAX,
        record: u16::MAX,
    };

    /// From the ten bytes of a `binary(10)`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let bytes: &[u8; 10] = bytes
            .try_into()
            .map_err(|_| format!("an LSN is 10 bytes, not {}", bytes.len()))?;
        let [a, b, c, d, e, f, g, h, i, j] = *bytes;
        Ok(Lsn {
            vlf: u32::from_be_bytes([a, b, c, d]),
            block: u32::from_be_bytes([e, f, g, h]),
            record: u16::from_be_bytes([i, j]),
        })
    }

    /// The ten bytes of a `binary(10)`.
    pub fn to_bytes(self) -> [u8; 10] {
        let mut bytes = [0; 10];
        bytes[..4].copy_from_slice(&self.vlf.to_be_bytes());
        bytes[4..8].copy_from_slice(&self.block.to_be_bytes());
        bytes[8..].copy_from_slice(&self.record.to_be_bytes());
        bytes
    }

    /// From the decimal form of `numeric(25,0)` columns (`database_transaction_begin_lsn`):
    /// the file times 10¹⁵ plus the block times 10⁵ plus the record.
    pub fn from_decimal(n: u128) -> Result<Self, String> {
        let bad = || format!("{n} is not a decimal LSN");
        let vlf = u32::try_from(n / 10u128.pow(15)).map_err(|_| bad())?;
        let rest = n % 10u128.pow(15);
        let block = u32::try_from(rest / 100_000).map_err(|_| bad())?;
        let record = u16::try_from(rest % 100_000).map_err(|_| bad())?;
        Ok(Lsn { vlf, block, record })
    }

    /// The next LSN (`sys.fn_cdc_increment_lsn`): the first one after `self`, where reading
    /// resumes after a transaction that is done.
    pub fn next(self) -> Self {
        let bytes = u128::from_be_bytes({
            let mut wide = [0; 16];
            wide[6..].copy_from_slice(&self.to_bytes());
            wide
        });
        let next = bytes.saturating_add(1).min((1 << 80) - 1).to_be_bytes();
        Lsn::from_bytes(&next[6..]).expect("ten bytes")
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}:{:08X}:{:04X}", self.vlf, self.block, self.record)
    }
}

impl FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("`{s}` is not a SQL Server LSN (expected hex `XXXXXXXX:XXXXXXXX:XXXX` or `0x` and 20 hex digits)")
        };
        let hex = |p: &str, width: usize| {
            if p.len() != width || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(p, 16).map_err(|_| bad())
        };
        if let Some(bytes) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            if bytes.len() != 20 {
                return Err(bad());
            }
            return Ok(Lsn {
                vlf: hex(&bytes[..8], 8)?,
                block: hex(&bytes[8..16], 8)?,
                record: hex(&bytes[16..], 4)? as u16,
            });
        }
        let mut parts = s.split(':');
        let (Some(vlf), Some(block), Some(record), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(Lsn {
            vlf: hex(vlf, 8)?,
            block: hex(block, 8)?,
            record: hex(record, 4)? as u16,
        })
    }
}

/// A place in SQL Server's change tables: the commit LSN of a change's transaction
/// (`__$start_lsn`), the change's sequence in it (`__$seqval`), and `step`, which numbers
/// the snapshot chunks emitted after the transaction (their `seqval` is [`Lsn::END`]).
/// Ordered by the three in that order, which is the order the change functions return rows
/// in. Written `0000002A:00000150:0003/0000002A:00000148:0002`, `+step` when it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangeLsn {
    pub commit: Lsn,
    pub seqval: Lsn,
    pub step: u32,
}

impl ChangeLsn {
    /// The end of the transaction that commits at `commit`: after every change in it.
    pub fn end_of(commit: Lsn) -> Self {
        ChangeLsn {
            commit,
            seqval: Lsn::END,
            step: 0,
        }
    }
}

impl fmt::Display for ChangeLsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.commit, self.seqval)?;
        if self.step > 0 {
            write!(f, "+{}", self.step)?;
        }
        Ok(())
    }
}

impl FromStr for ChangeLsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (commit, seqval) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a SQL Server change position (commit/seqval)"))?;
        let (seqval, step) = seqval.split_once('+').unwrap_or((seqval, "0"));
        Ok(ChangeLsn {
            commit: commit.parse()?,
            seqval: seqval.parse()?,
            step: step
                .parse()
                .map_err(|_| format!("`{s}`: the step is not a number"))?,
        })
    }
}

/// The position of a change in its source's log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Position {
    Postgres(PgLsn),
    Mysql(BinlogPosition),
    SqlServer(ChangeLsn),
}

impl Position {
    /// A fixed-width text that sorts like the position, for versions and ids: `0000000016B37480`
    /// for an LSN, `000042-00000000000012F700000000` for a binlog coordinate (file, offset,
    /// step), 48 hex digits for a SQL Server change (commit, seqval, step).
    pub fn sort_key(&self) -> String {
        let mut key = String::with_capacity(23);
        self.push_sort_key(&mut key);
        key
    }

    /// [`Self::sort_key`], appended to `out`.
    pub fn push_sort_key(&self, out: &mut String) {
        match self {
            Position::Postgres(lsn) => push_hex(out, lsn.0, 16),
            Position::Mysql(pos) => {
                use std::fmt::Write;
                let _ = write!(out, "{:06}-", pos.file_sequence);
                push_hex(out, pos.offset, 16);
                push_hex(out, u64::from(pos.step), 8);
            }
            Position::SqlServer(pos) => {
                for lsn in [pos.commit, pos.seqval] {
                    push_hex(out, u64::from(lsn.vlf), 8);
                    push_hex(out, u64::from(lsn.block), 8);
                    push_hex(out, u64::from(lsn.record), 4);
                }
                push_hex(out, u64::from(pos.step), 8);
            }
        }
    }

    /// The position as [`fmt::Display`] writes it (`pg:0/16B3748`), without the formatting
    /// machinery for the common case: every event carries one.
    pub fn text(&self) -> String {
        match self {
            Position::Postgres(lsn) => {
                let mut text = String::with_capacity(20);
                text.push_str("pg:");
                push_hex(&mut text, lsn.0 >> 32, 1);
                text.push('/');
                push_hex(&mut text, lsn.0 & 0xFFFF_FFFF, 1);
                text
            }
            Position::Mysql(_) | Position::SqlServer(_) => self.to_string(),
        }
    }
}

/// `n` in upper-case hex digits, zero-padded to at least `width` (at most 16).
fn push_hex(out: &mut String, n: u64, width: usize) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let digits = (16 - n.leading_zeros() as usize / 4).max(width.clamp(1, 16));
    out.extend(
        (0..digits)
            .rev()
            .map(|i| char::from(DIGITS[((n >> (i * 4)) & 0xF) as usize])),
    );
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Postgres(lsn) => write!(f, "pg:{lsn}"),
            Position::Mysql(pos) => write!(f, "binlog:{pos}"),
            Position::SqlServer(pos) => write!(f, "mssql:{pos}"),
        }
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(lsn) = s.strip_prefix("pg:") {
            Ok(Position::Postgres(lsn.parse()?))
        } else if let Some(pos) = s.strip_prefix("binlog:") {
            Ok(Position::Mysql(pos.parse()?))
        } else if let Some(pos) = s.strip_prefix("mssql:") {
            Ok(Position::SqlServer(pos.parse()?))
        } else {
            Err(format!(
                "`{s}` is not a source position (pg:…, binlog:… or mssql:…)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn position_text_is_what_display_writes(lsn: u64) {
            let position = Position::Postgres(PgLsn(lsn));
            prop_assert_eq!(position.text(), position.to_string());
        }
    }

    #[test]
    fn lsn_text_is_postgres_text() {
        assert_eq!(PgLsn(0x016B_3748).to_string(), "0/16B3748");
        assert_eq!("1/0".parse::<PgLsn>().unwrap(), PgLsn(1 << 32));
        assert!("16B3748".parse::<PgLsn>().is_err());
        assert!("0/123456789".parse::<PgLsn>().is_err());
    }

    #[test]
    fn binlog_positions_parse_server_file_names() {
        let pos = BinlogPosition::new("mariadb-bin.000003", 4567).unwrap();
        assert_eq!(pos.to_string(), "mariadb-bin.000003:4567");
        assert!(BinlogPosition::new("nodot", 1).is_err());
    }

    proptest! {
        #[test]
        fn lsn_round_trips_and_orders_like_its_number(a: u64, b: u64) {
            let (x, y) = (PgLsn(a), PgLsn(b));
            prop_assert_eq!(x.to_string().parse::<PgLsn>().unwrap(), x);
            prop_assert_eq!(x.cmp(&y), a.cmp(&b));
            let (px, py) = (Position::Postgres(x), Position::Postgres(y));
            prop_assert_eq!(px.to_string().parse::<Position>().unwrap(), px.clone());
            prop_assert_eq!(px.sort_key().cmp(&py.sort_key()), a.cmp(&b));
        }

        #[test]
        fn binlog_positions_round_trip_and_order_by_file_offset_then_step(
            f1 in 0u32..1_000_000, o1: u64, s1 in prop_oneof![Just(0u32), any::<u32>()],
            f2 in 0u32..1_000_000, o2: u64, s2 in prop_oneof![Just(0u32), any::<u32>()],
        ) {
            let x = BinlogPosition { base_name: "mysql-bin".into(), file_sequence: f1, offset: o1, step: s1 };
            let y = BinlogPosition { base_name: "mysql-bin".into(), file_sequence: f2, offset: o2, step: s2 };
            prop_assert_eq!(x.to_string().parse::<BinlogPosition>().unwrap(), x.clone());
            prop_assert_eq!(x.cmp(&y), (f1, o1, s1).cmp(&(f2, o2, s2)));
            let (px, py) = (Position::Mysql(x), Position::Mysql(y));
            prop_assert_eq!(px.to_string().parse::<Position>().unwrap(), px.clone());
            prop_assert_eq!(px.sort_key().cmp(&py.sort_key()), (f1, o1, s1).cmp(&(f2, o2, s2)));
        }
    }

    fn lsn() -> impl Strategy<Value = Lsn> {
        (any::<u32>(), any::<u32>(), any::<u16>()).prop_map(|(vlf, block, record)| Lsn {
            vlf,
            block,
            record,
        })
    }

    proptest! {
        #[test]
        fn sql_server_lsns_round_trip_as_bytes_text_and_decimal_and_order_as_their_bytes(
            x in lsn(), y in lsn(),
        ) {
            prop_assert_eq!(Lsn::from_bytes(&x.to_bytes()).unwrap(), x);
            prop_assert_eq!(x.to_string().parse::<Lsn>().unwrap(), x);
            let binary = format!("0x{}", hex::encode_upper(x.to_bytes()));
            prop_assert_eq!(binary.parse::<Lsn>().unwrap(), x);
            let decimal = u128::from(x.vlf) * 10u128.pow(15)
                + u128::from(x.block) * 100_000
                + u128::from(x.record);
            prop_assert_eq!(Lsn::from_decimal(decimal).unwrap(), x);
            prop_assert_eq!(x.cmp(&y), x.to_bytes().cmp(&y.to_bytes()));
            prop_assert_eq!(x.to_string().cmp(&y.to_string()), x.cmp(&y));
            if x != Lsn::END {
                prop_assert!(x.next() > x);
                prop_assert!(y <= x || y >= x.next(), "nothing between an LSN and the next");
            }
        }

        #[test]
        fn sql_server_positions_round_trip_and_order_by_commit_seqval_then_step(
            c1 in lsn(), q1 in lsn(), s1 in prop_oneof![Just(0u32), any::<u32>()],
            c2 in lsn(), q2 in lsn(), s2 in prop_oneof![Just(0u32), any::<u32>()],
        ) {
            let x = ChangeLsn { commit: c1, seqval: q1, step: s1 };
            let y = ChangeLsn { commit: c2, seqval: q2, step: s2 };
            prop_assert_eq!(x.to_string().parse::<ChangeLsn>().unwrap(), x);
            prop_assert_eq!(x.cmp(&y), (c1, q1, s1).cmp(&(c2, q2, s2)));
            let (px, py) = (Position::SqlServer(x), Position::SqlServer(y));
            prop_assert_eq!(px.to_string().parse::<Position>().unwrap(), px.clone());
            prop_assert_eq!(px.text(), px.to_string());
            prop_assert_eq!(px.sort_key().len(), 48);
            prop_assert_eq!(px.sort_key().cmp(&py.sort_key()), x.cmp(&y));
        }
    }

    #[test]
    fn sql_server_lsns_read_as_the_server_writes_them() {
        let lsn: Lsn = "0x0000002A000001500003".parse().unwrap();
        assert_eq!(
            lsn,
            Lsn {
                vlf: 0x2A,
                block: 0x150,
                record: 3
            }
        );
        assert_eq!(lsn.to_string(), "0000002A:00000150:0003");
        // The numeric(25,0) of sys.dm_tran_database_transactions for the same LSN.
        assert_eq!(Lsn::from_decimal(42_000_000_033_600_003).unwrap(), lsn);
        assert_eq!(
            Lsn {
                vlf: 1,
                block: u32::MAX,
                record: u16::MAX
            }
            .next(),
            Lsn {
                vlf: 2,
                block: 0,
                record: 0
            }
        );
        assert_eq!(Lsn::END.next(), Lsn::END);
        for bad in [
            "",
            "2A:150:3",
            "0x2A",
            "0000002A:00000150",
            "0000002G:00000150:0003",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad}");
        }
        assert!(Lsn::from_bytes(&[0; 9]).is_err());
    }
}
