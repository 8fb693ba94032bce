//! The postgres kind of source as the rest of the crate asks of it (see `source::kind`).

use tokio::sync::mpsc;

use super::{
    capture::PostgresSource,
    snapshot::{Reading, TableReader},
};
use crate::{
    change::{ChangeEvent, PgLsn, Position, SourceMessage, Value},
    config::{ConnectorConfig, PostgresConfig},
    offsets::SnapshotRequest,
    preflight::Finding,
    source::{kind::Kind, MappedTables, SourceError},
};

impl Kind for PostgresConfig {
    type Source = PostgresSource;

    fn source(&self, connector: &str, tables: Vec<(String, String)>) -> PostgresSource {
        PostgresSource::new(connector, self, tables)
    }

    async fn preflight(
        &self,
        config: &ConnectorConfig,
        mapped: Option<&MappedTables>,
    ) -> Vec<Finding> {
        let capture = mapped.map(|m| super::preflight::Capture {
            tables: m.read.clone(),
            columns: m.columns.clone(),
            mapped: m.keyed.iter().map(|(table, _)| table.clone()).collect(),
            slot: self.slot_name(&config.name),
            publication: self.publication_name(&config.name),
        });
        super::preflight::check(&self.url, capture.as_ref()).await
    }

    async fn reader_now(&self, config: &ConnectorConfig) -> Result<Option<String>, SourceError> {
        let slot = self.slot_name(&config.name);
        Ok(super::capture::slot_active(&self.url, &slot)
            .await?
            .then(|| format!("replication slot {slot} is in use")))
    }

    async fn log_end(&self) -> Result<String, SourceError> {
        Ok(super::capture::current_end(&self.url).await?.to_string())
    }

    fn stored_position(&self, text: &str) -> Option<Position> {
        text.parse().ok().map(Position::Postgres)
    }

    async fn request_snapshot(
        &self,
        config: &ConnectorConfig,
        request: &SnapshotRequest,
    ) -> Result<(), SourceError> {
        super::capture::request_snapshot(&self.url, &self.slot_name(&config.name), request).await
    }

    async fn check_condition(&self, table: &str, filter: &str) -> Result<(), SourceError> {
        super::capture::check_condition(&self.url, table, filter).await
    }

    fn key_condition(&self, key: &[(String, Value)]) -> String {
        super::snapshot::key_condition(key)
    }

    async fn read_consistent(
        &self,
        config: &ConnectorConfig,
        tables: &[(String, String)],
        out: &mpsc::Sender<SourceMessage>,
    ) -> Result<(Position, Position), SourceError> {
        let reader = TableReader::open(&self.url, &config.name)
            .await
            .map_err(super::capture::snapshot_error)?;
        let position = Position::Postgres(reader.position);
        for (schema, table) in tables {
            let mut ordinal = 0;
            let how = Reading {
                chunk_rows: 1024,
                limit: None,
                progress: None,
            };
            reader
                .read(schema, table, &position, &mut ordinal, how, out)
                .await
                .map_err(super::capture::snapshot_error)?;
        }
        reader
            .close()
            .await
            .map_err(super::capture::snapshot_error)?;
        Ok((position.clone(), position))
    }

    async fn sample(
        &self,
        config: &ConnectorConfig,
        tables: &[(String, String)],
        limit: u64,
    ) -> Result<Vec<Vec<ChangeEvent>>, SourceError> {
        let connector = &config.name;
        let mut sampled = Vec::with_capacity(tables.len());
        let failed = |e: super::snapshot::SnapshotError| SourceError::Transient(e.to_string());
        let reader = TableReader::open(&self.url, connector)
            .await
            .map_err(failed)?;
        let mut ordinal = 0;
        for (schema, table) in tables {
            let (out, mut rows) = mpsc::channel(256);
            let how = Reading {
                chunk_rows: 256,
                limit: Some(limit),
                progress: None,
            };
            let reading = async {
                let position = Position::Postgres(PgLsn(0));
                let read = reader
                    .read(schema, table, &position, &mut ordinal, how, &out)
                    .await;
                drop(out);
                read
            };
            let taking = async {
                let mut changes = Vec::new();
                while let Some(message) = rows.recv().await {
                    if let SourceMessage::Change(change) = message {
                        changes.push(change);
                    }
                }
                changes
            };
            let (read, changes) = tokio::join!(reading, taking);
            read.map_err(failed)?;
            sampled.push(changes);
        }
        reader.close().await.map_err(failed)?;
        Ok(sampled)
    }
}
