//! The PostgreSQL read model as a target (`super::super::projection` is its schema and
//! statements): a batch is one database transaction — the rows, the history (the ledger of
//! applied event ids) and the consumed offsets commit together, so a crash at any point
//! leaves either all of a batch or none of it. With `connections` above 1, a big batch is
//! split over that many transactions, the offsets committed last with the first (see
//! [`Postgres`]'s `commit`).

use std::collections::HashMap;

use tokio_postgres::Transaction;
use tracing::debug;

use crate::{
    consumer::{
        events::{Entry, TopicCounts},
        projection::{self, Statements},
        projector::Project,
        runtime::{ConsumerError, DeadLetters, Partition, Refused, Target},
        ProjectionConfig,
    },
    postgres,
};

/// Where a failure of this target happened, for its message.
const PLACE: &str = "the projection database";

impl From<tokio_postgres::Error> for ConsumerError {
    fn from(e: tokio_postgres::Error) -> Self {
        ConsumerError::Target {
            place: PLACE,
            source: Box::new(e),
        }
    }
}

impl From<postgres::ConnectError> for ConsumerError {
    fn from(e: postgres::ConnectError) -> Self {
        ConsumerError::Target {
            place: PLACE,
            source: Box::new(e),
        }
    }
}

/// Events per part, at least, before a batch is split over the writers.
const MIN_PART: usize = 50;

/// The read model in `schema` of a PostgreSQL database, written on one or more connections.
#[derive(Debug)]
pub struct Postgres {
    schema: String,
    writers: Vec<Writer>,
}

/// A connection batches are written on, with the statements prepared on it.
#[derive(Debug)]
struct Writer {
    client: tokio_postgres::Client,
    statements: Statements,
}

impl Writer {
    async fn new(client: tokio_postgres::Client, schema: &str) -> Result<Self, ConsumerError> {
        let statements = projection::prepare(&client, schema).await?;
        Ok(Writer { client, statements })
    }
}

impl Postgres {
    /// Connect as `config` says, the schema migrated first.
    pub async fn connect(config: &ProjectionConfig) -> Result<Self, ConsumerError> {
        let schema = &config.schema;
        let mut db = postgres::connect(&config.url).await?;
        projection::migrate(&mut db, schema).await?;
        let mut writers = vec![Writer::new(db, schema).await?];
        for _ in 1..config.connections {
            let client = postgres::connect(&config.url).await?;
            writers.push(Writer::new(client, schema).await?);
        }
        Ok(Postgres {
            schema: schema.clone(),
            writers,
        })
    }

    fn client(&self) -> &tokio_postgres::Client {
        &self.writers[0].client
    }
}

impl Target<Project> for Postgres {
    async fn offsets(
        &mut self,
        group: &str,
        partitions: &[Partition],
    ) -> Result<HashMap<Partition, i64>, ConsumerError> {
        Ok(projection::stored_offsets(self.client(), &self.schema, group, partitions).await?)
    }

    async fn start(
        &mut self,
        group: &str,
        (topic, partition): &Partition,
        offset: i64,
    ) -> Result<(), ConsumerError> {
        Ok(projection::store_offset(
            self.client(),
            &self.schema,
            group,
            topic,
            *partition,
            offset,
        )
        .await?)
    }

    async fn forget(&mut self, group: &str) -> Result<(), ConsumerError> {
        Ok(projection::forget_offsets(self.client(), &self.schema, group).await?)
    }

