//! Ad-hoc snapshots of SQL Server tables, asked through a signal table with CDC enabled
//! on it: a request is a row inserted into it, which reaches the connector through the
//! table's change table in commit order (and waits there for a connector that is stopped).
//! Whoever asks needs `INSERT` on it; the connector never writes to it.

use super::{connection::connect, quote_ident, MssqlError};
use crate::{
    change::Value,
    config::Secret,
    offsets::SnapshotRequest,
    source::signal::{data, EXECUTE_SNAPSHOT},
};

/// `[schema].[table]` of a `schema.table`.
fn quoted(table: &str) -> String {
    let (schema, name) = table.split_once('.').unwrap_or(("dbo", table));
    super::quote_table(schema, name)
}

/// The statements that create the signal table `schema.table` and enable CDC on it.
pub fn ddl(table: &str) -> String {
    let (schema, name) = table.split_once('.').unwrap_or(("dbo", table));
    format!(
        "CREATE TABLE {} (id varchar(64) PRIMARY KEY, type varchar(32) NOT NULL, data nvarchar(max) NULL); EXEC sys.sp_cdc_enable_table @source_schema = N'{schema}', @source_name = N'{name}', @role_name = NULL;",
        quoted(table)
    )
}

/// Ask through the signal table `signal` (`schema.table`) for `request`.
pub async fn request_snapshot(
    url: &Secret,
    signal: &str,
    request: &SnapshotRequest,
) -> Result<(), MssqlError> {
    let mut client = connect(url).await?;
    let data = data(request);
    client
        .execute(
            format!("INSERT INTO {} (id, type, data) VALUES (@P1, @P2, @P3)", quoted(signal)),
            &[&request.id.as_str(), &EXECUTE_SNAPSHOT, &data.as_str()],
        )
        .await
        .map_err(|e| {
            MssqlError::Definite(format!(
                "writing the snapshot request into the signal table {signal} (it must exist with CDC enabled: `{}`, and the user needs INSERT on it): {}",
                ddl(signal),
                super::error_text(&e)
            ))
        })?;
    let _ = client.close().await;
    Ok(())
}

/// Whether `filter` is a condition the server takes on `table` (`schema.table`): compiled
/// under `SET NOEXEC ON`, never run (nor is anything a condition might smuggle in).
pub async fn check_condition(url: &Secret, table: &str, filter: &str) -> Result<(), MssqlError> {
    let mut client = connect(url).await?;
    let checked = match client
        .simple_query(format!(
            "SET NOEXEC ON; SELECT TOP (0) * FROM {} WHERE ({filter}); SET NOEXEC OFF",
            quoted(table)
        ))
        .await
    {
        Ok(stream) => stream.into_results().await.map(drop),
        Err(e) => Err(e),
    };
    let _ = client.close().await;
    checked.map_err(|e| MssqlError::Definite(format!("--where: {}", super::error_text(&e))))
}

/// The condition that selects the row with this key: `[col] = N'text' AND …`, bytes as
/// `0x…`. T-SQL literals escape only the quote, by doubling it.
pub fn key_condition(key: &[(String, Value)]) -> String {
    let terms: Vec<String> = key
        .iter()
        .map(|(column, value)| {
            let column = quote_ident(column);
            match value {
                Value::Null => format!("{column} IS NULL"),
                Value::Bytes(bytes) => format!("{column} = 0x{}", hex::encode_upper(bytes)),
                Value::Time(_) | Value::Timestamp(_) | Value::TimestampTz(_) => format!(
                    "{column} = N'{}'",
                    super::types::seven_digits(&crate::change::text_of(value))
                ),
                _ => format!(
                    "{column} = N'{}'",
                    crate::change::text_of(value).replace('\'', "''")
                ),
            }
        })
        .collect();
    terms.join(" AND ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_conditions_are_t_sql_literals() {
        let key = vec![
            ("result_id".to_owned(), Value::Int(7)),
            ("code".to_owned(), Value::Text("O'Brien".into())),
            ("path".to_owned(), Value::Text("a\\b".into())),
            ("raw".to_owned(), Value::Bytes(vec![0, 255])),
            ("gone".to_owned(), Value::Null),
        ];
        assert_eq!(
            key_condition(&key),
            "[result_id] = N'7' AND [code] = N'O''Brien' AND [path] = N'a\\b' AND [raw] = 0x00FF AND [gone] IS NULL"
        );
    }

    #[test]
    fn the_signal_table_ddl_enables_cdc_on_it() {
        let ddl = ddl("dbo.fhir_cdc_signal");
        assert!(ddl.starts_with("CREATE TABLE [dbo].[fhir_cdc_signal] (id varchar(64) PRIMARY KEY"));
        assert!(ddl.contains("@source_name = N'fhir_cdc_signal'"));
    }
}
