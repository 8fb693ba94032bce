//! `[source]`: the source database, one variant per kind, each refusing the keys of the
//! others, with the Debezium-style settings each kind reads (slot and publication names,
//! snapshot mode and chunk size, heartbeat, server id, signal table, poll interval).

use std::fmt;

use serde::{Deserialize, Deserializer};

use super::Secret;

/// A named object (`slot.name = …`, `publication.name = …`, as Debezium spells them).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Named {
    pub name: String,
}

/// Debezium's `snapshot.mode` and `incremental.snapshot.chunk.size`, as
/// `snapshot.mode` and `snapshot.chunk.size`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// When to snapshot; default `initial`.
    pub mode: Option<SnapshotMode>,
    /// Rows per snapshot chunk (`snapshot.chunk.size`); default 1024.
    pub chunk: Option<ChunkConfig>,
}

/// `snapshot.chunk.size`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkConfig {
    pub size: usize,
}

/// When the connector reads the tables' existing rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Every mapped table not yet snapshotted according to the connector's stored state is
    /// read (in chunks, alongside the stream), then only changes (default). A slot that
    /// lost the WAL it needs, or a slot gone while the state says capture had begun, stops
    /// the connector with an explanation.
    Initial,
    /// Never: only changes from the slot's creation on.
    Never,
    /// As `initial`, and also when the slot lost the WAL it needs (`wal_status = lost`,
    /// after `max_slot_wal_keep_size`) or is gone: the slot is (re)created and every table
    /// snapshotted again, so the topics are whole again (with repeats).
    WhenNeeded,
}

/// The source database: one variant per kind (`kind = "postgres"`, `"mysql"` or
/// `"sqlserver"`, the first key of `[source]`), each refusing the keys of the others.
#[derive(Debug)]
pub enum SourceConfig {
    /// PostgreSQL, through logical replication (`pgoutput`).
    Postgres(PostgresConfig),
    /// MySQL or MariaDB, through the binary log.
    Mysql(MysqlConfig),
    /// SQL Server, through its change data capture tables.
    SqlServer(SqlServerConfig),
}

/// A PostgreSQL source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, usually a reference to a secret:
    /// `postgres://user:password@host:port/database` (or libpq's `key=value` form).
    pub url: Secret,
    /// The logical replication slot (`slot.name`). Default `fhir_cdc_<name>`, with `-` as
    /// `_`. Created when absent; never dropped.
    pub slot: Option<Named>,
    /// The publication of the mapped tables (`publication.name`). Default as the slot.
    /// Created when absent, limited to the mapped tables, extended when a mapping names a
    /// table it lacks; never dropped.
    pub publication: Option<Named>,
    /// `snapshot.mode` (`initial` by default) and `snapshot.chunk.size`.
    pub snapshot: Option<SnapshotConfig>,
    /// `heartbeat.interval.ms`, how often a heartbeat is written so that the acknowledged
    /// position advances on an idle database or over unmapped traffic. Default 10000.
    pub heartbeat: Option<HeartbeatConfig>,
}

/// A MySQL or MariaDB source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// Connection URL, usually a reference to a secret:
    /// `mysql://user:password@host:port/database`.
    pub url: Secret,
    /// `server.id`: the replica id the connector registers with, unique among the server's
    /// replicas (Debezium's `database.server.id`). Default: derived from the connector's
    /// name, in 1000000–2147483647.
    pub server: Option<ServerId>,
    /// `snapshot.mode` (`initial` by default) and `snapshot.chunk.size`.
    pub snapshot: Option<SnapshotConfig>,
    /// `heartbeat.interval.ms`: the server sends a heartbeat after this long without
    /// events, so that the stored position advances while it is idle or its traffic is
    /// all on unmapped tables. Default 10000.
    pub heartbeat: Option<HeartbeatConfig>,
    /// `signal.data.collection`: the `database.table` through which `fhir-cdc snapshot`
    /// (and a DBA's INSERT) asks the connector for ad-hoc snapshots (Debezium's signal
    /// table: `id`, `type`, `data`). None: ad-hoc snapshots are refused.
    pub signal: Option<SignalConfig>,
}

/// Debezium's `signal.data.collection`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalConfig {
    pub data: SignalData,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalData {
    pub collection: String,
}