    /// A batch of at least twice `MIN_PART` events is split by resource over the writers
    /// (a resource's events stay in one part, in order), each part applied in a
    /// transaction of its own connection, all at once. The offsets go into the first
    /// writer's transaction, which commits last: a crash before it leaves the offsets where
    /// they were, and the events of parts that did commit are read again and recognized by
    /// the ledger as duplicates.
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
        // Splitting pays only when there is much to write: the small batches of a quiet
        // stream stay on one connection (fewer round trips, less contention, lower latency).
        let split = self.writers.len().min(outputs.len() / MIN_PART).max(1);
        let mut parts: Vec<Vec<(usize, Entry<'_>)>> = (0..split).map(|_| Vec::new()).collect();
        for (i, entry) in outputs {
            parts[entry.event.part(split)].push((i, entry));
        }
        let applied = futures_util::future::try_join_all(
            self.writers
                .iter_mut()
                .zip(&parts)
                .map(|(writer, part)| apply_part(writer, part)),
        )
        .await?;
        let mut counts = TopicCounts::new();
        let mut refused = Vec::new();
        let mut transactions = Vec::with_capacity(applied.len());
        for (tx, part_counts, part_refused) in applied {
            for (topic, one) in part_counts {
                *counts.entry(topic).or_default() += one;
            }
            refused.extend(part_refused);
            transactions.push(tx);
        }
        letters.send(refused).await?;
        let mut transactions = transactions.into_iter();
        let Some(first) = transactions.next() else {
            unreachable!("a target has at least one writer");
        };
        for ((topic, partition), end) in ends {
            projection::store_offset(&first, &self.schema, group, topic, *partition, *end).await?;
        }
        for tx in transactions {
            tx.commit().await?;
        }
        first.commit().await?;
        Ok(counts)
    }
}

/// Apply `entries` in a transaction of `writer`, left open: in one statement, or, should the
/// database refuse it, event by event under savepoints, so that only what it refuses is
/// set aside. A refusal that says nothing about an event (a deadlock, a timeout, a server
/// short of resources, a lost connection) fails the batch instead.
async fn apply_part<'c>(
    writer: &'c mut Writer,
    entries: &[(usize, Entry<'_>)],
) -> Result<(Transaction<'c>, TopicCounts, Vec<Refused>), ConsumerError> {
    let Writer { client, statements } = writer;
    let mut tx = client.transaction().await?;
    let mut counts = TopicCounts::new();
    let mut refused = Vec::new();
    if entries.is_empty() {
        return Ok((tx, counts, refused));
    }
    let all: Vec<Entry<'_>> = entries.iter().map(|(_, e)| *e).collect();
    // Under a savepoint, not a transaction of its own: the transaction must outlive a
    // refusal, to be tried again event by event.
    let whole = tx.savepoint("batch").await?;
    match projection::apply(&whole, &statements.batch, &all).await {
        Ok(applied) => {
            whole.commit().await?;
            return Ok((tx, applied, refused));
        }
        Err(e) => {
            debug!(sqlstate = ?e.code().map(|c| c.code()), "the batch was refused; applying it event by event");
            whole.rollback().await?;
        }
    }
    for (i, entry) in entries {
        let savepoint = tx.savepoint("event").await?;
        match projection::apply(&savepoint, &statements.one, &[*entry]).await {
            Ok(one) => {
                savepoint.commit().await?;
                for (topic, one) in one {
                    *counts.entry(topic).or_default() += one;
                }
            }
            Err(e) if transient(&e) => return Err(e.into()),
            Err(e) => {
                savepoint.rollback().await?;
                let (message, code) = e.as_db_error().map_or_else(
                    || (e.to_string(), "unknown".to_owned()),
                    |db| (db.message().to_owned(), db.code().code().to_owned()),
                );
                refused.push(Refused {
                    index: *i,
                    reason: format!("the database refused it: {message}"),
                    logged: format!("the database refused it (SQLSTATE {code})"),
                });
            }
        }
    }
    Ok((tx, counts, refused))
}

/// Whether the database refused for a reason of its own that may pass: a serialization
/// failure or deadlock, a lock or statement timeout, a lack of resources, a lost connection.
fn transient(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_some_and(|code| {
            let code = code.code();
            matches!(code, "40001" | "40P01" | "55P03" | "57014")
                || code.starts_with("53")
                || code.starts_with("08")
        })
}
