//! The change tables' rows as changes, and which capture instance to read over which LSNs.
//!
//! `cdc.fn_cdc_get_all_changes_<instance>(from, to, N'all update old')` returns one row per
//! change of a captured table committed in `[from, to]` (inclusive): `__$start_lsn` (the
//! commit LSN of its transaction), `__$seqval` (its order in the transaction),
//! `__$operation` (1 delete, 2 insert, 3 an update's old row, 4 its new row),
//! `__$update_mask`, then the captured columns
//! (<https://learn.microsoft.com/sql/relational-databases/system-functions/cdc-fn-cdc-get-all-changes-capture-instance-transact-sql>).
//! Read ordered by `__$start_lsn, __$seqval, __$operation`, an update's two rows are next
//! to each other, old first.
//!
//! A table has one or two capture instances: a DBA who changes its columns enables a second
//! one with the new columns, and drops the first when its consumers have moved
//! (<https://learn.microsoft.com/sql/relational-databases/track-changes/about-change-data-capture-sql-server#handling-changes-to-source-tables>).
//! Both capture the same changes from the second one's start on. The connector reads the
//! older one up to the newer one's start LSN and the newer one from there: every change once.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::change::{ChangeEvent, ChangeLsn, Lsn, Names, Operation, Position, Row, SourceTable};

/// One row of a change function: where, what, and the captured columns.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRow {
    pub commit: Lsn,
    pub seqval: Lsn,
    pub operation: i32,
    pub row: Row,
    /// When the transaction committed (`cdc.lsn_time_mapping`), if known.
    pub commit_time: Option<DateTime<Utc>>,
}

/// A change function's rows that are not changes as the documentation describes them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowsError {
    #[error("operation {operation} at {at} is none of 1 (delete), 2 (insert), 3 and 4 (update)")]
    Operation { operation: i32, at: ChangeLsn },
    #[error(
        "the update at {at} has no {missing} row (its old and new rows come as a pair, 3 then 4)"
    )]
    Unpaired {
        at: ChangeLsn,
        missing: &'static str,
    },
}

/// `rows` of one table, in the change function's order, as changes: deletes, inserts, and
/// each update's old and new rows as one update with both images.
pub fn changes(
    table: &Arc<SourceTable>,
    key: &Names,
    rows: impl IntoIterator<Item = ChangeRow>,
) -> Result<Vec<ChangeEvent>, RowsError> {
    let mut rows = rows.into_iter().peekable();
    let mut changes = Vec::new();
    while let Some(row) = rows.next() {
        let at = ChangeLsn {
            commit: row.commit,
            seqval: row.seqval,
            step: 0,
        };
        let (op, before, after) = match row.operation {
            // A deferred update (SQL Server logs some as a delete and an insert of the same
            // change): one update when the key stays, else the delete and then the insert.
            1 => match rows.next_if(|new| {
                new.operation == 2
                    && (new.commit, new.seqval) == (row.commit, row.seqval)
                    && key.iter().all(|k| new.row.get(k) == row.row.get(k))
            }) {
                Some(new) => (Operation::Update, Some(row.row), Some(new.row)),
                None => (Operation::Delete, Some(row.row), None),
            },
            2 => (Operation::Insert, None, Some(row.row)),
            3 => match rows.next_if(|new| {
                new.operation == 4 && (new.commit, new.seqval) == (row.commit, row.seqval)
            }) {
                Some(new) => (Operation::Update, Some(row.row), Some(new.row)),
                None => return Err(RowsError::Unpaired { at, missing: "new" }),
            },
            4 => return Err(RowsError::Unpaired { at, missing: "old" }),
            operation => return Err(RowsError::Operation { operation, at }),
        };
        changes.push(ChangeEvent {
            source: table.clone(),
            op,
            key: key.clone(),
            before,
            after,
            position: Position::SqlServer(at),
            ordinal: 0,
            transaction_id: None,
            commit_time: row.commit_time,
            capture_time: Utc::now(),
        });
    }
    Ok(changes)
}

/// Number `changes` (in LSN order, of any tables) within their transactions.
pub fn number(changes: &mut [ChangeEvent]) {
    let mut last: Option<(Lsn, u32)> = None;
    for change in changes {
        let Position::SqlServer(at) = &change.position else {
            continue;
        };
        let ordinal = match last {
            Some((commit, ordinal)) if commit == at.commit => ordinal + 1,
            _ => 0,
        };
        change.ordinal = ordinal;
        last = Some((at.commit, ordinal));
    }
}

