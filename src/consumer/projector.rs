//! `fhir-cdc project`: the consumer runtime with the projection job and the PostgreSQL
//! read model as its target — each event applied to the read model exactly once.
//!
//! Events are read in batches (at most `max_batch`, or what arrived within `max_batch_ms`)
//! and applied as the target says (`super::target::postgres`): the rows, the ledger of
//! applied event ids and the offsets in one database transaction per batch. A message that
//! cannot be applied — undecodable bytes, an unknown schema id, an event whose body
//! contradicts its envelope, a row the database refuses — goes to `<prefix>.dlq.projector`
//! with the reason, its coordinates, headers and original bytes, before the batch commits;
//! the rest of the batch is applied.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{
    config::ProjectorConfig,
    events::Entry,
    runtime::{
        self, BatchLimits, ConsumerError, Job, Read, Refused, Replay, Settings, Summary, Work,
    },
    target::postgres::Postgres,
};
use crate::observe::{self, health::Probe, projector::ConsumerProbe};

/// The projection job: every event that decoded and agrees with its envelope goes to the
/// target as it is; the others are refused with the reason.
#[derive(Debug, Default)]
pub struct Project;

impl Job for Project {
    type Output<'a> = Entry<'a>;

    fn work<'a>(&mut self, batch: &'a [Read]) -> Work<Entry<'a>> {
        let mut work = Work {
            outputs: Vec::with_capacity(batch.len()),
            refused: Vec::new(),
        };
        for (index, read) in batch.iter().enumerate() {
            match &read.event {
                Ok(event) => work.outputs.push((
                    index,
                    Entry {
                        event,
                        at: &read.at,
                        kafka_timestamp: read.timestamp,
                    },
                )),
                Err(reason) => work.refused.push(Refused {
                    index,
                    reason: reason.clone(),
                    logged: reason.clone(),
                }),
            }
        }
        work
    }
}

/// Project until `shutdown` is cancelled — or, with `until_caught_up`, until every assigned
/// partition has been applied up to its end.
pub async fn run(
    config: &ProjectorConfig,
    shutdown: CancellationToken,
    until_caught_up: bool,
) -> Result<Summary, ConsumerError> {
    project(config, shutdown, until_caught_up, None).await
}

/// Project the topics again as `replay` says into the same read model, until caught up.
/// The ledger makes it harmless: what is already applied counts as duplicate and changes
/// nothing, what is missing is applied. It runs as a group of its own
/// (`<group>.replay`), so the projectors of the live group are not moved.
pub async fn replay(
    config: &ProjectorConfig,
    shutdown: CancellationToken,
    replay: &Replay,
) -> Result<Summary, ConsumerError> {
    project(config, shutdown, true, Some(replay)).await
}

async fn project(
    config: &ProjectorConfig,
    shutdown: CancellationToken,
    until_caught_up: bool,
    replay: Option<&Replay>,
) -> Result<Summary, ConsumerError> {
    let group = match replay {
        None => config.group_id().to_owned(),
        Some(_) => format!("{}.replay", config.group_id()),
    };
    // A replay may run beside the live projector, on its port: only the latter serves.
    let metrics = config.metrics.as_ref().filter(|_| replay.is_none());
    let probe = metrics.map(|_| {
        Arc::new(ConsumerProbe::new(Duration::from_secs(
            config.health.ready_lag_seconds,
        )))
    });
    if let (Some(metrics), Some(probe)) = (metrics, &probe) {
        let told: Arc<dyn Probe> = probe.clone();
        observe::serve(metrics.listen, Some(told)).map_err(ConsumerError::Setup)?;
        info!(listen = %metrics.listen, "serving metrics and health");
    }
    let mut target = Postgres::connect(&config.projection).await?;
    info!(group = %group, schema = %config.projection.schema, "projecting");
    let settings = Settings {
        name: &config.name,
        group,
        kafka: &config.kafka,
        registry: &config.schema_registry,
        prefix: &config.topics.prefix,
        include: &config.topics.include,
        dead_letter_topic: config.dead_letter_topic(),
        limits: BatchLimits {
            events: config.projection.max_batch,
            wait: Duration::from_millis(config.projection.max_batch_ms),
            idle: Duration::from_millis(config.projection.max_batch_ms.max(200)),
        },
        until_caught_up,
        replay,
        metrics: metrics.is_some(),
        probe,
    };
    runtime::consume(&settings, &mut Project, &mut target, shutdown).await
}
