//! The `[kafka]` section: librdkafka properties, passed through unchanged.
//!
//! Property names are librdkafka's own (`bootstrap.servers`, `security.protocol`,
//! `sasl.password`, …; see librdkafka's CONFIGURATION.md). In TOML they can be written quoted
//! (`"bootstrap.servers" = "…"`) or as plain dotted keys (`bootstrap.servers = "…"`, which
//! TOML reads as nested tables); both flatten to the same dotted name. Values may be strings,
//! integers, floats or booleans, and strings may hold `${env:…}` / `${file:…}` references.
//! librdkafka itself rejects unknown names and bad values when a client is created, and
//! `fhir-cdc check` reports that with the property's name.

use std::{collections::BTreeMap, fmt};

use serde::{de, Deserialize, Deserializer};

use super::interpolate;

/// librdkafka properties by their dotted names.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaProperties(BTreeMap<String, String>);

impl KafkaProperties {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A librdkafka client configuration holding exactly these properties.
    pub fn client_config(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        for (name, value) in self.iter() {
            config.set(name, value);
        }
        config
    }

    /// Whether a property's value must never be printed (passwords, keys, tokens).
    pub fn is_sensitive(name: &str) -> bool {
        [
            "password",
            "secret",
            "key.pem",
            "sasl.oauthbearer.config",
            "sasl.username",
        ]
        .iter()
        .any(|marker| name.contains(marker))
    }
}

/// Flatten one TOML value found under `name` into dotted `name → text` entries of `out`
/// (strings interpolated); errors name the property as `section.name`.
fn flatten(
    section: &str,
    name: String,
    value: toml::Value,
    out: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    let text = match value {
        toml::Value::Table(table) => {
            for (key, inner) in table {
                flatten(section, format!("{name}.{key}"), inner, out)?;
            }
            return Ok(());
        }
        toml::Value::String(s) => {
            interpolate::resolve(&s).map_err(|e| format!("{section}.{name}: {e}"))?
        }
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(_) | toml::Value::Array(_) => {
            return Err(format!(
                "{section}.{name}: a property takes a string, number or boolean"
            ))
        }
    };
    out.insert(name, text);
    Ok(())
}

/// A TOML table of dotted properties, flattened (see the module's documentation).
fn flat_table<'de, D: Deserializer<'de>>(
    deserializer: D,
    section: &str,
) -> Result<BTreeMap<String, String>, D::Error> {
    let table = toml::Table::deserialize(deserializer)?;
    let mut flat = BTreeMap::new();
    for (key, value) in table {
        flatten(section, key, value, &mut flat).map_err(de::Error::custom)?;
    }
    Ok(flat)
}

/// Topic-level settings for the topics a connector creates (`retention.ms`,
/// `cleanup.policy`, …; Kafka's topic configuration names), written like `[kafka]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicSettings(BTreeMap<String, String>);

impl TopicSettings {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl<'de> Deserialize<'de> for TopicSettings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        flat_table(deserializer, "topic setting").map(Self)
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                (
                    k,
                    if Self::is_sensitive(k) {
                        "***"
                    } else {
                        v.as_str()
                    },
                )
            }))
            .finish()
    }
}

impl<'de> Deserialize<'de> for KafkaProperties {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        flat_table(deserializer, "kafka").map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_and_dotted_keys_flatten_alike() {
        let props: KafkaProperties = toml::from_str(
            r#"
            "bootstrap.servers" = "a:9092"
            linger.ms = 5
            enable.idempotence = true
            [sasl]
            mechanism = "PLAIN"
            "#,
        )
        .unwrap();
        let flat: Vec<_> = props.iter().collect();
        assert_eq!(
            flat,
            [
                ("bootstrap.servers", "a:9092"),
                ("enable.idempotence", "true"),
                ("linger.ms", "5"),
                ("sasl.mechanism", "PLAIN"),
            ]
        );
    }

    #[test]
    fn debug_hides_credentials() {
        let props: KafkaProperties = toml::from_str(r#"sasl.password = "hunter2""#).unwrap();
        assert!(!format!("{props:?}").contains("hunter2"));
    }

    #[test]
    fn arrays_are_refused_with_the_property_name() {
        let err = toml::from_str::<KafkaProperties>("bootstrap.servers = ['a', 'b']").unwrap_err();
        assert!(err.to_string().contains("kafka.bootstrap.servers"), "{err}");
    }
}
