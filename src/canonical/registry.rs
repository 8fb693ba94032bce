//! The Confluent-compatible schema registry (Confluent, Karapace, Redpanda, Apicurio's
//! `ccompat` API): the subset of its REST API fhir-cdc uses
//! (<https://docs.confluent.io/platform/current/schema-registry/develop/api.html>).

use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

use apache_avro::{types::Value, Schema};
use schema_registry_converter::{
    async_impl::{
        avro::{AvroDecoder, AvroEncoder},
        schema_registry::SrSettings,
    },
    schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema},
};

use super::{event_from_avro, event_to_avro, schema::event_schema, AvroShapeError, CanonicalEvent};
use crate::{
    config::RegistryConfig,
    preflight::{self, Finding},
};

const COMPONENT: &str = "registry";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Ask the registry for its subjects and global compatibility level.
pub async fn check(config: &RegistryConfig) -> Vec<Finding> {
    let base = config.url.trim_end_matches('/');
    let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("cannot build an HTTP client: {e}"),
                "check the TLS setup of this machine",
            )]
        }
    };
    let subjects_url = format!("{base}/subjects");
    let response = match client.get(&subjects_url).send().await {
        Ok(response) => response,
        Err(e) => {
            return vec![
                preflight::unreachable(COMPONENT, "the schema registry", base, &e).unwrap_or_else(
                    || {
                        Finding::problem(
                            COMPONENT,
                            format!("no answer from the schema registry at {base}: {e}"),
                            "start the registry, or correct schema_registry.url",
                        )
                    },
                ),
            ]
        }
    };
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return vec![Finding::problem(
            COMPONENT,
            format!("the schema registry at {base} refused access (HTTP {status})"),
            "give the connector credentials the registry accepts",
        )];
    }
    let subjects = match response.error_for_status() {
        Ok(ok) => ok.json::<Vec<String>>().await.ok(),
        Err(_) => None,
    };
    let Some(subjects) = subjects else {
        return vec![Finding::problem(
            COMPONENT,
            format!("{subjects_url} answered HTTP {status}, not a Confluent-compatible subject list"),
            "point schema_registry.url at the Confluent-compatible API root (Apicurio: …/apis/ccompat/v7)",
        )];
    };
    let compatibility = match client.get(format!("{base}/config")).send().await {
        Ok(r) => r.json::<serde_json::Value>().await.ok().and_then(|v| {
            v.get("compatibilityLevel")
                .or(v.get("compatibility"))
                .and_then(|c| c.as_str())
                .map(str::to_owned)
        }),
        Err(_) => None,
    };
    vec![Finding::ok(
        COMPONENT,
        format!(
            "Confluent-compatible API answers at {base}: {} subject(s), compatibility {}",
            subjects.len(),
            compatibility.as_deref().unwrap_or("unknown")
        ),
    )]
}

/// Encodes canonical events in the Confluent wire format (magic byte 0, the 4-byte schema
/// id, the Avro body) and decodes them, through schema_registry_converter against the
/// registry. Subjects follow TopicNameStrategy (`<topic>-value`); an event's schema is
/// registered on first use.
pub struct EventCodec {
    encoder: AvroEncoder,
    decoder: AvroDecoder,
    /// Per resource type: the schema as sent to the registry, and parsed.
    schemas: std::sync::Mutex<HashMap<String, Arc<(SuppliedSchema, Schema)>>>,
}

impl fmt::Debug for EventCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventCodec").finish_non_exhaustive()
    }
}

/// Why an event could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("the schema registry refused or failed: {0}")]
    Registry(String),
    #[error("the event does not fit its schema: {0}")]
    Shape(#[from] AvroShapeError),
    #[error("not a canonical event: {0}")]
    Undecodable(String),
}

impl CodecError {
    /// Whether trying again may help (the registry was unreachable), as opposed to the
    /// bytes or the event being wrong, which only a fix changes.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::Registry(_))
    }
}

impl EventCodec {
    pub fn new(config: &RegistryConfig) -> Self {
        let settings = SrSettings::new(config.url.trim_end_matches('/').to_owned());
        Self {
            encoder: AvroEncoder::new(settings.clone()),
            decoder: AvroDecoder::new(settings),
            schemas: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn schema_for(&self, resource_type: &str) -> Result<Arc<(SuppliedSchema, Schema)>, CodecError> {
        let mut schemas = self
            .schemas
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(found) = schemas.get(resource_type) {
            return Ok(found.clone());
        }
        let json = event_schema(resource_type);
        let parsed = Schema::parse(&json).map_err(|e| CodecError::Undecodable(e.to_string()))?;
        let supplied = SuppliedSchema::new(
            Some(format!(
                "{}.{resource_type}Event",
                super::schema::EVENT_NAMESPACE
            )),
            SchemaType::Avro,
            json.to_string(),
        );
        let entry = Arc::new((supplied, parsed));
        schemas.insert(resource_type.to_owned(), entry.clone());
        Ok(entry)
    }

    /// The event's bytes for `topic`.
    pub async fn encode(&self, event: &CanonicalEvent, topic: &str) -> Result<Vec<u8>, CodecError> {
        let schema = self.schema_for(&event.resource_type)?;
        let Value::Record(fields) = event_to_avro(event, &schema.1)? else {
            return Err(CodecError::Undecodable(
                "the event schema is not a record".into(),
            ));
        };
        let values: Vec<(&str, Value)> = fields
            .iter()
            .map(|(name, value)| (name.as_str(), value.clone()))
            .collect();
        let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
            topic.to_owned(),
            false,
            schema.0.clone(),
        );
        self.encoder
            .encode(values, strategy)
            .await
            .map_err(|e| CodecError::Registry(e.to_string()))
    }

    /// The event in `bytes`, read with the schema version it was written with.
    pub async fn decode(&self, bytes: &[u8]) -> Result<CanonicalEvent, CodecError> {
        if bytes.len() < 5 || bytes[0] != 0 {
            return Err(CodecError::Undecodable(
                "no Confluent wire-format header (magic byte 0 and a schema id)".into(),
            ));
        }
        let decoded = self
            .decoder
            .decode_with_schema(Some(bytes))
            .await
            .map_err(|e| {
                if e.retriable {
                    CodecError::Registry(e.to_string())
                } else {
                    CodecError::Undecodable(e.to_string())
                }
            })?
            .ok_or_else(|| CodecError::Undecodable("empty message".into()))?;
        Ok(event_from_avro(&decoded.value, &decoded.schema.parsed)?)
    }
}
