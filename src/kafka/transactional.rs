//! The transactional producer: messages, and the input offsets they were made from, written
//! together or not at all — a `read_committed` reader sees a transaction whole once it
//! commits and never sees one that aborted (KIP-98; librdkafka's transactional API).
//!
//! One `transactional.id` names one writer: [`TransactionalProducer::new`] fences any
//! earlier producer with the same id (its open transaction is aborted, its next call fails
//! as [`ErrorKind::Fenced`]). A transaction opens with its first message or offsets, so an
//! empty one is never sent. librdkafka's transactional calls block; they run on tokio's
//! blocking threads.

use std::time::Duration;

use rdkafka::{
    consumer::ConsumerGroupMetadata,
    error::KafkaError,
    producer::{FutureProducer, FutureRecord, Producer},
    types::RDKafkaErrorCode,
    TopicPartitionList,
};

use super::{
    admin::creation_message, config::transactional_config, error::transaction_kind,
    producer::owned_headers, Error, ErrorKind,
};
use crate::config::KafkaProperties;

/// How long a transactional call (start, commit, abort, offsets) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A producer whose messages become visible in transactions.
pub struct TransactionalProducer {
    inner: FutureProducer,
    id: String,
    /// Whether a transaction is open: begun by the first message or offsets since the
    /// last commit or abort.
    open: bool,
}

impl std::fmt::Debug for TransactionalProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalProducer")
            .field("id", &self.id)
            .field("open", &self.open)
            .finish_non_exhaustive()
    }
}

impl TransactionalProducer {
    /// A producer writing as `id`, ready for transactions: the earlier producer with the
    /// same id, if any, is fenced, and the transaction it left open is aborted.
    pub async fn new(properties: &KafkaProperties, id: &str) -> Result<Self, Error> {
        let inner: FutureProducer = transactional_config(properties, id)?
            .create()
            .map_err(|e| Error::Config(creation_message(&e)))?;
        let producer = Self {
            inner,
            id: id.to_owned(),
            open: false,
        };
        producer
            .call("starting transactions", |p| {
                p.init_transactions(CALL_TIMEOUT)
            })
            .await?;
        Ok(producer)
    }

    /// The `transactional.id` this producer writes as.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether a transaction is open.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Queue one message in the open transaction (opening one if none is). It becomes
    /// visible when the transaction commits; waits while librdkafka's queue is full.
    pub async fn send(
        &mut self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), Error> {
        self.begin()?;
        let mut record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(owned_headers(headers));
        loop {
            match self.inner.send_result(record) {
                // The commit flushes every message and fails if one failed: the delivery
                // itself need not be awaited.
                Ok(_delivery) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((error, _)) => return Err(self.sorted("sending a message", &error)),
            }
        }
    }

    /// Commit the consumer group's `offsets` (the next offsets to read, per partition) with
    /// the open transaction: the input counts as consumed exactly when the output is written.
    pub async fn send_offsets(
        &mut self,
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<(), Error> {
        self.begin()?;
        self.call("sending the consumed offsets", move |p| {
            p.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)
        })
        .await
    }

    /// Commit the open transaction: every message in it is written and visible, with its
    /// offsets. Returns whether there was one (an empty transaction is not sent). On an
    /// [`ErrorKind::Abortable`] error, [`Self::abort`] and send it all again.
    pub async fn commit(&mut self) -> Result<bool, Error> {
        if !self.open {
            return Ok(false);
        }
        self.call("committing the transaction", |p| {
            p.commit_transaction(CALL_TIMEOUT)
        })
        .await?;
        self.open = false;
        Ok(true)
    }

    /// Abort the open transaction, if any: nothing of it becomes visible to a
    /// `read_committed` reader, and its offsets are not committed.
    pub async fn abort(&mut self) -> Result<(), Error> {
        if !self.open {
            return Ok(());
        }
        self.call("aborting the transaction", |p| {
            p.abort_transaction(CALL_TIMEOUT)
        })
        .await?;
        self.open = false;
        Ok(())
    }

    fn begin(&mut self) -> Result<(), Error> {
        if !self.open {
            self.inner
                .begin_transaction()
                .map_err(|e| self.sorted("beginning a transaction", &e))?;
            self.open = true;
        }
        Ok(())
    }

    /// Run a blocking transactional call on a blocking thread.
    async fn call(
        &self,
        what: &'static str,
        call: impl FnOnce(&FutureProducer) -> Result<(), KafkaError> + Send + 'static,
    ) -> Result<(), Error> {
        let producer = self.inner.clone();
        let done = tokio::task::spawn_blocking(move || call(&producer)).await;
        match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(self.sorted(what, &error)),
            Err(e) => Err(Error::Transaction {
                what,
                id: self.id.clone(),
                kind: ErrorKind::Fatal,
                reason: format!("the call failed: {e}"),
            }),
        }
    }

    /// `error`, from `what`, with its kind; a fenced producer says what to do about it.
    fn sorted(&self, what: &'static str, error: &KafkaError) -> Error {
        let kind = match error {
            KafkaError::Transaction(e) => transaction_kind(
                e.code(),
                e.is_fatal(),
                e.txn_requires_abort(),
                e.is_retriable(),
            ),
            other => other.rdkafka_error_code().map_or(ErrorKind::Fatal, |code| {
                transaction_kind(code, false, false, false)
            }),
        };
        let reason = match kind {
            ErrorKind::Fenced => format!(
                "another producer with this transactional.id took over ({error}): this one stops, since two copies of one writer would undo each other's work; stop the other copy, or give each its own name"
            ),
            _ => error.to_string(),
        };
        Error::Transaction {
            what,
            id: self.id.clone(),
            kind,
            reason,
        }
    }
}
