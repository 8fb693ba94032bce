//! The sqlserver kind of source as the rest of the crate asks of it (see `source::kind`).

use tokio::sync::mpsc;

use super::capture::SqlServerSource;
use crate::{
    change::{ChangeEvent, ChangeLsn, Position, SourceMessage, Value},
    config::{ConnectorConfig, SqlServerConfig},
    offsets::SnapshotRequest,
    preflight::Finding,
    source::{chunk_changes, kind::Kind, signal::no_signal_table, MappedTables, SourceError},
};

impl Kind for SqlServerConfig {
    type Source = SqlServerSource;

    fn source(&self, connector: &str, tables: Vec<(String, String)>) -> SqlServerSource {
        SqlServerSource::new(connector, self, tables)
    }

    async fn preflight(&self, _: &ConnectorConfig, mapped: Option<&MappedTables>) -> Vec<Finding> {
        let keyed = mapped.map_or(&[][..], |m| &m.keyed[..]);
        let tables: Vec<super::preflight::MappedTable> = keyed
            .iter()
            .map(|(name, key)| super::preflight::MappedTable {
                name: name.clone(),
                key: key.clone(),
            })
            .collect();
        super::preflight::check(&self.url, &tables, self.signal_table()).await
    }

    async fn reader_now(&self, config: &ConnectorConfig) -> Result<Option<String>, SourceError> {
        Ok(super::catalog::lock_holder(&self.url, &config.name).await?)
    }

    async fn log_end(&self) -> Result<String, SourceError> {
        let mut client = super::connection::connect(&self.url).await?;
        let max = super::catalog::max_lsn(&mut client).await?.ok_or_else(|| {
            SourceError::Transient(
                "the capture job has recorded no position yet (sys.fn_cdc_get_max_lsn() is NULL)"
                    .into(),
            )
        })?;
        Ok(ChangeLsn::end_of(max).to_string())
    }

    fn stored_position(&self, text: &str) -> Option<Position> {
        text.parse().ok().map(Position::SqlServer)
    }

    async fn request_snapshot(
        &self,
        _: &ConnectorConfig,
        request: &SnapshotRequest,
    ) -> Result<(), SourceError> {
        let Some(signal) = self.signal_table() else {
            let example = "dbo.fhir_cdc_signal";
            return Err(no_signal_table(
                "sqlserver",
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
        let (low, high) =
            super::snapshot::read_consistent(&self.url, &config.name, tables, 1024, out).await?;
        Ok((Position::SqlServer(low), Position::SqlServer(high)))
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
        use super::{connection, snapshot};
        let database = crate::config::ado::database(&self.url)
            .ok_or_else(|| SourceError::Connector("source.url names no database".into()))?;
        let mut client = connection::connect(&self.url).await?;
        for (schema, table) in tables {
            let name = format!("{schema}.{table}");
            let described =
                snapshot::ChunkTable::describe(&mut client, connector, &database, &name).await?;
            let (rows, _, _) =
                snapshot::select_rows(&mut client, &described, None, None, size).await?;
            // A keyless table is read whole: only its first rows.
            let rows = rows.into_iter().take(size);
            let position = Position::SqlServer(ChangeLsn::end_of(Default::default()));
            sampled
                .push(chunk_changes(&described.source, &described.key, rows, &position).collect());
        }
        let _ = client.close().await;
        Ok(sampled)
    }
}