/// A SQL Server source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlServerConfig {
    /// An ADO.NET connection string, as SQL Server DBAs write them, usually with a secret
    /// in it: `Server=tcp:host,1433;Database=lab;User Id=fhir_cdc;Password=${env:PW};
    /// Encrypt=true`. TLS as `Encrypt` (`true`, `false` for the login only, `DANGER_PLAINTEXT`
    /// for none), `TrustServerCertificate` and `TrustServerCertificateCA=<PEM or DER path>`;
    /// `IntegratedSecurity=true` where the build has it. `Database` is required.
    pub url: Secret,
    /// `snapshot.mode` (`initial` by default) and `snapshot.chunk.size`.
    pub snapshot: Option<SnapshotConfig>,
    /// `poll.interval.ms`: how long the connector waits before asking the change tables
    /// again when they had nothing new (Debezium's `poll.interval.ms`). Default 500.
    pub poll: Option<PollConfig>,
    /// `signal.data.collection`: the `schema.table` (with CDC enabled on it) through which
    /// `fhir-cdc snapshot` asks the connector for ad-hoc snapshots (Debezium's signal table:
    /// `id`, `type`, `data`). None: ad-hoc snapshots are refused.
    pub signal: Option<SignalConfig>,
}

/// `poll.interval.ms`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollConfig {
    pub interval: Milliseconds,
}

impl SqlServerConfig {
    pub fn snapshot_mode(&self) -> SnapshotMode {
        snapshot_mode(self.snapshot.as_ref())
    }

    pub fn snapshot_chunk_size(&self) -> usize {
        snapshot_chunk_size(self.snapshot.as_ref())
    }

    pub fn poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.poll.as_ref().map_or(500, |p| p.interval.ms))
    }

    /// The signal table, `schema.table` (so once the configuration is validated).
    pub fn signal_table(&self) -> Option<&str> {
        self.signal.as_ref().map(|s| s.data.collection.as_str())
    }
}

/// `server.id`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerId {
    pub id: u32,
}

impl MysqlConfig {
    /// The replica id for connector `connector`.
    pub fn server_id(&self, connector: &str) -> u32 {
        self.server.as_ref().map_or_else(
            || {
                // FNV-1a of the name: stable across runs and builds.
                let hash = connector.bytes().fold(0x811c_9dc5_u32, |h, b| {
                    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
                });
                1_000_000 + hash % (i32::MAX as u32 - 1_000_000)
            },
            |s| s.id,
        )
    }

    pub fn heartbeat_interval(&self) -> std::time::Duration {
        heartbeat_interval(self.heartbeat.as_ref())
    }

    pub fn snapshot_mode(&self) -> SnapshotMode {
        snapshot_mode(self.snapshot.as_ref())
    }

    pub fn snapshot_chunk_size(&self) -> usize {
        snapshot_chunk_size(self.snapshot.as_ref())
    }

    /// The signal table, `database.table` (so once the configuration is validated).
    pub fn signal_table(&self) -> Option<&str> {
        self.signal.as_ref().map(|s| s.data.collection.as_str())
    }
}

/// Debezium's `heartbeat.interval.ms`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    pub interval: Milliseconds,
}

/// A duration written as `….ms`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Milliseconds {
    pub ms: u64,
}

