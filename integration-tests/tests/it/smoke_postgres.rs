//! PostgreSQL is real and decodes logically: a row inserted after a pgoutput slot was created
//! arrives through the replication protocol (pgwire-replication) with its column names and
//! values.

use std::{str::FromStr, time::Duration};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio_postgres::{config::Host, Config, NoTls};

use crate::stack;

/// A cursor over one pgoutput message (protocol docs: "Logical Replication Message Formats").
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().unwrap();
        self.0 = rest;
        *b
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    fn cstr(&mut self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap();
        let s = String::from_utf8(self.0[..end].to_vec()).unwrap();
        self.0 = &self.0[end + 1..];
        s
    }
}

#[tokio::test]
async fn an_insert_arrives_through_a_pgoutput_slot() {
    let config = Config::from_str(&stack::pg_url()).unwrap();
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);

    let table = stack::unique("smoke_pg");
    let (slot, publication) = (format!("{table}_slot"), format!("{table}_pub"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, mrn text NOT NULL, result numeric(10,3));
             CREATE PUBLICATION {publication} FOR TABLE {table};"
        ))
        .await
        .unwrap();
    let start = stack::create_slot(&client, &slot).await;
    client
        .execute(
            &format!("INSERT INTO {table} VALUES (1, 'MRN-0001', 12.500)"),
            &[],
        )
        .await
        .unwrap();

    let Some(Host::Tcp(host)) = config.get_hosts().first().cloned() else {
        panic!("TCP host expected")
    };
    let replication = ReplicationConfig::new(
        host,
        config.get_user().unwrap(),
        String::from_utf8(config.get_password().unwrap().to_vec()).unwrap(),
        config.get_dbname().unwrap(),
        slot.clone(),
        publication.clone(),
    )
    .with_port(config.get_ports()[0])
    .with_start_lsn(Lsn::from_str(&start).unwrap());
    let mut stream = ReplicationClient::connect(replication).await.unwrap();

    let (mut columns, mut values) = (Vec::new(), Vec::new());
    let decoded = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = stream.recv().await.unwrap() {
            let ReplicationEvent::XLogData { data, .. } = event else {
                continue;
            };
            let mut msg = Cursor(&data);
            match msg.u8() {
                b'R' => {
                    msg.u32(); // relation id
                    assert_eq!(msg.cstr(), "public");
                    assert_eq!(msg.cstr(), table);
                    msg.u8(); // replica identity
                    for _ in 0..msg.u16() {
                        msg.u8(); // flags
                        columns.push(msg.cstr());
                        msg.u32(); // type oid
                        msg.u32(); // type modifier
                    }
                }
                b'I' => {
                    msg.u32(); // relation id
                    assert_eq!(msg.u8(), b'N', "a new tuple");
                    for _ in 0..msg.u16() {
                        assert_eq!(msg.u8(), b't', "a text-format value");
                        let len = msg.u32() as usize;
                        values.push(String::from_utf8(msg.bytes(len).to_vec()).unwrap());
                    }
                    return;
                }
                _ => {}
            }
        }
    })
    .await;
    stream.stop();
    drop(stream);
    decoded.expect("no Insert message within 30s");
    assert_eq!(columns, ["id", "mrn", "result"]);
    assert_eq!(
        values,
        ["1", "MRN-0001", "12.500"],
        "numeric keeps its exact digits"
    );

    // The walsender may take a moment to release the slot after the stream stops.
    for attempt in 0.. {
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => break,
            Err(e) if attempt < 50 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("dropping slot {slot}: {e}"),
        }
    }
    client
        .batch_execute(&format!(
            "DROP PUBLICATION {publication}; DROP TABLE {table};"
        ))
        .await
        .unwrap();
}
