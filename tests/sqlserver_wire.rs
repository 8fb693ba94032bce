//! The SQL Server source against a TDS-speaking responder (`tds`): the connector's real
//! queries, sent by tiberius over TCP, answered with result sets in the shapes SQL Server
//! documents for its catalog views and CDC functions
//! (`cdc.fn_cdc_get_all_changes_<instance>`: `__$start_lsn`, `__$seqval`, `__$operation`,
//! `__$update_mask`, the captured columns; `cdc.change_tables`; `cdc.captured_columns`).
//! The rows are recorded here. No SQL Server runs: what these prove is the connector's
//! handling of what such a server sends; `integration-tests` runs against a real one when
//! `MSSQL_URL` is set.

mod tds;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use fhir_cdc::{
    change::{text_of, ChangeLsn, Lsn, Operation, Position, SourceMessage, Value},
    config::{Secret, SqlServerConfig},
    offsets::{ConnectorState, TableProgress},
    source::{
        sqlserver::{capture::SqlServerSource, connection, snapshot},
        Source, SourceError, SourceIo,
    },
};
use tds::{Cell, Reply, Request, Responder, ResultSet, SqlType};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

fn lsn(block: u32) -> Lsn {
    Lsn {
        vlf: 0x2A,
        block,
        record: 1,
    }
}

fn lsn_cell(at: Lsn) -> Cell {
    Cell::Bytes(at.to_bytes().to_vec())
}

fn bytes_lsn(param: &tds::Param) -> Lsn {
    match param {
        tds::Param::Bytes(b) => Lsn::from_bytes(b).expect("an LSN parameter"),
        other => panic!("an LSN parameter, not {other:?}"),
    }
}

fn text(v: &Value) -> String {
    text_of(v).into_owned()
}

/// Columns of `sys.columns` for a table: name, base type, length in bytes, precision and
/// scale.
fn columns_set(columns: &[(&str, &str)]) -> Reply {
    Reply::Results(vec![ResultSet::new(
        &[
            ("name", SqlType::NVarChar(128)),
            ("type", SqlType::NVarChar(128)),
            ("max_length", SqlType::SmallInt),
            ("precision", SqlType::TinyInt),
            ("scale", SqlType::TinyInt),
        ],
        columns
            .iter()
            .map(|(n, t)| {
                let (length, precision, scale) = match *t {
                    "int" => (4, 10, 0),
                    "decimal" => (9, 10, 2),
                    "varchar" => (20, 0, 0),
                    _ => (0, 0, 0),
                };
                vec![
                    Cell::Text((*n).into()),
                    Cell::Text((*t).into()),
                    Cell::Int(length),
                    Cell::Int(precision),
                    Cell::Int(scale),
                ]
            })
            .collect(),
    )])
}

fn key_set(key: &[&str]) -> Reply {
    Reply::Results(vec![ResultSet::new(
        &[("name", SqlType::NVarChar(128))],
        key.iter().map(|k| vec![Cell::Text((*k).into())]).collect(),
    )])
}

