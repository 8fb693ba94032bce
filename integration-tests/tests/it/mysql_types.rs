//! Every MySQL/MariaDB column type reads exactly, and the same from the binary log as from a
//! snapshot read: a row written once is decoded from the server's binlog (the table map's
//! metadata) and read back through a snapshot chunk (the binary protocol), and both give
//! the values the row was written with — latin1 text as UTF-8, a zero date as a zero date.

use std::{collections::HashSet, time::Duration};

use fhir_cdc::{
    change::{text_of, ExactDecimal, Value},
    source::mysql::{
        binlog::{BinlogReader, Decoded, ReaderOptions, StartAt},
        current_position,
        snapshot::{self, ChunkTable},
    },
};
use mysql_async::{prelude::Queryable, Conn, Opts};

use crate::stack;

#[tokio::test]
async fn every_type_reads_the_same_from_the_binlog_and_a_snapshot() {
    let opts = Opts::from_url(&stack::mysql_url()).unwrap();
    let mut conn = Conn::new(opts.clone()).await.unwrap();
    let table = stack::unique("my_types");
    conn.query_drop("SET SESSION sql_mode = '', time_zone = '+00:00'")
        .await
        .unwrap();
    conn.query_drop(format!(
        "CREATE TABLE {table} (
            id INT PRIMARY KEY, amount DECIMAL(30,10), flag TINYINT(1), one_bit BIT(1),
            wide_bits BIT(12), i INT, ui INT UNSIGNED, big BIGINT, ubig BIGINT UNSIGNED,
            f FLOAT, g DOUBLE, day DATE, zero_day DATE, at DATETIME(6), zero_at DATETIME,
            ts TIMESTAMP(3) NULL, t TIME(2), neg TIME, y YEAR,
            name VARCHAR(40) CHARACTER SET latin1, note TEXT CHARACTER SET utf8mb4,
            raw VARBINARY(8), payload BLOB, status ENUM('F','P','C'), tags SET('a','b','c'),
            doc JSON, nothing VARCHAR(5) NULL, tiny TINYINT, small SMALLINT,
            medium MEDIUMINT, umedium MEDIUMINT UNSIGNED)"
    ))
    .await
    .unwrap();
    let (from, _) = current_position(&mut conn).await.unwrap();
    conn.query_drop(format!(
        "INSERT INTO {table} VALUES (
            7, -12345678901234567890.1234567890, 1, b'1', b'101000000001', -2147483648,
            4294967295, -9223372036854775808, 18446744073709551615, 0.1, 2.5e-300,
            '2024-02-29', '0000-00-00', '2024-03-05 14:30:00.000001', '0000-00-00 00:00:00',
            '2024-03-05 19:30:00.250', '07:05:03.25', '-838:59:59', 2024,
            'Müller € ç', 'Zoë 🩺', x'00ff10', x'cafe', 'C', 'a,c', '{{\"k\": [1, 2.50]}}', NULL,
            -128, -32768, -8388608, 16777215)"
    ))
    .await
    .unwrap();

    let database = opts.db_name().unwrap().to_owned();
    let options = ReaderOptions {
        connector: "types".into(),
        server_id: 2_000_000 + std::process::id() % 100_000,
        heartbeat: Duration::from_secs(1),
        tables: HashSet::from([(database.clone(), table.clone())]),
    };
    let mut reader = BinlogReader::open(&opts, &options, &StartAt::File(from))
        .await
        .unwrap();
    let streamed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(Decoded::Changes(mut changes)) = reader.next().await.unwrap() {
                break changes.remove(0);
            }
        }
    })
    .await
    .expect("the insert arrives from the binary log");
    let streamed = streamed.after.unwrap();

    let described = ChunkTable::describe(&mut conn, "types", &database, &table)
        .await
        .unwrap();
    let pool = snapshot::pool(&opts);
    let chunk = snapshot::read_chunk(&pool, &described, None, None, 10)
        .await
        .unwrap();
    assert!(chunk.complete);
    let read = &chunk.rows[0];
    for (column, value) in streamed.columns() {
        assert_eq!(
            Some(value),
            read.get(column),
            "column {column}: the binlog and the snapshot differ"
        );
    }

    let text = |column: &str| text_of(streamed.get(column).unwrap()).into_owned();
    let decimal = |s: &str| Value::Decimal(ExactDecimal::parse(s).unwrap());
    assert_eq!(
        streamed.get("amount"),
        Some(&decimal("-12345678901234567890.1234567890"))
    );
    assert_eq!(streamed.get("flag"), Some(&Value::Int(1)));
    assert_eq!(streamed.get("one_bit"), Some(&Value::Bool(true)));
    assert_eq!(
        streamed.get("wide_bits"),
        Some(&Value::Bytes(vec![0x0A, 0x01]))
    );
    assert_eq!(streamed.get("i"), Some(&Value::Int(-2147483648)));
    assert_eq!(streamed.get("tiny"), Some(&Value::Int(-128)));
    assert_eq!(streamed.get("small"), Some(&Value::Int(-32768)));
    assert_eq!(streamed.get("medium"), Some(&Value::Int(-8388608)));
    assert_eq!(streamed.get("umedium"), Some(&Value::Int(16777215)));
    assert_eq!(streamed.get("ui"), Some(&Value::Int(4294967295)));
    assert_eq!(streamed.get("big"), Some(&Value::Int(i64::MIN)));
    assert_eq!(streamed.get("ubig"), Some(&decimal("18446744073709551615")));
    assert_eq!(streamed.get("f"), Some(&Value::Float(0.1)));
    assert_eq!(streamed.get("g"), Some(&Value::Float(2.5e-300)));
    assert_eq!(text("day"), "2024-02-29");
    assert_eq!(
        streamed.get("zero_day"),
        Some(&Value::ZeroDate("0000-00-00".into()))
    );
    assert_eq!(text("at"), "2024-03-05T14:30:00.000001");
    assert_eq!(
        streamed.get("zero_at"),
        Some(&Value::ZeroDate("0000-00-00 00:00:00".into()))
    );
    assert_eq!(text("ts"), "2024-03-05T19:30:00.250Z");
    assert_eq!(text("t"), "07:05:03.250");
    assert_eq!(streamed.get("neg"), Some(&Value::Text("-838:59:59".into())));
    assert_eq!(streamed.get("y"), Some(&Value::Int(2024)));
    assert_eq!(
        streamed.get("name"),
        Some(&Value::Text("Müller € ç".into()))
    );
    assert_eq!(streamed.get("note"), Some(&Value::Text("Zoë 🩺".into())));
    assert_eq!(
        streamed.get("raw"),
        Some(&Value::Bytes(vec![0x00, 0xff, 0x10]))
    );
    assert_eq!(
        streamed.get("payload"),
        Some(&Value::Bytes(vec![0xca, 0xfe]))
    );
    assert_eq!(streamed.get("status"), Some(&Value::Text("C".into())));
    assert_eq!(streamed.get("tags"), Some(&Value::Text("a,c".into())));
    assert_eq!(
        streamed.get("doc"),
        Some(&Value::Json(
            serde_json::from_str("{\"k\": [1, 2.50]}").unwrap()
        ))
    );
    assert_eq!(streamed.get("nothing"), Some(&Value::Null));
    pool.disconnect().await.unwrap();
}
