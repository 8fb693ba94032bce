//! A few current rows of each mapped table, as snapshot changes, for `fhir-cdc preview`:
//! read in read-only transactions, nothing created or written at the source.

use tokio::sync::mpsc;

use super::{
    chunk_changes, mysql,
    postgres::snapshot::{Reading, TableReader},
    sqlserver, SourceError,
};
use crate::{
    change::{ChangeEvent, ChangeLsn, PgLsn, Position, SourceMessage},
    config::{ConnectorConfig, SourceConfig},
};

/// Up to `limit` current rows of each of `tables` (`(schema, table)`), as snapshot changes,
/// table by table in the same order (PostgreSQL: all in one consistent snapshot).
pub async fn sample(
    config: &ConnectorConfig,
    tables: &[(String, String)],
    limit: u64,
) -> Result<Vec<Vec<ChangeEvent>>, SourceError> {
    let size = usize::try_from(limit).unwrap_or(usize::MAX);
    let connector = &config.name;
    let mut sampled = Vec::with_capacity(tables.len());
    match &config.source {
        SourceConfig::Postgres(pg) => {
            let failed =
                |e: super::postgres::snapshot::SnapshotError| SourceError::Transient(e.to_string());
            let reader = TableReader::open(&pg.url, connector)
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
        }
        SourceConfig::Mysql(my) => {
            let (opts, _) = mysql::tls::opts(&my.url)
                .map_err(|e| SourceError::Connector(format!("source.url: {e}")))?;
            let pool = mysql::snapshot::pool(&opts);
            for (database, table) in tables {
                let mut conn = pool.get_conn().await.map_err(mysql::MysqlError::connect)?;
                let described =
                    mysql::snapshot::ChunkTable::describe(&mut conn, connector, database, table)
                        .await?;
                drop(conn);
                let chunk =
                    mysql::snapshot::read_chunk(&pool, &described, None, None, size).await?;
                // A keyless table is read whole: only its first rows.
                let rows = chunk.rows.into_iter().take(size);
                let position = Position::Mysql(chunk.low.clone());
                sampled.push(
                    chunk_changes(&described.source, &described.key, rows, &position).collect(),
                );
            }
            pool.disconnect()
                .await
                .map_err(mysql::MysqlError::connect)?;
        }
        SourceConfig::SqlServer(ms) => {
            use sqlserver::{connection, snapshot};
            let database = crate::config::ado::database(&ms.url)
                .ok_or_else(|| SourceError::Connector("source.url names no database".into()))?;
            let mut client = connection::connect(&ms.url).await?;
            for (schema, table) in tables {
                let name = format!("{schema}.{table}");
                let described =
                    snapshot::ChunkTable::describe(&mut client, connector, &database, &name)
                        .await?;
                let (rows, _, _) =
                    snapshot::select_rows(&mut client, &described, None, None, size).await?;
                // A keyless table is read whole: only its first rows.
                let rows = rows.into_iter().take(size);
                let position = Position::SqlServer(ChangeLsn::end_of(Default::default()));
                sampled.push(
                    chunk_changes(&described.source, &described.key, rows, &position).collect(),
                );
            }
            let _ = client.close().await;
        }
    }
    Ok(sampled)
}