/// A capture instance of a table, as `cdc.change_tables` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    /// The low end of what it holds (`start_lsn`, also `sys.fn_cdc_get_min_lsn`): where it
    /// began, or where the cleanup job has removed changes up to.
    pub start: Lsn,
    /// When it was created: the newer of two instances is the one to move to.
    pub created: chrono::NaiveDateTime,
}

/// Which of a table's capture instances to read over `[from, to]`: `(index, from, to)` for
/// each, in LSN order. The newest instance created is read from its start on, each older
/// one up to the start of the one after it; none is asked for LSNs below its start (the
/// change functions refuse that).
pub fn reads(instances: &[Instance], from: Lsn, to: Lsn) -> Vec<(usize, Lsn, Lsn)> {
    let mut order: Vec<usize> = (0..instances.len()).collect();
    order.sort_by_key(|&i| (instances[i].created, instances[i].start));
    let mut reads = Vec::new();
    for (n, &i) in order.iter().enumerate() {
        let low = from.max(instances[i].start);
        let high = match order.get(n + 1) {
            // Up to the newer one's start, exclusive: the last LSN before it.
            Some(&newer) => match previous(instances[newer].start) {
                Some(before) => to.min(before),
                None => continue,
            },
            None => to,
        };
        if low <= high {
            reads.push((i, low, high));
        }
    }
    reads
}

/// The LSN just before `lsn`, if any.
fn previous(lsn: Lsn) -> Option<Lsn> {
    let mut wide = [0; 16];
    wide[6..].copy_from_slice(&lsn.to_bytes());
    let before = u128::from_be_bytes(wide).checked_sub(1)?.to_be_bytes();
    Some(Lsn::from_bytes(&before[6..]).expect("ten bytes"))
}

