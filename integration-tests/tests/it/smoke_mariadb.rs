//! MariaDB is real and logs rows: a row inserted after the current binlog position arrives
//! through mysql_async's binlog stream as a row event with its column names (from
//! binlog_row_metadata=FULL) and exact values.

use std::time::Duration;

use futures_util::StreamExt;
use mysql_async::{
    binlog::events::{EventData, RowsEventData},
    prelude::Queryable,
    BinlogStreamRequest, Conn, Opts, Value,
};

use crate::stack;

#[tokio::test]
async fn an_insert_arrives_as_a_binlog_row_event() {
    let opts = Opts::from_url(&stack::mysql_url()).unwrap();
    let mut conn = Conn::new(opts.clone()).await.unwrap();
    let table = stack::unique("smoke_my");
    conn.query_drop(format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, mrn VARCHAR(32) NOT NULL, amount DECIMAL(10,2))"
    ))
    .await
    .unwrap();
    let (file, position): (String, u64) = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .unwrap()
        .map(|row: mysql_async::Row| (row.get(0).unwrap(), row.get(1).unwrap()))
        .expect("binary log is off");
    conn.query_drop(format!(
        "INSERT INTO {table} VALUES (1, 'MRN-0001', 1234.50)"
    ))
    .await
    .unwrap();

    // A replica's server id must be unique among the server's replicas.
    let server_id = 1000 + std::process::id() % 100_000;
    let mut stream = Conn::new(opts)
        .await
        .unwrap()
        .get_binlog_stream(
            BinlogStreamRequest::new(server_id)
                .with_filename(file.as_bytes())
                .with_pos(position),
        )
        .await
        .unwrap();

    let (columns, values) = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = stream.next().await {
            let event = event.unwrap();
            let Some(EventData::RowsEvent(rows_event)) = event.read_data().unwrap() else {
                continue;
            };
            let (RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_)) =
                rows_event
            else {
                continue;
            };
            let tme = stream
                .get_tme(rows_event.table_id())
                .expect("table map precedes rows");
            if tme.table_name() != table {
                continue;
            }
            let (before, after) = rows_event.rows(tme).next().unwrap().unwrap();
            assert!(before.is_none(), "an insert has no before image");
            let row = after.unwrap();
            let columns: Vec<String> = row
                .columns_ref()
                .iter()
                .map(|c| c.name_str().into_owned())
                .collect();
            let values: Vec<Value> = row
                .unwrap()
                .into_iter()
                .map(|v| Value::try_from(v).unwrap())
                .collect();
            return (columns, values);
        }
        panic!("binlog stream ended");
    })
    .await
    .expect("no row event within 30s");

    assert_eq!(columns, ["id", "mrn", "amount"]);
    assert_eq!(
        values,
        [
            Value::Int(1),
            Value::Bytes(b"MRN-0001".to_vec()),
            Value::Bytes(b"1234.50".to_vec())
        ],
        "decimal keeps its exact digits"
    );
    conn.query_drop(format!("DROP TABLE {table}"))
        .await
        .unwrap();
}
