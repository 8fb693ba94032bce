//! The Confluent-compatible schema registry (Confluent, Karapace, Redpanda, Apicurio's
//! `ccompat` API): the subset of its REST API fhir-cdc uses
//! (<https://docs.confluent.io/platform/current/schema-registry/develop/api.html>).

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use apache_avro::Schema;
use schema_registry_converter::{
    async_impl::schema_registry::{get_schema_by_id, post_schema, SrSettings},
    schema_registry_common::{SchemaType, SuppliedSchema},
};

use super::{
    schema::{self, event_schema},
    AvroShapeError, CanonicalEvent, EventWriter, JsonResource,
};
use crate::{
    config::{redact_urls, Compatibility, RegistryAuth, RegistryConfig},
    preflight::{self, Finding},
};

const COMPONENT: &str = "registry";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Ask the registry for its subjects and global compatibility level.
pub async fn check(config: &RegistryConfig) -> Vec<Finding> {
    let base = config.url.trim_end_matches('/');
    // What messages name: the URL without its password, an error without its URL.
    let shown = redact_urls(base);
    let client = match client_builder(config).map(|b| b.timeout(TIMEOUT).build()) {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            return vec![Finding::problem(
                COMPONENT,
                format!("cannot build an HTTP client: {e}"),
                "check the TLS setup of this machine",
            )]
        }
        Err(e) => {
            return vec![Finding::problem(
                COMPONENT,
                e,
                "point schema_registry.ca_file at a readable PEM file of the registry's CA",
            )]
        }
    };
    let request = authorized(client.get(format!("{base}/subjects")), config);
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            if is_certificate_error(&e) {
                return vec![Finding::problem(
                    COMPONENT,
                    format!("the schema registry at {shown} presented a certificate this machine does not trust, or one for another name"),
                    "set schema_registry.ca_file to the PEM file of the CA that signed it, and use the host name the certificate names",
                )];
            }
            return vec![
                preflight::unreachable(COMPONENT, "the schema registry", &shown, &e)
                    .unwrap_or_else(|| {
                        Finding::problem(
                            COMPONENT,
                            format!(
                                "no answer from the schema registry at {shown}: {}",
                                e.without_url()
                            ),
                            "start the registry, or correct schema_registry.url",
                        )
                    }),
            ];
        }
    };
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return vec![Finding::problem(
            COMPONENT,
            format!("the schema registry at {shown} refused access (HTTP {status})"),
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
            format!("{shown}/subjects answered HTTP {status}, not a Confluent-compatible subject list"),
            "point schema_registry.url at the Confluent-compatible API root (Apicurio: …/apis/ccompat/v7)",
        )];
    };
    let level = authorized(client.get(format!("{base}/config")), config);
    let compatibility = match level.send().await {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| level_named(&v).map(str::to_owned)),
        Err(_) => None,
    };
    vec![Finding::ok(
        COMPONENT,
        format!(
            "Confluent-compatible API answers at {shown}: {} subject(s), compatibility {}",
            subjects.len(),
            compatibility.as_deref().unwrap_or("unknown")
        ),
    )]
}

/// The registry's subjects, read and configured over its REST API: what
/// schema_registry_converter does not do (compatibility levels and checks, versions).
#[derive(Debug, Clone)]
pub struct Subjects {
    client: reqwest::Client,
    /// Its URL, credentials and the level set on the subjects fhir-cdc creates.
    config: RegistryConfig,
}

