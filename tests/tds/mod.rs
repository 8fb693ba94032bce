//! A small TDS responder: it speaks enough of SQL Server's wire protocol (MS-TDS) for a
//! tiberius client to log in, send SQL batches and `sp_executesql` calls, and get back
//! result sets, row counts and errors that a test scripts per statement.
//!
//! It writes the bytes MS-TDS describes for each token and type
//! (<https://learn.microsoft.com/openspecs/windows_protocols/ms-tds>): PRELOGIN with
//! encryption not supported (the test client connects with `Encrypt=DANGER_PLAINTEXT`),
//! LOGINACK for TDS 7.4, COLMETADATA and ROW with the type info of every column type the
//! connector reads, DONE and ERROR. Result sets are given as SQL Server documents the
//! shapes of its CDC functions and catalog views; the recorded rows are the tests'.

use std::sync::Arc;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A column type, as a result set's metadata declares it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SqlType {
    TinyInt,
    SmallInt,
    Int,
    BigInt,
    Bit,
    Real,
    Float,
    Decimal(u8, u8),
    Date,
    Time(u8),
    DateTime2(u8),
    DateTimeOffset(u8),
    DateTime,
    SmallDateTime,
    NVarChar(u16),
    NVarCharMax,
    NText,
    UniqueIdentifier,
    Binary(u16),
    VarBinary(u16),
    Image,
    Xml,
}

/// A value of a recorded row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Float(f64),
    /// A decimal's unscaled value (the scale is the column's).
    Scaled(i128),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
    /// Days since 0001-01-01.
    Date(u32),
    /// Increments of 10^-scale seconds since midnight.
    Time(u64),
    DateTime2 {
        days: u32,
        time: u64,
    },
    /// UTC date and time, and the offset in minutes.
    DateTimeOffset {
        days: u32,
        time: u64,
        offset: i16,
    },
    /// Days since 1900-01-01 and 1/300 s ticks.
    DateTime {
        days: i32,
        ticks: u32,
    },
    SmallDateTime {
        days: u16,
        minutes: u16,
    },
    /// A GUID in its text form.
    Guid(String),
}

/// One result set.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultSet {
    pub columns: Vec<(String, SqlType)>,
    pub rows: Vec<Vec<Cell>>,
}

impl ResultSet {
    pub fn new(columns: &[(&str, SqlType)], rows: Vec<Vec<Cell>>) -> Self {
        Self {
            columns: columns.iter().map(|(n, t)| ((*n).to_owned(), *t)).collect(),
            rows,
        }
    }

    /// One column, one row.
    pub fn single(name: &str, ty: SqlType, cell: Cell) -> Self {
        Self::new(&[(name, ty)], vec![vec![cell]])
    }
}

/// What the server answers to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Result sets, one after the other.
    Results(Vec<ResultSet>),
    /// No result set: the statement's done.
    Done,
    /// The server's error with its number.
    Error(u32, String),
}

/// A request as the client sent it: the SQL, and the values of `@P1…` as far as the
/// responder reads them (text, bytes, integers; `None` for NULL or another type).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub sql: String,
    pub params: Vec<Param>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(String),
    Bytes(Vec<u8>),
    Int(i64),
    Other,
}

/// A scripted server: `respond` answers every request of every connection.
pub struct Responder {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Responder {
    pub async fn start(respond: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let port = listener.local_addr().expect("bound").port();
        let respond = Arc::new(respond);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let respond = respond.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &*respond).await;
                });
            }
        });
        Self { port, task }
    }

    /// A connection string for this server.
    pub fn url(&self, database: &str) -> String {
        format!(
            "Server=tcp:127.0.0.1,{};Database={database};User Id=fhir_cdc;Password=secret;Encrypt=DANGER_PLAINTEXT",
            self.port
        )
    }
}

