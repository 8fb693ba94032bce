//! The `[kafka]` properties, as each role's client takes them: what fhir-cdc insists on
//! for a producer (and why), its defaults, a transactional producer's timeouts, a reader's
//! isolation. The properties themselves are the configuration file's
//! ([`crate::config::KafkaProperties`]).

use rdkafka::ClientConfig;

use super::Error;
use crate::config::KafkaProperties;

/// Properties fhir-cdc insists on, and why: without them a retry could duplicate or
/// reorder events, or an acknowledgement could precede durability.
const REQUIRED: [(&str, &str, &str); 2] = [
    (
        "enable.idempotence",
        "true",
        "retries must not duplicate or reorder events",
    ),
    (
        "acks",
        "all",
        "an event counts as written only once every in-sync replica has it",
    ),
];

/// Defaults for what the configuration leaves unset. `linger.ms`: librdkafka's 5 ms makes
/// small requests, and with idempotence only five may be in flight to a partition; when
/// five are and the next batch is due, librdkafka's broker thread polls its socket with no
/// timeout until one returns — 8,000 to 45,000 polls a second under the benchmark's
/// backlog, a fifth of fhir-cdc's CPU. At 10 ms it polls a few hundred times a second (at
/// 20 ms hardly fewer, and every change waits 10 ms more).
///
/// `message.timeout.ms`: librdkafka's 300 s is how long a message may wait unacknowledged
/// (once, after the test broker was frozen for 30 s and thawed — the partition's leader
/// briefly unknown — messages stayed unacknowledged for over three minutes with nothing
/// logged); at 120 s, the Java producer's `delivery.timeout.ms`, such a wait ends sooner as
/// a delivery failure, which restarts capture from the stored state with a fresh producer:
/// a logged delay, nothing lost.
const DEFAULTS: [(&str, &str); 3] = [
    ("compression.type", "lz4"),
    ("linger.ms", "10"),
    ("message.timeout.ms", "120000"),
];

/// A producer configuration: the configured properties, fhir-cdc's required ones (a
/// conflicting value is an error, not silently overridden), and defaults.
pub fn producer_config(properties: &KafkaProperties) -> Result<ClientConfig, Error> {
    let mut config = properties.client_config();
    for (property, required, why) in REQUIRED {
        // `acks = -1` is librdkafka's other spelling of `all`.
        let accepted = |value: &str| {
            value.eq_ignore_ascii_case(required) || (property == "acks" && value == "-1")
        };
        match properties.get(property) {
            Some(value) if !accepted(value) => {
                return Err(Error::Required {
                    property,
                    value: value.to_owned(),
                    required,
                    why,
                })
            }
            _ => {
                config.set(property, required);
            }
        }
    }
    for (property, value) in DEFAULTS {
        if properties.get(property).is_none() {
            config.set(property, value);
        }
    }
    Ok(config)
}

/// How long a transaction may stay open before the broker aborts it, unless configured:
/// the Java producer's default.
const TRANSACTION_TIMEOUT_MS: u64 = 60_000;

/// A transactional producer's configuration: a producer's (see [`producer_config`]) with
/// `transactional.id = id`, and `message.timeout.ms` below `transaction.timeout.ms`, as
/// librdkafka requires (unset, nine tenths of it: a message that cannot be delivered fails
/// its transaction before the broker aborts it).
pub fn transactional_config(properties: &KafkaProperties, id: &str) -> Result<ClientConfig, Error> {
    let mut config = producer_config(properties)?;
    let number = |property: &'static str| -> Result<Option<u64>, Error> {
        properties
            .get(property)
            .map(|value| {
                value.parse().map_err(|_| {
                    Error::Config(format!("{property} = {value}: a number of milliseconds"))
                })
            })
            .transpose()
    };
    let transaction = number("transaction.timeout.ms")?.unwrap_or(TRANSACTION_TIMEOUT_MS);
    let message = match number("message.timeout.ms")? {
        Some(message) if message >= transaction => {
            return Err(Error::Config(format!(
                "message.timeout.ms = {message} must be below transaction.timeout.ms = {transaction}: a message must fail before its transaction does"
            )))
        }
        Some(message) => message,
        None => transaction / 10 * 9,
    };
    config
        .set("transactional.id", id)
        .set("transaction.timeout.ms", transaction.to_string())
        .set("message.timeout.ms", message.to_string());
    Ok(config)
}

/// The prefix of the group id readers use (librdkafka needs one for an assignment, and
/// looks up its coordinator: principals need `Describe` on the prefix).
pub const READER_GROUP_PREFIX: &str = "fhir-cdc-reader-";

/// A reader's configuration: partitions assigned directly, nothing committed, and only
/// what committed transactions wrote (`read_committed`, librdkafka's default, said here so
/// that a configured `isolation.level` cannot change it).
pub fn reader_config(properties: &KafkaProperties) -> ClientConfig {
    let mut config = properties.client_config();
    config
        .set(
            "group.id",
            format!("{READER_GROUP_PREFIX}{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        // A start offset retention removed meanwhile: from the first one left.
        .set("auto.offset.reset", "earliest");
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(toml: &str) -> KafkaProperties {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn idempotence_and_acks_all_are_enforced_not_overridden() {
        let config = producer_config(&properties(r#""bootstrap.servers" = "k:9092""#)).unwrap();
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("compression.type"), Some("lz4"));
        let tuned =
            producer_config(&properties("compression.type = \"zstd\"\nacks = \"-1\"")).unwrap();
        assert_eq!(
            tuned.get("compression.type"),
            Some("zstd"),
            "the configuration wins over defaults"
        );
        for (toml, property) in [
            ("enable.idempotence = false", "enable.idempotence"),
            ("acks = 1", "acks"),
        ] {
            let err = producer_config(&properties(toml)).unwrap_err().to_string();
            assert!(err.starts_with(&format!("[kafka] {property} = ")), "{err}");
            assert!(err.contains("fhir-cdc requires"), "{err}");
        }
    }

    #[test]
    fn a_transactional_producer_fails_a_message_before_its_transaction() {
        let bootstrap = r#""bootstrap.servers" = "k:9092""#;
        let config = transactional_config(&properties(bootstrap), "lab-1").unwrap();
        assert_eq!(config.get("transactional.id"), Some("lab-1"));
        assert_eq!(config.get("transaction.timeout.ms"), Some("60000"));
        assert_eq!(config.get("message.timeout.ms"), Some("54000"));
        let tuned = properties(&format!(
            "{bootstrap}\ntransaction.timeout.ms = 30000\nmessage.timeout.ms = 20000"
        ));
        let config = transactional_config(&tuned, "lab-1").unwrap();
        assert_eq!(config.get("message.timeout.ms"), Some("20000"));
        let wrong = properties(&format!("{bootstrap}\nmessage.timeout.ms = 120000"));
        let err = transactional_config(&wrong, "lab-1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("must be below transaction.timeout.ms = 60000"),
            "{err}"
        );
    }
}