/// What registering a schema under a subject would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No version yet: the schema becomes version 1, and the subject gets the configured
    /// compatibility level.
    First(Compatibility),
    /// The latest version is this schema: nothing to register.
    Unchanged(u32),
    /// A new version the registry admits.
    Compatible(u32),
    /// A new version the registry refuses: why, naming the fields.
    Incompatible(Vec<String>),
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl Subjects {
    /// A client of `config`'s registry; an error names a `ca_file` that cannot be used.
    pub fn new(config: &RegistryConfig) -> Result<Self, CodecError> {
        let client = client_builder(config)
            .map_err(CodecError::Setup)?
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| CodecError::Setup(e.to_string()))?;
        Ok(Self {
            client,
            config: config.clone(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}/{path}", self.config.url.trim_end_matches('/'));
        let request = self
            .client
            .request(method, url)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        authorized(request, &self.config)
    }

    /// The JSON answer to `request`; `None` for HTTP 404 (no such subject or version).
    async fn answer(
        &self,
        request: reqwest::RequestBuilder,
        doing: &str,
    ) -> Result<Option<serde_json::Value>, CodecError> {
        let failed =
            |e: &dyn fmt::Display| CodecError::Registry(redact_urls(&format!("{doing}: {e}")));
        let response = request.send().await.map_err(|e| failed(&e.without_url()))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| failed(&e.without_url()))?;
        if !status.is_success() {
            let message = body.get("message").and_then(|m| m.as_str()).unwrap_or("");
            return Err(failed(&format!("HTTP {status} {message}")));
        }
        Ok(Some(body))
    }

    /// `subject`'s latest version (its number and schema); `None` when it has none.
    pub async fn latest(&self, subject: &str) -> Result<Option<(u32, String)>, CodecError> {
        let path = format!("subjects/{subject}/versions/latest");
        let body = self
            .answer(
                self.request(reqwest::Method::GET, &path),
                &format!("reading subject {subject}"),
            )
            .await?;
        Ok(body.and_then(|b| {
            let version = u32::try_from(b.get("version")?.as_u64()?).ok()?;
            Some((version, b.get("schema")?.as_str()?.to_owned()))
        }))
    }

    /// Every version of `subject`, oldest first.
    pub async fn versions(&self, subject: &str) -> Result<Vec<(u32, String)>, CodecError> {
        let doing = format!("reading subject {subject}");
        let path = format!("subjects/{subject}/versions");
        let Some(numbers) = self
            .answer(self.request(reqwest::Method::GET, &path), &doing)
            .await?
        else {
            return Ok(Vec::new());
        };
        let numbers: Vec<u32> = serde_json::from_value(numbers)
            .map_err(|e| CodecError::Registry(format!("{doing}: {e}")))?;
        let mut versions = Vec::with_capacity(numbers.len());
        for number in numbers {
            let path = format!("subjects/{subject}/versions/{number}");
            if let Some(body) = self
                .answer(self.request(reqwest::Method::GET, &path), &doing)
                .await?
            {
                let schema = body.get("schema").and_then(|s| s.as_str()).unwrap_or("");
                versions.push((number, schema.to_owned()));
            }
        }
        Ok(versions)
    }

    /// The compatibility level the registry applies to `subject`, when it says.
    pub async fn level(&self, subject: &str) -> Result<Option<Compatibility>, CodecError> {
        let level = self
            .answer(
                self.request(reqwest::Method::GET, &format!("config/{subject}")),
                &format!("reading the compatibility of {subject}"),
            )
            .await?;
        Ok(level
            .as_ref()
            .and_then(level_named)
            .and_then(Compatibility::from_name))
    }

    /// What registering `schema` under `subject` would do, asked of the registry without
    /// registering anything.
    pub async fn verdict(&self, subject: &str, schema: &str) -> Result<Verdict, CodecError> {
        let Some((latest, text)) = self.latest(subject).await? else {
            return Ok(Verdict::First(self.config.compatibility));
        };
        if canonical_form(&text) == canonical_form(schema) {
            return Ok(Verdict::Unchanged(latest));
        }
        let doing = format!("asking whether a new version of {subject} is compatible");
        let body = self
            .answer(
                self.request(
                    reqwest::Method::POST,
                    &format!("compatibility/subjects/{subject}/versions/latest?verbose=true"),
                )
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .json(&serde_json::json!({ "schema": schema })),
                &doing,
            )
            .await?
            .unwrap_or_default();
        if body.get("is_compatible").and_then(|c| c.as_bool()) != Some(false) {
            return Ok(Verdict::Compatible(latest + 1));
        }
        // The fields by Avro's rules at the subject's level (Apicurio answers yes or no),
        // else the registry's reasons when it gives them (Confluent's verbose answer).
        // Only a transitive level needs the older versions.
        let level = self
            .level(subject)
            .await?
            .unwrap_or(self.config.compatibility);
        let compared = if level.transitive() {
            self.versions(subject).await?
        } else {
            vec![(latest, text)]
        };
        let mut reasons = schema::incompatibilities(level, &compared, schema);
        if reasons.is_empty() {
            reasons = body
                .get("messages")
                .and_then(|m| serde_json::from_value::<Vec<String>>(m.clone()).ok())
                .unwrap_or_default();
        }
        if reasons.is_empty() {
            reasons.push(format!(
                "the registry refuses it at level {} without saying why",
                level.name()
            ));
        }
        Ok(Verdict::Incompatible(reasons))
    }

    /// Set `subject`'s compatibility level to the configured one.
    pub async fn set_compatibility(&self, subject: &str) -> Result<(), CodecError> {
        self.answer(
            self.request(reqwest::Method::PUT, &format!("config/{subject}"))
                .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
                .json(&serde_json::json!({ "compatibility": self.config.compatibility.name() })),
            &format!("setting the compatibility of {subject}"),
        )
        .await
        .map(drop)
    }
}