async fn serve(
    mut stream: TcpStream,
    respond: &(dyn Fn(&Request) -> Reply + Send + Sync),
) -> std::io::Result<()> {
    loop {
        let (kind, payload) = read_message(&mut stream).await?;
        let reply = match kind {
            // PRELOGIN: version 15.0.2000, encryption not supported.
            0x12 => vec![
                0x00, 0x00, 0x0B, 0x00, 0x06, 0x01, 0x00, 0x11, 0x00, 0x01, 0xFF, 0x0F, 0x00, 0x07,
                0xD0, 0x00, 0x00, 0x02,
            ],
            0x10 => login_ack(&login_database(&payload)),
            0x01 => {
                let sql = utf16(&payload[all_headers(&payload)..]);
                tokens(&respond(&Request {
                    sql,
                    params: Vec::new(),
                }))
            }
            0x03 => tokens(&respond(&rpc(&payload))),
            // Attention: acknowledged.
            0x06 => done(0x0020, 0),
            other => panic!("the responder does not speak packet type {other:#x}"),
        };
        write_message(&mut stream, &reply).await?;
    }
}

async fn read_message(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut payload = Vec::new();
    loop {
        let mut header = [0u8; 8];
        stream.read_exact(&mut header).await?;
        let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let mut body = vec![0; length - 8];
        stream.read_exact(&mut body).await?;
        payload.extend(body);
        if header[1] & 0x01 != 0 {
            return Ok((header[0], payload));
        }
    }
}

async fn write_message(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    let chunks: Vec<&[u8]> = payload.chunks(4096 - 8).collect();
    for (n, chunk) in chunks.iter().enumerate() {
        let last = n + 1 == chunks.len();
        let mut packet = vec![0x04, u8::from(last)];
        packet.extend(((chunk.len() + 8) as u16).to_be_bytes());
        packet.extend([0, 0, (n + 1) as u8, 0]);
        packet.extend(*chunk);
        stream.write_all(&packet).await?;
    }
    stream.flush().await
}

/// The length of the ALL_HEADERS block a request starts with.
fn all_headers(payload: &[u8]) -> usize {
    u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize
}