#[tokio::test]
async fn every_column_type_sql_server_sends_is_read_exactly() {
    let columns = [
        ("id", "int"),
        ("tiny", "tinyint"),
        ("small", "smallint"),
        ("big", "bigint"),
        ("flag", "bit"),
        ("ratio", "real"),
        ("measure", "float"),
        ("amount", "decimal"),
        ("fee", "money"),
        ("petty", "smallmoney"),
        ("born", "date"),
        ("at_time", "time"),
        ("taken", "datetime2"),
        ("stamped", "datetimeoffset"),
        ("legacy", "datetime"),
        ("coarse", "smalldatetime"),
        ("code", "char"),
        ("note", "varchar"),
        ("long_note", "varchar"),
        ("name", "nvarchar"),
        ("memo", "nvarchar"),
        ("old_text", "text"),
        ("old_ntext", "ntext"),
        ("guid", "uniqueidentifier"),
        ("blob", "varbinary"),
        ("picture", "image"),
        ("report", "xml"),
    ];
    // As the server returns the SELECT: money cast to decimal and char, varchar and text to
    // nvarchar(max) by the connector's query.
    let types = [
        SqlType::Int,
        SqlType::TinyInt,
        SqlType::SmallInt,
        SqlType::BigInt,
        SqlType::Bit,
        SqlType::Real,
        SqlType::Float,
        SqlType::Decimal(38, 10),
        SqlType::Decimal(19, 4),
        SqlType::Decimal(10, 4),
        SqlType::Date,
        SqlType::Time(7),
        SqlType::DateTime2(3),
        SqlType::DateTimeOffset(7),
        SqlType::DateTime,
        SqlType::SmallDateTime,
        SqlType::NVarCharMax,
        SqlType::NVarCharMax,
        SqlType::NVarCharMax,
        SqlType::NVarChar(50),
        SqlType::NVarCharMax,
        SqlType::NVarCharMax,
        SqlType::NText,
        SqlType::UniqueIdentifier,
        SqlType::VarBinary(16),
        SqlType::Image,
        SqlType::Xml,
    ];
    let long = "Grüße, µg/L; ".repeat(400);
    let values = vec![
        Cell::Int(1),
        Cell::Int(255),
        Cell::Int(-32768),
        Cell::Int(9_223_372_036_854_775_807),
        Cell::Bool(true),
        Cell::Float(0.1),
        Cell::Float(6.02214076e23),
        Cell::Scaled(12_345_678_901_234_567_890_123_456_789_012_345_678),
        // 922,337,203,685,477.5807: money's largest, past a float's 2^53.
        Cell::Scaled(9_223_372_036_854_775_807),
        Cell::Scaled(-2_147_483_648),
        Cell::Date(738_944),
        Cell::Time(452_961_234_567),
        Cell::DateTime2 {
            days: 738_944,
            time: 45_296_123,
        },
        Cell::DateTimeOffset {
            days: 738_944,
            time: 360_000_000_000,
            offset: -300,
        },
        Cell::DateTime {
            days: 45_349,
            ticks: 2,
        },
        Cell::SmallDateTime {
            days: 45_349,
            minutes: 61,
        },
        Cell::Text("mg ".into()),
        // A varchar of a *_UTF8 collation: outside any Windows code page, exact because
        // the server converts it for the cast.
        Cell::Text("café 山田 ✓".into()),
        Cell::Text(long.clone()),
        Cell::Text("Zoë Ñúñez 山田".into()),
        Cell::Text(long.clone()),
        Cell::Text("légacy".into()),
        Cell::Text("нет".into()),
        Cell::Guid("6F9619FF-8B86-D011-B42D-00C04FC964FF".into()),
        Cell::Bytes(vec![0, 1, 254, 255]),
        Cell::Bytes(vec![0x89, b'P', b'N', b'G']),
        Cell::Text("<r><v>5.4</v></r>".into()),
    ];
    let nulls = vec![Cell::Null; values.len()];
    let names: Vec<(&str, SqlType)> = columns.iter().map(|(n, _)| *n).zip(types).collect();
    let row_set = ResultSet::new(
        &names,
        vec![values, {
            let mut nulls = nulls;
            nulls[0] = Cell::Int(2);
            nulls
        }],
    );
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let server = Responder::start(move |request: &Request| {
        log.lock().unwrap().push(request.sql.clone());
        if request.sql.contains("FROM sys.columns") {
            columns_set(&columns)
        } else if request.sql.contains("is_primary_key") {
            key_set(&["id"])
        } else if request.sql.starts_with("SELECT TOP (10)") {
            Reply::Results(vec![row_set.clone()])
        } else {
            Reply::Error(208, format!("unexpected: {}", request.sql))
        }
    })
    .await;
    let url = Secret::new(server.url("lab"));
    let mut client = connection::connect(&url).await.expect("logged in");
    let table = snapshot::ChunkTable::describe(&mut client, "lab", "lab", "dbo.kitchen_sink")
        .await
        .expect("described");
    let (rows, last_key, complete) = snapshot::select_rows(&mut client, &table, None, None, 10)
        .await
        .expect("read");
    let select = seen.lock().unwrap().last().cloned().unwrap();
    assert!(
        select.contains("CAST([fee] AS decimal(19,4)) AS [fee]")
            && select.contains("CAST([petty] AS decimal(10,4)) AS [petty]"),
        "money is read as a decimal: {select}"
    );
    for column in ["code", "note", "long_note", "old_text"] {
        assert!(
            select.contains(&format!("CAST([{column}] AS nvarchar(max)) AS [{column}]")),
            "{column} is read as UTF-16 whatever its collation: {select}"
        );
    }
    assert!(
        select.ends_with("FROM [dbo].[kitchen_sink] ORDER BY [kitchen_sink].[id]"),
        "{select}"
    );
    assert!(complete);
    assert_eq!(last_key, Some(vec!["2".to_owned()]));
    let row = &rows[0];
    let got = |c: &str| text(row.get(c).unwrap_or_else(|| panic!("{c}")));
    let expected = [
        ("tiny", "255"),
        ("small", "-32768"),
        ("big", "9223372036854775807"),
        ("flag", "true"),
        ("ratio", "0.1"),
        ("measure", "602214076000000000000000"),
        ("amount", "1234567890123456789012345678.9012345678"),
        ("fee", "922337203685477.5807"),
        ("petty", "-214748.3648"),
        ("born", "2024-02-29"),
        ("at_time", "12:34:56.123456700"),
        ("taken", "2024-02-29T12:34:56.123"),
        ("stamped", "2024-02-29T05:00:00-05:00"),
        ("legacy", "2024-02-29T00:00:00.007"),
        ("coarse", "2024-02-29T01:01:00"),
        ("code", "mg "),
        ("note", "café 山田 ✓"),
        ("name", "Zoë Ñúñez 山田"),
        ("old_text", "légacy"),
        ("old_ntext", "нет"),
        ("guid", "6f9619ff-8b86-d011-b42d-00c04fc964ff"),
        ("report", "<r><v>5.4</v></r>"),
    ];
    for (column, value) in expected {
        assert_eq!(got(column), value, "{column}");
    }
    assert_eq!(
        got("memo"),
        long,
        "nvarchar(max) in several chunks and packets"
    );
    assert_eq!(row.get("blob"), Some(&Value::Bytes(vec![0, 1, 254, 255])));
    assert!(matches!(row.get("picture"), Some(Value::Bytes(b)) if b.len() == 4));
    assert!(
        matches!(row.get("legacy"), Some(Value::Timestamp(_))),
        "datetime has no zone"
    );
    assert!(matches!(row.get("stamped"), Some(Value::TimestampTz(_))));
    for (column, _) in &columns[1..] {
        assert_eq!(rows[1].get(column), Some(&Value::Null), "{column} NULL");
    }
}

