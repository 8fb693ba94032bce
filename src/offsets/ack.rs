//! Which source position is safe to acknowledge.
//!
//! The contract: a position is acknowledged to the database only once every event at or
//! before it is durable in Kafka. The source hands over, in log order, the events each
//! change at a position produced, then marks the position complete once nothing more can
//! come at it (the transaction's commit was read; the snapshot was read to its end). A
//! complete position with no events is progress (a heartbeat, a transaction on unmapped
//! tables): it still advances, so WAL is not retained for nothing. The safe position is the
//! highest complete position with no unacknowledged event at or before it.
//!
//! Completeness matters because a transaction's changes share its commit position: were
//! the first change's event acknowledged before the second change is read, the position
//! would look done while the second change is still unwritten.
//!
//! Kafka acknowledges in any order across partitions, so acknowledgements may arrive out of
//! order; a later position is never safe while an earlier one is still pending.

use std::collections::BTreeMap;

/// Tracks positions in flight (see the module docs).
#[derive(Debug, Clone)]
pub struct AckTracker<P> {
    /// Positions handed over and not yet safe: unacknowledged events, and whether the
    /// position is complete.
    pending: BTreeMap<P, (usize, bool)>,
    safe: Option<P>,
}

impl<P: Ord + Clone> Default for AckTracker<P> {
    fn default() -> Self {
        Self {
            pending: BTreeMap::new(),
            safe: None,
        }
    }
}

impl<P: Ord + Clone + std::fmt::Debug> AckTracker<P> {
    /// `events` more events (possibly none) were produced at `position`, which is at or
    /// after every position tracked before.
    pub fn track(&mut self, position: P, events: usize) {
        debug_assert!(
            self.pending
                .keys()
                .next_back()
                .is_none_or(|last| *last <= position),
            "positions go forward"
        );
        self.pending.entry(position).or_insert((0, false)).0 += events;
    }

    /// Nothing more will be produced at `position`.
    pub fn complete(&mut self, position: P) {
        self.pending.entry(position).or_insert((0, false)).1 = true;
        self.advance();
    }

    /// One event at `position` is durable.
    ///
    /// # Panics
    /// When no event at `position` is outstanding: a double acknowledgement is a bug that
    /// would move the safe position past an event not yet durable.
    pub fn acknowledge(&mut self, position: &P) {
        let outstanding = self
            .pending
            .get_mut(position)
            .map(|(n, _)| n)
            .filter(|n| **n > 0)
            .unwrap_or_else(|| {
                panic!("acknowledged an event at {position:?} that is not outstanding")
            });
        *outstanding -= 1;
        self.advance();
    }

    /// The highest position whose events, and all events before it, are durable.
    pub fn safe(&self) -> Option<&P> {
        self.safe.as_ref()
    }

    /// Events produced and not yet durable.
    pub fn in_flight(&self) -> usize {
        self.pending.values().map(|(n, _)| n).sum()
    }

    fn advance(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.get() != (0, true) {
                break;
            }
            self.safe = Some(entry.remove_entry().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn progress_without_events_is_safe_at_once_unless_something_before_is_pending() {
        let mut t = AckTracker::default();
        t.complete(10);
        assert_eq!(t.safe(), Some(&10));
        t.track(20, 2);
        t.complete(20);
        t.complete(30);
        assert_eq!(t.safe(), Some(&10), "30 waits for 20");
        t.acknowledge(&20);
        assert_eq!(t.safe(), Some(&10));
        t.acknowledge(&20);
        assert_eq!(t.safe(), Some(&30));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_transaction_is_not_safe_before_its_commit_was_read() {
        let mut t = AckTracker::default();
        t.track(40, 1);
        t.acknowledge(&40);
        assert_eq!(t.safe(), None, "a second change at 40 may still come");
        t.track(40, 1);
        t.complete(40);
        assert_eq!(t.safe(), None);
        t.acknowledge(&40);
        assert_eq!(t.safe(), Some(&40));
    }

    #[test]
    #[should_panic(expected = "not outstanding")]
    fn a_double_acknowledgement_is_a_bug() {
        let mut t = AckTracker::default();
        t.track(1, 1);
        t.complete(1);
        t.acknowledge(&1);
        t.acknowledge(&1);
    }

    proptest! {
        /// Whatever order acknowledgements arrive in, the safe position never passes an
        /// event that is not yet durable, and reaches the last position once all are.
        #[test]
        fn safe_never_passes_a_pending_event(
            counts in proptest::collection::vec(0usize..4, 1..40),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..200),
        ) {
            let mut t = AckTracker::default();
            let mut outstanding: Vec<u64> = Vec::new();
            for (position, count) in counts.iter().enumerate() {
                t.track(position as u64, *count);
                t.complete(position as u64);
                outstanding.extend(std::iter::repeat_n(position as u64, *count));
            }
            for pick in order {
                if outstanding.is_empty() {
                    break;
                }
                let position = outstanding.swap_remove(pick.index(outstanding.len()));
                t.acknowledge(&position);
                if let (Some(safe), Some(first_pending)) = (t.safe(), outstanding.iter().min()) {
                    prop_assert!(safe < first_pending, "safe {safe} passed pending {first_pending}");
                }
            }
            while let Some(position) = outstanding.pop() {
                t.acknowledge(&position);
            }
            prop_assert_eq!(t.safe(), Some(&(counts.len() as u64 - 1)));
        }
    }
}