fn utf16(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// The database a LOGIN7 asks for (the last of its offset/length pairs we read).
fn login_database(payload: &[u8]) -> String {
    // OffsetLength table from byte 36: host, user, password, app, server, extension,
    // client interface, language, database (each u16 offset, u16 characters).
    let at = 36 + 8 * 4;
    let offset = usize::from(u16::from_le_bytes([payload[at], payload[at + 1]]));
    let chars = usize::from(u16::from_le_bytes([payload[at + 2], payload[at + 3]]));
    utf16(&payload[offset..offset + 2 * chars])
}

fn b_varchar(out: &mut Vec<u8>, text: &str) {
    let units: Vec<u16> = text.encode_utf16().collect();
    out.push(units.len() as u8);
    out.extend(units.iter().flat_map(|u| u.to_le_bytes()));
}

fn us_varchar(out: &mut Vec<u8>, text: &str) {
    let units: Vec<u16> = text.encode_utf16().collect();
    out.extend((units.len() as u16).to_le_bytes());
    out.extend(units.iter().flat_map(|u| u.to_le_bytes()));
}

fn token(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend((body.len() as u16).to_le_bytes());
    out.extend(body);
}

fn login_ack(database: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut env = vec![0x01];
    b_varchar(&mut env, database);
    b_varchar(&mut env, "master");
    token(&mut out, 0xE3, &env);
    let mut env = vec![0x04];
    b_varchar(&mut env, "4096");
    b_varchar(&mut env, "4096");
    token(&mut out, 0xE3, &env);
    let mut ack = vec![0x01, 0x74, 0x00, 0x00, 0x04];
    b_varchar(&mut ack, "Microsoft SQL Server");
    ack.extend([16, 0, 0x0F, 0xA0]);
    token(&mut out, 0xAD, &ack);
    out.extend(done(0, 0));
    out
}

fn done(status: u16, rows: u64) -> Vec<u8> {
    let mut out = vec![0xFD];
    out.extend(status.to_le_bytes());
    out.extend(0xC1u16.to_le_bytes());
    out.extend(rows.to_le_bytes());
    out
}

/// An `sp_executesql` call: its statement and parameters.
fn rpc(payload: &[u8]) -> Request {
    let mut at = all_headers(payload);
    let take = |at: &mut usize, n: usize| {
        let bytes = &payload[*at..*at + n];
        *at += n;
        bytes
    };
    assert_eq!(
        take(&mut at, 4),
        [0xFF, 0xFF, 0x0A, 0x00],
        "sp_executesql by id"
    );
    take(&mut at, 2);
    let mut values = Vec::new();
    while at < payload.len() {
        let name_chars = usize::from(take(&mut at, 1)[0]);
        take(&mut at, 2 * name_chars + 1);
        values.push(param(payload, &mut at));
    }
    let text = |p: &Param| match p {
        Param::Text(t) => t.clone(),
        other => panic!("sp_executesql's statement is text, not {other:?}"),
    };
    Request {
        sql: text(&values[0]),
        params: values.into_iter().skip(2).collect(),
    }
}

/// One parameter's TYPE_INFO and value.
fn param(payload: &[u8], at: &mut usize) -> Param {
    let byte = |at: &mut usize| {
        let b = payload[*at];
        *at += 1;
        b
    };
    let u16_at = |at: &mut usize| {
        let v = u16::from_le_bytes([payload[*at], payload[*at + 1]]);
        *at += 2;
        v
    };
    match byte(at) {
        0x1F => Param::Other,
        // NVARCHAR / BIGVARBIN: max length (0xFFFF: PLP), collation for text.
        ty @ (0xE7 | 0xA5 | 0xA7) => {
            let max = u16_at(at);
            if ty != 0xA5 {
                *at += 5;
            }
            let bytes = if max == 0xFFFF {
                let total = u64::from_le_bytes(payload[*at..*at + 8].try_into().expect("8"));
                *at += 8;
                if total == u64::MAX {
                    return Param::Other;
                }
                let mut bytes = Vec::new();
                loop {
                    let n =
                        u32::from_le_bytes(payload[*at..*at + 4].try_into().expect("4")) as usize;
                    *at += 4;
                    if n == 0 {
                        break;
                    }
                    bytes.extend(&payload[*at..*at + n]);
                    *at += n;
                }
                bytes
            } else {
                let n = u16_at(at);
                if n == 0xFFFF {
                    return Param::Other;
                }
                let bytes = payload[*at..*at + usize::from(n)].to_vec();
                *at += usize::from(n);
                bytes
            };
            match ty {
                0xE7 => Param::Text(utf16(&bytes)),
                0xA7 => Param::Text(String::from_utf8_lossy(&bytes).into_owned()),
                _ => Param::Bytes(bytes),
            }
        }
        // INTN
        0x26 => {
            let _max = byte(at);
            let n = usize::from(byte(at));
            let bytes = &payload[*at..*at + n];
            *at += n;
            let mut wide = [0u8; 8];
            wide[..n].copy_from_slice(bytes);
            if n == 0 {
                Param::Other
            } else {
                Param::Int(i64::from_le_bytes(wide))
            }
        }
        other => panic!("the responder does not read parameters of type {other:#x}"),
    }
}

/// The token stream of a reply.
fn tokens(reply: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    match reply {
        Reply::Done => out.extend(done(0, 0)),
        Reply::Error(number, message) => {
            let mut body = Vec::new();
            body.extend(number.to_le_bytes());
            body.extend([1, 16]);
            us_varchar(&mut body, message);
            b_varchar(&mut body, "responder");
            b_varchar(&mut body, "");
            body.extend(1u32.to_le_bytes());
            token(&mut out, 0xAA, &body);
            out.extend(done(0x0002, 0));
        }
        Reply::Results(sets) => {
            for (n, set) in sets.iter().enumerate() {
                result_set(&mut out, set);
                let more = if n + 1 < sets.len() { 0x0001 } else { 0 };
                out.extend(done(0x0010 | more, set.rows.len() as u64));
            }
        }
    }
    out
}

/// Collation Latin1_General_CI_AS (code page 1252).
const COLLATION: [u8; 5] = [0x09, 0x04, 0xD0, 0x00, 0x34];

fn result_set(out: &mut Vec<u8>, set: &ResultSet) {
    out.push(0x81);
    out.extend((set.columns.len() as u16).to_le_bytes());
    for (name, ty) in &set.columns {
        out.extend(0u32.to_le_bytes());
        out.extend(0x0001u16.to_le_bytes());
        type_info(out, *ty);
        if matches!(ty, SqlType::NText | SqlType::Image) {
            out.push(1);
            us_varchar(out, "t");
        }
        b_varchar(out, name);
    }
    for row in &set.rows {
        out.push(0xD1);
        for ((_, ty), cell) in set.columns.iter().zip(row) {
            value(out, *ty, cell);
        }
    }
}

fn decimal_size(precision: u8) -> u8 {
    match precision {
        0..=9 => 5,
        10..=19 => 9,
        20..=28 => 13,
        _ => 17,
    }
}

fn time_length(scale: u8) -> usize {
    match scale {
        0..=2 => 3,
        3..=4 => 4,
        _ => 5,
    }
}

fn type_info(out: &mut Vec<u8>, ty: SqlType) {
    use SqlType::*;
    match ty {
        TinyInt => out.extend([0x26, 1]),
        SmallInt => out.extend([0x26, 2]),
        Int => out.extend([0x26, 4]),
        BigInt => out.extend([0x26, 8]),
        Bit => out.extend([0x68, 1]),
        Real => out.extend([0x6D, 4]),
        Float => out.extend([0x6D, 8]),
        Decimal(p, s) => out.extend([0x6A, decimal_size(p), p, s]),
        Date => out.push(0x28),
        Time(s) => out.extend([0x29, s]),
        DateTime2(s) => out.extend([0x2A, s]),
        DateTimeOffset(s) => out.extend([0x2B, s]),
        DateTime => out.extend([0x6F, 8]),
        SmallDateTime => out.extend([0x6F, 4]),
        NVarChar(n) => {
            out.push(0xE7);
            out.extend((2 * n).to_le_bytes());
            out.extend(COLLATION);
        }
        NVarCharMax => {
            out.extend([0xE7, 0xFF, 0xFF]);
            out.extend(COLLATION);
        }
        NText => {
            out.push(0x63);
            out.extend(0x7FFF_FFFFu32.to_le_bytes());
            out.extend(COLLATION);
        }
        Image => {
            out.push(0x22);
            out.extend(0x7FFF_FFFFu32.to_le_bytes());
        }
        UniqueIdentifier => out.extend([0x24, 16]),
        Binary(n) => {
            out.push(0xAD);
            out.extend(n.to_le_bytes());
        }
        VarBinary(n) => {
            out.push(0xA5);
            out.extend(n.to_le_bytes());
        }
        Xml => out.extend([0xF1, 0x00]),
    }
}

fn utf16_bytes(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// A PLP value in chunks of at most 1000 bytes (several, for long values).
fn plp(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u64).to_le_bytes());
    for chunk in bytes.chunks(1000) {
        out.extend((chunk.len() as u32).to_le_bytes());
        out.extend(chunk);
    }
    out.extend(0u32.to_le_bytes());
}

