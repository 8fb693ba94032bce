//! The mysql kind of source as the rest of the crate asks of it (see `source::kind`).

use tokio::sync::mpsc;

use super::capture::MysqlSource;
use crate::{
    change::{ChangeEvent, Position, SourceMessage, Value},
    config::{ConnectorConfig, MysqlConfig},
    offsets::SnapshotRequest,
    preflight::Finding,
    source::{
        chunk_changes, kind::Kind, signal::no_signal_table, stored_state_position, MappedTables,
        SourceError,
    },
};

impl Kind for MysqlConfig {
    type Source = MysqlSource;

    fn source(&self, connector: &str, tables: Vec<(String, String)>) -> MysqlSource {
        MysqlSource::new(connector, self, tables)
    }

    async fn preflight(
        &self,
        config: &ConnectorConfig,
        mapped: Option<&MappedTables>,
    ) -> Vec<Finding> {
        let keyed = mapped.map_or(&[][..], |m| &m.keyed[..]);
        let tables: Vec<super::preflight::MappedTable> = keyed
            .iter()
            .map(|(qualified, key)| {
                let (database, table) = qualified.split_once('.').unwrap_or(("", qualified));
                super::preflight::MappedTable {
                    database: database.to_owned(),
                    table: table.to_owned(),
                    key: key.clone(),
                    columns: mapped
                        .and_then(|m| m.columns.get(qualified))
                        .into_iter()
                        .flatten()
                        .cloned()
                        .collect(),
                }
            })
            .collect();
        let mut findings = super::preflight::check(&self.url, &tables, self.signal_table()).await;
        match stored_state_position(config).await {
            Ok(Some(stored)) => findings.push(
                super::preflight::stored_position(&self.url, &stored, self.snapshot_mode()).await,
            ),
            Ok(None) => {}
            Err(finding) => findings.push(finding),
        }
        findings
    }

    async fn reader_now(&self, config: &ConnectorConfig) -> Result<Option<String>, SourceError> {
        super::lock_holder(&self.url, &config.name).await
    }

    async fn log_end(&self) -> Result<String, SourceError> {
        let mut conn = super::connect(&self.url).await?;
        let (position, gtid) = super::current_position(&mut conn).await?;
        Ok(super::capture::position_text(&position, gtid.as_ref()))
    }

    fn stored_position(&self, text: &str) -> Option<Position> {
        super::capture::parse_position(text)
            .ok()
            .map(|(p, _)| Position::Mysql(p))
    }

    async fn request_snapshot(
        &self,
        _: &ConnectorConfig,
        request: &SnapshotRequest,
    ) -> Result<(), SourceError> {
        let Some(signal) = self.signal_table() else {
            let example = "<database>.fhir_cdc_signal";
            return Err(no_signal_table(
                "mysql",
                example,
                &super::signal::ddl(example),
            ));
        };
        Ok(super::signal::request_snapshot(&self.url, signal, request).await?)
    }

    async fn check_condition(&self, table: &str, filter: &str) -> Result<(), SourceError> {
        Ok(super::signal::check_condition(&self.url, table, filter).await?)
    }

    fn key_condition(&self, key: &[(String, Value)]) -> String {
        super::signal::key_condition(key)
    }

    async fn read_consistent(
        &self,
        config: &ConnectorConfig,
        tables: &[(String, String)],
        out: &mpsc::Sender<SourceMessage>,
    ) -> Result<(Position, Position), SourceError> {
        let window =
            super::snapshot::read_consistent(&self.url, &config.name, tables, 1024, out).await?;
        // Snapshot chunks go out at a transaction's end with a step after it: what they
        // hold is as of that end, so every step of the read's position is before it.
        let low = Position::Mysql(crate::change::BinlogPosition {
            step: u32::MAX,
            ..window.low
        });
        Ok((low, Position::Mysql(window.high)))
    }

    async fn sample(
        &self,
        config: &ConnectorConfig,
        tables: &[(String, String)],
        limit: u64,
    ) -> Result<Vec<Vec<ChangeEvent>>, SourceError> {
        let size = usize::try_from(limit).unwrap_or(usize::MAX);
        let connector = &config.name;
        let mut sampled = Vec::with_capacity(tables.len());
        let (opts, _) = super::tls::opts(&self.url)
            .map_err(|e| SourceError::Connector(format!("source.url: {e}")))?;
        let pool = super::snapshot::pool(&opts);
        for (database, table) in tables {
            let mut conn = pool.get_conn().await.map_err(super::MysqlError::connect)?;
            let described =
                super::snapshot::ChunkTable::describe(&mut conn, connector, database, table)
                    .await?;
            drop(conn);
            let chunk = super::snapshot::read_chunk(&pool, &described, None, None, size).await?;
            // A keyless table is read whole: only its first rows.
            let rows = chunk.rows.into_iter().take(size);
            let position = Position::Mysql(chunk.low.clone());
            sampled
                .push(chunk_changes(&described.source, &described.key, rows, &position).collect());
        }
        pool.disconnect()
            .await
            .map_err(super::MysqlError::connect)?;
        Ok(sampled)
    }
}