/// Whether the changes of a table from `from` on are gone: the cleanup job has removed
/// changes after it from every capture instance (the oldest now starts after `from`).
/// Returns the LSN its changes now start at.
pub fn cleaned_up(instances: &[Instance], from: Lsn) -> Option<Lsn> {
    let start = instances.iter().map(|i| i.start).min()?;
    (start > from).then_some(start)
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;
    use proptest::prelude::*;

    use super::*;
    use crate::change::Value;

    fn lsn(n: u64) -> Lsn {
        Lsn {
            vlf: (n >> 32) as u32,
            block: n as u32,
            record: 0,
        }
    }

    fn row(commit: u64, seqval: u64, operation: i32, id: i64, value: &str) -> ChangeRow {
        let names: Names = [Arc::from("id"), Arc::from("value")].into();
        ChangeRow {
            commit: lsn(commit),
            seqval: lsn(seqval),
            operation,
            row: Row::of_layout(names, vec![Value::Int(id), Value::Text(value.into())]),
            commit_time: None,
        }
    }

    fn table() -> (Arc<SourceTable>, Names) {
        (
            Arc::new(SourceTable::new("lab", "sqlserver", "lab", "dbo", "result")),
            [Arc::from("id")].into(),
        )
    }

    #[test]
    fn update_pairs_become_one_update_with_both_images() {
        let (table, key) = table();
        let rows = vec![
            row(10, 1, 2, 1, "a"),
            row(10, 2, 3, 1, "a"),
            row(10, 2, 4, 1, "b"),
            row(12, 1, 1, 1, "b"),
        ];
        let mut changes = changes(&table, &key, rows).unwrap();
        number(&mut changes);
        let ops: Vec<_> = changes.iter().map(|c| (c.op, c.ordinal)).collect();
        assert_eq!(
            ops,
            [
                (Operation::Insert, 0),
                (Operation::Update, 1),
                (Operation::Delete, 0)
            ]
        );
        let update = &changes[1];
        assert_eq!(
            update.before.as_ref().unwrap().get("value"),
            Some(&Value::Text("a".into()))
        );
        assert_eq!(
            update.after.as_ref().unwrap().get("value"),
            Some(&Value::Text("b".into()))
        );
        assert_eq!(
            update.position,
            Position::SqlServer(ChangeLsn {
                commit: lsn(10),
                seqval: lsn(2),
                step: 0
            })
        );
        assert!(changes[2].after.is_none() && changes[2].before.is_some());
    }

    #[test]
    fn a_deferred_update_is_one_update_unless_its_key_changed() {
        let (table, key) = table();
        let same_key = vec![row(10, 2, 1, 1, "a"), row(10, 2, 2, 1, "b")];
        let changes = changes(&table, &key, same_key).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].op, Operation::Update);
        let new_key = vec![row(10, 2, 1, 1, "a"), row(10, 2, 2, 2, "a")];
        let ops: Vec<_> = changes_of(&table, &key, new_key);
        assert_eq!(ops, [Operation::Delete, Operation::Insert]);
    }

    fn changes_of(table: &Arc<SourceTable>, key: &Names, rows: Vec<ChangeRow>) -> Vec<Operation> {
        changes(table, key, rows)
            .unwrap()
            .iter()
            .map(|c| c.op)
            .collect()
    }

    #[test]
    fn broken_pairs_and_unknown_operations_are_errors_naming_the_place() {
        let (table, key) = table();
        let err = changes(
            &table,
            &key,
            vec![row(10, 2, 3, 1, "a"), row(11, 1, 2, 2, "x")],
        )
        .unwrap_err();
        assert!(
            matches!(err, RowsError::Unpaired { missing: "new", .. }),
            "{err}"
        );
        let err = changes(&table, &key, vec![row(10, 2, 4, 1, "a")]).unwrap_err();
        assert!(
            matches!(err, RowsError::Unpaired { missing: "old", .. }),
            "{err}"
        );
        let err = changes(&table, &key, vec![row(10, 2, 5, 1, "a")]).unwrap_err();
        assert!(err.to_string().contains("operation 5 at"), "{err}");
    }

    fn instance(name: &str, start: u64, day: u32) -> Instance {
        Instance {
            name: name.into(),
            start: lsn(start),
            created: NaiveDate::from_ymd_opt(2026, 1, day)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap(),
        }
    }

    #[test]
    fn the_older_instance_is_read_up_to_the_newer_ones_start() {
        let both = [
            instance("dbo_result_v2", 50, 2),
            instance("dbo_result", 10, 1),
        ];
        assert_eq!(
            reads(&both, lsn(20), lsn(80)),
            [
                (1, lsn(20), previous(lsn(50)).unwrap()),
                (0, lsn(50), lsn(80))
            ]
        );
        assert_eq!(reads(&both, lsn(20), lsn(40)), [(1, lsn(20), lsn(40))]);
        assert_eq!(reads(&both, lsn(60), lsn(80)), [(0, lsn(60), lsn(80))]);
        // A single instance is not asked for LSNs before its start.
        assert_eq!(reads(&both[1..], lsn(0), lsn(9)), []);
        assert_eq!(reads(&both[1..], lsn(0), lsn(30)), [(0, lsn(10), lsn(30))]);
    }

    #[test]
    fn a_cleaned_up_range_is_found() {
        let one = [instance("dbo_result", 100, 1)];
        assert_eq!(cleaned_up(&one, lsn(50)), Some(lsn(100)));
        assert_eq!(cleaned_up(&one, lsn(100)), None);
        assert_eq!(cleaned_up(&[], lsn(50)), None);
    }

    proptest! {
        /// However the window and the instances' starts fall, the reads cover every LSN of
        /// the window that some instance holds, once, each by the newest instance started.
        #[test]
        fn instance_reads_cover_the_window_once(
            from in 0u64..200, len in 0u64..200, s1 in 0u64..300, gap in 0u64..300,
        ) {
            let instances = [instance("old", s1, 1), instance("new", s1 + gap, 2)];
            let to = from + len;
            let reads = reads(&instances, lsn(from), lsn(to));
            for n in from..=to {
                let covering: Vec<usize> = reads
                    .iter()
                    .filter(|(_, lo, hi)| *lo <= lsn(n) && lsn(n) <= *hi)
                    .map(|(i, ..)| *i)
                    .collect();
                let expected: Vec<usize> = if n >= s1 + gap {
                    vec![1]
                } else if n >= s1 {
                    vec![0]
                } else {
                    vec![]
                };
                prop_assert_eq!(covering, expected, "LSN {}", n);
            }
        }

        #[test]
        fn the_lsn_before_is_the_one_whose_next_is_it(vlf: u32, block: u32, record: u16) {
            let at = Lsn { vlf, block, record };
            match previous(at) {
                Some(before) => prop_assert_eq!(before.next(), at),
                None => prop_assert_eq!(at, Lsn::default()),
            }
        }
    }
}
