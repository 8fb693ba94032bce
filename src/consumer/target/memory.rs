//! An in-memory target, for the runtime's own tests: a ledger of applied event ids and the
//! offsets, committed together under one lock — the contract of a real target without a
//! database — shareable by the members of one group, with the faults a test needs (a
//! crash between apply and commit, a pause in which the group rebalances, events it
//! refuses).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use crate::consumer::{
    events::{Coordinates, Entry, TopicCounts},
    projector::Project,
    runtime::{ConsumerError, DeadLetters, Partition, Refused, Target},
};

/// What the target holds: everything committed, nothing else.
#[derive(Debug, Default)]
pub struct Store {
    /// Per consumer group and partition, the next offset.
    pub offsets: HashMap<(String, Partition), i64>,
    /// The event ids applied, in the order they were, with where each was read.
    pub applied: Vec<(String, Coordinates)>,
    /// Events read again (a crash, a rebalance) and recognized by their id.
    pub duplicates: u64,
    /// Batches committed.
    pub commits: u64,
    /// The ids of `applied`: the ledger a commit looks repeats up in.
    ledger: HashSet<String>,
}

impl Store {
    /// Move `group`'s next offset of `partition` to `offset`, never back.
    fn advance(&mut self, group: &str, partition: &Partition, offset: i64) {
        let next = self
            .offsets
            .entry((group.to_owned(), partition.clone()))
            .or_insert(offset);
        *next = (*next).max(offset);
    }
}

/// A target in memory. Clones share the store: give each member of a group one.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    store: Arc<Mutex<Store>>,
    /// Resource ids it refuses (their events become dead letters).
    refuse: HashSet<String>,
    /// Fail the commit of this batch (counted from 1 in this clone), after applying it and
    /// sending its dead letters, before anything is committed: a crash at that point.
    crash_at: Option<u64>,
    /// Wait this long between applying a batch and committing it.
    pause: Duration,
    /// Batches this clone was given.
    given: u64,
}

impl Memory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Refuse the events of these resource ids.
    #[must_use]
    pub fn refusing(mut self, resource_ids: impl IntoIterator<Item = String>) -> Self {
        self.refuse.extend(resource_ids);
        self
    }

    /// Crash between applying and committing the `batch`-th batch this clone is given.
    #[must_use]
    pub fn crashing_at(mut self, batch: u64) -> Self {
        self.crash_at = Some(batch);
        self
    }

    /// Pause this long between applying and committing each batch.
    #[must_use]
    pub fn pausing(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// What is committed.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Target<Project> for Memory {
    async fn offsets(
        &mut self,
        group: &str,
        partitions: &[Partition],
    ) -> Result<HashMap<Partition, i64>, ConsumerError> {
        let store = self.store();
        Ok(partitions
            .iter()
            .filter_map(|p| {
                store
                    .offsets
                    .get(&(group.to_owned(), p.clone()))
                    .map(|o| (p.clone(), *o))
            })
            .collect())
    }

    async fn start(
        &mut self,
        group: &str,
        partition: &Partition,
        offset: i64,
    ) -> Result<(), ConsumerError> {
        self.store().advance(group, partition, offset);
        Ok(())
    }

    async fn forget(&mut self, group: &str) -> Result<(), ConsumerError> {
        self.store().offsets.retain(|(g, _), _| g != group);
        Ok(())
    }

    async fn commit<'a>(
        &mut self,
        group: &str,
        outputs: Vec<(usize, Entry<'a>)>,
        ends: &HashMap<Partition, i64>,
        letters: &mut impl DeadLetters,
    ) -> Result<TopicCounts, ConsumerError>
    where
        // Early-bound, as in the trait (where the lifetime is in a projection).
        'a: 'a,
    {
        self.given += 1;
        let (accepted, refused): (Vec<_>, Vec<_>) = outputs
            .into_iter()
            .partition(|(_, e)| !self.refuse.contains(&e.event.event().resource_id));
        letters
            .send(
                refused
                    .into_iter()
                    .map(|(index, _)| Refused {
                        index,
                        reason: "the in-memory target refuses this resource".to_owned(),
                        logged: "refused by the in-memory target".to_owned(),
                    })
                    .collect(),
            )
            .await?;
        tokio::time::sleep(self.pause).await;
        if self.crash_at == Some(self.given) {
            return Err(ConsumerError::Setup(
                "the in-memory target crashed between apply and commit".to_owned(),
            ));
        }
        let mut store = self.store();
        let mut counts = TopicCounts::new();
        for (_, entry) in accepted {
            let counts = counts.entry(entry.at.topic.clone()).or_default();
            let id = &entry.event.event().event_id;
            if store.ledger.insert(id.clone()) {
                store.applied.push((id.clone(), entry.at.clone()));
                counts.applied += 1;
            } else {
                store.duplicates += 1;
                counts.duplicate += 1;
            }
        }
        for (partition, end) in ends {
            store.advance(group, partition, *end);
        }
        store.commits += 1;
        Ok(counts)
    }
}