/// The level in a registry's answer to `GET /config[/subject]` (Confluent answers
/// `compatibilityLevel`, some registries `compatibility`).
fn level_named(answer: &serde_json::Value) -> Option<&str> {
    answer
        .get("compatibilityLevel")
        .or(answer.get("compatibility"))
        .and_then(|c| c.as_str())
}

/// A schema's Parsing Canonical Form, to compare versions as the registry does; the text
/// itself when it does not parse.
fn canonical_form(text: &str) -> String {
    Schema::parse_str(text).map_or_else(|_| text.to_owned(), |s| s.canonical_form())
}

/// Encodes canonical events in the Confluent wire format (magic byte 0, the 4-byte schema
/// id, the Avro body) and decodes them, against the registry through
/// schema_registry_converter. Subjects follow TopicNameStrategy (`<topic>-value`); an
/// event's schema is registered on first use and its id cached. Bodies are written by the
/// compiled [`EventWriter`], and read by the same plan compiled from whatever schema version
/// the message's id names (fetched once per id).
pub struct EventCodec {
    settings: SrSettings,
    subjects: Subjects,
    /// Per resource type: the schema as sent to the registry, and its compiled writer.
    schemas: Mutex<HashMap<String, Arc<(SuppliedSchema, EventWriter)>>>,
    /// Schema id per topic (its subject: `<topic>-value`).
    ids: Mutex<HashMap<String, u32>>,
    /// The compiled writer schema per schema id, for reading.
    readers: Mutex<HashMap<u32, Arc<EventWriter>>>,
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
    #[error("the schema registry's client cannot be set up: {0}")]
    Setup(String),
    #[error("a new version of {subject} would break its consumers, so it is not registered: {}", reasons.join("; "))]
    Incompatible {
        subject: String,
        reasons: Vec<String>,
    },
}

impl CodecError {
    /// Whether trying again may help (the registry was unreachable), as opposed to the
    /// bytes or the event being wrong, which only a fix changes.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::Registry(_))
    }
}

impl crate::error::Kinded for CodecError {
    fn kind(&self) -> crate::error::Kind {
        if self.is_transient() {
            crate::error::Kind::Transient
        } else {
            crate::error::Kind::Definite
        }
    }
}