/// `kind`, then the rest of the table straight into its variant: serde's internally tagged
/// enums buffer the whole table first, and the buffer has no lines, so every error in
/// `[source]` (an unknown key, a secret that does not resolve) would point at the table's
/// header instead of the line at fault. Only the keys the parser hands over before `kind`
/// (it goes in key order: `heartbeat`) are buffered.
impl<'de> Deserialize<'de> for SourceConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{DeserializeSeed, Error, IntoDeserializer, MapAccess, Visitor};

        /// The buffered entries, then the rest of the table.
        struct Chained<A> {
            buffered: std::vec::IntoIter<(String, toml::Value)>,
            value: Option<toml::Value>,
            rest: A,
        }

        impl<'de, A: MapAccess<'de>> MapAccess<'de> for Chained<A> {
            type Error = A::Error;

            fn next_key_seed<K: DeserializeSeed<'de>>(
                &mut self,
                seed: K,
            ) -> Result<Option<K::Value>, A::Error> {
                match self.buffered.next() {
                    Some((key, value)) => {
                        self.value = Some(value);
                        seed.deserialize(key.into_deserializer()).map(Some)
                    }
                    None => self.rest.next_key_seed(seed),
                }
            }

            fn next_value_seed<V: DeserializeSeed<'de>>(
                &mut self,
                seed: V,
            ) -> Result<V::Value, A::Error> {
                match self.value.take() {
                    Some(value) => seed.deserialize(value).map_err(A::Error::custom),
                    None => self.rest.next_value_seed(seed),
                }
            }
        }

        struct Kinded;

        impl<'de> Visitor<'de> for Kinded {
            type Value = SourceConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table with `kind` (postgres, mysql or sqlserver)")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SourceConfig, A::Error> {
                let mut buffered = Vec::new();
                let kind = loop {
                    match map.next_key::<String>()? {
                        Some(key) if key == "kind" => break map.next_value::<SourceKind>()?,
                        Some(key) => buffered.push((key, map.next_value::<toml::Value>()?)),
                        None => return Err(A::Error::missing_field("kind")),
                    }
                };
                let rest = serde::de::value::MapAccessDeserializer::new(Chained {
                    buffered: buffered.into_iter(),
                    value: None,
                    rest: map,
                });
                Ok(match kind {
                    SourceKind::Postgres => SourceConfig::Postgres(Deserialize::deserialize(rest)?),
                    SourceKind::Mysql => SourceConfig::Mysql(Deserialize::deserialize(rest)?),
                    SourceKind::Sqlserver => {
                        SourceConfig::SqlServer(Deserialize::deserialize(rest)?)
                    }
                })
            }
        }

        deserializer.deserialize_map(Kinded)
    }
}

impl SourceConfig {
    pub fn kind(&self) -> SourceKind {
        match self {
            Self::Postgres(_) => SourceKind::Postgres,
            Self::Mysql(_) => SourceKind::Mysql,
            Self::SqlServer(_) => SourceKind::Sqlserver,
        }
    }

    /// The connection URL.
    pub fn url(&self) -> &Secret {
        match self {
            Self::Postgres(pg) => &pg.url,
            Self::Mysql(mysql) => &mysql.url,
            Self::SqlServer(mssql) => &mssql.url,
        }
    }
}

impl PostgresConfig {
    /// The slot name for connector `connector`.
    pub fn slot_name(&self, connector: &str) -> String {
        self.slot
            .as_ref()
            .map_or_else(|| default_object_name(connector), |s| s.name.clone())
    }

    /// The publication name for connector `connector`.
    pub fn publication_name(&self, connector: &str) -> String {
        self.publication
            .as_ref()
            .map_or_else(|| default_object_name(connector), |p| p.name.clone())
    }

    pub fn heartbeat_interval(&self) -> std::time::Duration {
        heartbeat_interval(self.heartbeat.as_ref())
    }

    pub fn snapshot_mode(&self) -> SnapshotMode {
        snapshot_mode(self.snapshot.as_ref())
    }

    /// Rows per snapshot chunk.
    pub fn snapshot_chunk_size(&self) -> usize {
        snapshot_chunk_size(self.snapshot.as_ref())
    }
}

fn heartbeat_interval(heartbeat: Option<&HeartbeatConfig>) -> std::time::Duration {
    std::time::Duration::from_millis(heartbeat.map_or(10_000, |h| h.interval.ms))
}

fn snapshot_mode(snapshot: Option<&SnapshotConfig>) -> SnapshotMode {
    snapshot
        .and_then(|s| s.mode)
        .unwrap_or(SnapshotMode::Initial)
}

fn snapshot_chunk_size(snapshot: Option<&SnapshotConfig>) -> usize {
    snapshot
        .and_then(|s| s.chunk.as_ref())
        .map_or(DEFAULT_CHUNK_SIZE, |c| c.size)
}

/// Debezium's default `incremental.snapshot.chunk.size`. Larger chunks held more rows at
/// once without reading faster (benches/snapshot.sh, README).
const DEFAULT_CHUNK_SIZE: usize = 1024;

fn default_object_name(connector: &str) -> String {
    format!(
        "fhir_cdc_{}",
        connector.replace('-', "_").to_ascii_lowercase()
    )
}

/// The kinds of source database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Postgres,
    Mysql,
    Sqlserver,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Sqlserver => "sqlserver",
        })
    }
}
