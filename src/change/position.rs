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

/// The position of a change in its source's log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Position {
    Postgres(PgLsn),
    Mysql(BinlogPosition),
}

impl Position {
    /// A fixed-width text that sorts like the position, for versions and ids: `0000000016B37480`
    /// for an LSN, `000042-00000000000012F700000000` for a binlog coordinate (file, offset,
    /// step).
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
            Position::Mysql(_) => self.to_string(),
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
        } else {
            Err(format!("`{s}` is not a source position (pg:… or binlog:…)"))
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
}
