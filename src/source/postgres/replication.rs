//! The logical replication stream of one slot, as decoded changes.
//!
//! The wire protocol is spoken by `pgwire-replication` (START_REPLICATION with `pgoutput`,
//! protocol version 1, standby status updates, keepalives); this module turns its events
//! into [`Decoded`] items through [`pgoutput::decode`] and [`ChangeDecoder`]. The session
//! pins `DateStyle = ISO` and `TimeZone = UTC`, which the text values are parsed under
//! (see [`super::types`]).
//!
//! Acknowledging: [`ReplicationStream::acknowledge`] reports a flush LSN to the server,
//! which may then recycle WAL up to it. Call it only with a position whose events are all
//! durable downstream — the server will never send anything before it again.

use std::time::Duration;

use chrono::Utc;
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
};
use tokio_postgres::config::Host;

use super::{
    changes::{ChangeDecoder, ChangeError, Decoded},
    pgoutput::{self, DecodeError, Message},
    snapshot::{SIGNAL_PREFIX, WATERMARK_PREFIX},
};
use crate::{change::PgLsn, config::Secret, postgres::Target};

/// What can end a replication stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("source.url cannot be used for replication: {0}")]
    Config(String),
    #[error("replication connection failed: {0}")]
    Connection(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Change(#[from] ChangeError),
}

impl StreamError {
    /// Whether reconnecting may help: the network or the server, not the bytes or the
    /// configuration.
    pub fn is_transient(&self) -> bool {
        matches!(self, StreamError::Connection(_))
    }
}

/// Where and how to read.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub connector: String,
    pub slot: String,
    pub publication: String,
    /// Resume from here, or from the slot's confirmed position when that is later (the
    /// server starts at the greater of the two).
    pub start: PgLsn,
}

/// The replication session's settings for `slot` and `publication` from `source.url`,
/// and the database it names. Text values are read under `DateStyle = ISO` and
/// `TimeZone = UTC` (see [`super::types`]).
fn session_config(
    url: &Secret,
    slot: &str,
    publication: &str,
) -> Result<(ReplicationConfig, String), StreamError> {
    let Target { config, tls } = Target::parse(url).map_err(StreamError::Config)?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    let user = config
        .get_user()
        .ok_or_else(|| StreamError::Config("no user".into()))?
        .to_owned();
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = config.get_dbname().unwrap_or(&user).to_owned();
    let tls = tls.replication(&host);
    let replication =
        ReplicationConfig::new(host, user, password, database.clone(), slot, publication)
            .with_port(config.get_ports().first().copied().unwrap_or(5432))
            .with_tls(tls)
            .with_options("-c DateStyle=ISO -c TimeZone=UTC")
            // Acknowledged positions reach the server within 20 ms of Kafka's acknowledgement
            // (at most fifty small status messages a second; with one a second, a slot lagged
            // up to a second behind Kafka, and the benchmark's end-to-end time with it), and
            // keepalives (the heartbeats of an idle database) arrive at least every second.
            .with_status_interval(Duration::from_millis(20))
            .with_wakeup_interval(Duration::from_secs(1))
            // Messages read ahead of the decoder: enough to keep it busy, few enough that a
            // backlog of wide rows stays small in memory (the crate's default is 8,192).
            .with_buffer_size(512);
    Ok((replication, database))
}

/// A certificate refused is the configuration's fault: retrying will not help. (The
/// session connects in a task of its own, so the refusal may come with the first read.)
fn session_error(e: PgWireError) -> StreamError {
    match e {
        PgWireError::Tls(e) => StreamError::Config(e),
        e => StreamError::Connection(e.to_string()),
    }
}

/// One slot's stream of decoded changes.
pub struct ReplicationStream {
    client: ReplicationClient,
    decoder: ChangeDecoder,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    pub async fn start(url: &Secret, options: &StreamOptions) -> Result<Self, StreamError> {
        let (replication, database) = session_config(url, &options.slot, &options.publication)?;
        let replication = replication
            .with_start_lsn(Lsn::from_u64(options.start.0))
            .with_application_name(format!("fhir-cdc {}", options.connector));
        let client = ReplicationClient::connect(replication)
            .await
            .map_err(session_error)?;
        Ok(Self {
            client,
            decoder: ChangeDecoder::new(options.connector.clone(), database),
        })
    }

    /// The next decoded item, or `None` when the stream was stopped.
    pub async fn next(&mut self) -> Result<Option<Decoded>, StreamError> {
        loop {
            let event = self.client.recv().await.map_err(session_error)?;
            // The message's column values borrow from its bytes.
            let bytes;
            let message = match event {
                None | Some(ReplicationEvent::StoppedAt { .. }) => return Ok(None),
                // Between transactions, a keepalive's WAL end and a heartbeat message's
                // position are progress: everything before them has been sent.
                Some(ReplicationEvent::KeepAlive { wal_end: lsn, .. })
                | Some(ReplicationEvent::Message {
                    transactional: false,
                    lsn,
                    ..
                }) if !self.decoder.in_transaction() => {
                    return Ok(Some(Decoded::Heartbeat(PgLsn(lsn.as_u64()))));
                }
                Some(ReplicationEvent::Message {
                    transactional: true,
                    prefix,
                    content,
                    ..
                }) if prefix == WATERMARK_PREFIX => match self.decoder.commit_lsn() {
                    Some(position) => {
                        let marker = String::from_utf8_lossy(&content).into_owned();
                        return Ok(Some(Decoded::Watermark { position, marker }));
                    }
                    None => continue,
                },
                Some(ReplicationEvent::Message {
                    transactional: true,
                    prefix,
                    content,
                    ..
                }) if prefix == SIGNAL_PREFIX => {
                    let content = String::from_utf8_lossy(&content).into_owned();
                    return Ok(Some(Decoded::Signal(content)));
                }
                Some(ReplicationEvent::KeepAlive { .. } | ReplicationEvent::Message { .. }) => {
                    continue
                }
                Some(ReplicationEvent::Begin {
                    final_lsn,
                    commit_time_micros,
                    xid,
                }) => Message::Begin {
                    final_lsn: final_lsn.as_u64(),
                    commit_time: commit_time_micros,
                    xid,
                },
                Some(ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                }) => Message::Commit {
                    flags: 0,
                    commit_lsn: lsn.as_u64(),
                    end_lsn: end_lsn.as_u64(),
                    commit_time: commit_time_micros,
                },
                Some(ReplicationEvent::XLogData { data, .. }) => {
                    bytes = data;
                    pgoutput::decode(&bytes, false)?
                }
            };
            match self.decoder.decode(message, Utc::now())? {
                Decoded::Nothing => continue,
                decoded => return Ok(Some(decoded)),
            }
        }
    }

    /// Tell the server that everything up to `lsn` is durable downstream.
    pub fn acknowledge(&self, lsn: PgLsn) {
        self.client.update_applied_lsn(Lsn::from_u64(lsn.0));
    }

    /// Write a heartbeat into the WAL (a non-transactional logical message, which the stream
    /// delivers as [`Decoded::Heartbeat`]): on an idle database, or one whose traffic is on
    /// unmapped tables, it is what lets the acknowledged position advance.
    pub async fn emit_heartbeat(
        client: &tokio_postgres::Client,
    ) -> Result<(), tokio_postgres::Error> {
        client
            .execute(
                "SELECT pg_logical_emit_message(false, 'fhir-cdc-heartbeat', '')",
                &[],
            )
            .await
            .map(|_| ())
    }

    /// End the stream.
    pub fn stop(&self) {
        self.client.stop();
    }
}