/// A change row: commit, seqval, operation, id, status, value.
type ChangeRecord = (Lsn, Lsn, i64, i64, &'static str, i128);

/// A recorded CDC database: one table `dbo.lab_result`, its capture instances and their
/// change rows, and how far the capture job has got.
struct Recorded {
    max: Lsn,
    snapshot: Vec<(i64, &'static str, i128)>,
    /// Capture instances: name, start, creation day, columns.
    instances: Vec<(&'static str, Lsn, i32, Vec<&'static str>)>,
    /// Change rows per instance: commit, seqval, operation, id, status, value.
    changes: BTreeMap<&'static str, Vec<ChangeRecord>>,
    /// The high mark the snapshot transactions get.
    chunk_lsn: Lsn,
    /// Where the capture job moves once the snapshot has read the table's last chunk.
    after_snapshot: Option<Lsn>,
    queries: Vec<String>,
}

fn column_type(name: &str) -> (SqlType, &'static str) {
    match name {
        "result_id" => (SqlType::Int, "int"),
        "status" => (SqlType::NVarCharMax, "varchar"),
        "value" => (SqlType::Decimal(10, 2), "decimal"),
        _ => (SqlType::NVarChar(20), "nvarchar"),
    }
}

fn answer(recorded: &Mutex<Recorded>, request: &Request) -> Reply {
    let mut db = recorded.lock().unwrap();
    db.queries.push(request.sql.clone());
    let sql = request.sql.as_str();
    if sql.contains("sp_getapplock") {
        Reply::Results(vec![ResultSet::single("", SqlType::Int, Cell::Int(0))])
    } else if sql.contains("FROM sys.columns") {
        columns_set(&[
            ("result_id", "int"),
            ("status", "varchar"),
            ("value", "decimal"),
        ])
    } else if sql.contains("is_primary_key") {
        key_set(&["result_id"])
    } else if sql.contains("FROM cdc.change_tables") {
        let mut rows = Vec::new();
        for (name, start, day, columns) in &db.instances {
            for column in columns {
                rows.push(vec![
                    Cell::Text("dbo".into()),
                    Cell::Text("lab_result".into()),
                    Cell::Text((*name).into()),
                    lsn_cell(*start),
                    Cell::DateTime {
                        days: 45_000 + day,
                        ticks: 0,
                    },
                    Cell::Text((*column).into()),
                    Cell::Text(column_type(column).1.into()),
                ]);
            }
        }
        Reply::Results(vec![ResultSet::new(
            &[
                ("schema", SqlType::NVarChar(128)),
                ("table", SqlType::NVarChar(128)),
                ("capture_instance", SqlType::NVarChar(128)),
                ("start_lsn", SqlType::Binary(10)),
                ("create_date", SqlType::DateTime),
                ("column_name", SqlType::NVarChar(128)),
                ("column_type", SqlType::NVarChar(128)),
            ],
            rows,
        )])
    } else if sql == "SELECT sys.fn_cdc_get_max_lsn()" {
        Reply::Results(vec![ResultSet::single(
            "",
            SqlType::Binary(10),
            lsn_cell(db.max),
        )])
    } else if sql.starts_with("SET TRANSACTION ISOLATION LEVEL SNAPSHOT")
        || sql.starts_with("ROLLBACK")
    {
        Reply::Done
    } else if sql.contains("sys.dm_tran_database_transactions") {
        let at = db.chunk_lsn;
        let decimal = i128::from(at.vlf) * 10i128.pow(15)
            + i128::from(at.block) * 100_000
            + i128::from(at.record);
        Reply::Results(vec![ResultSet::single(
            "",
            SqlType::Decimal(25, 0),
            Cell::Scaled(decimal),
        )])
    } else if sql.contains("FROM [dbo].[lab_result]") {
        let after = match request.params.first() {
            Some(tds::Param::Text(t)) => t.parse::<i64>().unwrap(),
            _ => i64::MIN,
        };
        let top: usize = sql["SELECT TOP (".len()..sql.find(')').unwrap()]
            .parse()
            .unwrap();
        let rows: Vec<_> = db
            .snapshot
            .iter()
            .filter(|(id, ..)| *id > after)
            .take(top)
            .map(|(id, status, value)| {
                vec![
                    Cell::Int(*id),
                    Cell::Text((*status).into()),
                    Cell::Scaled(*value),
                ]
            })
            .collect();
        if rows.len() < top {
            if let Some(max) = db.after_snapshot.take() {
                db.max = max;
            }
        }
        Reply::Results(vec![ResultSet::new(
            &[
                ("result_id", SqlType::Int),
                ("status", column_type("status").0),
                ("value", SqlType::Decimal(10, 2)),
            ],
            rows,
        )])
    } else if let Some(at) = sql.find("fn_cdc_get_all_changes_") {
        let instance =
            &sql[at + "fn_cdc_get_all_changes_".len()..sql[at..].find(']').unwrap() + at];
        let (from, to) = (bytes_lsn(&request.params[0]), bytes_lsn(&request.params[1]));
        let (_, start, _, columns) = db
            .instances
            .iter()
            .find(|(name, ..)| *name == instance)
            .cloned()
            .expect("a recorded instance");
        if from < start {
            // What SQL Server says when asked for LSNs outside an instance's range.
            return Reply::Error(313, "An insufficient number of arguments were supplied for the procedure or function cdc.fn_cdc_get_all_changes_ ...".into());
        }
        let top: Option<usize> = sql
            .strip_prefix("SELECT TOP (")
            .map(|rest| rest[..rest.find(')').unwrap()].parse().unwrap());
        let mut rows: Vec<_> = db.changes[instance]
            .iter()
            .filter(|(commit, ..)| from <= *commit && *commit <= to)
            .cloned()
            .collect();
        rows.sort_by_key(|(commit, seqval, op, ..)| (*commit, *seqval, *op));
        rows.truncate(top.unwrap_or(usize::MAX));
        let mut set_columns = vec![
            ("__$start_lsn", SqlType::Binary(10)),
            ("__$seqval", SqlType::Binary(10)),
            ("__$operation", SqlType::Int),
            ("commit_utc", SqlType::DateTime),
        ];
        set_columns.extend(columns.iter().map(|c| (*c, column_type(c).0)));
        let rows = rows
            .into_iter()
            .map(|(commit, seqval, op, id, status, value)| {
                let mut row = vec![
                    lsn_cell(commit),
                    lsn_cell(seqval),
                    Cell::Int(op),
                    Cell::DateTime {
                        days: 45_349,
                        ticks: 300 * 3600,
                    },
                    Cell::Int(id),
                    Cell::Text(status.into()),
                    Cell::Scaled(value),
                ];
                row.extend(columns[3..].iter().map(|_| Cell::Text("mmol/L".into())));
                row
            })
            .collect();
        Reply::Results(vec![ResultSet::new(&set_columns, rows)])
    } else {
        Reply::Error(102, format!("the recording has no answer to: {sql}"))
    }
}

fn recorded() -> Recorded {
    // The old instance from L1; a second one, with a new column, from L5 (a DBA's schema
    // change). Changes after L5 are in both: the connector must read them once.
    let v1 = vec![
        (lsn(3), lsn(3), 2, 4, "preliminary", 710),
        (lsn(4), lsn(4), 3, 2, "preliminary", 500),
        (lsn(4), lsn(4), 4, 2, "final", 520),
        (lsn(6), lsn(6), 1, 1, "final", 450),
    ];
    let v2 = vec![
        (lsn(6), lsn(6), 1, 1, "final", 450),
        (lsn(7), lsn(7), 2, 5, "final", 100),
    ];
    Recorded {
        max: lsn(2),
        snapshot: vec![
            (1, "final", 450),
            (2, "preliminary", 500),
            (3, "final", 610),
        ],
        instances: vec![
            (
                "dbo_lab_result",
                lsn(1),
                1,
                vec!["result_id", "status", "value"],
            ),
            (
                "dbo_lab_result_v2",
                lsn(5),
                2,
                vec!["result_id", "status", "value", "unit"],
            ),
        ],
        changes: [("dbo_lab_result", v1), ("dbo_lab_result_v2", v2)].into(),
        chunk_lsn: lsn(2),
        after_snapshot: Some(lsn(7)),
        queries: Vec::new(),
    }
}

/// A responder answering from `db`.
async fn serve(db: &Arc<Mutex<Recorded>>) -> Responder {
    let answering = db.clone();
    Responder::start(move |request| answer(&answering, request)).await
}

/// The connector of `dbo.lab_result` on `server`, in snapshot mode `mode`.
fn lab_source(server: &Responder, mode: &str) -> SqlServerSource {
    let config: SqlServerConfig = toml::from_str(&format!(
        "url = \"{}\"\npoll.interval.ms = 20\nsnapshot.chunk.size = 2\nsnapshot.mode = \"{mode}\"",
        server.url("lab")
    ))
    .expect("a config");
    SqlServerSource::new("lab", &config, vec![("dbo".into(), "lab_result".into())])
}

/// Run the source from `stored`, acknowledging every position at once, until `done` says
/// the messages are enough; the messages and the last published state.
async fn capture(
    source: SqlServerSource,
    stored: Option<ConnectorState>,
    done: impl Fn(&[SourceMessage]) -> bool,
) -> (Result<(), SourceError>, Vec<SourceMessage>, ConnectorState) {
    let (out, mut messages) = mpsc::channel(64);
    let (acked, durable) = watch::channel(None);
    let (state, published) = watch::channel(ConnectorState::new("sqlserver"));
    let shutdown = CancellationToken::new();
    let io = SourceIo {
        out,
        durable,
        state,
        shutdown: shutdown.clone(),
    };
    let running = tokio::spawn(source.run(stored, io));
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(&seen) {
        match tokio::time::timeout_at(deadline, messages.recv()).await {
            Ok(Some(message)) => {
                if let SourceMessage::Progress(Position::SqlServer(at)) = &message {
                    acked.send_replace(Some(*at));
                }
                seen.push(message);
            }
            Ok(None) => break,
            Err(_) => panic!("the source did not get there in time: {seen:#?}"),
        }
    }
    shutdown.cancel();
    drop(messages);
    drop(acked);
    let result = running.await.expect("the source task");
    let state = published.borrow().clone();
    (result, seen, state)
}

/// The changes among `messages`.
fn changes_in(messages: &[SourceMessage]) -> Vec<&fhir_cdc::change::ChangeEvent> {
    messages
        .iter()
        .filter_map(|m| match m {
            SourceMessage::Change(c) => Some(c),
            SourceMessage::Progress(_) => None,
        })
        .collect()
}

fn reached(messages: &[SourceMessage], at: Lsn) -> bool {
    messages
        .iter()
        .any(|m| matches!(m, SourceMessage::Progress(Position::SqlServer(p)) if p.commit >= at))
}

#[tokio::test]
async fn a_snapshot_then_the_change_tables_give_every_row_once_through_a_schema_change() {
    let db = Arc::new(Mutex::new(recorded()));
    let server = serve(&db).await;
    let source = lab_source(&server, "initial");
    let (result, messages, state) = capture(source, None, |m| reached(m, lsn(7))).await;
    result.expect("a clean stop");

    let changes = changes_in(&messages);
    let id = |c: &fhir_cdc::change::ChangeEvent| {
        text(
            c.after
                .as_ref()
                .or(c.before.as_ref())
                .unwrap()
                .get("result_id")
                .unwrap(),
        )
    };
    // The stream's changes, in LSN order, each once: the delete at L6 is in both
    // instances, read from the newer one.
    let stream: Vec<(Operation, String)> = changes
        .iter()
        .filter(|c| c.op != Operation::Read)
        .map(|c| (c.op, id(c)))
        .collect();
    assert_eq!(
        stream,
        [
            (Operation::Insert, "4".to_owned()),
            (Operation::Update, "2".to_owned()),
            (Operation::Delete, "1".to_owned()),
            (Operation::Insert, "5".to_owned()),
        ]
    );
    let update = changes.iter().find(|c| c.op == Operation::Update).unwrap();
    assert_eq!(
        text(update.before.as_ref().unwrap().get("status").unwrap()),
        "preliminary"
    );
    assert_eq!(
        text(update.after.as_ref().unwrap().get("status").unwrap()),
        "final"
    );
    assert_eq!(
        text(update.after.as_ref().unwrap().get("value").unwrap()),
        "5.20"
    );
    let inserted = changes.iter().rfind(|c| c.op == Operation::Insert).unwrap();
    assert_eq!(
        inserted.after.as_ref().unwrap().get("unit"),
        Some(&Value::Text("mmol/L".into())),
        "rows of the newer instance have its columns"
    );
    assert!(
        inserted.commit_time.is_some(),
        "commit time from cdc.lsn_time_mapping"
    );
    // Every snapshot row goes out once, unless a change after the read's low mark touched
    // it (the stream then gave it newer).
    let reads: Vec<String> = changes
        .iter()
        .filter(|c| c.op == Operation::Read)
        .map(|c| id(c))
        .collect();
    for id in ["1", "3"] {
        assert_eq!(
            reads.iter().filter(|r| *r == id).count(),
            1,
            "{id} in {reads:?}"
        );
    }
    assert!(reads.iter().filter(|r| *r == "2").count() <= 1);
    // Positions only go forward.
    let positions: Vec<ChangeLsn> = messages
        .iter()
        .map(|m| match m {
            SourceMessage::Change(c) => match &c.position {
                Position::SqlServer(p) => *p,
                other => panic!("{other}"),
            },
            SourceMessage::Progress(Position::SqlServer(p)) => *p,
            SourceMessage::Progress(other) => panic!("{other}"),
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] <= w[1]), "{positions:?}");
    assert!(state.tables["dbo.lab_result"].complete, "{state:?}");
    assert_eq!(state.position, Some(ChangeLsn::end_of(lsn(7)).to_string()));
    // The older instance was never asked for LSNs past the newer one's start.
    let db = db.lock().unwrap();
    assert!(db
        .queries
        .iter()
        .any(|q| q.contains("fn_cdc_get_all_changes_dbo_lab_result_v2")));
}

#[tokio::test]
async fn changes_the_cleanup_job_removed_stop_initial_and_resnapshot_when_needed() {
    let db = Arc::new(Mutex::new(recorded()));
    {
        let mut db = db.lock().unwrap();
        // The cleanup job has removed everything before L5 from both instances.
        db.instances[0].1 = lsn(5);
        db.max = lsn(7);
        db.chunk_lsn = lsn(7);
        db.after_snapshot = None;
    }
    let server = serve(&db).await;
    let stored = ConnectorState {
        position: Some(ChangeLsn::end_of(lsn(2)).to_string()),
        tables: [(
            "dbo.lab_result".to_owned(),
            TableProgress {
                complete: true,
                ..TableProgress::default()
            },
        )]
        .into(),
        ..ConnectorState::new("sqlserver")
    };

    let initial = lab_source(&server, "initial");
    let (result, messages, _) = capture(initial, Some(stored.clone()), |_| false).await;
    let err = result.expect_err("a gap stops initial").to_string();
    assert!(
        err.contains("snapshot.mode = \"when_needed\"") && err.contains("sp_cdc_change_job"),
        "{err}"
    );
    assert!(messages.is_empty(), "nothing went out across the gap");

    let when_needed = lab_source(&server, "when_needed");
    let (result, messages, state) = capture(when_needed, Some(stored), |m| {
        m.iter()
            .filter(|m| matches!(m, SourceMessage::Change(c) if c.op == Operation::Read))
            .count()
            >= 3
    })
    .await;
    result.expect("a clean stop");
    let reads = messages
        .iter()
        .filter(|m| matches!(m, SourceMessage::Change(c) if c.op == Operation::Read))
        .count();
    assert_eq!(reads, 3, "every row read again: {messages:#?}");
    assert!(state.position.is_some());
}

#[tokio::test]
async fn a_backlog_larger_than_a_window_is_read_in_whole_transactions() {
    // 9,999 inserts in one transaction, then an update whose old row is the 10,000th row
    // of the change function (a window's limit) and whose new row the 10,001st.
    let mut v1: Vec<ChangeRecord> = (1..10_000)
        .map(|n| {
            (
                lsn(3),
                Lsn {
                    vlf: 0x2A,
                    block: 3,
                    record: n as u16,
                },
                2,
                i64::from(n) + 10,
                "preliminary",
                100,
            )
        })
        .collect();
    v1.push((lsn(4), lsn(4), 3, 11, "preliminary", 100));
    v1.push((lsn(4), lsn(4), 4, 11, "final", 120));
    v1.push((lsn(5), lsn(5), 2, 99_999, "final", 1));
    let db = Arc::new(Mutex::new(Recorded {
        max: lsn(2),
        snapshot: Vec::new(),
        instances: vec![(
            "dbo_lab_result",
            lsn(1),
            1,
            vec!["result_id", "status", "value"],
        )],
        changes: [("dbo_lab_result", v1)].into(),
        chunk_lsn: lsn(2),
        after_snapshot: Some(lsn(5)),
        queries: Vec::new(),
    }));
    let server = serve(&db).await;
    let source = lab_source(&server, "initial");
    let (result, messages, _) = capture(source, None, |m| reached(m, lsn(5))).await;
    result.expect("a clean stop");
    let ops: Vec<Operation> = changes_in(&messages).iter().map(|c| c.op).collect();
    assert_eq!(ops.len(), 10_001, "every change once");
    assert_eq!(ops.iter().filter(|op| **op == Operation::Update).count(), 1);
    assert_eq!(ops.last(), Some(&Operation::Insert));
    let windows = db
        .lock()
        .unwrap()
        .queries
        .iter()
        .filter(|q| q.contains("fn_cdc_get_all_changes_"))
        .count();
    assert!(windows >= 2, "the backlog took more than one window");
}

#[tokio::test]
async fn a_snapshot_stopped_after_a_chunk_goes_on_after_it() {
    let db = Arc::new(Mutex::new(Recorded {
        after_snapshot: None,
        ..recorded()
    }));
    let server = serve(&db).await;
    let reads = |messages: &[SourceMessage]| -> Vec<String> {
        messages
            .iter()
            .filter_map(|m| match m {
                SourceMessage::Change(c) if c.op == Operation::Read => {
                    Some(text(c.after.as_ref().unwrap().get("result_id").unwrap()))
                }
                _ => None,
            })
            .collect()
    };
    // Stopped once the first chunk (two rows) and its position are out.
    let first = lab_source(&server, "initial");
    let (result, messages, state) = capture(first, None, |m| {
        reads(m).len() >= 2 && matches!(m.last(), Some(SourceMessage::Progress(_)))
    })
    .await;
    result.expect("a clean stop");
    assert_eq!(reads(&messages), ["1", "2"]);
    let progress = &state.tables["dbo.lab_result"];
    assert!(!progress.complete);
    assert_eq!(progress.last_key, Some(vec!["2".to_owned()]));
    // Started again from that state: the rest of the table, not the chunk Kafka has.
    let again = lab_source(&server, "initial");
    let (result, messages, state) = capture(again, Some(state), |m| {
        !reads(m).is_empty() && matches!(m.last(), Some(SourceMessage::Progress(_)))
    })
    .await;
    result.expect("a clean stop");
    assert_eq!(reads(&messages), ["3"]);
    assert!(state.tables["dbo.lab_result"].complete);
    let continued = db
        .lock()
        .unwrap()
        .queries
        .iter()
        .any(|q| q.contains("[result_id] > CAST(@P1 AS int)"));
    assert!(continued, "the second run continued after the stored key");
}
