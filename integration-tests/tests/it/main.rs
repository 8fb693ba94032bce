//! One test binary for everything that needs the real stack (PostgreSQL, MariaDB, Kafka,
//! schema registry), as written to `integration-tests/stack/env` by `stack/up`.

mod avro_registry;
mod check;
mod compose;
mod connector_run;
mod consumer_runtime;
mod crash_restart;
mod deploy;
mod dlq;
mod fhir_definitions;
mod fhir_oracle;
mod kafka_acls;
mod kafka_sink;
mod kafka_transactions;
mod lookups;
mod mysql_capture;
mod mysql_types;
mod phi;
mod poc_story;
mod postgres_snapshot;
mod postgres_stream;
mod postgres_tls;
mod postgres_types;
mod projector;
mod reconcile;
mod rollout;
mod sample_billing;
mod sample_database;
mod schema_change;
mod schemas_cli;
mod secured_registry;
mod smoke_kafka;
mod smoke_mariadb;
mod smoke_postgres;
mod smoke_registry;
mod snapshot_requests;
mod sqlserver_capture;

use integration_tests::{connector, stack};
