//! # fhir-cdc
//!
//! Change data capture from legacy healthcare databases (PostgreSQL logical replication,
//! MySQL/MariaDB binlog) into HL7 FHIR R4 resources, Avro-encoded as canonical events in a
//! Confluent-compatible schema registry and written to Kafka.
//!
//! The crate is organised after the data path; `docs/architecture.md` draws the map and
//! `tests/architecture.rs` holds its import rules:
//!
//! - [`fhir`]: FHIR R4 definitions, resources as fhir-cdc carries them, their sensitivity;
//! - [`change`]: the source-neutral change every source produces, and a value's text;
//! - [`config`]: the connector configuration, a typed TOML contract with secret references;
//! - [`source`]: one folder per database kind, behind the `Source` seam;
//! - [`mapping`]: mapping files, checked against [`fhir`] R4, and the mapper;
//! - [`canonical`]: the canonical event envelope, its Avro and the schema registry;
//! - [`kafka`]: every Kafka client, by role (producers, transactional producer, admin,
//!   reader);
//! - [`offsets`]: the connector's state, and when a position may be acknowledged;
//! - [`pipeline`]: the connector at work, source to Kafka with acknowledgements;
//! - [`consumer`]: the consumer runtime with its Job and Target seams, the projection job
//!   and its targets (the PostgreSQL read model; in memory, for tests);
//! - [`reconcile`], [`dlq`] and [`plan`]: the operations over both sides — drift, repair,
//!   dead letters, and what a rollout of config and mapping files would do;
//! - [`observe`]: the metrics both sides serve; [`preflight`]: the findings `fhir-cdc check`
//!   reports; [`postgres`]: connections to PostgreSQL;
//! - [`error`]: the kinds the error policy reads (transient, definite, configuration,
//!   fenced), and an error carrying one with its cause;
//! - [`cli`]: the command line.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use fhir_cdc::{config::ConnectorConfig, kafka};
//!
//! let config = ConnectorConfig::load("connectors/lab-postgres.toml".as_ref())?;
//! for finding in kafka::check(&config.kafka).await {
//!     println!("{finding}");
//! }
//! # Ok(())
//! # }
//! ```

pub mod canonical;
pub mod change;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod dlq;
pub mod error;
pub mod fhir;
pub mod kafka;
pub mod mapping;
pub mod observe;
pub mod offsets;
pub mod pipeline;
pub mod plan;
pub mod postgres;
pub mod preflight;
pub mod reconcile;
pub mod source;