impl From<CodecError> for crate::error::Error {
    fn from(e: CodecError) -> Self {
        crate::error::Error::bare(e)
    }
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `request` with the credentials `config` names.
fn authorized(
    request: reqwest::RequestBuilder,
    config: &RegistryConfig,
) -> reqwest::RequestBuilder {
    match config.auth() {
        RegistryAuth::Basic(user, password) => request.basic_auth(user, Some(password.expose())),
        RegistryAuth::Bearer(token) => request.bearer_auth(token.expose()),
        RegistryAuth::None => request,
    }
}

/// An HTTP client for the registry that trusts the CAs of `ca_file` besides the system's.
fn client_builder(config: &RegistryConfig) -> Result<reqwest::ClientBuilder, String> {
    let builder = reqwest::Client::builder();
    let Some(path) = &config.ca_file else {
        return Ok(builder);
    };
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|e| format!("schema_registry.ca_file {shown} cannot be read: {e}"))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("schema_registry.ca_file {shown} is not PEM certificates: {e}"))?;
    if certificates.is_empty() {
        return Err(format!(
            "schema_registry.ca_file {shown} holds no PEM certificate"
        ));
    }
    Ok(certificates
        .into_iter()
        .fold(builder, reqwest::ClientBuilder::add_root_certificate))
}

/// Whether a request failed on the server's certificate (untrusted, or for another name).
fn is_certificate_error(err: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        let text = e.to_string();
        if text.contains("certificate") || text.contains("handshake") {
            return true;
        }
        source = e.source();
    }
    false
}

impl EventCodec {
    /// A codec against the registry of `config`; an error names a `ca_file` that cannot be
    /// used.
    pub fn new(config: &RegistryConfig) -> Result<Self, CodecError> {
        let mut settings = SrSettings::new_builder(config.url.trim_end_matches('/').to_owned());
        match config.auth() {
            RegistryAuth::Basic(user, password) => {
                settings.set_basic_authorization(user, Some(password.expose()));
            }
            RegistryAuth::Bearer(token) => {
                settings.set_token_authorization(token.expose());
            }
            RegistryAuth::None => {}
        }
        let settings = settings
            .build_with(client_builder(config).map_err(CodecError::Setup)?)
            .map_err(|e| CodecError::Setup(e.to_string()))?;
        Ok(Self {
            settings,
            subjects: Subjects::new(config)?,
            schemas: Mutex::new(HashMap::new()),
            ids: Mutex::new(HashMap::new()),
            readers: Mutex::new(HashMap::new()),
        })
    }