fn value(out: &mut Vec<u8>, ty: SqlType, cell: &Cell) {
    use SqlType::*;
    if *cell == Cell::Null {
        match ty {
            NVarChar(_) | Binary(_) | VarBinary(_) => out.extend([0xFF, 0xFF]),
            NVarCharMax | Xml => out.extend(u64::MAX.to_le_bytes()),
            _ => out.push(0),
        }
        return;
    }
    match (ty, cell) {
        (TinyInt | SmallInt | Int | BigInt, Cell::Int(v)) => {
            let n = match ty {
                TinyInt => 1,
                SmallInt => 2,
                Int => 4,
                _ => 8,
            };
            out.push(n as u8);
            out.extend(&v.to_le_bytes()[..n]);
        }
        (Bit, Cell::Bool(b)) => out.extend([1, u8::from(*b)]),
        (Real, Cell::Float(f)) => {
            out.push(4);
            out.extend((*f as f32).to_le_bytes());
        }
        (Float, Cell::Float(f)) => {
            out.push(8);
            out.extend(f.to_le_bytes());
        }
        (Decimal(p, _), Cell::Scaled(v)) => {
            let size = decimal_size(p);
            out.extend([size, u8::from(*v >= 0)]);
            out.extend(&v.unsigned_abs().to_le_bytes()[..usize::from(size) - 1]);
        }
        (Date, Cell::Date(days)) => {
            out.push(3);
            out.extend(&days.to_le_bytes()[..3]);
        }
        (Time(s), Cell::Time(t)) => {
            let n = time_length(s);
            out.push(n as u8);
            out.extend(&t.to_le_bytes()[..n]);
        }
        (DateTime2(s), Cell::DateTime2 { days, time }) => {
            let n = time_length(s);
            out.push((n + 3) as u8);
            out.extend(&time.to_le_bytes()[..n]);
            out.extend(&days.to_le_bytes()[..3]);
        }
        (DateTimeOffset(s), Cell::DateTimeOffset { days, time, offset }) => {
            let n = time_length(s);
            out.push((n + 5) as u8);
            out.extend(&time.to_le_bytes()[..n]);
            out.extend(&days.to_le_bytes()[..3]);
            out.extend(offset.to_le_bytes());
        }
        (DateTime, Cell::DateTime { days, ticks }) => {
            out.push(8);
            out.extend(days.to_le_bytes());
            out.extend(ticks.to_le_bytes());
        }
        (SmallDateTime, Cell::SmallDateTime { days, minutes }) => {
            out.push(4);
            out.extend(days.to_le_bytes());
            out.extend(minutes.to_le_bytes());
        }
        (NVarChar(_), Cell::Text(t)) => {
            let bytes = utf16_bytes(t);
            out.extend((bytes.len() as u16).to_le_bytes());
            out.extend(bytes);
        }
        (NVarCharMax | Xml, Cell::Text(t)) => plp(out, &utf16_bytes(t)),
        (NText | Image, cell) => {
            let bytes = match (ty, cell) {
                (NText, Cell::Text(t)) => utf16_bytes(t),
                (Image, Cell::Bytes(b)) => b.clone(),
                _ => panic!("{cell:?} is no {ty:?}"),
            };
            // Text pointer (16 bytes), timestamp (8), then the data.
            out.push(16);
            out.extend([0xAB; 16]);
            out.extend([0; 8]);
            out.extend((bytes.len() as u32).to_le_bytes());
            out.extend(bytes);
        }
        (Binary(_) | VarBinary(_), Cell::Bytes(b)) => {
            out.extend((b.len() as u16).to_le_bytes());
            out.extend(b);
        }
        (UniqueIdentifier, Cell::Guid(text)) => {
            let hex: String = text.chars().filter(char::is_ascii_hexdigit).collect();
            let raw: Vec<u8> = (0..16)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
                .collect();
            // The first three groups little-endian, as SQL Server stores them.
            out.push(16);
            out.extend(raw[..4].iter().rev());
            out.extend(raw[4..6].iter().rev());
            out.extend(raw[6..8].iter().rev());
            out.extend(&raw[8..]);
        }
        (ty, cell) => panic!("the responder cannot write {cell:?} as {ty:?}"),
    }
}
