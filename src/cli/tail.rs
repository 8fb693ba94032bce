//! `fhir-cdc tail`: canonical events read from Kafka and decoded through the schema
//! registry, one JSON object per line — what an operator reaches for instead of a generic
//! console consumer.
//!
//! Each line holds the Kafka coordinates (`topic`, `partition`, `offset`), then the
//! envelope fields and the FHIR resource as standard FHIR JSON. Partitions are assigned
//! directly (no consumer group, nothing committed), so tailing never disturbs a consumer.
//! A message that cannot be decoded is reported on stderr with its coordinates and the
//! reason, and tailing goes on; the exit status is then 1.

use std::{path::PathBuf, process::ExitCode};

use chrono::{DateTime, Utc};
use clap::Args;
use rdkafka::Message;
use serde_json::{Map, Value as Json};

use crate::{
    canonical::{registry::EventCodec, CanonicalEvent},
    config::ConnectorConfig,
    error::{Error, Kind},
    kafka::reader::{offset_at, TopicReader},
};

#[derive(Debug, Args)]
pub struct TailArgs {
    /// The connector configuration file (TOML): its Kafka, registry and topic prefix.
    #[arg(long, short)]
    config: PathBuf,
    /// A topic to read; repeat for several. Default: every event topic under the
    /// configured prefix (`<prefix>.<domain>.<ResourceType>`), not the dead-letter topics.
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Read from the first retained message instead of only new ones.
    #[arg(long, conflicts_with = "since")]
    from_beginning: bool,
    /// Read from the first message written at or after this time (RFC 3339, e.g.
    /// 2024-03-05T14:30:00Z).
    #[arg(long, value_parser = super::parse_time)]
    since: Option<DateTime<Utc>>,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// Stop once every partition is read up to where it ended when tail started.
    #[arg(long)]
    to_end: bool,
    /// One short line per event instead of JSON: operation, resource, version, status,
    /// source position, and `snapshot` for snapshot reads.
    #[arg(long)]
    summary: bool,
}

pub async fn run(args: TailArgs) -> ExitCode {
    let config = match ConnectorConfig::load(&args.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fhir-cdc tail: {e}");
            return ExitCode::from(super::EXIT_BAD_CONFIG);
        }
    };
    match tail(&args, &config).await {
        Ok(0) => ExitCode::SUCCESS,
        Ok(undecodable) => {
            eprintln!("fhir-cdc tail: {undecodable} message(s) could not be decoded");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fhir-cdc tail: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints events until stopped; returns the number of undecodable messages.
async fn tail(args: &TailArgs, config: &ConnectorConfig) -> Result<u64, Error> {
    let prefix = &config.topics.prefix;
    let mut reader = TopicReader::open(
        &config.kafka,
        |name| {
            if args.topics.is_empty() {
                crate::canonical::is_event_topic(prefix, name)
            } else {
                args.topics.iter().any(|t| t == name)
            }
        },
        |consumer, topic, partition, low, high| {
            Ok(match args.since {
                Some(since) => offset_at(consumer, topic, partition, since)?.unwrap_or(high),
                None if args.from_beginning => low,
                None => high,
            })
        },
    )
    .map_err(Error::bare)?;
    if let Some(missing) = args.topics.iter().find(|t| !reader.topics.contains(t)) {
        return Err(Error::new(
            Kind::Configuration,
            format!("topic `{missing}` does not exist"),
        ));
    }
    if reader.topics.is_empty() {
        return Err(Error::new(
            Kind::Configuration,
            format!(
                "no event topics under the prefix `{}`",
                config.topics.prefix
            ),
        ));
    }
    let codec = EventCodec::new(&config.schema_registry).map_err(Error::bare)?;
    let (mut printed, mut undecodable) = (0u64, 0u64);
    while !(args.to_end && reader.at_end()) && args.limit.is_none_or(|limit| printed < limit) {
        let Some(message) = reader.next().await.map_err(Error::bare)? else {
            continue;
        };
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        let decoded = match message.payload() {
            Some(bytes) => codec.decode(bytes).await.map_err(|e| e.to_string()),
            None => Err("an empty message (a tombstone?)".to_owned()),
        };
        if args.summary {
            match decoded {
                Ok(event) => {
                    println!("{}", summary(&event));
                    printed += 1;
                }
                Err(reason) => {
                    undecodable += 1;
                    eprintln!("{topic}[{partition}]@{offset}: {reason}");
                }
            }
            continue;
        }
        match decoded.and_then(|event| serde_json::to_value(event).map_err(|e| e.to_string())) {
            Ok(Json::Object(fields)) => {
                let mut line = Map::with_capacity(fields.len() + 3);
                line.insert("topic".into(), topic.into());
                line.insert("partition".into(), partition.into());
                line.insert("offset".into(), offset.into());
                line.extend(fields);
                println!("{}", Json::Object(line));
                printed += 1;
            }
            Ok(_) => unreachable!("events serialize as objects"),
            Err(reason) => {
                undecodable += 1;
                eprintln!("{topic}[{partition}]@{offset}: {reason}");
            }
        }
    }
    Ok(undecodable)
}

/// `upsert Observation/result-12 v0000000016B37480.0000000000 final pg:0/16B3748`
fn summary(event: &CanonicalEvent) -> String {
    let op = event.op.name();
    let status = event
        .resource
        .as_ref()
        .and_then(|r| r.get("status"))
        .and_then(|s| s.as_str())
        .unwrap_or("-");
    let snapshot = if event.provenance.snapshot {
        " snapshot"
    } else {
        ""
    };
    format!(
        "{op:<6} {}/{} v{} {status} {}{snapshot}",
        event.resource_type,
        event.resource_id,
        event.resource_version,
        event.provenance.source_position
    )
}
