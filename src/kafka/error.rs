//! What went wrong with Kafka, and what the caller can do about it ([`ErrorKind`]).

use rdkafka::{error::KafkaError, types::RDKafkaErrorCode};

/// What a caller can do about a Kafka error; the error policy reads this, never the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Trying the same again later may succeed: the cluster unreachable, a timeout, a
    /// message not acknowledged in time.
    Transient,
    /// The open transaction cannot commit: abort it, then send its messages again in a new
    /// one (nothing of it is visible to a `read_committed` reader).
    Abortable,
    /// This producer can go no further (librdkafka's fatal errors): a new one may.
    Fatal,
    /// Another producer with the same `transactional.id` took over: this one must stop,
    /// since two copies of one connector would write each other's transactions.
    Fenced,
    /// The configuration, a topic's settings or the cluster's refusal: it stays so until
    /// someone changes it.
    Configuration,
}

/// Why a Kafka client failed. Messages name the property, topic or transaction and the fix;
/// never a property's value that may be secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("[kafka] {property} = {value}: fhir-cdc requires {required} ({why})")]
    Required {
        property: &'static str,
        value: String,
        required: &'static str,
        why: &'static str,
    },
    #[error("librdkafka refused the [kafka] properties: {0}")]
    Config(String),
    #[error("creating topic {topic} failed: {reason}")]
    Topic { topic: String, reason: String },
    #[error("Kafka did not acknowledge a message: {0}")]
    Delivery(String),
    #[error("Kafka refused a message as too large ({0}): the broker takes less than the topic's max.message.bytes said; raise it on the topic")]
    TooLarge(String),
    #[error("cannot create a Kafka {role}: {reason}")]
    Create { role: &'static str, reason: String },
    /// A client's request failed: `doing` names it (reading the cluster's topics, the
    /// offsets of a partition, a message).
    #[error("{doing}: {source}")]
    Client {
        doing: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("{what} (transactional.id {id}): {reason}")]
    Transaction {
        /// The step that failed: `starting transactions`, `committing the transaction`, …
        what: &'static str,
        id: String,
        kind: ErrorKind,
        reason: String,
    },
}

impl Error {
    /// The error of a message librdkafka refused or Kafka did not acknowledge.
    pub(super) fn of_message(error: &KafkaError) -> Self {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => Error::TooLarge(error.to_string()),
            _ => Error::Delivery(error.to_string()),
        }
    }

    /// `source` while `doing`.
    pub fn client(doing: impl Into<String>, source: KafkaError) -> Self {
        Error::Client {
            doing: doing.into(),
            source: Box::new(source),
        }
    }

    /// What the caller can do about it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Delivery(_) => ErrorKind::Transient,
            Error::Topic { topic, .. } if topic == ALL_TOPICS => ErrorKind::Transient,
            Error::Transaction { kind, .. } => *kind,
            Error::Client { source, .. } => match crate::error::Kinded::kind(&**source) {
                crate::error::Kind::Configuration => ErrorKind::Configuration,
                _ => ErrorKind::Transient,
            },
            Error::Topic { .. }
            | Error::Required { .. }
            | Error::Config(_)
            | Error::Create { .. }
            | Error::TooLarge(_) => ErrorKind::Configuration,
        }
    }

    /// Whether trying again later may succeed: the cluster was unreachable or did not
    /// acknowledge in time (a topic Kafka refused, or properties librdkafka refused, stay
    /// refused).
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }
}

/// For the error policy: an abortable transaction is tried again in a new one, and a
/// fatal producer is replaced by a new one (a restart), so both may pass.
impl crate::error::Kinded for Error {
    fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match Error::kind(self) {
            ErrorKind::Transient | ErrorKind::Abortable | ErrorKind::Fatal => Kind::Transient,
            ErrorKind::Fenced => Kind::Fenced,
            ErrorKind::Configuration => Kind::Configuration,
        }
    }
}

/// A client's own error: its configuration refused, or the cluster (which may pass).
impl crate::error::Kinded for KafkaError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => {
                crate::error::Kind::Configuration
            }
            _ => crate::error::Kind::Transient,
        }
    }
}

impl From<Error> for crate::error::Error {
    fn from(e: Error) -> Self {
        crate::error::Error::bare(e)
    }
}

/// The "topic" of a topic-creation request that failed as a whole (no answer from the
/// cluster), rather than for one topic.
pub(super) const ALL_TOPICS: &str = "(all)";

/// Sort a transactional producer's error by what librdkafka says of it: fenced first (a
/// fenced producer's errors are also fatal, and the difference matters to the operator),
/// then fatal, then abortable, then retriable; anything else stays as it is until someone
/// looks, like a configuration error.
pub(super) fn transaction_kind(
    code: RDKafkaErrorCode,
    fatal: bool,
    abortable: bool,
    retriable: bool,
) -> ErrorKind {
    let fenced = matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::InvalidProducerIdMapping
    );
    if fenced {
        ErrorKind::Fenced
    } else if fatal {
        ErrorKind::Fatal
    } else if abortable {
        ErrorKind::Abortable
    } else if retriable
        || matches!(
            code,
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
        )
    {
        ErrorKind::Transient
    } else {
        ErrorKind::Configuration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_errors_are_sorted_fenced_fatal_abortable_retriable() {
        use RDKafkaErrorCode as C;
        // librdkafka marks a fenced producer's errors fatal too: fenced wins.
        assert_eq!(
            transaction_kind(C::Fenced, true, false, false),
            ErrorKind::Fenced
        );
        assert_eq!(
            transaction_kind(C::ProducerFenced, true, false, false),
            ErrorKind::Fenced
        );
        assert_eq!(
            transaction_kind(C::InvalidProducerEpoch, false, true, false),
            ErrorKind::Fenced
        );
        assert_eq!(
            transaction_kind(C::OutOfOrderSequenceNumber, true, false, false),
            ErrorKind::Fatal
        );
        // A message that failed in the transaction: abort, send again.
        assert_eq!(
            transaction_kind(C::MessageTimedOut, false, true, true),
            ErrorKind::Abortable
        );
        assert_eq!(
            transaction_kind(C::CoordinatorLoadInProgress, false, false, true),
            ErrorKind::Transient
        );
        assert_eq!(
            transaction_kind(C::RequestTimedOut, false, false, false),
            ErrorKind::Transient
        );
        assert_eq!(
            transaction_kind(C::TransactionalIdAuthorizationFailed, false, false, false),
            ErrorKind::Configuration
        );
    }

    #[test]
    fn the_kinds_of_the_other_errors() {
        assert!(Error::Delivery("timed out".into()).is_transient());
        let whole = Error::Topic {
            topic: ALL_TOPICS.into(),
            reason: "no broker".into(),
        };
        assert!(whole.is_transient());
        let one = Error::Topic {
            topic: "fhir.lab.Observation".into(),
            reason: "policy".into(),
        };
        assert_eq!(one.kind(), ErrorKind::Configuration);
        assert_eq!(
            Error::TooLarge("2 MB".into()).kind(),
            ErrorKind::Configuration
        );
    }
}