    fn schema_for(
        &self,
        resource_type: &str,
    ) -> Result<Arc<(SuppliedSchema, EventWriter)>, CodecError> {
        if let Some(found) = locked(&self.schemas).get(resource_type) {
            return Ok(found.clone());
        }
        let json = event_schema(resource_type);
        let parsed = Schema::parse(&json).map_err(|e| CodecError::Undecodable(e.to_string()))?;
        let supplied = SuppliedSchema::new(
            Some(format!("{}.{resource_type}Event", schema::EVENT_NAMESPACE)),
            SchemaType::Avro,
            json.to_string(),
        );
        let entry = Arc::new((supplied, EventWriter::new(&parsed)?));
        locked(&self.schemas).insert(resource_type.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Register the schema of `resource_type`'s events under `topic`'s subject, as the first
    /// event for `topic` would: a connector does it at start, so that a registry that is
    /// unreachable or refuses the schema stops it before it reads a change.
    pub async fn register(&self, topic: &str, resource_type: &str) -> Result<(), CodecError> {
        let schema = self.schema_for(resource_type)?;
        self.id_for(topic, &schema.0).await.map(drop)
    }

    /// The registry's id of `schema` under `topic`'s subject (`<topic>-value`), registered
    /// on first use.
    async fn id_for(&self, topic: &str, schema: &SuppliedSchema) -> Result<u32, CodecError> {
        if let Some(id) = locked(&self.ids).get(topic).copied() {
            return Ok(id);
        }
        let subject = format!("{topic}-value");
        match self.subjects.verdict(&subject, &schema.schema).await? {
            Verdict::First(_) => self.subjects.set_compatibility(&subject).await?,
            Verdict::Unchanged(_) | Verdict::Compatible(_) => {}
            Verdict::Incompatible(reasons) => {
                return Err(CodecError::Incompatible { subject, reasons })
            }
        }
        let registered = post_schema(&self.settings, subject, schema.clone())
            .await
            .map_err(|e| CodecError::Registry(redact_urls(&e.to_string())))?;
        locked(&self.ids).insert(topic.to_owned(), registered.id);
        Ok(registered.id)
    }

    /// `value`, a record of the fixed schema `json` (full name `name`, parsed as `schema`),
    /// in the wire format for `topic`: the schema registered under the topic's subject on
    /// first use, as an event's is (reconciliation events).
    pub async fn encode_record(
        &self,
        topic: &str,
        json: &str,
        name: &str,
        schema: &Schema,
        value: apache_avro::types::Value,
    ) -> Result<Vec<u8>, CodecError> {
        let supplied =
            SuppliedSchema::new(Some(name.to_owned()), SchemaType::Avro, json.to_owned());
        let id = self.id_for(topic, &supplied).await?;
        let datum = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
            .build()
            .and_then(|writer| writer.write_value_to_vec(value))
            .map_err(|e| CodecError::Undecodable(e.to_string()))?;
        let mut bytes = Vec::with_capacity(5 + datum.len());
        bytes.push(0);
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend_from_slice(&datum);
        Ok(bytes)
    }

    /// The event's bytes for `topic`.
    pub async fn encode(&self, event: &CanonicalEvent, topic: &str) -> Result<Vec<u8>, CodecError> {
        let mut bytes = Vec::with_capacity(1024);
        self.encode_into(event, topic, &mut bytes).await?;
        Ok(bytes)
    }

    /// [`Self::encode`], written over what `bytes` held (no allocation once it is large
    /// enough).
    pub async fn encode_into(
        &self,
        event: &CanonicalEvent,
        topic: &str,
        bytes: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        let schema = self.schema_for(&event.resource_type)?;
        let id = self.id_for(topic, &schema.0).await?;
        bytes.clear();
        bytes.push(0);
        bytes.extend_from_slice(&id.to_be_bytes());
        schema.1.write(event, bytes)?;
        Ok(())
    }

    /// The event in `bytes`, read with the schema version it was written with.
    pub async fn decode(&self, bytes: &[u8]) -> Result<CanonicalEvent, CodecError> {
        let (id, body) = wire_format(bytes)?;
        Ok(self.reader(id).await?.read(body)?)
    }

    /// The event in `bytes` without its resource, and the resource as FHIR JSON (see
    /// [`EventWriter::read_json`]).
    pub async fn decode_json(
        &self,
        bytes: &[u8],
    ) -> Result<(CanonicalEvent, Option<JsonResource>), CodecError> {
        let (id, body) = wire_format(bytes)?;
        Ok(self.reader(id).await?.read_json(body)?)
    }

    /// The compiled schema with registry id `id`.
    async fn reader(&self, id: u32) -> Result<Arc<EventWriter>, CodecError> {
        if let Some(found) = locked(&self.readers).get(&id) {
            return Ok(found.clone());
        }
        // Only the registry's word that it has no such schema condemns the bytes; anything
        // else (an unreachable registry, a 500 while its storage is down, a garbled answer)
        // says nothing about them. The client flags only connection failures as retriable.
        let registered = get_schema_by_id(id, &self.settings).await.map_err(|e| {
            if e.error.contains("status 404") {
                CodecError::Undecodable(redact_urls(&format!("schema id {id}: {e}")))
            } else {
                CodecError::Registry(redact_urls(&e.to_string()))
            }
        })?;
        let schema = Schema::parse_str(&registered.schema)
            .map_err(|e| CodecError::Undecodable(format!("schema id {id}: {e}")))?;
        let reader = Arc::new(EventWriter::new(&schema)?);
        locked(&self.readers).insert(id, reader.clone());
        Ok(reader)
    }
}

/// The schema id and the Avro body of a message in the Confluent wire format.
pub fn wire_format(bytes: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    let (Some(0), Some(id)) = (bytes.first(), bytes.get(1..5)) else {
        return Err(CodecError::Undecodable(
            "no Confluent wire-format header (magic byte 0 and a schema id)".into(),
        ));
    };
    Ok((
        u32::from_be_bytes(id.try_into().expect("four bytes")),
        &bytes[5..],
    ))
}
